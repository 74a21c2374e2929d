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

/// The next piece of a byte range at `pos` with `len` bytes left.
enum Piece {
    /// Part of one sector: the offset in it, and the byte count.
    Partial { skip: usize, len: usize },
    /// Whole sectors: the byte count.
    Whole { len: usize },
}

fn next_piece(pos: u64, len: usize) -> Piece {
    let skip = (pos & (SECTOR_BYTES - 1)) as usize;
    if skip != 0 || len < SECTOR {
        Piece::Partial {
            skip,
            len: (SECTOR - skip).min(len),
        }
    } else {
        Piece::Whole {
            len: len & !(SECTOR - 1),
        }
    }
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
        let piece = next_piece(pos, rest.len());
        let n = match piece {
            Piece::Partial { len, .. } | Piece::Whole { len } => len,
        };
        let Some((now, later)) = rest.split_at_mut_checked(n) else {
            return Err(BytesError::OutOfRange);
        };
        match piece {
            Piece::Partial { skip, len } => {
                dev.read(pos >> 9, core::slice::from_mut(scratch))
                    .await
                    .map_err(BytesError::Device)?;
                now.copy_from_slice(scratch.get(skip..skip + len).unwrap_or(&[]));
            }
            Piece::Whole { .. } => {
                let (whole, _) = now.as_chunks_mut::<SECTOR>();
                dev.read(pos >> 9, whole)
                    .await
                    .map_err(BytesError::Device)?;
            }
        }
        rest = later;
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
        let piece = next_piece(pos, rest.len());
        let n = match piece {
            Piece::Partial { len, .. } | Piece::Whole { len } => len,
        };
        let Some((now, later)) = rest.split_at_checked(n) else {
            return Err(BytesError::OutOfRange);
        };
        match piece {
            Piece::Partial { skip, len } => {
                dev.read(pos >> 9, core::slice::from_mut(scratch))
                    .await
                    .map_err(BytesError::Device)?;
                if let Some(dst) = scratch.get_mut(skip..skip + len) {
                    dst.copy_from_slice(now);
                }
                dev.write(pos >> 9, core::slice::from_ref(scratch))
                    .await
                    .map_err(BytesError::Device)?;
            }
            Piece::Whole { .. } => {
                let (whole, _) = now.as_chunks::<SECTOR>();
                dev.write(pos >> 9, whole)
                    .await
                    .map_err(BytesError::Device)?;
            }
        }
        rest = later;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use embassy_futures::block_on;

    use crate::testing::ram;

    #[test]
    fn every_alignment_round_trips_against_a_byte_model() {
        block_on(async {
            let mut dev = ram();
            let mut model = [0u8; 64 * SECTOR];
            model.copy_from_slice(dev.data.as_flattened());
            let mut scratch = [0u8; SECTOR];
            let mut seed = 7u32;
            for round in 0..400u32 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let offset = (seed >> 8) as usize % (64 * SECTOR);
                let len = ((seed >> 20) as usize % 1500).min(64 * SECTOR - offset);
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
            assert_eq!(dev.data.as_flattened(), &model[..]);
            let mut one = [0u8; 2];
            assert_eq!(
                read_at(&mut dev, 64 * 512 - 1, &mut one, &mut scratch).await,
                Err(BytesError::OutOfRange)
            );
            assert_eq!(
                write_at(&mut dev, u64::MAX, &one, &mut scratch).await,
                Err(BytesError::OutOfRange)
            );
        });
    }
}
