//! The single error type of the core, and the error of a failed open.
//! What is corrupt ([`Corruption`]) and what is not supported
//! ([`Feature`]) are enums of their own, so callers and tests match on
//! values; their `Display` is the text the error prints.

mod corruption;
mod feature;

use core::fmt;

pub use corruption::Corruption;
pub use feature::Feature;

/// Everything that can go wrong with an image.
///
/// `E` is the error type of the underlying [`crate::BlockDevice`]. Every
/// payload is small and `Copy` (enums, static strings and offsets), so
/// errors are cheap to return through async layers. New variants may be
/// added: match with a wildcard, or map through [`Error::kind`].
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error<E> {
    /// The underlying device failed.
    Io(E),
    /// The device does not start with a qcow2 header.
    NotQcow2,
    /// The image, or the operation, needs a feature this library (or this
    /// build) does not implement.
    Unsupported(Feature),
    /// On-disk metadata is inconsistent: `what` went wrong at host byte
    /// `offset`. When found while writing, the image is marked corrupt.
    Corrupt {
        /// What is wrong.
        what: Corruption,
        /// Host byte offset of the offending structure.
        offset: u64,
    },
    /// The backing image is inconsistent: `what` went wrong at host byte
    /// `offset` of the backing's device. Never marks this image corrupt.
    BackingCorrupt {
        /// What is wrong.
        what: Corruption,
        /// Host byte offset in the backing device.
        offset: u64,
    },
    /// A caller-supplied argument is out of range (named).
    InvalidArgument(&'static str),
    /// A write was attempted on an image opened read-only.
    ReadOnly,
    /// The request reaches past the end of the virtual disk.
    OutOfRange,
    /// The device could not grow, or a format limit on host offsets was hit.
    NoSpace,
    /// The image was opened for repair while dirty (lazy refcounts, not
    /// closed cleanly): its refcounts may be stale, so guest changes wait
    /// for a successful `repair(Repair::All)`.
    NeedsRepair,
    /// An internal invariant of this library broke (a bug, not a property of
    /// the image): the operation stopped before it could do harm. Never sets
    /// the image's corrupt bit.
    Internal(&'static str),
}

impl<E> Error<E> {
    /// Shorthand for a [`Error::Corrupt`] value.
    pub(crate) const fn corrupt(what: Corruption, offset: u64) -> Self {
        Error::Corrupt { what, offset }
    }

    /// The broad class of the error, in `embedded-io`'s terms, for callers
    /// that only need to decide what to do next.
    pub fn kind(&self) -> embedded_io::ErrorKind
    where
        E: embedded_io::Error,
    {
        use embedded_io::ErrorKind;
        match self {
            Error::Io(e) => e.kind(),
            Error::NotQcow2 | Error::Corrupt { .. } | Error::BackingCorrupt { .. } => {
                ErrorKind::InvalidData
            }
            Error::Unsupported(_) => ErrorKind::Unsupported,
            Error::InvalidArgument(_) | Error::OutOfRange => ErrorKind::InvalidInput,
            Error::ReadOnly | Error::NeedsRepair => ErrorKind::PermissionDenied,
            // embedded-io has no "storage full" kind.
            Error::NoSpace | Error::Internal(_) => ErrorKind::Other,
        }
    }

    /// Replaces the device error with `f(e)`, keeping every other variant.
    pub fn map_io<F>(self, f: impl FnOnce(E) -> F) -> Error<F> {
        match self {
            Error::Io(e) => Error::Io(f(e)),
            Error::NotQcow2 => Error::NotQcow2,
            Error::Unsupported(w) => Error::Unsupported(w),
            Error::Corrupt { what, offset } => Error::Corrupt { what, offset },
            Error::BackingCorrupt { what, offset } => Error::BackingCorrupt { what, offset },
            Error::InvalidArgument(w) => Error::InvalidArgument(w),
            Error::ReadOnly => Error::ReadOnly,
            Error::OutOfRange => Error::OutOfRange,
            Error::NoSpace => Error::NoSpace,
            Error::NeedsRepair => Error::NeedsRepair,
            Error::Internal(w) => Error::Internal(w),
        }
    }
}

impl<E: fmt::Debug> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "I/O error: {e:?}"),
            Error::NotQcow2 => f.write_str("not a qcow2 image (bad magic)"),
            Error::Unsupported(what) => write!(f, "unsupported feature: {what}"),
            Error::Corrupt { what, offset } => {
                write!(f, "corrupt image: {what} (at host offset {offset:#x})")
            }
            Error::BackingCorrupt { what, offset } => {
                write!(
                    f,
                    "corrupt backing image: {what} (at host offset {offset:#x})"
                )
            }
            Error::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            Error::ReadOnly => f.write_str("image is read-only"),
            Error::OutOfRange => f.write_str("request beyond the end of the virtual disk"),
            Error::NoSpace => f.write_str("no space left: device cannot grow"),
            Error::NeedsRepair => f.write_str(
                "refcounts may be stale (dirty image opened for repair): repair it first",
            ),
            Error::Internal(what) => write!(f, "internal error (a bug): {what}"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for Error<E> {}

impl<E: embedded_io::Error> embedded_io::Error for Error<E> {
    fn kind(&self) -> embedded_io::ErrorKind {
        Error::kind(self)
    }
}

/// A failed [`crate::Qcow2::open`] or [`crate::Qcow2::create`]: the error,
/// with the device and cache storage given back so the caller can retry,
/// repair or fall back. `?` converts it into its [`Error`].
pub struct OpenError<D: crate::BlockDevice, S> {
    /// What went wrong.
    pub error: Error<D::Error>,
    /// The device, as the failed call left it.
    pub device: D,
    /// The cache storage (contents unspecified).
    pub cache: S,
}

impl<D: crate::BlockDevice, S> fmt::Debug for OpenError<D, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenError")
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<D: crate::BlockDevice, S> fmt::Display for OpenError<D, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl<D: crate::BlockDevice, S> core::error::Error for OpenError<D, S> {}

impl<D: crate::BlockDevice, S> From<OpenError<D, S>> for Error<D::Error> {
    fn from(e: OpenError<D, S>) -> Self {
        e.error
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    #[test]
    fn display_prints_the_payloads_text() {
        let e = Error::<()>::corrupt(Corruption::L1BeyondImage, 0x600);
        assert_eq!(
            e.to_string(),
            "corrupt image: L1 table beyond the end of the image (at host offset 0x600)"
        );
        let e = Error::<()>::corrupt(Corruption::Stream("invalid deflate stream"), 0xa00);
        assert_eq!(
            e.to_string(),
            "corrupt image: invalid deflate stream (at host offset 0xa00)"
        );
        let e = Error::<()>::Unsupported(Feature::Encryption);
        assert_eq!(e.to_string(), "unsupported feature: encryption");
        let e = Error::<()>::Unsupported(Feature::Decoder("zstd: step before start"));
        assert_eq!(
            e.to_string(),
            "unsupported feature: zstd: step before start"
        );
    }
}
