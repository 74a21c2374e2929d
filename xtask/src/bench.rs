//! `cargo xtask bench [--runs N] [--quick]`: qcow2-tool against qemu-img /
//! qemu-io, and against plain `pread`/`pwrite` of a raw file.
//!
//! Builds qcow2-tool in release mode, prepares images in a scratch
//! directory under `/var/tmp`, then runs every workload N times per tool
//! (default 7; 2 with `--quick`, which also shrinks images and counts),
//! alternating the tools (and rotating which goes first). `bench` workloads
//! are timed by the tools' own `Run completed in` line (the request loop
//! only); `convert` and `open` workloads by the wall time of the process.
//! Peak RSS comes from `wait4`'s `ru_maxrss`. Prints a table and, unless
//! `--quick`, writes `BENCHMARKS.md`.

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::output_of;

/// Free space needed before the 8 GiB image is written.
const BIG_IMAGE_MIN_FREE: u64 = 20 << 30;
/// I/O chunk for preparing and warming files; small, because this
/// process's resident size at spawn time is a floor of the children's
/// measured peak RSS.
const CHUNK: usize = 256 << 10;
/// `-S` for random workloads: an odd number of 4 KiB pages, so the offsets
/// visit every page of the image in a scattered order.
const SCATTER_STEP: u64 = 4096 * 4099;

/// Command-line options.
struct Options {
    runs: usize,
    quick: bool,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut options = Options {
            runs: 0,
            quick: false,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--runs" => {
                    options.runs = it
                        .next()
                        .and_then(|s| s.parse().ok())
                        .filter(|&n| n > 0)
                        .ok_or("--runs needs a positive number")?;
                }
                other => return Err(format!("unknown bench option `{other}`")),
            }
        }
        if options.runs == 0 {
            options.runs = if options.quick { 2 } else { 7 };
        }
        Ok(options)
    }
}

/// Sizes and request counts.
struct Scale {
    /// Size of the images the `bench` and `convert` workloads use.
    image: u64,
    /// Requests of the 4 KiB random workloads.
    random_count: u64,
    /// Requests of the 64 KiB sequential read workload.
    seq_count: u64,
    /// Size of the "fully written" image of the open workload.
    big_image: u64,
}

impl Scale {
    fn new(quick: bool) -> Scale {
        if quick {
            Scale {
                image: 64 << 20,
                random_count: 5000,
                seq_count: 2048,
                big_image: 256 << 20,
            }
        } else {
            Scale {
                image: 1 << 30,
                random_count: 300_000,
                seq_count: 4 * (1 << 14),
                big_image: 8 << 30,
            }
        }
    }

    /// 64 KiB requests that cover the image once.
    fn fill_count(&self) -> u64 {
        self.image >> 16
    }
}

/// Who serves the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    /// qcow2-tool on a qcow2 image.
    Ours,
    /// qemu-img / qemu-io on a qcow2 image.
    Qemu,
    /// qcow2-tool `-f raw` on a raw file: plain pread/pwrite.
    Raw,
}

/// What a row reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metric {
    /// The `Run completed in X seconds.` line.
    Reported,
    /// Wall time of the whole process.
    Wall,
}

/// A command one tool runs, with what to do before each run.
struct Variant {
    tool: Tool,
    program: String,
    args: Vec<String>,
    /// Files removed before each run (fresh targets).
    remove: Vec<String>,
    /// A command run before each run (untimed), e.g. creating an image.
    setup: Option<Vec<String>>,
}

/// One workload: a row (or two) of the table.
struct Workload {
    name: String,
    metrics: Vec<Metric>,
    variants: Vec<Variant>,
    /// Files read once before the runs so that every tool finds them in the
    /// page cache.
    warm: Vec<String>,
}

/// One measured run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    reported: f64,
    wall: f64,
    rss_kib: u64,
}

impl Sample {
    fn get(&self, metric: Metric) -> f64 {
        match metric {
            Metric::Reported => self.reported,
            Metric::Wall => self.wall,
        }
    }
}

/// Every sample of one workload, per tool.
struct Measured {
    workload: Workload,
    samples: Vec<(Tool, Vec<Sample>)>,
}

/// Everything a bench run found, for the report.
struct Outcome {
    measured: Vec<Measured>,
    /// Whether the fully written big image was made.
    big: bool,
    /// Peak RSS of `true` in KiB: the floor of the RSS method.
    floor: u64,
    /// The preparation steps.
    prepared: Vec<String>,
}

