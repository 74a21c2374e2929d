//! Refcount block entries of every width from 1 to 64 bits.
//!
//! Entries narrower than a byte are packed starting at the least significant
//! bit; wider ones are big-endian.

/// Reads entry `index` of width `1 << order` bits from `block`.
///
/// Returns `None` when the entry lies outside `block`.
pub fn get(block: &[u8], order: u32, index: usize) -> Option<u64> {
    let bits = 1usize << order;
    if bits < 8 {
        let bit = index.checked_mul(bits)?;
        let byte = *block.get(bit / 8)?;
        let mask = (1u16 << bits) - 1;
        Some(u64::from((u16::from(byte) >> (bit % 8)) & mask))
    } else {
        let width = bits / 8;
        let start = index.checked_mul(width)?;
        let bytes = block.get(start..start.checked_add(width)?)?;
        Some(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
}

/// Writes `value` into entry `index` of width `1 << order` bits of `block`.
///
/// Returns `None` (changing nothing) when the entry lies outside `block` or
/// `value` does not fit the width.
pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) -> Option<()> {
    if value > max_value(order) {
        return None;
    }
    let bits = 1usize << order;
    if bits < 8 {
        let bit = index.checked_mul(bits)?;
        let byte = block.get_mut(bit / 8)?;
        let shift = bit % 8;
        let mask = (((1u16 << bits) - 1) << shift) as u8;
        // `value` fits in `bits` (< 8) bits, checked above.
        let shifted = ((value as u16) << shift) as u8;
        *byte = (*byte & !mask) | shifted;
    } else {
        let width = bits / 8;
        let start = index.checked_mul(width)?;
        let bytes = block.get_mut(start..start.checked_add(width)?)?;
        let be = value.to_be_bytes();
        bytes.copy_from_slice(be.get(8 - width..)?);
    }
    Some(())
}

/// The largest refcount an entry of width `1 << order` bits can hold.
pub const fn max_value(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Number of entries of width `1 << order` bits in `bytes` bytes.
pub const fn entries_in(bytes: u64, order: u32) -> u64 {
    (bytes * 8) >> order
}

/// Sizes a complete set of refcount structures placed at cluster `start`:
/// `(blocks, table_clusters)` such that the blocks cover every cluster
/// below `covered` and the structures themselves (blocks and table,
/// contiguous from `start`). `per_block` is the number of entries in a
/// block, `cluster_size` the cluster size in bytes: both powers of two.
///
/// Returns `None` when the sizes do not settle (impossible for sane
/// inputs: each round only grows them, by less each time).
pub fn self_covering_layout(
    per_block: u64,
    cluster_size: u64,
    covered: u64,
    start: u64,
) -> Option<(u64, u64)> {
    self_covering_layout_before(per_block, cluster_size, covered, start, 0)
}

/// [`self_covering_layout`] when `after` more clusters follow the
/// structures and must be covered too (a new image's L1 table).
pub fn self_covering_layout_before(
    per_block: u64,
    cluster_size: u64,
    covered: u64,
    start: u64,
    after: u64,
) -> Option<(u64, u64)> {
    self_covering_layout_with(per_block, cluster_size, covered, start, after, 0, 1)
}

/// The one sizing of refcount structures that every placement uses
/// (create, refcount-table growth, rebuild): `(new_blocks, table_clusters)`
/// for new blocks and a new table placed contiguously from cluster `start`,
/// followed by `after` other clusters, such that the `existing_blocks`
/// blocks (covering clusters from 0) plus the new ones cover every cluster
/// below `covered` and everything placed, and the table (at least
/// `min_table` clusters) has an entry for every block. `per_block` and
/// `cluster_size` are powers of two.
///
/// Returns `None` when the sizes overflow or do not settle (impossible for
/// sane inputs: each round only grows them, by less each time).
pub fn self_covering_layout_with(
    per_block: u64,
    cluster_size: u64,
    covered: u64,
    start: u64,
    after: u64,
    existing_blocks: u64,
    min_table: u64,
) -> Option<(u64, u64)> {
    // Powers of two: shifts, no division (firmware has no 64-bit divide).
    let (block_bits, cluster_bits) = (per_block.trailing_zeros(), cluster_size.trailing_zeros());
    let (mut blocks, mut table) = (1u64, min_table.max(1));
    for _ in 0..64 {
        let end = start
            .checked_add(blocks)?
            .checked_add(table)?
            .checked_add(after)?;
        let total = super::shr_ceil(covered.max(end), block_bits);
        let need_blocks = total.saturating_sub(existing_blocks);
        let need_table = super::shr_ceil(total.checked_mul(8)?, cluster_bits).max(min_table);
        if need_blocks <= blocks && need_table <= table {
            return Some((blocks, table));
        }
        blocks = blocks.max(need_blocks);
        table = table.max(need_table);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_and_isolates_neighbours() {
        for order in 0..=6u32 {
            let mut block = [0u8; 64];
            let n = entries_in(64, order) as usize;
            let max = max_value(order);
            for i in 0..n {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                set(&mut block, order, i, v).unwrap();
            }
            for i in 0..n {
                let v = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
                assert_eq!(get(&block, order, i), Some(v), "order {order} index {i}");
            }
            // Overwrite one entry with max and zero; neighbours are untouched.
            set(&mut block, order, 3, max).unwrap();
            assert_eq!(get(&block, order, 3), Some(max));
            set(&mut block, order, 3, 0).unwrap();
            assert_eq!(get(&block, order, 3), Some(0));
            let v2 = 2u64.wrapping_mul(0x9e37_79b9_7f4a_7c15) & max;
            assert_eq!(get(&block, order, 2), Some(v2));
            assert_eq!(get(&block, order, n), None);
            assert_eq!(set(&mut block, order, n, 0), None);
        }
    }

    #[test]
    fn sub_byte_entries_start_at_lsb() {
        let mut block = [0u8; 1];
        set(&mut block, 0, 0, 1).unwrap();
        assert_eq!(block[0], 0b0000_0001);
        set(&mut block, 1, 1, 3).unwrap();
        assert_eq!(block[0], 0b0000_1101);
        let mut block = [0u8; 1];
        set(&mut block, 2, 1, 0xa).unwrap();
        assert_eq!(block[0], 0xa0);
    }

    #[test]
    fn wide_entries_are_big_endian() {
        let mut block = [0u8; 8];
        set(&mut block, 4, 1, 0x1234).unwrap();
        assert_eq!(&block[2..4], &[0x12, 0x34]);
        set(&mut block, 6, 0, 0x0102_0304_0506_0708).unwrap();
        assert_eq!(block, [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn values_too_wide_are_refused() {
        let mut block = [0u8; 8];
        assert_eq!(set(&mut block, 0, 0, 2), None);
        assert_eq!(set(&mut block, 4, 0, 0x1_0000), None);
        assert_eq!(block, [0; 8]);
        assert_eq!(max_value(0), 1);
        assert_eq!(max_value(4), 0xffff);
        assert_eq!(max_value(6), u64::MAX);
    }

    #[test]
    fn self_covering_layout_covers_itself() {
        // 512-byte clusters, 16-bit refcounts: 256 entries a block.
        for (covered, start) in [(10, 10), (10, 2), (255, 255), (256, 300), (70_000, 70_000)] {
            let (blocks, table) = self_covering_layout(256, 512, covered, start).unwrap();
            let end = covered.max(start + blocks + table);
            assert!(blocks * 256 >= end, "{covered} {start}");
            assert!(table * 512 >= blocks * 8, "{covered} {start}");
            // Minimal: one block fewer would not cover.
            assert!((blocks - 1) * 256 < end, "{covered} {start}");
        }
        assert_eq!(self_covering_layout(256, 512, 10, 2), Some((1, 1)));
        assert_eq!(self_covering_layout(256, 512, 10, u64::MAX), None);
    }
}
