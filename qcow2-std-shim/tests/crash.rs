//! Crash consistency: stop a workload at every device write, take what a
//! crash would leave (flushed state only, everything, or a random subset of
//! unflushed sector writes), then reopen and check the promise: the image
//! opens, flushed data is intact, every sector holds its flushed value or a
//! value written after that flush (never a third value), and `qemu-img
//! check` finds no corruption.

use qcow2_core::backing::Backing;
use qcow2_core::codec::{Compression, Parts, Workspace};
use qcow2_core::{
    BlockDevice, CreateOptions, Error, OpenOptions, Qcow2, Repair, Sector, Slot, Version, SECTOR,
};
use qcow2_std_shim::codec::{compress_cluster, HostDecoder};
use qcow2_std_shim::{block_on, FaultDevice, FaultError, HostBacking, RamDevice, Survival};

const SLOTS: usize = 4;
type Cache = [Slot<1>; SLOTS];
type Image = Qcow2<FaultDevice, Cache, 1, HostBacking<FaultDevice>, Lean>;

/// A decoder and no buffers: copy-on-write, compressed reads and writes
/// go a sector at a time, the firmware's way (the paths with the most
/// device writes).
#[derive(Default)]
struct Lean(HostDecoder);

impl Workspace for Lean {
    type Decoder = HostDecoder;

    fn parts(&mut self) -> Parts<'_, HostDecoder> {
        Parts {
            bounce: &mut [],
            input: &mut [],
            decoder: &mut self.0,
        }
    }
}

/// Devices a raw backing can be made of.
trait FromBytes: BlockDevice + Sized {
    fn with_bytes(bytes: &[u8]) -> Self;
}

impl FromBytes for FaultDevice {
    fn with_bytes(bytes: &[u8]) -> Self {
        FaultDevice::from_bytes(bytes)
    }
}

impl FromBytes for RamDevice {
    fn with_bytes(bytes: &[u8]) -> Self {
        RamDevice::from_bytes(bytes)
    }
}

/// Opens the image on `dev` over `backing` (raw bytes), if any.
#[allow(clippy::type_complexity, clippy::result_large_err)]
fn open_image<D: FromBytes>(
    dev: D,
    slots: Cache,
    options: OpenOptions,
    backing: Option<&[u8]>,
) -> Result<Qcow2<D, Cache, 1, HostBacking<D>, Lean>, qcow2_core::OpenError<D, Cache>> {
    let img = block_on(Qcow2::open(dev, slots, options))?;
    let img = img.with_backing(match backing {
        Some(bytes) => HostBacking::Raw(D::with_bytes(bytes)),
        None => HostBacking::None,
    });
    Ok(img.with_workspace(Lean::default()))
}

