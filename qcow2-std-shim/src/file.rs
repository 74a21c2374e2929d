//! A [`BlockDevice`] over a host file, with positional I/O, QEMU's image
//! locks and optional direct I/O (`O_DIRECT`).

use crate::direct::{is_aligned, is_direct, o_direct, AlignedBuf};
use crate::lock::{ImageLock, LockMode};
use qcow2_core::{BlockDevice, Sector, SECTOR};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Zeros for [`BlockDevice::write_zeros`] inside the file, aligned (to
/// [`DIRECT_ALIGN`](crate::direct::DIRECT_ALIGN)) so that direct I/O
/// writes them without a bounce.
#[repr(C, align(4096))]
struct Zeros([u8; 64 * 1024]);

/// See [`Zeros`].
static ZEROS: Zeros = Zeros([0; 64 * 1024]);

/// Size of a direct device's bounce buffer, through which requests whose
/// memory is not aligned for `O_DIRECT` (the core's metadata slices and
/// sector scratch) go, in pieces of at most this size.
const BOUNCE_BYTES: usize = 64 << 10;

/// How [`FileDevice::open_with`] opens an existing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOptions {
    /// Open for writing as well as reading.
    pub writable: bool,
    /// The locks to take on the file ([`LockMode::NONE`]: none); see
    /// [`FileDevice::open_locked`].
    pub lock: LockMode,
    /// Bypass the host page cache: open with `O_DIRECT` (QEMU's
    /// `cache.direct=on`, the cache modes `none` and `directsync`). See
    /// "Direct I/O" on [`FileDevice`].
    pub direct: bool,
}

impl FileOptions {
    /// Read-only or read-write, no locks, through the page cache: what
    /// [`FileDevice::open`] does.
    pub const fn new(writable: bool) -> Self {
        FileOptions {
            writable,
            lock: LockMode::NONE,
            direct: false,
        }
    }
}

/// A file used as a block device. Writes grow the file; `flush` is
/// `fdatasync`. A file whose length is not a multiple of 512 reads as if
/// zero-padded to the next sector.
///
/// A block device (`/dev/sdX`, `/dev/loopN`, a partition) works too: its
/// size is the device's, and it never grows: growing it, or writing past
/// its end, fails with `ENOSPC` ("No space left on device"), which an
/// image reports as [`qcow2_core::Error::NoSpace`].
///
/// Growing is lazy: [`BlockDevice::set_sector_count`] only records the new
/// length (reads past the physical end return zeros, writes extend the
/// file), and `flush` sets the physical length if writes fell short of it.
/// That saves a system call for every cluster an image allocates.
///
/// # Locking
///
/// `qcow2-core` does not lock anything: it only sees a [`BlockDevice`].
/// This device can: opened with [`FileDevice::open_locked`] or
/// [`FileDevice::create_locked`] it takes the advisory locks QEMU takes on
/// an image (see [`crate::lock`]), so QEMU processes (`qemu-img`,
/// `qemu-io`, `qemu-nbd`, VMs) and users of this device refuse each other
/// as two QEMU processes do. They are shared open-file-description locks
/// (`F_OFD_SETLK`) on single bytes: a read-only qcow2 open
/// ([`LockMode::READ`]) holds bytes 100 (uses consistent read), 201 and
/// 203 (does not share write, resize); a read-write one
/// ([`LockMode::WRITE`]) also holds 101 (uses write) and 103 (uses
/// resize). Opening fails when another open (in any process, this one
/// included) does not share a permission this one uses, or uses one this
/// one does not share; the [`io::Error`] then carries a
/// [`LockError`](crate::LockError) with QEMU's message.
///
/// The locks live as long as the open file: they are released when the
/// device (with every handle cloned from its file) is dropped. They are
/// advisory: they keep out only programs that follow the same protocol.
/// Where the kernel has no OFD locks nothing is locked, as in QEMU.
///
/// [`FileDevice::open`], [`FileDevice::create`] and
/// [`FileDevice::from_file`] take no locks. Locks belong to the open file,
/// and a child process shares the parent's open files from `fork` until
/// `exec` closes them: in a process whose threads spawn programs, a file
/// just closed can look locked for a moment, so a program that opens the
/// same image again and again while other threads spawn processes (a test
/// suite running `qemu-img`) is better off without locks.
///
/// # Direct I/O
///
/// Opened with [`FileOptions::direct`] (or wrapping a file opened with
/// `O_DIRECT`), reads and writes bypass the host page cache, which asks
/// for aligned memory, offsets and lengths. The device aligns the memory
/// itself: a request whose buffer does not start on a
/// [`DIRECT_ALIGN`](crate::direct::DIRECT_ALIGN) boundary goes through a
/// bounce buffer of its own, in 64 KiB pieces (an
/// [`AlignedBuf`](crate::direct::AlignedBuf) avoids the copy). Offsets
/// and lengths are whole 512-byte sectors, which is enough for files and
/// devices with 512-byte logical blocks; one with larger logical blocks
/// (4 KiB) refuses requests that are not aligned to them with `EINVAL`.
/// The file's last, partial sector (a length not a multiple of 512) reads
/// as if zero-padded, as without direct I/O. Locking works as without.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    /// Logical length in bytes.
    len: u64,
    /// Physical length as far as this device knows.
    physical: u64,
    writable: bool,
    /// A block device: its size is fixed.
    fixed: bool,
    /// The QEMU-compatible locks held on `file`.
    lock: ImageLock,
    /// With direct I/O: where requests whose memory is not aligned go.
    bounce: Option<AlignedBuf>,
}

