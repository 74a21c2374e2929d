//! The header area a new image starts with: the header, its extensions and
//! the names of the files it refers to, byte by byte as QEMU lays them out.

use super::header::*;
use super::Version;
use crate::Error;

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
