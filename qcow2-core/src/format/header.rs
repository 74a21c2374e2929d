//! The image header (v2 and v3) and header extensions.

use super::{Version, MAGIC};
use crate::Error;
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
            _ => return Err(Error::Unsupported("qcow2 version other than 2 or 3")),
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
        let corrupt = |what| Err(Error::corrupt(what, 0));
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Error::Unsupported("cluster size outside 512 B..=2 MiB"));
        }
        let cluster = self.cluster_size();
        if self.crypt_method != 0 {
            return Err(Error::Unsupported("encryption"));
        }
        if self.version == Version::V3 {
            if self.header_length < V3_MIN_LENGTH {
                return corrupt("header_length shorter than the v3 header");
            }
            if u64::from(self.header_length) > cluster {
                return corrupt("header_length larger than a cluster");
            }
            if !self.header_length.is_multiple_of(8) {
                return corrupt("header_length not a multiple of 8");
            }
        }
        let known = incompatible::DIRTY
            | incompatible::CORRUPT
            | incompatible::EXTERNAL_DATA
            | incompatible::COMPRESSION_TYPE
            | incompatible::EXTENDED_L2;
        if self.incompatible_features & !known != 0 {
            return Err(Error::Unsupported("unknown incompatible feature bits"));
        }
        if self.incompatible_features & incompatible::EXTENDED_L2 != 0 {
            return Err(Error::Unsupported("extended L2 entries (subclusters)"));
        }
        let type_bit = self.incompatible_features & incompatible::COMPRESSION_TYPE != 0;
        match (self.compression_type, type_bit) {
            (0, false) | (1, true) => {}
            (0 | 1, _) => return corrupt("compression type disagrees with its feature bit"),
            _ => {
                return Err(Error::Unsupported(
                    "compression type other than zlib or zstd",
                ))
            }
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return corrupt("refcount_order above 6");
        }
        if self.version == Version::V2 && self.refcount_order != 4 {
            return corrupt("v2 image with refcount width other than 16");
        }
        if self.backing_file_offset != 0 {
            // QEMU: "Invalid backing file offset" past the first cluster,
            // "Backing file name too long" beyond 1023 bytes or the cluster.
            if self.backing_file_offset > cluster {
                return corrupt("backing file name outside the first cluster");
            }
            if self.backing_file_size > MAX_BACKING_FILE_NAME {
                return corrupt("backing file name longer than 1023 bytes");
            }
            if self.backing_file_offset + u64::from(self.backing_file_size) > cluster {
                return corrupt("backing file name outside the first cluster");
            }
        }
        // L1 table: big enough for the disk, within limits, aligned, not on the header.
        if self.size > (1 << 62) {
            return corrupt("virtual size too large");
        }
        // One L1 entry maps cluster / 8 clusters.
        let needed_l1 = super::shr_ceil(self.size, 2 * self.cluster_bits - 3);
        if u64::from(self.l1_size) < needed_l1 {
            return corrupt("L1 table too small for the virtual size");
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return corrupt("L1 table larger than 32 MiB");
        }
        if self.l1_size > 0 {
            check_table(self.l1_table_offset, l1_bytes, cluster, L1_PLACEMENT)?;
        } else if !super::is_aligned(self.l1_table_offset, cluster) {
            // QEMU insists on an aligned offset even for an empty table.
            return Err(Error::corrupt(L1_PLACEMENT[0], self.l1_table_offset));
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cluster;
        if self.refcount_table_clusters == 0 {
            return corrupt("refcount table of zero clusters");
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return corrupt("refcount table larger than 8 MiB");
        }
        check_table(
            self.refcount_table_offset,
            rt_bytes,
            cluster,
            REFTABLE_PLACEMENT,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return corrupt("too many snapshots");
        }
        if self.nb_snapshots > 0 {
            check_table(self.snapshots_offset, 1, cluster, SNAPSHOT_PLACEMENT)?;
        } else if !super::is_aligned(self.snapshots_offset, cluster) {
            // QEMU checks the alignment even when there are no snapshots.
            return Err(Error::corrupt(SNAPSHOT_PLACEMENT[0], self.snapshots_offset));
        }
        if self.autoclear_features & autoclear::RAW_EXTERNAL != 0
            && self.incompatible_features & incompatible::EXTERNAL_DATA == 0
        {
            return corrupt("data-file-raw requires a data file");
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
                "L1 table overlaps the refcount table",
                self.l1_table_offset,
            ));
        }
        Ok(())
    }
}

