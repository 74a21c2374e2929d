//! Backing devices on the host: a raw device, or a qcow2 image with its
//! own backing, so that chains of any depth share one type.

use qcow2_core::{BlockDevice, Error, Sector};

use crate::blocking::HostQcow2;

/// The backing of a host image: none, a raw device, or another image
/// (itself possibly backed). Always read-only.
pub enum HostBacking<D: BlockDevice> {
    /// No backing: reads past the end of a zero-length device (zeros).
    None,
    /// A raw device.
    Raw(D),
    /// A qcow2 image.
    Qcow2(Box<HostQcow2<D>>),
}

impl<D: BlockDevice> HostBacking<D> {
    /// Whether this is [`HostBacking::None`].
    pub fn is_none(&self) -> bool {
        matches!(self, HostBacking::None)
    }
}

impl<D: BlockDevice> BlockDevice for HostBacking<D> {
    type Error = Error<D::Error>;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), Self::Error> {
        match self {
            HostBacking::None => {
                buf.fill([0; qcow2_core::SECTOR]);
                Ok(())
            }
            HostBacking::Raw(dev) => dev.read(first, buf).await.map_err(Error::Io),
            // Boxed: the chain is as deep as the files make it.
            HostBacking::Qcow2(image) => Box::pin(image.read(first, buf)).await,
        }
    }

    async fn write(&mut self, _first: u64, _buf: &[Sector]) -> Result<(), Self::Error> {
        Err(Error::ReadOnly)
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    fn sector_count(&self) -> u64 {
        match self {
            HostBacking::None => 0,
            HostBacking::Raw(dev) => dev.sector_count(),
            HostBacking::Qcow2(image) => image.virtual_size() / qcow2_core::SECTOR as u64,
        }
    }

    async fn set_sector_count(&mut self, _n: u64) -> Result<(), Self::Error> {
        Err(Error::ReadOnly)
    }

    async fn is_zeroed(&mut self, first: u64, count: u64) -> Result<bool, Self::Error> {
        match self {
            HostBacking::None => Ok(true),
            HostBacking::Raw(dev) => dev.is_zeroed(first, count).await.map_err(Error::Io),
            HostBacking::Qcow2(image) => Box::pin(image.is_zeroed(first, count)).await,
        }
    }
}
