//! Write-back order: the one place that decides which metadata reaches the
//! disk before which (`ORDERING.md`, rules 1, 2, 3 and 6).
//!
//! Slices come in two classes, refcount (refcount table and blocks) and
//! mapping (L1 and L2), and there is one order between them: refcount
//! slices before mapping slices, so that an increase is durable before the
//! entries that use the cluster (rule 1; with lazy refcounts the dirty bit
//! covers them instead). Data and zeroed new tables written outside the
//! cache are flushed before any mapping slice (rule 3).
//!
//! Decreases never wait in a refcount slice for the entry change that
//! causes them: a release holds them here instead ([`Cache::hold_release`],
//! a few ranges), and the engine's flush applies them only after the
//! mapping slices are written and flushed (`Engine::flush_metadata`), then
//! writes and flushes them in turn. A freed cluster's refcount reaches zero
//! only once its unmapping is durable (rule 2), so allocation cannot hand
//! it out and the device is not told to discard it before that (rule 6),
//! and allocating and freeing in one batch never wait on each other. Code
//! that decides on a refcount a release may have lowered asks for what it
//! will be ([`Cache::held_decrease`]).

use super::{broken, Cache, SlotStorage};
use crate::{BlockDevice, Error, SECTOR};

/// Refcount decreases held until the entry changes that cause them are
/// durable: one reference less, `times` over, for each of `clusters`
/// clusters from `first`.
#[cfg(feature = "write")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Held {
    pub(crate) first: u64,
    pub(crate) clusters: u32,
    pub(crate) times: u32,
}

impl<S: SlotStorage<K>, const K: usize> Cache<S, K> {
    /// Records a device write outside the cache (guest data, new tables).
    pub(crate) fn note_device_write(&mut self) {
        self.device_unflushed = true;
    }

