//! `convert`: copy the guest contents of an image into a new image,
//! leaving zero regions unallocated (sparse).

use crate::disk::{round_to_sector, Access, Disk, Extent, Format};
use crate::error::{core_error, CliError, CliResult, CoreError};
use crate::options::{self, QCOW2_KEYS};
use qcow2_std_shim::codec::HostCompressor;
use qcow2_std_shim::qcow2_core::Compression;
use qcow2_std_shim::{FileDevice, Image};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bytes moved per read: large enough for throughput, small enough to keep
/// memory use modest.
const BUFFER_BYTES: usize = 4 << 20;
/// Zero-detection granularity for raw targets (a typical file-system block).
const RAW_GRANULE: usize = 4096;

/// Arguments of `convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source format (probed from the magic bytes when not given).
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Target format.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    output_format: Format,
    /// Target creation options (qcow2 only): cluster_size, refcount_bits,
    /// lazy_refcounts, compat.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Open the source in shared mode: let other processes write it during
    /// the copy (like `qemu-img convert -U`).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Compress the target's clusters (qcow2 only), in the target's
    /// `compression_type`, on several threads.
    #[arg(short = 'c')]
    compress: bool,
    /// Parallel requests, 1 to 16 (qemu-img's coroutines): here the
    /// number of threads compressing with `-c`; one per core by default.
    #[arg(short = 'm', value_name = "NUM", allow_hyphen_values = true)]
    parallel: Option<String>,
    /// The source image.
    source: PathBuf,
    /// The target image (created or overwritten).
    target: PathBuf,
}

/// Whether `a` and `b` name the same existing file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The most parallel requests qemu-img's `-m` accepts.
const MAX_PARALLEL: usize = 16;

