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

/// Runs `program` with `args` in the directory `dir` (`json:` and `file:`
/// backing names are relative to the working directory).
fn run_in(dir: &std::path::Path, program: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Our tool with `args`, in `dir`.
fn tool_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    run_in(dir, env!("CARGO_BIN_EXE_qcow2-tool"), args)
}

/// Asserts that we print and exit as `qemu-img` (for `verb` = `img`) or
/// `qemu-io` (`io`) does with `args`, run in `dir`: stdout without
/// timings, stderr with the program's name replaced, the exit status.
fn same_as_qemu(dir: &std::path::Path, verb: &str, args: &[&str]) {
    let (program, ours_args): (&str, Vec<&str>) = match verb {
        "img" => ("qemu-img", args.to_vec()),
        _ => ("qemu-io", [&["io"][..], args].concat()),
    };
    let theirs = run_in(dir, program, args);
    let ours = tool_in(dir, &ours_args);
    let what = format!("{program} {}", args.join(" "));
    assert_eq!(
        test_support::output::io_without_timing(&test_support::stdout(&ours)),
        test_support::output::io_without_timing(&test_support::stdout(&theirs)),
        "stdout of {what}"
    );
    assert_eq!(
        stderr(&ours),
        test_support::output::as_ours(&stderr(&theirs)),
        "stderr of {what}"
    );
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "exit code of {what}"
    );
}

/// A qcow2 overlay at `path` whose header names `name` as its backing
/// file, with no backing format (qemu-img create insists on one).
fn overlay_naming(path: &str, name: &str) {
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", path, "1M"]),
        "qemu-img create",
    );
    // In the header cluster, after the header and its extensions.
    use test_support::raw::{header, poke, poke64};
    poke64(path, header::BACKING_FILE_OFFSET, 4096);
    poke(
        path,
        header::BACKING_FILE_SIZE,
        &(name.len() as u32).to_be_bytes(),
    );
    poke(path, 4096, name.as_bytes());
}

#[test]
fn missing_backings_fail_in_every_verb_as_in_qemu() {
    // check used to report "No errors" (and -r to exit 0) on an overlay
    // whose backing is missing, and qemu-io's message had an extra
    // `Could not open '<image>':` in it.
    let s = Scratch::new("backing-missing");
    let dir = s.dir();
    let base = s.path("base.qcow2");
    create(&base, "cluster_size=65536", "1M");
    create(
        &s.path("mid.qcow2"),
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "1M",
    );
    create(
        &s.path("top.qcow2"),
        "backing_file=mid.qcow2,backing_fmt=qcow2",
        "1M",
    );
    std::fs::remove_file(&base).unwrap();
    // The data file of an image, missing too (QEMU makes a relative one
    // in its working directory).
    ok(
        run_in(
            dir,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=data.raw",
                "data.qcow2",
                "1M",
            ],
        ),
        "qemu-img create",
    );
    std::fs::remove_file(s.join("data.raw")).unwrap();
    for image in ["mid.qcow2", "top.qcow2", "data.qcow2"] {
        for args in [
            &["check", image][..],
            &["check", "-r", "all", image],
            &["check", "-r", "leaks", image],
            &["check", "--output", "json", image],
            &["convert", "-O", "raw", image, "out.raw"],
        ] {
            same_as_qemu(dir, "img", args);
        }
        for args in [
            &["-c", "read 0 512", image][..],
            &["-r", "-c", "read 0 512", image],
        ] {
            same_as_qemu(dir, "io", args);
        }
    }
}

