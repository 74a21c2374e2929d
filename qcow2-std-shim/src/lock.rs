//! Image locking that QEMU understands.
//!
//! QEMU's file driver guards every image it opens with advisory locks, so
//! that a second process cannot write an image a running VM or `qemu-io`
//! holds, nor read one that someone else is changing. This module speaks the
//! same protocol, so QEMU (`qemu-img`, `qemu-io`, `qemu-nbd`, a VM) and this
//! crate's users refuse each other exactly as two QEMU processes do.
//!
//! # The protocol
//!
//! QEMU's block layer describes an open by two sets of
//! [permissions](Permission): the ones it *uses* (reads that must be
//! consistent, writes, size changes) and the ones it *shares*, i.e. lets
//! other opens of the same file use at the same time. Each permission with
//! index *i* (see [`Permission::index`]) has two bytes in the file's
//! lock space (never its data: the locks are advisory and cover bytes that
//! need not exist):
//!
//! * byte `100 + i` ([`USE_BASE`]): held while the open uses permission *i*;
//! * byte `200 + i` ([`UNSHARE_BASE`]): held while the open does *not*
//!   share permission *i*.
//!
//! Every lock is a *shared* (read) lock on one byte, taken with an
//! open-file-description lock (`F_OFD_SETLK`), so locks never conflict with
//! each other directly and belong to the open file, not the process: two
//! opens in one process see each other, and the locks go away when the
//! file is closed, however the process ends. Conflicts are found by
//! testing: after taking its own bytes, an open asks (`F_OFD_GETLK` for an
//! exclusive lock) whether any *other* open holds
//!
//! 1. byte `200 + i` for a permission *i* it uses: someone does not share
//!    it, and the open fails with `Failed to get "<name>" lock`; then
//! 2. byte `100 + i` for a permission *i* it does not share: someone uses
//!    it, and the open fails with `Failed to get shared "<name>" lock`.
//!
//! Permissions are tested in index order, uses first, which decides the
//! message when several conflict. On a failed test QEMU adds the hint
//! `Is another process using the image [<file>]?` ([`LockError::hint`]).
//!
//! # What QEMU takes
//!
//! Observed with QEMU 10.0 (`/proc/locks` and `strace`):
//!
//! | open | uses (bytes) | does not share (bytes) | mode here |
//! |---|---|---|---|
//! | qcow2, `qemu-img info` | – | write, resize (201, 203) | [`LockMode::METADATA`] |
//! | qcow2, `qemu-img check`/`map`/`compare`/`bench`, `convert` source, `qemu-io -r` | consistent read (100) | write, resize (201, 203) | [`LockMode::READ`] |
//! | qcow2, `qemu-io`, `qemu-img check -r`, `bench -w`, `convert` target | consistent read, write, resize (100, 101, 103) | write, resize (201, 203) | [`LockMode::WRITE`] |
//! | a file being created (`qemu-img create`, before it is truncated) | write, resize (101, 103) | resize (203) | [`LockMode::CREATE`] |
//! | any reader with `-U` / `--force-share` | as without | nothing | [`LockMode::force_share`] |
//! | `qemu-img info -U` | nothing | nothing | [`LockMode::NONE`] |
//!
//! A raw image (no qcow2 metadata) shares whatever its user shares:
//! `qemu-io -f raw` uses consistent read and write and shares everything,
//! `qemu-io -f raw -r` uses consistent read only; only `qemu-img convert`
//! unshares write and resize on its source. So readers share with readers,
//! one writer excludes every other writer and every non-`-U` reader, and
//! `-U` readers coexist with everyone.
//!
//! # When the host cannot lock
//!
//! Like QEMU's default (`locking=auto`), locking is used only when the
//! kernel has OFD locks: QEMU probes `F_OFD_GETLK` on `/dev/null` once, and
//! so does [`ImageLock::supported`]. Without them (or off Linux) nothing is
//! locked and every open succeeds. When the kernel has them but a file
//! system refuses a lock (some network file systems), the open fails with
//! `Failed to lock byte 100: <reason>`, as QEMU's does: it is not silently
//! ignored.
//!
//! # A caveat of OFD locks
//!
//! The locks belong to the open file description, which a child process
//! shares from `fork` until `exec` closes its copy. In a process where one
//! thread spawns programs while another closes and reopens an image, the
//! closed file can still look locked for that moment: such programs should
//! not hold images across spawns they do not control, or do without locks
//! (which is why [`FileDevice::open`](crate::FileDevice::open) takes none).

