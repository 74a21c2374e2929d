//! `cargo xtask size`: the memory and code figures of the firmware example
//! (`firmware/`, built for `thumbv7em-none-eabihf` and run under QEMU, once
//! per device variant, see [`firmware::VARIANTS`]): the RAM table (cache
//! slot, cache, image, scratch buffers), every API future with the stack
//! its poll takes, the stack per phase, per variant; the panic call sites
//! left in each variant's binary and `.text` per feature set; and those of
//! the decoders of compressed clusters (features `zlib`, `zstd`), from the
//! codec probe (`xtask/codec-probe/`, built, never run): their `.text`
//! over the probe's baseline, their panic call sites, and the RAM rows of
//! their state, window, tables and buffers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::firmware::{self, Figures, DEFAULT_VARIANT, MAIN_BIN, READONLY_BIN};
use crate::{cargo_embedded, ensure_target, lint_embedded};

/// Most panic call sites from qcow2-core any variant's firmware binary may
/// hold (see [`panic_sites`] and [`attribute`]); CI fails above it. Set to
/// the count measured when the check was introduced; lower it as panics
/// go, to 0. (Sites in the example's own formatting and semihosting code
/// are reported, not limited; the compiler's async-resume checks are not
/// counted, see [`panic_sites`].)
pub const MAX_PANIC_SITES: usize = 0;

/// Builds whose `.text` is reported: (name, cargo arguments for the
/// firmware crate, binaries to measure). The firmware's `write` and `check`
/// features forward to the core's; the main example needs `write`, the
/// `readonly` binary (open read-only and read) builds with any set.
pub const FEATURE_SETS: &[(&str, &[&str], &[&str])] = &[
    ("default", &[], &[MAIN_BIN, READONLY_BIN]),
    (
        "check",
        &["--no-default-features", "--features", "check"],
        &[READONLY_BIN],
    ),
    ("read-only", &["--no-default-features"], &[READONLY_BIN]),
];

/// The codec probe: the core's decoders in a Cortex-M4F binary (own
/// workspace, like `firmware/`).
pub const PROBE_DIR: &str = "xtask/codec-probe";
/// The probe's binary.
const PROBE_BIN: &str = "qcow2-codec-probe";

/// Builds of the probe: (name, cargo arguments). `none` is the baseline
/// the decoders' `.text` is measured over.
const PROBE_SETS: &[(&str, &[&str])] = &[
    ("none", &[]),
    ("zlib", &["--features", "zlib"]),
    ("zstd", &["--features", "zstd"]),
    ("zlib,zstd", &["--features", "zlib,zstd"]),
];

/// The RAM rows the probe measures: (`RAM_*` symbol, what it is).
const PROBE_RAM: &[(&str, &str)] = &[
    (
        "RAM_INFLATE_STATE",
        "zlib decoder state, `inflate::InflateState` (feature `zlib`)",
    ),
    (
        "RAM_INFLATE_WINDOW",
        "zlib decoder window, `inflate::MIN_WINDOW`: reads every image QEMU writes \
         (32 KiB or a whole cluster reads any deflate stream)",
    ),
    (
        "RAM_ZSTD_TABLES",
        "zstd decoder tables, `zstd::ZstdTables` (feature `zstd`)",
    ),
    (
        "RAM_ZSTD_BUFFERS_64K",
        "zstd decoder buffers for 64 KiB clusters: history (a cluster), block and \
         literals (`zstd::scratch_bytes`: a cluster, at most 128 KiB, each)",
    ),
];

