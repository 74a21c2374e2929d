//! Guest data that does not live in one of this image's data clusters:
//! the backing device's, and compressed clusters'. Reads use these, and so
//! does copy-on-write, which fills the parts of a newly allocated cluster
//! a write does not cover from where the cluster's data was before.

use crate::cache::Slot;
use crate::codec::{Compression, DecodeError, Decoder, Parts, Workspace};
use crate::image::backing::Backing;
use crate::{BlockDevice, Error, Mapping, Qcow2, Sector, SECTOR};

/// Where the old contents of a cluster being (re)allocated come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Zeros (an unallocated cluster without backing data, a zero cluster).
    Zeros,
    /// The backing device, at the cluster's guest offset.
    Backing,
    /// A compressed cluster: `len` bytes at host byte `host`.
    Compressed {
        /// Host byte offset of the stream.
        host: u64,
        /// Upper bound of its length.
        len: u64,
    },
}

/// Where decompressed output goes.
pub(crate) enum Target<'a> {
    /// Into `out`, which holds the cluster's sectors from sector `first`.
    Caller { first: u64, out: &'a mut [Sector] },
    /// Into the workspace's bounce buffer (at least a cluster long).
    Bounce,
    /// To the device, the cluster starting at host sector `host`, except
    /// cluster sectors `skip.0..skip.1` (which the caller writes).
    Device { host: u64, skip: (u64, u64) },
    /// Nowhere: the stream is only checked to decode to a whole cluster.
    Nowhere,
}

/// Reads sectors from `first` of `backing` into `buf`, zeros past its end.
pub(crate) async fn read_backing_into<E, B: Backing<E>>(
    backing: &mut B,
    first: u64,
    buf: &mut [Sector],
) -> Result<(), Error<E>> {
    let have = backing.sector_count().saturating_sub(first);
    let n = have.min(buf.len() as u64) as usize;
    let (from_backing, past_end) = buf
        .split_at_mut_checked(n)
        .ok_or(Error::Internal("backing split past the buffer"))?;
    if !from_backing.is_empty() {
        backing
            .read(first, from_backing)
            .await
            .map_err(B::overlay_error)?;
    }
    past_end.fill([0; SECTOR]);
    Ok(())
}

/// Copies the part of decompressed `data` (at byte `pos` of the cluster)
/// that falls in `dst`, which holds the cluster's bytes from `dst_start`.
fn copy_overlap(dst: &mut [u8], dst_start: u64, pos: u64, data: &[u8]) {
    let dst_end = dst_start + dst.len() as u64;
    let from = pos.max(dst_start);
    let to = (pos + data.len() as u64).min(dst_end);
    if from >= to {
        return;
    }
    let src = data.get((from - pos) as usize..(to - pos) as usize);
    let dst = dst.get_mut((from - dst_start) as usize..(to - dst_start) as usize);
    if let (Some(src), Some(dst)) = (src, dst) {
        dst.copy_from_slice(src);
    }
}

fn decode_error<E>(e: DecodeError, host: u64) -> Error<E> {
    match e {
        DecodeError::Corrupt(what) => Error::corrupt(what, host),
        DecodeError::Unsupported(what) => Error::Unsupported(what),
    }
}

