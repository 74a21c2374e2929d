//! Opening an image with its backing chain from files.
//!
//! An image names its backing file (and usually the backing's format) in
//! its header. A plain name is resolved relative to the directory of the
//! image naming it, as QEMU does; the format comes from the backing format
//! extension (`qcow2`, `raw`, or `file`: the file's bytes, as `raw`), or,
//! when absent, from probing the file (qcow2 magic, else raw). Backings
//! are opened read-only, the chain's depth is bounded and a chain that
//! comes back to a file it already holds is refused.
//!
//! Names with a protocol prefix are read as QEMU 10 reads them
//! ([`parse_backing_name`]): `file:NAME` is the file `NAME`, and
//! `json:{...}` a block node described in JSON (QEMU's dialect: single
//! quotes allowed, duplicate keys refused, dotted keys such as
//! `"file.filename"` nested): a `qcow2` or `raw` format node, or one
//! without `driver` whose format is probed, over a `file` child with a
//! `filename` (a `raw` node between them passes through), or a bare
//! `file` node, whose bytes back the image. `"backing": null` on a
//! format node leaves that image without its backing. Besides those,
//! `node-name`, `read-only` and `auto-read-only` are accepted and have no
//! effect (backings are read-only); any other key is refused, as are
//! other drivers and protocols. Both prefixes name files relative to the
//! working directory, as in QEMU. The format in the header, when there
//! is one, replaces the JSON's top `driver`, as in QEMU.
//!
//! Backing files must be regular files or block devices whose size can be
//! found (QEMU refuses directories, FIFOs and sockets, and files such as
//! `/proc/self/mem` whose end `lseek` cannot find; it also takes
//! character devices, which are refused here): [`open_checked`], also
//! used for external data files.
//!
//! Which files an image may make the library open is the caller's
//! decision ([`FilePolicy::allow`] in [`ChainOptions::policy`]): an image
//! from an untrusted source must not make the host open arbitrary paths.
//! [`ChainOptions::trusting`]
//! opens whatever the chain names, as `qemu-img` does.

use std::fmt;
use std::fs::FileType;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use qcow2_core::{Error, OpenOptions};

use crate::{FileDevice, FilePolicy, HostBacking, Image};

/// The deepest chain [`ChainOptions::trusting`] opens (the image itself
/// not counted).
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// How [`open_chain`] opens an image's backing files.
#[derive(Debug, Clone, Copy)]
pub struct ChainOptions<'a> {
    /// Which backing files may be opened (asked before each is touched),
    /// and how; also used for the external data files of backings.
    pub policy: FilePolicy<'a>,
    /// Backing files beyond this depth are refused.
    pub max_depth: usize,
}

