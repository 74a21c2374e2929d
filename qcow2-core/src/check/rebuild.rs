//! A full rebuild of the refcount structures from the counted references,
//! written into clusters nothing references, then switched to by one
//! header write (rule 4 of the crash-ordering rules).
//!
//! Where the new structures go is decided before anything is written, in
//! this order of preference:
//! 1. blocks and table together in the first run of unreferenced clusters
//!    inside the device long enough for them;
//! 2. the table in the first run long enough for it, each block in any
//!    other unreferenced cluster inside the device (a fixed-size device
//!    whose free space is scattered);
//! 3. blocks and table together past the last referenced cluster, growing
//!    the device (which a fixed-size device refuses: [`Error::NoSpace`],
//!    with nothing written).
//!
//! The old refcount structures count as referenced throughout, so a crash
//! before the header switch leaves the old image as it was.

use super::Walk;
use crate::cache::SlotStorage;
use crate::engine::geometry::Geometry;
use crate::engine::geometry::ENTRY_BYTES;
use crate::engine::header_io;
use crate::engine::relocate::Structure;
use crate::engine::{tables, Engine};
use crate::format::{refcount, MAX_REFTABLE_BYTES};
use crate::{BlockDevice, Error, SECTOR};

/// log2 of the refcount table entries in a sector.
const TABLE_ENTRIES_PER_SECTOR_BITS: u32 = 6;

/// Rounds of sizing the scattered placement: each round sizes the blocks
/// for the clusters the previous round placed them in; the last one
/// covers the whole device, which always settles.
const SCATTER_ROUNDS: u32 = 4;

/// Where a rebuild puts the new refcount structures.
#[derive(Debug, Clone, Copy)]
pub(super) struct Placement {
    /// First cluster of the new refcount table.
    pub(super) table: u64,
    /// Clusters in the new table.
    pub(super) table_clusters: u64,
    /// New refcount blocks.
    pub(super) blocks: u64,
    /// `Some(start)`: block `j` is cluster `start + j` (the table follows
    /// the blocks). `None`: block `j` is the `j`-th cluster from cluster 1
    /// on that nothing references, the table's left out; the new table
    /// says which.
    pub(super) run: Option<u64>,
    /// One past the last cluster of the new structures.
    pub(super) end: u64,
    /// One past the last cluster that needs a refcount: every referenced
    /// cluster and the new structures. The blocks cover it.
    pub(super) limit: u64,
}

