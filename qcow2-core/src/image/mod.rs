//! The open image: [`Qcow2`] with open, read, write, flush and close.

pub mod backing;
#[cfg(feature = "write")]
pub(crate) mod create;
mod decompress;
pub(crate) mod fill;
#[cfg(feature = "write")]
mod free;
mod metadata;
#[cfg(feature = "write")]
mod pack;
#[cfg(feature = "write")]
mod write;

use core::future::Future;
use core::pin::pin;

use crate::cache::{Cache, Slot};
#[cfg(feature = "write")]
use crate::check::Repair;
use crate::codec::{NoWorkspace, Workspace};
use crate::engine::geometry::Geometry;
use crate::engine::header_io;
use crate::engine::map::Mapping;
use crate::engine::{Engine, EngineMode};
use crate::format::{autoclear, compatible, incompatible, Header, Version};
use crate::image::backing::{Backing, NoBacking};
use crate::image::decompress::decompress;
use crate::image::fill::Target;
use crate::outline::OutOfLine;
use crate::{BlockDevice, Error, OpenError, Sector, SECTOR};

/// [`Prepare::prepare`]'s result for "allocate from the device's end" (a
/// plain value rather than an `Option`: smaller futures).
pub(crate) const DEVICE_END: u64 = u64::MAX;

/// What an open does to the device before it reads the header: nothing
/// (`()`: an existing image), or format it (create).
pub(crate) trait Prepare<D: BlockDevice> {
    /// Prepares `dev`; returns the host cluster allocation starts at, or
    /// [`DEVICE_END`].
    async fn prepare(self, dev: &mut D) -> Result<u64, Error<D::Error>>;
}

impl<D: BlockDevice> Prepare<D> for () {
    async fn prepare(self, _dev: &mut D) -> Result<u64, Error<D::Error>> {
        Ok(DEVICE_END)
    }
}

/// How to open an image.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Refuse every write and never modify the device.
    pub read_only: bool,
    /// Open read-write for [`Qcow2::repair`]: accepted even when the image
    /// is marked corrupt (guest writes stay refused until the repair clears
    /// the mark), and a dirty image is left for the repair to rebuild:
    /// until `repair(Repair::All)` succeeds, its refcounts may be stale, so
    /// guest changes fail with [`Error::NeedsRepair`] and closing keeps the
    /// dirty bit (the next read-write open rebuilds).
    pub for_repair: bool,
    /// Before allowing writes, run a full [`Qcow2::check`] (cost grows with
    /// the metadata) and refuse an image with any corruption. Without it,
    /// in-place writes are checked against the header, L1 table, refcount
    /// table, self-covering refcount blocks and every cached table slice,
    /// but a hostile L2 entry can still point at an uncached L2 table or
    /// refcount block. Use it for images from untrusted sources.
    pub verify: bool,
    /// Open an image that names a backing file as if it had none:
    /// unallocated clusters read as zeros, as QEMU does when it opens an
    /// image without its backing (`qemu-img info`, `rebase -u`). Without
    /// it, such an image reads and writes guest data only once its backing
    /// is attached ([`Qcow2::with_backing`]).
    pub no_backing: bool,
}

impl OpenOptions {
    /// Read-write opening.
    pub const fn read_write() -> Self {
        OpenOptions {
            read_only: false,
            for_repair: false,
            verify: false,
            no_backing: false,
        }
    }

    /// Read-only opening.
    pub const fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            for_repair: false,
            verify: false,
            no_backing: false,
        }
    }

    /// Read-write opening that first verifies the image (see
    /// [`OpenOptions::verify`]).
    pub const fn verified() -> Self {
        OpenOptions {
            read_only: false,
            for_repair: false,
            verify: true,
            no_backing: false,
        }
    }

    /// These options, ignoring the image's backing file (see
    /// [`OpenOptions::no_backing`]).
    pub const fn without_backing(self) -> Self {
        OpenOptions {
            no_backing: true,
            ..self
        }
    }

    /// Read-write opening for a repair (see [`OpenOptions::for_repair`]).
    pub const fn repair() -> Self {
        OpenOptions {
            read_only: false,
            for_repair: true,
            verify: false,
            no_backing: false,
        }
    }
}

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

