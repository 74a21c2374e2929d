//! Crash consistency: stop a workload at every device write, take what a
//! crash would leave (flushed state only, everything, or a random subset of
//! unflushed sector writes), then reopen and check the promise: the image
//! opens, flushed data is intact, every sector holds its flushed value or a
//! value written after that flush (never a third value), and `qemu-img
//! check` finds no corruption.

use qcow2_core::{CreateOptions, Error, OpenOptions, Qcow2, Repair, Sector, Slot, Version, SECTOR};
use qcow2_std_shim::{block_on, FaultDevice, FaultError, RamDevice, Survival};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

const SLOTS: usize = 4;
type Cache = [Slot<1>; SLOTS];
type Image = Qcow2<FaultDevice, Cache, 1>;

fn cache() -> Cache {
    [const { Slot::<1>::EMPTY }; SLOTS]
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write { first: u64, len: u64 },
    Flush,
    Reopen,
}

/// What each sector may read as after a crash: ids of sector contents
/// (0 = zeros). `durable[s]` was flushed; `recent[s]` were written since.
struct Model {
    durable: Vec<u64>,
    recent: Vec<Vec<u64>>,
    current: Vec<u64>,
    serial: u64,
}

/// The sector contents identified by `id`: the id, then a byte pattern.
fn sector_of(id: u64) -> Sector {
    let mut s = [(id % 251) as u8; SECTOR];
    if id != 0 {
        s[..8].copy_from_slice(&id.to_le_bytes());
    }
    s
}

impl Model {
    fn new(sectors: usize) -> Self {
        Model {
            durable: vec![0; sectors],
            recent: vec![Vec::new(); sectors],
            current: vec![0; sectors],
            serial: 0,
        }
    }

    fn write(&mut self, img: &mut Image, first: u64, len: u64) -> Result<(), Error<FaultError>> {
        let mut buf = Vec::with_capacity(len as usize);
        for s in first..first + len {
            self.serial += 1;
            // Recorded before the call: a crash inside it may keep any part.
            self.recent[s as usize].push(self.serial);
            buf.push(sector_of(self.serial));
        }
        block_on(img.write(first, &buf))?;
        for (i, s) in (first..first + len).enumerate() {
            self.current[s as usize] = u64::from_le_bytes(buf[i][..8].try_into().unwrap());
        }
        Ok(())
    }

    fn flushed(&mut self) {
        self.durable.clone_from(&self.current);
        self.recent.iter_mut().for_each(Vec::clear);
    }

    /// Checks every sector of a reopened image against what may survive.
    fn verify(&self, img: &mut Qcow2<RamDevice, Cache, 1>, what: &str) {
        let mut buf = vec![[0u8; SECTOR]; self.durable.len()];
        block_on(img.read(0, &mut buf)).unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
        for (s, got) in buf.iter().enumerate() {
            let id = u64::from_le_bytes(got[..8].try_into().unwrap());
            let id = if *got == [0; SECTOR] { 0 } else { id };
            let allowed = id == self.durable[s] || self.recent[s].contains(&id);
            assert!(
                allowed && *got == sector_of(id),
                "{what}: sector {s} holds a third value (flushed {}, recent {:?})",
                self.durable[s],
                self.recent[s]
            );
        }
    }
}

struct Workload {
    name: &'static str,
    options: CreateOptions,
    ops: Vec<Op>,
}

