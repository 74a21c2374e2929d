//! Guest writes and discards over hostile compressed L2 entries whose
//! descriptor points at something that is not a stream of its own: the
//! header, the L1 table, the refcount table, a refcount block, an L2
//! table, another guest cluster's data, past the end of the file. Releasing
//! such an extent on the descriptor's word would free (and punch, and
//! reuse) what its real owner still holds; QEMU drops the refcount and
//! leaves the image with errors. Ours leaves the extent allocated: every
//! other guest cluster reads as QEMU read it before, and `qemu-img check`
//! finds no corruption.

use test_support::raw::header::{L1_TABLE_OFFSET, REFCOUNT_TABLE_OFFSET};
use test_support::raw::{peek64, poke64, OFFSET_MASK};
use test_support::{run, succeeded, Scratch};

const TOOL: &str = env!("CARGO_BIN_EXE_qcow2-tool");
const CLUSTER: u64 = 4096;

/// Guest contents as QEMU reads them.
fn guest(dir: &Scratch, image: &str) -> Vec<u8> {
    let raw = dir.path("guest.raw");
    succeeded(
        run("qemu-img", &["convert", "-O", "raw", image, &raw]),
        "qemu-img convert",
    );
    std::fs::read(&raw).expect("read raw")
}

/// Host offset of the L2 entry of guest cluster `cluster` (first L2 table).
fn l2_entry(image: &str, cluster: u64) -> u64 {
    let l1 = peek64(image, L1_TABLE_OFFSET);
    (peek64(image, l1) & OFFSET_MASK) + cluster * 8
}

/// A compressed L2 entry for 4 KiB clusters: `sectors` sectors at `host`.
fn descriptor(host: u64, sectors: u64) -> u64 {
    let offset_bits = 62 - (12 - 8);
    (1 << 62) | ((sectors - 1) << offset_bits) | host
}

/// 4 KiB clusters, guest clusters 0..=3 written, 8 holding a real
/// compressed cluster (so the image already uses compression).
fn image(dir: &Scratch, name: &str) -> String {
    let path = dir.path(name);
    succeeded(
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                &path,
                "1M",
            ],
        ),
        "qemu-img create",
    );
    for w in ["write -P 0x11 0 16k", "write -c -P 0x22 32k 4k"] {
        succeeded(run("qemu-io", &["-c", w, &path]), w);
    }
    path
}

#[test]
fn releasing_a_descriptor_that_points_elsewhere_frees_nothing() {
    let dir = Scratch::new("hostile-writes");
    let probe = image(&dir, "probe.qcow2");
    let l1 = peek64(&probe, L1_TABLE_OFFSET);
    let reftable = peek64(&probe, REFCOUNT_TABLE_OFFSET);
    // What QEMU reads of every other cluster (the hostile one it cannot
    // read: its stream does not decode).
    let before = guest(&dir, &probe);
    let targets = [
        ("header", 0),
        ("header-inside", 0x200),
        ("l1", l1),
        ("reftable", reftable),
        ("refblock", peek64(&probe, reftable) & OFFSET_MASK),
        ("l2", peek64(&probe, l1) & OFFSET_MASK),
        ("data", peek64(&probe, l2_entry(&probe, 1)) & OFFSET_MASK),
        (
            "data-mid",
            (peek64(&probe, l2_entry(&probe, 2)) & OFFSET_MASK) + 0x600,
        ),
        ("past-end", 1 << 30),
    ];
    // Guest cluster 5 (unwritten) gets the hostile entry; then it is fully
    // overwritten, discarded, or zeroed with unmap.
    let ops = [
        ("write", "write -P 0x33 20k 4k"),
        ("discard", "discard 20k 4k"),
        ("zero-unmap", "write -z -u 20k 4k"),
    ];
    for (target, host) in targets {
        for sectors in [1, 8] {
            for (op, command) in ops {
                let case = format!("{target}-{sectors}-{op}");
                let path = image(&dir, &format!("{case}.qcow2"));
                poke64(&path, l2_entry(&path, 5), descriptor(host, sectors));
                let out = run(TOOL, &["io", "-c", command, &path]);
                assert!(
                    out.status.success(),
                    "{case}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                let after = guest(&dir, &path);
                let (c5, c6) = (5 * CLUSTER as usize, 6 * CLUSTER as usize);
                assert!(
                    after[..c5] == before[..c5],
                    "{case}: clusters before 5 changed"
                );
                assert!(
                    after[c6..] == before[c6..],
                    "{case}: clusters after 5 changed"
                );
                let check = run("qemu-img", &["check", &path]);
                assert_eq!(
                    check.status.code(),
                    Some(0),
                    "{case}: qemu-img check: {}",
                    String::from_utf8_lossy(&check.stdout)
                );
            }
        }
    }
}
