//! A full rebuild of the refcount structures from the counted references,
//! written into clusters nothing references, then switched to by one
//! header write (rule 4 of the crash-ordering rules).

use super::Walk;
use crate::cache::Slot;
use crate::format::{refcount, MAX_REFTABLE_BYTES};
use crate::{header_io, BlockDevice, Error, Qcow2, SECTOR};

impl<D, S, const K: usize> Qcow2<D, S, K>
where
    D: BlockDevice,
    S: AsMut<[Slot<K>]> + AsRef<[Slot<K>]>,
{
    /// Writes a complete new set of refcount structures computed from the
    /// references into clusters nothing references (the first such run
    /// large enough, else after everything in use), then switches the
    /// header to it.
    ///
    /// Crash-safe: the old structures stay in force until the header write,
    /// which happens after the new ones are durable, and the new ones never
    /// overlap the old ones or anything else referenced.
    pub(super) async fn rebuild_refcounts(
        &mut self,
        w: &mut Walk<'_>,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.geo.cluster_size;
        let per_block = self.geo.refblock_entries;
        // Durable mapping first, so the walks and the device agree.
        self.flush().await?;
        // Every referenced cluster lies below this (the audit saw them all).
        let covered = w.end;
        let start = self.find_unreferenced_run(w, covered).await?;
        let start = self.past_stray_entries(w, covered, start).await?;
        let (blocks, table) =
            refcount::self_covering_layout(per_block, cs, covered, start).ok_or(Error::NoSpace)?;
        if table * cs > MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace);
        }
        let end = start + blocks + table;
        self.check_host_limit(end)?;
        self.grow_device_to(end).await?;
        // Nothing references these clusters; drop stale slices of them.
        self.cache.forget_range(start * cs, (end - start) * cs)?;
        let cluster_sectors = cs / SECTOR as u64;
        self.dev
            .write_zeros(start * cluster_sectors, (end - start) * cluster_sectors)
            .await
            .map_err(Error::Io)?;

        // Entries are judged as they will be once the new table is in force
        // (one pointing into the old table, refused now, counts then), so
        // that a check after the switch agrees with what is stored.
        let old = (self.geo, self.header);
        let table_host = (start + blocks) * cs;
        self.geo.reftable_offset = table_host;
        self.geo.reftable_entries = table * cs / 8;
        self.header.refcount_table_offset = table_host;
        self.header.refcount_table_clusters = table as u32;
        let switched = self.switch_refcounts(w, start, end, covered.max(end)).await;
        if switched.is_err() {
            (self.geo, self.header) = old;
        }
        switched?;
        // Old refcount structures are free now; let allocation find them.
        self.free_hint = 0;
        Ok(())
    }

    /// Stores the new refcount blocks (from cluster `start`) and table (up
    /// to `end`) for every reference below `limit`, then points the header
    /// at them: durable before, and after, the header write.
    pub(super) async fn switch_refcounts(
        &mut self,
        w: &mut Walk<'_>,
        start: u64,
        end: u64,
        limit: u64,
    ) -> Result<(), Error<D::Error>> {
        w.skip_refcount_structures = true;
        w.audit = false;
        let mut first = 0;
        while first < limit {
            w.reset(first);
            self.walk(w).await?;
            for c in start..end {
                w.count(c);
            }
            self.store_refcounts(w, start, first, limit.min(first + w.len))
                .await?;
            first += w.len;
        }
        let blocks = (self.geo.reftable_offset >> self.geo.cluster_bits) - start;
        self.store_reftable(start, blocks).await?;
        self.cache.flush_device(&mut self.dev).await?;
        self.cache.forget_refcounts()?;
        header_io::write_header(&mut self.dev, &mut self.scratch, &self.header).await?;
        self.cache.flush_device(&mut self.dev).await
    }

    /// The first cluster of a run of clusters that nothing references (the
    /// old refcount structures included) long enough to hold refcount
    /// structures covering `covered` clusters and themselves; past the last
    /// referenced cluster when no such run exists inside.
    pub(super) async fn find_unreferenced_run(
        &mut self,
        w: &mut Walk<'_>,
        covered: u64,
    ) -> Result<u64, Error<D::Error>> {
        let (per_block, cs) = (self.geo.refblock_entries, self.geo.cluster_size);
        let need = |start: u64| {
            refcount::self_covering_layout(per_block, cs, covered, start).map(|(b, t)| b + t)
        };
        w.skip_refcount_structures = false;
        w.audit = false;
        let (mut run_start, mut run_len, mut run_need) = (0u64, 0u64, None);
        let mut first = 0;
        loop {
            w.reset(first);
            self.walk(w).await?;
            let used_end = w.end;
            for c in first.max(1)..(first + w.len).min(used_end) {
                if w.refs(c) != 0 {
                    run_len = 0;
                    continue;
                }
                if run_len == 0 {
                    (run_start, run_need) = (c, need(c));
                }
                run_len += 1;
                if run_need.is_some_and(|n| run_len >= n) {
                    return Ok(run_start);
                }
            }
            if first + w.len >= used_end {
                // Everything from `used_end` on is unreferenced.
                let reaches_end = run_len > 0 && run_start + run_len == used_end;
                return Ok(if reaches_end {
                    run_start
                } else {
                    used_end.max(1)
                });
            }
            first += w.len;
        }
    }

    /// Moves a placement at `start` that reaches past the end of the device
    /// beyond every entry that points there: such an entry is invalid now,
    /// but would read (or count) the new structures once the device grows.
    pub(super) async fn past_stray_entries(
        &mut self,
        w: &mut Walk<'_>,
        covered: u64,
        mut start: u64,
    ) -> Result<u64, Error<D::Error>> {
        let (per_block, cs) = (self.geo.refblock_entries, self.geo.cluster_size);
        for _ in 0..8 {
            let (blocks, table) = refcount::self_covering_layout(per_block, cs, covered, start)
                .ok_or(Error::NoSpace)?;
            let end = start + blocks + table;
            let from = start.max(self.dev_clusters);
            if from >= end {
                return Ok(start);
            }
            (w.avoid, w.avoid_hit) = (Some((from, end)), 0);
            w.reset(0);
            let walked = self.walk(w).await;
            w.avoid = None;
            walked?;
            if w.avoid_hit == 0 {
                return Ok(start);
            }
            start = w.avoid_hit;
        }
        Err(Error::corrupt(
            "no room for refcount structures clear of stray entries",
            start * cs,
        ))
    }

    /// Writes the counted refcounts of clusters `[first, stop)` into the new
    /// refcount blocks, which start at cluster `start`.
    pub(super) async fn store_refcounts(
        &mut self,
        w: &mut Walk<'_>,
        start: u64,
        first: u64,
        stop: u64,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.geo.cluster_size;
        let per_block = self.geo.refblock_entries;
        let order = self.geo.refcount_order;
        let per_sector = refcount::entries_in(SECTOR as u64, order);
        let cluster_sectors = cs / SECTOR as u64;
        let mut loaded = u64::MAX;
        for c in first..stop {
            let refs = w.refs(c);
            if refs == 0 {
                continue;
            }
            if refs > refcount::max_value(order) {
                return Err(Error::corrupt(
                    "more references than the refcount width holds",
                    c * cs,
                ));
            }
            let block = start + c / per_block;
            let sector = block * cluster_sectors + (c % per_block) / per_sector;
            if sector != loaded {
                self.store_scratch(loaded).await?;
                let buf = core::slice::from_mut(&mut self.scratch);
                self.dev.read(sector, buf).await.map_err(Error::Io)?;
                loaded = sector;
            }
            let index = ((c % per_block) % per_sector) as usize;
            refcount::set(&mut self.scratch, order, index, refs)
                .ok_or(Error::Internal("refcount block layout"))?;
        }
        self.store_scratch(loaded).await
    }

    /// Writes the new refcount table (after `blocks` new blocks from
    /// cluster `start`), pointing at those blocks.
    pub(super) async fn store_reftable(
        &mut self,
        start: u64,
        blocks: u64,
    ) -> Result<(), Error<D::Error>> {
        let cs = self.geo.cluster_size;
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
                    .ok_or(Error::Internal("refcount table layout"))?
                    .copy_from_slice(&entry.to_be_bytes());
                j += 1;
            }
            self.store_scratch(table_host / SECTOR as u64 + base / per_sector)
                .await?;
        }
        Ok(())
    }

    /// Writes the scratch sector to `sector` (no-op for `u64::MAX`).
    pub(super) async fn store_scratch(&mut self, sector: u64) -> Result<(), Error<D::Error>> {
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
