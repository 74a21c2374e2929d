//! End-to-end tests of the `qcow2-tool` binary, with `qemu-img` and
//! `qemu-io` as the oracle.

use serde_json::Value;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};
use test_support::qemu::{check_json, data_ranges, guest_map, json};
use test_support::raw::poke;
use test_support::{noise, ok, qemu_img, run, stderr, stdout, Scratch};

mod common;
use common::compare_io;

/// The tool under test.
const TOOL: &str = env!("CARGO_BIN_EXE_qcow2-tool");

/// Runs the tool.
fn tool(args: &[&str]) -> Output {
    run(TOOL, args)
}

#[test]
fn create_options_agree_with_qemu_img() {
    let s = Scratch::new("create");
    // (options, size, cluster size, refcount bits, compat, lazy refcounts)
    let cases: &[(&str, &str, u64, u64, &str, bool)] = &[
        ("", "64M", 65536, 16, "1.1", false),
        ("cluster_size=512", "3M", 512, 16, "1.1", false),
        (
            "cluster_size=4k,refcount_bits=8,lazy_refcounts=on",
            "5M",
            4096,
            8,
            "1.1",
            true,
        ),
        (
            "cluster_size=2M,refcount_bits=64",
            "1G",
            2 << 20,
            64,
            "1.1",
            false,
        ),
        (
            "refcount_bits=1,cluster_size=1k",
            "2M",
            1024,
            1,
            "1.1",
            false,
        ),
        ("compat=0.10", "1G", 65536, 16, "0.10", false),
        ("compat=v2,cluster_size=8k", "10M", 8192, 16, "0.10", false),
        ("compat=v3,lazy_refcounts=on", "1T", 65536, 16, "1.1", true),
        (
            "compression_type=zstd,cluster_size=4k",
            "5M",
            4096,
            16,
            "1.1",
            false,
        ),
    ];
    for (i, &(opts, size, cluster, bits, compat, lazy)) in cases.iter().enumerate() {
        let img = s.path(&format!("c{i}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([img.as_str(), size]);
        let out = ok(tool(&args), "create");
        assert!(
            out.starts_with(&format!("Formatting '{img}', fmt=qcow2 ")),
            "{out}"
        );
        ok(qemu_img(&["check", &img]), "qemu-img check");
        let info = json(&ok(
            qemu_img(&["info", "--output", "json", &img]),
            "qemu-img info",
        ));
        assert_eq!(info["cluster-size"], cluster, "{opts}");
        let data = &info["format-specific"]["data"];
        assert_eq!(data["refcount-bits"], bits, "{opts}");
        assert_eq!(data["compat"], compat, "{opts}");
        if compat == "1.1" {
            assert_eq!(data["lazy-refcounts"], lazy, "{opts}");
            let compression = if opts.contains("zstd") {
                "zstd"
            } else {
                "zlib"
            };
            assert_eq!(data["compression-type"], compression, "{opts}");
        }
        assert_eq!(info["dirty-flag"], false);
    }

    // Sizes are rounded up to whole sectors, as qemu-img does.
    let img = s.path("odd.qcow2");
    ok(tool(&["create", "-q", &img, "1000"]), "create");
    let info = json(&ok(qemu_img(&["info", "--output=json", &img]), "info"));
    assert_eq!(info["virtual-size"], 1024);

    // The size may also come from -o, and -q silences the report.
    let img = s.path("osize.qcow2");
    let out = ok(tool(&["create", "-q", "-o", "size=3M", &img]), "create");
    assert!(out.is_empty());
    let info = json(&ok(qemu_img(&["info", "--output=json", &img]), "info"));
    assert_eq!(info["virtual-size"], 3 << 20);
}

#[test]
fn info_matches_qemu_img() {
    let s = Scratch::new("info");
    let mut images = Vec::new();
    for (i, opts) in [
        "cluster_size=65536",
        "cluster_size=4096,refcount_bits=8,lazy_refcounts=on",
        "compat=0.10",
        "cluster_size=2M,refcount_bits=32",
        "cluster_size=4096,compression_type=zstd",
    ]
    .iter()
    .enumerate()
    {
        let ours = s.path(&format!("ours{i}.qcow2"));
        ok(tool(&["create", "-q", "-o", opts, &ours, "7M"]), "create");
        let theirs = s.path(&format!("theirs{i}.qcow2"));
        ok(
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &theirs, "7M"]),
            "qemu-img create",
        );
        ok(
            run(
                "qemu-io",
                &["-c", "write -P 0x5a 1M 300k", "-c", "write 6M 1k", &theirs],
            ),
            "qemu-io",
        );
        images.push(ours);
        images.push(theirs);
    }
    let raw = s.path("disk.raw");
    std::fs::write(&raw, noise(5000, 1)).expect("write raw file");
    images.push(raw);
    // Dirty and corrupt flags (bits 0 and 1 of the incompatible features,
    // whose last byte is byte 79 of the header).
    for (name, bit) in [("dirty.qcow2", 1u8), ("corrupt.qcow2", 2)] {
        let img = s.path(name);
        ok(
            tool(&["create", "-q", "-o", "lazy_refcounts=on", &img, "1M"]),
            "create",
        );
        let mut bytes = std::fs::read(&img).expect("read image");
        bytes[79] |= bit;
        std::fs::write(&img, bytes).expect("write image");
        images.push(img);
    }

    for img in &images {
        let ours = ok(tool(&["info", "--output", "json", img]), "info");
        let theirs = ok(
            qemu_img(&["info", "--output", "json", img]),
            "qemu-img info",
        );
        assert_eq!(json(&ours), json(&theirs), "JSON info of {img}");
        let ours = ok(tool(&["info", img]), "info");
        let theirs = ok(qemu_img(&["info", img]), "qemu-img info");
        assert_eq!(ours, theirs, "human info of {img}");
    }
}

