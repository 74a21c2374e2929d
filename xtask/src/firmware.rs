//! `cargo xtask firmware --out DIR`: builds the `firmware/` example for
//! `thumbv7em-none-eabihf` once per device type in [`VARIANTS`], runs each
//! under `qemu-system-arm -M mps2-an386` with semihosting (working
//! directory `DIR/<variant>`, where it writes its images), checks every
//! variant's figures against the budget below and runs `qemu-img check` on
//! every image they wrote.
//!
//! The budget is the issue's, for the default firmware configuration
//! (`FirmwareQcow2`: 8 cache slices of 512 B, borrowed), and holds for
//! every device type: [`MAX_FUTURE_BYTES`], [`MAX_POLL_STACK_BYTES`],
//! [`MAX_TOTAL_STACK_BYTES`] (the latter also for the example's `app`
//! phase, an ordinary application under `block_on` of its own: its whole
//! stack, its future included).
//! Figures known to be over it are listed, with the figure they may not
//! exceed, in [`KNOWN_OVER_BUDGET`]; the list only ever shrinks.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{cargo_embedded, ensure_target, lint_embedded, run};

/// Largest future any API call may return (bytes).
pub const MAX_FUTURE_BYTES: u64 = 4096;
/// Most stack one API call may use while polled, beyond its future (bytes).
pub const MAX_POLL_STACK_BYTES: u64 = 4096;
/// Most stack the whole example may use under `block_on`, the frame that
/// holds its future included (bytes); and the `app` phase, likewise.
pub const MAX_TOTAL_STACK_BYTES: u64 = 16384;

/// The device types the firmware is measured with: (variant, cargo
/// arguments selecting it in `firmware/Cargo.toml`). The budget must hold
/// for the devices applications write, whatever their size.
pub const VARIANTS: &[(&str, &[&str])] = &[
    ("device-4", &[]),
    ("device-16", &["--features", "device-16"]),
    ("device-64", &["--features", "device-64"]),
    ("device-ref", &["--features", "device-ref"]),
];

/// The default firmware build's variant (what `.text` is measured on).
pub const DEFAULT_VARIANT: &str = "device-4";

/// Figures over the budget today, as (`<variant> <binary> <kind> <name>`,
/// the most it may be): tolerated so that CI stays green while the core is worked
/// on, reported on every run, and a failure as soon as they grow. Remove
/// an entry when its figure is within the budget.
pub const KNOWN_OVER_BUDGET: &[(&str, u64)] = &[];

/// The example's directory, relative to the repository root.
pub const DIR: &str = "firmware";
/// The main example binary.
pub const MAIN_BIN: &str = "qcow2-firmware";
/// The read-only binary: loads `fw-create.qcow2` from the working
/// directory, so it runs after the main one.
pub const READONLY_BIN: &str = "readonly";
/// How long one QEMU run may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// One figure the firmware printed: `<kind> <name>: <bytes> B`, with kind
/// `future`, `poll`, `stack` or `ram`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figure {
    /// The device variant of the build (see [`VARIANTS`]).
    pub variant: &'static str,
    pub binary: &'static str,
    pub kind: String,
    pub name: String,
    pub bytes: u64,
}

impl Figure {
    fn key(&self) -> String {
        format!(
            "{} {} {} {}",
            self.variant, self.binary, self.kind, self.name
        )
    }
}

/// The figures of a run, each (variant, binary, kind, name) once with its
/// largest value, in the order first printed; and the binaries measured.
#[derive(Debug, Default)]
pub struct Figures {
    pub list: Vec<Figure>,
    /// Each variant's binaries, copied aside (`DIR/<variant>/`).
    pub binaries: Vec<(&'static str, Binaries)>,
}

impl Figures {
    fn add(&mut self, f: Figure) {
        match self.list.iter_mut().find(|g| g.key() == f.key()) {
            Some(g) => g.bytes = g.bytes.max(f.bytes),
            None => self.list.push(f),
        }
    }

    /// The figure `kind name` of `binary` in `variant`.
    pub fn get(&self, variant: &str, binary: &str, kind: &str, name: &str) -> Option<u64> {
        self.list
            .iter()
            .find(|f| {
                f.variant == variant && f.binary == binary && f.kind == kind && f.name == name
            })
            .map(|f| f.bytes)
    }

