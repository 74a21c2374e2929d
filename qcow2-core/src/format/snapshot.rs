//! Internal snapshot table entries.

use crate::{Corruption, Error};
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Length of the fixed part of a snapshot table entry.
pub const FIXED_LEN: usize = 40;

/// The fixed part of a snapshot table entry, as stored.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Clone, Copy)]
#[repr(C)]
struct RawSnapshot {
    l1_table_offset: U64,
    l1_size: U32,
    id_str_size: U16,
    name_size: U16,
    date_sec: U32,
    date_nsec: U32,
    vm_clock_nsec: U64,
    vm_state_size: U32,
    extra_data_size: U32,
}

const _: () = assert!(core::mem::size_of::<RawSnapshot>() == FIXED_LEN);

/// The parts of a snapshot entry that locate its tables and size it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Length of the ID string.
    pub id_len: u16,
    /// Length of the name.
    pub name_len: u16,
    /// Length of the extra data.
    pub extra_len: u32,
}

impl SnapshotEntry {
    /// Decodes the fixed part at the start of `bytes`.
    pub fn decode<E>(bytes: &[u8], at: u64) -> Result<Self, Error<E>> {
        let (raw, _) = RawSnapshot::read_from_prefix(bytes)
            .map_err(|_| Error::corrupt(Corruption::SnapshotEntryTruncated, at))?;
        Ok(SnapshotEntry {
            l1_table_offset: raw.l1_table_offset.get(),
            l1_size: raw.l1_size.get(),
            id_len: raw.id_str_size.get(),
            name_len: raw.name_size.get(),
            extra_len: raw.extra_data_size.get(),
        })
    }

    /// Total length of the entry, padded to 8 bytes.
    pub fn len(&self) -> u64 {
        let raw = FIXED_LEN as u64
            + u64::from(self.extra_len)
            + u64::from(self.id_len)
            + u64::from(self.name_len);
        raw.div_ceil(8) * 8
    }

    /// Whether the entry has no variable part (never true for QEMU's).
    pub fn is_empty(&self) -> bool {
        self.len() == FIXED_LEN as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_fixed_fields_and_pads_length() {
        let mut b = [0u8; 48];
        b[..8].copy_from_slice(&0x5_0000u64.to_be_bytes());
        b[8..12].copy_from_slice(&3u32.to_be_bytes());
        b[12..14].copy_from_slice(&1u16.to_be_bytes());
        b[14..16].copy_from_slice(&2u16.to_be_bytes());
        b[36..40].copy_from_slice(&16u32.to_be_bytes());
        let e = SnapshotEntry::decode::<()>(&b, 0).unwrap();
        assert_eq!(e.l1_table_offset, 0x5_0000);
        assert_eq!(e.l1_size, 3);
        assert_eq!(e.len(), 64); // 40 + 16 + 1 + 2 = 59, padded to 64
        assert!(SnapshotEntry::decode::<()>(&b[..39], 0).is_err());
    }
}
