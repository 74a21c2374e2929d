//! Layout numbers derived from the header: every unit (sector and cluster
//! shifts, table entry sizes, entries per table) is computed here.

use crate::format::{header::overlaps, Header, Version};
use crate::SECTOR;

/// Bytes of an L1, L2 or refcount table entry (extended L2 entries, 16
/// bytes, are not supported yet).
pub(crate) const ENTRY_BYTES: u64 = 8;

/// Layout numbers derived from the header, kept current as tables move.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub cluster_bits: u32,
    pub cluster_size: u64,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// log2 of `l2_entries`.
    pub l2_bits: u32,
    pub l1_offset: u64,
    pub l1_entries: u64,
    pub refcount_order: u32,
    /// Refcount entries per refcount block.
    pub refblock_entries: u64,
    /// log2 of `refblock_entries`.
    pub refblock_bits: u32,
    pub reftable_offset: u64,
    /// Entries in the refcount table.
    pub reftable_entries: u64,
    pub v3: bool,
    /// Virtual size in whole sectors.
    pub sectors: u64,
}

impl Geometry {
    pub(crate) fn new(h: &Header) -> Self {
        let cluster_size = h.cluster_size();
        // Validated header: 9 <= cluster_bits <= 21, refcount_order <= 6.
        let l2_bits = h.cluster_bits - 3;
        let refblock_bits = h.cluster_bits + 3 - h.refcount_order;
        Geometry {
            cluster_bits: h.cluster_bits,
            cluster_size,
            l2_entries: 1 << l2_bits,
            l2_bits,
            l1_offset: h.l1_table_offset,
            l1_entries: u64::from(h.l1_size),
            refcount_order: h.refcount_order,
            refblock_entries: 1 << refblock_bits,
            refblock_bits,
            reftable_offset: h.refcount_table_offset,
            reftable_entries: u64::from(h.refcount_table_clusters) << l2_bits,
            v3: h.version == Version::V3,
            // As QEMU: a size that is not a whole number of sectors is
            // rounded down (the header field itself is left alone).
            sectors: h.size / SECTOR as u64,
        }
    }

    /// Points the geometry (not the header) at a refcount table of
    /// `clusters` clusters at host `offset`: a rebuild judges entries as
    /// they will be once its table is in force, before the header switch.
    pub(crate) fn set_reftable(&mut self, offset: u64, clusters: u32) {
        self.reftable_offset = offset;
        self.reftable_entries = u64::from(clusters) << self.l2_bits;
    }

    /// Virtual disk size in bytes: the header's size rounded down to a
    /// whole sector, as QEMU presents it.
    pub(crate) const fn virtual_size(&self) -> u64 {
        self.sectors * SECTOR as u64
    }

    pub(crate) const fn reftable_bytes(&self) -> u64 {
        self.reftable_entries * ENTRY_BYTES
    }

    /// Bytes of the L1 table.
    pub(crate) const fn l1_bytes(&self) -> u64 {
        self.l1_entries * ENTRY_BYTES
    }

    /// Host byte of L1 entry `index`.
    pub(crate) const fn l1_entry_at(&self, index: u64) -> u64 {
        self.l1_offset + index * ENTRY_BYTES
    }

    /// Host byte of refcount table entry `index`.
    pub(crate) const fn reftable_entry_at(&self, index: u64) -> u64 {
        self.reftable_offset + index * ENTRY_BYTES
    }

    /// Host byte of guest cluster `guest`'s entry in the L2 table at `l2`.
    pub(crate) const fn l2_entry_at(&self, l2: u64, guest: u64) -> u64 {
        l2 + (guest & (self.l2_entries - 1)) * ENTRY_BYTES
    }

    /// log2 of the sectors in a cluster.
    pub(crate) const fn cluster_sector_bits(&self) -> u32 {
        self.cluster_bits - 9
    }

    /// Sectors per cluster.
    pub(crate) const fn cluster_sectors(&self) -> u64 {
        1 << self.cluster_sector_bits()
    }

    /// The first sector of cluster `cluster` (guest or host).
    pub(crate) const fn cluster_sector(&self, cluster: u64) -> u64 {
        cluster << self.cluster_sector_bits()
    }

    /// The cluster holding sector `sector` (guest or host).
    pub(crate) const fn sector_cluster(&self, sector: u64) -> u64 {
        sector >> self.cluster_sector_bits()
    }

    /// log2 of the subclusters in a cluster: 0 for standard L2 entries
    /// (a cluster is its one subcluster); extended L2 entries will have 32.
    pub(crate) const fn subcluster_bits(&self) -> u32 {
        0
    }

    /// The subclusters that cluster sectors `[skip, end)` touch, as a bit
    /// mask (bit `i`: subcluster `i`); 0 for an empty range.
    pub(crate) const fn subcluster_mask(&self, skip: u64, end: u64) -> u32 {
        if end <= skip {
            return 0;
        }
        let shift = self.cluster_sector_bits() - self.subcluster_bits();
        let (first, last) = (skip >> shift, (end - 1) >> shift);
        let upto = if last >= 31 {
            u32::MAX
        } else {
            (2 << last) - 1
        };
        upto & !((1u32 << first) - 1)
    }

    /// The cluster index of host byte `offset`.
    pub(crate) const fn cluster_of(&self, offset: u64) -> u64 {
        offset >> self.cluster_bits
    }

    /// Byte position of `offset` inside its cluster.
    pub(crate) const fn within_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size - 1)
    }

    /// Clusters needed to hold `bytes` bytes.
    pub(crate) const fn clusters_for(&self, bytes: u64) -> u64 {
        crate::format::shr_ceil(bytes, self.cluster_bits)
    }

    /// Whether host range `[offset, offset+len)` touches the header cluster,
    /// the L1 table or the refcount table.
    pub(crate) fn hits_fixed_metadata(&self, offset: u64, len: u64) -> bool {
        self.hits_header_or_l1(offset, len)
            || overlaps(offset, len, self.reftable_offset, self.reftable_bytes())
    }

    /// Whether host range `[offset, offset+len)` touches the header cluster
    /// or the L1 table.
    pub(crate) fn hits_header_or_l1(&self, offset: u64, len: u64) -> bool {
        offset < self.cluster_size || overlaps(offset, len, self.l1_offset, self.l1_bytes())
    }
}
