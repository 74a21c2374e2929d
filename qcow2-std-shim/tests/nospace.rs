//! Devices that run out of room, as in firmware (a fixed-size RAM device):
//! a write that finds no free cluster fails with `Error::NoSpace` and loses
//! nothing flushed; a refcount rebuild with no room for new structures
//! rewrites them in place under the dirty bit, and one that cannot fails
//! with `Error::NoSpace` before writing anything.

use qcow2_core::{
    BlockDevice, CreateOptions, Error, OpenOptions, Qcow2, Repair, Sector, Slot, Version, SECTOR,
};
use qcow2_std_shim::{block_on, RamDevice};

type Cache = [Slot<1>; 8];
type Image = Qcow2<RamDevice, Cache, 1>;

fn cache() -> Cache {
    [const { Slot::<1>::EMPTY }; 8]
}

fn options(size: u64, cluster_bits: u32, lazy_refcounts: bool) -> CreateOptions {
    CreateOptions {
        size,
        cluster_bits,
        refcount_order: 4,
        version: Version::V3,
        lazy_refcounts,
        ..CreateOptions::new(size)
    }
}

fn sectors(n: usize, byte: u8) -> Vec<Sector> {
    vec![[byte; SECTOR]; n]
}

/// A fixed-size RAM device holding `bytes`, `spare` sectors larger.
fn fixed(bytes: &[u8], spare: u64) -> RamDevice {
    let (data, rest) = bytes.as_chunks::<SECTOR>();
    assert!(rest.is_empty());
    let mut dev = RamDevice::fixed(data.len() as u64 + spare);
    block_on(dev.write(0, data)).unwrap();
    dev
}

fn open(
    dev: RamDevice,
    options: OpenOptions,
) -> Result<Image, (Error<qcow2_std_shim::RamError>, RamDevice)> {
    block_on(Image::open(dev, cache(), options)).map_err(|e| (e.error, e.device))
}

/// Writes until the 1 MiB device is full: `Error::NoSpace`, and after a
/// close (or a crash, with lazy refcounts) the flushed data reads back and
/// the image is consistent (leaks at most, which a repair removes).
#[test]
fn a_fixed_device_that_runs_out_keeps_flushed_data() {
    for lazy in [false, true] {
        let what = if lazy { "lazy refcounts" } else { "refcounts" };
        let img = Qcow2::create(RamDevice::fixed(2048), cache(), options(4 << 20, 12, lazy));
        let mut img = block_on(img).unwrap();
        let flushed = sectors(256, 0x11);
        block_on(img.write(0, &flushed)).unwrap();
        block_on(img.flush()).unwrap();
        let mut first = 256;
        let err = loop {
            assert!(first < 8192, "{what}: 4 MiB written into a 1 MiB device");
            match block_on(img.write(first, &sectors(64, 0x22))) {
                Ok(()) => first += 64,
                Err(e) => break e,
            }
        };
        assert_eq!(err, Error::NoSpace, "{what}");
        // Allocation stops short of the end: flushing and closing work.
        let dev = if lazy {
            img.abandon().0
        } else {
            block_on(img.close()).unwrap().0
        };
        assert_eq!(dev.sector_count(), 2048);

        let mut img = open(dev, OpenOptions::read_write())
            .unwrap_or_else(|(e, _)| panic!("{what}: reopen: {e}"));
        let mut back = sectors(256, 0);
        block_on(img.read(0, &mut back)).unwrap();
        assert!(back == flushed, "{what}: flushed data changed");
        let mut scratch = vec![0u8; 1 << 12];
        let report = block_on(img.check(&mut scratch)).unwrap();
        assert_eq!(report.corruptions, 0, "{what}: {report:?}");
        block_on(img.repair(&mut scratch, Repair::Leaks)).unwrap();
        assert!(
            block_on(img.check(&mut scratch)).unwrap().is_clean(),
            "{what}"
        );
        // The room freed by the repair takes writes again.
        block_on(img.write(256, &sectors(8, 0x33))).unwrap();
        block_on(img.close()).unwrap();
    }
}

