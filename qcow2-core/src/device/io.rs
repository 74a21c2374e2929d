//! `embedded-io-async` adapters, both ways:
//!
//! - [`IoDevice`]: a [`BlockDevice`] over any `Read + Write + Seek` byte
//!   stream (a file on an SD card's FAT file system, a flash partition
//!   driver), so an image can live in a file;
//! - [`Cursor`]: any [`BlockDevice`] (an open [`crate::Qcow2`] virtual
//!   disk, typically) as a byte-addressed `Read + Write + Seek` stream, for
//!   code written against those traits (a file system, a decompressor).
//!
//! ```no_run
//! # async fn demo<F>(file: F) -> Result<(), ()>
//! # where F: embedded_io_async::Read + embedded_io_async::Write + embedded_io_async::Seek {
//! use embedded_io_async::{Read, Seek, SeekFrom};
//! use qcow2_core::io::{Cursor, IoDevice};
//! use qcow2_core::{OpenOptions, Qcow2, Slot};
//!
//! let dev = IoDevice::new(file, false).await.map_err(|_| ())?;
//! let mut cache = [const { Slot::<1>::EMPTY }; 8];
//! let mut image = Qcow2::open(dev, &mut cache, OpenOptions::read_only())
//!     .await
//!     .map_err(|_| ())?;
//! let mut scratch = [0u8; 512];
//! let mut disk = Cursor::new(&mut image, &mut scratch);
//! disk.seek(SeekFrom::Start(446)).await.map_err(|_| ())?;
//! let mut partition_table = [0u8; 64];
//! disk.read_exact(&mut partition_table).await.map_err(|_| ())?;
//! # Ok(()) }
//! ```

use crate::bytes::{read_at, write_at, BytesError};
use crate::{BlockDevice, Sector, SECTOR};
use core::fmt;
use embedded_io_async::{ErrorType, Read, Seek, SeekFrom, Write};

/// Why an [`IoDevice`] access failed.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDeviceError<E> {
    /// The stream failed.
    Io(E),
    /// The stream ended before a whole sector was written.
    WriteZero,
    /// The device was made fixed-size (or shrinking was asked): it does not
    /// change size. Images report this as [`crate::Error::NoSpace`].
    Fixed,
}

impl<E: fmt::Debug> fmt::Display for IoDeviceError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoDeviceError::Io(e) => write!(f, "stream error: {e:?}"),
            IoDeviceError::WriteZero => f.write_str("stream accepted no more bytes"),
            IoDeviceError::Fixed => f.write_str("device size is fixed"),
        }
    }
}

impl<E: fmt::Debug> core::error::Error for IoDeviceError<E> {}

impl<E: embedded_io::Error> embedded_io::Error for IoDeviceError<E> {
    fn kind(&self) -> embedded_io::ErrorKind {
        match self {
            IoDeviceError::Io(e) => e.kind(),
            IoDeviceError::WriteZero => embedded_io::ErrorKind::WriteZero,
            IoDeviceError::Fixed => embedded_io::ErrorKind::Other,
        }
    }
}

/// A [`BlockDevice`] over a `Read + Write + Seek` stream of bytes.
///
/// Its size is the stream's length when made, rounded up to a whole
/// sector; bytes past the stream's end read as zeros. A growable device
/// extends the stream by writing its new last sector; a fixed one refuses.
pub struct IoDevice<T> {
    io: T,
    sectors: u64,
    growable: bool,
}

impl<T: Read + Write + Seek> IoDevice<T> {
    /// Wraps `io`, measuring its length by seeking to its end.
    pub async fn new(mut io: T, growable: bool) -> Result<Self, IoDeviceError<T::Error>> {
        let len = io.seek(SeekFrom::End(0)).await.map_err(IoDeviceError::Io)?;
        Ok(IoDevice {
            io,
            sectors: crate::format::shr_ceil(len, 9),
            growable,
        })
    }

    /// The stream back.
    pub fn into_inner(self) -> T {
        self.io
    }

    async fn seek_to(&mut self, sector: u64) -> Result<(), IoDeviceError<T::Error>> {
        self.io
            .seek(SeekFrom::Start(sector << 9))
            .await
            .map_err(IoDeviceError::Io)?;
        Ok(())
    }
}

