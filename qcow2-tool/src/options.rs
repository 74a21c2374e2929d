//! `-o key=value,...` image creation options, as `qemu-img` takes them.

use crate::error::{CliError, CliResult};
use crate::size::parse_size;
use qcow2_core::format::header::ExternalFiles;
use qcow2_core::{Compression, CreateOptions, Version};

/// The options `qcow2-tool` understands, for `-o help`.
pub const HELP: &str = "\
Supported qcow2 options:
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  extended_l2=<bool (on/off)> - Extended L2 tables (off only)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (off only)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size";

/// `-o help` of `create`: [`HELP`] with the keys naming other files.
pub const CREATE_HELP: &str = "\
Supported qcow2 options:
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  cluster_size=<size>    - qcow2 cluster size
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  compression_type=<str> - Compression method used for image cluster compression
  data_file=<str>        - File name of an external data file
  data_file_raw=<bool (on/off)> - The external data file must stay valid as a raw image
  extended_l2=<bool (on/off)> - Extended L2 tables (off only)
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  preallocation=<str>    - Preallocation mode (off only)
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size";

/// Parsed `-o` options. Absent keys keep `qemu-img create`'s defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageOptions {
    /// `-o help` was asked for.
    pub help: bool,
    /// `size=`, in bytes.
    pub size: Option<u64>,
    /// `cluster_size=`, in bytes.
    pub cluster_size: u64,
    /// `refcount_bits=`.
    pub refcount_bits: u64,
    /// `lazy_refcounts=`, with the text given.
    pub lazy_refcounts: Option<(bool, String)>,
    /// `compat=`, with the text given.
    pub compat: Option<(Version, String)>,
    /// `backing_file=` (or `-b`): stored as given.
    pub backing_file: Option<String>,
    /// `backing_fmt=` (or `-F`).
    pub backing_fmt: Option<String>,
    /// `data_file=`: stored as given, created relative to the current
    /// directory (as QEMU does).
    pub data_file: Option<String>,
    /// `data_file_raw=`, with the text given.
    pub data_file_raw: Option<(bool, String)>,
    /// `compression_type=`, as given (`zlib` or `zstd`; checked by
    /// [`ImageOptions::to_create`], after the `Formatting` line as QEMU
    /// does).
    pub compression_type: Option<String>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            help: false,
            size: None,
            cluster_size: 65536,
            refcount_bits: 16,
            lazy_refcounts: None,
            compat: None,
            backing_file: None,
            backing_fmt: None,
            data_file: None,
            data_file_raw: None,
            compression_type: None,
        }
    }
}

/// Splits an option list at commas; `,,` stands for a literal comma.
fn split_list(list: &str) -> CliResult<Vec<String>> {
    let invalid = || CliError(format!("Invalid option list: {list}"));
    let mut items = vec![String::new()];
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                items.last_mut().ok_or_else(invalid)?.push(',');
            }
            ',' => items.push(String::new()),
            c => items.last_mut().ok_or_else(invalid)?.push(c),
        }
    }
    if items.iter().any(String::is_empty) {
        return Err(invalid());
    }
    Ok(items)
}

/// A boolean option value as QEMU spells them.
fn parse_bool(key: &str, value: &str) -> CliResult<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'").into()),
    }
}

/// An unsigned number in C notation: decimal, `0x` hex or `0` octal.
fn parse_number(key: &str, value: &str) -> CliResult<u64> {
    let err = || CliError(format!("Parameter '{key}' expects a number"));
    let (digits, radix) = if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        (hex, 16)
    } else if value.len() > 1 && value.starts_with('0') {
        (&value[1..], 8)
    } else {
        (value, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(err());
    }
    u64::from_str_radix(digits, radix).map_err(|_| err())
}

