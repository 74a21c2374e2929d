//! Consistency check and repair with bounded memory.
//!
//! The check walks every metadata structure and counts the references to
//! each host cluster, then compares the counts with the stored refcounts.
//! The counts live in a caller-provided scratch buffer (4 bytes a cluster);
//! when the image has more clusters than the buffer holds, the walk is
//! repeated once per window of clusters. A bigger buffer means fewer passes.

use crate::cache::{Kind, Slot};
use crate::format::snapshot::{SnapshotEntry, FIXED_LEN};
use crate::format::{incompatible, refcount, L1Entry, L2Entry, MAX_REFTABLE_BYTES};
use crate::{header_io, BlockDevice, Error, Qcow2, SECTOR};

/// Largest extra data QEMU accepts in a snapshot entry.
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// QEMU's limits on persistent bitmaps.
const MAX_BITMAPS: u32 = 65535;
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;

/// Findings of a check, in `qemu-img check` terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that can lose data: references outside the image,
    /// misaligned or reserved-bit entries, refcounts below the number of
    /// references, COPIED flags that disagree with the refcount.
    pub corruptions: u64,
    /// Clusters whose refcount is above the number of references.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Guest clusters with allocated data (including compressed ones).
    pub allocated_clusters: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters not contiguous with the previous one.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// One past the last byte of the highest referenced cluster.
    pub image_end_offset: u64,
    /// Passes the check made over the metadata.
    pub passes: u32,
}

impl CheckReport {
    /// Whether the image is consistent (leaks are not inconsistencies).
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == 0
    }
}

/// What a repair may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Lower refcounts that are too high (leaked clusters).
    Leaks,
    /// Fix leaks and, when there are corruptions, clear invalid table
    /// entries, rebuild every refcount from the references and fix COPIED
    /// flags; then clear the corrupt and dirty bits.
    All,
}

/// State of one walk over the metadata.
struct Walk<'a> {
    counters: &'a mut [u8],
    /// First cluster of the window being counted.
    start: u64,
    /// Clusters in the window.
    len: u64,
    /// Count corruptions and statistics (first pass only).
    audit: bool,
    /// Clear entries that point nowhere valid.
    fix: bool,
    /// Leave the refcount table and blocks out of the counts (rebuild).
    skip_refcount_structures: bool,
    /// One past the highest referenced cluster.
    end: u64,
    /// One past the highest cluster with a nonzero stored refcount.
    refcounted_end: u64,
    report: CheckReport,
    /// Host offset of the previous data cluster, for fragmentation.
    previous_data: u64,
}

impl Walk<'_> {
    fn count(&mut self, cluster: u64) {
        self.end = self.end.max(cluster + 1);
        if cluster < self.start || cluster - self.start >= self.len {
            return;
        }
        let i = ((cluster - self.start) * 4) as usize;
        if let Some(c) = self.counters.get_mut(i..i + 4) {
            let mut b = [0u8; 4];
            b.copy_from_slice(c);
            c.copy_from_slice(&u32::from_ne_bytes(b).saturating_add(1).to_ne_bytes());
        }
    }

    fn refs(&self, cluster: u64) -> u64 {
        let i = ((cluster - self.start) * 4) as usize;
        let mut b = [0u8; 4];
        if let Some(c) = self.counters.get(i..i + 4) {
            b.copy_from_slice(c);
        }
        u64::from(u32::from_ne_bytes(b))
    }

    fn reset(&mut self, start: u64) {
        self.start = start;
        self.counters.fill(0);
    }

    fn corrupt(&mut self) {
        if self.audit {
            self.report.corruptions += 1;
        }
    }
}

