//! The inflate decoder against zlib (zlib-rs through flate2): streams
//! written with 4 KiB and 32 KiB windows, every cluster size, flat and ring
//! windows, input in any chunking, and QEMU's rules for what is too short,
//! too long or invalid.

extern crate std;

use std::vec;
use std::vec::Vec;

use flate2::{Decompress, FlushDecompress};

use super::*;
use crate::codec::test_harness::zlib::{deflate, reference, reference_why, Mem};
use crate::codec::test_harness::{clusters, damage, sample, Rng};

/// zlib refuses a dynamic block whose code has no end-of-block symbol
/// before decoding it; miniz_oxide decodes it (the block can never end,
/// but the cluster may fill first).
const MISSING_EOB: &str = "invalid code -- missing end-of-block";

/// Whether zlib, given room past the cluster, fails right after the
/// cluster's last byte where QEMU's read (without room) succeeds: a
/// back-reference before the start of the stream, which zlib checks only
/// when it has room to copy and miniz_oxide checks before it needs room.
/// (zlib-rs reports it as "invalid distance too far back" or, in its fast
/// path, "repeated call with bad state".)
fn too_far_right_after(stream: &[u8], cluster: usize) -> bool {
    let mut d = Decompress::new_with_window_bits(false, 15);
    let mut out = vec![0u8; cluster + 258];
    d.decompress(stream, &mut out, FlushDecompress::Finish)
        .is_err()
        && d.total_out() as usize == cluster
}

/// The cluster from `stream` with a `window`-byte window, fed `chunk`
/// bytes at a time (see [`crate::codec::test_harness::run`]).
fn decode(
    window: usize,
    stream: &[u8],
    cluster: usize,
    chunk: usize,
) -> Result<Vec<u8>, DecodeError> {
    let mut mem = Mem::new(window);
    let mut dec = mem.decoder();
    crate::codec::test_harness::run(&mut dec, Compression::Zlib, stream, cluster, chunk)
}

#[test]
fn every_cluster_size_flat_and_ring() {
    for (i, cluster) in clusters() {
        let data = sample(cluster, 30_000, i as u64 + 7);
        for bits in [12u8, 15] {
            let stream = deflate(&data, bits, 6);
            assert_eq!(reference(&stream, cluster).as_deref(), Some(&data[..]));
            // The whole cluster as the window: any deflate window.
            assert_eq!(
                decode(cluster, &stream, cluster, 512).as_deref(),
                Ok(&data[..])
            );
            // A 32 KiB ring reads any stream.
            assert_eq!(
                decode(FULL_WINDOW, &stream, cluster, 4096).as_deref(),
                Ok(&data[..])
            );
            // A 4 KiB ring reads QEMU's 4 KiB-window streams (and a window
            // of 6 KiB uses its 4 KiB power of two).
            if bits == 12 {
                assert_eq!(
                    decode(4096, &stream, cluster, 512).as_deref(),
                    Ok(&data[..])
                );
                assert_eq!(
                    decode(6144, &stream, cluster, 1000).as_deref(),
                    Ok(&data[..])
                );
            } else if cluster > 8192 {
                // Far references exist: an error, never wrong data.
                let got = decode(4096, &stream, cluster, 512);
                assert!(
                    matches!(got, Err(DecodeError::Corrupt(m)) if m.contains("larger window")),
                    "{cluster}: {got:?}"
                );
            }
        }
    }
}

#[test]
fn any_chunking() {
    let cluster = 16 << 10;
    let data = sample(cluster, 3000, 99);
    let stream = deflate(&data, 12, 9);
    for chunk in [1, 2, 3, 7, 64, 511, 512, 513, stream.len()] {
        for window in [cluster, 4096, 8192] {
            assert_eq!(
                decode(window, &stream, cluster, chunk).as_deref(),
                Ok(&data[..]),
                "{chunk}"
            );
        }
    }
}

#[test]
fn longer_stream_is_cut_and_padding_ignored() {
    for cluster in [512, 4096, 65536] {
        let data = sample(cluster * 3, 2000, 5);
        let mut stream = deflate(&data, 12, 6);
        stream.extend_from_slice(&[0xff; 700]);
        for window in [cluster, 4096] {
            assert_eq!(
                decode(window, &stream, cluster, 512).as_deref(),
                Ok(&data[..cluster])
            );
        }
        let exact = deflate(&data[..cluster], 12, 6);
        let mut padded = exact.clone();
        padded.extend_from_slice(&[0xa5; 511]);
        assert_eq!(
            reference(&padded, cluster).as_deref(),
            Some(&data[..cluster])
        );
        assert_eq!(
            decode(cluster, &padded, cluster, 512).as_deref(),
            Ok(&data[..cluster])
        );
    }
}

