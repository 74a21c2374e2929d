//! `qcow2-tool bench` against `qemu-img bench`: the same lines (except the
//! time), the same bytes written, one-line errors.

use std::process::Output;
use test_support::output::bench_without_time;
use test_support::{ok, qemu_img, run, stdout, Scratch};

/// Runs the tool.
fn tool(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_qcow2-tool"), args)
}

/// The first stderr line without the program prefix.
fn first_error(out: &Output, prefix: &str) -> String {
    let text = String::from_utf8_lossy(&out.stderr);
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix(prefix).unwrap_or(line).to_string()
}

/// Two copies of a fresh image: `<tag>-qemu` and `<tag>-ours`.
fn image_pair(s: &Scratch, tag: &str, format: &str, size: &str) -> (String, String) {
    let pair = (
        s.path(&format!("{tag}-qemu")),
        s.path(&format!("{tag}-ours")),
    );
    for path in [&pair.0, &pair.1] {
        ok(
            qemu_img(&["create", "-q", "-f", format, path, size]),
            "qemu-img create",
        );
    }
    pair
}

#[test]
fn output_matches_qemu_img_bench() {
    let s = Scratch::new("lines");
    let cases: &[&[&str]] = &[
        &["-c", "10"],
        &["-c", "10", "-d", "1", "-w", "--flush-interval=4"],
        &["-c", "7", "-s", "1.5k", "-S", "0", "-o", "1k", "-d", "0x2"],
        &["-c", "5", "-w", "--pattern", "0x7", "-t", "writethrough"],
        &["-c", "5", "-t", "none", "-s", "8k", "-S", "12k"],
        &["-c", "5", "-q", "-U", "--no-drain"],
        // The second request wraps to 1016 and crosses the end: EIO.
        &["-c", "3", "-d", "1", "-S", "1046528"],
        // Wraps to 2048 exactly.
        &["-c", "3", "-d", "1", "-S", "1050624"],
        &["-c", "3", "-o", "1045505"],
    ];
    for (n, args) in cases.iter().enumerate() {
        for format in ["qcow2", "raw"] {
            let (theirs, ours) = image_pair(&s, &format!("{n}-{format}"), format, "1M");
            let mut qemu_args = vec!["bench", "-f", format];
            qemu_args.extend_from_slice(args);
            let mut our_args = qemu_args.clone();
            qemu_args.push(&theirs);
            our_args.push(&ours);
            let expected = qemu_img(&qemu_args);
            let got = tool(&our_args);
            let what = format!("bench {args:?} on {format}");
            assert_eq!(got.status.code(), expected.status.code(), "{what}");
            assert_eq!(
                bench_without_time(&stdout(&got)),
                bench_without_time(&stdout(&expected)),
                "{what}"
            );
            assert_eq!(
                first_error(&got, "qcow2-tool: "),
                first_error(&expected, "qemu-img: "),
                "{what}"
            );
        }
    }
}

#[test]
fn writes_leave_the_bytes_qemu_img_bench_leaves() {
    let s = Scratch::new("bytes");
    let cases: &[&[&str]] = &[
        &["-c", "300", "-S", "200k", "-o", "3k", "-s", "12k"],
        &["-c", "64", "-s", "64k", "--flush-interval=16", "-d", "16"],
        &["-c", "100", "-s", "4k", "-S", "4099k", "-t", "none"],
        &["-c", "50", "-s", "1000", "-S", "77777", "-o", "5"],
    ];
    for (n, args) in cases.iter().enumerate() {
        for format in ["qcow2", "raw"] {
            let (theirs, ours) = image_pair(&s, &format!("{n}-{format}"), format, "16M");
            // Some data underneath, so partial writes must merge with it.
            for path in [&theirs, &ours] {
                ok(
                    run(
                        "qemu-io",
                        &["-f", format, "-c", "write -P 0x55 1M 3M", path],
                    ),
                    "qemu-io write",
                );
            }
            let mut bench = vec!["bench", "-f", format, "-w", "--pattern=7"];
            bench.extend_from_slice(args);
            let mut qemu_args = bench.clone();
            qemu_args.push(&theirs);
            ok(qemu_img(&qemu_args), "qemu-img bench");
            bench.push(&ours);
            ok(tool(&bench), "qcow2-tool bench");
            let what = format!("{args:?} on {format}");
            ok(
                qemu_img(&["compare", "-f", format, "-F", format, &theirs, &ours]),
                &format!("qemu-img compare after {what}"),
            );
            if format == "qcow2" {
                ok(qemu_img(&["check", &ours]), &format!("check after {what}"));
            }
        }
    }
}

#[test]
fn bad_arguments_fail_with_one_line() {
    let s = Scratch::new("bad");
    let (image, _) = image_pair(&s, "img", "qcow2", "1M");
    let cases: &[&[&str]] = &[
        &["-c", "0"],
        &["-c", "1k"],
        &["-c", "-1"],
        &["-d", "0"],
        &["-s", "1x"],
        &["-s", "3G"],
        &["-S", "-1"],
        &["-o", "8E"],
        &["--pattern=256"],
        &["--flush-interval=4"],
        &["-w", "--flush-interval=4"],
        &["-t", "foo"],
        &["-w", "-U"],
        &["-i", "foo"],
        &["-Z"],
    ];
    for args in cases {
        let mut full = vec!["bench"];
        full.extend_from_slice(args);
        full.push(&image);
        let what = format!("bench {args:?}");
        let expected = qemu_img(&full);
        assert!(!expected.status.success(), "qemu-img accepts {what}");
        let got = tool(&full);
        assert_eq!(got.status.code(), Some(1), "{what}");
        assert!(got.stdout.is_empty(), "{what}: output on stdout");
        let err = String::from_utf8_lossy(&got.stderr);
        assert_eq!(err.lines().count(), 1, "{what}: {err}");
        assert!(err.starts_with("qcow2-tool: "), "{what}: {err}");
    }
    for missing in [vec!["bench"], vec!["bench", &image, &image]] {
        let got = tool(&missing);
        assert_eq!(got.status.code(), Some(1));
        assert_eq!(
            String::from_utf8_lossy(&got.stderr),
            "qcow2-tool: Expecting one image file name\n"
        );
    }
}