impl<D, S, const K: usize> Qcow2<D, S, K>
where
    D: BlockDevice,
    S: AsMut<[Slot<K>]> + AsRef<[Slot<K>]>,
{
    /// Opens the image on `dev`, using `cache` for metadata.
    ///
    /// Costs a constant number of reads whatever the image size, except for
    /// a read-write open of a dirty image (lazy refcounts after a crash),
    /// whose refcounts are rebuilt first; this uses a small internal scratch
    /// buffer and may take many passes: see [`Qcow2::open_with_scratch`].
    ///
    /// On failure the device and cache come back in the [`OpenError`].
    /// Cancelled (dropped before completion), it leaves the image as a
    /// crash at that point would: at most leaked clusters, which a later
    /// read-write open or repair reclaims.
    pub fn open(
        dev: D,
        cache: S,
        options: OpenOptions,
    ) -> impl Future<Output = Result<Self, OpenError<D, S>>> + use<D, S, K> {
        // 128 host clusters per rebuild pass: small, so that this future
        // stays under 4 KiB on firmware; more passes on larger images.
        Self::open_from(dev, cache, options, [0u8; 512], ())
    }

    /// Opens the image like [`Qcow2::open`], using `rebuild_scratch` (4 bytes
    /// per host cluster and pass) should a dirty image need its refcounts
    /// rebuilt.
    pub fn open_with_scratch<'a>(
        dev: D,
        cache: S,
        options: OpenOptions,
        rebuild_scratch: &'a mut [u8],
    ) -> impl Future<Output = Result<Self, OpenError<D, S>>> + use<'a, D, S, K> {
        Self::open_from(dev, cache, options, rebuild_scratch, ())
    }

    /// Opens the image on `dev` once `prepare` has run on it (create
    /// formats it there; its result is the host cluster allocation starts
    /// at, [`DEVICE_END`] for the device's end); `rebuild_scratch` serves a
    /// dirty image's refcount rebuild.
    ///
    /// Not an `async fn` (it would store its arguments twice), and every
    /// step that does I/O is polled out of line through `&mut D`: the
    /// device's size reaches this future only through the argument's slot
    /// and the image's, and the stack of its poll only through the image
    /// it returns, never the deep frames of formatting, reading the header
    /// or rebuilding refcounts. Only the image (and its settling) is live
    /// across the last await, so the earlier steps share its space.
    pub(crate) fn open_from<R, P>(
        dev: D,
        cache: S,
        options: OpenOptions,
        mut rebuild_scratch: R,
        prepare: P,
    ) -> impl Future<Output = Result<Self, OpenError<D, S>>> + use<R, P, D, S, K>
    where
        R: AsMut<[u8]>,
        P: Prepare<D>,
    {
        let mut dev = dev;
        async move {
            let prepared = {
                let prepare = pin!(prepare.prepare(&mut dev));
                OutOfLine(prepare).await
            };
            let free_hint = match prepared {
                Ok(hint) => hint,
                Err(error) => {
                    return Err(OpenError {
                        error,
                        device: dev,
                        cache,
                    })
                }
            };
            let read = {
                let read = pin!(Self::header_of(&mut dev, options));
                OutOfLine(read).await
            };
            let (header, bitmaps) = match read {
                Ok(header) => header,
                Err(error) => {
                    return Err(OpenError {
                        error,
                        device: dev,
                        cache,
                    })
                }
            };
            let lazy = !options.read_only
                && header.version == Version::V3
                && header.compatible_features & compatible::LAZY_REFCOUNTS != 0;
            let cache = match Cache::new(cache, header.cluster_size(), lazy) {
                Ok(cache) => cache,
                Err((error, cache)) => {
                    return Err(OpenError {
                        error,
                        device: dev,
                        cache,
                    })
                }
            };
            // Nothing borrowed is live across the await below but the
            // image: what is stored in this future is the image and the
            // settle future, next to the device's own slot.
            let mut image = Self::assemble(dev, cache, header, bitmaps, options, lazy, free_hint);
            let settled = {
                let settle = pin!(image.settle(options, rebuild_scratch.as_mut()));
                OutOfLine(settle).await
            };
            if let Err(error) = settled {
                // Not `abandon`: it would take a copy of the image.
                return Err(OpenError {
                    error,
                    device: image.engine.dev.meta,
                    cache: image.engine.cache.into_slots(),
                });
            }
            Ok(image)
        }
    }

    /// The image on `dev` with the `header` just read (before
    /// [`Qcow2::settle`]); see [`Qcow2::open_from`] for `free_hint`.
    /// Inlined, so that the image is built where the open's future keeps
    /// it rather than on the stack.
    #[inline(always)]
    fn assemble(
        dev: D,
        cache: Cache<S, K>,
        header: Header,
        bitmaps: Option<crate::format::Extension>,
        options: OpenOptions,
        lazy: bool,
        free_hint: u64,
    ) -> Self {
        let mode = EngineMode {
            read_only: options.read_only,
            lazy,
            refcounts_stale: options.for_repair
                && header.incompatible_features & incompatible::DIRTY != 0,
            free_hint: (free_hint != DEVICE_END).then_some(free_hint),
        };
        // Valid only while the autoclear bit says so.
        let bitmaps = bitmaps.filter(|_| header.autoclear_features & autoclear::BITMAPS != 0);
        Qcow2 {
            engine: Engine::new(dev, cache, header, bitmaps, mode),
            backing: NoBacking::new(),
            ws: NoWorkspace::default(),
            names_backing: header.has_backing_file() && !options.no_backing,
            backing_attached: false,
        }
    }

    /// [`Qcow2::read_header`] with a sector of scratch in its own future
    /// (the image has its own, built after).
    async fn header_of(
        dev: &mut D,
        options: OpenOptions,
    ) -> Result<(Header, Option<crate::format::Extension>), Error<D::Error>> {
        let mut scratch = [0u8; SECTOR];
        Self::read_header(dev, &mut scratch, options).await
    }

    /// Reads and validates the header and its extensions, refusing what
    /// `options` cannot open; declares unknown autoclear features stale
    /// (on disk) for a read-write open.
    async fn read_header(
        dev: &mut D,
        scratch: &mut Sector,
        options: OpenOptions,
    ) -> Result<(Header, Option<crate::format::Extension>), Error<D::Error>> {
        if dev.sector_count() == 0 {
            return Err(Error::NotQcow2);
        }
        dev.read(0, core::slice::from_mut(scratch))
            .await
            .map_err(Error::Io)?;
        let mut header = Header::decode(scratch)?;
        header.validate()?;
        let bitmaps = header_io::check_extensions(dev, scratch, &header).await?;

        let geo = Geometry::new(&header);
        let dev_bytes = dev.sector_count().saturating_mul(SECTOR as u64);
        if geo.l1_entries > 0 && geo.l1_offset + geo.l1_entries * 8 > dev_bytes {
            return Err(Error::corrupt(
                "L1 table beyond the end of the image",
                geo.l1_offset,
            ));
        }
        if options.read_only {
            return Ok((header, bitmaps));
        }
        if cfg!(not(feature = "write")) {
            return Err(Error::Unsupported(
                "writing (qcow2-core was built without its `write` feature)",
            ));
        }
        if !options.for_repair {
            // Reads never use the refcount table, and a repair rebuilds it;
            // anything else that writes must be able to trust it.
            if geo.reftable_offset + geo.reftable_bytes() > dev_bytes {
                return Err(Error::corrupt(
                    "refcount table beyond the end of the image",
                    geo.reftable_offset,
                ));
            }
            header.check_tables_apart()?;
        }
        if header.incompatible_features & incompatible::CORRUPT != 0 && !options.for_repair {
            return Err(Error::corrupt(
                "image is marked corrupt; open it read-only",
                0,
            ));
        }
        if header.nb_snapshots > 0 {
            return Err(Error::Unsupported("writing images with internal snapshots"));
        }
        if header.autoclear_features & autoclear::BITMAPS != 0 {
            // Clearing the bit would strand the bitmaps' clusters as leaks.
            return Err(Error::Unsupported("writing images with persistent bitmaps"));
        }
        // We maintain none of the autoclear features but raw external data
        // (see `crate::engine::data`): declare the others stale.
        let kept = if header.has_data_file() {
            autoclear::RAW_EXTERNAL
        } else {
            0
        };
        if header.autoclear_features & !kept != 0 {
            header.autoclear_features &= kept;
            header_io::write_header(dev, scratch, &header).await?;
            dev.flush().await.map_err(Error::Io)?;
        }
        Ok((header, bitmaps))
    }
}

