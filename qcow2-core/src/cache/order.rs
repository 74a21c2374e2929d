//! Write-back order: the one place that decides which metadata reaches the
//! disk before which (`ORDERING.md`, rules 1, 2, 3 and 6).
//!
//! Slices come in two classes, refcount (refcount table and blocks) and
//! mapping (L1 and L2). Allocation needs refcount increases durable before
//! the entries that use the cluster; freeing needs entry removals durable
//! before the refcount decreases. [`Order`] says which of the two holds
//! now; switching makes everything pending durable first, so the two
//! directions never wait on each other. Data and zeroed new tables written
//! outside the cache are always flushed before any mapping slice.

use super::{broken, Cache, SlotStorage};
use crate::{BlockDevice, Error, SECTOR};

/// Which class of dirty slices must be durable before the other class may
/// be written (`ORDERING.md` rules 1, 2 and 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Refcount increases before the L1/L2 entries that use the clusters
    /// (allocation).
    RefcountsFirst,
    /// L1/L2 entry removals before the refcount decreases (freeing).
    MappingFirst,
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
        let mapping = !s.kind.is_refcount();
        dev.write(s.tag / SECTOR as u64, data)
            .await
            .map_err(Error::Io)?;
        self.device_unflushed = true;
        self.mapping_unflushed |= mapping;
        self.clear_dirty(i)
    }

    /// Flushes the device (not the cache): a write barrier.
    pub(crate) async fn flush_device<D: BlockDevice>(
        &mut self,
        dev: &mut D,
    ) -> Result<(), Error<D::Error>> {
        dev.flush().await.map_err(Error::Io)?;
        self.device_unflushed = false;
        self.mapping_unflushed = false;
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
    /// durable: the data and zeroed tables they may point at (always), and
    /// under [`Order::RefcountsFirst`] the refcount increases (rule 1),
    /// except with lazy refcounts, where the dirty bit covers them.
    async fn write_mapping<D: BlockDevice>(&mut self, dev: &mut D) -> Result<(), Error<D::Error>> {
        if self.order == Order::RefcountsFirst && !self.lazy_refcounts {
            self.write_class(dev, true).await?;
        }
        if self.device_unflushed {
            self.flush_device(dev).await?;
        }
        self.write_class(dev, false).await
    }

    /// Makes refcount slices safe to write: under [`Order::MappingFirst`]
    /// every L1/L2 change (entry removals, rule 2) is durable first.
    async fn order_before_refcounts<D: BlockDevice>(
        &mut self,
        dev: &mut D,
    ) -> Result<(), Error<D::Error>> {
        if self.order == Order::MappingFirst {
            if self.dirty_mapping > 0 {
                self.write_mapping(dev).await?;
            }
            if self.mapping_unflushed {
                self.flush_device(dev).await?;
            }
        }
        Ok(())
    }

    /// Writes back every dirty refcount slice (no flush), in order.
    pub(crate) async fn write_refcounts<D: BlockDevice>(
        &mut self,
        dev: &mut D,
    ) -> Result<(), Error<D::Error>> {
        self.order_before_refcounts(dev).await?;
        self.write_class(dev, true).await
    }

    /// Writes back everything dirty in a crash-safe order, then flushes, then
    /// punches the holes queued by [`Cache::queue_discard`].
    pub(crate) async fn flush<D: BlockDevice>(
        &mut self,
        dev: &mut D,
    ) -> Result<(), Error<D::Error>> {
        match self.order {
            // Lazy refcounts: refcount slices may stay dirty (the dirty bit
            // covers them) until evicted or the image is closed.
            Order::RefcountsFirst if self.dirty_mapping > 0 => self.write_mapping(dev).await?,
            _ => {
                if self.dirty_refcount > 0 {
                    self.write_refcounts(dev).await?;
                }
                if self.dirty_mapping > 0 {
                    self.write_mapping(dev).await?;
                }
            }
        }
        self.flush_device(dev).await?;
        // Nothing durable points at these clusters any more.
        while let Some((first, count)) = self.pending_discard.pop() {
            dev.discard(first, count).await.map_err(Error::Io)?;
        }
        Ok(())
    }

    /// Declares the order the next metadata changes need (`ORDERING.md`
    /// rules 1, 2 and 6): [`Order::RefcountsFirst`] before allocating,
    /// [`Order::MappingFirst`] before a refcount decrease. Switching
    /// direction first makes everything pending durable in the old order,
    /// so the two directions never wait on each other, and a freed cluster
    /// is never handed out again before the change that freed it is durable.
    pub(crate) async fn require<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        order: Order,
    ) -> Result<(), Error<D::Error>> {
        if self.order == order {
            return Ok(());
        }
        if self.dirty_mapping > 0
            || self.dirty_refcount > 0
            || self.device_unflushed
            || !self.pending_discard.is_empty()
        {
            self.flush(dev).await?;
        }
        self.order = order;
        Ok(())
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
            self.order_before_refcounts(dev).await?;
            self.write_slot(dev, i).await
        } else {
            // One barrier covers every dirty L1/L2 slice: write them all,
            // so the evictions that follow need no flush of their own.
            self.write_mapping(dev).await
        }
    }
}
