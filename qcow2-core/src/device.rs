//! The block device abstraction every image sits on and itself implements.

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
    /// The default writes from a static buffer of zeros. Devices that can do
    /// better (a file past its physical end, where holes read as zeros)
    /// override it; the result must read as zeros either way.
    async fn write_zeros(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(ZEROS.len() as u64);
            self.write(first + done, ZEROS.get(..n as usize).unwrap_or(&[]))
                .await?;
            done += n;
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
}

/// Zeros to write from; a static so no stack or heap buffer is needed.
static ZEROS: [Sector; 16] = [[0; SECTOR]; 16];