/// A table row.
struct Row {
    name: String,
    ours: f64,
    qemu: f64,
    raw: Option<f64>,
    rss_ours: u64,
    rss_qemu: u64,
}

/// Runs `cargo xtask bench`.
pub fn run(args: &[String]) -> Result<(), String> {
    let options = Options::parse(args)?;
    let scale = Scale::new(options.quick);
    for program in ["qemu-img", "qemu-io"] {
        capture(program, &["--version"])
            .map_err(|e| format!("{program} is needed as the reference: {e}"))?;
    }
    crate::run(
        &crate::cargo(),
        &["build", "--release", "-p", "qcow2-tool", "--quiet"],
    )?;
    let ours = target_dir().join("release/qcow2-tool");
    let ours = ours
        .to_str()
        .ok_or("non-UTF-8 target directory")?
        .to_string();
    let work = Scratch::new()?;
    eprintln!("xtask: preparing images in {}", work.0.display());
    let started = Instant::now();
    let (big, prepared) = prepare(&work.0, &scale, &ours)?;
    let floor = rss_floor(&work.0)?;
    let mut measured = Vec::new();
    for workload in workloads(&scale, &ours, big) {
        eprintln!("xtask: {}", workload.name);
        let m = measure_workload(&work.0, workload, options.runs)?;
        eprint!("{}", samples(std::slice::from_ref(&m)));
        measured.push(m);
    }
    verify_converts(&work.0)?;
    let outcome = Outcome {
        measured,
        big,
        floor,
        prepared,
    };
    let table = table(&outcome.measured.iter().flat_map(rows).collect::<Vec<_>>());
    println!("\n{table}\n{}", floor_note(floor));
    eprintln!("xtask: bench took {:.0} s", started.elapsed().as_secs_f64());
    if options.quick {
        eprintln!("xtask: --quick: BENCHMARKS.md left alone");
        return Ok(());
    }
    let report = report(&options, &scale, &outcome, &table);
    std::fs::write(workspace_root().join("BENCHMARKS.md"), report)
        .map_err(|e| format!("cannot write BENCHMARKS.md: {e}"))?;
    eprintln!("xtask: wrote BENCHMARKS.md");
    Ok(())
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Cargo's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The scratch directory under `/var/tmp` (a disk, where `/tmp` may be
/// tmpfs), removed with its contents when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, String> {
        let dir = PathBuf::from(format!("/var/tmp/qcow2-xtask-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Output of a command that must succeed.
fn capture(program: &str, args: &[&str]) -> Result<String, String> {
    output_of(program, args, None)
}

/// Runs a preparation command in `dir`.
fn prep(dir: &Path, program: &str, args: &[&str]) -> Result<(), String> {
    output_of(program, args, Some(dir)).map(drop)
}

/// splitmix64: fast, deterministic filler data.
fn fill_random(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// Writes a raw file of `size` bytes. `data(at, buf)` fills the [`CHUNK`]
/// at byte `at` and says whether to write it; chunks not written stay
/// holes.
fn write_raw(
    path: &Path,
    size: u64,
    mut data: impl FnMut(u64, &mut [u8]) -> bool,
) -> Result<(), String> {
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let file = File::create(path).map_err(err)?;
    file.set_len(size).map_err(err)?;
    let mut buf = vec![0u8; CHUNK];
    for at in (0..size).step_by(CHUNK) {
        if data(at, &mut buf) {
            file.write_all_at(&buf, at).map_err(err)?;
        }
    }
    Ok(())
}

/// Random data everywhere.
fn random_raw(path: &Path, size: u64) -> Result<(), String> {
    let mut state = 1;
    write_raw(path, size, |_, buf| {
        fill_random(buf, &mut state);
        true
    })
}

/// A third of the 1 MiB blocks are holes; the others are random data with
/// every fourth 64 KiB cluster written as zeros.
fn mixed_raw(path: &Path, size: u64) -> Result<(), String> {
    let mut state = 2;
    write_raw(path, size, |at, buf| {
        if (at >> 20) % 3 == 0 {
            return false;
        }
        fill_random(buf, &mut state);
        for cluster in buf.chunks_mut(64 << 10).step_by(4) {
            cluster.fill(0);
        }
        true
    })
}

/// Compressible data, as an OS image holds: every byte one of 16 values
/// (about 2:1 for deflate), in runs that repeat every 4 KiB with a few
/// changes, and a quarter of the 64 KiB clusters zero.
fn compressible_raw(path: &Path, size: u64) -> Result<(), String> {
    let mut state = 3;
    write_raw(path, size, |_, buf| {
        fill_random(buf, &mut state);
        for (i, cluster) in buf.chunks_mut(64 << 10).enumerate() {
            if i % 4 == 3 {
                cluster.fill(0);
                continue;
            }
            for b in cluster.iter_mut() {
                *b = b'a' + (*b & 15);
            }
            // Half of each cluster repeats its first 4 KiB.
            let (head, rest) = cluster.split_at_mut(4096);
            for block in rest.chunks_mut(4096).step_by(2) {
                block.copy_from_slice(&head[..block.len()]);
            }
        }
        true
    })
}

/// Bytes available to unprivileged users on the file system of `dir`.
fn free_bytes(dir: &Path) -> Result<u64, String> {
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a valid out pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(format!(
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    // The field types vary between targets.
    #[allow(clippy::useless_conversion)]
    Ok(u64::from(stat.f_bavail) * u64::from(stat.f_frsize))
}

/// Resets this process's peak RSS to its current RSS. A child inherits the
/// parent's peak as the floor of its own `ru_maxrss` (Linux keeps the old
/// memory map's high-water mark across `exec`), so the floor is kept low.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's current resident size in KiB.
fn own_rss_kib() -> u64 {
    proc_field("/proc/self/status", "VmRSS")
        .trim_end_matches(" kB")
        .parse()
        .unwrap_or(0)
}

/// The peak RSS `wait4` reports for `true`: the floor under every
/// measured value (see [`reset_peak_rss`]).
fn rss_floor(dir: &Path) -> Result<u64, String> {
    Ok(spawn_measured(dir, "true", &[])?.1.rss_kib)
}

/// The sentence about the RSS floor.
fn floor_note(floor: u64) -> String {
    format!(
        "Peak RSS of `true` measured the same way: {} MiB (the floor of the \
         method; this process's RSS is {} MiB).",
        mib(floor),
        mib(own_rss_kib())
    )
}

/// Writes dirty pages back, so one run's writes do not slow the next.
fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Runs and records the preparation commands.
struct Preparer<'a> {
    dir: &'a Path,
    ours: &'a str,
    /// The steps, for the report.
    log: Vec<String>,
}

impl Preparer<'_> {
    /// Runs `line` (words separated by blanks; `qcow2-tool` stands for the
    /// release build) in the scratch directory.
    fn run(&mut self, line: &str) -> Result<(), String> {
        let mut words = line.split_whitespace();
        let program = match words.next() {
            Some("qcow2-tool") => self.ours,
            Some(program) => program,
            None => return Ok(()),
        };
        let args: Vec<&str> = words.collect();
        prep(self.dir, program, &args)?;
        self.log.push(line.to_string());
        Ok(())
    }

    /// Runs a step done inside this process, recording `what`.
    fn step(&mut self, what: &str, result: Result<(), String>) -> Result<(), String> {
        result?;
        self.log.push(what.to_string());
        Ok(())
    }
}

/// Creates the images; returns whether the big fully written image exists
/// and the steps taken.
fn prepare(dir: &Path, scale: &Scale, ours: &str) -> Result<(bool, Vec<String>), String> {
    let mut p = Preparer {
        dir,
        ours,
        log: Vec::new(),
    };
    let size = scale.image;
    p.step(
        &format!("(xtask) random.raw: {size} bytes of splitmix64 data"),
        random_raw(&dir.join("random.raw"), size),
    )?;
    p.run("qemu-img convert -f raw -O qcow2 random.raw full.qcow2")?;
    for (from, to) in [("random.raw", "write.raw"), ("full.qcow2", "write.qcow2")] {
        let copied = std::fs::copy(dir.join(from), dir.join(to))
            .map(drop)
            .map_err(|e| format!("cannot copy {from}: {e}"));
        p.step(&format!("cp {from} {to}"), copied)?;
    }
    p.step(
        &format!(
            "(xtask) mixed.raw: {size} bytes; 1 MiB holes every 3 MiB, elsewhere \
             splitmix64 data with every fourth 64 KiB cluster zero"
        ),
        mixed_raw(&dir.join("mixed.raw"), size),
    )?;
    p.run("qemu-img convert -f raw -O qcow2 mixed.raw mixed.qcow2")?;
    p.step(
        &format!(
            "(xtask) text.raw: {size} bytes of 16-symbol data, half of each \
             64 KiB cluster repeating its first 4 KiB, every fourth cluster zero"
        ),
        compressible_raw(&dir.join("text.raw"), size),
    )?;
    p.run("qemu-img convert -c -f raw -O qcow2 text.raw text-c.qcow2")?;
    p.run("qemu-img convert -c -o compression_type=zstd -f raw -O qcow2 text.raw text-zstd.qcow2")?;
    p.run("qemu-img create -q -f qcow2 huge.qcow2 2P")?;
    let free = free_bytes(dir)?;
    let big = free >= BIG_IMAGE_MIN_FREE || scale.big_image < (1 << 30);
    if big {
        let (big_size, count) = (scale.big_image, scale.big_image >> 20);
        p.run(&format!(
            "qcow2-tool create -q -f qcow2 big.qcow2 {big_size}"
        ))?;
        p.run(&format!(
            "qcow2-tool bench -w -d 1 -s 1M -c {count} --pattern=165 big.qcow2"
        ))?;
    } else {
        eprintln!(
            "xtask: only {} GiB free in {}: skipping the fully written {} GiB image",
            free >> 30,
            dir.display(),
            scale.big_image >> 30
        );
    }
    sync();
    Ok((big, p.log))
}

/// Strings from string slices.
fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The three variants of a `bench` workload: `args` on `qcow2` for ours
/// and qemu-img, on `raw` for the raw baseline.
fn bench_variants(ours: &str, args: &[&str], qcow2: &str, raw: &str) -> Vec<Variant> {
    let with = |program: &str, format: &str, file: &str, tool| {
        let mut full = strings(&["bench", "-f", format]);
        full.extend(strings(args));
        full.push(file.to_string());
        Variant {
            tool,
            program: program.to_string(),
            args: full,
            remove: Vec::new(),
            setup: None,
        }
    };
    vec![
        with(ours, "qcow2", qcow2, Tool::Ours),
        with("qemu-img", "qcow2", qcow2, Tool::Qemu),
        with(ours, "raw", raw, Tool::Raw),
    ]
}

/// A `bench` workload ([`bench_variants`] with `args`) on existing files,
/// `qcow2` and `raw`, read once before the runs so that they are in the
/// page cache; measured by the time each tool reports.
fn warm_bench_workload(
    name: String,
    ours: &str,
    args: &[&str],
    qcow2: &str,
    raw: &str,
) -> Workload {
    Workload {
        name,
        metrics: vec![Metric::Reported],
        variants: bench_variants(ours, args, qcow2, raw),
        warm: strings(&[qcow2, raw]),
    }
}

/// Every workload, in order.
fn workloads(scale: &Scale, ours: &str, big: bool) -> Vec<Workload> {
    let step = SCATTER_STEP.to_string();
    let random = scale.random_count.to_string();
    let seq = scale.seq_count.to_string();
    let fill = scale.fill_count().to_string();
    let size = scale.image.to_string();
    let gib = |n: u64| format!("{} GiB", n as f64 / f64::from(1u32 << 30));
    let mut list = vec![
        warm_bench_workload(
            format!("4 KiB random reads, {} image", gib(scale.image)),
            ours,
            &["-d", "1", "-c", &random, "-s", "4k", "-S", &step],
            "full.qcow2",
            "random.raw",
        ),
        warm_bench_workload(
            "4 KiB random overwrites".into(),
            ours,
            &["-w", "-d", "1", "-c", &random, "-s", "4k", "-S", &step],
            "write.qcow2",
            "write.raw",
        ),
        warm_bench_workload(
            "64 KiB sequential reads".into(),
            ours,
            &["-d", "1", "-c", &seq, "-s", "64k"],
            "full.qcow2",
            "random.raw",
        ),
        alloc_write_workload(ours, &fill, &size),
    ];
    list.extend(convert_workloads(ours, scale));
    list.push(open_workload(
        ours,
        "open + 4 KiB read, 2 PiB sparse",
        "huge.qcow2",
    ));
    if big {
        let name = format!("open + 4 KiB read, {} fully written", gib(scale.big_image));
        list.push(open_workload(ours, &name, "big.qcow2"));
    }
    list
}

/// 64 KiB sequential writes filling a fresh empty image, flushed at the
/// end.
fn alloc_write_workload(ours: &str, count: &str, size: &str) -> Workload {
    let args = [
        "-w",
        "-d",
        "1",
        "-c",
        count,
        "-s",
        "64k",
        &format!("--flush-interval={count}"),
    ];
    let mut variants = bench_variants(ours, &args, "empty.qcow2", "empty.raw");
    for variant in &mut variants {
        let (format, file) = match variant.tool {
            Tool::Raw => ("raw", "empty.raw"),
            Tool::Ours | Tool::Qemu => ("qcow2", "empty.qcow2"),
        };
        variant.remove = vec![file.to_string()];
        variant.setup = Some(strings(&[
            "qemu-img", "create", "-q", "-f", format, file, size,
        ]));
    }
    Workload {
        name: "64 KiB sequential allocating writes".into(),
        metrics: vec![Metric::Reported, Metric::Wall],
        variants,
        warm: Vec::new(),
    }
}

/// `convert` both ways, each into a fresh target.
fn convert_workloads(ours: &str, scale: &Scale) -> Vec<Workload> {
    let gib = scale.image as f64 / f64::from(1u32 << 30);
    let one = |from: &str, to: &str, source: &str| {
        let (src_format, dst_format) = (from, to);
        let target = |tool: &str| format!("out-{tool}.{dst_format}");
        let variant = |tool: Tool, program: &str, extra: &[&str], name: &str| {
            let mut args = strings(&["convert"]);
            args.extend(strings(extra));
            args.extend(strings(&["-f", src_format, "-O", dst_format, source]));
            writing_variant(tool, program, args, target(name))
        };
        Workload {
            name: format!("convert {from} -> {to}, {gib} GiB mixed data"),
            metrics: vec![Metric::Wall],
            variants: vec![
                variant(Tool::Ours, ours, &[], "ours"),
                variant(Tool::Qemu, "qemu-img", &["-t", "writeback"], "qemu"),
            ],
            warm: vec![source.to_string()],
        }
    };
    vec![
        one("raw", "qcow2", "mixed.raw"),
        one("qcow2", "raw", "mixed.qcow2"),
        compressed_convert(ours, scale, Codec::Zlib, true),
        compressed_convert(ours, scale, Codec::Zlib, false),
        compressed_convert(ours, scale, Codec::Zstd, true),
        compressed_convert(ours, scale, Codec::Zstd, false),
    ]
}

/// A variant that writes the file `target`, removed before each run:
/// `program` with `args`, then `target`.
fn writing_variant(tool: Tool, program: &str, mut args: Vec<String>, target: String) -> Variant {
    args.push(target.clone());
    Variant {
        tool,
        program: program.to_string(),
        args,
        remove: vec![target],
        setup: None,
    }
}

/// The compression formats of the compressed `convert` rows.
#[derive(Clone, Copy)]
enum Codec {
    Zlib,
    Zstd,
}

impl Codec {
    /// `compression_type` value.
    fn name(self) -> &'static str {
        match self {
            Codec::Zlib => "zlib",
            Codec::Zstd => "zstd",
        }
    }

    /// The compressed image made from `text.raw` by qemu-img at setup.
    fn image(self) -> &'static str {
        match self {
            Codec::Zlib => "text-c.qcow2",
            Codec::Zstd => "text-zstd.qcow2",
        }
    }

    /// Suffix of the output files' names.
    fn suffix(self) -> &'static str {
        match self {
            Codec::Zlib => "c",
            Codec::Zstd => "zstd",
        }
    }
}

/// `convert -c` of compressible data into a qcow2 image compressed with
/// `codec` (`compress`), or that image back to raw; the raw baseline
/// copies the raw data (`cp`).
fn compressed_convert(ours: &str, scale: &Scale, codec: Codec, compress: bool) -> Workload {
    let gib = scale.image as f64 / f64::from(1u32 << 30);
    let (source, src_format, dst_format) = if compress {
        ("text.raw", "raw", "qcow2")
    } else {
        (codec.image(), "qcow2", "raw")
    };
    let suffix = codec.suffix();
    let target = |name: &str| format!("out-{name}-{suffix}.{dst_format}");
    let variant = |tool: Tool, program: &str, extra: &[&str], name: &str| {
        let mut args = strings(&["convert"]);
        args.extend(strings(extra));
        if compress {
            args.push("-c".into());
            args.extend(strings(&[
                "-o",
                &format!("compression_type={}", codec.name()),
            ]));
        }
        args.extend(strings(&["-f", src_format, "-O", dst_format, source]));
        writing_variant(tool, program, args, target(name))
    };
    let copy = writing_variant(
        Tool::Raw,
        "cp",
        strings(&["--sparse=always", "text.raw"]),
        target("raw"),
    );
    let codec = codec.name();
    let name = if compress {
        format!("convert -c raw -> qcow2 ({codec}), {gib} GiB compressible data")
    } else {
        format!("convert compressed qcow2 ({codec}) -> raw, {gib} GiB compressible data")
    };
    Workload {
        name,
        metrics: vec![Metric::Wall],
        variants: vec![
            variant(Tool::Ours, ours, &[], "ours"),
            variant(Tool::Qemu, "qemu-img", &["-t", "writeback"], "qemu"),
            copy,
        ],
        warm: vec![source.to_string()],
    }
}

/// Opening an image and reading its first 4 KiB.
fn open_workload(ours: &str, name: &str, file: &str) -> Workload {
    let variant = |tool, program: &str, args: &[&str]| {
        let mut args = strings(args);
        args.extend(strings(&["-r", "-f", "qcow2", "-c", "read 0 4k", file]));
        Variant {
            tool,
            program: program.to_string(),
            args,
            remove: Vec::new(),
            setup: None,
        }
    };
    Workload {
        name: name.to_string(),
        metrics: vec![Metric::Wall],
        variants: vec![
            variant(Tool::Ours, ours, &["io"]),
            variant(Tool::Qemu, "qemu-io", &[]),
        ],
        warm: Vec::new(),
    }
}

/// Reads `file` once so that it is in the page cache.
fn warm(dir: &Path, file: &str) -> Result<(), String> {
    let mut f = File::open(dir.join(file)).map_err(|e| format!("cannot open {file}: {e}"))?;
    let mut buf = vec![0u8; CHUNK];
    while f
        .read(&mut buf)
        .map_err(|e| format!("cannot read {file}: {e}"))?
        > 0
    {}
    Ok(())
}

/// Runs every variant of `workload` `runs` times, alternating the tools.
fn measure_workload(dir: &Path, workload: Workload, runs: usize) -> Result<Measured, String> {
    for file in &workload.warm {
        warm(dir, file)?;
    }
    let n = workload.variants.len();
    let mut samples: Vec<(Tool, Vec<Sample>)> = workload
        .variants
        .iter()
        .map(|v| (v.tool, Vec::new()))
        .collect();
    for run in 0..runs {
        for k in 0..n {
            // Rotate which tool goes first.
            let i = (run + k) % n;
            let sample = measure_variant(dir, &workload.variants[i])?;
            samples[i].1.push(sample);
        }
    }
    Ok(Measured { workload, samples })
}

/// Prepares and measures one run of `variant`.
fn measure_variant(dir: &Path, variant: &Variant) -> Result<Sample, String> {
    for file in &variant.remove {
        let _ = std::fs::remove_file(dir.join(file));
    }
    if let Some(setup) = &variant.setup {
        let args: Vec<&str> = setup[1..].iter().map(String::as_str).collect();
        prep(dir, &setup[0], &args)?;
    }
    sync();
    let (stdout, sample) = spawn_measured(dir, &variant.program, &variant.args)?;
    let reported = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in "))
        .and_then(|rest| rest.strip_suffix(" seconds."))
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    Ok(Sample { reported, ..sample })
}

/// Runs `program` in `dir`, returning its stdout, wall time and peak RSS
/// (`ru_maxrss` from `wait4`). Fails if it does not exit with status 0.
fn spawn_measured(dir: &Path, program: &str, args: &[String]) -> Result<(String, Sample), String> {
    let shown = || format!("{program} {}", args.join(" "));
    reset_peak_rss();
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stderr = child.stderr.take().ok_or("no stderr pipe")?;
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    let (status, usage) = wait4(child.id())?;
    let wall = start.elapsed().as_secs_f64();
    let errors = errors.join().unwrap_or_default();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        return Err(format!(
            "`{}` failed ({status:#x}): {}",
            shown(),
            errors.trim()
        ));
    }
    let sample = Sample {
        reported: f64::NAN,
        wall,
        rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
    };
    Ok((stdout, sample))
}

