//! A `no_std`, allocation-free implementation of the qcow2 disk image format.
//!
//! The crate reads, writes and creates qcow2 images (versions 2 and 3) on any
//! [`BlockDevice`]. All metadata goes through a bounded cache whose storage the
//! caller provides ([`Slot`] array), so memory use is fixed at compile time.
//!
//! ```no_run
//! # async fn demo<D: qcow2_core::BlockDevice>(dev: D) -> Result<(), qcow2_core::Error<D::Error>> {
//! use qcow2_core::{CreateOptions, Qcow2, Slot, Sector};
//! let mut cache = [const { Slot::<1>::EMPTY }; 8];
//! let mut image = Qcow2::create(dev, &mut cache, CreateOptions::new(1 << 30)).await?;
//! let data = [[0xaa_u8; 512]; 8];
//! image.write(0, &data).await?;
//! let mut back: [Sector; 8] = [[0; 512]; 8];
//! image.read(0, &mut back).await?;
//! let _device = image.close().await?;
//! # Ok(()) }
//! ```
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// The core is single-threaded by design; callers pick their own executor.
#![allow(async_fn_in_trait)]
// A read-only build (without `write`) keeps the cache's write-back and some
// layout helpers it never calls; generic code that is not called is not
// compiled into the binary either.
#![cfg_attr(not(feature = "write"), allow(dead_code))]

#[macro_use]
mod fmt;
mod cache;
#[cfg(feature = "check")]
mod check;
pub mod codec;
pub mod device;
mod engine;
mod error;
pub mod format;
mod image;
mod outline;
#[cfg(test)]
mod testing;

pub use device::{blockutil, bytes, io, seek};
pub use image::backing;

pub use backing::NoBacking;
pub use cache::{Slot, SlotStorage};
#[cfg(feature = "check")]
pub use check::{CheckReport, Finding, Repair};
pub use codec::{Compression, NoWorkspace, Workspace};
pub use device::{BlockDevice, Sector, SECTOR};
pub use engine::extent::CompressedExtent;
pub use engine::map::Mapping;
pub use error::{Corruption, Error, Feature, OpenError};
pub use format::Version;
#[cfg(feature = "write")]
pub use image::create::CreateOptions;
pub use image::{ImageInfo, OpenOptions, Qcow2};
pub use seek::SeekableDevice;

/// The cache configuration recommended for firmware: 8 slices of 512 bytes.
pub type FirmwareCache = [Slot<1>; 8];
/// An image with the default firmware cache configuration, borrowing its
/// cache (a `static` or a long-lived local) so that the image and every
/// future over it stay small: moving a 4 KiB cache through async state
/// machines multiplies stack use.
pub type FirmwareQcow2<'c, D> = Qcow2<D, &'c mut FirmwareCache, 1>;
