//! `info`: describe an image like `qemu-img info`.

use crate::create::full_backing_name;
use crate::disk::{probe, round_to_sector, Access, Disk, Format};
use crate::error::{core_error, io_error, CliResult, CoreError};
use crate::json::Json;
use crate::size::size_to_str;
use qcow2_core::format::incompatible;
use qcow2_core::Version;
use qcow2_std_shim::{block_on, FileDevice};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

/// Output styles of `info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Text for people.
    Human,
    /// JSON with `qemu-img info --output json`'s field names.
    Json,
}

/// Arguments of `info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_enum)]
    format: Option<Format>,
    /// Output style.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
    /// Open the image in shared mode: take no locks, so that an image
    /// another process is writing can be inspected (like `qemu-img info
    /// -U`; what is read may then be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image file.
    file: PathBuf,
}

/// The qcow2-specific part of the summary.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Qcow2Details {
    version: Version,
    compression_type: &'static str,
    lazy_refcounts: bool,
    refcount_bits: u32,
    corrupt: bool,
    extended_l2: bool,
    /// The data file extension's name, if any (shown even without the
    /// data file feature bit, as QEMU does).
    data_file: Option<String>,
    /// Whether the data file is raw, when there is a data file.
    data_file_raw: Option<bool>,
}

/// The backing file an image names.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BackingInfo {
    /// The name as stored.
    name: String,
    /// The name QEMU would open (relative to the image's directory).
    full: String,
    /// The backing format extension, if any.
    format: Option<String>,
}

/// Everything `info` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Summary {
    filename: String,
    format: Format,
    virtual_size: u64,
    /// Bytes allocated on the host (`st_blocks * 512`).
    actual_size: u64,
    /// Length of the image file, rounded up to a sector as QEMU does.
    file_length: u64,
    /// QEMU's protocol driver for the file: `file` or `host_device`.
    protocol: &'static str,
    cluster_size: Option<u64>,
    dirty: bool,
    backing: Option<BackingInfo>,
    qcow2: Option<Qcow2Details>,
}

/// Runs `info`.
pub fn run(args: &InfoArgs) -> CliResult<()> {
    let summary = summarize(args)?;
    match args.output {
        Output::Human => out!("{}", human(&summary)),
        Output::Json => outln!("{}", json(&summary).to_pretty()),
    }
    Ok(())
}

