//! Image locking against running QEMU: `qemu-io` holding an image keeps
//! `qcow2-tool` out and `qcow2-tool io` holding one keeps QEMU out, with the
//! messages and exit codes two QEMU processes give each other.
//!
//! A holder is a `qemu-io` or `qcow2-tool io` reading commands from a pipe,
//! so it keeps the image open until the pipe closes. Tests wait (boundedly)
//! until `/proc/locks` shows the holder's locks, and holders are killed
//! when dropped, so a failing test leaves no process behind.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};
use test_support::output::as_ours;
use test_support::{ok, qemu_img, qemu_io, run, text, Scratch};

/// How long a holder may take to open its image, or to exit after its
/// input ends.
const PATIENCE: Duration = Duration::from_secs(20);

/// A new 4 MiB qcow2 image `name` in `s` made by qemu-img, with 64 KiB of
/// 0x5a at 0.
fn image(s: &Scratch, name: &str) -> String {
    let path = s.path(name);
    ok(
        qemu_img(&["create", "-q", "-f", "qcow2", &path, "4M"]),
        "qemu-img create",
    );
    ok(
        qemu_io(&["-c", "write -q -P 0x5a 0 64k", &path]),
        "qemu-io write",
    );
    path
}

/// The tool under test.
const TOOL: &str = env!("CARGO_BIN_EXE_qcow2-tool");

/// Runs the tool.
fn tool(args: &[&str]) -> Output {
    run(TOOL, args)
}

/// The QEMU equivalent of a `qcow2-tool` command line: `io` is `qemu-io`,
/// everything else `qemu-img`.
fn qemu_equivalent(args: &[&str]) -> (&'static str, Vec<String>) {
    match args.split_first() {
        Some((&"io", rest)) => ("qemu-io", rest.iter().map(|s| s.to_string()).collect()),
        Some((&"create", rest)) => {
            let mut v = vec!["create".to_string(), "-f".into(), "qcow2".into()];
            v.extend(rest.iter().map(|s| s.to_string()));
            ("qemu-img", v)
        }
        _ => ("qemu-img", args.iter().map(|s| s.to_string()).collect()),
    }
}

/// `qcow2-tool args` and the same command through QEMU; both outcomes.
fn both(args: &[&str]) -> (Output, Output) {
    let ours = tool(args);
    let (program, qargs) = qemu_equivalent(args);
    let qargs: Vec<&str> = qargs.iter().map(String::as_str).collect();
    (ours, run(program, &qargs))
}

/// Runs `args` through `qcow2-tool` and QEMU and asserts both are refused
/// with the same message (QEMU's, with our prefix), which must contain
/// `expected`, and the same exit code.
fn refused_alike(args: &[&str], expected: &str) {
    let (ours, theirs) = both(args);
    assert_eq!(
        text(&ours.stderr),
        as_ours(&text(&theirs.stderr)),
        "stderr of {args:?} (ours, then QEMU's)"
    );
    assert!(
        text(&ours.stderr).contains(expected),
        "{args:?}: expected {expected:?} in {}",
        text(&ours.stderr)
    );
    assert_ne!(ours.status.code(), Some(0), "{args:?} must fail");
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "exit code of {args:?}"
    );
}

/// Runs `args` through `qcow2-tool` and QEMU and asserts both succeed.
fn allowed_alike(args: &[&str]) {
    let (ours, theirs) = both(args);
    ok(ours, &format!("qcow2-tool {args:?}"));
    ok(theirs, &format!("QEMU for {args:?}"));
}

/// The QEMU lock hint for `image`.
fn hint(image: &str) -> String {
    format!("Is another process using the image [{image}]?")
}

/// How many OFD locks cover each byte of `path`, from `/proc/locks`.
fn lock_bytes(path: &str) -> BTreeMap<u64, usize> {
    let meta = std::fs::metadata(path).expect("stat image");
    let dev = meta.dev();
    // The kernel prints MAJOR:MINOR:INODE, the device numbers in hex.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let table = std::fs::read_to_string("/proc/locks").expect("read /proc/locks");
    let mut bytes = BTreeMap::new();
    for line in table.lines().filter(|l| !l.contains("->")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 || fields[1] != "OFDLCK" || fields[5] != id {
            continue;
        }
        let start: u64 = fields[6].parse().expect("lock start");
        let end: u64 = fields[7].parse().expect("bounded lock");
        for byte in start..=end {
            *bytes.entry(byte).or_insert(0) += 1;
        }
    }
    bytes
}

