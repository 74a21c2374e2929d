//! The image header (v2 and v3) and header extensions.

use super::{Version, MAGIC};
use crate::{Corruption, Error, Feature};
use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Length of the version 2 header.
pub const V2_LENGTH: u32 = 72;
/// Smallest valid `header_length` of a version 3 header.
pub const V3_MIN_LENGTH: u32 = 104;
/// The `header_length` QEMU (and this crate) writes for version 3.
pub const V3_LENGTH: u32 = 112;

/// Longest backing file name QEMU reads or writes, in bytes.
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// Longest backing format name: QEMU keeps it in 16 bytes with its
/// terminating NUL.
pub const MAX_BACKING_FORMAT: u32 = 15;

/// Type of the backing format extension.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Type of the feature name table extension.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Type of the persistent bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Type of the full disk encryption extension.
pub const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
/// Type of the external data file name extension.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The header exactly as stored, big-endian, version 3 layout.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 4],
    version: U32,
    backing_file_offset: U64,
    backing_file_size: U32,
    cluster_bits: U32,
    size: U64,
    crypt_method: U32,
    l1_size: U32,
    l1_table_offset: U64,
    refcount_table_offset: U64,
    refcount_table_clusters: U32,
    nb_snapshots: U32,
    snapshots_offset: U64,
    incompatible_features: U64,
    compatible_features: U64,
    autoclear_features: U64,
    refcount_order: U32,
    header_length: U32,
    compression_type: u8,
    padding: [u8; 7],
}

const _: () = assert!(core::mem::size_of::<RawHeader>() == V3_LENGTH as usize);

/// The decoded image header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: Version,
    /// Host offset of the backing file name, 0 when there is none.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Encryption method, 0 for none.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Length of the header in bytes; extensions follow it.
    pub header_length: u32,
    /// Compression type: 0 zlib, 1 zstd.
    pub compression_type: u8,
}

impl Header {
    /// Decodes the header from the start of the image. `bytes` must hold at
    /// least [`V3_LENGTH`] bytes (a whole first sector does).
    pub fn decode<E>(bytes: &[u8]) -> Result<Self, Error<E>> {
        let (raw, _) = RawHeader::read_from_prefix(bytes).map_err(|_| Error::NotQcow2)?;
        if raw.magic != MAGIC {
            return Err(Error::NotQcow2);
        }
        let version = match raw.version.get() {
            2 => Version::V2,
            3 => Version::V3,
            _ => return Err(Error::Unsupported(Feature::Version)),
        };
        let mut header = Header {
            version,
            backing_file_offset: raw.backing_file_offset.get(),
            backing_file_size: raw.backing_file_size.get(),
            cluster_bits: raw.cluster_bits.get(),
            size: raw.size.get(),
            crypt_method: raw.crypt_method.get(),
            l1_size: raw.l1_size.get(),
            l1_table_offset: raw.l1_table_offset.get(),
            refcount_table_offset: raw.refcount_table_offset.get(),
            refcount_table_clusters: raw.refcount_table_clusters.get(),
            nb_snapshots: raw.nb_snapshots.get(),
            snapshots_offset: raw.snapshots_offset.get(),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_LENGTH,
            compression_type: 0,
        };
        if version == Version::V3 {
            header.incompatible_features = raw.incompatible_features.get();
            header.compatible_features = raw.compatible_features.get();
            header.autoclear_features = raw.autoclear_features.get();
            header.refcount_order = raw.refcount_order.get();
            header.header_length = raw.header_length.get();
            if header.header_length > V3_MIN_LENGTH {
                header.compression_type = raw.compression_type;
            }
        }
        Ok(header)
    }

    /// Encodes the header into the start of `out`, touching only the first
    /// [`Header::encoded_len`] bytes so that extensions after it survive.
    pub fn encode(&self, out: &mut [u8]) -> Option<()> {
        let raw = RawHeader {
            magic: MAGIC,
            version: U32::new(self.version.number()),
            backing_file_offset: U64::new(self.backing_file_offset),
            backing_file_size: U32::new(self.backing_file_size),
            cluster_bits: U32::new(self.cluster_bits),
            size: U64::new(self.size),
            crypt_method: U32::new(self.crypt_method),
            l1_size: U32::new(self.l1_size),
            l1_table_offset: U64::new(self.l1_table_offset),
            refcount_table_offset: U64::new(self.refcount_table_offset),
            refcount_table_clusters: U32::new(self.refcount_table_clusters),
            nb_snapshots: U32::new(self.nb_snapshots),
            snapshots_offset: U64::new(self.snapshots_offset),
            incompatible_features: U64::new(self.incompatible_features),
            compatible_features: U64::new(self.compatible_features),
            autoclear_features: U64::new(self.autoclear_features),
            refcount_order: U32::new(self.refcount_order),
            header_length: U32::new(self.header_length),
            compression_type: self.compression_type,
            padding: [0; 7],
        };
        let len = self.encoded_len();
        let src = raw.as_bytes().get(..len)?;
        out.get_mut(..len)?.copy_from_slice(src);
        Some(())
    }