/// Replays `w` on a fresh copy of `base`, crashing at write `crash_at`.
/// Returns the device and the model at the moment it stopped.
fn replay(w: &Workload, base: &[u8], crash_at: Option<u64>) -> (FaultDevice, Model) {
    let mut dev = FaultDevice::from_bytes(base);
    if let Some(n) = crash_at {
        dev.crash_at_write(n);
    }
    let sectors = (w.options.size / SECTOR as u64) as usize;
    let mut model = Model::new(sectors);
    let mut img = block_on(Image::open(dev, cache(), OpenOptions::read_write())).unwrap();
    for op in &w.ops {
        let result = match *op {
            Op::Write { first, len } => model.write(&mut img, first, len),
            Op::Flush => block_on(img.flush()).map(|()| model.flushed()),
            // A close is a finish and letting go of the device.
            Op::Reopen => match block_on(img.finish()) {
                Ok(()) => {
                    model.flushed();
                    let (dev, slots) = img.abandon();
                    img = block_on(Image::open(dev, slots, OpenOptions::read_write())).unwrap();
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            assert_eq!(
                e,
                Error::Io(FaultError::Crashed),
                "{}: unexpected error",
                w.name
            );
            return (img.abandon().0, model);
        }
    }
    let (dev, _) = img.abandon();
    (dev, model)
}

/// Runs `qemu-img check` and returns its (corruptions, leaks).
fn qemu_check(bytes: &[u8], what: &str) -> (u64, u64) {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("qcow2-crash-{}-{n}.qcow2", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "--output", "json", path.to_str().unwrap()])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    // 0: clean, 3: leaks only (allowed after a crash).
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{what}: qemu-img check: {report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!report.contains("\"corruptions\""), "{what}: {report}");
    std::fs::remove_file(path).ok();
    (
        json_field(&report, "corruptions"),
        json_field(&report, "leaks"),
    )
}

/// The integer value of `"name": N` in qemu-img's JSON, 0 when absent.
fn json_field(json: &str, name: &str) -> u64 {
    let key = format!("\"{name}\": ");
    json.find(&key)
        .map(|i| {
            json[i + key.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Runs every crash point of `w`; returns the refcount table offsets before
/// and after the uninterrupted workload.
fn run(w: &Workload) -> (u64, u64) {
    let dev = FaultDevice::new();
    let img = block_on(Qcow2::create(dev, cache(), w.options)).unwrap();
    let table_before = img.header().refcount_table_offset;
    let (dev, _) = block_on(img.close()).unwrap();
    let base = dev.survivor(Survival::FlushedOnly).as_bytes().to_vec();
    let complete = replay(w, &base, None).0;
    let total = complete.writes();
    let reopened = block_on(Qcow2::open(complete, cache(), OpenOptions::read_only())).unwrap();
    let table_after = reopened.header().refcount_table_offset;
    let points: Vec<u64> = if total <= 2000 {
        (0..total).collect()
    } else {
        (0..2000).map(|i| i * total / 2000).collect()
    };
    let (mut checked, mut dirty) = (0, 0);
    for (k, &n) in points.iter().enumerate() {
        let (dev, model) = replay(w, &base, Some(n));
        assert!(dev.crashed(), "{}: crash point {n} not reached", w.name);
        for survival in [
            Survival::FlushedOnly,
            Survival::AllWrites,
            Survival::RandomSubset(n * 31 + 7),
        ] {
            let what = format!("{} crash at write {n} ({survival:?})", w.name);
            let survivor = dev.survivor(survival);
            let peek = block_on(Qcow2::open(survivor, cache(), OpenOptions::read_only())).unwrap();
            dirty += usize::from(peek.info().dirty);
            let (survivor, _) = block_on(peek.close()).unwrap();
            let mut img = block_on(Qcow2::open(survivor, cache(), OpenOptions::read_write()))
                .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
            model.verify(&mut img, &what);
            // Small scratch buffers force multi-pass checks; large ones take one pass.
            let mut scratch = vec![0u8; if k % 3 == 0 { 1024 } else { 1 << 16 }];
            let ours = block_on(img.check(&mut scratch)).unwrap();
            assert_eq!(ours.corruptions, 0, "{what}: {ours:?}");
            if k % 10 == 0 {
                let (survivor, slots) = block_on(img.close()).unwrap();
                let (corruptions, leaks) = qemu_check(survivor.as_bytes(), &what);
                assert_eq!(
                    (ours.corruptions, ours.leaks),
                    (corruptions, leaks),
                    "{what}: our check disagrees with qemu-img"
                );
                // Repairing the leaks leaves an image both checks call clean.
                let mut img =
                    block_on(Qcow2::open(survivor, slots, OpenOptions::read_write())).unwrap();
                let fixed = block_on(img.repair(&mut scratch, Repair::Leaks)).unwrap();
                assert_eq!(fixed.leaks_fixed, leaks, "{what}");
                assert!(
                    block_on(img.check(&mut scratch)).unwrap().is_clean(),
                    "{what}: leaks remain"
                );
                let (survivor, _) = block_on(img.close()).unwrap();
                assert_eq!(
                    qemu_check(survivor.as_bytes(), &what),
                    (0, 0),
                    "{what}: after repair"
                );
                model.verify(
                    &mut block_on(Qcow2::open(survivor, cache(), OpenOptions::read_only()))
                        .unwrap(),
                    &what,
                );
            }
            checked += 1;
        }
    }
    eprintln!(
        "{}: {} writes, {} crash points, {} survivors checked, {} dirty",
        w.name,
        total,
        points.len(),
        checked,
        dirty
    );
    assert_eq!(
        dirty > 0,
        w.options.lazy_refcounts,
        "{}: dirty survivors",
        w.name
    );
    (table_before, table_after)
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn opts(size: u64, cluster_bits: u32, refcount_order: u32) -> CreateOptions {
    CreateOptions {
        size,
        cluster_bits,
        refcount_order,
        version: Version::V3,
        lazy_refcounts: false,
    }
}

#[test]
fn crash_during_sequential_fill_across_l2_tables() {
    let options = opts(160 << 10, 9, 4);
    let sectors = options.size / SECTOR as u64;
    let mut ops = Vec::new();
    for (i, first) in (0..sectors).step_by(3).enumerate() {
        ops.push(Op::Write {
            first,
            len: 3.min(sectors - first),
        });
        if i % 16 == 15 {
            ops.push(Op::Flush);
        }
    }
    run(&Workload {
        name: "sequential fill",
        options,
        ops,
    });
}

#[test]
fn crash_during_random_writes_growing_the_refcount_table() {
    // 64-bit refcounts on 512-byte clusters: blocks cover 64 clusters and
    // the first table 64 blocks, so the table grows and moves.
    let options = opts(3 << 20, 9, 6);
    let sectors = options.size / SECTOR as u64;
    let mut rng = Rng(0x5eed);
    let mut ops = vec![];
    // Fill three quarters sequentially to reach table growth quickly.
    for first in (0..sectors * 3 / 4).step_by(64) {
        ops.push(Op::Write { first, len: 64 });
    }
    ops.push(Op::Flush);
    for i in 0..300 {
        let len = 1 + rng.below(4);
        ops.push(Op::Write {
            first: rng.below(sectors - len),
            len,
        });
        match i % 40 {
            13 => ops.push(Op::Flush),
            27 => ops.push(Op::Reopen),
            _ => {}
        }
    }
    let (before, after) = run(&Workload {
        name: "random writes, refcount table growth",
        options,
        ops,
    });
    assert_ne!(before, after, "the workload never moved the refcount table");
}

#[test]
fn crash_during_overwrites_and_writes_after_reopen() {
    let options = opts(1 << 20, 12, 4);
    let sectors = options.size / SECTOR as u64;
    let mut rng = Rng(0xfeed);
    let mut ops = vec![];
    for i in 0..400 {
        let len = 1 + rng.below(16);
        // A small hot range so most writes overwrite allocated clusters.
        let first = if i % 3 == 0 {
            rng.below(sectors - len)
        } else {
            rng.below(64)
        };
        ops.push(Op::Write { first, len });
        match i % 25 {
            7 => ops.push(Op::Flush),
            19 => ops.push(Op::Reopen),
            _ => {}
        }
    }
    run(&Workload {
        name: "overwrites and reopen",
        options,
        ops,
    });
}

#[test]
fn crash_with_lazy_refcounts_is_rebuilt_at_open() {
    let mut options = opts(512 << 10, 9, 4);
    options.lazy_refcounts = true;
    let sectors = options.size / SECTOR as u64;
    let mut rng = Rng(0x1a2b);
    let mut ops = vec![];
    for i in 0..250 {
        let len = 1 + rng.below(8);
        ops.push(Op::Write {
            first: rng.below(sectors - len),
            len,
        });
        match i % 30 {
            11 => ops.push(Op::Flush),
            23 => ops.push(Op::Reopen),
            _ => {}
        }
    }
    run(&Workload {
        name: "lazy refcounts",
        options,
        ops,
    });
}

/// Where things are in the image `repair_crashes` damages.
struct Damaged {
    bytes: Vec<u8>,
    refblock: usize,
    l2: usize,
}

impl Damaged {
    fn refcount(&mut self, cluster: usize, value: u16) {
        let at = self.refblock + 2 * cluster;
        self.bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }

    fn be64(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.bytes[at..at + 8].try_into().unwrap())
    }
}

/// A crash at any write of a repair leaves an image that opens for repair,
/// reads the same data as before the repair, and repairs clean. `damage`
/// breaks a freshly written image (512-byte clusters, 16-bit refcounts,
/// 300 sectors of data from sector 17); returns the crash points tried.
fn repair_crashes(name: &str, damage: fn(&mut Damaged)) -> u64 {
    let options = opts(256 << 10, 9, 4);
    let mut img = block_on(Qcow2::create(FaultDevice::new(), cache(), options)).unwrap();
    let data: Vec<Sector> = (0..300u64).map(sector_of).collect();
    block_on(img.write(17, &data)).unwrap();
    let (dev, _) = block_on(img.close()).unwrap();
    let bytes = dev.survivor(Survival::FlushedOnly).as_bytes().to_vec();
    let refblock = u64::from_be_bytes(bytes[512..520].try_into().unwrap()) as usize;
    let l1 = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & OFFSET_MASK) as usize;
    let mut damaged = Damaged {
        bytes,
        refblock,
        l2,
    };
    damage(&mut damaged);
    let bytes = damaged.bytes;

    let expected = {
        let mut img = block_on(Image::open(
            FaultDevice::from_bytes(&bytes),
            cache(),
            OpenOptions::read_only(),
        ))
        .unwrap();
        let mut buf = vec![[0u8; SECTOR]; 512];
        block_on(img.read(0, &mut buf)).unwrap();
        let mut scratch = [0u8; 256];
        let report = block_on(img.check(&mut scratch)).unwrap();
        assert!(!report.is_clean(), "{name}: the damage went unnoticed");
        buf
    };
    let repair_writes = |crash_at: Option<u64>| {
        let mut dev = FaultDevice::from_bytes(&bytes);
        if let Some(n) = crash_at {
            dev.crash_at_write(n);
        }
        let mut img = block_on(Image::open(dev, cache(), OpenOptions::repair())).unwrap();
        let mut scratch = [0u8; 256];
        let _ = block_on(img.repair(&mut scratch, Repair::All));
        img.abandon().0
    };
    let total = repair_writes(None).writes();
    assert!(total >= 2, "{name}: repair wrote only {total} times");
    for n in 0..total {
        let dev = repair_writes(Some(n));
        for survival in [
            Survival::FlushedOnly,
            Survival::AllWrites,
            Survival::RandomSubset(n + 1),
        ] {
            let what = format!("{name}: repair crash at write {n} of {total} ({survival:?})");
            let survivor = dev.survivor(survival);
            let mut img = block_on(Qcow2::open(survivor, cache(), OpenOptions::repair()))
                .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
            let mut buf = vec![[0u8; SECTOR]; 512];
            block_on(img.read(0, &mut buf)).unwrap();
            assert!(buf == expected, "{what}: data changed");
            let mut scratch = [0u8; 256];
            block_on(img.repair(&mut scratch, Repair::All))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            let report = block_on(img.check(&mut scratch)).unwrap();
            assert!(report.is_clean(), "{what}: {report:?}");
        }
    }
    eprintln!(
        "{name}: {total} crash points, {} survivors checked",
        total * 3
    );
    total
}

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Every repair path, crashed at each of its writes: a full rebuild (a
/// refcount of 0 under a reference), one into the holes left by a refcount
/// block that is also guest data, and in-place fixes (a leak, an entry
/// with a reserved bit).
#[test]
fn crash_during_repair_is_recoverable() {
    let mut points = repair_crashes("rebuild", |d| d.refcount(10, 0));
    points += repair_crashes("refblock on data", |d| {
        let data = d.be64(d.l2 + 8 * 40) & OFFSET_MASK;
        d.bytes[512..520].copy_from_slice(&data.to_be_bytes());
    });
    points += repair_crashes("in place", |d| {
        d.refcount(12, 3);
        let at = d.l2 + 8 * 30;
        let entry = d.be64(at) | 2;
        d.bytes[at..at + 8].copy_from_slice(&entry.to_be_bytes());
    });
    eprintln!(
        "repair: {points} crash points, {} survivors checked",
        points * 3
    );
}