/// Waits for child `pid`; returns its wait status and resource usage.
fn wait4(pid: u32) -> Result<(i32, libc::rusage), String> {
    let pid = libc::pid_t::try_from(pid).map_err(|e| e.to_string())?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `pid` is our unreaped child; the pointers are to locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            return Ok((status, usage));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("wait4: {e}"));
        }
    }
}

/// Checks that the last outputs of both `convert` directions hold the
/// source's contents.
fn verify_converts(dir: &Path) -> Result<(), String> {
    for (source, target) in [
        ("mixed.raw", "out-ours.qcow2"),
        ("mixed.raw", "out-qemu.qcow2"),
        ("mixed.qcow2", "out-ours.raw"),
        ("mixed.qcow2", "out-qemu.raw"),
        ("text.raw", "out-ours-c.qcow2"),
        ("text.raw", "out-qemu-c.qcow2"),
        ("text-c.qcow2", "out-ours-c.raw"),
        ("text-c.qcow2", "out-qemu-c.raw"),
        ("text.raw", "out-ours-zstd.qcow2"),
        ("text.raw", "out-qemu-zstd.qcow2"),
        ("text-zstd.qcow2", "out-ours-zstd.raw"),
        ("text-zstd.qcow2", "out-qemu-zstd.raw"),
    ] {
        prep(dir, "qemu-img", &["compare", source, target])
            .map_err(|e| format!("convert produced a wrong image: {e}"))?;
    }
    Ok(())
}

