//! Header extensions: their kinds and where each one lies.

use super::header::*;
use crate::{Corruption, Error};

/// Known header extension types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtensionKind {
    /// Marks the end of the extension area.
    End,
    /// Backing file format name.
    BackingFormat,
    /// Feature name table.
    FeatureNames,
    /// Persistent dirty bitmaps.
    Bitmaps,
    /// Full disk encryption header pointer.
    FullDiskEncryption,
    /// External data file name.
    ExternalDataFile,
    /// Any other type; kept untouched.
    Unknown(u32),
}

impl ExtensionKind {
    /// Maps the on-disk type number.
    pub const fn from_type(t: u32) -> Self {
        match t {
            0 => ExtensionKind::End,
            EXT_BACKING_FORMAT => ExtensionKind::BackingFormat,
            EXT_FEATURE_NAMES => ExtensionKind::FeatureNames,
            EXT_BITMAPS => ExtensionKind::Bitmaps,
            EXT_FULL_DISK_ENCRYPTION => ExtensionKind::FullDiskEncryption,
            EXT_DATA_FILE => ExtensionKind::ExternalDataFile,
            other => ExtensionKind::Unknown(other),
        }
    }
}

/// One header extension's location: its data starts at `offset` (after the
/// 8-byte type/length header) and is `len` bytes long, padded to 8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extension {
    /// The extension type.
    pub kind: ExtensionKind,
    /// Byte offset of the extension data in the image.
    pub offset: u64,
    /// Length of the data in bytes (without padding).
    pub len: u32,
}

impl Extension {
    /// Decodes the 8-byte extension header found at byte `at`, checking that
    /// the extension stays inside the first cluster of `cluster_size` bytes.
    pub fn decode<E>(raw: [u8; 8], at: u64, cluster_size: u64) -> Result<Self, Error<E>> {
        let [t0, t1, t2, t3, l0, l1, l2, l3] = raw;
        let kind = ExtensionKind::from_type(u32::from_be_bytes([t0, t1, t2, t3]));
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        let offset = at + 8;
        if offset + u64::from(len) > cluster_size {
            return Err(Error::corrupt(Corruption::ExtensionBeyondCluster, at));
        }
        Ok(Extension { kind, offset, len })
    }

    /// Byte offset just after this extension and its padding.
    pub const fn next(&self) -> u64 {
        self.offset + (self.len as u64).div_ceil(8) * 8
    }
}
