//! The block devices the firmware runs on: [`RamDisk`], a fixed-size disk
//! in RAM with `W` words of state, and [`Device`], the type this build
//! uses (chosen by cargo feature).

use qcow2_core::{BlockDevice, Sector, SECTOR};
use static_cell::ConstStaticCell;

/// Sectors of the RAM disk: 256 KiB.
pub const DISK_SECTORS: usize = 512;

static DISK: ConstStaticCell<[Sector; DISK_SECTORS]> =
    ConstStaticCell::new([[0; SECTOR]; DISK_SECTORS]);

/// A fixed-size block device in RAM (a zeroed `static`, so in `.bss`).
/// It cannot grow: [`BlockDevice::set_sector_count`] fails for any other
/// size, as a partition or a flash region would.
///
/// `W` words of state beside the sectors, as a driver keeps (here request
/// counters, see [`RamDisk::counters`]), make it `4 + 4 * W` bytes: the
/// firmware is measured with devices of several sizes, so that the budget
/// holds for the devices applications write, not only this one.
pub struct RamDisk<const W: usize = 0> {
    sectors: &'static mut [Sector; DISK_SECTORS],
    /// Requests served: reads, writes, flushes, then sectors read and
    /// written, each in the word of that index modulo `W` (none when `W`
    /// is 0).
    counters: [u32; W],
}

/// The RAM disk's errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskError {
    /// A request reached past the end of the disk.
    OutOfRange,
    /// The disk has a fixed size.
    CannotResize,
}

/// What [`RamDisk::counters`] counts, each the index of its word (modulo
/// `W`).
#[derive(Clone, Copy)]
enum Count {
    Reads,
    Writes,
    Flushes,
    SectorsRead,
    SectorsWritten,
}

impl<const W: usize> RamDisk<W> {
    /// The one RAM disk; `None` when taken before.
    pub fn take() -> Option<RamDisk<W>> {
        DISK.try_take().map(|sectors| RamDisk {
            sectors,
            counters: [0; W],
        })
    }

    /// The whole disk as bytes.
    pub fn bytes(&self) -> &[u8] {
        self.sectors.as_flattened()
    }

    /// The whole disk as bytes, to load it.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.sectors.as_flattened_mut()
    }

    /// Zeroes the whole disk.
    pub fn zero(&mut self) {
        self.bytes_mut().fill(0);
    }

    /// The request counters (see the field's description).
    pub fn counters(&self) -> &[u32; W] {
        &self.counters
    }

    fn count(&mut self, what: Count, n: usize) {
        if let Some(word) = self.counters.get_mut((what as usize) % W.max(1)) {
            *word = word.wrapping_add(n as u32);
        }
    }

    fn sectors(&self, first: u64, len: usize) -> Result<core::ops::Range<usize>, DiskError> {
        let start = usize::try_from(first).map_err(|_| DiskError::OutOfRange)?;
        let end = start.checked_add(len).ok_or(DiskError::OutOfRange)?;
        if end > DISK_SECTORS {
            return Err(DiskError::OutOfRange);
        }
        Ok(start..end)
    }
}

impl<const W: usize> BlockDevice for RamDisk<W> {
    type Error = DiskError;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), DiskError> {
        let range = self.sectors(first, buf.len())?;
        self.count(Count::Reads, 1);
        self.count(Count::SectorsRead, buf.len());
        let src = self.sectors.get(range).ok_or(DiskError::OutOfRange)?;
        for (d, s) in buf.iter_mut().zip(src) {
            *d = *s;
        }
        Ok(())
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), DiskError> {
        let range = self.sectors(first, buf.len())?;
        self.count(Count::Writes, 1);
        self.count(Count::SectorsWritten, buf.len());
        let dst = self.sectors.get_mut(range).ok_or(DiskError::OutOfRange)?;
        for (d, s) in dst.iter_mut().zip(buf) {
            *d = *s;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), DiskError> {
        self.count(Count::Flushes, 1);
        Ok(())
    }

    fn sector_count(&self) -> u64 {
        DISK_SECTORS as u64
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), DiskError> {
        if n == DISK_SECTORS as u64 {
            Ok(())
        } else {
            Err(DiskError::CannotResize)
        }
    }
}

/// The device the firmware of this build runs on, chosen by cargo feature
/// (`cargo xtask firmware` builds each): the 4-byte [`RamDisk`] by default,
/// `device-16` and `device-64` a [`RamDisk`] with 3 or 15 words of state,
/// `device-ref` a `&mut` of the 64-byte one (the core's
/// `impl BlockDevice for &mut T`).
#[cfg(not(any(feature = "device-16", feature = "device-64", feature = "device-ref")))]
pub type Device = RamDisk<0>;
/// See the default's description.
#[cfg(feature = "device-16")]
pub type Device = RamDisk<3>;
/// See the default's description.
#[cfg(feature = "device-64")]
pub type Device = RamDisk<15>;
/// See the default's description.
#[cfg(feature = "device-ref")]
pub type Device = &'static mut RamDisk<15>;

#[cfg(any(
    all(feature = "device-16", feature = "device-64"),
    all(feature = "device-16", feature = "device-ref"),
    all(feature = "device-64", feature = "device-ref"),
))]
compile_error!("pick at most one of the features device-16, device-64, device-ref");

/// The device of this build, on the one RAM disk; `None` when taken before.
pub fn take_device() -> Option<Device> {
    #[cfg(feature = "device-ref")]
    {
        static HELD: static_cell::StaticCell<RamDisk<15>> = static_cell::StaticCell::new();
        let disk = RamDisk::take()?;
        HELD.try_init(disk)
    }
    #[cfg(not(feature = "device-ref"))]
    RamDisk::take()
}
