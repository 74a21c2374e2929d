//! `create`: make a new, empty image.

use crate::disk::{round_to_sector, Disk, Format, OpenError};
use crate::error::{core_error, io_error, CliError, CliResult};
use crate::options::{self, ImageOptions, FILE_KEYS, QCOW2_KEYS, QEMU_FORMATS};
use crate::size::{parse_size, SizeError};
use qcow2_core::{CreateOptions, Error};
use qcow2_std_shim::{block_on, FileDevice, LockError};
use std::path::{Path, PathBuf};

/// Arguments of `create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', value_enum, default_value = "qcow2")]
    format: Format,
    /// Creation options: cluster_size, refcount_bits, lazy_refcounts, compat,
    /// backing_file, backing_fmt, data_file, data_file_raw, size
    /// (comma-separated key=value; `-o help` lists them).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file: unallocated clusters of the new image read from it.
    /// Stored as given; a relative name is relative to the new image's
    /// directory. The size defaults to the backing's.
    #[arg(short = 'b', value_name = "BACKING_FILE")]
    backing: Option<String>,
    /// Format of the backing file (`raw`, `qcow2`); required with `-b`.
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    backing_format: Option<String>,
    /// Do not open the backing file (the size must then be given).
    #[arg(short = 'u')]
    unsafe_backing: bool,
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

/// The name QEMU opens for backing file `backing` of image `image`
/// (`bdrv_get_full_backing_filename_from_filename`): absolute names and
/// names with a protocol prefix as they are, relative ones after the
/// image's directory as given (`dir/ov.qcow2` + `base` = `dir/base`).
pub fn full_backing_name(image: &str, backing: &str) -> String {
    let protocol = backing
        .find([':', '/'])
        .is_some_and(|at| backing[at..].starts_with(':'));
    if backing.is_empty() || protocol || backing.starts_with('/') {
        return backing.to_string();
    }
    match image.rfind('/') {
        Some(at) => format!("{}{backing}", &image[..=at]),
        None => backing.to_string(),
    }
}

/// Opens the backing file `backing` of the new image `image` (read-only,
/// sharing everything, its own chain too, as QEMU does) as `format`
/// (probed when `None`) and returns the format and its virtual size, or
/// the error as `qemu-img create` words it (before its `Could not open
/// backing image.` hint).
fn open_backing(image: &Path, backing: &str, format: Option<&str>) -> CliResult<(Format, u64)> {
    if let Some(other) = format.filter(|f| !matches!(*f, "raw" | "qcow2" | "file")) {
        if QEMU_FORMATS.contains(&other) {
            let full = full_backing_name(&image.display().to_string(), backing);
            return Err(format!(
                "Could not open '{full}': backing format '{other}' is not supported"
            )
            .into());
        }
    }
    crate::disk::open_new_backing(image, backing, format).map_err(CliError)
}

/// Creates (or truncates) the raw data file `name` of `size` bytes, as
/// QEMU does for `data_file` (relative to the current directory).
fn create_data_file(name: &str, size: u64) -> CliResult<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(name)
        .and_then(|f| f.set_len(size))
        .map_err(|e| io_error(&format!("Could not create '{name}'"), &e))
}

/// Formats `path` as a qcow2 image naming the files of `opts` (backing
/// file, data file), without opening it: the core does not open images
/// with a data file yet. Errors as `qemu-img create` words them.
fn create_with_files(
    path: &Path,
    shown: &str,
    create: &CreateOptions,
    opts: &ImageOptions,
) -> CliResult<()> {
    let context = format!("Could not create '{shown}'");
    let mut dev = FileDevice::create_locked(path).map_err(|e| match LockError::from_io(&e) {
        Some(_) => OpenError::from_io(shown, &e).create(shown),
        None => io_error(&context, &e),
    })?;
    let files = opts.files();
    let formatted = block_on(create.format(&mut dev, &files));
    drop(dev);
    formatted.map_err(|e| {
        crate::disk::remove_unfinished(path);
        // As QEMU's bdrv_change_backing_file fails (EINVAL, ENOSPC).
        let errno = match &e {
            Error::InvalidArgument(what) if what.starts_with("backing") => "Invalid argument",
            Error::NoSpace => "No space left on device",
            _ => return core_error(shown, &e),
        };
        match &opts.backing_file {
            Some(backing) => CliError(format!(
                "{shown}: Could not assign backing file '{backing}' with format '{}': {errno}",
                opts.backing_fmt.as_deref().unwrap_or_default(),
            )),
            None => core_error(shown, &e),
        }
    })
}

