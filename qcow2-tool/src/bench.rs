//! `bench`: a `qemu-img bench` work-alike.
//!
//! Sends COUNT requests of BUFFER_SIZE bytes, the first at OFFSET and each
//! next one STEP bytes further, and prints how long the request loop took.
//! Options, messages and output lines are those of `qemu-img bench` (QEMU
//! 10.0), with these differences:
//!
//! - The core serves one request at a time, so requests are sequential: the
//!   depth is checked and printed but does not make requests overlap.
//! - `-n`, `-i` and `--image-opts` are refused.
//! - Only `qcow2` and `raw` are known; `raw` is plain `pread`/`pwrite` on the
//!   file, the physical baseline.
//!
//! Offsets wrap as in qemu-img 10.0: after each request the offset advances
//! by STEP modulo the image size, so a request that then crosses the end of
//! the image fails with `Input/output error`, as it does in qemu-img. (Later
//! QEMU versions wrap modulo `size - BUFFER_SIZE` instead.)
//!
//! Only the request loop is timed; opening and closing are not. With
//! `--flush-interval=N`, a flush follows every request after which the
//! number of requests still to send is a multiple of N, as in qemu-img. The
//! last of those (nothing left to send) is issued after the clock stops,
//! because qemu-img stops its clock without waiting for that flush.

use crate::disk::{probe, round_to_sector, Access, Disk, Format, OpenError};
use crate::error::{core_error, core_message, errno_text, CliResult, CoreError};
use crate::size::{parse_c_unsigned, parse_size, SizeError};
use qcow2_core::{BlockDevice, Error, OpenOptions, SECTOR};
use qcow2_std_shim::{block_on, AlignedBuf, FileDevice, FileOptions, Image};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `INT_MAX`, qemu-img's bound for counts and sizes.
const INT_MAX: u64 = i32::MAX as u64;
/// Arguments of `bench`. As with getopt, a repeated option takes the last
/// value.
#[derive(Debug, clap::Args)]
#[command(
    args_override_self = true,
    after_help = "Requests start at OFFSET and advance by STEP_SIZE modulo the image size, \
                  as in qemu-img 10.0; a request that then crosses the end of the image \
                  fails. Requests are sequential whatever the depth. Only the request loop \
                  is timed."
)]
pub struct BenchArgs {
    /// Number of requests (default 75000).
    #[arg(
        short = 'c',
        long = "count",
        value_name = "COUNT",
        allow_hyphen_values = true
    )]
    count: Option<String>,
    /// Requests in flight (default 64). Accepted and printed like qemu-img,
    /// but requests are sequential: the core serves one at a time.
    #[arg(
        short = 'd',
        long = "depth",
        value_name = "DEPTH",
        allow_hyphen_values = true
    )]
    depth: Option<String>,
    /// Image format (probed from the magic bytes when absent). raw is plain
    /// pread/pwrite on the file.
    #[arg(short = 'f', long = "format", value_enum, value_name = "FMT")]
    format: Option<Format>,
    /// Not supported.
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Not supported (requests are synchronous).
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    aio: Option<String>,
    /// Not supported (requests are synchronous).
    #[arg(short = 'n', long = "native")]
    native: bool,
    /// Offset of the first request (default 0; suffixes k, M, G, ...).
    #[arg(
        short = 'o',
        long = "offset",
        value_name = "OFFSET",
        allow_hyphen_values = true
    )]
    offset: Option<String>,
    /// Accepted; like qemu-img bench, the report is still printed.
    #[arg(short = 'q', long = "quiet")]
    quiet: bool,
    /// Bytes per request (default 4K; suffixes k, M, G, ...).
    #[arg(
        short = 's',
        long = "buffer-size",
        value_name = "BUFFER_SIZE",
        allow_hyphen_values = true
    )]
    buffer_size: Option<String>,
    /// Offset increment between requests (default: the buffer size).
    #[arg(
        short = 'S',
        long = "step-size",
        value_name = "STEP_SIZE",
        allow_hyphen_values = true
    )]
    step_size: Option<String>,
    /// Cache mode: writeback (default), writethrough (flush after every
    /// write), none or off (O_DIRECT), directsync (O_DIRECT and
    /// writethrough), unsafe (skip flushes).
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    cache: Option<String>,
    /// Open the image in shared mode: let other processes write it during
    /// the run (read tests only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// Byte to write (default 0).
    #[arg(long = "pattern", value_name = "PATTERN", allow_hyphen_values = true)]
    pattern: Option<String>,
    /// Flush every N requests (write tests only; at least the depth).
    #[arg(
        long = "flush-interval",
        value_name = "FLUSH_INTERVAL",
        allow_hyphen_values = true
    )]
    flush_interval: Option<String>,
    /// Accepted; requests are sequential, so flushes never wait.
    #[arg(long = "no-drain")]
    no_drain: bool,
    /// The image file (exactly one).
    #[arg(value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// A cache mode, as `-t` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cache {
    /// Host page cache; flushes only when asked.
    Writeback,
    /// Host page cache; a flush after every write.
    Writethrough,
    /// `O_DIRECT`; flushes only when asked.
    None,
    /// `O_DIRECT` and a flush after every write.
    DirectSync,
    /// Host page cache; flushes skipped.
    Unsafe,
}

