//! External data files against QEMU 10: images `qemu-img create -o
//! data_file=...[,data_file_raw=on]` made and `qemu-io` wrote, read by us
//! and written by us, then read, checked and compared by QEMU; images we
//! create, read by QEMU; `check` counting as `qemu-img check`; a crash at
//! every write of a workload on a data file image; hostile headers.

use qcow2_core::format::header::ExternalFiles;
use qcow2_core::{
    BlockDevice, CheckReport, Corruption, CreateOptions, Error, Feature, OpenOptions, Qcow2,
    Sector, Slot, SECTOR,
};
use qcow2_std_shim::data_file::{attach_data_file, DataFileError, DataFileOptions};
use qcow2_std_shim::{
    block_on, FaultDevice, FaultError, FileDevice, FilePolicy, Image, RamDevice, Survival,
};
use std::cell::Cell;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use test_support::qemu;
use test_support::{noise, path_str, Rng, Scratch};

/// Every cluster size class: 512 B, 4 KiB, 64 KiB (default), 2 MiB.
const CLUSTER_BITS: [u32; 4] = [9, 12, 16, 21];

fn open(path: &Path, writable: bool) -> Image<FileDevice> {
    let dev = FileDevice::open(path, writable).unwrap();
    let options = if writable {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    let mut image = Image::open(dev, &options).unwrap();
    let attached = attach_data_file(&mut image, path, &DataFileOptions::trusting()).unwrap();
    assert!(attached.is_some(), "{} names no data file", path.display());
    image
}

fn read_all(image: &mut Image<FileDevice>) -> Vec<u8> {
    let mut buf = vec![0u8; image.virtual_size() as usize];
    image.read_at(0, &mut buf).unwrap();
    buf
}

/// The guest disk as qemu-img reads it.
fn qemu_contents(dir: &Scratch, image: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-view.raw");
    qemu::convert_to_raw(image, &raw);
    std::fs::read(raw).unwrap()
}

/// Our check report against `qemu-img check`'s, field by field.
fn assert_check_as_qemu(ours: &CheckReport, image: &Path) {
    let (q, code) = qemu::check_json("qemu-img", &["-f", "qcow2"], path_str(image));
    assert_eq!(code, Some(0), "qemu-img check: {q}");
    let get = |k: &str| q.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let theirs = (
        get("corruptions"),
        get("leaks"),
        get("allocated-clusters"),
        get("total-clusters"),
        get("fragmented-clusters"),
        get("compressed-clusters"),
        get("image-end-offset"),
    );
    let mine = (
        ours.corruptions,
        ours.leaks,
        ours.allocated_clusters,
        ours.total_clusters,
        ours.fragmented_clusters,
        ours.compressed_clusters,
        ours.image_end_offset,
    );
    assert_eq!(mine, theirs, "ours {ours:?}, qemu-img {q}");
}

/// Writes `model` as a raw file and has qemu-img compare the image to it.
fn assert_qemu_reads(dir: &Scratch, image: &Path, model: &[u8]) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    qemu::compare_identical(&raw, image);
}

/// One guest-visible change, applied to us or QEMU and to the model.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write { at: u64, len: u64, seed: u64 },
    Zero { at: u64, len: u64, unmap: bool },
    Discard { at: u64, len: u64 },
}

/// A random workload over a disk of `size` bytes with clusters of `cs`:
/// unaligned writes, write-zeroes and cluster-aligned discards.
fn workload(size: u64, cs: u64, seed: u64, n: usize) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let at = rng.below(size);
            let len = (1 + rng.below(3 * cs)).min(size - at);
            match rng.below(6) {
                0 => Op::Zero {
                    at,
                    len,
                    unmap: rng.below(2) == 0,
                },
                1 => {
                    let at = at / cs * cs;
                    let len = (cs * (1 + rng.below(2))).min(size - at);
                    Op::Discard { at, len }
                }
                _ => Op::Write {
                    at,
                    len,
                    seed: seed * 1000 + i as u64,
                },
            }
        })
        .collect()
}