fn cache() -> Cache {
    [const { Slot::<1>::EMPTY }; SLOTS]
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Write {
        first: u64,
        len: u64,
    },
    /// Discard (whole clusters read as zeros afterwards).
    Discard {
        first: u64,
        len: u64,
    },
    /// Write zeroes, keeping the clusters allocated or releasing them.
    Zero {
        first: u64,
        len: u64,
        unmap: bool,
    },
    /// Write guest cluster `cluster` compressed (zlib), new contents in
    /// every sector.
    WriteCompressed {
        cluster: u64,
    },
    Flush,
    Reopen,
    /// Let go of the image without closing it (its cache is lost, the
    /// device keeps every write) and open it again: a dirty image is
    /// rebuilt. Every sector then reads its flushed value or a later one,
    /// and the rebuild made that durable.
    Crash,
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

    fn write_compressed(
        &mut self,
        img: &mut Image,
        cluster: u64,
        cluster_sectors: u64,
    ) -> Result<(), Error<FaultError>> {
        let first = cluster * cluster_sectors;
        let mut data = Vec::new();
        for s in first..first + cluster_sectors {
            self.serial += 1;
            self.recent[s as usize].push(self.serial);
            data.extend(sector_of(self.serial));
        }
        let mut out = Vec::new();
        assert!(compress_cluster(Compression::Zlib, &data, &mut out));
        block_on(img.write_compressed(cluster, &out))?;
        for s in first..first + cluster_sectors {
            let at = ((s - first) as usize) * SECTOR;
            self.current[s as usize] = u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
        }
        Ok(())
    }

    /// Sectors `[from, to)` read as zeros now; a crash may keep the old
    /// contents or the zeros.
    fn zeroed(&mut self, from: u64, to: u64) {
        for s in from..to {
            self.recent[s as usize].push(0);
            self.current[s as usize] = 0;
        }
    }

    fn discard(
        &mut self,
        img: &mut Image,
        first: u64,
        len: u64,
        cluster_sectors: u64,
        keep: bool,
    ) -> Result<(), Error<FaultError>> {
        let end = first + len;
        let stop = if end as usize == self.current.len() {
            end
        } else {
            end / cluster_sectors * cluster_sectors
        };
        let start = first.next_multiple_of(cluster_sectors);
        // Recorded before the call: a crash inside it may keep any part.
        if !keep {
            self.zeroed(start, stop.max(start));
        }
        block_on(img.discard(first, len))
    }

    fn zero(
        &mut self,
        img: &mut Image,
        first: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), Error<FaultError>> {
        self.zeroed(first, first + len);
        block_on(img.write_zeroes(first, len, unmap))
    }

    fn flushed(&mut self) {
        self.durable.clone_from(&self.current);
        self.recent.iter_mut().for_each(Vec::clear);
    }

    /// Checks every sector of a reopened image against what may survive;
    /// returns the content ids read.
    fn verify<D: BlockDevice, B: Backing<D::Error>, W: Workspace>(
        &self,
        img: &mut Qcow2<D, Cache, 1, B, W>,
        what: &str,
    ) -> Vec<u64> {
        let mut buf = vec![[0u8; SECTOR]; self.durable.len()];
        block_on(img.read(0, &mut buf)).unwrap_or_else(|e| panic!("{what}: read failed: {e:?}"));
        let mut ids = Vec::with_capacity(buf.len());
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
            ids.push(id);
        }
        ids
    }

    /// After a write that failed part way (`NoSpace`): what sectors
    /// `[first, first + len)` read now is their current value (the old one
    /// or the one written); the write stays recent for a crash.
    fn settle_range(&mut self, img: &mut Image, first: u64, len: u64, what: &str) {
        let mut buf = vec![[0u8; SECTOR]; len as usize];
        block_on(img.read(first, &mut buf)).unwrap_or_else(|e| panic!("{what}: read: {e:?}"));
        for (i, got) in buf.iter().enumerate() {
            let s = first as usize + i;
            let id = u64::from_le_bytes(got[..8].try_into().unwrap());
            let id = if *got == [0; SECTOR] { 0 } else { id };
            assert!(
                id == self.current[s] || self.recent[s].contains(&id),
                "{what}: sector {s} holds a third value after NoSpace"
            );
            self.current[s] = id;
        }
    }

    /// After an [`Op::Crash`]: what the reopened image reads is durable.
    fn settle(&mut self, img: &mut Image, what: &str) {
        self.current = self.verify(img, what);
        self.flushed();
    }
}

struct Workload {
    name: &'static str,
    options: CreateOptions,
    ops: Vec<Op>,
    /// The image to start from; a new one when `None`.
    base: Option<Base>,
    /// The raw backing device's bytes, if the image has a backing.
    backing: Option<Vec<u8>>,
}

/// A prepared image: its bytes and the content id of each guest sector.
struct Base {
    bytes: Vec<u8>,
    ids: Vec<u64>,
}

/// The device a workload runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    /// Grows as the image does (a file).
    Growable,
    /// Cannot grow (a partition): the size the workload reaches on a
    /// growable device plus this many clusters.
    Fixed { spare_clusters: u64 },
    /// Cannot grow, and holds only this many clusters: the workload fills
    /// it, and writes that find no room fail with `NoSpace`.
    Full { clusters: u64 },
}

