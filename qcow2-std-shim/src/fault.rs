//! A fault-injecting device for crash tests.
//!
//! It keeps two states: what has been made durable by `flush`, and what
//! reads see now, with the list of sector writes in between. A run can be
//! stopped at write number N (that write and every later call fail), and the
//! device that would survive a crash at that point can be produced three
//! ways: only the flushed state, the flushed state plus every unflushed
//! write, or the flushed state plus a seeded random subset of the unflushed
//! sector writes (applied in order).
//!
//! A device made with [`FaultDevice::fixed`] has a fixed size, as a
//! partition or a flash chip: growing it fails with
//! [`FaultError::Fixed`], and its survivors are fixed-size RAM devices.

use crate::ram::{sectors_from_bytes, RamDevice};
use qcow2_core::{BlockDevice, Sector, SECTOR};
use std::fmt;

/// Errors of a [`FaultDevice`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultError {
    /// The injected crash point was reached: the device is gone.
    Crashed,
    /// Access past the end of the device.
    OutOfRange,
    /// The device has a fixed size and cannot grow.
    Fixed,
}

impl fmt::Display for FaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultError::Crashed => f.write_str("injected crash"),
            FaultError::OutOfRange => f.write_str("access beyond the end of the device"),
            FaultError::Fixed => f.write_str("device has a fixed size"),
        }
    }
}

impl std::error::Error for FaultError {}

/// How much of the unflushed writes survives a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Survival {
    /// Only what was flushed.
    FlushedOnly,
    /// Everything written, flushed or not.
    AllWrites,
    /// What was flushed plus a random subset of later sector writes.
    RandomSubset(u64),
}

/// A RAM device that records unflushed writes and can crash on demand.
#[derive(Debug, Clone, Default)]
pub struct FaultDevice {
    durable: Vec<Sector>,
    current: Vec<Sector>,
    /// Sector writes since the last flush, oldest first.
    pending: Vec<(u64, Sector)>,
    writes: u64,
    crash_at: Option<u64>,
    crashed: bool,
    /// Refuses to grow.
    fixed: bool,
}

impl FaultDevice {
    /// A device whose durable and current contents are `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let sectors = sectors_from_bytes(bytes);
        FaultDevice {
            durable: sectors.clone(),
            current: sectors,
            ..Default::default()
        }
    }

    /// An empty device.
    pub fn new() -> Self {
        Self::default()
    }

    /// A device of a fixed size holding `bytes`, zero-padded to `sectors`
    /// sectors (or to a whole sector when `bytes` is longer): it can shrink
    /// but never grow ([`FaultError::Fixed`]), and its survivors cannot
    /// grow either.
    pub fn fixed(bytes: &[u8], sectors: u64) -> Self {
        let mut device = Self::from_bytes(bytes);
        if (device.current.len() as u64) < sectors {
            device.current.resize(sectors as usize, [0; SECTOR]);
            device.durable.clone_from(&device.current);
        }
        device.fixed = true;
        device
    }

    /// Whether the device has a fixed size.
    pub fn is_fixed(&self) -> bool {
        self.fixed
    }

    /// Makes write number `n` (counting from 0 over the device's life) and
    /// every call after it fail with [`FaultError::Crashed`].
    pub fn crash_at_write(&mut self, n: u64) {
        self.crash_at = Some(n);
    }

    /// Number of write calls that succeeded so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Whether the crash point was reached.
    pub fn crashed(&self) -> bool {
        self.crashed
    }

    /// Number of sector writes not yet flushed.
    pub fn unflushed_sectors(&self) -> usize {
        self.pending.len()
    }

    /// The device a crash now would leave behind, as a fresh RAM device
    /// (of a fixed size when this device has one).
    pub fn survivor(&self, survival: Survival) -> RamDevice {
        let mut sectors = self.durable.clone();
        let mut rng = match survival {
            Survival::RandomSubset(seed) => seed | 1,
            _ => 0,
        };
        for (at, data) in &self.pending {
            let keep = match survival {
                Survival::FlushedOnly => false,
                Survival::AllWrites => true,
                Survival::RandomSubset(_) => {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng & 1 == 1
                }
            };
            if keep {
                if let Some(s) = sectors.get_mut(*at as usize) {
                    *s = *data;
                }
            }
        }
        if !self.fixed {
            return RamDevice::from_bytes(sectors.as_flattened());
        }
        let mut ram = RamDevice::fixed(sectors.len() as u64);
        // A RAM device's write completes at once and fits: it was this size.
        crate::block_on(ram.write(0, &sectors)).expect("a fixed device of the same size");
        ram
    }

    fn alive(&self) -> Result<(), FaultError> {
        if self.crashed {
            Err(FaultError::Crashed)
        } else {
            Ok(())
        }
    }

    fn range(&self, first: u64, n: usize) -> Result<std::ops::Range<usize>, FaultError> {
        let start = usize::try_from(first).map_err(|_| FaultError::OutOfRange)?;
        let end = start.checked_add(n).ok_or(FaultError::OutOfRange)?;
        if end > self.current.len() {
            return Err(FaultError::OutOfRange);
        }
        Ok(start..end)
    }
}

impl BlockDevice for FaultDevice {
    type Error = FaultError;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), FaultError> {
        self.alive()?;
        let r = self.range(first, buf.len())?;
        buf.copy_from_slice(&self.current[r]);
        Ok(())
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), FaultError> {
        self.alive()?;
        if self.crash_at == Some(self.writes) {
            self.crashed = true;
            return Err(FaultError::Crashed);
        }
        let r = self.range(first, buf.len())?;
        self.current[r].copy_from_slice(buf);
        for (i, s) in buf.iter().enumerate() {
            self.pending.push((first + i as u64, *s));
        }
        self.writes += 1;
        Ok(())
    }

    /// Zeros in writes of up to 16 sectors, each a crash point like any write.
    async fn write_zeros(&mut self, first: u64, count: u64) -> Result<(), FaultError> {
        const CHUNK: u64 = 16;
        let zeros = [[0u8; SECTOR]; CHUNK as usize];
        let mut done = 0;
        while done < count {
            let n = (count - done).min(CHUNK) as usize;
            self.write(first + done, &zeros[..n]).await?;
            done += n as u64;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), FaultError> {
        self.alive()?;
        self.durable.clone_from(&self.current);
        self.pending.clear();
        Ok(())
    }

    fn sector_count(&self) -> u64 {
        self.current.len() as u64
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), FaultError> {
        self.alive()?;
        let n = usize::try_from(n).map_err(|_| FaultError::OutOfRange)?;
        if self.fixed && n > self.current.len() {
            return Err(FaultError::Fixed);
        }
        // Size changes are treated as immediately durable; new sectors are zeros.
        self.current.resize(n, [0; SECTOR]);
        self.durable.resize(n, [0; SECTOR]);
        self.pending.retain(|(at, _)| (*at as usize) < n);
        Ok(())
    }
}
