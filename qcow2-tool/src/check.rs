//! `check`: verify (and optionally repair) an image like `qemu-img check`.
//!
//! Exit codes as qemu-img's: 0 consistent, 1 the check itself failed,
//! 2 corruptions remain, 3 only leaks remain.

use crate::disk::{open_qcow2_file, Access};
use crate::error::{core_error, CliResult};
use crate::json::Json;
use qcow2_core::format::MAGIC;
use qcow2_core::{CheckReport, Error, Finding, OpenOptions, Repair};
use qcow2_std_shim::Image;
use std::path::PathBuf;

/// Output styles of `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Text for people.
    Human,
    /// JSON with `qemu-img check --output json`'s field names.
    Json,
}

/// What `-r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairArg {
    /// Leaked clusters only.
    Leaks,
    /// Everything: leaks, refcounts, invalid entries, COPIED flags.
    All,
}

/// Arguments of `check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Image format; only qcow2 can be checked.
    #[arg(short = 'f', value_parser = ["qcow2"])]
    format: Option<String>,
    /// Repair what the check finds.
    #[arg(short = 'r', value_enum)]
    repair: Option<RepairArg>,
    /// Output style.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Print nothing (human output only).
    #[arg(short = 'q')]
    quiet: bool,
    /// Open the image in shared mode: let other processes write it during
    /// the check (like `qemu-img check -U`; not with `-r`).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    file: PathBuf,
}

/// Exit status for a final report, as qemu-img computes it.
fn status(report: &CheckReport) -> u8 {
    if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    }
}

/// Runs `check`; returns the exit status.
pub fn run(args: &CheckArgs) -> CliResult<u8> {
    let shown = args.file.display().to_string();
    let writable = args.repair.is_some();
    let access = if writable {
        Access::Write
    } else {
        Access::Read
    };
    let dev = open_qcow2_file(&args.file, access, args.force_share).map_err(|e| e.img(&shown))?;
    let options = if writable {
        OpenOptions::repair()
    } else {
        OpenOptions::read_only()
    };
    let mut image = Image::open(dev, &options).map_err(|e| match e {
        Error::NotQcow2 => format!(
            "This image format does not support checks ('{shown}' is not qcow2: no {MAGIC:?} magic)"
        )
        .into(),
        e => core_error(&format!("Could not open '{shown}'"), &e),
    })?;
    let failed = |e| core_error(&format!("Check of '{shown}' failed"), &e);
    let fixed = match args.repair {
        Some(mode) => {
            let mode = match mode {
                RepairArg::Leaks => Repair::Leaks,
                RepairArg::All => Repair::All,
            };
            let mut found = Vec::new();
            let repaired = image.repair_with(mode, &mut |f| found.push(f));
            print_findings(&found);
            Some(repaired.map_err(failed)?)
        }
        None => None,
    };
    let mut found = Vec::new();
    let report = image.check_with(&mut |f| found.push(f));
    print_findings(&found);
    let report = report.map_err(failed)?;
    image
        .close()
        .map_err(|e| core_error(&format!("Could not close '{shown}'"), &e))?;
    let (leaks_fixed, corruptions_fixed) =
        fixed.map_or((0, 0), |f| (f.leaks_fixed, f.corruptions_fixed));
    match args.output {
        Output::Json => outln!(
            "{}",
            json(&report, leaks_fixed, corruptions_fixed, &shown).to_pretty()
        ),
        Output::Human if !args.quiet => human(&report, leaks_fixed, corruptions_fixed),
        Output::Human => {}
    }
    Ok(status(&report))
}

/// Prints the per-problem lines `qemu-img check` prints on stderr, in its
/// order: refcounts cluster by cluster (as found, then as a repair fixes
/// them), the rebuild, then COPIED flags.
fn print_findings(found: &[Finding]) {
    let copied = |f: &&Finding| {
        matches!(
            f,
            Finding::CopiedL2Table { .. } | Finding::CopiedData { .. }
        )
    };
    let prefix = |repaired: bool, otherwise: &'static str| {
        if repaired {
            "Repairing"
        } else {
            otherwise
        }
    };
    for f in found
        .iter()
        .filter(|f| !copied(f))
        .chain(found.iter().filter(copied))
    {
        match *f {
            Finding::Leak {
                cluster,
                refcount,
                references,
                repaired,
            } => errln!(
                "{} cluster {cluster} refcount={refcount} reference={references}",
                prefix(repaired, "Leaked")
            ),
            Finding::Refcount {
                cluster,
                refcount,
                references,
                repaired,
            } => errln!(
                "{} cluster {cluster} refcount={refcount} reference={references}",
                prefix(repaired, "ERROR")
            ),
            Finding::Rebuilding => errln!("Rebuilding refcount structure"),
            Finding::CopiedL2Table {
                l1_index,
                l1_entry,
                refcount,
                repaired,
            } => errln!(
                "{} OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x} refcount={refcount}",
                prefix(repaired, "ERROR")
            ),
            Finding::CopiedData {
                l2_entry,
                refcount,
                repaired,
            } => errln!(
                "{} OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}",
                prefix(repaired, "ERROR")
            ),
            _ => {}
        }
    }
}

fn json(r: &CheckReport, leaks_fixed: u64, corruptions_fixed: u64, file: &str) -> Json {
    let mut fields = vec![
        ("image-end-offset", Json::Number(r.image_end_offset)),
        ("total-clusters", Json::Number(r.total_clusters)),
    ];
    let optional = [
        ("corruptions", r.corruptions),
        ("check-errors", 0),
        ("leaks", r.leaks),
        ("leaks-fixed", leaks_fixed),
        ("corruptions-fixed", corruptions_fixed),
        ("allocated-clusters", r.allocated_clusters),
        ("fragmented-clusters", r.fragmented_clusters),
        ("compressed-clusters", r.compressed_clusters),
    ];
    for (name, value) in optional {
        // qemu-img always prints check-errors and omits other zero counts.
        if value != 0 || name == "check-errors" {
            fields.push((name, Json::Number(value)));
        }
    }
    fields.push(("filename", Json::String(file.to_string())));
    fields.push(("format", Json::String("qcow2".into())));
    Json::Object(fields)
}

fn human(r: &CheckReport, leaks_fixed: u64, corruptions_fixed: u64) {
    if leaks_fixed + corruptions_fixed > 0 {
        outln!("The following inconsistencies were found and repaired:\n");
        outln!("    {leaks_fixed} leaked clusters");
        outln!("    {corruptions_fixed} corruptions\n");
        outln!("Double checking the fixed image now...");
    }
    if r.corruptions == 0 && r.leaks == 0 {
        outln!("No errors were found on the image.");
    }
    if r.corruptions > 0 {
        outln!(
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.",
            r.corruptions
        );
    }
    if r.leaks > 0 {
        outln!(
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
            r.leaks
        );
    }
    // As qemu-img: no line for an image without allocated clusters.
    if r.total_clusters > 0 && r.allocated_clusters > 0 {
        let pct = |n: u64| n as f64 * 100.0 / r.total_clusters as f64;
        let of_allocated = |n: u64| {
            if r.allocated_clusters == 0 {
                0.0
            } else {
                n as f64 * 100.0 / r.allocated_clusters as f64
            }
        };
        outln!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters),
            of_allocated(r.fragmented_clusters),
            of_allocated(r.compressed_clusters)
        );
    }
    outln!("Image end offset: {}", r.image_end_offset);
}