/// Lock counts for holders each holding `sets` of bytes.
fn expected(sets: &[&[u64]]) -> BTreeMap<u64, usize> {
    let mut bytes = BTreeMap::new();
    for set in sets {
        for &b in *set {
            *bytes.entry(b).or_insert(0) += 1;
        }
    }
    bytes
}

/// Bytes QEMU 10 locks on a qcow2 image opened read-write.
const WRITER: &[u64] = &[100, 101, 103, 201, 203];
/// ... read-only.
const READER: &[u64] = &[100, 201, 203];
/// ... read-only with `-U`.
const SHARED_READER: &[u64] = &[100];

/// A process holding an image open, reading commands from a pipe. Killed
/// when dropped.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    what: String,
}

impl Holder {
    /// Starts `program args` with its input on a pipe.
    fn start(program: &str, args: &[&str]) -> Holder {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let stdin = child.stdin.take();
        Holder {
            child,
            stdin,
            what: format!("{program} {args:?}"),
        }
    }

    /// Starts `program args` on `image` and waits until the locks on
    /// `image` are `locks`.
    fn holding(program: &str, args: &[&str], image: &str, locks: &BTreeMap<u64, usize>) -> Holder {
        let mut all = args.to_vec();
        all.push(image);
        let mut holder = Holder::start(program, &all);
        holder.wait_for(image, locks);
        holder
    }

    /// Waits until the locks on `image` are `locks`; panics with what the
    /// holder printed if it exits or the wait is too long.
    fn wait_for(&mut self, image: &str, locks: &BTreeMap<u64, usize>) {
        let start = Instant::now();
        loop {
            let now = lock_bytes(image);
            if &now == locks {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("{} exited ({status}) before locking: {err}", self.what);
            }
            assert!(
                start.elapsed() < PATIENCE,
                "{}: locks on {image} are {now:?}, want {locks:?}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends one command line.
    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("holder input open");
        writeln!(stdin, "{line}").expect("write to holder");
    }

    /// Closes the input and waits for the holder to exit; returns its
    /// output.
    fn finish(mut self) -> Output {
        drop(self.stdin.take());
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for holder") {
                break status;
            }
            assert!(start.elapsed() < PATIENCE, "{} did not exit", self.what);
            std::thread::sleep(Duration::from_millis(5));
        };
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_end(&mut stdout);
        }
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_end(&mut stderr);
        }
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

#[test]
fn our_io_takes_exactly_qemus_bytes() {
    let s = Scratch::new("bytes");
    let img = image(&s, "a.qcow2");
    for (flags, bytes) in [
        (&[][..], WRITER),
        (&["-r"][..], READER),
        (&["-r", "-U"][..], SHARED_READER),
    ] {
        let locks = expected(&[bytes]);
        let theirs = Holder::holding("qemu-io", flags, &img, &locks);
        ok(theirs.finish(), "qemu-io holder");
        assert!(lock_bytes(&img).is_empty(), "qemu-io left locks");
        let mut args = vec!["io"];
        args.extend(flags);
        let ours = Holder::holding(TOOL, &args, &img, &locks);
        ok(ours.finish(), "qcow2-tool io holder");
        assert!(lock_bytes(&img).is_empty(), "qcow2-tool io left locks");
    }
}