fn apply_model(model: &mut [u8], op: Op, cs: u64) {
    match op {
        Op::Write { at, len, seed } => {
            model[at as usize..(at + len) as usize].copy_from_slice(&noise(len as usize, seed))
        }
        Op::Zero { at, len, .. } => model[at as usize..(at + len) as usize].fill(0),
        Op::Discard { at, len } => {
            // Whole clusters (and the disk's partial last one) read zeros.
            let end = at + len;
            let whole_end = if end == model.len() as u64 {
                end
            } else {
                end / cs * cs
            };
            if whole_end > at {
                model[at as usize..whole_end as usize].fill(0);
            }
        }
    }
}

fn apply_ours(image: &mut Image<FileDevice>, op: Op) {
    match op {
        Op::Write { at, len, seed } => image.write_at(at, &noise(len as usize, seed)).unwrap(),
        Op::Zero { at, len, unmap } => image.write_zeroes_at(at, len, unmap).unwrap(),
        Op::Discard { at, len } => image.discard_at(at, len).unwrap(),
    }
}

/// The same change as a qemu-io command (data written from a file).
fn qemu_command(dir: &Scratch, op: Op, i: usize) -> String {
    match op {
        Op::Write { at, len, seed } => {
            // qemu-io writes patterns only: write the bytes through a raw
            // overlay-free path instead (`write -s FILE`).
            let src = dir.join(format!("src{i}.bin"));
            std::fs::write(&src, noise(len as usize, seed)).unwrap();
            format!("write -s {} {at} {len}", path_str(&src))
        }
        Op::Zero { at, len, unmap } => {
            format!("write -z {}{at} {len}", if unmap { "-u " } else { "" })
        }
        Op::Discard { at, len } => format!("discard {at} {len}"),
    }
}

fn options(cluster_bits: u32, raw: bool, data: &Path) -> String {
    let mut o = format!(
        "cluster_size={},data_file={}",
        1u64 << cluster_bits,
        path_str(data)
    );
    if raw {
        o += ",data_file_raw=on";
    }
    o
}

/// A size that is not a whole number of clusters (the last is partial).
fn disk_size(cluster_bits: u32) -> u64 {
    let cs = 1u64 << cluster_bits;
    (cs * 24).min(8 << 20) + 3 * 512
}

#[test]
fn qemu_images_read_and_written_both_ways() {
    for raw in [false, true] {
        for (k, &bits) in CLUSTER_BITS.iter().enumerate() {
            let dir = Scratch::new(&format!("df-qemu-{bits}-{raw}"));
            let (img, data) = (dir.join("img.qcow2"), dir.join("data.raw"));
            let size = disk_size(bits);
            let cs = 1u64 << bits;
            qemu::create(&img, &options(bits, raw, &data), size);
            // QEMU writes; we read what it reads.
            let seed = 100 + k as u64 + 10 * raw as u64;
            let ops = workload(size, cs, seed, 12);
            let mut model = vec![0u8; size as usize];
            let cmds: Vec<String> = ops
                .iter()
                .enumerate()
                .map(|(i, &op)| {
                    apply_model(&mut model, op, cs);
                    qemu_command(&dir, op, i)
                })
                .collect();
            qemu::io(&img, &cmds);
            assert_eq!(qemu_contents(&dir, &img), model);
            let mut ours = open(&img, false);
            assert_eq!(read_all(&mut ours), model, "reading QEMU's writes");
            assert_check_as_qemu(&ours.check().unwrap(), &img);
            drop(ours);
            // We write; QEMU reads what we read, and checks clean.
            let mut ours = open(&img, true);
            for op in workload(size, cs, seed + 50, 12) {
                apply_model(&mut model, op, cs);
                apply_ours(&mut ours, op);
            }
            assert_eq!(read_all(&mut ours), model);
            let report = ours.check().unwrap();
            assert!(report.is_clean(), "{report:?}");
            ours.close().unwrap();
            qemu::check_clean(&img);
            assert_check_as_qemu(&open(&img, false).check().unwrap(), &img);
            assert_qemu_reads(&dir, &img, &model);
            if raw {
                // The data file is the disk, byte for byte.
                let bytes = std::fs::read(&data).unwrap();
                assert_eq!(&bytes[..size as usize], &model[..], "raw data file");
                assert!(bytes[size as usize..].iter().all(|&b| b == 0));
                assert!(qemu::info(&img)["format-specific"]["data"]["data-file-raw"]
                    .as_bool()
                    .unwrap());
            }
        }
    }
}