/// What the codec probe measured.
pub struct Codecs {
    /// `.text` per probe build, in [`PROBE_SETS`] order.
    text: Vec<(&'static str, u64)>,
    /// Sizes of the `RAM_*` symbols.
    ram: BTreeMap<String, u64>,
    /// Panic call sites per decoder build (`zlib`, `zstd`), each with the
    /// crate it comes from.
    sites: Vec<(&'static str, Vec<(PanicSite, String)>)>,
}

/// Checks the probe's formatting and lints it in every feature set.
pub fn lint_probe() -> Result<(), String> {
    lint_embedded(PROBE_DIR, PROBE_SETS)
}

/// Builds the probe with `features` and returns its binary (copied aside,
/// so that the next build does not replace it).
fn build_probe(name: &str, features: &[&str]) -> Result<PathBuf, String> {
    ensure_target()?;
    let built = cargo_embedded("build", PROBE_DIR, features)?.join(PROBE_BIN);
    let copy = Path::new(PROBE_DIR)
        .join("target")
        .join(format!("{PROBE_BIN}-{}", name.replace(',', "-")));
    std::fs::copy(&built, &copy).map_err(|e| format!("{}: {e}", built.display()))?;
    Ok(copy)
}

/// Builds the probe in every set and measures it.
pub fn codecs() -> Result<Codecs, String> {
    let mut codecs = Codecs {
        text: Vec::new(),
        ram: BTreeMap::new(),
        sites: Vec::new(),
    };
    for (name, features) in PROBE_SETS {
        let elf = build_probe(name, features)?;
        codecs.text.push((name, text_size(&elf)?));
        if *name == "zlib" || *name == "zstd" {
            let mut sites = panic_sites(&elf)?;
            attribute(&elf, &mut sites)?;
            let crates = sites.iter().map(|s| s.krate.clone()).collect::<Vec<_>>();
            codecs
                .sites
                .push((name, sites.into_iter().zip(crates).collect()));
        }
        if *name == "zlib,zstd" {
            codecs.ram = symbol_sizes(&elf)?;
        }
    }
    Ok(codecs)
}

impl Codecs {
    /// Panic sites of the decoders that come from qcow2-core itself.
    fn in_core(&self) -> usize {
        self.sites
            .iter()
            .map(|(_, s)| s.iter().filter(|(_, c)| c == "qcow2-core").count())
            .sum()
    }

    /// `.text` rows and panic sites.
    fn print(&self) {
        let base = self.text.first().map_or(0, |t| t.1);
        for (name, text) in &self.text {
            if *name == "none" {
                println!("text codec probe baseline: {text} B");
            } else {
                println!(
                    "text codec {name}: {} B (the decoder in the probe, over its baseline)",
                    text.saturating_sub(base)
                );
            }
        }
        for (name, sites) in &self.sites {
            let mut by_crate: BTreeMap<&str, usize> = BTreeMap::new();
            for (_, krate) in sites {
                *by_crate.entry(krate).or_default() += 1;
            }
            let list: Vec<String> = by_crate.iter().map(|(c, n)| format!("{c} {n}")).collect();
            println!(
                "panic sites with the {name} decoder: {} ({})",
                sites.len(),
                list.join(", ")
            );
        }
    }
}

/// Attributes each site in `elf` through inlining: sets its
/// [`PanicSite::krate`] and [`PanicSite::origin`] from the innermost
/// inlined frame that is not Rust's library code, read from the debug
/// info by `llvm-symbolizer --inlining` (LLVM's own, on PATH: Debian's
/// `llvm`). The line table alone is not enough: LTO inlines the core's
/// functions into the example's (a core site then sits in a firmware
/// function, at a line of Rust's library), and only the inlining chain
/// says whose code it is. Fails when llvm-symbolizer is missing or its
/// answer does not match the sites.
pub fn attribute(elf: &Path, sites: &mut [PanicSite]) -> Result<(), String> {
    if sites.is_empty() {
        return Ok(());
    }
    // Not in rustup's llvm-tools.
    let mut cmd = Command::new("llvm-symbolizer");
    cmd.arg(format!("--obj={}", elf.display()))
        .arg("--inlining");
    for site in sites.iter() {
        cmd.arg(format!("0x{}", site.address));
    }
    let output = cmd.output().ok().filter(|o| o.status.success()).ok_or(
        "llvm-symbolizer failed or is missing (Debian package `llvm`): panic sites \
                cannot be attributed through inlining without it",
    )?;
    // One block of frames per address, innermost first (function line,
    // then `path:line:col` line), blocks separated by empty lines.
    let text = String::from_utf8_lossy(&output.stdout);
    let blocks: Vec<&str> = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .collect();
    if blocks.len() != sites.len() {
        return Err(format!(
            "llvm-symbolizer gave {} frame lists for {} panic sites in {}",
            blocks.len(),
            sites.len(),
            elf.display()
        ));
    }
    for (block, site) in blocks.iter().zip(sites.iter_mut()) {
        let origin = block
            .lines()
            .filter(|l| l.starts_with('/'))
            .find(|l| !l.starts_with("/rustc/"));
        site.krate = origin.and_then(crate_of_path).unwrap_or_else(|| "?".into());
        site.origin = origin.unwrap_or(&site.source).to_string();
        site.via_core = block.lines().any(|l| l.contains("qcow2-core/src/"));
    }
    Ok(())
}

/// The crate a source path belongs to: `qcow2-core`, the probe, or a
/// registry crate (its directory's name without the version).
fn crate_of_path(path: &str) -> Option<String> {
    if path.contains("qcow2-core/src/") {
        return Some("qcow2-core".into());
    }
    if path.contains("codec-probe/src/") {
        return Some("the probe".into());
    }
    if path.contains("firmware/src/") {
        return Some("the example".into());
    }
    path.split('/')
        .find(|part| part.contains('-') && part.ends_with(|c: char| c.is_ascii_digit()))
        .map(|dir| {
            dir.rsplit_once('-')
                .map_or(dir, |(name, _)| name)
                .to_string()
        })
}

/// The sizes of the `RAM_*` symbols in `elf`, from `llvm-nm -S`.
fn symbol_sizes(elf: &Path) -> Result<BTreeMap<String, u64>, String> {
    let nm = llvm_tool("llvm-nm")?;
    let out = Command::new(&nm)
        .arg("-S")
        .arg(elf)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nm.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [_, size, _, name] if name.starts_with("RAM_") => {
                    Some((name.to_string(), u64::from_str_radix(size, 16).ok()?))
                }
                _ => None,
            }
        })
        .collect())
}

