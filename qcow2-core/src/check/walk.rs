//! The walk over every metadata structure: each reference it finds goes
//! to a [`Visitor`] with where it lives, each faulty entry too (rewritten
//! when the visitor asks, during a repair). Check's counting is one
//! visitor (`count.rs`); the vocabulary is `engine/visit.rs`.

use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::engine::geometry::ENTRY_BYTES;
use crate::engine::header_io;
use crate::engine::visit::{Fault, Problem, Reference, Target, Tree, Visitor};
use crate::engine::Engine;
use crate::format::entry::{COMPRESSED, COPIED};
use crate::format::snapshot::{SnapshotEntry, FIXED_LEN};
use crate::format::{L1Entry, L2Entry};
use crate::{BlockDevice, Corruption, Error};

/// Largest extra data QEMU accepts in a snapshot entry.
const MAX_SNAPSHOT_EXTRA: u32 = 1024;
/// QEMU's limits on persistent bitmaps.
const MAX_BITMAPS: u32 = 65535;
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;

/// What the walk does for an entry once the visitor has seen it.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Nothing more.
    Done,
    /// Rewrite the entry with this value (the visitor asked for the fix).
    Rewrite(u64),
    /// A valid reference: read the stored refcount of this cluster for the
    /// visitor, when it wants it; an L2 table is walked next.
    Valid(Option<u64>),
}

/// Hands a fault at `at` with fix `fix` to `v`: a rewrite with the fix
/// when `v` asks for one.
#[inline(never)]
fn report<V: Visitor>(v: &mut V, problem: Problem, at: u64, fix: Option<u64>) -> Step {
    let fault = Fault {
        fix,
        ..Fault::new(problem, at)
    };
    fault_step(v, &fault)
}

/// Hands `fault` to `v`: a rewrite with its fix when `v` asks for one.
fn fault_step<V: Visitor>(v: &mut V, fault: &Fault<'_>) -> Step {
    match (v.fault(fault), fault.fix) {
        (true, Some(value)) => Step::Rewrite(value),
        _ => Step::Done,
    }
}

/// L2 entry `raw` with its reserved bits (and COPIED on a compressed entry)
/// cleared, when it has any.
fn without_bad_flags(raw: u64) -> Option<u64> {
    let bad = L2Entry::has_reserved_bits(raw) || (raw & COMPRESSED != 0 && raw & COPIED != 0);
    bad.then(|| {
        let fixed = L2Entry::without_reserved_bits(raw);
        if fixed & COMPRESSED != 0 {
            fixed & !COPIED
        } else {
            fixed
        }
    })
}

