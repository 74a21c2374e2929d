//! A blocking, byte-addressed image API with a host-sized cache.

use crate::backing::HostBacking;
use crate::block_on;
use crate::codec::{HostCompressor, HostDecoder, HostWorkspace};
use qcow2_core::{
    BlockDevice, CheckReport, CreateOptions, Error, Feature, Finding, ImageInfo, Mapping,
    OpenOptions, Qcow2, Repair, Sector, Slot, SECTOR,
};

/// Sectors per cache slice on the host: 4 KiB slices.
pub const HOST_SLICE_SECTORS: usize = 8;
/// Slices in the host cache: 2 MiB of metadata, twice QEMU's default.
pub const HOST_CACHE_SLOTS: usize = 512;
/// Scratch for check, repair and dirty-image rebuilds: 4 MiB counts a
/// million clusters (64 GiB at 64 KiB clusters) per pass.
pub const HOST_SCRATCH_BYTES: usize = 4 << 20;
/// Reads of at least this many clusters decode compressed clusters on
/// several threads.
const PARALLEL_CLUSTERS: u64 = 4;
/// The host cache storage.
pub type HostCache = Box<[Slot<HOST_SLICE_SECTORS>]>;
/// An image with the host cache, a backing (possibly none) and working
/// memory (bounce buffer and decoders).
pub type HostQcow2<D> = Qcow2<D, HostCache, HOST_SLICE_SECTORS, HostBacking<D>, HostWorkspace>;

/// `image` made a host image: working memory, no backing yet.
fn hosted<D: BlockDevice>(image: Qcow2<D, HostCache, HOST_SLICE_SECTORS>) -> HostQcow2<D> {
    let cluster_size = image.info().cluster_size;
    image
        .with_unattached_backing(HostBacking::None)
        .with_workspace(HostWorkspace::new(cluster_size))
}

/// A fresh host cache of [`HOST_CACHE_SLOTS`] slices.
pub fn host_cache() -> HostCache {
    vec![Slot::EMPTY; HOST_CACHE_SLOTS].into_boxed_slice()
}

/// A blocking handle on an image, addressed in bytes.
///
/// Unaligned reads and writes are done by read-modify-write of the edge
/// sectors.
pub struct Image<D: BlockDevice> {
    inner: HostQcow2<D>,
}

type Result<T, D> = core::result::Result<T, Error<<D as BlockDevice>::Error>>;

/// A byte-addressing error as the image's own error.
fn from_bytes<E>(e: qcow2_core::bytes::BytesError<Error<E>>) -> Error<E> {
    match e {
        qcow2_core::bytes::BytesError::Device(e) => e,
        qcow2_core::bytes::BytesError::OutOfRange => Error::OutOfRange,
    }
}

impl<D: BlockDevice> Image<D> {
    /// Formats `dev` as a new image.
    pub fn create(dev: D, options: &CreateOptions) -> Result<Self, D> {
        Ok(Image {
            inner: hosted(block_on(Qcow2::create(dev, host_cache(), *options))?),
        })
    }

    /// Opens the image on `dev`. A dirty image opened read-write gets its
    /// refcounts rebuilt with a [`HOST_SCRATCH_BYTES`] scratch buffer.
    pub fn open(dev: D, options: &OpenOptions) -> Result<Self, D> {
        let mut scratch = vec![0u8; HOST_SCRATCH_BYTES];
        let open = Qcow2::open_with_scratch(dev, host_cache(), *options, &mut scratch);
        Ok(Image {
            inner: hosted(block_on(open)?),
        })
    }

    /// Checks the image's consistency with a [`HOST_SCRATCH_BYTES`] buffer.
    pub fn check(&mut self) -> Result<CheckReport, D> {
        let mut scratch = vec![0u8; HOST_SCRATCH_BYTES];
        block_on(self.inner.check(&mut scratch))
    }

