//! The write path: in-place overwrites and allocating writes.

use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::codec::Workspace;
use crate::format::{shr_ceil, L1Entry, L2Entry};
use crate::image::backing::Backing;
use crate::image::decompress::decompress;
use crate::image::fill::{read_backing_into, Fill, Target};
use crate::{BlockDevice, Error, Qcow2, Sector, SECTOR};

/// Clusters resolved before their data is written.
const BATCH: usize = 16;

/// Where one guest cluster of a write goes.
#[derive(Clone, Copy)]
struct Placement {
    /// Host byte offset of the cluster.
    host: u64,
    /// Host byte offset of its L2 entry.
    entry_at: u64,
    /// Newly allocated (or a preallocated zero cluster): needs filling
    /// around the data and an L2 entry once the data is written.
    fresh: bool,
    /// What fills a fresh cluster around the data (copy-on-write).
    fill: Fill,
    /// The mapping the new entry replaces, to release once it is written
    /// (a compressed cluster), or `Unallocated`.
    replaces: L2Entry,
}

impl Placement {
    const EMPTY: Self = Placement {
        host: 0,
        entry_at: 0,
        fresh: false,
        fill: Fill::Zeros,
        replaces: L2Entry::Unallocated,
    };
}

impl<D, S, const K: usize, B, W> Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    B: Backing<D::Error>,
    W: Workspace,
{
    /// Writes `buf` at guest sector `first` in batches of clusters: first
    /// every cluster of the batch gets its host location (allocating where
    /// needed), then the data goes out in one device write per physically
    /// contiguous run, and only then do new L2 entries point at it.
    pub(crate) async fn write_batched(
        &mut self,
        first: u64,
        buf: &[Sector],
    ) -> Result<(), Error<D::Error>> {
        let sector_bits = self.engine.geo.cluster_bits - 9;
        let cluster_sectors = self.engine.geo.cluster_sectors();
        let mut sector = first;
        let mut rest = buf;
        while !rest.is_empty() {
            let within = sector & (cluster_sectors - 1);
            let span = (shr_ceil(within + rest.len() as u64, sector_bits) as usize).min(BATCH);
            let n = ((span as u64) * cluster_sectors - within).min(rest.len() as u64);
            let (now, later) = rest
                .split_at_checked(n as usize)
                .ok_or(Error::Internal("write batch longer than the buffer"))?;
            let mut plan = [Placement::EMPTY; BATCH];
            let guest = sector >> sector_bits;
            for (i, p) in plan.iter_mut().enumerate().take(span) {
                *p = self.place(guest + i as u64).await?;
            }
            let plan = plan.get(..span).unwrap_or(&[]);
            self.write_planned(plan, sector, now).await?;
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
            for p in plan.iter().filter(|p| p.replaces != L2Entry::Unallocated) {
                // Rule 2: after the new entries (release() orders it).
                self.release(p.replaces).await?;
            }
            sector += n;
            rest = later;
        }
        Ok(())
    }

    /// Writes zeros over the whole of guest cluster `guest` (allocating
    /// it): for v2 images over a backing, which have no zero flag.
    pub(crate) async fn write_zero_cluster(&mut self, guest: u64) -> Result<(), Error<D::Error>> {
        let p = self.place(guest).await?;
        let sectors = self.engine.geo.cluster_sectors();
        self.engine
            .dev
            .data_write_zeros(p.host / SECTOR as u64, sectors)
            .await
            .map_err(Error::Io)?;
        self.engine.cache.note_device_write();
        if p.fresh {
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
        self.release(p.replaces).await
    }

    /// Where guest cluster `guest` is written: its current cluster when
    /// owned, or a newly allocated (or preallocated zero) one.
    async fn place(&mut self, guest: u64) -> Result<Placement, Error<D::Error>> {
        let mut l2 = self.engine.l2_table_for_write(guest).await?;
        if l2 == 0 {
            l2 = self.new_l2_table(guest).await?;
        }
        let (entry, entry_at) = self.engine.l2_entry(l2, guest).await?;
        let mut fill = Fill::Zeros;
        let mut replaces = L2Entry::Unallocated;
        let (host, fresh) = match entry {
            L2Entry::Data {
                offset,
                copied: true,
            } => {
                self.check_not_metadata(offset).await?;
                (offset, false)
            }
            L2Entry::Data { copied: false, .. } => {
                return Err(Error::corrupt(
                    crate::Corruption::L2EntryNotCopied,
                    entry_at,
                ))
            }
            L2Entry::Compressed { offset, len } => {
                // Copy-on-write: decompress into a new cluster, then drop
                // the compressed one's references.
                fill = Fill::Compressed { host: offset, len };
                replaces = entry;
                (self.alloc_data(guest).await?, true)
            }
            // A preallocated zero cluster we own is reused in place.
            L2Entry::Zero {
                offset,
                copied: true,
            } if offset != 0 => {
                self.check_not_metadata(offset).await?;
                (offset, true)
            }
            L2Entry::Zero { .. } => (self.alloc_data(guest).await?, true),
            L2Entry::Unallocated => {
                if self.backing_covers(guest) {
                    fill = Fill::Backing;
                }
                (self.alloc_data(guest).await?, true)
            }
        };
        Ok(Placement {
            host,
            entry_at,
            fresh,
            fill,
            replaces,
        })
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

    /// Writes `data` (guest sectors from `first`) to the planned clusters,
    /// zero-filling the uncovered parts of fresh clusters, one device write
    /// per run of physically contiguous clusters.
    async fn write_planned(
        &mut self,
        plan: &[Placement],
        first: u64,
        data: &[Sector],
    ) -> Result<(), Error<D::Error>> {
        let cluster_sectors = self.engine.geo.cluster_sectors();
        let sector_bits = self.engine.geo.cluster_bits - 9;
        // Allocations for later clusters of the batch may have put a table
        // on a cluster planned for an in-place write (zeroed refcounts).
        for p in plan.iter().filter(|p| !p.fresh) {
            self.check_not_metadata(p.host).await?;
        }
        let mask = cluster_sectors - 1;
        let within = first & mask;
        let last = plan.len().saturating_sub(1);
        let tail = (cluster_sectors - ((within + data.len() as u64) & mask)) & mask;
        // Pending run: host sector where it starts, and data index range.
        let (mut run_host, mut run_from, mut run_to) = (0u64, 0usize, 0usize);
        for (i, p) in plan.iter().enumerate() {
            let skip = if i == 0 { within } else { 0 };
            let host_sector = p.host / SECTOR as u64 + skip;
            let from = if i == 0 {
                0
            } else {
                (i as u64 * cluster_sectors - within) as usize
            };
            let to = (((i + 1) as u64 * cluster_sectors - within) as usize).min(data.len());
            let partial = skip > 0 || (i == last && tail > 0);
            if p.fresh && partial && p.fill != Fill::Zeros {
                // Copy-on-write of the cluster's old contents, on its own.
                self.write_run(run_host, data.get(run_from..run_to)).await?;
                run_from = to;
                run_to = to;
                let guest = (first >> sector_bits) + i as u64;
                self.copy_on_write(p, guest, skip, data.get(from..to))
                    .await?;
                continue;
            }
            if p.fresh && skip > 0 {
                self.engine
                    .dev
                    .data_write_zeros(p.host / SECTOR as u64, skip)
                    .await
                    .map_err(Error::Io)?;
            }
            if run_to > run_from && run_host + (run_to - run_from) as u64 == host_sector {
                run_to = to;
            } else {
                self.write_run(run_host, data.get(run_from..run_to)).await?;
                (run_host, run_from, run_to) = (host_sector, from, to);
            }
            if p.fresh && i == last && tail > 0 {
                // The run must reach the disk before the zeros that follow it.
                self.write_run(run_host, data.get(run_from..run_to)).await?;
                run_from = run_to;
                let end = host_sector + (to - from) as u64;
                self.engine
                    .dev
                    .data_write_zeros(end, tail)
                    .await
                    .map_err(Error::Io)?;
            }
        }
        self.write_run(run_host, data.get(run_from..run_to)).await?;
        self.engine.cache.note_device_write();
        Ok(())
    }

    /// Writes fresh cluster `p` (guest cluster `guest`) whole: its old
    /// contents from `p.fill` with `data` over them from cluster sector
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
        let cluster_sectors = self.engine.geo.cluster_sectors();
        let host = p.host / SECTOR as u64;
        let end = skip + data.len() as u64;
        let guest_sector = guest << (self.engine.geo.cluster_bits - 9);
        let whole = cluster_sectors as usize;
        if self.ws.parts().bounce.len() >= whole {
            if let Fill::Compressed { host, len } = p.fill {
                decompress(&mut self.engine, &mut self.ws, host, len, Target::Bounce).await?;
            }
            let bounce = self.ws.parts().bounce;
            let buf = bounce
                .get_mut(..whole)
                .ok_or(Error::Internal("bounce buffer shrank"))?;
            if p.fill == Fill::Backing {
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
            match p.fill {
                Fill::Compressed { host: from, len } => {
                    let target = Target::Device {
                        host,
                        skip: (skip, end),
                    };
                    decompress(&mut self.engine, &mut self.ws, from, len, target).await?;
                }
                _ => {
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