fn summarize(args: &InfoArgs) -> CliResult<Summary> {
    let filename = args.file.display().to_string();
    let format = match args.format {
        Some(f) => f,
        None => probe(&args.file)?,
    };
    let disk = Disk::open(&args.file, Some(format), Access::Metadata, args.force_share)
        .map_err(|e| e.img(&filename))?;
    let meta = std::fs::metadata(&args.file)
        .map_err(|e| io_error(&format!("Could not stat '{filename}'"), &e))?;
    let host_device = meta.file_type().is_block_device();
    // A block device's metadata says 0 bytes: its size is found at its end.
    let length = if host_device {
        std::fs::File::open(&args.file)
            .and_then(|f| FileDevice::length_of(&f))
            .map_err(|e| io_error(&format!("Could not stat '{filename}'"), &e))?
    } else {
        meta.len()
    };
    let mut summary = Summary {
        filename,
        format,
        virtual_size: disk.size(),
        actual_size: meta.blocks().saturating_mul(512),
        file_length: round_to_sector(length),
        protocol: if host_device { "host_device" } else { "file" },
        cluster_size: None,
        dirty: false,
        backing: None,
        qcow2: None,
    };
    if let Disk::Qcow2(mut image) = disk {
        let info = image.info();
        let features = image.inner_mut().header().incompatible_features;
        let names =
            |e: CoreError| core_error(&format!("Could not open '{}'", summary.filename), &e);
        let inner = image.inner_mut();
        // Names are read as bytes; shown as UTF-8 (invalid bytes replaced).
        let mut buf = vec![0u8; info.cluster_size as usize];
        let read = |n: Option<usize>, buf: &[u8]| {
            n.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        let name = block_on(inner.backing_file_name(&mut buf)).map_err(names)?;
        let name = read(name, &buf);
        let format = block_on(inner.backing_format(&mut buf)).map_err(names)?;
        let format = read(format, &buf);
        summary.backing = name.map(|name| BackingInfo {
            full: full_backing_name(&summary.filename, &name),
            name,
            format,
        });
        let data_file = block_on(inner.data_file_name(&mut buf)).map_err(names)?;
        let data_file = read(data_file, &buf);
        let data_file_raw = inner.has_data_file().then(|| inner.data_file_raw());
        summary.cluster_size = Some(info.cluster_size);
        summary.dirty = info.dirty;
        summary.qcow2 = Some(Qcow2Details {
            version: info.version,
            compression_type: match info.compression_type {
                0 => "zlib",
                1 => "zstd",
                _ => "unknown",
            },
            lazy_refcounts: info.lazy_refcounts,
            refcount_bits: info.refcount_bits,
            corrupt: info.corrupt,
            extended_l2: features & incompatible::EXTENDED_L2 != 0,
            data_file,
            data_file_raw,
        });
    }
    Ok(summary)
}

/// The human-readable text, modelled on `qemu-img info`.
fn human(s: &Summary) -> String {
    let mut out = format!(
        "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
        s.filename,
        s.format.name(),
        size_to_str(s.virtual_size),
        s.virtual_size,
        size_to_str(s.actual_size),
    );
    if let Some(cs) = s.cluster_size {
        out += &format!("cluster_size: {cs}\n");
    }
    if s.dirty {
        out += "cleanly shut down: no\n";
    }
    if let Some(b) = &s.backing {
        out += &format!("backing file: {}", b.name);
        if b.full != b.name {
            out += &format!(" (actual path: {})", b.full);
        }
        out += "\n";
        if let Some(format) = &b.format {
            out += &format!("backing file format: {format}\n");
        }
    }
    if let Some(q) = &s.qcow2 {
        out += "Format specific information:\n";
        out += &format!("    compat: {}\n", q.version.compat());
        out += &format!("    compression type: {}\n", q.compression_type);
        if q.version == Version::V3 {
            out += &format!("    lazy refcounts: {}\n", q.lazy_refcounts);
        }
        out += &format!("    refcount bits: {}\n", q.refcount_bits);
        if q.version == Version::V3 {
            if let Some(name) = &q.data_file {
                out += &format!("    data file: {name}\n");
            }
            if let Some(raw) = q.data_file_raw {
                out += &format!("    data file raw: {raw}\n");
            }
            out += &format!("    corrupt: {}\n", q.corrupt);
            out += &format!("    extended l2: {}\n", q.extended_l2);
        }
    }
    out += &format!(
        "Child node '/file':\n    filename: {}\n    protocol type: {}\n    \
         file length: {} ({} bytes)\n    disk size: {}\n",
        s.filename,
        s.protocol,
        size_to_str(s.file_length),
        s.file_length,
        size_to_str(s.actual_size),
    );
    out
}

/// The JSON document, with `qemu-img info --output json`'s field names and
/// order.
fn json(s: &Summary) -> Json {
    let file_node = Json::Object(vec![
        ("children", Json::Array(vec![])),
        ("virtual-size", Json::Number(s.file_length)),
        ("filename", Json::String(s.filename.clone())),
        ("format", Json::String(s.protocol.into())),
        ("actual-size", Json::Number(s.actual_size)),
        (
            "format-specific",
            Json::Object(vec![
                ("type", Json::String("file".into())),
                ("data", Json::Object(vec![])),
            ]),
        ),
        ("dirty-flag", Json::Bool(false)),
    ]);
    let mut top = vec![(
        "children",
        Json::Array(vec![Json::Object(vec![
            ("name", Json::String("file".into())),
            ("info", file_node),
        ])]),
    )];
    if let Some(format) = s.backing.as_ref().and_then(|b| b.format.as_ref()) {
        top.push(("backing-filename-format", Json::String(format.clone())));
    }
    top.extend([
        ("virtual-size", Json::Number(s.virtual_size)),
        ("filename", Json::String(s.filename.clone())),
    ]);
    if let Some(cs) = s.cluster_size {
        top.push(("cluster-size", Json::Number(cs)));
    }
    top.push(("format", Json::String(s.format.name().into())));
    top.push(("actual-size", Json::Number(s.actual_size)));
    if let Some(q) = &s.qcow2 {
        let mut data = vec![
            ("compat", Json::String(q.version.compat().into())),
            ("compression-type", Json::String(q.compression_type.into())),
        ];
        if q.version == Version::V3 {
            data.push(("lazy-refcounts", Json::Bool(q.lazy_refcounts)));
        }
        data.push(("refcount-bits", Json::Number(u64::from(q.refcount_bits))));
        if q.version == Version::V3 {
            if let Some(name) = &q.data_file {
                data.push(("data-file", Json::String(name.clone())));
            }
            if let Some(raw) = q.data_file_raw {
                data.push(("data-file-raw", Json::Bool(raw)));
            }
            data.push(("corrupt", Json::Bool(q.corrupt)));
            data.push(("extended-l2", Json::Bool(q.extended_l2)));
        }
        top.push((
            "format-specific",
            Json::Object(vec![
                ("type", Json::String("qcow2".into())),
                ("data", Json::Object(data)),
            ]),
        ));
    }
    if let Some(b) = &s.backing {
        top.push(("full-backing-filename", Json::String(b.full.clone())));
        top.push(("backing-filename", Json::String(b.name.clone())));
    }
    top.push(("dirty-flag", Json::Bool(s.dirty)));
    Json::Object(top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Summary {
        Summary {
            filename: "a.qcow2".into(),
            format: Format::Qcow2,
            virtual_size: 10 << 20,
            actual_size: 200704,
            file_length: 197120,
            protocol: "file",
            cluster_size: Some(65536),
            dirty: false,
            backing: None,
            qcow2: Some(Qcow2Details {
                version: Version::V3,
                compression_type: "zlib",
                lazy_refcounts: false,
                refcount_bits: 16,
                corrupt: false,
                extended_l2: false,
                data_file: None,
                data_file_raw: None,
            }),
        }
    }

    #[test]
    fn human_matches_qemu_img() {
        let expected = "image: a.qcow2
file format: qcow2
virtual size: 10 MiB (10485760 bytes)
disk size: 196 KiB
cluster_size: 65536
Format specific information:
    compat: 1.1
    compression type: zlib
    lazy refcounts: false
    refcount bits: 16
    corrupt: false
    extended l2: false
Child node '/file':
    filename: a.qcow2
    protocol type: file
    file length: 192 KiB (197120 bytes)
    disk size: 196 KiB
";
        assert_eq!(human(&sample()), expected);
    }

    #[test]
    fn backing_and_data_file_lines_match_qemu_img() {
        let mut s = sample();
        s.filename = "sub/a.qcow2".into();
        s.backing = Some(BackingInfo {
            name: "b.raw".into(),
            full: "sub/b.raw".into(),
            format: Some("raw".into()),
        });
        if let Some(q) = &mut s.qcow2 {
            q.data_file = Some("d.raw".into());
            q.data_file_raw = Some(true);
        }
        let text = human(&s);
        assert!(text.contains(
            "cluster_size: 65536\nbacking file: b.raw (actual path: sub/b.raw)\n\
             backing file format: raw\nFormat specific information:\n"
        ));
        assert!(text.contains(
            "    refcount bits: 16\n    data file: d.raw\n    data file raw: true\n    corrupt:"
        ));
        let v: serde_json::Value = serde_json::from_str(&json(&s).to_pretty()).unwrap();
        assert_eq!(v["backing-filename"], "b.raw");
        assert_eq!(v["full-backing-filename"], "sub/b.raw");
        assert_eq!(v["backing-filename-format"], "raw");
        assert_eq!(v["format-specific"]["data"]["data-file"], "d.raw");
        assert_eq!(v["format-specific"]["data"]["data-file-raw"], true);
        // Same name: no actual path.
        if let Some(b) = &mut s.backing {
            b.full = b.name.clone();
        }
        assert!(human(&s).contains("backing file: b.raw\n"));
    }

    #[test]
    fn json_has_qemu_fields() {
        let v: serde_json::Value = serde_json::from_str(&json(&sample()).to_pretty()).unwrap();
        assert_eq!(v["virtual-size"], 10 << 20);
        assert_eq!(v["cluster-size"], 65536);
        assert_eq!(v["format-specific"]["data"]["refcount-bits"], 16);
        assert_eq!(v["children"][0]["info"]["virtual-size"], 197120);
    }
}