    /// The figures of `kind` from `binary` in `variant`.
    pub fn of<'a>(
        &'a self,
        variant: &'a str,
        binary: &'a str,
        kind: &'a str,
    ) -> impl Iterator<Item = &'a Figure> {
        self.list
            .iter()
            .filter(move |f| f.variant == variant && f.binary == binary && f.kind == kind)
    }
}

/// Parses `future create: 4288 B` into (kind, name, bytes).
fn parse_figure(line: &str) -> Option<(&str, &str, u64)> {
    let (kind, rest) = line.split_once(' ')?;
    if !matches!(kind, "future" | "poll" | "stack" | "ram") {
        return None;
    }
    let (name, value) = rest.rsplit_once(": ")?;
    let bytes = value.strip_suffix(" B")?.parse().ok()?;
    Some((kind, name, bytes))
}

/// `cargo xtask firmware --out DIR`.
pub fn main(args: &[String]) -> Result<(), String> {
    let out = match args {
        [flag, dir] if flag == "--out" => PathBuf::from(dir),
        _ => return Err("usage: cargo xtask firmware --out DIR".into()),
    };
    run_checked(&out).map(|_| ())
}

/// Builds and runs both binaries in `out`, prints their figures, checks the
/// budget and the images; returns the figures.
pub fn run_checked(out: &Path) -> Result<Figures, String> {
    let figures = run_collect(out)?;
    check_budget(&figures)?;
    check_images(out)?;
    Ok(figures)
}

/// Builds and runs both binaries of every variant in `out/<variant>`
/// (removing the images of earlier runs first), prints and returns their
/// figures.
pub fn run_collect(out: &Path) -> Result<Figures, String> {
    let mut figures = Figures::default();
    for &(variant, args) in VARIANTS {
        let dir = out.join(variant);
        let bins = build(args)?.copied_to(&dir)?;
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))? {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.extension().is_some_and(|e| e == "qcow2") {
                std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        for (binary, elf) in [(MAIN_BIN, &bins.main), (READONLY_BIN, &bins.readonly)] {
            let text = run_qemu(elf, &dir)?;
            let mut others = Vec::new();
            for line in text.lines() {
                match parse_figure(line) {
                    Some((kind, name, bytes)) => figures.add(Figure {
                        variant,
                        binary,
                        kind: kind.into(),
                        name: name.into(),
                        bytes,
                    }),
                    None => others.push(line),
                }
            }
            println!("{variant} {binary}:");
            for f in figures
                .list
                .iter()
                .filter(|f| f.variant == variant && f.binary == binary)
            {
                println!("  {} {}: {} B", f.kind, f.name, f.bytes);
            }
            for line in others {
                println!("  {line}");
            }
        }
        figures.binaries.push((variant, bins));
    }
    Ok(figures)
}

/// Formatting and clippy (`-D warnings`) for the firmware crate in every
/// variant, which the workspace-wide runs do not reach.
pub fn lint() -> Result<(), String> {
    lint_embedded(DIR, VARIANTS)
}

/// The firmware binaries of one build.
#[derive(Debug)]
pub struct Binaries {
    pub main: PathBuf,
    pub readonly: PathBuf,
}

impl Binaries {
    /// The binaries copied into `dir` (created when missing), so that the
    /// next build does not replace them.
    fn copied_to(&self, dir: &Path) -> Result<Binaries, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let copy = |elf: &Path| {
            let to = dir.join(elf.file_name().unwrap_or_default());
            std::fs::copy(elf, &to).map_err(|e| format!("{}: {e}", elf.display()))?;
            Ok::<_, String>(to)
        };
        Ok(Binaries {
            main: copy(&self.main)?,
            readonly: copy(&self.readonly)?,
        })
    }
}

/// Builds the firmware in release with `extra` cargo arguments (feature
/// selections), installing the target when missing.
pub fn build(extra: &[&str]) -> Result<Binaries, String> {
    ensure_target()?;
    let mut args = vec!["--bins"];
    args.extend_from_slice(extra);
    let dir = cargo_embedded("build", DIR, &args)?;
    Ok(Binaries {
        main: dir.join(MAIN_BIN),
        readonly: dir.join(READONLY_BIN),
    })
}

