//! qcow2-core on a Cortex-M4F (QEMU `mps2-an386`): creates, writes, reads,
//! flushes, closes, reopens read-only, checks, repairs and discards in an
//! image on a 256 KiB RAM disk, then recovers a lazy-refcounts image left
//! dirty, then runs the same calls again as an ordinary application would
//! write them (phase `app`), and reports the stack each phase and each
//! call takes, the size of every future and the RAM the image needs.
//! Writes every image it made to the host's working directory. Exits 0
//! when everything holds. The device type is the build's
//! [`qcow2_firmware::Device`].
#![no_std]
#![no_main]

use core::mem::size_of;
use core::pin::pin;

use cortex_m_rt::entry;
use qcow2_core::{
    CheckReport, CreateOptions, Error, FirmwareCache, FirmwareQcow2, OpenError, OpenOptions, Qcow2,
    Repair, Sector, Slot,
};
use qcow2_firmware::{dump, holds_pattern, pattern, take_device, Device, DiskError, StackMeter};
use semihosting::{eprintln, println};
use static_cell::ConstStaticCell;

/// The image type of this example: the build's device, and the firmware
/// cache borrowed from a `static`.
type Image = FirmwareQcow2<'static, Device>;

/// Sectors the example moves per call.
const IO_SECTORS: usize = 8;
/// Bytes of the check / repair scratch: 4 a cluster, 512 clusters of
/// 512 B on the disk, so one pass.
const CHECK_SCRATCH: usize = 2048;

static CACHE: ConstStaticCell<FirmwareCache> = ConstStaticCell::new([const { Slot::EMPTY }; 8]);
static IO: ConstStaticCell<[Sector; IO_SECTORS]> = ConstStaticCell::new([[0; 512]; IO_SECTORS]);
static SCRATCH: ConstStaticCell<[u8; CHECK_SCRATCH]> = ConstStaticCell::new([0; CHECK_SCRATCH]);

/// The first image: 512 B clusters, so an L2 table (64 entries) maps only
/// 32 KiB (64 sectors) and the writes cross several of them.
const CREATE_SIZE: u64 = 4 << 20;
const CREATE_SEED: u8 = 0x5a;
/// (first sector, sectors) written and verified in the first image.
const CREATE_WRITES: &[(u64, u64)] = &[
    (0, 24),
    (60, 8),
    (120, 16),
    (1000, 8),
    (4090, 12),
    (8184, 8),
];
/// Written ranges the discard phase discards (whole 512 B clusters; the
/// first crosses from one L2 table into the next)...
const DISCARDED: &[(u64, u64)] = &[(60, 8), (120, 16)];
/// ...and those it keeps.
const KEPT: &[(u64, u64)] = &[(0, 24), (1000, 8), (4090, 12), (8184, 8)];
/// Ranges of the first image never written: they read as zeros.
const CREATE_HOLES: &[(u64, u64)] = &[(24, 36), (2000, 8), (8176, 8)];

/// The lazy-refcounts image: 4 KiB clusters, an L2 table maps 2 MiB, so
/// writes 2 MiB apart land in different tables.
const LAZY_SIZE: u64 = 8 << 20;
const LAZY_SEED: u8 = 0xa7;
const LAZY_WRITES: &[(u64, u64)] = &[(0, 8), (4104, 8), (12288, 16)];
const LAZY_HOLES: &[(u64, u64)] = &[(8, 8), (4096, 8), (12304, 8)];

/// The pattern seed of the app phase's image (which has the first image's
/// layout and writes).
const APP_SEED: u8 = 0x3c;

