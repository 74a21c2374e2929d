//! `create -b/-F/-u` and `-o backing_file,backing_fmt,data_file,data_file_raw`,
//! and `info` on overlays and data file images, against `qemu-img` 10:
//! the same command lines run by both in twin directories must print the
//! same messages, leave the same files and write the same header cluster;
//! `qemu-img` must read our images as its own, and we must read its.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};
use test_support::output::as_ours;
use test_support::qemu::json;
use test_support::Scratch;

const TOOL: &str = env!("CARGO_BIN_EXE_qcow2-tool");

/// Runs `program` with `args` in `dir`.
fn run_in(dir: &Path, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Output and exit status, QEMU's program prefix turned into ours.
fn transcript(out: &Output) -> String {
    format!(
        "{}{}status {:?}",
        as_ours(&String::from_utf8_lossy(&out.stdout)),
        as_ours(&String::from_utf8_lossy(&out.stderr)),
        out.status.code()
    )
}

/// The sorted file names under `dir`, recursively.
fn files(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path.clone());
            }
            names.push(path.strip_prefix(dir).unwrap().display().to_string());
        }
    }
    names.sort();
    names
}

/// Twin directories with the same backing files: a 3 MiB raw, a 5 MiB
/// qcow2, a raw in `sub/`.
fn twins(s: &Scratch) -> [std::path::PathBuf; 2] {
    let dirs = [s.join("qemu"), s.join("ours")];
    for d in &dirs {
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("base.raw"), vec![0x5a; 3 << 20]).unwrap();
        // Not a multiple of the cluster size, nor of a sector.
        std::fs::write(d.join("sub/odd.raw"), vec![1; 100_000]).unwrap();
        let out = run_in(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", "5M"],
        );
        assert!(out.status.success(), "{}", transcript(&out));
    }
    dirs
}

/// The bytes of the first cluster of `image` (as far as the file goes).
fn header_cluster(image: &Path) -> Vec<u8> {
    let bytes = std::fs::read(image).unwrap();
    let cluster_bits = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    bytes[..(1usize << cluster_bits).min(bytes.len())].to_vec()
}

fn info_json(dir: &Path, program: &str, image: &str) -> Value {
    let out = run_in(dir, program, &["info", "--output=json", image]);
    assert!(
        out.status.success(),
        "{program} info {image}: {}",
        transcript(&out)
    );
    json(&String::from_utf8_lossy(&out.stdout))
}

/// The fields of `qemu-img info` that do not depend on how much the
/// file occupies.
fn comparable(mut v: Value) -> Value {
    for key in ["actual-size", "children"] {
        v.as_object_mut().unwrap().remove(key);
    }
    v
}

