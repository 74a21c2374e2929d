//! A dirty image (lazy refcounts, not closed cleanly) opened for repair:
//! until a full repair succeeds its refcounts may be stale, so it refuses
//! guest changes and keeps its dirty bit however it is closed, and the
//! next ordinary read-write open rebuilds it. A repair that fails at any
//! device write (then a close) never leaves the image marked clean with
//! stale refcounts.

use qcow2_core::{
    BlockDevice, CreateOptions, Error, OpenOptions, Qcow2, Repair, Sector, Slot, SECTOR,
};
use qcow2_std_shim::{block_on, FaultDevice, RamDevice, RamError, Survival};

type Cache = [Slot<1>; 4];

fn cache() -> Cache {
    [const { Slot::<1>::EMPTY }; 4]
}

/// A RAM device whose write number `fail_at` (counting from 0) fails once;
/// every other write succeeds: a transient device error.
struct Flaky {
    inner: RamDevice,
    writes: u64,
    fail_at: u64,
}

impl BlockDevice for Flaky {
    type Error = RamError;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), RamError> {
        self.inner.read(first, buf).await
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), RamError> {
        self.tick()?;
        self.inner.write(first, buf).await
    }

    async fn flush(&mut self) -> Result<(), RamError> {
        self.inner.flush().await
    }

    fn sector_count(&self) -> u64 {
        self.inner.sector_count()
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), RamError> {
        self.inner.set_sector_count(n).await
    }

    async fn write_zeros(&mut self, first: u64, count: u64) -> Result<(), RamError> {
        self.tick()?;
        self.inner.write_zeros(first, count).await
    }
}

impl Flaky {
    fn tick(&mut self) -> Result<(), RamError> {
        self.writes += 1;
        if self.writes - 1 == self.fail_at {
            // Any error of the device's type will do: a write past a fixed end.
            let mut probe = RamDevice::fixed(0);
            return block_on(probe.write(0, &[[0; SECTOR]]));
        }
        Ok(())
    }
}

fn sector(id: u64) -> Sector {
    let mut s = [(id % 251) as u8; SECTOR];
    s[..8].copy_from_slice(&id.to_le_bytes());
    s
}

/// A lazy-refcounts image whose first 200 sectors hold `sector(s + 1)`,
/// all flushed, abandoned dirty after more (unflushed) writes elsewhere
/// that allocated new clusters: the refcounts on disk are stale.
fn crashed_lazy_image(seed: u64) -> Vec<u8> {
    let mut options = CreateOptions::new(1 << 20);
    options.cluster_bits = 9;
    options.lazy_refcounts = true;
    let mut img = block_on(Qcow2::create(FaultDevice::new(), cache(), options)).unwrap();
    for s in 0..200 {
        block_on(img.write(s, &[sector(s + 1)])).unwrap();
    }
    block_on(img.flush()).unwrap();
    for s in 1000..1100 {
        block_on(img.write(s, &[sector(s + 1)])).unwrap();
    }
    let (dev, _) = img.abandon();
    // Some of the unflushed writes reached the disk, some not: L2 entries
    // without their refcounts, refcounts without their entries.
    let bytes = dev
        .survivor(Survival::RandomSubset(seed))
        .as_bytes()
        .to_vec();
    assert_ne!(bytes[79] & 1, 0, "the survivor is dirty");
    let mut img = block_on(Qcow2::open(
        RamDevice::from_bytes(&bytes),
        cache(),
        OpenOptions::read_only(),
    ))
    .unwrap();
    let mut scratch = vec![0u8; 1 << 14];
    let stale = block_on(img.check(&mut scratch)).unwrap();
    assert!(stale.corruptions > 0, "refcounts not stale: {stale:?}");
    bytes
}

fn dirty(bytes: &[u8]) -> bool {
    bytes[79] & 1 != 0
}

/// The flushed data reads back, and the image checks clean.
fn verify<D: BlockDevice>(img: &mut Qcow2<D, Cache>, what: &str) {
    let mut buf = vec![[0u8; SECTOR]; 200];
    block_on(img.read(0, &mut buf)).unwrap_or_else(|e| panic!("{what}: read: {e:?}"));
    for (s, got) in buf.iter().enumerate() {
        assert_eq!(*got, sector(s as u64 + 1), "{what}: sector {s}");
    }
    let mut scratch = vec![0u8; 1 << 14];
    let report = block_on(img.check(&mut scratch)).unwrap();
    assert!(report.is_clean(), "{what}: {report:?}");
}