#[test]
fn convert_round_trips_and_stays_sparse() {
    let s = Scratch::new("convert");
    let cluster = 65536usize;
    // 6 MiB: data in some clusters, zeros in others, a few stray bytes.
    let mut data = vec![0u8; 6 << 20];
    let data_clusters = [0usize, 1, 5, 17, 40, 95];
    for &c in &data_clusters {
        let at = c * cluster;
        data[at..at + cluster].copy_from_slice(&noise(cluster, c as u64));
    }
    data[30 * cluster + 12345] = 7; // one byte makes cluster 30 non-zero
    data[(6 << 20) - 1] = 9; // and the last cluster too
    let src = s.path("src.raw");
    std::fs::write(&src, &data).expect("write source");

    // raw -> qcow2
    let q = s.path("out.qcow2");
    ok(tool(&["convert", "-O", "qcow2", &src, &q]), "convert");
    ok(qemu_img(&["check", &q]), "qemu-img check");
    let cmp = ok(qemu_img(&["compare", &src, &q]), "qemu-img compare");
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let mut expected: Vec<u64> = data_clusters.iter().map(|&c| c as u64).collect();
    expected.extend([30, 95]);
    expected.sort_unstable();
    expected.dedup();
    let mut allocated = Vec::new();
    for (start, end) in data_ranges(&q) {
        allocated.extend((start / cluster as u64)..end.div_ceil(cluster as u64));
    }
    assert_eq!(allocated, expected, "only non-zero clusters are allocated");

    // qcow2 -> raw gives back the source, sparse.
    let back = s.path("back.raw");
    ok(
        tool(&["convert", "-f", "qcow2", "-O", "raw", &q, &back]),
        "convert",
    );
    ok(run("cmp", &[&src, &back]), "cmp");

    // qcow2 -> qcow2 with other options, and raw -> raw (format probed).
    let q2 = s.path("out2.qcow2");
    ok(
        tool(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,compat=0.10",
            &q,
            &q2,
        ]),
        "convert",
    );
    ok(qemu_img(&["check", &q2]), "qemu-img check");
    ok(qemu_img(&["compare", &src, &q2]), "qemu-img compare");
    let info = json(&ok(qemu_img(&["info", "--output=json", &q2]), "info"));
    assert_eq!(info["cluster-size"], 4096);
    assert_eq!(info["format-specific"]["data"]["compat"], "0.10");
    let raw2 = s.path("copy.raw");
    ok(tool(&["convert", &src, &raw2]), "convert");
    ok(run("cmp", &[&src, &raw2]), "cmp");

    // An image written by qemu-io converts like qemu-img converts it.
    let theirs = s.path("theirs.qcow2");
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", &theirs, "3M"]),
        "qemu-img create",
    );
    ok(
        run(
            "qemu-io",
            &[
                "-c",
                "write -P 0x11 100k 300k",
                "-c",
                "write -z 150k 10k",
                "-c",
                "write -P 0x22 2M 1",
                &theirs,
            ],
        ),
        "qemu-io",
    );
    let ours_raw = s.path("ours.raw");
    let qemu_raw = s.path("qemu.raw");
    ok(
        tool(&["convert", "-O", "raw", &theirs, &ours_raw]),
        "convert",
    );
    ok(
        qemu_img(&["convert", "-O", "raw", &theirs, &qemu_raw]),
        "qemu-img convert",
    );
    ok(run("cmp", &[&ours_raw, &qemu_raw]), "cmp");
}