impl ChainOptions<'static> {
    /// Opens every backing file the chain names, without locking
    /// ([`FilePolicy::trusting`]), up to [`DEFAULT_MAX_DEPTH`]: for images
    /// whose origin is trusted.
    pub fn trusting() -> Self {
        ChainOptions {
            policy: FilePolicy::trusting(),
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Why [`open_chain`] failed.
#[derive(Debug)]
pub enum ChainError {
    /// A file could not be opened.
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// An image in the chain could not be opened or read.
    Image {
        /// The image.
        path: PathBuf,
        /// Why.
        error: Error<io::Error>,
    },
    /// [`FilePolicy::allow`] refused a backing file.
    Refused {
        /// The backing file.
        path: PathBuf,
    },
    /// The chain comes back to a file it already holds.
    Loop {
        /// The backing file that closes the loop.
        path: PathBuf,
    },
    /// The chain is deeper than [`ChainOptions::max_depth`].
    TooDeep {
        /// The first backing file beyond the limit.
        path: PathBuf,
        /// The limit.
        max_depth: usize,
    },
    /// The backing format is not one this library reads.
    UnknownFormat {
        /// The backing file.
        path: PathBuf,
        /// The format the image names.
        format: String,
    },
    /// The backing file name cannot be used: an unknown protocol, a
    /// `json:` name that does not parse or asks for what is not
    /// supported ([`parse_backing_name`]).
    Name {
        /// The name, as the image holds it.
        name: String,
        /// Why, in QEMU's words where it has some.
        reason: String,
    },
    /// The external data file of a backing could not be attached.
    DataFile {
        /// The backing file.
        path: PathBuf,
        /// Why.
        error: crate::data_file::DataFileError,
    },
    /// The chain of the backing file at `path` could not be opened: its
    /// own backing (or one further down) failed with `error`.
    InBacking {
        /// The backing file whose chain failed.
        path: PathBuf,
        /// Why.
        error: Box<ChainError>,
    },
    /// The backing file is not a regular file or block device, or its
    /// size cannot be found.
    Unusable {
        /// The backing file.
        path: PathBuf,
        /// Why.
        why: UnusableFile,
    },
}

/// Why a file cannot be a backing file or an external data file.
#[derive(Debug)]
pub enum UnusableFile {
    /// A directory, FIFO or socket (QEMU's `file` driver refuses them).
    NotRegular,
    /// A character device (QEMU's `host_device` driver takes them; this
    /// library does not).
    CharDevice,
    /// `lseek` to its end fails (files such as `/proc/self/mem`).
    NoSize(io::Error),
}

impl UnusableFile {
    /// The message for `path`, in QEMU's words where it has some.
    pub fn message(&self, path: &Path) -> String {
        match self {
            UnusableFile::NotRegular => format!(
                "'file' driver requires '{}' to be a regular file",
                path.display()
            ),
            UnusableFile::CharDevice => format!(
                "'{}' is a character device, not a regular file or block device",
                path.display()
            ),
            UnusableFile::NoSize(e) => format!("Could not refresh total sector count: {e}"),
        }
    }
}

/// Why [`open_checked`] failed.
#[derive(Debug)]
pub enum OpenCheckedError {
    /// Opening failed.
    Open(io::Error),
    /// The file is not one an image may use.
    Unusable(UnusableFile),
}

/// Whether a file of `file_type` may be a backing or data file; checked
/// before the file is opened too, so that opening a FIFO cannot block.
fn usable_type(file_type: FileType) -> Result<(), UnusableFile> {
    if file_type.is_file() || file_type.is_block_device() {
        Ok(())
    } else if file_type.is_char_device() {
        Err(UnusableFile::CharDevice)
    } else {
        Err(UnusableFile::NotRegular)
    }
}

/// Opens a backing or data file through `open_file` as QEMU opens one: a
/// regular file or block device (symbolic links followed), whose end
/// `lseek` finds. FIFOs, sockets and character devices are refused before
/// they are opened; a directory is opened first, so that a writable open
/// fails as in QEMU (`Is a directory`), and refused after.
pub fn open_checked(
    path: &Path,
    writable: bool,
    open_file: &dyn Fn(&Path, bool) -> io::Result<FileDevice>,
) -> Result<FileDevice, OpenCheckedError> {
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_dir() {
            usable_type(meta.file_type()).map_err(OpenCheckedError::Unusable)?;
        }
    }
    let dev = open_file(path, writable).map_err(OpenCheckedError::Open)?;
    // Again on what was opened: the path may have changed in between.
    let meta = dev.file().metadata().map_err(OpenCheckedError::Open)?;
    usable_type(meta.file_type()).map_err(OpenCheckedError::Unusable)?;
    // As QEMU finds a file's size (the device reads positionally, so
    // moving the file position is harmless).
    let mut file = dev.file();
    file.seek(SeekFrom::End(0))
        .map_err(|e| OpenCheckedError::Unusable(UnusableFile::NoSize(e)))?;
    Ok(dev)
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::Open { path, error } => {
                write!(f, "Could not open '{}': {error}", path.display())
            }
            ChainError::Image { path, error } => write!(f, "'{}': {error}", path.display()),
            ChainError::Refused { path } => {
                write!(f, "backing file '{}' is not allowed", path.display())
            }
            ChainError::Loop { path } => write!(
                f,
                "Backing file '{}' creates an infinite loop.",
                path.display()
            ),
            ChainError::TooDeep { path, max_depth } => write!(
                f,
                "backing file '{}' is deeper than {max_depth} levels",
                path.display()
            ),
            // QEMU's words; the path is not part of them.
            ChainError::UnknownFormat { format, .. } => write!(f, "Unknown driver '{format}'"),
            ChainError::Name { reason, .. } => f.write_str(reason),
            ChainError::DataFile { error, .. } => write!(f, "{error}"),
            // As QEMU nests it, one level at a time.
            ChainError::InBacking { error, .. } => {
                write!(f, "Could not open backing file: {error}")
            }
            ChainError::Unusable { path, why } => f.write_str(&why.message(path)),
        }
    }
}

