//! Utilities over any [`BlockDevice`], after MirageOS's `Mirage_block`:
//! [`compare`], [`copy`], [`sparse_copy`], [`fold`], [`fold_mapped`] and
//! [`fold_unmapped`].
//!
//! Nothing here allocates: every function does its I/O through a buffer
//! the caller lends (`&mut [Sector]`), in chunks of the buffer's length,
//! so the buffer size trades memory for the number of requests. An empty
//! buffer is refused with [`UtilError::EmptyBuffer`]. All positions are in
//! sectors of [`crate::SECTOR`] bytes.
//!
//! The sparse variants take a [`SeekableDevice`] (a [`crate::Qcow2`] image,
//! or any device that opts in) and visit only what it maps, so crossing a
//! large, mostly empty image costs metadata lookups, not reads of zeros.
//!
//! Callbacks are plain `FnMut` closures returning `Result`: async closures
//! are not usable in `no_std` on stable Rust without boxing. A callback
//! that needs I/O can collect what it needs in the accumulator, or the
//! caller can write the loop itself with [`SeekableDevice`].
//!
//! ```
//! # use qcow2_core::{BlockDevice, Sector, SECTOR};
//! # struct Ram([Sector; 16]);
//! # impl BlockDevice for Ram {
//! #     type Error = ();
//! #     async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), ()> {
//! #         let s = usize::try_from(first).map_err(|_| ())?;
//! #         buf.copy_from_slice(self.0.get(s..s + buf.len()).ok_or(())?);
//! #         Ok(())
//! #     }
//! #     async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), ()> {
//! #         let s = usize::try_from(first).map_err(|_| ())?;
//! #         self.0.get_mut(s..s + buf.len()).ok_or(())?.copy_from_slice(buf);
//! #         Ok(())
//! #     }
//! #     async fn flush(&mut self) -> Result<(), ()> { Ok(()) }
//! #     fn sector_count(&self) -> u64 { 16 }
//! #     async fn set_sector_count(&mut self, _: u64) -> Result<(), ()> { Err(()) }
//! # }
//! # fn zeroed() -> Ram { Ram([[0; SECTOR]; 16]) }
//! use qcow2_core::blockutil::{compare, copy, fold, UtilError};
//!
//! # embassy_futures::block_on(async {
//! let (mut a, mut b) = (zeroed(), zeroed());
//! a.write(9, &[[7; SECTOR]]).await.map_err(UtilError::Source)?;
//! let mut buf = [[0; SECTOR]; 4]; // I/O in chunks of 4 sectors
//! let mut other = [[0; SECTOR]; 4];
//! // The first sector where the devices differ.
//! assert_eq!(compare(&mut a, &mut b, &mut buf, &mut other).await?, Some(9));
//! copy(&mut a, &mut b, &mut buf).await?;
//! assert_eq!(compare(&mut a, &mut b, &mut buf, &mut other).await?, None);
//! // Count the sectors that are not all zeros.
//! let used = fold(&mut b, &mut buf, 0, |n, _sector, data| {
//!     Ok::<_, ()>(n + data.iter().filter(|s| s.iter().any(|&x| x != 0)).count())
//! })
//! .await;
//! assert_eq!(used, Ok(1));
//! # Ok::<(), UtilError<(), ()>>(())
//! # }).unwrap();
//! ```

use core::convert::Infallible;
use core::fmt;

use crate::seek::SeekableDevice;
use crate::{BlockDevice, Sector};

/// What went wrong in a utility function.
///
/// `A` is the error of the source device (the first device, `a`, for
/// [`compare`]; the only device for the folds), `B` that of the
/// destination (the second device, `b`, for [`compare`]), `C` that of a
/// fold's callback. Unused parameters are [`Infallible`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UtilError<A, B = Infallible, C = Infallible> {
    /// The source (or first) device failed.
    Source(A),
    /// The destination (or second) device failed. Writing to a read-only
    /// destination fails here, with the device's own error (for an image,
    /// [`crate::Error::ReadOnly`]), before anything is written.
    Destination(B),
    /// The two devices do not have the same number of sectors.
    DifferentSizes {
        /// Sectors of the source (or first) device.
        source: u64,
        /// Sectors of the destination (or second) device.
        destination: u64,
    },
    /// A buffer of no sectors was passed: no I/O could be done with it.
    EmptyBuffer,
    /// The fold's callback returned this error; the fold stopped there.
    Callback(C),
}

/// The error of [`fold`], [`fold_mapped`] and [`fold_unmapped`]: the
/// device's error `A` or the callback's `C`.
pub type FoldError<A, C> = UtilError<A, Infallible, C>;

impl<A: fmt::Debug, B: fmt::Debug, C: fmt::Debug> fmt::Display for UtilError<A, B, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UtilError::Source(e) => write!(f, "source device: {e:?}"),
            UtilError::Destination(e) => write!(f, "destination device: {e:?}"),
            UtilError::DifferentSizes {
                source,
                destination,
            } => write!(
                f,
                "devices differ in size: {source} and {destination} sectors"
            ),
            UtilError::EmptyBuffer => f.write_str("empty buffer"),
            UtilError::Callback(e) => write!(f, "callback: {e:?}"),
        }
    }
}