#[test]
fn convert_huge_sparse_image_quickly() {
    let s = Scratch::new("huge");
    let big = s.path("big.qcow2");
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", &big, "2P"]),
        "qemu-img create",
    );
    ok(
        run(
            "qemu-io",
            &["-c", "write -P 5 1P 64k", "-c", "write -P 6 0 4k", &big],
        ),
        "qemu-io",
    );
    let started = Instant::now();
    let out = s.path("out.qcow2");
    ok(tool(&["convert", "-O", "qcow2", &big, &out]), "convert");
    ok(qemu_img(&["check", &out]), "qemu-img check");
    let reads = ok(
        run(
            "qemu-io",
            &[
                "-r",
                "-c",
                "read -P 5 1P 64k",
                "-c",
                "read -P 6 0 4k",
                "-c",
                "read -P 0 4k 60k",
                &out,
            ],
        ),
        "qemu-io",
    );
    assert!(!reads.contains("verification failed"), "{reads}");

    // To raw: a 1 TiB sparse file, written only where there is data.
    let mid = s.path("mid.qcow2");
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", &mid, "1T"]),
        "qemu-img create",
    );
    ok(
        run(
            "qemu-io",
            &["-c", "write -P 7 600G 64k", "-c", "write -P 8 0 4k", &mid],
        ),
        "qemu-io",
    );
    let raw = s.path("mid.raw");
    ok(tool(&["convert", &mid, &raw]), "convert");
    let meta = std::fs::metadata(&raw).expect("stat raw");
    assert_eq!(meta.len(), 1 << 40);
    let cmp = ok(qemu_img(&["compare", &mid, &raw]), "qemu-img compare");
    assert!(cmp.contains("Images are identical"), "{cmp}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "sparse conversion must not walk every cluster"
    );
}

#[test]
fn io_matches_qemu_io() {
    let s = Scratch::new("io");
    let base = s.path("base.qcow2");
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", &base, "4M"]),
        "qemu-img create",
    );
    let script = [
        "write 0 4k",
        "write -P 0x11 4k 4k",
        "write -P 0x22 6000 3000",
        "read -P 0x11 4k 1000",
        "read -P 0x22 6000 3000",
        "read -P 0x11 0 4k",
        "read -q -P 0xcd 0 4k",
        "read -q -P 0x33 0 4k",
        "read -v 5990 40",
        "write -z 5k 1k",
        "read -P 0 5k 1k",
        "write -P 0x33 1M 200k",
        "r -P 0x33 1088k 136k",
        "write -z 1M 64k",
        "read -P 0 1M 64k",
        "read -P 0x33 -s 64k -l 4k 1M 128k",
        "flush",
        "w -q -P 0x44 3M 64k",
        "read -P 0x44 3M 64k",
        "read 4M 1",
        "read 3M 2M",
        "write 4M 512",
        "read 4M 0",
        "read 0 abc",
        "read 0 1kb",
        "read -P zz 0 1",
        "read -x 0 1",
        "read 0",
        "frob",
        "write -z -P 1 0 1",
        "read 0 3G",
        "read 1k 1.5k",
        "write -P 0xff 4194303 1",
        "read -v 4194288 16",
        "f",
    ];
    assert_eq!(compare_io(&s, &base, &[], &script, "mixed"), 1);

    let clean = [
        "write -P 1 0 64k",
        "read -P 1 0 64k",
        "flush",
        "read -q 0 1",
    ];
    assert_eq!(compare_io(&s, &base, &[], &clean, "clean"), 0);

    let read_only = ["read -P 0 0 4k", "write 0 4k", "read -v 0 16", "flush"];
    assert_eq!(compare_io(&s, &base, &["-r"], &read_only, "ro"), 1);
}