#[test]
fn create_with_backing_and_data_files_matches_qemu_img() {
    let s = Scratch::new("backing-create");
    let [theirs, ours] = twins(&s);
    let long = "n".repeat(1024);
    let fits_not = "m".repeat(600);
    let cases: Vec<String> = [
        "-b base.raw -F raw ov.qcow2",
        "-b base.raw ov-nofmt.qcow2",
        "-b base.qcow2 ov-qcow2-nofmt.qcow2",
        "-b base.qcow2 -F qcow2 ov-q.qcow2",
        "-b base.qcow2 -F qcow2 ov-q-big.qcow2 1G",
        "-b ov-q.qcow2 -F qcow2 ov-chain.qcow2",
        "-b base.qcow2 -F raw ov-as-raw.qcow2",
        "-b base.raw -F qcow2 ov-wrong.qcow2",
        "-b base.raw -F foo ov-foo.qcow2",
        "-b missing.raw -F raw ov-missing.qcow2",
        "-b missing.raw ov-missing2.qcow2",
        "-b missing.raw -F raw -u ov-unsafe.qcow2 5M",
        "-b missing.raw -F raw -u ov-unsafe-nosize.qcow2",
        "-b missing.raw -u ov-unsafe-nofmt.qcow2 5M",
        "-b x -u -F vmdk ov-vmdk.qcow2 1M",
        "-b x -u -F foo ov-foo2.qcow2 1M",
        "-b odd.raw -F raw sub/ov-rel.qcow2",
        "-b sub/odd.raw -F raw sub/ov-rel2.qcow2",
        "-b base.raw -F raw -o backing_file=x.raw ov-dup.qcow2",
        "-o backing_file=base.raw,backing_fmt=raw ov-o.qcow2",
        "-o compat=0.10 -b base.raw -F raw ov-v2.qcow2",
        "-o cluster_size=512 -b base.raw -F raw ov-512.qcow2",
        "-o cluster_size=4096 -b base.raw -F raw ov-4k.qcow2",
        "-o cluster_size=8192,refcount_bits=1 -b base.raw -F raw ov-8k.qcow2",
        "-o cluster_size=2M -b base.raw -F raw ov-2m.qcow2",
        "-F raw nobacking.qcow2 1M",
        "-o backing_fmt=raw nobacking2.qcow2 1M",
        "-b self.qcow2 -F qcow2 self.qcow2",
        "-o backing_file= empty.qcow2 1M",
        "-F raw -o cluster_size=1000 order1.qcow2 1M",
        "-F raw -o compat=0.10,refcount_bits=8 order2.qcow2 1M",
        "-o compat=0.10,lazy_refcounts=on order3.qcow2 1M",
        "-o compat=0.10,refcount_bits=8 order4.qcow2 1M",
        "-o data_file=d.raw data.qcow2 1M",
        "-o data_file=dr.raw,data_file_raw=on data-raw.qcow2 1M",
        "-o data_file=dt.raw,data_file_raw=true -o cluster_size=4k data-raw-4k.qcow2 3M",
        "-o data_file=db.raw -b base.raw -F raw data-backing.qcow2",
        "-o data_file_raw=on nodata.qcow2 1M",
        "-o data_file=dv2.raw,compat=0.10 data-v2.qcow2 1M",
        "-o data_file_raw=on -b base.raw -F raw raw-backing.qcow2",
        "-o data_file=dx.raw,data_file_raw=on -b base.raw -F raw raw-backing2.qcow2",
        "-o data_file=,data_file_raw=on data-empty.qcow2 1M",
    ]
    .iter()
    .map(|c| c.to_string())
    .chain([
        format!("-b {long} -F raw -u long.qcow2 1M"),
        format!("-b {fits_not} -F raw -u -o cluster_size=512 nofit.qcow2 1M"),
        format!("-b {fits_not} -F raw -u fits.qcow2 1M"),
    ])
    .collect();
    for case in &cases {
        let mut args = vec!["create", "-f", "qcow2"];
        args.extend(case.split(' '));
        let expected = transcript(&run_in(&theirs, "qemu-img", &args));
        let got = transcript(&run_in(&ours, TOOL, &args));
        assert_eq!(got, expected, "create {case}");
        assert_eq!(files(&ours), files(&theirs), "files after create {case}");
        let image = *args.iter().rev().find(|a| a.ends_with(".qcow2")).unwrap();
        if !theirs.join(image).exists() || image == "self.qcow2" {
            continue;
        }
        assert_eq!(
            header_cluster(&ours.join(image)),
            header_cluster(&theirs.join(image)),
            "header cluster of {case}"
        );
        // qemu-img reads ours as its own (data file images included).
        let a = comparable(info_json(&ours, "qemu-img", image));
        let b = comparable(info_json(&theirs, "qemu-img", image));
        assert_eq!(a, b, "qemu-img info of {case}");
        if !case.contains("missing") && !case.contains(" x ") && !case.contains("-u") {
            let out = run_in(&ours, "qemu-img", &["check", image]);
            assert!(out.status.success(), "check {case}: {}", transcript(&out));
        }
        // The preallocated identity mapping of data_file_raw, as QEMU's.
        if case.contains("data_file_raw=") {
            let bytes = |d: &Path| std::fs::read(d.join(image)).unwrap();
            assert_eq!(bytes(&ours), bytes(&theirs), "whole image of {case}");
        }
    }
}