#[test]
fn qemu_io_writer_keeps_the_tool_out() {
    let s = Scratch::new("qemu-writer");
    let img = image(&s, "a.qcow2");
    let other = image(&s, "b.qcow2");
    let (out1, out2) = (s.path("out1.raw"), s.path("out2.raw"));
    let holder = Holder::holding("qemu-io", &[], &img, &expected(&[WRITER]));
    let write_lock = "Failed to get \"write\" lock";
    let shared_write = "Failed to get shared \"write\" lock";

    refused_alike(&["io", "-c", "write 0 1", &img], write_lock);
    refused_alike(&["io", "-r", "-c", "read 0 1", &img], shared_write);
    refused_alike(&["info", &img], shared_write);
    refused_alike(&["check", &img], shared_write);
    refused_alike(&["check", "-r", "leaks", &img], write_lock);
    refused_alike(&["bench", "-c", "1", &img], shared_write);
    refused_alike(&["bench", "-w", "-c", "1", &img], write_lock);
    refused_alike(&["bench", "-t", "none", "-c", "1", &img], shared_write);
    // Ours and qemu-img convert write different targets: a clash between
    // the two would be a test bug, not the holder's doing.
    let (ours, theirs) = (
        tool(&["convert", "-O", "raw", &img, &out1]),
        run("qemu-img", &["convert", "-O", "raw", &img, &out2]),
    );
    assert_eq!(text(&ours.stderr), as_ours(&text(&theirs.stderr)));
    assert!(text(&ours.stderr).contains(shared_write));
    assert_eq!(
        (ours.status.code(), theirs.status.code()),
        (Some(1), Some(1))
    );
    // The hint names the image as given.
    let (ours, _) = both(&["info", &img]);
    assert!(text(&ours.stderr).ends_with(&format!("{}\n", hint(&img))));

    // The image in use cannot be overwritten, not even as a conversion
    // target; it is left intact.
    let before = std::fs::read(&img).expect("read image");
    refused_alike(&["create", "-q", &img, "1M"], write_lock);
    let (ours, theirs) = (
        tool(&["convert", "-O", "qcow2", &other, &img]),
        run("qemu-img", &["convert", "-O", "qcow2", &other, &img]),
    );
    assert_eq!(text(&ours.stderr), as_ours(&text(&theirs.stderr)));
    assert!(text(&ours.stderr).contains("error while converting qcow2: "));
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(std::fs::read(&img).expect("read image"), before);

    // -U shares: readers get in, writers are refused as qemu's are.
    let info = ok(tool(&["info", "-U", &img]), "info -U");
    assert!(info.contains("virtual size: 4 MiB"), "{info}");
    allowed_alike(&["info", "--force-share", &img]);
    allowed_alike(&["check", "-U", &img]);
    allowed_alike(&["io", "-r", "-U", "-c", "read -P 0x5a 0 64k", &img]);
    allowed_alike(&["bench", "-U", "-c", "1", &img]);
    let force_rw = "force-share=on can only be used with read-only images";
    refused_alike(&["io", "-U", "-c", "read 0 1", &img], force_rw);
    refused_alike(&["check", "-U", "-r", "all", &img], force_rw);
    refused_alike(&["bench", "-U", "-w", "-c", "1", &img], force_rw);
    ok(
        tool(&["convert", "-U", "-O", "raw", &img, &out1]),
        "convert -U",
    );
    assert_eq!(
        std::fs::read(&out1).expect("read copy")[..65536],
        [0x5a; 65536]
    );

    ok(holder.finish(), "qemu-io holder");
    // Once it is gone, everything works.
    ok(
        tool(&["io", "-c", "write -P 1 0 1", &img]),
        "io after the holder",
    );
    ok(tool(&["check", &img]), "check after the holder");
}

/// QEMU commands and what they must give while an image is held read-write
/// by someone else.
fn qemu_against_writer(img: &str) -> Vec<(Output, bool)> {
    let cases: [(&str, &[&str], bool); 7] = [
        ("qemu-io", &["-c", "write 0 1"], false),
        ("qemu-io", &["-r", "-c", "read 0 1"], false),
        ("qemu-img", &["info"], false),
        ("qemu-img", &["check"], false),
        ("qemu-img", &["info", "-U"], true),
        ("qemu-io", &["-r", "-U", "-c", "read -P 0x5a 0 64k"], true),
        ("qemu-img", &["check", "-U"], true),
    ];
    cases
        .iter()
        .map(|(program, args, succeeds)| {
            let mut all = args.to_vec();
            all.push(img);
            let out = run(program, &all);
            assert_eq!(
                out.status.success(),
                *succeeds,
                "{program} {all:?}: {}",
                text(&out.stderr)
            );
            (out, *succeeds)
        })
        .collect()
}