use std::fmt;
use std::fs::File;
use std::io;
use std::ops::BitOr;

/// Byte `USE_BASE + i` is locked while an open uses permission *i*
/// (QEMU's `RAW_LOCK_PERM_BASE`).
pub const USE_BASE: u64 = 100;

/// Byte `UNSHARE_BASE + i` is locked while an open does not share
/// permission *i* (QEMU's `RAW_LOCK_SHARED_BASE`).
pub const UNSHARE_BASE: u64 = 200;

/// One of the permissions of QEMU's block layer that have lock bytes
/// (`BLK_PERM_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Reads return data that is consistent (no one changes it behind the
    /// reader's back in ways the format cannot follow).
    ConsistentRead,
    /// Writes that may change what the image reads.
    Write,
    /// Writes that do not change what the image reads.
    WriteUnchanged,
    /// Changing the file's size.
    Resize,
}

impl Permission {
    /// Every permission, in index (and test) order.
    pub const ALL: [Permission; 4] = [
        Permission::ConsistentRead,
        Permission::Write,
        Permission::WriteUnchanged,
        Permission::Resize,
    ];

    /// Bit position of the permission in QEMU's `BLK_PERM_*` mask, which is
    /// also its offset from [`USE_BASE`] and [`UNSHARE_BASE`].
    pub const fn index(self) -> u32 {
        match self {
            Permission::ConsistentRead => 0,
            Permission::Write => 1,
            Permission::WriteUnchanged => 2,
            Permission::Resize => 3,
        }
    }

    /// The name QEMU prints for the permission in lock errors.
    pub const fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }

    /// The byte locked while an open uses this permission.
    pub const fn use_byte(self) -> u64 {
        USE_BASE + self.index() as u64
    }

    /// The byte locked while an open does not share this permission.
    pub const fn unshare_byte(self) -> u64 {
        UNSHARE_BASE + self.index() as u64
    }

    /// The set holding only this permission.
    pub const fn only(self) -> Permissions {
        Permissions(1 << self.index())
    }
}

/// A set of [`Permission`]s, as QEMU's `BLK_PERM_*` bit mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Permissions(u8);

impl Permissions {
    /// The empty set.
    pub const NONE: Permissions = Permissions(0);
    /// Consistent reads.
    pub const CONSISTENT_READ: Permissions = Permission::ConsistentRead.only();
    /// Writes.
    pub const WRITE: Permissions = Permission::Write.only();
    /// Writes that do not change what is read.
    pub const WRITE_UNCHANGED: Permissions = Permission::WriteUnchanged.only();
    /// Size changes.
    pub const RESIZE: Permissions = Permission::Resize.only();
    /// Every permission (`BLK_PERM_ALL`).
    pub const ALL: Permissions = Permissions(0b1111);

    /// The permissions in `self` or `other`.
    pub const fn union(self, other: Permissions) -> Permissions {
        Permissions(self.0 | other.0)
    }

    /// The permissions in `self` but not in `other`.
    pub const fn difference(self, other: Permissions) -> Permissions {
        Permissions(self.0 & !other.0)
    }

    /// The permissions in both `self` and `other`.
    pub const fn intersection(self, other: Permissions) -> Permissions {
        Permissions(self.0 & other.0)
    }

    /// Whether `p` is in the set.
    pub const fn contains(self, p: Permission) -> bool {
        self.0 & p.only().0 != 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every permission of `self` is in `other`.
    pub const fn is_subset(self, other: Permissions) -> bool {
        self.0 & !other.0 == 0
    }

    /// The set as QEMU's `BLK_PERM_*` mask.
    pub const fn bits(self) -> u64 {
        self.0 as u64
    }

    /// The permissions in the set, in index order.
    pub fn iter(self) -> impl Iterator<Item = Permission> {
        Permission::ALL
            .into_iter()
            .filter(move |&p| self.contains(p))
    }
}

impl BitOr for Permissions {
    type Output = Permissions;