/// A whole number as C's `strtol` with base 0 reads all of `text`
/// (leading blanks, a sign, `0x` for hex, `0` for octal), saturated far
/// outside any count; `None` when `text` is not one.
fn parse_c_integer(text: &str) -> Option<i64> {
    let t = text.trim_start();
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if let Some(hex) = t.strip_prefix("0x").or(t.strip_prefix("0X")) {
        (16, hex)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() {
        return None;
    }
    let mut value: i64 = 0;
    for c in digits.chars() {
        let d = c.to_digit(radix)?;
        value = value.saturating_mul(radix.into()).saturating_add(d.into());
    }
    Some(if negative { -value } else { value })
}

/// Parses `-m` as qemu-img does (a whole number from 1 to 16), with its
/// messages.
fn parse_parallel(text: &str) -> CliResult<usize> {
    let n = parse_c_integer(text)
        .ok_or_else(|| format!("Invalid number of coroutines specified: '{text}'."))?;
    match usize::try_from(n) {
        Ok(n) if (1..=MAX_PARALLEL).contains(&n) => Ok(n),
        _ => Err(format!(
            "Invalid number of coroutines specified. Must be between 1 and {MAX_PARALLEL}."
        )
        .into()),
    }
}

/// Runs `convert`.
pub fn run(args: &ConvertArgs) -> CliResult<()> {
    let parallel = args.parallel.as_deref().map(parse_parallel).transpose()?;
    let allowed: &[&str] = match args.output_format {
        Format::Qcow2 => QCOW2_KEYS,
        Format::Raw => &[],
    };
    let opts = options::parse(&args.options, allowed)?;
    if opts.help {
        outln!("{}", options::HELP);
        return Ok(());
    }
    let src_name = args.source.display().to_string();
    let dst_name = args.target.display().to_string();
    if args.compress && args.output_format != Format::Qcow2 {
        return Err("Compression not supported for this file format".into());
    }
    if same_file(&args.source, &args.target) {
        return Err(format!("'{src_name}' and '{dst_name}' are the same file").into());
    }
    let mut src = Disk::open(
        &args.source,
        args.format,
        Access::CopySource,
        args.force_share,
    )
    .map_err(|e| e.img(&src_name))?;
    let size = round_to_sector(src.size());
    let create = opts.to_create(size)?;
    let granule = match args.output_format {
        Format::Qcow2 => 1usize << create.cluster_bits,
        Format::Raw => RAW_GRANULE,
    };
    let mut dst = Disk::create(&args.target, args.output_format, size, &create)
        .map_err(|e| e.convert_target(&dst_name, args.output_format))?;
    let copied = match &mut dst {
        Disk::Qcow2(image) if args.compress => {
            let workers = parallel
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            copy_compressed(&mut src, image, workers, &src_name, &dst_name)
        }
        _ => copy(&mut src, &mut dst, granule, &src_name, &dst_name),
    };
    copied
        .and_then(|()| dst.close().map_err(|e| core_error(&dst_name, &e)))
        .inspect_err(|_| {
            // A partial copy is of no use: do not leave it behind.
            crate::disk::remove_unfinished(&args.target);
        })
}

/// Copies every possibly non-zero byte of `src` into `dst`, which must read
/// as zeros everywhere. Zero runs of the source are skipped through its
/// mapping; data is written only in `granule`-sized pieces that are not all
/// zeros.
fn copy(
    src: &mut Disk,
    dst: &mut Disk,
    granule: usize,
    src_name: &str,
    dst_name: &str,
) -> CliResult<()> {
    let read_err = |e| core_error(&format!("error while reading {src_name}"), &e);
    let size = src.size();
    let buf_len = (BUFFER_BYTES / granule).max(1) * granule;
    let mut buf = vec![0u8; buf_len];
    let zero_init = dst.has_zero_init();
    let mut offset = 0u64;
    while offset < size {
        let (extent, len) = src.extent(offset).map_err(read_err)?;
        let end = offset.saturating_add(len).min(size);
        // A target that does not start out as zeros gets the zeros too.
        if extent == Extent::Zero && zero_init {
            offset = end;
            continue;
        }
        while offset < end {
            // Stop at a granule boundary so zero detection stays aligned.
            let room = buf_len - (offset % granule as u64) as usize;
            let n = usize::try_from(end - offset).map_or(room, |rest| rest.min(room));
            let chunk = &mut buf[..n];
            src.read_at(offset, chunk).map_err(read_err)?;
            let written = if zero_init {
                write_nonzero(dst, offset, chunk, granule)
            } else {
                dst.write_at(offset, chunk)
            };
            written.map_err(|e| core_error(&format!("error while writing {dst_name}"), &e))?;
            offset += n as u64;
        }
    }
    Ok(())
}

/// Copies `src` into the empty qcow2 image `dst` with every cluster that
/// holds data compressed (or stored plainly when it does not shrink):
/// batches of clusters are read, compressed on `workers` threads, then
/// written in order. All-zero clusters stay unallocated.
fn copy_compressed(
    src: &mut Disk,
    dst: &mut Image<FileDevice>,
    workers: usize,
    src_name: &str,
    dst_name: &str,
) -> CliResult<()> {
    let read_err = |e| core_error(&format!("error while reading {src_name}"), &e);
    let write_err = |e| core_error(&format!("error while writing {dst_name}"), &e);
    let format = Compression::from_type(dst.info().compression_type)
        .ok_or_else(|| CliError::from("unknown compression type"))?;
    let cluster = dst.info().cluster_size as usize;
    let size = src.size();
    let clusters = size.div_ceil(cluster as u64);
    let workers = workers.max(1);
    // A few clusters per worker and batch: enough to keep every core busy.
    let batch = (BUFFER_BYTES / cluster).max(workers);
    let mut buf = vec![0u8; batch * cluster];
    let mut results: Vec<Option<Vec<u8>>> = vec![None; batch];
    let mut compressors: Vec<HostCompressor> =
        (0..workers).map(|_| HostCompressor::new()).collect();
    let mut first = 0u64;
    while first < clusters {
        let n = (batch as u64).min(clusters - first) as usize;
        let offset = first * cluster as u64;
        let len = (size - offset).min((n * cluster) as u64) as usize;
        // Reads: skip the source's zero extents, zero-fill the tail.
        let chunk = &mut buf[..n * cluster];
        chunk.fill(0);
        let mut pos = 0usize;
        while pos < len {
            let (extent, run) = src.extent(offset + pos as u64).map_err(read_err)?;
            let take = (run.min((len - pos) as u64)) as usize;
            if extent == Extent::Data {
                src.read_at(offset + pos as u64, &mut chunk[pos..pos + take])
                    .map_err(read_err)?;
            }
            pos += take;
        }
        // Compression on every core; `None` for all-zero clusters (left
        // unallocated), an empty vector for clusters stored plainly.
        let per_worker = n.div_ceil(workers);
        std::thread::scope(|scope| {
            let jobs = chunk
                .chunks(per_worker * cluster)
                .zip(results[..n].chunks_mut(per_worker))
                .zip(compressors.iter_mut());
            for ((data, out), compressor) in jobs {
                scope.spawn(move || {
                    for (cluster_data, slot) in data.chunks(cluster).zip(out.iter_mut()) {
                        *slot = if is_zero(cluster_data) {
                            None
                        } else {
                            let mut bytes = slot.take().unwrap_or_default();
                            if !compressor.compress(format, cluster_data, &mut bytes) {
                                bytes.clear();
                            }
                            Some(bytes)
                        };
                    }
                });
            }
        });
        for (i, result) in results[..n].iter().enumerate() {
            let guest = first + i as u64;
            let at = guest * cluster as u64;
            match result {
                None => {}
                Some(bytes) if !bytes.is_empty() => dst
                    .write_compressed_cluster(guest, bytes)
                    .map_err(write_err)?,
                Some(_) => {
                    // Does not shrink: stored plainly (the disk's part).
                    let end = ((i + 1) * cluster).min(len);
                    dst.write_at(at, &chunk[i * cluster..end])
                        .map_err(write_err)?
                }
            }
        }
        first += n as u64;
    }
    Ok(())
}

/// Writes the parts of `data` (which lands at guest `offset`) that are not
/// all zeros, judged per `granule` of the guest address space; runs of
/// non-zero granules go out as single writes.
fn write_nonzero(
    dst: &mut Disk,
    offset: u64,
    data: &[u8],
    granule: usize,
) -> Result<(), CoreError> {
    let mut pos = 0usize;
    let mut run_start: Option<usize> = None;
    while pos < data.len() {
        let to_boundary = granule - ((offset + pos as u64) % granule as u64) as usize;
        let next = (pos + to_boundary).min(data.len());
        let zero = is_zero(&data[pos..next]);
        match (zero, run_start) {
            (false, None) => run_start = Some(pos),
            (true, Some(start)) => {
                dst.write_at(offset + start as u64, &data[start..pos])?;
                run_start = None;
            }
            _ => {}
        }
        pos = next;
    }
    if let Some(start) = run_start {
        dst.write_at(offset + start as u64, &data[start..])?;
    }
    Ok(())
}

/// Whether every byte of `data` is zero.
fn is_zero(data: &[u8]) -> bool {
    let (words, tail) = data.as_chunks::<16>();
    words.iter().all(|w| u128::from_ne_bytes(*w) == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::{is_zero, parse_parallel};

    #[test]
    fn parallel_requests_as_qemu_img() {
        // Each as qemu-img 10 reads it.
        for (text, n) in [
            ("1", 1),
            ("16", 16),
            (" 3", 3),
            ("+3", 3),
            ("0x3", 3),
            ("010", 8),
        ] {
            assert_eq!(parse_parallel(text), Ok(n), "{text}");
        }
        let range = "Invalid number of coroutines specified. Must be between 1 and 16.";
        for bad in ["0", "17", "-1", "0x11", "-0x10", "99999999999999999999"] {
            assert_eq!(parse_parallel(bad).unwrap_err().0, range, "{bad}");
        }
        for bad in ["x", "", "3 ", "08", "-", "0x", "2.5"] {
            assert_eq!(
                parse_parallel(bad).unwrap_err().0,
                format!("Invalid number of coroutines specified: '{bad}'."),
                "{bad}"
            );
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 100]));
        let mut v = vec![0u8; 100];
        v[99] = 1;
        assert!(!is_zero(&v));
        v[99] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
