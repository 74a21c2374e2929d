//! Project automation, run as `cargo xtask <command>`.
//!
//! - `ci`: formatting, clippy, every test, and the `thumbv7em-none-eabihf`
//!   build of the core, installing the target when missing.
//! - `interop`: only the tests that use qemu-img / qemu-io as the oracle.
//! - `size`: the memory figures of an open image.
//! - `corpus`: regenerate the hostile image corpus.
//! - `fuzz`, `bench`: not implemented yet; they fail with a message.

mod corpus;

use std::process::{exit, Command};

const EMBEDDED_TARGET: &str = "thumbv7em-none-eabihf";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("interop") => interop(),
        Some("size") => {
            size();
            Ok(())
        }
        Some("corpus") => corpus::generate(std::path::Path::new("qcow2-std-shim/tests/hostile")),
        Some("fuzz") => {
            Err("fuzzing is not implemented yet (tracked by the reliability issue)".into())
        }
        Some("bench") => {
            Err("benchmarks are not implemented yet (tracked by the performance issue)".into())
        }
        _ => Err("usage: cargo xtask ci | interop | size | corpus | fuzz | bench".into()),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e}");
        exit(1);
    }
}

/// Runs a command, failing with its description when it does not succeed.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    eprintln!("xtask: running {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed ({status})", args.join(" ")))
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn ensure_target() -> Result<(), String> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == EMBEDDED_TARGET)
        })
        .unwrap_or(false);
    if installed {
        Ok(())
    } else {
        run("rustup", &["target", "add", EMBEDDED_TARGET])
    }
}

fn ci() -> Result<(), String> {
    let cargo = cargo();
    run(&cargo, &["fmt", "--all", "--", "--check"])?;
    run(
        &cargo,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    ensure_target()?;
    run(
        &cargo,
        &[
            "build",
            "-p",
            "qcow2-core",
            "--release",
            "--target",
            EMBEDDED_TARGET,
        ],
    )?;
    run(&cargo, &["test", "--workspace"])?;
    size();
    Ok(())
}

fn interop() -> Result<(), String> {
    let cargo = cargo();
    run(
        &cargo,
        &[
            "test",
            "-p",
            "qcow2-std-shim",
            "--test",
            "interop",
            "--test",
            "model",
        ],
    )?;
    run(&cargo, &["test", "-p", "qcow2-tool"])
}

/// A device of no size, to measure the image struct itself.
struct NullDevice;

impl qcow2_core::BlockDevice for NullDevice {
    type Error = ();
    async fn read(&mut self, _: u64, _: &mut [qcow2_core::Sector]) -> Result<(), ()> {
        Err(())
    }
    async fn write(&mut self, _: u64, _: &[qcow2_core::Sector]) -> Result<(), ()> {
        Err(())
    }
    async fn flush(&mut self) -> Result<(), ()> {
        Ok(())
    }
    fn sector_count(&self) -> u64 {
        0
    }
    async fn set_sector_count(&mut self, _: u64) -> Result<(), ()> {
        Err(())
    }
}

fn size() {
    use qcow2_core::{FirmwareCache, FirmwareQcow2, Slot};
    println!(
        "size_of FirmwareQcow2 (8 x 512 B cache slices, zero-sized device): {} bytes",
        std::mem::size_of::<FirmwareQcow2<NullDevice>>()
    );
    println!(
        "  of which the cache slots: {} bytes",
        std::mem::size_of::<FirmwareCache>()
    );
    println!("  one 512 B slot: {} bytes", std::mem::size_of::<Slot<1>>());
}
