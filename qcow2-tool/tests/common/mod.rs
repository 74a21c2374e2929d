//! Helpers of the tool's block-device tests: the shared `test-support`
//! crate, and running this package's `qcow2-tool` binary.
#![allow(dead_code, unused_imports)]

pub use test_support::output::{as_ours, io_without_timing};
pub use test_support::{ok, qemu_img, qemu_io, run, stderr, stdout, Scratch};

/// Runs the tool.
pub fn tool(args: &[&str]) -> std::process::Output {
    run(env!("CARGO_BIN_EXE_qcow2-tool"), args)
}

/// Runs the same qemu-io commands through `qemu-io` and `qcow2-tool io` on
/// two copies of `image`, checks that stdout (without timings), stderr and
/// exit status agree, and that the images end up with equal contents.
pub fn compare_io(s: &Scratch, image: &str, flags: &[&str], commands: &[&str], tag: &str) -> i32 {
    let a = s.path(&format!("{tag}-qemu.qcow2"));
    let b = s.path(&format!("{tag}-ours.qcow2"));
    std::fs::copy(image, &a).expect("copy image");
    std::fs::copy(image, &b).expect("copy image");
    let script: Vec<&str> = commands.iter().flat_map(|c| ["-c", *c]).collect();
    let mut qargs: Vec<&str> = flags.to_vec();
    qargs.extend(&script);
    qargs.push(&a);
    let theirs = run("qemu-io", &qargs);
    let mut targs: Vec<&str> = vec!["io"];
    targs.extend(flags);
    targs.extend(&script);
    targs.push(&b);
    let ours = tool(&targs);
    assert_eq!(
        io_without_timing(&stdout(&ours)),
        io_without_timing(&stdout(&theirs)),
        "stdout of {tag}"
    );
    assert_eq!(stderr(&ours), as_ours(&stderr(&theirs)), "stderr of {tag}");
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "exit code of {tag}"
    );
    // Every report line pair is there, timing line included.
    assert_eq!(
        stdout(&ours).matches(" ops; ").count(),
        stdout(&theirs).matches(" ops; ").count()
    );
    let cmp = ok(qemu_img(&["compare", &a, &b]), "qemu-img compare");
    assert!(cmp.contains("Images are identical"), "{cmp}");
    ok(qemu_img(&["check", &b]), "qemu-img check");
    ours.status.code().unwrap_or(-1)
}
