//! The metadata engine: everything below the guest view that reads and
//! changes the image's metadata (mapping, refcounts, allocation, release,
//! header updates; `check` and repair add to it), knowing nothing of
//! backing files or decoders.
//!
//! [`Engine`] owns the devices, the decoded header and the geometry derived
//! from it, the metadata cache and the allocator's state. The guest view
//! ([`crate::Qcow2`]) holds one, beside its backing and its workspace.

#[cfg(feature = "write")]
pub(crate) mod alloc;
pub(crate) mod data;
pub(crate) mod extent;
pub(crate) mod geometry;
pub(crate) mod header_io;
pub(crate) mod map;
mod names;
#[cfg(feature = "check")]
pub(crate) mod refcount;
#[cfg(feature = "write")]
pub(crate) mod release;
#[cfg(feature = "write")]
pub(crate) mod relocate;
#[cfg(feature = "write")]
pub(crate) mod tables;
#[cfg(feature = "check")]
pub(crate) mod visit;

use crate::cache::{Cache, SlotStorage};
#[cfg(feature = "write")]
use crate::format::incompatible;
use crate::format::{Extension, Header};
use crate::{BlockDevice, Corruption, Error, Sector, SECTOR};
use data::Devices;
use geometry::Geometry;

/// The image's metadata on its device(s): what every layer above reads and
/// changes through.
pub(crate) struct Engine<D, S, const K: usize> {
    /// The image file, and the external data file when attached.
    pub(crate) dev: Devices<D>,
    pub(crate) cache: Cache<S, K>,
    pub(crate) geo: Geometry,
    /// The header as it is on disk (changed only by
    /// [`Engine::update_header`] and the open).
    pub(crate) header: Header,
    pub(crate) read_only: bool,
    /// Refcount updates may reach the disk after the L2 entries that need
    /// them, covered by the dirty bit (lazy refcounts).
    pub(crate) lazy: bool,
    /// Corruption was found while writing: the image is now read-only.
    pub(crate) corrupt_detected: bool,
    /// Opened for repair while dirty: the refcounts may be stale until a
    /// full repair succeeds. Guest changes are refused and the dirty bit
    /// stays set until then (rule 5).
    pub(crate) refcounts_stale: bool,
    /// The persistent bitmaps extension, when consistent (read-only use).
    pub(crate) bitmaps: Option<Extension>,
    /// Cluster index where the search for free clusters starts.
    pub(crate) free_hint: u64,
    /// Device size in whole clusters, as far as this image has grown it.
    pub(crate) dev_clusters: u64,
    pub(crate) scratch: Sector,
    /// Host byte where the next compressed cluster is packed, 0 for a
    /// fresh host cluster.
    pub(crate) pack_next: u64,
}