    /// Number of leading bytes [`Header::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        match self.version {
            Version::V2 => V2_LENGTH as usize,
            Version::V3 => self.header_length.clamp(V3_MIN_LENGTH, V3_LENGTH) as usize,
        }
    }

    /// Cluster size in bytes.
    pub const fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Byte offset of the first header extension.
    pub const fn extensions_offset(&self) -> u64 {
        self.header_length as u64
    }

    /// Whether the header names a backing file: a name offset and a
    /// non-empty length (QEMU ignores the length when the offset is 0, and
    /// an empty name means no backing file). The name itself may still
    /// start with a NUL byte, which QEMU also reads as no backing file:
    /// `Qcow2::backing_file_name` has the last word.
    pub const fn has_backing_file(&self) -> bool {
        self.backing_file_offset != 0 && self.backing_file_size != 0
    }

    /// Whether guest data lives in an external data file (incompatible
    /// bit 2; the name is in the data file extension).
    pub const fn has_data_file(&self) -> bool {
        self.incompatible_features & super::incompatible::EXTERNAL_DATA != 0
    }

    /// Whether the external data file is a valid raw image of the guest
    /// disk (autoclear bit 1, meaningful with a data file only).
    pub const fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear_features & super::autoclear::RAW_EXTERNAL != 0
    }

    /// Checks every field that can be checked without the device, refusing
    /// features this crate does not implement with [`Error::Unsupported`].
    pub fn validate<E>(&self) -> Result<(), Error<E>> {
        use super::*;
        // In QEMU's order: the first problem found is the one reported.
        self.validate_format()?;
        self.validate_backing_name()?;
        self.validate_tables()?;
        let corrupt = |what| Err(Error::corrupt(what, 0));
        if self.autoclear_features & autoclear::RAW_EXTERNAL != 0
            && self.incompatible_features & incompatible::EXTERNAL_DATA == 0
        {
            return corrupt(Corruption::RawDataWithoutDataFile);
        }
        Ok(())
    }

    /// [`Header::validate`]: cluster size, encryption, header length, feature bits, compression and refcount width.
    fn validate_format<E>(&self) -> Result<(), Error<E>> {
        use super::*;
        let corrupt = |what| Err(Error::corrupt(what, 0));
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Error::Unsupported(Feature::ClusterSize));
        }
        let cluster = self.cluster_size();
        if self.crypt_method != 0 {
            return Err(Error::Unsupported(Feature::Encryption));
        }
        if self.version == Version::V3 {
            if self.header_length < V3_MIN_LENGTH {
                return corrupt(Corruption::HeaderTooShort);
            }
            if u64::from(self.header_length) > cluster {
                return corrupt(Corruption::HeaderLongerThanCluster);
            }
            if !self.header_length.is_multiple_of(8) {
                return corrupt(Corruption::HeaderLengthUnaligned);
            }
        }
        let known = incompatible::DIRTY
            | incompatible::CORRUPT
            | incompatible::EXTERNAL_DATA
            | incompatible::COMPRESSION_TYPE
            | incompatible::EXTENDED_L2;
        if self.incompatible_features & !known != 0 {
            return Err(Error::Unsupported(Feature::UnknownIncompatibleBits));
        }
        if self.incompatible_features & incompatible::EXTENDED_L2 != 0 {
            return Err(Error::Unsupported(Feature::ExtendedL2));
        }
        let type_bit = self.incompatible_features & incompatible::COMPRESSION_TYPE != 0;
        match (self.compression_type, type_bit) {
            (0, false) | (1, true) => {}
            (0 | 1, _) => return corrupt(Corruption::CompressionBitMismatch),
            _ => return Err(Error::Unsupported(Feature::CompressionTypeOther)),
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return corrupt(Corruption::RefcountOrderTooLarge);
        }
        if self.version == Version::V2 && self.refcount_order != 4 {
            return corrupt(Corruption::V2RefcountWidth);
        }
        Ok(())
    }

    /// [`Header::validate`]: where the backing file name lies.
    fn validate_backing_name<E>(&self) -> Result<(), Error<E>> {
        let corrupt = |what| Err(Error::corrupt(what, 0));
        let cluster = self.cluster_size();
        if self.backing_file_offset != 0 {
            // QEMU: "Invalid backing file offset" past the first cluster,
            // "Backing file name too long" beyond 1023 bytes or the cluster.
            if self.backing_file_offset > cluster {
                return corrupt(Corruption::BackingNameOutsideCluster);
            }
            if self.backing_file_size > MAX_BACKING_FILE_NAME {
                return corrupt(Corruption::BackingNameTooLong);
            }
            if self.backing_file_offset + u64::from(self.backing_file_size) > cluster {
                return corrupt(Corruption::BackingNameOutsideCluster);
            }
        }
        Ok(())
    }

    /// [`Header::validate`]: the virtual size and the L1, refcount and snapshot tables.
    fn validate_tables<E>(&self) -> Result<(), Error<E>> {
        use super::*;
        let corrupt = |what| Err(Error::corrupt(what, 0));
        let cluster = self.cluster_size();
        // L1 table: big enough for the disk, within limits, aligned, not on the header.
        if self.size > (1 << 62) {
            return corrupt(Corruption::VirtualSizeTooLarge);
        }
        // One L1 entry maps cluster / 8 clusters.
        let needed_l1 = super::shr_ceil(self.size, 2 * self.cluster_bits - 3);
        if u64::from(self.l1_size) < needed_l1 {
            return corrupt(Corruption::L1TooSmall);
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return corrupt(Corruption::L1TooLarge);
        }
        if self.l1_size > 0 {
            check_table(self.l1_table_offset, l1_bytes, cluster, L1_PLACEMENT)?;
        } else if !super::is_aligned(self.l1_table_offset, cluster) {
            // QEMU insists on an aligned offset even for an empty table.
            return Err(Error::corrupt(L1_PLACEMENT[0], self.l1_table_offset));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cluster;
        if self.refcount_table_clusters == 0 {
            return corrupt(Corruption::RefcountTableEmpty);
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return corrupt(Corruption::RefcountTableTooLarge);
        }
        check_table(
            self.refcount_table_offset,
            rt_bytes,
            cluster,
            REFTABLE_PLACEMENT,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return corrupt(Corruption::TooManySnapshots);
        }
        if self.nb_snapshots > 0 {
            check_table(self.snapshots_offset, 1, cluster, SNAPSHOT_PLACEMENT)?;
        } else if !super::is_aligned(self.snapshots_offset, cluster) {
            // QEMU checks the alignment even when there are no snapshots.
            return Err(Error::corrupt(SNAPSHOT_PLACEMENT[0], self.snapshots_offset));
        }
        Ok(())
    }

    /// The first overlap between the L1 table and the refcount table, as
    /// an error. QEMU opens such an image (reads do not use the refcount
    /// table) and refuses only writes; a repair rebuilds the refcount
    /// structures elsewhere. Read-write opens refuse it up front.
    pub fn check_tables_apart<E>(&self) -> Result<(), Error<E>> {
        let cluster = self.cluster_size();
        let l1_bytes = u64::from(self.l1_size) * 8;
        let rt_bytes = u64::from(self.refcount_table_clusters) * cluster;
        if overlaps(
            self.l1_table_offset,
            l1_bytes,
            self.refcount_table_offset,
            rt_bytes,
        ) {
            return Err(Error::corrupt(
                Corruption::L1OverlapsRefcountTable,
                self.l1_table_offset,
            ));
        }
        Ok(())
    }
}