impl<D, S, const K: usize> Qcow2<D, S, K>
where
    D: BlockDevice,
    S: AsMut<[Slot<K>]> + AsRef<[Slot<K>]>,
{
    /// Checks the image's consistency; `scratch` holds the reference counts
    /// (4 bytes per host cluster per pass).
    pub async fn check(&mut self, scratch: &mut [u8]) -> Result<CheckReport, Error<D::Error>> {
        self.check_and_repair(scratch, None).await
    }

    /// Checks and repairs. The report describes the image as found, with the
    /// `*_fixed` counts of what was repaired; check again to see the result.
    pub async fn repair(
        &mut self,
        scratch: &mut [u8],
        mode: Repair,
    ) -> Result<CheckReport, Error<D::Error>> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_and_repair(scratch, Some(mode)).await
    }

    async fn check_and_repair(
        &mut self,
        scratch: &mut [u8],
        mode: Option<Repair>,
    ) -> Result<CheckReport, Error<D::Error>> {
        let len = (scratch.len() / 4) as u64;
        if len == 0 {
            return Err(Error::InvalidArgument(
                "check needs at least 4 bytes of scratch",
            ));
        }
        let mut w = Walk {
            counters: scratch,
            start: 0,
            len,
            audit: true,
            fix: mode == Some(Repair::All),
            skip_refcount_structures: false,
            end: 0,
            refcounted_end: 0,
            report: CheckReport {
                total_clusters: self.header.size.div_ceil(self.geo.cluster_size),
                ..CheckReport::default()
            },
            previous_data: 0,
        };
        let mut start = 0;
        loop {
            w.reset(start);
            self.walk(&mut w).await?;
            w.report.passes += 1;
            w.audit = false;
            let end = w.end.max(self.dev_clusters);
            // Both repair modes lower refcounts that are too high in place.
            self.compare(&mut w, end, mode.is_some()).await?;
            start += len;
            if start >= end {
                break;
            }
        }
        let mut report = w.report;
        // As qemu-img: the end of the last cluster in use or with a refcount.
        report.image_end_offset = w.end.max(w.refcounted_end) * self.geo.cluster_size;
        if mode == Some(Repair::All) && report.corruptions > 0 {
            w.fix = false;
            self.rebuild_refcounts(&mut w).await?;
            self.fix_copied_flags().await?;
            report.corruptions_fixed = report.corruptions;
        }
        if mode == Some(Repair::All) {
            self.clear_incompatible(incompatible::CORRUPT | incompatible::DIRTY)
                .await?;
        }
        if mode.is_some() {
            self.flush().await?;
        }
        Ok(report)
    }

    /// Compares counted references with stored refcounts over the window.
    async fn compare(
        &mut self,
        w: &mut Walk<'_>,
        end: u64,
        fix_leaks: bool,
    ) -> Result<(), Error<D::Error>> {
        let stop = end.min(w.start + w.len);
        for cluster in w.start..stop {
            let refs = w.refs(cluster);
            let stored = match self.refcount(cluster).await {
                Ok(n) => n,
                Err(Error::Corrupt { .. }) => 0,
                Err(e) => return Err(e),
            };
            if stored > 0 {
                w.refcounted_end = cluster + 1;
            }
            if refs > stored {
                w.report.corruptions += 1;
            } else if stored > refs {
                w.report.leaks += 1;
                if fix_leaks {
                    self.set_refcount(cluster, refs).await?;
                    w.report.leaks_fixed += 1;
                }
            }
        }
        Ok(())
    }

    /// Whether `[host, host+len)` is a valid cluster-aligned range inside
    /// the device and clear of the header, L1 table and refcount table.
    fn valid_clusters(&self, host: u64, len: u64) -> bool {
        host.is_multiple_of(self.geo.cluster_size)
            && host != 0
            && host
                .checked_add(len)
                .is_some_and(|end| end <= self.dev_clusters * self.geo.cluster_size)
            && !self.geo.hits_fixed_metadata(host, len)
    }

    /// The stored refcount of `cluster`, or `None` when the refcount
    /// structures cannot say (a bad refcount table entry or block).
    async fn stored_refcount(&mut self, cluster: u64) -> Result<Option<u64>, Error<D::Error>> {
        match self.refcount(cluster).await {
            Ok(n) => Ok(Some(n)),
            Err(Error::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads a table entry for the walk; `None` when the cluster cannot be
    /// read as that kind of table (it is already cached as another kind).
    async fn walk_read(&mut self, at: u64, kind: Kind) -> Result<Option<u64>, Error<D::Error>> {
        match self.cache.read_u64(&mut self.dev, at, kind).await {
            Ok(raw) => Ok(Some(raw)),
            Err(Error::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn count_range(&self, w: &mut Walk<'_>, host: u64, len: u64) {
        if len == 0 {
            // An empty table (l1_size 0) occupies nothing, wherever it points.
            return;
        }
        let cs = self.geo.cluster_size;
        let mut c = host / cs;
        let end = (host + len).div_ceil(cs);
        while c < end {
            w.count(c);
            c += 1;
        }
    }

    /// Counts every reference in the image once.
    async fn walk(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        let cs = self.geo.cluster_size;
        w.count(0);
        self.count_range(w, self.geo.l1_offset, self.geo.l1_entries * 8);
        if !w.skip_refcount_structures {
            self.count_range(w, self.geo.reftable_offset, self.geo.reftable_bytes());
        }
        for i in 0..self.geo.reftable_entries {
            let at = self.geo.reftable_offset + i * 8;
            let raw = self
                .cache
                .read_u64(&mut self.dev, at, Kind::RefTable)
                .await?;
            if raw == 0 {
                continue;
            }
            if raw & 0x1ff != 0 || !self.valid_clusters(raw, cs) {
                w.corrupt();
                continue;
            }
            if !w.skip_refcount_structures {
                w.count(raw / cs);
            }
        }
        let (l1, entries) = (self.geo.l1_offset, self.geo.l1_entries);
        self.walk_l1(w, l1, entries, true).await?;
        self.walk_snapshots(w).await?;
        self.walk_bitmaps(w).await
    }

    /// Counts the clusters of persistent bitmaps: the directory, each
    /// bitmap table and the bitmap data clusters it points at.
    async fn walk_bitmaps(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        let Some(ext) = self.bitmaps else {
            return Ok(());
        };
        let mut fixed = [0u8; 24];
        if ext.len < 24 {
            w.corrupt();
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
            w.corrupt();
            return Ok(());
        }
        self.count_range(w, dir, dir_size);
        let mut at = dir;
        let mut entry = [0u8; 24];
        for _ in 0..count {
            if at + 24 > dir + dir_size {
                w.corrupt();
                return Ok(());
            }
            header_io::read_bytes(&mut self.dev, &mut self.scratch, at, &mut entry).await?;
            let (table, table_size) = (be64(&entry, 0), u64::from(be32(&entry, 8)));
            let name_len = u64::from(be32(&entry, 16) & 0xffff);
            let extra = u64::from(be32(&entry, 20));
            if table_size > 0 {
                if !self.valid_clusters(table, table_size * 8) {
                    w.corrupt();
                } else {
                    self.count_range(w, table, table_size * 8);
                    for i in 0..table_size {
                        let mut raw = [0u8; 8];
                        header_io::read_bytes(
                            &mut self.dev,
                            &mut self.scratch,
                            table + i * 8,
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

    async fn walk_snapshots(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        let mut at = self.header.snapshots_offset;
        let mut fixed = [0u8; FIXED_LEN];
        for _ in 0..self.header.nb_snapshots {
            header_io::read_bytes(&mut self.dev, &mut self.scratch, at, &mut fixed).await?;
            let entry = SnapshotEntry::decode(&fixed, at)?;
            if entry.extra_len > MAX_SNAPSHOT_EXTRA {
                return Err(Error::corrupt("snapshot extra data too large", at));
            }
            let l1_bytes = u64::from(entry.l1_size) * 8;
            if !self.valid_clusters(entry.l1_table_offset, l1_bytes.max(1)) {
                w.corrupt();
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
    async fn walk_l1(
        &mut self,
        w: &mut Walk<'_>,
        l1: u64,
        entries: u64,
        active: bool,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.geo.cluster_size;
        for i in 0..entries {
            let at = l1 + i * 8;
            let Some(raw) = self.walk_read(at, Kind::L1).await? else {
                // A snapshot's L1 table that is also another table.
                w.corrupt();
                return Ok(());
            };
            if raw == 0 {
                continue;
            }
            let entry = L1Entry(raw);
            let l2 = entry.l2_offset();
            if entry.has_reserved_bits() || !self.valid_clusters(l2, cs) {
                w.corrupt();
                if w.fix {
                    self.cache.write_u64(&mut self.dev, at, Kind::L1, 0).await?;
                }
                continue;
            }
            w.count(l2 / cs);
            if active
                && w.audit
                && Some(entry.copied()) != self.stored_refcount(l2 / cs).await?.map(|n| n == 1)
            {
                w.corrupt();
            }
            if !self.walk_l2(w, l2, active).await? {
                // The cluster is some other table as well: not a usable L2 table.
                w.corrupt();
                if w.fix {
                    self.cache.write_u64(&mut self.dev, at, Kind::L1, 0).await?;
                }
            }
        }
        Ok(())
    }

    /// Counts the clusters one L2 table references.
    ///
    /// Returns false when the cluster cannot be read as an L2 table.
    async fn walk_l2(
        &mut self,
        w: &mut Walk<'_>,
        l2: u64,
        active: bool,
    ) -> Result<bool, Error<D::Error>> {
        let cs = self.geo.cluster_size;
        for j in 0..self.geo.l2_entries {
            let at = l2 + j * 8;
            let Some(raw) = self.walk_read(at, Kind::L2).await? else {
                return Ok(false);
            };
            if raw == 0 {
                continue;
            }
            let entry = L2Entry::decode(raw, self.geo.cluster_bits, self.geo.v3);
            let (host, len, copied) = match entry {
                L2Entry::Unallocated => continue,
                L2Entry::Zero { offset: 0, .. } => continue,
                L2Entry::Zero { offset, copied } | L2Entry::Data { offset, copied } => {
                    (offset, cs, Some(copied))
                }
                L2Entry::Compressed { offset, len } => (offset, len, None),
            };
            let valid = !L2Entry::has_reserved_bits(raw, self.geo.v3)
                && match copied {
                    Some(_) => self.valid_clusters(host, cs),
                    None => host
                        .checked_add(len)
                        .is_some_and(|end| host >= cs && end <= self.dev_clusters * cs),
                };
            if !valid {
                w.corrupt();
                if w.fix {
                    self.cache.write_u64(&mut self.dev, at, Kind::L2, 0).await?;
                }
                continue;
            }
            self.count_range(w, host, len);
            if !active || !w.audit {
                continue;
            }
            w.report.allocated_clusters += 1;
            if copied.is_none() {
                w.report.compressed_clusters += 1;
            } else if w.previous_data != 0 && host != w.previous_data + cs {
                w.report.fragmented_clusters += 1;
            }
            w.previous_data = host;
            if let Some(copied) = copied {
                if Some(copied) != self.stored_refcount(host / cs).await?.map(|n| n == 1) {
                    w.corrupt();
                }
            }
        }
        Ok(true)
    }

    /// Writes a complete new set of refcount structures computed from the
    /// references, after everything in use, then switches the header to it.
    ///
    /// Crash-safe: the old structures stay in force until the header write,
    /// which happens after the new ones are durable.
    async fn rebuild_refcounts(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        let cs = self.geo.cluster_size;
        let per_block = self.geo.refblock_entries;
        // Durable mapping first, so the walk and the device agree.
        self.flush().await?;
        let start = w.end.max(self.dev_clusters);
        let (mut blocks, mut table) = (1u64, 1u64);
        for _ in 0..16 {
            let need_blocks = (start + blocks + table).div_ceil(per_block);
            let need_table = (need_blocks * 8).div_ceil(cs);
            if need_blocks <= blocks && need_table <= table {
                break;
            }
            blocks = blocks.max(need_blocks);
            table = table.max(need_table);
        }
        if table * cs > MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace);
        }
        let end = start + blocks + table;
        self.grow_device_to(end).await?;
        let cluster_sectors = cs / SECTOR as u64;
        self.dev
            .write_zeros(start * cluster_sectors, (end - start) * cluster_sectors)
            .await
            .map_err(Error::Io)?;

        // Count the references window by window and store them.
        w.skip_refcount_structures = true;
        w.audit = false;
        let mut first = 0;
        while first < end {
            w.reset(first);
            self.walk(w).await?;
            for c in start..end {
                w.count(c);
            }
            let stop = end.min(first + w.len);
            let mut loaded = u64::MAX;
            for c in first..stop {
                let refs = w.refs(c);
                if refs == 0 {
                    continue;
                }
                if refs > refcount::max_value(self.geo.refcount_order) {
                    return Err(Error::corrupt(
                        "more references than the refcount width holds",
                        c * cs,
                    ));
                }
                let order = self.geo.refcount_order;
                let per_sector = refcount::entries_in(SECTOR as u64, order);
                let block = start + c / per_block;
                let sector = block * cluster_sectors + (c % per_block) / per_sector;
                if sector != loaded {
                    self.store_scratch(loaded).await?;
                    let buf = core::slice::from_mut(&mut self.scratch);
                    self.dev.read(sector, buf).await.map_err(Error::Io)?;
                    loaded = sector;
                }
                refcount::set(
                    &mut self.scratch,
                    order,
                    ((c % per_block) % per_sector) as usize,
                    refs,
                )
                .ok_or(Error::corrupt(
                    "refcount block layout",
                    sector * SECTOR as u64,
                ))?;
            }
            self.store_scratch(loaded).await?;
            first += w.len;
        }
        // The new table.
        let table_host = (start + blocks) * cs;
        let per_sector = (SECTOR / 8) as u64;
        let mut j = 0;
        while j < blocks {
            self.scratch = [0; SECTOR];
            let base = j;
            while j < blocks && j - base < per_sector {
                let i = ((j - base) * 8) as usize;
                let entry = (start + j) * cs;
                self.scratch
                    .get_mut(i..i + 8)
                    .ok_or(Error::corrupt("refcount table layout", table_host))?
                    .copy_from_slice(&entry.to_be_bytes());
                j += 1;
            }
            self.store_scratch(table_host / SECTOR as u64 + base / per_sector)
                .await?;
        }
        self.cache.flush_device(&mut self.dev).await?;

        self.cache.forget_refcounts()?;
        self.header.refcount_table_offset = table_host;
        self.header.refcount_table_clusters = table as u32;
        header_io::write_header(&mut self.dev, &mut self.scratch, &self.header).await?;
        self.cache.flush_device(&mut self.dev).await?;
        self.geo.reftable_offset = table_host;
        self.geo.reftable_entries = table * cs / 8;
        // Old refcount structures are free now; let allocation find them.
        self.free_hint = 0;
        Ok(())
    }

    /// Writes the scratch sector to `sector` (no-op for `u64::MAX`).
    async fn store_scratch(&mut self, sector: u64) -> Result<(), Error<D::Error>> {
        if sector == u64::MAX {
            return Ok(());
        }
        self.cache.note_device_write();
        self.dev
            .write(sector, core::slice::from_ref(&self.scratch))
            .await
            .map_err(Error::Io)
    }

    /// Sets COPIED on active L1/L2 entries exactly where the refcount is 1.
    async fn fix_copied_flags(&mut self) -> Result<(), Error<D::Error>> {
        for i in 0..self.geo.l1_entries {
            let at = self.geo.l1_offset + i * 8;
            let raw = self.cache.read_u64(&mut self.dev, at, Kind::L1).await?;
            let l2 = L1Entry(raw).l2_offset();
            if l2 == 0 {
                continue;
            }
            self.set_copied(at, Kind::L1, raw, l2).await?;
            for j in 0..self.geo.l2_entries {
                let at = l2 + j * 8;
                let raw = self.cache.read_u64(&mut self.dev, at, Kind::L2).await?;
                match L2Entry::decode(raw, self.geo.cluster_bits, self.geo.v3) {
                    L2Entry::Data { offset, .. } => {
                        self.set_copied(at, Kind::L2, raw, offset).await?
                    }
                    L2Entry::Zero { offset, .. } if offset != 0 => {
                        self.set_copied(at, Kind::L2, raw, offset).await?
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Rewrites the table entry `raw` at `at` (pointing at `host`) so that
    /// its COPIED flag says whether the refcount of `host` is exactly 1.
    async fn set_copied(
        &mut self,
        at: u64,
        kind: Kind,
        raw: u64,
        host: u64,
    ) -> Result<(), Error<D::Error>> {
        use crate::format::entry::COPIED;
        let want = self.refcount(host >> self.geo.cluster_bits).await? == 1;
        let fixed = if want { raw | COPIED } else { raw & !COPIED };
        if fixed != raw {
            self.cache.write_u64(&mut self.dev, at, kind, fixed).await?;
        }
        Ok(())
    }

    /// Clears incompatible feature bits in the header, durably.
    pub(crate) async fn clear_incompatible(&mut self, bits: u64) -> Result<(), Error<D::Error>> {
        if self.header.incompatible_features & bits == 0 {
            return Ok(());
        }
        self.flush().await?;
        self.header.incompatible_features &= !bits;
        header_io::write_header(&mut self.dev, &mut self.scratch, &self.header).await?;
        self.cache.flush_device(&mut self.dev).await
    }
}
