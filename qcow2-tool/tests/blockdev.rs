//! Storage that cannot grow: the tool on a block device (a loop device over
//! a scratch file) and on a full file system (a small tmpfs), against
//! `qemu-img` and `qemu-io` on the same device; the shim's `Image` API on a
//! full file system.
//!
//! Making a loop device or mounting a tmpfs needs `losetup` / `mount` and
//! the right to use them (root); where that fails, each test says why on
//! stderr and passes without checking anything.

mod common;

use common::{ok, qemu_img, qemu_io, run, stderr, stdout, tool, Scratch};
use std::path::Path;
use std::process::{Command, Output};

/// Runs a command that sets up a device; `None` (with the reason on stderr,
/// to skip the test) when it cannot run or fails.
fn set_up(program: &str, args: &[&str]) -> Option<Output> {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => Some(out),
        Ok(out) => {
            eprintln!("skipping: {program} fails here: {}", stderr(&out).trim());
            None
        }
        Err(e) => {
            eprintln!("skipping: cannot run {program}: {e}");
            None
        }
    }
}

/// A loop device over a file of the scratch directory, detached when
/// dropped.
struct Loop {
    dev: String,
    backing: String,
}

impl Loop {
    /// A loop device of `size` bytes, or `None` (with the reason on
    /// stderr) where this machine cannot make one.
    fn new(scratch: &Scratch, size: u64) -> Option<Loop> {
        let backing = scratch.path("backing.img");
        let file = std::fs::File::create(&backing).expect("create backing file");
        file.set_len(size).expect("size backing file");
        drop(file);
        let out = set_up("losetup", &["-f", "--show", &backing])?;
        let dev = stdout(&out).trim().to_string();
        Some(Loop { dev, backing })
    }

    /// Fills the first `len` bytes of the device with `byte`, as if it had
    /// held something else before.
    fn fill(&self, byte: u8, len: usize) {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.dev)
            .expect("open the loop device");
        file.write_all_at(&vec![byte; len], 0).expect("fill");
        file.sync_all().expect("sync");
    }

    /// The first `len` bytes of the device.
    fn head(&self, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(&self.dev).expect("open the loop device");
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, 0).expect("read");
        buf
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}

/// A tmpfs of a few MiB mounted on a directory of the scratch directory,
/// unmounted when dropped.
struct Tmpfs {
    dir: String,
}

impl Tmpfs {
    /// A tmpfs of `size` (`mount -o size=`), or `None` (with the reason on
    /// stderr) where this machine cannot mount one.
    fn new(scratch: &Scratch, size: &str) -> Option<Tmpfs> {
        let dir = scratch.path("mnt");
        std::fs::create_dir_all(&dir).expect("create mount point");
        set_up(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", &dir],
        )?;
        Some(Tmpfs { dir })
    }

    fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).output();
    }
}

/// `qemu-img check` of `dev` exits 0.
fn qemu_clean(dev: &str, what: &str) {
    ok(
        qemu_img(&["check", dev]),
        &format!("qemu-img check after {what}"),
    );
}

/// A raw file of `len` bytes: `data` random-looking bytes, then zeros.
fn raw_source(path: &str, data: usize, len: u64) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let bytes: Vec<u8> = (0..data)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, bytes).expect("write source");
    std::fs::File::options()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len))
        .expect("size source");
}

