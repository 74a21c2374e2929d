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
//!
//! # Layers
//!
//! The modules are layers; each uses only the layers before it in this
//! list (ARCHITECTURE.md in the repository has a line per file):
//!
//! 1. `format`: on-disk types, pure encode/decode/validate, no I/O;
//! 2. [`device`]: the [`BlockDevice`] trait, seeking, byte and
//!    `embedded-io-async` adapters, block utilities;
//! 3. [`codec`]: the decoder interface and the caller-lent [`Workspace`];
//! 4. `cache`: the bounded metadata cache and its crash-safe write-back
//!    order;
//! 5. `engine`: the image's metadata (geometry, header updates, mapping,
//!    refcounts, allocation, release, the maintenance toolkit), which knows
//!    nothing of backing files or decoders;
//! 6. `check`: check and repair, on the engine;
//! 7. `image`: the guest view, [`Qcow2`] = engine + backing + workspace
//!    (open policy, create, read, the write plan, discard).
//!
//! A lower layer never names a higher one: the engine asks the guest view
//! to decode a compressed stream through a trait of its own, rather than
//! knowing the workspace.

#![cfg_attr(
    feature = "zlib",
    doc = r#"
# An overlay on a backing file, with a decoder

```no_run
# async fn demo<D: qcow2_core::BlockDevice>(base: D, top: D) -> Result<(), qcow2_core::Error<D::Error>> {
use qcow2_core::codec::inflate::{Inflate, InflateState, MIN_WINDOW};
use qcow2_core::codec::DecoderWorkspace;
use qcow2_core::{OpenOptions, Qcow2, Sector, Slot, SECTOR};

// The backing file: an image opened read-only, with a cache of its own.
let mut base_cache = [const { Slot::<1>::EMPTY }; 8];
let base = Qcow2::open(base, &mut base_cache, OpenOptions::read_only()).await?;

// The overlay reads from its backing what it has not written itself.
let mut cache = [const { Slot::<1>::EMPTY }; 8];
let overlay = Qcow2::open(top, &mut cache, OpenOptions::read_write()).await?;

// Memory lent for compressed clusters (zlib here): the decoder's state and
// window, a bounce buffer of a cluster (64 KiB), an input buffer.
let mut state = InflateState::new();
let mut window = [0u8; MIN_WINDOW];
let mut bounce = [[0u8; SECTOR]; 128];
let mut input = [[0u8; SECTOR]; 8];
let decoder = Inflate::new(&mut state, &mut window);
let workspace = DecoderWorkspace::new(decoder, &mut bounce, &mut input);
let mut image = overlay.with_backing(base).with_workspace(workspace);

// Reads come from the overlay, the backing or a compressed cluster; a
// partial write copies the rest of its cluster from the backing.
let mut buf: [Sector; 8] = [[0; SECTOR]; 8];
image.read(0, &mut buf).await?;
image.write(0, &buf).await?;
image.close().await?;
# Ok(()) }
```
"#
)]
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