/// Replays `w` on a fresh copy of `base`, crashing at write `crash_at`.
/// Returns the device and the model at the moment it stopped.
fn replay(w: &Workload, base: &[u8], fixed: bool, crash_at: Option<u64>) -> (FaultDevice, Model) {
    let mut dev = if fixed {
        FaultDevice::fixed(base, 0)
    } else {
        FaultDevice::from_bytes(base)
    };
    if let Some(n) = crash_at {
        dev.crash_at_write(n);
    }
    let sectors = (w.options.size / SECTOR as u64) as usize;
    let mut model = Model::new(sectors);
    if let Some(base) = &w.base {
        model.durable.clone_from(&base.ids);
        model.current.clone_from(&base.ids);
        model.serial = base.ids.iter().copied().max().unwrap_or(0);
    }
    let backing = w.backing.as_deref();
    let mut img = open_image(dev, cache(), OpenOptions::read_write(), backing).unwrap();
    for op in &w.ops {
        let result = match *op {
            Op::Write { first, len } => match model.write(&mut img, first, len) {
                // A full fixed device: the write may have landed in part.
                Err(Error::NoSpace) if fixed => {
                    model.settle_range(&mut img, first, len, w.name);
                    Ok(())
                }
                other => other,
            },
            Op::WriteCompressed { cluster } => {
                let cluster_sectors = 1u64 << (w.options.cluster_bits - 9);
                model.write_compressed(&mut img, cluster, cluster_sectors)
            }
            Op::Discard { first, len } => {
                let cluster_sectors = 1u64 << (w.options.cluster_bits - 9);
                // v2 over a backing discards nothing (no zero flag).
                let keep = w.options.version == Version::V2 && backing.is_some();
                model.discard(&mut img, first, len, cluster_sectors, keep)
            }
            Op::Zero { first, len, unmap } => model.zero(&mut img, first, len, unmap),
            Op::Flush => block_on(img.flush()).map(|()| model.flushed()),
            // A close is a finish and letting go of the device.
            Op::Reopen => match block_on(img.finish()) {
                Ok(()) => {
                    model.flushed();
                    let (dev, slots) = img.abandon();
                    img = open_image(dev, slots, OpenOptions::read_write(), backing).unwrap();
                    Ok(())
                }
                Err(e) => Err(e),
            },
            Op::Crash => {
                let (dev, slots) = img.abandon();
                match open_image(dev, slots, OpenOptions::read_write(), backing) {
                    Ok(reopened) => {
                        img = reopened;
                        model.settle(&mut img, w.name);
                        Ok(())
                    }
                    Err(e) => {
                        assert_eq!(e.error, Error::Io(FaultError::Crashed), "{}", w.name);
                        return (e.device, model);
                    }
                }
            }
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
    let dir = test_support::Scratch::new("crash");
    let path = dir.path("survivor.qcow2");
    std::fs::write(&path, bytes).unwrap();
    let out = test_support::qemu_img(&["check", "--output", "json", &path]);
    let report = test_support::stdout(&out);
    // 0: clean, 3: leaks only (allowed after a crash).
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{what}: qemu-img check: {report}{}",
        test_support::stderr(&out)
    );
    let json = test_support::qemu::json(&report);
    assert!(json["corruptions"].is_null(), "{what}: {report}");
    let count = |name: &str| json[name].as_u64().unwrap_or(0);
    (count("corruptions"), count("leaks"))
}

/// Whether the refcount blocks are consecutive clusters directly followed
/// by the refcount table (else a rebuild scattered them in free clusters).
fn contiguous_refcounts<B: Backing<qcow2_std_shim::RamError>, W: Workspace>(
    img: &Qcow2<RamDevice, Cache, 1, B, W>,
) -> bool {
    let h = img.header();
    let bytes = img.device().as_bytes();
    let cs = 1u64 << h.cluster_bits;
    let table = h.refcount_table_offset as usize;
    let entries = (u64::from(h.refcount_table_clusters) * cs / 8) as usize;
    let blocks: Vec<u64> = (0..entries)
        .map(|j| u64::from_be_bytes(bytes[table + 8 * j..table + 8 * j + 8].try_into().unwrap()))
        .take_while(|&e| e != 0)
        .collect();
    blocks.windows(2).all(|p| p[1] == p[0] + cs)
        && blocks.last().is_some_and(|&b| b + cs == table as u64)
}

/// A new image on `dev`, closed: the bytes it leaves.
fn new_image(dev: FaultDevice, options: CreateOptions) -> Vec<u8> {
    let img = block_on(Qcow2::create(dev, cache(), options)).unwrap();
    let (dev, _) = block_on(img.close()).unwrap();
    dev.survivor(Survival::FlushedOnly).as_bytes().to_vec()
}

/// The big-endian u64 at byte `at`.
fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Runs every crash point of `w` on `device`; returns the refcount table
/// offsets before and after the uninterrupted workload.
fn run(w: &Workload, device: Device) -> (u64, u64) {
    let cluster_sectors = 1u64 << (w.options.cluster_bits - 9);
    let base = match (&w.base, device) {
        (Some(base), Device::Growable) => base.bytes.clone(),
        (Some(_), Device::Full { .. }) => unreachable!("full devices start empty"),
        (Some(base), Device::Fixed { spare_clusters }) => {
            let sectors = base.bytes.len() as u64 / SECTOR as u64;
            let dev = FaultDevice::fixed(&base.bytes, sectors + spare_clusters * cluster_sectors);
            dev.survivor(Survival::FlushedOnly).as_bytes().to_vec()
        }
        (None, Device::Growable) => new_image(FaultDevice::new(), w.options),
        (None, Device::Full { clusters }) => new_image(
            FaultDevice::fixed(&[], clusters * cluster_sectors),
            w.options,
        ),
        (None, Device::Fixed { spare_clusters }) => {
            // As large as the workload makes a growable device, and a bit.
            let growable = new_image(FaultDevice::new(), w.options);
            let reached = replay(w, &growable, false, None).0.sector_count();
            let sectors = reached + spare_clusters * cluster_sectors;
            new_image(FaultDevice::fixed(&[], sectors), w.options)
        }
    };
    let fixed = device != Device::Growable;
    let name = if fixed {
        format!("{} (fixed-size device)", w.name)
    } else {
        w.name.to_string()
    };
    let table_before = be64(&base, 48);
    let complete = replay(w, &base, fixed, None).0;
    let total = complete.writes();
    let device_sectors = complete.sector_count();
    let reopened = block_on(Qcow2::open(complete, cache(), OpenOptions::read_only())).unwrap();
    let table_after = reopened.header().refcount_table_offset;
    let points: Vec<u64> = if total <= 2000 {
        (0..total).collect()
    } else {
        (0..2000).map(|i| i * total / 2000).collect()
    };
    let (mut checked, mut dirty, mut rebuilt, mut scattered) = (0, 0, 0, 0);
    for (k, &n) in points.iter().enumerate() {
        let (dev, model) = replay(w, &base, fixed, Some(n));
        assert!(dev.crashed(), "{name}: crash point {n} not reached");
        for survival in [
            Survival::FlushedOnly,
            Survival::AllWrites,
            Survival::RandomSubset(n * 31 + 7),
        ] {
            let what = format!("{name} crash at write {n} ({survival:?})");
            let survivor = dev.survivor(survival);
            let peek = block_on(Qcow2::open(survivor, cache(), OpenOptions::read_only())).unwrap();
            let table = peek.header().refcount_table_offset;
            dirty += usize::from(peek.info().dirty);
            let (survivor, _) = block_on(peek.close()).unwrap();
            let backing = w.backing.as_deref();
            let mut img = open_image(survivor, cache(), OpenOptions::read_write(), backing)
                .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
            if fixed {
                assert_eq!(
                    img.device().sector_count(),
                    device_sectors,
                    "{what}: the fixed device changed size"
                );
            }
            if img.header().refcount_table_offset != table {
                rebuilt += 1;
                scattered += usize::from(!contiguous_refcounts(&img));
            }
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
                    open_image(survivor, slots, OpenOptions::read_write(), backing).unwrap();
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
                    &mut open_image(survivor, cache(), OpenOptions::read_only(), backing).unwrap(),
                    &what,
                );
            }
            checked += 1;
        }
    }
    eprintln!(
        "{name}: {total} writes, {} crash points, {checked} survivors checked, {dirty} dirty, \
         {rebuilt} rebuilt at open ({scattered} into scattered free clusters)",
        points.len(),
    );
    assert_eq!(
        dirty > 0,
        w.options.lazy_refcounts,
        "{name}: dirty survivors",
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

/// `count` writes of 1 to `max_len` sectors at random places below sector
/// `end`; after write `i`, the op `extra` names for `i % period`, if any.
fn random_writes(
    seed: u64,
    count: u64,
    max_len: u64,
    end: u64,
    period: u64,
    extra: &[(u64, Op)],
) -> Vec<Op> {
    let mut rng = Rng(seed);
    let mut ops = vec![];
    for i in 0..count {
        let len = 1 + rng.below(max_len);
        ops.push(Op::Write {
            first: rng.below(end - len),
            len,
        });
        if let Some(&(_, op)) = extra.iter().find(|(at, _)| *at == i % period) {
            ops.push(op);
        }
    }
    ops
}

fn opts(size: u64, cluster_bits: u32, refcount_order: u32) -> CreateOptions {
    CreateOptions {
        size,
        cluster_bits,
        refcount_order,
        ..CreateOptions::new(size)
    }
}

fn sequential_fill_workload() -> Workload {
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
    Workload {
        name: "sequential fill",
        options,
        ops,
        base: None,
        backing: None,
    }
}

fn table_growth_workload() -> Workload {
    // 64-bit refcounts on 512-byte clusters: blocks cover 64 clusters and
    // the first table 64 blocks, so the table grows and moves.
    let options = opts(3 << 20, 9, 6);
    let sectors = options.size / SECTOR as u64;
    let mut ops = vec![];
    // Fill three quarters sequentially to reach table growth quickly.
    for first in (0..sectors * 3 / 4).step_by(64) {
        ops.push(Op::Write { first, len: 64 });
    }
    ops.push(Op::Flush);
    let extra = [(13, Op::Flush), (27, Op::Reopen)];
    ops.extend(random_writes(0x5eed, 300, 4, sectors, 40, &extra));
    Workload {
        name: "random writes, refcount table growth",
        options,
        ops,
        base: None,
        backing: None,
    }
}

fn overwrites_workload() -> Workload {
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
    Workload {
        name: "overwrites and reopen",
        options,
        ops,
        base: None,
        backing: None,
    }
}

#[test]
fn crash_during_sequential_fill_across_l2_tables() {
    run(&sequential_fill_workload(), Device::Growable);
}

#[test]
fn crash_during_random_writes_growing_the_refcount_table() {
    let (before, after) = run(&table_growth_workload(), Device::Growable);
    assert_ne!(before, after, "the workload never moved the refcount table");
}

#[test]
fn crash_during_overwrites_and_writes_after_reopen() {
    run(&overwrites_workload(), Device::Growable);
}

/// The same workloads on a device that cannot grow, a little larger than
/// they make a growable one: allocation wraps around to free clusters, and
/// dirty survivors are rebuilt inside the device.
#[test]
fn crash_on_a_fixed_size_device() {
    let spare = Device::Fixed { spare_clusters: 2 };
    run(&sequential_fill_workload(), spare);
    run(&overwrites_workload(), spare);
    run(&lazy_refcounts_workload(), spare);
}

#[test]
fn crash_during_refcount_table_growth_on_a_fixed_size_device() {
    let (before, after) = run(
        &table_growth_workload(),
        Device::Fixed { spare_clusters: 2 },
    );
    assert_ne!(before, after, "the workload never moved the refcount table");
}

/// A lazy-refcounts image that fills a fixed-size device (writes fail with
/// `NoSpace` in the end), then overwrites and crashes: however full the
/// device, a dirty survivor must open read-write again (its refcounts
/// rebuilt inside the device) with every flushed sector intact.
fn full_device_workload(name: &'static str, cluster_bits: u32, seed: u64) -> Workload {
    let mut options = opts(256 << 10, cluster_bits, 4);
    options.lazy_refcounts = true;
    let sectors = options.size / SECTOR as u64;
    let step = 1u64 << (cluster_bits - 9);
    let mut ops = Vec::new();
    for (i, first) in (0..sectors).step_by(step as usize).enumerate() {
        ops.push(Op::Write { first, len: step });
        if i % 8 == 7 {
            ops.push(Op::Flush);
        }
    }
    // Full now: overwrites in place, with a crash and more writes after.
    let extra = [(5, Op::Flush), (9, Op::Crash), (13, Op::Flush)];
    ops.extend(random_writes(seed, 30, 4, sectors / 4, 16, &extra));
    ops.push(Op::Crash);
    ops.extend(random_writes(seed + 1, 10, 4, sectors, 16, &[]));
    Workload {
        name,
        options,
        ops,
        base: None,
        backing: None,
    }
}

/// Item 12 of the full-device class: with lazy refcounts the rebuild a
/// crash calls for needs room, which a full fixed-size device has to keep.
#[test]
fn crash_with_lazy_refcounts_on_a_full_fixed_size_device() {
    for clusters in [40, 41, 57] {
        run(
            &full_device_workload("lazy refcounts, full device, 512 B clusters", 9, clusters),
            Device::Full { clusters },
        );
    }
    run(
        &full_device_workload("lazy refcounts, full device, 4 KiB clusters", 12, 7),
        Device::Full { clusters: 20 },
    );
}

fn lazy_refcounts_workload() -> Workload {
    let mut options = opts(512 << 10, 9, 4);
    options.lazy_refcounts = true;
    let sectors = options.size / SECTOR as u64;
    let extra = [(11, Op::Flush), (23, Op::Reopen)];
    let ops = random_writes(0x1a2b, 250, 8, sectors, 30, &extra);
    Workload {
        name: "lazy refcounts",
        options,
        ops,
        base: None,
        backing: None,
    }
}

#[test]
fn crash_with_lazy_refcounts_is_rebuilt_at_open() {
    run(&lazy_refcounts_workload(), Device::Growable);
}

/// Writes, then discards and write-zeroes (keeping and releasing
/// clusters, whole and partial, over compressed-free data) mixed with
/// writes that reuse the freed clusters (rule 6), flushes and reopens.
fn free_path_workload(name: &'static str, options: CreateOptions, seed: u64) -> Workload {
    let sectors = options.size / SECTOR as u64;
    let cluster = 1u64 << (options.cluster_bits - 9);
    let mut rng = Rng(seed);
    let mut ops = vec![];
    // Data everywhere first, so that the frees below release clusters.
    for first in (0..sectors).step_by(64) {
        ops.push(Op::Write {
            first,
            len: 64.min(sectors - first),
        });
    }
    ops.push(Op::Flush);
    for i in 0..120 {
        let len = 1 + rng.below(4 * cluster);
        let first = rng.below(sectors - len);
        ops.push(match i % 6 {
            0 | 3 => Op::Discard { first, len },
            1 => Op::Zero {
                first,
                len,
                unmap: true,
            },
            2 => Op::Zero {
                first,
                len,
                unmap: false,
            },
            _ => Op::Write {
                first,
                len: len.min(2 * cluster),
            },
        });
        match i % 20 {
            9 => ops.push(Op::Flush),
            17 => ops.push(Op::Reopen),
            _ => {}
        }
    }
    // The disk's last cluster through its end, and everything at once.
    ops.push(Op::Discard {
        first: sectors - cluster - 1,
        len: cluster + 1,
    });
    ops.push(Op::Flush);
    ops.push(Op::Zero {
        first: 0,
        len: sectors,
        unmap: true,
    });
    Workload {
        name,
        options,
        ops,
        base: None,
        backing: None,
    }
}

/// Discard and write-zeroes: every write index, the three survival modes,
/// v3 (zero flags) and v2 (unallocated entries), lazy refcounts, growable
/// and fixed-size devices.
#[test]
fn crash_during_discard_and_write_zeroes() {
    let v3 = free_path_workload("free path, 4 KiB clusters", opts(256 << 10, 12, 4), 0xd15c);
    run(&v3, Device::Growable);
    let v3_small = free_path_workload("free path, 512 B clusters", opts(64 << 10, 9, 0), 0xf4ee);
    run(&v3_small, Device::Fixed { spare_clusters: 0 });
    let mut v2 = opts(128 << 10, 12, 4);
    v2.version = Version::V2;
    run(
        &free_path_workload("free path, v2", v2, 0x0f2),
        Device::Growable,
    );
    let mut lazy = opts(128 << 10, 11, 4);
    lazy.lazy_refcounts = true;
    let lazy = free_path_workload("free path, lazy refcounts", lazy, 0x1a2e);
    run(&lazy, Device::Fixed { spare_clusters: 1 });
}

/// A lazy-refcounts image (512-byte clusters, 16-bit refcounts) whose
/// first `filled` guest sectors were written in order, then every third of
/// them discarded by hand (L2 entry and refcount zeroed): its free space is
/// single clusters between clusters in use, and none at the end.
fn fragmented_base(options: CreateOptions, filled: u64) -> Base {
    assert_eq!((options.cluster_bits, options.refcount_order), (9, 4));
    let mut img = block_on(Qcow2::create(FaultDevice::new(), cache(), options)).unwrap();
    let mut ids: Vec<u64> = (1..=filled).collect();
    let data: Vec<Sector> = ids.iter().map(|&id| sector_of(id)).collect();
    block_on(img.write(0, &data)).unwrap();
    let (dev, _) = block_on(img.close()).unwrap();
    let mut bytes = dev.survivor(Survival::FlushedOnly).as_bytes().to_vec();
    ids.resize((options.size / SECTOR as u64) as usize, 0);
    let (l1, reftable) = (be64(&bytes, 40) as usize, be64(&bytes, 48) as usize);
    for g in (1..filled as usize).step_by(3) {
        let l2 = (be64(&bytes, l1 + 8 * (g / 64)) & OFFSET_MASK) as usize;
        let entry = l2 + 8 * (g % 64);
        let cluster = ((be64(&bytes, entry) & OFFSET_MASK) / 512) as usize;
        bytes[entry..entry + 8].fill(0);
        let block = be64(&bytes, reftable + 8 * (cluster / 256)) as usize;
        let refcount = block + 2 * (cluster % 256);
        bytes[refcount..refcount + 2].fill(0);
        ids[g] = 0;
    }
    assert_eq!(qemu_check(&bytes, "fragmented base"), (0, 0));
    Base { bytes, ids }
}

/// Lazy refcounts on an image whose free space is scattered single
/// clusters, with crashes inside the workload (each reopen rebuilds the
/// refcounts): rebuilds find no run of free clusters long enough and put
/// each refcount block in a cluster of its own.
fn fragmented_lazy_refcounts_workload() -> Workload {
    let mut options = opts(512 << 10, 9, 4);
    options.lazy_refcounts = true;
    let filled = 768;
    let base = fragmented_base(options, filled);
    let ops = random_writes(
        0x7e57,
        200,
        4,
        filled,
        40,
        &[(11, Op::Flush), (31, Op::Crash)],
    );
    Workload {
        name: "lazy refcounts, scattered free space, crashes inside",
        options,
        ops,
        base: Some(base),
        backing: None,
    }
}

/// Free space only between clusters in use, none at the end of the device.
#[test]
fn crash_with_lazy_refcounts_in_scattered_free_space_on_a_fixed_size_device() {
    run(
        &fragmented_lazy_refcounts_workload(),
        Device::Fixed { spare_clusters: 0 },
    );
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
/// On a `fixed` device the device is exactly as large as the image.
fn repair_crashes(name: &str, fixed: bool, damage: fn(&mut Damaged)) -> u64 {
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

    let device = |bytes: &[u8]| {
        if fixed {
            FaultDevice::fixed(bytes, 0)
        } else {
            FaultDevice::from_bytes(bytes)
        }
    };
    let expected = {
        let mut img = open_image(device(&bytes), cache(), OpenOptions::read_only(), None).unwrap();
        let mut buf = vec![[0u8; SECTOR]; 512];
        block_on(img.read(0, &mut buf)).unwrap();
        let mut scratch = [0u8; 256];
        let report = block_on(img.check(&mut scratch)).unwrap();
        assert!(!report.is_clean(), "{name}: the damage went unnoticed");
        buf
    };
    let repair_writes = |crash_at: Option<u64>| {
        let mut dev = device(&bytes);
        if let Some(n) = crash_at {
            dev.crash_at_write(n);
        }
        let mut img = open_image(dev, cache(), OpenOptions::repair(), None).unwrap();
        let mut scratch = [0u8; 256];
        let repaired = block_on(img.repair(&mut scratch, Repair::All));
        (img.abandon().0, repaired)
    };
    let (complete, repaired) = repair_writes(None);
    repaired.unwrap_or_else(|e| panic!("{name}: repair failed: {e}"));
    let after = complete.survivor(Survival::FlushedOnly);
    assert_eq!(qemu_check(after.as_bytes(), name), (0, 0), "{name}");
    if fixed {
        assert_eq!(complete.sector_count() as usize, bytes.len() / SECTOR);
        let repaired = complete.survivor(Survival::FlushedOnly);
        let img = block_on(Qcow2::open(repaired, cache(), OpenOptions::read_only())).unwrap();
        assert!(
            !contiguous_refcounts(&img),
            "{name}: the free space was not scattered"
        );
    }
    let total = complete.writes();
    assert!(total >= 2, "{name}: repair wrote only {total} times");
    for n in 0..total {
        let dev = repair_writes(Some(n)).0;
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
    let mut points = repair_crashes("rebuild", false, |d| d.refcount(10, 0));
    points += repair_crashes("refblock on data", false, refblock_on_data);
    points += repair_crashes("in place", false, |d| {
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

/// A refcount table entry pointing at a cluster of guest data.
fn refblock_on_data(d: &mut Damaged) {
    let data = d.be64(d.l2 + 8 * 40) & OFFSET_MASK;
    d.bytes[512..520].copy_from_slice(&data.to_be_bytes());
}

impl Damaged {
    /// Drops the mapping of every third guest cluster from 50 to 110 (they
    /// stay allocated: leaks), leaving single free clusters between data.
    fn scatter_free_clusters(&mut self) {
        for i in (50..110).step_by(3) {
            let at = self.l2 + 8 * i;
            self.bytes[at..at + 8].fill(0);
        }
    }
}

/// Repairs that rebuild every refcount structure on a device exactly as
/// large as the image, whose free space is single clusters between data:
/// the new blocks and table go each in a cluster of its own.
#[test]
fn crash_during_repair_on_a_fixed_size_device_is_recoverable() {
    let mut points = repair_crashes("rebuild, fixed device", true, |d| {
        d.scatter_free_clusters();
        d.refcount(10, 0);
    });
    points += repair_crashes("refblock on data, fixed device", true, |d| {
        d.scatter_free_clusters();
        refblock_on_data(d);
    });
    eprintln!(
        "repair on a fixed-size device: {points} crash points, {} survivors checked",
        points * 3
    );
}

/// An overlay on a raw backing shorter than the disk (and not a whole
/// number of clusters): partial writes copy the rest of their cluster
/// from the backing; discards and write-zeroes hide it (v2 discards do
/// nothing).
fn backing_cow_workload(name: &'static str, options: CreateOptions, seed: u64) -> Workload {
    let sectors = options.size / SECTOR as u64;
    let cluster = 1u64 << (options.cluster_bits - 9);
    let backing_sectors = sectors * 3 / 4 + 3;
    // Backing contents: ids no write reuses (writes count up from the
    // largest).
    let ids: Vec<u64> = (0..sectors)
        .map(|s| if s < backing_sectors { 1_000 + s } else { 0 })
        .collect();
    let backing: Vec<u8> = (0..backing_sectors)
        .flat_map(|s| sector_of(1_000 + s))
        .collect();
    let mut rng = Rng(seed);
    let mut ops = vec![];
    for i in 0..80 {
        let len = 1 + rng.below(2 * cluster);
        let first = rng.below(sectors - len);
        ops.push(match i % 8 {
            5 => Op::Discard { first, len },
            6 => Op::Zero {
                first,
                len,
                unmap: i % 16 == 6,
            },
            _ => Op::Write {
                first,
                len: len.min(cluster),
            },
        });
        match i % 20 {
            9 => ops.push(Op::Flush),
            17 => ops.push(Op::Reopen),
            _ => {}
        }
    }
    let bytes = new_image(FaultDevice::new(), options);
    Workload {
        name,
        options,
        ops,
        base: Some(Base { bytes, ids }),
        backing: Some(backing),
    }
}

/// Copy-on-write from a backing: every write index, the three survival
/// modes, v3 and v2, growable and fixed-size devices.
#[test]
fn crash_during_copy_on_write_from_a_backing() {
    let v3 = backing_cow_workload(
        "backing copy-on-write, 4 KiB clusters",
        opts(128 << 10, 12, 4),
        0xc0,
    );
    run(&v3, Device::Growable);
    // A fixed device just large enough for what the workload allocates.
    let base = &v3.base.as_ref().unwrap().bytes;
    let reached = replay(&v3, base, false, None).0.sector_count();
    let grown = (reached - base.len() as u64 / SECTOR as u64).div_ceil(8);
    run(
        &v3,
        Device::Fixed {
            spare_clusters: grown,
        },
    );
    let mut v2 = opts(64 << 10, 12, 4);
    v2.version = Version::V2;
    run(
        &backing_cow_workload("backing copy-on-write, v2", v2, 0xc2),
        Device::Growable,
    );
}

/// Compressed writes packing clusters into shared host clusters (or one
/// each, with 1-bit refcounts), mixed with plain writes over compressed
/// clusters (copy-on-write through the decoder), discards, write-zeroes,
/// flushes and reopens.
fn compressed_workload(name: &'static str, options: CreateOptions, seed: u64) -> Workload {
    let sectors = options.size / SECTOR as u64;
    let cluster = 1u64 << (options.cluster_bits - 9);
    let clusters = sectors / cluster;
    let mut rng = Rng(seed);
    let mut ops = vec![];
    for c in 0..clusters / 2 {
        ops.push(Op::WriteCompressed { cluster: c });
    }
    ops.push(Op::Flush);
    for i in 0..60 {
        let c = rng.below(clusters);
        ops.push(match i % 6 {
            0 | 3 => Op::WriteCompressed { cluster: c },
            1 => Op::Write {
                first: c * cluster + rng.below(cluster),
                len: 1,
            },
            2 => Op::Discard {
                first: c * cluster,
                len: cluster,
            },
            4 => Op::Zero {
                first: c * cluster + rng.below(cluster),
                len: 1,
                unmap: false,
            },
            _ => Op::Write {
                first: c * cluster,
                len: cluster.min(sectors - c * cluster),
            },
        });
        match i % 20 {
            9 => ops.push(Op::Flush),
            17 => ops.push(Op::Reopen),
            _ => {}
        }
    }
    Workload {
        name,
        options,
        ops,
        base: None,
        backing: None,
    }
}

/// Compressed writes and overwrites of compressed clusters: every write
/// index, the three survival modes, 16-bit and 1-bit refcounts, growable
/// and fixed-size devices.
#[test]
fn crash_during_compressed_writes_and_overwrites() {
    let packed = compressed_workload("compressed, 4 KiB clusters", opts(64 << 10, 12, 4), 0xc7);
    run(&packed, Device::Growable);
    run(&packed, Device::Fixed { spare_clusters: 0 });
    let single = compressed_workload("compressed, 1-bit refcounts", opts(16 << 10, 9, 0), 0xc1);
    run(&single, Device::Growable);
}