impl Placement {
    fn holds_table(&self, cluster: u64) -> bool {
        cluster >= self.table && cluster - self.table < self.table_clusters
    }
}

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// Writes a complete new set of refcount structures computed from the
    /// references into clusters nothing references (see the module
    /// documentation for where), then switches the header to it.
    ///
    /// Crash-safe: the old structures stay in force until the header write,
    /// which happens after the new ones are durable, and the new ones never
    /// overlap the old ones or anything else referenced. Fails with
    /// [`Error::NoSpace`] before writing anything when the device has no
    /// room for them and cannot grow.
    ///
    /// When there is no room (a full fixed-size device), a v3 image is
    /// rebuilt in place instead, under its dirty bit (see
    /// [`Self::rebuild_in_place`]).
    pub(super) async fn rebuild_refcounts(
        &mut self,
        w: &mut Walk<'_>,
    ) -> Result<(), Error<D::Error>> {
        // Durable mapping first, so the walks and the device agree.
        self.flush().await?;
        match self.rebuild_elsewhere(w).await {
            Err(Error::NoSpace) if self.geo.v3 => self.rebuild_in_place(w).await,
            done => done,
        }
    }

    /// The rebuild into clusters nothing references, switched to by one
    /// header write.
    async fn rebuild_elsewhere(&mut self, w: &mut Walk<'_>) -> Result<(), Error<D::Error>> {
        // Every referenced cluster lies below this (the audit saw them all).
        let covered = w.end;
        let p = self.place_refcounts(w, covered).await?;
        if p.table_clusters << self.geo.cluster_bits > MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace);
        }
        let table_clusters = u32::try_from(p.table_clusters).map_err(|_| Error::NoSpace)?;
        self.check_host_limit(p.end)?;
        self.grow_device_to(p.end).await?;
        self.write_placement(w, &p).await?;

        // Entries are judged as they will be once the new table is in force
        // (one pointing into the old table, refused now, counts then), so
        // that a check after the switch agrees with what is stored.
        self.geo
            .set_reftable(p.table << self.geo.cluster_bits, table_clusters);
        let switched = self.switch_refcounts(w, &p, table_clusters).await;
        if switched.is_err() {
            // Memory keeps the old table, as the disk may.
            self.geo = Geometry::new(&self.header);
        }
        switched?;
        // Old refcount structures are free now; let allocation find them.
        self.free_hint = 0;
        Ok(())
    }

    /// Decides where the new structures go, writing nothing (but growing
    /// the device when they go past its end).
    async fn place_refcounts(
        &mut self,
        w: &mut Walk<'_>,
        covered: u64,
    ) -> Result<Placement, Error<D::Error>> {
        let inside = self.dev_clusters.max(covered);
        let (fit, tail) = self.find_run(w, covered, inside).await?;
        if let Some(start) = fit {
            return self.run_placement(covered, start);
        }
        if let Some(p) = self.find_scattered(w, covered, inside).await? {
            return Ok(p);
        }
        let start = self.past_stray_entries(w, covered, tail).await?;
        self.run_placement(covered, start)
    }

    /// Blocks then table from cluster `start`, sized to cover themselves.
    fn run_placement(&self, covered: u64, start: u64) -> Result<Placement, Error<D::Error>> {
        let (blocks, table_clusters) = self.layout(covered, start)?;
        let end = start + blocks + table_clusters;
        Ok(Placement {
            table: start + blocks,
            table_clusters,
            blocks,
            run: Some(start),
            end,
            limit: covered.max(end),
        })
    }

    /// `(blocks, table clusters)` of refcount structures placed at cluster
    /// `start` covering every cluster below `covered` and themselves.
    fn layout(&self, covered: u64, start: u64) -> Result<(u64, u64), Error<D::Error>> {
        let (per_block, cs) = (self.geo.refblock_entries, self.geo.cluster_size);
        refcount::self_covering_layout(per_block, cs, covered, start).ok_or(Error::NoSpace)
    }

    /// The first cluster of a run of unreferenced clusters inside the
    /// device (below `inside`) long enough for blocks and table together,
    /// if any; and the first cluster of the run that reaches the end of the
    /// device (`inside` when the last cluster is in use), where growing the
    /// device would place them.
    async fn find_run(
        &mut self,
        w: &mut Walk<'_>,
        covered: u64,
        inside: u64,
    ) -> Result<(Option<u64>, u64), Error<D::Error>> {
        let mut walked = false;
        let (mut run_start, mut run_len, mut run_need) = (0u64, 0u64, None);
        let mut from = 1;
        while let Some(c) = self.next_unreferenced(w, &mut walked, from, inside).await? {
            if run_len == 0 || c != run_start + run_len {
                (run_start, run_len) = (c, 0);
                run_need = self.layout(covered, c).ok().map(|(b, t)| b + t);
            }
            run_len += 1;
            if run_need.is_some_and(|n| run_len >= n) {
                return Ok((Some(run_start), run_start));
            }
            from = c + 1;
        }
        let reaches_end = run_len > 0 && run_start + run_len == inside;
        Ok((None, if reaches_end { run_start } else { inside }))
    }

    /// The table in the first run of unreferenced clusters inside the
    /// device long enough for it, the blocks in the first other ones; or
    /// `None` when they do not fit.
    async fn find_scattered(
        &mut self,
        w: &mut Walk<'_>,
        covered: u64,
        inside: u64,
    ) -> Result<Option<Placement>, Error<D::Error>> {
        let mut bound = covered;
        for round in 0..SCATTER_ROUNDS {
            // Blocks covering `bound` (the placement is checked below).
            let (blocks, table_clusters) = self.layout(bound, 0)?;
            let mut walked = false;
            let (mut table, mut run_len) = (0u64, 0u64);
            let mut from = 1;
            while run_len < table_clusters {
                let Some(c) = self.next_unreferenced(w, &mut walked, from, inside).await? else {
                    return Ok(None);
                };
                if run_len == 0 || c != table + run_len {
                    (table, run_len) = (c, 0);
                }
                run_len += 1;
                from = c + 1;
            }
            let mut p = Placement {
                table,
                table_clusters,
                blocks,
                run: None,
                end: table + table_clusters,
                limit: 0,
            };
            let mut from = 1;
            for _ in 0..blocks {
                let Some(c) = self.next_block(w, &mut walked, &p, from, inside).await? else {
                    return Ok(None);
                };
                p.end = p.end.max(c + 1);
                from = c + 1;
            }
            p.limit = covered.max(p.end);
            if p.limit <= blocks << self.geo.refblock_bits {
                return Ok(Some(p));
            }
            // The blocks landed beyond what they cover: size them again.
            bound = if round + 2 < SCATTER_ROUNDS {
                p.limit
            } else {
                p.limit.max(inside)
            };
        }
        Ok(None)
    }

    /// The first cluster of `[from, to)` nothing references, the old
    /// refcount structures counting as referenced. `walked` says whether
    /// `w` holds the counts of its window (so a scan in increasing order
    /// walks the metadata once per window); false at the start of a scan.
    pub(super) async fn next_unreferenced(
        &mut self,
        w: &mut Walk<'_>,
        walked: &mut bool,
        from: u64,
        to: u64,
    ) -> Result<Option<u64>, Error<D::Error>> {
        let mut c = from.max(1);
        while c < to {
            if *walked && c >= w.end {
                // Past every reference.
                return Ok(Some(c));
            }
            if !(*walked && w.in_window(c)) {
                w.skip_refcount_structures = false;
                w.audit = false;
                w.reset(c);
                self.walk(w).await?;
                *walked = true;
            }
            let stop = to.min(w.start + w.len);
            while c < stop {
                if w.refs(c) == 0 {
                    return Ok(Some(c));
                }
                c += 1;
            }
        }
        Ok(None)
    }

    /// The next cluster for a scattered block: unreferenced, in `[from,
    /// to)`, not the table's.
    async fn next_block(
        &mut self,
        w: &mut Walk<'_>,
        walked: &mut bool,
        p: &Placement,
        mut from: u64,
        to: u64,
    ) -> Result<Option<u64>, Error<D::Error>> {
        loop {
            match self.next_unreferenced(w, walked, from, to).await? {
                Some(c) if p.holds_table(c) => from = p.table + p.table_clusters,
                found => return Ok(found),
            }
        }
    }

    /// Zeroes the new structures and writes the new table's entries.
    async fn write_placement(
        &mut self,
        w: &mut Walk<'_>,
        p: &Placement,
    ) -> Result<(), Error<D::Error>> {
        let table_sector = self.geo.cluster_sector(p.table);
        let Some(start) = p.run else {
            self.zero_clusters(p.table, p.table_clusters).await?;
            let (mut walked, mut from) = (false, 1);
            for j in 0..p.blocks {
                let block = self
                    .next_block(w, &mut walked, p, from, p.end)
                    .await?
                    .ok_or(Error::Internal("rebuild placement changed"))?;
                from = block + 1;
                self.zero_clusters(block, 1).await?;
                // The walk may use the scratch sector: read, set, write.
                let sector = table_sector + (j >> TABLE_ENTRIES_PER_SECTOR_BITS);
                let buf = core::slice::from_mut(&mut self.scratch);
                self.dev.read(sector, buf).await.map_err(Error::Io)?;
                self.set_table_entry(j, block)?;
                self.store_scratch(sector).await?;
            }
            return Ok(());
        };
        self.zero_clusters(start, p.end - start).await?;
        let bits = self.geo.cluster_bits;
        let (dev, buf) = (&mut self.dev, &mut self.scratch);
        tables::write_entries(dev, buf, table_sector, p.blocks, |j| (start + j) << bits).await
    }

    /// Sets refcount table entry `j` (in the scratch sector holding it) to
    /// the block at cluster `block`.
    fn set_table_entry(&mut self, j: u64, block: u64) -> Result<(), Error<D::Error>> {
        let i = ((j & ((1 << TABLE_ENTRIES_PER_SECTOR_BITS) - 1)) * 8) as usize;
        let entry = block << self.geo.cluster_bits;
        self.scratch
            .get_mut(i..i + 8)
            .ok_or(Error::Internal("refcount table layout"))?
            .copy_from_slice(&entry.to_be_bytes());
        Ok(())
    }

    /// Zeroes `n` clusters from `first`, which nothing references; drops
    /// stale cached slices of them.
    pub(super) async fn zero_clusters(
        &mut self,
        first: u64,
        n: u64,
    ) -> Result<(), Error<D::Error>> {
        let bits = self.geo.cluster_bits;
        self.cache.forget_range(first << bits, n << bits)?;
        self.cache.note_device_write();
        let sector_bits = bits - 9;
        self.dev
            .write_zeros(first << sector_bits, n << sector_bits)
            .await
            .map_err(Error::Io)
    }

    /// The cluster of new refcount block `j`.
    async fn block_at(&mut self, p: &Placement, j: u64) -> Result<u64, Error<D::Error>> {
        if let Some(start) = p.run {
            return Ok(start + j);
        }
        let mut raw = [0u8; 8];
        let at = (p.table << self.geo.cluster_bits) + j * ENTRY_BYTES;
        header_io::read_bytes(&mut self.dev, &mut self.scratch, at, &mut raw).await?;
        Ok(self.geo.cluster_of(u64::from_be_bytes(raw)))
    }

    /// Stores the new refcounts of every reference below `p.limit`, then
    /// points the header at the new table: durable before, and after, the
    /// header write.
    async fn switch_refcounts(
        &mut self,
        w: &mut Walk<'_>,
        p: &Placement,
        table_clusters: u32,
    ) -> Result<(), Error<D::Error>> {
        w.skip_refcount_structures = true;
        w.audit = false;
        let mut first = 0;
        while first < p.limit {
            w.reset(first);
            self.walk(w).await?;
            for c in p.table..p.table + p.table_clusters {
                w.count(c);
            }
            for j in 0..p.blocks {
                let block = self.block_at(p, j).await?;
                w.count(block);
            }
            self.store_refcounts(w, p, first, p.limit.min(first + w.len))
                .await?;
            first += w.len;
        }
        self.cache.flush_device(&mut self.dev).await?;
        self.cache.forget_refcounts()?;
        // Provisional geometry: restored from the header for the switch.
        let table = self.geo.reftable_offset;
        self.geo = Geometry::new(&self.header);
        let structure = Structure::RefcountTable {
            clusters: table_clusters,
        };
        self.relocate(structure, table, false).await
    }

    /// Writes the counted refcounts of clusters `[first, stop)` into the new
    /// refcount blocks.
    pub(super) async fn store_refcounts(
        &mut self,
        w: &mut Walk<'_>,
        p: &Placement,
        first: u64,
        stop: u64,
    ) -> Result<(), Error<D::Error>> {
        let order = self.geo.refcount_order;
        let block_bits = self.geo.refblock_bits;
        let sector_bits = self.geo.cluster_sector_bits();
        let per_sector_bits = refcount::entries_in(SECTOR as u64, order).trailing_zeros();
        let mut loaded = u64::MAX;
        // Index and cluster of the block in use.
        let mut block = (u64::MAX, 0);
        for c in first..stop {
            let refs = w.refs(c);
            if refs == 0 {
                continue;
            }
            if refs > refcount::max_value(order) {
                return Err(Error::corrupt(
                    crate::Corruption::TooManyReferences,
                    c << self.geo.cluster_bits,
                ));
            }
            let j = c >> block_bits;
            if block.0 != j {
                // Looking the block up may use the scratch sector.
                self.store_scratch(loaded).await?;
                loaded = u64::MAX;
                block = (j, self.block_at(p, j).await?);
            }
            let within = c & ((1 << block_bits) - 1);
            let sector = (block.1 << sector_bits) + (within >> per_sector_bits);
            if sector != loaded {
                self.store_scratch(loaded).await?;
                let buf = core::slice::from_mut(&mut self.scratch);
                self.dev.read(sector, buf).await.map_err(Error::Io)?;
                loaded = sector;
            }
            let index = (within & ((1 << per_sector_bits) - 1)) as usize;
            refcount::set(&mut self.scratch, order, index, refs)
                .ok_or(Error::Internal("refcount block layout"))?;
        }
        self.store_scratch(loaded).await
    }

    /// Moves a placement at `start` that reaches past the end of the device
    /// beyond every entry that points there: such an entry is invalid now,
    /// but would read (or count) the new structures once the device grows.
    async fn past_stray_entries(
        &mut self,
        w: &mut Walk<'_>,
        covered: u64,
        mut start: u64,
    ) -> Result<u64, Error<D::Error>> {
        for _ in 0..8 {
            let (blocks, table) = self.layout(covered, start)?;
            let end = start + blocks + table;
            let from = start.max(self.dev_clusters);
            if from >= end {
                return Ok(start);
            }
            (w.avoid, w.avoid_hit) = ((from, end), 0);
            w.reset(0);
            let walked = self.walk(w).await;
            w.avoid = (0, 0);
            walked?;
            if w.avoid_hit == 0 {
                return Ok(start);
            }
            start = w.avoid_hit;
        }
        Err(Error::corrupt(
            crate::Corruption::NoRoomForRefcounts,
            start << self.geo.cluster_bits,
        ))
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
}