/// Awaits API call `$call` measured as `$name` ([`StackMeter::call`]), its
/// error tagged with phase `$phase`. A macro, not an `async fn`: the
/// call's future stays pinned in the phase's own future, stored once, and
/// no wrapper future holds the image or device the call takes a second
/// time.
macro_rules! measured {
    ($m:expr, $name:expr, $call:expr, $phase:expr) => {
        $m.call($name, pin!($call)).await.in_phase($phase)
    };
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug
enum Fail {
    /// The image returned an error.
    Qcow2(&'static str, Error<DiskError>),
    /// Data or a report was not what it should be.
    Verify(&'static str),
    /// Host file I/O through semihosting failed.
    Host(&'static str, semihosting::io::Error),
}

/// Tags an image error with the phase it happened in.
trait In<T> {
    fn in_phase(self, phase: &'static str) -> Result<T, Fail>;
}

impl<T> In<T> for Result<T, Error<DiskError>> {
    fn in_phase(self, phase: &'static str) -> Result<T, Fail> {
        self.map_err(|e| Fail::Qcow2(phase, e))
    }
}

impl<T> In<T> for Result<T, OpenError<Device, Cache>> {
    fn in_phase(self, phase: &'static str) -> Result<T, Fail> {
        self.map_err(|e| Fail::Qcow2(phase, e.error))
    }
}

#[entry]
fn main() -> ! {
    // Paints the stack below here first: everything after counts, the
    // frame that holds the example's future included.
    let meter = StackMeter::start();
    let top = qcow2_firmware::sp();
    let result = firmware(&meter);
    meter.end_run(top);
    match result {
        Ok(()) => {
            println!("firmware: all phases passed");
            semihosting::process::exit(0)
        }
        Err(e) => {
            eprintln!("error: {e:?}");
            semihosting::process::exit(1)
        }
    }
}

/// Prints the RAM figures, runs the example's phases under `block_on`,
/// then the `app` phase under a `block_on` of its own, as an application
/// would: each in a frame of its own that holds its future, so the whole
/// run's stack is the larger of the two.
#[inline(never)]
fn firmware(meter: &StackMeter) -> Result<(), Fail> {
    let (Some(disk), Some(cache), Some(io), Some(scratch)) = (
        take_device(),
        CACHE.try_take(),
        IO.try_take(),
        SCRATCH.try_take(),
    ) else {
        return Err(Fail::Verify("statics taken twice"));
    };
    println!("ram slot: {} B", size_of::<Slot<1>>());
    println!("ram cache: {} B", size_of::<FirmwareCache>());
    println!("ram image: {} B", size_of::<Image>());
    println!("ram device: {} B", size_of::<Device>());
    println!("ram scratch io: {} B", size_of::<[Sector; IO_SECTORS]>());
    println!("ram scratch check: {} B", size_of::<[u8; CHECK_SCRATCH]>());
    println!("ram disk: {} B", disk.bytes().len());
    let (mut disk, cache) = run_example(meter, disk, cache, io, scratch)?;

    zero(&mut disk);
    println!("future app: {} B", returned_size(&app));
    let top = meter.begin_phase();
    let disk = run_app(disk, cache, io, scratch)?;
    meter.end_phase("app", top);
    println!("app: device counters {:?}", disk.counters());
    dump(c"fw-app.qcow2", disk.bytes()).map_err(|e| Fail::Host("fw-app.qcow2", e))
}

/// The example's phases under `block_on`, in a frame of its own, which
/// holds their future, gone when the app phase runs.
#[inline(never)]
fn run_example(
    meter: &StackMeter,
    disk: Device,
    cache: Cache,
    io: &mut [Sector; IO_SECTORS],
    scratch: &mut [u8; CHECK_SCRATCH],
) -> Result<(Device, Cache), Fail> {
    let run = run(meter, disk, cache, io, scratch);
    println!("future firmware: {} B", core::mem::size_of_val(&run));
    meter.paint();
    embassy_futures::block_on(run)
}

/// The app phase under `block_on`, in a frame of its own (below the
/// phase's start, so that its stack figure includes the future).
#[inline(never)]
fn run_app(
    disk: Device,
    cache: Cache,
    io: &'static mut [Sector; IO_SECTORS],
    scratch: &'static mut [u8],
) -> Result<Device, Fail> {
    embassy_futures::block_on(app(disk, cache, io, scratch))
}

/// The size of the future `f` returns, without calling it.
fn returned_size<F, R>(_: &F) -> usize
where
    F: FnOnce(Device, Cache, &'static mut [Sector; IO_SECTORS], &'static mut [u8]) -> R,
{
    size_of::<R>()
}

/// The cache, borrowed from its `static` for the whole run.
type Cache = &'static mut FirmwareCache;

/// The phases in order, each in its own `async fn`, so that their images
/// and futures share space in this future. Returns the device and cache
/// for the app phase.
async fn run(
    m: &StackMeter,
    disk: Device,
    cache: Cache,
    io: &mut [Sector; IO_SECTORS],
    scratch: &mut [u8; CHECK_SCRATCH],
) -> Result<(Device, Cache), Fail> {
    let (disk, cache) = create_write_read(m, disk, cache, io).await?;
    let (disk, cache) = read_only_and_check(m, disk, cache, io, scratch).await?;
    let (disk, cache) = repair(m, disk, cache, io, scratch).await?;
    let (mut disk, cache) = discard(m, disk, cache, io, scratch).await?;
    dump(c"fw-create.qcow2", disk.bytes()).map_err(|e| Fail::Host("fw-create.qcow2", e))?;
    zero(&mut disk);
    let (disk, cache) = lazy_crash(m, disk, cache, io, scratch).await?;
    dump(c"fw-lazy.qcow2", disk.bytes()).map_err(|e| Fail::Host("fw-lazy.qcow2", e))?;
    Ok((disk, cache))
}

/// Phases create, write, read, flush and close.
async fn create_write_read(
    m: &StackMeter,
    mut disk: Device,
    cache: Cache,
    io: &mut [Sector; IO_SECTORS],
) -> Result<(Device, Cache), Fail> {
    let top = m.begin_phase();
    zero(&mut disk);
    let options = CreateOptions {
        cluster_bits: 9,
        ..CreateOptions::new(CREATE_SIZE)
    };
    let mut image: Image = measured!(m, "create", Qcow2::create(disk, cache, options), "create")?;
    m.end_phase("create", top);

    let top = m.begin_phase();
    write_ranges(m, &mut image, io, CREATE_SEED, CREATE_WRITES).await?;
    m.end_phase("write", top);

    let top = m.begin_phase();
    verify(m, &mut image, io, CREATE_SEED, CREATE_WRITES, CREATE_HOLES).await?;
    m.end_phase("read", top);

    let top = m.begin_phase();
    measured!(m, "flush", image.flush(), "flush")?;
    m.end_phase("flush", top);

    let top = m.begin_phase();
    let closed = measured!(m, "close", image.close(), "close")?;
    m.end_phase("close", top);
    Ok(closed)
}

/// Phases read-only (reopen read-only, verify, a write is refused) and
/// check (must be clean).
async fn read_only_and_check(
    m: &StackMeter,
    disk: Device,
    cache: Cache,
    io: &mut [Sector; IO_SECTORS],
    scratch: &mut [u8],
) -> Result<(Device, Cache), Fail> {
    let top = m.begin_phase();
    let mut image: Image = measured!(
        m,
        "open-ro",
        Qcow2::open(disk, cache, OpenOptions::read_only()),
        "read-only"
    )?;
    verify(m, &mut image, io, CREATE_SEED, CREATE_WRITES, CREATE_HOLES).await?;
    let refused = m
        .call("write", pin!(image.write(0, &io[..1])))
        .await
        .is_err_and(|e| e == Error::ReadOnly);
    if !refused {
        return Err(Fail::Verify("a read-only image accepted a write"));
    }
    m.end_phase("read-only", top);

    let top = m.begin_phase();
    let report = measured!(m, "check", image.check(scratch), "check")?;
    clean("check", &report)?;
    let closed = measured!(m, "close", image.close(), "check")?;
    m.end_phase("check", top);
    Ok(closed)
}

/// Phase repair: reopen read-write, repair (nothing to do), verify.
async fn repair(
    m: &StackMeter,
    disk: Device,
    cache: Cache,
    io: &mut [Sector; IO_SECTORS],
    scratch: &mut [u8],
) -> Result<(Device, Cache), Fail> {
    let top = m.begin_phase();
    let mut image: Image = measured!(
        m,
        "open",
        Qcow2::open(disk, cache, OpenOptions::read_write()),
        "repair"
    )?;
    let report = measured!(m, "repair", image.repair(scratch, Repair::All), "repair")?;
    clean("repair", &report)?;
    verify(m, &mut image, io, CREATE_SEED, CREATE_WRITES, CREATE_HOLES).await?;
    let closed = measured!(m, "close", image.close(), "repair")?;
    m.end_phase("repair", top);
    Ok(closed)
}

/// Phase discard: reopens read-write, discards two written ranges (one
/// across an L2 table boundary), flushes; they read as zeros, the rest
/// keeps its data, and check finds the image clean (the freed clusters
/// are neither leaked nor still referenced).
async fn discard(
    m: &StackMeter,
    disk: Device,
    cache: Cache,
    io: &mut [Sector; IO_SECTORS],
    scratch: &mut [u8],
) -> Result<(Device, Cache), Fail> {
    let top = m.begin_phase();
    let mut image: Image = measured!(
        m,
        "open",
        Qcow2::open(disk, cache, OpenOptions::read_write()),
        "discard"
    )?;
    for &(first, count) in DISCARDED {
        measured!(m, "discard", image.discard(first, count), "discard")?;
    }
    measured!(m, "flush", image.flush(), "discard")?;
    verify(m, &mut image, io, CREATE_SEED, KEPT, DISCARDED).await?;
    verify(m, &mut image, io, CREATE_SEED, &[], CREATE_HOLES).await?;
    let report = measured!(m, "check", image.check(scratch), "discard")?;
    clean("discard check", &report)?;
    let closed = measured!(m, "close", image.close(), "discard")?;
    m.end_phase("discard", top);
    Ok(closed)
}

/// Phase lazy-crash: an image with lazy refcounts is written, flushed and
/// abandoned (a crash: it stays dirty); opening it read-write rebuilds its
/// refcounts on the fixed-size disk; the data must survive and check must
/// find it clean.
async fn lazy_crash(
    m: &StackMeter,
    disk: Device,
    cache: Cache,
    io: &mut [Sector; IO_SECTORS],
    scratch: &mut [u8],
) -> Result<(Device, Cache), Fail> {
    let top = m.begin_phase();
    let options = CreateOptions {
        cluster_bits: 12,
        lazy_refcounts: true,
        ..CreateOptions::new(LAZY_SIZE)
    };
    let mut image: Image = measured!(
        m,
        "create",
        Qcow2::create(disk, cache, options),
        "lazy-crash"
    )?;
    write_ranges(m, &mut image, io, LAZY_SEED, LAZY_WRITES).await?;
    measured!(m, "flush", image.flush(), "lazy-crash")?;
    let (disk, cache) = image.abandon();
    let mut image: Image = measured!(
        m,
        "open",
        Qcow2::open(disk, cache, OpenOptions::read_write()),
        "lazy-crash: reopening the dirty image"
    )?;
    verify(m, &mut image, io, LAZY_SEED, LAZY_WRITES, LAZY_HOLES).await?;
    let report = measured!(m, "check", image.check(scratch), "lazy-crash")?;
    clean("lazy-crash check", &report)?;
    let closed = measured!(m, "close", image.close(), "lazy-crash")?;
    m.end_phase("lazy-crash", top);
    Ok(closed)
}

/// Phase app: the calls of the phases above as an ordinary application
/// writes them, one after the other with plain `.await`s, no meter and no
/// wrappers, run under `block_on` of its own: creates an image, writes and
/// reads it back, flushes and closes it, reopens it read-only and reads
/// it, reopens it read-write, checks, repairs, discards, writes zeroes,
/// verifies and closes. Its stack (`stack app`, the future included) is
/// what an application pays.
async fn app(
    disk: Device,
    cache: Cache,
    io: &mut [Sector; IO_SECTORS],
    scratch: &mut [u8],
) -> Result<Device, Fail> {
    let options = CreateOptions {
        cluster_bits: 9,
        ..CreateOptions::new(CREATE_SIZE)
    };
    let mut image: Image = Qcow2::create(disk, cache, options)
        .await
        .in_phase("app: create")?;
    for &(first, count) in CREATE_WRITES {
        for at in (first..first + count).step_by(IO_SECTORS) {
            let buf = chunk(io, at, first + count)?;
            for (s, sector) in buf.iter_mut().zip(at..) {
                pattern(APP_SEED, sector, s);
            }
            image.write(at, buf).await.in_phase("app: write")?;
        }
    }
    for &(first, count) in CREATE_WRITES {
        for at in (first..first + count).step_by(IO_SECTORS) {
            let buf = chunk(io, at, first + count)?;
            image.read(at, buf).await.in_phase("app: read")?;
            if !holds_pattern(APP_SEED, at, buf) {
                return Err(Fail::Verify("app: data read back differs"));
            }
        }
    }
    image.flush().await.in_phase("app: flush")?;
    let (disk, cache) = image.close().await.in_phase("app: close")?;

    let mut image: Image = Qcow2::open(disk, cache, OpenOptions::read_only())
        .await
        .in_phase("app: open read-only")?;
    let buf = chunk(io, 0, 8)?;
    image.read(0, buf).await.in_phase("app: read")?;
    if !holds_pattern(APP_SEED, 0, buf) {
        return Err(Fail::Verify("app: read-only data differs"));
    }
    let (disk, cache) = image.close().await.in_phase("app: close")?;

    let mut image: Image = Qcow2::open(disk, cache, OpenOptions::read_write())
        .await
        .in_phase("app: open")?;
    let report = image.check(scratch).await.in_phase("app: check")?;
    clean("app check", &report)?;
    let report = image
        .repair(scratch, Repair::All)
        .await
        .in_phase("app: repair")?;
    clean("app repair", &report)?;
    for &(first, count) in DISCARDED {
        image.discard(first, count).await.in_phase("app: discard")?;
    }
    image
        .write_zeroes(0, 8, false)
        .await
        .in_phase("app: write zeroes")?;
    image.flush().await.in_phase("app: flush")?;
    for &(first, count) in DISCARDED.iter().chain(&[(0, 8)]) {
        for at in (first..first + count).step_by(IO_SECTORS) {
            let buf = chunk(io, at, first + count)?;
            image.read(at, buf).await.in_phase("app: read")?;
            if buf.iter().any(|s| s.iter().any(|&b| b != 0)) {
                return Err(Fail::Verify("app: discarded data still reads"));
            }
        }
    }
    let report = image.check(scratch).await.in_phase("app: check")?;
    clean("app check after discard", &report)?;
    let (disk, _cache) = image.close().await.in_phase("app: close")?;
    Ok(disk)
}

/// Zeroes the whole disk (a function: the device is a `RamDisk` or a
/// `&mut` of one, depending on the build).
fn zero(disk: &mut Device) {
    disk.zero();
}

/// The part of `io` for sectors `at..end`, at most `IO_SECTORS`.
fn chunk(io: &mut [Sector; IO_SECTORS], at: u64, end: u64) -> Result<&mut [Sector], Fail> {
    let n = end.saturating_sub(at).min(IO_SECTORS as u64) as usize;
    io.get_mut(..n).ok_or(Fail::Verify("chunk"))
}

/// Prints a check report; fails unless it is clean.
fn clean(what: &'static str, report: &CheckReport) -> Result<(), Fail> {
    println!(
        "{what}: corruptions {}, leaks {}, allocated {} of {} clusters, {} pass(es)",
        report.corruptions,
        report.leaks,
        report.allocated_clusters,
        report.total_clusters,
        report.passes
    );
    if report.is_clean() {
        Ok(())
    } else {
        Err(Fail::Verify(what))
    }
}

/// Writes [`pattern`] over each range, `IO_SECTORS` at a time.
async fn write_ranges(
    m: &StackMeter,
    image: &mut Image,
    io: &mut [Sector; IO_SECTORS],
    seed: u8,
    ranges: &[(u64, u64)],
) -> Result<(), Fail> {
    for &(first, count) in ranges {
        let mut at = first;
        while at < first + count {
            let n = (first + count - at).min(IO_SECTORS as u64) as usize;
            let buf = io.get_mut(..n).ok_or(Fail::Verify("chunk"))?;
            for (s, sector) in buf.iter_mut().zip(at..) {
                pattern(seed, sector, s);
            }
            measured!(m, "write", image.write(at, buf), "write")?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Reads every range back and compares it with [`pattern`]; `holes` must
/// read as zeros.
async fn verify(
    m: &StackMeter,
    image: &mut Image,
    io: &mut [Sector; IO_SECTORS],
    seed: u8,
    ranges: &[(u64, u64)],
    holes: &[(u64, u64)],
) -> Result<(), Fail> {
    for (&(first, count), hole) in ranges
        .iter()
        .map(|r| (r, false))
        .chain(holes.iter().map(|r| (r, true)))
    {
        let mut at = first;
        while at < first + count {
            let n = (first + count - at).min(IO_SECTORS as u64) as usize;
            let buf = io.get_mut(..n).ok_or(Fail::Verify("chunk"))?;
            measured!(m, "read", image.read(at, buf), "read")?;
            let good = if hole {
                buf.iter().all(|s| s.iter().all(|&b| b == 0))
            } else {
                holds_pattern(seed, at, buf)
            };
            if !good {
                return Err(Fail::Verify(if hole {
                    "a hole did not read as zeros"
                } else {
                    "data read back differs from what was written"
                }));
            }
            at += n as u64;
        }
    }
    Ok(())
}