impl std::error::Error for ChainError {}

/// Where backing file `name`, named by the image at `image`, is: an
/// absolute name as it is, a relative one in the image's directory.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    crate::policy::resolve_named(image, name)
}

/// How a backing file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// Decided by probing the file: qcow2 with the qcow2 magic, else raw.
    Probe,
    /// The file's bytes (formats `raw` and `file`).
    Raw,
    /// A qcow2 image.
    Qcow2,
}

/// The file a backing file name denotes and how to read it
/// ([`parse_backing_name`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingTarget {
    /// The file to open.
    pub path: PathBuf,
    /// Its format.
    pub format: BackingFormat,
    /// Whether a qcow2 backing's own backing is opened (false for
    /// `"backing": null`).
    pub open_backing: bool,
}

/// The protocol prefix of `name` as QEMU finds one: the text before a
/// colon that comes before any slash.
fn protocol_of(name: &str) -> Option<&str> {
    let end = name.find([':', '/'])?;
    (name.as_bytes()[end] == b':').then(|| &name[..end])
}

/// The format a backing format name (header, or JSON `driver`) stands for.
fn format_named(name: &str) -> Option<BackingFormat> {
    match name {
        "qcow2" => Some(BackingFormat::Qcow2),
        "raw" | "file" => Some(BackingFormat::Raw),
        _ => None,
    }
}

/// Where the backing named `name` by the image at `image`, with the
/// backing format `format` from the image's header, is and how to read it,
/// as QEMU 10 decides (see the module documentation): plain names relative
/// to the image's directory, `file:` and `json:` names relative to the
/// working directory. Fails with [`ChainError::Name`] or
/// [`ChainError::UnknownFormat`]; opens nothing.
pub fn parse_backing_name(
    image: &Path,
    name: &str,
    format: Option<&str>,
) -> Result<BackingTarget, ChainError> {
    let name_error = |reason: String| ChainError::Name {
        name: name.to_string(),
        reason,
    };
    let header_format = |path: PathBuf| match format {
        None => Ok(BackingFormat::Probe),
        Some(f) => format_named(f).ok_or_else(|| ChainError::UnknownFormat {
            path,
            format: f.to_string(),
        }),
    };
    match protocol_of(name) {
        None => {
            let path = resolve_backing(image, name);
            let format = header_format(path.clone())?;
            Ok(BackingTarget {
                path,
                format,
                open_backing: true,
            })
        }
        Some("file") => {
            let file = &name["file:".len()..];
            if file.is_empty() {
                return Err(name_error(
                    "The 'file' block driver requires a file name".into(),
                ));
            }
            // As QEMU: a colon left in a relative name must not read as a
            // protocol again.
            let path = if file.contains(':') && !file.starts_with('/') {
                PathBuf::from(format!("./{file}"))
            } else {
                PathBuf::from(file)
            };
            let format = header_format(path.clone())?;
            Ok(BackingTarget {
                path,
                format,
                open_backing: true,
            })
        }
        Some("json") => {
            let text = &name["json:".len()..];
            let value = json::parse(text)
                .map_err(|e| name_error(format!("Could not parse the JSON options: {e}")))?;
            let json::Value::Object(members) = value else {
                return Err(name_error("Invalid JSON object given".into()));
            };
            // The header's format replaces the JSON's driver, as in QEMU.
            let node = node::interpret(members, format, 0).map_err(|e| match e {
                node::Error::Driver(driver) => ChainError::UnknownFormat {
                    path: PathBuf::from(name),
                    format: driver,
                },
                node::Error::Other(reason) => name_error(reason),
            })?;
            Ok(node.into_target())
        }
        Some(other) => Err(name_error(format!("Unknown protocol '{other}'"))),
    }
}