impl Cache {
    /// Parses a mode like QEMU's `bdrv_parse_cache_mode`.
    fn parse(text: &str) -> CliResult<Cache> {
        match text {
            "writeback" => Ok(Cache::Writeback),
            "writethrough" => Ok(Cache::Writethrough),
            "none" | "off" => Ok(Cache::None),
            "directsync" => Ok(Cache::DirectSync),
            "unsafe" => Ok(Cache::Unsafe),
            _ => Err("Invalid cache mode".into()),
        }
    }

    /// Whether the file is opened with `O_DIRECT`.
    fn direct(self) -> bool {
        matches!(self, Cache::None | Cache::DirectSync)
    }

    /// Whether every write is followed by a flush.
    fn write_through(self) -> bool {
        matches!(self, Cache::Writethrough | Cache::DirectSync)
    }
}

/// A checked benchmark description.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    count: u64,
    depth: u64,
    offset: u64,
    bufsize: usize,
    step: u64,
    write: bool,
    pattern: u8,
    flush_interval: u64,
    cache: Cache,
    force_share: bool,
}

/// The `Invalid NAME specified. Must be between MIN and MAX.` error.
fn range_error(name: &str, min: u64, max: u64) -> String {
    format!("Invalid {name} specified. Must be between {min} and {max}.")
}

/// Parses a plain number like QEMU's `qemu_strtou64` with base 0 (decimal,
/// `0x` hexadecimal or `0` octal, after optional blanks and sign) and
/// bounds it like `cvtnum_full`.
fn parse_number(name: &str, text: &str, min: u64, max: u64) -> CliResult<u64> {
    bounded(parse_c_unsigned(text), name, text, min, max)
}

/// Parses a byte count like `qemu_strtosz` and bounds it like
/// `cvtnum_full`.
fn parse_bytes(name: &str, text: &str, min: u64, max: u64) -> CliResult<u64> {
    bounded(parse_size(text), name, text, min, max)
}

/// `cvtnum_full`'s bounds and messages over `parsed`, what `text` parsed
/// to.
fn bounded(
    parsed: Result<u64, SizeError>,
    name: &str,
    text: &str,
    min: u64,
    max: u64,
) -> CliResult<u64> {
    match parsed {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Err(SizeError::Invalid) => Err(format!("Invalid {name} specified: '{text}'.").into()),
        // Negative, too large, or outside the bounds.
        _ => Err(range_error(name, min, max).into()),
    }
}

/// Parses an optional argument with `parse`, or returns `default`.
fn or_default(
    arg: Option<&String>,
    default: u64,
    parse: impl FnOnce(&str) -> CliResult<u64>,
) -> CliResult<u64> {
    arg.map_or(Ok(default), |text| parse(text))
}