    fn bitor(self, other: Permissions) -> Permissions {
        self.union(other)
    }
}

/// What an open of an image file uses and what it lets other opens use
/// meanwhile: QEMU's `perm` and `shared_perm` for the file node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LockMode {
    /// Permissions the open uses.
    pub uses: Permissions,
    /// Permissions other opens may use at the same time.
    pub shares: Permissions,
}

impl LockMode {
    /// Uses nothing and shares everything: no lock at all (what
    /// `qemu-img info -U` holds).
    pub const NONE: LockMode = LockMode::new(Permissions::NONE, Permissions::ALL);

    /// A qcow2 image opened for its metadata only, no guest I/O (`qemu-img
    /// info`): uses nothing, but does not let others write or resize.
    pub const METADATA: LockMode = LockMode::new(Permissions::NONE, QCOW2_SHARES);

    /// A qcow2 image opened read-only (`qemu-io -r`, `qemu-img check`,
    /// `convert` source): uses consistent reads, does not let others write
    /// or resize.
    pub const READ: LockMode = LockMode::new(Permissions::CONSISTENT_READ, QCOW2_SHARES);

    /// A qcow2 image opened read-write (`qemu-io`, `qemu-img check -r`):
    /// uses consistent reads, writes and resizes, does not let others write
    /// or resize.
    pub const WRITE: LockMode = LockMode::new(
        Permissions::CONSISTENT_READ
            .union(Permissions::WRITE)
            .union(Permissions::RESIZE),
        QCOW2_SHARES,
    );

    /// A file being created, before it is truncated (QEMU's `raw_co_create`):
    /// uses writes and resizes, does not let others resize.
    pub const CREATE: LockMode = LockMode::new(
        Permissions::WRITE.union(Permissions::RESIZE),
        Permissions::ALL.difference(Permissions::RESIZE),
    );

    /// A mode from its parts.
    pub const fn new(uses: Permissions, shares: Permissions) -> LockMode {
        LockMode { uses, shares }
    }

    /// [`LockMode::READ`] or [`LockMode::WRITE`]: what QEMU takes on a
    /// qcow2 image it opens read-only or read-write.
    pub const fn qcow2(writable: bool) -> LockMode {
        if writable {
            LockMode::WRITE
        } else {
            LockMode::READ
        }
    }

    /// The same uses, sharing everything: what `-U` / `--force-share` (QEMU's
    /// `force-share=on`) makes of a read-only open. QEMU refuses it for
    /// writable opens; that check is the caller's.
    pub const fn force_share(self) -> LockMode {
        LockMode::new(self.uses, Permissions::ALL)
    }

    /// The permissions the open does not share.
    pub const fn unshares(self) -> Permissions {
        Permissions::ALL.difference(self.shares)
    }

    /// Whether an open in this mode and one in `other` cannot coexist: one
    /// uses a permission the other does not share. (The relation is
    /// symmetric; the open that comes second is the one refused.)
    pub const fn conflicts_with(self, other: LockMode) -> bool {
        !self.uses.intersection(other.unshares()).is_empty()
            || !self.unshares().intersection(other.uses).is_empty()
    }

    /// The bytes an open in this mode holds shared locks on, ascending.
    pub fn bytes(self) -> impl Iterator<Item = u64> {
        let uses = self.uses.iter().map(Permission::use_byte);
        uses.chain(self.unshares().iter().map(Permission::unshare_byte))
    }
}

/// What a qcow2 image shares: everything but writes and resizes, which
/// would change metadata under the open's cached view.
const QCOW2_SHARES: Permissions = Permissions::ALL
    .difference(Permissions::WRITE)
    .difference(Permissions::RESIZE);

