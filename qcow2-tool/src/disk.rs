//! Raw files and qcow2 images behind one byte-addressed interface.

use crate::error::{
    core_error, core_message, io_error, io_message, CliError, CliResult, CoreError,
};
use qcow2_core::format::MAGIC;
use qcow2_core::{CreateOptions, Error, Feature, Mapping, OpenOptions, SECTOR};
use qcow2_std_shim::chain::{
    attach_chain, open_checked, parse_backing_name, BackingFormat, ChainError, ChainOptions,
    OpenCheckedError, UnusableFile, DEFAULT_MAX_DEPTH,
};
use qcow2_std_shim::data_file::{attach_data_file, DataFileError, DataFileOptions};
use qcow2_std_shim::{FileDevice, FilePolicy, Image, ImageLock, LockError, LockMode, Permissions};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

/// An image format the tool reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A plain disk image: guest byte N is file byte N.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl Format {
    /// The name `qemu-img` uses for the format.
    pub const fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// Guesses the format of `path` from its first bytes: qcow2 when it starts
/// with the qcow2 magic, raw otherwise.
pub fn probe(path: &Path) -> CliResult<Format> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|e| open_error(&shown, &e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(&format!("Could not read '{shown}'"), &e)),
        }
    }
    Ok(if got == magic.len() && magic == MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// What a verb does with an image. It decides whether the image is opened
/// for writing and which of QEMU's locks the open takes (see
/// [`Access::lock_mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Header and metadata only, no guest I/O (`qemu-img info`).
    Metadata,
    /// Guest reads (`qemu-img check`, `qemu-img bench`, `qemu-io -r`).
    Read,
    /// Guest reads of a conversion source, which must not change under the
    /// copy (`qemu-img convert`): others may not write, even to raw files.
    CopySource,
    /// Guest reads and writes (`qemu-io`, `qemu-img check -r`,
    /// `qemu-img bench -w`, a conversion target).
    Write,
}

impl Access {
    /// Whether the image is opened for writing.
    pub fn writable(self) -> bool {
        self == Access::Write
    }

    /// The locks QEMU 10 takes for this access to a `format` image (seen in
    /// `/proc/locks`): qcow2 never shares writes and resizes, as its
    /// metadata would change underneath; a raw file shares what its user
    /// shares, which is everything except for a conversion source.
    /// `force_share` (`-U`) shares everything.
    pub fn lock_mode(self, format: Format, force_share: bool) -> LockMode {
        let mode = match (self, format) {
            (Access::Metadata, Format::Qcow2) => LockMode::METADATA,
            (Access::Metadata, Format::Raw) => LockMode::NONE,
            (Access::Read | Access::CopySource, Format::Qcow2)
            | (Access::CopySource, Format::Raw) => LockMode::READ,
            (Access::Read, Format::Raw) => {
                LockMode::new(Permissions::CONSISTENT_READ, Permissions::ALL)
            }
            (Access::Write, Format::Qcow2) => LockMode::WRITE,
            (Access::Write, Format::Raw) => LockMode::new(
                Permissions::CONSISTENT_READ | Permissions::WRITE,
                Permissions::ALL,
            ),
        };
        if force_share {
            mode.force_share()
        } else {
            mode
        }
    }
}

/// Why an image could not be opened or created.
#[derive(Debug)]
pub enum OpenError {
    /// A failure QEMU words after its command's own context (`qemu-img`:
    /// `Could not open '<file>': `, `qemu-io`: `can't open device <file>: `):
    /// a lock conflict, `-U` on a writable open, a backing or data file
    /// that cannot be opened. `hint` is the second line QEMU prints, if
    /// any.
    Refused {
        /// The message.
        message: String,
        /// QEMU's hint line (`Is another process using the image [...]?`).
        hint: Option<String>,
    },
    /// Any other failure, worded in full.
    Failed(CliError),
}

impl From<CliError> for OpenError {
    fn from(e: CliError) -> Self {
        OpenError::Failed(e)
    }
}

impl OpenError {
    /// The refusal for a `-U` open that would write.
    pub fn force_share_writable() -> OpenError {
        OpenError::Refused {
            message: "force-share=on can only be used with read-only images".into(),
            hint: None,
        }
    }

