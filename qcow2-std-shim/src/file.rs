//! A [`BlockDevice`] over a host file, with positional I/O.

use qcow2_core::{BlockDevice, Sector, SECTOR};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Zeros for [`BlockDevice::write_zeros`] inside the file.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A file used as a block device. Writes grow the file; `flush` is
/// `fdatasync`. A file whose length is not a multiple of 512 reads as if
/// zero-padded to the next sector.
///
/// Growing is lazy: [`BlockDevice::set_sector_count`] only records the new
/// length (reads past the physical end return zeros, writes extend the
/// file), and `flush` sets the physical length if writes fell short of it.
/// That saves a system call for every cluster an image allocates.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    /// Logical length in bytes.
    len: u64,
    /// Physical length as far as this device knows.
    physical: u64,
    writable: bool,
}

impl FileDevice {
    /// Opens an existing file, read-only or read-write.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Self::from_file(file, writable)
    }

    /// Creates (or truncates) a file for a new image.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Self::from_file(file, true)
    }

    /// Wraps an open file.
    pub fn from_file(file: File, writable: bool) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(FileDevice {
            file,
            len,
            physical: len,
            writable,
        })
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl BlockDevice for FileDevice {
    type Error = io::Error;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> io::Result<()> {
        let bytes = buf.as_flattened_mut();
        let at = first * SECTOR as u64;
        let mut done = 0;
        while done < bytes.len() {
            match self.file.read_at(&mut bytes[done..], at + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if done < bytes.len() && at + (done as u64) < self.physical {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
        }
        // Past the end of the file reads as zeros.
        bytes[done..].fill(0);
        Ok(())
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> io::Result<()> {
        let at = first * SECTOR as u64;
        let bytes = buf.as_flattened();
        self.file.write_all_at(bytes, at)?;
        let end = at + bytes.len() as u64;
        self.physical = self.physical.max(end);
        self.len = self.len.max(end);
        Ok(())
    }

    /// Past the physical end of the file nothing is written: the range is
    /// a hole, which reads as zeros (and stays so across a crash).
    async fn write_zeros(&mut self, first: u64, count: u64) -> io::Result<()> {
        let start = first * SECTOR as u64;
        let end = start + count * SECTOR as u64;
        let mut at = start;
        while at < end.min(self.physical) {
            let n = ((end.min(self.physical) - at) as usize).min(ZEROS.len());
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        self.len = self.len.max(end);
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.writable {
            if self.physical < self.len {
                self.file.set_len(self.len)?;
                self.physical = self.len;
            }
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn sector_count(&self) -> u64 {
        self.len.div_ceil(SECTOR as u64)
    }

    async fn set_sector_count(&mut self, n: u64) -> io::Result<()> {
        let len = n * SECTOR as u64;
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "read-only file",
            ));
        }
        if len < self.physical {
            self.file.set_len(len)?;
            self.physical = len;
        }
        self.len = len;
        Ok(())
    }
}
