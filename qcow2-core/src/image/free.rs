//! The free path: discard and write-zeroes, and the release of the host
//! clusters a mapping change leaves unreferenced.
//!
//! Ordering (rules 2 and 6 of `ORDERING.md`): the L2 entry changes first,
//! in the cache; the release then holds the refcount decreases, which the
//! next flush applies once the entry change is durable; only then can a
//! cluster whose refcount reaches zero be handed out again, and it is
//! discarded on the device after the flush that follows.

use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::codec::Workspace;
use crate::format::entry::ZERO;
use crate::format::L2Entry;
use crate::image::backing::Backing;
use crate::{BlockDevice, Error, Mapping, Qcow2, Sector, SECTOR};

impl<D, S, const K: usize, B, W> Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    B: Backing<D::Error>,
    W: Workspace,
{
    /// Discards `count` sectors from guest sector `first`: whole clusters in
    /// the range stop using host space and read as zeros (v3 images get the
    /// zero flag; v2 entries become unallocated, which reads as zeros too;
    /// a v2 image with a backing, where that would show the backing, keeps
    /// everything, as QEMU does).
    /// Parts of clusters at either end are left alone, as QEMU does, except
    /// the last cluster of a disk whose size is not a whole number of
    /// clusters when the range reaches the end of the disk.
    ///
    /// Freed host clusters are discarded on the device after the next flush.
    /// Not durable until [`Qcow2::flush`]. Cancelled (the future dropped),
    /// it leaves at most leaked clusters.
    pub async fn discard(&mut self, first: u64, count: u64) -> Result<(), Error<D::Error>> {
        self.begin_change(first, count).await?;
        let result = self.discard_clusters(first, first + count).await;
        self.end_change(result).await
    }

    /// Makes `count` sectors from guest sector `first` read as zeros.
    ///
    /// As QEMU: on v3 images whole clusters get the zero flag, keeping their
    /// host cluster for later writes, or, with `unmap`, releasing it
    /// (compressed clusters are always released); a partial cluster that
    /// already reads as zeros is flagged whole, other partial clusters get
    /// zeros written. v2 images have no zero flag: whole clusters are
    /// discarded (they read as zeros once unallocated, there being no
    /// backing file), partial ones get zeros written.
    ///
    /// Not durable until [`Qcow2::flush`]. Cancelled, it leaves at most
    /// leaked clusters.
    pub async fn write_zeroes(
        &mut self,
        first: u64,
        count: u64,
        unmap: bool,
    ) -> Result<(), Error<D::Error>> {
        self.begin_change(first, count).await?;
        let result = self.zero_guest_range(first, first + count, unmap).await;
        self.end_change(result).await
    }

    async fn discard_clusters(&mut self, first: u64, end: u64) -> Result<(), Error<D::Error>> {
        if !self.engine.geo.v3 && self.has_backing() {
            // Unallocated would expose the backing, and v2 has no zero
            // flag: nothing is discarded (QEMU's qcow2_co_pdiscard).
            return Ok(());
        }
        let bits = self.engine.geo.cluster_sector_bits();
        let mask = self.engine.geo.cluster_sectors() - 1;
        let start = (first + mask) >> bits;
        // The disk's last cluster may be partial: reaching the end covers it.
        let stop = if end == self.engine.geo.sectors {
            crate::format::shr_ceil(end, bits)
        } else {
            end >> bits
        };
        let mut guest = start;
        while guest < stop {
            if self.has_backing() && self.engine.geo.v3 {
                // Unallocated would show the backing: flag zero instead,
                // even where nothing is allocated yet (as QEMU does).
                self.zero_cluster(guest, true).await?;
                guest += 1;
                continue;
            }
            let l2 = self.engine.l2_table_for_write(guest).await?;
            if l2 == 0 {
                // No table: every cluster it would map is unallocated.
                guest = ((guest >> self.engine.geo.l2_bits) + 1) << self.engine.geo.l2_bits;
                continue;
            }
            self.unmap_cluster(l2, guest).await?;
            guest += 1;
        }
        Ok(())
    }

    async fn zero_guest_range(
        &mut self,
        first: u64,
        end: u64,
        unmap: bool,
    ) -> Result<(), Error<D::Error>> {
        if self.engine.header.data_file_raw() {
            // The raw data file gets the zeros first, over the whole range,
            // as QEMU's qcow2_subcluster_zeroize does (guest offsets are
            // host offsets there).
            self.engine
                .dev
                .data_clear(first, end - first)
                .await
                .map_err(Error::Io)?;
            self.engine.cache.note_device_write();
        }
        let bits = self.engine.geo.cluster_sector_bits();
        let cluster_sectors = self.engine.geo.cluster_sectors();
        let mut sector = first;
        while sector < end {
            let guest = sector >> bits;
            let cluster_start = guest << bits;
            // The disk's last cluster may be partial: its end is the disk's.
            let cluster_end = (cluster_start + cluster_sectors).min(self.engine.geo.sectors);
            let piece_end = cluster_end.min(end);
            let whole = sector == cluster_start && piece_end == cluster_end;
            if whole || self.rest_reads_as_zeros(guest, sector, piece_end).await? {
                self.zero_cluster(guest, unmap).await?;
            } else {
                self.write_zero_sectors(sector, piece_end - sector).await?;
            }
            sector = piece_end;
        }
        Ok(())
    }

    /// Whether guest cluster `guest`, zeroed over sectors `[from, to)`,
    /// may take the zero flag whole, as QEMU decides for a write-zeroes
    /// that covers part of a cluster: the cluster holds no data of its own
    /// (unallocated or already a zero cluster) and the rest of it, outside
    /// the range, reads as zeros (through the backing where unallocated;
    /// what the backing has inside the range is hidden by the flag).
    async fn rest_reads_as_zeros(
        &mut self,
        guest: u64,
        from: u64,
        to: u64,
    ) -> Result<bool, Error<D::Error>> {
        let bits = self.engine.geo.cluster_sector_bits();
        let first = guest << bits;
        let end = (first + self.engine.geo.cluster_sectors()).min(self.engine.geo.sectors);
        let (mapping, _) = self.engine.map_run(first, 1).await?;
        if !matches!(mapping, Mapping::Unallocated | Mapping::Zero) {
            return Ok(false);
        }
        Ok(self.is_zeroed(first, from - first).await? && self.is_zeroed(to, end - to).await?)
    }

    /// Makes guest cluster `guest` stop using host space (if it does) and
    /// read as zeros: the zero flag on v3, unallocated on v2.
    async fn unmap_cluster(&mut self, l2: u64, guest: u64) -> Result<(), Error<D::Error>> {
        let (entry, at) = self.engine.l2_entry(l2, guest).await?;
        let allocated = match entry {
            L2Entry::Unallocated => false,
            L2Entry::Zero { offset, .. } => offset != 0,
            L2Entry::Data { .. } | L2Entry::Compressed { .. } => true,
        };
        if allocated {
            let new = if self.engine.geo.v3 { ZERO } else { 0 };
            self.engine
                .cache
                .write_u64(&mut self.engine.dev, at, Kind::L2, new)
                .await?;
            self.release(entry).await?;
        }
        Ok(())
    }

    /// Sets the zero flag on guest cluster `guest` (v3), keeping or, with
    /// `unmap`, releasing its host cluster, as QEMU's zero_in_l2_slice; a
    /// v2 image, without the flag, has the cluster discarded.
    async fn zero_cluster(&mut self, guest: u64, unmap: bool) -> Result<(), Error<D::Error>> {
        if !self.engine.geo.v3 && self.has_backing() {
            // No zero flag, and unallocated would show the backing: real
            // zeros, as QEMU falls back to.
            return self.write_zero_cluster(guest).await;
        }
        if !self.engine.geo.v3 {
            let l2 = self.engine.l2_table_for_write(guest).await?;
            return match l2 {
                0 => Ok(()),
                l2 => self.unmap_cluster(l2, guest).await,
            };
        }
        let mut l2 = self.engine.l2_table_for_write(guest).await?;
        if l2 == 0 {
            l2 = self.new_l2_table(guest).await?;
        }
        let (entry, at, old) = self.engine.l2_entry_raw(l2, guest).await?;
        let release = match entry {
            L2Entry::Compressed { .. } => true,
            L2Entry::Data { .. } => unmap,
            L2Entry::Zero { offset, .. } => unmap && offset != 0,
            L2Entry::Unallocated => false,
        };
        let new = if release { ZERO } else { old | ZERO };
        if new == old {
            return Ok(());
        }
        self.engine
            .cache
            .write_u64(&mut self.engine.dev, at, Kind::L2, new)
            .await?;
        if release {
            self.release(entry).await?;
        }
        Ok(())
    }

    /// Writes real zeros over guest sectors `[first, first + count)`, a
    /// sector at a time from a zeroed buffer.
    async fn write_zero_sectors(&mut self, first: u64, count: u64) -> Result<(), Error<D::Error>> {
        let zero: [Sector; 1] = [[0; SECTOR]];
        for sector in first..first + count {
            self.write_batched(sector, &zero).await?;
        }
        Ok(())
    }
}