/// Why locks could not be taken. `Display` gives QEMU's wording.
#[derive(Debug)]
pub enum LockError {
    /// Taking the shared lock on `byte` failed: `Failed to lock byte
    /// <byte>`, followed by the reason unless another open holds an
    /// exclusive lock there (`EAGAIN` / `EACCES`).
    Byte {
        /// The lock byte.
        byte: u64,
        /// What `F_OFD_SETLK` returned.
        cause: io::Error,
    },
    /// Another open conflicts with `permission`: with `shared == false` it
    /// does not share a permission this open uses (`Failed to get "write"
    /// lock`); with `shared == true` it uses a permission this open does
    /// not share (`Failed to get shared "write" lock`). The cause is
    /// `EAGAIN` for a conflict, or the error of a test that could not be
    /// made (then its text follows the message).
    Permission {
        /// The permission whose byte is held elsewhere.
        permission: Permission,
        /// Whether the byte tested was the permission's use byte (someone
        /// uses what this open does not share).
        shared: bool,
        /// `EAGAIN`, or what `F_OFD_GETLK` returned.
        cause: io::Error,
    },
}

/// Whether `e` means "someone else holds the lock" rather than a failure.
fn is_busy(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == nix::libc::EAGAIN || code == nix::libc::EACCES
    )
}

/// The C library's text for `e`, without Rust's ` (os error N)`.
fn strerror(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_string(),
        _ => text,
    }
}

impl LockError {
    /// Whether another open of the file holds a conflicting lock (as
    /// opposed to the lock calls failing).
    pub fn is_conflict(&self) -> bool {
        match self {
            LockError::Byte { cause, .. } | LockError::Permission { cause, .. } => is_busy(cause),
        }
    }

    /// The hint line QEMU prints after the message when the conflict test
    /// failed: `Is another process using the image [<filename>]?`.
    /// `filename` is the image's name as the user gave it.
    pub fn hint(&self, filename: &str) -> Option<String> {
        match self {
            LockError::Permission { .. } => {
                Some(format!("Is another process using the image [{filename}]?"))
            }
            LockError::Byte { .. } => None,
        }
    }

    /// The lock error inside an [`io::Error`] made from one (as
    /// [`FileDevice`](crate::FileDevice) returns them), if `e` is one.
    pub fn from_io(e: &io::Error) -> Option<&LockError> {
        e.get_ref()?.downcast_ref::<LockError>()
    }
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cause = match self {
            LockError::Byte { byte, cause } => {
                write!(f, "Failed to lock byte {byte}")?;
                cause
            }
            LockError::Permission {
                permission,
                shared,
                cause,
            } => {
                let shared = if *shared { "shared " } else { "" };
                write!(f, "Failed to get {shared}\"{}\" lock", permission.name())?;
                cause
            }
        };
        if is_busy(cause) {
            Ok(())
        } else {
            write!(f, ": {}", strerror(cause))
        }
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LockError::Byte { cause, .. } | LockError::Permission { cause, .. } => Some(cause),
        }
    }
}

impl From<LockError> for io::Error {
    /// An [`io::Error`] of kind [`io::ErrorKind::ResourceBusy`] for a
    /// conflict, of the cause's kind otherwise; [`LockError::from_io`]
    /// gets the lock error back.
    fn from(e: LockError) -> io::Error {
        let kind = if e.is_conflict() {
            io::ErrorKind::ResourceBusy
        } else {
            match &e {
                LockError::Byte { cause, .. } | LockError::Permission { cause, .. } => cause.kind(),
            }
        };
        io::Error::new(kind, e)
    }
}

/// The QEMU-compatible locks held through one open file description.
///
/// The locks themselves live in the kernel with the open file: this value
/// only records which mode they are in. Dropping it releases nothing;
/// closing the file (its last descriptor) releases everything.
#[derive(Debug, PartialEq, Eq)]
pub struct ImageLock {
    mode: LockMode,
}

impl Default for ImageLock {
    fn default() -> Self {
        ImageLock::new()
    }
}

impl ImageLock {
    /// The state of a file nothing was locked on: [`LockMode::NONE`].
    pub const fn new() -> ImageLock {
        ImageLock {
            mode: LockMode::NONE,
        }
    }

