//! The core's decoders of compressed clusters as firmware would hold them
//! (state, window, tables and buffers in `static`s), each started and
//! stepped once on input the compiler cannot see (with both features, as
//! one `codec::BothDecoder`, once per format): `cargo xtask size`
//! builds it with features `zlib` and `zstd` (and without, the baseline)
//! for `thumbv7em-none-eabihf` and reports the decoders' `.text`, their
//! panic call sites, and the sizes below. It is never run.
//!
//! `RAM_*` statics have the size of a type on the target (read with
//! `llvm-nm -S`): the RAM table rows.
#![no_std]
#![no_main]

use core::hint::black_box;

use cortex_m_rt::entry;
#[cfg(any(feature = "zlib", feature = "zstd"))]
use qcow2_core::codec::{Compression, Decoder};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        cortex_m::asm::wfi();
    }
}

/// Compressed input the optimizer knows nothing about.
static INPUT: [u8; 512] = [0; 512];

/// The cluster size of the probe's buffers (QEMU's default, 64 KiB).
#[cfg(any(feature = "zlib", feature = "zstd"))]
const CLUSTER: usize = 64 * 1024;

/// Starts `decoder` and steps it once.
#[cfg(any(feature = "zlib", feature = "zstd"))]
fn drive(decoder: &mut impl Decoder, format: Compression) {
    if decoder.start(format, black_box(CLUSTER)).is_ok() {
        let input: &[u8] = black_box(&INPUT);
        if let Ok(step) = decoder.step(input, black_box(true)) {
            black_box(step.consumed);
            black_box(step.output);
        }
    }
}

#[cfg(feature = "zlib")]
mod zlib {
    use qcow2_core::codec::inflate::{Inflate, InflateState, MIN_WINDOW, STATE_BYTES};
    use static_cell::{ConstStaticCell, StaticCell};

    /// Size of the inflate state on the target.
    #[no_mangle]
    #[used]
    static RAM_INFLATE_STATE: [u8; STATE_BYTES] = [0; STATE_BYTES];
    /// The smallest window for clusters larger than it.
    #[no_mangle]
    #[used]
    static RAM_INFLATE_WINDOW: [u8; MIN_WINDOW] = [0; MIN_WINDOW];

    static STATE: StaticCell<InflateState> = StaticCell::new();
    static WINDOW: ConstStaticCell<[u8; MIN_WINDOW]> = ConstStaticCell::new([0; MIN_WINDOW]);

    /// The decoder on its statics (once).
    pub fn decoder() -> Option<Inflate<'static>> {
        let state = STATE.try_init_with(InflateState::new)?;
        Some(Inflate::new(state, WINDOW.try_take()?))
    }
}

#[cfg(feature = "zstd")]
mod zstd {
    use qcow2_core::codec::zstd::{scratch_bytes, Zstd, ZstdTables, TABLES_BYTES};
    use static_cell::ConstStaticCell;

    use super::CLUSTER;

    /// Size of the zstd entropy tables on the target.
    #[no_mangle]
    #[used]
    static RAM_ZSTD_TABLES: [u8; TABLES_BYTES] = [0; TABLES_BYTES];
    /// History, block and literals buffers for 64 KiB clusters.
    #[no_mangle]
    #[used]
    static RAM_ZSTD_BUFFERS_64K: [u8; CLUSTER + 2 * SCRATCH] = [0; CLUSTER + 2 * SCRATCH];

    const SCRATCH: usize = scratch_bytes(CLUSTER);
    static TABLES: ConstStaticCell<ZstdTables> = ConstStaticCell::new(ZstdTables::new());
    static HISTORY: ConstStaticCell<[u8; CLUSTER]> = ConstStaticCell::new([0; CLUSTER]);
    static BLOCK: ConstStaticCell<[u8; SCRATCH]> = ConstStaticCell::new([0; SCRATCH]);
    static LITERALS: ConstStaticCell<[u8; SCRATCH]> = ConstStaticCell::new([0; SCRATCH]);

    /// The decoder on its statics (once).
    pub fn decoder() -> Option<Zstd<'static>> {
        Some(Zstd::new(
            TABLES.try_take()?,
            HISTORY.try_take()?,
            BLOCK.try_take()?,
            LITERALS.try_take()?,
        ))
    }
}

/// Each decoder of the build, driven.
fn run() -> Option<()> {
    #[cfg(all(feature = "zlib", feature = "zstd"))]
    {
        let mut both = qcow2_core::codec::BothDecoder::new(zlib::decoder()?, zstd::decoder()?);
        drive(&mut both, Compression::Zlib);
        drive(&mut both, Compression::Zstd);
    }
    #[cfg(all(feature = "zlib", not(feature = "zstd")))]
    drive(&mut zlib::decoder()?, Compression::Zlib);
    #[cfg(all(feature = "zstd", not(feature = "zlib")))]
    drive(&mut zstd::decoder()?, Compression::Zstd);
    Some(())
}

#[entry]
fn main() -> ! {
    run();
    black_box(&INPUT);
    loop {
        cortex_m::asm::wfi();
    }
}