/// Runs `create`.
pub fn run(args: &CreateArgs) -> CliResult<()> {
    let allowed: Vec<&str> = match args.format {
        Format::Qcow2 => QCOW2_KEYS
            .iter()
            .chain(FILE_KEYS)
            .copied()
            .chain(["size"])
            .collect(),
        Format::Raw => vec!["size"],
    };
    let mut opts: ImageOptions = options::parse(&args.options, &allowed)?;
    if opts.help {
        match args.format {
            Format::Qcow2 => outln!("{}", options::CREATE_HELP),
            Format::Raw => {
                outln!("Supported raw options:\n  size=<size>            - Virtual disk size")
            }
        }
        return Ok(());
    }
    let shown = args.file.display().to_string();
    // `-b` and `-F` win over `-o`, as in qemu-img.
    if let Some(backing) = &args.backing {
        if args.format == Format::Raw {
            return Err(
                format!("{shown}: Backing file not supported for file format 'raw'").into(),
            );
        }
        opts.backing_file = Some(backing.clone());
    }
    if let Some(format) = &args.backing_format {
        if args.format == Format::Raw {
            return Err(format!(
                "{shown}: Backing file format not supported for file format 'raw'"
            )
            .into());
        }
        opts.backing_fmt = Some(format.clone());
    }
    if let Some(backing) = &opts.backing_file {
        if *backing == shown {
            return Err(format!(
                "{shown}: Error: Trying to create an image with the same filename as the \
                 backing file"
            )
            .into());
        }
        if backing.is_empty() {
            return Err(format!("{shown}: Expected backing file name, got empty string").into());
        }
    }
    let mut size = match (&args.size, opts.size) {
        (Some(_), Some(_)) => {
            return Err(format!("{shown}: The image size must be specified only once").into())
        }
        (Some(text), None) => Some(parse_image_size(text)?),
        (None, Some(n)) if n <= i64::MAX as u64 => Some(n),
        (None, Some(_)) => return Err(size_range_error()),
        (None, None) => None,
    };
    if let Some(backing) = &opts.backing_file {
        if !args.unsafe_backing {
            let (format, backing_size) =
                open_backing(&args.file, backing, opts.backing_fmt.as_deref())
                    .map_err(|e| format!("{shown}: {e}\nCould not open backing image."))?;
            if opts.backing_fmt.is_none() {
                return Err(format!(
                    "{shown}: Backing file specified without backing format\n\
                     Detected format of {}.",
                    format.name()
                )
                .into());
            }
            size.get_or_insert(backing_size);
        } else if opts.backing_fmt.is_none() {
            return Err(format!("{shown}: Backing file specified without backing format").into());
        }
    }
    let Some(size) = size else {
        return Err(format!("{shown}: Image creation needs a size parameter").into());
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
    if let Some(format) = &opts.backing_fmt {
        if !QEMU_FORMATS.contains(&format.as_str()) {
            return Err(format!(
                "{shown}: Parameter 'backing-fmt' does not accept value '{format}'"
            )
            .into());
        }
    }
    let create: CreateOptions = match args.format {
        Format::Qcow2 => opts.to_create(size).map_err(|e| format!("{shown}: {e}"))?,
        Format::Raw => CreateOptions::new(size),
    };
    if opts.backing_file.is_some() || opts.data_file.is_some() {
        if let Some(data_file) = &opts.data_file {
            create_data_file(data_file, size).map_err(|e| format!("{shown}: {e}"))?;
        }
        return create_with_files(&args.file, &shown, &create, &opts).inspect_err(|_| {
            if let Some(data_file) = &opts.data_file {
                let _ = std::fs::remove_file(data_file);
            }
        });
    }
    let disk =
        Disk::create(&args.file, args.format, size, &create).map_err(|e| e.create(&shown))?;
    disk.close().map_err(|e| {
        // Do not leave a half-written image behind.
        crate::disk::remove_unfinished(&args.file);
        core_error(&shown, &e)
    })
}

#[cfg(test)]
mod tests {
    use super::full_backing_name;

    #[test]
    fn backing_names_resolve_as_in_qemu() {
        assert_eq!(full_backing_name("ov.qcow2", "base.raw"), "base.raw");
        assert_eq!(
            full_backing_name("sub/ov.qcow2", "base.raw"),
            "sub/base.raw"
        );
        assert_eq!(full_backing_name("sub/ov.qcow2", "sub/b"), "sub/sub/b");
        assert_eq!(full_backing_name("../ov.qcow2", "b"), "../b");
        assert_eq!(full_backing_name("/a/b/ov.qcow2", "c/d"), "/a/b/c/d");
        assert_eq!(full_backing_name("sub/ov.qcow2", "/abs/b"), "/abs/b");
        assert_eq!(
            full_backing_name("sub/ov.qcow2", "nbd:host:10809"),
            "nbd:host:10809"
        );
        assert_eq!(full_backing_name("sub/ov.qcow2", "dir/a:b"), "sub/dir/a:b");
        assert_eq!(full_backing_name("sub/ov.qcow2", ""), "");
    }
}
