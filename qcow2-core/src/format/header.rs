//! The image header (v2 and v3) and header extensions.

use super::{Version, MAGIC};
use crate::Error;
use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Length of the version 2 header.
pub const V2_LENGTH: u32 = 72;
/// Smallest valid `header_length` of a version 3 header.
pub const V3_MIN_LENGTH: u32 = 104;
/// The `header_length` QEMU (and this crate) writes for version 3.
pub const V3_LENGTH: u32 = 112;

/// The header exactly as stored, big-endian, version 3 layout.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 4],
    version: U32,
    backing_file_offset: U64,
    backing_file_size: U32,
    cluster_bits: U32,
    size: U64,
    crypt_method: U32,
    l1_size: U32,
    l1_table_offset: U64,
    refcount_table_offset: U64,
    refcount_table_clusters: U32,
    nb_snapshots: U32,
    snapshots_offset: U64,
    incompatible_features: U64,
    compatible_features: U64,
    autoclear_features: U64,
    refcount_order: U32,
    header_length: U32,
    compression_type: u8,
    padding: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<RawHeader>() == V3_LENGTH as usize);

/// The decoded image header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: Version,
    /// Host offset of the backing file name, 0 when there is none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method, 0 for none.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header in bytes; extensions follow it.
    pub header_length: u32,
    /// Compression type: 0 zlib, 1 zstd.
    pub compression_type: u8,
}

impl Header {
    /// Decodes the header from the start of the image. `bytes` must hold at
    /// least [`V3_LENGTH`] bytes (a whole first sector does).
    pub fn decode<E>(bytes: &[u8]) -> Result<Self, Error<E>> {
        let (raw, _) = RawHeader::read_from_prefix(bytes).map_err(|_| Error::NotQcow2)?;
        if raw.magic != MAGIC {
            return Err(Error::NotQcow2);
        }
        let version = match raw.version.get() {
            2 => Version::V2,
            3 => Version::V3,
            _ => return Err(Error::Unsupported("qcow2 version other than 2 or 3")),
        };
        let mut header = Header {
            version,
            backing_file_offset: raw.backing_file_offset.get(),
            backing_file_size: raw.backing_file_size.get(),
            cluster_bits: raw.cluster_bits.get(),
            size: raw.size.get(),
            crypt_method: raw.crypt_method.get(),
            l1_size: raw.l1_size.get(),
            l1_table_offset: raw.l1_table_offset.get(),
            refcount_table_offset: raw.refcount_table_offset.get(),
            refcount_table_clusters: raw.refcount_table_clusters.get(),
            nb_snapshots: raw.nb_snapshots.get(),
            snapshots_offset: raw.snapshots_offset.get(),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_LENGTH,
            compression_type: 0,
        };
        if version == Version::V3 {
            header.incompatible_features = raw.incompatible_features.get();
            header.compatible_features = raw.compatible_features.get();
            header.autoclear_features = raw.autoclear_features.get();
            header.refcount_order = raw.refcount_order.get();
            header.header_length = raw.header_length.get();
            if header.header_length > V3_MIN_LENGTH {
                header.compression_type = raw.compression_type;
            }
        }
        Ok(header)
    }

    /// Encodes the header into the start of `out`, touching only the first
    /// [`Header::encoded_len`] bytes so that extensions after it survive.
    pub fn encode(&self, out: &mut [u8]) -> Option<()> {
        let raw = RawHeader {
            magic: MAGIC,
            version: U32::new(self.version.number()),
            backing_file_offset: U64::new(self.backing_file_offset),
            backing_file_size: U32::new(self.backing_file_size),
            cluster_bits: U32::new(self.cluster_bits),
            size: U64::new(self.size),
            crypt_method: U32::new(self.crypt_method),
            l1_size: U32::new(self.l1_size),
            l1_table_offset: U64::new(self.l1_table_offset),
            refcount_table_offset: U64::new(self.refcount_table_offset),
            refcount_table_clusters: U32::new(self.refcount_table_clusters),
            nb_snapshots: U32::new(self.nb_snapshots),
            snapshots_offset: U64::new(self.snapshots_offset),
            incompatible_features: U64::new(self.incompatible_features),
            compatible_features: U64::new(self.compatible_features),
            autoclear_features: U64::new(self.autoclear_features),
            refcount_order: U32::new(self.refcount_order),
            header_length: U32::new(self.header_length),
            compression_type: self.compression_type,
            padding: [0; 7],
        };
        let len = self.encoded_len();
        let src = raw.as_bytes().get(..len)?;
        out.get_mut(..len)?.copy_from_slice(src);
        Some(())
    }