/// The error for growing a fixed-size device (or writing past its end).
fn no_space() -> io::Error {
    io::Error::from(nix::errno::Errno::ENOSPC)
}

impl FileDevice {
    /// Opens an existing file, read-only or read-write, taking no locks.
    pub fn open(path: impl AsRef<Path>, writable: bool) -> io::Result<Self> {
        Self::open_with(path, &FileOptions::new(writable))
    }

    /// Opens an existing file, read-only or read-write, and takes the locks
    /// of `mode`: [`LockMode::qcow2`]`(writable)` for what QEMU takes on a
    /// qcow2 image, `LockMode::READ.force_share()` for what it takes with
    /// `-U`, [`LockMode::NONE`] for none. Fails with a
    /// [`LockError`](crate::LockError) inside the [`io::Error`] when
    /// another open conflicts.
    pub fn open_locked(path: impl AsRef<Path>, writable: bool, mode: LockMode) -> io::Result<Self> {
        let options = FileOptions {
            lock: mode,
            ..FileOptions::new(writable)
        };
        Self::open_with(path, &options)
    }

    /// Opens an existing file as `options` say: read-only or read-write,
    /// with the locks of [`FileOptions::lock`] (as
    /// [`FileDevice::open_locked`]), with or without direct I/O. Direct
    /// I/O fails with [`io::ErrorKind::Unsupported`] on a platform without
    /// `O_DIRECT`, and with `EINVAL` on a file system without it (tmpfs).
    pub fn open_with(path: impl AsRef<Path>, options: &FileOptions) -> io::Result<Self> {
        let mut open = OpenOptions::new();
        open.read(true).write(options.writable);
        if options.direct {
            open.custom_flags(o_direct()?);
        }
        Self::from_file_locked(open.open(path)?, options.writable, options.lock)
    }

    /// Creates (or truncates) a file for a new image, taking no locks.
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Self::from_file(file, true)
    }

    /// Creates (or truncates) a file for a new qcow2 image as QEMU does: it
    /// locks the file for creation ([`LockMode::CREATE`]) before truncating
    /// it, so an image in use elsewhere is refused and left intact, then
    /// moves to the locks of a read-write qcow2 image ([`LockMode::WRITE`]).
    pub fn create_locked(path: impl AsRef<Path>) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut device = Self::from_file_locked(file, true, LockMode::CREATE)?;
        if !device.fixed {
            // A block device keeps its size (and contents: a new image
            // writes what it uses, as QEMU does).
            device.file.set_len(0)?;
            device.len = 0;
            device.physical = 0;
        }
        device.set_lock_mode(LockMode::WRITE)?;
        Ok(device)
    }

    /// Wraps an open file, taking no locks (any the file holds stay). A
    /// file opened with `O_DIRECT` is used with direct I/O.
    pub fn from_file(file: File, writable: bool) -> io::Result<Self> {
        let fixed = file.metadata()?.file_type().is_block_device();
        let len = Self::length_of(&file)?;
        let bounce = if is_direct(&file)? {
            Some(AlignedBuf::new(BOUNCE_BYTES, 0)?)
        } else {
            None
        };
        Ok(FileDevice {
            file,
            len,
            physical: len,
            writable,
            fixed,
            lock: ImageLock::new(),
            bounce,
        })
    }

    /// Wraps an open file that holds no locks yet and takes the locks of
    /// `mode` on it, as [`FileDevice::open_locked`] does.
    pub fn from_file_locked(file: File, writable: bool, mode: LockMode) -> io::Result<Self> {
        let lock = ImageLock::acquire(&file, mode)?;
        Ok(FileDevice {
            lock,
            ..Self::from_file(file, writable)?
        })
    }

    /// The mode of the locks held on the file.
    pub fn lock_mode(&self) -> LockMode {
        self.lock.mode()
    }

    /// Moves the file's locks to `mode` (for example to share everything
    /// once writing is done). On a conflict the old locks stay and the
    /// error carries a [`LockError`](crate::LockError).
    pub fn set_lock_mode(&mut self, mode: LockMode) -> io::Result<()> {
        self.lock.change(&self.file, mode)?;
        Ok(())
    }

    /// The file's length in bytes (a block device's size).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The length of `file` in bytes; for a block device (whose metadata
    /// says 0) the device's size, found by seeking to its end (the file
    /// position moves; this device uses positional I/O only).
    pub fn length_of(file: &File) -> io::Result<u64> {
        let meta = file.metadata()?;
        if meta.file_type().is_block_device() {
            let mut f = file;
            f.seek(SeekFrom::End(0))
        } else {
            Ok(meta.len())
        }
    }

    /// Whether the size is fixed: the file is a block device.
    pub fn is_fixed(&self) -> bool {
        self.fixed
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether the file is read and written with direct I/O (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.bounce.is_some()
    }

    /// Reads `bytes` at `at`, bouncing them when direct I/O needs it;
    /// returns the bytes read, fewer only at the end of the file.
    fn read_bytes(&mut self, at: u64, bytes: &mut [u8]) -> io::Result<usize> {
        let Some(bounce) = self.bounce.as_mut().filter(|_| !is_aligned(bytes)) else {
            return read_full(&self.file, at, bytes, self.bounce.is_some());
        };
        let mut done = 0;
        while done < bytes.len() {
            let n = (bytes.len() - done).min(BOUNCE_BYTES);
            let got = read_full(&self.file, at + done as u64, &mut bounce[..n], true)?;
            bytes[done..done + got].copy_from_slice(&bounce[..got]);
            done += got;
            if got < n {
                break;
            }
        }
        Ok(done)
    }

    /// Writes `bytes` at `at`, bouncing them when direct I/O needs it.
    fn write_bytes(&mut self, at: u64, bytes: &[u8]) -> io::Result<()> {
        let Some(bounce) = self.bounce.as_mut().filter(|_| !is_aligned(bytes)) else {
            return self.file.write_all_at(bytes, at);
        };
        for (i, chunk) in bytes.chunks(BOUNCE_BYTES).enumerate() {
            let piece = &mut bounce[..chunk.len()];
            piece.copy_from_slice(chunk);
            self.file
                .write_all_at(piece, at + (i * BOUNCE_BYTES) as u64)?;
        }
        Ok(())
    }
}

