//! Backing devices: where an overlay's unallocated clusters read from.
//!
//! Any [`BlockDevice`] can back an image: a raw device, or another
//! [`crate::Qcow2`] (itself a `BlockDevice`), so chains compose. The
//! default, [`NoBacking`], is a zero-sized device of zero sectors: with it
//! unallocated clusters read as zeros and nothing is spent on backing.
//!
//! Backings are only read. Their errors reach the overlay's caller through
//! [`BackingError`]: device errors as [`Error::Io`], corruption found in a
//! backing image as [`Error::BackingCorrupt`] (which never marks the
//! overlay corrupt).

use core::marker::PhantomData;

use crate::{BlockDevice, Error, Sector};

/// Converts a backing device's error into the overlay's [`Error`].
///
/// Implemented for the overlay device's own error type (a raw backing on
/// the same kind of device) and for [`Error`] of it (a qcow2 backing).
pub trait BackingError<E> {
    /// The overlay's error for this backing error.
    fn into_overlay_error(self) -> Error<E>;
}

impl<E> BackingError<E> for E {
    fn into_overlay_error(self) -> Error<E> {
        Error::Io(self)
    }
}

impl<E> BackingError<E> for Error<E> {
    fn into_overlay_error(self) -> Error<E> {
        match self {
            Error::Corrupt { what, offset } => Error::BackingCorrupt { what, offset },
            // Anything else keeps its meaning for the overlay's caller.
            other => other,
        }
    }
}

/// A device that can back an image whose device errors are `E`: every
/// [`BlockDevice`] whose error converts (see [`BackingError`]).
pub trait Backing<E>: BlockDevice {
    /// `e` as the overlay's error.
    fn overlay_error(e: Self::Error) -> Error<E>;
}

impl<E, B> Backing<E> for B
where
    B: BlockDevice,
    B::Error: BackingError<E>,
{
    fn overlay_error(e: Self::Error) -> Error<E> {
        e.into_overlay_error()
    }
}

/// No backing: a device of zero sectors, so that every read of an
/// unallocated cluster is past its end and reads as zeros. Zero-sized.
///
/// `D` is the overlay's device type (only its error type is used).
pub struct NoBacking<D>(PhantomData<fn() -> D>);

impl<D> NoBacking<D> {
    /// The (only) value.
    pub const fn new() -> Self {
        NoBacking(PhantomData)
    }
}

impl<D> Default for NoBacking<D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<D: BlockDevice> BlockDevice for NoBacking<D> {
    type Error = D::Error;

    async fn read(&mut self, _first: u64, buf: &mut [Sector]) -> Result<(), Self::Error> {
        // Never called (no sector is in range); zeros all the same.
        buf.fill([0; crate::SECTOR]);
        Ok(())
    }

    async fn write(&mut self, _first: u64, _buf: &[Sector]) -> Result<(), Self::Error> {
        // Backings are never written.
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    fn sector_count(&self) -> u64 {
        0
    }

    async fn set_sector_count(&mut self, _n: u64) -> Result<(), Self::Error> {
        Ok(())
    }
}
