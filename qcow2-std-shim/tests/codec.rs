//! The codecs: the host's (`qcow2_std_shim::codec`, zlib-rs and libzstd by
//! QEMU's rules) and the core's no-heap inflate (`qcow2_core::codec::inflate`),
//! on streams from the host compressors, on damaged streams, on random
//! bytes, and on compressed clusters `qemu-img convert -c` wrote.

use std::path::Path;

use qcow2_core::codec::inflate::{Inflate, InflateState};
use qcow2_core::codec::{Compression, DecodeError};
use qcow2_std_shim::codec::{
    compress_cluster, decode_in_chunks, decompress_cluster, HostCompressor, HostDecoder,
    CLUSTER_SIZES,
};
use test_support::raw::{header, peek32, peek64};
use test_support::{noise, Rng, Scratch};

/// Compressible bytes: runs, words and copies from up to 3 KiB back, with
/// some noise.
fn sample(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        match rng.below(4) {
            0 => {
                let b = rng.next_u64() as u8;
                let n = 1 + rng.below(40) as usize;
                v.extend(std::iter::repeat_n(b, n));
            }
            1 => {
                let words: [&[u8]; 6] = [b"qcow2 ", b"cluster ", b"zlib ", b"zstd ", b"L2 ", b"\n"];
                v.extend_from_slice(words[rng.below(6) as usize]);
            }
            2 if v.len() > 8 => {
                let back = 1 + rng.below(v.len().min(3000) as u64) as usize;
                let from = v.len() - back;
                for i in 0..3 + rng.below(50) as usize {
                    v.push(v[from + i]);
                }
            }
            _ => v.extend_from_slice(&rng.next_u64().to_le_bytes()),
        }
    }
    v.truncate(len);
    v
}

/// The core's inflate on `window` bytes, fed `chunk` bytes at a time as
/// the core's read path does.
fn core_inflate(
    window: usize,
    stream: &[u8],
    cluster: usize,
    chunk: usize,
) -> Result<Vec<u8>, DecodeError> {
    let mut state = Box::new(InflateState::new());
    let mut buf = vec![0u8; window];
    let mut dec = Inflate::new(&mut state, &mut buf);
    decode_in_chunks(&mut dec, Compression::Zlib, stream, cluster, chunk)
}

fn host(format: Compression, stream: &[u8], cluster: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = vec![0u8; cluster];
    decompress_cluster(format, stream, &mut out).map(|()| out)
}

/// One zstd frame of `data` (content size in its header, as QEMU's).
fn zstd_frame(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).expect("zstd")
}

#[test]
fn compress_and_decode_every_cluster_size() {
    let mut compressor = HostCompressor::new();
    let mut decoder = HostDecoder::new();
    for (i, &cluster) in CLUSTER_SIZES.iter().enumerate() {
        let data = sample(cluster, i as u64 + 1);
        for format in [Compression::Zlib, Compression::Zstd] {
            let mut stream = Vec::new();
            assert!(compressor.compress(format, &data, &mut stream), "{cluster}");
            assert!(stream.len() < cluster);
            assert!(compress_cluster(format, &data, &mut Vec::new()));
            // Sector padding after the stream, as in an image.
            stream.resize(stream.len().div_ceil(512) * 512 + 100, 0);
            let mut out = vec![0u8; cluster];
            decoder.decompress(format, &stream, &mut out).expect("host");
            assert!(out == data, "{format:?} {cluster}");
            assert_eq!(
                decode_in_chunks(&mut decoder, format, &stream, cluster, 512).as_deref(),
                Ok(&data[..])
            );
            if format == Compression::Zlib {
                // QEMU's 4 KiB window: the core reads it in a 4 KiB ring.
                for window in [cluster, 4096] {
                    assert_eq!(
                        core_inflate(window, &stream, cluster, 512).as_deref(),
                        Ok(&data[..]),
                        "{cluster} {window}"
                    );
                }
            }
        }
    }
}

