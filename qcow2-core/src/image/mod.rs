//! The open image: [`Qcow2`] with open, read, write, flush and close.

pub mod backing;
#[cfg(feature = "write")]
pub(crate) mod create;
mod decompress;
pub(crate) mod fill;
#[cfg(feature = "write")]
mod free;
mod metadata;
mod open;
mod seek;

pub use open::OpenOptions;
#[cfg(feature = "write")]
pub(crate) use open::Prepare;
#[cfg(feature = "write")]
mod pack;
#[cfg(feature = "write")]
mod plan;
#[cfg(feature = "write")]
mod write;

use core::future::Future;

use crate::cache::SlotStorage;
use crate::codec::{NoWorkspace, Workspace};
use crate::engine::map::Mapping;
use crate::engine::Engine;
use crate::format::{compatible, incompatible, Header, Version};
use crate::image::backing::{Backing, NoBacking};
use crate::image::decompress::decompress;
use crate::image::fill::Target;
use crate::{BlockDevice, Error, Feature, Sector, SECTOR};

/// A summary of an open image, in the terms `qemu-img info` uses.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Format version.
    pub version: Version,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Whether the lazy refcounts compatible feature is set.
    pub lazy_refcounts: bool,
    /// Whether the corrupt bit is set.
    pub corrupt: bool,
    /// Whether the dirty bit is set.
    pub dirty: bool,
    /// Whether the image was opened read-only.
    pub read_only: bool,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// Compression type (0 zlib, 1 zstd).
    pub compression_type: u8,
}

/// An open qcow2 image on device `D`, with metadata cache storage `S` of
/// slices of `K` sectors.
///
/// `Qcow2` is itself a [`BlockDevice`], so images stack: `B` is the backing
/// device unallocated clusters read from (none by default, see
/// [`Qcow2::with_backing`]) and `W` the working memory lent for compressed
/// clusters and copy-on-write (none by default, see
/// [`Qcow2::with_workspace`]).
pub struct Qcow2<D, S, const K: usize = 1, B = NoBacking<D>, W = NoWorkspace> {
    /// The metadata, on the image file and its data file.
    pub(crate) engine: Engine<D, S, K>,
    pub(crate) backing: B,
    pub(crate) ws: W,
    /// The header names a backing file and the image was not opened with
    /// [`OpenOptions::no_backing`]: unallocated clusters are not zeros.
    pub(crate) names_backing: bool,
    /// A backing device was attached ([`Qcow2::with_backing`]).
    pub(crate) backing_attached: bool,
}