/// The median of `values` (NaN when empty).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The rows of one workload: one per metric.
fn rows(measured: &Measured) -> Vec<Row> {
    let of = |tool: Tool| {
        measured
            .samples
            .iter()
            .find(|(t, _)| *t == tool)
            .map(|(_, s)| s)
    };
    let med = |tool: Tool, metric: Metric| {
        of(tool).map(|s| median(&mut s.iter().map(|x| x.get(metric)).collect::<Vec<_>>()))
    };
    let peak = |tool: Tool| of(tool).map_or(0, |s| s.iter().map(|x| x.rss_kib).max().unwrap_or(0));
    let w = &measured.workload;
    w.metrics
        .iter()
        .map(|&metric| Row {
            name: match (metric, w.metrics.len()) {
                (Metric::Wall, 2) => format!("{} (process wall: + final flush, close)", w.name),
                _ => w.name.clone(),
            },
            ours: med(Tool::Ours, metric).unwrap_or(f64::NAN),
            qemu: med(Tool::Qemu, metric).unwrap_or(f64::NAN),
            raw: med(Tool::Raw, metric),
            rss_ours: peak(Tool::Ours),
            rss_qemu: peak(Tool::Qemu),
        })
        .collect()
}

/// Seconds with three significant decimals.
fn secs(s: f64) -> String {
    if s < 0.1 {
        format!("{s:.4}")
    } else {
        format!("{s:.3}")
    }
}

