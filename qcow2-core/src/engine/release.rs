//! Release: dropping the references an old L2 entry held, held until the
//! entry change is durable, then freeing (and queueing the discard of)
//! clusters whose refcount reaches zero.

use core::future::Future;

use crate::cache::{Kind, SlotStorage};
use crate::engine::Engine;
use crate::format::entry::{L1Entry, L2Entry};
use crate::{BlockDevice, Error, SECTOR};

/// Asked before a compressed extent is freed on its descriptor's word
/// (rule 9): to decode its stream. The engine has no decoder; the guest
/// view, which has the workspace, decodes.
pub(crate) trait StreamProbe<D: BlockDevice, S, const K: usize> {
    /// Decodes the stream of `len` bytes at host byte `host` to a whole
    /// cluster, discarding the output: `Corrupt` when it does not decode,
    /// `Unsupported` when it cannot be judged.
    fn decode<'a>(
        &'a mut self,
        engine: &'a mut Engine<D, S, K>,
        host: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), Error<D::Error>>> + 'a;
}

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// Drops one reference to every host cluster the old mapping `entry`
    /// used (a data cluster, a preallocated zero cluster, or each cluster a
    /// compressed stream touches), after its L2 entry changed in the cache.
    /// The decrease is held in the cache and applied by the next flush,
    /// once that change is durable (rules 2 and 6); a full queue flushes
    /// at once.
    pub(crate) async fn release(
        &mut self,
        entry: L2Entry,
        probe: &mut impl StreamProbe<D, S, K>,
    ) -> Result<(), Error<D::Error>> {
        let (host, len) = match entry {
            L2Entry::Data { offset, .. } => (offset, self.geo.cluster_size),
            L2Entry::Zero { offset, .. } if offset != 0 => (offset, self.geo.cluster_size),
            // The stream starts inside a sector; its sectors are what it holds.
            L2Entry::Compressed { offset, len } => (offset & !511, (offset & 511) + len),
            L2Entry::Zero { .. } | L2Entry::Unallocated => return Ok(()),
        };
        if self.external_data() {
            return self.release_external(host, entry).await;
        }
        if let L2Entry::Compressed { offset, len } = entry {
            if !self.compressed_releasable(offset, len, probe).await? {
                warn!(
                    "qcow2: compressed cluster at {=u64:#x} left allocated: its descriptor claims what it does not own",
                    offset
                );
                return Ok(());
            }
        }
        let first = self.geo.cluster_of(host);
        let last = self.geo.cluster_of(host + len.max(1) - 1);
        for cluster in first..=last {
            let count = self.refcount_after_releases(cluster).await?;
            let Some(left) = count.checked_sub(1) else {
                return Err(Error::corrupt(
                    crate::Corruption::RefcountUnderflow,
                    cluster << self.geo.cluster_bits,
                ));
            };
            if left == 0 && self.pack_next != 0 && self.geo.cluster_of(self.pack_next) == cluster {
                // Never pack into a cluster someone else may get.
                self.pack_next = 0;
            }
        }
        // Rule 2: the decrease waits until the entry change is durable.
        let clusters = u32::try_from(last - first + 1)
            .map_err(|_| Error::Internal("released extent over 2^32 clusters"))?;
        if !self.cache.hold_release(first, clusters) {
            // Queue full: a whole flush cycle applies what it holds.
            self.flush_metadata().await?;
            if !self.cache.hold_release(first, clusters) {
                return Err(Error::Internal("release queue full after a flush"));
            }
        }
        Ok(())
    }

    /// The refcount of `cluster` once the held releases are applied: what
    /// a decision to free it, or to release it again, must see.
    async fn refcount_after_releases(&mut self, cluster: u64) -> Result<u64, Error<D::Error>> {
        let count = self.refcount(cluster).await?;
        Ok(count.saturating_sub(self.cache.held_decrease(cluster)))
    }

    /// Applies the held releases, once the entry changes that caused them
    /// are durable (`flush_metadata`, rules 2 and 6): the refcounts drop,
    /// and a cluster left unreferenced is free for allocation and queued
    /// for a device discard after the next flush. Each release is taken
    /// before it is applied: cancelled or failed halfway, what is left
    /// undone is a leak, never a decrease applied twice.
    pub(crate) async fn apply_releases(&mut self) -> Result<(), Error<D::Error>> {
        while let Some(held) = self.cache.take_release() {
            let times = u64::from(held.times);
            for cluster in held.first..held.first + u64::from(held.clusters) {
                if self.decrement(cluster, times).await? == 0 {
                    // Release is "decrement, and discard at zero".
                    let sectors = self.geo.cluster_sectors();
                    let first = self.geo.cluster_sector(cluster);
                    self.cache
                        .queue_discard(&mut self.dev, first, sectors)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Whether the host clusters of the compressed cluster of `len` bytes at
    /// host byte `host` may lose a reference (rule 9 of `ORDERING.md`).
    ///
    /// A descriptor is only a claim: a hostile or damaged L2 entry may point
    /// at the header, a refcount block, an L2 table or another cluster's
    /// data, whose refcount counts only its real owner; released on the
    /// descriptor's word, that cluster would be freed, discarded and
    /// reused. So the extent must lie inside the device, clear of the
    /// header, the L1 and refcount tables and cached metadata, and a
    /// cluster the release would free (refcount 1) must be no L2 table of
    /// the active L1 table and no refcount block, and its stream must
    /// decode to a whole cluster (the `probe` decides: the guest view
    /// decodes it when its workspace has a decoder; without one the
    /// structural checks decide). What is not released stays
    /// allocated: a leak that `repair` reclaims once a check has
    /// established it, as QEMU warns and goes on when a discard meets a bad
    /// descriptor. A descriptor that duplicates another's claim on a shared
    /// cluster is beyond these checks: only `check` counts claims, so
    /// open untrusted images with [`crate::OpenOptions::verify`].
    async fn compressed_releasable(
        &mut self,
        host: u64,
        len: u64,
        probe: &mut impl StreamProbe<D, S, K>,
    ) -> Result<bool, Error<D::Error>> {
        let start = host & !511;
        let end = host.saturating_add(len.max(1));
        let (first, last) = (self.geo.cluster_of(start), self.geo.cluster_of(end - 1));
        if last >= self.dev_clusters
            || self.geo.hits_fixed_metadata(start, end - start)
            || self.cache.holds_any(start, end - start)
        {
            return Ok(false);
        }
        let mut frees = false;
        for cluster in first..=last {
            match self.refcount_after_releases(cluster).await? {
                // Nothing to release: the descriptor claims a free cluster.
                0 => return Ok(false),
                1 if self.is_table_cluster(cluster).await? => return Ok(false),
                1 => frees = true,
                _ => {}
            }
        }
        if !frees {
            return Ok(true);
        }
        match probe.decode(self, host, len).await {
            Ok(()) | Err(Error::Unsupported(_)) => Ok(true),
            Err(Error::Corrupt { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether host cluster `cluster` is an L2 table of the active L1 table
    /// or a refcount block: a scan of both tables (the refcount table as
    /// far as it covers the device), paid only by a release that would
    /// free a cluster on a descriptor's word.
    async fn is_table_cluster(&mut self, cluster: u64) -> Result<bool, Error<D::Error>> {
        let host = cluster << self.geo.cluster_bits;
        for i in 0..self.geo.l1_entries {
            let at = self.geo.l1_entry_at(i);
            let raw = self.cache.read_u64(&mut self.dev, at, Kind::L1).await?;
            if L1Entry(raw).l2_offset() == host {
                return Ok(true);
            }
        }
        let covering = (self.dev_clusters >> self.geo.refblock_bits) + 1;
        for i in 0..self.geo.reftable_entries.min(covering) {
            let at = self.geo.reftable_entry_at(i);
            let raw = self
                .cache
                .read_u64(&mut self.dev, at, Kind::RefTable)
                .await?;
            if raw != 0 && raw & !0x1ff == host {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// [`Self::release`] for a cluster of an external data file (`entry`
    /// mapped it at host byte `host`): no refcount to drop (QEMU's
    /// qcow2_free_any_cluster); the cluster is discarded on the data file
    /// at once, as QEMU passes the discard through (it belongs to this
    /// guest cluster alone, so a crash before the entry change is durable
    /// shows zeros or the old data there, never another cluster's). With
    /// `data_file_raw` zeros are written instead, so that the data file
    /// stays a raw image of the disk whatever the device does with a
    /// discard.
    async fn release_external(&mut self, host: u64, entry: L2Entry) -> Result<(), Error<D::Error>> {
        if let L2Entry::Compressed { .. } = entry {
            return Err(Error::corrupt(
                crate::Corruption::CompressedWithDataFile,
                host,
            ));
        }
        let (first, count) = (host / SECTOR as u64, self.geo.cluster_sectors());
        let done = if self.header.data_file_raw() {
            self.dev.data_clear(first, count).await
        } else {
            self.dev.data_discard(first, count).await
        };
        done.map_err(Error::Io)?;
        self.cache.note_device_write();
        Ok(())
    }
}