#[test]
fn our_io_writer_keeps_qemu_out() {
    let s = Scratch::new("our-writer");
    let img = image(&s, "a.qcow2");
    // What QEMU gives while another qemu-io holds the image...
    let holder = Holder::holding("qemu-io", &[], &img, &expected(&[WRITER]));
    let with_qemu = qemu_against_writer(&img);
    ok(holder.finish(), "qemu-io holder");
    // ... it must give while `qcow2-tool io` holds it.
    let mut holder = Holder::holding(TOOL, &["io"], &img, &expected(&[WRITER]));
    let with_ours = qemu_against_writer(&img);
    for ((theirs, succeeds), (ours, _)) in with_qemu.iter().zip(&with_ours) {
        assert_eq!(text(&ours.stderr), text(&theirs.stderr));
        assert_eq!(ours.status.code(), theirs.status.code());
        if !succeeds {
            assert!(
                text(&ours.stderr).contains(&hint(&img)),
                "{}",
                text(&ours.stderr)
            );
        }
    }
    assert!(text(&with_ours[0].0.stderr).contains("Failed to get \"write\" lock"));
    assert!(text(&with_ours[2].0.stderr).contains("Failed to get shared \"write\" lock"));

    // The holder keeps working, and keeps its locks, until its input ends.
    holder.send("write -P 0x77 64k 4k");
    holder.send("read -P 0x77 64k 4k");
    holder.wait_for(&img, &expected(&[WRITER]));
    assert!(!run("qemu-io", &["-c", "write 0 1", &img]).status.success());
    let out = ok(holder.finish(), "qcow2-tool io holder");
    assert!(
        out.contains("wrote 4096/4096 bytes at offset 65536"),
        "{out}"
    );
    assert!(!out.contains("failed"), "{out}");
    assert!(lock_bytes(&img).is_empty(), "locks outlived the holder");
    let out = ok(
        run(
            "qemu-io",
            &[
                "-c",
                "read -P 0x77 64k 4k",
                "-c",
                "read -P 0x5a 0 64k",
                &img,
            ],
        ),
        "qemu-io after our holder",
    );
    assert!(!out.contains("fail"), "{out}");
    ok(run("qemu-img", &["check", &img]), "qemu-img check");
}

#[test]
fn our_writers_exclude_each_other_and_readers_share() {
    let s = Scratch::new("ours");
    let img = image(&s, "a.qcow2");
    let write_lock = "Failed to get \"write\" lock";
    let shared_write = "Failed to get shared \"write\" lock";

    let writer = Holder::holding(TOOL, &["io"], &img, &expected(&[WRITER]));
    for (args, message) in [
        (vec!["io", "-c", "write 0 1"], write_lock),
        (vec!["io", "-r", "-c", "read 0 1"], shared_write),
        (vec!["info"], shared_write),
        (vec!["check"], shared_write),
        (vec!["check", "-r", "all"], write_lock),
    ] {
        let mut all = args.clone();
        all.push(&img);
        let out = tool(&all);
        assert_eq!(out.status.code(), Some(1), "{all:?}");
        let context = if args[0] == "io" {
            format!("can't open device {img}: ")
        } else {
            format!("Could not open '{img}': ")
        };
        assert_eq!(
            text(&out.stderr),
            format!("qcow2-tool: {context}{message}\n{}\n", hint(&img)),
            "{all:?}"
        );
    }
    ok(tool(&["info", "-U", &img]), "info -U beside a writer");
    ok(writer.finish(), "writer");

    // Readers share with readers (ours and QEMU's), not with writers.
    let r1 = Holder::holding(TOOL, &["io", "-r"], &img, &expected(&[READER]));
    let r2 = Holder::holding(TOOL, &["io", "-r"], &img, &expected(&[READER, READER]));
    allowed_alike(&["info", &img]);
    allowed_alike(&["check", &img]);
    allowed_alike(&["io", "-r", "-c", "read -P 0x5a 0 64k", &img]);
    refused_alike(&["io", "-c", "write 0 1", &img], write_lock);
    refused_alike(&["check", "-r", "leaks", &img], write_lock);
    ok(r1.finish(), "reader 1");
    ok(r2.finish(), "reader 2");

    // A -U reader lets a writer in, ours or QEMU's.
    let shared = Holder::holding(TOOL, &["io", "-r", "-U"], &img, &expected(&[SHARED_READER]));
    allowed_alike(&["io", "-c", "write -P 0x5a 0 512", &img]);
    ok(shared.finish(), "-U reader");
    assert!(lock_bytes(&img).is_empty());
}

