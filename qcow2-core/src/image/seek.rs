//! [`Qcow2`]'s sparseness, from its L1 and L2 tables
//! ([`SeekableDevice`]).

use crate::cache::SlotStorage;
use crate::codec::Workspace;
use crate::format::L2Entry;
use crate::image::backing::Backing;
use crate::{BlockDevice, Error, Qcow2, SeekableDevice};

/// log2 of the sector size.
const SECTOR_BITS: u32 = crate::SECTOR.trailing_zeros();

/// `x >> n`, 0 for shifts of 64 and more.
const fn shr(x: u64, n: u32) -> u64 {
    match x.checked_shr(n) {
        Some(v) => v,
        None => 0,
    }
}

/// `x << n`, saturating: positions past the end stop the scans.
const fn shl(x: u64, n: u32) -> u64 {
    if n >= u64::BITS || x > (u64::MAX >> n) {
        u64::MAX
    } else {
        x << n
    }
}

/// Whether a qcow2 L2 entry is guaranteed to read as zeros, unallocated
/// entries aside: those read the backing where it has sectors (maybe
/// data), zeros past its end.
const fn reads_as_zeros(entry: &L2Entry) -> bool {
    match entry {
        L2Entry::Unallocated | L2Entry::Zero { .. } => true,
        L2Entry::Data { .. } | L2Entry::Compressed { .. } => false,
    }
}

/// Sparseness from the L1 and L2 tables: unallocated and zero clusters are
/// unmapped, data and compressed clusters mapped. Costs one L1 entry per
/// L2 table's range crossed (an unallocated table is skipped whole) and
/// one L2 entry per cluster crossed in allocated tables, all through the
/// metadata cache; no guest data is read, and nothing is written.
impl<D, S, const K: usize, B, W> SeekableDevice for Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    B: Backing<D::Error>,
    W: Workspace,
{
    async fn seek_mapped(&mut self, from: u64) -> Result<u64, Self::Error> {
        self.seek_where(from, false).await
    }

    async fn seek_unmapped(&mut self, from: u64) -> Result<u64, Self::Error> {
        self.seek_where(from, true).await
    }
}

impl<D, S, const K: usize, B, W> Qcow2<D, S, K, B, W>
where
    D: BlockDevice,
    S: SlotStorage<K>,
    B: Backing<D::Error>,
    W: Workspace,
{
    /// The first sector at or after `from` that reads as zeros (`zeros`)
    /// or may hold data (`!zeros`); the virtual size in sectors when none.
    ///
    /// Not built on `map_run`: that measures the whole run at `from`, which
    /// a seek does not need (the next seek would cross it again). This
    /// stops at the first cluster of the wanted kind, looks each L1 entry
    /// up once per table range, and skips a range without a table at once.
    async fn seek_where(&mut self, from: u64, zeros: bool) -> Result<u64, Error<D::Error>> {
        let end = self.engine.geo.sectors;
        // Sectors per cluster and per L2 table's range, as shifts (cluster
        // sizes are 512 B..2 MiB, 8-byte entries: at most 30).
        let cluster_shift = self.engine.geo.cluster_bits.saturating_sub(SECTOR_BITS);
        let table_shift = cluster_shift + self.engine.geo.cluster_bits.saturating_sub(3);
        // Unallocated sectors below this read the backing: maybe data.
        let backing_end = self.backing_sectors();
        // The answer inside an unallocated span [sector, span_end), if any.
        let in_unallocated = |sector: u64, span_end: u64| -> Option<u64> {
            let at = if zeros {
                sector.max(backing_end)
            } else {
                sector
            };
            let found = if zeros {
                at < span_end
            } else {
                at < backing_end
            };
            found.then_some(at)
        };
        let mut sector = from;
        // The L2 table of the range being crossed: (range index, offset).
        let mut table: Option<(u64, u64)> = None;
        while sector < end {
            let range = shr(sector, table_shift);
            let l2 = match table {
                Some((r, l2)) if r == range => l2,
                _ => {
                    let l2 = self.engine.l2_table(shr(sector, cluster_shift)).await?;
                    table = Some((range, l2));
                    l2
                }
            };
            if l2 == 0 {
                // No table: the whole range is unallocated.
                let range_end = shl(range.saturating_add(1), table_shift).min(end);
                if let Some(at) = in_unallocated(sector, range_end) {
                    return Ok(at);
                }
                sector = range_end;
                continue;
            }
            let guest = shr(sector, cluster_shift);
            let cluster_end = shl(guest.saturating_add(1), cluster_shift).min(end);
            let (entry, _) = self.engine.l2_entry(l2, guest).await?;
            if entry == L2Entry::Unallocated {
                if let Some(at) = in_unallocated(sector, cluster_end) {
                    return Ok(at);
                }
            } else if reads_as_zeros(&entry) == zeros {
                return Ok(sector);
            }
            sector = cluster_end;
        }
        Ok(end)
    }
}
