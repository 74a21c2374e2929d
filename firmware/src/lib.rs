//! What both firmware binaries share: the RAM block device (module `disk`),
//! the data pattern, the stack meter, the panic handler and the host file
//! helpers.
//!
//! Output goes to the host through semihosting, one figure a line, in the
//! forms `cargo xtask firmware` and `cargo xtask size` parse:
//! `future <call>: N B`, `poll <call>: N B`, `stack <phase>: N B`,
//! `ram <what>: N B`.
#![no_std]

mod disk;

pub use disk::{take_device, Device, DiskError, RamDisk, DISK_SECTORS};

use core::cell::Cell;
use core::ffi::CStr;
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll};

use qcow2_core::{Sector, SECTOR};
use semihosting::io::{Read as _, Write as _};
use semihosting::{eprintln, println};

/// The content the examples write to guest sector `sector` of image
/// `seed`: the sector number, then bytes that differ between sectors.
pub fn pattern(seed: u8, sector: u64, out: &mut Sector) {
    let tag = sector.to_le_bytes();
    let mix = (sector as u8).wrapping_mul(31) ^ seed;
    for (i, b) in out.iter_mut().enumerate() {
        *b = match tag.get(i) {
            Some(t) => *t,
            None => mix ^ (i as u8),
        };
    }
}

/// Whether `got` holds [`pattern`]`(seed, first + i)` in each sector `i`.
pub fn holds_pattern(seed: u8, first: u64, got: &[Sector]) -> bool {
    let mut want = [0; SECTOR];
    got.iter().zip(first..).all(|(g, s)| {
        pattern(seed, s, &mut want);
        *g == want
    })
}

/// Writes a whole disk, `bytes` ([`RamDisk::bytes`]), to `name` in the
/// host's working directory.
pub fn dump(name: &CStr, bytes: &[u8]) -> Result<(), semihosting::io::Error> {
    semihosting::fs::File::create(name)?.write_all(bytes)
}

/// Fills a disk, `buf` ([`RamDisk::bytes_mut`]), from the host file `name`
/// (the rest zero); returns the number of bytes read.
pub fn load(name: &CStr, buf: &mut [u8]) -> Result<usize, semihosting::io::Error> {
    let mut file = semihosting::fs::File::open(name)?;
    buf.fill(0);
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..) {
        if rest.is_empty() {
            break;
        }
        match file.read(rest)? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

/// Reports a panic through semihosting and exits with status 101.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    eprintln!("panic: {info}");
    semihosting::process::exit(101)
}

/// Word written over the unused stack; a word that no longer holds it was
/// used.
const PAINT: u32 = 0xc0de_57ac;

/// Bytes below the stack pointer left unpainted when painting, so that the
/// painting and scanning functions (leaves with tiny frames) never
/// overwrite their own frames or find their own use.
const MARGIN: usize = 64;

/// How far below the entry stack pointer the meter paints: 8 times the
/// budget of the whole example. Use beyond it shows as the whole window.
pub const WINDOW: usize = 128 * 1024;

extern "C" {
    /// cortex-m-rt's `link.x`: the end of `.bss` and `.uninit`, the lowest
    /// address the stack may reach.
    static _stack_end: u32;
}

/// The current stack pointer (thread mode runs on MSP after reset).
#[inline(always)]
pub fn sp() -> usize {
    cortex_m::register::msp::read() as usize
}

/// Measures stack use by painting the unused stack and finding the lowest
/// word that was overwritten ("high-water mark").
///
/// Every [`StackMeter::record`] folds the current high-water mark into the
/// phase and run minimums; every paint is preceded by a record, except
/// right after printing (the printing is not what is measured).
pub struct StackMeter {
    /// Lowest painted address.
    bottom: usize,
    /// One past the highest address of the last painting.
    painted_end: Cell<usize>,
    /// Lowest used address seen since the phase began.
    phase_low: Cell<usize>,
    /// Lowest used address seen in the whole run.
    total_low: Cell<usize>,
}

impl StackMeter {
    /// Starts measuring: paints the stack below the caller's frame (to
    /// [`WINDOW`] below it, or the end of the RAM the statics leave).
    #[inline(always)]
    pub fn start() -> StackMeter {
        let top = sp();
        let end = core::ptr::addr_of!(_stack_end) as usize;
        let meter = StackMeter {
            bottom: top.saturating_sub(WINDOW).max(end).next_multiple_of(4),
            painted_end: Cell::new(0),
            phase_low: Cell::new(usize::MAX),
            total_low: Cell::new(usize::MAX),
        };
        meter.paint();
        meter
    }