#[test]
fn raw_images_share_like_qemus() {
    let s = Scratch::new("raw");
    let img = s.path("a.raw");
    ok(
        run("qemu-img", &["create", "-q", "-f", "raw", &img, "1M"]),
        "create raw",
    );
    let out = s.path("out.qcow2");
    // qemu-io on a raw file uses reads and writes but shares everything.
    let holder = Holder::holding("qemu-io", &["-f", "raw"], &img, &expected(&[&[100, 101]]));
    allowed_alike(&["io", "-f", "raw", "-c", "write 0 1", &img]);
    allowed_alike(&["info", "-f", "raw", &img]);
    ok(holder.finish(), "qemu-io -f raw holder");
    let holder = Holder::holding(TOOL, &["io", "-f", "raw"], &img, &expected(&[&[100, 101]]));
    ok(
        run("qemu-io", &["-f", "raw", "-c", "write 0 1", &img]),
        "qemu-io beside ours",
    );
    // Only a conversion source insists that no one writes.
    let ours = tool(&["convert", "-f", "raw", "-O", "qcow2", &img, &out]);
    let theirs = run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &img, &out],
    );
    assert_eq!(text(&ours.stderr), as_ours(&text(&theirs.stderr)));
    assert!(text(&ours.stderr).contains("Failed to get shared \"write\" lock"));
    assert_eq!(
        (ours.status.code(), theirs.status.code()),
        (Some(1), Some(1))
    );
    ok(holder.finish(), "qcow2-tool io -f raw holder");
}

#[test]
fn qemu_nbd_and_our_io_exclude_each_other() {
    let s = Scratch::new("nbd");
    let img = image(&s, "a.qcow2");
    let socket = s.path("nbd.sock");
    let nbd = ["-k", socket.as_str(), "-f", "qcow2"];
    // A running NBD server keeps our writers and readers out, as it keeps
    // qemu-io out.
    let server = Holder::holding("qemu-nbd", &nbd, &img, &expected(&[WRITER]));
    refused_alike(
        &["io", "-c", "write 0 1", &img],
        "Failed to get \"write\" lock",
    );
    refused_alike(&["info", &img], "Failed to get shared \"write\" lock");
    allowed_alike(&["info", "-U", &img]);
    drop(server);
    assert!(lock_bytes(&img).is_empty(), "qemu-nbd left locks");

    // And the server cannot start while qemu-io or we hold the image.
    let mut args = nbd.to_vec();
    args.push(&img);
    let holder = Holder::holding("qemu-io", &[], &img, &expected(&[WRITER]));
    let theirs = run("qemu-nbd", &args);
    ok(holder.finish(), "qemu-io holder");
    let holder = Holder::holding(TOOL, &["io"], &img, &expected(&[WRITER]));
    let ours = run("qemu-nbd", &args);
    ok(holder.finish(), "qcow2-tool io holder");
    assert_eq!(text(&ours.stderr), text(&theirs.stderr));
    assert_eq!(
        text(&ours.stderr),
        format!(
            "qemu-nbd: Failed to blk_new_open '{img}': Failed to get \"write\" lock\n{}\n",
            hint(&img)
        )
    );
    assert_eq!(
        (ours.status.code(), theirs.status.code()),
        (Some(1), Some(1))
    );
}