/// `cargo xtask size`: runs the firmware in `target/firmware-size` and
/// prints the tables (over-budget figures are reported, not fatal);
/// `cargo xtask size --codecs`: only the codec probe's figures.
pub fn main(args: &[String]) -> Result<(), String> {
    if args.iter().any(|a| a == "--codecs") {
        let codecs = codecs()?;
        println!("| RAM (thumbv7em-none-eabihf) | bytes |");
        println!("|---|---|");
        print_codec_ram(&codecs);
        codecs.print();
        return Ok(());
    }
    let figures = firmware::run_collect(Path::new("target/firmware-size"))?;
    report(&figures, false)
}

/// Prints the tables for `figures`, counts the panic sites in every
/// variant's binary and measures `.text`; with `enforce`, fails when the
/// panic sites from the core exceed [`MAX_PANIC_SITES`] in any variant.
pub fn report(figures: &Figures, enforce: bool) -> Result<(), String> {
    let codecs = codecs()?;
    print_tables(figures, &codecs);
    let root = std::env::current_dir()
        .map(|d| format!("{}/", d.display()))
        .unwrap_or_default();
    let mut most_in_core = 0;
    for (variant, bins) in &figures.binaries {
        let mut sites = panic_sites(&bins.main)?;
        attribute(&bins.main, &mut sites)?;
        let in_core = sites.iter().filter(|s| s.in_core()).count();
        most_in_core = most_in_core.max(in_core);
        println!("panic sites ({variant}): {}", sites.len());
        println!(
            "panic sites in qcow2-core ({variant}): {in_core} (at most MAX_PANIC_SITES = \
             {MAX_PANIC_SITES})"
        );
        for site in &sites {
            println!(
                "  {} {} (in {}) -> {}",
                if site.in_core() { "core " } else { "other" },
                site.origin.strip_prefix(&root).unwrap_or(&site.origin),
                shorten(&site.function),
                shorten(&site.target)
            );
        }
    }
    for (name, args, binaries) in FEATURE_SETS {
        let bins = firmware::build(args)?;
        for binary in *binaries {
            let path = if *binary == READONLY_BIN {
                &bins.readonly
            } else {
                &bins.main
            };
            println!("text {name} {binary}: {} B", text_size(path)?);
        }
    }
    codecs.print();
    if enforce && codecs.in_core() > 0 {
        return Err(format!(
            "{} panic sites from qcow2-core in the codec probe (its decoder wrappers must have none)",
            codecs.in_core()
        ));
    }
    if enforce && most_in_core > MAX_PANIC_SITES {
        return Err(format!(
            "{most_in_core} panic sites from qcow2-core in a firmware binary, more than \
             MAX_PANIC_SITES = {MAX_PANIC_SITES} (xtask/src/size.rs)"
        ));
    }
    Ok(())
}

