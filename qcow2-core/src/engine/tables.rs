//! Writing metadata tables outside the cache, a sector at a time through
//! one caller's sector buffer: big-endian u64 entries (L1, L2 and
//! refcount tables), and runs of refcount 1 (new refcount blocks). Create,
//! allocation and repair all write tables this way.

use crate::format::refcount;
use crate::{BlockDevice, Error, Sector, SECTOR};

/// u64 entries in a sector, as a shift.
const ENTRIES_PER_SECTOR_BITS: u32 = (SECTOR / 8).trailing_zeros();

/// Writes `count` big-endian u64 entries, `entry(n)` for entry `n`, from
/// device sector `first` on; unused entries of the last sector are zero.
pub(crate) async fn write_entries<D: BlockDevice>(
    dev: &mut D,
    buf: &mut Sector,
    first: u64,
    count: u64,
    entry: impl Fn(u64) -> u64,
) -> Result<(), Error<D::Error>> {
    let mut n = 0;
    while n < count {
        buf.fill(0);
        for (i, slot) in buf.chunks_exact_mut(8).enumerate() {
            let at = n + i as u64;
            if at < count {
                slot.copy_from_slice(&entry(at).to_be_bytes());
            }
        }
        dev.write(
            first + (n >> ENTRIES_PER_SECTOR_BITS),
            core::slice::from_ref(buf),
        )
        .await
        .map_err(Error::Io)?;
        n += 1 << ENTRIES_PER_SECTOR_BITS;
    }
    Ok(())
}

/// Sectors that [`write_entries`] writes for `count` entries.
pub(crate) const fn entry_sectors(count: u64) -> u64 {
    count.div_ceil(1 << ENTRIES_PER_SECTOR_BITS)
}

/// Writes refcount 1 for entries `[from, to)` of a run of refcount entries
/// `2^order` bits wide that starts at device sector `first` (entry 0 at its
/// first bit). Only the sectors holding those entries are written, and
/// their other entries are written as 0: a caller that keeps other
/// refcounts in those sectors (or needs the rest zeroed) sees to it.
pub(crate) async fn write_ones<D: BlockDevice>(
    dev: &mut D,
    buf: &mut Sector,
    first: u64,
    order: u32,
    from: u64,
    to: u64,
) -> Result<(), Error<D::Error>> {
    // 4096 bits per sector: 2^(12 - order) entries.
    let per_sector_bits = 12 - order;
    let mut n = from;
    while n < to {
        let sector = n >> per_sector_bits;
        let sector_start = sector << per_sector_bits;
        let end = to.min(sector_start + (1 << per_sector_bits));
        buf.fill(0);
        for e in n..end {
            refcount::set(buf, order, (e - sector_start) as usize, 1)
                .ok_or(Error::Internal("refcount block layout"))?;
        }
        dev.write(first + sector, core::slice::from_ref(buf))
            .await
            .map_err(Error::Io)?;
        n = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ram;
    use embassy_futures::block_on;

    #[test]
    fn entries_fill_whole_sectors_big_endian_and_stop_there() {
        let mut dev = ram();
        let mut buf = [0u8; SECTOR];
        block_on(write_entries(&mut dev, &mut buf, 2, 70, |n| n + 1)).unwrap();
        assert_eq!(dev.writes, 2);
        assert_eq!(entry_sectors(70), 2);
        let entry = |s: usize, i: usize| {
            u64::from_be_bytes(dev.data[s][i * 8..i * 8 + 8].try_into().unwrap())
        };
        assert_eq!((entry(2, 0), entry(2, 63)), (1, 64));
        assert_eq!(
            (entry(3, 0), entry(3, 5), entry(3, 6), entry(3, 63)),
            (65, 70, 0, 0)
        );
        // The sector after is untouched (it still carries its index).
        assert_eq!(dev.data[4][0], 4);
    }

    #[test]
    fn ones_cover_exactly_the_run_at_every_width() {
        for order in 0..=6u32 {
            let mut dev = ram();
            let mut buf = [0u8; SECTOR];
            let per_sector = 4096u64 >> order;
            // From inside the first sector to inside the second.
            let (from, to) = (3, per_sector + 5);
            block_on(write_ones(&mut dev, &mut buf, 10, order, from, to)).unwrap();
            assert_eq!(dev.writes, 2, "order {order}");
            for n in 0..2 * per_sector {
                let sector = &dev.data[10 + (n / per_sector) as usize];
                let value = refcount::get(sector, order, (n % per_sector) as usize).unwrap();
                let want = u64::from((from..to).contains(&n));
                assert_eq!(value, want, "order {order}, entry {n}");
            }
            assert_eq!(dev.data[12][0], 12);
        }
    }
}