#[test]
fn incompressible_clusters_are_stored() {
    for cluster in [512, 4096, 65536] {
        let data = noise(cluster, 3);
        for format in [Compression::Zlib, Compression::Zstd] {
            let mut out = vec![1, 2, 3];
            assert!(
                !compress_cluster(format, &data, &mut out),
                "{format:?} {cluster}"
            );
        }
        // Zeros always shrink.
        let mut out = Vec::new();
        assert!(compress_cluster(
            Compression::Zstd,
            &vec![0; cluster],
            &mut out
        ));
        assert!(compress_cluster(
            Compression::Zlib,
            &vec![0; cluster],
            &mut out
        ));
    }
}

#[test]
fn zstd_frames_as_qemu_reads_them() {
    let cluster = 65536;
    let data = sample(cluster, 9);
    let whole = zstd_frame(&data);
    // Several frames.
    let mut two = zstd_frame(&data[..10000]);
    two.extend(zstd_frame(&data[10000..]));
    assert_eq!(
        host(Compression::Zstd, &two, cluster).as_deref(),
        Ok(&data[..])
    );
    // A skippable frame first, an empty frame between.
    let mut skip = vec![0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
    skip.extend(zstd_frame(&data[..100]));
    skip.extend(zstd_frame(&[]));
    skip.extend(zstd_frame(&data[100..]));
    assert_eq!(
        host(Compression::Zstd, &skip, cluster).as_deref(),
        Ok(&data[..])
    );
    // Trailing garbage after a whole cluster is ignored.
    let mut padded = whole.clone();
    padded.extend_from_slice(&[0xee; 1000]);
    assert_eq!(
        host(Compression::Zstd, &padded, cluster).as_deref(),
        Ok(&data[..])
    );
    // Output longer than the cluster is an error (unlike zlib).
    let long = zstd_frame(&sample(cluster * 2, 9));
    assert!(host(Compression::Zstd, &long, cluster).is_err());
    // Truncated, short, empty, corrupt.
    assert!(host(Compression::Zstd, &whole[..whole.len() - 3], cluster).is_err());
    assert!(host(
        Compression::Zstd,
        &zstd_frame(&data[..cluster - 1]),
        cluster
    )
    .is_err());
    assert!(host(Compression::Zstd, &[], cluster).is_err());
    let mut bad = whole.clone();
    bad[0] ^= 0xff;
    assert!(host(Compression::Zstd, &bad, cluster).is_err());
    // Chunked through the trait: the same.
    let mut dec = HostDecoder::new();
    for chunk in [1, 100, 512, two.len()] {
        assert_eq!(
            decode_in_chunks(&mut dec, Compression::Zstd, &two, cluster, chunk).as_deref(),
            Ok(&data[..])
        );
        assert!(decode_in_chunks(&mut dec, Compression::Zstd, &long, cluster, chunk).is_err());
    }
}

#[test]
fn zlib_as_qemu_reads_it() {
    let cluster = 65536;
    let data = sample(cluster * 2, 4);
    let mut long = Vec::new();
    // Longer than the cluster: cut (compressed as 2 clusters' worth).
    assert!(compress_cluster(Compression::Zlib, &data, &mut long));
    assert_eq!(
        host(Compression::Zlib, &long, cluster).as_deref(),
        Ok(&data[..cluster])
    );
    assert_eq!(
        core_inflate(4096, &long, cluster, 512).as_deref(),
        Ok(&data[..cluster])
    );
    let mut exact = Vec::new();
    assert!(compress_cluster(
        Compression::Zlib,
        &data[..cluster],
        &mut exact
    ));
    assert!(host(Compression::Zlib, &exact[..exact.len() - 5], cluster).is_err());
    assert!(host(Compression::Zlib, &[], cluster).is_err());
    let mut short = Vec::new();
    assert!(compress_cluster(
        Compression::Zlib,
        &data[..cluster / 2],
        &mut short
    ));
    assert!(host(Compression::Zlib, &short, cluster).is_err());
    assert!(core_inflate(cluster, &short, cluster, 512).is_err());
}

#[test]
fn core_inflate_equals_host_on_random_input() {
    let mut rng = Rng::new(77);
    let mut decoded = 0;
    for round in 0..4000u64 {
        let cluster = [512usize, 1024, 4096, 32768][round as usize % 4];
        // Random bytes (mostly invalid), or a valid stream of random
        // length with random flips.
        let stream = if round % 2 == 0 {
            noise(1 + rng.below(2 * cluster as u64) as usize, round)
        } else {
            let data = sample(cluster + rng.below(500) as usize, round);
            let mut s = Vec::new();
            if !compress_cluster(Compression::Zlib, &data, &mut s) {
                continue;
            }
            for _ in 0..rng.below(3) {
                let i = rng.below(s.len() as u64) as usize;
                s[i] ^= 1 << rng.below(8);
            }
            s
        };
        let want = host(Compression::Zlib, &stream, cluster).ok();
        decoded += want.is_some() as usize;
        let chunk = 1 + rng.below(700) as usize;
        let got = core_inflate(cluster, &stream, cluster, chunk).ok();
        assert!(
            got == want,
            "round {round}: core {} host {}",
            got.is_some(),
            want.is_some()
        );
    }
    assert!(decoded > 1000, "{decoded}");
}

/// The compressed clusters of a qcow2 image file: (guest offset, host
/// offset, compressed bytes as QEMU reads them, sector-rounded).
fn compressed_clusters(path: &Path) -> Vec<(u64, u64, Vec<u8>)> {
    let bytes = std::fs::read(path).expect("read image");
    let bits = peek32(path, header::CLUSTER_BITS);
    let cluster = 1u64 << bits;
    let l1_size = peek32(path, header::L1_SIZE) as u64;
    let l1 = peek64(path, header::L1_TABLE_OFFSET);
    let entries = cluster / 8;
    let x = 62 - (bits - 8);
    let mut out = Vec::new();
    for i in 0..l1_size {
        let l2 = peek64(path, l1 + 8 * i) & test_support::raw::OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        for j in 0..entries {
            let e = peek64(path, l2 + 8 * j);
            if e & (1 << 62) == 0 {
                continue;
            }
            let host = e & ((1 << x) - 1);
            let sectors = (e >> x) & ((1 << (bits - 8)) - 1);
            let len = (sectors + 1) * 512 - (host & 511);
            let mut extent = vec![0u8; len as usize];
            let end = ((host + len) as usize).min(bytes.len());
            extent[..end - host as usize].copy_from_slice(&bytes[host as usize..end]);
            out.push(((i * entries + j) * cluster, host, extent));
        }
    }
    out
}

#[test]
fn clusters_qemu_img_compressed() {
    let dir = Scratch::new("codec-qemu");
    for (i, cluster) in [512usize, 4096, 65536, 2 << 20].into_iter().enumerate() {
        let size = (cluster * 6).max(1 << 20);
        let mut raw = sample(size, 50 + i as u64);
        // One cluster of noise: QEMU stores it plainly.
        raw[cluster..2 * cluster].copy_from_slice(&noise(cluster, 5));
        let src = dir.join("src.raw");
        std::fs::write(&src, &raw).expect("write source");
        for format in [Compression::Zlib, Compression::Zstd] {
            let img = dir.join(format!("c-{cluster}-{}.qcow2", format.name()));
            let options = format!("cluster_size={cluster},compression_type={}", format.name());
            test_support::qemu::img(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &options,
                src.to_str().expect("path"),
                img.to_str().expect("path"),
            ]);
            let found = compressed_clusters(&img);
            assert!(
                found.len() >= size / cluster - 1,
                "{cluster} {format:?}: {}",
                found.len()
            );
            assert!(
                found.iter().all(|&(g, _, _)| g != cluster as u64),
                "noise stored plainly"
            );
            for (guest, _host, extent) in &found {
                let want = &raw[*guest as usize..*guest as usize + cluster];
                assert_eq!(host(format, extent, cluster).as_deref(), Ok(want));
                if format == Compression::Zlib {
                    assert_eq!(
                        core_inflate(4096, extent, cluster, 512).as_deref(),
                        Ok(want)
                    );
                    assert_eq!(
                        core_inflate(cluster, extent, cluster, 4096).as_deref(),
                        Ok(want)
                    );
                }
            }
        }
    }
}

