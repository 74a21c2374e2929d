//! `FileDevice` with direct I/O (`O_DIRECT`): unaligned memory, a file
//! whose length is not whole sectors, zeros, images and locks, checked
//! against the same file read through the page cache.
//!
//! The files live under the test binary's `CARGO_TARGET_TMPDIR`, which is
//! usually on a disk file system; where the file system refuses
//! `O_DIRECT` (tmpfs: `EINVAL`) or the platform has none, each test says
//! so and passes without checking anything.

use std::path::Path;

use qcow2_core::{BlockDevice, CreateOptions, OpenOptions, Sector, SECTOR};
use qcow2_std_shim::direct::{is_aligned, AlignedBuf};
use qcow2_std_shim::{block_on, FileDevice, FileOptions, Image, LockError, LockMode};
use test_support::{noise, ok, path_str, qemu_img, Scratch};

/// A scratch directory on the target directory's file system.
fn scratch(name: &str) -> Scratch {
    Scratch::new_in(Path::new(env!("CARGO_TARGET_TMPDIR")), name)
}

/// Opens `path` with `options` (direct); `None`, after saying why, where
/// the file system (`EINVAL`) or the platform has no direct I/O.
fn open_direct(path: &Path, options: &FileOptions) -> Option<FileDevice> {
    match FileDevice::open_with(path, options) {
        Ok(dev) => Some(dev),
        Err(e)
            if e.raw_os_error() == Some(nix::errno::Errno::EINVAL as i32)
                || e.kind() == std::io::ErrorKind::Unsupported =>
        {
            eprintln!("skipped: no O_DIRECT for {}: {e}", path.display());
            None
        }
        Err(e) => panic!("open {}: {e}", path.display()),
    }
}

/// Direct, read-write, no locks.
const DIRECT_RW: FileOptions = FileOptions {
    writable: true,
    lock: LockMode::NONE,
    direct: true,
};

/// `sectors` sectors of memory that no device takes for `O_DIRECT` (one
/// byte into an aligned buffer), so the device must bounce it.
fn misaligned(storage: &mut AlignedBuf, sectors: usize) -> &mut [Sector] {
    let bytes = &mut storage[1..1 + SECTOR * sectors];
    assert!(!is_aligned(bytes));
    bytes.as_chunks_mut::<SECTOR>().0
}

#[test]
fn unaligned_memory_reads_back_what_it_wrote() {
    let dir = scratch("direct-dev");
    let path = dir.join("file.raw");
    // Three sectors and a partial fourth: the tail reads zero-padded.
    let original = noise(3 * SECTOR + 100, 1);
    std::fs::write(&path, &original).unwrap();
    let Some(mut dev) = open_direct(&path, &DIRECT_RW) else {
        return;
    };
    assert!(dev.is_direct());
    assert_eq!(dev.sector_count(), 4);

    let mut storage = AlignedBuf::new(SECTOR * 301, 0).unwrap();
    let tail = misaligned(&mut storage, 2);
    block_on(dev.read(2, tail)).unwrap();
    let mut expected = original[2 * SECTOR..].to_vec();
    expected.resize(2 * SECTOR, 0);
    assert!(tail.as_flattened() == expected, "tail read");

    // 300 sectors: several bounce pieces, growing the file.
    let data = noise(300 * SECTOR, 2);
    let out = misaligned(&mut storage, 300);
    out.as_flattened_mut().copy_from_slice(&data);
    block_on(dev.write(1, out)).unwrap();
    let mut back = AlignedBuf::new(SECTOR * 301, 0xee).unwrap();
    let back = misaligned(&mut back, 300);
    block_on(dev.read(1, back)).unwrap();
    assert!(back.as_flattened() == data, "read back through the bounce");
    // Aligned memory goes straight to the file.
    let mut aligned = AlignedBuf::new(300 * SECTOR, 0xee).unwrap();
    let sectors = aligned.as_chunks_mut::<SECTOR>().0;
    block_on(dev.read(1, sectors)).unwrap();
    assert!(sectors.as_flattened() == data, "read back aligned");

    // Zeros over the middle, then a flush; the page cache agrees.
    block_on(dev.write_zeros(10, 20)).unwrap();
    block_on(dev.flush()).unwrap();
    let mut expected = original[..SECTOR].to_vec();
    expected.extend_from_slice(&data);
    expected[10 * SECTOR..30 * SECTOR].fill(0);
    assert!(std::fs::read(&path).unwrap() == expected, "file contents");
}

#[test]
fn zeros_over_a_partial_last_sector() {
    let dir = scratch("direct-zeros");
    let path = dir.join("file.raw");
    std::fs::write(&path, noise(2 * SECTOR + 7, 3)).unwrap();
    let Some(mut dev) = open_direct(&path, &DIRECT_RW) else {
        return;
    };
    block_on(dev.write_zeros(1, 4)).unwrap();
    block_on(dev.flush()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 5 * SECTOR);
    assert!(bytes[SECTOR..].iter().all(|&b| b == 0));
}

#[test]
fn images_and_locks_work_direct() {
    let dir = scratch("direct-image");
    let path = dir.join("a.qcow2");
    let image = Image::create(
        FileDevice::create(&path).unwrap(),
        &CreateOptions::new(16 << 20),
    )
    .unwrap();
    image.close().unwrap();
    let options = FileOptions {
        lock: LockMode::WRITE,
        ..DIRECT_RW
    };
    let Some(dev) = open_direct(&path, &options) else {
        return;
    };
    assert_eq!(dev.lock_mode(), LockMode::WRITE);
    // A second reader is refused while the direct writer holds its locks.
    let err = FileDevice::open_locked(&path, false, LockMode::READ).unwrap_err();
    assert!(LockError::from_io(&err).is_some(), "{err}");
    let mut image = Image::open(dev, &OpenOptions::read_write()).unwrap();
    // Odd offsets and lengths, unaligned memory: the core's slices and the
    // caller's bytes go through the bounce.
    let data = noise(300_001, 4);
    image.write_at(12_345, &data).unwrap();
    image.close().unwrap();

    ok(qemu_img(&["check", path_str(&path)]), "qemu-img check");
    let dev = FileDevice::open_locked(&path, false, LockMode::READ).unwrap();
    let mut image = Image::open(dev, &OpenOptions::read_only()).unwrap();
    let mut back = vec![0u8; data.len()];
    image.read_at(12_345, &mut back).unwrap();
    assert!(back == data);
}