/// Messages for one table's placement errors: unaligned, on the header,
/// beyond the offset limit.
type PlacementErrors = [&'static str; 3];

const L1_PLACEMENT: PlacementErrors = [
    "L1 table offset not cluster aligned",
    "L1 table overlaps the header",
    "L1 table beyond the host offset limit",
];
const REFTABLE_PLACEMENT: PlacementErrors = [
    "refcount table offset not cluster aligned",
    "refcount table overlaps the header",
    "refcount table beyond the host offset limit",
];
const SNAPSHOT_PLACEMENT: PlacementErrors = [
    "snapshot table offset not cluster aligned",
    "snapshot table overlaps the header",
    "snapshot table beyond the host offset limit",
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
            return Err(Error::corrupt(
                "header extension beyond the first cluster",
                at,
            ));
        }
        Ok(Extension { kind, offset, len })
    }

    /// Byte offset just after this extension and its padding.
    pub const fn next(&self) -> u64 {
        self.offset + (self.len as u64).div_ceil(8) * 8
    }
}

/// The files outside the image that a new image's header names: its
/// backing file and its external data file (see `CreateOptions::format`
/// and `Qcow2::create_with_files`). Names are bytes as stored: a path on
/// the host, never interpreted by the core. The default names nothing.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExternalFiles<'a> {
    /// Backing file name, stored as given (QEMU resolves a relative name
    /// against the image's directory): 1 to 1023 bytes, no NUL.
    pub backing_file: Option<&'a [u8]>,
    /// Backing file format (`raw`, `qcow2`, ...), 1 to 15 bytes, no NUL;
    /// only with a backing file. Without it readers probe the backing.
    pub backing_format: Option<&'a str>,
    /// External data file name: guest data lives there (version 3 only).
    pub data_file: Option<&'a [u8]>,
    /// The data file is a valid raw image of the guest disk at all times
    /// (`data_file_raw=on`): needs a data file, excludes a backing file,
    /// and maps every guest cluster to the same data file offset up front.
    pub data_file_raw: bool,
}

impl ExternalFiles<'_> {
    /// No backing file and no data file.
    pub const NONE: ExternalFiles<'static> = ExternalFiles {
        backing_file: None,
        backing_format: None,
        data_file: None,
        data_file_raw: false,
    };

    /// Checks the combination for an image of `version`, in QEMU's terms.
    pub fn validate<E>(&self, version: Version) -> Result<(), Error<E>> {
        let plain = |name: &[u8]| !name.is_empty() && !name.contains(&0);
        if let Some(name) = self.backing_file {
            if name.len() > MAX_BACKING_FILE_NAME as usize {
                return Err(Error::InvalidArgument(
                    "backing file name longer than 1023 bytes",
                ));
            }
            if !plain(name) {
                return Err(Error::InvalidArgument(
                    "backing file name empty or with a NUL byte",
                ));
            }
        }
        if let Some(format) = self.backing_format {
            if self.backing_file.is_none() {
                return Err(Error::InvalidArgument(
                    "backing format cannot be used without backing file",
                ));
            }
            if format.len() > MAX_BACKING_FORMAT as usize {
                return Err(Error::InvalidArgument(
                    "backing format name longer than 15 bytes",
                ));
            }
            if !plain(format.as_bytes()) {
                return Err(Error::InvalidArgument(
                    "backing format name empty or with a NUL byte",
                ));
            }
        }
        if let Some(name) = self.data_file {
            if version == Version::V2 {
                return Err(Error::InvalidArgument(
                    "external data files require compat 1.1",
                ));
            }
            if !plain(name) {
                return Err(Error::InvalidArgument(
                    "data file name empty or with a NUL byte",
                ));
            }
        }
        if self.data_file_raw && self.data_file.is_none() {
            return Err(Error::InvalidArgument("data-file-raw requires data-file"));
        }
        if self.data_file_raw && self.backing_file.is_some() {
            return Err(Error::InvalidArgument(
                "backing file and data-file-raw cannot be used at the same time",
            ));
        }
        Ok(())
    }
}

