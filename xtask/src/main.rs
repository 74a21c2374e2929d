//! Project automation, run as `cargo xtask <command>`.
//!
//! - `ci`: formatting, clippy, the `thumbv7em-none-eabihf` build of the
//!   core (installing the target when missing), the firmware example under
//!   QEMU, every test, and the size report with its panic-site check.
//! - `interop`: only the tests that use qemu-img / qemu-io as the oracle.
//! - `firmware --out DIR`: the `firmware/` example under QEMU (Cortex-M4F),
//!   its stack, future and RAM figures checked against the budget, the
//!   images it writes checked by `qemu-img check` (see `firmware.rs`).
//! - `size [--codecs]`: the RAM table, futures, stack, panic sites and
//!   `.text` of the firmware example and of the decoders of compressed
//!   clusters (only those with `--codecs`; see `size.rs`).
//! - `corpus`: regenerate the hostile image corpus and the fuzz seeds.
//! - `fuzz [--secs N] [TARGET...]`: run every cargo-fuzz target (or the
//!   named ones) for N seconds each (default 60), installing cargo-fuzz
//!   when missing; nightly when present, else stable without sanitizers.
//! - `miri`: the core's unit tests under miri (nightly with miri).
//! - `bench [--runs N] [--quick]`: qcow2-tool against qemu-img / qemu-io and
//!   raw pread/pwrite; writes BENCHMARKS.md (see `bench.rs`).

mod bench;
mod corpus;
mod firmware;
mod size;

use std::path::{Path, PathBuf};
use std::process::{exit, Command};

const EMBEDDED_TARGET: &str = "thumbv7em-none-eabihf";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("interop") => interop(),
        Some("size") => size::main(&args[1..]),
        Some("firmware") => firmware::main(&args[1..]),
        Some("corpus") => corpus::generate(std::path::Path::new("qcow2-std-shim/tests/hostile"))
            .and_then(|()| corpus::fuzz_seeds(std::path::Path::new("fuzz"))),
        Some("fuzz") => fuzz(&args[1..]),
        Some("miri") => miri(),
        Some("bench") => bench::run(&args[1..]),
        _ => Err(
            "usage: cargo xtask ci | interop | size [--codecs] | firmware --out DIR | corpus | fuzz [--secs N] [TARGET...] | miri | bench [--runs N] [--quick]"
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

/// The stdout of a command that must succeed, run in `dir` when given (its
/// stderr is kept for the error: the command line and the stderr,
/// trimmed).
fn output_of(program: &str, args: &[&str], dir: Option<&Path>) -> Result<String, String> {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let out = command
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

/// Runs cargo `subcommand` in release for [`EMBEDDED_TARGET`] on the crate
/// in `dir`, a workspace of its own (`firmware/`, the codec probe) that
/// builds into `dir/target`, with `extra` arguments after the shared ones
/// (features, `-- -D warnings`). Returns the directory its release
/// binaries land in.
fn cargo_embedded(subcommand: &str, dir: &str, extra: &[&str]) -> Result<PathBuf, String> {
    let manifest = format!("{dir}/Cargo.toml");
    let target_dir = format!("{dir}/target");
    let mut args = vec![
        subcommand,
        "--release",
        "--manifest-path",
        &manifest,
        "--target",
        EMBEDDED_TARGET,
        "--target-dir",
        &target_dir,
    ];
    args.extend_from_slice(extra);
    run(&cargo(), &args)?;
    Ok(Path::new(&target_dir).join(EMBEDDED_TARGET).join("release"))
}

/// Formatting and clippy (`-D warnings`) for the crate in `dir`, a
/// workspace of its own that the workspace-wide runs do not reach, once
/// per (name, cargo arguments) in `builds`.
fn lint_embedded(dir: &str, builds: &[(&str, &[&str])]) -> Result<(), String> {
    ensure_target()?;
    let manifest = format!("{dir}/Cargo.toml");
    run(
        &cargo(),
        &["fmt", "--manifest-path", &manifest, "--", "--check"],
    )?;
    for (_, build) in builds {
        let mut extra = build.to_vec();
        extra.extend_from_slice(&["--", "-D", "warnings"]);
        cargo_embedded("clippy", dir, &extra)?;
    }
    Ok(())
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
    // The trimmed and the logging builds of the core: lint-clean, and they
    // build for the target.
    for features in CORE_FEATURE_SETS {
        let mut clippy = vec!["clippy", "-p", "qcow2-core", "--all-targets"];
        clippy.extend_from_slice(features);
        clippy.extend_from_slice(&["--", "-D", "warnings"]);
        run(&cargo, &clippy)?;
        let mut build = vec!["build", "-p", "qcow2-core", "--release", "--target"];
        build.push(EMBEDDED_TARGET);
        build.extend_from_slice(features);
        run(&cargo, &build)?;
    }
    firmware::lint()?;
    size::lint_probe()?;
    let firmware_out = std::path::Path::new("target/firmware-ci");
    let figures = firmware::run_checked(firmware_out)?;
    run(&cargo, &["test", "--workspace"])?;
    size::report(&figures, true)
}

/// Feature sets of the core that CI lints and builds besides the default:
/// read-only, read-only with `check`, with `defmt` logging, and with the
/// decoders of compressed clusters (read-only with zlib, as a bootloader
/// would; both decoders with writing).
const CORE_FEATURE_SETS: &[&[&str]] = &[
    &["--no-default-features"],
    &["--no-default-features", "--features", "check"],
    &["--features", "defmt"],
    &["--no-default-features", "--features", "zlib"],
    &["--features", "zlib,zstd"],
];

/// The fuzz targets, as named in `fuzz/Cargo.toml`.
const FUZZ_TARGETS: &[&str] = &["header", "open_read", "ops", "check_repair", "codec"];

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