impl<D, S, const K: usize, B, W> Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: AsMut<[Slot<K>]> + AsRef<[Slot<K>]>,
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

    /// The last steps of a read-write open: rebuild a dirty image's
    /// refcounts, verify when asked.
    #[cfg(feature = "write")]
    async fn settle(
        &mut self,
        options: OpenOptions,
        rebuild_scratch: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        if options.read_only {
            return Ok(());
        }
        let dirty = self.engine.header.incompatible_features & incompatible::DIRTY != 0;
        if !options.for_repair && dirty {
            info!("qcow2: image not closed cleanly (lazy refcounts): rebuilding refcounts");
            // Refcounts may be stale: rebuild them before any allocation.
            self.engine.repair(rebuild_scratch, Repair::All).await?;
        }
        if options.verify && self.engine.check(rebuild_scratch).await?.corruptions > 0 {
            return Err(Error::corrupt(
                "check found corruption; open read-only or repair first",
                0,
            ));
        }
        Ok(())
    }

    /// Without the `write` feature every open is read-only: nothing to do.
    #[cfg(not(feature = "write"))]
    async fn settle(
        &mut self,
        _options: OpenOptions,
        _rebuild_scratch: &mut [u8],
    ) -> Result<(), Error<D::Error>> {
        Ok(())
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
            return Err(Error::corrupt("image marked corrupt; repair it first", 0));
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
                "qcow2: {=str} (host offset {=u64:#x}): image marked corrupt",
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
    S: AsMut<[Slot<K>]> + AsRef<[Slot<K>]>,
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
        Err(Error::Unsupported("resizing images"))
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