    /// The error for an I/O failure while opening `shown`: a lock conflict
    /// as a refusal, anything else as `Could not open '<file>': <reason>`.
    pub fn from_io(shown: &str, e: &io::Error) -> OpenError {
        match LockError::from_io(e) {
            Some(lock) => OpenError::Refused {
                message: lock.to_string(),
                hint: lock.hint(shown),
            },
            None => OpenError::Failed(io_error(&format!("Could not open '{shown}'"), e)),
        }
    }

    /// The error with `context` before a refusal, and the hint after it.
    fn with_context(self, context: &str) -> CliError {
        match self {
            OpenError::Refused { message, hint } => {
                let hint = hint.map(|h| format!("\n{h}")).unwrap_or_default();
                CliError(format!("{context}{message}{hint}"))
            }
            OpenError::Failed(e) => e,
        }
    }

    /// As `qemu-img` reports a failed open of `shown`.
    pub fn img(self, shown: &str) -> CliError {
        self.with_context(&format!("Could not open '{shown}': "))
    }

    /// As `qemu-io` reports a failed open of `shown`.
    pub fn io(self, shown: &str) -> CliError {
        match self {
            OpenError::Failed(e) => CliError(format!("can't open device {shown}: {e}")),
            refused => refused.with_context(&format!("can't open device {shown}: ")),
        }
    }

    /// As `qemu-img create` reports a failed creation of `shown`.
    pub fn create(self, shown: &str) -> CliError {
        self.with_context(&format!("{shown}: "))
    }

    /// As `qemu-img convert` reports a failed creation of its target
    /// `shown` in `format`.
    pub fn convert_target(self, shown: &str, format: Format) -> CliError {
        self.with_context(&format!(
            "{shown}: error while converting {}: ",
            format.name()
        ))
    }
}

/// The failure to open a backing or data file `path` (`what` is QEMU's
/// context, such as `Could not open backing file: `): a lock conflict as
/// QEMU words it (with its hint), anything else as `Could not open
/// '<path>': <reason>`.
fn child_open_error(what: &str, path: &Path, error: &io::Error) -> OpenError {
    let shown = path.display().to_string();
    match LockError::from_io(error) {
        Some(lock) => OpenError::Refused {
            message: format!("{what}{lock}"),
            hint: lock.hint(&shown),
        },
        None => OpenError::Refused {
            message: format!("{what}Could not open '{shown}': {}", io_message(error)),
            hint: None,
        },
    }
}

/// Why `path` cannot be a backing or data file, with the C library's
/// text for an OS error.
fn unusable_message(path: &Path, why: &UnusableFile) -> String {
    match why {
        UnusableFile::NoSize(e) => {
            format!("Could not refresh total sector count: {}", io_message(e))
        }
        other => other.message(path),
    }
}

/// The error for a backing chain that could not be opened, as QEMU words
/// it after its command's context.
fn backing_error(e: ChainError) -> OpenError {
    const CONTEXT: &str = "Could not open backing file: ";
    // QEMU says it again for every level further down the chain.
    let mut context = CONTEXT.to_string();
    let mut e = e;
    while let ChainError::InBacking { error, .. } = e {
        context.push_str(CONTEXT);
        e = *error;
    }
    let message = match e {
        ChainError::Open { path, error } => return child_open_error(&context, &path, &error),
        ChainError::DataFile { error, .. } => match data_file_error(error) {
            OpenError::Refused { message, hint } => {
                return OpenError::Refused {
                    message: format!("{context}{message}"),
                    hint,
                }
            }
            OpenError::Failed(e) => e.0,
        },
        // QEMU names no file here.
        ChainError::Image {
            error: Error::NotQcow2,
            ..
        } => "Image is not in qcow2 format".to_string(),
        ChainError::Image { error, .. } => core_message(&error),
        ChainError::Unusable { path, why } => unusable_message(&path, &why),
        other => other.to_string(),
    };
    OpenError::Refused {
        message: format!("{context}{message}"),
        hint: None,
    }
}

/// The error for an external data file that could not be attached, as
/// QEMU words it after its command's context.
fn data_file_error(e: DataFileError) -> OpenError {
    match e {
        DataFileError::Open { path, error } => child_open_error("", &path, &error),
        DataFileError::Unusable { path, why } => OpenError::Refused {
            message: unusable_message(&path, &why),
            hint: None,
        },
        other => OpenError::Refused {
            message: other.to_string(),
            hint: None,
        },
    }
}