/// QEMU 10's feature name table: (type, bit, name), 48 bytes each.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];
/// Bytes of one feature name table entry.
const FEATURE_ENTRY: u64 = 48;

/// One run of bytes of the header cluster after the header.
#[derive(Debug, Clone, Copy)]
enum Piece<'a> {
    /// An extension's type and length.
    ExtensionHeader(u32, u32),
    /// Bytes as given.
    Bytes(&'a [u8]),
    /// Zero bytes (padding, the end marker).
    Zeros(u64),
    /// QEMU's feature name table.
    FeatureNames,
}

impl Piece<'_> {
    const fn len(&self) -> u64 {
        match self {
            Piece::ExtensionHeader(..) => 8,
            Piece::Bytes(b) => b.len() as u64,
            Piece::Zeros(n) => *n,
            Piece::FeatureNames => FEATURE_NAMES.len() as u64 * FEATURE_ENTRY,
        }
    }

    /// Byte `i` (below `len`) of the piece.
    fn byte(&self, i: u64) -> u8 {
        match self {
            Piece::ExtensionHeader(kind, len) => {
                let word = (u64::from(*kind) << 32) | u64::from(*len);
                word.to_be_bytes().get(i as usize).copied().unwrap_or(0)
            }
            Piece::Bytes(b) => b.get(i as usize).copied().unwrap_or(0),
            Piece::Zeros(_) => 0,
            Piece::FeatureNames => {
                let entry = FEATURE_NAMES.get((i / FEATURE_ENTRY) as usize);
                match (entry, i % FEATURE_ENTRY) {
                    (Some((kind, _, _)), 0) => *kind,
                    (Some((_, bit, _)), 1) => *bit,
                    (Some((_, _, name)), at) => {
                        name.as_bytes().get(at as usize - 2).copied().unwrap_or(0)
                    }
                    (None, _) => 0,
                }
            }
        }
    }
}

/// The header cluster of a new image as QEMU lays it out: the header, the
/// backing format and data file extensions, the feature name table (v3
/// with clusters above 4 KiB), the end marker, then the backing file name.
#[derive(Debug, Clone, Copy)]
pub struct HeaderArea<'a> {
    header: Header,
    pieces: [Piece<'a>; 10],
}

impl<'a> HeaderArea<'a> {
    /// Lays out `header` with `files` (already validated) and sets the
    /// header's backing file fields and data file feature bits to match.
    /// [`Error::NoSpace`] when it all does not fit in the first cluster.
    pub fn new<E>(header: &Header, files: &ExternalFiles<'a>) -> Result<Self, Error<E>> {
        use super::{autoclear, incompatible};
        let pad =
            |b: Option<&[u8]>| Piece::Zeros(b.map_or(0, |b| (b.len() as u64).wrapping_neg() & 7));
        let ext_header = |kind, b: Option<&[u8]>| match b {
            Some(b) => Piece::ExtensionHeader(kind, b.len() as u32),
            None => Piece::Zeros(0),
        };
        let format = files.backing_format.map(str::as_bytes);
        let data = files.data_file;
        let v3 = header.version == Version::V3;
        // QEMU leaves the table out where it would crowd small clusters.
        let names = v3 && header.cluster_size() > 4096;
        let mut area = HeaderArea {
            header: *header,
            pieces: [
                ext_header(EXT_BACKING_FORMAT, format),
                Piece::Bytes(format.unwrap_or_default()),
                pad(format),
                ext_header(EXT_DATA_FILE, data),
                Piece::Bytes(data.unwrap_or_default()),
                pad(data),
                if names {
                    Piece::ExtensionHeader(
                        EXT_FEATURE_NAMES,
                        (FEATURE_NAMES.len() as u64 * FEATURE_ENTRY) as u32,
                    )
                } else {
                    Piece::Zeros(0)
                },
                if names {
                    Piece::FeatureNames
                } else {
                    Piece::Zeros(0)
                },
                // The end marker.
                Piece::Zeros(8),
                Piece::Bytes(files.backing_file.unwrap_or_default()),
            ],
        };
        let name_at = area.backing_file_offset();
        let h = &mut area.header;
        (h.backing_file_offset, h.backing_file_size) = match files.backing_file {
            Some(name) => (name_at, name.len() as u32),
            None => (0, 0),
        };
        if data.is_some() {
            h.incompatible_features |= incompatible::EXTERNAL_DATA;
        }
        if files.data_file_raw {
            h.autoclear_features |= autoclear::RAW_EXTERNAL;
        }
        if area.end() > header.cluster_size() {
            return Err(Error::NoSpace);
        }
        Ok(area)
    }