/// Runs `elf` under QEMU in `dir` and returns what it printed on stdout
/// (stderr passes through); fails on a non-zero exit or after [`TIMEOUT`].
pub fn run_qemu(elf: &Path, dir: &Path) -> Result<String, String> {
    let elf = elf
        .canonicalize()
        .map_err(|e| format!("{}: {e}", elf.display()))?;
    let args = [
        "-M",
        "mps2-an386",
        "-nographic",
        "-semihosting-config",
        "enable=on,target=native",
        "-kernel",
    ];
    eprintln!(
        "xtask: running qemu-system-arm {} {} (in {})",
        args.join(" "),
        elf.display(),
        dir.display()
    );
    let mut child = Command::new("qemu-system-arm")
        .args(args)
        .arg(&elf)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start qemu-system-arm: {e} (.ci/run installs it from bookworm-backports)"
            )
        })?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            let text = reader.join().unwrap_or_default();
            return Err(format!(
                "{} did not finish within {} s; killed. It printed:\n{text}",
                elf.display(),
                TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = reader.join().map_err(|_| "reading qemu's output failed")?;
    if status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{} failed under QEMU ({status}). It printed:\n{text}",
            elf.display()
        ))
    }
}

/// Compares the figures with the budget; fails naming each figure over it
/// (beyond [`KNOWN_OVER_BUDGET`]).
pub fn check_budget(figures: &Figures) -> Result<(), String> {
    let known: BTreeMap<&str, u64> = KNOWN_OVER_BUDGET.iter().copied().collect();
    let mut over = Vec::new();
    let mut tolerated = Vec::new();
    let mut judge = |f: &Figure, limit: u64, what: &str| {
        if f.bytes <= limit {
            return;
        }
        let line = format!(
            "{} {} {} {}: {} B > {limit} B ({what})",
            f.variant, f.binary, f.kind, f.name, f.bytes
        );
        match known.get(f.key().as_str()) {
            Some(&most) if f.bytes <= most => tolerated.push(line),
            _ => over.push(line),
        }
    };
    for f in &figures.list {
        match (f.kind.as_str(), f.name.as_str()) {
            // The example's own futures: the phases', and the app's (an
            // application's, in its `stack app` figure).
            ("future", "firmware" | "app") => {}
            ("future", _) => judge(f, MAX_FUTURE_BYTES, "MAX_FUTURE_BYTES"),
            ("poll", _) => judge(f, MAX_POLL_STACK_BYTES, "MAX_POLL_STACK_BYTES"),
            ("stack", "total" | "app") => judge(f, MAX_TOTAL_STACK_BYTES, "MAX_TOTAL_STACK_BYTES"),
            _ => {}
        }
    }
    for &(variant, _) in VARIANTS {
        if figures.get(variant, MAIN_BIN, "stack", "app").is_none() {
            over.push(format!("{variant} {MAIN_BIN}: no `stack app` figure"));
        }
    }
    for line in &tolerated {
        println!("over budget (known, KNOWN_OVER_BUDGET in xtask/src/firmware.rs): {line}");
    }
    for line in &over {
        println!("OVER BUDGET: {line}");
    }
    if over.is_empty() {
        println!(
            "firmware budget ({} device variants): futures <= {MAX_FUTURE_BYTES} B, poll stacks <= \
             {MAX_POLL_STACK_BYTES} B, total stack and app <= {MAX_TOTAL_STACK_BYTES} B: {}",
            VARIANTS.len(),
            if tolerated.is_empty() {
                "all within"
            } else {
                "within, but for the known figures above"
            }
        );
        Ok(())
    } else {
        Err(format!(
            "{} firmware figure(s) over budget (see xtask/src/firmware.rs)",
            over.len()
        ))
    }
}

/// Runs `qemu-img check` on every `*.qcow2` in each variant's directory
/// under `out`; fails if a variant wrote none or any check fails.
fn check_images(out: &Path) -> Result<(), String> {
    for (variant, _) in VARIANTS {
        check_images_in(&out.join(variant))?;
    }
    Ok(())
}

/// Runs `qemu-img check` on every `*.qcow2` in `dir`; fails if there is
/// none or any check fails.
fn check_images_in(dir: &Path) -> Result<(), String> {
    let mut images: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    images.sort();
    if images.is_empty() {
        return Err(format!("the firmware wrote no image in {}", dir.display()));
    }
    for image in images {
        let path = image.to_string_lossy();
        run("qemu-img", &["check", "-f", "qcow2", &path])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_parse() {
        assert_eq!(
            parse_figure("future create: 4288 B"),
            Some(("future", "create", 4288))
        );
        assert_eq!(
            parse_figure("ram scratch io: 4096 B"),
            Some(("ram", "scratch io", 4096))
        );
        assert_eq!(parse_figure("check: corruptions 0, leaks 0"), None);
        assert_eq!(parse_figure("stack total: 12 KiB"), None);
    }
}
