//! Backing file names as QEMU 10 reads them (`file:` and `json:` names,
//! backing format `file`), the `allow` hook on every file such a name
//! makes the library open, and the files a backing or data file may be:
//! regular files and block devices whose size `lseek` finds.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qcow2_core::OpenOptions;
use qcow2_std_shim::chain::{
    open_checked, parse_backing_name, BackingFormat, BackingTarget, ChainError, ChainOptions,
    OpenCheckedError, UnusableFile,
};
use qcow2_std_shim::data_file::{attach_data_file, DataFileError, DataFileOptions};
use qcow2_std_shim::{open_chain, FileDevice, FilePolicy, Image};
use test_support::raw::{header, poke, poke64};
use test_support::{qemu, Scratch};

fn target(path: &str, format: BackingFormat, open_backing: bool) -> BackingTarget {
    BackingTarget {
        path: PathBuf::from(path),
        format,
        open_backing,
    }
}

/// `parse_backing_name` for an image at `/img/ov.qcow2`.
fn parse(name: &str, format: Option<&str>) -> Result<BackingTarget, String> {
    parse_backing_name(Path::new("/img/ov.qcow2"), name, format).map_err(|e| e.to_string())
}

#[test]
fn names_parse_as_qemu_reads_them() {
    use BackingFormat::{Probe, Qcow2, Raw};
    let ok = |name: &str, format: Option<&str>, want: BackingTarget| {
        assert_eq!(parse(name, format), Ok(want), "{name} {format:?}");
    };
    // Plain names: next to the image; the header's format, or probed.
    ok("base.raw", None, target("/img/base.raw", Probe, true));
    ok("base.raw", Some("raw"), target("/img/base.raw", Raw, true));
    ok("base.raw", Some("file"), target("/img/base.raw", Raw, true));
    ok(
        "b.qcow2",
        Some("qcow2"),
        target("/img/b.qcow2", Qcow2, true),
    );
    ok("/abs/b", None, target("/abs/b", Probe, true));
    // A slash before the colon: no protocol.
    ok("dir/a:b", None, target("/img/dir/a:b", Probe, true));
    // file: names the file itself, relative to the working directory.
    ok("file:base.raw", None, target("base.raw", Probe, true));
    ok(
        "file:base.raw",
        Some("qcow2"),
        target("base.raw", Qcow2, true),
    );
    ok("file:/abs/b", Some("file"), target("/abs/b", Raw, true));
    ok("file:a:b", None, target("./a:b", Probe, true));
    // json: a format over a file child, raw passing through.
    let file = |name: &str| format!(r#"{{"driver":"file","filename":"{name}"}}"#);
    ok(
        &format!(r#"json:{{"driver":"raw","file":{}}}"#, file("b.raw")),
        None,
        target("b.raw", Raw, true),
    );
    ok(
        &format!(r#"json:{{"driver":"qcow2","file":{}}}"#, file("b.q")),
        None,
        target("b.q", Qcow2, true),
    );
    ok(
        &format!(r#"json:{{"file":{}}}"#, file("b")),
        None,
        target("b", Probe, true),
    );
    ok(&format!("json:{}", file("b")), None, target("b", Raw, true));
    ok(
        r#"json:{"driver":"qcow2","file":{"filename":"b"}}"#,
        None,
        target("b", Qcow2, true),
    );
    ok(
        &format!(
            r#"json:{{"driver":"raw","file":{{"driver":"qcow2","file":{}}}}}"#,
            file("b")
        ),
        None,
        target("b", Qcow2, true),
    );
    ok(
        &format!(
            r#"json:{{"driver":"qcow2","file":{{"driver":"raw","file":{}}}}}"#,
            file("b")
        ),
        None,
        target("b", Qcow2, true),
    );
    ok(
        &format!(
            r#"json:{{"driver":"qcow2","file":{},"backing":null}}"#,
            file("b")
        ),
        None,
        target("b", Qcow2, false),
    );
    ok(
        r#"json:{"driver":"qcow2","file.driver":"file","file.filename":"b"}"#,
        None,
        target("b", Qcow2, true),
    );
    ok(
        "json:{'driver':'raw','file':{'driver':'file','filename':'b'}}",
        None,
        target("b", Raw, true),
    );
    ok(
        r#"json: {"driver":"raw","node-name":"n","read-only":"on","file":{"filename":"\u0062\ud83d\ude00"}} "#,
        None,
        target("b\u{1f600}", Raw, true),
    );
    // The header's format replaces the top driver.
    ok(
        &format!(r#"json:{{"driver":"qcow2","file":{}}}"#, file("b")),
        Some("raw"),
        target("b", Raw, true),
    );
    ok(
        &format!(r#"json:{{"file":{}}}"#, file("b")),
        Some("qcow2"),
        target("b", Qcow2, true),
    );

    // What QEMU refuses, in its words.
    let err = |name: &str, format: Option<&str>, want: &str| {
        assert_eq!(
            parse(name, format),
            Err(want.to_string()),
            "{name} {format:?}"
        );
    };
    let json = "Could not parse the JSON options: ";
    err("foo:bar", None, "Unknown protocol 'foo'");
    err("JSON:{}", None, "Unknown protocol 'JSON'");
    err(
        "file:",
        None,
        "The 'file' block driver requires a file name",
    );
    err("base", Some("vmdk"), "Unknown driver 'vmdk'");
    err("json:", None, &format!("{json}Expecting a JSON value"));
    err(
        "json:nope",
        None,
        &format!("{json}JSON parse error, invalid keyword 'nope'"),
    );
    err("json:[1]", None, "Invalid JSON object given");
    err(
        "json:{} x",
        None,
        &format!("{json}Expecting at most one JSON value"),
    );
    err(
        r#"json:{"a" 1}"#,
        None,
        &format!("{json}JSON parse error, missing : in object pair"),
    );
    err(
        r#"json:{"a":1 "b":2}"#,
        None,
        &format!("{json}JSON parse error, expected separator in dict"),
    );
    err(
        r#"json:{"a":1,}"#,
        None,
        &format!("{json}JSON parse error, expecting value"),
    );
    err(
        r#"json:{"a":1,"a":2}"#,
        None,
        &format!("{json}JSON parse error, duplicate key"),
    );
    err(
        r#"json:{1:2}"#,
        None,
        &format!("{json}JSON parse error, key is not a string in object"),
    );
    err(
        r#"json:{"a":"\q"}"#,
        None,
        &format!("{json}JSON parse error, invalid escape sequence in string"),
    );
    err(
        r#"json:{"a":"x"#,
        None,
        &format!("{json}JSON parse error, stray '\"x'"),
    );
    err(
        r#"json:{"a":"\ud800"}"#,
        None,
        &format!("{json}JSON parse error, \\ud800 is not a valid Unicode character"),
    );
    err(
        r#"json:{"a":1"#,
        None,
        &format!("{json}JSON parse error, premature EOI"),
    );
    err("json:{}", None, "Must specify either driver or file");
    err(
        r#"json:{"filename":"b"}"#,
        None,
        "Must specify either driver or file",
    );
    err(
        r#"json:{"driver":"raw","filename":"b"}"#,
        None,
        "A block device must be specified for \"file\"",
    );
    err(
        r#"json:{"driver":"raw","file":"b"}"#,
        None,
        "Cannot find device='b' nor node-name='b'",
    );
    err(
        r#"json:{"driver":"raw","file":{"driver":"file"}}"#,
        None,
        "The 'file' block driver requires a file name",
    );
    err(
        r#"json:{"driver":"raw","file":{"driver":"file","filename":""}}"#,
        None,
        "The 'file' block driver requires a file name",
    );
    err(
        r#"json:{"driver":"nosuch","file":{"filename":"b"}}"#,
        None,
        "Unknown driver 'nosuch'",
    );
    err(
        r#"json:{"driver":"raw","file":{"driver":"nbd","host":"h"}}"#,
        None,
        "Unknown driver 'nbd'",
    );
    err(
        r#"json:{"driver":"raw","file":{"filename":"b"},"offset":4}"#,
        None,
        "Block format 'raw' does not support the option 'offset'",
    );
    err(
        r#"json:{"driver":"raw","file":{"filename":"b","locking":"off"}}"#,
        None,
        "Block protocol 'file' doesn't support the option 'locking'",
    );
    err(
        r#"json:{"driver":"raw","file":{"filename":"b"},"read-only":"maybe"}"#,
        None,
        "Parameter 'read-only' expects 'on' or 'off'",
    );
    err(
        r#"json:{"driver":"qcow2","file":{"driver":"qcow2","file":{"filename":"b"}}}"#,
        None,
        "An image stored in another image's guest data is not supported",
    );
    err(
        r#"json:{"driver":"qcow2","file":{"filename":"b"},"backing":"other"}"#,
        None,
        "A backing given by reference or by options is not supported (only \"backing\": null)",
    );
    // The header's format replaces the driver: a file node needs a name.
    err(
        r#"json:{"driver":"qcow2","file":{"filename":"b"}}"#,
        Some("file"),
        "The 'file' block driver requires a file name",
    );
    // Hostile nesting is refused, not recursed into without bound.
    for depth in [10, 100, 1000] {
        let deep = format!("json:{}{}", "[".repeat(depth), "]".repeat(depth));
        assert!(parse(&deep, None).is_err(), "{depth}");
        let nodes = format!(
            "json:{}{}{}",
            r#"{"driver":"raw","file":"#.repeat(depth),
            r#"{"filename":"b"}"#,
            "}".repeat(depth)
        );
        assert!(parse(&nodes, None).is_err(), "{depth}");
    }
}

/// A qcow2 overlay at `path` whose header names `name` as its backing,
/// without a backing format (QEMU probes then).
fn overlay_naming(path: &Path, name: &str) {
    qemu::create(path, "", 1 << 20);
    // In the header cluster, after the header and its extensions.
    poke64(path, header::BACKING_FILE_OFFSET, 4096);
    poke(
        path,
        header::BACKING_FILE_SIZE,
        &(name.len() as u32).to_be_bytes(),
    );
    poke(path, 4096, name.as_bytes());
}

fn read_first(image: &mut Image<FileDevice>) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    image.read_at(0, &mut buf).expect("read");
    buf
}

#[test]
fn json_backings_open_through_the_allow_hook() {
    let s = Scratch::new("chain-json");
    // base.raw <- mid.qcow2 (data at 64 KiB) <- overlay naming mid in JSON.
    let raw = s.join("base.raw");
    std::fs::write(&raw, vec![0x11u8; 1 << 20]).unwrap();
    let mid = s.join("mid.qcow2");
    qemu::create(
        &mid,
        &format!("backing_file={},backing_fmt=raw", raw.display()),
        1 << 20,
    );
    qemu::io(&mid, &["write -P 0x22 64k 64k"]);
    let top = s.join("top.qcow2");
    let file = format!(r#"{{"driver":"file","filename":"{}"}}"#, mid.display());
    overlay_naming(&top, &format!(r#"json:{{"driver":"qcow2","file":{file}}}"#));
    let asked = std::cell::RefCell::new(Vec::new());
    let deny = |p: &Path| {
        asked.borrow_mut().push(p.to_path_buf());
        false
    };
    let refusing = ChainOptions {
        policy: FilePolicy {
            allow: &deny,
            ..FilePolicy::trusting()
        },
        ..ChainOptions::trusting()
    };
    match open_chain(&top, &OpenOptions::read_only(), &refusing) {
        Err(ChainError::Refused { path }) => assert_eq!(path, mid),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a backing the hook refused"),
    }
    assert_eq!(*asked.borrow(), vec![mid.clone()]);
    // Allowed: the whole chain, each file asked for.
    asked.borrow_mut().clear();
    let record = |p: &Path| {
        asked.borrow_mut().push(p.to_path_buf());
        true
    };
    let allowing = ChainOptions {
        policy: FilePolicy {
            allow: &record,
            ..FilePolicy::trusting()
        },
        ..ChainOptions::trusting()
    };
    let mut image = open_chain(&top, &OpenOptions::read_only(), &allowing).unwrap();
    assert_eq!(read_first(&mut image), vec![0x11; 512]);
    let mut buf = vec![0u8; 512];
    image.read_at(64 << 10, &mut buf).unwrap();
    assert_eq!(buf, vec![0x22; 512]);
    assert_eq!(*asked.borrow(), vec![mid.clone(), raw.clone()]);
    // "backing": null: mid without its base, which then reads as zeros.
    overlay_naming(
        &top,
        &format!(r#"json:{{"driver":"qcow2","file":{file},"backing":null}}"#),
    );
    asked.borrow_mut().clear();
    let mut image = open_chain(&top, &OpenOptions::read_only(), &allowing).unwrap();
    assert_eq!(read_first(&mut image), vec![0; 512]);
    image.read_at(64 << 10, &mut buf).unwrap();
    assert_eq!(buf, vec![0x22; 512]);
    assert_eq!(*asked.borrow(), vec![mid.clone()]);
    // Format `file` and `file:` names: the file's bytes.
    overlay_naming(&top, &format!("file:{}", raw.display()));
    let mut image = open_chain(&top, &OpenOptions::read_only(), &allowing).unwrap();
    assert_eq!(read_first(&mut image), vec![0x11; 512]);
    overlay_naming(&top, &format!("json:{file}"));
    let mut image = open_chain(&top, &OpenOptions::read_only(), &allowing).unwrap();
    assert_eq!(&read_first(&mut image)[..4], b"QFI\xfb");
}

/// What `open_checked` says about `path`, read-only.
fn checked(path: &Path) -> Result<(), String> {
    let plain = |p: &Path, w: bool| FileDevice::open(p, w);
    match open_checked(path, false, &plain) {
        Ok(_) => Ok(()),
        Err(OpenCheckedError::Open(e)) => Err(format!("open: {e}")),
        Err(OpenCheckedError::Unusable(why)) => Err(why.message(path)),
    }
}

#[test]
fn backing_and_data_files_must_be_regular_files_or_block_devices() {
    let s = Scratch::new("chain-file-types");
    let dir = s.join("dir");
    std::fs::create_dir(&dir).unwrap();
    let file = s.join("plain.raw");
    std::fs::write(&file, [7u8; 4096]).unwrap();
    let fifo = s.join("fifo");
    nix_mkfifo(&fifo);
    let socket = s.join("socket");
    let _listener = UnixListener::bind(&socket).unwrap();
    let to_file = s.join("link-to-file");
    std::os::unix::fs::symlink(&file, &to_file).unwrap();
    let to_dir = s.join("link-to-dir");
    std::os::unix::fs::symlink(&dir, &to_dir).unwrap();

    assert_eq!(checked(&file), Ok(()));
    // Symbolic links are followed, as QEMU follows them.
    assert_eq!(checked(&to_file), Ok(()));
    let not_regular = |p: &Path| {
        format!(
            "'file' driver requires '{}' to be a regular file",
            p.display()
        )
    };
    assert_eq!(checked(&dir), Err(not_regular(&dir)));
    assert_eq!(checked(&to_dir), Err(not_regular(&to_dir)));
    assert_eq!(checked(&socket), Err(not_regular(&socket)));
    // A FIFO is refused before it is opened: opening it would block.
    let started = Instant::now();
    assert_eq!(checked(&fifo), Err(not_regular(&fifo)));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        checked(Path::new("/dev/null")),
        Err("'/dev/null' is a character device, not a regular file or block device".into())
    );
    // A regular file whose end lseek cannot find (QEMU: EINVAL).
    match checked(Path::new("/proc/self/mem")) {
        Err(m) => assert!(
            m.starts_with("Could not refresh total sector count: Invalid argument"),
            "{m}"
        ),
        Ok(()) => panic!("/proc/self/mem accepted"),
    }
    assert!(checked(&s.join("missing"))
        .unwrap_err()
        .starts_with("open: "));
    // A writable open of a directory fails as the open fails (EISDIR).
    let plain = |p: &Path, w: bool| FileDevice::open(p, w);
    match open_checked(&dir, true, &plain) {
        Err(OpenCheckedError::Open(e)) => assert_eq!(e.raw_os_error(), Some(21)),
        other => panic!("{:?}", other.err()),
    }

    // Through a chain: a directory as the backing fails at open, not at
    // the first read.
    let top = s.join("top.qcow2");
    for (name, want) in [
        (dir.clone(), not_regular(&dir)),
        (PathBuf::from("/proc/self/mem"), String::new()),
        (PathBuf::from("/dev/null"), String::new()),
    ] {
        overlay_naming(&top, name.to_str().unwrap());
        match open_chain(&top, &OpenOptions::read_only(), &ChainOptions::trusting()) {
            Err(ChainError::Unusable { path, why }) => {
                assert_eq!(path, name);
                if !want.is_empty() {
                    assert_eq!(why.message(&path), want);
                }
            }
            Err(e) => panic!("{}: {e}", name.display()),
            Ok(_) => panic!("{}: opened as a backing", name.display()),
        }
    }
    // And as an external data file.
    let img = s.join("data.qcow2");
    qemu::create(
        &img,
        &format!("data_file={}", s.join("data.raw").display()),
        1 << 20,
    );
    for (bad, is_char) in [
        (&dir, false),
        (&fifo, false),
        (&PathBuf::from("/dev/null"), true),
    ] {
        let mut image = Image::open(
            FileDevice::open(&img, false).unwrap(),
            &OpenOptions::read_only(),
        )
        .unwrap();
        let options = DataFileOptions {
            data_file: Some(bad),
            ..DataFileOptions::trusting()
        };
        match attach_data_file(&mut image, &img, &options) {
            Err(DataFileError::Unusable { path, why }) => {
                assert_eq!(&path, bad);
                assert_eq!(matches!(why, UnusableFile::CharDevice), is_char);
            }
            other => panic!("{}: {:?}", bad.display(), other.err()),
        }
    }
}

/// Makes a FIFO at `path` (mkfifo(1): the shim's nix is not ours to use).
fn nix_mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(status.success());
}