#[test]
fn discard_and_write_zeroes_match_qemu_io() {
    let s = Scratch::new("free");
    // Whole and partial clusters, head and tail pieces, -u, ranges over
    // unallocated clusters, the partial last cluster of the disk, and
    // errors (past the end, read-only).
    let script = [
        "write -P 0xab 0 512k",
        "discard 4096 70000",
        "write -z 65536 4096",
        "write -z -u 131072 65536",
        "write -z 1000 100",
        "write -z -u 200000 300000",
        "write -z 196608 65536",
        "discard 917504 82944",
        "write -P 7 990000 10000",
        "discard 983040 17408",
        "write -z 600001 3",
        "write -z -u 700000 200000",
        "read -P 0 600000 400000",
        "d -q 0 4096",
        "discard 65536 65536",
        "discard 0 2M",
        "write -z 1M 1",
        "flush",
    ];
    let configs = [
        "cluster_size=4096",
        "cluster_size=65536",
        "cluster_size=512,lazy_refcounts=on",
        "cluster_size=65536,refcount_bits=1",
        "compat=0.10",
        "compat=0.10,cluster_size=4096",
    ];
    for (i, opts) in configs.iter().enumerate() {
        let base = s.path(&format!("base{i}.qcow2"));
        ok(
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, &base, "1000448"]),
            "qemu-img create",
        );
        let tag = format!("free{i}");
        assert_eq!(compare_io(&s, &base, &[], &script, &tag), 1, "{opts}");
        let (theirs, ours) = (
            s.path(&format!("{tag}-qemu.qcow2")),
            s.path(&format!("{tag}-ours.qcow2")),
        );
        assert_eq!(guest_map(&ours), guest_map(&theirs), "map after {opts}");
        let check = json(&ok(
            qemu_img(&["check", "--output", "json", &ours]),
            "qemu-img check",
        ));
        let theirs_check = json(&ok(
            qemu_img(&["check", "--output", "json", &theirs]),
            "qemu-img check",
        ));
        assert_eq!(check["leaks"], Value::Null, "{opts}: no leaks");
        assert_eq!(
            check["allocated-clusters"], theirs_check["allocated-clusters"],
            "{opts}: as many clusters in use as QEMU"
        );
    }
    let read_only = ["discard 0 64k", "write -z 0 64k"];
    let base = s.path("base0.qcow2");
    assert_eq!(compare_io(&s, &base, &["-r"], &read_only, "free-ro"), 1);
}

#[test]
fn bad_arguments_fail_cleanly() {
    let s = Scratch::new("bad");
    let img = s.path("ok.qcow2");
    ok(tool(&["create", "-q", &img, "1M"]), "create");
    let text = s.path("text.txt");
    std::fs::write(&text, "not an image\n").expect("write text file");
    let missing = s.path("missing.qcow2");
    let new = s.path("new.qcow2");
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["frobnicate"],
        vec!["create", "--bogus", &new, "1M"],
        vec!["create", &new, "12Q"],
        vec!["create", &new, "1.5"],
        vec!["create", &new, "-1"],
        vec!["create", &new, "16E"],
        vec!["create", &new],
        vec!["create", "-o", "cluster_size=1000", &new, "1M"],
        vec!["create", "-o", "refcount_bits=3", &new, "1M"],
        vec!["create", "-o", "compat=0.10,lazy_refcounts=on", &new, "1M"],
        vec!["create", "-o", "nonsense=1", &new, "1M"],
        vec!["create", "-f", "vmdk", &new, "1M"],
        vec!["info", &missing],
        vec!["info", "--output", "xml", &img],
        vec!["info", "-f", "qcow2", &text],
        vec!["convert", &missing, &new],
        vec!["convert", "-f", "qcow2", &text, &new],
        vec!["convert", "-O", "qcow2", &img, &img],
        vec!["convert", "-O", "vdi", &img, &new],
        vec!["io", "-c", "read 0 1", &missing],
        vec!["io", "-c", "read 0 1", &text],
        vec!["io", "--frob", "-c", "read 0 1", &img],
    ];
    for args in &cases {
        let out = tool(args);
        let err = stderr(&out);
        assert_ne!(out.status.code(), Some(0), "{args:?} should fail");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one stderr line: {err}");
        assert!(err.starts_with("qcow2-tool: "), "{args:?}: {err}");
    }
    assert!(!Path::new(&new).exists(), "failed commands leave no image");
}