    /// Repairs the image (see [`Repair`]) with a [`HOST_SCRATCH_BYTES`]
    /// buffer.
    pub fn repair(&mut self, mode: Repair) -> Result<CheckReport, D> {
        let mut scratch = vec![0u8; HOST_SCRATCH_BYTES];
        block_on(self.inner.repair(&mut scratch, mode))
    }

    /// [`Image::check`], reporting each inconsistency to `findings`.
    pub fn check_with(&mut self, findings: &mut dyn FnMut(Finding)) -> Result<CheckReport, D> {
        let mut scratch = vec![0u8; HOST_SCRATCH_BYTES];
        block_on(self.inner.check_with(&mut scratch, findings))
    }

    /// [`Image::repair`], reporting what its audit finds to `findings`.
    pub fn repair_with(
        &mut self,
        mode: Repair,
        findings: &mut dyn FnMut(Finding),
    ) -> Result<CheckReport, D> {
        let mut scratch = vec![0u8; HOST_SCRATCH_BYTES];
        block_on(self.inner.repair_with(&mut scratch, mode, findings))
    }

    /// The image reading unallocated clusters from `backing`.
    pub fn with_backing(self, backing: HostBacking<D>) -> Self {
        Image {
            inner: self.inner.with_backing(backing),
        }
    }

    /// The image as a backing for another.
    pub fn into_backing(self) -> HostBacking<D> {
        HostBacking::Qcow2(Box::new(self.inner))
    }

    /// The async image underneath.
    pub fn inner_mut(&mut self) -> &mut HostQcow2<D> {
        &mut self.inner
    }

    /// A summary of the image.
    pub fn info(&self) -> ImageInfo {
        self.inner.info()
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }

    /// The underlying device.
    pub fn device(&self) -> &D {
        self.inner.device()
    }

    /// Reads whole sectors from sector `first`.
    pub fn read_sectors(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), D> {
        block_on(self.inner.read(first, buf))
    }

    /// Writes whole sectors from sector `first`.
    pub fn write_sectors(&mut self, first: u64, buf: &[Sector]) -> Result<(), D> {
        block_on(self.inner.write(first, buf))
    }

