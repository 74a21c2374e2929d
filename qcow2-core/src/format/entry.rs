//! L1 and L2 table entries (standard 64-bit entries).

/// Bits 9..=55: the offset field of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the referenced cluster has refcount exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a v3 L2 entry: the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Bits that must be zero in an L1 entry.
pub const L1_RESERVED: u64 = !(OFFSET_MASK | COPIED);
/// Bits that must be zero in a standard L2 entry.
pub const L2_STANDARD_RESERVED: u64 = !(OFFSET_MASK | COPIED | ZERO | COMPRESSED);

/// A decoded L1 entry: where an L2 table lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// An entry pointing to the L2 table at `offset`, marked COPIED.
    pub const fn new(offset: u64) -> Self {
        L1Entry((offset & OFFSET_MASK) | COPIED)
    }

    /// Host offset of the L2 table, or 0 when none is allocated.
    pub const fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    /// Whether the COPIED flag is set.
    pub const fn copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// Whether reserved bits (0..=8, 56..=62) are set.
    pub const fn has_reserved_bits(self) -> bool {
        self.0 & L1_RESERVED != 0
    }

    /// The entry without its reserved bits.
    pub const fn without_reserved_bits(self) -> Self {
        L1Entry(self.0 & !L1_RESERVED)
    }
}

/// A decoded L2 entry: how one guest cluster is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: reads from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros; `offset` is a preallocated cluster, or 0.
    Zero {
        /// Preallocated host offset (0 when none).
        offset: u64,
        /// Whether the COPIED flag is set.
        copied: bool,
    },
    /// Guest data stored uncompressed at `offset`.
    Data {
        /// Host offset of the cluster.
        offset: u64,
        /// Whether the COPIED flag is set.
        copied: bool,
    },
    /// Guest data stored compressed.
    Compressed {
        /// Host byte offset where the compressed stream starts.
        offset: u64,
        /// Number of bytes the stream may occupy.
        len: u64,
    },
}

impl L2Entry {
    /// Decodes a raw standard (64-bit) L2 entry.
    ///
    /// `v3` enables the zero flag; `cluster_bits` sizes the compressed fields.
    pub const fn decode(raw: u64, cluster_bits: u32, v3: bool) -> Self {
        if raw & COMPRESSED != 0 {
            let offset_bits = 62 - (cluster_bits - 8);
            let offset = raw & ((1u64 << offset_bits) - 1);
            let sectors_mask = (1u64 << (cluster_bits - 8)) - 1;
            let sectors = ((raw >> offset_bits) & sectors_mask) + 1;
            let len = sectors * 512 - (offset & 511);
            return L2Entry::Compressed { offset, len };
        }
        let offset = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        if v3 && raw & ZERO != 0 {
            L2Entry::Zero { offset, copied }
        } else if offset == 0 {
            L2Entry::Unallocated
        } else {
            L2Entry::Data { offset, copied }
        }
    }

    /// Encodes a standard data entry with the COPIED flag set.
    pub const fn data(offset: u64) -> u64 {
        (offset & OFFSET_MASK) | COPIED
    }

    /// Whether bits reserved in a standard entry (bits 1..=8 and 56..=61)
    /// are set in `raw`. Compressed entries have no reserved bits. Bit 0
    /// is the zero flag in both versions as far as `check` is concerned
    /// (QEMU refuses it in a v2 image only when reading).
    pub const fn has_reserved_bits(raw: u64) -> bool {
        raw & COMPRESSED == 0 && raw & L2_STANDARD_RESERVED != 0
    }

    /// `raw` without its reserved bits (compressed entries unchanged).
    pub const fn without_reserved_bits(raw: u64) -> u64 {
        if raw & COMPRESSED != 0 {
            raw
        } else {
            raw & !L2_STANDARD_RESERVED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_round_trip() {
        let e = L1Entry::new(0x1234_0000);
        assert_eq!(e.l2_offset(), 0x1234_0000);
        assert!(e.copied());
        assert!(!e.has_reserved_bits());
        assert!(L1Entry(0x1234_0001).has_reserved_bits());
        assert!(L1Entry(1 << 62).has_reserved_bits());
        assert_eq!(
            L1Entry(0x1234_0002 | 1 << 56).without_reserved_bits(),
            L1Entry(0x1234_0000)
        );
        assert_eq!(L1Entry(0).l2_offset(), 0);
    }

    #[test]
    fn l2_standard_round_trip() {
        let raw = L2Entry::data(0x00ff_0000_0001_0000);
        assert_eq!(
            L2Entry::decode(raw, 16, true),
            L2Entry::Data {
                offset: 0x00ff_0000_0001_0000,
                copied: true
            }
        );
        assert_eq!(L2Entry::decode(0, 16, true), L2Entry::Unallocated);
        assert_eq!(
            L2Entry::decode(ZERO, 16, true),
            L2Entry::Zero {
                offset: 0,
                copied: false
            }
        );
        // v2 has no zero flag.
        assert_eq!(L2Entry::decode(ZERO, 16, false), L2Entry::Unallocated);
        assert!(!L2Entry::has_reserved_bits(ZERO));
        for bit in (1..=8).chain(56..=61) {
            assert!(L2Entry::has_reserved_bits(1 << bit), "bit {bit}");
            assert_eq!(L2Entry::without_reserved_bits(raw | 1 << bit), raw);
        }
        for bit in (0..1).chain(9..=55).chain(62..=63) {
            assert!(!L2Entry::has_reserved_bits(1 << bit), "bit {bit}");
        }
    }

    #[test]
    fn l2_compressed_fields() {
        for cluster_bits in 9..=21u32 {
            let offset_bits = 62 - (cluster_bits - 8);
            let offset = 0x1_2345_6789 & ((1u64 << offset_bits) - 1);
            let sectors = 2u64;
            let raw = COMPRESSED | ((sectors - 1) << offset_bits) | offset;
            let expected_len = sectors * 512 - (offset & 511);
            assert_eq!(
                L2Entry::decode(raw, cluster_bits, true),
                L2Entry::Compressed {
                    offset,
                    len: expected_len
                },
                "cluster_bits {cluster_bits}"
            );
        }
    }
}