impl<T: Read + Write + Seek> BlockDevice for IoDevice<T> {
    type Error = IoDeviceError<T::Error>;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), Self::Error> {
        self.seek_to(first).await?;
        let mut rest = buf.as_flattened_mut();
        while !rest.is_empty() {
            match self.io.read(rest).await.map_err(IoDeviceError::Io)? {
                // Past the end of the stream: zeros, as a sparse file.
                0 => {
                    rest.fill(0);
                    break;
                }
                n => rest = rest.get_mut(n..).unwrap_or(&mut []),
            }
        }
        Ok(())
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), Self::Error> {
        self.seek_to(first).await?;
        let mut rest = buf.as_flattened();
        while !rest.is_empty() {
            match self.io.write(rest).await.map_err(IoDeviceError::Io)? {
                0 => return Err(IoDeviceError::WriteZero),
                n => rest = rest.get(n..).unwrap_or(&[]),
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.io.flush().await.map_err(IoDeviceError::Io)
    }

    fn sector_count(&self) -> u64 {
        self.sectors
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), Self::Error> {
        if n == self.sectors {
            return Ok(());
        }
        if !self.growable || n < self.sectors {
            return Err(IoDeviceError::Fixed);
        }
        // Writing the new last sector extends the stream; what lies between
        // reads as zeros (a hole, or zeros the file system wrote).
        let zero: Sector = [0; SECTOR];
        self.write(n - 1, core::slice::from_ref(&zero)).await?;
        self.sectors = n;
        Ok(())
    }
}

/// A byte-addressed `Read + Write + Seek` view of a [`BlockDevice`], with
/// one caller-provided sector of scratch for partial sectors.
///
/// Reads stop at the device's end (a read there returns 0); writes past it
/// fail with [`BytesError::OutOfRange`]. `flush` flushes the device.
pub struct Cursor<'s, D> {
    dev: D,
    pos: u64,
    scratch: &'s mut Sector,
}

impl<'s, D: BlockDevice> Cursor<'s, D> {
    /// A cursor at byte 0 of `dev` (which may be `&mut` a device).
    pub fn new(dev: D, scratch: &'s mut Sector) -> Self {
        Cursor {
            dev,
            pos: 0,
            scratch,
        }
    }

    /// The device back.
    pub fn into_inner(self) -> D {
        self.dev
    }

    /// The device's size in bytes.
    pub fn len(&self) -> u64 {
        self.dev.sector_count().saturating_mul(SECTOR as u64)
    }

    /// Whether the device holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many of `want` bytes from the position lie inside the device.
    fn available(&self, want: usize) -> usize {
        let left = self.len().saturating_sub(self.pos);
        usize::try_from(left).map_or(want, |left| left.min(want))
    }
}

impl<D: BlockDevice> ErrorType for Cursor<'_, D> {
    type Error = BytesError<D::Error>;
}

impl<D: BlockDevice> Read for Cursor<'_, D> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let n = self.available(buf.len());
        let now = buf.get_mut(..n).unwrap_or(&mut []);
        read_at(&mut self.dev, self.pos, now, self.scratch).await?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<D: BlockDevice> Write for Cursor<'_, D> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        let n = self.available(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(BytesError::OutOfRange);
        }
        write_at(
            &mut self.dev,
            self.pos,
            buf.get(..n).unwrap_or(&[]),
            self.scratch,
        )
        .await?;
        self.pos += n as u64;
        Ok(n)
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.dev.flush().await.map_err(BytesError::Device)
    }
}

impl<D: BlockDevice> Seek for Cursor<'_, D> {
    async fn seek(&mut self, pos: SeekFrom) -> Result<u64, Self::Error> {
        let target = match pos {
            SeekFrom::Start(at) => Some(at),
            SeekFrom::End(delta) => self.len().checked_add_signed(delta),
            SeekFrom::Current(delta) => self.pos.checked_add_signed(delta),
        };
        // As std: positions past the end are allowed, before 0 are not.
        self.pos = target.ok_or(BytesError::OutOfRange)?;
        Ok(self.pos)
    }
}

// The tests create images: they need the `write` feature.
#[cfg(test)]
#[cfg(feature = "write")]
mod tests {
    use super::*;
    use crate::{CreateOptions, OpenOptions, Qcow2, Slot};
    use embassy_futures::block_on;

    /// A byte stream in a fixed array, as a file on a small FAT volume.
    struct MemFile {
        data: [u8; 96 * 1024],
        len: usize,
        pos: usize,
    }

    impl ErrorType for MemFile {
        type Error = embedded_io::ErrorKind;
    }