    /// Number of leading bytes [`Header::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        match self.version {
            Version::V2 => V2_LENGTH as usize,
            Version::V3 => self.header_length.clamp(V3_MIN_LENGTH, V3_LENGTH) as usize,
        }
    }

    /// Cluster size in bytes.
    pub const fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Byte offset of the first header extension.
    pub const fn extensions_offset(&self) -> u64 {
        self.header_length as u64
    }

    /// Checks every field that can be checked without the device, refusing
    /// features this crate does not implement with [`Error::Unsupported`].
    pub fn validate<E>(&self) -> Result<(), Error<E>> {
        use super::*;
        let corrupt = |what| Err(Error::corrupt(what, 0));
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Error::Unsupported("cluster size outside 512 B..=2 MiB"));
        }
        let cluster = self.cluster_size();
        if self.crypt_method != 0 {
            return Err(Error::Unsupported("encryption"));
        }
        if self.version == Version::V3 {
            if self.header_length < V3_MIN_LENGTH {
                return corrupt("header_length shorter than the v3 header");
            }
            if u64::from(self.header_length) > cluster {
                return corrupt("header_length larger than a cluster");
            }
            if !self.header_length.is_multiple_of(8) {
                return corrupt("header_length not a multiple of 8");
            }
        }
        let known = incompatible::DIRTY
            | incompatible::CORRUPT
            | incompatible::EXTERNAL_DATA
            | incompatible::COMPRESSION_TYPE
            | incompatible::EXTENDED_L2;
        if self.incompatible_features & !known != 0 {
            return Err(Error::Unsupported("unknown incompatible feature bits"));
        }
        if self.incompatible_features & incompatible::EXTERNAL_DATA != 0 {
            return Err(Error::Unsupported("external data files"));
        }
        if self.incompatible_features & incompatible::EXTENDED_L2 != 0 {
            return Err(Error::Unsupported("extended L2 entries (subclusters)"));
        }
        let type_bit = self.incompatible_features & incompatible::COMPRESSION_TYPE != 0;
        match (self.compression_type, type_bit) {
            (0, false) | (1, true) => {}
            (0 | 1, _) => return corrupt("compression type disagrees with its feature bit"),
            _ => {
                return Err(Error::Unsupported(
                    "compression type other than zlib or zstd",
                ))
            }
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return corrupt("refcount_order above 6");
        }
        if self.version == Version::V2 && self.refcount_order != 4 {
            return corrupt("v2 image with refcount width other than 16");
        }
        if self.backing_file_offset != 0 {
            if self.backing_file_offset >= cluster
                || self.backing_file_offset + u64::from(self.backing_file_size) > cluster
            {
                return corrupt("backing file name outside the first cluster");
            }
            return Err(Error::Unsupported("backing files"));
        }
        // L1 table: big enough for the disk, within limits, aligned, not on the header.
        if self.size > (1 << 62) {
            return corrupt("virtual size too large");
        }
        // One L1 entry maps cluster / 8 clusters.
        let needed_l1 = super::shr_ceil(self.size, 2 * self.cluster_bits - 3);
        if u64::from(self.l1_size) < needed_l1 {
            return corrupt("L1 table too small for the virtual size");
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return corrupt("L1 table larger than 32 MiB");
        }
        if self.l1_size > 0 {
            check_table(self.l1_table_offset, l1_bytes, cluster, L1_PLACEMENT)?;
        } else if !super::is_aligned(self.l1_table_offset, cluster) {
            // QEMU insists on an aligned offset even for an empty table.
            return Err(Error::corrupt(L1_PLACEMENT[0], self.l1_table_offset));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cluster;
        if self.refcount_table_clusters == 0 {
            return corrupt("refcount table of zero clusters");
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return corrupt("refcount table larger than 8 MiB");
        }
        check_table(
            self.refcount_table_offset,
            rt_bytes,
            cluster,
            REFTABLE_PLACEMENT,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return corrupt("too many snapshots");
        }
        if self.nb_snapshots > 0 {
            check_table(self.snapshots_offset, 1, cluster, SNAPSHOT_PLACEMENT)?;
        } else if !super::is_aligned(self.snapshots_offset, cluster) {
            // QEMU checks the alignment even when there are no snapshots.
            return Err(Error::corrupt(SNAPSHOT_PLACEMENT[0], self.snapshots_offset));
        }
        if self.autoclear_features & autoclear::RAW_EXTERNAL != 0
            && self.incompatible_features & incompatible::EXTERNAL_DATA == 0
        {
            return corrupt("data-file-raw requires a data file");
        }
        Ok(())
    }

    /// The first overlap between the L1 table and the refcount table, as
    /// an error. QEMU opens such an image (reads do not use the refcount
    /// table) and refuses only writes; a repair rebuilds the refcount
    /// structures elsewhere. Read-write opens refuse it up front.
    pub fn check_tables_apart<E>(&self) -> Result<(), Error<E>> {
        let cluster = self.cluster_size();
        let l1_bytes = u64::from(self.l1_size) * 8;
        let rt_bytes = u64::from(self.refcount_table_clusters) * cluster;
        if overlaps(
            self.l1_table_offset,
            l1_bytes,
            self.refcount_table_offset,
            rt_bytes,
        ) {
            return Err(Error::corrupt(
                "L1 table overlaps the refcount table",
                self.l1_table_offset,
            ));
        }
        Ok(())
    }
}