    /// Whether this host locks at all: the kernel has open file description
    /// locks (QEMU's `qemu_has_ofd_lock()`, probed once on `/dev/null`).
    /// When it has not, every lock operation succeeds without locking, as
    /// QEMU's default `locking=auto` does.
    pub fn supported() -> bool {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SUPPORTED.get_or_init(sys::probe)
    }

    /// Takes the locks of `mode` on `file`, which must not hold any yet,
    /// and checks that no other open conflicts. On failure nothing stays
    /// locked.
    pub fn acquire(file: &File, mode: LockMode) -> Result<ImageLock, LockError> {
        let mut lock = ImageLock::new();
        lock.change(file, mode)?;
        Ok(lock)
    }

    /// The mode the locks are in.
    pub const fn mode(&self) -> LockMode {
        self.mode
    }

    /// Moves the locks on `file` (the file these locks were taken on) to
    /// `mode`, as QEMU updates permissions: takes the bytes the new mode
    /// needs on top of the old ones, tests the new mode for conflicts (not
    /// when it only gives up permissions), then releases the bytes only
    /// the old mode needed. On failure the old mode stays in force.
    pub fn change(&mut self, file: &File, mode: LockMode) -> Result<(), LockError> {
        if !ImageLock::supported() {
            self.mode = mode;
            return Ok(());
        }
        let old = self.mode;
        // Every byte of either mode.
        let both = LockMode::new(old.uses | mode.uses, old.shares.intersection(mode.shares));
        if both != old {
            let taken = take(file, old, both).and_then(|()| test(file, mode));
            if let Err(e) = taken {
                // Back to the old bytes; an unlock cannot conflict, and
                // QEMU too only reports what went wrong first.
                let _ = release(file, both, old);
                return Err(e);
            }
        }
        // Unlocking only ever fails for reasons QEMU also just warns about;
        // the new mode is in force either way.
        let _ = release(file, both, mode);
        self.mode = mode;
        Ok(())
    }
}

/// Locks the bytes `to` holds beyond those `from` holds.
fn take(file: &File, from: LockMode, to: LockMode) -> Result<(), LockError> {
    let held: Vec<u64> = from.bytes().collect();
    for byte in to.bytes().filter(|b| !held.contains(b)) {
        sys::lock_shared(file, byte).map_err(|cause| LockError::Byte { byte, cause })?;
    }
    Ok(())
}

/// Unlocks the bytes `from` holds that `to` does not.
fn release(file: &File, from: LockMode, to: LockMode) -> io::Result<()> {
    let keep: Vec<u64> = to.bytes().collect();
    let mut result = Ok(());
    for byte in from.bytes().filter(|b| !keep.contains(b)) {
        if let Err(e) = sys::unlock(file, byte) {
            result = Err(e);
        }
    }
    result
}

/// Tests, in QEMU's order, whether another open holds a byte that
/// conflicts with `mode`.
fn test(file: &File, mode: LockMode) -> Result<(), LockError> {
    for permission in mode.uses.iter() {
        refuse_if_held(file, permission, false)?;
    }
    for permission in mode.unshares().iter() {
        refuse_if_held(file, permission, true)?;
    }
    Ok(())
}

/// Fails with [`LockError::Permission`] when another open holds the byte
/// that conflicts with `permission`: its use byte when `shared` (this
/// open does not share it), else its unshare byte (this open uses it). A
/// failed test counts as held, with its error as the cause.
fn refuse_if_held(file: &File, permission: Permission, shared: bool) -> Result<(), LockError> {
    let byte = if shared {
        permission.use_byte()
    } else {
        permission.unshare_byte()
    };
    let cause = match sys::held_elsewhere(file, byte) {
        Ok(false) => return Ok(()),
        Ok(true) => io::Error::from_raw_os_error(nix::libc::EAGAIN),
        Err(e) => e,
    };
    Err(LockError::Permission {
        permission,
        shared,
        cause,
    })
}