/// The block nodes of a `json:` backing name.
mod node {
    use super::json::Value;
    use super::{BackingFormat, BackingTarget};
    use std::path::PathBuf;

    /// Nodes nest no deeper than this (QEMU's common forms need three).
    const MAX_DEPTH: usize = 8;

    /// What a node reads.
    #[derive(Debug)]
    pub(super) enum Node {
        /// A file's bytes.
        Bytes(PathBuf),
        /// A file read as `format`, its own backing opened or not.
        Image(PathBuf, BackingFormat, bool),
    }

    impl Node {
        pub(super) fn into_target(self) -> BackingTarget {
            match self {
                Node::Bytes(path) => BackingTarget {
                    path,
                    format: BackingFormat::Raw,
                    open_backing: true,
                },
                Node::Image(path, format, open_backing) => BackingTarget {
                    path,
                    format,
                    open_backing,
                },
            }
        }
    }

    /// Why a node cannot be used.
    pub(super) enum Error {
        /// A driver this library does not have.
        Driver(String),
        /// Anything else, worded in full.
        Other(String),
    }

    impl From<String> for Error {
        fn from(s: String) -> Self {
            Error::Other(s)
        }
    }

    impl From<&str> for Error {
        fn from(s: &str) -> Self {
            Error::Other(s.to_string())
        }
    }

    /// Nests dotted keys (`"file.filename": x` is `"file": {"filename":
    /// x}`), merging them into an object of the same name.
    fn nest(members: Vec<(String, Value)>) -> Result<Vec<(String, Value)>, Error> {
        let mut out: Vec<(String, Value)> = Vec::new();
        let mut dotted: Vec<(String, String, Value)> = Vec::new();
        for (key, value) in members {
            match key.split_once('.') {
                Some((head, rest)) if !head.is_empty() && !rest.is_empty() => {
                    dotted.push((head.to_string(), rest.to_string(), value));
                }
                _ => out.push((key, value)),
            }
        }
        for (head, rest, value) in dotted {
            let at = match out.iter().position(|(k, _)| *k == head) {
                Some(at) => at,
                None => {
                    out.push((head.clone(), Value::Object(Vec::new())));
                    out.len() - 1
                }
            };
            let Value::Object(inner) = &mut out[at].1 else {
                return Err(format!("Option '{head}' is both a value and an object").into());
            };
            match inner.iter().find(|(k, _)| *k == rest) {
                Some((_, old)) if *old == value => {}
                Some(_) => {
                    return Err(format!("Option '{head}.{rest}' is given twice").into());
                }
                None => inner.push((rest, value)),
            }
        }
        Ok(out)
    }

    /// Options every node takes and that change nothing here: backings
    /// are read-only whatever `read-only` says.
    fn harmless(key: &str, value: &Value) -> Result<bool, Error> {
        match key {
            "node-name" => match value {
                Value::String(_) => Ok(true),
                other => Err(format!("Invalid node-name: '{}'", other.text()).into()),
            },
            "read-only" | "auto-read-only" => match value {
                Value::Bool(_) => Ok(true),
                Value::String(s) if s == "on" || s == "off" => Ok(true),
                _ => Err(format!("Parameter '{key}' expects 'on' or 'off'").into()),
            },
            _ => Ok(false),
        }
    }

