//! `qcow2-tool`: a small `qemu-img` / `qemu-io` work-alike built on
//! `qcow2-core`.
//!
//! Subcommands: `create`, `info`, `check`, `convert`, `io` and `bench`. Failures print one
//! line, `qcow2-tool: <message>`, on stderr and exit with status 1; where QEMU adds a hint
//! line (`Is another process using the image [<file>]?` after a lock conflict), so do we.
//!
//! Every subcommand locks the images it opens as its `qemu-img` / `qemu-io` counterpart
//! does (see `qcow2_std_shim::lock`), for as long as it has them open, so it and QEMU
//! refuse each other as two QEMU processes do; `-U` / `--force-share` opens read-only
//! images in shared mode where `qemu-img` and `qemu-io` accept it.
#![forbid(unsafe_code)]

/// `println!` that ignores a closed stdout instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` that ignores a closed stdout instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// `eprintln!` that ignores a closed stderr instead of panicking.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod bench;
mod check;
mod convert;
mod create;
mod disk;
mod error;
mod info;
mod io_cmd;
mod json;
mod options;
mod size;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Create, inspect, convert and exercise qcow2 images.
#[derive(Debug, Parser)]
#[command(name = "qcow2-tool", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new, empty image (like `qemu-img create`).
    Create(create::CreateArgs),
    /// Describe an image (like `qemu-img info`).
    Info(info::InfoArgs),
    /// Check an image's consistency and optionally repair it (like
    /// `qemu-img check`; exit 2 for corruptions, 3 for leaks).
    Check(check::CheckArgs),
    /// Copy an image into a new one, possibly of another format (like
    /// `qemu-img convert`).
    Convert(convert::ConvertArgs),
    /// Run read/write/flush commands on an image (like `qemu-io`).
    Io(io_cmd::IoArgs),
    /// Time a run of read or write requests (like `qemu-img bench`).
    Bench(bench::BenchArgs),
}

/// Prints `message` as the tool's one-line error.
fn report_error(message: &str) -> ExitCode {
    errln!("qcow2-tool: {message}");
    ExitCode::FAILURE
}

/// The first paragraph of a clap error as one line, without `error: `.
fn first_paragraph(text: &str) -> String {
    let words: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = words.join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            // Help and version text go to stdout and are not failures.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let message = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                "missing subcommand (try --help)".to_string()
            } else {
                first_paragraph(&e.render().to_string())
            };
            return report_error(&message);
        }
    };
    let result = match &cli.command {
        Command::Create(args) => create::run(args).map(|()| true),
        Command::Info(args) => info::run(args).map(|()| true),
        Command::Convert(args) => convert::run(args).map(|()| true),
        Command::Io(args) => io_cmd::run(args),
        Command::Bench(args) => bench::run(args).map(|()| true),
        Command::Check(args) => {
            return match check::run(args) {
                Ok(status) => ExitCode::from(status),
                Err(e) => report_error(&e.0),
            }
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => report_error(&e.0),
    }
}