#[test]
fn create_info_io_check_and_convert_on_a_loop_device() {
    let scratch = Scratch::new("blockdev-verbs");
    let Some(lo) = Loop::new(&scratch, 64 << 20) else {
        return;
    };
    let dev = lo.dev.as_str();
    // What the device held before must never show through.
    lo.fill(0x5a, 16 << 20);

    // create: the same announcement; the image is one QEMU calls clean.
    let theirs = ok(
        qemu_img(&["create", "-f", "qcow2", dev, "32M"]),
        "qemu-img create",
    );
    lo.fill(0x5a, 16 << 20);
    let ours = ok(tool(&["create", "-f", "qcow2", dev, "32M"]), "create");
    assert_eq!(ours, theirs);
    qemu_clean(dev, "create");
    assert_eq!(lo.head(1 << 20).len(), 1 << 20, "the device is still there");

    // info: a host_device of the device's size, as QEMU shows it.
    for args in [&["info", dev][..], &["info", "--output", "json", dev][..]] {
        let ours = ok(tool(args), "info");
        let theirs = ok(qemu_img(args), "qemu-img info");
        assert_eq!(ours, theirs, "{args:?}");
    }
    assert!(stdout(&tool(&["info", dev])).contains("protocol type: host_device"));

    // io: our writes read back through qemu-io and the other way round;
    // unallocated clusters read as zeros, not as the old contents.
    ok(
        tool(&[
            "io",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 3M 64k",
            "-c",
            "read -P 0xab 0 1M",
            dev,
        ]),
        "io",
    );
    qemu_clean(dev, "io");
    ok(
        qemu_io(&[
            "-r",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 3M 64k",
            "-c",
            "read -P 0 1M 2M",
            dev,
        ]),
        "qemu-io read",
    );
    ok(
        qemu_io(&["-c", "write -P 0x12 8M 1M", dev]),
        "qemu-io write",
    );
    ok(
        tool(&[
            "io",
            "-r",
            "-c",
            "read -P 0x12 8M 1M",
            "-c",
            "read -P 0xcd 3M 64k",
            "-c",
            "read -P 0 9M 1M",
            dev,
        ]),
        "io read",
    );

    // check: the same report and exit status.
    let (ours, theirs) = (tool(&["check", dev]), qemu_img(&["check", dev]));
    assert_eq!(stdout(&ours), stdout(&theirs));
    assert_eq!(ours.status.code(), theirs.status.code());

    // convert from the device: the same raw file.
    let (ours, theirs) = (scratch.path("ours.raw"), scratch.path("theirs.raw"));
    ok(tool(&["convert", "-O", "raw", dev, &ours]), "convert from");
    ok(
        qemu_img(&["convert", "-O", "raw", dev, &theirs]),
        "qemu-img convert",
    );
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap());

    // convert onto the device, over old contents: qcow2 and raw targets.
    let src = scratch.path("src.raw");
    raw_source(&src, 3 << 20, 8 << 20);
    lo.fill(0x5a, 16 << 20);
    ok(
        tool(&["convert", "-O", "qcow2", &src, dev]),
        "convert to qcow2",
    );
    ok(
        qemu_img(&["compare", "-f", "raw", "-F", "qcow2", &src, dev]),
        "compare",
    );
    qemu_clean(dev, "convert");
    lo.fill(0x5a, 16 << 20);
    ok(tool(&["convert", "-O", "raw", &src, dev]), "convert to raw");
    assert!(
        lo.head(8 << 20) == std::fs::read(&src).unwrap(),
        "raw target"
    );
}