    /// The node `members` describe; `driver` replaces its `driver` key
    /// (the header's backing format).
    pub(super) fn interpret(
        members: Vec<(String, Value)>,
        driver: Option<&str>,
        depth: usize,
    ) -> Result<Node, Error> {
        if depth > MAX_DEPTH {
            return Err("Block nodes nest too deeply".into());
        }
        let members = nest(members)?;
        let get = |key: &str| members.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let driver = match driver {
            Some(d) => Some(d.to_string()),
            None => match get("driver") {
                None => None,
                Some(Value::String(d)) => Some(d.clone()),
                Some(_) => return Err("Must specify either driver or file".into()),
            },
        };
        let format = match driver.as_deref() {
            Some("file") => return file_node(&members),
            Some(format @ ("raw" | "qcow2")) => Some(format),
            Some(other) => return Err(Error::Driver(other.to_string())),
            None if get("file").is_none() => {
                return Err("Must specify either driver or file".into())
            }
            None => None,
        };
        if get("file").is_none() {
            return Err("A block device must be specified for \"file\"".into());
        }
        let shown = format.unwrap_or("probed");
        for (key, value) in &members {
            let known = matches!(key.as_str(), "driver" | "file" | "backing");
            if !known && !harmless(key, value)? {
                return Err(
                    format!("Block format '{shown}' does not support the option '{key}'").into(),
                );
            }
        }
        let open_backing = match get("backing") {
            None => true,
            // "" is QEMU's deprecated spelling of null.
            Some(Value::Null) => false,
            Some(Value::String(s)) if s.is_empty() => false,
            Some(_) => {
                return Err(
                    "A backing given by reference or by options is not supported \
                     (only \"backing\": null)"
                        .into(),
                )
            }
        };
        let child = match get("file") {
            Some(Value::String(r)) => {
                return Err(format!("Cannot find device='{r}' nor node-name='{r}'").into())
            }
            Some(Value::Object(child)) => {
                // A child with a file name and no driver is a file, as
                // QEMU makes it.
                let has = |key: &str| child.iter().any(|(k, _)| k == key);
                let implied = (!has("driver") && has("filename")).then_some("file");
                interpret(child.clone(), implied, depth + 1)?
            }
            _ => return Err("A block device must be specified for \"file\"".into()),
        };
        match (format, child) {
            // raw passes its child through.
            (Some("raw"), child) => Ok(child),
            (Some(_), Node::Bytes(path)) => {
                Ok(Node::Image(path, BackingFormat::Qcow2, open_backing))
            }
            (None, Node::Bytes(path)) => Ok(Node::Image(path, BackingFormat::Probe, open_backing)),
            (_, Node::Image(..)) => {
                Err("An image stored in another image's guest data is not supported".into())
            }
        }
    }

    /// A `file` protocol node: the bytes of the file it names.
    fn file_node(members: &[(String, Value)]) -> Result<Node, Error> {
        // The name first, as QEMU looks at it.
        let name = match members.iter().find(|(k, _)| k == "filename") {
            Some((_, Value::String(name))) if !name.is_empty() => name,
            _ => return Err("The 'file' block driver requires a file name".into()),
        };
        for (key, value) in members {
            if !matches!(key.as_str(), "driver" | "filename") && !harmless(key, value)? {
                return Err(
                    format!("Block protocol 'file' doesn't support the option '{key}'").into(),
                );
            }
        }
        Ok(Node::Bytes(PathBuf::from(name)))
    }
}

/// The JSON of `json:` names, as QEMU reads it: strings in double or
/// single quotes, duplicate keys refused, one value and only blanks
/// around it.
mod json {
    /// Arrays and objects nest no deeper than this.
    const MAX_DEPTH: usize = 64;

    /// A JSON value; objects keep their members in order.
    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Value {
        Null,
        Bool(bool),
        /// The number's text.
        Number(String),
        String(String),
        Array(Vec<Value>),
        Object(Vec<(String, Value)>),
    }

    impl Value {
        /// The value as text, for messages.
        pub(super) fn text(&self) -> String {
            match self {
                Value::Null => "null".into(),
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.clone(),
                Value::String(s) => s.clone(),
                Value::Array(_) => "[...]".into(),
                Value::Object(_) => "{...}".into(),
            }
        }
    }