/// The RAM rows of the decoders.
fn print_codec_ram(codecs: &Codecs) {
    for (symbol, what) in PROBE_RAM {
        let bytes = codecs
            .ram
            .get(*symbol)
            .map_or("?".to_string(), |b| b.to_string());
        println!("| {what} | {bytes} |");
    }
}

/// The RAM, future and stack tables, in Markdown, each with a column (or
/// row) per device variant.
fn print_tables(figures: &Figures, codecs: &Codecs) {
    let variants: Vec<&str> = firmware::VARIANTS.iter().map(|(v, _)| *v).collect();
    let get = |variant: &str, kind: &str, name: &str| {
        figures
            .get(variant, MAIN_BIN, kind, name)
            .map_or("?".to_string(), |b| b.to_string())
    };
    let ram = |name: &str| get(DEFAULT_VARIANT, "ram", name);
    println!();
    println!("| RAM (thumbv7em-none-eabihf) | bytes |");
    println!("|---|---|");
    println!(
        "| one cache slot, `Slot<1>` (512 B slice + tag and links) | {} |",
        ram("slot")
    );
    println!(
        "| the cache, `FirmwareCache` (8 slots) | {} |",
        ram("cache")
    );
    println!(
        "| the open image, `FirmwareQcow2<'_, RamDisk>` (cache borrowed) | {} |",
        ram("image")
    );
    for f in figures.of(DEFAULT_VARIANT, MAIN_BIN, "ram") {
        if let Some(name) = f.name.strip_prefix("scratch ") {
            println!("| scratch buffer `{name}` (the example's) | {} |", f.bytes);
        }
    }
    print_codec_ram(codecs);
    println!();
    println!(
        "| device variant | device (bytes) | open image (bytes) | phases' future (bytes) | \
         app's future (bytes) | app under `block_on` (bytes) | whole example (bytes) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for variant in &variants {
        println!(
            "| {variant} | {} | {} | {} | {} | {} | {} |",
            get(variant, "ram", "device"),
            get(variant, "ram", "image"),
            get(variant, "future", "firmware"),
            get(variant, "future", "app"),
            get(variant, "stack", "app"),
            get(variant, "stack", "total"),
        );
    }
    println!();
    let header: Vec<String> = variants
        .iter()
        .map(|v| format!("{v} future | {v} poll"))
        .collect();
    println!("| call | {} |", header.join(" | "));
    println!("|---|{}", "---|---|".repeat(variants.len()));
    let mut calls = BTreeSet::new();
    for f in figures.of(DEFAULT_VARIANT, MAIN_BIN, "future") {
        if f.name != "firmware" && f.name != "app" && calls.insert(f.name.clone()) {
            let cells: Vec<String> = variants
                .iter()
                .map(|v| {
                    format!(
                        "{} | {}",
                        get(v, "future", &f.name),
                        get(v, "poll", &f.name)
                    )
                })
                .collect();
            println!("| `{}` | {} |", f.name, cells.join(" | "));
        }
    }
    println!();
    println!("| phase (stack, bytes) | {} |", variants.join(" | "));
    println!("|---|{}", "---|".repeat(variants.len()));
    for f in figures.of(DEFAULT_VARIANT, MAIN_BIN, "stack") {
        let cells: Vec<String> = variants.iter().map(|v| get(v, "stack", &f.name)).collect();
        let name = if f.name == "total" {
            "whole example under `block_on`"
        } else {
            &f.name
        };
        println!("| {name} | {} |", cells.join(" | "));
    }
    let readonly: Vec<String> = variants
        .iter()
        .map(|v| {
            figures
                .get(v, READONLY_BIN, "stack", "total")
                .map_or("?".to_string(), |b| b.to_string())
        })
        .collect();
    println!(
        "| the `readonly` binary, whole | {} |",
        readonly.join(" | ")
    );
    println!();
}

