//! The block device abstraction every image sits on and itself implements.

pub mod blockutil;
pub mod bytes;
pub mod io;
pub mod seek;

/// Size in bytes of one sector, the unit of all device I/O.
pub const SECTOR: usize = 512;

/// One sector worth of bytes. Buffers are always whole sectors.
pub type Sector = [u8; SECTOR];

/// A positional, sector-addressed storage device.
///
/// Implementations must not allocate; the caller owns every buffer.
pub trait BlockDevice {
    /// The device's own error type.
    type Error: core::fmt::Debug;

    /// Reads `buf.len()` sectors starting at sector `first`.
    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), Self::Error>;

    /// Writes `buf.len()` sectors starting at sector `first`.
    ///
    /// Writes are not durable until [`BlockDevice::flush`] returns.
    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), Self::Error>;

    /// Makes every earlier write durable.
    async fn flush(&mut self) -> Result<(), Self::Error>;

    /// The number of sectors the device holds.
    fn sector_count(&self) -> u64;

    /// Grows (or shrinks) the device to `n` sectors.
    ///
    /// Sectors added by growing must read as zeros. Fixed-size devices return
    /// an error, which images report as [`crate::Error::NoSpace`].
    async fn set_sector_count(&mut self, n: u64) -> Result<(), Self::Error>;

    /// Writes `count` zero sectors from sector `first`.
    ///
    /// The default writes one sector of zeros at a time from a buffer on
    /// the stack (no static of zeros: a DMA engine may reach only RAM).
    /// Devices that can do better (a file past its physical end, where holes
    /// read as zeros, or a device with a write-zeroes command) override it;
    /// the result must read as zeros either way.
    async fn write_zeros(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        let zero: Sector = [0; SECTOR];
        for sector in first..first.saturating_add(count) {
            self.write(sector, core::slice::from_ref(&zero)).await?;
        }
        Ok(())
    }

    /// Hints that `count` sectors from `first` are no longer needed.
    ///
    /// The default does nothing; the data then stays readable.
    async fn discard(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        let _ = (first, count);
        Ok(())
    }

    /// Whether the `count` sectors from `first` are known to read as zeros
    /// without reading them (an image's metadata says so, a file has a
    /// hole there). The default cannot tell: `false`. Overlays use it to
    /// flag a partial write-zeroes over a backing that holds zeros there
    /// as a zero cluster, as QEMU does.
    async fn is_zeroed(&mut self, first: u64, count: u64) -> Result<bool, Self::Error> {
        let _ = (first, count);
        Ok(false)
    }
}

/// A mutable borrow of a device is a device: an image can sit on a device
/// the caller keeps (and gets back by dropping the image).
impl<T: BlockDevice + ?Sized> BlockDevice for &mut T {
    type Error = T::Error;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), Self::Error> {
        (**self).read(first, buf).await
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), Self::Error> {
        (**self).write(first, buf).await
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        (**self).flush().await
    }

    fn sector_count(&self) -> u64 {
        (**self).sector_count()
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), Self::Error> {
        (**self).set_sector_count(n).await
    }

    async fn write_zeros(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        (**self).write_zeros(first, count).await
    }

    async fn discard(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        (**self).discard(first, count).await
    }

    async fn is_zeroed(&mut self, first: u64, count: u64) -> Result<bool, Self::Error> {
        (**self).is_zeroed(first, count).await
    }
}
