//! Punching holes in host files: how freed clusters give their space back.

use std::fs::File;
use std::io;

/// Deallocates `len` bytes at `offset` in `file`, keeping its size: the
/// range then reads as zeros. File systems without hole punching report
/// `Unsupported`, which callers treat as "nothing freed" (a discard is a
/// hint).
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    if len == 0 {
        return Ok(());
    }
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, flags, offset, len) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => Err(io::Error::from(io::ErrorKind::Unsupported)),
        Err(e) => Err(io::Error::from(e)),
    }
}