/// One call to a panicking function.
#[derive(Debug)]
pub struct PanicSite {
    /// The function the call is in (demangled as llvm-objdump prints it).
    pub function: String,
    /// The panicking function it calls.
    pub target: String,
    /// The innermost source line of the call (`path:line`, from the line
    /// table; empty when there is none).
    pub source: String,
    /// The call's address (hex, as llvm-objdump prints it).
    pub address: String,
    /// The crate whose code the site is (set by [`attribute`]):
    /// `qcow2-core`, `the example`, a registry crate, or `?`.
    pub krate: String,
    /// The source line the site is attributed to (set by [`attribute`]):
    /// that of the innermost inlined frame outside Rust's library.
    pub origin: String,
    /// Some frame of the inlining chain is the core's (set by
    /// [`attribute`]): a dependency's site inlined into the core's code is
    /// reachable through the core.
    pub via_core: bool,
}

impl PanicSite {
    /// Whether the site comes from qcow2-core (after [`attribute`]): some
    /// inlined frame is the core's, whatever function LTO inlined it into
    /// (its own code, or a dependency's it calls); or, with no frame
    /// outside Rust's library, the site is in a function of the core.
    pub fn in_core(&self) -> bool {
        self.via_core || self.krate == "?" && self.function.contains("qcow2_core")
    }
}

/// The panic call sites in `elf`.
///
/// Method: disassemble with `llvm-objdump -d -C -l` (rustup's
/// `llvm-tools`), which prints each instruction with the source line the
/// line table gives it. The panicking functions are those named
/// `core::panicking::*` (which includes `core::panicking::panic_const::*`),
/// plus every `core::` function that calls one of them and never returns
/// (no `bx lr`, no `pop` or `ldm` into `pc`): the cold wrappers such as
/// `core::option::unwrap_failed` or `core::slice::index::slice_index_fail`,
/// found by repeating until nothing is added. A site is a branch (`bl`,
/// `blx`, `b`, `b.w`, conditional or not) from any other function to the
/// start of a panicking function (llvm-objdump names the target as
/// `<symbol>`; a target inside a function reads `<symbol+0x…>`). Calls to
/// `core::panicking::panic_const::panic_const_async_fn_resumed*` (and any
/// other `*_resumed*`) are not counted: the compiler puts one in every
/// `async fn` for polling after completion (and after a panic), which
/// cannot happen here. Whose code a site is comes from the debug info,
/// through inlining: see [`attribute`].
pub fn panic_sites(elf: &Path) -> Result<Vec<PanicSite>, String> {
    let objdump = llvm_tool("llvm-objdump")?;
    let out = Command::new(&objdump)
        .args(["-d", "-C", "-l", "--no-show-raw-insn"])
        .arg(elf)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", objdump.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed on {}", objdump.display(), elf.display()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    struct Function {
        name: String,
        /// (branch target, source line)
        calls: Vec<(String, String, String)>,
        returns: bool,
    }
    let mut functions: Vec<Function> = Vec::new();
    let mut source = String::new();
    for line in text.lines() {
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|l| l.split_once(" <"))
            .map(|(_, n)| n)
        {
            functions.push(Function {
                name: name.to_string(),
                calls: Vec::new(),
                returns: false,
            });
            source.clear();
            continue;
        }
        if let Some(file_line) = line.strip_prefix("; ") {
            source = file_line.trim().to_string();
            continue;
        }
        let Some(function) = functions.last_mut() else {
            continue;
        };
        let mut parts = line.split_whitespace().skip(1);
        let Some(op) = parts.next() else {
            continue;
        };
        let rest = parts.collect::<Vec<_>>().join(" ");
        if op == "bx" && rest == "lr"
            || (op.starts_with("pop") || op.starts_with("ldm")) && rest.contains("pc")
        {
            function.returns = true;
        }
        if op.starts_with('b') && !op.starts_with("bic") && !op.starts_with("bfi") {
            if let Some(target) = rest
                .split_once('<')
                .and_then(|(_, t)| t.rsplit_once('>'))
                .map(|(t, _)| t)
                .filter(|t| !t.contains("+0x"))
            {
                let address = line
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches(':')
                    .to_string();
                function
                    .calls
                    .push((target.to_string(), source.clone(), address));
            }
        }
    }
    let mut panicking: BTreeSet<&str> = functions
        .iter()
        .map(|f| f.name.as_str())
        .filter(|n| n.starts_with("core::panicking::"))
        .collect();
    loop {
        let more: Vec<&str> = functions
            .iter()
            .filter(|f| {
                !f.returns
                    && (f.name.starts_with("core::") || f.name.starts_with("<core::"))
                    && !panicking.contains(f.name.as_str())
                    && f.calls
                        .iter()
                        .any(|(c, _, _)| panicking.contains(c.as_str()))
            })
            .map(|f| f.name.as_str())
            .collect();
        if more.is_empty() {
            break;
        }
        panicking.extend(more);
    }
    let mut sites = Vec::new();
    for f in &functions {
        if panicking.contains(f.name.as_str()) {
            continue;
        }
        for (target, source, address) in &f.calls {
            if panicking.contains(target.as_str()) && !target.contains("_resumed") {
                sites.push(PanicSite {
                    function: f.name.clone(),
                    target: target.clone(),
                    source: source.clone(),
                    address: address.clone(),
                    krate: String::new(),
                    origin: source.clone(),
                    via_core: false,
                });
            }
        }
    }
    Ok(sites)
}

