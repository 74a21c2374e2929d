//! The write path, as plan, execute, commit (see [`crate::image::plan`]):
//! prepare maps each cluster of a batch and allocates what the plan asks
//! for; execution writes guest data only; commit links new clusters into
//! their L2 tables and releases what they replaced.

use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::codec::Workspace;
use crate::format::{shr_ceil, L1Entry, L2Entry};
use crate::image::backing::Backing;
use crate::image::decompress::decompress;
use crate::image::fill::{read_backing_into, Target};
use crate::image::plan::{self, Placement, Schedule, Source, Step};
use crate::{BlockDevice, Corruption, Error, Qcow2, Sector, SECTOR};

/// Clusters planned together: their data goes out in one device write
/// per physically contiguous run.
const BATCH: usize = 16;

impl<D, S, const K: usize, B, W> Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    B: Backing<D::Error>,
    W: Workspace,
{
    /// Writes `buf` at guest sector `first`, a batch of clusters at a time:
    /// prepared (every cluster placed, new clusters allocated), executed
    /// (the data written), committed (new L2 entries, then releases).
    pub(crate) async fn write_batched(
        &mut self,
        first: u64,
        buf: &[Sector],
    ) -> Result<(), Error<D::Error>> {
        let cluster_sectors = self.engine.geo.cluster_sectors();
        let mut sector = first;
        let mut rest = buf;
        while !rest.is_empty() {
            let within = sector & (cluster_sectors - 1);
            let room = BATCH as u64 * cluster_sectors - within;
            let n = room.min(rest.len() as u64);
            let (now, later) = rest
                .split_at_checked(n as usize)
                .ok_or(Error::Internal("write batch longer than the buffer"))?;
            let mut plan = [Placement::EMPTY; BATCH];
            // A shift, not a division: no panic site for a zero divisor.
            let span = shr_ceil(within + n, self.engine.geo.cluster_sector_bits()) as usize;
            let plan = plan
                .get_mut(..span)
                .ok_or(Error::Internal("write batch past its plan"))?;
            self.prepare(plan, sector, n).await?;
            self.execute(plan, sector, now).await?;
            self.commit(plan).await?;
            sector += n;
            rest = later;
        }
        Ok(())
    }

    /// Writes zeros over the whole of guest cluster `guest` (allocating
    /// it): for v2 images over a backing, which have no zero flag.
    pub(crate) async fn write_zero_cluster(&mut self, guest: u64) -> Result<(), Error<D::Error>> {
        let sectors = self.engine.geo.cluster_sectors();
        let mut plan = [Placement::EMPTY];
        let first = self.engine.geo.cluster_sector(guest);
        self.prepare(&mut plan, first, sectors).await?;
        let [p] = plan;
        self.engine
            .dev
            .data_write_zeros(p.host / SECTOR as u64, sectors)
            .await
            .map_err(Error::Io)?;
        self.engine.cache.note_device_write();
        self.commit(&plan).await
    }

    /// Prepares a batch: places each cluster of the `len` sectors from
    /// guest sector `first` (making L2 tables where missing), then
    /// allocates the clusters the plan needs, once for the batch, and only
    /// then settles the in-place clusters: an allocation (a new refcount
    /// block on zeroed refcounts) may have put metadata on one.
    async fn prepare(
        &mut self,
        plan: &mut [Placement],
        first: u64,
        len: u64,
    ) -> Result<(), Error<D::Error>> {
        let geo = &self.engine.geo;
        let cluster_sectors = geo.cluster_sectors();
        let (guest, within) = (geo.sector_cluster(first), first & (cluster_sectors - 1));
        for (i, p) in plan.iter_mut().enumerate() {
            let start = (i as u64 * cluster_sectors).saturating_sub(within);
            let skip = if i == 0 { within } else { 0 };
            let end = cluster_sectors.min(skip + len - start);
            let mask = self.engine.geo.subcluster_mask(skip, end);
            let guest = guest + i as u64;
            let mut l2 = self.engine.l2_table_for_write(guest).await?;
            if l2 == 0 {
                l2 = self.new_l2_table(guest).await?;
            }
            let (entry, entry_at) = self.engine.l2_entry(l2, guest).await?;
            *p = plan::place(entry, entry_at, self.backing_covers(guest), mask);
            if let Source::Shared { .. } = p.source {
                // Copy-on-write of shared clusters comes with internal
                // snapshots; without them, a clear COPIED flag is damage.
                return Err(Error::corrupt(Corruption::L2EntryNotCopied, entry_at));
            }
        }
        for (i, p) in plan.iter_mut().enumerate() {
            if p.alloc {
                p.host = self.alloc_data(guest + i as u64).await?;
            }
        }
        for p in plan.iter().filter(|p| !p.alloc) {
            self.check_not_metadata(p.host).await?;
        }
        Ok(())
    }

    /// Writes `data` (guest sectors from `first`) where `plan` places it,
    /// with fresh clusters filled around it, as the [`Schedule`] orders.
    async fn execute(
        &mut self,
        plan: &[Placement],
        first: u64,
        data: &[Sector],
    ) -> Result<(), Error<D::Error>> {
        let cluster_sectors = self.engine.geo.cluster_sectors();
        let within = first & (cluster_sectors - 1);
        let mut schedule = Schedule::new(within, data.len(), cluster_sectors);
        while let Some(step) = schedule.next(plan) {
            match step {
                Step::Data { host, from, to } => self.write_run(host, data.get(from..to)).await?,
                Step::Zeros { host, count } => self
                    .engine
                    .dev
                    .data_write_zeros(host, count)
                    .await
                    .map_err(Error::Io)?,
                Step::Copy {
                    index,
                    skip,
                    from,
                    to,
                } => {
                    let p = plan
                        .get(index)
                        .ok_or(Error::Internal("schedule past the plan"))?;
                    let guest = self.engine.geo.sector_cluster(first) + index as u64;
                    self.copy_on_write(p, guest, skip, data.get(from..to))
                        .await?;
                }
            }
        }
        self.engine.cache.note_device_write();
        Ok(())
    }

    /// Links the fresh clusters of `plan` into their L2 tables, then
    /// releases what they replaced (rule 2: after the new entries).
    async fn commit(&mut self, plan: &[Placement]) -> Result<(), Error<D::Error>> {
        for p in plan.iter().filter(|p| p.fresh) {
            // Durable only after the data and the refcount: the cache
            // flushes the device before writing any L2 slice.
            self.engine
                .cache
                .write_u64(
                    &mut self.engine.dev,
                    p.entry_at,
                    Kind::L2,
                    L2Entry::data(p.host),
                )
                .await?;
        }
        for p in plan {
            let old = p.replaces();
            if old != L2Entry::Unallocated {
                self.release(old).await?;
            }
        }
        Ok(())
    }

    /// A host cluster for guest cluster `guest`'s data: from the refcounts,
    /// or, with an external data file, the guest offset itself, outside
    /// the refcounts (as QEMU's `do_alloc_cluster_offset`; see
    /// [`crate::engine::data`]).
    async fn alloc_data(&mut self, guest: u64) -> Result<u64, Error<D::Error>> {
        if self.engine.external_data() {
            return guest
                .checked_shl(self.engine.geo.cluster_bits)
                .ok_or(Error::OutOfRange);
        }
        self.engine.alloc_cluster().await
    }

    /// Writes fresh cluster `p` (guest cluster `guest`) whole: its old
    /// contents from `p.source` with `data` over them from cluster sector
    /// `skip`. In one device write when the workspace's bounce buffer holds
    /// a cluster; else the old contents go sector by sector.
    async fn copy_on_write(
        &mut self,
        p: &Placement,
        guest: u64,
        skip: u64,
        data: Option<&[Sector]>,
    ) -> Result<(), Error<D::Error>> {
        let data = data.ok_or(Error::Internal("copy-on-write data past the buffer"))?;
        if let Source::Zeros | Source::Shared { .. } = p.source {
            // The schedule copies only from a backing or a compressed
            // cluster (shared clusters are refused when prepared).
            return Err(Error::Internal("copy-on-write from an uncopied source"));
        }
        let cluster_sectors = self.engine.geo.cluster_sectors();
        let host = p.host / SECTOR as u64;
        let end = skip + data.len() as u64;
        let guest_sector = self.engine.geo.cluster_sector(guest);
        let whole = cluster_sectors as usize;
        if self.ws.parts().bounce.len() >= whole {
            if let Source::Compressed { host, len } = p.source {
                decompress(&mut self.engine, &mut self.ws, host, len, Target::Bounce).await?;
            }
            let bounce = self.ws.parts().bounce;
            let buf = bounce
                .get_mut(..whole)
                .ok_or(Error::Internal("bounce buffer shrank"))?;
            if p.source == Source::Backing {
                read_backing_into(&mut self.backing, guest_sector, buf).await?;
            }
            // Equal lengths; zipped, as `copy_from_slice` panics otherwise.
            buf.get_mut(skip as usize..end as usize)
                .ok_or(Error::Internal("copy-on-write data past the cluster"))?
                .iter_mut()
                .zip(data)
                .for_each(|(d, s)| *d = *s);
            self.engine
                .dev
                .data_write(host, buf)
                .await
                .map_err(Error::Io)?;
        } else {
            match p.source {
                Source::Compressed { host: from, len } => {
                    let target = Target::Device {
                        host,
                        skip: (skip, end),
                    };
                    decompress(&mut self.engine, &mut self.ws, from, len, target).await?;
                }
                Source::Backing | Source::Zeros | Source::Shared { .. } => {
                    for s in (0..skip).chain(end..cluster_sectors) {
                        let sector = core::slice::from_mut(&mut self.engine.scratch);
                        read_backing_into(&mut self.backing, guest_sector + s, sector).await?;
                        self.engine
                            .dev
                            .data_write(host + s, core::slice::from_ref(&self.engine.scratch))
                            .await
                            .map_err(Error::Io)?;
                    }
                }
            }
            self.engine
                .dev
                .data_write(host + skip, data)
                .await
                .map_err(Error::Io)?;
        }
        self.engine.cache.note_device_write();
        Ok(())
    }

    async fn write_run(
        &mut self,
        host_sector: u64,
        data: Option<&[Sector]>,
    ) -> Result<(), Error<D::Error>> {
        match data {
            Some(d) if !d.is_empty() => self
                .engine
                .dev
                .data_write(host_sector, d)
                .await
                .map_err(Error::Io),
            _ => Ok(()),
        }
    }

    /// Refuses guest writes into a cluster that is visibly metadata: held
    /// in the cache as a table slice, or a refcount block covering itself
    /// (where refcount blocks normally live). See [`crate::OpenOptions::verify`].
    /// An external data file holds no metadata (QEMU skips its overlap
    /// check there too).
    async fn check_not_metadata(&mut self, host: u64) -> Result<(), Error<D::Error>> {
        if self.engine.external_data() {
            return Ok(());
        }
        let cluster = host >> self.engine.geo.cluster_bits;
        if self
            .engine
            .cache
            .holds_any(host, self.engine.geo.cluster_size)
            || self.engine.refblock_of(cluster).await? == host
        {
            return Err(Error::corrupt(crate::Corruption::DataIsMetadata, host));
        }
        Ok(())
    }

    /// Allocates a zeroed L2 table for guest cluster `guest` and links it
    /// into the L1 table; returns its host offset.
    pub(crate) async fn new_l2_table(&mut self, guest: u64) -> Result<u64, Error<D::Error>> {
        let at = self.engine.l1_entry_offset(guest)?;
        let table = self.engine.alloc_cluster().await?;
        let sectors = self.engine.geo.cluster_sectors();
        self.engine
            .dev
            .write_zeros(table / SECTOR as u64, sectors)
            .await
            .map_err(Error::Io)?;
        self.engine.cache.note_device_write();
        // Written back only after the zeroed table and its refcount are durable
        // (rules 1 and 3).
        self.engine
            .cache
            .write_u64(&mut self.engine.dev, at, Kind::L1, L1Entry::new(table).0)
            .await?;
        Ok(table)
    }
}
