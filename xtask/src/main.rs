//! Project automation, run as `cargo xtask <command>`.
//!
//! - `ci`: formatting, clippy, every test, and the `thumbv7em-none-eabihf`
//!   build of the core, installing the target when missing.
//! - `interop`: only the tests that use qemu-img / qemu-io as the oracle.
//! - `size`: the memory figures of an open image.
//! - `corpus`: regenerate the hostile image corpus and the fuzz seeds.
//! - `fuzz [--secs N] [TARGET...]`: run every cargo-fuzz target (or the
//!   named ones) for N seconds each (default 60), installing cargo-fuzz
//!   when missing; nightly when present, else stable without sanitizers.
//! - `miri`: the core's unit tests under miri (nightly with miri).
//! - `bench [--runs N] [--quick]`: qcow2-tool against qemu-img / qemu-io and
//!   raw pread/pwrite; writes BENCHMARKS.md (see `bench.rs`).

mod bench;
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
        Some("corpus") => corpus::generate(std::path::Path::new("qcow2-std-shim/tests/hostile"))
            .and_then(|()| corpus::fuzz_seeds(std::path::Path::new("fuzz"))),
        Some("fuzz") => fuzz(&args[1..]),
        Some("miri") => miri(),
        Some("bench") => bench::run(&args[1..]),
        _ => Err(
            "usage: cargo xtask ci | interop | size | corpus | fuzz [--secs N] [TARGET...] | miri | bench [--runs N] [--quick]"
                .into(),
        ),
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

/// The fuzz targets, as named in `fuzz/Cargo.toml`.
const FUZZ_TARGETS: &[&str] = &["header", "open_read", "ops", "check_repair"];

fn has_nightly() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn fuzz(args: &[String]) -> Result<(), String> {
    let mut secs = 60u64;
    let mut targets: Vec<&str> = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--secs" => {
                secs = it
                    .next()
                    .and_then(|s| s.parse().ok())
                    .ok_or("--secs needs a number of seconds")?;
            }
            t if FUZZ_TARGETS.contains(&t) => targets.push(t),
            other => return Err(format!("unknown fuzz target or option `{other}`")),
        }
    }
    if targets.is_empty() {
        targets = FUZZ_TARGETS.to_vec();
    }
    let have_fuzz = Command::new(cargo())
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_fuzz {
        run(&cargo(), &["install", "cargo-fuzz", "--locked"])?;
    }
    let nightly = has_nightly();
    let max_time = format!("-max_total_time={secs}");
    for target in targets {
        let corpus = format!("corpus/{target}");
        let mut cmd = Command::new("cargo");
        if nightly {
            cmd.arg("+nightly");
        }
        cmd.args(["fuzz", "run"]);
        if !nightly {
            cmd.args(["--sanitizer", "none"]);
        }
        cmd.args([target, &corpus, "--", &max_time, "-print_final_stats=1"]);
        if target == "ops" {
            // Long inputs make long operation sequences.
            cmd.arg("-max_len=4096");
        }
        cmd.current_dir("fuzz");
        eprintln!(
            "xtask: fuzzing {target} for {secs} s ({})",
            if nightly {
                "nightly"
            } else {
                "stable, no sanitizer"
            }
        );
        let status = cmd
            .status()
            .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
        if !status.success() {
            return Err(format!(
                "fuzz target {target} failed; see fuzz/artifacts/{target}/"
            ));
        }
    }
    Ok(())
}

fn miri() -> Result<(), String> {
    if !has_nightly() {
        return Err("miri needs a nightly toolchain".into());
    }
    run("rustup", &["+nightly", "component", "add", "miri"])?;
    run("cargo", &["+nightly", "miri", "test", "-p", "qcow2-core"])
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
