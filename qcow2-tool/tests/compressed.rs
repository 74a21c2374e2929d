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

/// `len` bytes of `kind`: noise (nothing compresses), text (everything
/// compresses), or a mix whose pieces do not line up with clusters: runs
/// of noise longer than 128 KiB, text, zeros and low-entropy bytes.
fn source_of(kind: &str, len: usize, seed: u64) -> Vec<u8> {
    let text = |n: usize, i: u64| -> Vec<u8> {
        format!("piece {i} of a compressible source; ")
            .bytes()
            .cycle()
            .take(n)
            .collect()
    };
    match kind {
        "incompressible" => test_support::noise(len, seed),
        "compressible" => text(len, seed),
        _ => {
            let mut data = Vec::with_capacity(len);
            let mut i = 0u64;
            while data.len() < len {
                let piece = match i % 4 {
                    0 => test_support::noise(160 * 1024 + 700, seed + i),
                    1 => text(40 * 1024 + 300, i),
                    2 => vec![0; 64 * 1024 + 100],
                    _ => test_support::noise(9000, seed + i)
                        .iter()
                        .map(|b| b & 3)
                        .collect(),
                };
                data.extend(piece);
                i += 1;
            }
            data.truncate(len);
            data
        }
    }
}

#[test]
fn convert_c_every_cluster_size_data_and_thread_count() {
    // convert -c used to panic in zlib-rs once a thread had stored 128 KiB
    // of clusters plainly in a row (noise, compressed files), at clusters
    // of 32 KiB or less. Every cluster size, noise, mixed and compressible
    // sources, zlib and zstd, one thread and three: the image holds the
    // source (qemu-img compare), reads back through us, passes qemu-img
    // check, does not depend on the thread count, and compresses the same
    // clusters as qemu-img's.
    let s = Scratch::new("compressed-every-size");
    let src = s.path("src.raw");
    for bits in 9..=21u32 {
        let cluster = 1usize << bits;
        // More than 128 KiB of noise for each of three threads, at least
        // three clusters, and a partial last one.
        let len = (1 << 20).max(3 * cluster) + 1000;
        for kind in ["incompressible", "mixed", "compressible"] {
            let data = source_of(kind, len, u64::from(bits));
            std::fs::write(&src, &data).unwrap();
            for format in ["zlib", "zstd"] {
                let what = format!("{cluster} B, {kind}, {format}");
                let opts = format!("cluster_size={cluster},compression_type={format}");
                let mut images = Vec::new();
                for threads in ["1", "3"] {
                    let img = s.path(&format!("ours-{threads}.qcow2"));
                    let out = tool(&[
                        "convert", "-c", "-m", threads, "-O", "qcow2", "-o", &opts, &src, &img,
                    ]);
                    assert_eq!(
                        out.status.code(),
                        Some(0),
                        "{what}, {threads} threads: {}",
                        test_support::stderr(&out)
                    );
                    let cmp = ok(qemu_img(&["compare", "-f", "raw", &src, &img]), "compare");
                    assert!(cmp.contains("Images are identical"), "{what}: {cmp}");
                    let back = s.path("back.raw");
                    ok(tool(&["convert", "-O", "raw", &img, &back]), "our convert");
                    let back = std::fs::read(&back).unwrap();
                    assert!(
                        back[..len] == data[..] && back[len..].iter().all(|b| *b == 0),
                        "{what}: reads back differently"
                    );
                    images.push(std::fs::read(&img).unwrap());
                }
                assert!(
                    images[0] == images[1],
                    "{what}: depends on the thread count"
                );
                let ours = s.path("ours-1.qcow2");
                let theirs = s.path("theirs.qcow2");
                ok(
                    qemu_img(&[
                        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opts, &src, &theirs,
                    ]),
                    "qemu-img convert -c",
                );
                let check =
                    |p: &str| json(&ok(qemu_img(&["check", "--output", "json", p]), "check"));
                let (a, b) = (check(&ours), check(&theirs));
                assert!(
                    a["corruptions"].is_null() && a["leaks"].is_null(),
                    "{what}: {a}"
                );
                assert_eq!(a["allocated-clusters"], b["allocated-clusters"], "{what}");
                let compressed = |v: &serde_json::Value| v["compressed-clusters"].as_u64();
                let (ours, theirs) = (compressed(&a).unwrap_or(0), compressed(&b).unwrap_or(0));
                if kind == "mixed" {
                    // zlib-rs and C zlib may disagree on a cluster whose
                    // stream ends up near the cluster's size: only where
                    // noise and compressible bytes share a cluster.
                    let boundaries = (len / (64 * 1024)) as u64;
                    assert!(
                        ours.abs_diff(theirs) <= boundaries,
                        "{what}: {ours} {theirs}"
                    );
                } else {
                    assert_eq!(ours, theirs, "{what}");
                }
            }
        }
    }
}

