//! What is wrong with a corrupt image: [`Corruption`], the payload of
//! [`crate::Error::Corrupt`] and [`crate::Error::BackingCorrupt`].

use core::fmt;

/// What on-disk metadata got wrong. `Display` gives a short English
/// sentence fragment; `defmt` logs the variant's name.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// `header_length` is shorter than the version 3 header.
    HeaderTooShort,
    /// `header_length` is larger than a cluster.
    HeaderLongerThanCluster,
    /// `header_length` is not a multiple of 8.
    HeaderLengthUnaligned,
    /// The compression type field disagrees with its incompatible bit.
    CompressionBitMismatch,
    /// `refcount_order` is above 6 (64-bit refcounts).
    RefcountOrderTooLarge,
    /// A version 2 image has refcounts other than 16 bits wide.
    V2RefcountWidth,
    /// The virtual size is beyond what the format can map.
    VirtualSizeTooLarge,
    /// The `data-file-raw` autoclear bit is set without a data file.
    RawDataWithoutDataFile,
    /// A header extension reaches past the first cluster.
    ExtensionBeyondCluster,
    /// A header extension reaches past the end of the device.
    ExtensionBeyondImage,
    /// A header extension does not start on an 8-byte boundary.
    ExtensionMisaligned,
    /// More header extensions than the first cluster can hold.
    TooManyExtensions,
    /// The bitmaps extension has the wrong length.
    BitmapsExtensionLength,
    /// A header structure reaches past the end of the device.
    StructureBeyondImage,
    /// The backing file name is longer than 1023 bytes.
    BackingNameTooLong,
    /// The backing file name lies outside the first cluster.
    BackingNameOutsideCluster,
    /// The backing file name reaches past the end of the device.
    BackingNameBeyondImage,
    /// The backing format name is too long.
    BackingFormatTooLong,
    /// The backing format name reaches past the end of the device.
    BackingFormatBeyondImage,
    /// The data file name reaches past the end of the device.
    DataFileNameBeyondImage,
    /// The L1 table has too few entries for the virtual size.
    L1TooSmall,
    /// The L1 table is larger than 32 MiB.
    L1TooLarge,
    /// The L1 table offset is not cluster aligned.
    L1Unaligned,
    /// The L1 table overlaps the header cluster.
    L1OverlapsHeader,
    /// The L1 table reaches past the host offset limit.
    L1BeyondLimit,
    /// The L1 table reaches past the end of the device.
    L1BeyondImage,
    /// The L1 table overlaps the refcount table.
    L1OverlapsRefcountTable,
    /// An L1 entry a write needs lacks its COPIED flag.
    L1EntryNotCopied,
    /// An L2 table offset is not cluster aligned.
    L2Unaligned,
    /// An L2 table lies past the end of the device.
    L2BeyondImage,
    /// An L2 table overlaps the header, L1 or refcount table.
    L2OverlapsMetadata,
    /// An L2 entry a write needs lacks its COPIED flag.
    L2EntryNotCopied,
    /// An L2 entry of a version 2 image has the zero flag.
    ZeroEntryInV2,
    /// A data cluster offset is not cluster aligned.
    DataUnaligned,
    /// A data cluster lies past the end of the device.
    DataBeyondImage,
    /// A data cluster overlaps the header, L1 or refcount table.
    DataOverlapsMetadata,
    /// A data cluster about to be written is live metadata.
    DataIsMetadata,
    /// A data cluster in the external data file is not at its guest offset.
    DataFileOffsetMismatch,
    /// A compressed cluster reaches past the end of the device.
    CompressedBeyondImage,
    /// A compressed cluster overlaps metadata.
    CompressedOverlapsMetadata,
    /// A compressed cluster in an image with an external data file.
    CompressedWithDataFile,
    /// A compressed stream ends before a whole cluster is decoded.
    CompressedDataShort,
    /// A compressed stream the decoder refused, in the decoder's words.
    Stream(&'static str),
    /// The refcount table has zero clusters.
    RefcountTableEmpty,
    /// The refcount table is larger than 8 MiB.
    RefcountTableTooLarge,
    /// The refcount table offset is not cluster aligned.
    RefcountTableUnaligned,
    /// The refcount table overlaps the header cluster.
    RefcountTableOverlapsHeader,
    /// The refcount table reaches past the host offset limit.
    RefcountTableBeyondLimit,
    /// The refcount table reaches past the end of the device.
    RefcountTableBeyondImage,
    /// A refcount table entry has reserved bits set.
    RefcountTableReservedBits,
    /// A refcount block offset is not cluster aligned.
    RefcountBlockUnaligned,
    /// A refcount block lies past the end of the device.
    RefcountBlockBeyondImage,
    /// A refcount block overlaps the header, L1 or refcount table.
    RefcountBlockOverlapsMetadata,
    /// A refcount block lies past the host offset limit.
    RefcountBlockBeyondLimit,
    /// An allocated cluster has no refcount block.
    RefcountBlockMissing,
    /// A refcount would exceed the refcount width.
    RefcountOverflow,
    /// A cluster being freed already has refcount 0.
    RefcountUnderflow,
    /// A cluster has more references than the refcount width holds.
    TooManyReferences,
    /// A cluster with refcount 0 is live metadata.
    FreeClusterIsMetadata,
    /// One metadata cluster is used as two kinds of table.
    TableKindConflict,
    /// No place for new refcount structures clear of stray entries.
    NoRoomForRefcounts,
    /// The refcount structures must be rebuilt (`Repair::All`).
    RefcountsNeedRebuild,
    /// More snapshots than the format allows.
    TooManySnapshots,
    /// The snapshot table offset is not cluster aligned.
    SnapshotTableUnaligned,
    /// The snapshot table overlaps the header cluster.
    SnapshotTableOverlapsHeader,
    /// The snapshot table reaches past the host offset limit.
    SnapshotTableBeyondLimit,
    /// A snapshot table entry is cut short.
    SnapshotEntryTruncated,
    /// A snapshot's extra data is too large.
    SnapshotExtraTooLarge,
    /// The image's corrupt bit is set (a read-write open).
    MarkedCorrupt,
    /// The image's corrupt bit is set (a change).
    ChangeWhileMarkedCorrupt,
    /// Corruption found while writing dropped the writes since the last flush.
    WritesDropped,
    /// The check at a verifying open found corruption.
    CheckFoundCorruption,
}

