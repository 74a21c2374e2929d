//! Cluster allocation from the refcounts, growing refcount blocks and the
//! refcount table on demand.

use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::engine::relocate::Structure;
use crate::engine::{tables, Engine};
use crate::format::{refcount, MAX_HOST_OFFSET, MAX_REFTABLE_BYTES};
use crate::{BlockDevice, Error, SECTOR};

/// Each round of allocation either succeeds or creates refcount metadata;
/// a handful of rounds always suffices on a consistent image.
const MAX_ALLOC_ROUNDS: usize = 16;

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// Allocates one cluster (refcount 0 -> 1) and returns its host offset.
    ///
    /// The search starts at the free hint, which an open image sets to the
    /// end of the device so that opening costs nothing; when the device
    /// cannot grow, the search wraps around once to reuse free clusters
    /// inside it before reporting [`Error::NoSpace`].
    ///
    /// The refcount change stays in the cache; the cache's write-back order
    /// makes it durable before any L1/L2 entry that points at the cluster
    /// (rule 1); a cluster released since the last flush still counts its
    /// reference until then (rule 6).
    pub(crate) async fn alloc_cluster(&mut self) -> Result<u64, Error<D::Error>> {
        let mut wrapped = self.free_hint == 0;
        for _ in 0..MAX_ALLOC_ROUNDS {
            match self.alloc_round().await {
                Ok(Some(host)) => return Ok(host),
                Ok(None) => {}
                Err(Error::NoSpace) if !wrapped => {
                    wrapped = true;
                    self.free_hint = 0;
                }
                // Clusters released since the last flush are free once it
                // is done (rule 6): a full device waits for it.
                Err(Error::NoSpace) if self.cache.holds_releases() => self.flush_metadata().await?,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Internal("cluster allocation does not converge"))
    }

    /// One attempt: allocates the first free cluster from the hint if its
    /// refcount block exists, or else creates the missing refcount
    /// structures and returns `None` so the caller searches again.
    async fn alloc_round(&mut self) -> Result<Option<u64>, Error<D::Error>> {
        let cluster = self.first_free_from(self.free_hint).await?;
        self.check_host_limit(cluster + 1)?;
        self.check_unused(cluster, 1)?;
        if self.refblock_of(cluster).await? != 0 {
            self.claim(cluster).await?;
            self.increment(cluster).await?;
            self.free_hint = cluster + 1;
            return Ok(Some(cluster << self.geo.cluster_bits));
        }
        if cluster >> self.geo.refblock_bits < self.geo.reftable_entries {
            self.new_refblock(cluster).await?;
        } else {
            self.grow_reftable(cluster).await?;
        }
        Ok(None)
    }

    /// Refuses to hand out clusters that are visibly live metadata although
    /// their refcount says free (zeroed refcounts under live data).
    fn check_unused(&self, first: u64, count: u64) -> Result<(), Error<D::Error>> {
        let host = first << self.geo.cluster_bits;
        let len = count << self.geo.cluster_bits;
        if self.geo.hits_fixed_metadata(host, len) || self.cache.holds_any(host, len) {
            return Err(Error::corrupt(
                crate::Corruption::FreeClusterIsMetadata,
                host,
            ));
        }
        Ok(())
    }

    pub(crate) fn check_host_limit(&self, clusters: u64) -> Result<(), Error<D::Error>> {
        match clusters.checked_mul(self.geo.cluster_size) {
            Some(end) if end <= MAX_HOST_OFFSET => Ok(()),
            _ => Err(Error::NoSpace),
        }
    }

    /// Makes the device at least `clusters` whole clusters long: a device
    /// that ends inside a cluster grows to its end, or, fixed, refuses
    /// the partial cluster with [`Error::NoSpace`].
    pub(crate) async fn grow_device_to(&mut self, clusters: u64) -> Result<(), Error<D::Error>> {
        let sectors = clusters * self.geo.cluster_sectors();
        if sectors > self.dev.sector_count() {
            self.dev
                .set_sector_count(sectors)
                .await
                .map_err(|_| Error::NoSpace)?;
        }
        self.dev_clusters = self.dev_clusters.max(clusters);
        Ok(())
    }

    /// Makes free cluster `cluster` ready to hand out: inside the device,
    /// and with no discard of it still queued (rule 6: a flush cycle that
    /// failed after freeing it would otherwise punch its new contents).
    async fn claim(&mut self, cluster: u64) -> Result<(), Error<D::Error>> {
        self.grow_device_to(cluster + 1).await?;
        let (first, sectors) = (self.geo.cluster_sector(cluster), self.geo.cluster_sectors());
        self.cache
            .discard_before_reuse(&mut self.dev, first, sectors)
            .await
    }

    /// Creates the refcount block for `cluster`'s range at `cluster` itself,
    /// which is free and which the new block then marks as used.
    async fn new_refblock(&mut self, cluster: u64) -> Result<(), Error<D::Error>> {
        self.claim(cluster).await?;
        let host = cluster << self.geo.cluster_bits;
        let index = cluster >> self.geo.refblock_bits;
        self.write_refblock(host, index << self.geo.refblock_bits, cluster, cluster + 1)
            .await?;
        // The block must be durable before the table points at it (rule 3).
        self.cache.flush_device(&mut self.dev).await?;
        let at = self.geo.reftable_entry_at(index);
        self.cache
            .write_u64(&mut self.dev, at, Kind::RefTable, host)
            .await
    }

    /// Writes a refcount block at `host` covering clusters from `covers`,
    /// with refcount 1 for clusters in `[used_from, used_to)` and 0 elsewhere.
    async fn write_refblock(
        &mut self,
        host: u64,
        covers: u64,
        used_from: u64,
        used_to: u64,
    ) -> Result<(), Error<D::Error>> {
        let first = host / SECTOR as u64;
        self.dev
            .write_zeros(first, self.geo.cluster_sectors())
            .await
            .map_err(Error::Io)?;
        self.cache.note_device_write();
        let from = used_from.max(covers);
        let to = used_to.min(covers + self.geo.refblock_entries);
        if to <= from {
            // The used clusters lie outside this block's range.
            return Ok(());
        }
        let order = self.geo.refcount_order;
        let (dev, buf) = (&mut self.dev, &mut self.scratch);
        tables::write_ones(dev, buf, first, order, from - covers, to - covers).await
    }

    /// Moves the refcount table to a larger one placed, with the refcount
    /// blocks that cover it, at the first cluster the old table does not
    /// cover (never past `cluster`, the free cluster that triggered growth).
    ///
    /// Order: new blocks and table written and flushed, header switched and
    /// flushed, then the old table's clusters freed.
    async fn grow_reftable(&mut self, cluster: u64) -> Result<(), Error<D::Error>> {
        let cs = self.geo.cluster_size;
        let old_entries = self.geo.reftable_entries;
        let old_clusters = self.geo.cluster_of(self.geo.reftable_bytes());
        let start = old_entries << self.geo.refblock_bits;
        // Grow by half at least, cover the cluster that asked, and cover
        // the new blocks and table themselves.
        let (blocks, table_clusters) = refcount::self_covering_layout_with(
            self.geo.refblock_entries,
            cs,
            cluster + 1,
            start,
            0,
            old_entries,
            old_clusters + (old_clusters / 2).max(1),
        )
        .ok_or(Error::NoSpace)?;
        if table_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace);
        }
        let end = start + blocks + table_clusters;
        self.check_host_limit(end)?;
        self.check_unused(start, end - start)?;
        self.grow_device_to(end).await?;

        for j in 0..blocks {
            let covers = (old_entries + j) << self.geo.refblock_bits;
            self.write_refblock((start + j) * cs, covers, start, end)
                .await?;
        }
        // Copy the current table (with any cached changes) and append entries.
        self.cache.write_refcounts(&mut self.dev).await?;
        let table = (start + blocks) * cs;
        let old_sectors = old_clusters * self.geo.cluster_sectors();
        let old_first = self.geo.reftable_offset / SECTOR as u64;
        let new_first = table / SECTOR as u64;
        for s in 0..old_sectors {
            let buf = core::slice::from_mut(&mut self.scratch);
            self.dev.read(old_first + s, buf).await.map_err(Error::Io)?;
            self.dev
                .write(new_first + s, buf)
                .await
                .map_err(Error::Io)?;
        }
        // Entries for the new blocks, then zeros to the table's end.
        let (dev, buf) = (&mut self.dev, &mut self.scratch);
        let first_new = new_first + old_sectors;
        tables::write_entries(dev, buf, first_new, blocks, |j| (start + j) * cs).await?;
        let written = old_sectors + tables::entry_sectors(blocks);
        let total_sectors = table_clusters * self.geo.cluster_sectors();
        if total_sectors > written {
            self.dev
                .write_zeros(new_first + written, total_sectors - written)
                .await
                .map_err(Error::Io)?;
        }
        let structure = Structure::RefcountTable {
            clusters: table_clusters as u32,
        };
        self.relocate(structure, table, true).await?;
        info!(
            "qcow2: refcount table moved to {=u64:#x}, {=u64} clusters",
            table, table_clusters
        );
        Ok(())
    }
}
