//! Helpers of the tool's block-device tests: the shared `test-support`
//! crate, and running this package's `qcow2-tool` binary.
#![allow(dead_code, unused_imports)]

pub use test_support::{ok, qemu_img, qemu_io, run, stderr, stdout, Scratch};

/// Runs the tool.
pub fn tool(args: &[&str]) -> std::process::Output {
    run(env!("CARGO_BIN_EXE_qcow2-tool"), args)
}