    /// Paints the stack from the bottom to `MARGIN` below the stack
    /// pointer.
    #[inline(never)]
    pub fn paint(&self) {
        let end = sp().saturating_sub(MARGIN) & !3;
        let mut p = self.bottom;
        while p < end {
            // SAFETY: [bottom, end) lies between the lowest address the
            // stack may reach (`_stack_end`, above every static) and
            // MARGIN bytes below this function's own stack pointer: memory
            // no live frame uses, that nothing references, and that no
            // interrupt handler touches (none is enabled). Volatile, so the
            // compiler neither drops nor merges the stores.
            unsafe { core::ptr::write_volatile(p as *mut u32, PAINT) };
            p += 4;
        }
        self.painted_end.set(end);
    }

    /// The lowest overwritten address since the last paint (the end of
    /// the painting when none is).
    #[inline(never)]
    fn scan(&self) -> usize {
        let end = self.painted_end.get();
        let mut p = self.bottom;
        // SAFETY: reads painted stack memory below every live frame (see
        // `paint`); volatile, because the frames that overwrote it are
        // invisible to the compiler here.
        while p < end && unsafe { core::ptr::read_volatile(p as *const u32) } == PAINT {
            p += 4;
        }
        p
    }

    /// Folds the high-water mark since the last paint into the phase and
    /// run minimums; returns it.
    pub fn record(&self) -> usize {
        let low = self.scan();
        self.phase_low.set(self.phase_low.get().min(low));
        self.total_low.set(self.total_low.get().min(low));
        low
    }

    /// Starts a phase; returns the stack pointer it is measured from.
    #[inline(always)]
    pub fn begin_phase(&self) -> usize {
        let top = sp();
        self.record();
        self.phase_low.set(usize::MAX);
        self.paint();
        top
    }

    /// Ends the phase begun at `top`: prints `stack <name>: N B`.
    pub fn end_phase(&self, name: &str, top: usize) {
        self.record();
        println!(
            "stack {name}: {} B",
            top.saturating_sub(self.phase_low.get())
        );
        self.paint();
    }

    /// Prints `stack total: N B`, the use below `top` in the whole run.
    pub fn end_run(&self, top: usize) {
        self.record();
        let low = self.total_low.get();
        println!("stack total: {} B", top.saturating_sub(low));
        if low <= self.bottom {
            println!("stack window exceeded: more than {WINDOW} B");
        }
    }

    /// Measures one API call: prints `future <name>: N B` (the size of
    /// the future the call returned) now, and `poll <name>: N B` (the most
    /// stack used below the poll of the returned [`Measured`] while polling
    /// `fut`, beyond the future itself) when it completes.
    ///
    /// The caller pins the future in place (`core::pin::pin!`), so that it
    /// is stored once in the caller's future: an `async fn` wrapper taking
    /// it by value would hold it two or three times over.
    pub fn call<'a, F: Future>(&'a self, name: &'a str, fut: Pin<&'a mut F>) -> Measured<'a, F> {
        self.record();
        println!("future {name}: {} B", core::mem::size_of_val(&*fut));
        Measured {
            meter: self,
            name,
            fut,
            used: 0,
        }
    }
}

/// Polls `fut` in a frame of its own, below the caller's stack pointer:
/// what the compiler inlines of `fut`'s poll lands there, where the meter
/// sees it, and not in the caller's frame, which was allocated before the
/// caller read the stack pointer.
#[inline(never)]
fn poll_below<F: Future>(fut: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
    fut.poll(cx)
}

/// A future being measured by [`StackMeter::call`].
pub struct Measured<'a, F> {
    meter: &'a StackMeter,
    name: &'a str,
    fut: Pin<&'a mut F>,
    used: usize,
}

impl<F: Future> Future for Measured<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let top = sp();
        this.meter.paint();
        let out = poll_below(this.fut.as_mut(), cx);
        let low = this.meter.record();
        this.used = this.used.max(top.saturating_sub(low));
        if out.is_ready() {
            println!("poll {}: {} B", this.name, this.used);
            this.meter.paint();
        }
        out
    }
}
