//! Corners where our `io` must do what `qemu-io` does on the same file:
//! compressed writes over every state a cluster can be in, and zero writes
//! over part of an overlay cluster whatever the backing holds there. Each
//! case runs both tools on copies of one image and compares their output,
//! exit status, `qemu-img map` and guest contents.

use test_support::{run, succeeded, Scratch};

const TOOL: &str = env!("CARGO_BIN_EXE_qcow2-tool");

/// Runs `commands` with `program` (qemu-io or ours) on `image`: status and
/// output lines without the timing line.
fn io(program: &str, image: &str, commands: &[&str]) -> (Option<i32>, Vec<String>) {
    let mut args: Vec<&str> = Vec::new();
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(image);
    let out = if program == "qemu-io" {
        run("qemu-io", &args)
    } else {
        let mut ours = vec!["io"];
        ours.extend(args);
        run(TOOL, &ours)
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = test_support::output::io_without_timing(&text)
        .into_iter()
        .map(|l| l.replace("qcow2-tool: ", "qemu-io: "))
        .collect();
    (out.status.code(), lines)
}

/// `qemu-img map --output=json` and the guest contents of `image`.
fn state(dir: &Scratch, image: &str) -> (String, Vec<u8>) {
    let map = test_support::run_ok("qemu-img", &["map", "--output=json", image]);
    let raw = dir.path("state.raw");
    succeeded(
        run("qemu-img", &["convert", "-O", "raw", image, &raw]),
        "convert",
    );
    (map, std::fs::read(&raw).expect("read raw"))
}

/// Runs `commands` through both tools on copies of `image` and requires
/// the same output, status, map and contents.
fn same_as_qemu_io(dir: &Scratch, case: &str, image: &str, commands: &[&str]) {
    let theirs = dir.path(&format!("{case}-qemu.qcow2"));
    let ours = dir.path(&format!("{case}-ours.qcow2"));
    std::fs::copy(image, &theirs).expect("copy");
    std::fs::copy(image, &ours).expect("copy");
    let qemu = io("qemu-io", &theirs, commands);
    let tool = io(TOOL, &ours, commands);
    assert_eq!(tool, qemu, "{case}: output");
    let (our_map, our_data) = state(dir, &ours);
    let (their_map, their_data) = state(dir, &theirs);
    assert_eq!(our_map, their_map, "{case}: qemu-img map");
    assert!(our_data == their_data, "{case}: guest contents differ");
}

fn qemu_img(args: &[&str]) {
    succeeded(run("qemu-img", args), "qemu-img");
}

#[test]
fn compressed_writes_overwrite_no_host_cluster() {
    let dir = Scratch::new("parity-compressed");
    // The state of guest cluster 0 (4 KiB clusters) before `write -c`.
    let states: [(&str, &[&str]); 7] = [
        ("unallocated", &[]),
        ("data", &["write -P 1 0 4k"]),
        ("compressed", &["write -c -P 1 0 4k"]),
        ("zero", &["write -z 0 4k"]),
        ("zero-keeping-host", &["write -P 1 0 4k", "write -z 0 4k"]),
        ("zero-unmapped", &["write -P 1 0 4k", "write -z -u 0 4k"]),
        ("discarded", &["write -P 1 0 8k", "discard 0 4k"]),
    ];
    for (case, setup) in states {
        let image = dir.path(&format!("{case}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            &image,
            "1M",
        ]);
        for c in setup {
            succeeded(run("qemu-io", &["-c", c, &image]), c);
        }
        same_as_qemu_io(&dir, case, &image, &["write -c -P 0x2a 0 4k"]);
    }
}

#[test]
fn zero_writes_over_part_of_an_overlay_cluster() {
    let dir = Scratch::new("parity-zero");
    // Backings that end inside, at, or past the first cluster (4 KiB and
    // 64 KiB clusters), with data at their start.
    for (cluster, backing_len) in [
        (4096u64, 1024u64),
        (4096, 2048),
        (4096, 3072),
        (4096, 8192),
        (65536, 2048),
        (65536, 61440),
    ] {
        let base = dir.path(&format!("base-{cluster}-{backing_len}.raw"));
        qemu_img(&["create", "-q", "-f", "raw", &base, &backing_len.to_string()]);
        succeeded(
            run(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P 7 0 {backing_len}"),
                    &base,
                ],
            ),
            "fill the backing",
        );
        for (range, prior) in [
            ("0 1k", ""),
            ("0 2k", ""),
            ("1k 1k", ""),
            ("2k 2k", ""),
            ("0 2k", "write -z 2k 2k"),
            ("0 2k", "write -P 3 2k 512"),
        ] {
            let case = format!(
                "{cluster}-{backing_len}-{}-{}",
                range.replace(' ', "+"),
                prior.len()
            );
            let image = dir.path(&format!("{case}.qcow2"));
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster}"),
                "-b",
                &base,
                "-F",
                "raw",
                &image,
                "1M",
            ]);
            if !prior.is_empty() {
                succeeded(run("qemu-io", &["-c", prior, &image]), prior);
            }
            same_as_qemu_io(&dir, &case, &image, &[&format!("write -z {range}")]);
        }
    }
}