    impl Read for MemFile {
        async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
            let n = buf.len().min(self.len.saturating_sub(self.pos));
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    impl Write for MemFile {
        async fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
            let n = buf.len().min(self.data.len().saturating_sub(self.pos));
            self.data[self.pos..self.pos + n].copy_from_slice(&buf[..n]);
            self.pos += n;
            self.len = self.len.max(self.pos);
            Ok(n)
        }
        async fn flush(&mut self) -> Result<(), Self::Error> {
            Ok(())
        }
    }

    impl Seek for MemFile {
        async fn seek(&mut self, pos: SeekFrom) -> Result<u64, Self::Error> {
            self.pos = match pos {
                SeekFrom::Start(p) => p as usize,
                SeekFrom::End(d) => (self.len as i64 + d) as usize,
                SeekFrom::Current(d) => (self.pos as i64 + d) as usize,
            };
            Ok(self.pos as u64)
        }
    }

    #[test]
    fn an_image_in_a_stream_through_a_byte_cursor() {
        block_on(async {
            let mut file = MemFile {
                data: [0; 96 * 1024],
                len: 0,
                pos: 0,
            };
            let dev = IoDevice::new(&mut file, true).await.unwrap();
            assert_eq!(dev.sector_count(), 0);
            let mut cache = [const { Slot::<1>::EMPTY }; 4];
            let options = CreateOptions {
                cluster_bits: 12,
                ..CreateOptions::new(1 << 20)
            };
            let mut image = Qcow2::create(dev, &mut cache, options).await.unwrap();
            let mut scratch = [0u8; SECTOR];
            let mut disk = Cursor::new(&mut image, &mut scratch);
            assert_eq!(disk.len(), 1 << 20);
            disk.seek(SeekFrom::Start(4000)).await.unwrap();
            let text = b"qcow2 through embedded-io-async, across a sector edge";
            disk.write_all(text).await.unwrap();
            assert_eq!(disk.seek(SeekFrom::Current(0)).await.unwrap(), 4000 + 53);
            disk.seek(SeekFrom::End(-3)).await.unwrap();
            disk.write_all(b"end").await.unwrap();
            assert_eq!(disk.write(b"x").await, Err(BytesError::OutOfRange));
            let mut back = [0u8; 8];
            assert_eq!(disk.read(&mut back).await.unwrap(), 0, "end of disk");
            assert!(disk.seek(SeekFrom::Current(-(2 << 20))).await.is_err());
            disk.seek(SeekFrom::Start(3999)).await.unwrap();
            let mut got = [0u8; 55];
            disk.read_exact(&mut got).await.unwrap();
            assert_eq!(got[0], 0);
            assert_eq!(&got[1..54], &text[..]);
            assert_eq!(got[54], 0);
            disk.flush().await.unwrap();
            image.close().await.unwrap();

            // The stream holds a valid image: reopen it read-only from bytes.
            assert!(file.len > 4 * 4096 && file.len.is_multiple_of(512));
            let dev = IoDevice::new(&mut file, false).await.unwrap();
            let mut image = Qcow2::open(dev, &mut cache, OpenOptions::read_only())
                .await
                .unwrap();
            let mut scratch = [0u8; SECTOR];
            let mut disk = Cursor::new(&mut image, &mut scratch);
            disk.seek(SeekFrom::End(-3)).await.unwrap();
            let mut end = [0u8; 3];
            disk.read_exact(&mut end).await.unwrap();
            assert_eq!(&end, b"end");
            let mut scratch = [0u8; 1024];
            assert!(image.check(&mut scratch).await.unwrap().is_clean());
        });
    }

    #[test]
    fn a_fixed_stream_device_refuses_to_grow() {
        block_on(async {
            let mut file = MemFile {
                data: [0; 96 * 1024],
                len: 1000,
                pos: 0,
            };
            let mut dev = IoDevice::new(&mut file, false).await.unwrap();
            // 1000 bytes: two sectors, the second zero-padded on read.
            assert_eq!(dev.sector_count(), 2);
            let mut buf = [[0xffu8; SECTOR]; 2];
            dev.read(0, &mut buf).await.unwrap();
            assert!(buf.as_flattened().iter().all(|&b| b == 0));
            assert_eq!(dev.set_sector_count(3).await, Err(IoDeviceError::Fixed));
            let mut cache = [const { Slot::<1>::EMPTY }; 2];
            let Err(failed) = Qcow2::create(dev, &mut cache, CreateOptions::new(1 << 20)).await
            else {
                panic!("create fitted in 1000 bytes");
            };
            assert_eq!(failed.error, crate::Error::NoSpace);
        });
    }
}
