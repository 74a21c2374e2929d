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
        let at = self.geo.reftable_offset + index * 8;
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
