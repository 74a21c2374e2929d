//! Compressed clusters against QEMU: `io write -c` and `convert -c` make
//! what qemu-io and qemu-img make, both read each other's images, and
//! partial writes over compressed clusters match qemu-io's.

mod common;

use common::{compare_io, ok, qemu_img, tool, Scratch};
use test_support::qemu::{check_json, json, map};

/// A raw file mixing random, repetitive, all-zero and low-entropy
/// clusters, `clusters` of 64 KiB and a partial tail.
fn mixed_source(path: &str, clusters: usize) {
    let mut data = Vec::new();
    for i in 0..clusters {
        let chunk: Vec<u8> = match i % 4 {
            0 => test_support::noise(65536, i as u64),
            1 => format!("cluster {i} says hello. ")
                .bytes()
                .cycle()
                .take(65536)
                .collect(),
            2 => vec![0; 65536],
            _ => test_support::noise(65536, i as u64)
                .iter()
                .map(|b| b & 7)
                .collect(),
        };
        data.extend(chunk);
    }
    data.extend(b"tail".repeat(300));
    std::fs::write(path, data).unwrap();
}

#[test]
fn io_write_c_matches_qemu_io() {
    let s = Scratch::new("compressed-io");
    let script = [
        "write -c -P 0x11 0 64k",
        "write -c -P 0x12 64k 128k",
        "write -c 0 64k",
        "write -c -P 0x13 1000 64k",
        "write -c -P 0x13 192k 1000",
        "write -c -f 256k 64k",
        "write -c -P 0x14 448k 64k",
        "read -P 0x14 448k 64k",
        "write -P 0x15 66000 3000",
        "read -P 0x12 64k 1000",
        "read -P 0x15 66000 3000",
        "write -z 130k 4k",
        "discard 0 64k",
        "write -c -z 320k 64k",
        "write -c -P 0x16 320k 64k",
        "flush",
    ];
    for (i, opts) in [
        "cluster_size=65536",
        "cluster_size=65536,refcount_bits=1",
        "cluster_size=4096",
        "cluster_size=512",
        "compat=0.10",
        "cluster_size=65536,compression_type=zstd",
        "cluster_size=4096,refcount_bits=1,compression_type=zstd",
    ]
    .iter()
    .enumerate()
    {
        let base = s.path(&format!("base{i}.qcow2"));
        ok(
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &base, "512k"]),
            "qemu-img create",
        );
        let tag = format!("c{i}");
        assert_eq!(compare_io(&s, &base, &[], &script, &tag), 1, "{opts}");
        let ours = s.path(&format!("{tag}-ours.qcow2"));
        let theirs = s.path(&format!("{tag}-qemu.qcow2"));
        let compressed = |p: &str| -> Vec<(u64, u64)> {
            map(p)
                .into_iter()
                .filter(|e| e.compressed)
                .map(|e| (e.start, e.length))
                .collect()
        };
        assert_eq!(compressed(&ours), compressed(&theirs), "{opts}");
        let (ours_check, _) = check_json("qemu-img", &[], &ours);
        let (theirs_check, _) = check_json("qemu-img", &[], &theirs);
        assert_eq!(
            ours_check["allocated-clusters"], theirs_check["allocated-clusters"],
            "{opts}"
        );
        assert_eq!(
            ours_check["compressed-clusters"], theirs_check["compressed-clusters"],
            "{opts}"
        );
    }
}

#[test]
fn convert_c_matches_qemu_img_both_ways() {
    let s = Scratch::new("compressed-convert");
    let src = s.path("src.raw");
    mixed_source(&src, 40);
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=2M",
        "compression_type=zstd",
        "cluster_size=4096,refcount_bits=1,compression_type=zstd",
    ] {
        let (ours, theirs) = (s.path("ours.qcow2"), s.path("theirs.qcow2"));
        let _ = std::fs::remove_file(&ours);
        ok(
            tool(&["convert", "-c", "-O", "qcow2", "-o", opts, &src, &ours]),
            "our convert -c",
        );
        ok(
            qemu_img(&[
                "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, &src, &theirs,
            ]),
            "qemu-img convert -c",
        );
        let cmp = ok(qemu_img(&["compare", "-f", "raw", &src, &ours]), "compare");
        assert!(cmp.contains("Images are identical"), "{opts}: {cmp}");
        let check = |p: &str| json(&ok(qemu_img(&["check", "--output", "json", p]), "check"));
        let (a, b) = (check(&ours), check(&theirs));
        assert!(
            a["corruptions"].is_null() && a["leaks"].is_null(),
            "{opts}: {a}"
        );
        assert_eq!(a["compressed-clusters"], b["compressed-clusters"], "{opts}");
        assert_eq!(a["allocated-clusters"], b["allocated-clusters"], "{opts}");
        // Same packing: the images end at the same cluster (QEMU's file
        // may stop short of it, at the last compressed byte's sector).
        assert_eq!(a["image-end-offset"], b["image-end-offset"], "{opts}");
        // Each reads the other's: decompressing converts.
        for img in [&ours, &theirs] {
            let back = s.path("back.raw");
            ok(tool(&["convert", "-O", "raw", img, &back]), "our convert");
            let (back, src) = (std::fs::read(&back).unwrap(), std::fs::read(&src).unwrap());
            // The image rounds the size up to a sector: zeros after.
            let same = back.len() >= src.len()
                && back[..src.len()] == src[..]
                && back[src.len()..].iter().all(|b| *b == 0);
            assert!(same, "{opts}: {img} reads back differently");
        }
    }
    let out = tool(&["convert", "-c", "-O", "raw", &src, &s.path("x.raw")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        test_support::stderr(&out),
        "qcow2-tool: Compression not supported for this file format\n"
    );
}
