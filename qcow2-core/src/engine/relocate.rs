//! Moving a metadata structure the header points at (rule 4): the new copy
//! written (by the caller) and flushed, the header switched in one write and
//! flushed, then the old copy's cached slices dropped and its clusters
//! freed. A crash before the header write leaves the old structure in use
//! and untouched; after it, at most the old clusters leak.
//!
//! The refcount table moves this way when it grows and when a repair
//! rebuilds it; the L1 table (resize) and the snapshot table will.

use crate::cache::SlotStorage;
use crate::engine::Engine;
use crate::{BlockDevice, Error};

/// A structure the header points at, with its new size.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Structure {
    /// The refcount table, `clusters` clusters long.
    RefcountTable { clusters: u32 },
}

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// Switches the image to the copy of `structure` at host byte `offset`,
    /// already written outside the cache: flushes it, points the header at
    /// it (one write, flushed; memory follows the disk), forgets cached
    /// slices of the old copy and, with `free_old`, drops one reference to
    /// each of its clusters. A repair that rebuilt every refcount passes
    /// `false`: its new refcounts never counted the old copy.
    pub(crate) async fn relocate(
        &mut self,
        structure: Structure,
        offset: u64,
        free_old: bool,
    ) -> Result<(), Error<D::Error>> {
        let (old, old_len) = match structure {
            Structure::RefcountTable { .. } => {
                (self.geo.reftable_offset, self.geo.reftable_bytes())
            }
        };
        // Rule 4: the new copy is durable before the header points at it.
        self.cache.flush_device(&mut self.dev).await?;
        match structure {
            Structure::RefcountTable { clusters } => {
                self.update_header(&|h| {
                    h.refcount_table_offset = offset;
                    h.refcount_table_clusters = clusters;
                })
                .await?
            }
        }
        self.cache.forget_range(old, old_len)?;
        if !free_old {
            return Ok(());
        }
        let first = self.geo.cluster_of(old);
        for c in first..first + self.geo.clusters_for(old_len) {
            // Rule 4: nothing points at the old copy any more.
            self.decrement(c, 1).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ram;
    use crate::{CreateOptions, Qcow2, Slot};
    use embassy_futures::block_on;

    /// A refcount table moved by hand: the header follows, the old
    /// cluster is freed, and the image checks clean.
    #[test]
    fn relocating_the_refcount_table_switches_the_header_and_frees_the_old() {
        let mut cache = [const { Slot::<1>::EMPTY }; 8];
        let options = CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::new(8 << 9)
        };
        let mut image = block_on(Qcow2::create(ram(), &mut cache, options)).unwrap();
        let e = &mut image.engine;
        let old = e.geo.reftable_offset;
        let old_cluster = e.geo.cluster_of(old);
        // Copy the table into a fresh cluster, then move it there.
        let new = block_on(e.alloc_cluster()).unwrap();
        block_on(e.cache.flush(&mut e.dev)).unwrap();
        let mut sector = [0u8; 512];
        block_on(e.dev.read(old / 512, core::slice::from_mut(&mut sector))).unwrap();
        block_on(e.dev.write(new / 512, core::slice::from_ref(&sector))).unwrap();
        let structure = Structure::RefcountTable { clusters: 1 };
        block_on(e.relocate(structure, new, true)).unwrap();
        assert_eq!(e.header.refcount_table_offset, new);
        assert_eq!(e.geo.reftable_offset, new);
        assert_eq!(block_on(e.refcount(old_cluster)).unwrap(), 0);
        assert_eq!(block_on(e.refcount(new >> 9)).unwrap(), 1);
        let mut scratch = [0u8; 256];
        let report = block_on(image.check(&mut scratch)).unwrap();
        assert!(report.is_clean(), "{report:?}");
        // What is on disk says the same once reopened.
        let (dev, cache) = block_on(image.close()).unwrap();
        let image = block_on(Qcow2::<_, _, 1>::open(
            dev,
            cache,
            crate::OpenOptions::read_only(),
        ));
        let image = image.map_err(|e| e.error).unwrap();
        assert_eq!(image.header().refcount_table_offset, new);
    }
}