/// Whether another open file description holds a lock on `byte` of `file`
/// (any lock, in any process, this one included). `Ok(false)` when the host
/// has no OFD locks.
pub fn held_elsewhere(file: &File, byte: u64) -> io::Result<bool> {
    if !ImageLock::supported() {
        return Ok(false);
    }
    sys::held_elsewhere(file, byte)
}

/// The system calls, through `nix`: open file description locks on Linux.
#[cfg(all(
    any(target_os = "linux", target_os = "android"),
    not(any(
        target_arch = "mips",
        target_arch = "mips32r6",
        target_arch = "mips64",
        target_arch = "mips64r6"
    ))
))]
mod sys {
    use nix::fcntl::{fcntl, FcntlArg};
    use nix::libc;
    use std::fs::File;
    use std::io;

    /// A lock request of `kind` on `len` bytes from `start` (0: to the end).
    fn request(kind: libc::c_int, start: u64, len: u64) -> io::Result<libc::flock> {
        let too_far = || io::Error::from_raw_os_error(libc::EINVAL);
        Ok(libc::flock {
            l_type: libc::c_short::try_from(kind).map_err(|_| too_far())?,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: libc::off_t::try_from(start).map_err(|_| too_far())?,
            l_len: libc::off_t::try_from(len).map_err(|_| too_far())?,
            // OFD requests must carry pid 0.
            l_pid: 0,
        })
    }

    /// Takes a shared (read) lock on `byte`; fails with `EAGAIN` if another
    /// open holds an exclusive lock there.
    pub fn lock_shared(file: &File, byte: u64) -> io::Result<()> {
        let fl = request(libc::F_RDLCK, byte, 1)?;
        fcntl(file, FcntlArg::F_OFD_SETLK(&fl))?;
        Ok(())
    }

    /// Releases this open's lock on `byte`.
    pub fn unlock(file: &File, byte: u64) -> io::Result<()> {
        let fl = request(libc::F_UNLCK, byte, 1)?;
        fcntl(file, FcntlArg::F_OFD_SETLK(&fl))?;
        Ok(())
    }

    /// Whether an exclusive lock on `byte` would conflict with a lock of
    /// another open file description (QEMU's `qemu_lock_fd_test`).
    pub fn held_elsewhere(file: &File, byte: u64) -> io::Result<bool> {
        let mut fl = request(libc::F_WRLCK, byte, 1)?;
        fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// Whether the kernel has OFD locks, probed like QEMU on `/dev/null`.
    pub fn probe() -> bool {
        let Ok(null) = File::options().read(true).write(true).open("/dev/null") else {
            return false;
        };
        let Ok(mut fl) = request(libc::F_WRLCK, 0, 0) else {
            return false;
        };
        fcntl(&null, FcntlArg::F_OFD_GETLK(&mut fl)).is_ok()
    }
}

/// No open file description locks on this host: nothing is ever locked.
#[cfg(not(all(
    any(target_os = "linux", target_os = "android"),
    not(any(
        target_arch = "mips",
        target_arch = "mips32r6",
        target_arch = "mips64",
        target_arch = "mips64r6"
    ))
)))]
mod sys {
    use std::fs::File;
    use std::io;

    fn unsupported() -> io::Error {
        io::Error::new(io::ErrorKind::Unsupported, "no OFD locks on this host")
    }

    pub fn lock_shared(_: &File, _: u64) -> io::Result<()> {
        Err(unsupported())
    }

    pub fn unlock(_: &File, _: u64) -> io::Result<()> {
        Err(unsupported())
    }

    pub fn held_elsewhere(_: &File, _: u64) -> io::Result<bool> {
        Err(unsupported())
    }

    pub fn probe() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_hold_qemus_bytes() {
        let bytes = |m: LockMode| m.bytes().collect::<Vec<_>>();
        assert_eq!(bytes(LockMode::READ), [100, 201, 203]);
        assert_eq!(bytes(LockMode::WRITE), [100, 101, 103, 201, 203]);
        assert_eq!(bytes(LockMode::METADATA), [201, 203]);
        assert_eq!(bytes(LockMode::CREATE), [101, 103, 203]);
        assert_eq!(bytes(LockMode::READ.force_share()), [100]);
        assert!(bytes(LockMode::NONE).is_empty());
    }