#[test]
fn images_we_create_are_qemus() {
    for raw in [false, true] {
        for &bits in &CLUSTER_BITS {
            let dir = Scratch::new(&format!("df-ours-{bits}-{raw}"));
            let (img, data) = (dir.join("img.qcow2"), dir.join("data.raw"));
            let size = disk_size(bits);
            let cs = 1u64 << bits;
            let files = ExternalFiles {
                data_file: Some(b"data.raw"),
                data_file_raw: raw,
                ..ExternalFiles::NONE
            };
            let options = CreateOptions {
                cluster_bits: bits,
                ..CreateOptions::new(size)
            };
            let dev = FileDevice::create(&img).unwrap();
            let cache = qcow2_std_shim::host_cache();
            let image = block_on(Qcow2::create_with_files(dev, cache, options, &files))
                .map_err(|e| e.error)
                .unwrap();
            block_on(image.close()).unwrap();
            // As qemu-img: the data file sized to the disk (to whole
            // clusters with data_file_raw, which maps them all).
            let len = if raw { size.next_multiple_of(cs) } else { size };
            std::fs::File::create(&data).unwrap().set_len(len).unwrap();
            let mut ours = open(&img, true);
            let mut model = vec![0u8; size as usize];
            for op in workload(size, cs, 7 + bits as u64, 16) {
                apply_model(&mut model, op, cs);
                apply_ours(&mut ours, op);
            }
            // The last sector of the disk, in its partial last cluster.
            let tail = noise(512, 99);
            ours.write_at(size - 512, &tail).unwrap();
            model[size as usize - 512..].copy_from_slice(&tail);
            ours.close().unwrap();
            // qemu-img opens the relative name from its working directory.
            let check = Command::new("qemu-img")
                .current_dir(dir.dir())
                .args(["check", "-f", "qcow2", "--output", "json", "img.qcow2"])
                .output()
                .unwrap();
            assert!(check.status.success(), "{check:?}");
            let q = qemu::json(&String::from_utf8_lossy(&check.stdout));
            let r = open(&img, false).check().unwrap();
            let get = |k: &str| q.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            assert_eq!(
                (
                    r.corruptions,
                    r.leaks,
                    r.allocated_clusters,
                    r.fragmented_clusters
                ),
                (0, 0, get("allocated-clusters"), get("fragmented-clusters")),
                "{q}"
            );
            assert_eq!(r.image_end_offset, get("image-end-offset"), "{q}");
            let out = Command::new("qemu-img")
                .current_dir(dir.dir())
                .args([
                    "convert",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    "img.qcow2",
                    "view.raw",
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            assert_eq!(std::fs::read(dir.join("view.raw")).unwrap(), model);
            if raw {
                let bytes = std::fs::read(&data).unwrap();
                assert_eq!(&bytes[..size as usize], &model[..], "raw data file");
            }
        }
    }
}

#[test]
fn relative_names_resolve_against_the_image_directory() {
    let dir = Scratch::new("df-relative");
    let out = Command::new("qemu-img")
        .current_dir(dir.dir())
        .args(["create", "-q", "-f", "qcow2", "-o", "data_file=rel.raw"])
        .args(["img.qcow2", "1M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let img = dir.join("img.qcow2");
    let out = Command::new("qemu-io")
        .current_dir(dir.dir())
        .args(["-f", "qcow2", "-c", "write -P 0x5c 4096 4096", "img.qcow2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let dev = FileDevice::open(&img, false).unwrap();
    let mut image = Image::open(dev, &OpenOptions::read_only()).unwrap();
    // Not from the test's working directory (QEMU's rule).
    let cwd_options = DataFileOptions {
        relative_to_cwd: true,
        ..DataFileOptions::trusting()
    };
    let err = attach_data_file(&mut image, &img, &cwd_options).unwrap_err();
    assert!(
        matches!(&err, DataFileError::Open { path, .. } if path == Path::new("rel.raw")),
        "{err}"
    );
    let path = attach_data_file(&mut image, &img, &DataFileOptions::trusting()).unwrap();
    assert_eq!(path, Some(dir.join("rel.raw")));
    let mut buf = vec![0u8; 8192];
    image.read_at(0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert!(buf[4096..].iter().all(|&b| b == 0x5c));
}

#[test]
fn hostile_headers_give_precise_errors() {
    use test_support::raw::{poke, poke64};
    let dir = Scratch::new("df-hostile");
    let plain = dir.join("plain.qcow2");
    qemu::create(&plain, "", 1 << 20);
    let deny = |_: &Path| false;
    let deny_all = DataFileOptions {
        policy: FilePolicy {
            allow: &deny,
            ..FilePolicy::trusting()
        },
        ..DataFileOptions::trusting()
    };

    // The feature bit without the extension: the caller must name the file.
    let bit_only = dir.join("bit-only.qcow2");
    std::fs::copy(&plain, &bit_only).unwrap();
    poke64(&bit_only, 72, 1 << 2);
    let dev = FileDevice::open(&bit_only, false).unwrap();
    let mut image = Image::open(dev, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 512];
    match image.read_at(0, &mut buf) {
        Err(Error::Unsupported(what)) => assert_eq!(what, Feature::DataFileNotAttached),
        other => panic!("read without the data file: {other:?}"),
    }
    let err = attach_data_file(&mut image, &bit_only, &DataFileOptions::trusting()).unwrap_err();
    assert!(matches!(err, DataFileError::Required));
    assert_eq!(err.to_string(), "'data-file' is required for this image");
    // QEMU says the same.
    let out = test_support::qemu_io(&["-f", "qcow2", "-c", "read 0 512", path_str(&bit_only)]);
    assert!(test_support::stderr(&out).contains("'data-file' is required for this image"));
    // Given by the caller, it is used (no allow asked).
    let given = dir.join("given.raw");
    std::fs::write(&given, vec![0x77u8; 4096]).unwrap();
    let with_given = DataFileOptions {
        policy: FilePolicy {
            allow: &deny,
            ..FilePolicy::trusting()
        },
        data_file: Some(&given),
        ..DataFileOptions::trusting()
    };
    assert_eq!(
        attach_data_file(&mut image, &bit_only, &with_given).unwrap(),
        Some(given.clone())
    );
    // Unallocated still reads zeros: nothing is mapped.
    image.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    // An extension with an empty name (length 0) and the bit: no name.
    let empty = dir.join("empty-name.qcow2");
    std::fs::copy(&bit_only, &empty).unwrap();
    poke(&empty, 112, &0x4441_5441u32.to_be_bytes());
    poke(&empty, 116, &0u32.to_be_bytes());
    poke(&empty, 120, &[0; 8]);
    let dev = FileDevice::open(&empty, false).unwrap();
    let mut image = Image::open(dev, &OpenOptions::read_only()).unwrap();
    let err = attach_data_file(&mut image, &empty, &DataFileOptions::trusting()).unwrap_err();
    assert!(matches!(err, DataFileError::Required), "{err}");

    // The extension without the bit: ignored, as QEMU ignores it.
    let name_only = dir.join("name-only.qcow2");
    std::fs::copy(&plain, &name_only).unwrap();
    poke(&name_only, 112, &0x4441_5441u32.to_be_bytes());
    poke(&name_only, 116, &8u32.to_be_bytes());
    poke(&name_only, 120, b"/etc/pwd");
    poke(&name_only, 128, &[0; 8]);
    let dev = FileDevice::open(&name_only, false).unwrap();
    let mut image = Image::open(dev, &OpenOptions::read_only()).unwrap();
    assert_eq!(
        attach_data_file(&mut image, &name_only, &deny_all).unwrap(),
        None
    );
    image.read_at(0, &mut buf).unwrap();
    let err = attach_data_file(&mut image, &name_only, &with_given).unwrap_err();
    assert!(matches!(err, DataFileError::NotExternal), "{err}");

    // A name the caller does not allow is never opened.
    let named = dir.join("named.qcow2");
    std::fs::copy(&name_only, &named).unwrap();
    poke64(&named, 72, 1 << 2);
    let dev = FileDevice::open(&named, false).unwrap();
    let mut image = Image::open(dev, &OpenOptions::read_only()).unwrap();
    let err = attach_data_file(&mut image, &named, &deny_all).unwrap_err();
    assert!(
        matches!(&err, DataFileError::Refused { path } if path == Path::new("/etc/pwd")),
        "{err}"
    );

    // The raw bit without a data file: refused at open, as QEMU does.
    let raw_only = dir.join("raw-only.qcow2");
    std::fs::copy(&plain, &raw_only).unwrap();
    poke64(&raw_only, 88, 1 << 1);
    let dev = FileDevice::open(&raw_only, false).unwrap();
    match Image::open(dev, &OpenOptions::read_only()) {
        Err(Error::Corrupt { what, .. }) => {
            assert_eq!(what, Corruption::RawDataWithoutDataFile)
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened an image with data_file_raw and no data file"),
    }
    let out = test_support::qemu_io(&["-f", "qcow2", "-c", "read 0 512", path_str(&raw_only)]);
    assert!(test_support::stderr(&out).contains("data-file-raw requires a data file"));
}

#[test]
fn compressed_clusters_are_corruption() {
    use test_support::raw::poke64;
    let dir = Scratch::new("df-compressed");
    let (img, data) = (dir.join("img.qcow2"), dir.join("data.raw"));
    qemu::create(&img, &options(16, false, &data), 1 << 20);
    // QEMU refuses compressed writes to such images.
    let out = test_support::qemu_io(&["-f", "qcow2", "-c", "write -c 0 64k", path_str(&img)]);
    assert!(
        test_support::stdout(&out).contains("Operation not supported"),
        "{out:?}"
    );
    qemu::io(&img, &["write -P 1 0 64k"]);
    // Guest cluster 0 made a compressed entry by hand: both refuse to read
    // it, and both checks count one corruption.
    let l1 = test_support::raw::peek64(&img, 40);
    let l2 = test_support::raw::peek64(&img, l1) & 0x00ff_ffff_ffff_fe00;
    poke64(&img, l2, (1 << 62) | 0x30000);
    let mut image = open(&img, false);
    let mut buf = vec![0u8; 512];
    assert!(matches!(
        image.read_at(0, &mut buf),
        Err(Error::Corrupt {
            what: Corruption::CompressedWithDataFile,
            ..
        })
    ));
    let report = image.check().unwrap();
    assert_eq!(report.corruptions, 1, "{report:?}");
    let (q, _) = qemu::check_json("qemu-img", &["-f", "qcow2"], path_str(&img));
    assert_eq!(q["corruptions"].as_u64(), Some(1), "{q}");
    let allocated = q["allocated-clusters"].as_u64().unwrap_or(0);
    assert_eq!((allocated, report.allocated_clusters), (0, 0), "{q}");
}

/// A device over a [`FaultDevice`] whose write count and crash point are
/// shared with another: a crash at write N of the two devices together.
struct Shared {
    dev: FaultDevice,
    /// (writes so far, crash at, crashed)
    state: Rc<Cell<(u64, u64, bool)>>,
}

impl Shared {
    fn gone(&self) -> bool {
        self.state.get().2
    }
}

impl BlockDevice for Shared {
    type Error = FaultError;
    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), FaultError> {
        if self.gone() {
            return Err(FaultError::Crashed);
        }
        self.dev.read(first, buf).await
    }
    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), FaultError> {
        let (n, at, gone) = self.state.get();
        if gone || n == at {
            self.state.set((n, at, true));
            return Err(FaultError::Crashed);
        }
        self.state.set((n + 1, at, false));
        self.dev.write(first, buf).await
    }
    async fn flush(&mut self) -> Result<(), FaultError> {
        if self.gone() {
            return Err(FaultError::Crashed);
        }
        self.dev.flush().await
    }
    fn sector_count(&self) -> u64 {
        self.dev.sector_count()
    }
    async fn set_sector_count(&mut self, n: u64) -> Result<(), FaultError> {
        if self.gone() {
            return Err(FaultError::Crashed);
        }
        self.dev.set_sector_count(n).await
    }
    async fn discard(&mut self, first: u64, count: u64) -> Result<(), FaultError> {
        if self.gone() {
            return Err(FaultError::Crashed);
        }
        self.dev.discard(first, count).await
    }
}

type CrashImage = Qcow2<Shared, Vec<Slot<1>>, 1>;
type Survivor = Qcow2<RamDevice, Vec<Slot<1>>, 1>;

const CRASH_CLUSTER_BITS: u32 = 10;
const CRASH_SECTORS: u64 = 64;

/// The crash workload: (first sector, sectors, fill byte; 0 discards,
/// 1 write-zeroes), with flushes after some steps.
const STEPS: [(u64, u64, u8, bool); 16] = [
    (0, 3, 0x10, false),
    (5, 4, 0x11, true),
    (1, 2, 0x12, false),
    (16, 6, 0x13, false),
    (4, 4, 0, true),
    (2, 1, 1, false),
    (30, 5, 0x14, true),
    (17, 2, 0x15, false),
    (40, 8, 0, false),
    (60, 4, 0x16, false),
    (44, 6, 0x17, true),
    (0, 2, 0, false),
    (1, 6, 0x18, false),
    (20, 10, 1, false),
    (22, 3, 0x19, true),
    (50, 9, 0x1a, false),
];

/// A fresh data file image in RAM (meta, data), with `raw`.
fn crash_base(raw: bool) -> (Vec<u8>, Vec<u8>) {
    let files = ExternalFiles {
        data_file: Some(b"d.raw"),
        data_file_raw: raw,
        ..ExternalFiles::NONE
    };
    let options = CreateOptions {
        cluster_bits: CRASH_CLUSTER_BITS,
        ..CreateOptions::new(CRASH_SECTORS * SECTOR as u64)
    };
    let cache = vec![Slot::<1>::EMPTY; 8];
    let image = block_on(Qcow2::create_with_files(
        RamDevice::new(),
        cache,
        options,
        &files,
    ))
    .map_err(|e| e.error)
    .unwrap();
    let (meta, _) = block_on(image.close()).unwrap();
    let data = if raw {
        vec![0u8; (CRASH_SECTORS * SECTOR as u64) as usize]
    } else {
        Vec::new()
    };
    (meta.as_bytes().to_vec(), data)
}

/// Runs the workload, crashing at write `at` of both devices together;
/// returns the image if the crash point was reached, and for each sector
/// the fill bytes it may read after the crash.
fn crash_run(raw: bool, at: u64) -> (Option<CrashImage>, Vec<Vec<u8>>) {
    let (meta, data) = crash_base(raw);
    let state = Rc::new(Cell::new((0, at, false)));
    let shared = |bytes: &[u8]| Shared {
        dev: FaultDevice::from_bytes(bytes),
        state: state.clone(),
    };
    let mut allowed: Vec<Vec<u8>> = vec![vec![0]; CRASH_SECTORS as usize];
    let cache = vec![Slot::<1>::EMPTY; 8];
    let mut image: CrashImage =
        match block_on(Qcow2::open(shared(&meta), cache, OpenOptions::read_write())) {
            Ok(image) => image,
            Err(_) => return (None, allowed),
        };
    if block_on(image.attach_data_file(shared(&data))).is_err() {
        return (None, allowed);
    }
    for &(first, n, fill, flush) in &STEPS {
        let range = first as usize..(first + n) as usize;
        let value = if fill <= 1 { 0 } else { fill };
        for a in &mut allowed[range.clone()] {
            a.push(value);
        }
        let done = match fill {
            0 => block_on(image.discard(first, n)).map(|_| {
                // Only whole clusters change.
            }),
            1 => block_on(image.write_zeroes(first, n, false)),
            _ => block_on(image.write(first, &vec![[fill; SECTOR]; n as usize])),
        };
        if fill == 0 {
            // A discard leaves partial clusters alone: the old value stays.
        }
        let flushed = done.and_then(|_| {
            if flush {
                block_on(image.flush())
            } else {
                Ok(())
            }
        });
        if flushed.is_err() {
            return (state.get().2.then_some(image), allowed);
        }
        if flush {
            // Durable now: only the current value (or later ones).
            let mut buf = vec![[0u8; SECTOR]; CRASH_SECTORS as usize];
            block_on(image.read(0, &mut buf)).unwrap();
            for (a, s) in allowed.iter_mut().zip(&buf) {
                *a = vec![s[0]];
            }
        }
    }
    (None, allowed)
}

fn open_survivor(meta: RamDevice, data: RamDevice) -> Survivor {
    let cache = vec![Slot::<1>::EMPTY; 8];
    let mut image: Survivor = block_on(Qcow2::open(meta, cache, OpenOptions::read_write()))
        .map_err(|e| e.error)
        .unwrap();
    block_on(image.attach_data_file(data)).unwrap();
    image
}

#[test]
fn a_crash_at_every_write_leaves_a_consistent_image() {
    let dir = Scratch::new("df-crash");
    let mut points = 0;
    for raw in [false, true] {
        for at in 0.. {
            let (crashed, allowed) = crash_run(raw, at);
            let Some(image) = crashed else {
                break;
            };
            points += 1;
            let (meta, _, data) = image.abandon_with_data_file();
            let data = data.unwrap();
            for (k, survival) in [
                Survival::FlushedOnly,
                Survival::AllWrites,
                Survival::RandomSubset(at * 7 + 1),
            ]
            .into_iter()
            .enumerate()
            {
                let (m, d) = (meta.dev.survivor(survival), data.dev.survivor(survival));
                let (m_bytes, d_bytes) = (m.as_bytes().to_vec(), d.as_bytes().to_vec());
                let mut image = open_survivor(m, d);
                let mut scratch = vec![0u8; 4096];
                let report = block_on(image.check(&mut scratch)).unwrap();
                assert_eq!(report.corruptions, 0, "raw {raw} write {at}: {report:?}");
                let mut buf = vec![[0u8; SECTOR]; CRASH_SECTORS as usize];
                block_on(image.read(0, &mut buf)).unwrap();
                for (i, s) in buf.iter().enumerate() {
                    assert!(
                        s.iter().all(|&b| b == s[0]) && allowed[i].contains(&s[0]),
                        "raw {raw} write {at} {survival:?}: sector {i} reads {:#x}, allowed {:x?}",
                        s[0],
                        allowed[i]
                    );
                }
                if k == 2 && at % 4 == 0 {
                    // qemu-img agrees (it opens d.raw from its directory).
                    std::fs::write(dir.join("img.qcow2"), &m_bytes).unwrap();
                    std::fs::write(dir.join("d.raw"), &d_bytes).unwrap();
                    let out = Command::new("qemu-img")
                        .current_dir(dir.dir())
                        .args(["check", "-f", "qcow2", "--output", "json", "img.qcow2"])
                        .output()
                        .unwrap();
                    let json = qemu::json(&String::from_utf8_lossy(&out.stdout));
                    assert_eq!(
                        json["corruptions"].as_u64().unwrap_or(0),
                        0,
                        "raw {raw} write {at}: {json}"
                    );
                }
            }
        }
    }
    eprintln!("{points} crash points");
    assert!(points > 60, "{points} crash points");
}