impl<A: fmt::Debug, B: fmt::Debug, C: fmt::Debug> core::error::Error for UtilError<A, B, C> {}

/// The first `left` sectors of `buf` (all of it when shorter).
fn head(buf: &mut [Sector], left: u64) -> &mut [Sector] {
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
    buf.get_mut(..n).unwrap_or_default()
}

/// Refuses devices of different sizes, returning the common size.
fn same_size<A, B, C>(source: u64, destination: u64) -> Result<u64, UtilError<A, B, C>> {
    if source == destination {
        Ok(source)
    } else {
        Err(UtilError::DifferentSizes {
            source,
            destination,
        })
    }
}

/// Compares the contents of two devices, reading both in chunks of the
/// shorter buffer.
///
/// Returns `Ok(None)` when they are equal, `Ok(Some(sector))` with the
/// first sector whose contents differ otherwise (it stops reading there).
/// Devices of different sizes are refused with
/// [`UtilError::DifferentSizes`] before any read (MirageOS orders them by
/// size instead); errors of `a` are [`UtilError::Source`], of `b`
/// [`UtilError::Destination`].
pub async fn compare<A, B>(
    a: &mut A,
    b: &mut B,
    buf_a: &mut [Sector],
    buf_b: &mut [Sector],
) -> Result<Option<u64>, UtilError<A::Error, B::Error>>
where
    A: BlockDevice + ?Sized,
    B: BlockDevice + ?Sized,
{
    if buf_a.is_empty() || buf_b.is_empty() {
        return Err(UtilError::EmptyBuffer);
    }
    let end = same_size(a.sector_count(), b.sector_count())?;
    let chunk = buf_a.len().min(buf_b.len()) as u64;
    let mut sector = 0;
    while sector < end {
        let n = chunk.min(end - sector);
        let now_a = head(buf_a, n);
        let now_b = head(buf_b, n);
        if now_a.is_empty() || now_a.len() != now_b.len() {
            return Err(UtilError::EmptyBuffer);
        }
        a.read(sector, now_a).await.map_err(UtilError::Source)?;
        b.read(sector, now_b)
            .await
            .map_err(UtilError::Destination)?;
        if let Some(i) = now_a.iter().zip(now_b.iter()).position(|(x, y)| x != y) {
            return Ok(Some(sector + i as u64));
        }
        sector += now_a.len() as u64;
    }
    Ok(None)
}

/// Copies sectors `[start, end)` from `src` to `dst` through `buf`.
async fn copy_range<S, D>(
    src: &mut S,
    dst: &mut D,
    buf: &mut [Sector],
    start: u64,
    end: u64,
) -> Result<(), UtilError<S::Error, D::Error>>
where
    S: BlockDevice + ?Sized,
    D: BlockDevice + ?Sized,
{
    let mut sector = start;
    while sector < end {
        let now = head(buf, end - sector);
        if now.is_empty() {
            return Err(UtilError::EmptyBuffer);
        }
        src.read(sector, now).await.map_err(UtilError::Source)?;
        dst.write(sector, now)
            .await
            .map_err(UtilError::Destination)?;
        sector += now.len() as u64;
    }
    Ok(())
}

/// Copies every sector of `src` to `dst`, in chunks of `buf`, then flushes
/// `dst`: when it returns `Ok`, the copy is durable.
///
/// Both devices must have the same size ([`UtilError::DifferentSizes`]
/// otherwise, before any I/O). On error, `dst` holds a prefix of the copy.
pub async fn copy<S, D>(
    src: &mut S,
    dst: &mut D,
    buf: &mut [Sector],
) -> Result<(), UtilError<S::Error, D::Error>>
where
    S: BlockDevice + ?Sized,
    D: BlockDevice + ?Sized,
{
    if buf.is_empty() {
        return Err(UtilError::EmptyBuffer);
    }
    let end = same_size(src.sector_count(), dst.sector_count())?;
    copy_range(src, dst, buf, 0, end).await?;
    dst.flush().await.map_err(UtilError::Destination)
}

/// The next mapped region `[start, stop)` of `dev` at or after `from`,
/// `None` when nothing is mapped before `end`. A device whose answers
/// contradict each other still makes progress: a mapped region reported
/// empty is taken as `max_len` sectors (reading zeros is always correct).
async fn next_mapped<S>(
    dev: &mut S,
    from: u64,
    end: u64,
    max_len: u64,
) -> Result<Option<(u64, u64)>, S::Error>
where
    S: SeekableDevice + ?Sized,
{
    let start = dev.seek_mapped(from).await?.max(from);
    if start >= end {
        return Ok(None);
    }
    let mut stop = dev.seek_unmapped(start).await?.min(end);
    if stop <= start {
        stop = start.saturating_add(max_len).min(end);
    }
    Ok(Some((start, stop)))
}

