//! One test kit for the integration tests of `qcow2-std-shim` and
//! `qcow2-tool`: written once, used by every test file.
//!
//! * [`Scratch`]: a temporary directory, removed when dropped.
//! * [`process`]: running programs (`qemu-img`, `qemu-io`, `qemu-nbd`, the
//!   tool by its path) and asserting success with stdout and stderr in the
//!   panic message.
//! * [`qemu`]: QEMU as the oracle for qcow2 images: create, `qemu-io`
//!   scripts, `check`, `compare`, `info` and `map` read with serde_json.
//! * [`output`]: QEMU's output made comparable with ours (timings removed,
//!   program prefixes replaced).
//! * [`rng`]: deterministic pseudo-random numbers and bytes.
//! * [`model`]: expected guest contents (sparse in memory, or a raw file
//!   for `qemu-img compare`) and byte comparison with a useful message.
//! * [`raw`]: named qcow2 header offsets and peeking or poking bytes of an
//!   image file.
//!
//! The crate knows nothing of the qcow2 crates (so both can depend on it
//! without a cycle); helpers that need the tool take its path, which only
//! the tool's own tests know (`env!("CARGO_BIN_EXE_qcow2-tool")`).

#![warn(missing_docs)]

pub mod model;
pub mod output;
pub mod process;
pub mod qemu;
pub mod raw;
pub mod rng;
mod scratch;

pub use process::{ok, qemu_img, qemu_io, run, run_ok, stderr, stdout, succeeded, text};
pub use rng::{noise, pattern_at, Rng};
pub use scratch::{path_str, Scratch};

/// One kibibyte.
pub const KIB: u64 = 1 << 10;
/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One gibibyte.
pub const GIB: u64 = 1 << 30;
/// One pebibyte.
pub const PIB: u64 = 1 << 50;