#[test]
fn looping_chains_do_not_open() {
    // qemu-img recurses until it crashes on a read-only open of a loop
    // (and refuses a read-write one with a lock conflict with itself):
    // no oracle, but every verb must fail, check included.
    let s = Scratch::new("backing-loop");
    let dir = s.dir();
    create(&s.path("a.qcow2"), "cluster_size=65536", "1M");
    create(
        &s.path("b.qcow2"),
        "backing_file=a.qcow2,backing_fmt=qcow2",
        "1M",
    );
    ok(
        qemu_img(&[
            "rebase",
            "-u",
            "-F",
            "qcow2",
            "-b",
            "b.qcow2",
            &s.path("a.qcow2"),
        ]),
        "rebase",
    );
    create(&s.path("self.qcow2"), "cluster_size=65536", "1M");
    ok(
        qemu_img(&[
            "rebase",
            "-u",
            "-F",
            "qcow2",
            "-b",
            "self.qcow2",
            &s.path("self.qcow2"),
        ]),
        "rebase",
    );
    for (image, closes) in [
        ("a.qcow2", "a.qcow2"),
        ("b.qcow2", "b.qcow2"),
        ("self.qcow2", "self.qcow2"),
    ] {
        let want = format!(
            "Could not open backing file: Backing file '{closes}' creates an infinite loop."
        );
        for args in [
            &["check", image][..],
            &["check", "-r", "all", image],
            &["convert", "-O", "raw", image, "out.raw"],
            &["io", "-c", "read 0 512", image],
            &["io", "-r", "-c", "read 0 512", image],
        ] {
            let out = tool_in(dir, args);
            assert_eq!(out.status.code(), Some(1), "{args:?}");
            assert!(stderr(&out).contains(&want), "{args:?}: {}", stderr(&out));
            assert!(test_support::stdout(&out).is_empty(), "{args:?}");
        }
    }
}

