//! `check` and `check -r` against `qemu-img check` on damaged images: the
//! same findings, and repairs that keep every byte of guest data that QEMU
//! reads before the repair (compared with QEMU's own repair of a copy).
//!
//! Each damaged image is made by `qemu-img`/`qemu-io` and then a few bytes
//! are poked into it, as a hostile or crashed image would have them.

use serde_json::Value;
use std::process::Output;
use test_support::qemu::check_json;
use test_support::raw::header::{
    AUTOCLEAR_FEATURES, CLUSTER_BITS, EXTENSIONS, INCOMPATIBLE_FEATURES, L1_TABLE_OFFSET,
    REFCOUNT_TABLE_CLUSTERS, REFCOUNT_TABLE_OFFSET, SIZE, SNAPSHOTS_OFFSET,
};
use test_support::raw::{peek32, peek64, poke, poke64, OFFSET_MASK};
use test_support::{run, succeeded, Scratch};

/// The tool under test.
const TOOL: &str = env!("CARGO_BIN_EXE_qcow2-tool");

/// Runs the tool.
fn tool(args: &[&str]) -> Output {
    run(TOOL, args)
}

/// Host offset of the L1 entry and of the L2 entry of guest byte `guest`.
fn entries(path: &str, guest: u64) -> (u64, u64) {
    let cs = 1u64 << peek32(path, CLUSTER_BITS);
    let l1 = peek64(path, L1_TABLE_OFFSET) + guest / (cs * (cs / 8)) * 8;
    let l2 = (peek64(path, l1) & OFFSET_MASK) + (guest / cs % (cs / 8)) * 8;
    (l1, l2)
}

/// Host offset of the data cluster of guest byte `guest`.
fn data_cluster(path: &str, guest: u64) -> u64 {
    peek64(path, entries(path, guest).1) & OFFSET_MASK
}

/// Makes an image with `qemu-img create -o options` and `qemu-io` writes.
fn qemu_image(dir: &Scratch, name: &str, options: &str, size: &str, writes: &[&str]) -> String {
    let path = dir.path(name);
    succeeded(
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", options, &path, size],
        ),
        "qemu-img create",
    );
    for w in writes {
        succeeded(run("qemu-io", &["-c", w, &path]), w);
    }
    path
}

/// Guest contents as QEMU reads them.
fn guest(dir: &Scratch, image: &str) -> Vec<u8> {
    let raw = dir.path("guest.raw");
    succeeded(
        run("qemu-img", &["convert", "-O", "raw", image, &raw]),
        "qemu-img convert",
    );
    std::fs::read(&raw).expect("read raw")
}

/// The counts both checks report, and the exit code.
fn findings(program: &str, image: &str) -> (Vec<(String, u64)>, Option<i32>) {
    let (json, code) = check_json(program, &[], image);
    let fields = [
        "corruptions",
        "leaks",
        "allocated-clusters",
        "fragmented-clusters",
        "compressed-clusters",
        "total-clusters",
    ];
    let counts = fields
        .iter()
        .map(|f| (f.to_string(), json[f].as_u64().unwrap_or(0)))
        .collect();
    (counts, code)
}

/// What repairing `image` must give.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// Our check reports exactly what qemu-img check reports.
    SameFindings,
    /// Both find corruption (the counts differ: QEMU's walk reads the
    /// overlapping tables differently).
    BothCorrupt,
}

/// Checks `image` with both tools, repairs it with ours and a copy with
/// qemu-img, and compares: guest data equal to what QEMU read before,
/// our result clean in qemu-img's eyes.
fn repair_case(dir: &Scratch, case: &str, image: &str, expect: Expect) {
    let before = guest(dir, image);
    let (ours, our_code) = findings(TOOL, image);
    let (qemu, qemu_code) = findings("qemu-img", image);
    match expect {
        Expect::SameFindings => {
            assert_eq!((&ours, our_code), (&qemu, qemu_code), "{case}: check");
        }
        Expect::BothCorrupt => {
            assert_eq!(
                (our_code, qemu_code),
                (Some(2), Some(2)),
                "{case}: {ours:?} {qemu:?}"
            );
        }
    }
    repair_keeps_guest(dir, case, image, &before);
}

