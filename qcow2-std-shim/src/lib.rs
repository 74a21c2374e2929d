//! Host adapters for `qcow2-core`: file and RAM devices, a fault-injecting
//! device for crash tests, a blocking, byte-addressed image API, cache
//! defaults sized for a host, image locking compatible with QEMU's, and
//! direct I/O (`O_DIRECT`) for files.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backing;
mod blocking;
pub mod chain;
pub mod codec;
pub mod data_file;
pub mod direct;
mod fault;
mod file;
pub mod fuzzing;
mod hole;
pub mod lock;
pub mod policy;
mod ram;

pub use backing::HostBacking;
pub use blocking::{
    host_cache, HostCache, HostQcow2, Image, HOST_CACHE_SLOTS, HOST_SCRATCH_BYTES,
    HOST_SLICE_SECTORS,
};
pub use chain::{attach_chain, open_chain, ChainError, ChainOptions};
pub use direct::AlignedBuf;
pub use fault::{FaultDevice, FaultError, Survival};
pub use file::{FileDevice, FileOptions};
pub use hole::punch_hole;
pub use lock::{ImageLock, LockError, LockMode, Permission, Permissions};
pub use policy::FilePolicy;
pub use qcow2_core;
pub use ram::{RamDevice, RamError};

/// Runs a future of the async core to completion on the current thread.
pub fn block_on<F: core::future::Future>(f: F) -> F::Output {
    embassy_futures::block_on(f)
}