/// KiB as MiB.
fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The results as a Markdown table.
fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| Workload | ours (s) | qemu (s) | raw (s) | ours/qemu | ours/raw | peak RSS ours (MiB) | peak RSS qemu (MiB) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let raw = row.raw.map_or("—".into(), secs);
        let vs_raw = row
            .raw
            .map_or("—".into(), |r| format!("{:.2}", row.ours / r));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {raw} | {:.2} | {vs_raw} | {} | {} |",
            row.name,
            secs(row.ours),
            secs(row.qemu),
            row.ours / row.qemu,
            mib(row.rss_ours),
            mib(row.rss_qemu),
        );
    }
    out
}

/// First line of a command's output, or `unknown`.
fn first_line(program: &str, args: &[&str]) -> String {
    capture(program, args)
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The value of `key` in a `key : value` file such as /proc/cpuinfo.
fn proc_field(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The machine description for the report.
fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = proc_field("/proc/meminfo", "MemTotal")
        .trim_end_matches(" kB")
        .parse()
        .unwrap_or(0);
    format!(
        "- CPUs (`nproc`): {cpus}\n\
         - CPU: {}\n\
         - Memory: {:.1} GiB\n\
         - Kernel: {}\n\
         - {}\n\
         - {}\n",
        proc_field("/proc/cpuinfo", "model name"),
        mem_kib as f64 / f64::from(1u32 << 20),
        first_line("uname", &["-sr"]),
        first_line("qemu-img", &["--version"]),
        first_line("rustc", &["--version"]),
    )
}

/// `program args...` as a shell line, with `qcow2-tool` for the build.
fn shell_line(program: &str, args: &[String]) -> String {
    let program = if program.ends_with("/qcow2-tool") {
        "qcow2-tool"
    } else {
        program
    };
    let mut line = program.to_string();
    for arg in args {
        if arg.contains(' ') {
            let _ = write!(line, " '{arg}'");
        } else {
            let _ = write!(line, " {arg}");
        }
    }
    line
}

/// The command lines of every workload, as run in the scratch directory.
fn commands(measured: &[Measured]) -> String {
    let mut out = String::new();
    for m in measured {
        let _ = writeln!(out, "{}:\n", m.workload.name);
        for v in &m.workload.variants {
            if let Some(setup) = &v.setup {
                let line = shell_line(&setup[0], &setup[1..]);
                let _ = writeln!(out, "    # before each run: {line}");
            }
            let _ = writeln!(out, "    {}", shell_line(&v.program, &v.args));
        }
        out.push('\n');
    }
    out
}

/// The name of a tool in the report.
fn tool_name(tool: Tool) -> &'static str {
    match tool {
        Tool::Ours => "ours",
        Tool::Qemu => "qemu",
        Tool::Raw => "raw",
    }
}