/// What a cluster of [`one_compressor_for_many_clusters`] holds.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Random bytes: never compress.
    Noise,
    /// Compressible bytes.
    Sample,
    /// All zeros.
    Zero,
    /// Noise for the first `n`/8 of the cluster, compressible after.
    Mixed(usize),
}

#[test]
fn one_compressor_for_many_clusters() {
    // convert -c keeps one compressor per thread for the whole image. A
    // zlib stream that does not fit (the cluster is stored plainly) used
    // to leave zlib-rs state behind that each next one added to, until
    // zlib-rs panicked after 128 KiB of such clusters. Runs of noise twice
    // that long, at every cluster size, both formats, with compressible,
    // zero and half-and-half clusters after and between: every cluster
    // must come out as from a fresh compressor, decode back, and noise
    // must fall back to being stored.
    let mut decoder = HostDecoder::new();
    for (i, &cluster) in CLUSTER_SIZES.iter().enumerate() {
        let run = ((256 << 10) / cluster).max(3);
        let mut kinds = vec![Kind::Noise; run];
        kinds.extend([
            Kind::Sample,
            Kind::Zero,
            Kind::Mixed(4),
            Kind::Noise,
            Kind::Mixed(7),
            Kind::Mixed(1),
        ]);
        kinds.extend(vec![Kind::Noise; run]);
        kinds.push(Kind::Sample);
        for format in [Compression::Zlib, Compression::Zstd] {
            let mut compressor = HostCompressor::new();
            let (mut stream, mut fresh) = (Vec::new(), Vec::new());
            for (j, kind) in kinds.iter().enumerate() {
                let seed = (i * 100_000 + j) as u64;
                let data = match *kind {
                    Kind::Noise => noise(cluster, seed),
                    Kind::Sample => sample(cluster, seed),
                    Kind::Zero => vec![0; cluster],
                    Kind::Mixed(n) => {
                        let mut d = sample(cluster, seed);
                        let split = cluster * n / 8;
                        d[..split].copy_from_slice(&noise(split, seed));
                        d
                    }
                };
                let what = format!("{format:?}, {cluster} B, cluster {j} ({kind:?})");
                let compressed = compressor.compress(format, &data, &mut stream);
                let alone = compress_cluster(format, &data, &mut fresh);
                assert_eq!((compressed, &stream), (alone, &fresh), "{what}");
                match kind {
                    Kind::Noise => assert!(!compressed && stream.is_empty(), "{what}"),
                    Kind::Sample | Kind::Zero => assert!(compressed, "{what}"),
                    Kind::Mixed(_) => {}
                }
                if compressed {
                    assert!(stream.len() < cluster, "{what}");
                    let mut out = vec![0u8; cluster];
                    decoder
                        .decompress(format, &stream, &mut out)
                        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
                    assert!(out == data, "{what}");
                }
            }
        }
    }
}

#[test]
fn codec_fuzz_corpus() {
    // The codec fuzz target's saved inputs, and a few written here: 300
    // clusters of noise in a row at 512 B (one more than zlib-rs took to
    // panic), at 4 KiB in both formats, and mixed scripts.
    let mut inputs: Vec<Vec<u8>> = vec![
        vec![0, 1, 255, 1, 43, 2, 0, 3, 5, b'a', b'b', b'c', b'd', b'e'],
        vec![3, 1, 40, 0x81, 40, 4, 128, 2, 0],
        vec![16 | 6, 1, 9, 4, 200, 0, 0, 5, 0, 1, 2, 3, 4, 5],
        vec![12, 1, 3, 3, 10, 9, 9, 9, 9, 9, 1, 2, 3, 4, 5],
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/codec");
    let mut files: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    assert!(!files.is_empty(), "no saved inputs in {}", root.display());
    for path in &files {
        inputs.push(std::fs::read(path).expect("corpus file"));
    }
    for (i, input) in inputs.iter().enumerate() {
        let result = std::panic::catch_unwind(|| qcow2_std_shim::codec::fuzz_compressors(input));
        assert!(result.is_ok(), "input {i} ({} bytes) fails", input.len());
    }
}
