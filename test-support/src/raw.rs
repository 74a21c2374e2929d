//! Raw bytes of image files: the qcow2 header's fields by name, and
//! peeking and poking for tests that damage images the way a crash or a
//! hostile file would.

use std::os::unix::fs::FileExt;
use std::path::Path;

/// Byte offsets of the qcow2 header's fields (all big-endian).
pub mod header {
    /// `QFI\xfb` (u32).
    pub const MAGIC: u64 = 0;
    /// 2 or 3 (u32).
    pub const VERSION: u64 = 4;
    /// Offset of the backing file name (u64).
    pub const BACKING_FILE_OFFSET: u64 = 8;
    /// Length of the backing file name (u32).
    pub const BACKING_FILE_SIZE: u64 = 16;
    /// log2 of the cluster size (u32).
    pub const CLUSTER_BITS: u64 = 20;
    /// Virtual disk size in bytes (u64).
    pub const SIZE: u64 = 24;
    /// Encryption method, 0 for none (u32).
    pub const CRYPT_METHOD: u64 = 32;
    /// Entries in the L1 table (u32).
    pub const L1_SIZE: u64 = 36;
    /// Host offset of the L1 table (u64).
    pub const L1_TABLE_OFFSET: u64 = 40;
    /// Host offset of the refcount table (u64).
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    /// Clusters the refcount table occupies (u32).
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    /// Number of internal snapshots (u32).
    pub const NB_SNAPSHOTS: u64 = 60;
    /// Host offset of the snapshot table (u64).
    pub const SNAPSHOTS_OFFSET: u64 = 64;
    /// Incompatible feature bits (u64, v3): bit 0 dirty, bit 1 corrupt.
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    /// Compatible feature bits (u64, v3): bit 0 lazy refcounts.
    pub const COMPATIBLE_FEATURES: u64 = 80;
    /// Autoclear feature bits (u64, v3): bit 0 bitmaps, bit 1 raw data file.
    pub const AUTOCLEAR_FEATURES: u64 = 88;
    /// log2 of the refcount width in bits (u32, v3).
    pub const REFCOUNT_ORDER: u64 = 96;
    /// Length of the header in bytes (u32, v3).
    pub const HEADER_LENGTH: u64 = 100;
    /// Where header extensions start after QEMU 10's 112-byte v3 header.
    pub const EXTENSIONS: u64 = 112;
}

/// The host-offset bits of an L1 or L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// `len` bytes of the file at `path`, from byte `at`.
pub fn peek(path: impl AsRef<Path>, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    std::fs::File::open(path.as_ref())
        .expect("open image")
        .read_exact_at(&mut buf, at)
        .expect("peek");
    buf
}

/// The big-endian u64 at byte `at` of the file at `path`.
pub fn peek64(path: impl AsRef<Path>, at: u64) -> u64 {
    u64::from_be_bytes(peek(path, at, 8).try_into().expect("8 bytes"))
}

/// The big-endian u32 at byte `at` of the file at `path`.
pub fn peek32(path: impl AsRef<Path>, at: u64) -> u32 {
    u32::from_be_bytes(peek(path, at, 4).try_into().expect("4 bytes"))
}

/// Writes `bytes` at byte `at` of the file at `path`.
pub fn poke(path: impl AsRef<Path>, at: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path.as_ref())
        .expect("open image");
    file.write_all_at(bytes, at).expect("poke");
}

/// Writes big-endian `value` at byte `at` of the file at `path`.
pub fn poke64(path: impl AsRef<Path>, at: u64, value: u64) {
    poke(path, at, &value.to_be_bytes());
}
