//! Logging of events that are otherwise invisible to the caller (a repair
//! at open, a refcount table that moved, the corrupt bit set), through
//! `defmt` when the `defmt` feature is on and compiled out otherwise: the
//! pattern embassy's crates use. Arguments must implement `defmt::Format`.

#![allow(unused_macros)]

/// An event worth knowing about in normal operation.
macro_rules! info {
    ($s:literal $(, $x:expr)* $(,)?) => {
        {
            #[cfg(feature = "defmt")]
            ::defmt::info!($s $(, $x)*);
            #[cfg(not(feature = "defmt"))]
            let _ = ($( & $x ),*);
        }
    };
}

/// Something went wrong with the image (not with this library).
macro_rules! warn {
    ($s:literal $(, $x:expr)* $(,)?) => {
        {
            #[cfg(feature = "defmt")]
            ::defmt::warn!($s $(, $x)*);
            #[cfg(not(feature = "defmt"))]
            let _ = ($( & $x ),*);
        }
    };
}
