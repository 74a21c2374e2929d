//! The single error type of the core.

use core::fmt;

/// Everything that can go wrong with an image.
///
/// `E` is the error type of the underlying [`crate::BlockDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error<E> {
    /// The underlying device failed.
    Io(E),
    /// The device does not start with a qcow2 header.
    NotQcow2,
    /// The image uses a feature this library does not implement (named).
    Unsupported(&'static str),
    /// On-disk metadata is inconsistent: `what` went wrong at host byte `offset`.
    Corrupt {
        /// What is wrong.
        what: &'static str,
        /// Host byte offset of the offending structure.
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
}

impl<E> Error<E> {
    /// Shorthand for a [`Error::Corrupt`] value.
    pub(crate) const fn corrupt(what: &'static str, offset: u64) -> Self {
        Error::Corrupt { what, offset }
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
            Error::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
            Error::ReadOnly => f.write_str("image is read-only"),
            Error::OutOfRange => f.write_str("request beyond the end of the virtual disk"),
            Error::NoSpace => f.write_str("no space left: device cannot grow"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for Error<E> {}