/// Repairs `image` with ours and a copy with qemu-img: guest data equal to
/// `before` (what QEMU read before), our result clean in qemu-img's eyes.
fn repair_keeps_guest(dir: &Scratch, case: &str, image: &str, before: &[u8]) {
    let copy = dir.path(&format!("{case}-qemu.qcow2"));
    std::fs::copy(image, &copy).expect("copy");
    let qemu_repair = run("qemu-img", &["check", "-r", "all", &copy]);
    let ours = tool(&["check", "-r", "all", image]);
    assert_eq!(
        ours.status.code(),
        Some(0),
        "{case}: our repair: {}{}",
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&ours.stderr)
    );
    assert!(
        guest(dir, image) == before,
        "{case}: our repair changed guest data"
    );
    if qemu_repair.status.code() == Some(0) {
        assert!(
            guest(dir, &copy) == before,
            "{case}: QEMU's repair changed guest data"
        );
    }
    let (after, code) = check_json("qemu-img", &[], image);
    assert_eq!(
        code,
        Some(0),
        "{case}: qemu-img check after our repair: {after}"
    );
}

#[test]
fn refcount_block_on_guest_data_is_rebuilt_elsewhere() {
    let dir = Scratch::new("refblock-on-data");
    for bits in [1, 16, 64] {
        let case = format!("refblock-on-data-{bits}");
        let image = qemu_image(
            &dir,
            &format!("{case}.qcow2"),
            &format!("cluster_size=512,refcount_bits={bits}"),
            "1M",
            &["write -P 0x55 0 3k", "write -P 0x01 1047552 1k"],
        );
        let reftable = peek64(&image, REFCOUNT_TABLE_OFFSET);
        poke64(&image, reftable, data_cluster(&image, 1047552));
        repair_case(&dir, &case, &image, Expect::SameFindings);
        succeeded(
            run("qemu-io", &["-c", "read -P 0x01 1047552 1k", &image]),
            "read back",
        );
    }
}

/// A default image (64 KiB clusters) with two data clusters.
fn two_clusters(dir: &Scratch, name: &str) -> String {
    qemu_image(
        dir,
        name,
        "cluster_size=65536",
        "1M",
        &["write -P 0xab 0 64k", "write -P 0xcd 64k 64k"],
    )
}

#[test]
fn reserved_bits_are_reported_and_cleared_keeping_the_mapping() {
    let dir = Scratch::new("reserved");
    let image = two_clusters(&dir, "l2-bit-1.qcow2");
    let (_, l2) = entries(&image, 0);
    poke64(&image, l2, peek64(&image, l2) | 2);
    repair_case(&dir, "l2-bit-1", &image, Expect::SameFindings);

    let image = two_clusters(&dir, "l1-bit-1.qcow2");
    let (l1, _) = entries(&image, 0);
    poke64(&image, l1, peek64(&image, l1) | 2);
    repair_case(&dir, "l1-bit-1", &image, Expect::SameFindings);

    for value in [0x2, 0x3, 0xff, 0x100, 0x1fe, 1 << 56] {
        let case = format!("unallocated-{value:x}");
        let image = two_clusters(&dir, &format!("{case}.qcow2"));
        let (_, l2) = entries(&image, 2 << 16);
        poke64(&image, l2, value);
        repair_case(&dir, &case, &image, Expect::SameFindings);
    }
}

#[test]
fn dirty_lazy_image_keeps_entries_with_reserved_bits() {
    let dir = Scratch::new("dirty-reserved");
    let image = qemu_image(
        &dir,
        "dirty.qcow2",
        "lazy_refcounts=on",
        "16M",
        &["write -P 0x42 0 12k"],
    );
    let (_, l2) = entries(&image, 0);
    poke64(&image, l2, peek64(&image, l2) | 2);
    // The dirty bit, as a crash with lazy refcounts leaves it.
    poke64(
        &image,
        INCOMPATIBLE_FEATURES,
        peek64(&image, INCOMPATIBLE_FEATURES) | 1,
    );
    succeeded(
        tool(&["io", "-c", "write -P 0x77 6M 4k", &image]),
        "write to the dirty image",
    );
    succeeded(
        run(
            "qemu-io",
            &[
                "-c",
                "read -P 0x42 0 12k",
                "-c",
                "read -P 0x77 6M 4k",
                &image,
            ],
        ),
        "data after the rebuild at open",
    );
    assert_eq!(check_json("qemu-img", &[], &image).1, Some(0));
}