/// One table's placement errors: unaligned, on the header, beyond the
/// offset limit.
type PlacementErrors = [Corruption; 3];

const L1_PLACEMENT: PlacementErrors = [
    Corruption::L1Unaligned,
    Corruption::L1OverlapsHeader,
    Corruption::L1BeyondLimit,
];
const REFTABLE_PLACEMENT: PlacementErrors = [
    Corruption::RefcountTableUnaligned,
    Corruption::RefcountTableOverlapsHeader,
    Corruption::RefcountTableBeyondLimit,
];
const SNAPSHOT_PLACEMENT: PlacementErrors = [
    Corruption::SnapshotTableUnaligned,
    Corruption::SnapshotTableOverlapsHeader,
    Corruption::SnapshotTableBeyondLimit,
];

/// Checks a metadata table's placement: cluster aligned, after the header
/// cluster, and wholly below the host offset limit.
fn check_table<E>(
    offset: u64,
    len: u64,
    cluster: u64,
    errors: PlacementErrors,
) -> Result<(), Error<E>> {
    let [unaligned, on_header, too_far] = errors;
    if !super::is_aligned(offset, cluster) {
        return Err(Error::corrupt(unaligned, offset));
    }
    if offset == 0 {
        return Err(Error::corrupt(on_header, offset));
    }
    match offset.checked_add(len) {
        Some(end) if end <= super::MAX_HOST_OFFSET => Ok(()),
        _ => Err(Error::corrupt(too_far, offset)),
    }
}

/// Whether byte ranges `[a, a+alen)` and `[b, b+blen)` intersect (an
/// empty range intersects nothing).
pub const fn overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    alen > 0 && blen > 0 && a < b.saturating_add(blen) && b < a.saturating_add(alen)
}

pub use super::area::{ExternalFiles, HeaderArea};
pub use super::extension::{Extension, ExtensionKind};

#[cfg(test)]
mod tests;
