//! Freed clusters give their space back to the file system: after the same
//! discards and unmapping zero writes, our image file occupies no more disk
//! than QEMU's (holes punched where QEMU punches them).

use std::os::unix::fs::MetadataExt;
use std::process::Command;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn discard_punches_holes_as_qemu_does() {
    let dir = std::env::temp_dir().join(format!("qcow2-holes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (theirs, ours) = (dir.join("qemu.qcow2"), dir.join("ours.qcow2"));
    let (theirs, ours) = (theirs.to_str().unwrap(), ours.to_str().unwrap());
    for image in [theirs, ours] {
        run("qemu-img", &["create", "-q", "-f", "qcow2", image, "64M"]);
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
    run("qemu-io", &[&script[..], &[theirs]].concat());
    run(
        env!("CARGO_BIN_EXE_qcow2-tool"),
        &[&["io"], &script[..], &[ours]].concat(),
    );
    run("qemu-img", &["compare", theirs, ours]);
    let used = |path: &str| std::fs::metadata(path).unwrap().blocks() * 512;
    let (q, o) = (used(theirs), used(ours));
    // 20 MiB of the 32 MiB written were released; 2 MiB stay allocated as zeros.
    assert!(o < 16 << 20, "our image still occupies {o} bytes");
    assert!(o <= q + (256 << 10), "ours {o} bytes on disk, QEMU's {q}");
    std::fs::remove_dir_all(&dir).ok();
}