#[test]
fn refcount_tables_qemu_repairs_are_repaired() {
    let dir = Scratch::new("reftable");
    // The refcount table stretched over the refcount block and the L1 table.
    let image = two_clusters(&dir, "reftable-over-l1.qcow2");
    poke(&image, REFCOUNT_TABLE_CLUSTERS, &3u32.to_be_bytes());
    repair_case(&dir, "reftable-over-l1", &image, Expect::BothCorrupt);
    // The refcount table far past the end of the file, and absurdly far.
    for (case, offset) in [
        ("reftable-past-end", 1u64 << 24),
        ("reftable-2-55", 1 << 55),
    ] {
        let image = two_clusters(&dir, &format!("{case}.qcow2"));
        poke64(&image, REFCOUNT_TABLE_OFFSET, offset);
        repair_case(&dir, case, &image, Expect::BothCorrupt);
    }
}

/// The class of a refcount table whose header fields (size, place) put it
/// over other structures: L2 tables and guest data that QEMU reads through
/// (a repair that judged entries pointing into the table invalid cleared
/// them and lost the data). Whatever the table covers, the repair rebuilds
/// the refcounts elsewhere and guest data reads as QEMU read it before.
#[test]
fn refcount_table_over_tables_and_data_keeps_guest_data() {
    let dir = Scratch::new("reftable-over");
    let writes = [
        "write -P 0xaa 0 12k",
        "write -P 0xbb 1m 4k",
        "write -c 2m 4k",
    ];
    for clusters in [1u32, 2, 3, 4, 5, 6, 8, 12, 16, 64] {
        let case = format!("reftable-{clusters}-clusters");
        let image = qemu_image(
            &dir,
            &format!("{case}.qcow2"),
            "cluster_size=4096",
            "8M",
            &writes,
        );
        poke(&image, REFCOUNT_TABLE_CLUSTERS, &clusters.to_be_bytes());
        let before = guest(&dir, &image);
        repair_keeps_guest(&dir, &case, &image, &before);
    }
    // The table moved onto each cluster of the image in turn.
    let probe = qemu_image(&dir, "probe.qcow2", "cluster_size=4096", "8M", &writes);
    let clusters = std::fs::metadata(&probe).expect("stat").len() / 4096;
    for cluster in 1..clusters {
        for size in [1u32, 2] {
            let case = format!("reftable-at-{cluster}-x{size}");
            let image = qemu_image(
                &dir,
                &format!("{case}.qcow2"),
                "cluster_size=4096",
                "8M",
                &writes,
            );
            poke64(&image, REFCOUNT_TABLE_OFFSET, cluster * 4096);
            poke(&image, REFCOUNT_TABLE_CLUSTERS, &size.to_be_bytes());
            let before = guest(&dir, &image);
            repair_keeps_guest(&dir, &case, &image, &before);
        }
    }
}

/// stdout and stderr of `program check args image`, with qemu-img's name
/// for the program, and the exit code.
fn check_text(program: &str, args: &[&str], image: &str) -> (String, String, Option<i32>) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    all.push(image);
    let out = run(program, &all);
    let err = String::from_utf8_lossy(&out.stderr).replace("qcow2-tool:", "qemu-img:");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        err,
        out.status.code(),
    )
}

