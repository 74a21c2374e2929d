//! Compressed clusters: the decoder interface and the working memory that
//! decompression and copy-on-write use.
//!
//! The core holds no buffers larger than a sector. What more it can use
//! comes from a [`Workspace`] the caller attaches to the image
//! ([`crate::Qcow2::with_workspace`]):
//! - a **bounce** buffer: with room for a whole cluster, a partial write
//!   into a cluster whose other sectors come from elsewhere (a backing
//!   file, a compressed cluster) goes out in one device write, and
//!   compressed clusters are written in one device write; without, the core
//!   works a sector at a time through its own scratch sector;
//! - an **input** buffer for compressed bytes read from the device (again a
//!   sector at a time without it);
//! - a [`Decoder`], which owns its output window.
//!
//! The default, [`NoWorkspace`], is zero-sized: compressed clusters then
//! read as [`crate::Error::Unsupported`]. [`Buffers`] lends buffers without
//! a decoder; [`DecoderWorkspace`] lends a decoder (the no-heap
//! `inflate::Inflate` with feature `zlib`, `zstd::Zstd` with `zstd`, or
//! `BothDecoder` for images of either format with both) with borrowed
//! buffers.
//!
//! QEMU's rules for a compressed cluster (qcow2 spec, "Compressed
//! Clusters Descriptor"), which the core applies: the stream must produce at
//! least a whole cluster; zlib output past the cluster is ignored (so is
//! input after it); decoders enforce their own format's further rules.

#[cfg(all(feature = "zlib", feature = "zstd"))]
mod both;
#[cfg(feature = "zlib")]
pub mod inflate;
#[cfg(any(feature = "zlib", feature = "zstd"))]
mod phase;
#[cfg(test)]
#[cfg(any(feature = "zlib", feature = "zstd"))]
mod test_harness;
#[cfg(feature = "zstd")]
pub mod zstd;

#[cfg(all(feature = "zlib", feature = "zstd"))]
pub use both::BothDecoder;
#[cfg(any(feature = "zlib", feature = "zstd"))]
use phase::Phase;

use crate::Sector;

/// A compression format of qcow2 (the header's `compression_type`).
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (RFC 1951); QEMU writes it with a 4 KiB window.
    Zlib,
    /// Zstandard frames (RFC 8878).
    Zstd,
}

impl Compression {
    /// The format for header field `compression_type`, if known.
    pub const fn from_type(t: u8) -> Option<Self> {
        match t {
            0 => Some(Compression::Zlib),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// The header field value.
    pub const fn type_byte(self) -> u8 {
        match self {
            Compression::Zlib => 0,
            Compression::Zstd => 1,
        }
    }

    /// The name QEMU uses (`compression_type=` option, `qemu-img info`).
    pub const fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// Why a decoder stopped.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The stream is not valid (becomes [`crate::Error::Corrupt`] at the
    /// compressed cluster's offset).
    Corrupt(&'static str),
    /// The decoder cannot handle this stream or format, which may be valid
    /// (becomes [`crate::Error::Unsupported`]).
    Unsupported(&'static str),
}

/// One step of a [`Decoder`].
#[derive(Debug)]
pub struct Step<'a> {
    /// Input bytes consumed.
    pub consumed: usize,
    /// Output produced by this step (valid until the next call).
    pub output: &'a [u8],
}

/// A streaming decoder for compressed clusters.
///
/// The core calls [`Decoder::start`] for each cluster, then [`Decoder::step`]
/// with the compressed bytes in order until a whole cluster has come out.
pub trait Decoder {
    /// Prepares to decode one cluster of `cluster_size` bytes (512 B to
    /// 2 MiB) compressed in `format`.
    fn start(&mut self, format: Compression, cluster_size: usize) -> Result<(), DecodeError>;

    /// Consumes a prefix of `input` and returns the output it produced.
    /// `last` says that no input follows `input`. Over one cluster the
    /// output never exceeds `cluster_size` bytes in total. A decoder keeps
    /// any partial input it needs itself: a step that neither consumes nor
    /// produces anything means it needs more input (with `last`: the stream
    /// is too short), and is only allowed once `input` is used up (or with
    /// `last`).
    fn step(&mut self, input: &[u8], last: bool) -> Result<Step<'_>, DecodeError>;
}

/// A [`Workspace`] split into its parts, borrowed together.
pub struct Parts<'a, Z> {
    /// Bounce buffer for copy-on-write and compressed writes (may be empty).
    pub bounce: &'a mut [Sector],
    /// Buffer for compressed input (may be empty).
    pub input: &'a mut [Sector],
    /// The decoder.
    pub decoder: &'a mut Z,
}

/// Working memory lent to an image; see the module documentation.
pub trait Workspace {
    /// The decoder of compressed clusters.
    type Decoder: Decoder;

    /// The buffers and decoder, borrowed at once.
    fn parts(&mut self) -> Parts<'_, Self::Decoder>;
}

/// A decoder for no format at all.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoDecoder;

impl Decoder for NoDecoder {
    fn start(&mut self, _format: Compression, _cluster_size: usize) -> Result<(), DecodeError> {
        Err(DecodeError::Unsupported(
            "reading compressed clusters (no decoder in the image's workspace)",
        ))
    }

    fn step(&mut self, _input: &[u8], _last: bool) -> Result<Step<'_>, DecodeError> {
        Err(DecodeError::Unsupported(
            "reading compressed clusters (no decoder in the image's workspace)",
        ))
    }
}

/// No working memory and no decoder: zero-sized, the default.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoWorkspace {
    decoder: NoDecoder,
}

impl Workspace for NoWorkspace {
    type Decoder = NoDecoder;

    fn parts(&mut self) -> Parts<'_, NoDecoder> {
        Parts {
            bounce: &mut [],
            input: &mut [],
            decoder: &mut self.decoder,
        }
    }
}

/// Working memory with buffers but no decoder: copy-on-write in one device
/// write per cluster (given `bounce` of a cluster or more), compressed
/// clusters unsupported.
pub struct Buffers<T>(pub T, NoDecoder);

impl<T: AsMut<[Sector]>> Buffers<T> {
    /// Lends `bounce` as the bounce buffer.
    pub fn new(bounce: T) -> Self {
        Buffers(bounce, NoDecoder)
    }
}

impl<T: AsMut<[Sector]>> Workspace for Buffers<T> {
    type Decoder = NoDecoder;

    fn parts(&mut self) -> Parts<'_, NoDecoder> {
        Parts {
            bounce: self.0.as_mut(),
            input: &mut [],
            decoder: &mut self.1,
        }
    }
}

/// A [`Workspace`] lending `decoder` with borrowed bounce and input buffers
/// (either may be empty: see the module documentation).
pub struct DecoderWorkspace<'a, Z> {
    bounce: &'a mut [Sector],
    input: &'a mut [Sector],
    decoder: Z,
}

impl<'a, Z: Decoder> DecoderWorkspace<'a, Z> {
    /// Lends `decoder` with `bounce` (a cluster or more lets partial writes
    /// into compressed clusters go out in one device write) and `input`
    /// (compressed bytes are read that many sectors at a time).
    pub fn new(decoder: Z, bounce: &'a mut [Sector], input: &'a mut [Sector]) -> Self {
        DecoderWorkspace {
            bounce,
            input,
            decoder,
        }
    }
}

impl<Z: Decoder> Workspace for DecoderWorkspace<'_, Z> {
    type Decoder = Z;

    fn parts(&mut self) -> Parts<'_, Z> {
        Parts {
            bounce: self.bounce,
            input: self.input,
            decoder: &mut self.decoder,
        }
    }
}
