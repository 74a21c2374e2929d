//! Direct I/O (`O_DIRECT`): the open flag, and memory aligned for it.

use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};

/// The memory alignment `O_DIRECT` I/O is given: 4 KiB covers every
/// common logical block size.
pub const DIRECT_ALIGN: usize = 4096;

/// Whether `bytes` starts on a [`DIRECT_ALIGN`] boundary.
pub fn is_aligned(bytes: &[u8]) -> bool {
    bytes.as_ptr().addr().is_multiple_of(DIRECT_ALIGN)
}

/// `O_DIRECT` on Linux (the value depends on the architecture).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn o_direct() -> io::Result<i32> {
    Ok(nix::fcntl::OFlag::O_DIRECT.bits())
}

/// `O_DIRECT` is only used on Linux: elsewhere direct I/O is refused.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn o_direct() -> io::Result<i32> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "O_DIRECT is not known on this platform",
    ))
}

/// Whether `file` was opened with `O_DIRECT`.
pub(crate) fn is_direct(file: &File) -> io::Result<bool> {
    let Ok(flag) = o_direct() else {
        return Ok(false);
    };
    let flags = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETFL)?;
    Ok(flags & flag != 0)
}

/// A heap byte buffer starting on a [`DIRECT_ALIGN`] boundary, so that a
/// [`FileDevice`](crate::FileDevice) opened for direct I/O uses it without
/// copying it through its bounce buffer. Dereferences to its bytes.
#[derive(Debug)]
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` bytes of `fill`; `ENOMEM` if the memory is not available.
    pub fn new(len: usize, fill: u8) -> io::Result<AlignedBuf> {
        let no_memory = || io::Error::from(nix::errno::Errno::ENOMEM);
        let total = len.checked_add(DIRECT_ALIGN).ok_or_else(no_memory)?;
        let mut storage = Vec::new();
        storage.try_reserve_exact(total).map_err(|_| no_memory())?;
        storage.resize(total, fill);
        let misalignment = storage.as_ptr().addr() % DIRECT_ALIGN;
        let start = (DIRECT_ALIGN - misalignment) % DIRECT_ALIGN;
        Ok(AlignedBuf {
            storage,
            start,
            len,
        })
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers() {
        for len in [0, 1, 512, 4096, 5000] {
            let mut buf = AlignedBuf::new(len, 7).expect("memory");
            let bytes = &mut *buf;
            assert!(is_aligned(bytes));
            assert_eq!(bytes.len(), len);
            assert!(bytes.iter().all(|&b| b == 7));
        }
    }

    #[test]
    fn impossible_sizes_are_enomem() {
        let err = AlignedBuf::new(usize::MAX, 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::errno::Errno::ENOMEM as i32));
    }
}
