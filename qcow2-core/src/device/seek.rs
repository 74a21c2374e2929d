//! Devices that know their sparseness: [`SeekableDevice`], as
//! `Mirage_block_s.SEEKABLE` in MirageOS.
//!
//! Two queries, both in 512-byte sectors (the unit of every
//! [`BlockDevice`] address):
//!
//! * [`SeekableDevice::seek_mapped`]: where the next region that **may**
//!   hold data starts;
//! * [`SeekableDevice::seek_unmapped`]: where the next region that is
//!   **guaranteed** to read as zeros starts.
//!
//! The answers may be conservative in one direction only: a region reported
//! mapped may still read as zeros (a data cluster full of zeros), but a
//! region reported unmapped must read as zeros. [`crate::blockutil`] uses
//! them to copy and fold over only what a device maps.
//!
//! [`crate::Qcow2`] knows its sparseness from its L1 and L2 tables. A device that
//! knows nothing of sparseness can opt in as "everything mapped", with an
//! empty `impl` (the trait's default methods), or, for a type from another
//! crate, by wrapping it in [`AllMapped`].

use crate::{BlockDevice, Sector};

/// A [`BlockDevice`] that can tell where its data may be and where it is
/// guaranteed to be zeros, like MirageOS's `Mirage_block_s.SEEKABLE`.
///
/// Positions are in sectors of [`crate::SECTOR`] bytes, as everywhere in
/// [`BlockDevice`]. For `from` up to [`BlockDevice::sector_count`] both
/// methods return a sector in `from..=sector_count()`, `sector_count()`
/// meaning "none before the end"; for `from` past the end they return
/// `sector_count()`. Alternating them walks the device: from `m =
/// seek_mapped(x)`, `seek_unmapped(m)` is the end of that mapped region,
/// greater than `m` unless `m` is the end.
///
/// The default methods describe a device with no sparseness knowledge:
/// every sector may hold data (`seek_mapped(from) == from`, and
/// `seek_unmapped` finds nothing before the end). A plain device opts in
/// with an empty impl:
///
/// ```
/// use qcow2_core::{BlockDevice, Sector};
/// use qcow2_core::seek::SeekableDevice;
///
/// struct Flash([Sector; 4]);
/// # impl BlockDevice for Flash {
/// #     type Error = ();
/// #     async fn read(&mut self, _: u64, _: &mut [Sector]) -> Result<(), ()> { Ok(()) }
/// #     async fn write(&mut self, _: u64, _: &[Sector]) -> Result<(), ()> { Ok(()) }
/// #     async fn flush(&mut self) -> Result<(), ()> { Ok(()) }
/// #     fn sector_count(&self) -> u64 { 4 }
/// #     async fn set_sector_count(&mut self, _: u64) -> Result<(), ()> { Err(()) }
/// # }
/// // Everything mapped: copies and folds visit every sector.
/// impl SeekableDevice for Flash {}
/// ```
pub trait SeekableDevice: BlockDevice {
    /// The first sector at or after `from` that may hold data: the start of
    /// the next mapped region (`from` itself when it is mapped), or
    /// [`BlockDevice::sector_count`] when everything from `from` to the end
    /// reads as zeros.
    ///
    /// The default (no sparseness knowledge) returns `from`, or
    /// `sector_count()` when `from` is past the end.
    async fn seek_mapped(&mut self, from: u64) -> Result<u64, Self::Error> {
        Ok(from.min(self.sector_count()))
    }

    /// The first sector at or after `from` that is guaranteed to read as
    /// zeros: the start of the next hole (`from` itself when it is in one),
    /// or [`BlockDevice::sector_count`] when there is none before the end.
    ///
    /// The default (no sparseness knowledge) returns `sector_count()`.
    async fn seek_unmapped(&mut self, from: u64) -> Result<u64, Self::Error> {
        let _ = from;
        Ok(self.sector_count())
    }
}

/// A mutable borrow of a seekable device is one.
impl<T: SeekableDevice + ?Sized> SeekableDevice for &mut T {
    async fn seek_mapped(&mut self, from: u64) -> Result<u64, Self::Error> {
        (**self).seek_mapped(from).await
    }

    async fn seek_unmapped(&mut self, from: u64) -> Result<u64, Self::Error> {
        (**self).seek_unmapped(from).await
    }
}

/// Wraps a device without sparseness knowledge (a type from another crate,
/// which cannot implement [`SeekableDevice`] itself) as a
/// [`SeekableDevice`] on which everything is mapped. Every
/// [`BlockDevice`] call is passed through.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllMapped<D>(pub D);

impl<D: BlockDevice> BlockDevice for AllMapped<D> {
    type Error = D::Error;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), Self::Error> {
        self.0.read(first, buf).await
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), Self::Error> {
        self.0.write(first, buf).await
    }

    async fn flush(&mut self) -> Result<(), Self::Error> {
        self.0.flush().await
    }

    fn sector_count(&self) -> u64 {
        self.0.sector_count()
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), Self::Error> {
        self.0.set_sector_count(n).await
    }

    async fn write_zeros(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        self.0.write_zeros(first, count).await
    }

    async fn discard(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        self.0.discard(first, count).await
    }
}

impl<D: BlockDevice> SeekableDevice for AllMapped<D> {}

// The tests create images: they need the `write` feature.
#[cfg(test)]
#[cfg(feature = "write")]
mod tests {
    use super::*;
    use crate::{CreateOptions, Mapping, OpenOptions, Qcow2, Slot, SECTOR};
    use embassy_futures::block_on;

    /// A RAM device that grows up to `N` sectors.
    struct Ram<const N: usize> {
        data: [Sector; N],
        len: u64,
    }