/// Parses the `-o` arguments (later keys override earlier ones).
/// `allowed` names the keys the caller accepts; others are rejected as
/// `qemu-img` rejects unknown parameters.
pub fn parse(lists: &[String], allowed: &[&str]) -> CliResult<ImageOptions> {
    let mut opts = ImageOptions::default();
    for list in lists {
        for item in split_list(list)? {
            if item == "help" || item == "?" {
                opts.help = true;
                continue;
            }
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item.as_str(), None),
            };
            if !allowed.contains(&key) {
                return Err(format!("Invalid parameter '{key}'").into());
            }
            let text = value.unwrap_or("");
            let size = |what: &str| {
                parse_size(text).map_err(|_| {
                    CliError(format!(
                        "Parameter '{what}' expects a non-negative number below 2^64 \
                         (optional suffix k, M, G, T, P or E)"
                    ))
                })
            };
            match key {
                "size" => {
                    if opts.size.is_some() {
                        return Err("The image size must be specified only once".into());
                    }
                    opts.size = Some(size(key)?);
                }
                "cluster_size" => opts.cluster_size = size(key)?,
                "refcount_bits" => opts.refcount_bits = parse_number(key, text)?,
                "lazy_refcounts" => {
                    let on = value.map_or(Ok(true), |v| parse_bool(key, v))?;
                    opts.lazy_refcounts = Some((on, value.unwrap_or("on").to_string()));
                }
                "data_file_raw" => {
                    let on = value.map_or(Ok(true), |v| parse_bool(key, v))?;
                    opts.data_file_raw = Some((on, value.unwrap_or("on").to_string()));
                }
                "backing_file" => opts.backing_file = Some(text.to_string()),
                "backing_fmt" => opts.backing_fmt = Some(text.to_string()),
                "data_file" => opts.data_file = Some(text.to_string()),
                "compat" => {
                    let version = match text {
                        "0.10" | "v2" => Version::V2,
                        "1.1" | "v3" => Version::V3,
                        _ => {
                            return Err(format!(
                                "Parameter 'compat' does not accept value '{text}'"
                            )
                            .into())
                        }
                    };
                    opts.compat = Some((version, text.to_string()));
                }
                "compression_type" => {
                    // A bare key is QEMU's "on".
                    opts.compression_type = Some(value.unwrap_or("on").to_string());
                }
                "extended_l2" | "preallocation" => {
                    let off = if key == "preallocation" {
                        text == "off"
                    } else {
                        !parse_bool(key, value.unwrap_or("on"))?
                    };
                    if !off {
                        return Err(format!("{key}={text} is not supported").into());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(opts)
}

impl ImageOptions {
    /// The format version asked for (v3 unless `compat` says otherwise).
    pub fn version(&self) -> Version {
        self.compat.as_ref().map_or(Version::V3, |(v, _)| *v)
    }

    /// Whether lazy refcounts were asked for.
    pub fn lazy(&self) -> bool {
        self.lazy_refcounts.as_ref().is_some_and(|(on, _)| *on)
    }

    /// Whether `data_file_raw` was asked for.
    pub fn data_file_raw(&self) -> bool {
        self.data_file_raw.as_ref().is_some_and(|(on, _)| *on)
    }

    /// The files the new image names, for the core.
    pub fn files(&self) -> ExternalFiles<'_> {
        ExternalFiles {
            backing_file: self.backing_file.as_deref().map(str::as_bytes),
            backing_format: self.backing_fmt.as_deref(),
            data_file: self.data_file.as_deref().map(str::as_bytes),
            data_file_raw: self.data_file_raw(),
        }
    }

    /// Checks the options, in the order and with the messages of QEMU
    /// 10's qcow2 driver, and turns them into core create options for a
    /// disk of `size` bytes (a multiple of 512).
    pub fn to_create(&self, size: u64) -> CliResult<CreateOptions> {
        let compression = self.compression()?;
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err("Cluster size must be a power of two between 512 and 2048k".into());
        }
        if self.backing_fmt.is_some() && self.backing_file.is_none() {
            return Err("Backing format cannot be used without backing file".into());
        }
        let version = self.version();
        if version == Version::V2 && self.lazy() {
            return Err(
                "Lazy refcounts only supported with compatibility level 1.1 \
                        and above (use version=v3 or greater)"
                    .into(),
            );
        }
        let bits = self.refcount_bits;
        if !bits.is_power_of_two() || bits > 64 {
            return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
        }
        if version == Version::V2 && bits != 16 {
            return Err(
                "Different refcount widths than 16 bits require compatibility \
                        level 1.1 or above (use version=v3 or greater)"
                    .into(),
            );
        }
        if self.data_file_raw() && self.data_file.is_none() {
            return Err("data-file-raw requires data-file".into());
        }
        if self.data_file_raw() && self.backing_file.is_some() {
            return Err("Backing file and data-file-raw cannot be used at the same time".into());
        }
        if self.data_file.is_some() && version == Version::V2 {
            return Err(
                "External data files are only supported with compatibility level 1.1 \
                 and above (use version=v3 or greater)"
                    .into(),
            );
        }
        if version == Version::V2 && compression != Compression::Zlib {
            return Err(
                "Non-zlib compression type is only supported with compatibility \
                        level 1.1 and above (use version=v3 or greater)"
                    .into(),
            );
        }
        Ok(CreateOptions {
            size,
            cluster_bits: cs.trailing_zeros(),
            refcount_order: bits.trailing_zeros(),
            version,
            lazy_refcounts: self.lazy(),
            compression,
        })
    }

    /// The compression format asked for (zlib unless `compression_type`
    /// names another), with QEMU's error for a name it does not know.
    pub fn compression(&self) -> CliResult<Compression> {
        match self.compression_type.as_deref() {
            None | Some("zlib") => Ok(Compression::Zlib),
            Some("zstd") => Ok(Compression::Zstd),
            Some(other) => {
                Err(format!("Parameter 'compression-type' does not accept value '{other}'").into())
            }
        }
    }

    /// The option part of `qemu-img create`'s `Formatting` line.
    pub fn describe(&self, size: u64) -> String {
        let compat = self
            .compat
            .as_ref()
            .map(|(_, text)| format!(" compat={text}"))
            .unwrap_or_default();
        let lazy = self
            .lazy_refcounts
            .as_ref()
            .map_or("off", |(_, text)| text.as_str());
        let mut files = String::new();
        for (key, value) in [
            ("backing_file", self.backing_file.as_deref()),
            ("backing_fmt", self.backing_fmt.as_deref()),
            ("data_file", self.data_file.as_deref()),
            (
                "data_file_raw",
                self.data_file_raw.as_ref().map(|(_, text)| text.as_str()),
            ),
        ] {
            if let Some(value) = value {
                // As QEMU prints option values: a comma doubled.
                files += &format!(" {key}={}", value.replace(',', ",,"));
            }
        }
        format!(
            "cluster_size={} extended_l2=off compression_type={} size={size}{compat}{files} \
             lazy_refcounts={lazy} refcount_bits={}",
            self.cluster_size,
            self.compression_type.as_deref().unwrap_or("zlib"),
            self.refcount_bits
        )
    }
}

/// Keys `create` accepts for qcow2 images beyond [`QCOW2_KEYS`]: the
/// files the image names.
pub const FILE_KEYS: &[&str] = &["backing_file", "backing_fmt", "data_file", "data_file_raw"];

/// Format drivers QEMU 10 knows (`qemu-img --help`): the values
/// `backing_fmt` accepts.
pub const QEMU_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Keys `create` and `convert` accept for qcow2 targets.
pub const QCOW2_KEYS: &[&str] = &[
    "cluster_size",
    "refcount_bits",
    "lazy_refcounts",
    "compat",
    "compression_type",
    "extended_l2",
    "preallocation",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one(s: &str) -> CliResult<ImageOptions> {
        parse(&[s.to_string()], QCOW2_KEYS)
    }

    #[test]
    fn parses_lists() {
        let o = parse_one("cluster_size=4k,refcount_bits=8,lazy_refcounts=on,compat=1.1").unwrap();
        assert_eq!(o.cluster_size, 4096);
        assert_eq!(o.refcount_bits, 8);
        assert!(o.lazy());
        assert_eq!(o.version(), Version::V3);
        let c = o.to_create(1 << 20).unwrap();
        assert_eq!((c.cluster_bits, c.refcount_order), (12, 3));
        assert_eq!(parse_one("refcount_bits=0x10").unwrap().refcount_bits, 16);
        assert_eq!(parse_one("compat=v2").unwrap().version(), Version::V2);
        assert!(parse_one("lazy_refcounts").unwrap().lazy());
        let zstd = parse_one("compression_type=zstd").unwrap();
        assert_eq!(zstd.to_create(512).unwrap().compression, Compression::Zstd);
        assert!(zstd
            .describe(512)
            .contains(" compression_type=zstd size=512 "));
        let zlib = parse_one("compression_type=zlib").unwrap().to_create(512);
        assert_eq!(zlib.unwrap().compression, Compression::Zlib);
        assert_eq!(
            parse_one("compression_type=lz4").unwrap().to_create(512),
            Err("Parameter 'compression-type' does not accept value 'lz4'".into())
        );
    }

    #[test]
    fn parses_file_keys() {
        let keys: Vec<&str> = QCOW2_KEYS.iter().chain(FILE_KEYS).copied().collect();
        let o = parse(
            &["backing_file=b.img,backing_fmt=raw,data_file=d,,x,data_file_raw".to_string()],
            &keys,
        )
        .unwrap();
        assert_eq!(o.backing_file.as_deref(), Some("b.img"));
        assert_eq!(o.backing_fmt.as_deref(), Some("raw"));
        assert_eq!(o.data_file.as_deref(), Some("d,x"));
        assert!(o.data_file_raw());
        // Commas doubled, as qemu-img prints them.
        assert_eq!(
            o.describe(1024),
            "cluster_size=65536 extended_l2=off compression_type=zlib size=1024 \
             backing_file=b.img backing_fmt=raw data_file=d,,x data_file_raw=on \
             lazy_refcounts=off refcount_bits=16"
        );
        // Accepted by the parser, refused as QEMU's qcow2 driver does.
        assert_eq!(
            o.to_create(1024),
            Err("Backing file and data-file-raw cannot be used at the same time".into())
        );
        let files = o.files();
        assert_eq!(files.backing_file, Some(&b"b.img"[..]));
        assert!(files.data_file_raw);
        // `convert` does not take them.
        assert!(parse_one("backing_file=x").is_err());
    }

    #[test]
    fn rejects_bad_values() {
        for bad in [
            "foo=1",
            "cluster_size=abc",
            "refcount_bits=16k",
            "lazy_refcounts=maybe",
            "compat=2",
            ",cluster_size=4k",
            "cluster_size=4k,",
            "extended_l2=on",
            "size=1M",
        ] {
            assert!(parse_one(bad).is_err(), "{bad}");
        }
        for bad in [
            "cluster_size=1000",
            "cluster_size=256",
            "cluster_size=4M",
            "refcount_bits=3",
            "refcount_bits=0",
            "refcount_bits=128",
            "compat=0.10,refcount_bits=8",
            "compat=0.10,lazy_refcounts=on",
            "compat=0.10,compression_type=zstd",
            "compression_type=lz4",
            "compression_type=ZSTD",
            "compression_type",
        ] {
            assert!(parse_one(bad).unwrap().to_create(1 << 20).is_err(), "{bad}");
        }
    }
}
