//! Compressed extents as bytes on the device: for callers that decode
//! compressed clusters themselves (on several threads, say) and must read
//! exactly what [`Qcow2::read`] would.

use crate::cache::SlotStorage;
use crate::engine::Engine;
use crate::{BlockDevice, Corruption, Error, SECTOR};

/// Where the bytes of one compressed cluster are, as reads take them.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedExtent {
    /// First device sector holding the stream.
    pub first_sector: u64,
    /// Sectors to read (the descriptor's, cut at the device's end).
    pub sectors: u64,
    /// Bytes to skip in the first sector before the stream starts.
    pub skip: usize,
    /// Whether the descriptor runs past the device's end (a stream that
    /// needs those bytes is corrupt).
    pub truncated: bool,
}

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// See [`crate::Qcow2::compressed_extent`].
    pub(crate) fn compressed_extent(
        &self,
        host: u64,
        len: u64,
    ) -> Result<CompressedExtent, Error<D::Error>> {
        let first_sector = host / SECTOR as u64;
        let dev_sectors = self.dev.sector_count();
        if first_sector >= dev_sectors {
            return Err(Error::corrupt(Corruption::CompressedBeyondImage, host));
        }
        if self.geo.hits_fixed_metadata(host, len) || self.cache.holds_any(host, len) {
            return Err(Error::corrupt(Corruption::CompressedOverlapsMetadata, host));
        }
        // The descriptor ends on a sector boundary.
        let end = crate::format::shr_ceil(host.saturating_add(len), 9);
        Ok(CompressedExtent {
            first_sector,
            sectors: end.min(dev_sectors) - first_sector,
            skip: (host % SECTOR as u64) as usize,
            truncated: end > dev_sectors,
        })
    }

    /// See [`crate::Qcow2::compression`].
    pub(crate) fn compression(&self) -> Option<crate::Compression> {
        crate::Compression::from_type(self.header.compression_type)
    }
}
