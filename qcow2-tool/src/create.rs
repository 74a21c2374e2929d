//! `create`: make a new, empty image.

use crate::disk::{round_to_sector, Disk, Format};
use crate::error::{core_error, CliError, CliResult};
use crate::options::{self, ImageOptions, QCOW2_KEYS};
use crate::size::{parse_size, SizeError};
use qcow2_core::CreateOptions;
use std::path::PathBuf;

/// Arguments of `create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', value_enum, default_value = "qcow2")]
    format: Format,
    /// Creation options: cluster_size, refcount_bits, lazy_refcounts, compat,
    /// size (comma-separated key=value; `-o help` lists them).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Do not print the `Formatting ...` line.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image file to create (an existing file is overwritten).
    file: PathBuf,
    /// Virtual size in bytes; suffixes k, M, G, T, P, E (powers of 1024).
    size: Option<String>,
}

/// Parses the positional size argument with `qemu-img`'s messages.
pub fn parse_image_size(text: &str) -> CliResult<u64> {
    match parse_size(text) {
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        Err(SizeError::Invalid) => Err(format!(
            "Invalid image size specified: '{text}'. You may use k, M, G, T, P or E suffixes \
             for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
        )
        .into()),
        _ => Err(size_range_error()),
    }
}

/// The error for a size beyond what QEMU accepts.
fn size_range_error() -> CliError {
    format!(
        "Invalid image size specified. Must be between 0 and {}.",
        i64::MAX
    )
    .into()
}

/// Runs `create`.
pub fn run(args: &CreateArgs) -> CliResult<()> {
    let allowed: Vec<&str> = match args.format {
        Format::Qcow2 => QCOW2_KEYS.iter().copied().chain(["size"]).collect(),
        Format::Raw => vec!["size"],
    };
    let opts: ImageOptions = options::parse(&args.options, &allowed)?;
    if opts.help {
        match args.format {
            Format::Qcow2 => outln!("{}", options::HELP),
            Format::Raw => {
                outln!("Supported raw options:\n  size=<size>            - Virtual disk size")
            }
        }
        return Ok(());
    }
    let shown = args.file.display().to_string();
    let size = match (&args.size, opts.size) {
        (Some(_), Some(_)) => {
            return Err(format!("{shown}: The image size must be specified only once").into())
        }
        (Some(text), None) => parse_image_size(text)?,
        (None, Some(n)) if n <= i64::MAX as u64 => n,
        (None, Some(_)) => return Err(size_range_error()),
        (None, None) => {
            return Err(format!("{shown}: Image creation needs a size parameter").into())
        }
    };
    if !args.quiet {
        let described = match args.format {
            Format::Qcow2 => opts.describe(size),
            Format::Raw => format!("size={size}"),
        };
        outln!(
            "Formatting '{shown}', fmt={} {described}",
            args.format.name()
        );
    }
    let size = round_to_sector(size);
    let create: CreateOptions = match args.format {
        Format::Qcow2 => opts.to_create(size).map_err(|e| format!("{shown}: {e}"))?,
        Format::Raw => CreateOptions::new(size),
    };
    let disk =
        Disk::create(&args.file, args.format, size, &create).map_err(|e| e.create(&shown))?;
    disk.close().map_err(|e| {
        // Do not leave a half-written image behind.
        crate::disk::remove_unfinished(&args.file);
        core_error(&shown, &e)
    })
}
