//! Compressed writes: packing compressed clusters into host clusters at
//! byte granularity, as QEMU does.
//!
//! Each compressed cluster takes the bytes after the previous one; a
//! stream that does not fit in the rest of the host cluster continues in
//! the next one if that is the cluster allocated next, else starts afresh.
//! Every host cluster a stream touches holds one reference for it, so a
//! host cluster packed with several compressed clusters has a refcount of
//! as many; a cluster whose refcount is at the maximum (always, with 1-bit
//! refcounts) is not packed further.

use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::codec::Workspace;
use crate::format::entry::COMPRESSED;
use crate::format::refcount;
use crate::format::L2Entry;
use crate::image::backing::Backing;
use crate::{BlockDevice, Error, Feature, Qcow2, SECTOR};

impl<D, S, const K: usize, B, W> Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    B: Backing<D::Error>,
    W: Workspace,
{
    /// Stores guest cluster `guest` compressed: `data` is the whole
    /// cluster's contents (the disk's last cluster zero-padded to a full
    /// cluster) compressed by the caller in the image's format
    /// ([`crate::ImageInfo::compression_type`]; QEMU's settings: raw
    /// deflate with a 4 KiB window, or a zstd frame). It must be shorter
    /// than a cluster: a cluster that does not shrink is written plainly.
    /// What the cluster held before is released.
    ///
    /// Not durable until [`Qcow2::flush`]. Cancelled, it leaves at most
    /// leaked clusters.
    pub async fn write_compressed(
        &mut self,
        guest: u64,
        data: &[u8],
    ) -> Result<(), Error<D::Error>> {
        let bits = self.engine.geo.cluster_sector_bits();
        let first = guest.checked_shl(bits).ok_or(Error::OutOfRange)?;
        let count = self
            .engine
            .geo
            .cluster_sectors()
            .min(self.engine.geo.sectors.saturating_sub(first));
        if count == 0 {
            return Err(Error::OutOfRange);
        }
        if self.engine.external_data() {
            // QEMU refuses them too (ENOTSUP): data clusters live in the
            // data file at their guest offset.
            return Err(Error::Unsupported(Feature::CompressedWriteWithDataFile));
        }
        if data.is_empty() || data.len() as u64 >= self.engine.geo.cluster_size {
            return Err(Error::InvalidArgument(
                "compressed data must be shorter than a cluster",
            ));
        }
        self.begin_change(first, count).await?;
        let result = self.store_compressed(guest, data).await;
        self.end_change(result).await
    }

    async fn store_compressed(&mut self, guest: u64, data: &[u8]) -> Result<(), Error<D::Error>> {
        let mut l2 = self.engine.l2_table_for_write(guest).await?;
        if l2 == 0 {
            l2 = self.new_l2_table(guest).await?;
        }
        let (old, at) = self.engine.l2_entry(l2, guest).await?;
        let len = data.len() as u64;
        let host = self.alloc_bytes(len).await?;
        self.write_bytes(host, data).await?;
        let offset_bits = 62 - (self.engine.geo.cluster_bits - 8);
        if host >> offset_bits != 0 {
            return Err(Error::NoSpace);
        }
        // The sector count field holds the sectors after the first one.
        let extra_sectors = (host + len - 1) / SECTOR as u64 - host / SECTOR as u64;
        let entry = COMPRESSED | (extra_sectors << offset_bits) | host;
        // Durable after the data and the refcounts (rule 1).
        self.engine
            .cache
            .write_u64(&mut self.engine.dev, at, Kind::L2, entry)
            .await?;
        if old != L2Entry::Unallocated {
            self.release(old).await?;
        }
        Ok(())
    }

    /// Host bytes for a compressed stream of `len` bytes (less than a
    /// cluster), each host cluster they touch referenced once more.
    async fn alloc_bytes(&mut self, len: u64) -> Result<u64, Error<D::Error>> {
        let cluster_size = self.engine.geo.cluster_size;
        let mut offset = self.engine.pack_next;
        if offset != 0 {
            let count = self
                .engine
                .refcount(self.engine.geo.cluster_of(offset))
                .await?;
            // A cluster freed since, or referenced as often as it can be,
            // is not packed further.
            if count == 0 || count >= refcount::max_value(self.engine.geo.refcount_order) {
                offset = 0;
            }
        }
        let room = cluster_size - self.engine.geo.within_cluster(offset);
        if offset != 0 && room >= len {
            let cluster = self.engine.geo.cluster_of(offset);
            self.engine.increment(cluster).await?;
        } else {
            // A new cluster (refcount 1); if it directly follows the
            // partly used one, the stream runs on into it.
            let fresh = self.engine.alloc_cluster().await?;
            if offset != 0 && fresh == offset + room {
                let cluster = self.engine.geo.cluster_of(offset);
                self.engine.increment(cluster).await?;
            } else {
                offset = fresh;
            }
        }
        let next = offset + len;
        self.engine.pack_next = if self.engine.geo.within_cluster(next) == 0 {
            0
        } else {
            next
        };
        Ok(offset)
    }

    /// Writes `data` at host byte `host`, keeping the bytes before it in
    /// its first sector (the previous stream's end); the rest of its last
    /// sector is zeroed.
    async fn write_bytes(&mut self, host: u64, data: &[u8]) -> Result<(), Error<D::Error>> {
        let mut sector = host / SECTOR as u64;
        let within = (host % SECTOR as u64) as usize;
        let mut rest = data;
        if within != 0 {
            let buf = core::slice::from_mut(&mut self.engine.scratch);
            self.engine.dev.read(sector, buf).await.map_err(Error::Io)?;
            let take = (SECTOR - within).min(rest.len());
            let (now, later) = rest
                .split_at_checked(take)
                .ok_or(Error::Internal("compressed head past the data"))?;
            self.engine
                .scratch
                .get_mut(within..within + take)
                .ok_or(Error::Internal("compressed head past the sector"))?
                .copy_from_slice(now);
            self.engine
                .dev
                .write(sector, core::slice::from_ref(&self.engine.scratch))
                .await
                .map_err(Error::Io)?;
            sector += 1;
            rest = later;
        }
        let sectors = rest.len().div_ceil(SECTOR);
        let bounce = self.ws.parts().bounce;
        if let Some(buf) = bounce.get_mut(..sectors) {
            // One device write.
            let bytes = buf.as_flattened_mut();
            let (head, tail) = bytes
                .split_at_mut_checked(rest.len())
                .ok_or(Error::Internal("compressed data past the bounce buffer"))?;
            head.copy_from_slice(rest);
            tail.fill(0);
            self.engine
                .dev
                .write(sector, buf)
                .await
                .map_err(Error::Io)?;
        } else {
            for chunk in rest.chunks(SECTOR) {
                self.engine.scratch.fill(0);
                if let Some(dst) = self.engine.scratch.get_mut(..chunk.len()) {
                    dst.copy_from_slice(chunk);
                }
                self.engine
                    .dev
                    .write(sector, core::slice::from_ref(&self.engine.scratch))
                    .await
                    .map_err(Error::Io)?;
                sector += 1;
            }
        }
        self.engine.cache.note_device_write();
        Ok(())
    }
}