impl<D, S, const K: usize, B, W> Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: AsMut<[Slot<K>]> + AsRef<[Slot<K>]>,
    B: Backing<D::Error>,
    W: Workspace,
{
    /// Refuses what needs the backing when the image names one that is not
    /// attached.
    pub(crate) fn require_backing(&self) -> Result<(), Error<D::Error>> {
        if self.names_backing && !self.backing_attached {
            return Err(Error::Unsupported(
                "the image has a backing file that is not attached (Qcow2::with_backing)",
            ));
        }
        Ok(())
    }

    /// Whether the image has a backing (named in its header, or attached):
    /// what QEMU's discard and write-zeroes decide by.
    /// An attached backing of zero sectors (an empty placeholder) reads
    /// as none.
    pub(crate) fn has_backing(&self) -> bool {
        self.names_backing || (self.backing_attached && self.backing.sector_count() > 0)
    }

    /// Guest sectors below which unallocated clusters read the backing
    /// (and so may hold data); past it they read as zeros. 0 without a
    /// backing; the whole disk when the image names a backing that is not
    /// attached (unknown contents).
    pub fn backing_sectors(&self) -> u64 {
        if self.names_backing && !self.backing_attached {
            self.geo.sectors
        } else {
            self.backing.sector_count().min(self.geo.sectors)
        }
    }

    /// Whether guest sectors `[first, first + count)` are known to read as
    /// zeros from the metadata alone: zero clusters, and unallocated ones
    /// whose backing is known to be zero there (or absent).
    pub async fn is_zeroed(&mut self, first: u64, count: u64) -> Result<bool, Error<D::Error>> {
        self.check_range(first, count)?;
        let mut sector = first;
        let end = first + count;
        while sector < end {
            let (mapping, run) = self.map_run(sector, end - sector).await?;
            let zero = match mapping {
                Mapping::Zero => true,
                Mapping::Unallocated => {
                    let backing_end = self.backing_sectors();
                    // Past the backing's end it reads zeros.
                    sector >= backing_end || {
                        self.require_backing()?;
                        let n = run.min(backing_end - sector);
                        self.backing
                            .is_zeroed(sector, n)
                            .await
                            .map_err(B::overlay_error)?
                    }
                }
                Mapping::Data { .. } | Mapping::Compressed { .. } => false,
            };
            if !zero {
                return Ok(false);
            }
            sector += run.max(1);
        }
        Ok(true)
    }

    /// Whether guest cluster `guest` has data in the backing device (else
    /// it reads as zeros when unallocated). False without a backing.
    pub(crate) fn backing_covers(&self, guest: u64) -> bool {
        let first = guest << (self.geo.cluster_bits - 9);
        self.backing.sector_count() > first
    }

    /// Reads guest sectors from `first` as the backing holds them: zeros
    /// past its end (never the caller's old buffer contents).
    pub(crate) async fn read_backing(
        &mut self,
        first: u64,
        buf: &mut [Sector],
    ) -> Result<(), Error<D::Error>> {
        self.require_backing()?;
        read_backing_into(&mut self.backing, first, buf).await
    }

    /// Reads cluster sectors from `first` of the compressed cluster of
    /// `len` bytes at host byte `host` into `out`.
    pub(crate) async fn read_compressed(
        &mut self,
        host: u64,
        len: u64,
        first: u64,
        out: &mut [Sector],
    ) -> Result<(), Error<D::Error>> {
        self.decompress(host, len, Target::Caller { first, out })
            .await
    }

    /// Decompresses the compressed cluster of `len` bytes at host byte
    /// `host` into `target`, applying QEMU's rules: the stream must yield a
    /// whole cluster; what it holds after that is ignored. Reads only the
    /// extent's sectors, and only those inside the device.
    pub(crate) async fn decompress(
        &mut self,
        host: u64,
        len: u64,
        mut target: Target<'_>,
    ) -> Result<(), Error<D::Error>> {
        let cluster = self.geo.cluster_size;
        let first_sector = host / SECTOR as u64;
        let dev_sectors = self.dev.sector_count();
        if first_sector >= dev_sectors {
            return Err(Error::corrupt(
                "compressed cluster beyond the end of the image",
                host,
            ));
        }
        if self.geo.hits_fixed_metadata(host, len) || self.cache.holds_any(host, len) {
            return Err(Error::corrupt("compressed cluster overlaps metadata", host));
        }
        let format = Compression::from_type(self.header.compression_type)
            .ok_or(Error::Unsupported("compression type"))?;
        // The descriptor ends on a sector boundary.
        let extent_end = crate::format::shr_ceil(host + len, 9);
        let input_end = extent_end.min(dev_sectors);
        let Parts {
            bounce,
            input,
            decoder,
        } = self.ws.parts();
        decoder
            .start(format, cluster as usize)
            .map_err(|e| decode_error(e, host))?;
        let input: &mut [Sector] = if input.is_empty() {
            core::slice::from_mut(&mut self.scratch)
        } else {
            input
        };
        let cluster_sectors = self.geo.cluster_sectors() as usize;
        let mut acc: Sector = [0; SECTOR];
        let mut next = first_sector;
        let mut skip = (host % SECTOR as u64) as usize;
        let mut produced: u64 = 0;
        while produced < cluster {
            if next >= input_end {
                let what = if input_end < extent_end {
                    "compressed cluster beyond the end of the image"
                } else {
                    "compressed cluster data ends early"
                };
                return Err(Error::corrupt(what, host));
            }
            let n = (input.len() as u64).min(input_end - next) as usize;
            let chunk = input
                .get_mut(..n)
                .ok_or(Error::Internal("input chunk past the buffer"))?;
            self.dev.read(next, chunk).await.map_err(Error::Io)?;
            next += n as u64;
            let last = next == input_end;
            let mut bytes = chunk.as_flattened().get(skip..).unwrap_or(&[]);
            skip = 0;
            while produced < cluster {
                let step = decoder
                    .step(bytes, last)
                    .map_err(|e| decode_error(e, host))?;
                let out = step.output;
                if out.is_empty() && step.consumed == 0 {
                    if !bytes.is_empty() && !last {
                        // The contract: a decoder buffers partial input itself.
                        return Err(Error::Internal("decoder stalled with input left"));
                    }
                    break;
                }
                if produced + out.len() as u64 > cluster {
                    return Err(Error::Internal("decoder produced more than a cluster"));
                }
                match &mut target {
                    Target::Caller { first, out: dst } => {
                        copy_overlap(dst.as_flattened_mut(), *first * 512, produced, out)
                    }
                    Target::Bounce => {
                        let dst = bounce
                            .get_mut(..cluster_sectors)
                            .ok_or(Error::Internal("bounce buffer smaller than a cluster"))?;
                        copy_overlap(dst.as_flattened_mut(), 0, produced, out)
                    }
                    Target::Nowhere => {}
                    Target::Device { host: at, skip } => {
                        // Sector by sector through `acc`: no buffer to spare.
                        let mut pos = produced;
                        let mut rest = out;
                        while !rest.is_empty() {
                            let within = (pos % SECTOR as u64) as usize;
                            let take = (SECTOR - within).min(rest.len());
                            let Some((now, later)) = rest.split_at_checked(take) else {
                                break;
                            };
                            if let Some(dst) = acc.get_mut(within..within + take) {
                                dst.copy_from_slice(now);
                            }
                            pos += take as u64;
                            rest = later;
                            let sector = (pos - 1) / SECTOR as u64;
                            let full = pos.is_multiple_of(SECTOR as u64);
                            if full && !(skip.0..skip.1).contains(&sector) {
                                self.dev
                                    .data_write(*at + sector, core::slice::from_ref(&acc))
                                    .await
                                    .map_err(Error::Io)?;
                            }
                        }
                    }
                }
                produced += out.len() as u64;
                bytes = bytes.get(step.consumed..).unwrap_or(&[]);
            }
            if last && produced < cluster {
                return Err(Error::corrupt("compressed cluster data ends early", host));
            }
        }
        if let Target::Device { .. } = target {
            self.cache.note_device_write();
        }
        Ok(())
    }
}