/// Messages for one table's placement errors: unaligned, on the header,
/// beyond the offset limit.
type PlacementErrors = [&'static str; 3];

const L1_PLACEMENT: PlacementErrors = [
    "L1 table offset not cluster aligned",
    "L1 table overlaps the header",
    "L1 table beyond the host offset limit",
];
const REFTABLE_PLACEMENT: PlacementErrors = [
    "refcount table offset not cluster aligned",
    "refcount table overlaps the header",
    "refcount table beyond the host offset limit",
];
const SNAPSHOT_PLACEMENT: PlacementErrors = [
    "snapshot table offset not cluster aligned",
    "snapshot table overlaps the header",
    "snapshot table beyond the host offset limit",
];

/// Checks a metadata table's placement: cluster aligned, after the header
/// cluster, and wholly below the host offset limit.
fn check_table<E>(
    offset: u64,
    len: u64,
    cluster: u64,
    errors: PlacementErrors,
) -> Result<(), Error<E>> {
    let [unaligned, on_header, too_far] = errors;
    if !super::is_aligned(offset, cluster) {
        return Err(Error::corrupt(unaligned, offset));
    }
    if offset == 0 {
        return Err(Error::corrupt(on_header, offset));
    }
    match offset.checked_add(len) {
        Some(end) if end <= super::MAX_HOST_OFFSET => Ok(()),
        _ => Err(Error::corrupt(too_far, offset)),
    }
}

/// Whether byte ranges `[a, a+alen)` and `[b, b+blen)` intersect (an
/// empty range intersects nothing).
pub const fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

/// Known header extension types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtensionKind {
    /// Marks the end of the extension area.
    End,
    /// Backing file format name.
    BackingFormat,
    /// Feature name table.
    FeatureNames,
    /// Persistent dirty bitmaps.
    Bitmaps,
    /// Full disk encryption header pointer.
    FullDiskEncryption,
    /// External data file name.
    ExternalDataFile,
    /// Any other type; kept untouched.
    Unknown(u32),
}