/// Opens the backing chain (unless `with_chain` is false) and external
/// data file of the qcow2 image `image` (opened from `path`) for `access`,
/// as qemu-img and qemu-io do before any guest I/O: backings read-only and
/// locked so that nobody writes them underneath (shared with
/// `force_share`), the data file locked as a raw image of the same access.
fn attach_children(
    image: Image<FileDevice>,
    path: &Path,
    access: Access,
    force_share: bool,
    with_chain: bool,
) -> Result<Image<FileDevice>, OpenError> {
    let open_backing = |path: &Path, _writable: bool| {
        let mode = Access::CopySource.lock_mode(Format::Qcow2, force_share);
        FileDevice::open_locked(path, false, mode)
    };
    let chain = ChainOptions {
        policy: FilePolicy {
            open_file: &open_backing,
            ..FilePolicy::trusting()
        },
        max_depth: DEFAULT_MAX_DEPTH,
    };
    let mut image = if with_chain {
        attach_chain(image, path, &chain).map_err(backing_error)?
    } else {
        image
    };
    // The external data file, named relative to the image.
    let open_data = |path: &Path, writable: bool| {
        FileDevice::open_locked(path, writable, access.lock_mode(Format::Raw, force_share))
    };
    let data = DataFileOptions {
        policy: FilePolicy {
            open_file: &open_data,
            ..FilePolicy::trusting()
        },
        writable: Some(access.writable()),
        ..DataFileOptions::trusting()
    };
    attach_data_file(&mut image, path, &data).map_err(data_file_error)?;
    Ok(image)
}

/// The message for a file that could not be opened, as `qemu-img` words it.
fn open_error(shown: &str, e: &io::Error) -> crate::error::CliError {
    io_error(&format!("Could not open '{shown}'"), e)
}

/// Opens the backing file `name` that a new image at `image` is to name,
/// with backing format `format`, as `qemu-img create` opens it to learn
/// its size: read-only, sharing everything, found and checked as the
/// chain of an opened image would be ([`parse_backing_name`]: `file:` and
/// `json:` names, format `file`; regular files and block devices only), a
/// qcow2 backing with its own chain and data file. Returns the format
/// found and the virtual size, or the message qemu-img prints after
/// `<image>: `.
pub fn open_new_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
) -> Result<(Format, u64), String> {
    let refused = |e: OpenError| match e {
        OpenError::Refused { message, hint } => match hint {
            Some(hint) => format!("{message}\n{hint}"),
            None => message,
        },
        OpenError::Failed(e) => e.0,
    };
    let target = parse_backing_name(image, name, format).map_err(|e| e.to_string())?;
    let path = target.path.as_path();
    let mode = Access::Read.lock_mode(Format::Qcow2, true);
    let open_file = |p: &Path, _writable: bool| FileDevice::open_locked(p, false, mode);
    let dev = open_checked(path, false, &open_file).map_err(|e| match e {
        OpenCheckedError::Open(error) => refused(child_open_error("", path, &error)),
        OpenCheckedError::Unusable(why) => unusable_message(path, &why),
    })?;
    let qcow2 = match target.format {
        BackingFormat::Qcow2 => true,
        BackingFormat::Raw => false,
        BackingFormat::Probe => {
            let mut magic = [0u8; 4];
            dev.file().read_exact_at(&mut magic, 0).is_ok() && magic == MAGIC
        }
    };
    if !qcow2 {
        return Ok((Format::Raw, round_to_sector(dev.len())));
    }
    let image = Image::open(dev, &OpenOptions::read_only()).map_err(|e| match e {
        Error::NotQcow2 => "Image is not in qcow2 format".to_string(),
        e => core_message(&e),
    })?;
    let image =
        attach_children(image, path, Access::Read, true, target.open_backing).map_err(refused)?;
    Ok((Format::Qcow2, image.virtual_size()))
}

/// Opens the qcow2 image file `path` for `access` with QEMU's locks.
fn open_locked_qcow2(
    path: &Path,
    access: Access,
    force_share: bool,
) -> Result<FileDevice, OpenError> {
    if force_share && access.writable() {
        return Err(OpenError::force_share_writable());
    }
    let shown = path.display().to_string();
    let mode = access.lock_mode(Format::Qcow2, force_share);
    FileDevice::open_locked(path, access.writable(), mode)
        .map_err(|e| OpenError::from_io(&shown, &e))
}

