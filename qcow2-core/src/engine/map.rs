//! Guest offset to host mapping through the L1 and L2 tables.

use crate::cache::Kind;
use crate::cache::SlotStorage;
use crate::engine::Engine;
use crate::format::entry::{COMPRESSED, COPIED, ZERO};
use crate::format::{L1Entry, L2Entry};
use crate::{BlockDevice, Corruption, Error, SECTOR};

/// Where a run of guest data lives.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated: reads as zeros (there is no backing file).
    Unallocated,
    /// Explicitly zero (v3 zero flag).
    Zero,
    /// Stored uncompressed; `host` is the byte offset of the run's start
    /// in the image file, or in the external data file for an image with
    /// one (where it equals the guest offset).
    Data {
        /// Host byte offset.
        host: u64,
    },
    /// Stored compressed at `host`, in at most `len` bytes.
    Compressed {
        /// Host byte offset of the compressed stream.
        host: u64,
        /// Upper bound of the stream length.
        len: u64,
    },
}

/// Errors for a bad cluster pointer: unaligned, past the end of the
/// device, on the header/L1/refcount table.
pub(crate) type ClusterErrors = [Corruption; 3];

const L2_TABLE: ClusterErrors = [
    Corruption::L2Unaligned,
    Corruption::L2BeyondImage,
    Corruption::L2OverlapsMetadata,
];
const DATA_CLUSTER: ClusterErrors = [
    Corruption::DataUnaligned,
    Corruption::DataBeyondImage,
    Corruption::DataOverlapsMetadata,
];
/// Placement errors of refcount blocks.
pub(crate) const REFCOUNT_BLOCK: ClusterErrors = [
    Corruption::RefcountBlockUnaligned,
    Corruption::RefcountBlockBeyondImage,
    Corruption::RefcountBlockOverlapsMetadata,
];

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// Host byte offset of the L1 entry for guest cluster `guest`.
    pub(crate) fn l1_entry_offset(&self, guest: u64) -> Result<u64, Error<D::Error>> {
        let index = guest >> self.geo.l2_bits;
        if index >= self.geo.l1_entries {
            return Err(Error::OutOfRange);
        }
        Ok(self.geo.l1_entry_at(index))
    }

    /// Host offset of the L2 table covering guest cluster `guest`, 0 if none.
    pub(crate) async fn l2_table(&mut self, guest: u64) -> Result<u64, Error<D::Error>> {
        Ok(self.l1_lookup(guest).await?.0)
    }

    /// [`Self::l2_table`] for a write: the table must be this image's alone
    /// (COPIED set), as shared tables would need copy-on-write.
    pub(crate) async fn l2_table_for_write(&mut self, guest: u64) -> Result<u64, Error<D::Error>> {
        let (l2, copied) = self.l1_lookup(guest).await?;
        if l2 != 0 && !copied {
            let at = self.l1_entry_offset(guest)?;
            return Err(Error::corrupt(Corruption::L1EntryNotCopied, at));
        }
        Ok(l2)
    }

    /// The L2 table offset (0 if none) and COPIED flag of guest cluster
    /// `guest`'s L1 entry. Reserved bits are ignored, as QEMU does; `check`
    /// reports them.
    async fn l1_lookup(&mut self, guest: u64) -> Result<(u64, bool), Error<D::Error>> {
        let at = self.l1_entry_offset(guest)?;
        let entry = L1Entry(self.cache.read_u64(&mut self.dev, at, Kind::L1).await?);
        let l2 = entry.l2_offset();
        if l2 != 0 {
            self.check_cluster(l2, L2_TABLE)?;
        }
        Ok((l2, entry.copied()))
    }

    /// Checks that a cluster read from metadata is aligned, inside the
    /// device, and clear of the header, L1 table and refcount table.
    pub(crate) fn check_cluster(
        &self,
        host: u64,
        errors: ClusterErrors,
    ) -> Result<(), Error<D::Error>> {
        let geo = &self.geo;
        let [unaligned, beyond_end, on_metadata] = errors;
        if geo.within_cluster(host) != 0 {
            return Err(Error::corrupt(unaligned, host));
        }
        if geo.cluster_of(host) >= self.dev_clusters {
            return Err(Error::corrupt(beyond_end, host));
        }
        if geo.hits_fixed_metadata(host, geo.cluster_size) {
            return Err(Error::corrupt(on_metadata, host));
        }
        Ok(())
    }

    /// Reads and decodes the L2 entry of guest cluster `guest` in table `l2`,
    /// returning it with its host byte offset.
    pub(crate) async fn l2_entry(
        &mut self,
        l2: u64,
        guest: u64,
    ) -> Result<(L2Entry, u64), Error<D::Error>> {
        let (entry, at, _) = self.l2_entry_raw(l2, guest).await?;
        Ok((entry, at))
    }

    /// [`Self::l2_entry`] with the raw entry too (flags to keep when it is
    /// rewritten).
    pub(crate) async fn l2_entry_raw(
        &mut self,
        l2: u64,
        guest: u64,
    ) -> Result<(L2Entry, u64, u64), Error<D::Error>> {
        let at = self.geo.l2_entry_at(l2, guest);
        let raw = self.cache.read_u64(&mut self.dev, at, Kind::L2).await?;
        if !self.geo.v3 && raw & ZERO != 0 && raw & COMPRESSED == 0 {
            // QEMU refuses the zero flag in a v2 image the same way.
            return Err(Error::corrupt(Corruption::ZeroEntryInV2, at));
        }
        // Other reserved bits are ignored, as QEMU does; `check` reports them.
        let entry = self.decode_l2(raw);
        match entry {
            L2Entry::Data { offset, .. } => self.check_data_cluster(offset, guest)?,
            L2Entry::Zero { offset, .. } if offset != 0 => {
                self.check_data_cluster(offset, guest)?
            }
            L2Entry::Compressed { .. } if self.external_data() => {
                // QEMU's qcow2_get_host_offset signals corruption the same way.
                return Err(Error::corrupt(Corruption::CompressedWithDataFile, at));
            }
            _ => {}
        }
        Ok((entry, at, raw))
    }

    /// Decodes a raw L2 entry of this image. With an external data file,
    /// offset 0 with COPIED set is guest cluster 0's data (its host offset
    /// is its guest offset), as QEMU's `qcow2_get_cluster_type` reads it.
    pub(crate) fn decode_l2(&self, raw: u64) -> L2Entry {
        let entry = L2Entry::decode(raw, self.geo.cluster_bits, self.geo.v3);
        if entry == L2Entry::Unallocated && raw & COPIED != 0 && self.external_data() {
            return L2Entry::Data {
                offset: 0,
                copied: true,
            };
        }
        entry
    }

    /// Checks the host offset of guest cluster `guest`'s data: in the image
    /// file, as [`Self::check_cluster`]; in an external data file, aligned
    /// and equal to the guest offset (QEMU: "External data file host
    /// cluster offset ... does not match guest cluster offset").
    fn check_data_cluster(&self, host: u64, guest: u64) -> Result<(), Error<D::Error>> {
        if !self.external_data() {
            return self.check_cluster(host, DATA_CLUSTER);
        }
        if self.geo.within_cluster(host) != 0 {
            return Err(Error::corrupt(DATA_CLUSTER[0], host));
        }
        if guest.checked_shl(self.geo.cluster_bits) != Some(host) {
            return Err(Error::corrupt(Corruption::DataFileOffsetMismatch, host));
        }
        Ok(())
    }

    /// Mapping at guest `sector`, and how many sectors from there it is
    /// known to hold: to the end of the cluster, or of the whole L2 table's
    /// range when no table is allocated.
    async fn map_one(&mut self, sector: u64) -> Result<(Mapping, u64), Error<D::Error>> {
        let offset = sector * SECTOR as u64;
        let guest = offset >> self.geo.cluster_bits;
        let cluster_sectors = self.geo.cluster_sectors();
        let l2 = self.l2_table(guest).await?;
        if l2 == 0 {
            let table_sectors = cluster_sectors << self.geo.l2_bits;
            return Ok((
                Mapping::Unallocated,
                table_sectors - (sector & (table_sectors - 1)),
            ));
        }
        let span = cluster_sectors - (sector & (cluster_sectors - 1));
        let within = self.geo.within_cluster(offset);
        let mapping = match self.l2_entry(l2, guest).await?.0 {
            L2Entry::Unallocated => Mapping::Unallocated,
            L2Entry::Zero { .. } => Mapping::Zero,
            L2Entry::Data { offset: host, .. } => Mapping::Data {
                host: host + within,
            },
            L2Entry::Compressed { offset: host, len } => Mapping::Compressed { host, len },
        };
        Ok((mapping, span))
    }

    /// The mapping at guest `sector` and how many sectors (at most `max`)
    /// from there share it contiguously.
    pub(crate) async fn map_run(
        &mut self,
        sector: u64,
        max: u64,
    ) -> Result<(Mapping, u64), Error<D::Error>> {
        let (first, span) = self.map_one(sector).await?;
        let mut run = span.min(max);
        if let Mapping::Compressed { .. } = first {
            return Ok((first, run));
        }
        while run < max {
            let (next, span) = self.map_one(sector + run).await?;
            let continues = match (first, next) {
                (Mapping::Data { host: a }, Mapping::Data { host: b }) => {
                    b == a + run * SECTOR as u64
                }
                (a, b) => a == b && !matches!(a, Mapping::Compressed { .. }),
            };
            if !continues {
                break;
            }
            run = (run + span).min(max);
        }
        Ok((first, run))
    }

    /// See [`crate::Qcow2::host_cluster`].
    pub(crate) async fn host_cluster(
        &mut self,
        offset: u64,
    ) -> Result<Option<u64>, Error<D::Error>> {
        if offset >= self.geo.virtual_size() {
            return Err(Error::OutOfRange);
        }
        let guest = offset >> self.geo.cluster_bits;
        let l2 = self.l2_table(guest).await?;
        if l2 == 0 {
            return Ok(None);
        }
        Ok(match self.l2_entry(l2, guest).await?.0 {
            L2Entry::Unallocated | L2Entry::Zero { offset: 0, .. } => None,
            L2Entry::Zero { offset, .. }
            | L2Entry::Data { offset, .. }
            | L2Entry::Compressed { offset, .. } => Some(offset),
        })
    }

    /// See [`crate::Qcow2::map`].
    pub(crate) async fn map(&mut self, offset: u64) -> Result<(Mapping, u64), Error<D::Error>> {
        let size = self.geo.virtual_size();
        if offset >= size {
            return Err(Error::OutOfRange);
        }
        let sector = offset / SECTOR as u64;
        let (mapping, run) = self.map_run(sector, self.geo.sectors - sector).await?;
        let skip = offset % SECTOR as u64;
        let bytes = (run * SECTOR as u64 - skip).min(size - offset);
        let mapping = match mapping {
            Mapping::Data { host } => Mapping::Data { host: host + skip },
            other => other,
        };
        Ok((mapping, bytes))
    }
}