    /// The header with its backing file fields and feature bits set.
    pub const fn header(&self) -> &Header {
        &self.header
    }

    /// Byte offset of the backing file name (where it would go).
    fn backing_file_offset(&self) -> u64 {
        // Every piece but the last, the name.
        let before_name = self.pieces.iter().take(self.pieces.len() - 1);
        self.header.extensions_offset() + before_name.map(Piece::len).sum::<u64>()
    }

    /// Byte offset just past the last byte written.
    pub fn end(&self) -> u64 {
        self.header.extensions_offset() + self.pieces.iter().map(Piece::len).sum::<u64>()
    }

    /// Fills `out` with the header cluster's bytes from byte `at` on
    /// (zeros past [`HeaderArea::end`]).
    #[inline(never)]
    pub fn fill(&self, at: u64, out: &mut [u8]) {
        out.fill(0);
        let mut raw = [0u8; V3_LENGTH as usize];
        if self.header.encode(&mut raw).is_some() {
            let len = self.header.encoded_len() as u64;
            copy_overlap(at, out, 0, len, |i| {
                raw.get(i as usize).copied().unwrap_or(0)
            });
        }
        let mut start = self.header.extensions_offset();
        for piece in &self.pieces {
            copy_overlap(at, out, start, piece.len(), |i| piece.byte(i));
            start += piece.len();
        }
    }
}

