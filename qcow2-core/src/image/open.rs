//! Opening an image: reading and validating the header, the open policy
//! (read-only, for repair, verified, without backing), building the
//! engine, and settling a dirty image before writes.

use core::future::Future;
use core::pin::pin;

use crate::cache::{Cache, SlotStorage};
#[cfg(feature = "write")]
use crate::check::Repair;
use crate::codec::{NoWorkspace, Workspace};
use crate::engine::geometry::Geometry;
use crate::engine::header_io;
use crate::engine::{Engine, EngineMode};
use crate::format::{autoclear, compatible, incompatible, Header, Version};
use crate::image::backing::{Backing, NoBacking};
use crate::outline::OutOfLine;
use crate::{BlockDevice, Corruption, Error, Feature, OpenError, Qcow2, Sector, SECTOR};

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

impl<D, S, const K: usize> Qcow2<D, S, K>
where
    D: BlockDevice,
    S: SlotStorage<K>,
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
        if geo.l1_entries > 0 && geo.l1_offset + geo.l1_bytes() > dev_bytes {
            return Err(Error::corrupt(Corruption::L1BeyondImage, geo.l1_offset));
        }
        if options.read_only {
            return Ok((header, bitmaps));
        }
        if cfg!(not(feature = "write")) {
            return Err(Error::Unsupported(Feature::WriteFeatureDisabled));
        }
        if !options.for_repair {
            // Reads never use the refcount table, and a repair rebuilds it;
            // anything else that writes must be able to trust it.
            if geo.reftable_offset + geo.reftable_bytes() > dev_bytes {
                return Err(Error::corrupt(
                    Corruption::RefcountTableBeyondImage,
                    geo.reftable_offset,
                ));
            }
            header.check_tables_apart()?;
        }
        if header.incompatible_features & incompatible::CORRUPT != 0 && !options.for_repair {
            return Err(Error::corrupt(Corruption::MarkedCorrupt, 0));
        }
        if header.nb_snapshots > 0 {
            return Err(Error::Unsupported(Feature::Snapshots));
        }
        if header.autoclear_features & autoclear::BITMAPS != 0 {
            // Clearing the bit would strand the bitmaps' clusters as leaks.
            return Err(Error::Unsupported(Feature::PersistentBitmaps));
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
    S: SlotStorage<K>,
    B: Backing<D::Error>,
    W: Workspace,
{
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
            return Err(Error::corrupt(Corruption::CheckFoundCorruption, 0));
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
}