#[test]
fn protocol_backing_names_open_as_in_qemu() {
    // file: and json: names, and backing format `file`, used to be
    // refused (opened as file names); QEMU opens them, relative to its
    // working directory. The overlay lives in sub/, the backings in the
    // working directory (and a decoy sub/base.raw for plain names).
    let s = Scratch::new("backing-protocols");
    let dir = s.dir();
    std::fs::create_dir(s.join("sub")).unwrap();
    std::fs::write(s.join("base.raw"), test_support::noise(1 << 20, 21)).unwrap();
    std::fs::write(s.join("sub/base.raw"), test_support::noise(1 << 20, 22)).unwrap();
    create(
        &s.path("base.qcow2"),
        "backing_file=base.raw,backing_fmt=raw",
        "1M",
    );
    qio(&s.path("base.qcow2"), "qcow2", &["write -P 0x5a 64k 64k"]);
    std::fs::create_dir(s.join("adir")).unwrap();
    let file = |name: &str| format!(r#"{{"driver":"file","filename":"{name}"}}"#);
    let names = [
        "base.raw".to_string(),
        "file:base.raw".into(),
        "file:base.qcow2".into(),
        "file:sub/../base.qcow2".into(),
        "file:missing".into(),
        "file:adir".into(),
        "file:".into(),
        "file:base.raw:x".into(),
        "foo:bar".into(),
        format!(r#"json:{{"driver":"raw","file":{}}}"#, file("base.raw")),
        format!(r#"json:{{"driver":"qcow2","file":{}}}"#, file("base.qcow2")),
        format!(r#"json:{{"driver":"raw","file":{}}}"#, file("base.qcow2")),
        format!(r#"json:{{"file":{}}}"#, file("base.qcow2")),
        format!(r#"json:{{"file":{}}}"#, file("base.raw")),
        format!("json:{}", file("base.qcow2")),
        r#"json:{"driver":"qcow2","file":{"filename":"base.qcow2"}}"#.into(),
        r#"json:{"driver":"qcow2","file.driver":"file","file.filename":"base.qcow2"}"#.into(),
        "json:{'driver':'qcow2','file':{'driver':'file','filename':'base.qcow2'}}".into(),
        format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"raw","file":{}}}}}"#,
            file("base.qcow2")
        ),
        format!(
            r#"json:{{"driver":"raw","file":{{"driver":"qcow2","file":{}}}}}"#,
            file("base.qcow2")
        ),
        format!(
            r#"json:{{"driver":"qcow2","file":{},"backing":null}}"#,
            file("base.qcow2")
        ),
        format!(
            r#"json:{{"driver":"qcow2","node-name":"b","read-only":true,"file":{}}}"#,
            file("base.qcow2")
        ),
        format!(r#"json:{{"driver":"qcow2","file":{}}}"#, file("missing")),
        format!(r#"json:{{"driver":"qcow2","file":{}}}"#, file("adir")),
        format!(r#"json:{{"driver":"qcow2","file":{}}}"#, file("base.raw")),
        format!(
            r#"json:{{"driver":"raw","file":{},"bogus":1}}"#,
            file("base.raw")
        ),
        r#"json:{"driver":"raw","file":{"driver":"file","filename":"base.raw","bogus":1}}"#.into(),
        format!(r#"json:{{"driver":"nosuch","file":{}}}"#, file("base.raw")),
        r#"json:{"driver":"raw","file":"base.raw"}"#.into(),
        r#"json:{"driver":"raw","filename":"base.raw"}"#.into(),
        r#"json:{"filename":"base.raw"}"#.into(),
        r#"json:{"driver":"raw","file":{"driver":"file"}}"#.into(),
        format!(
            r#"json:{{"driver":"raw","file":{},"driver":"raw"}}"#,
            file("base.raw")
        ),
        "json:nope".into(),
        "json:[1]".into(),
        "json:".into(),
        r#"json:{"a":1,}"#.into(),
        format!(r#"json:{{"driver":"raw","file":{}}} x"#, file("base.raw")),
    ];
    let top = "sub/top.qcow2";
    for name in &names {
        overlay_naming(&s.path(top), name);
        for args in [
            &["-c", "read -v 0 32", "-c", "read -v 64k 32", top][..],
            &["-r", "-c", "read -v 1000k 32", top],
        ] {
            same_as_qemu(dir, "io", args);
        }
        same_as_qemu(dir, "img", &["check", top]);
        // Flattened, the same bytes.
        let (ours, theirs) = (
            tool_in(dir, &["convert", "-O", "raw", top, "ours.raw"]),
            run_in(
                dir,
                "qemu-img",
                &["convert", "-O", "raw", top, "theirs.raw"],
            ),
        );
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{name}: {}",
            stderr(&ours)
        );
        if theirs.status.success() {
            assert!(
                std::fs::read(s.join("ours.raw")).unwrap()
                    == std::fs::read(s.join("theirs.raw")).unwrap(),
                "{name}: converts differently"
            );
        }
        // info leaves the chain closed and names the backing as it is.
        same_as_qemu(dir, "img", &["info", "--output", "json", top]);
    }
    // Backing format `file` (the file's bytes) in the header.
    for base in ["base.qcow2", "base.raw"] {
        let opts = format!("backing_file=../{base},backing_fmt=file");
        create(&s.path(top), &opts, "1M");
        same_as_qemu(dir, "io", &["-c", "read -v 0 32", top]);
        same_as_qemu(dir, "img", &["check", top]);
    }
}

#[test]
fn create_opens_protocol_backing_names_as_qemu_img() {
    let s = Scratch::new("backing-create-protocols");
    let dir = s.dir();
    std::fs::write(s.join("base.raw"), test_support::noise(700 * 1024, 3)).unwrap();
    create(&s.path("base.qcow2"), "cluster_size=65536", "3M");
    std::fs::create_dir(s.join("adir")).unwrap();
    let json = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"base.qcow2"}}"#;
    let cases: [&[&str]; 11] = [
        &["-b", "file:base.raw", "-F", "raw"],
        &["-b", "file:base.qcow2", "-F", "qcow2"],
        &["-b", "base.qcow2", "-F", "file"],
        &["-b", "file:base.qcow2"],
        &["-b", json, "-F", "qcow2"],
        &["-b", json],
        &["-b", "foo:bar", "-F", "raw"],
        &["-b", "file:missing", "-F", "raw"],
        &["-b", "adir", "-F", "raw"],
        &["-b", "/proc/self/mem", "-F", "raw"],
        &[
            "-b",
            r#"json:{"driver":"raw","file":{"filename":"base.raw"},"x":1}"#,
            "-F",
            "raw",
        ],
    ];
    for (i, case) in cases.iter().enumerate() {
        let (ours, theirs) = (format!("ours{i}.qcow2"), format!("theirs{i}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2"];
        args.extend(*case);
        let ours_out = tool_in(dir, &[&args[..], &[ours.as_str()]].concat());
        let theirs_out = run_in(dir, "qemu-img", &[&args[..], &[theirs.as_str()]].concat());
        let what = format!("{case:?}");
        assert_eq!(
            test_support::stdout(&ours_out).replace(&ours, "X"),
            test_support::stdout(&theirs_out).replace(&theirs, "X"),
            "{what}"
        );
        assert_eq!(
            stderr(&ours_out).replace(&ours, "X"),
            test_support::output::as_ours(&stderr(&theirs_out)).replace(&theirs, "X"),
            "{what}"
        );
        assert_eq!(ours_out.status.code(), theirs_out.status.code(), "{what}");
        if theirs_out.status.success() {
            let info = |p: &str| {
                let mut v = test_support::qemu::info(s.join(p));
                v.as_object_mut().unwrap().remove("filename");
                v.as_object_mut().unwrap().remove("actual-size");
                v.as_object_mut().unwrap().remove("children");
                v.as_object_mut().unwrap().remove("dirty-flag");
                v
            };
            assert_eq!(
                info(&ours)["virtual-size"],
                info(&theirs)["virtual-size"],
                "{what}"
            );
            assert_eq!(
                info(&ours)["backing-filename"],
                info(&theirs)["backing-filename"],
                "{what}"
            );
            assert_eq!(
                info(&ours)["backing-filename-format"],
                info(&theirs)["backing-filename-format"],
                "{what}"
            );
        }
    }
}

#[test]
fn backing_and_data_files_must_be_regular_files_or_block_devices() {
    // A directory as backing used to fail only when read, /proc/self/mem
    // was read as an empty backing or data file. QEMU refuses both at
    // open, in the words compared here; a FIFO (QEMU hangs opening it) and
    // a character device (QEMU takes it) are refused here too.
    let s = Scratch::new("backing-file-types");
    let dir = s.dir();
    std::fs::create_dir(s.join("adir")).unwrap();
    std::os::unix::fs::symlink("adir", s.join("dirlink")).unwrap();
    std::fs::write(s.join("base.raw"), test_support::noise(1 << 20, 5)).unwrap();
    std::os::unix::fs::symlink("base.raw", s.join("baselink")).unwrap();
    for backing in ["adir", "dirlink", "/proc/self/mem", "baselink"] {
        let opts = format!("backing_file={backing},backing_fmt=raw");
        let img = "over.qcow2";
        ok(
            run_in(
                dir,
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-u", "-o", &opts, img, "1M"],
            ),
            "create",
        );
        same_as_qemu(dir, "img", &["check", img]);
        same_as_qemu(dir, "img", &["check", "-r", "all", img]);
        same_as_qemu(dir, "io", &["-c", "read -v 0 16", img]);
        same_as_qemu(dir, "io", &["-r", "-c", "read -v 0 16", img]);
    }
    for data in ["adir", "/proc/self/mem", "baselink"] {
        let img = "data.qcow2";
        ok(
            run_in(
                dir,
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "data_file=d.raw",
                    img,
                    "1M",
                ],
            ),
            "create",
        );
        ok(
            run_in(
                dir,
                "qemu-img",
                &[
                    "amend",
                    "-f",
                    "qcow2",
                    "-o",
                    &format!("data_file={data}"),
                    img,
                ],
            ),
            "amend",
        );
        same_as_qemu(dir, "img", &["check", img]);
        same_as_qemu(dir, "img", &["check", "-r", "all", img]);
        same_as_qemu(dir, "io", &["-c", "read 0 512", img]);
        same_as_qemu(dir, "io", &["-r", "-c", "read 0 512", img]);
    }
    // No oracle: refused without blocking.
    let fifo = s.join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for (backing, want) in [
        ("fifo", "Could not open backing file: 'file' driver requires 'fifo' to be a regular file"),
        (
            "/dev/null",
            "Could not open backing file: '/dev/null' is a character device, not a regular file or block device",
        ),
    ] {
        let opts = format!("backing_file={backing},backing_fmt=raw");
        ok(
            run_in(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-u", "-o", &opts, "odd.qcow2", "1M"]),
            "create",
        );
        for args in [&["check", "odd.qcow2"][..], &["io", "-r", "-c", "read 0 1", "odd.qcow2"]] {
            let out = tool_in(dir, args);
            assert_eq!(out.status.code(), Some(1), "{backing} {args:?}");
            assert!(stderr(&out).contains(want), "{backing}: {}", stderr(&out));
        }
    }
}