    /// Writes slot `i` to the device; the caller has handled ordering.
    async fn write_slot<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        i: u32,
    ) -> Result<(), Error<D::Error>> {
        let sectors = self.sectors();
        let s = self.slot(i)?;
        let data = s.data.get(..sectors).ok_or(broken())?;
        dev.write(s.tag / SECTOR as u64, data)
            .await
            .map_err(Error::Io)?;
        self.device_unflushed = true;
        self.clear_dirty(i)
    }

    /// Flushes the device (not the cache): a write barrier.
    pub(crate) async fn flush_device<D: BlockDevice>(
        &mut self,
        dev: &mut D,
    ) -> Result<(), Error<D::Error>> {
        dev.flush().await.map_err(Error::Io)?;
        self.device_unflushed = false;
        Ok(())
    }

    /// Writes back every dirty slice of one class (refcount or mapping).
    async fn write_class<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        refcount: bool,
    ) -> Result<(), Error<D::Error>> {
        for i in 0..self.len() {
            let s = self.slot(i)?;
            if s.dirty && s.kind.is_refcount() == refcount {
                self.write_slot(dev, i).await?;
            }
        }
        Ok(())
    }

    /// Writes back every dirty L1/L2 slice once what they depend on is
    /// durable: the data and zeroed tables they may point at (rule 3), and
    /// the refcount increases (rule 1), except with lazy refcounts, where
    /// the dirty bit covers them.
    async fn write_mapping<D: BlockDevice>(&mut self, dev: &mut D) -> Result<(), Error<D::Error>> {
        if !self.lazy_refcounts {
            self.write_class(dev, true).await?;
        }
        if self.device_unflushed {
            self.flush_device(dev).await?;
        }
        self.write_class(dev, false).await
    }

    /// Writes back every dirty refcount slice (no flush): they hold only
    /// increases and decreases already due, so they never wait.
    pub(crate) async fn write_refcounts<D: BlockDevice>(
        &mut self,
        dev: &mut D,
    ) -> Result<(), Error<D::Error>> {
        self.write_class(dev, true).await
    }

    /// Writes back everything dirty in a crash-safe order, then flushes, then
    /// punches the holes queued by [`Cache::queue_discard`]. Held releases
    /// stay held: the engine applies them after this.
    pub(crate) async fn flush<D: BlockDevice>(
        &mut self,
        dev: &mut D,
    ) -> Result<(), Error<D::Error>> {
        if self.dirty_mapping > 0 {
            // Refcounts first (unless lazy: then they may stay dirty, the
            // dirty bit covering them, until evicted or the image closed).
            self.write_mapping(dev).await?;
        } else if self.dirty_refcount > 0 {
            self.write_refcounts(dev).await?;
        }
        self.flush_device(dev).await?;
        // Nothing durable points at these clusters any more.
        while let Some((first, count)) = self.pending_discard.pop() {
            dev.discard(first, count).await.map_err(Error::Io)?;
        }
        Ok(())
    }

    /// Holds one decrease of the refcount of each of `clusters` clusters
    /// from `first` until the flush after the entry change that causes it
    /// (rules 2 and 6); `false` when the queue is full.
    #[cfg(feature = "write")]
    pub(crate) fn hold_release(&mut self, first: u64, clusters: u32) -> bool {
        if let Some(last) = self.held.last_mut() {
            // The same clusters again (a shared compressed cluster).
            if last.first == first && last.clusters == clusters {
                if let Some(times) = last.times.checked_add(1) {
                    last.times = times;
                    return true;
                }
            }
            // Clusters freed in a row often follow each other.
            if last.times == 1 && last.first + u64::from(last.clusters) == first {
                if let Some(n) = last.clusters.checked_add(clusters) {
                    last.clusters = n;
                    return true;
                }
            }
        }
        self.held
            .push(Held {
                first,
                clusters,
                times: 1,
            })
            .is_ok()
    }

    /// How far held releases will lower the refcount of `cluster`.
    #[cfg(feature = "write")]
    pub(crate) fn held_decrease(&self, cluster: u64) -> u64 {
        self.held
            .iter()
            .filter(|h| cluster >= h.first && cluster - h.first < u64::from(h.clusters))
            .map(|h| u64::from(h.times))
            .sum()
    }

    /// Whether any release is held.
    #[cfg(feature = "write")]
    pub(crate) fn holds_releases(&self) -> bool {
        !self.held.is_empty()
    }

    /// Takes one held release, to apply it (its entry change is durable).
    #[cfg(feature = "write")]
    pub(crate) fn take_release(&mut self) -> Option<Held> {
        self.held.pop()
    }

    /// Queues host sectors `[first, first + count)` of a freed cluster for a
    /// device discard once the change that freed them is durable.
    pub(crate) async fn queue_discard<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        first: u64,
        count: u64,
    ) -> Result<(), Error<D::Error>> {
        // Freed clusters often follow each other: extend the last range.
        if let Some((start, n)) = self.pending_discard.last_mut() {
            if *start + *n == first {
                *n += count;
                return Ok(());
            }
        }
        if self.pending_discard.is_full() {
            self.flush(dev).await?;
        }
        // Room after a flush: it empties the queue.
        self.pending_discard
            .push((first, count))
            .map_err(|_| Error::Internal("discard queue full after a flush"))
    }

    /// Issues the queued discards now if one covers host sectors
    /// `[first, first + count)`, which are about to be handed out again:
    /// a discard still queued from a flush that failed or was cancelled
    /// after the release would otherwise punch the new data. Early is safe:
    /// a discard is queued only once nothing durable points at its cluster.
    pub(crate) async fn discard_before_reuse<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        first: u64,
        count: u64,
    ) -> Result<(), Error<D::Error>> {
        let covered = |&(start, n): &(u64, u64)| start < first + count && first < start + n;
        if !self.pending_discard.iter().any(covered) {
            return Ok(());
        }
        while let Some((start, n)) = self.pending_discard.pop() {
            dev.discard(start, n).await.map_err(Error::Io)?;
        }
        Ok(())
    }

    /// Makes slot `i` clean before it is reused for another slice, writing
    /// it back in order.
    pub(super) async fn clean_for_reuse<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        i: u32,
    ) -> Result<(), Error<D::Error>> {
        let s = self.slot::<D::Error>(i)?;
        if !s.dirty {
            return Ok(());
        }
        if s.kind.is_refcount() {
            self.write_slot(dev, i).await
        } else {
            // One barrier covers every dirty L1/L2 slice: write them all,
            // so the evictions that follow need no flush of their own.
            self.write_mapping(dev).await
        }
    }
}
