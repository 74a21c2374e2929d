//! Reading and changing cluster refcounts through the cache.

use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::engine::map::REFCOUNT_BLOCK;
use crate::engine::Engine;
use crate::format::{refcount, MAX_HOST_OFFSET};
use crate::{BlockDevice, Corruption, Error};

/// Low bits of a refcount table entry that must be zero.
const REFTABLE_RESERVED: u64 = 0x1ff;

/// Where the refcount of one cluster is stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RefcountSlot {
    /// Host offset of the cache slice holding the entry, 0 if no block.
    pub slice: u64,
    /// Entry index inside that slice.
    pub index: usize,
}

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// log2 of the refcount entries per cache slice.
    pub(crate) fn refcounts_per_slice_bits(&self) -> u32 {
        // A slice holds at least 512 bytes: 4096 one-bit entries or more.
        self.cache.slice_shift() + 3 - self.geo.refcount_order
    }

    /// Host offset of the refcount block for `cluster`, 0 when the refcount
    /// table has no block there (all its clusters are free).
    pub(crate) async fn refblock_of(&mut self, cluster: u64) -> Result<u64, Error<D::Error>> {
        let index = cluster >> self.geo.refblock_bits;
        if index >= self.geo.reftable_entries {
            return Ok(0);
        }
        let at = self.geo.reftable_entry_at(index);
        if at >= self.dev_clusters << self.geo.cluster_bits {
            // A refcount table past the end of the device (only a read-only
            // or repair open gets here) reads as zeros, as it would in QEMU.
            return Ok(0);
        }
        let raw = self
            .cache
            .read_u64(&mut self.dev, at, Kind::RefTable)
            .await?;
        if raw & REFTABLE_RESERVED != 0 {
            return Err(Error::corrupt(Corruption::RefcountTableReservedBits, at));
        }
        if raw == 0 {
            return Ok(0);
        }
        if raw >= MAX_HOST_OFFSET {
            return Err(Error::corrupt(Corruption::RefcountBlockBeyondLimit, at));
        }
        self.check_cluster(raw, REFCOUNT_BLOCK)?;
        Ok(raw)
    }

    /// Locates the refcount entry of `cluster`.
    pub(crate) async fn refcount_slot(
        &mut self,
        cluster: u64,
    ) -> Result<RefcountSlot, Error<D::Error>> {
        let block = self.refblock_of(cluster).await?;
        let in_block = cluster & (self.geo.refblock_entries - 1);
        let per_slice_bits = self.refcounts_per_slice_bits();
        let index = (in_block & ((1 << per_slice_bits) - 1)) as usize;
        if block == 0 {
            return Ok(RefcountSlot { slice: 0, index });
        }
        let slice = block + ((in_block >> per_slice_bits) << self.cache.slice_shift());
        Ok(RefcountSlot { slice, index })
    }

    /// The refcount of `cluster` (0 where no refcount block exists).
    pub(crate) async fn refcount(&mut self, cluster: u64) -> Result<u64, Error<D::Error>> {
        let loc = self.refcount_slot(cluster).await?;
        if loc.slice == 0 {
            return Ok(0);
        }
        let order = self.geo.refcount_order;
        let bytes = self
            .cache
            .get(&mut self.dev, loc.slice, Kind::RefBlock)
            .await?;
        refcount::get(bytes, order, loc.index)
            .ok_or(Error::Internal("refcount index out of its slice"))
    }

    /// Sets the refcount of `cluster`, whose refcount block must exist.
    pub(crate) async fn set_refcount(
        &mut self,
        cluster: u64,
        value: u64,
    ) -> Result<(), Error<D::Error>> {
        let loc = self.refcount_slot(cluster).await?;
        if loc.slice == 0 {
            return Err(Error::corrupt(
                Corruption::RefcountBlockMissing,
                cluster << self.geo.cluster_bits,
            ));
        }
        let order = self.geo.refcount_order;
        let bytes = self
            .cache
            .get_mut(&mut self.dev, loc.slice, Kind::RefBlock)
            .await?;
        refcount::set(bytes, order, loc.index, value)
            .ok_or(Error::corrupt(Corruption::RefcountOverflow, loc.slice))
    }

    /// Adds one reference to `cluster` (0 -> 1 for an allocation, one more
    /// for another compressed stream packed into it) and returns the new
    /// count. A refcount already at its width's maximum (1 with 1-bit
    /// refcounts) is refused with [`Error::NoSpace`] before anything
    /// changes. Ordering is the cache's: an increase reaches the disk before
    /// any L1/L2 slice (rule 1).
    #[cfg(feature = "write")]
    pub(crate) async fn increment(&mut self, cluster: u64) -> Result<u64, Error<D::Error>> {
        let count = self.refcount(cluster).await?;
        if count >= refcount::max_value(self.geo.refcount_order) {
            return Err(Error::NoSpace);
        }
        self.set_refcount(cluster, count + 1).await?;
        Ok(count + 1)
    }

    /// Drops `times` references to `cluster` and returns what is left; at
    /// zero the cluster is free, and allocation may hand it out at once:
    /// the caller has made durable what stopped referencing it (rules 2
    /// and 6: releases wait in the cache's queue for exactly that). A count
    /// below `times` is corruption (found before anything changes).
    #[cfg(feature = "write")]
    pub(crate) async fn decrement(
        &mut self,
        cluster: u64,
        times: u64,
    ) -> Result<u64, Error<D::Error>> {
        let count = self.refcount(cluster).await?;
        let Some(left) = count.checked_sub(times) else {
            return Err(Error::corrupt(
                Corruption::RefcountUnderflow,
                cluster << self.geo.cluster_bits,
            ));
        };
        self.set_refcount(cluster, left).await?;
        if left == 0 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(left)
    }

    /// The first cluster at or after `start` whose refcount is zero.
    ///
    /// Scans whole cache slices; terminates because refcount coverage is
    /// finite and everything past it is free.
    pub(crate) async fn first_free_from(&mut self, start: u64) -> Result<u64, Error<D::Error>> {
        let order = self.geo.refcount_order;
        let per_slice = 1u64 << self.refcounts_per_slice_bits();
        let mut cluster = start;
        loop {
            let loc = self.refcount_slot(cluster).await?;
            if loc.slice == 0 {
                return Ok(cluster);
            }
            let bytes = self
                .cache
                .get(&mut self.dev, loc.slice, Kind::RefBlock)
                .await?;
            for i in loc.index..per_slice as usize {
                if refcount::get(bytes, order, i) == Some(0) {
                    return Ok(cluster + (i - loc.index) as u64);
                }
            }
            cluster += per_slice - loc.index as u64;
        }
    }
}

