//! Raw files and qcow2 images behind one byte-addressed interface.

use crate::error::{core_error, io_error, CliResult, CoreError};
use qcow2_core::format::MAGIC;
use qcow2_core::{CreateOptions, Error, Mapping, OpenOptions, SECTOR};
use qcow2_std_shim::{FileDevice, Image};
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
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

/// The message for a file that could not be opened, as `qemu-img` words it.
fn open_error(shown: &str, e: &io::Error) -> crate::error::CliError {
    io_error(&format!("Could not open '{shown}'"), e)
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
    /// Opens `path` as `format`, or as the probed format when `None`.
    pub fn open(path: &Path, format: Option<Format>, writable: bool) -> CliResult<Disk> {
        let format = match format {
            Some(f) => f,
            None => probe(path)?,
        };
        let shown = path.display().to_string();
        match format {
            Format::Raw => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(path)
                    .map_err(|e| open_error(&shown, &e))?;
                let len = file
                    .metadata()
                    .map_err(|e| io_error(&format!("Could not stat '{shown}'"), &e))?
                    .len();
                Ok(Disk::Raw(RawDisk {
                    file,
                    size: round_to_sector(len),
                    writable,
                }))
            }
            Format::Qcow2 => {
                let dev = FileDevice::open(path, writable).map_err(|e| open_error(&shown, &e))?;
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
                Ok(Disk::Qcow2(Box::new(image)))
            }
        }
    }

    /// Creates (or truncates) `path` as an empty image of `size` bytes.
    /// `options` applies to qcow2 only; its size is replaced by `size`.
    pub fn create(
        path: &Path,
        format: Format,
        size: u64,
        options: &CreateOptions,
    ) -> CliResult<Disk> {
        let shown = path.display().to_string();
        let context = format!("Could not create '{shown}'");
        match format {
            Format::Raw => {
                let file = File::create(path).map_err(|e| io_error(&context, &e))?;
                file.set_len(size).map_err(|e| {
                    let _ = std::fs::remove_file(path);
                    io_error(&context, &e)
                })?;
                Ok(Disk::Raw(RawDisk {
                    file,
                    size,
                    writable: true,
                }))
            }
            Format::Qcow2 => {
                let dev = FileDevice::create(path).map_err(|e| io_error(&context, &e))?;
                let options = CreateOptions { size, ..*options };
                let image = Image::create(dev, &options).map_err(|e| {
                    // The file is ours and holds no valid image: remove it.
                    let _ = std::fs::remove_file(path);
                    core_error(&shown, &e)
                })?;
                Ok(Disk::Qcow2(Box::new(image)))
            }
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
                let extent = match mapping {
                    Mapping::Unallocated | Mapping::Zero => Extent::Zero,
                    Mapping::Data { .. } | Mapping::Compressed { .. } => Extent::Data,
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

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), CoreError> {
        match self {
            Disk::Raw(raw) => raw.write_at(offset, buf),
            Disk::Qcow2(image) => image.write_at(offset, buf),
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