/// Writes bytes `byte(i)` of a run `[start, start+len)` into the part of
/// `out` (which holds bytes from `at` on) that the run covers.
fn copy_overlap(at: u64, out: &mut [u8], start: u64, len: u64, byte: impl Fn(u64) -> u8) {
    let from = start.max(at);
    let to = (start + len).min(at + out.len() as u64);
    for pos in from..to {
        if let Some(b) = out.get_mut((pos - at) as usize) {
            *b = byte(pos - start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{compatible, incompatible};

    fn sample(version: Version) -> Header {
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: if version == Version::V3 {
                compatible::LAZY_REFCOUNTS
            } else {
                0
            },
            autoclear_features: 0,
            refcount_order: 4,
            header_length: if version == Version::V3 {
                V3_LENGTH
            } else {
                V2_LENGTH
            },
            compression_type: 0,
        }
    }

    #[test]
    fn round_trip_both_versions() {
        for v in [Version::V2, Version::V3] {
            let h = sample(v);
            let mut buf = [0u8; 512];
            h.encode(&mut buf).unwrap();
            assert_eq!(&buf[..4], b"QFI\xfb");
            let back = Header::decode::<()>(&buf).unwrap();
            assert_eq!(back, h);
            back.validate::<()>().unwrap();
        }
    }

    #[test]
    fn encode_leaves_extension_bytes_alone() {
        let mut h = sample(Version::V3);
        h.header_length = 104;
        let mut buf = [0xeeu8; 512];
        h.encode(&mut buf).unwrap();
        assert!(buf[104..].iter().all(|b| *b == 0xee));
        let mut buf = [0xeeu8; 512];
        sample(Version::V2).encode(&mut buf).unwrap();
        assert!(buf[72..].iter().all(|b| *b == 0xee));
    }

    #[test]
    fn field_offsets_match_the_spec() {
        let h = sample(Version::V3);
        let mut buf = [0u8; 512];
        h.encode(&mut buf).unwrap();
        assert_eq!(u32::from_be_bytes(buf[20..24].try_into().unwrap()), 16);
        assert_eq!(u64::from_be_bytes(buf[24..32].try_into().unwrap()), 1 << 30);
        assert_eq!(u64::from_be_bytes(buf[40..48].try_into().unwrap()), 0x30000);
        assert_eq!(u64::from_be_bytes(buf[48..56].try_into().unwrap()), 0x10000);
        assert_eq!(u64::from_be_bytes(buf[80..88].try_into().unwrap()), 1);
        assert_eq!(u32::from_be_bytes(buf[96..100].try_into().unwrap()), 4);
        assert_eq!(u32::from_be_bytes(buf[100..104].try_into().unwrap()), 112);
    }

    #[test]
    fn bad_fields_are_refused_precisely() {
        let mut buf = [0u8; 512];
        assert_eq!(Header::decode::<()>(&buf), Err(Error::NotQcow2));
        sample(Version::V3).encode(&mut buf).unwrap();
        buf[7] = 4;
        assert!(matches!(
            Header::decode::<()>(&buf),
            Err(Error::Unsupported(_))
        ));

        let check = |f: &dyn Fn(&mut Header)| {
            let mut h = sample(Version::V3);
            f(&mut h);
            h.validate::<()>()
        };
        assert_eq!(
            check(&|h| h.crypt_method = 1),
            Err(Error::Unsupported("encryption"))
        );
        assert_eq!(check(&|h| h.backing_file_offset = 0x200), Ok(()));
        assert!(matches!(
            check(&|h| h.cluster_bits = 8),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            check(&|h| h.cluster_bits = 22),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            check(&|h| h.refcount_order = 7),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.l1_size = 1),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.l1_table_offset = 0x30200),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.l1_table_offset = 0),
            Err(Error::Corrupt { .. })
        ));
        // Overlapping tables pass field validation; read-write opens refuse them.
        let mut h = sample(Version::V3);
        h.l1_table_offset = 0x10000;
        assert!(h.validate::<()>().is_ok());
        assert!(matches!(
            h.check_tables_apart::<()>(),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.snapshots_offset = 0x10008),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.autoclear_features = crate::format::autoclear::RAW_EXTERNAL),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.refcount_table_clusters = 0),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.refcount_table_offset = 1 << 56),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            check(&|h| h.header_length = 96),
            Err(Error::Corrupt { .. })
        ));
        assert_eq!(
            check(&|h| h.incompatible_features = 1 << 5),
            Err(Error::Unsupported("unknown incompatible feature bits"))
        );
        assert_eq!(
            check(&|h| h.incompatible_features = incompatible::EXTENDED_L2),
            Err(Error::Unsupported("extended L2 entries (subclusters)"))
        );
        // External data files open (the data file is attached later).
        assert_eq!(
            check(&|h| h.incompatible_features = incompatible::EXTERNAL_DATA),
            Ok(())
        );
        assert!(matches!(
            check(&|h| h.compression_type = 1),
            Err(Error::Corrupt { .. })
        ));
        assert!(check(&|h| {
            h.compression_type = 1;
            h.incompatible_features = incompatible::COMPRESSION_TYPE
        })
        .is_ok());
    }

    #[test]
    fn empty_ranges_overlap_nothing() {
        assert!(!overlaps(0x600, 512, 0x670, 0));
        assert!(!overlaps(0x670, 0, 0x600, 512));
        assert!(overlaps(0x600, 512, 0x670, 1));
        assert!(!overlaps(0, 512, 512, 512));
    }

    /// The header cluster `area` makes, as far as `len` bytes.
    fn area_bytes(area: &HeaderArea, len: usize) -> [u8; 2048] {
        let mut out = [0xeeu8; 2048];
        // In odd windows, to exercise the overlap arithmetic.
        let mut at = 0;
        for step in [1, 7, 100, 512, 3].iter().cycle() {
            if at >= len {
                break;
            }
            let end = (at + step).min(len);
            area.fill(at as u64, &mut out[at..end]);
            at = end;
        }
        out
    }

    #[test]
    fn header_area_matches_qemu() {
        // qemu-img create -f qcow2 -b base.raw -F raw ov.qcow2: format
        // extension, feature table, end marker, name at 0x210.
        let files = ExternalFiles {
            backing_file: Some(b"base.raw"),
            backing_format: Some("raw"),
            ..ExternalFiles::NONE
        };
        let area = HeaderArea::new::<()>(&sample(Version::V3), &files).unwrap();
        assert_eq!(area.header().backing_file_offset, 0x210);
        assert_eq!(area.header().backing_file_size, 8);
        assert_eq!(area.end(), 0x218);
        let b = area_bytes(&area, 0x300);
        assert_eq!(&b[8..20], &[0, 0, 0, 0, 0, 0, 2, 0x10, 0, 0, 0, 8]);
        assert_eq!(&b[0x70..0x80], b"\xe2\x79\x2a\xca\0\0\0\x03raw\0\0\0\0\0");
        assert_eq!(&b[0x80..0x88], &[0x68, 0x03, 0xf8, 0x57, 0, 0, 1, 0x80]);
        assert_eq!(&b[0x88..0x94], b"\0\0dirty bit\0");
        assert_eq!(
            &b[0x88 + 48 * 2..0x88 + 48 * 2 + 20],
            b"\0\x02external data file"
        );
        assert_eq!(
            &b[0x88 + 48 * 7..0x88 + 48 * 7 + 19],
            b"\x02\x01raw external data"
        );
        assert!(b[0x208..0x210].iter().all(|&x| x == 0));
        assert_eq!(&b[0x210..0x218], b"base.raw");
        assert!(b[0x218..0x300].iter().all(|&x| x == 0));
        assert_eq!(Header::decode::<()>(&b).unwrap(), *area.header());

        // v2: no feature table; 512-byte clusters: none either.
        let area = HeaderArea::new::<()>(&sample(Version::V2), &files).unwrap();
        assert_eq!(area.header().backing_file_offset, 0x60);
        let b = area_bytes(&area, 0x100);
        assert_eq!(&b[0x48..0x50], &[0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 3]);
        assert_eq!(&b[0x60..0x68], b"base.raw");
        let mut h = sample(Version::V3);
        h.cluster_bits = 9;
        let area = HeaderArea::new::<()>(&h, &files).unwrap();
        assert_eq!(area.header().backing_file_offset, 0x88);
        // 4 KiB clusters are the largest without the table, as in QEMU.
        h.cluster_bits = 12;
        assert_eq!(HeaderArea::new::<()>(&h, &files).unwrap().end(), 0x90);
        h.cluster_bits = 13;
        assert_eq!(HeaderArea::new::<()>(&h, &files).unwrap().end(), 0x218);
        // Nothing named: the feature table and the end marker only.
        let area = HeaderArea::new::<()>(&sample(Version::V3), &ExternalFiles::NONE).unwrap();
        assert_eq!(area.header().backing_file_offset, 0);
        assert_eq!(area.end(), 0x70 + 8 + 384 + 8);
    }

    #[test]
    fn header_area_data_file() {
        // qemu-img create -f qcow2 -o data_file=d.raw,data_file_raw=on.
        let files = ExternalFiles {
            data_file: Some(b"d.raw"),
            data_file_raw: true,
            ..ExternalFiles::NONE
        };
        files.validate::<()>(Version::V3).unwrap();
        let area = HeaderArea::new::<()>(&sample(Version::V3), &files).unwrap();
        let h = area.header();
        assert_eq!(h.incompatible_features, incompatible::EXTERNAL_DATA);
        assert_eq!(h.autoclear_features, crate::format::autoclear::RAW_EXTERNAL);
        assert!(h.has_data_file() && h.data_file_raw() && !h.has_backing_file());
        let b = area_bytes(&area, 0x100);
        assert_eq!(&b[0x70..0x80], b"DATA\0\0\0\x05d.raw\0\0\0");
        assert_eq!(&b[0x80..0x84], &[0x68, 0x03, 0xf8, 0x57]);
        // Both: the format extension comes first.
        let files = ExternalFiles {
            backing_file: Some(b"b"),
            backing_format: Some("qcow2"),
            data_file: Some(b"data"),
            data_file_raw: false,
        };
        let area = HeaderArea::new::<()>(&sample(Version::V3), &files).unwrap();
        let b = area_bytes(&area, 0x300);
        assert_eq!(&b[0x70..0x78], &[0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 5]);
        assert_eq!(&b[0x80..0x90], b"DATA\0\0\0\x04data\0\0\0\0");
        assert_eq!(area.header().backing_file_offset, 0x90 + 8 + 384 + 8);
    }

    #[test]
    fn external_files_are_checked_as_qemu_does() {
        let long = [b'a'; 1024];
        let bad =
            |f: ExternalFiles, v| matches!(f.validate::<()>(v), Err(Error::InvalidArgument(_)));
        let backing = |name| ExternalFiles {
            backing_file: Some(name),
            ..ExternalFiles::NONE
        };
        assert!(bad(backing(&long), Version::V3));
        assert!(!bad(backing(&long[..1023]), Version::V3));
        assert!(bad(backing(b""), Version::V3));
        assert!(bad(backing(b"a\0b"), Version::V3));
        let format_only = ExternalFiles {
            backing_format: Some("raw"),
            ..ExternalFiles::NONE
        };
        assert!(bad(format_only, Version::V3));
        let long_format = ExternalFiles {
            backing_format: Some("qcow2qcow2qcow2q"),
            ..backing(b"b")
        };
        assert!(bad(long_format, Version::V3));
        let data = ExternalFiles {
            data_file: Some(b"d"),
            ..ExternalFiles::NONE
        };
        assert!(bad(data, Version::V2));
        assert!(!bad(data, Version::V3));
        let raw_only = ExternalFiles {
            data_file_raw: true,
            ..ExternalFiles::NONE
        };
        assert!(bad(raw_only, Version::V3));
        let raw_and_backing = ExternalFiles {
            data_file_raw: true,
            ..ExternalFiles {
                backing_file: Some(b"b"),
                ..data
            }
        };
        assert!(bad(raw_and_backing, Version::V3));
        // A name that does not fit: no space, as QEMU's ENOSPC.
        let mut h = sample(Version::V3);
        h.cluster_bits = 9;
        assert_eq!(
            HeaderArea::new::<()>(&h, &backing(&long[..1023])).map(|_| ()),
            Err(Error::NoSpace)
        );
        // Header, end marker, name: to the last byte of the cluster.
        assert!(HeaderArea::new::<()>(&h, &backing(&long[..512 - 0x78])).is_ok());
        assert_eq!(
            HeaderArea::new::<()>(&h, &backing(&long[..512 - 0x77])).map(|_| ()),
            Err(Error::NoSpace)
        );
    }

    #[test]
    fn backing_names_are_checked_as_qemu_does() {
        let check = |off, len| {
            let mut h = sample(Version::V3);
            h.backing_file_offset = off;
            h.backing_file_size = len;
            h.validate::<()>()
        };
        assert_eq!(check(0x200, 4), Ok(()));
        assert_eq!(check(0, 4000), Ok(()));
        assert_eq!(check(0x200, 0), Ok(()));
        assert_eq!(check(0x400, 1023), Ok(()));
        assert_eq!(check(65536 - 1023, 1023), Ok(()));
        for (off, len) in [
            (0x400, 1024),
            (65535, 2),
            (65536, 1),
            (65537, 0),
            (1 << 62, 4),
            (u64::MAX, u32::MAX),
        ] {
            assert!(
                matches!(check(off, len), Err(Error::Corrupt { .. })),
                "{off} {len}"
            );
        }
    }

    #[test]
    fn extension_bounds() {
        let raw = [0x68, 0x03, 0xf8, 0x57, 0, 0, 0, 48];
        let e = Extension::decode::<()>(raw, 112, 65536).unwrap();
        assert_eq!(e.kind, ExtensionKind::FeatureNames);
        assert_eq!(e.next(), 112 + 8 + 48);
        let raw = [0, 0, 0, 9, 0, 0, 0, 5];
        let e = Extension::decode::<()>(raw, 112, 65536).unwrap();
        assert_eq!(e.kind, ExtensionKind::Unknown(9));
        assert_eq!(e.next(), 112 + 8 + 8);
        let raw = [0, 0, 0, 9, 0, 0, 2, 0];
        assert!(Extension::decode::<()>(raw, 112, 512).is_err());
    }
}