#[cfg(test)]
#[cfg(feature = "write")]
mod tests {
    use crate::testing::ram;
    use crate::{CreateOptions, Error, Qcow2, Slot};
    use embassy_futures::block_on;

    /// 1-bit refcounts: a second reference is refused before anything
    /// changes; dropping the one reference frees the cluster.
    #[test]
    fn increments_stop_at_the_width_and_decrements_free_at_zero() {
        let mut cache = [const { Slot::<1>::EMPTY }; 8];
        let options = CreateOptions {
            cluster_bits: 9,
            refcount_order: 0,
            ..CreateOptions::new(8 << 9)
        };
        let mut image = block_on(Qcow2::create(ram(), &mut cache, options)).unwrap();
        let e = &mut image.engine;
        let cluster = block_on(e.alloc_cluster()).unwrap() >> 9;
        assert_eq!(block_on(e.refcount(cluster)).unwrap(), 1);
        assert_eq!(block_on(e.increment(cluster)), Err(Error::NoSpace));
        assert_eq!(block_on(e.refcount(cluster)).unwrap(), 1);
        assert_eq!(block_on(e.decrement(cluster, 1)).unwrap(), 0);
        assert!(e.free_hint <= cluster);
        assert!(matches!(
            block_on(e.decrement(cluster, 1)),
            Err(Error::Corrupt { .. })
        ));
        // Free again: the next allocation takes it.
        assert_eq!(block_on(e.alloc_cluster()).unwrap() >> 9, cluster);
    }
}