/// Every run's time, per workload and tool, in run order.
fn samples(measured: &[Measured]) -> String {
    let mut out = String::new();
    for m in measured {
        for &metric in &m.workload.metrics {
            let what = match metric {
                Metric::Reported => "reported",
                Metric::Wall => "wall",
            };
            let _ = writeln!(out, "- {} ({what}):", m.workload.name);
            for (tool, runs) in &m.samples {
                let times: Vec<String> = runs.iter().map(|s| secs(s.get(metric))).collect();
                let _ = writeln!(out, "  {} {}", tool_name(*tool), times.join(" "));
            }
        }
    }
    out
}

/// BENCHMARKS.md.
fn report(options: &Options, scale: &Scale, outcome: &Outcome, table: &str) -> String {
    let Outcome {
        measured,
        big,
        floor,
        prepared,
    } = outcome;
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let mut out = String::new();
    let _ = write!(
        out,
        "# Benchmarks\n\n\
         Generated by `cargo xtask bench` on {date}; rerun it to refresh this file.\n\n\
         ## Machine\n\n{}\n\
         ## Method\n\n\
         - Median of {runs} runs per tool and workload, all in one `cargo xtask bench`\n  \
           process; the tools alternate, and which one goes first rotates.\n\
         - *ours* is `qcow2-tool` (release build), *qemu* is `qemu-img` / `qemu-io`,\n  \
           *raw* is `qcow2-tool bench -f raw`: plain `pread`/`pwrite` on a raw file\n  \
           of the same size and contents, the physical baseline.\n\
         - `bench` rows are the tools' own `Run completed in` time: the request loop\n  \
           only, without open and close. qemu-img's clock stops without waiting for\n  \
           the flush it issues after the last request, and so does ours; the\n  \
           \"process wall\" row adds that flush and the close.\n\
         - `convert` and `open` rows are the wall time of the whole process.\n\
         - Peak RSS is `ru_maxrss` of the child from `wait4`, the maximum over runs.\n\
         - Depth 1 everywhere: our core serves one request at a time (qemu's\n  \
           depth would overlap requests in its thread pool).\n\
         - Images are {image} MiB with 64 KiB clusters, created by `qemu-img convert`\n  \
           from a raw file of random data (reads, overwrites) or of mixed data (a third\n  \
           holes, the rest random with every fourth 64 KiB cluster zero; `convert`).\n  \
           Compressed `convert` rows use compressible data (16 symbols, half of each\n  \
           cluster repeating its first 4 KiB, every fourth cluster zero), compressed\n  \
           by qemu-img with zlib or zstd; their raw baseline is `cp --sparse=always`\n  \
           of the raw data.\n  \
           Random workloads use step {SCATTER_STEP} (4099 pages) so offsets scatter\n  \
           over every 4 KiB page. Files are read once before each workload (page\n  \
           cache warm) and `sync` runs before every run. Allocating writes and\n  \
           `convert` get a fresh target per run.\n\
         - {big_note}\n\
         - The machine is shared and noisy: compare ratios, not absolute times,\n  \
           and expect run-to-run spread.\n\n\
         ## Results\n\n{table}\n{}\n\n\
         ## Per-run times (s)\n\n{}\n\
         ## Preparation\n\nIn the scratch directory (`/var/tmp/qcow2-xtask-bench-PID`), \
         once per bench run:\n\n{}\n\
         ## Commands\n\nRun in the scratch directory:\n\n{}",
        machine(),
        floor_note(*floor),
        samples(measured),
        prepared
            .iter()
            .map(|line| format!("    {line}\n"))
            .collect::<String>(),
        commands(measured),
        runs = options.runs,
        image = scale.image >> 20,
        big_note = if *big {
            format!(
                "The fully written {} GiB image is made once per bench run by\n  \
                 `qcow2-tool bench -w -s 1M` and deleted at the end.",
                scale.big_image >> 30
            )
        } else {
            "The fully written image was skipped (less than 20 GiB free).".to_string()
        },
    );
    out
}