impl ExtensionKind {
    /// Maps the on-disk type number.
    pub const fn from_type(t: u32) -> Self {
        match t {
            0 => ExtensionKind::End,
            0xe279_2aca => ExtensionKind::BackingFormat,
            0x6803_f857 => ExtensionKind::FeatureNames,
            0x2385_2875 => ExtensionKind::Bitmaps,
            0x0537_be77 => ExtensionKind::FullDiskEncryption,
            0x4441_5441 => ExtensionKind::ExternalDataFile,
            other => ExtensionKind::Unknown(other),
        }
    }
}

/// One header extension's location: its data starts at `offset` (after the
/// 8-byte type/length header) and is `len` bytes long, padded to 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension {
    /// The extension type.
    pub kind: ExtensionKind,
    /// Byte offset of the extension data in the image.
    pub offset: u64,
    /// Length of the data in bytes (without padding).
    pub len: u32,
}

impl Extension {
    /// Decodes the 8-byte extension header found at byte `at`, checking that
    /// the extension stays inside the first cluster of `cluster_size` bytes.
    pub fn decode<E>(raw: [u8; 8], at: u64, cluster_size: u64) -> Result<Self, Error<E>> {
        let [t0, t1, t2, t3, l0, l1, l2, l3] = raw;
        let kind = ExtensionKind::from_type(u32::from_be_bytes([t0, t1, t2, t3]));
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        let offset = at + 8;
        if offset + u64::from(len) > cluster_size {
            return Err(Error::corrupt(
                "header extension beyond the first cluster",
                at,
            ));
        }
        Ok(Extension { kind, offset, len })
    }

