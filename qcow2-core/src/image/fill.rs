//! Guest data that does not live in one of this image's data clusters:
//! the backing device's, and compressed clusters'. Reads use these, and so
//! does copy-on-write, which fills the parts of a newly allocated cluster
//! a write does not cover from where the cluster's data was before.

use crate::cache::SlotStorage;
use crate::codec::Workspace;
#[cfg(feature = "write")]
use crate::format::L2Entry;
use crate::image::backing::Backing;
#[cfg(feature = "write")]
use crate::image::decompress::DecodeProbe;
use crate::{BlockDevice, Error, Feature, Mapping, Qcow2, Sector, SECTOR};

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

impl<D, S, const K: usize, B, W> Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    B: Backing<D::Error>,
    W: Workspace,
{
    /// Refuses what needs the backing when the image names one that is not
    /// attached.
    pub(crate) fn require_backing(&self) -> Result<(), Error<D::Error>> {
        if self.names_backing && !self.backing_attached {
            return Err(Error::Unsupported(Feature::BackingNotAttached));
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
            self.engine.geo.sectors
        } else {
            self.backing.sector_count().min(self.engine.geo.sectors)
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
            let (mapping, run) = self.engine.map_run(sector, end - sector).await?;
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
        let first = self.engine.geo.cluster_sector(guest);
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

    /// [`Engine::release`] with this image's decoder deciding whether a
    /// compressed stream decodes (rule 9).
    #[cfg(feature = "write")]
    pub(crate) async fn release(&mut self, entry: L2Entry) -> Result<(), Error<D::Error>> {
        self.engine
            .release(entry, &mut DecodeProbe(&mut self.ws))
            .await
    }
}