    struct Parser<'a> {
        text: &'a str,
        pos: usize,
    }

    const PARSE: &str = "JSON parse error, ";

    /// Parses `text` as one JSON value; the error is worded as QEMU's.
    pub(super) fn parse(text: &str) -> Result<Value, String> {
        let mut p = Parser { text, pos: 0 };
        p.blanks();
        if p.pos == text.len() {
            return Err("Expecting a JSON value".into());
        }
        let value = p.value(0)?;
        p.blanks();
        if p.pos != text.len() {
            return Err("Expecting at most one JSON value".into());
        }
        Ok(value)
    }

    impl Parser<'_> {
        fn peek(&self) -> Option<u8> {
            self.text.as_bytes().get(self.pos).copied()
        }

        fn blanks(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.pos += 1;
            }
        }

        fn eoi<T>(&self) -> Result<T, String> {
            Err(format!("{PARSE}premature EOI"))
        }

        fn value(&mut self, depth: usize) -> Result<Value, String> {
            if depth > MAX_DEPTH {
                return Err(format!("{PARSE}nesting too deep"));
            }
            self.blanks();
            let Some(c) = self.peek() else {
                return self.eoi();
            };
            match c {
                b'{' => self.object(depth),
                b'[' => self.array(depth),
                b'"' | b'\'' => self.string().map(Value::String),
                b'-' | b'0'..=b'9' => Ok(self.number()),
                c if c.is_ascii_alphabetic() => self.keyword(),
                _ => Err(format!("{PARSE}expecting value")),
            }
        }

        fn keyword(&mut self) -> Result<Value, String> {
            let start = self.pos;
            while self.peek().is_some_and(|c| c.is_ascii_alphanumeric()) {
                self.pos += 1;
            }
            match &self.text[start..self.pos] {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                "null" => Ok(Value::Null),
                word => Err(format!("{PARSE}invalid keyword '{word}'")),
            }
        }

        fn number(&mut self) -> Value {
            let start = self.pos;
            while self.peek().is_some_and(|c| {
                c.is_ascii_digit() || matches!(c, b'-' | b'+' | b'.' | b'e' | b'E')
            }) {
                self.pos += 1;
            }
            Value::Number(self.text[start..self.pos].to_string())
        }

        fn hex4(&mut self) -> Result<u32, String> {
            let digits = self
                .text
                .get(self.pos..self.pos + 4)
                .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| format!("{PARSE}invalid escape sequence in string"))?;
            self.pos += 4;
            u32::from_str_radix(digits, 16)
                .map_err(|_| format!("{PARSE}invalid escape sequence in string"))
        }

        fn string(&mut self) -> Result<String, String> {
            let start = self.pos;
            let Some(quote) = self.peek() else {
                return self.eoi();
            };
            self.pos += 1;
            let mut out = String::new();
            loop {
                let rest = &self.text[self.pos..];
                let Some(c) = rest.chars().next() else {
                    return Err(format!("{PARSE}stray '{}'", &self.text[start..]));
                };
                self.pos += c.len_utf8();
                match c {
                    c if c as u32 == u32::from(quote) => return Ok(out),
                    '\\' => {
                        let Some(e) = self.peek() else {
                            return Err(format!("{PARSE}stray '{}'", &self.text[start..]));
                        };
                        self.pos += 1;
                        match e {
                            b'"' => out.push('"'),
                            b'\'' => out.push('\''),
                            b'\\' => out.push('\\'),
                            b'/' => out.push('/'),
                            b'b' => out.push('\u{8}'),
                            b'f' => out.push('\u{c}'),
                            b'n' => out.push('\n'),
                            b'r' => out.push('\r'),
                            b't' => out.push('\t'),
                            b'u' => {
                                let mut code = self.hex4()?;
                                if (0xd800..0xdc00).contains(&code)
                                    && self.text[self.pos..].starts_with("\\u")
                                {
                                    self.pos += 2;
                                    let low = self.hex4()?;
                                    if !(0xdc00..0xe000).contains(&low) {
                                        return Err(format!(
                                            "{PARSE}\\u{low:04x} is not a valid Unicode character"
                                        ));
                                    }
                                    code = 0x10000 + ((code - 0xd800) << 10) + (low - 0xdc00);
                                }
                                // NUL cannot be part of a file name.
                                match char::from_u32(code).filter(|&c| c != '\0') {
                                    Some(c) => out.push(c),
                                    None => {
                                        return Err(format!(
                                            "{PARSE}\\u{code:04x} is not a valid Unicode character"
                                        ))
                                    }
                                }
                            }
                            _ => return Err(format!("{PARSE}invalid escape sequence in string")),
                        }
                    }
                    c if (c as u32) < 0x20 => {
                        return Err(format!("{PARSE}invalid character in string"))
                    }
                    c => out.push(c),
                }
            }
        }

        fn array(&mut self, depth: usize) -> Result<Value, String> {
            self.pos += 1;
            let mut items = Vec::new();
            self.blanks();
            if self.peek() == Some(b']') {
                self.pos += 1;
                return Ok(Value::Array(items));
            }
            loop {
                self.blanks();
                if self.peek() == Some(b']') {
                    // After a comma.
                    return Err(format!("{PARSE}expecting value"));
                }
                items.push(self.value(depth + 1)?);
                self.blanks();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b']') => {
                        self.pos += 1;
                        return Ok(Value::Array(items));
                    }
                    Some(_) => return Err(format!("{PARSE}expected separator in list")),
                    None => return self.eoi(),
                }
            }
        }

        fn object(&mut self, depth: usize) -> Result<Value, String> {
            self.pos += 1;
            let mut members: Vec<(String, Value)> = Vec::new();
            self.blanks();
            if self.peek() == Some(b'}') {
                self.pos += 1;
                return Ok(Value::Object(members));
            }
            loop {
                self.blanks();
                let key = match self.peek() {
                    Some(b'"' | b'\'') => self.string()?,
                    // After a comma.
                    Some(b'}') => return Err(format!("{PARSE}expecting value")),
                    Some(_) => return Err(format!("{PARSE}key is not a string in object")),
                    None => return self.eoi(),
                };
                self.blanks();
                match self.peek() {
                    Some(b':') => self.pos += 1,
                    Some(_) => return Err(format!("{PARSE}missing : in object pair")),
                    None => return self.eoi(),
                }
                let value = self.value(depth + 1)?;
                if members.iter().any(|(k, _)| *k == key) {
                    return Err(format!("{PARSE}duplicate key"));
                }
                members.push((key, value));
                self.blanks();
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(b'}') => {
                        self.pos += 1;
                        return Ok(Value::Object(members));
                    }
                    Some(_) => return Err(format!("{PARSE}expected separator in dict")),
                    None => return self.eoi(),
                }
            }
        }
    }
}