#[test]
fn convert_m_is_checked_as_in_qemu_img() {
    let s = Scratch::new("compressed-m");
    let src = s.path("src.raw");
    std::fs::write(&src, b"data".repeat(5000)).unwrap();
    for m in ["0", "17", "x", "08", "-1"] {
        let dst = s.path("dst.qcow2");
        let ours = tool(&["convert", "-c", "-m", m, "-O", "qcow2", &src, &dst]);
        let theirs = qemu_img(&["convert", "-c", "-m", m, "-O", "qcow2", &src, &dst]);
        assert_eq!(ours.status.code(), theirs.status.code(), "-m {m}");
        assert_eq!(
            test_support::stderr(&ours).replace("qcow2-tool:", "qemu-img:"),
            test_support::stderr(&theirs),
            "-m {m}"
        );
    }
    for m in ["1", "16", "0x2"] {
        let dst = s.path(&format!("m{m}.qcow2"));
        ok(
            tool(&["convert", "-c", "-m", m, "-O", "qcow2", &src, &dst]),
            "convert -m",
        );
        let cmp = ok(qemu_img(&["compare", "-f", "raw", &src, &dst]), "compare");
        assert!(cmp.contains("Images are identical"), "-m {m}: {cmp}");
    }
}

#[test]
fn write_c_to_a_data_file_image_is_not_supported_as_in_qemu_io() {
    // QEMU refuses compressed writes to an image with an external data
    // file before looking at anything else: ENOTSUP, whether the clusters
    // hold data (which gave EIO here) or the request is misaligned.
    use test_support::output::{as_ours, io_without_timing};
    let s = Scratch::new("compressed-data-file");
    let scripts: [&[&str]; 5] = [
        &["write -c 0 64k"],
        &["write -c 512 64k"],
        &["write -c 0 1k"],
        &["write -P 5 0 64k", "write -c -P 6 0 64k", "read -P 5 0 64k"],
        &["write -c -P 3 960k 64k", "read -P 0 960k 64k"],
    ];
    for raw in ["off", "on"] {
        for (i, script) in scripts.iter().enumerate() {
            let mut outputs = Vec::new();
            for who in ["qemu", "ours"] {
                let img = s.path(&format!("{who}-{raw}-{i}.qcow2"));
                let data = s.path(&format!("{who}-{raw}-{i}.raw"));
                let opts = format!("data_file={data},data_file_raw={raw}");
                ok(
                    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, &img, "1M"]),
                    "create",
                );
                let mut args: Vec<&str> = script.iter().flat_map(|c| ["-c", *c]).collect();
                args.push(&img);
                let out = if who == "qemu" {
                    test_support::qemu_io(&args)
                } else {
                    args.insert(0, "io");
                    tool(&args)
                };
                outputs.push((
                    io_without_timing(&test_support::stdout(&out)),
                    test_support::stderr(&out),
                    out.status.code(),
                ));
            }
            let what = format!("data_file_raw={raw}, {script:?}");
            assert!(
                outputs[0]
                    .0
                    .iter()
                    .any(|l| l == "write failed: Operation not supported"),
                "{what}: {:?}",
                outputs[0]
            );
            assert_eq!(outputs[1].0, outputs[0].0, "{what}");
            // The tool names what is not supported on stderr as well.
            let detail =
                "qcow2-tool: unsupported feature: compressed writes to an image with an external data file\n";
            assert_eq!(
                outputs[1].1.replace(detail, ""),
                as_ours(&outputs[0].1),
                "{what}"
            );
            assert_eq!(outputs[1].2, outputs[0].2, "{what}");
        }
    }
}
