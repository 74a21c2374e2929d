//! On-disk types of the qcow2 format: pure encoding, decoding and validation.
//!
//! Nothing here does I/O or holds state. All multi-byte fields are big-endian.

mod area;
pub mod entry;
mod extension;
pub mod header;
pub mod refcount;
pub mod snapshot;

pub use entry::{L1Entry, L2Entry};
pub use header::{Extension, ExtensionKind, Header};

/// `ceil(x / 2^bits)`, without a division: every size in the format is a
/// power of two, and firmware targets have no 64-bit divide instruction.
/// `bits >= 64` gives 0 or 1 (never a panic).
pub(crate) const fn shr_ceil(x: u64, bits: u32) -> u64 {
    let low = match 1u64.checked_shl(bits) {
        Some(unit) => x & (unit - 1),
        None => x,
    };
    let whole = match x.checked_shr(bits) {
        Some(q) => q,
        None => 0,
    };
    whole + (low != 0) as u64
}

/// Whether `x` is a multiple of `align`, a power of two (a mask, no division).
pub(crate) const fn is_aligned(x: u64, align: u64) -> bool {
    x & align.wrapping_sub(1) == 0
}

/// The four magic bytes every qcow2 image starts with.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Smallest supported `cluster_bits` (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported `cluster_bits` (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest refcount order (64-bit refcounts).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Maximum size in bytes of the L1 table (QEMU's limit).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Maximum size in bytes of the refcount table (QEMU's limit).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Host offsets must stay below this bound (56 bits).
pub const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Largest accepted number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Bit masks of the v3 incompatible feature field.
pub mod incompatible {
    /// The image was not closed cleanly and may have stale refcounts.
    pub const DIRTY: u64 = 1 << 0;
    /// The image is known to be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    /// The compression type field is not zlib.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
}

/// Bit masks of the v3 compatible feature field.
pub mod compatible {
    /// Refcount updates may be deferred while the dirty bit is set.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Bit masks of the v3 autoclear feature field.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file holds a valid raw image.
    pub const RAW_EXTERNAL: u64 = 1 << 1;
}

/// The qcow2 format version, as `qemu-img`'s `compat` option names it.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Version 2 (`compat=0.10`).
    V2,
    /// Version 3 (`compat=1.1`).
    V3,
}

impl Version {
    /// The number stored in the header.
    pub const fn number(self) -> u32 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }

    /// The `compat` string `qemu-img` uses for this version.
    pub const fn compat(self) -> &'static str {
        match self {
            Version::V2 => "0.10",
            Version::V3 => "1.1",
        }
    }
}
