//! The walk over every metadata structure that counts references to each
//! host cluster, noting faulty entries (and fixing them during a repair).

use super::{Finding, Walk};
use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::engine::geometry::ENTRY_BYTES;
use crate::engine::header_io;
use crate::engine::Engine;
use crate::format::snapshot::{SnapshotEntry, FIXED_LEN};
use crate::format::{L1Entry, L2Entry};
use crate::{BlockDevice, Corruption, Error};

/// Largest extra data QEMU accepts in a snapshot entry.
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// QEMU's limits on persistent bitmaps.
const MAX_BITMAPS: u32 = 65535;
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// Whether `[host, host+len)` is a valid cluster-aligned range inside
    /// the device and clear of the header and the L1 table.
    ///
    /// The refcount table is left out on purpose: an entry pointing into it
    /// is counted (the clash then shows as a refcount table cluster with two
    /// references, which only a rebuild elsewhere repairs) rather than
    /// judged invalid. A hostile `refcount_table_clusters` can stretch the
    /// table over L2 tables and data that QEMU reads; a repair that cleared
    /// the entries pointing there would lose that data.
    pub(super) fn valid_clusters(&self, host: u64, len: u64) -> bool {
        self.geo.within_cluster(host) == 0
            && host != 0
            && host
                .checked_add(len)
                .is_some_and(|end| end <= self.dev_clusters * self.geo.cluster_size)
            && !self.geo.hits_header_or_l1(host, len)
    }

    /// The stored refcount of `cluster`, or `None` when the refcount
    /// structures cannot say (a bad refcount table entry or block).
    pub(super) async fn stored_refcount(
        &mut self,
        cluster: u64,
    ) -> Result<Option<u64>, Error<D::Error>> {
        match self.refcount(cluster).await {
            Ok(n) => Ok(Some(n)),
            Err(Error::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The stored refcount of `cluster` when the COPIED flag `copied` of an
    /// entry pointing at it disagrees with it (unreadable refcounts: no).
    pub(super) async fn copied_wrong(
        &mut self,
        cluster: u64,
        copied: bool,
    ) -> Result<Option<u64>, Error<D::Error>> {
        Ok(self
            .stored_refcount(cluster)
            .await?
            .filter(|&n| (n == 1) != copied))
    }

    /// Reads a table entry for the walk; `None` when the cluster cannot be
    /// read as that kind of table (it is cached, dirty, as another kind).
    pub(super) async fn walk_read(
        &mut self,
        at: u64,
        kind: Kind,
    ) -> Result<Option<u64>, Error<D::Error>> {
        match self.cache.read_u64(&mut self.dev, at, kind).await {
            Ok(raw) => Ok(Some(raw)),
            Err(Error::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Counts the clusters of `[host, host+len)`. As QEMU, a range that ends
    /// a cluster or more past the end of the device counts nothing (so a
    /// wild offset cannot stretch the check) and returns false.
    pub(super) fn count_range(&self, w: &mut Walk<'_>, host: u64, len: u64) -> bool {
        if len == 0 {
            // An empty table (l1_size 0) occupies nothing, wherever it points.
            return true;
        }
        let cs = self.geo.cluster_size;
        let dev_bytes = self.dev_clusters * cs;
        let Some(end) = host.checked_add(len) else {
            return false;
        };
        if end.saturating_sub(dev_bytes) >= cs {
            return false;
        }
        let mut c = self.geo.cluster_of(host);
        while c < self.geo.clusters_for(end) {
            w.count(c);
            c += 1;
        }
        true
    }

    /// Counts every reference in the image once.
    pub(super) async fn walk(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        w.count(0);
        self.count_range(w, self.geo.l1_offset, self.geo.l1_bytes());
        if !w.skip_refcount_structures {
            let (table, bytes) = (self.geo.reftable_offset, self.geo.reftable_bytes());
            if !self.count_range(w, table, bytes) && w.audit {
                // Past the end of the device: every refcount reads as 0.
                w.refcount_structure_error();
            }
            self.walk_reftable(w).await?;
        }
        let (l1, entries) = (self.geo.l1_offset, self.geo.l1_entries);
        self.walk_l1(w, l1, entries, true).await?;
        if self.external_data() && self.header.nb_snapshots > 0 {
            // QEMU: "ERROR n snapshots in image with data file" (one
            // corruption, left alone by a repair).
            w.entry_error();
        }
        self.walk_snapshots(w).await?;
        self.walk_bitmaps(w).await
    }

    /// Counts the refcount blocks; the audit reports bad table entries.
    pub(super) async fn walk_reftable(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        for i in 0..self.geo.reftable_entries {
            match self.refblock_entry(i).await? {
                Some(block) => w.count(self.geo.cluster_of(block)),
                None if w.audit && self.reftable_raw(i).await? != 0 => w.refcount_structure_error(),
                None => {}
            }
        }
        Ok(())
    }

    /// Counts the clusters of persistent bitmaps: the directory, each
    /// bitmap table and the bitmap data clusters it points at.
    pub(super) async fn walk_bitmaps(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        let Some(ext) = self.bitmaps else {
            return Ok(());
        };
        let mut fixed = [0u8; 24];
        if ext.len < 24 {
            w.entry_error();
            return Ok(());
        }
        header_io::read_bytes(&mut self.dev, &mut self.scratch, ext.offset, &mut fixed).await?;
        let be32 = |b: &[u8], i: usize| {
            b.get(i..i + 4)
                .and_then(|s| <[u8; 4]>::try_from(s).ok())
                .map_or(0, u32::from_be_bytes)
        };
        let be64 = |b: &[u8], i: usize| u64::from(be32(b, i)) << 32 | u64::from(be32(b, i + 4));
        let count = be32(&fixed, 0);
        let (dir_size, dir) = (be64(&fixed, 8), be64(&fixed, 16));
        if count > MAX_BITMAPS
            || dir_size > MAX_BITMAP_DIRECTORY
            || !self.valid_clusters(dir, dir_size.max(1))
        {
            w.entry_error();
            return Ok(());
        }
        self.count_range(w, dir, dir_size);
        let mut at = dir;
        let mut entry = [0u8; 24];
        for _ in 0..count {
            if at + 24 > dir + dir_size {
                w.entry_error();
                return Ok(());
            }
            header_io::read_bytes(&mut self.dev, &mut self.scratch, at, &mut entry).await?;
            let (table, table_size) = (be64(&entry, 0), u64::from(be32(&entry, 8)));
            let name_len = u64::from(be32(&entry, 16) & 0xffff);
            let extra = u64::from(be32(&entry, 20));
            if table_size > 0 {
                if !self.valid_clusters(table, table_size * ENTRY_BYTES) {
                    w.entry_error();
                } else {
                    self.count_range(w, table, table_size * ENTRY_BYTES);
                    for i in 0..table_size {
                        let mut raw = [0u8; 8];
                        header_io::read_bytes(
                            &mut self.dev,
                            &mut self.scratch,
                            table + i * ENTRY_BYTES,
                            &mut raw,
                        )
                        .await?;
                        let data = u64::from_be_bytes(raw) & crate::format::entry::OFFSET_MASK;
                        if data != 0 {
                            self.count_range(w, data, self.geo.cluster_size);
                        }
                    }
                }
            }
            at += (24 + extra + name_len).div_ceil(8) * 8;
        }
        Ok(())
    }

    pub(super) async fn walk_snapshots(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        let mut at = self.header.snapshots_offset;
        let mut fixed = [0u8; FIXED_LEN];
        for _ in 0..self.header.nb_snapshots {
            header_io::read_bytes(&mut self.dev, &mut self.scratch, at, &mut fixed).await?;
            let entry = SnapshotEntry::decode(&fixed, at)?;
            if entry.extra_len > MAX_SNAPSHOT_EXTRA {
                return Err(Error::corrupt(Corruption::SnapshotExtraTooLarge, at));
            }
            let l1_bytes = u64::from(entry.l1_size) * ENTRY_BYTES;
            if !self.valid_clusters(entry.l1_table_offset, l1_bytes.max(1)) {
                w.entry_error();
            } else {
                self.count_range(w, entry.l1_table_offset, l1_bytes);
                let (l1, n) = (entry.l1_table_offset, u64::from(entry.l1_size));
                self.walk_l1(w, l1, n, false).await?;
            }
            at += entry.len();
        }
        if self.header.nb_snapshots > 0 {
            let table = self.header.snapshots_offset;
            self.count_range(w, table, at - table);
        }
        Ok(())
    }

    /// Counts an L1 table's L2 tables and everything they reference.
    pub(super) async fn walk_l1(
        &mut self,
        w: &mut Walk<'_>,
        l1: u64,
        entries: u64,
        active: bool,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.geo.cluster_size;
        for i in 0..entries {
            let at = l1 + i * ENTRY_BYTES;
            let Some(raw) = self.walk_read(at, Kind::L1).await? else {
                // A snapshot's L1 table that is also another table.
                w.entry_error();
                return Ok(());
            };
            if raw == 0 {
                continue;
            }
            let mut entry = L1Entry(raw);
            if entry.has_reserved_bits() {
                w.entry_error();
                if w.fix_entries {
                    // Reads ignore these bits: the mapping stays as it was.
                    entry = entry.without_reserved_bits();
                    self.fix_entry(w, at, Kind::L1, entry.0).await?;
                }
            }
            let l2 = entry.l2_offset();
            if l2 == 0 {
                continue;
            }
            if !self.valid_clusters(l2, cs) {
                w.note_target(self.geo.cluster_of(l2), self.geo.cluster_of(l2) + 1);
                w.entry_error();
                if w.fix_entries {
                    // Reading through it fails: nothing readable is lost.
                    self.fix_entry(w, at, Kind::L1, 0).await?;
                }
                continue;
            }
            w.count(self.geo.cluster_of(l2));
            if active && w.audit {
                let cluster = self.geo.cluster_of(l2);
                if let Some(refcount) = self.copied_wrong(cluster, entry.copied()).await? {
                    w.copied_error(Finding::CopiedL2Table {
                        l1_index: i,
                        l1_entry: raw,
                        refcount,
                        repaired: false,
                    });
                }
            }
            if !self.walk_l2(w, l2, active).await? {
                // The table is cached, dirty, as another kind of table.
                w.entry_error();
            }
        }
        Ok(())
    }

    /// Rewrites one entry during a repair; never one that lies in the
    /// refcount table (a table entry pointing there is the table, which
    /// stays as it is until a rebuild switches away from it: rule 4).
    pub(super) async fn fix_entry(
        &mut self,
        w: &mut Walk<'_>,
        at: u64,
        kind: Kind,
        value: u64,
    ) -> Result<(), Error<D::Error>> {
        let (table, bytes) = (self.geo.reftable_offset, self.geo.reftable_bytes());
        if at >= table && at - table < bytes {
            // Fixed once a rebuild has moved the refcount table away.
            w.entries_deferred = true;
            return Ok(());
        }
        self.cache.write_u64(&mut self.dev, at, kind, value).await?;
        w.entries_fixed += 1;
        Ok(())
    }

    /// Counts the clusters one L2 table references.
    ///
    /// Returns false when the cluster cannot be read as an L2 table.
    pub(super) async fn walk_l2(
        &mut self,
        w: &mut Walk<'_>,
        l2: u64,
        active: bool,
    ) -> Result<bool, Error<D::Error>> {
        use crate::format::entry::{COMPRESSED, COPIED};
        let cs = self.geo.cluster_size;
        // As QEMU, contiguity is judged within one L2 table.
        let mut next_contiguous = 0;
        for j in 0..self.geo.l2_entries {
            let at = l2 + j * ENTRY_BYTES;
            let Some(mut raw) = self.walk_read(at, Kind::L2).await? else {
                return Ok(false);
            };
            if raw == 0 {
                continue;
            }
            let bad_flags =
                L2Entry::has_reserved_bits(raw) || (raw & COMPRESSED != 0 && raw & COPIED != 0);
            if bad_flags {
                w.entry_error();
                if w.fix_entries {
                    // Reads ignore these bits: the mapping stays as it was.
                    raw = L2Entry::without_reserved_bits(raw);
                    if raw & COMPRESSED != 0 {
                        raw &= !COPIED;
                    }
                    self.fix_entry(w, at, Kind::L2, raw).await?;
                }
            }
            let entry = self.decode_l2(raw);
            if self.external_data() {
                self.walk_external_l2_entry(w, at, raw, entry, active, &mut next_contiguous)
                    .await?;
                continue;
            }
            let (host, len, copied) = match entry {
                L2Entry::Unallocated | L2Entry::Zero { offset: 0, .. } => continue,
                L2Entry::Zero { offset, copied } | L2Entry::Data { offset, copied } => {
                    (offset, cs, Some(copied))
                }
                L2Entry::Compressed { offset, len } => (offset, len, None),
            };
            if active && w.audit {
                w.report.allocated_clusters += 1;
                if copied.is_none() {
                    w.report.compressed_clusters += 1;
                    w.report.fragmented_clusters += 1;
                } else {
                    if next_contiguous != 0 && host != next_contiguous {
                        w.report.fragmented_clusters += 1;
                    }
                    next_contiguous = host + cs;
                }
            }
            // A compressed stream may run past the end of the device by
            // less than a cluster, as QEMU allows (the last sector of a
            // file a descriptor rounds up to): what a read takes is there.
            let dev_bytes = self.dev.sector_count() * crate::SECTOR as u64;
            let valid = match copied {
                Some(_) => self.valid_clusters(host, cs),
                None => host.checked_add(len).is_some_and(|end| {
                    host >= cs && host < dev_bytes && end.saturating_sub(dev_bytes) < cs
                }),
            };
            if !valid {
                let to = self.geo.clusters_for(host.saturating_add(len.max(1)));
                w.note_target(self.geo.cluster_of(host), to);
                w.entry_error();
                if w.fix_entries {
                    // Reading through it fails: nothing readable is lost.
                    self.fix_entry(w, at, Kind::L2, 0).await?;
                }
                continue;
            }
            self.count_range(w, host, len);
            if let (true, true, Some(copied)) = (active, w.audit, copied) {
                let cluster = self.geo.cluster_of(host);
                if let Some(refcount) = self.copied_wrong(cluster, copied).await? {
                    w.copied_error(Finding::CopiedData {
                        l2_entry: raw,
                        refcount,
                        repaired: false,
                    });
                }
            }
        }
        Ok(true)
    }

    /// The walk's part for one L2 entry (at `at`) of an image with an
    /// external data file, as QEMU's check_refcounts_l2 and
    /// check_oflag_copied: data clusters are counted as allocated (and
    /// fragmented) but hold no reference in the image file; a misaligned
    /// one is a corruption (cleared by a repair: reading it fails anyway),
    /// so is a compressed cluster (which QEMU refuses to read), and, their
    /// refcount being 1 by definition, a missing COPIED flag.
    async fn walk_external_l2_entry(
        &mut self,
        w: &mut Walk<'_>,
        at: u64,
        raw: u64,
        entry: L2Entry,
        active: bool,
        next_contiguous: &mut u64,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.geo.cluster_size;
        let (host, copied) = match entry {
            L2Entry::Unallocated | L2Entry::Zero { offset: 0, .. } => return Ok(()),
            L2Entry::Zero { offset, copied } | L2Entry::Data { offset, copied } => (offset, copied),
            L2Entry::Compressed { .. } => {
                w.entry_error();
                if w.fix_entries {
                    self.fix_entry(w, at, Kind::L2, 0).await?;
                }
                return Ok(());
            }
        };
        if active && w.audit {
            w.report.allocated_clusters += 1;
            if *next_contiguous != 0 && host != *next_contiguous {
                w.report.fragmented_clusters += 1;
            }
            *next_contiguous = host + cs;
            if !copied {
                w.copied_error(Finding::CopiedData {
                    l2_entry: raw,
                    refcount: 1,
                    repaired: false,
                });
            }
        }
        if self.geo.within_cluster(host) != 0 {
            w.entry_error();
            if w.fix_entries {
                self.fix_entry(w, at, Kind::L2, 0).await?;
            }
        }
        Ok(())
    }

    /// Refcount table entry `i` when it names a plausible block (aligned,
    /// no reserved bits, inside the device), else `None`.
    pub(super) async fn refblock_entry(&mut self, i: u64) -> Result<Option<u64>, Error<D::Error>> {
        let raw = self.reftable_raw(i).await?;
        let block = raw & !0x1ff;
        let plausible = raw & 0x1ff == 0
            && self.geo.within_cluster(block) == 0
            && block >> self.geo.cluster_bits < self.dev_clusters;
        Ok((raw != 0 && plausible).then_some(block))
    }

    /// Raw refcount table entry `i`; entries past the end of the device
    /// read as zeros.
    pub(super) async fn reftable_raw(&mut self, i: u64) -> Result<u64, Error<D::Error>> {
        let at = self.geo.reftable_entry_at(i);
        if at >= self.dev_clusters << self.geo.cluster_bits {
            return Ok(0);
        }
        self.cache.read_u64(&mut self.dev, at, Kind::RefTable).await
    }
}