#[test]
fn guest_changes_wait_for_a_full_repair_and_close_keeps_the_dirty_bit() {
    let bytes = crashed_lazy_image(7);
    let dev = RamDevice::from_bytes(&bytes);
    let mut img = block_on(Qcow2::open(dev, cache(), OpenOptions::repair())).unwrap();
    let data = [sector(7); 1];
    assert_eq!(block_on(img.write(300, &data)), Err(Error::NeedsRepair));
    assert_eq!(block_on(img.discard(0, 8)), Err(Error::NeedsRepair));
    assert_eq!(
        block_on(img.write_zeroes(0, 8, true)),
        Err(Error::NeedsRepair)
    );
    // A leaks-only repair does not make stale refcounts trustworthy.
    let mut scratch = vec![0u8; 1 << 14];
    let _ = block_on(img.repair(&mut scratch, Repair::Leaks));
    assert_eq!(block_on(img.write(300, &data)), Err(Error::NeedsRepair));
    let (dev, _) = block_on(img.close()).unwrap();
    assert!(dirty(dev.as_bytes()), "close cleared the dirty bit");

    // The next ordinary open rebuilds; a full repair also lifts the ban.
    let mut img = block_on(Qcow2::open(dev, cache(), OpenOptions::repair())).unwrap();
    block_on(img.repair(&mut scratch, Repair::All)).unwrap();
    block_on(img.write(300, &data)).unwrap();
    let (dev, _) = block_on(img.close()).unwrap();
    assert!(!dirty(dev.as_bytes()));
    let mut img = block_on(Qcow2::open(dev, cache(), OpenOptions::read_write())).unwrap();
    verify(&mut img, "after a full repair");
}

#[test]
fn a_repair_that_fails_at_any_write_then_closes_leaves_a_rebuildable_image() {
    for seed in [7, 8, 9, 10] {
        fail_at_every_write(&crashed_lazy_image(seed));
    }
}

fn fail_at_every_write(bytes: &[u8]) {
    let mut fail_at = 0;
    loop {
        let dev = Flaky {
            inner: RamDevice::from_bytes(bytes),
            writes: 0,
            fail_at,
        };
        let what = format!("repair failing at write {fail_at}");
        let mut img = block_on(Qcow2::open(dev, cache(), OpenOptions::repair())).unwrap();
        let mut scratch = vec![0u8; 1 << 14];
        let repaired = block_on(img.repair(&mut scratch, Repair::All));
        if repaired.is_ok() {
            // Every write index of the repair has been failed once.
            assert!(fail_at > 3, "the repair wrote too little: {fail_at}");
            eprintln!("{fail_at} failing writes of the repair, each then closed and reopened");
            break;
        }
        // Writes stay refused; the close keeps the dirty bit.
        assert_eq!(
            block_on(img.write(300, &[sector(9)])),
            Err(Error::NeedsRepair),
            "{what}"
        );
        let dev = match block_on(img.close()) {
            Ok((dev, _)) => dev,
            Err(e) => panic!("{what}: close: {e:?}"),
        };
        assert!(dirty(dev.inner.as_bytes()), "{what}: marked clean");
        let mut img = block_on(Qcow2::open(dev.inner, cache(), OpenOptions::read_write()))
            .unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
        verify(&mut img, &what);
        // New writes after the rebuild destroy nothing.
        for s in 300..400 {
            block_on(img.write(s, &[sector(s + 1)])).unwrap();
        }
        verify(&mut img, &what);
        fail_at += 1;
    }
}

/// A dirty image whose refcounts the audit finds consistent but for
/// leaks (no refcount below its references) is consistent once a leaks
/// repair has run: the ban on guest changes and the dirty bit go, as
/// QEMU marks it clean.
#[test]
fn a_leaks_repair_that_leaves_no_corruption_marks_the_image_clean() {
    let mut options = CreateOptions::new(1 << 20);
    options.cluster_bits = 9;
    options.lazy_refcounts = true;
    let mut img = block_on(Qcow2::create(FaultDevice::new(), cache(), options)).unwrap();
    for s in 0..200 {
        block_on(img.write(s, &[sector(s + 1)])).unwrap();
    }
    // Closed cleanly, then marked dirty again: nothing is stale.
    let (dev, _) = block_on(img.close()).unwrap();
    let mut bytes = dev.survivor(Survival::FlushedOnly).as_bytes().to_vec();
    bytes[79] |= 1;
    let dev = RamDevice::from_bytes(&bytes);
    let mut img = block_on(Qcow2::open(dev, cache(), OpenOptions::repair())).unwrap();
    assert_eq!(
        block_on(img.write(300, &[sector(9)])),
        Err(Error::NeedsRepair)
    );
    let mut scratch = vec![0u8; 1 << 14];
    let report = block_on(img.repair(&mut scratch, Repair::Leaks)).unwrap();
    assert_eq!(report.corruptions, 0, "{report:?}");
    block_on(img.write(300, &[sector(9)])).unwrap();
    let (dev, _) = block_on(img.close()).unwrap();
    assert!(!dirty(dev.as_bytes()));
    let mut img = block_on(Qcow2::open(dev, cache(), OpenOptions::read_write())).unwrap();
    verify(&mut img, "after a leaks repair");
}
