//! The two-format decoder against zlib and libzstd: clusters of both
//! formats in turn through one decoder, each decoded as its own decoder
//! and the host's reference decode it, whatever the order, the chunking or
//! the failures before.

extern crate std;

use std::vec::Vec;

use super::*;
use crate::codec::test_harness::{clusters, run, sample, zlib, zstd};
use crate::codec::zstd::scratch_bytes;
use crate::codec::{DecoderWorkspace, Workspace};

/// A stream of `data` in `format` as QEMU writes it, checked against the
/// host's reference read.
fn stream(format: Compression, data: &[u8]) -> Vec<u8> {
    let (stream, back) = match format {
        Compression::Zlib => {
            let s = zlib::deflate(data, 12, 6);
            let back = zlib::reference(&s, data.len());
            (s, back)
        }
        Compression::Zstd => {
            let s = zstd::frame(data, 3, false);
            let back = zstd::reference(&s, data.len());
            (s, back)
        }
    };
    assert_eq!(back.as_deref(), Some(data), "the host reads its stream");
    stream
}

#[test]
fn both_formats_in_turn_every_cluster_size() {
    for (i, cluster) in clusters() {
        let mut zlib_mem = zlib::Mem::new(4096);
        let mut zstd_mem = zstd::Mem::new(cluster, scratch_bytes(cluster));
        let mut dec = BothDecoder::new(zlib_mem.decoder(), zstd_mem.decoder());
        for (round, format) in [Compression::Zlib, Compression::Zstd]
            .into_iter()
            .cycle()
            .take(5)
            .enumerate()
        {
            let data = sample(cluster, 30_000, (i * 10 + round) as u64);
            let s = stream(format, &data);
            for chunk in [1 + round * 97, 512, s.len()] {
                assert_eq!(
                    run(&mut dec, format, &s, cluster, chunk).as_deref(),
                    Ok(&data[..]),
                    "{cluster} {round} {format:?} {chunk}"
                );
            }
        }
    }
}

#[test]
fn a_stream_of_the_other_format_is_an_error() {
    let cluster = 4096;
    let mut zlib_mem = zlib::Mem::new(cluster);
    let mut zstd_mem = zstd::Mem::new(cluster, cluster);
    let mut dec = BothDecoder::new(zlib_mem.decoder(), zstd_mem.decoder());
    let data = sample(cluster, 3000, 1);
    let deflated = stream(Compression::Zlib, &data);
    let framed = stream(Compression::Zstd, &data);
    assert_eq!(zstd::reference(&deflated, cluster), None);
    assert_eq!(zlib::reference(&framed, cluster), None);
    assert!(run(&mut dec, Compression::Zstd, &deflated, cluster, 512).is_err());
    assert!(run(&mut dec, Compression::Zlib, &framed, cluster, 512).is_err());
    // Failures in either leave the other, and the next cluster, unharmed.
    assert_eq!(
        run(&mut dec, Compression::Zstd, &framed, cluster, 100).as_deref(),
        Ok(&data[..])
    );
    assert_eq!(
        run(&mut dec, Compression::Zlib, &deflated, cluster, 100).as_deref(),
        Ok(&data[..])
    );
}

#[test]
fn each_decoder_keeps_its_own_limits() {
    // A 2 KiB inflate window reads no 4 KiB cluster; zstd still does.
    let cluster = 4096;
    let mut zlib_mem = zlib::Mem::new(2048);
    let mut zstd_mem = zstd::Mem::new(cluster, cluster);
    let mut dec = BothDecoder::new(zlib_mem.decoder(), zstd_mem.decoder());
    assert!(!dec.zlib().is_exact_for(cluster));
    let data = sample(cluster, 3000, 2);
    assert!(matches!(
        run(
            &mut dec,
            Compression::Zlib,
            &stream(Compression::Zlib, &data),
            cluster,
            512
        ),
        Err(DecodeError::Unsupported(_))
    ));
    // Steps after a failed start repeat its error.
    assert!(matches!(
        dec.step(&[0; 16], true),
        Err(DecodeError::Unsupported(_))
    ));
    assert_eq!(
        run(
            &mut dec,
            Compression::Zstd,
            &stream(Compression::Zstd, &data),
            cluster,
            512
        )
        .as_deref(),
        Ok(&data[..])
    );
}

#[test]
fn step_before_start_is_an_error() {
    let mut zlib_mem = zlib::Mem::new(4096);
    let mut zstd_mem = zstd::Mem::new(4096, 4096);
    let mut dec = BothDecoder::new(zlib_mem.decoder(), zstd_mem.decoder());
    assert!(matches!(
        dec.step(&[1, 2, 3], false),
        Err(DecodeError::Unsupported(_))
    ));
}

#[test]
fn lent_in_a_workspace() {
    let cluster = 8192;
    let mut zlib_mem = zlib::Mem::new(4096);
    let mut zstd_mem = zstd::Mem::new(cluster, cluster);
    let dec = BothDecoder::new(zlib_mem.decoder(), zstd_mem.decoder());
    let (mut bounce, mut input) = ([[0u8; 512]; 16], [[0u8; 512]; 2]);
    let mut ws = DecoderWorkspace::new(dec, &mut bounce, &mut input);
    let data = sample(cluster, 3000, 3);
    for format in [Compression::Zstd, Compression::Zlib] {
        let parts = ws.parts();
        assert_eq!((parts.bounce.len(), parts.input.len()), (16, 2));
        let s = stream(format, &data);
        assert_eq!(
            run(parts.decoder, format, &s, cluster, 1024).as_deref(),
            Ok(&data[..])
        );
    }
}