/// A crashed lazy-refcounts image that fills its fixed-size device with
/// clusters in use: new refcount structures have nowhere to go, so the
/// refcounts are rebuilt in place, under the dirty bit (the table stays
/// where it is); opening it for writing, or repairing it, succeeds with
/// the data intact and the image clean. With room for new structures
/// (two clusters here), the rebuild moves them there instead.
#[test]
fn a_rebuild_without_room_rewrites_the_refcounts_in_place() {
    let mut img = block_on(Qcow2::create(
        RamDevice::new(),
        cache(),
        options(64 << 10, 9, true),
    ))
    .unwrap();
    let data: Vec<Sector> = (0..128u8).map(|i| [i; SECTOR]).collect();
    block_on(img.write(0, &data)).unwrap();
    block_on(img.flush()).unwrap();
    // A crash: the image is dirty, every cluster of the device in use.
    let bytes = img.abandon().0.as_bytes().to_vec();

    let table = u64::from_be_bytes(bytes[48..56].try_into().unwrap());
    for options in [OpenOptions::read_write(), OpenOptions::repair()] {
        let mut img =
            open(fixed(&bytes, 0), options).unwrap_or_else(|(e, _)| panic!("{options:?}: {e}"));
        let mut scratch = vec![0u8; 1 << 12];
        if options.for_repair {
            block_on(img.repair(&mut scratch, Repair::All)).expect("a repair in place");
        }
        assert_eq!(img.header().refcount_table_offset, table, "{options:?}");
        let mut back = sectors(128, 0);
        block_on(img.read(0, &mut back)).unwrap();
        assert!(back == data, "{options:?}: data changed");
        let report = block_on(img.check(&mut scratch)).unwrap();
        assert!(report.is_clean(), "{options:?}: {report:?}");
        let (dev, _) = block_on(img.close()).unwrap();
        assert_eq!(dev.as_bytes()[79] & 1, 0, "{options:?}: still dirty");
    }
    let mut img =
        open(fixed(&bytes, 0), OpenOptions::read_only()).unwrap_or_else(|(e, _)| panic!("{e}"));
    assert!(img.info().dirty);
    let mut back = sectors(128, 0);
    block_on(img.read(0, &mut back)).unwrap();
    assert!(back == data);

    let mut img = open(fixed(&bytes, 2), OpenOptions::read_write())
        .unwrap_or_else(|(e, _)| panic!("with room: {e}"));
    block_on(img.read(0, &mut back)).unwrap();
    assert!(back == data);
    let mut scratch = vec![0u8; 1 << 12];
    assert!(block_on(img.check(&mut scratch)).unwrap().is_clean());
}

/// A crashed lazy image that fills a fixed device whose size is not a
/// whole number of clusters (1 KiB clusters, one sector over): the partial
/// last cluster can hold no refcount block, so the rebuild in place must
/// not pick it; the image opens read-write again with its data, or the
/// open fails with `NoSpace` having written nothing.
#[test]
fn a_rebuild_in_place_never_uses_a_partial_last_cluster() {
    for extra_sectors in [1u64, 2, 3] {
        let clusters = 64u64;
        let mut dev = RamDevice::fixed(clusters * 2 + extra_sectors);
        let created = block_on(Qcow2::create(
            &mut dev,
            cache(),
            options(256 << 10, 10, true),
        ));
        let mut img = created.unwrap_or_else(|e| panic!("{e}"));
        let mut written = Vec::new();
        for s in (0..512u64).step_by(2) {
            match block_on(img.write(s, &sectors(2, s as u8 + 1))) {
                Ok(()) => written.push(s),
                Err(Error::NoSpace) => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        block_on(img.flush()).unwrap();
        let _ = img.abandon();
        let bytes = dev.as_bytes().to_vec();
        let what = format!("{extra_sectors} sectors over");
        match open(fixed(&bytes, 0), OpenOptions::read_write()) {
            Ok(mut img) => {
                for &s in &written {
                    let mut back = sectors(2, 0);
                    block_on(img.read(s, &mut back)).unwrap();
                    assert!(back == sectors(2, s as u8 + 1), "{what}: sector {s}");
                }
                let mut scratch = vec![0u8; 1 << 12];
                let report = block_on(img.check(&mut scratch)).unwrap();
                assert!(report.is_clean(), "{what}: {report:?}");
            }
            Err((e, dev)) => {
                assert_eq!(e, Error::NoSpace, "{what}");
                assert!(dev.as_bytes() == bytes, "{what}: the failed rebuild wrote");
            }
        }
    }
}