impl Corruption {
    /// The description `Display` prints.
    pub const fn text(self) -> &'static str {
        use Corruption::*;
        match self {
            HeaderTooShort => "header_length shorter than the v3 header",
            HeaderLongerThanCluster => "header_length larger than a cluster",
            HeaderLengthUnaligned => "header_length not a multiple of 8",
            CompressionBitMismatch => "compression type disagrees with its feature bit",
            RefcountOrderTooLarge => "refcount_order above 6",
            V2RefcountWidth => "v2 image with refcount width other than 16",
            VirtualSizeTooLarge => "virtual size too large",
            RawDataWithoutDataFile => "data-file-raw requires a data file",
            ExtensionBeyondCluster => "header extension beyond the first cluster",
            ExtensionBeyondImage => "header extension beyond the end of the image",
            ExtensionMisaligned => "header extension misaligned",
            TooManyExtensions => "too many header extensions",
            BitmapsExtensionLength => "bitmaps extension of invalid length",
            StructureBeyondImage => "structure beyond the end of the image",
            BackingNameTooLong => "backing file name longer than 1023 bytes",
            BackingNameOutsideCluster => "backing file name outside the first cluster",
            BackingNameBeyondImage => "backing file name beyond the end of the image",
            BackingFormatTooLong => "backing format name too long",
            BackingFormatBeyondImage => "backing format beyond the end of the image",
            DataFileNameBeyondImage => "data file name beyond the end of the image",
            L1TooSmall => "L1 table too small for the virtual size",
            L1TooLarge => "L1 table larger than 32 MiB",
            L1Unaligned => "L1 table offset not cluster aligned",
            L1OverlapsHeader => "L1 table overlaps the header",
            L1BeyondLimit => "L1 table beyond the host offset limit",
            L1BeyondImage => "L1 table beyond the end of the image",
            L1OverlapsRefcountTable => "L1 table overlaps the refcount table",
            L1EntryNotCopied => "L1 entry without COPIED flag",
            L2Unaligned => "L2 table offset not cluster aligned",
            L2BeyondImage => "L2 table beyond the end of the image",
            L2OverlapsMetadata => "L2 table overlaps the header, L1 or refcount table",
            L2EntryNotCopied => "L2 entry without COPIED flag",
            ZeroEntryInV2 => "zero cluster entry in a v2 image",
            DataUnaligned => "data cluster offset not cluster aligned",
            DataBeyondImage => "data cluster beyond the end of the image",
            DataOverlapsMetadata => "data cluster overlaps the header, L1 or refcount table",
            DataIsMetadata => "data cluster is live metadata",
            DataFileOffsetMismatch => {
                "data cluster offset differs from its guest offset in the external data file"
            }
            CompressedBeyondImage => "compressed cluster beyond the end of the image",
            CompressedOverlapsMetadata => "compressed cluster overlaps metadata",
            CompressedWithDataFile => "compressed cluster in an image with an external data file",
            CompressedDataShort => "compressed cluster data ends early",
            Stream(what) => what,
            RefcountTableEmpty => "refcount table of zero clusters",
            RefcountTableTooLarge => "refcount table larger than 8 MiB",
            RefcountTableUnaligned => "refcount table offset not cluster aligned",
            RefcountTableOverlapsHeader => "refcount table overlaps the header",
            RefcountTableBeyondLimit => "refcount table beyond the host offset limit",
            RefcountTableBeyondImage => "refcount table beyond the end of the image",
            RefcountTableReservedBits => "reserved bits set in a refcount table entry",
            RefcountBlockUnaligned => "refcount block offset not cluster aligned",
            RefcountBlockBeyondImage => "refcount block beyond the end of the image",
            RefcountBlockOverlapsMetadata => {
                "refcount block overlaps the header, L1 or refcount table"
            }
            RefcountBlockBeyondLimit => "refcount block beyond the host offset limit",
            RefcountBlockMissing => "refcount block missing for an allocated cluster",
            RefcountOverflow => "refcount overflow",
            RefcountUnderflow => "freeing a cluster whose refcount is already 0",
            TooManyReferences => "more references than the refcount width holds",
            FreeClusterIsMetadata => "free cluster holds live metadata",
            TableKindConflict => "metadata cluster used as two kinds of table",
            NoRoomForRefcounts => "no room for refcount structures clear of stray entries",
            RefcountsNeedRebuild => "refcount structures need a rebuild (repair all)",
            TooManySnapshots => "too many snapshots",
            SnapshotTableUnaligned => "snapshot table offset not cluster aligned",
            SnapshotTableOverlapsHeader => "snapshot table overlaps the header",
            SnapshotTableBeyondLimit => "snapshot table beyond the host offset limit",
            SnapshotEntryTruncated => "snapshot table entry truncated",
            SnapshotExtraTooLarge => "snapshot extra data too large",
            MarkedCorrupt => "image is marked corrupt; open it read-only",
            ChangeWhileMarkedCorrupt => "image marked corrupt; repair it first",
            WritesDropped => "image marked corrupt; writes since the last flush were dropped",
            CheckFoundCorruption => "check found corruption; open read-only or repair first",
        }
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text())
    }
}
