//! Byte addressing over any [`BlockDevice`]: reads and writes at any byte
//! offset and length, partial sectors by read-modify-write through one
//! caller-provided scratch sector. No heap, no division.

use crate::{BlockDevice, Sector, SECTOR};
use core::fmt;

/// Why a byte-addressed access failed.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BytesError<E> {
    /// The device failed.
    Device(E),
    /// The range reaches past the end of the device.
    OutOfRange,
}

impl<E: fmt::Debug> fmt::Display for BytesError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BytesError::Device(e) => write!(f, "device error: {e:?}"),
            BytesError::OutOfRange => f.write_str("range beyond the end of the device"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for BytesError<E> {}

impl<E: fmt::Debug> embedded_io::Error for BytesError<E> {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self {
            BytesError::Device(_) => embedded_io::ErrorKind::Other,
            BytesError::OutOfRange => embedded_io::ErrorKind::InvalidInput,
        }
    }
}

const SECTOR_BYTES: u64 = SECTOR as u64;

fn check_range<D: BlockDevice>(
    dev: &D,
    offset: u64,
    len: usize,
) -> Result<(), BytesError<D::Error>> {
    let end = offset
        .checked_add(len as u64)
        .ok_or(BytesError::OutOfRange)?;
    let size = dev.sector_count().saturating_mul(SECTOR_BYTES);
    if end > size {
        return Err(BytesError::OutOfRange);
    }
    Ok(())
}

/// Reads `buf.len()` bytes at byte `offset` of `dev`. Whole sectors go
/// straight into `buf`; a partial sector at either end is read into
/// `scratch` first.
pub async fn read_at<D: BlockDevice>(
    dev: &mut D,
    offset: u64,
    buf: &mut [u8],
    scratch: &mut Sector,
) -> Result<(), BytesError<D::Error>> {
    check_range(dev, offset, buf.len())?;
    let mut pos = offset;
    let mut rest = buf;
    while !rest.is_empty() {
        let skip = (pos & (SECTOR_BYTES - 1)) as usize;
        if skip != 0 || rest.len() < SECTOR {
            dev.read(pos >> 9, core::slice::from_mut(scratch))
                .await
                .map_err(BytesError::Device)?;
            let n = (SECTOR - skip).min(rest.len());
            let Some((now, later)) = rest.split_at_mut_checked(n) else {
                return Err(BytesError::OutOfRange);
            };
            now.copy_from_slice(scratch.get(skip..skip + n).unwrap_or(&[]));
            rest = later;
            pos += n as u64;
            continue;
        }
        let (whole, _) = rest.as_chunks_mut::<SECTOR>();
        let n = whole.len() * SECTOR;
        dev.read(pos >> 9, whole)
            .await
            .map_err(BytesError::Device)?;
        rest = rest.get_mut(n..).unwrap_or(&mut []);
        pos += n as u64;
    }
    Ok(())
}

/// Writes `buf` at byte `offset` of `dev`. Whole sectors are written from
/// `buf` directly; a partial sector at either end is read into `scratch`,
/// patched and written back.
pub async fn write_at<D: BlockDevice>(
    dev: &mut D,
    offset: u64,
    buf: &[u8],
    scratch: &mut Sector,
) -> Result<(), BytesError<D::Error>> {
    check_range(dev, offset, buf.len())?;
    let mut pos = offset;
    let mut rest = buf;
    while !rest.is_empty() {
        let skip = (pos & (SECTOR_BYTES - 1)) as usize;
        if skip != 0 || rest.len() < SECTOR {
            let sector = pos >> 9;
            dev.read(sector, core::slice::from_mut(scratch))
                .await
                .map_err(BytesError::Device)?;
            let n = (SECTOR - skip).min(rest.len());
            let Some((now, later)) = rest.split_at_checked(n) else {
                return Err(BytesError::OutOfRange);
            };
            if let Some(dst) = scratch.get_mut(skip..skip + n) {
                dst.copy_from_slice(now);
            }
            dev.write(sector, core::slice::from_ref(scratch))
                .await
                .map_err(BytesError::Device)?;
            rest = later;
            pos += n as u64;
            continue;
        }
        let (whole, _) = rest.as_chunks::<SECTOR>();
        let n = whole.len() * SECTOR;
        dev.write(pos >> 9, whole)
            .await
            .map_err(BytesError::Device)?;
        rest = rest.get(n..).unwrap_or(&[]);
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use embassy_futures::block_on;

    struct Ram([Sector; 8]);

    impl BlockDevice for Ram {
        type Error = ();
        async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), ()> {
            for (i, s) in buf.iter_mut().enumerate() {
                *s = *self.0.get(first as usize + i).ok_or(())?;
            }
            Ok(())
        }
        async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), ()> {
            for (i, s) in buf.iter().enumerate() {
                *self.0.get_mut(first as usize + i).ok_or(())? = *s;
            }
            Ok(())
        }
        async fn flush(&mut self) -> Result<(), ()> {
            Ok(())
        }
        fn sector_count(&self) -> u64 {
            8
        }
        async fn set_sector_count(&mut self, _: u64) -> Result<(), ()> {
            Err(())
        }
    }

    #[test]
    fn every_alignment_round_trips_against_a_byte_model() {
        block_on(async {
            let mut dev = Ram([[0; SECTOR]; 8]);
            let mut model = [0u8; 8 * SECTOR];
            let mut scratch = [0u8; SECTOR];
            let mut seed = 7u32;
            for round in 0..400u32 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let offset = (seed >> 8) as usize % (8 * SECTOR);
                let len = ((seed >> 20) as usize % 1500).min(8 * SECTOR - offset);
                let mut data = [0u8; 1500];
                for (i, b) in data.iter_mut().enumerate().take(len) {
                    *b = (round as u8).wrapping_mul(31).wrapping_add(i as u8);
                }
                write_at(&mut dev, offset as u64, &data[..len], &mut scratch)
                    .await
                    .unwrap();
                model[offset..offset + len].copy_from_slice(&data[..len]);
                let mut back = [0u8; 1500];
                read_at(&mut dev, offset as u64, &mut back[..len], &mut scratch)
                    .await
                    .unwrap();
                assert_eq!(&back[..len], &model[offset..offset + len], "round {round}");
            }
            assert_eq!(dev.0.as_flattened(), &model[..]);
            let mut one = [0u8; 2];
            assert_eq!(
                read_at(&mut dev, 8 * 512 - 1, &mut one, &mut scratch).await,
                Err(BytesError::OutOfRange)
            );
            assert_eq!(
                write_at(&mut dev, u64::MAX, &one, &mut scratch).await,
                Err(BytesError::OutOfRange)
            );
        });
    }
}
