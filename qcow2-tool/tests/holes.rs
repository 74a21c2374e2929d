//! Freed clusters give their space back to the file system: after the same
//! discards and unmapping zero writes, our image file occupies no more disk
//! than QEMU's (holes punched where QEMU punches them).

use std::os::unix::fs::MetadataExt;
use test_support::{run_ok, Scratch};

#[test]
fn discard_punches_holes_as_qemu_does() {
    let dir = Scratch::new("holes");
    let (theirs, ours) = (dir.path("qemu.qcow2"), dir.path("ours.qcow2"));
    let (theirs, ours) = (theirs.as_str(), ours.as_str());
    for image in [theirs, ours] {
        run_ok("qemu-img", &["create", "-q", "-f", "qcow2", image, "64M"]);
    }
    let script = [
        "-c",
        "write -P 1 0 32M",
        "-c",
        "flush",
        "-c",
        "discard 1M 16M",
        "-c",
        "write -z -u 20M 4M",
        "-c",
        "write -z 28M 2M",
    ];
    run_ok("qemu-io", &[&script[..], &[theirs]].concat());
    run_ok(
        env!("CARGO_BIN_EXE_qcow2-tool"),
        &[&["io"], &script[..], &[ours]].concat(),
    );
    run_ok("qemu-img", &["compare", theirs, ours]);
    let used = |path: &str| std::fs::metadata(path).unwrap().blocks() * 512;
    let (q, o) = (used(theirs), used(ours));
    // 20 MiB of the 32 MiB written were released; 2 MiB stay allocated as zeros.
    assert!(o < 16 << 20, "our image still occupies {o} bytes");
    assert!(o <= q + (256 << 10), "ours {o} bytes on disk, QEMU's {q}");
}
