//! What an image needs that this library does not do: [`Feature`], the
//! payload of [`crate::Error::Unsupported`].

use core::fmt;

/// A feature, or a limit, of the format or of this build that refuses the
/// operation. `Display` names it; `defmt` logs the variant's name.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Feature {
    /// A qcow2 version other than 2 or 3.
    Version,
    /// A cluster size outside 512 B..=2 MiB.
    ClusterSize,
    /// Encrypted images (AES or LUKS).
    Encryption,
    /// Incompatible feature bits this library does not know.
    UnknownIncompatibleBits,
    /// Extended L2 entries (subclusters).
    ExtendedL2,
    /// A compression type other than zlib or zstd (header check).
    CompressionTypeOther,
    /// A compression type with no decoder mapping.
    CompressionType,
    /// Writing, in a build without the `write` feature.
    WriteFeatureDisabled,
    /// Writing an image with internal snapshots.
    Snapshots,
    /// Writing an image with persistent bitmaps.
    PersistentBitmaps,
    /// Resizing an image.
    Resize,
    /// Guest I/O on an image whose backing file is not attached.
    BackingNotAttached,
    /// Guest I/O on an image whose external data file is not attached.
    DataFileNotAttached,
    /// An external data file bit with neither a name nor a file attached.
    DataFileUnnamed,
    /// Compressed writes to an image with an external data file.
    CompressedWriteWithDataFile,
    /// Compressed writes to a raw image (a caller's raw-disk path).
    CompressedWriteToRaw,
    /// What the decoder refused, in the decoder's words.
    Decoder(&'static str),
}

impl Feature {
    /// The description `Display` prints.
    pub const fn text(self) -> &'static str {
        use Feature::*;
        match self {
            Version => "qcow2 version other than 2 or 3",
            ClusterSize => "cluster size outside 512 B..=2 MiB",
            Encryption => "encryption",
            UnknownIncompatibleBits => "unknown incompatible feature bits",
            ExtendedL2 => "extended L2 entries (subclusters)",
            CompressionTypeOther => "compression type other than zlib or zstd",
            CompressionType => "compression type",
            WriteFeatureDisabled => "writing (qcow2-core was built without its `write` feature)",
            Snapshots => "writing images with internal snapshots",
            PersistentBitmaps => "writing images with persistent bitmaps",
            Resize => "resizing images",
            BackingNotAttached => {
                "the image has a backing file that is not attached (Qcow2::with_backing)"
            }
            DataFileNotAttached => {
                "the image has an external data file that is not attached (Qcow2::attach_data_file)"
            }
            DataFileUnnamed => "'data-file' is required for this image",
            CompressedWriteWithDataFile => {
                "compressed writes to an image with an external data file"
            }
            CompressedWriteToRaw => "compressed writes to raw images",
            Decoder(what) => what,
        }
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}
