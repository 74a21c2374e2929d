//! The metadata engine: everything below the guest view that reads and
//! changes the image's metadata (mapping, refcounts, allocation, header
//! updates), knowing nothing of backing files or decoders.

#[cfg(feature = "write")]
pub(crate) mod alloc;
pub(crate) mod data;
pub(crate) mod extent;
pub(crate) mod header_io;
pub(crate) mod map;
mod names;
#[cfg(feature = "check")]
pub(crate) mod refcount;