/// The lines `qemu-img check` prints for each problem (on stderr: leaked
/// clusters, refcounts below the references, COPIED flags), and for what
/// a repair fixes in place, are ours too, byte for byte; so are the
/// summary lines (none about allocation for an image with nothing
/// allocated).
#[test]
fn check_prints_qemu_img_lines_for_each_problem() {
    let dir = Scratch::new("check-lines");
    type Damage = (&'static str, fn(&str), &'static [&'static str]);
    // Refcount entries (16 bits) of the first refcount block.
    fn set_refcount(image: &str, cluster: u64, value: u16) {
        let block = peek64(image, peek64(image, REFCOUNT_TABLE_OFFSET)) & OFFSET_MASK;
        poke(image, block + 2 * cluster, &value.to_be_bytes());
    }
    let cases: [Damage; 6] = [
        ("clean", |_| {}, &["-r", "all"]),
        (
            "leak",
            |p| set_refcount(p, data_cluster(p, 0) / 4096, 3),
            &["-r", "leaks"],
        ),
        (
            "leak-all",
            |p| set_refcount(p, data_cluster(p, 4096) / 4096, 2),
            &["-r", "all"],
        ),
        (
            "refcount-low",
            |p| set_refcount(p, data_cluster(p, 0) / 4096, 0),
            &[],
        ),
        (
            "copied-clear",
            |p| {
                let (_, l2) = entries(p, 4096);
                poke64(p, l2, peek64(p, l2) & !(1 << 63));
            },
            &["-r", "all"],
        ),
        (
            "l1-copied-clear",
            |p| {
                let (l1, _) = entries(p, 0);
                poke64(p, l1, peek64(p, l1) & !(1 << 63));
            },
            &["-r", "all"],
        ),
    ];
    for (case, damage, repair) in cases {
        let image = qemu_image(
            &dir,
            &format!("{case}.qcow2"),
            "cluster_size=4096",
            "1M",
            &["write -P 1 0 8k", "write -P 2 64k 4k"],
        );
        damage(&image);
        let copy = dir.path(&format!("{case}-qemu.qcow2"));
        std::fs::copy(&image, &copy).expect("copy");
        assert_eq!(
            check_text(TOOL, &[], &image),
            check_text("qemu-img", &[], &copy),
            "{case}: check"
        );
        if !repair.is_empty() {
            assert_eq!(
                check_text(TOOL, repair, &image),
                check_text("qemu-img", repair, &copy),
                "{case}: check {repair:?}"
            );
        }
    }
    let empty = qemu_image(&dir, "empty.qcow2", "cluster_size=65536", "1M", &[]);
    assert_eq!(
        check_text(TOOL, &[], &empty),
        check_text("qemu-img", &[], &empty)
    );

    // An external data file: its clusters have refcount 1 by definition,
    // so an entry without COPIED is reported (and repaired) as such.
    let data = dir.path("data-file.raw");
    let image = qemu_image(
        &dir,
        "data-file-copied.qcow2",
        &format!("cluster_size=4096,data_file={data}"),
        "1M",
        &["write -P 1 0 8k"],
    );
    let (_, l2) = entries(&image, 4096);
    poke64(&image, l2, peek64(&image, l2) & !(1 << 63));
    let copy = dir.path("data-file-copied-qemu.qcow2");
    std::fs::copy(&image, &copy).expect("copy");
    assert_eq!(
        check_text(TOOL, &[], &image),
        check_text("qemu-img", &[], &copy)
    );
    assert_eq!(
        check_text(TOOL, &["-r", "all"], &image),
        check_text("qemu-img", &["-r", "all"], &copy),
        "data file: check -r all"
    );
}

#[test]
fn fragmentation_counts_as_qemu_img() {
    let dir = Scratch::new("fragmented");
    let image = qemu_image(
        &dir,
        "across-tables.qcow2",
        "cluster_size=4096",
        "8M",
        &[
            "write 0 4k",
            "write 2M 4k",
            "write 2044k 4k",
            "write -z 8k 4k",
        ],
    );
    assert_eq!(findings(TOOL, &image), findings("qemu-img", &image));
    let image = qemu_image(
        &dir,
        "compressed.qcow2",
        "cluster_size=4096",
        "8M",
        &[
            "write 0 8k",
            "write -c 64k 4k",
            "write -c 128k 4k",
            "write 12k 4k",
        ],
    );
    assert_eq!(findings(TOOL, &image), findings("qemu-img", &image));
}

#[test]
fn v2_zero_flag_is_not_a_check_finding() {
    let dir = Scratch::new("v2-zero");
    let image = qemu_image(&dir, "v2.qcow2", "compat=0.10", "1M", &["write 0 64k"]);
    let (_, l2) = entries(&image, 0);
    poke64(&image, l2, peek64(&image, l2) | 1);
    poke64(&image, l2 + 8, 1);
    assert_eq!(findings(TOOL, &image), findings("qemu-img", &image));
}

#[test]
fn headers_qemu_refuses_are_refused() {
    let dir = Scratch::new("refused");
    type Damage = (&'static str, fn(&str));
    let cases: [Damage; 5] = [
        ("bitmaps-extension-empty", |p| {
            poke(p, EXTENSIONS, &[0x23, 0x85, 0x28, 0x75, 0, 0, 0, 0])
        }),
        ("backing-format-16", |p| {
            poke(p, EXTENSIONS, &[0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 16]);
            poke(p, EXTENSIONS + 8, b"qcow2qcow2qcow2q\0\0\0\0\0\0\0\0");
        }),
        ("snapshot-offset-unaligned", |p| {
            poke64(p, SNAPSHOTS_OFFSET, 3)
        }),
        ("data-file-raw-alone", |p| poke64(p, AUTOCLEAR_FEATURES, 2)),
        // The external data file bit without the extension naming the
        // file: QEMU opens it for nothing ("'data-file' is required");
        // a repair would take the image's own data for the data file's.
        ("data-file-bit-alone", |p| {
            poke64(p, INCOMPATIBLE_FEATURES, 4)
        }),
    ];
    for (case, damage) in cases {
        let image = qemu_image(
            &dir,
            &format!("{case}.qcow2"),
            "cluster_size=65536",
            "1M",
            &[],
        );
        damage(&image);
        let qemu = run("qemu-img", &["check", &image]);
        let ours = tool(&["check", &image]);
        assert_eq!(qemu.status.code(), Some(1), "{case}: qemu-img check");
        assert_eq!(ours.status.code(), Some(1), "{case}: our check");
        let qemu = run("qemu-io", &["-c", "write 0 512", &image]);
        let ours = tool(&["io", "-c", "write 0 512", &image]);
        assert!(!qemu.status.success(), "{case}: qemu-io write");
        assert!(!ours.status.success(), "{case}: our write");
    }
}

#[test]
fn unaligned_virtual_size_is_rounded_down_everywhere() {
    let dir = Scratch::new("unaligned-size");
    let image = qemu_image(&dir, "size.qcow2", "cluster_size=65536", "1M", &[]);
    poke64(&image, SIZE, 1000);
    let size = |out: Output| -> u64 {
        let v: Value = serde_json::from_slice(&succeeded(out, "info").stdout).expect("json");
        v["virtual-size"].as_u64().expect("virtual-size")
    };
    let theirs = size(run("qemu-img", &["info", "--output=json", &image]));
    let ours = size(tool(&["info", "--output=json", &image]));
    assert_eq!((ours, theirs), (512, 512));
    let raw = dir.path("ours.raw");
    succeeded(tool(&["convert", "-O", "raw", &image, &raw]), "convert");
    assert_eq!(std::fs::metadata(&raw).expect("raw").len(), 512);
    assert_eq!(findings(TOOL, &image), findings("qemu-img", &image));
    for cmd in ["read 0 1000", "write 512 512"] {
        // Past the rounded-down size both refuse, as qemu-io does.
        let theirs = run("qemu-io", &["-c", cmd, &image]);
        let ours = tool(&["io", "-c", cmd, &image]);
        let text = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(text(&theirs).contains("failed"), "qemu-io {cmd}");
        assert!(
            text(&ours).contains("failed"),
            "ours {cmd}: {}",
            text(&ours)
        );
        assert_eq!(ours.status.code(), theirs.status.code(), "{cmd}");
    }
    succeeded(tool(&["io", "-c", "write -P 0x11 0 512", &image]), "write");
    succeeded(
        run("qemu-io", &["-c", "read -P 0x11 0 512", &image]),
        "read back",
    );
    assert_eq!(peek64(&image, SIZE), 1000, "the header keeps its size");
}