/// Opens the qcow2 image file `path` for `access` with QEMU's locks, for
/// a caller that opens the image on it itself (`check`). Unless `access`
/// is [`Access::Metadata`], the image's backing chain and external data
/// file must open too, as qemu-img opens them before it does anything
/// else: a missing backing, a loop, a data file that is a directory fail
/// here. They are opened and closed again; an image that does not open at
/// all is left for the caller to report.
pub fn open_qcow2_file(
    path: &Path,
    access: Access,
    force_share: bool,
) -> Result<FileDevice, OpenError> {
    let dev = open_locked_qcow2(path, access, force_share)?;
    if access != Access::Metadata {
        // Through a second, unlocked descriptor: locks belong to open
        // files, and this process's own would conflict.
        let second = FileDevice::open(path, false);
        if let Ok(Ok(image)) = second.map(|d| Image::open(d, &OpenOptions::read_only())) {
            drop(attach_children(image, path, access, force_share, true)?);
        }
    }
    Ok(dev)
}

/// Takes the locks of `mode` on `file`, the image `shown`.
fn lock_file(file: &File, mode: LockMode, shown: &str) -> Result<ImageLock, OpenError> {
    ImageLock::acquire(file, mode).map_err(|e| OpenError::from_io(shown, &e.into()))
}

/// Whether `file` is a block device (QEMU's `host_device`).
fn is_block_device(file: &File) -> bool {
    file.metadata()
        .is_ok_and(|m| m.file_type().is_block_device())
}

/// Removes an image this process created and could not finish, if it is a
/// regular file: a block device (or anything else) stays where it is.
pub fn remove_unfinished(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Rounds `n` up to a whole sector, as QEMU sizes every block device.
pub fn round_to_sector(n: u64) -> u64 {
    n.div_ceil(SECTOR as u64).saturating_mul(SECTOR as u64)
}

/// A raw image file. Its size is the file length rounded up to a sector;
/// the bytes past the end of the file read as zeros.
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    size: u64,
    writable: bool,
    /// The QEMU-compatible locks on `file`, held until it is closed.
    _lock: ImageLock,
}

impl RawDisk {
    fn check(&self, offset: u64, len: usize) -> Result<(), CoreError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange),
        }
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CoreError> {
        self.check(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
        buf[done..].fill(0);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), CoreError> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.check(offset, buf.len())?;
        self.file.write_all_at(buf, offset).map_err(Error::Io)
    }

    /// Writes zeros (a raw file has no cheaper way that keeps the data
    /// allocated, which is what QEMU does without `-u` as well).
    fn write_zeroes(&mut self, offset: u64, count: u64) -> Result<(), CoreError> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(count) as usize];
        let mut done = 0;
        while done < count {
            let n = (count - done).min(CHUNK) as usize;
            self.write_at(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    /// Punches a hole (reads as zeros afterwards), as QEMU's file driver.
    fn discard(&mut self, offset: u64, count: u64) -> Result<(), CoreError> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.check(offset, usize::try_from(count).unwrap_or(usize::MAX))?;
        match qcow2_std_shim::punch_hole(&self.file, offset, count) {
            Err(e) if e.kind() != io::ErrorKind::Unsupported => Err(Error::Io(e)),
            _ => Ok(()),
        }
    }

    fn flush(&mut self) -> Result<(), CoreError> {
        if self.writable {
            self.file.sync_data().map_err(Error::Io)?;
        }
        Ok(())
    }
}

/// Whether a run of guest bytes may hold data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Stored; may hold any bytes.
    Data,
    /// Known to read as zeros.
    Zero,
}

/// An open image of either format.
pub enum Disk {
    /// A raw file.
    Raw(RawDisk),
    /// A qcow2 image.
    Qcow2(Box<Image<FileDevice>>),
}