    impl<const N: usize> Ram<N> {
        fn new(len: u64) -> Self {
            Ram {
                data: [[0; SECTOR]; N],
                len,
            }
        }
    }

    impl<const N: usize> BlockDevice for Ram<N> {
        type Error = ();
        async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), ()> {
            let start = usize::try_from(first).map_err(|_| ())?;
            let src = self.data.get(start..start + buf.len()).ok_or(())?;
            buf.copy_from_slice(src);
            Ok(())
        }
        async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), ()> {
            let end = first + buf.len() as u64;
            if end > self.len {
                self.set_sector_count(end).await?;
            }
            let start = usize::try_from(first).map_err(|_| ())?;
            let dst = self.data.get_mut(start..start + buf.len()).ok_or(())?;
            dst.copy_from_slice(buf);
            Ok(())
        }
        async fn flush(&mut self) -> Result<(), ()> {
            Ok(())
        }
        fn sector_count(&self) -> u64 {
            self.len
        }
        async fn set_sector_count(&mut self, n: u64) -> Result<(), ()> {
            if n > N as u64 {
                return Err(());
            }
            for s in self.data.iter_mut().skip(n as usize) {
                *s = [0; SECTOR];
            }
            self.len = n;
            Ok(())
        }
    }

    /// Seeks through the `&mut T` impl (a generic device that is a borrow).
    async fn seek_through<S: SeekableDevice>(
        mut dev: S,
        from: u64,
        mapped: bool,
    ) -> Result<u64, S::Error> {
        if mapped {
            dev.seek_mapped(from).await
        } else {
            dev.seek_unmapped(from).await
        }
    }

    /// 512-byte clusters: an L2 table (64 entries) covers 64 sectors.
    fn options(size_sectors: u64) -> CreateOptions {
        let mut o = CreateOptions::new(size_sectors * SECTOR as u64);
        o.cluster_bits = 9;
        o
    }

    #[test]
    fn default_methods_mean_everything_mapped() {
        block_on(async {
            let mut dev = AllMapped(Ram::<8>::new(8));
            assert_eq!(dev.seek_mapped(0).await, Ok(0));
            assert_eq!(dev.seek_mapped(5).await, Ok(5));
            assert_eq!(dev.seek_mapped(9).await, Ok(8));
            assert_eq!(dev.seek_unmapped(0).await, Ok(8));
            assert_eq!(seek_through(&mut dev, 3, true).await, Ok(3));
            assert_eq!(seek_through(&mut dev, 3, false).await, Ok(8));
        });
    }

    #[test]
    fn qcow2_seeks_follow_the_tables() {
        block_on(async {
            let mut cache = [const { Slot::<1>::EMPTY }; 4];
            let dev = Ram::<64>::new(0);
            // 1000 sectors: 16 L2 tables' ranges, the last one partial.
            let mut image = Qcow2::create(dev, &mut cache, options(1000)).await.unwrap();
            assert_eq!(image.seek_mapped(0).await, Ok(1000));
            assert_eq!(image.seek_unmapped(0).await, Ok(0));
            assert_eq!(image.seek_mapped(2000).await, Ok(1000));
            assert_eq!(image.seek_unmapped(2000).await, Ok(1000));

            let data = [[0x5a; SECTOR]; 3];
            // Sectors 100..103, 700..703 and the very last one.
            image.write(100, &data).await.unwrap();
            image.write(700, &data).await.unwrap();
            image.write(999, &data[..1]).await.unwrap();
            // A cluster of zeros written is still data (mapped).
            image.write(500, &[[0; SECTOR]]).await.unwrap();

            assert_eq!(image.seek_mapped(0).await, Ok(100));
            assert_eq!(image.seek_mapped(100).await, Ok(100));
            assert_eq!(image.seek_unmapped(100).await, Ok(103));
            assert_eq!(image.seek_mapped(103).await, Ok(500));
            assert_eq!(image.seek_unmapped(500).await, Ok(501));
            assert_eq!(image.seek_mapped(501).await, Ok(700));
            assert_eq!(image.seek_unmapped(701).await, Ok(703));
            assert_eq!(image.seek_mapped(703).await, Ok(999));
            assert_eq!(image.seek_unmapped(999).await, Ok(1000));
            assert_eq!(image.seek_mapped(1000).await, Ok(1000));

            // Reopened read-only, through a borrow.
            let (dev, cache) = image.close().await.unwrap();
            let mut image = Qcow2::open(dev, cache, OpenOptions::read_only())
                .await
                .unwrap();
            assert_eq!(seek_through(&mut image, 101, true).await, Ok(101));
            assert_eq!(seek_through(&mut image, 0, false).await, Ok(0));
            assert_eq!(seek_through(&mut image, 700, false).await, Ok(703));

            // Set the zero flag on sector 701's cluster (keeping its
            // preallocated offset): it reads as zeros, so it is a hole.
            let l2 = image.engine.l2_table(701).await.unwrap();
            let (_, at) = image.engine.l2_entry(l2, 701).await.unwrap();
            let (mut dev, cache) = image.abandon();
            let sector = (at >> 9) as usize;
            let byte = (at & 511) as usize + 7;
            dev.data[sector][byte] |= crate::format::entry::ZERO as u8;
            let mut image = Qcow2::open(dev, cache, OpenOptions::read_only())
                .await
                .unwrap();
            assert_eq!(image.map(701 * 512).await.unwrap().0, Mapping::Zero);
            assert_eq!(image.seek_unmapped(700).await, Ok(701));
            assert_eq!(image.seek_mapped(701).await, Ok(702));
            assert_eq!(image.seek_unmapped(100).await, Ok(103));
        });
    }
}