/// Reads `bytes` at `at` from `file`; returns the bytes read, fewer only at
/// the end of the file. A `direct` read that comes back short of a whole
/// sector has met the end of the file: reading on from there, at an
/// offset no longer aligned, would fail.
fn read_full(file: &File, at: u64, bytes: &mut [u8], direct: bool) -> io::Result<usize> {
    let mut done = 0;
    while done < bytes.len() {
        match file.read_at(&mut bytes[done..], at + done as u64) {
            Ok(0) => break,
            Ok(n) if direct && n % SECTOR != 0 => return Ok(done + n),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl BlockDevice for FileDevice {
    type Error = io::Error;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> io::Result<()> {
        let bytes = buf.as_flattened_mut();
        let at = first * SECTOR as u64;
        let done = self.read_bytes(at, bytes)?;
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
        let end = at + bytes.len() as u64;
        if self.fixed && end > self.len {
            return Err(no_space());
        }
        self.write_bytes(at, bytes)?;
        self.physical = self.physical.max(end);
        self.len = self.len.max(end);
        Ok(())
    }

    /// Past the physical end of the file (rounded up to a whole sector,
    /// as direct I/O writes whole sectors) nothing is written: the range
    /// is a hole, which reads as zeros (and stays so across a crash). A
    /// block device is never extended: zeros past its end fail with
    /// `ENOSPC`.
    async fn write_zeros(&mut self, first: u64, count: u64) -> io::Result<()> {
        let start = first * SECTOR as u64;
        let end = start + count * SECTOR as u64;
        if self.fixed && end > self.len {
            return Err(no_space());
        }
        let stop = end.min(self.physical.next_multiple_of(SECTOR as u64));
        let mut at = start;
        while at < stop {
            let n = ((stop - at) as usize).min(ZEROS.0.len());
            self.file.write_all_at(&ZEROS.0[..n], at)?;
            at += n as u64;
        }
        if at > start {
            self.physical = self.physical.max(at);
        }
        self.len = self.len.max(end);
        Ok(())
    }

    /// Punches a hole in a regular file (the space goes back to the file
    /// system, the range reads as zeros); on a block device, or a file
    /// system without holes, does nothing (a discard is a hint).
    async fn discard(&mut self, first: u64, count: u64) -> io::Result<()> {
        let start = first * SECTOR as u64;
        let end = (start + count * SECTOR as u64).min(self.physical);
        if !self.writable || self.fixed || start >= end {
            return Ok(());
        }
        match crate::punch_hole(&self.file, start, end - start) {
            Err(e) if e.kind() != io::ErrorKind::Unsupported => Err(e),
            _ => Ok(()),
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.writable {
            if self.physical < self.len && !self.fixed {
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
        if self.fixed {
            // A block device keeps its size: shrinking is a no-op (as in
            // QEMU), growing impossible.
            return if len <= self.len {
                Ok(())
            } else {
                Err(no_space())
            };
        }
        if len < self.physical {
            self.file.set_len(len)?;
            self.physical = len;
        }
        self.len = len;
        Ok(())
    }
}
