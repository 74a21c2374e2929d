use super::*;
use embassy_futures::block_on;

use crate::testing::ram;

#[test]
fn hits_misses_and_eviction_keep_contents() {
    block_on(async {
        let mut dev = ram();
        let mut cache = Cache::<_, 1>::new::<()>([const { Slot::<1>::EMPTY }; 3], 512, false)
            .ok()
            .unwrap();
        for round in 0..3 {
            for sector in 0..10u64 {
                let b = cache
                    .get(&mut dev, sector * 512 + 7, Kind::L2)
                    .await
                    .unwrap();
                assert_eq!(b[0], sector as u8, "round {round}");
            }
        }
        // Dirty data survives eviction by being written back.
        cache
            .write_u64(&mut dev, 512 * 5 + 8, Kind::L2, 0xdead_beef)
            .await
            .unwrap();
        for sector in 10..20u64 {
            cache.get(&mut dev, sector * 512, Kind::L2).await.unwrap();
        }
        assert_eq!(&dev.data[5][8..16], &0xdead_beef_u64.to_be_bytes());
        assert_eq!(
            cache
                .read_u64(&mut dev, 512 * 5 + 8, Kind::L2)
                .await
                .unwrap(),
            0xdead_beef
        );
    });
}

#[test]
fn mapping_writeback_waits_for_refcounts_and_a_flush() {
    block_on(async {
        let mut dev = ram();
        let mut cache = Cache::<_, 1>::new::<()>([const { Slot::<1>::EMPTY }; 4], 512, false)
            .ok()
            .unwrap();
        cache
            .write_u64(&mut dev, 512 * 2, Kind::L2, 1)
            .await
            .unwrap();
        cache
            .write_u64(&mut dev, 512 * 3, Kind::RefBlock, 1)
            .await
            .unwrap();
        cache.flush(&mut dev).await.unwrap();
        // Refcount sector 3 first, then a flush, then the L2 sector 2, then a flush.
        assert_eq!(
            &dev.log[..4],
            &[(3, false), (0, true), (2, false), (0, true)]
        );
    });
}

#[test]
fn forget_drops_dirty_slices() {
    block_on(async {
        let mut dev = ram();
        let mut cache = Cache::<_, 1>::new::<()>([const { Slot::<1>::EMPTY }; 4], 512, false)
            .ok()
            .unwrap();
        cache
            .write_u64(&mut dev, 512 * 2, Kind::L2, 7)
            .await
            .unwrap();
        cache.forget_range::<()>(1024, 512).unwrap();
        cache.flush(&mut dev).await.unwrap();
        assert_eq!(dev.writes, 0);
        assert_eq!(
            cache.read_u64(&mut dev, 1024, Kind::L2).await.unwrap() >> 56,
            2
        );
    });
}

#[test]
fn slices_never_exceed_a_cluster() {
    let cache = Cache::<_, 8>::new::<()>([const { Slot::<8>::EMPTY }; 2], 512, false)
        .ok()
        .unwrap();
    assert_eq!(cache.slice_bytes(), 512);
    let cache = Cache::<_, 8>::new::<()>([const { Slot::<8>::EMPTY }; 2], 65536, false)
        .ok()
        .unwrap();
    assert_eq!(cache.slice_bytes(), 4096);
    assert!(Cache::<_, 1>::new::<()>([Slot::<1>::EMPTY; 0], 512, false).is_err());
}

#[cfg(feature = "write")]
#[test]
fn held_releases_merge_and_count() {
    let mut cache = Cache::<_, 1>::new::<()>([const { Slot::<1>::EMPTY }; 2], 512, false)
        .ok()
        .unwrap();
    // Adjacent clusters freed in a row: one range.
    assert!(cache.hold_release(10, 1));
    assert!(cache.hold_release(11, 1));
    // A shared (compressed) extent released twice: one range, twice.
    assert!(cache.hold_release(20, 2));
    assert!(cache.hold_release(20, 2));
    let held: [u64; 14] = core::array::from_fn(|i| cache.held_decrease(9 + i as u64));
    assert_eq!(held, [0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 0]);
    assert!(cache.hold_release(30, 1));
    assert!(cache.hold_release(40, 1));
    // Full: the caller runs a flush cycle.
    assert!(!cache.hold_release(50, 1));
    let mut taken = 0;
    while let Some(h) = cache.take_release() {
        taken += u64::from(h.clusters) * u64::from(h.times);
    }
    assert_eq!(taken, 2 + 4 + 1 + 1);
    assert!(!cache.holds_releases());
}
