//! [`BothDecoder`]: one [`Decoder`] for images of either compression type,
//! for firmware that reads both (features `zlib` and `zstd`).

use crate::codec::inflate::Inflate;
use crate::codec::zstd::Zstd;
use crate::codec::{Compression, DecodeError, Decoder, Step};

/// An [`Inflate`] and a [`Zstd`] decoder behind one [`Decoder`]: each
/// cluster goes to the one for the format [`Decoder::start`] names. Its
/// memory is that of both (each borrows its own), and each behaves as on
/// its own.
pub struct BothDecoder<'a> {
    zlib: Inflate<'a>,
    zstd: Zstd<'a>,
    /// The format of the current cluster: where steps go.
    format: Compression,
}

impl<'a> BothDecoder<'a> {
    /// The two decoders as one.
    pub fn new(zlib: Inflate<'a>, zstd: Zstd<'a>) -> Self {
        BothDecoder {
            zlib,
            zstd,
            format: Compression::Zlib,
        }
    }

    /// The zlib decoder (for [`Inflate::is_exact_for`]).
    pub fn zlib(&self) -> &Inflate<'a> {
        &self.zlib
    }
}

impl Decoder for BothDecoder<'_> {
    fn start(&mut self, format: Compression, cluster_size: usize) -> Result<(), DecodeError> {
        // Set before starting: a failed start leaves that decoder failed,
        // and steps then repeat its error.
        self.format = format;
        match format {
            Compression::Zlib => self.zlib.start(format, cluster_size),
            Compression::Zstd => self.zstd.start(format, cluster_size),
        }
    }

    fn step(&mut self, input: &[u8], last: bool) -> Result<Step<'_>, DecodeError> {
        match self.format {
            Compression::Zlib => self.zlib.step(input, last),
            Compression::Zstd => self.zstd.step(input, last),
        }
    }
}

#[cfg(test)]
mod tests;