/// The big-endian u32 at byte `i` of `b` (0 past its end).
fn be32(b: &[u8], i: usize) -> u32 {
    b.get(i..i + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(0, u32::from_be_bytes)
}

/// The big-endian u64 at byte `i` of `b` (0 past its end).
fn be64(b: &[u8], i: usize) -> u64 {
    u64::from(be32(b, i)) << 32 | u64::from(be32(b, i + 4))
}

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

    /// Hands `r` to `v` unless, as QEMU counts, its range ends a cluster
    /// or more past the end of the device (so a wild offset cannot stretch
    /// the walk): false then. An empty range (an empty table, l1_size 0)
    /// occupies nothing, wherever it points.
    fn yield_range<V: Visitor>(&self, v: &mut V, r: &Reference) -> bool {
        if r.len == 0 {
            return true;
        }
        let cs = self.geo.cluster_size;
        let dev_bytes = self.dev_clusters * cs;
        let Some(end) = r.host.checked_add(r.len) else {
            return false;
        };
        if end.saturating_sub(dev_bytes) >= cs {
            return false;
        }
        v.reference(r);
        true
    }

    /// Walks every reference in the image once, handing each to `v` with
    /// where it lives, and each faulty entry (rewritten when `v` asks).
    pub(crate) async fn walk<V: Visitor>(&mut self, v: &mut V) -> Result<(), Error<D::Error>> {
        let (cs, l1, l1_bytes) = (
            self.geo.cluster_size,
            self.geo.l1_offset,
            self.geo.l1_bytes(),
        );
        v.reference(&Reference::header(Target::Header, 0, cs, Tree::Image));
        self.yield_range(
            v,
            &Reference::header(Target::L1Table, l1, l1_bytes, Tree::Active),
        );
        if v.refcount_structures() {
            let (table, bytes) = (self.geo.reftable_offset, self.geo.reftable_bytes());
            let table = Reference::header(Target::RefcountTable, table, bytes, Tree::Image);
            if !self.yield_range(v, &table) {
                // Past the end of the device: every refcount reads as 0.
                report(v, Problem::RefcountStructure, 0, None);
            }
            self.walk_reftable(v).await?;
        }
        let (l1, entries) = (self.geo.l1_offset, self.geo.l1_entries);
        self.walk_l1(v, l1, entries, Tree::Active).await?;
        if self.external_data() && self.header.nb_snapshots > 0 {
            // QEMU: "ERROR n snapshots in image with data file" (one
            // corruption, left alone by a repair).
            report(v, Problem::Structure, 0, None);
        }
        self.walk_snapshots(v).await?;
        self.walk_bitmaps(v).await
    }

    /// The refcount blocks; a table entry naming no plausible block is a
    /// fault.
    async fn walk_reftable<V: Visitor>(&mut self, v: &mut V) -> Result<(), Error<D::Error>> {
        for i in 0..self.geo.reftable_entries {
            let raw = self.reftable_raw(i).await?;
            let at = self.geo.reftable_entry_at(i);
            match self.plausible_block(raw) {
                Some(host) => v.reference(&Reference {
                    target: Target::RefcountBlock,
                    host,
                    len: self.geo.cluster_size,
                    at,
                    index: i,
                    entry: raw,
                    tree: Tree::Image,
                }),
                None if raw != 0 => {
                    report(v, Problem::RefcountStructure, at, None);
                }
                None => {}
            }
        }
        Ok(())
    }

    /// The persistent bitmaps: the directory, each bitmap table and the
    /// bitmap data clusters it points at.
    pub(super) async fn walk_bitmaps<V: Visitor>(
        &mut self,
        v: &mut V,
    ) -> Result<(), Error<D::Error>> {
        let Some(ext) = self.bitmaps else {
            return Ok(());
        };
        let mut fixed = [0u8; 24];
        if ext.len < 24 {
            report(v, Problem::Structure, ext.offset, None);
            return Ok(());
        }
        header_io::read_bytes(&mut self.dev, &mut self.scratch, ext.offset, &mut fixed).await?;
        let count = be32(&fixed, 0);
        let (dir_size, dir) = (be64(&fixed, 8), be64(&fixed, 16));
        // The directory's offset is the extension's third field.
        let dir_at = ext.offset + 16;
        if count > MAX_BITMAPS
            || dir_size > MAX_BITMAP_DIRECTORY
            || !self.valid_clusters(dir, dir_size.max(1))
        {
            report(v, Problem::Structure, dir_at, None);
            return Ok(());
        }
        let directory = Target::BitmapDirectory;
        self.yield_range(
            v,
            &Reference::entry(directory, dir, dir_size, dir_at, 0, dir, Tree::Image),
        );
        let mut at = dir;
        let mut entry = [0u8; 24];
        for i in 0..u64::from(count) {
            if at + 24 > dir + dir_size {
                report(v, Problem::Structure, at, None);
                return Ok(());
            }
            header_io::read_bytes(&mut self.dev, &mut self.scratch, at, &mut entry).await?;
            let (table, table_size) = (be64(&entry, 0), u64::from(be32(&entry, 8)));
            let name_len = u64::from(be32(&entry, 16) & 0xffff);
            let extra = u64::from(be32(&entry, 20));
            if table_size > 0 {
                self.walk_bitmap_table(v, (at, i), table, table_size)
                    .await?;
            }
            at += (24 + extra + name_len).div_ceil(8) * 8;
        }
        Ok(())
    }

    /// One bitmap's table of `size` entries at `table`, from the directory
    /// entry `(at, index)`, and the data clusters it points at.
    async fn walk_bitmap_table<V: Visitor>(
        &mut self,
        v: &mut V,
        (at, index): (u64, u64),
        table: u64,
        size: u64,
    ) -> Result<(), Error<D::Error>> {
        if !self.valid_clusters(table, size * ENTRY_BYTES) {
            report(v, Problem::Structure, at, None);
            return Ok(());
        }
        let (bitmap, bytes) = (Target::BitmapTable, size * ENTRY_BYTES);
        self.yield_range(
            v,
            &Reference::entry(bitmap, table, bytes, at, index, table, Tree::Image),
        );
        for i in 0..size {
            let mut raw = [0u8; 8];
            let at = table + i * ENTRY_BYTES;
            header_io::read_bytes(&mut self.dev, &mut self.scratch, at, &mut raw).await?;
            let entry = u64::from_be_bytes(raw);
            let data = entry & crate::format::entry::OFFSET_MASK;
            if data != 0 {
                let cs = self.geo.cluster_size;
                self.yield_range(
                    v,
                    &Reference::entry(Target::BitmapData, data, cs, at, i, entry, Tree::Image),
                );
            }
        }
        Ok(())
    }

    /// The snapshots' L1 tables, what they reference and the snapshot
    /// table.
    pub(super) async fn walk_snapshots<V: Visitor>(
        &mut self,
        v: &mut V,
    ) -> Result<(), Error<D::Error>> {
        let mut at = self.header.snapshots_offset;
        let mut fixed = [0u8; FIXED_LEN];
        for _ in 0..self.header.nb_snapshots {
            header_io::read_bytes(&mut self.dev, &mut self.scratch, at, &mut fixed).await?;
            let entry = SnapshotEntry::decode(&fixed, at)?;
            if entry.extra_len > MAX_SNAPSHOT_EXTRA {
                return Err(Error::corrupt(Corruption::SnapshotExtraTooLarge, at));
            }
            let (l1, n) = (entry.l1_table_offset, u64::from(entry.l1_size));
            if !self.valid_clusters(l1, (n * ENTRY_BYTES).max(1)) {
                report(v, Problem::Structure, at, None);
            } else {
                self.yield_snapshot_l1(v, at, l1, n);
                self.walk_l1(v, l1, n, Tree::Snapshot).await?;
            }
            at += entry.len();
        }
        if self.header.nb_snapshots > 0 {
            let table = self.header.snapshots_offset;
            let r = Reference::header(Target::SnapshotTable, table, at - table, Tree::Image);
            self.yield_range(v, &r);
        }
        Ok(())
    }

    /// Hands the L1 table of `entries` entries at `l1` of the snapshot
    /// whose table entry is at `at` to `v`.
    fn yield_snapshot_l1<V: Visitor>(&self, v: &mut V, at: u64, l1: u64, entries: u64) {
        let (table, bytes) = (Target::SnapshotL1Table, entries * ENTRY_BYTES);
        self.yield_range(
            v,
            &Reference::entry(table, l1, bytes, at, 0, l1, Tree::Snapshot),
        );
    }

    /// An L1 table's L2 tables and everything they reference.
    pub(super) async fn walk_l1<V: Visitor>(
        &mut self,
        v: &mut V,
        l1: u64,
        entries: u64,
        tree: Tree,
    ) -> Result<(), Error<D::Error>> {
        for i in 0..entries {
            let at = l1 + i * ENTRY_BYTES;
            let Some(raw) = self.walk_read(at, Kind::L1).await? else {
                // A snapshot's L1 table that is also another table.
                report(v, Problem::Unreadable, at, None);
                return Ok(());
            };
            if raw == 0 {
                continue;
            }
            let entry = L1Entry(raw);
            if entry.has_reserved_bits() {
                // Reads ignore these bits: the mapping stays as it was.
                let fixed = entry.without_reserved_bits().0;
                if let Step::Rewrite(value) = report(v, Problem::ReservedBits, at, Some(fixed)) {
                    self.rewrite(v, at, Kind::L1, value).await?;
                }
            }
            let l2 = entry.l2_offset();
            match self.entry_step(v, Kind::L1, (at, i, raw), tree) {
                Step::Done => {}
                Step::Rewrite(value) => self.rewrite(v, at, Kind::L1, value).await?,
                Step::Valid(refcount) => {
                    if let Some(cluster) = refcount {
                        let stored = self.stored_refcount(cluster).await?;
                        self.tell_refcount(v, Kind::L1, (at, i, raw), tree, stored);
                    }
                    if !self.walk_l2(v, l2, tree).await? {
                        // The table is cached, dirty, as another kind of table.
                        report(v, Problem::Unreadable, at, None);
                    }
                }
            }
        }
        Ok(())
    }

    /// Rewrites the entry at `at` as `v` asked; never one that lies in the
    /// refcount table (a table entry pointing there is the table, which
    /// stays as it is until a rebuild switches away from it: rule 4).
    async fn rewrite<V: Visitor>(
        &mut self,
        v: &mut V,
        at: u64,
        kind: Kind,
        value: u64,
    ) -> Result<(), Error<D::Error>> {
        let (table, bytes) = (self.geo.reftable_offset, self.geo.reftable_bytes());
        if at >= table && at - table < bytes {
            // Fixed once a rebuild has moved the refcount table away.
            v.rewritten(false);
            return Ok(());
        }
        self.cache.write_u64(&mut self.dev, at, kind, value).await?;
        v.rewritten(true);
        Ok(())
    }

    /// The references of one L2 table.
    ///
    /// Returns false when the cluster cannot be read as an L2 table.
    pub(super) async fn walk_l2<V: Visitor>(
        &mut self,
        v: &mut V,
        l2: u64,
        tree: Tree,
    ) -> Result<bool, Error<D::Error>> {
        for j in 0..self.geo.l2_entries {
            let at = l2 + j * ENTRY_BYTES;
            let Some(mut raw) = self.walk_read(at, Kind::L2).await? else {
                return Ok(false);
            };
            if raw == 0 {
                continue;
            }
            if let Some(fixed) = without_bad_flags(raw) {
                // Reads ignore these bits: the mapping stays as it was.
                if let Step::Rewrite(value) = report(v, Problem::ReservedBits, at, Some(fixed)) {
                    self.rewrite(v, at, Kind::L2, value).await?;
                    raw = value;
                }
            }
            match self.entry_step(v, Kind::L2, (at, j, raw), tree) {
                Step::Done | Step::Valid(None) => {}
                Step::Rewrite(value) => self.rewrite(v, at, Kind::L2, value).await?,
                Step::Valid(Some(cluster)) => {
                    let stored = self.stored_refcount(cluster).await?;
                    self.tell_refcount(v, Kind::L2, (at, j, raw), tree, stored);
                }
            }
        }
        Ok(true)
    }

    /// Hands what the L1 or L2 entry `(at, index, raw)` references to `v`,
    /// or its fault. (Out of line, as the other steps the walk takes
    /// between reads: their values stay out of the walk's futures and
    /// polls.)
    #[inline(never)]
    fn entry_step<V: Visitor>(
        &self,
        v: &mut V,
        table: Kind,
        (at, index, raw): (u64, u64, u64),
        tree: Tree,
    ) -> Step {
        if table == Kind::L2 && self.external_data() {
            return self.external_l2_step(v, at, index, raw, tree);
        }
        let Some(r) = self.entry_target(table, at, index, raw, tree) else {
            return Step::Done;
        };
        if !self.target_valid(&r) {
            // Reading through it fails: nothing readable is lost.
            let fault = Fault {
                target: Some(&r),
                ..Fault::fixable(Problem::Outside, r.at, 0)
            };
            return fault_step(v, &fault);
        }
        self.yield_range(v, &r);
        let refcount = v.wants_refcount(&r);
        Step::Valid(refcount.then_some(self.geo.cluster_of(r.host)))
    }

    /// Hands the stored refcount of what the entry `(at, index, raw)`
    /// references to `v`, which asked for it.
    #[inline(never)]
    fn tell_refcount<V: Visitor>(
        &self,
        v: &mut V,
        table: Kind,
        (at, index, raw): (u64, u64, u64),
        tree: Tree,
        stored: Option<u64>,
    ) {
        if let Some(r) = self.entry_target(table, at, index, raw, tree) {
            v.refcount(&r, stored);
        }
    }

    /// Whether an L2 table, data cluster or compressed extent lies where
    /// reads may take it.
    fn target_valid(&self, r: &Reference) -> bool {
        let cs = self.geo.cluster_size;
        if r.target != Target::Compressed {
            return self.valid_clusters(r.host, cs);
        }
        // A compressed stream may run past the end of the device by
        // less than a cluster, as QEMU allows (the last sector of a
        // file a descriptor rounds up to): what a read takes is there.
        let dev_bytes = self.dev.sector_count() * crate::SECTOR as u64;
        let (host, len) = (r.host, r.len);
        host.checked_add(len)
            .is_some_and(|end| host >= cs && host < dev_bytes && end.saturating_sub(dev_bytes) < cs)
    }

    /// What the L1 entry (an L2 table) or L2 entry `raw` (at `at`, index
    /// `index`) references in the image file, if anything.
    fn entry_target(
        &self,
        table: Kind,
        at: u64,
        index: u64,
        raw: u64,
        tree: Tree,
    ) -> Option<Reference> {
        let cs = self.geo.cluster_size;
        let (target, host, len) = if table == Kind::L1 {
            (Target::L2Table, L1Entry(raw).l2_offset(), cs)
        } else {
            match self.decode_l2(raw) {
                L2Entry::Unallocated | L2Entry::Zero { offset: 0, .. } => return None,
                L2Entry::Zero { offset, .. } | L2Entry::Data { offset, .. } => {
                    (Target::Data, offset, cs)
                }
                L2Entry::Compressed { offset, len } => (Target::Compressed, offset, len),
            }
        };
        (host != 0).then_some(Reference::entry(target, host, len, at, index, raw, tree))
    }

    /// L2 entry `raw` (at `at`, index `j`) of an image with an external
    /// data file, as QEMU's check_refcounts_l2 and check_oflag_copied: a
    /// data cluster holds no reference in the image file (it is handed to
    /// `v` as [`Target::ExternalData`]); a misaligned one is a fault
    /// (cleared by a repair: reading it fails anyway), so is a compressed
    /// cluster (which QEMU refuses to read).
    #[inline(never)]
    fn external_l2_step<V: Visitor>(
        &self,
        v: &mut V,
        at: u64,
        j: u64,
        raw: u64,
        tree: Tree,
    ) -> Step {
        let host = match self.decode_l2(raw) {
            L2Entry::Unallocated | L2Entry::Zero { offset: 0, .. } => return Step::Done,
            L2Entry::Zero { offset, .. } | L2Entry::Data { offset, .. } => offset,
            L2Entry::Compressed { .. } => {
                return fault_step(v, &Fault::fixable(Problem::DataFile, at, 0));
            }
        };
        let cs = self.geo.cluster_size;
        v.reference(&Reference::entry(
            Target::ExternalData,
            host,
            cs,
            at,
            j,
            raw,
            tree,
        ));
        if self.geo.within_cluster(host) != 0 {
            return fault_step(v, &Fault::fixable(Problem::DataFile, at, 0));
        }
        Step::Done
    }

    /// Refcount table entry `i` when it names a plausible block (aligned,
    /// no reserved bits, inside the device), else `None`.
    pub(super) async fn refblock_entry(&mut self, i: u64) -> Result<Option<u64>, Error<D::Error>> {
        let raw = self.reftable_raw(i).await?;
        Ok(self.plausible_block(raw))
    }

    /// The block refcount table entry `raw` names, when plausible.
    fn plausible_block(&self, raw: u64) -> Option<u64> {
        let block = raw & !0x1ff;
        let plausible = raw & 0x1ff == 0
            && self.geo.within_cluster(block) == 0
            && block >> self.geo.cluster_bits < self.dev_clusters;
        (raw != 0 && plausible).then_some(block)
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
