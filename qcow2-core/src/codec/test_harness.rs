//! What the decoders' tests share: a [`Decoder`] driven as the image layer
//! drives it (any input chunking, the decoder's contract checked at each
//! step), data to compress, damage to streams, and the host's encoders and
//! reference decoders for each format ([`zlib`], [`zstd`]).

extern crate std;

use std::vec::Vec;

use crate::codec::{Compression, DecodeError, Decoder};
use crate::format::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS};

#[cfg(feature = "zlib")]
pub mod zlib;
#[cfg(feature = "zstd")]
pub mod zstd;

/// Every cluster size, smallest first, with its index.
pub fn clusters() -> impl Iterator<Item = (usize, usize)> {
    (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS)
        .map(|bits| 1usize << bits)
        .enumerate()
}

/// Decodes one cluster of `format` from `stream` fed `chunk` bytes at a
/// time (the last piece with `last`): the cluster, or the decoder's error
/// (a stream that ends first is `Corrupt("short")`).
pub fn run<D: Decoder>(
    dec: &mut D,
    format: Compression,
    stream: &[u8],
    cluster: usize,
    chunk: usize,
) -> Result<Vec<u8>, DecodeError> {
    dec.start(format, cluster)?;
    if stream.is_empty() {
        let step = dec.step(&[], true)?;
        assert_eq!(
            (step.consumed, step.output.len()),
            (0, 0),
            "output from nothing"
        );
        return Err(DecodeError::Corrupt("short"));
    }
    let mut out = Vec::new();
    let mut pieces = stream.chunks(chunk.max(1)).peekable();
    while let Some(bytes) = pieces.next() {
        feed(dec, bytes, pieces.peek().is_none(), cluster, &mut out)?;
        if out.len() == cluster {
            return Ok(out);
        }
    }
    Err(DecodeError::Corrupt("short"))
}

/// Steps `dec` over `bytes` until they are used up, the cluster is full,
/// or it wants more input, checking the [`Decoder`] contract: no more
/// consumed than given, never more than a cluster out, no stall with input
/// left unless it is the last.
fn feed<D: Decoder>(
    dec: &mut D,
    mut bytes: &[u8],
    last: bool,
    cluster: usize,
    out: &mut Vec<u8>,
) -> Result<(), DecodeError> {
    while out.len() < cluster {
        let step = dec.step(bytes, last)?;
        assert!(step.consumed <= bytes.len());
        out.extend_from_slice(step.output);
        assert!(out.len() <= cluster, "more than a cluster");
        if step.consumed == 0 && step.output.is_empty() {
            assert!(bytes.is_empty() || last, "stalled with input left");
            break;
        }
        bytes = &bytes[step.consumed..];
    }
    Ok(())
}

/// xorshift64
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Compressible data with back-references of every reach: runs, text-like
/// bytes from a small alphabet and copies from up to `reach` bytes back.
pub fn sample(len: usize, reach: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        match rng.below(4) {
            0 => {
                let b = rng.next() as u8;
                let n = 1 + rng.below(40);
                v.extend(core::iter::repeat_n(b, n));
            }
            1 => {
                for _ in 0..1 + rng.below(30) {
                    v.push(b"etaoin shrdlu"[rng.below(13)]);
                }
            }
            2 if v.len() > 8 => {
                let back = 1 + rng.below(reach.min(v.len()));
                let n = 3 + rng.below(60);
                let from = v.len() - back;
                for i in 0..n {
                    v.push(v[from + i]);
                }
            }
            _ => {
                for _ in 0..1 + rng.below(8) {
                    v.push(rng.next() as u8);
                }
            }
        }
    }
    v.truncate(len);
    v
}

/// Flips `flips` random bits of `stream`, then one time in four cuts it
/// to a random length.
pub fn damage(rng: &mut Rng, stream: &mut Vec<u8>, flips: usize) {
    for _ in 0..flips {
        let i = rng.below(stream.len());
        stream[i] ^= 1 << rng.below(8);
    }
    if rng.below(4) == 0 {
        stream.truncate(rng.below(stream.len() + 1));
    }
}