    /// Byte offset just after this extension and its padding.
    pub const fn next(&self) -> u64 {
        self.offset + (self.len as u64).div_ceil(8) * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{compatible, incompatible};

    fn sample(version: Version) -> Header {
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: if version == Version::V3 {
                compatible::LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: 0,
            refcount_order: 4,
            header_length: if version == Version::V3 {
                V3_LENGTH
            } else {
                V2_LENGTH
            },
            compression_type: 0,
        }
    }

    #[test]
    fn round_trip_both_versions() {
        for v in [Version::V2, Version::V3] {
            let h = sample(v);
            let mut buf = [0u8; 512];
            h.encode(&mut buf).unwrap();
            assert_eq!(&buf[..4], b"QFI\xfb");
            let back = Header::decode::<()>(&buf).unwrap();
            assert_eq!(back, h);
            back.validate::<()>().unwrap();
        }
    }

    #[test]
    fn encode_leaves_extension_bytes_alone() {
        let mut h = sample(Version::V3);
        h.header_length = 104;
        let mut buf = [0xeeu8; 512];
        h.encode(&mut buf).unwrap();
        assert!(buf[104..].iter().all(|b| *b == 0xee));
        let mut buf = [0xeeu8; 512];
        sample(Version::V2).encode(&mut buf).unwrap();
        assert!(buf[72..].iter().all(|b| *b == 0xee));
    }

    #[test]
    fn field_offsets_match_the_spec() {
        let h = sample(Version::V3);
        let mut buf = [0u8; 512];
        h.encode(&mut buf).unwrap();
        assert_eq!(u32::from_be_bytes(buf[20..24].try_into().unwrap()), 16);
        assert_eq!(u64::from_be_bytes(buf[24..32].try_into().unwrap()), 1 << 30);
        assert_eq!(u64::from_be_bytes(buf[40..48].try_into().unwrap()), 0x30000);
        assert_eq!(u64::from_be_bytes(buf[48..56].try_into().unwrap()), 0x10000);
        assert_eq!(u64::from_be_bytes(buf[80..88].try_into().unwrap()), 1);
        assert_eq!(u32::from_be_bytes(buf[96..100].try_into().unwrap()), 4);
        assert_eq!(u32::from_be_bytes(buf[100..104].try_into().unwrap()), 112);
    }

    #[test]
    fn bad_fields_are_refused_precisely() {
        let mut buf = [0u8; 512];
        assert_eq!(Header::decode::<()>(&buf), Err(Error::NotQcow2));
        sample(Version::V3).encode(&mut buf).unwrap();
        buf[7] = 4;
        assert!(matches!(
            Header::decode::<()>(&buf),
            Err(Error::Unsupported(_))
        ));

        let check = |f: &dyn Fn(&mut Header)| {
            let mut h = sample(Version::V3);
            f(&mut h);
            h.validate::<()>()
        };
        assert_eq!(
            check(&|h| h.crypt_method = 1),
            Err(Error::Unsupported("encryption"))
        );
        assert_eq!(
            check(&|h| h.backing_file_offset = 0x200),
            Err(Error::Unsupported("backing files"))
        );
        assert!(matches!(
            check(&|h| h.cluster_bits = 8),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            check(&|h| h.cluster_bits = 22),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            check(&|h| h.refcount_order = 7),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.l1_size = 1),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.l1_table_offset = 0x30200),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.l1_table_offset = 0),
            Err(Error::Corrupt { .. })
        ));
        // Overlapping tables pass field validation; read-write opens refuse them.
        let mut h = sample(Version::V3);
        h.l1_table_offset = 0x10000;
        assert!(h.validate::<()>().is_ok());
        assert!(matches!(
            h.check_tables_apart::<()>(),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.snapshots_offset = 0x10008),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.autoclear_features = crate::format::autoclear::RAW_EXTERNAL),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.refcount_table_clusters = 0),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.refcount_table_offset = 1 << 56),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.header_length = 96),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(
            check(&|h| h.incompatible_features = 1 << 5),
            Err(Error::Unsupported("unknown incompatible feature bits"))
        );
        assert_eq!(
            check(&|h| h.incompatible_features = incompatible::EXTENDED_L2),
            Err(Error::Unsupported("extended L2 entries (subclusters)"))
        );
        assert_eq!(
            check(&|h| h.incompatible_features = incompatible::EXTERNAL_DATA),
            Err(Error::Unsupported("external data files"))
        );
        assert!(matches!(
            check(&|h| h.compression_type = 1),
            Err(Error::Corrupt { .. })
        ));
        assert!(check(&|h| {
            h.compression_type = 1;
            h.incompatible_features = incompatible::COMPRESSION_TYPE
        })
        .is_ok());
    }

    #[test]
    fn empty_ranges_overlap_nothing() {
        assert!(!overlaps(0x600, 512, 0x670, 0));
        assert!(!overlaps(0x670, 0, 0x600, 512));
        assert!(overlaps(0x600, 512, 0x670, 1));
        assert!(!overlaps(0, 512, 512, 512));
    }

    #[test]
    fn extension_bounds() {
        let raw = [0x68, 0x03, 0xf8, 0x57, 0, 0, 0, 48];
        let e = Extension::decode::<()>(raw, 112, 65536).unwrap();
        assert_eq!(e.kind, ExtensionKind::FeatureNames);
        assert_eq!(e.next(), 112 + 8 + 48);
        let raw = [0, 0, 0, 9, 0, 0, 0, 5];
        let e = Extension::decode::<()>(raw, 112, 65536).unwrap();
        assert_eq!(e.kind, ExtensionKind::Unknown(9));
        assert_eq!(e.next(), 112 + 8 + 8);
        let raw = [0, 0, 0, 9, 0, 0, 2, 0];
        assert!(Extension::decode::<()>(raw, 112, 512).is_err());
    }
}
