//! Backing chains against QEMU: reading a raw base shorter than a qcow2
//! middle layer shorter than the top, writes and write-zeroes through the
//! tool and through qemu-io ending in the same images, and qemu-img's
//! errors for chains that cannot be opened.

mod common;

use common::{compare_io, ok, qemu_img, qemu_io, stderr, tool, Scratch};
use test_support::qemu::guest_map;

/// qemu-img create with `options` (`-o`), quietly.
fn create(path: &str, options: &str, size: &str) {
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, path, size]),
        "qemu-img create",
    );
}

/// qemu-io commands on `path` (format `fmt`).
fn qio(path: &str, fmt: &str, commands: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(path);
    ok(qemu_io(&args), "qemu-io");
}

/// A raw base of `base_len` bytes, a qcow2 middle layer of 2 MiB over it
/// and a top of 3 MiB over that, each with some data of its own; returns
/// the top's path.
fn three_layers(s: &Scratch, base_len: u64, cluster: &str) -> String {
    let base = s.path("base.raw");
    std::fs::write(&base, test_support::noise(base_len as usize, base_len)).unwrap();
    let middle = s.path("middle.qcow2");
    create(
        &middle,
        &format!("backing_file=base.raw,backing_fmt=raw,cluster_size={cluster}"),
        "2M",
    );
    qio(
        &middle,
        "qcow2",
        &[
            "write -P 0x22 100k 8k",
            "write -z 300k 70k",
            "write -P 0x23 1500k 4k",
        ],
    );
    let top = s.path("top.qcow2");
    create(
        &top,
        &format!("backing_file=middle.qcow2,backing_fmt=qcow2,cluster_size={cluster}"),
        "3M",
    );
    qio(
        &top,
        "qcow2",
        &[
            "write -P 0x33 1000k 100k",
            "write -z 50k 3k",
            "write -P 0x34 2500k 5k",
        ],
    );
    top
}

/// Which guest ranges hold data and which read as zeros without any, as
/// `qemu-img map` reports them. Within data, whether the host file has a
/// hole (we write zeros with holes, QEMU with zero buffers) is left out.
fn layout(path: &str) -> Vec<(u64, u64, bool)> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for (start, end, data, _zero) in guest_map(path) {
        match runs.last_mut() {
            Some(last) if last.1 == start && last.2 == data => last.1 = end,
            _ => runs.push((start, end, data)),
        }
    }
    runs
}

#[test]
fn chains_read_as_qemu_reads_them() {
    // A base that is not a whole number of clusters (nor of 4 KiB).
    for (base_len, cluster) in [
        (1 << 20, "64k"),
        (700 * 1024 + 1536, "64k"),
        (700 * 1024 + 1536, "4k"),
    ] {
        let s = Scratch::new("backing-read");
        let top = three_layers(&s, base_len, cluster);
        let (ours, theirs) = (s.path("ours.raw"), s.path("theirs.raw"));
        ok(tool(&["convert", "-O", "raw", &top, &ours]), "our convert");
        ok(
            qemu_img(&["convert", "-O", "raw", &top, &theirs]),
            "qemu-img convert",
        );
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "base {base_len}, clusters {cluster}"
        );
        // Flattened into a qcow2 image too.
        let flat = s.path("flat.qcow2");
        ok(
            tool(&["convert", "-O", "qcow2", &top, &flat]),
            "our convert",
        );
        let cmp = ok(qemu_img(&["compare", &flat, &theirs]), "qemu-img compare");
        assert!(cmp.contains("Images are identical"), "{cmp}");
        let info = ok(qemu_img(&["info", "--output", "json", &flat]), "info");
        assert!(
            !info.contains("backing-filename"),
            "the copy stands alone: {info}"
        );
    }
}

#[test]
fn writes_over_a_chain_match_qemu_io() {
    // Partial clusters over backing data (copy-on-write), unaligned
    // write-zeroes over backing data and over backing zeros (past the raw
    // base's end), discards, whole clusters, and the top's part past the
    // middle layer's end.
    let script = [
        "write -P 0x44 3000 5000",
        "write -z 1500k 7k",
        "write -z 60k 10k",
        "write -z 900k 3k",
        "write -z 2500k 3k",
        "write -P 0x45 2040k 20k",
        "discard 128k 64k",
        "discard 1984k 128k",
        "write -z -u 256k 64k",
        "write -P 0x46 767k 2k",
        "read -P 0x46 767k 2k",
        "flush",
    ];
    for (i, (cluster, compat)) in [
        ("64k", "1.1"),
        ("4k", "1.1"),
        ("512", "1.1"),
        ("64k", "0.10"),
    ]
    .iter()
    .enumerate()
    {
        let s = Scratch::new("backing-write");
        let base = s.path("base.raw");
        std::fs::write(&base, test_support::noise(700 * 1024 + 1536, 9)).unwrap();
        let middle = s.path("middle.qcow2");
        create(
            &middle,
            &format!(
                "backing_file=base.raw,backing_fmt=raw,cluster_size={cluster},compat={compat}"
            ),
            "2M",
        );
        qio(
            &middle,
            "qcow2",
            &["write -P 0x22 100k 8k", "write -P 0x23 1500k 4k"],
        );
        let top = s.path("top.qcow2");
        create(
            &top,
            &format!("backing_file=middle.qcow2,backing_fmt=qcow2,cluster_size={cluster},compat={compat}"),
            "3M",
        );
        let tag = format!("chain{i}");
        assert_eq!(
            compare_io(&s, &top, &[], &script, &tag),
            0,
            "{cluster} {compat}"
        );
        let (theirs, ours) = (
            s.path(&format!("{tag}-qemu.qcow2")),
            s.path(&format!("{tag}-ours.qcow2")),
        );
        assert_eq!(layout(&ours), layout(&theirs), "map, {cluster} {compat}");
    }
}

#[test]
fn chains_that_cannot_open_fail_as_in_qemu_img() {
    let s = Scratch::new("backing-errors");
    let top = three_layers(&s, 1 << 20, "64k");
    let out = s.path("out.raw");
    // A missing middle layer.
    std::fs::rename(s.path("middle.qcow2"), s.path("gone.qcow2")).unwrap();
    let ours = tool(&["convert", "-O", "raw", &top, &out]);
    let theirs = qemu_img(&["convert", "-O", "raw", &top, &out]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(
        stderr(&ours).replace("qcow2-tool:", "qemu-img:"),
        stderr(&theirs)
    );
    // info does not open the chain.
    ok(tool(&["info", &top]), "info without its backing");
    // A loop: the top names itself through a middle layer naming the top.
    std::fs::rename(s.path("gone.qcow2"), s.path("middle.qcow2")).unwrap();
    ok(
        qemu_img(&[
            "rebase",
            "-u",
            "-F",
            "qcow2",
            "-b",
            "top.qcow2",
            &s.path("middle.qcow2"),
        ]),
        "rebase",
    );
    let ours = tool(&["convert", "-O", "raw", &top, &out]);
    assert_eq!(ours.status.code(), Some(1));
    assert!(stderr(&ours).contains("infinite loop"), "{}", stderr(&ours));
}