/// Copies what `src` maps to `dst`, in chunks of `buf`, then flushes `dst`.
///
/// Regions `src` reports unmapped ([`SeekableDevice::seek_unmapped`]) are
/// neither read nor written, which preserves sparseness: copied into a new
/// image, they stay unallocated. So, as in MirageOS, **the destination
/// must already read as zeros** wherever the source is unmapped (a fresh
/// image, a zeroed device), or its old contents show through there.
/// Mapped regions are copied whole, zeros included.
///
/// Both devices must have the same size ([`UtilError::DifferentSizes`]
/// otherwise, before any I/O).
pub async fn sparse_copy<S, D>(
    src: &mut S,
    dst: &mut D,
    buf: &mut [Sector],
) -> Result<(), UtilError<S::Error, D::Error>>
where
    S: SeekableDevice + ?Sized,
    D: BlockDevice + ?Sized,
{
    if buf.is_empty() {
        return Err(UtilError::EmptyBuffer);
    }
    let end = same_size(src.sector_count(), dst.sector_count())?;
    let mut sector = 0;
    while let Some((start, stop)) = next_mapped(src, sector, end, buf.len() as u64)
        .await
        .map_err(UtilError::Source)?
    {
        copy_range(src, dst, buf, start, stop).await?;
        sector = stop;
    }
    dst.flush().await.map_err(UtilError::Destination)
}

/// Calls `f(acc, sector, data)` on `dev`'s sectors `[start, end)`, read
/// into `buf` chunk by chunk.
async fn fold_range<D, A, E, F>(
    dev: &mut D,
    buf: &mut [Sector],
    start: u64,
    end: u64,
    mut acc: A,
    f: &mut F,
) -> Result<A, FoldError<D::Error, E>>
where
    D: BlockDevice + ?Sized,
    F: FnMut(A, u64, &[Sector]) -> Result<A, E>,
{
    let mut sector = start;
    while sector < end {
        let now = head(buf, end - sector);
        if now.is_empty() {
            return Err(UtilError::EmptyBuffer);
        }
        dev.read(sector, now).await.map_err(UtilError::Source)?;
        acc = f(acc, sector, now).map_err(UtilError::Callback)?;
        sector += now.len() as u64;
    }
    Ok(acc)
}

/// Folds `f` over every sector of `dev`, read in order in chunks of `buf`:
/// `f(acc, sector, data)` gets the accumulator, the first sector of the
/// chunk and the chunk (at most `buf.len()` sectors; the last one may be
/// shorter), and returns the next accumulator or an error that stops the
/// fold ([`UtilError::Callback`]).
pub async fn fold<D, A, E, F>(
    dev: &mut D,
    buf: &mut [Sector],
    init: A,
    mut f: F,
) -> Result<A, FoldError<D::Error, E>>
where
    D: BlockDevice + ?Sized,
    F: FnMut(A, u64, &[Sector]) -> Result<A, E>,
{
    if buf.is_empty() {
        return Err(UtilError::EmptyBuffer);
    }
    let end = dev.sector_count();
    fold_range(dev, buf, 0, end, init, &mut f).await
}

/// Like [`fold`], but skips the regions `dev` reports unmapped (guaranteed
/// zeros): `f` sees only mapped data, in order, each chunk within one
/// mapped region. Mapped regions may still hold zeros.
pub async fn fold_mapped<D, A, E, F>(
    dev: &mut D,
    buf: &mut [Sector],
    init: A,
    mut f: F,
) -> Result<A, FoldError<D::Error, E>>
where
    D: SeekableDevice + ?Sized,
    F: FnMut(A, u64, &[Sector]) -> Result<A, E>,
{
    if buf.is_empty() {
        return Err(UtilError::EmptyBuffer);
    }
    let end = dev.sector_count();
    let mut acc = init;
    let mut sector = 0;
    while let Some((start, stop)) = next_mapped(dev, sector, end, buf.len() as u64)
        .await
        .map_err(UtilError::Source)?
    {
        acc = fold_range(dev, buf, start, stop, acc, &mut f).await?;
        sector = stop;
    }
    Ok(acc)
}

/// Folds `f(acc, start, len)` over the unmapped regions of `dev` (those
/// guaranteed to read as zeros), in order: each call gets one maximal
/// region, `len` sectors from sector `start`. Nothing is read, so no
/// buffer is needed.
pub async fn fold_unmapped<D, A, E, F>(
    dev: &mut D,
    init: A,
    mut f: F,
) -> Result<A, FoldError<D::Error, E>>
where
    D: SeekableDevice + ?Sized,
    F: FnMut(A, u64, u64) -> Result<A, E>,
{
    let end = dev.sector_count();
    let mut acc = init;
    let mut sector = 0;
    while sector < end {
        let start = dev
            .seek_unmapped(sector)
            .await
            .map_err(UtilError::Source)?
            .max(sector);
        if start >= end {
            break;
        }
        let stop = dev
            .seek_mapped(start)
            .await
            .map_err(UtilError::Source)?
            .min(end);
        if stop <= start {
            // Contradictory answers: report nothing not guaranteed zero.
            sector = start + 1;
            continue;
        }
        acc = f(acc, start, stop - start).map_err(UtilError::Callback)?;
        sector = stop;
    }
    Ok(acc)
}

#[cfg(test)]
mod tests;