/// How an open leaves the engine it builds.
#[derive(Clone, Copy)]
pub(crate) struct EngineMode {
    pub(crate) read_only: bool,
    pub(crate) lazy: bool,
    /// See [`Engine::refcounts_stale`].
    pub(crate) refcounts_stale: bool,
    /// Host cluster allocation starts at; `None`: the device's end.
    pub(crate) free_hint: Option<u64>,
}

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// The engine over `dev` with the `header` just read. Inlined, so that
    /// it is built where the open's future keeps it rather than on the
    /// stack.
    #[inline(always)]
    pub(crate) fn new(
        dev: D,
        cache: Cache<S, K>,
        header: Header,
        bitmaps: Option<Extension>,
        mode: EngineMode,
    ) -> Self {
        let geo = Geometry::new(&header);
        let dev_bytes = dev.sector_count().saturating_mul(SECTOR as u64);
        let dev_clusters = geo.clusters_for(dev_bytes);
        Engine {
            dev: Devices::new(dev),
            cache,
            geo,
            header,
            read_only: mode.read_only,
            lazy: mode.lazy,
            corrupt_detected: false,
            refcounts_stale: mode.refcounts_stale,
            bitmaps,
            free_hint: mode.free_hint.unwrap_or(dev_clusters),
            dev_clusters,
            scratch: [0; SECTOR],
            pack_next: 0,
        }
    }

    /// Makes every earlier change durable, metadata in crash-safe order.
    pub(crate) async fn flush(&mut self) -> Result<(), Error<D::Error>> {
        if self.corrupt_detected {
            return Err(Error::corrupt(Corruption::WritesDropped, 0));
        }
        if self.read_only {
            return Ok(());
        }
        self.flush_metadata().await
    }

    /// The flush cycle: the cache written back in crash-safe order and
    /// flushed (refcount increases, flush, L1/L2, flush); then, when
    /// releases are held, their decreases applied, now that the entry
    /// changes behind them are durable (rules 2 and 6), written and
    /// flushed, and the freed clusters discarded.
    pub(crate) async fn flush_metadata(&mut self) -> Result<(), Error<D::Error>> {
        self.cache.flush(&mut self.dev).await?;
        #[cfg(feature = "write")]
        if self.cache.holds_releases() {
            self.apply_releases().await?;
            self.cache.flush(&mut self.dev).await?;
        }
        Ok(())
    }

    /// Applies held releases (a flush cycle) when there are any, so that
    /// refcounts read from the cache agree with the entries in it: before
    /// a check counts references or a repair changes refcounts.
    #[cfg(feature = "check")]
    pub(crate) async fn settle_releases(&mut self) -> Result<(), Error<D::Error>> {
        #[cfg(feature = "write")]
        if self.cache.holds_releases() && !self.read_only {
            self.flush_metadata().await?;
        }
        Ok(())
    }

    /// Flushes, then clears the dirty bit of lazy refcounts unless the
    /// refcounts may be stale.
    pub(crate) async fn finish(&mut self) -> Result<(), Error<D::Error>> {
        self.flush().await?;
        #[cfg(feature = "write")]
        if !self.read_only && !self.refcounts_stale {
            self.clear_incompatible(incompatible::DIRTY).await?;
        }
        Ok(())
    }

    /// Rewrites the header with `change` applied and flushes; then, and only
    /// then, applies it in memory and re-derives the geometry, so memory
    /// never runs ahead of the disk (on failure it keeps the old header, as
    /// the disk may). `change` runs twice (on the copy written and on the
    /// header kept) and must do the same both times. Metadata a structure
    /// switch depends on must be durable before (rule 4: the caller
    /// flushes).
    pub(crate) async fn update_header(
        &mut self,
        change: &dyn Fn(&mut Header),
    ) -> Result<(), Error<D::Error>> {
        // Read-modify-write of sector 0 (extensions follow the header),
        // inline rather than through `header_io`: a smaller future on the
        // write path, whose first write may set the dirty bit.
        let sector = core::slice::from_mut(&mut self.scratch);
        self.dev.read(0, sector).await.map_err(Error::Io)?;
        let mut header = self.header;
        change(&mut header);
        header
            .encode(&mut self.scratch)
            .ok_or(Error::Internal("header does not fit its sector"))?;
        self.dev
            .write(0, core::slice::from_ref(&self.scratch))
            .await
            .map_err(Error::Io)?;
        self.cache.flush_device(&mut self.dev).await?;
        change(&mut self.header);
        self.geo = Geometry::new(&self.header);
        Ok(())
    }

    #[cfg(feature = "write")]
    /// Sets incompatible feature bits in the header, durably (v3 only).
    pub(crate) async fn set_incompatible(&mut self, bits: u64) -> Result<(), Error<D::Error>> {
        if !self.geo.v3 || self.header.incompatible_features & bits == bits {
            return Ok(());
        }
        self.update_header(&|h| h.incompatible_features |= bits)
            .await
    }

    /// Clears incompatible feature bits in the header, durably, after
    /// flushing what they covered.
    pub(crate) async fn clear_incompatible(&mut self, bits: u64) -> Result<(), Error<D::Error>> {
        if self.header.incompatible_features & bits == 0 {
            return Ok(());
        }
        self.flush().await?;
        self.update_header(&|h| h.incompatible_features &= !bits)
            .await
    }

    #[cfg(feature = "write")]
    /// Records detected corruption: sets the corrupt bit (best effort) and
    /// stops all further writes.
    pub(crate) async fn mark_corrupt(&mut self) {
        // Metadata in the cache may be wrong now: it is never written.
        let _ = self.set_incompatible(incompatible::CORRUPT).await;
        self.read_only = true;
        self.corrupt_detected = true;
    }
}
