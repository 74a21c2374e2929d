//! The write path: in-place overwrites and allocating writes.

use crate::cache::{Kind, Slot};
use crate::format::{L1Entry, L2Entry};
use crate::{BlockDevice, Error, Qcow2, Sector, SECTOR};

impl<D, S, const K: usize> Qcow2<D, S, K>
where
    D: BlockDevice,
    S: AsMut<[Slot<K>]> + AsRef<[Slot<K>]>,
{
    /// Writes `data`, which lies within one guest cluster, at guest `sector`.
    pub(crate) async fn write_in_cluster(
        &mut self,
        sector: u64,
        data: &[Sector],
    ) -> Result<(), Error<D::Error>> {
        let cluster_sectors = self.geo.cluster_size / SECTOR as u64;
        let guest = sector / cluster_sectors;
        let within = sector % cluster_sectors;
        let mut l2 = self.l2_table(guest).await?;
        if l2 == 0 {
            l2 = self.new_l2_table(guest).await?;
        }
        let (entry, at) = self.l2_entry(l2, guest).await?;
        let host = match entry {
            L2Entry::Data {
                offset,
                copied: true,
            } => {
                self.check_not_metadata(offset).await?;
                self.dev
                    .write(offset / SECTOR as u64 + within, data)
                    .await
                    .map_err(Error::Io)?;
                self.cache.note_device_write();
                return Ok(());
            }
            L2Entry::Data { copied: false, .. } => {
                return Err(Error::corrupt("L2 entry without COPIED flag", at))
            }
            L2Entry::Compressed { .. } => {
                return Err(Error::Unsupported("writing over compressed clusters"))
            }
            // A preallocated zero cluster we own is reused in place.
            L2Entry::Zero {
                offset,
                copied: true,
            } if offset != 0 => {
                self.check_not_metadata(offset).await?;
                offset
            }
            L2Entry::Zero { .. } | L2Entry::Unallocated => self.alloc_cluster().await?,
        };
        // The whole new cluster is written: the guest reads zeros around `data`.
        let first = host / SECTOR as u64;
        let tail = cluster_sectors - within - data.len() as u64;
        self.dev
            .write_zeros(first, within)
            .await
            .map_err(Error::Io)?;
        self.dev
            .write(first + within, data)
            .await
            .map_err(Error::Io)?;
        self.dev
            .write_zeros(first + within + data.len() as u64, tail)
            .await
            .map_err(Error::Io)?;
        self.cache.note_device_write();
        // The cache writes this entry only after the data and refcount are durable.
        self.cache
            .write_u64(&mut self.dev, at, Kind::L2, L2Entry::data(host))
            .await
    }

    /// Refuses guest writes into a cluster that is visibly metadata: held
    /// in the cache as a table slice, or a refcount block covering itself
    /// (where refcount blocks normally live). See [`crate::OpenOptions::verify`].
    async fn check_not_metadata(&mut self, host: u64) -> Result<(), Error<D::Error>> {
        let cluster = host >> self.geo.cluster_bits;
        if self.cache.holds_any(host, self.geo.cluster_size)
            || self.refblock_of(cluster).await? == host
        {
            return Err(Error::corrupt("data cluster is live metadata", host));
        }
        Ok(())
    }

    /// Allocates a zeroed L2 table for guest cluster `guest` and links it
    /// into the L1 table; returns its host offset.
    async fn new_l2_table(&mut self, guest: u64) -> Result<u64, Error<D::Error>> {
        let at = self.l1_entry_offset(guest)?;
        let table = self.alloc_cluster().await?;
        let sectors = self.geo.cluster_size / SECTOR as u64;
        self.dev
            .write_zeros(table / SECTOR as u64, sectors)
            .await
            .map_err(Error::Io)?;
        self.cache.note_device_write();
        // Written back only after the zeroed table and its refcount are durable.
        self.cache
            .write_u64(&mut self.dev, at, Kind::L1, L1Entry::new(table).0)
            .await?;
        Ok(table)
    }
}