#[test]
fn damaged_images_do_not_panic() {
    let s = Scratch::new("damaged");
    let base = s.path("base.qcow2");
    ok(
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            &base,
            "1M",
        ]),
        "qemu-img create",
    );
    ok(
        run(
            "qemu-io",
            &["-c", "write -P 1 0 64k", "-c", "write -P 2 512k 8k", &base],
        ),
        "qemu-io",
    );
    let pristine = std::fs::read(&base).expect("read image");
    let img = s.path("bad.qcow2");
    let out = s.path("out.raw");
    let (mut failures, mut successes) = (0, 0);
    for round in 0..40u64 {
        let mut bytes = pristine.clone();
        let hits = noise(16, round);
        for pair in hits.chunks(4) {
            // Aim most damage at the metadata at the front of the file.
            let span = if round % 2 == 0 { 512 } else { 24 << 10 };
            let at = (usize::from(pair[0]) << 8 | usize::from(pair[1])) * 37 % span;
            if let Some(b) = bytes.get_mut(at) {
                *b ^= pair[2] | 1;
            }
        }
        if round % 7 == 6 {
            bytes.truncate(usize::from(hits[0]) * 97);
        }
        std::fs::write(&img, &bytes).expect("write damaged image");
        for args in [
            vec!["info", "--output", "json", img.as_str()],
            vec!["convert", img.as_str(), out.as_str()],
            vec![
                "io",
                "-c",
                "read -P 1 0 64k",
                "-c",
                "write -P 3 100k 70k",
                "-c",
                "read 0 1M",
                img.as_str(),
            ],
        ] {
            let result = tool(&args);
            let err = stderr(&result);
            assert!(!err.contains("panicked"), "round {round} {args:?}: {err}");
            assert!(
                matches!(result.status.code(), Some(0 | 1)),
                "round {round} {args:?}: {:?} {err}",
                result.status
            );
            if result.status.success() {
                successes += 1;
            } else {
                failures += 1;
            }
        }
    }
    // The damage must exercise both the error paths and the working ones.
    assert!(failures > 10 && successes > 10, "{failures} / {successes}");
}

#[test]
fn check_and_repair_agree_with_qemu_img() {
    let s = Scratch::new("check");
    // A 1 MiB image with one data cluster: header, refcount table, refcount
    // block, L1, L2, data = clusters 0..=5; the refcount block is at 128 KiB.
    let base = s.path("base.qcow2");
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", &base, "1M"]),
        "create",
    );
    ok(
        run("qemu-io", &["-c", "write -P 0x5a 0 64k", &base]),
        "qemu-io",
    );
    let refblock = 128 << 10;

    let leaked = s.path("leaked.qcow2");
    std::fs::copy(&base, &leaked).expect("copy");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&leaked)
        .unwrap()
        .set_len(7 << 16)
        .unwrap();
    poke(&leaked, refblock + 2 * 6, &1u16.to_be_bytes());

    let corrupt = s.path("corrupt.qcow2");
    std::fs::copy(&leaked, &corrupt).expect("copy");
    poke(&corrupt, refblock + 2 * 5, &0u16.to_be_bytes());

    for (image, expected_code) in [(&base, 0), (&leaked, 3), (&corrupt, 2)] {
        let ours = check_json(TOOL, &[], image);
        let theirs = check_json("qemu-img", &[], image);
        assert_eq!(ours, theirs, "{image}");
        assert_eq!(ours.1, Some(expected_code), "{image}");
    }
    // Repairs: afterwards qemu-img finds nothing, and the data is intact.
    for (image, mode) in [(&leaked, "leaks"), (&corrupt, "all")] {
        let (report, code) = check_json(TOOL, &["-r", mode], image);
        assert_eq!(code, Some(0), "{image}: {report}");
        assert_eq!(report["leaks-fixed"], 1, "{image}: {report}");
        assert_eq!(check_json("qemu-img", &[], image).1, Some(0), "{image}");
        let io = run("qemu-io", &["-r", "-c", "read -P 0x5a 0 64k", image]);
        assert!(!stdout(&io).contains("failed"), "{image}: {}", stdout(&io));
    }
    // A refcount of 0 under a reference needs a rebuild, which a leaks-only
    // repair refuses without writing: the check fails (exit 1), as qemu-img's.
    let corrupt2 = s.path("corrupt2.qcow2");
    std::fs::copy(&base, &corrupt2).expect("copy");
    poke(&corrupt2, refblock + 2 * 5, &0u16.to_be_bytes());
    let before = std::fs::read(&corrupt2).expect("read");
    let ours = tool(&["check", "-r", "leaks", &corrupt2]);
    assert_eq!(ours.status.code(), Some(1), "{}", stderr(&ours));
    assert!(stderr(&ours).contains("rebuild"), "{}", stderr(&ours));
    assert_eq!(std::fs::read(&corrupt2).expect("read"), before);
    let theirs = qemu_img(&["check", "-r", "leaks", &corrupt2]);
    assert_eq!(theirs.status.code(), Some(1));
    // Not a qcow2 image: exit 1 with one line.
    let raw = s.path("plain.raw");
    std::fs::write(&raw, vec![0u8; 4096]).expect("write raw");
    let out = tool(&["check", &raw]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}
