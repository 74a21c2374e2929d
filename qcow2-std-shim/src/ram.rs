//! A [`BlockDevice`] in memory.

use qcow2_core::{BlockDevice, Sector, SECTOR};
use std::fmt;

/// Errors of a [`RamDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamError {
    /// Access past the end of the device.
    OutOfRange,
    /// The device has a fixed size and cannot grow.
    Fixed,
}

impl fmt::Display for RamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RamError::OutOfRange => f.write_str("access beyond the end of the RAM device"),
            RamError::Fixed => f.write_str("RAM device has a fixed size"),
        }
    }
}

impl std::error::Error for RamError {}

/// A RAM-backed device; growable unless made with [`RamDevice::fixed`].
#[derive(Debug, Clone, Default)]
pub struct RamDevice {
    sectors: Vec<Sector>,
    fixed: bool,
}

impl RamDevice {
    /// An empty, growable device.
    pub fn new() -> Self {
        Self::default()
    }

    /// A zeroed device of `sectors` sectors that refuses to change size.
    pub fn fixed(sectors: u64) -> Self {
        RamDevice {
            sectors: vec![[0; SECTOR]; sectors as usize],
            fixed: true,
        }
    }

    /// A growable device holding `bytes`, zero-padded to a whole sector.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut sectors = vec![[0; SECTOR]; bytes.len().div_ceil(SECTOR)];
        sectors.as_flattened_mut()[..bytes.len()].copy_from_slice(bytes);
        RamDevice {
            sectors,
            fixed: false,
        }
    }

    /// The device contents.
    pub fn as_bytes(&self) -> &[u8] {
        self.sectors.as_flattened()
    }

    fn range(&self, first: u64, n: usize) -> Result<std::ops::Range<usize>, RamError> {
        let start = usize::try_from(first).map_err(|_| RamError::OutOfRange)?;
        let end = start.checked_add(n).ok_or(RamError::OutOfRange)?;
        if end > self.sectors.len() {
            return Err(RamError::OutOfRange);
        }
        Ok(start..end)
    }
}

/// `bytes` as whole sectors, zero-padded at the end.
pub(crate) fn sectors_from_bytes(bytes: &[u8]) -> Vec<Sector> {
    let mut sectors = vec![[0; SECTOR]; bytes.len().div_ceil(SECTOR)];
    sectors.as_flattened_mut()[..bytes.len()].copy_from_slice(bytes);
    sectors
}

impl BlockDevice for RamDevice {
    type Error = RamError;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), RamError> {
        let r = self.range(first, buf.len())?;
        buf.copy_from_slice(&self.sectors[r]);
        Ok(())
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), RamError> {
        let r = self.range(first, buf.len())?;
        self.sectors[r].copy_from_slice(buf);
        Ok(())
    }

    async fn write_zeros(&mut self, first: u64, count: u64) -> Result<(), RamError> {
        let n = usize::try_from(count).map_err(|_| RamError::OutOfRange)?;
        let r = self.range(first, n)?;
        self.sectors[r].fill([0; SECTOR]);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), RamError> {
        Ok(())
    }

    fn sector_count(&self) -> u64 {
        self.sectors.len() as u64
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), RamError> {
        if self.fixed {
            return Err(RamError::Fixed);
        }
        let n = usize::try_from(n).map_err(|_| RamError::OutOfRange)?;
        self.sectors.resize(n, [0; SECTOR]);
        Ok(())
    }
}