/// The backing file name and format an open image names, as UTF-8 (lossy).
pub fn backing_of(
    image: &mut Image<FileDevice>,
) -> Result<Option<(String, Option<String>)>, Error<io::Error>> {
    let mut buf = vec![0u8; 1024];
    let inner = image.inner_mut();
    let Some(len) = crate::block_on(inner.backing_file_name(&mut buf))? else {
        return Ok(None);
    };
    let name = String::from_utf8_lossy(&buf[..len]).into_owned();
    let format = crate::block_on(inner.backing_format(&mut buf))?
        .map(|len| String::from_utf8_lossy(&buf[..len]).into_owned());
    Ok(Some((name, format)))
}

/// Whether the file starts with the qcow2 magic.
fn probe_qcow2(dev: &FileDevice) -> bool {
    let mut magic = [0u8; 4];
    use std::os::unix::fs::FileExt;
    dev.file().read_exact_at(&mut magic, 0).is_ok() && magic == qcow2_core::format::MAGIC
}

/// Opens the image at `path` with `options` and attaches its backing
/// chain as `chain` allows. With [`OpenOptions::no_backing`] the chain is
/// not opened.
pub fn open_chain(
    path: &Path,
    options: &OpenOptions,
    chain: &ChainOptions<'_>,
) -> Result<Image<FileDevice>, ChainError> {
    let dev =
        (chain.policy.open_file)(path, !options.read_only).map_err(|error| ChainError::Open {
            path: path.to_path_buf(),
            error,
        })?;
    let image = Image::open(dev, options).map_err(|error| ChainError::Image {
        path: path.to_path_buf(),
        error,
    })?;
    if options.no_backing {
        return Ok(image);
    }
    attach_chain(image, path, chain)
}