/// Writes more than `image` (a path on storage with about 2 MiB of room)
/// can hold, through our tool and through qemu-io, each on a new 8 MiB
/// image: both fail with qemu-io's message, read back what was flushed
/// before, and leave an image `qemu-img check` calls clean or only leaking,
/// which both read the flushed data from afterwards.
fn write_until_full(image: &str) {
    for (name, program) in [
        ("ours", env!("CARGO_BIN_EXE_qcow2-tool")),
        ("qemu-io", "qemu-io"),
    ] {
        ok(
            qemu_img(&["create", "-q", "-f", "qcow2", image, "8M"]),
            "create",
        );
        let mut args = if name == "ours" { vec!["io"] } else { vec![] };
        args.extend([
            "-c",
            "write -P 0x11 0 512k",
            "-c",
            "flush",
            "-c",
            "write -P 0x22 512k 4M",
            "-c",
            "read -P 0x11 0 512k",
            image,
        ]);
        let out = run(program, &args);
        assert!(!out.status.success(), "{name}: {}", stdout(&out));
        assert!(
            stdout(&out).contains("write failed: No space left on device\n"),
            "{name}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(stdout(&out).contains("read 524288/524288 bytes at offset 0"));
        let check = qemu_img(&["check", image]);
        assert!(
            matches!(check.status.code(), Some(0 | 3)),
            "{name}: {}",
            stdout(&check)
        );
        ok(qemu_io(&["-r", "-c", "read -P 0x11 0 512k", image]), name);
        ok(
            tool(&["io", "-r", "-c", "read -P 0x11 0 512k", image]),
            name,
        );
    }
}

#[test]
fn a_full_loop_device_fails_as_qemu_does_and_keeps_the_device() {
    let scratch = Scratch::new("blockdev-full");
    let Some(lo) = Loop::new(&scratch, 2 << 20) else {
        return;
    };
    let dev = lo.dev.as_str();

    // A raw image larger than the device: QEMU's refusal, word for word.
    let ours = tool(&["create", "-f", "raw", dev, "4M"]);
    let theirs = qemu_img(&["create", "-f", "raw", dev, "4M"]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(
        stderr(&ours).replace("qcow2-tool:", ""),
        stderr(&theirs).replace("qemu-img:", ""),
    );

    // Writes beyond what the device holds: qemu-io's message, the data
    // flushed before intact, the image clean or only leaking.
    write_until_full(dev);

    // A conversion that does not fit: the same reason; the device stays.
    let src = scratch.path("big.raw");
    raw_source(&src, 3 << 20, 4 << 20);
    let ours = tool(&["convert", "-O", "qcow2", &src, dev]);
    let theirs = qemu_img(&["convert", "-O", "qcow2", &src, dev]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert!(
        stderr(&ours).ends_with(": No space left on device\n"),
        "{}",
        stderr(&ours)
    );
    assert!(stderr(&theirs).ends_with(": No space left on device\n"));
    assert!(Path::new(dev).exists(), "a failed conversion removed {dev}");
    assert!(Path::new(&lo.backing).exists());
}

#[test]
fn a_crashed_lazy_refcounts_image_on_a_full_loop_device_is_rebuilt_in_place() {
    let scratch = Scratch::new("blockdev-lazy");
    let Some(lo) = Loop::new(&scratch, 4 << 20) else {
        return;
    };
    let dev = lo.dev.as_str();
    ok(
        qemu_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4k",
            dev,
            "16M",
        ]),
        "create",
    );
    // qemu-io fills the device, then dies without closing the image: it
    // is dirty, its refcounts stale, the end of the device in use.
    let out = qemu_io(&[
        "-c",
        "write -P 0x33 0 3M",
        "-c",
        "write -P 0x34 3M 2M",
        "-c",
        "sigraise 9",
        dev,
    ]);
    assert!(stdout(&out).contains("write failed: No space left on device"));
    assert!(stdout(&tool(&["info", dev])).contains("cleanly shut down: no"));
    // Opening it for writing rebuilds the refcounts inside the device.
    ok(
        tool(&[
            "io",
            "-c",
            "read -P 0x33 0 3M",
            "-c",
            "write -P 0x44 3M 256k",
            dev,
        ]),
        "io on the crashed image",
    );
    qemu_clean(dev, "the rebuild");
    ok(
        qemu_io(&[
            "-r",
            "-c",
            "read -P 0x33 0 3M",
            "-c",
            "read -P 0x44 3M 256k",
            dev,
        ]),
        "qemu-io read after the rebuild",
    );
}

#[test]
fn a_full_file_system_fails_as_qemu_does() {
    let scratch = Scratch::new("blockdev-tmpfs");
    let Some(fs) = Tmpfs::new(&scratch, "2M") else {
        return;
    };
    write_until_full(&fs.path("a.qcow2"));
}

/// The shim's `Image` on a full file system: the write that does not fit
/// fails with the OS's ENOSPC, and everything flushed before reads back
/// after a reopen; the image is clean or only leaks.
#[test]
fn the_image_api_on_a_full_file_system_keeps_flushed_data() {
    use qcow2_core::{CreateOptions, Error, OpenOptions};
    use qcow2_std_shim::{FileDevice, Image};

    let scratch = Scratch::new("blockdev-tmpfs-api");
    let Some(fs) = Tmpfs::new(&scratch, "2M") else {
        return;
    };
    let path = fs.path("api.qcow2");
    let mut options = CreateOptions::new(8 << 20);
    options.lazy_refcounts = true;
    let mut img = Image::create(FileDevice::create(&path).unwrap(), &options).unwrap();
    let flushed = vec![0x11; 512 << 10];
    img.write_at(0, &flushed).unwrap();
    img.flush().unwrap();
    let chunk = vec![0x22; 256 << 10];
    let mut offset = flushed.len() as u64;
    let err = loop {
        assert!(offset < 8 << 20, "8 MiB written into a 2 MiB file system");
        match img.write_at(offset, &chunk) {
            Ok(()) => offset += chunk.len() as u64,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&err, Error::Io(e) if e.raw_os_error() == Some(28)),
        "{err}"
    );
    assert!(err.to_string().contains("No space left on device"), "{err}");
    // Crash now (no close): the lazy-refcounts image is dirty.
    drop(img);

    let reopen = |writable: bool| {
        let options = if writable {
            OpenOptions::read_write()
        } else {
            OpenOptions::read_only()
        };
        Image::open(FileDevice::open(&path, writable).unwrap(), &options)
    };
    assert!(reopen(false).unwrap().info().dirty);
    // A read-write open rebuilds the refcounts in the full file system.
    let mut img = reopen(true).unwrap_or_else(|e| panic!("reopen: {e}"));
    let mut back = vec![0; flushed.len()];
    img.read_at(0, &mut back).unwrap();
    assert!(back == flushed, "flushed data changed");
    assert_eq!(img.check().unwrap().corruptions, 0);
    img.close().unwrap();
    let check = qemu_img(&["check", &path]);
    assert!(
        matches!(check.status.code(), Some(0 | 3)),
        "{}",
        stdout(&check)
    );
    ok(
        qemu_io(&["-r", "-c", "read -P 0x11 0 512k", &path]),
        "qemu-io",
    );
}