    #[test]
    fn conflicts_like_qemu() {
        use LockMode as M;
        let shared_read = M::READ.force_share();
        // Readers share; a writer excludes readers and writers; -U readers
        // coexist with everyone.
        assert!(!M::READ.conflicts_with(M::READ));
        assert!(M::WRITE.conflicts_with(M::READ));
        assert!(M::READ.conflicts_with(M::WRITE));
        assert!(M::WRITE.conflicts_with(M::WRITE));
        assert!(M::METADATA.conflicts_with(M::WRITE));
        assert!(!M::METADATA.conflicts_with(M::READ));
        for m in [M::READ, M::WRITE, M::METADATA, M::CREATE] {
            assert!(!shared_read.conflicts_with(m), "{m:?}");
            assert!(!M::NONE.conflicts_with(m), "{m:?}");
        }
        assert!(M::CREATE.conflicts_with(M::READ));
    }

    #[test]
    fn messages_are_qemus() {
        let busy = || io::Error::from_raw_os_error(nix::libc::EAGAIN);
        let e = LockError::Permission {
            permission: Permission::Write,
            shared: true,
            cause: busy(),
        };
        assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
        assert!(e.is_conflict());
        assert_eq!(
            e.hint("a.qcow2").as_deref(),
            Some("Is another process using the image [a.qcow2]?")
        );
        let e = LockError::Permission {
            permission: Permission::Resize,
            shared: false,
            cause: busy(),
        };
        assert_eq!(e.to_string(), "Failed to get \"resize\" lock");
        let e = LockError::Byte {
            byte: 100,
            cause: io::Error::from_raw_os_error(nix::libc::ENOLCK),
        };
        assert_eq!(e.to_string(), "Failed to lock byte 100: No locks available");
        assert!(!e.is_conflict());
        assert_eq!(e.hint("x"), None);
        let io: io::Error = e.into();
        assert_ne!(io.kind(), io::ErrorKind::ResourceBusy);
        let back = LockError::from_io(&io).expect("a lock error");
        assert!(matches!(back, LockError::Byte { byte: 100, .. }));
        let io: io::Error = LockError::Byte {
            byte: 101,
            cause: busy(),
        }
        .into();
        assert_eq!(io.kind(), io::ErrorKind::ResourceBusy);
        assert_eq!(io.to_string(), "Failed to lock byte 101");
    }

    #[test]
    fn two_opens_in_one_process_see_each_other() {
        if !ImageLock::supported() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("qcow2-lock-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img");
        std::fs::write(&path, b"x").unwrap();
        let open = || File::options().read(true).write(true).open(&path).unwrap();
        let (a, b, c) = (open(), open(), open());
        let mut la = ImageLock::acquire(&a, LockMode::READ).unwrap();
        // A second reader is fine; a writer is told someone does not share
        // writes.
        let lb = ImageLock::acquire(&b, LockMode::READ).unwrap();
        let e = ImageLock::acquire(&c, LockMode::WRITE).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get \"write\" lock");
        // The failed attempt left nothing behind.
        assert!(!held_elsewhere(&a, 101).unwrap());
        // Upgrading a reader fails while the other reader is there...
        let e = la.change(&a, LockMode::WRITE).unwrap_err();
        assert!(e.is_conflict());
        assert_eq!(la.mode(), LockMode::READ);
        drop((b, lb));
        // ... and works once it is gone; then readers are refused.
        la.change(&a, LockMode::WRITE).unwrap();
        let e = ImageLock::acquire(&c, LockMode::READ).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
        ImageLock::acquire(&c, LockMode::READ.force_share()).unwrap();
        // Downgrading releases the write bytes.
        la.change(&a, LockMode::READ).unwrap();
        let d = open();
        assert!(!held_elsewhere(&d, 101).unwrap());
        assert!(held_elsewhere(&d, 100).unwrap());
        drop((a, c));
        assert!(!held_elsewhere(&d, 100).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
