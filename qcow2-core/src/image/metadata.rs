//! The image's metadata, as the public API presents it: audits and
//! repairs, mappings, names, compressed extents, the data file. Each is
//! served by the engine; nothing here needs the backing or the workspace.

use core::future::Future;

use crate::cache::SlotStorage;
#[cfg(feature = "write")]
use crate::check::Repair;
#[cfg(feature = "check")]
use crate::check::{CheckReport, Finding};
use crate::engine::extent::CompressedExtent;
use crate::{BlockDevice, Error, Mapping, Qcow2};

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize, B, W> Qcow2<D, S, K, B, W> {
    #[cfg(feature = "check")]
    /// Checks the image's consistency; `scratch` holds the reference counts
    /// (4 bytes per host cluster per pass). Counts as `qemu-img check`.
    ///
    /// Releases of clusters held since the last flush are applied first
    /// (a flush), so that the refcounts count them.
    ///
    /// Cancelled, it leaves the image as it was (cached metadata it wrote
    /// back on the way went out in order).
    pub fn check<'a>(
        &'a mut self,
        scratch: &'a mut [u8],
    ) -> impl Future<Output = Result<CheckReport, Error<D::Error>>> + 'a {
        self.engine.check(scratch)
    }

    #[cfg(feature = "check")]
    /// [`Qcow2::check`], reporting each inconsistency to `findings` as it
    /// is found (for a per-problem listing such as `qemu-img check`
    /// prints, which lists the refcounts cluster by cluster, then the
    /// COPIED flags; here the COPIED findings come during the walk, before
    /// the refcounts).
    pub fn check_with<'a>(
        &'a mut self,
        scratch: &'a mut [u8],
        findings: &'a mut dyn FnMut(Finding),
    ) -> impl Future<Output = Result<CheckReport, Error<D::Error>>> + 'a {
        self.engine.check_with(scratch, findings)
    }

    #[cfg(feature = "write")]
    /// Checks and repairs. The report describes the image as found, with the
    /// `*_fixed` counts of what was repaired; check again to see the result.
    ///
    /// A repair writes only into clusters it has established the role of:
    /// refcount blocks that nothing else references, table entries when no
    /// cluster is claimed twice, and new refcount structures in clusters
    /// that nothing references. Guest data a read returned before the
    /// repair reads back the same after it.
    ///
    /// Cancelled, it leaves the image as before the repair or with part of
    /// it done (rules 4 and 8 of `ORDERING.md`): at most leaked clusters
    /// beyond what the audit found.
    pub fn repair<'a>(
        &'a mut self,
        scratch: &'a mut [u8],
        mode: Repair,
    ) -> impl Future<Output = Result<CheckReport, Error<D::Error>>> + 'a {
        self.engine.repair(scratch, mode)
    }

    #[cfg(feature = "write")]
    /// [`Qcow2::repair`], reporting to `findings` in the order `qemu-img
    /// check -r` prints: the audit's refcount findings; those a pass then
    /// sets right in place again, `repaired` (or unrepaired where the mode
    /// does not cover them); [`Finding::Rebuilding`] before a rebuild; last
    /// the COPIED flags as they stand after the refcounts are right
    /// (`repaired` with [`Repair::All`], which fixes them).
    pub fn repair_with<'a>(
        &'a mut self,
        scratch: &'a mut [u8],
        mode: Repair,
        findings: &'a mut dyn FnMut(Finding),
    ) -> impl Future<Output = Result<CheckReport, Error<D::Error>>> + 'a {
        self.engine.repair_with(scratch, mode, findings)
    }

    /// Attaches `dev` as the image's external data file (see
    /// [`Qcow2::has_data_file`] and [`Qcow2::data_file_name`]; the caller
    /// finds and opens it, writable when the image is). Until one is
    /// attached, guest reads and writes of such an image fail with
    /// [`Error::Unsupported`]; metadata (info, map, check) works without.
    ///
    /// Returns the data file attached before, if any, after flushing it
    /// and the image (writes in flight stay ordered). An image without the
    /// feature refuses, as QEMU refuses a `data-file` option for it: the
    /// device comes back in the error.
    pub fn attach_data_file<'a>(
        &'a mut self,
        dev: D,
    ) -> impl Future<Output = Result<Option<D>, (Error<D::Error>, D)>> + 'a {
        self.engine.attach_data_file(dev)
    }

    /// The attached external data file.
    pub fn data_file(&self) -> Option<&D> {
        self.engine.data_file()
    }

    /// The attached external data file, mutably: for device-specific
    /// controls. Writing to it behind the image's back changes the disk.
    pub fn data_file_mut(&mut self) -> Option<&mut D> {
        self.engine.data_file_mut()
    }

    /// The device sectors of the compressed cluster of `len` bytes at host
    /// byte `host` (from [`crate::Mapping::Compressed`]), checked as a read
    /// checks them: starting inside the device, clear of the header, L1
    /// table, refcount table and cached metadata.
    pub fn compressed_extent(
        &self,
        host: u64,
        len: u64,
    ) -> Result<CompressedExtent, Error<D::Error>> {
        self.engine.compressed_extent(host, len)
    }

    /// The image's compression format.
    pub fn compression(&self) -> Option<crate::Compression> {
        self.engine.compression()
    }

    /// The host byte offset of the cluster the L2 entry of guest byte
    /// `offset` holds, if it holds one: data, a compressed stream's start,
    /// or a zero cluster that keeps its preallocated host cluster (which
    /// [`Qcow2::map`] reports as [`Mapping::Zero`]). `None` when the guest
    /// cluster has no host cluster. QEMU's compressed writes refuse any
    /// guest cluster that has one.
    pub fn host_cluster<'a>(
        &'a mut self,
        offset: u64,
    ) -> impl Future<Output = Result<Option<u64>, Error<D::Error>>> + 'a {
        self.engine.host_cluster(offset)
    }

    /// How the guest byte `offset` is stored, and for how many bytes from
    /// there the same holds (contiguously on the host for data).
    ///
    /// Cancelled, it leaves the image as it was (cached metadata it wrote
    /// back on the way went out in order).
    pub fn map<'a>(
        &'a mut self,
        offset: u64,
    ) -> impl Future<Output = Result<(Mapping, u64), Error<D::Error>>> + 'a {
        self.engine.map(offset)
    }

    /// Whether the header names a backing file (no device access). See
    /// [`crate::format::Header::has_backing_file`]: a name that starts with
    /// a NUL byte still reads as none from
    /// [`Qcow2::backing_file_name`].
    pub fn has_backing_file(&self) -> bool {
        self.engine.has_backing_file()
    }

    /// Whether guest data lives in an external data file (incompatible
    /// feature bit 2; no device access).
    pub fn has_data_file(&self) -> bool {
        self.engine.has_data_file()
    }

    /// Whether the external data file is also a valid raw image of the
    /// guest disk (`data_file_raw`, autoclear bit 1; false without a data
    /// file).
    pub fn data_file_raw(&self) -> bool {
        self.engine.data_file_raw()
    }

    /// Reads the backing file name into the start of `buf` and returns its
    /// length, or `None` when the image has no backing file. The name is
    /// the stored bytes up to the first NUL, as QEMU reads it (an empty
    /// name is no backing file); whether they are UTF-8 or a path is for
    /// the caller to decide. At most 1023 bytes:
    /// [`Error::InvalidArgument`] when `buf` is shorter than the stored
    /// name.
    pub fn backing_file_name<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = Result<Option<usize>, Error<D::Error>>> + 'a {
        self.engine.backing_file_name(buf)
    }

    /// Reads the backing file's format (the backing format extension:
    /// `raw`, `qcow2`, ...) into the start of `buf` and returns its length;
    /// `None` when the image has no backing file or does not say (readers
    /// then probe the backing). At most 15 bytes; see
    /// [`Qcow2::backing_file_name`] for `buf`.
    pub fn backing_format<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = Result<Option<usize>, Error<D::Error>>> + 'a {
        self.engine.backing_format(buf)
    }

    /// Reads the external data file's name (the data file extension) into
    /// the start of `buf` and returns its length; `None` when the header
    /// has no such extension (an image with a data file then needs the
    /// name from its user, as in QEMU). The name matters only when
    /// [`Qcow2::has_data_file`] says guest data is there; without that
    /// feature bit QEMU ignores it (and `qemu-img info` still shows it).
    /// Up to a cluster long; see [`Qcow2::backing_file_name`] for `buf`.
    pub fn data_file_name<'a>(
        &'a mut self,
        buf: &'a mut [u8],
    ) -> impl Future<Output = Result<Option<usize>, Error<D::Error>>> + 'a {
        self.engine.data_file_name(buf)
    }

    /// Gives up the image without flushing, as [`Qcow2::abandon`], and
    /// returns the data file too.
    pub fn abandon_with_data_file(self) -> (D, S, Option<D>) {
        let engine = self.engine;
        (engine.dev.meta, engine.cache.into_slots(), engine.dev.data)
    }
}
