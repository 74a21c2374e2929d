//! Interoperability with QEMU 10 (`qemu-img`, `qemu-io`), used as the oracle.
//!
//! * QEMU writes, we read: a matrix of cluster sizes, refcount widths,
//!   versions and lazy refcounts; every byte QEMU maps is compared, and our
//!   own mapping must agree with `qemu-img map`. Then we write into QEMU's
//!   layout and `qemu-img check` / `compare` must stay happy.
//! * We write, QEMU reads: the same matrix created and written by us, checked
//!   with `qemu-img check`, compared with a flat model file by
//!   `qemu-img compare`, and read back by us.
//! * 2 PiB sparse images, both ways.
//! * 512-byte clusters: refcount blocks and refcount table growth (and
//!   relocation) for every refcount width.
//! * Guest offsets beyond 4 GiB everywhere, host offsets beyond 4 GiB in
//!   sparse host files.
//! * QEMU features we only read (compressed clusters, snapshots), crashes
//!   with lazy refcounts repaired by either side, persistent bitmaps,
//!   QEMU-grown refcount tables and L1 tables, empty disks.
//! * Ping-pong: QEMU and we take turns writing one image.
//!
//! Set `QCOW2_TEST_KEEP=1` to keep the temporary directories.

use qcow2_core::{CreateOptions, Error, Feature, Mapping, OpenOptions, Version};
use qcow2_std_shim::{FileDevice, Image};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::Instant;
use test_support::model::{assert_same_bytes, read_file_at, RawModel, SparseModel};
use test_support::process::describe;
use test_support::qemu::{self, Extent};
use test_support::{path_str, pattern_at, run, stdout, Rng, Scratch, GIB, KIB, MIB, PIB};

// ---------------------------------------------------------------------------
// Our side
// ---------------------------------------------------------------------------

fn open_ro(path: &Path) -> Image<FileDevice> {
    let dev = FileDevice::open(path, false).expect("open image file");
    Image::open(dev, &OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("open {} read-only: {e}", path.display()))
}

fn open_rw(path: &Path) -> Image<FileDevice> {
    let dev = FileDevice::open(path, true).expect("open image file");
    Image::open(dev, &OpenOptions::read_write())
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", path.display()))
}

fn our_write(img: &mut Image<FileDevice>, offset: u64, data: &[u8]) {
    img.write_at(offset, data)
        .unwrap_or_else(|e| panic!("our write of {} bytes at {offset:#x}: {e}", data.len()));
}

fn our_read(img: &mut Image<FileDevice>, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    img.read_at(offset, &mut buf)
        .unwrap_or_else(|e| panic!("our read of {len} bytes at {offset:#x}: {e}"));
    buf
}

/// Compares our reading of `[offset, offset+len)` with `expected`, in chunks.
fn compare_range(
    img: &mut Image<FileDevice>,
    offset: u64,
    len: u64,
    expected: &dyn Fn(u64, &mut [u8]),
) {
    const CHUNK: u64 = 4 * MIB;
    let mut pos = offset;
    while pos < offset + len {
        let n = CHUNK.min(offset + len - pos);
        let ours = our_read(img, pos, n);
        let mut want = vec![0u8; n as usize];
        expected(pos, &mut want);
        assert_same_bytes("our read", pos, &ours, &want);
        pos += n;
    }
}

/// Above this many L2 tables' worth of guest space, an unallocated extent
/// is sampled rather than walked with our `map`.
const MAX_WALKED_L2_RANGES: u64 = 1 << 18;

/// Checks our view of the image against QEMU's: for every extent of
/// `qemu-img map`, our mapping must agree (data at the same host offset,
/// zero clusters, unallocated), data bytes must equal `expected` (in full
/// up to `data_limit` bytes per extent, sampled beyond), and non-data
/// extents must read as zeros (in full up to 4 MiB, sampled beyond).
fn verify_against_qemu(
    img: &mut Image<FileDevice>,
    extents: &[Extent],
    expected: &dyn Fn(u64, &mut [u8]),
    data_limit: u64,
) {
    let size = img.virtual_size();
    let cs = img.info().cluster_size;
    let l2_range = cs * (cs / 8);
    let mut pos = 0;
    for e in extents {
        assert_eq!(e.start, pos, "qemu-img map extents are contiguous");
        let end = e.start + e.length;
        // Mapping agreement.
        if e.data || e.length / l2_range <= MAX_WALKED_L2_RANGES {
            let mut at = e.start;
            while at < end {
                let (m, n) = img
                    .map(at)
                    .unwrap_or_else(|err| panic!("our map at {at:#x}: {err}"));
                assert!(n > 0, "our map returns an empty run at {at:#x}");
                match (e.data, e.present, m) {
                    (true, _, Mapping::Data { host }) => {
                        let want = e.offset.expect("data extent with offset") + (at - e.start);
                        assert_eq!(
                            host, want,
                            "guest {at:#x}: we map to host {host:#x}, QEMU to {want:#x}"
                        );
                    }
                    (false, true, Mapping::Zero) | (false, false, Mapping::Unallocated) => {}
                    _ => panic!("guest {at:#x}: we map {m:?}, QEMU says {e:?}"),
                }
                at += n.min(end - at);
            }
        }
        // Contents.
        if e.length <= if e.data { data_limit } else { 4 * MIB } {
            compare_range(img, e.start, e.length, expected);
        } else {
            let sample = 64 * KIB;
            let mid = (e.start + e.length / 2) / 512 * 512;
            for at in [e.start, mid, end - sample] {
                compare_range(img, at, sample, expected);
            }
        }
        pos = end;
    }
    assert_eq!(pos, size, "qemu-img map covers the disk");
}

/// Random writes of 1 byte to 12 KiB at random (unaligned) offsets covering
/// about `total` bytes of `size`, with a reopen halfway.
fn random_writes(
    path: &Path,
    model: &RawModel,
    size: u64,
    total: u64,
    seed: u64,
    first: Option<Image<FileDevice>>,
) {
    let mut rng = Rng::new(seed);
    let mut img = first.unwrap_or_else(|| open_rw(path));
    let mut written = 0;
    let mut reopened = false;
    let mut n = 0u64;
    while written < total {
        let len = 1 + rng.below(12 * KIB);
        let offset = rng.below(size - len);
        let data = pattern_at(seed.wrapping_add(n), offset, len);
        our_write(&mut img, offset, &data);
        model.write(offset, &data);
        written += len;
        n += 1;
        if !reopened && written >= total / 2 {
            img.close().expect("close");
            img = open_rw(path);
            reopened = true;
        }
    }
    img.close().expect("close");
}

/// Full verification of one of our images against a flat model.
fn verify_ours_fully(path: &Path, model: &RawModel, size: u64) {
    qemu::check_clean(path);
    model.assert_matches(path);
    let expected = |at: u64, buf: &mut [u8]| model.read(at, buf);
    let extents = qemu::map(path);
    let mut img = open_ro(path);
    assert_eq!(img.virtual_size(), size);
    verify_against_qemu(&mut img, &extents, &expected, u64::MAX);
}