#[test]
fn short_truncated_empty_are_errors() {
    let cluster = 65536;
    let data = sample(cluster, 2000, 11);
    let stream = deflate(&data, 12, 6);
    // Truncated.
    let cut = &stream[..stream.len() - 10];
    assert_eq!(reference(cut, cluster), None);
    assert!(decode(cluster, cut, cluster, 512).is_err());
    assert!(decode(4096, cut, cluster, 512).is_err());
    // A complete stream of less than a cluster.
    let small = deflate(&data[..cluster - 1], 12, 6);
    assert_eq!(reference(&small, cluster), None);
    for window in [cluster, 4096] {
        assert_eq!(
            decode(window, &small, cluster, 512),
            Err(DecodeError::Corrupt(
                "deflate stream ends before a whole cluster"
            ))
        );
    }
    // Empty input, and an empty stream.
    assert_eq!(
        decode(cluster, &[], cluster, 512),
        Err(DecodeError::Corrupt("short"))
    );
    let empty = deflate(&[], 12, 6);
    assert!(decode(cluster, &empty, cluster, 512).is_err());
}

/// Writes bits LSB first, Huffman codes MSB first (RFC 1951).
struct Bits {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}
impl Bits {
    fn new() -> Self {
        Bits {
            out: Vec::new(),
            acc: 0,
            n: 0,
        }
    }
    fn put(&mut self, value: u32, n: u32) {
        for i in 0..n {
            self.acc |= ((value >> i) & 1) << self.n;
            self.n += 1;
            if self.n == 8 {
                self.out.push(self.acc as u8);
                self.acc = 0;
                self.n = 0;
            }
        }
    }
    fn code(&mut self, code: u32, n: u32) {
        for i in (0..n).rev() {
            self.put((code >> i) & 1, 1);
        }
    }
    /// A literal or length symbol of the fixed code.
    fn fixed(&mut self, sym: u32) {
        match sym {
            0..=143 => self.code(0x30 + sym, 8),
            144..=255 => self.code(0x190 + sym - 144, 9),
            256..=279 => self.code(sym - 256, 7),
            _ => self.code(0xc0 + sym - 280, 8),
        }
    }
    /// A final fixed-Huffman block, begun with `literals` literals
    /// `0, 1, ..` modulo `modulo`.
    fn fixed_block(literals: usize, modulo: usize) -> Self {
        let mut b = Bits::new();
        b.put(1, 1); // BFINAL
        b.put(1, 2); // fixed Huffman
        for i in 0..literals {
            b.fixed((i % modulo) as u32);
        }
        b
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// A fixed-Huffman stream: `literals` literal bytes, then a match of
/// length 258 at distance `dist` (code and extra bits), repeated `matches`
/// times, then end of block.
fn with_match(literals: usize, dist: u32, matches: usize) -> Vec<u8> {
    let mut b = Bits::fixed_block(literals, 251);
    // Distance code for `dist`.
    let (code, base, extra) = (0u32..30)
        .map(|c| {
            let extra = if c < 4 { 0 } else { c / 2 - 1 };
            let base = if c < 4 {
                c + 1
            } else {
                (1 << (c / 2)) + (c % 2) * (1 << (c / 2 - 1)) + 1
            };
            (c, base, extra)
        })
        .find(|&(_, base, extra)| dist >= base && dist < base + (1 << extra))
        .expect("distance code");
    for _ in 0..matches {
        b.fixed(285); // length 258
        b.code(code, 5);
        b.put(dist - base, extra);
    }
    b.fixed(256);
    b.finish()
}

#[test]
fn reference_before_the_start_is_an_error() {
    for cluster in [4096usize, 65536] {
        // Sanity: a valid match decodes.
        let ok = with_match(100, 100, (cluster - 100).div_ceil(258));
        assert!(reference(&ok, cluster).is_some());
        assert!(decode(cluster, &ok, cluster, 512).is_ok());
        // Distance 1 before any output; distance 200 after 100 bytes.
        for stream in [with_match(0, 1, 20), with_match(100, 200, 300)] {
            assert_eq!(reference(&stream, cluster), None);
            for window in [cluster, 4096, 8192] {
                assert_eq!(
                    decode(window, &stream, cluster, 512),
                    Err(DecodeError::Corrupt("invalid deflate stream")),
                    "{cluster} {window}"
                );
            }
        }
    }
}

#[test]
fn reference_beyond_the_ring_is_an_error() {
    // 10,000 literals, then matches 8,000 back: fine in QEMU's reading,
    // beyond a 4 KiB ring, within an 8 KiB one.
    let cluster: usize = 65536;
    let stream = with_match(10_000, 8_000, (cluster - 10_000).div_ceil(258));
    let want = reference(&stream, cluster).expect("reference");
    assert_eq!(
        decode(cluster, &stream, cluster, 512).as_deref(),
        Ok(&want[..])
    );
    assert_eq!(
        decode(8192, &stream, cluster, 512).as_deref(),
        Ok(&want[..])
    );
    assert_eq!(
        decode(4096, &stream, cluster, 512),
        Err(DecodeError::Corrupt(
            "invalid deflate stream, or one using a larger window than the decoder's buffer"
        ))
    );
}

#[test]
fn invalid_code_right_after_the_cluster() {
    // The cluster ends on a literal; then an invalid distance code (30)
    // follows a length: zlib decodes it and fails, so must we.
    let cluster = 4096;
    let mut b = Bits::fixed_block(cluster, 7);
    b.fixed(257);
    b.code(30, 5);
    b.fixed(256);
    let stream = b.finish();
    assert_eq!(reference(&stream, cluster), None);
    for chunk in [1, 512, stream.len()] {
        for window in [cluster, cluster + 1, 2048 * 4] {
            let got = decode(window, &stream, cluster, chunk);
            assert!(got.is_err(), "{chunk} {window} {:?}", got.map(|v| v.len()));
        }
    }
    // An end of block there instead is fine.
    let mut b = Bits::fixed_block(cluster, 7);
    b.fixed(256);
    let good = b.finish();
    let want = reference(&good, cluster).expect("reference");
    for chunk in [1, 512, good.len()] {
        assert_eq!(
            decode(cluster, &good, cluster, chunk).as_deref(),
            Ok(&want[..])
        );
    }
}

#[test]
fn mutated_streams_match_zlib() {
    let mut rng = Rng(0x5eed);
    let mut differ = Vec::new();
    let rounds = std::env::var("INFLATE_ROUNDS").map_or(3000, |r| r.parse().unwrap_or(3000));
    for round in 0..rounds {
        let cluster = [512usize, 4096, 65536][round % 3];
        let data = sample(cluster + rng.below(2) * 100, 5000, round as u64);
        let mut stream = deflate(&data, if round % 2 == 0 { 12 } else { 15 }, 6);
        let flips = 1 + rng.below(4);
        damage(&mut rng, &mut stream, flips);
        let why = reference_why(&stream, cluster);
        let tolerated = matches!(&why, Err(m) if m.contains(MISSING_EOB))
            || why.is_ok() && too_far_right_after(&stream, cluster);
        let want = why.ok();
        let chunk = 1 + rng.below(600);
        if std::env::var("INFLATE_DUMP").ok() == Some(std::format!("{round}")) {
            std::fs::write("/tmp/inflate-dump.bin", &stream).unwrap();
            std::println!("cluster {cluster} chunk {chunk} want {:?}", want.is_some());
            return;
        }
        // Exact: a window of 32 KiB or more (flat, or a ring).
        for window in [cluster.max(FULL_WINDOW), FULL_WINDOW] {
            let got = decode(window, &stream, cluster, chunk).ok();
            if got != want && !tolerated {
                differ.push((round, window, got.is_some(), want.is_some()));
            }
        }
        // Smaller windows: the same, or an error (a reference farther than
        // the window, maybe past the cluster's end where zlib stops first).
        for window in [cluster, 4096] {
            if let (Ok(got), false) = (decode(window, &stream, cluster, chunk), tolerated) {
                assert_eq!(Some(got), want, "round {round}");
            }
        }
    }
    assert!(differ.is_empty(), "{differ:?}");
}

#[test]
fn wrong_format_and_small_window() {
    let mut state = InflateState::new();
    let mut buf = [0u8; 2048];
    let mut dec = Inflate::new(&mut state, &mut buf);
    assert!(matches!(
        dec.start(Compression::Zstd, 4096),
        Err(DecodeError::Unsupported(_))
    ));
    assert!(matches!(
        dec.start(Compression::Zlib, 4096),
        Err(DecodeError::Unsupported(_))
    ));
    assert!(dec.start(Compression::Zlib, 2048).is_ok());
    assert!(matches!(dec.step(&[], true), Ok(Step { consumed: 0, .. })));
}

#[test]
fn state_size() {
    const { assert!(STATE_BYTES > 10_000 && STATE_BYTES < 11_000) };
}