/// Attaches the backing chain `image` (opened from `path`) names, as
/// `chain` allows: for callers that open the image file themselves.
pub fn attach_chain(
    image: Image<FileDevice>,
    path: &Path,
    chain: &ChainOptions<'_>,
) -> Result<Image<FileDevice>, ChainError> {
    let mut seen = Vec::new();
    if let Ok(canonical) = path.canonicalize() {
        seen.push(canonical);
    }
    attach_backing(image, path, chain, 1, &mut seen)
}

/// Attaches the backing `image` (at `path`, at depth `depth - 1`) names.
fn attach_backing(
    mut image: Image<FileDevice>,
    path: &Path,
    chain: &ChainOptions<'_>,
    depth: usize,
    seen: &mut Vec<PathBuf>,
) -> Result<Image<FileDevice>, ChainError> {
    let image_error = |error| ChainError::Image {
        path: path.to_path_buf(),
        error,
    };
    let Some((name, format)) = backing_of(&mut image).map_err(image_error)? else {
        return Ok(image);
    };
    let target = parse_backing_name(path, &name, format.as_deref())?;
    let backing_path = target.path;
    if depth > chain.max_depth {
        return Err(ChainError::TooDeep {
            path: backing_path,
            max_depth: chain.max_depth,
        });
    }
    if !(chain.policy.allow)(&backing_path) {
        return Err(ChainError::Refused { path: backing_path });
    }
    let open_error = |error| ChainError::Open {
        path: backing_path.clone(),
        error,
    };
    let canonical = backing_path.canonicalize().map_err(open_error)?;
    if seen.contains(&canonical) {
        return Err(ChainError::Loop { path: backing_path });
    }
    seen.push(canonical);
    let dev = open_checked(&backing_path, false, chain.policy.open_file).map_err(|e| match e {
        OpenCheckedError::Open(error) => open_error(error),
        OpenCheckedError::Unusable(why) => ChainError::Unusable {
            path: backing_path.clone(),
            why,
        },
    })?;
    let qcow2 = match target.format {
        BackingFormat::Qcow2 => true,
        BackingFormat::Raw => false,
        BackingFormat::Probe => probe_qcow2(&dev),
    };
    let backing = if qcow2 {
        let mut backing_image =
            Image::open(dev, &OpenOptions::read_only()).map_err(|error| ChainError::Image {
                path: backing_path.clone(),
                error,
            })?;
        // A backing with an external data file reads through it.
        let data = crate::data_file::DataFileOptions {
            policy: chain.policy,
            ..crate::data_file::DataFileOptions::trusting()
        };
        crate::data_file::attach_data_file(&mut backing_image, &backing_path, &data).map_err(
            |error| ChainError::DataFile {
                path: backing_path.clone(),
                error,
            },
        )?;
        if target.open_backing {
            attach_backing(backing_image, &backing_path, chain, depth + 1, seen)
                .map_err(|error| ChainError::InBacking {
                    path: backing_path.clone(),
                    error: Box::new(error),
                })?
                .into_backing()
        } else {
            // "backing": null: what it would read from its backing reads
            // as zeros.
            backing_image.with_backing(HostBacking::None).into_backing()
        }
    } else {
        HostBacking::Raw(dev)
    };
    Ok(image.with_backing(backing))
}
