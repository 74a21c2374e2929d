//! A rebuild of the refcounts inside the existing refcount table, for when
//! there is no room for new structures (a full fixed-size device).
//!
//! Rule 4 wants new structures written beside the old ones and one header
//! switch; with no free room that is impossible, but rule 5 allows stale
//! refcounts under the dirty bit. So the dirty bit is set durably first,
//! the blocks are rewritten where they are (missing or untrustworthy ones
//! replaced by clusters nothing references: a crashed lazy image always
//! has those, the blocks whose table entries were lost), and the dirty bit
//! is cleared only once all of it is durable. A crash in between leaves a
//! dirty image that the next read-write open rebuilds again.

use super::rebuild::Placement;
use super::Walk;
use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::engine::Engine;
use crate::format::incompatible;
use crate::{BlockDevice, Error};

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// Rewrites every refcount in place (see the module documentation).
    /// Fails with [`Error::NoSpace`], before writing anything, when the
    /// plan cannot be carried out (see [`Self::plan_in_place`]).
    pub(super) async fn rebuild_in_place(
        &mut self,
        w: &mut Walk<'_>,
    ) -> Result<(), Error<D::Error>> {
        let table = self.geo.reftable_offset;
        let table_clusters = self.geo.clusters_for(self.geo.reftable_bytes());
        let first_table = self.geo.cluster_of(table);
        // Blocks covering the whole device: anything referenced lies inside.
        let needed = crate::format::shr_ceil(self.dev_clusters, self.geo.refblock_bits);
        self.plan_in_place(w, first_table..first_table + table_clusters, needed)
            .await?;
        // Rule 5: stale refcounts from here on are covered, and guest
        // changes wait for the repair to finish.
        self.refcounts_stale = true;
        self.set_incompatible(incompatible::DIRTY).await?;
        info!("qcow2: no room for new refcount structures: rebuilding them in place");
        self.cache.flush(&mut self.dev).await?;
        self.cache.forget_refcounts()?;
        // Entries past the device cover nothing that can be referenced.
        for i in needed..self.geo.reftable_entries {
            if self.reftable_raw(i).await? != 0 {
                self.set_reftable_entry(i, 0).await?;
            }
        }
        let mut from = 1;
        for i in 0..needed {
            self.settle_block(w, i, &mut from).await?;
        }
        self.cache.flush(&mut self.dev).await?;
        self.cache.forget_refcounts()?;
        let p = Placement {
            table: first_table,
            table_clusters,
            blocks: needed,
            run: None,
            end: self.dev_clusters,
            limit: self.dev_clusters,
        };
        let mut first = 0;
        while first < p.limit {
            w.skip_refcount_structures = false;
            w.audit = false;
            w.reset(first);
            self.walk(w).await?;
            self.store_refcounts(w, &p, first, p.limit.min(first + w.len))
                .await?;
            first += w.len;
        }
        self.cache.flush_device(&mut self.dev).await?;
        // Old refcount structures may be free now; let allocation find them.
        self.free_hint = 0;
        Ok(())
    }

    /// Checks, writing nothing, that the rebuild in place can finish: the
    /// table inside the device's whole clusters and referenced by itself
    /// alone (never written into something else), big enough to cover
    /// the device with `needed` blocks, every reference count within the
    /// refcount width, and enough whole clusters nothing references for
    /// the blocks that must be replaced (missing, invalid, or shared).
    async fn plan_in_place(
        &mut self,
        w: &mut Walk<'_>,
        table: core::ops::Range<u64>,
        needed: u64,
    ) -> Result<(), Error<D::Error>> {
        let whole = self.whole_clusters();
        if table.end > whole || needed > self.geo.reftable_entries || w.end > self.dev_clusters {
            return Err(Error::NoSpace);
        }
        let max = crate::format::refcount::max_value(self.geo.refcount_order);
        let (mut kept, mut free) = (0u64, 0u64);
        let mut start = 0;
        while start < self.dev_clusters {
            w.skip_refcount_structures = false;
            w.audit = false;
            w.reset(start);
            self.walk(w).await?;
            let stop = self.dev_clusters.min(start + w.len);
            for c in start..stop {
                let refs = w.refs(c);
                let in_table = table.contains(&c);
                if refs > max || (in_table && refs != 1) {
                    return Err(Error::NoSpace);
                }
                free += u64::from(refs == 0 && c != 0 && c < whole);
            }
            for i in 0..needed {
                if let Some(block) = self.refblock_entry(i).await? {
                    let c = self.geo.cluster_of(block);
                    kept += u64::from(w.in_window(c) && c != 0 && c < whole && w.refs(c) == 1);
                }
            }
            start += w.len;
        }
        if needed - kept.min(needed) > free {
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    /// The device's whole clusters: a partial last cluster holds no block.
    fn whole_clusters(&self) -> u64 {
        self.dev.sector_count() >> (self.geo.cluster_sector_bits())
    }

    /// Makes table entry `i` point at a zeroed refcount block that nothing
    /// but the table references: its own block when that holds, else a
    /// cluster nothing references (searched from `from` on, which then
    /// moves past it).
    async fn settle_block(
        &mut self,
        w: &mut Walk<'_>,
        i: u64,
        from: &mut u64,
    ) -> Result<(), Error<D::Error>> {
        let whole = self.whole_clusters();
        if let Some(block) = self.refblock_entry(i).await? {
            let cluster = self.geo.cluster_of(block);
            if cluster != 0 && cluster < whole && self.refs_of(w, cluster).await? == 1 {
                return self.zero_clusters(cluster, 1).await;
            }
        }
        let mut walked = false;
        let Some(cluster) = self.next_unreferenced(w, &mut walked, *from, whole).await? else {
            return Err(Error::NoSpace);
        };
        *from = cluster + 1;
        self.zero_clusters(cluster, 1).await?;
        self.set_reftable_entry(i, cluster << self.geo.cluster_bits)
            .await
    }

    /// Sets refcount table entry `i` through the cache.
    async fn set_reftable_entry(&mut self, i: u64, value: u64) -> Result<(), Error<D::Error>> {
        let at = self.geo.reftable_entry_at(i);
        self.cache
            .write_u64(&mut self.dev, at, Kind::RefTable, value)
            .await
    }

    /// The references to `cluster`, the refcount table and blocks included,
    /// counted by a walk of the window starting there.
    async fn refs_of(&mut self, w: &mut Walk<'_>, cluster: u64) -> Result<u64, Error<D::Error>> {
        w.skip_refcount_structures = false;
        w.audit = false;
        w.reset(cluster);
        self.walk(w).await?;
        Ok(w.refs(cluster))
    }
}