impl Settings {
    /// Checks the arguments in qemu-img's order and with its messages;
    /// returns the settings and the image file.
    fn from_args(args: &BenchArgs) -> CliResult<(Settings, &Path)> {
        let count = or_default(args.count.as_ref(), 75000, |t| {
            parse_number("request count", t, 1, INT_MAX)
        })?;
        let depth = or_default(args.depth.as_ref(), 64, |t| {
            parse_number("queue depth", t, 1, INT_MAX)
        })?;
        let offset = or_default(args.offset.as_ref(), 0, |t| {
            parse_bytes("offset", t, 0, i64::MAX as u64)
        })?;
        let bufsize = or_default(args.buffer_size.as_ref(), 4096, |t| {
            parse_bytes("buffer size", t, 1, INT_MAX)
        })?;
        let step = or_default(args.step_size.as_ref(), 0, |t| {
            parse_bytes("step size", t, 0, INT_MAX)
        })?;
        let pattern = or_default(args.pattern.as_ref(), 0, |t| {
            parse_number("pattern byte", t, 0, 0xff)
        })?;
        let flush_interval = or_default(args.flush_interval.as_ref(), 0, |t| {
            parse_number("flush interval", t, 0, INT_MAX)
        })?;
        let cache = args
            .cache
            .as_deref()
            .map_or(Ok(Cache::Writeback), Cache::parse)?;
        if args.native || args.aio.is_some() {
            return Err(
                "-n and -i (AIO backends) are not supported: requests are synchronous".into(),
            );
        }
        if args.image_opts {
            return Err("--image-opts is not supported".into());
        }
        let [file] = args.files.as_slice() else {
            return Err("Expecting one image file name".into());
        };
        if !args.write && flush_interval != 0 {
            return Err("--flush-interval is only available in write tests".into());
        }
        if flush_interval != 0 && flush_interval < depth {
            return Err("Flush interval can't be smaller than depth".into());
        }
        if args.force_share && args.write {
            return Err(format!(
                "Could not open '{}': force-share=on can only be used with read-only images",
                file.display()
            )
            .into());
        }
        let settings = Settings {
            count,
            depth,
            offset,
            // At most INT_MAX.
            bufsize: usize::try_from(bufsize).unwrap_or(usize::MAX),
            step: if step == 0 { bufsize } else { step },
            write: args.write,
            pattern: u8::try_from(pattern).unwrap_or(u8::MAX),
            flush_interval,
            cache,
            force_share: args.force_share,
        };
        Ok((settings, file))
    }

    /// The lines printed before the run.
    fn header(&self) -> String {
        let mut text = format!(
            "Sending {} {} requests, {} bytes each, {} in parallel \
             (starting at offset {}, step size {})",
            self.count,
            if self.write { "write" } else { "read" },
            self.bufsize,
            self.depth,
            self.offset,
            self.step
        );
        if self.flush_interval != 0 {
            text += &format!("\nSending flush every {} requests", self.flush_interval);
        }
        text
    }

    /// Whether a flush follows the `done`-th request (1-based): when the
    /// number of requests still to send is a multiple of the interval.
    fn flush_after(&self, done: u64) -> bool {
        self.flush_interval != 0 && (self.count - done).is_multiple_of(self.flush_interval)
    }
}

/// The offset of the request after one at `offset`, as qemu-img 10.0
/// computes it: `step` further, modulo the image size (0 for an empty
/// image). The first request uses OFFSET unwrapped.
fn next_offset(offset: u64, step: u64, size: u64) -> u64 {
    // offset <= i64::MAX and step <= i32::MAX: no overflow.
    (offset + step).checked_rem(size).unwrap_or(0)
}

/// A raw image read and written with `O_DIRECT`, in whole sectors.
struct DirectRaw {
    dev: FileDevice,
    size: u64,
}

impl DirectRaw {
    /// The sectors `buf` covers at `offset`, after a range check; offsets
    /// and lengths were checked to be whole sectors before the run.
    fn check(&self, offset: u64, len: usize) -> Result<u64, CoreError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(offset / SECTOR as u64),
            _ => Err(Error::OutOfRange),
        }
    }
}

/// What the benchmark runs requests on.
trait Target {
    /// The image size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CoreError>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), CoreError>;
    /// Makes earlier writes durable.
    fn flush(&mut self) -> Result<(), CoreError>;
    /// Flushes and closes.
    fn close(self: Box<Self>) -> Result<(), CoreError>;
}