    /// Reads `buf.len()` bytes at byte `offset` (partial sectors through
    /// the core's [`qcow2_core::bytes`] read-modify-write). Compressed
    /// clusters in a read of several clusters are decoded on every core.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), D> {
        if (buf.len() as u64) < PARALLEL_CLUSTERS * self.info().cluster_size {
            return self.read_serial(offset, buf);
        }
        self.read_parallel(offset, buf)
    }

    /// [`Image::read_at`] on this thread.
    fn read_serial(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), D> {
        let mut scratch = [0u8; SECTOR];
        let read = qcow2_core::bytes::read_at(&mut self.inner, offset, buf, &mut scratch);
        block_on(read).map_err(from_bytes)
    }

    /// Reads like [`Image::read_serial`], but takes the compressed
    /// clusters' bytes off the device first and decodes them on several
    /// threads with [`HostDecoder::decompress`], the decoder the image's
    /// own reads use. A cluster that fails to decode is read again
    /// serially, for the core's precise error.
    fn read_parallel(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), D> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(Error::OutOfRange)?;
        if end > self.virtual_size() {
            return Err(Error::OutOfRange);
        }
        let cluster = self.info().cluster_size;
        let Some(format) = self.inner.compression() else {
            return self.read_serial(offset, buf);
        };
        // The compressed clusters' bytes, in order: (position in `buf`,
        // length, position in the cluster, stream).
        let mut jobs: Vec<(usize, usize, usize, Vec<u8>)> = Vec::new();
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (mapping, run) = self.map(at)?;
            let n = (run.max(1) as usize).min(buf.len() - pos);
            match mapping {
                Mapping::Compressed { host, len } => {
                    let extent = self.inner.compressed_extent(host, len)?;
                    let mut input = vec![[0u8; SECTOR]; extent.sectors as usize];
                    block_on(
                        self.inner
                            .device_mut()
                            .read(extent.first_sector, &mut input),
                    )
                    .map_err(Error::Io)?;
                    let bytes = input.as_flattened()[extent.skip..].to_vec();
                    jobs.push((pos, n, (at % cluster) as usize, bytes));
                }
                _ => self.read_serial(at, &mut buf[pos..pos + n])?,
            }
            pos += n;
        }
        // Each job's slice of `buf`, split off in order.
        let mut slices: Vec<(&mut [u8], usize, &[u8])> = Vec::with_capacity(jobs.len());
        let mut rest = &mut *buf;
        let mut taken = 0usize;
        for (at, n, within, input) in &jobs {
            let (_, tail) = rest.split_at_mut(at - taken);
            let (mine, tail) = tail.split_at_mut(*n);
            slices.push((mine, *within, input));
            rest = tail;
            taken = at + n;
        }
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per_worker = slices.len().div_ceil(workers).max(1);
        let mut failed: Vec<usize> = Vec::new();
        std::thread::scope(|scope| {
            let handles: Vec<_> = slices
                .chunks_mut(per_worker)
                .enumerate()
                .map(|(w, chunk)| {
                    scope.spawn(move || {
                        let mut decoder = HostDecoder::new();
                        let mut out = vec![0u8; cluster as usize];
                        let mut bad = Vec::new();
                        for (i, (dst, within, input)) in chunk.iter_mut().enumerate() {
                            match decoder.decompress(format, input, &mut out) {
                                Ok(()) => dst.copy_from_slice(&out[*within..*within + dst.len()]),
                                Err(_) => bad.push(w * per_worker + i),
                            }
                        }
                        bad
                    })
                })
                .collect();
            for handle in handles {
                match handle.join() {
                    Ok(bad) => failed.extend(bad),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
        for i in failed {
            let (at, n, _, _) = &jobs[i];
            self.read_serial(offset + *at as u64, &mut buf[*at..*at + *n])?;
        }
        Ok(())
    }

    /// Writes `buf` at byte `offset` (partial sectors by read-modify-write).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), D> {
        let mut scratch = [0u8; SECTOR];
        let write = qcow2_core::bytes::write_at(&mut self.inner, offset, buf, &mut scratch);
        block_on(write).map_err(from_bytes)
    }

    /// Writes `data` at byte `offset` compressed in the image's format
    /// (QEMU's settings), cluster by cluster; clusters that do not shrink
    /// are written plainly, as QEMU does. `offset` must be on a cluster
    /// boundary and `data` whole clusters, except that the last cluster of
    /// the disk may be partial (it is compressed zero-padded). What the
    /// clusters held before is replaced.
    pub fn write_compressed_at(&mut self, offset: u64, data: &[u8]) -> Result<(), D> {
        let cluster = self.info().cluster_size;
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(Error::OutOfRange)?;
        if end > self.virtual_size() {
            return Err(Error::OutOfRange);
        }
        if !offset.is_multiple_of(cluster)
            || !((data.len() as u64).is_multiple_of(cluster) || end == self.virtual_size())
        {
            return Err(Error::InvalidArgument(
                "compressed writes cover whole clusters",
            ));
        }
        let format = qcow2_core::Compression::from_type(self.info().compression_type)
            .ok_or(Error::Unsupported(Feature::CompressionType))?;
        let mut compressor = HostCompressor::new();
        let mut padded = vec![0u8; cluster as usize];
        let mut out = Vec::new();
        for (i, chunk) in data.chunks(cluster as usize).enumerate() {
            let at = offset + i as u64 * cluster;
            padded[..chunk.len()].copy_from_slice(chunk);
            padded[chunk.len()..].fill(0);
            if compressor.compress(format, &padded, &mut out) {
                self.write_compressed_cluster(at / cluster, &out)?;
            } else {
                self.write_at(at, chunk)?;
            }
        }
        Ok(())
    }

    /// Stores guest cluster `guest` as the compressed stream `compressed`
    /// (see [`qcow2_core::Qcow2::write_compressed`]): for callers that
    /// compress on several threads.
    pub fn write_compressed_cluster(&mut self, guest: u64, compressed: &[u8]) -> Result<(), D> {
        block_on(self.inner.write_compressed(guest, compressed))
    }

    /// Makes `len` bytes at byte `offset` read as zeros: whole sectors
    /// through [`qcow2_core::Qcow2::write_zeroes`] (zero flags, keeping the
    /// allocation or, with `unmap`, releasing it), partial sectors at the
    /// edges by writing zeros.
    pub fn write_zeroes_at(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), D> {
        let end = offset.checked_add(len).ok_or(Error::OutOfRange)?;
        if end > self.virtual_size() || len == 0 {
            return if end > self.virtual_size() {
                Err(Error::OutOfRange)
            } else {
                Ok(())
            };
        }
        let sector = SECTOR as u64;
        // A partial sector in a cluster that already reads as zeros joins
        // the zeroed range (the core then flags the whole cluster, as QEMU
        // does for unaligned requests); elsewhere it gets zeros written.
        let mut first = offset / sector;
        if !offset.is_multiple_of(sector) && !self.reads_as_zeros(offset)? {
            let head = (sector - offset % sector).min(len);
            self.write_at(offset, &[0u8; SECTOR][..head as usize])?;
            first += 1;
        }
        let mut last = end.div_ceil(sector);
        if !end.is_multiple_of(sector) && last > first && !self.reads_as_zeros(end - 1)? {
            last -= 1;
            let tail = end % sector;
            self.write_at(last * sector, &[0u8; SECTOR][..tail as usize])?;
        }
        if first < last {
            block_on(self.inner.write_zeroes(first, last - first, unmap))?;
        }
        Ok(())
    }

    /// Whether the cluster holding byte `offset` reads as zeros now.
    fn reads_as_zeros(&mut self, offset: u64) -> Result<bool, D> {
        let (mapping, _) = self.map(offset)?;
        let past_backing = offset >= self.backing_bytes();
        Ok(match mapping {
            Mapping::Unallocated => past_backing,
            Mapping::Zero => true,
            Mapping::Data { .. } | Mapping::Compressed { .. } => false,
        })
    }

    /// Discards `len` bytes at byte `offset` (see
    /// [`qcow2_core::Qcow2::discard`]: whole clusters only); partial sectors
    /// at the edges are left alone.
    pub fn discard_at(&mut self, offset: u64, len: u64) -> Result<(), D> {
        let end = offset.checked_add(len).ok_or(Error::OutOfRange)?;
        if end > self.virtual_size() {
            return Err(Error::OutOfRange);
        }
        let sector = SECTOR as u64;
        let (first, last) = (offset.div_ceil(sector), end / sector);
        if first < last {
            block_on(self.inner.discard(first, last - first))?;
        }
        Ok(())
    }

    /// Guest bytes below which unallocated clusters read the backing (see
    /// [`qcow2_core::Qcow2::backing_sectors`]).
    pub fn backing_bytes(&self) -> u64 {
        self.inner.backing_sectors() * SECTOR as u64
    }

    /// How byte `offset` is stored and for how many bytes that holds.
    pub fn map(&mut self, offset: u64) -> Result<(Mapping, u64), D> {
        block_on(self.inner.map(offset))
    }

    /// The host cluster guest byte `offset`'s L2 entry holds, if any
    /// (see [`qcow2_core::Qcow2::host_cluster`]).
    pub fn host_cluster(&mut self, offset: u64) -> Result<Option<u64>, D> {
        block_on(self.inner.host_cluster(offset))
    }

    /// Makes earlier writes durable.
    pub fn flush(&mut self) -> Result<(), D> {
        block_on(self.inner.flush())
    }

    /// Flushes and closes the image, returning the device.
    pub fn close(self) -> Result<D, D> {
        Ok(block_on(self.inner.close())?.0)
    }
}