impl Disk {
    /// Opens `path` as `format`, or as the probed format when `None`, for
    /// `access`, taking the locks QEMU takes ([`Access::lock_mode`]; all
    /// permissions shared with `force_share`, which writable opens refuse).
    /// The locks are held until the disk is closed.
    pub fn open(
        path: &Path,
        format: Option<Format>,
        access: Access,
        force_share: bool,
    ) -> Result<Disk, OpenError> {
        if force_share && access.writable() {
            return Err(OpenError::force_share_writable());
        }
        let format = match format {
            Some(f) => f,
            None => probe(path)?,
        };
        let shown = path.display().to_string();
        let writable = access.writable();
        match format {
            Format::Raw => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(path)
                    .map_err(|e| open_error(&shown, &e))?;
                let lock = lock_file(&file, access.lock_mode(format, force_share), &shown)?;
                // A block device's size is the device's, not its metadata's.
                let len = FileDevice::length_of(&file)
                    .map_err(|e| io_error(&format!("Could not stat '{shown}'"), &e))?;
                Ok(Disk::Raw(RawDisk {
                    file,
                    size: round_to_sector(len),
                    writable,
                    _lock: lock,
                }))
            }
            Format::Qcow2 => {
                let dev = open_locked_qcow2(path, access, force_share)?;
                let options = if writable {
                    OpenOptions::read_write()
                } else {
                    OpenOptions::read_only()
                };
                let image = Image::open(dev, &options).map_err(|e| match e {
                    Error::NotQcow2 => CliError::from(format!(
                        "Could not open '{shown}': Image is not in qcow2 format"
                    )),
                    e => core_error(&format!("Could not open '{shown}'"), &e),
                })?;
                // As qemu-img: metadata-only verbs (info) leave the chain
                // and the data file closed; the others open them.
                let image = if access == Access::Metadata {
                    image
                } else {
                    attach_children(image, path, access, force_share, true)?
                };
                Ok(Disk::Qcow2(Box::new(image)))
            }
        }
    }

    /// Creates (or truncates) `path` as an empty image of `size` bytes.
    /// `options` applies to qcow2 only; its size is replaced by `size`.
    ///
    /// Like QEMU, the file is locked for creation before it is truncated:
    /// an image another process uses is refused ([`OpenError::Refused`])
    /// and left as it was. The new image stays locked for writing until
    /// it is closed.
    pub fn create(
        path: &Path,
        format: Format,
        size: u64,
        options: &CreateOptions,
    ) -> Result<Disk, OpenError> {
        let shown = path.display().to_string();
        let context = format!("Could not create '{shown}'");
        let created = |e: io::Error| match LockError::from_io(&e) {
            Some(_) => OpenError::from_io(&shown, &e),
            None => OpenError::Failed(io_error(&context, &e)),
        };
        match format {
            Format::Raw => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(path)
                    .map_err(created)?;
                let mut lock = lock_file(&file, LockMode::CREATE, &shown)?;
                if is_block_device(&file) {
                    // A block device keeps its size and contents, as in QEMU.
                    let len = FileDevice::length_of(&file).map_err(created)?;
                    if size > len {
                        return Err(CliError(format!("{shown}: Cannot grow device files")).into());
                    }
                } else {
                    file.set_len(0)
                        .and_then(|()| file.set_len(size))
                        .map_err(|e| {
                            remove_unfinished(path);
                            created(e)
                        })?;
                }
                lock.change(&file, Access::Write.lock_mode(format, false))
                    .map_err(|e| created(e.into()))?;
                Ok(Disk::Raw(RawDisk {
                    file,
                    size,
                    writable: true,
                    _lock: lock,
                }))
            }
            Format::Qcow2 => {
                let dev = FileDevice::create_locked(path).map_err(created)?;
                let options = CreateOptions { size, ..*options };
                let image = Image::create(dev, &options).map_err(|e| {
                    // The file is ours and holds no valid image: remove it.
                    remove_unfinished(path);
                    core_error(&shown, &e)
                })?;
                Ok(Disk::Qcow2(Box::new(image)))
            }
        }
    }

    /// Whether a new image reads as zeros everywhere (QEMU's
    /// `bdrv_has_zero_init`): not a raw image on a block device, which
    /// keeps whatever the device held.
    pub fn has_zero_init(&self) -> bool {
        match self {
            Disk::Raw(raw) => !is_block_device(&raw.file),
            Disk::Qcow2(_) => true,
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Raw(raw) => raw.size,
            Disk::Qcow2(image) => image.virtual_size(),
        }
    }

    /// Whether guest byte `offset` may hold data, and for how many bytes
    /// from there the same holds. `offset` must be below [`Disk::size`].
    pub fn extent(&mut self, offset: u64) -> Result<(Extent, u64), CoreError> {
        match self {
            Disk::Raw(raw) => match raw.size.checked_sub(offset) {
                Some(rest) if rest > 0 => Ok((Extent::Data, rest)),
                _ => Err(Error::OutOfRange),
            },
            Disk::Qcow2(image) => {
                let (mapping, len) = image.map(offset)?;
                // Unallocated clusters read the backing where it reaches:
                // data as far as this run knows, split at the backing's end.
                let backing_end = image.backing_bytes();
                let (extent, len) = match mapping {
                    Mapping::Unallocated if offset < backing_end => {
                        (Extent::Data, len.min(backing_end - offset))
                    }
                    Mapping::Unallocated | Mapping::Zero => (Extent::Zero, len),
                    Mapping::Data { .. } | Mapping::Compressed { .. } => (Extent::Data, len),
                };
                Ok((extent, len.max(1)))
            }
        }
    }

    /// Reads `buf.len()` bytes at guest `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), CoreError> {
        match self {
            Disk::Raw(raw) => raw.read_at(offset, buf),
            Disk::Qcow2(image) => image.read_at(offset, buf),
        }
    }

    /// Writes `data` at guest `offset` compressed (qemu-io's `write -c`),
    /// as QEMU's qcow2 driver: whole clusters on cluster boundaries (the
    /// disk's last cluster may be partial), clusters not already holding
    /// data (EIO otherwise); raw images and images with an external data
    /// file cannot (ENOTSUP, before anything else is looked at).
    pub fn write_compressed(&mut self, offset: u64, data: &[u8]) -> Result<(), CoreError> {
        match self {
            Disk::Raw(_) => Err(Error::Unsupported(Feature::CompressedWriteToRaw)),
            Disk::Qcow2(image) => {
                if image.inner_mut().has_data_file() {
                    return Err(Error::Unsupported(Feature::CompressedWriteWithDataFile));
                }
                let cluster = image.info().cluster_size;
                let end = offset.saturating_add(data.len() as u64);
                let whole =
                    (data.len() as u64).is_multiple_of(cluster) || end == image.virtual_size();
                if !offset.is_multiple_of(cluster) || !whole {
                    return Err(Error::InvalidArgument(
                        "compressed writes cover whole clusters",
                    ));
                }
                // As QEMU: a compressed write overwrites nothing that has
                // a host cluster (data, compressed, or a zero cluster that
                // keeps its preallocation): EIO.
                let mut at = offset;
                while at < end {
                    if image.host_cluster(at)?.is_some() {
                        return Err(Error::Io(io::Error::from_raw_os_error(5)));
                    }
                    at += cluster;
                }
                image.write_compressed_at(offset, data)
            }
        }
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), CoreError> {
        match self {
            Disk::Raw(raw) => raw.write_at(offset, buf),
            Disk::Qcow2(image) => image.write_at(offset, buf),
        }
    }

    /// Makes `count` bytes at guest `offset` read as zeros, as qemu-io's
    /// `write -z` (with `-u`: releasing the storage where the format can).
    pub fn write_zeroes(&mut self, offset: u64, count: u64, unmap: bool) -> Result<(), CoreError> {
        match self {
            Disk::Raw(raw) => raw.write_zeroes(offset, count),
            Disk::Qcow2(image) => image.write_zeroes_at(offset, count, unmap),
        }
    }

    /// Discards `count` bytes at guest `offset`, as qemu-io's `discard`.
    pub fn discard(&mut self, offset: u64, count: u64) -> Result<(), CoreError> {
        match self {
            Disk::Raw(raw) => raw.discard(offset, count),
            Disk::Qcow2(image) => image.discard_at(offset, count),
        }
    }

    /// Makes earlier writes durable.
    pub fn flush(&mut self) -> Result<(), CoreError> {
        match self {
            Disk::Raw(raw) => raw.flush(),
            Disk::Qcow2(image) => image.flush(),
        }
    }

    /// Flushes and closes the image.
    pub fn close(self) -> Result<(), CoreError> {
        match self {
            Disk::Raw(mut raw) => raw.flush(),
            Disk::Qcow2(image) => image.close().map(drop),
        }
    }
}