/// The size of the `.text` section of `elf`, from `llvm-objdump -h`.
pub fn text_size(elf: &Path) -> Result<u64, String> {
    let objdump = llvm_tool("llvm-objdump")?;
    let out = Command::new(&objdump)
        .arg("-h")
        .arg(elf)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", objdump.display()))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            f.next()?;
            (f.next()? == ".text").then(|| u64::from_str_radix(f.next()?, 16).ok())?
        })
        .ok_or_else(|| format!("no .text in {}", elf.display()))
}

/// A tool of rustup's `llvm-tools` component (installed when missing), or
/// the one on PATH.
fn llvm_tool(name: &str) -> Result<PathBuf, String> {
    let rustc = |args: &[&str]| {
        Command::new("rustc")
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let sysroot = rustc(&["--print", "sysroot"]).unwrap_or_default();
    let host = rustc(&["-vV"])
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .unwrap_or_default();
    let path = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host)
        .join("bin")
        .join(name);
    if !path.exists() {
        let _ = crate::run("rustup", &["component", "add", "llvm-tools"]);
    }
    if path.exists() {
        Ok(path)
    } else if Command::new(name).arg("--version").output().is_ok() {
        Ok(PathBuf::from(name))
    } else {
        Err(format!(
            "{name} not found: `rustup component add llvm-tools` (or install LLVM)"
        ))
    }
}

/// The last path segments of a long demangled name.
fn shorten(name: &str) -> String {
    let mut s = name.to_string();
    for (from, to) in [
        ("_$LT$", "<"),
        ("$LT$", "<"),
        ("$GT$", ">"),
        ("$u20$", " "),
        ("$u7b$", "{"),
        ("$u7d$", "}"),
        ("$C$", ","),
        ("$RF$", "&"),
        ("..", "::"),
    ] {
        s = s.replace(from, to);
    }
    // Drop the hash suffix.
    if let Some((head, hash)) = s.rsplit_once("::h") {
        if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) {
            s = head.to_string();
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crates_of_paths() {
        assert_eq!(
            crate_of_path("/work/qcow2-core/src/write.rs:275:18").as_deref(),
            Some("qcow2-core")
        );
        assert_eq!(
            crate_of_path("/work/firmware/src/lib.rs:323:9").as_deref(),
            Some("the example")
        );
        assert_eq!(
            crate_of_path("/r/index.crates.io-1949cf8c6b5b557f/semihosting-0.1.25/src/fd.rs:70:9")
                .as_deref(),
            Some("semihosting")
        );
    }

    #[test]
    fn sites_count_as_the_cores_through_inlining() {
        let site = |krate: &str, via_core: bool, function: &str| PanicSite {
            function: function.into(),
            target: "core::panicking::panic".into(),
            source: "/rustc/x/library/core/src/slice/mod.rs:5572".into(),
            address: "0".into(),
            krate: krate.into(),
            origin: String::new(),
            via_core,
        };
        // A core site inlined into the example's function.
        assert!(site("qcow2-core", true, "qcow2_firmware::poll_below").in_core());
        // A dependency's site inlined into the core's code.
        assert!(site("heapless", true, "qcow2_firmware::poll_below").in_core());
        assert!(!site("semihosting", false, "semihosting::io::Write::write_all").in_core());
        // Library code only: the function it is in decides.
        assert!(site("?", false, "qcow2_core::cache::Cache::get").in_core());
        assert!(!site("?", false, "<char>::escape_debug_ext").in_core());
    }
}