impl<D, S, const K: usize, B, W> Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    B: Backing<D::Error>,
    W: Workspace,
{
    /// The image reading its unallocated clusters from `backing` (any
    /// [`BlockDevice`]: a raw device, another image). Reads past the
    /// backing's end are zeros. The backing is only ever read; open it
    /// read-only. Any backing attached before is dropped.
    pub fn with_backing<B2: Backing<D::Error>>(self, backing: B2) -> Qcow2<D, S, K, B2, W> {
        self.rebuilt(backing, true)
    }

    /// The image with backing type `B2` but no backing attached yet:
    /// `placeholder` (an empty device) stands in, and an image that names
    /// a backing file keeps refusing what needs it until
    /// [`Qcow2::with_backing`]. For callers that hold images of one type
    /// whether or not they have a backing.
    pub fn with_unattached_backing<B2: Backing<D::Error>>(
        self,
        placeholder: B2,
    ) -> Qcow2<D, S, K, B2, W> {
        self.rebuilt(placeholder, false)
    }

    /// The image with `backing` in place of its backing.
    fn rebuilt<B2: Backing<D::Error>>(self, backing: B2, attached: bool) -> Qcow2<D, S, K, B2, W> {
        Qcow2 {
            engine: self.engine,
            backing,
            ws: self.ws,
            names_backing: self.names_backing,
            backing_attached: attached,
        }
    }

    /// The image using `workspace` as working memory (see
    /// [`crate::codec`]): needed to read compressed clusters, and makes
    /// copy-on-write faster. Any workspace lent before is dropped.
    pub fn with_workspace<W2: Workspace>(self, workspace: W2) -> Qcow2<D, S, K, B, W2> {
        Qcow2 {
            engine: self.engine,
            backing: self.backing,
            ws: workspace,
            names_backing: self.names_backing,
            backing_attached: self.backing_attached,
        }
    }

    /// The backing device.
    pub fn backing(&self) -> &B {
        &self.backing
    }

    /// The workspace.
    pub fn workspace_mut(&mut self) -> &mut W {
        &mut self.ws
    }

    /// A summary of the image.
    pub fn info(&self) -> ImageInfo {
        let h = &self.engine.header;
        ImageInfo {
            virtual_size: self.virtual_size(),
            cluster_size: h.cluster_size(),
            version: h.version,
            refcount_bits: 1 << h.refcount_order,
            lazy_refcounts: h.compatible_features & compatible::LAZY_REFCOUNTS != 0,
            corrupt: h.incompatible_features & incompatible::CORRUPT != 0,
            dirty: h.incompatible_features & incompatible::DIRTY != 0,
            read_only: self.engine.read_only,
            snapshots: h.nb_snapshots,
            compression_type: h.compression_type,
        }
    }

    /// The decoded header as it is on disk now.
    pub fn header(&self) -> &Header {
        &self.engine.header
    }

    /// Virtual disk size in bytes: the header's size rounded down to a
    /// whole sector, as QEMU presents it.
    pub fn virtual_size(&self) -> u64 {
        self.engine.geo.sectors * SECTOR as u64
    }

    /// The underlying device.
    pub fn device(&self) -> &D {
        &self.engine.dev.meta
    }

    /// The underlying device, mutably: for device-specific controls (power,
    /// statistics). Writing to it behind the image's back corrupts the image.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.engine.dev.meta
    }

    pub(crate) fn check_range(&self, first: u64, count: u64) -> Result<(), Error<D::Error>> {
        match first.checked_add(count) {
            Some(end) if end <= self.engine.geo.sectors => Ok(()),
            _ => Err(Error::OutOfRange),
        }
    }

    /// Reads `buf.len()` sectors of the virtual disk from sector `first`.
    ///
    /// Cancelled, it leaves the image as it was (cached metadata it wrote
    /// back on the way went out in order).
    pub async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), Error<D::Error>> {
        self.check_range(first, buf.len() as u64)?;
        self.engine.require_data_file()?;
        let mut sector = first;
        let mut rest = buf;
        while !rest.is_empty() {
            let (mapping, run) = self.engine.map_run(sector, rest.len() as u64).await?;
            // `run` never exceeds the requested length.
            let (now, later) = rest
                .split_at_mut_checked(run as usize)
                .ok_or(Error::Internal("mapped run longer than the request"))?;
            match mapping {
                Mapping::Unallocated => self.read_backing(sector, now).await?,
                Mapping::Zero => now.fill([0; SECTOR]),
                Mapping::Data { host } => {
                    self.engine
                        .dev
                        .data_read(host / SECTOR as u64, now)
                        .await
                        .map_err(Error::Io)?;
                }
                Mapping::Compressed { host, len } => {
                    let within = sector & (self.engine.geo.cluster_sectors() - 1);
                    let target = Target::Caller {
                        first: within,
                        out: now,
                    };
                    decompress(&mut self.engine, &mut self.ws, host, len, target).await?;
                }
            }
            sector += run;
            rest = later;
        }
        Ok(())
    }

    #[cfg(feature = "write")]
    /// Writes `buf.len()` sectors to the virtual disk from sector `first`.
    ///
    /// Not durable until [`Qcow2::flush`]. Corruption detected on the way
    /// marks the image corrupt (it then opens read-only until repaired).
    ///
    /// Cancelled (the future dropped), it leaves at most leaked clusters on
    /// the device, and part of `buf` written; drop or abandon the image
    /// (see `ORDERING.md`, Cancellation).
    pub async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), Error<D::Error>> {
        self.begin_change(first, buf.len() as u64).await?;
        let result = self.write_batched(first, buf).await;
        self.end_change(result).await
    }

    #[cfg(feature = "write")]
    /// What every guest-visible change checks first: writable, in range,
    /// not marked corrupt; with lazy refcounts the dirty bit set durably.
    pub(crate) async fn begin_change(
        &mut self,
        first: u64,
        count: u64,
    ) -> Result<(), Error<D::Error>> {
        if self.engine.read_only {
            return Err(Error::ReadOnly);
        }
        self.check_range(first, count)?;
        self.require_backing()?;
        self.engine.require_data_file()?;
        if self.engine.header.incompatible_features & incompatible::CORRUPT != 0 {
            return Err(Error::corrupt(
                crate::Corruption::ChangeWhileMarkedCorrupt,
                0,
            ));
        }
        if self.engine.refcounts_stale {
            // Allocating from stale refcounts would overwrite live data.
            return Err(Error::NeedsRepair);
        }
        if self.engine.lazy && self.engine.header.incompatible_features & incompatible::DIRTY == 0 {
            // Durable before the first metadata write that may skip ordering (rule 5).
            self.engine.set_incompatible(incompatible::DIRTY).await?;
        }
        Ok(())
    }

    #[cfg(feature = "write")]
    /// Marks the image corrupt when a change found corruption.
    pub(crate) async fn end_change(
        &mut self,
        result: Result<(), Error<D::Error>>,
    ) -> Result<(), Error<D::Error>> {
        if let Err(Error::Corrupt { what, offset }) = result {
            warn!(
                "qcow2: {} (host offset {=u64:#x}): image marked corrupt",
                what, offset
            );
            self.engine.mark_corrupt().await;
        }
        result
    }

    /// Makes every earlier write durable, metadata in crash-safe order.
    ///
    /// Fails on an image found corrupt while writing: what was written
    /// since the last flush is then not durable.
    ///
    /// Cancelled, earlier writes are durable or not, consistently: at most
    /// leaked clusters.
    pub fn flush(&mut self) -> impl Future<Output = Result<(), Error<D::Error>>> + '_ {
        self.engine.flush()
    }

    /// Does what [`Qcow2::close`] does (flush, then clear the dirty bit of
    /// lazy refcounts) but keeps the image open; a later write sets the
    /// dirty bit again. A dirty image opened for repair keeps its dirty bit
    /// unless a full repair succeeded: its refcounts may still be stale.
    ///
    /// Cancelled, as [`Qcow2::flush`]; the dirty bit may stay set.
    pub fn finish(&mut self) -> impl Future<Output = Result<(), Error<D::Error>>> + '_ {
        self.engine.finish()
    }

    /// Gives up the image without flushing, returning the device and cache
    /// storage: unflushed metadata is lost, as in a crash. For error paths
    /// where the device failed and for crash tests.
    pub fn abandon(self) -> (D, S) {
        (self.engine.dev.meta, self.engine.cache.into_slots())
    }

    /// Flushes and closes the image, returning the device and cache storage.
    /// A clean close clears the dirty bit of lazy refcounts.
    ///
    /// Cancelled, as [`Qcow2::finish`]; the device is dropped with it.
    pub fn close(self) -> impl core::future::Future<Output = Result<(D, S), Error<D::Error>>> {
        // Not an `async fn`: its argument would be stored in the future and
        // then moved into a second slot for `mut self` (the image twice).
        let mut image = self;
        async move {
            image.finish().await?;
            Ok((image.engine.dev.meta, image.engine.cache.into_slots()))
        }
    }
}

impl<D, S, const K: usize, B, W> BlockDevice for Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    B: Backing<D::Error>,
    W: Workspace,
{
    type Error = Error<D::Error>;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), Self::Error> {
        Qcow2::read(self, first, buf).await
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), Self::Error> {
        #[cfg(feature = "write")]
        return Qcow2::write(self, first, buf).await;
        #[cfg(not(feature = "write"))]
        return {
            let _ = (first, buf);
            Err(Error::ReadOnly)
        };
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        Qcow2::flush(self).await
    }

    fn sector_count(&self) -> u64 {
        self.engine.geo.sectors
    }

    async fn set_sector_count(&mut self, _n: u64) -> Result<(), Self::Error> {
        Err(Error::Unsupported(Feature::Resize))
    }

    #[cfg(feature = "write")]
    async fn write_zeros(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        Qcow2::write_zeroes(self, first, count, false).await
    }

    #[cfg(feature = "write")]
    async fn discard(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        Qcow2::discard(self, first, count).await
    }

    async fn is_zeroed(&mut self, first: u64, count: u64) -> Result<bool, Self::Error> {
        Qcow2::is_zeroed(self, first, count).await
    }
}