#[test]
fn overlays_open_and_our_images_match_qemu_images() {
    let s = Scratch::new("backing-create-open");
    let [theirs, ours] = twins(&s);
    let args = [
        "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "ov.qcow2",
    ];
    assert!(run_in(&theirs, "qemu-img", &args).status.success());
    assert!(run_in(&ours, TOOL, &args).status.success());
    // Ours opens (read-only, the backing named but not attached).
    use qcow2_core::OpenOptions;
    use qcow2_std_shim::{block_on, FileDevice, Image};
    let dev = FileDevice::open(ours.join("ov.qcow2"), false).unwrap();
    let mut image = Image::open(dev, &OpenOptions::read_only()).unwrap();
    let inner = image.inner_mut();
    let mut buf = [0u8; 64];
    let n = block_on(inner.backing_file_name(&mut buf))
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"base.raw");
    let n = block_on(inner.backing_format(&mut buf)).unwrap().unwrap();
    assert_eq!(&buf[..n], b"raw");
    assert_eq!(image.virtual_size(), 3 << 20);
    // qemu-io reads the backing's bytes through our overlay.
    let out = run_in(&ours, "qemu-io", &["-c", "read -P 0x5a 0 3M", "ov.qcow2"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 3145728/3145728"),
        "{}",
        transcript(&out)
    );
}

#[test]
fn info_matches_qemu_img_on_overlays_and_data_files() {
    let s = Scratch::new("backing-info");
    let [theirs, _] = twins(&s);
    let d = theirs.as_path();
    let make = |args: &[&str]| {
        let mut all = vec!["create", "-q", "-f", "qcow2"];
        all.extend(args);
        let out = run_in(d, "qemu-img", &all);
        assert!(out.status.success(), "{args:?}: {}", transcript(&out));
    };
    make(&["-b", "base.raw", "-F", "raw", "ov.qcow2"]);
    make(&["-b", "base.qcow2", "-F", "qcow2", "ov-q.qcow2", "8M"]);
    make(&["-b", "ov-q.qcow2", "-F", "qcow2", "ov-chain.qcow2"]);
    make(&["-b", "odd.raw", "-F", "raw", "sub/ov-rel.qcow2"]);
    make(&[
        "-o",
        "compat=0.10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "ov-v2.qcow2",
    ]);
    make(&[
        "-u",
        "-b",
        "missing.raw",
        "-F",
        "raw",
        "ov-missing.qcow2",
        "1M",
    ]);
    let abs = d.join("base.raw").display().to_string();
    make(&["-b", &abs, "-F", "raw", "ov-abs.qcow2"]);
    make(&[
        "-o",
        "cluster_size=512",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "ov-512.qcow2",
    ]);
    // A backing name without a format extension (QEMU writes none only
    // when asked not to check, so patch one out): probing is left to the
    // reader; info shows no format.
    make(&["-b", "base.raw", "-F", "raw", "ov-nofmt.qcow2"]);
    let path = d.join("ov-nofmt.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0x70..0x74].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(&path, bytes).unwrap();
    let images = [
        "ov.qcow2",
        "ov-q.qcow2",
        "ov-chain.qcow2",
        "sub/ov-rel.qcow2",
        "ov-v2.qcow2",
        "ov-missing.qcow2",
        "ov-abs.qcow2",
        "ov-512.qcow2",
        "ov-nofmt.qcow2",
    ];
    let sub = d.join("sub");
    let from_sub = ["../ov.qcow2", "ov-rel.qcow2", "../sub/ov-rel.qcow2"];
    let abs_rel = d.join("sub/ov-rel.qcow2").display().to_string();
    let mut runs: Vec<(&Path, &str)> = images.iter().map(|i| (d, *i)).collect();
    runs.extend(from_sub.iter().map(|i| (sub.as_path(), *i)));
    runs.push((d, &abs_rel));
    for (dir, image) in runs {
        for output in ["--output=json", "--output=human"] {
            let args = ["info", output, image];
            let expected = transcript(&run_in(dir, "qemu-img", &args));
            let got = transcript(&run_in(dir, TOOL, &args));
            if output == "--output=json" {
                let strip = |t: &str| {
                    let body = &t[..t.rfind("status").unwrap()];
                    json(body)
                };
                assert_eq!(strip(&got), strip(&expected), "info {output} {image}");
            } else {
                assert_eq!(got, expected, "info {output} {image}");
            }
        }
    }
}