impl Target for Disk {
    fn size(&self) -> u64 {
        Disk::size(self)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CoreError> {
        Disk::read_at(self, offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), CoreError> {
        Disk::write_at(self, offset, buf)
    }
    fn flush(&mut self) -> Result<(), CoreError> {
        Disk::flush(self)
    }
    fn close(self: Box<Self>) -> Result<(), CoreError> {
        Disk::close(*self)
    }
}

impl Target for Image<FileDevice> {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CoreError> {
        Image::read_at(self, offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), CoreError> {
        Image::write_at(self, offset, buf)
    }
    fn flush(&mut self) -> Result<(), CoreError> {
        Image::flush(self)
    }
    fn close(self: Box<Self>) -> Result<(), CoreError> {
        Image::close(*self).map(drop)
    }
}

impl Target for DirectRaw {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CoreError> {
        let first = self.check(offset, buf.len())?;
        let (sectors, _) = buf.as_chunks_mut::<SECTOR>();
        block_on(self.dev.read(first, sectors)).map_err(Error::Io)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), CoreError> {
        let first = self.check(offset, buf.len())?;
        let (sectors, _) = buf.as_chunks::<SECTOR>();
        block_on(self.dev.write(first, sectors)).map_err(Error::Io)
    }
    fn flush(&mut self) -> Result<(), CoreError> {
        block_on(self.dev.flush()).map_err(Error::Io)
    }
    fn close(mut self: Box<Self>) -> Result<(), CoreError> {
        self.flush()
    }
}

/// Opens `path` as `format` for the cache mode, with the locks `qemu-img
/// bench` takes (shared with `force_share`).
fn open(
    path: &Path,
    format: Format,
    cache: Cache,
    writable: bool,
    force_share: bool,
) -> CliResult<Box<dyn Target>> {
    let shown = path.display().to_string();
    let access = if writable {
        Access::Write
    } else {
        Access::Read
    };
    if !cache.direct() {
        let disk =
            Disk::open(path, Some(format), access, force_share).map_err(|e| e.img(&shown))?;
        return Ok(Box::new(disk));
    }
    let options = FileOptions {
        writable,
        lock: access.lock_mode(format, force_share),
        direct: true,
    };
    let dev = FileDevice::open_with(path, &options)
        .map_err(|e| OpenError::from_io(&shown, &e).img(&shown))?;
    match format {
        Format::Raw => {
            let size = round_to_sector(dev.len());
            Ok(Box::new(DirectRaw { dev, size }))
        }
        Format::Qcow2 => {
            let options = if writable {
                OpenOptions::read_write()
            } else {
                OpenOptions::read_only()
            };
            let image = Image::open(dev, &options).map_err(|e| match e {
                Error::NotQcow2 => {
                    format!("Could not open '{shown}': Image is not in qcow2 format").into()
                }
                e => core_error(&format!("Could not open '{shown}'"), &e),
            })?;
            Ok(Box::new(image))
        }
    }
}

/// Fails unless every request of a direct raw run is whole sectors.
fn check_direct_raw(settings: &Settings) -> CliResult<()> {
    let sector = SECTOR as u64;
    let aligned = [settings.offset, settings.bufsize as u64, settings.step]
        .iter()
        .all(|n| n.is_multiple_of(sector));
    if aligned {
        Ok(())
    } else {
        Err(format!(
            "cache mode none on a raw image needs the offset, buffer size and step size \
             in whole {SECTOR}-byte sectors"
        )
        .into())
    }
}

/// The `Failed request` message for `e`.
fn failed_request(e: &CoreError) -> String {
    let text = match e {
        Error::Corrupt { .. } | Error::Unsupported(_) | Error::InvalidArgument(_) => {
            core_message(e)
        }
        _ => errno_text(e),
    };
    format!("Failed request: {text}")
}

/// Sends the requests; returns the time the loop took. The flush after the
/// last request, when one is due, is left to the caller (untimed).
fn send_requests(
    target: &mut dyn Target,
    settings: &Settings,
    buf: &mut [u8],
) -> Result<Duration, CoreError> {
    let size = target.size();
    let flushes = settings.cache != Cache::Unsafe;
    let write_through = settings.cache.write_through() && flushes;
    let mut offset = settings.offset;
    let start = Instant::now();
    for done in 1..=settings.count {
        let at = offset;
        offset = next_offset(offset, settings.step, size);
        if settings.write {
            target.write_at(at, buf)?;
            if write_through {
                target.flush()?;
            }
        } else {
            target.read_at(at, buf)?;
        }
        if flushes && done < settings.count && settings.flush_after(done) {
            target.flush()?;
        }
    }
    Ok(start.elapsed())
}

/// Runs the benchmark on an open target, then closes it.
fn bench(mut target: Box<dyn Target>, settings: &Settings) -> CliResult<()> {
    outln!("{}", settings.header());
    let result = AlignedBuf::new(settings.bufsize, settings.pattern)
        .map_err(Error::Io)
        .and_then(|mut buf| send_requests(&mut *target, settings, &mut buf));
    let result = result.and_then(|elapsed| {
        outln!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
        if settings.cache != Cache::Unsafe && settings.flush_after(settings.count) {
            target.flush()?;
        }
        Ok(())
    });
    match result {
        Ok(()) => target
            .close()
            .map_err(|e| core_error("Could not close the image", &e)),
        Err(e) => {
            // The run failed: close what was written, report the failure.
            let _ = target.close();
            Err(failed_request(&e).into())
        }
    }
}

/// Runs `bench`.
pub fn run(args: &BenchArgs) -> CliResult<()> {
    let (settings, path) = Settings::from_args(args)?;
    let format = match args.format {
        Some(format) => format,
        None => probe(path)?,
    };
    if settings.cache.direct() && format == Format::Raw {
        check_direct_raw(&settings)?;
    }
    let target = open(
        path,
        format,
        settings.cache,
        settings.write,
        settings.force_share,
    )?;
    bench(target, &settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_like_qemu_strtou64() {
        assert_eq!(parse_number("n", "0x10", 0, 100), Ok(16));
        assert_eq!(parse_number("n", "010", 0, 100), Ok(8));
        assert_eq!(parse_number("n", " 7", 0, 100), Ok(7));
        assert_eq!(parse_number("n", "+7", 0, 100), Ok(7));
        assert_eq!(parse_number("n", "-0", 0, 100), Ok(0));
        for bad in ["", "1k", "0x", "08", "7 ", "x"] {
            assert_eq!(
                parse_number("n", bad, 0, 100),
                Err(format!("Invalid n specified: '{bad}'.").into()),
                "{bad:?}"
            );
        }
        for big in ["-1", "101", "99999999999999999999"] {
            assert_eq!(
                parse_number("n", big, 0, 100),
                Err("Invalid n specified. Must be between 0 and 100.".into()),
                "{big:?}"
            );
        }
    }

    #[test]
    fn sizes_like_cvtnum() {
        assert_eq!(parse_bytes("s", "4k", 1, INT_MAX), Ok(4096));
        assert_eq!(parse_bytes("s", "1.5k", 1, INT_MAX), Ok(1536));
        assert_eq!(
            parse_bytes("s", "1x", 1, INT_MAX),
            Err("Invalid s specified: '1x'.".into())
        );
        assert_eq!(
            parse_bytes("s", "3G", 1, INT_MAX),
            Err("Invalid s specified. Must be between 1 and 2147483647.".into())
        );
        assert_eq!(
            parse_bytes("s", "0", 1, INT_MAX),
            Err("Invalid s specified. Must be between 1 and 2147483647.".into())
        );
    }

    #[test]
    fn offsets_wrap_modulo_the_image_size() {
        assert_eq!(next_offset(0, 4096, 1 << 20), 4096);
        assert_eq!(next_offset(1040384, 4096, 1 << 20), 1044480);
        assert_eq!(next_offset(1044480, 4096, 1 << 20), 0);
        assert_eq!(next_offset(0, 1040, 1024), 16);
        assert_eq!(next_offset(0, 1016, 1024), 1016);
        assert_eq!(next_offset(5, 7, 0), 0);
    }

    #[test]
    fn flush_cadence_like_qemu() {
        let settings = Settings {
            count: 10,
            depth: 1,
            offset: 0,
            bufsize: 512,
            step: 512,
            write: true,
            pattern: 0,
            flush_interval: 4,
            cache: Cache::Writeback,
            force_share: false,
        };
        let after: Vec<u64> = (1..=10).filter(|&d| settings.flush_after(d)).collect();
        assert_eq!(after, [2, 6, 10]);
    }
}