/// The refcount table's host offset and size in clusters, from the header
/// of the image at `path`.
fn reftable(path: &Path) -> (u64, u32) {
    let mut img = open_ro(path);
    let h = img.inner_mut().header();
    (h.refcount_table_offset, h.refcount_table_clusters)
}

/// Like [`reftable`], for an image we hold open.
fn reftable_of(img: &Image<FileDevice>) -> (u64, u32) {
    // `Image::inner_mut` needs `&mut`; re-read the header from the file.
    let mut buf = [0u8; 512];
    img.device()
        .file()
        .read_exact_at(&mut buf, 0)
        .expect("read header");
    let table = u64::from_be_bytes(buf[48..56].try_into().unwrap());
    let clusters = u32::from_be_bytes(buf[56..60].try_into().unwrap());
    (table, clusters)
}

/// Our reads around each op: the op's range with a margin on both sides.
fn windows(plan: &[Op], size: u64) -> Vec<(u64, u64)> {
    plan.iter()
        .map(|o| {
            let start = o.offset.saturating_sub(8 * KIB) / 512 * 512;
            let end = (o.offset + o.len + 8 * KIB).min(size);
            (start, end - start)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The configuration matrix and the write plans
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Config {
    cluster_bits: u32,
    refcount_order: u32,
    version: Version,
    lazy: bool,
}

impl Config {
    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn name(&self) -> String {
        format!(
            "c{}-r{}-{}{}",
            self.cluster_size(),
            1 << self.refcount_order,
            self.version.compat(),
            if self.lazy { "-lazy" } else { "" }
        )
    }

    fn qemu_options(&self) -> String {
        format!(
            "cluster_size={},refcount_bits={},compat={},lazy_refcounts={}",
            self.cluster_size(),
            1 << self.refcount_order,
            self.version.compat(),
            if self.lazy { "on" } else { "off" }
        )
    }

    fn create_options(&self, size: u64) -> CreateOptions {
        CreateOptions {
            size,
            cluster_bits: self.cluster_bits,
            refcount_order: self.refcount_order,
            version: self.version,
            lazy_refcounts: self.lazy,
            ..CreateOptions::new(size)
        }
    }
}

/// For one cluster size: 1-, 16- and 64-bit refcounts with compat 1.1,
/// compat 0.10, and lazy refcounts.
fn configs_for(cluster_bits: u32) -> Vec<Config> {
    let v3 = |refcount_order, lazy| Config {
        cluster_bits,
        refcount_order,
        version: Version::V3,
        lazy,
    };
    vec![
        v3(0, false),
        v3(4, false),
        v3(6, false),
        Config {
            cluster_bits,
            refcount_order: 4,
            version: Version::V2,
            lazy: false,
        },
        v3(4, true),
    ]
}

/// Virtual size for the matrix: at least two L2 tables' worth, beyond 6 GiB
/// (so some data lies past 4 GiB), and ending in a partial cluster.
fn matrix_size(cs: u64) -> u64 {
    (2 * cs * (cs / 8)).max(6 * GIB) + 3 * cs + 1536
}

#[derive(Debug, Clone, Copy)]
enum OpKind {
    /// `write -P tag` for QEMU; pseudo-random data seeded by `tag` for us.
    Data(u8),
    /// `write -z` (zero clusters, keeping allocation).
    Zero,
    /// `write -z -u` (zero clusters, may deallocate).
    ZeroUnmap,
    /// `discard`.
    Discard,
}

#[derive(Debug, Clone, Copy)]
struct Op {
    kind: OpKind,
    offset: u64,
    len: u64,
}

const fn op(kind: OpKind, offset: u64, len: u64) -> Op {
    Op { kind, offset, len }
}

impl Op {
    fn qemu_command(&self) -> String {
        let (o, l) = (self.offset, self.len);
        match self.kind {
            OpKind::Data(tag) => format!("write -P {tag:#04x} {o} {l}"),
            OpKind::Zero => format!("write -z {o} {l}"),
            OpKind::ZeroUnmap => format!("write -z -u {o} {l}"),
            OpKind::Discard => format!("discard {o} {l}"),
        }
    }

    /// The bytes this op leaves when QEMU runs it.
    fn qemu_bytes(&self) -> Vec<u8> {
        match self.kind {
            OpKind::Data(tag) => vec![tag; self.len as usize],
            _ => vec![0; self.len as usize],
        }
    }

    /// The bytes we write for this op (we have no zero-write call: zeros
    /// are written as data).
    fn our_bytes(&self) -> Vec<u8> {
        match self.kind {
            OpKind::Data(tag) => pattern_at(u64::from(tag), self.offset, self.len),
            _ => vec![0; self.len as usize],
        }
    }
}

/// Writes crossing cluster boundaries, L2-table boundaries (below and
/// beyond 4 GiB), the end of the disk, zeroing (kept and unmapped),
/// discards, and overwrites of all of those.
fn matrix_plan(cs: u64, size: u64) -> Vec<Op> {
    use OpKind::*;
    let l2 = cs * (cs / 8);
    let high_l2 = l2 * 2.max(4 * GIB / l2 + 1);
    let g4 = 4 * GIB;
    vec![
        op(Data(0x11), 0, 3 * cs / 2 + 700),
        op(Data(0x22), 4 * cs + cs / 2 + 100, 2 * cs + 333),
        op(Data(0x33), l2 - cs - 512, 2 * cs + 1024),
        op(Data(0x44), g4 + 7 * cs - 100, 2 * cs + 200),
        op(Data(0x55), high_l2 - cs / 2 - 519, cs + 2048),
        op(Data(0x66), size - 2 * cs - 700, 2 * cs + 700),
        op(Zero, cs, cs),
        op(Zero, 5 * cs, cs),
        op(ZeroUnmap, l2 - cs, cs),
        op(Zero, 4 * cs + cs / 2 + 150, 300),
        op(Zero, 10 * cs, 2 * cs),
        op(Discard, l2, cs),
        op(Data(0x77), cs / 2, cs),
        op(Data(0x88), l2 - cs + 100, 200),
        op(Data(0x99), g4 + 7 * cs + 1000, cs),
        op(Data(0xaa), l2 + 300, cs),
    ]
}

/// Our writes on top of [`matrix_plan`]'s result: over QEMU's data, its
/// preallocated zero cluster, plain zero clusters, discarded clusters,
/// across the L2 boundary, beyond 4 GiB and at the end of the disk.
fn followup_plan(cs: u64, size: u64) -> Vec<Op> {
    use OpKind::*;
    let l2 = cs * (cs / 8);
    vec![
        op(Data(0xb1), cs / 2 + 10, 2 * cs),
        op(Data(0xb2), 5 * cs + 64, 128),
        op(Data(0xb3), 10 * cs + 100, cs),
        op(Data(0xb4), l2 - cs / 2, cs),
        op(Data(0xb5), 4 * GIB + 6 * cs, 3 * cs),
        op(Data(0xb6), size / 2 / 512 * 512 + 77, cs + 1000),
        op(Data(0xb7), size - cs - 100, cs + 100),
    ]
}

/// Checks `qemu-img info` against the configuration we created.
fn assert_qemu_info(path: &Path, c: &Config, size: u64) {
    let info = qemu::info(path);
    assert_eq!(info["virtual-size"], size, "{info:?}");
    assert_eq!(info["cluster-size"], c.cluster_size(), "{info:?}");
    assert_eq!(info["dirty-flag"], false, "{info:?}");
    let data = &info["format-specific"]["data"];
    assert!(data.is_object(), "format-specific data: {info:?}");
    assert_eq!(data["compat"], c.version.compat(), "{info:?}");
    assert_eq!(data["refcount-bits"], 1u64 << c.refcount_order, "{info:?}");
    if c.version == Version::V3 {
        assert_eq!(data["lazy-refcounts"], c.lazy, "{info:?}");
        assert_eq!(data["corrupt"], false, "{info:?}");
    }
}

/// Runs `f` for every configuration, collecting failures, then fails with
/// the list of failing configurations.
fn for_each_config(configs: &[Config], f: impl Fn(&Config)) {
    let mut failed = Vec::new();
    for c in configs {
        let t = Instant::now();
        match catch_unwind(AssertUnwindSafe(|| f(c))) {
            Ok(()) => eprintln!("{}: ok in {:.2?}", c.name(), t.elapsed()),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("{}: FAILED: {msg}", c.name());
                failed.push(format!("{}: {msg}", c.name()));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} configurations failed:\n{}",
        failed.len(),
        configs.len(),
        failed.join("\n")
    );
}

// ---------------------------------------------------------------------------
// 1. QEMU writes, we read (then we write, QEMU checks)
// ---------------------------------------------------------------------------

fn qemu_writes_we_read(c: &Config) {
    let dir = Scratch::new(&format!("qemu-writes-{}", c.name()));
    let path = dir.join("qemu.qcow2");
    let raw_path = dir.join("expected.raw");
    let cs = c.cluster_size();
    let size = matrix_size(cs);
    qemu::create(&path, &c.qemu_options(), size);
    let plan = matrix_plan(cs, size);
    qemu::io(
        &path,
        &plan.iter().map(Op::qemu_command).collect::<Vec<_>>(),
    );
    qemu::check_clean(&path);
    qemu::convert_to_raw(&path, &raw_path);
    let raw = File::open(&raw_path).expect("open converted raw");
    assert_eq!(raw.metadata().unwrap().len(), size, "converted size");

    // Sanity of the oracle: the converted image holds what we asked QEMU for.
    let mut model = SparseModel::default();
    for o in &plan {
        model.write(o.offset, &o.qemu_bytes());
    }
    for o in &plan {
        let mut from_raw = vec![0; o.len as usize];
        let mut from_model = vec![0; o.len as usize];
        read_file_at(&raw, o.offset, &mut from_raw);
        model.read(o.offset, &mut from_model);
        assert_same_bytes(
            "QEMU's converted image vs plan",
            o.offset,
            &from_raw,
            &from_model,
        );
    }

    let expected = |at: u64, buf: &mut [u8]| read_file_at(&raw, at, buf);
    let extents = qemu::map(&path);
    {
        let mut img = open_ro(&path);
        let info = img.info();
        assert_eq!(info.virtual_size, size);
        assert_eq!(info.cluster_size, cs);
        assert_eq!(info.refcount_bits, 1 << c.refcount_order);
        assert_eq!(info.version, c.version);
        assert_eq!(info.lazy_refcounts, c.lazy);
        assert!(!info.dirty && !info.corrupt && info.read_only);
        verify_against_qemu(&mut img, &extents, &expected, u64::MAX);
    }

    // Opening read-write and closing changes nothing QEMU cares about.
    open_rw(&path).close().expect("close");
    qemu::check_clean(&path);
    qemu::compare_identical(&raw_path, &path);

    // Our writes into QEMU's layout.
    let model = RawModel::open(&raw_path);
    let mut img = open_rw(&path);
    for o in followup_plan(cs, size) {
        let data = o.our_bytes();
        our_write(&mut img, o.offset, &data);
        model.write(o.offset, &data);
    }
    img.close().expect("close");
    qemu::check_clean(&path);
    qemu::compare_identical(&raw_path, &path);
    let extents = qemu::map(&path);
    let mut img = open_ro(&path);
    verify_against_qemu(&mut img, &extents, &expected, u64::MAX);
}

#[test]
fn qemu_writes_we_read_512_byte_clusters() {
    for_each_config(&configs_for(9), qemu_writes_we_read);
}

#[test]
fn qemu_writes_we_read_4k_clusters() {
    for_each_config(&configs_for(12), qemu_writes_we_read);
}

#[test]
fn qemu_writes_we_read_64k_clusters() {
    for_each_config(&configs_for(16), qemu_writes_we_read);
}

#[test]
fn qemu_writes_we_read_2m_clusters() {
    for_each_config(&configs_for(21), qemu_writes_we_read);
}

// ---------------------------------------------------------------------------
// 2. We write, QEMU reads
// ---------------------------------------------------------------------------

fn we_write_qemu_reads(c: &Config) {
    let dir = Scratch::new(&format!("we-write-{}", c.name()));
    let path = dir.join("ours.qcow2");
    let raw_path = dir.join("expected.raw");
    let cs = c.cluster_size();
    let size = matrix_size(cs);
    let model = RawModel::create(&raw_path, size);
    let mut plan = matrix_plan(cs, size);
    plan.extend(followup_plan(cs, size));
    let (first, second) = plan.split_at(8);

    let dev = FileDevice::create(&path).expect("create image file");
    let mut img = Image::create(dev, &c.create_options(size))
        .unwrap_or_else(|e| panic!("create {}: {e}", c.name()));
    for o in first {
        let data = o.our_bytes();
        our_write(&mut img, o.offset, &data);
        model.write(o.offset, &data);
    }
    img.close().expect("close");
    // Rewrites after a reopen: allocation restarts from the file's end.
    let mut img = open_rw(&path);
    for o in second {
        let data = o.our_bytes();
        our_write(&mut img, o.offset, &data);
        model.write(o.offset, &data);
    }
    img.close().expect("close");

    qemu::check_clean(&path);
    assert_qemu_info(&path, c, size);
    qemu::compare_identical(&raw_path, &path);

    let expected = |at: u64, buf: &mut [u8]| model.read(at, buf);
    let extents = qemu::map(&path);
    let mut img = open_ro(&path);
    verify_against_qemu(&mut img, &extents, &expected, u64::MAX);
    drop(img);

    // QEMU allocates, zeroes and discards in our layout (it trusts our
    // refcounts not to hand out our metadata), then we write over that.
    let l2 = cs * (cs / 8);
    let fresh = size / 3 / 512 * 512;
    let theirs = [
        op(OpKind::Data(0xc1), 2 * cs + 100, cs),
        op(OpKind::Zero, 0, cs),
        op(OpKind::ZeroUnmap, 5 * cs, cs),
        op(OpKind::Discard, l2 - cs, cs),
        op(OpKind::Data(0xc2), fresh, 3 * cs),
    ];
    qemu::io(
        &path,
        &theirs.iter().map(Op::qemu_command).collect::<Vec<_>>(),
    );
    for o in &theirs {
        model.write(o.offset, &o.qemu_bytes());
    }
    qemu::check_clean(&path);
    qemu::compare_identical(&raw_path, &path);
    let mut img = open_rw(&path);
    for o in [
        op(OpKind::Data(0xd1), 100, 200),
        op(OpKind::Data(0xd2), 5 * cs + 10, 20),
        op(OpKind::Data(0xd3), l2 - cs + 300, cs),
        op(OpKind::Data(0xd4), fresh + cs + 1, cs),
    ] {
        our_write(&mut img, o.offset, &o.our_bytes());
        model.write(o.offset, &o.our_bytes());
    }
    img.close().expect("close");
    qemu::check_clean(&path);
    qemu::compare_identical(&raw_path, &path);
    let extents = qemu::map(&path);
    let mut img = open_ro(&path);
    verify_against_qemu(&mut img, &extents, &expected, u64::MAX);
}

#[test]
fn we_write_qemu_reads_512_byte_clusters() {
    for_each_config(&configs_for(9), we_write_qemu_reads);
}

#[test]
fn we_write_qemu_reads_4k_clusters() {
    for_each_config(&configs_for(12), we_write_qemu_reads);
}

#[test]
fn we_write_qemu_reads_64k_clusters() {
    for_each_config(&configs_for(16), we_write_qemu_reads);
}

#[test]
fn we_write_qemu_reads_2m_clusters() {
    for_each_config(&configs_for(21), we_write_qemu_reads);
}

// ---------------------------------------------------------------------------
// 3. 2 PiB sparse images
// ---------------------------------------------------------------------------

const TWO_PIB: u64 = 2 * PIB;

/// Writes near the start, beyond 4 GiB, across the L2 boundary at 1 PiB
/// (the middle) and up to the very end of a 2 PiB disk with 64 KiB clusters.
fn two_pib_plan() -> Vec<Op> {
    use OpKind::*;
    let cs = 64 * KIB;
    vec![
        op(Data(0x5a), 0, cs + 512),
        op(Data(0x5b), 5 * GIB + 3 * 512, 2 * cs),
        op(Data(0x5c), PIB - 1000, 70_000),
        op(Data(0x5d), TWO_PIB - 3 * cs - 1000, 3 * cs + 1000),
        op(Data(0x5e), PIB + 3 * cs + 4096, 512),
    ]
}

#[test]
fn qemu_writes_2_pib_sparse_image_we_read() {
    let dir = Scratch::new("qemu-2pib");
    let path = dir.join("qemu.qcow2");
    qemu::create(&path, "", TWO_PIB);
    let plan = two_pib_plan();
    qemu::io(
        &path,
        &plan.iter().map(Op::qemu_command).collect::<Vec<_>>(),
    );
    let mut model = SparseModel::default();
    for o in &plan {
        model.write(o.offset, &o.qemu_bytes());
    }
    let expected = |at: u64, buf: &mut [u8]| model.read(at, buf);

    let mut img = open_ro(&path);
    assert_eq!(img.virtual_size(), TWO_PIB);
    for (at, len) in windows(&plan, TWO_PIB) {
        compare_range(&mut img, at, len, &expected);
    }
    // The whole disk reads as the model at a few other spots.
    for at in [4 * GIB, PIB / 2, PIB + GIB, TWO_PIB - GIB] {
        compare_range(&mut img, at, 64 * KIB, &expected);
    }
    // Our mapping agrees with QEMU's: each written cluster is data.
    for o in &plan {
        let (m, _) = img.map(o.offset).expect("map");
        assert!(matches!(m, Mapping::Data { .. }), "{o:?}: {m:?}");
    }
    drop(img);

    // Written read-write through us, near the end; QEMU verifies.
    let mut img = open_rw(&path);
    let tail = op(OpKind::Data(0x6a), TWO_PIB - 5 * 64 * KIB - 300, 64 * KIB);
    our_write(&mut img, tail.offset, &tail.qemu_bytes());
    img.close().expect("close");
    qemu::check_clean(&path);
    qemu::io(
        &path,
        &[
            format!("read -P 0x6a {} {}", tail.offset, tail.len),
            format!(
                "read -P 0x5d {} {}",
                TWO_PIB - 3 * 64 * KIB - 1000,
                3 * 64 * KIB + 1000
            ),
        ],
    );
}

#[test]
fn we_write_2_pib_sparse_image_qemu_reads() {
    let dir = Scratch::new("ours-2pib");
    let path = dir.join("ours.qcow2");
    let dev = FileDevice::create(&path).expect("create image file");
    let mut img = Image::create(dev, &CreateOptions::new(TWO_PIB)).expect("create 2 PiB");
    let plan = two_pib_plan();
    let mut model = SparseModel::default();
    // Constant-pattern data (checked by `qemu-io read -P`) and pseudo-random
    // data right behind it (checked through a raw window).
    for o in &plan {
        our_write(&mut img, o.offset, &o.qemu_bytes());
        model.write(o.offset, &o.qemu_bytes());
    }
    let noise = op(
        OpKind::Data(0x7f),
        TWO_PIB - 9 * 64 * KIB + 4321,
        4 * 64 * KIB,
    );
    our_write(&mut img, noise.offset, &noise.our_bytes());
    model.write(noise.offset, &noise.our_bytes());
    img.close().expect("close");

    qemu::check_clean(&path);
    let info = qemu::info(&path);
    assert_eq!(info["virtual-size"], TWO_PIB);
    let mut commands = Vec::new();
    for o in &plan {
        let OpKind::Data(tag) = o.kind else {
            unreachable!()
        };
        // Later ops may overwrite earlier ones; the plan's do not overlap.
        commands.push(format!("read -P {tag:#04x} {} {}", o.offset, o.len));
        if o.offset >= 512 {
            commands.push(format!("read -P 0 {} 512", (o.offset - 512) / 512 * 512));
        }
    }
    qemu::io(&path, &commands);
    let window = qemu::extract(&dir, &path, noise.offset - 1000, noise.len + 2000);
    let mut want = vec![0; window.len()];
    model.read(noise.offset - 1000, &mut want);
    assert_same_bytes(
        "QEMU's read of our data near 2 PiB",
        noise.offset - 1000,
        &window,
        &want,
    );

    let expected = |at: u64, buf: &mut [u8]| model.read(at, buf);
    let mut img = open_ro(&path);
    for (at, len) in windows(&plan, TWO_PIB) {
        compare_range(&mut img, at, len, &expected);
    }
    compare_range(&mut img, noise.offset - 1000, noise.len + 2000, &expected);
}

// ---------------------------------------------------------------------------
// 4. Small clusters: many refcount blocks, refcount table growth
// ---------------------------------------------------------------------------

#[test]
fn small_clusters_wide_refcounts_grow_and_move_refcount_table() {
    // 512-byte clusters: a 64-bit refcount block covers 32 KiB of host file
    // and the initial one-cluster table 2 MiB; 32-bit, 64 KiB and 4 MiB.
    let mut configs = Vec::new();
    for order in [6, 5] {
        configs.push(Config {
            cluster_bits: 9,
            refcount_order: order,
            version: Version::V3,
            lazy: false,
        });
    }
    for_each_config(&configs, |c| {
        let dir = Scratch::new(&format!("growth-{}", c.name()));
        let path = dir.join("ours.qcow2");
        let size = 32 * MIB;
        let model = RawModel::create(&dir.join("ours.qcow2.raw"), size);
        let dev = FileDevice::create(&path).expect("create image file");
        let img = Image::create(dev, &c.create_options(size)).expect("create");
        let before = reftable_of(&img);
        random_writes(&path, &model, size, 5 * MIB, 0xc0ffee, Some(img));
        let after = reftable(&path);
        let file_len = std::fs::metadata(&path).unwrap().len();
        eprintln!(
            "{}: host file {file_len} bytes, refcount table {before:?} -> {after:?}",
            c.name()
        );
        assert!(after.1 > before.1, "the refcount table grew");
        assert_ne!(after.0, before.0, "the refcount table moved");
        verify_ours_fully(&path, &model, size);
    });
}

#[test]
fn small_clusters_every_refcount_width_refcount_table_relocation() {
    // For each width, make the host file end just below what the initial
    // refcount table covers (sparse, cheap), then allocate past it.
    let configs: Vec<Config> = (0..=6)
        .map(|order| Config {
            cluster_bits: 9,
            refcount_order: order,
            version: Version::V3,
            lazy: false,
        })
        .collect();
    for_each_config(&configs, |c| {
        let dir = Scratch::new(&format!("relocate-{}", c.name()));
        let path = dir.join("ours.qcow2");
        let size = 16 * MIB;
        let model = RawModel::create(&dir.join("ours.qcow2.raw"), size);
        let dev = FileDevice::create(&path).expect("create image file");
        let mut img = Image::create(dev, &c.create_options(size)).expect("create");
        let data = pattern_at(1, 0, 300 * KIB);
        our_write(&mut img, 0, &data);
        model.write(0, &data);
        img.close().expect("close");
        let before = reftable(&path);
        // One-cluster table: 64 entries, each a block of 4096 >> order clusters.
        let covered = 64 * ((512 * 8) >> c.refcount_order) * 512;
        let len = std::fs::metadata(&path).unwrap().len();
        if len < covered - 8 * KIB {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(covered - 8 * KIB).unwrap();
        }
        random_writes(
            &path,
            &model,
            size,
            600 * KIB,
            0xbeef + u64::from(c.refcount_order),
            None,
        );
        let after = reftable(&path);
        eprintln!(
            "{}: covered {covered}, file {} bytes, refcount table {before:?} -> {after:?}",
            c.name(),
            std::fs::metadata(&path).unwrap().len()
        );
        assert!(after.1 > before.1, "the refcount table grew");
        assert_ne!(after.0, before.0, "the refcount table moved");
        verify_ours_fully(&path, &model, size);
    });
}

// ---------------------------------------------------------------------------
// 5. Host offsets beyond 4 GiB
// ---------------------------------------------------------------------------

#[test]
fn qemu_preallocated_metadata_host_offsets_beyond_4_gib() {
    // preallocation=metadata gives every guest cluster a host cluster, so
    // guest data at 4.5 GiB lives at a host offset beyond 4 GiB (sparse).
    let dir = Scratch::new("qemu-prealloc");
    let path = dir.join("qemu.qcow2");
    let size = 5 * GIB;
    qemu::create(&path, "preallocation=metadata", size);
    let plan = [
        op(OpKind::Data(0x21), 4 * GIB + GIB / 2 - 700, 200 * KIB),
        op(OpKind::Data(0x22), 100, 1000),
        op(OpKind::Zero, 4 * GIB + GIB / 2 + 64 * KIB, 64 * KIB),
        op(OpKind::Data(0x23), size - 1024, 1024),
    ];
    qemu::io(
        &path,
        &plan.iter().map(Op::qemu_command).collect::<Vec<_>>(),
    );
    let mut model = SparseModel::default();
    for o in &plan {
        model.write(o.offset, &o.qemu_bytes());
    }
    let expected = |at: u64, buf: &mut [u8]| model.read(at, buf);
    let extents = qemu::map(&path);
    let mut img = open_ro(&path);
    let (m, _) = img.map(4 * GIB + GIB / 2).expect("map");
    let Mapping::Data { host } = m else {
        panic!("preallocated cluster maps to {m:?}")
    };
    assert!(host > 4 * GIB, "host offset {host:#x} beyond 4 GiB");
    // The whole disk is one data extent: read the written windows in full.
    verify_against_qemu(&mut img, &extents, &expected, 64 * MIB);
    for (at, len) in windows(&plan, size) {
        compare_range(&mut img, at, len, &expected);
    }
    drop(img);

    // Overwrite in place through us, beyond 4 GiB on the host.
    let mut img = open_rw(&path);
    let o = op(OpKind::Data(0x31), 4 * GIB + GIB / 2 + 100 * KIB, 100 * KIB);
    our_write(&mut img, o.offset, &o.qemu_bytes());
    model.write(o.offset, &o.qemu_bytes());
    img.close().expect("close");
    qemu::check_clean(&path);
    qemu::io(
        &path,
        &[
            format!("read -P 0x31 {} {}", o.offset, o.len),
            format!("read -P 0x21 {} {}", 4 * GIB + GIB / 2 - 700, 64 * KIB),
        ],
    );
    let expected = |at: u64, buf: &mut [u8]| model.read(at, buf);
    let extents = qemu::map(&path);
    let mut img = open_ro(&path);
    verify_against_qemu(&mut img, &extents, &expected, 64 * MIB);
    for (at, len) in windows(&[o], size) {
        compare_range(&mut img, at, len, &expected);
    }
}

#[test]
fn we_allocate_host_offsets_beyond_4_gib_in_sparse_file() {
    // Our allocator starts at the end of the file: grow the file sparsely
    // past 4 GiB, and new clusters and their new refcount blocks land
    // beyond 4 GiB. With 512-byte clusters and 64-bit refcounts the initial
    // refcount table covers only 2 MiB: it must grow to cover the whole
    // file, and the allocator may then reuse the hole (free clusters).
    let config = |cluster_bits, refcount_order| Config {
        cluster_bits,
        refcount_order,
        version: Version::V3,
        lazy: false,
    };
    let configs = [config(16, 4), config(12, 3), config(9, 6)];
    for_each_config(&configs, |c| {
        let dir = Scratch::new(&format!("host-4g-{}", c.name()));
        let path = dir.join("ours.qcow2");
        let size = 8 * GIB;
        let model = RawModel::create(&dir.join("ours.qcow2.raw"), size);
        let dev = FileDevice::create(&path).expect("create image file");
        let mut img = Image::create(dev, &c.create_options(size)).expect("create");
        let first = op(OpKind::Data(0x41), 4096, 10 * KIB);
        our_write(&mut img, first.offset, &first.our_bytes());
        model.write(first.offset, &first.our_bytes());
        img.close().expect("close");
        let hole_end = 4 * GIB + 256 * MIB;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(hole_end).unwrap();
        drop(f);
        let mut img = open_rw(&path);
        let plan = [
            op(OpKind::Data(0x42), 6 * GIB - 1000, 150 * KIB),
            op(OpKind::Data(0x43), 2000, 5000),
            op(OpKind::Data(0x44), 100 * MIB + 7, 70 * KIB),
        ];
        for o in &plan {
            our_write(&mut img, o.offset, &o.our_bytes());
            model.write(o.offset, &o.our_bytes());
        }
        let (m, _) = img.map(6 * GIB).expect("map");
        let Mapping::Data { host } = m else {
            panic!("written cluster maps to {m:?}")
        };
        img.close().expect("close");
        let (_, table_clusters) = reftable(&path);
        let cs = c.cluster_size();
        let covered = u64::from(table_clusters) * (cs / 8) * ((cs * 8) >> c.refcount_order) * cs;
        eprintln!(
            "{}: data at host {host:#x}, refcount table covers {covered:#x}",
            c.name()
        );
        assert!(covered >= hole_end, "the refcount table covers the file");
        if c.cluster_bits >= 12 {
            assert!(host >= hole_end, "host offset {host:#x} beyond 4 GiB");
        }
        verify_ours_fully(&path, &model, size);
    });
}

// ---------------------------------------------------------------------------
// 6. QEMU features: read where we can, refuse where we must
// ---------------------------------------------------------------------------

#[test]
fn qemu_zstd_compression_type_image_uncompressed_data_works() {
    let dir = Scratch::new("zstd");
    let path = dir.join("zstd.qcow2");
    let size = 64 * MIB;
    qemu::create(&path, "compression_type=zstd", size);
    qemu::io(&path, &["write -P 0x17 1000 200000".to_string()]);
    let mut img = open_rw(&path);
    assert_eq!(img.info().compression_type, 1);
    assert_eq!(our_read(&mut img, 1000, 200_000), vec![0x17; 200_000]);
    our_write(&mut img, 150_000, &[0x18; 100_000]);
    img.close().expect("close");
    qemu::check_clean(&path);
    qemu::io(
        &path,
        &[
            "read -P 0x17 1000 149000".to_string(),
            "read -P 0x18 150000 100000".to_string(),
        ],
    );
}

#[test]
fn qemu_compressed_clusters_read_and_overwrite() {
    let dir = Scratch::new("compressed");
    let path = dir.join("compressed.qcow2");
    let cs = 64 * KIB;
    qemu::create(&path, "", 64 * MIB);
    qemu::io(
        &path,
        &[
            format!("write -c -P 0x33 {} {}", 2 * cs, 2 * cs),
            format!("write -P 0x44 {} {}", 5 * cs, cs),
        ],
    );
    let mut img = open_ro(&path);
    let (m, _) = img.map(2 * cs).expect("map");
    assert!(matches!(m, Mapping::Compressed { .. }), "{m:?}");
    assert_eq!(our_read(&mut img, 2 * cs + 10, 1000), vec![0x33; 1000]);
    assert_eq!(our_read(&mut img, 5 * cs, cs), vec![0x44; cs as usize]);
    assert_eq!(our_read(&mut img, 0, 2 * cs), vec![0; 2 * cs as usize]);
    drop(img);
    // A partial write over a compressed cluster: copy-on-write.
    let mut img = open_rw(&path);
    our_write(&mut img, 3 * cs + 7, &[1; 10]);
    our_write(&mut img, 7 * cs - 10, &[0x55; 20]);
    img.close().expect("close");
    qemu::check_clean(&path);
    qemu::io(
        &path,
        &[
            format!("read -P 0x33 {} {}", 2 * cs, cs + 7),
            format!("read -P 1 {} 10", 3 * cs + 7),
            format!("read -P 0x33 {} {}", 3 * cs + 17, cs - 17),
            format!("read -P 0x55 {} 20", 7 * cs - 10),
        ],
    );
}

#[test]
fn qemu_crashed_lazy_refcount_image_we_repair_at_open() {
    // QEMU flushes data and L2 tables, then dies with the dirty bit set and
    // stale refcounts (qemu-img check reports errors).
    let dir = Scratch::new("qemu-dirty");
    let path = dir.join("dirty.qcow2");
    qemu::create(&path, "lazy_refcounts=on", 64 * MIB);
    let args = [
        "-f",
        "qcow2",
        "-c",
        "write -P 0x66 1000 300000",
        "-c",
        "flush",
        "-c",
        "abort",
        path_str(&path),
    ];
    let out = run("qemu-io", &args);
    assert!(
        !out.status.success(),
        "{}",
        describe("qemu-io", &args, &out)
    );
    let out = run("qemu-img", &["check", "-f", "qcow2", path_str(&path)]);
    assert!(!out.status.success(), "QEMU sees stale refcounts");

    let mut img = open_ro(&path);
    assert!(img.info().dirty);
    assert_eq!(our_read(&mut img, 1000, 300_000), vec![0x66; 300_000]);
    assert_eq!(our_read(&mut img, 0, 1000), vec![0; 1000]);
    drop(img);
    // A read-write open rebuilds the refcounts; then we write.
    let mut img = open_rw(&path);
    our_write(&mut img, 250_000, &[0x67; 200_000]);
    img.close().expect("close");
    qemu::check_clean(&path);
    assert_eq!(qemu::info(&path)["dirty-flag"], false);
    qemu::io(
        &path,
        &[
            "read -P 0x66 1000 249000".to_string(),
            "read -P 0x67 250000 200000".to_string(),
        ],
    );
}

#[test]
fn our_crashed_lazy_refcount_image_qemu_repairs() {
    // We write with lazy refcounts, flush, write more and vanish without
    // closing: the dirty bit is set; QEMU must repair it and keep what was
    // flushed.
    let dir = Scratch::new("ours-dirty");
    let path = dir.join("dirty.qcow2");
    let c = Config {
        cluster_bits: 16,
        refcount_order: 4,
        version: Version::V3,
        lazy: true,
    };
    let dev = FileDevice::create(&path).expect("create image file");
    let mut img = Image::create(dev, &c.create_options(64 * MIB)).expect("create");
    our_write(&mut img, 1000, &[0x68; 300_000]);
    img.flush().expect("flush");
    our_write(&mut img, 5 * MIB, &[0x69; 300_000]);
    drop(img);
    assert_eq!(qemu::info(&path)["dirty-flag"], true);
    qemu::img(&["check", "-q", "-r", "all", "-f", "qcow2", path_str(&path)]);
    qemu::check_clean(&path);
    qemu::io(&path, &["read -P 0x68 1000 300000".to_string()]);
    let mut img = open_ro(&path);
    assert!(!img.info().dirty);
    assert_eq!(our_read(&mut img, 1000, 300_000), vec![0x68; 300_000]);
}

#[test]
fn qemu_internal_snapshot_image_read_only_then_writable_after_delete() {
    let dir = Scratch::new("snapshot");
    let path = dir.join("snap.qcow2");
    qemu::create(&path, "", 64 * MIB);
    qemu::io(&path, &["write -P 0x71 0 300000".to_string()]);
    qemu::img(&["snapshot", "-c", "s1", path_str(&path)]);
    qemu::io(&path, &["write -P 0x72 100000 100000".to_string()]);
    let mut img = open_ro(&path);
    assert_eq!(img.info().snapshots, 1);
    let got = our_read(&mut img, 0, 300_000);
    let mut want = vec![0x71; 300_000];
    want[100_000..200_000].fill(0x72);
    assert_same_bytes("snapshotted image", 0, &got, &want);
    drop(img);
    let dev = FileDevice::open(&path, true).expect("open image file");
    let e = Image::open(dev, &OpenOptions::read_write())
        .err()
        .expect("writing a snapshotted image is refused");
    assert!(matches!(e, Error::Unsupported(Feature::Snapshots)), "{e:?}");
    // Deleting the snapshot restores refcount 1 and the COPIED flags.
    qemu::img(&["snapshot", "-d", "s1", path_str(&path)]);
    let mut img = open_rw(&path);
    our_write(&mut img, 250_000, &[0x73; 100_000]);
    img.close().expect("close");
    qemu::check_clean(&path);
    qemu::io(
        &path,
        &[
            "read -P 0x71 0 100000".to_string(),
            "read -P 0x72 100000 100000".to_string(),
            "read -P 0x71 200000 50000".to_string(),
            "read -P 0x73 250000 100000".to_string(),
        ],
    );
}

#[test]
fn qemu_bitmap_image_reads_but_refuses_writes() {
    // Persistent dirty bitmaps are not maintained: a read-write open is
    // refused rather than leaving QEMU's bitmap clusters as leaks.
    let dir = Scratch::new("bitmap");
    let path = dir.join("bitmap.qcow2");
    qemu::create(&path, "", 64 * MIB);
    qemu::io(&path, &["write -P 0x81 0 100000".to_string()]);
    qemu::img(&["bitmap", "--add", path_str(&path), "b0"]);
    qemu::img(&["bitmap", "--add", path_str(&path), "b1"]);
    // Writes while the bitmaps are enabled give them data clusters.
    qemu::io(&path, &["write -P 0x80 1M 1M".to_string()]);
    let before = std::fs::read(&path).expect("read image");
    let dev = FileDevice::open(&path, true).expect("open file");
    match Image::open(dev, &OpenOptions::read_write()) {
        Err(Error::Unsupported(what)) => assert_eq!(what, Feature::PersistentBitmaps),
        Err(e) => panic!("expected Unsupported, got {e}"),
        Ok(_) => panic!("read-write open of a bitmap image was accepted"),
    }
    assert!(
        std::fs::read(&path).expect("read image") == before,
        "refused open changed the file"
    );
    let mut img = Image::open(
        FileDevice::open(&path, false).expect("open"),
        &OpenOptions::read_only(),
    )
    .expect("read-only open");
    assert_eq!(our_read(&mut img, 0, 100_000), vec![0x81; 100_000]);
    // Our check accounts for the bitmap directory, tables and data.
    let report = img.check().expect("check");
    assert!(report.is_clean(), "{report:?}");
    let out = run("qemu-img", &["check", path_str(&path)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// ---------------------------------------------------------------------------
// 7. QEMU-grown metadata: relocated refcount table, resized L1
// ---------------------------------------------------------------------------

#[test]
fn qemu_grown_refcount_table_then_we_write() {
    // 512-byte clusters with 64-bit refcounts: QEMU itself outgrows the
    // initial refcount table and moves it; we then allocate in its layout.
    let dir = Scratch::new("qemu-grown");
    let path = dir.join("qemu.qcow2");
    let raw_path = dir.join("qemu.qcow2.raw");
    let size = 16 * MIB;
    qemu::create(&path, "cluster_size=512,refcount_bits=64", size);
    let commands: Vec<String> = (0..48)
        .map(|i| format!("write -P {:#04x} {} 60000", i + 1, i * 300_000 + 77))
        .collect();
    qemu::io(&path, &commands);
    let (_, clusters) = reftable(&path);
    assert!(clusters > 1, "QEMU grew its refcount table");
    qemu::convert_to_raw(&path, &raw_path);
    let model = RawModel::open(&raw_path);
    random_writes(&path, &model, size, 3 * MIB, 0x9999, None);
    verify_ours_fully(&path, &model, size);
}

#[test]
fn qemu_resized_image_relocated_l1_then_we_write() {
    let cases = [(9u32, 32 * MIB, 300 * MIB), (16, GIB, 3 * PIB / 2)];
    for (cluster_bits, from, to) in cases {
        let dir = Scratch::new(&format!("resize-{cluster_bits}"));
        let path = dir.join("qemu.qcow2");
        let cs = 1u64 << cluster_bits;
        qemu::create(&path, &format!("cluster_size={cs}"), from);
        qemu::io(&path, &[format!("write -P 0x91 {} {}", from - 1000, 1000)]);
        qemu::img(&[
            "resize",
            "-q",
            "-f",
            "qcow2",
            path_str(&path),
            &to.to_string(),
        ]);
        let mut img = open_rw(&path);
        assert_eq!(img.virtual_size(), to);
        assert_eq!(our_read(&mut img, from - 1000, 1000), vec![0x91; 1000]);
        assert_eq!(our_read(&mut img, from, 1000), vec![0; 1000]);
        our_write(&mut img, from - 10, &[0x92; 20]);
        our_write(&mut img, to - 4096 - cs - 5, &[0x93; 4096]);
        img.close().expect("close");
        qemu::check_clean(&path);
        qemu::io(
            &path,
            &[
                format!("read -P 0x91 {} 990", from - 1000),
                format!("read -P 0x92 {} 20", from - 10),
                format!("read -P 0x93 {} 4096", to - 4096 - cs - 5),
            ],
        );
    }
}

// ---------------------------------------------------------------------------
// 8. Degenerate sizes
// ---------------------------------------------------------------------------

#[test]
fn empty_and_one_sector_disks_both_ways() {
    let dir = Scratch::new("tiny");
    for size in [0u64, 512] {
        for version in [Version::V2, Version::V3] {
            let c = Config {
                cluster_bits: 16,
                refcount_order: 4,
                version,
                lazy: false,
            };
            let ours = dir.join(format!("ours-{size}-{}.qcow2", version.compat()));
            let dev = FileDevice::create(&ours).expect("create image file");
            let mut img = Image::create(dev, &c.create_options(size)).expect("create");
            if size > 0 {
                our_write(&mut img, 0, &[0xa5; 512]);
            }
            assert!(img.write_at(size, &[1]).is_err(), "write past the end");
            img.close().expect("close");
            qemu::check_clean(&ours);
            assert_qemu_info(&ours, &c, size);
            if size > 0 {
                qemu::io(&ours, &["read -P 0xa5 0 512".to_string()]);
            }

            let theirs = dir.join(format!("qemu-{size}-{}.qcow2", version.compat()));
            qemu::create(&theirs, &c.qemu_options(), size);
            if size > 0 {
                qemu::io(&theirs, &["write -P 0x5a 0 512".to_string()]);
            }
            let mut img = open_rw(&theirs);
            assert_eq!(img.virtual_size(), size);
            assert_eq!(our_read(&mut img, 0, size), vec![0x5a; size as usize]);
            assert!(img.read_at(size, &mut [0]).is_err(), "read past the end");
            img.close().expect("close");
            qemu::check_clean(&theirs);
        }
    }
}

// ---------------------------------------------------------------------------
// 9. Ping-pong: QEMU and we take turns on the same image
// ---------------------------------------------------------------------------

/// Random QEMU ops: data, zeroing (kept and unmapped) and whole-cluster
/// discards (which then read as zeros), with offsets and lengths crossing
/// clusters.
fn random_qemu_ops(rng: &mut Rng, cs: u64, size: u64, n: usize) -> Vec<Op> {
    (0..n)
        .map(|_| {
            let len = 1 + rng.below(3 * cs);
            let offset = rng.below(size - len);
            match rng.below(8) {
                0 => op(OpKind::Zero, offset, len),
                1 => op(OpKind::ZeroUnmap, offset, len),
                2 => {
                    let first = offset / cs;
                    let clusters = 1 + rng.below(3).min(size / cs - first - 1);
                    op(OpKind::Discard, first * cs, clusters * cs)
                }
                _ => op(OpKind::Data(1 + rng.below(255) as u8), offset, len),
            }
        })
        .collect()
}

fn ping_pong(c: &Config) {
    let dir = Scratch::new(&format!("ping-pong-{}", c.name()));
    let path = dir.join("image.qcow2");
    let raw_path = dir.join("image.qcow2.raw");
    let cs = c.cluster_size();
    let size = 8 * MIB + 3 * 512;
    let model = RawModel::create(&raw_path, size);
    let mut rng = Rng::new(0x1234_5678 ^ u64::from(c.cluster_bits * 8 + c.refcount_order));
    // Alternate who creates the image.
    if c.refcount_order.is_multiple_of(2) {
        qemu::create(&path, &c.qemu_options(), size);
    } else {
        let dev = FileDevice::create(&path).expect("create image file");
        Image::create(dev, &c.create_options(size))
            .expect("create")
            .close()
            .expect("close");
    }
    for round in 0..8 {
        let ops = random_qemu_ops(&mut rng, cs, size, 12);
        qemu::io(&path, &ops.iter().map(Op::qemu_command).collect::<Vec<_>>());
        for o in &ops {
            model.write(o.offset, &o.qemu_bytes());
        }
        qemu::check_clean(&path);
        let mut img = open_rw(&path);
        for i in 0..12 {
            let len = 1 + rng.below(3 * cs);
            let offset = rng.below(size - len);
            let data = pattern_at(round * 100 + i, offset, len);
            our_write(&mut img, offset, &data);
            model.write(offset, &data);
        }
        img.close().expect("close");
        qemu::check_clean(&path);
    }
    verify_ours_fully(&path, &model, size);
}

#[test]
fn ping_pong_qemu_and_we_take_turns_on_one_image() {
    let config = |cluster_bits, refcount_order, version, lazy| Config {
        cluster_bits,
        refcount_order,
        version,
        lazy,
    };
    for_each_config(
        &[
            config(9, 6, Version::V3, false),
            config(9, 0, Version::V3, false),
            config(9, 3, Version::V3, true),
            config(12, 4, Version::V2, false),
            config(12, 1, Version::V3, false),
            config(16, 4, Version::V3, true),
            config(16, 5, Version::V3, false),
        ],
        ping_pong,
    );
}

// ---------------------------------------------------------------------------
// 10. QEMU rewrites our metadata (amend), and our process crashes
// ---------------------------------------------------------------------------

#[test]
fn qemu_amend_rewrites_our_refcounts_and_version_then_we_continue() {
    // `qemu-img amend` rebuilds the refcount structures for a new width and
    // downgrades the version; we keep reading and writing after each step.
    let dir = Scratch::new("amend");
    let path = dir.join("ours.qcow2");
    let raw_path = dir.join("ours.qcow2.raw");
    let size = 32 * MIB;
    let model = RawModel::create(&raw_path, size);
    let c = Config {
        cluster_bits: 12,
        refcount_order: 4,
        version: Version::V3,
        lazy: false,
    };
    let dev = FileDevice::create(&path).expect("create image file");
    let img = Image::create(dev, &c.create_options(size)).expect("create");
    random_writes(&path, &model, size, 2 * MIB, 0xa1, Some(img));
    for (i, amend) in [
        "refcount_bits=1",
        "refcount_bits=64",
        "lazy_refcounts=on",
        "lazy_refcounts=off,refcount_bits=16,compat=0.10",
    ]
    .into_iter()
    .enumerate()
    {
        qemu::img(&["amend", "-f", "qcow2", "-o", amend, path_str(&path)]);
        qemu::check_clean(&path);
        random_writes(&path, &model, size, MIB, 0xa2 + i as u64, None);
        verify_ours_fully(&path, &model, size);
    }
    let img = open_ro(&path);
    assert_eq!(img.info().version, Version::V2);
    assert_eq!(img.info().refcount_bits, 16);
}

#[test]
fn our_process_crash_without_close_leaves_at_most_leaks() {
    // Random writes over a large disk churn the 2 MiB metadata cache; we
    // flush, write more and vanish without closing. QEMU may find leaks,
    // never corruption, and everything flushed reads back.
    let config = |cluster_bits, refcount_order| Config {
        cluster_bits,
        refcount_order,
        version: Version::V3,
        lazy: false,
    };
    for_each_config(&[config(9, 4), config(12, 6), config(16, 0)], |c| {
        let dir = Scratch::new(&format!("crash-{}", c.name()));
        let path = dir.join("ours.qcow2");
        let cs = c.cluster_size();
        let size = (64 * GIB).min(cs * (cs / 8) * 16384);
        let half = size / 2;
        let mut model = SparseModel::default();
        let mut rng = Rng::new(0xc4a5 + u64::from(c.cluster_bits));
        let dev = FileDevice::create(&path).expect("create image file");
        let mut img = Image::create(dev, &c.create_options(size)).expect("create");
        let mut flushed = Vec::new();
        for i in 0..1500 {
            let len = 1 + rng.below(2 * cs);
            let offset = rng.below(half - len);
            let data = pattern_at(i, offset, len);
            our_write(&mut img, offset, &data);
            model.write(offset, &data);
            flushed.push((offset, len));
        }
        img.flush().expect("flush");
        for i in 0..1500 {
            let len = 1 + rng.below(2 * cs);
            let offset = half + rng.below(half - len);
            our_write(&mut img, offset, &pattern_at(10_000 + i, offset, len));
        }
        drop(img);

        let args = ["check", "-f", "qcow2", "--output", "json", path_str(&path)];
        let out = run("qemu-img", &args);
        let report = describe("qemu-img", &args, &out);
        let json = qemu::json(&stdout(&out));
        assert_eq!(json.get("corruptions"), None, "{report}");
        assert_eq!(json["check-errors"], 0, "{report}");
        eprintln!(
            "{}: {} leaked clusters after the crash",
            c.name(),
            json["leaks"].as_u64().unwrap_or(0)
        );
        qemu::img(&["check", "-q", "-r", "leaks", "-f", "qcow2", path_str(&path)]);
        qemu::check_clean(&path);
        let expected = |at: u64, buf: &mut [u8]| model.read(at, buf);
        let mut img = open_ro(&path);
        for &(offset, len) in &flushed {
            compare_range(&mut img, offset, len, &expected);
        }
        let (offset, len) = flushed[flushed.len() / 2];
        let window = qemu::extract(&dir, &path, offset, len);
        let mut want = vec![0; len as usize];
        model.read(offset, &mut want);
        assert_same_bytes("QEMU's read of flushed data", offset, &window, &want);
    });
}
