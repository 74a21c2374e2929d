//! A RAM device for the core's unit tests, logging its writes and flushes.

use crate::{BlockDevice, Sector, SECTOR};

/// 64 sectors of RAM; sector `i` starts with byte `i` when made by [`ram`].
pub(crate) struct Ram {
    pub data: [Sector; 64],
    pub writes: usize,
    pub flushes: usize,
    /// Each operation in order: (first sector, is a flush).
    pub log: [(u64, bool); 64],
}

impl BlockDevice for Ram {
    type Error = ();
    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), ()> {
        for (i, s) in buf.iter_mut().enumerate() {
            *s = *self.data.get(first as usize + i).ok_or(())?;
        }
        Ok(())
    }
    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), ()> {
        for (i, s) in buf.iter().enumerate() {
            *self.data.get_mut(first as usize + i).ok_or(())? = *s;
        }
        if let Some(entry) = self.log.get_mut(self.writes + self.flushes) {
            *entry = (first, false);
        }
        self.writes += 1;
        Ok(())
    }
    async fn flush(&mut self) -> Result<(), ()> {
        if let Some(entry) = self.log.get_mut(self.writes + self.flushes) {
            *entry = (0, true);
        }
        self.flushes += 1;
        Ok(())
    }
    fn sector_count(&self) -> u64 {
        64
    }
    async fn set_sector_count(&mut self, _: u64) -> Result<(), ()> {
        Err(())
    }
}

/// A fresh [`Ram`], each sector tagged with its index in byte 0.
pub(crate) fn ram() -> Ram {
    let mut data = [[0u8; SECTOR]; 64];
    for (i, s) in data.iter_mut().enumerate() {
        s[0] = i as u8;
    }
    Ram {
        data,
        writes: 0,
        flushes: 0,
        log: [(0, false); 64],
    }
}
