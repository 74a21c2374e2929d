//! `cargo xtask corpus`: regenerates the hostile image corpus under
//! `qcow2-std-shim/tests/hostile/` from a small valid image, one
//! hand-written mutation per file, with the outcome each must produce.
//!
//! The files are committed; this generator documents how they were made
//! and rebuilds them when the list changes.

use qcow2_core::{Compression, CreateOptions};
use qcow2_std_shim::codec::compress_cluster;
use qcow2_std_shim::{Image, RamDevice};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::output_of;

/// Where things are in the base image.
struct Layout {
    l1: usize,
    reftable: usize,
    refblock: usize,
    l2: usize,
    data: usize,
    cluster: usize,
}

fn be64(img: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(img[at..at + 8].try_into().expect("8 bytes"))
}

fn put32(img: &mut [u8], at: usize, v: u32) {
    img[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(img: &mut [u8], at: usize, v: u64) {
    img[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A 64 KiB disk with 512-byte clusters and data at guest 0..1536 and 40960.
fn base() -> (Vec<u8>, Layout) {
    let options = CreateOptions {
        cluster_bits: 9,
        ..CreateOptions::new(64 << 10)
    };
    let mut img = Image::create(RamDevice::new(), &options).expect("create base");
    img.write_at(0, &[0x11; 1536]).expect("write");
    img.write_at(40960, &[0x22; 512]).expect("write");
    let bytes = img.close().expect("close").as_bytes().to_vec();
    let l1 = be64(&bytes, 40) as usize;
    let reftable = be64(&bytes, 48) as usize;
    let refblock = be64(&bytes, reftable) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let data = (be64(&bytes, l2) & 0x00ff_ffff_ffff_fe00) as usize;
    let layout = Layout {
        l1,
        reftable,
        refblock,
        l2,
        data,
        cluster: 512,
    };
    (bytes, layout)
}

/// A compressed-cluster L2 entry of a 512-byte-cluster image: the stream
/// at host byte `host`, over `sectors` (1 or 2) sectors counted from the
/// one `host` is in.
fn compressed(host: usize, sectors: u64) -> u64 {
    (1 << 62) | ((sectors - 1) << 61) | host as u64
}

/// A compressed stream of a guest cluster (512 bytes of three-bit noise,
/// which shrink to a stream of a few hundred bytes).
fn stream(format: Compression) -> Vec<u8> {
    let mut x = 0x2545_f491_u32;
    let plain: Vec<u8> = (0..512)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x & 7) as u8
        })
        .collect();
    let mut out = Vec::new();
    assert!(compress_cluster(format, &plain, &mut out), "compresses");
    assert!(out.len() > 24, "a stream longer than the cuts");
    out
}

/// The image switched to zstd compression (incompatible bit 3, type 1).
fn zstd_image(i: &mut [u8]) {
    put64(i, 72, 1 << 3);
    i[104] = 1;
}

/// Guest cluster 0 compressed: `stream` written at `at` in its data
/// cluster, the L2 entry a descriptor of `sectors` sectors from there.
fn compress_guest_0(i: &mut [u8], l: &Layout, stream: &[u8], at: usize, sectors: u64) {
    i[l.data + at..l.data + at + stream.len()].copy_from_slice(stream);
    put64(i, l.l2, compressed(l.data + at, sectors));
}

type Mutation = fn(&mut Vec<u8>, &Layout);

/// (file name, expected outcome, mutation). Outcomes are what the
/// `hostile` test derives: `open: <error>`, `read: <error>` or `ok`.
const CASES: &[(&str, &str, Mutation)] = &[
    ("truncated-header", "open: not a qcow2 image (bad magic)", |i, _| i.truncate(3)),
    ("header-only-sector", "open: corrupt image: L1 table beyond the end of the image (at host offset 0x600)", |i, _| i.truncate(512)),
    ("bad-magic", "open: not a qcow2 image (bad magic)", |i, _| i[3] = 0xfc),
    ("version-1", "open: unsupported feature: qcow2 version other than 2 or 3", |i, _| put32(i, 4, 1)),
    ("version-4", "open: unsupported feature: qcow2 version other than 2 or 3", |i, _| put32(i, 4, 4)),
    ("cluster-bits-8", "open: unsupported feature: cluster size outside 512 B..=2 MiB", |i, _| put32(i, 20, 8)),
    ("cluster-bits-22", "open: unsupported feature: cluster size outside 512 B..=2 MiB", |i, _| put32(i, 20, 22)),
    ("cluster-bits-huge", "open: unsupported feature: cluster size outside 512 B..=2 MiB", |i, _| put32(i, 20, 0xffff_ffff)),
    ("crypt-aes", "open: unsupported feature: encryption", |i, _| put32(i, 32, 1)),
    ("crypt-luks", "open: unsupported feature: encryption", |i, _| put32(i, 32, 2)),
    ("backing-name-outside-cluster", "open: corrupt image: backing file name outside the first cluster (at host offset 0x0)", |i, _| { put64(i, 8, 500); put32(i, 16, 100) }),
    // An overlay reads guest data only with its backing attached.
    ("backing-file", "read: unsupported feature: the image has a backing file that is not attached (Qcow2::with_backing)", |i, _| { put64(i, 8, 400); put32(i, 16, 4); i[400..404].copy_from_slice(b"base") }),
    // QEMU: "Backing file name too long", "Invalid backing file offset".
    ("backing-name-too-long", "open: corrupt image: backing file name longer than 1023 bytes (at host offset 0x0)", |i, _| { put64(i, 8, 400); put32(i, 16, 1024) }),
    ("backing-name-offset-huge", "open: corrupt image: backing file name outside the first cluster (at host offset 0x0)", |i, _| { put64(i, 8, 1 << 62); put32(i, 16, 4) }),
    ("backing-name-to-cluster-end", "read: unsupported feature: the image has a backing file that is not attached (Qcow2::with_backing)", |i, _| { put64(i, 8, 508); put32(i, 16, 4); i[508..512].copy_from_slice(b"base") }),
    // QEMU reads an empty name as no backing file (`Header::has_backing_file`).
    ("backing-name-empty", "ok", |i, _| { put64(i, 8, 400); put32(i, 16, 0) }),
    ("backing-format-without-backing-file", "ok", |i, _| { put32(i, 112, 0xe279_2aca); put32(i, 116, 3); i[120..123].copy_from_slice(b"raw") }),
    ("size-beyond-l1", "open: corrupt image: L1 table too small for the virtual size (at host offset 0x0)", |i, _| put64(i, 24, 1 << 30)),
    ("size-huge", "open: corrupt image: virtual size too large (at host offset 0x0)", |i, _| put64(i, 24, u64::MAX)),
    ("l1-size-huge", "open: corrupt image: L1 table larger than 32 MiB (at host offset 0x0)", |i, _| put32(i, 36, u32::MAX)),
    ("l1-unaligned", "open: corrupt image: L1 table offset not cluster aligned (at host offset 0x608)", |i, l| put64(i, 40, l.l1 as u64 + 8)),
    ("l1-on-header", "open: corrupt image: L1 table overlaps the header (at host offset 0x0)", |i, _| put64(i, 40, 0)),
    ("l1-beyond-end", "open: corrupt image: L1 table beyond the end of the image (at host offset 0x100000)", |i, _| put64(i, 40, 1 << 20)),
    ("l1-beyond-2-56", "open: corrupt image: L1 table beyond the host offset limit (at host offset 0x100000000000000)", |i, _| put64(i, 40, 1 << 56)),
    // QEMU opens these and reads (past-the-end data as zeros); we refuse reads
    // through tables on the refcount table or past the end, and every write.
    ("l1-on-reftable", "read: corrupt image: data cluster beyond the end of the image (at host offset 0x1000100010000)", |i, l| put64(i, 40, l.reftable as u64)),
    ("reftable-unaligned", "open: corrupt image: refcount table offset not cluster aligned (at host offset 0x208)", |i, l| put64(i, 48, l.reftable as u64 + 8)),
    ("reftable-on-header", "open: corrupt image: refcount table overlaps the header (at host offset 0x0)", |i, _| put64(i, 48, 0)),
    ("reftable-zero-clusters", "open: corrupt image: refcount table of zero clusters (at host offset 0x0)", |i, _| put32(i, 56, 0)),
    ("reftable-huge", "open: corrupt image: refcount table larger than 8 MiB (at host offset 0x0)", |i, _| put32(i, 56, u32::MAX)),
    ("reftable-beyond-end", "write: corrupt image: refcount table beyond the end of the image (at host offset 0x100000)", |i, _| put64(i, 48, 1 << 20)),
    ("reftable-over-l1", "read: corrupt image: L2 table overlaps the header, L1 or refcount table (at host offset 0x800)", |i, _| put32(i, 56, 4096)),
    ("refcount-order-7", "open: corrupt image: refcount_order above 6 (at host offset 0x0)", |i, _| put32(i, 96, 7)),
    ("header-length-short", "open: corrupt image: header_length shorter than the v3 header (at host offset 0x0)", |i, _| put32(i, 100, 96)),
    ("header-length-beyond-cluster", "open: corrupt image: header_length larger than a cluster (at host offset 0x0)", |i, _| put32(i, 100, 1024)),
    ("header-length-odd", "open: corrupt image: header_length not a multiple of 8 (at host offset 0x0)", |i, _| put32(i, 100, 113)),
    ("unknown-incompatible-bit", "open: unsupported feature: unknown incompatible feature bits", |i, _| put64(i, 72, 1 << 63)),
    ("extended-l2-bit", "open: unsupported feature: extended L2 entries (subclusters)", |i, _| put64(i, 72, 1 << 4)),
    ("external-data-bit", "read: unsupported feature: the image has an external data file that is not attached (Qcow2::attach_data_file)", |i, _| put64(i, 72, 1 << 2)),
    ("compression-type-without-bit", "open: corrupt image: compression type disagrees with its feature bit (at host offset 0x0)", |i, _| i[104] = 1),
    ("compression-type-unknown", "open: unsupported feature: compression type other than zlib or zstd", |i, _| { put64(i, 72, 1 << 3); i[104] = 9 }),
    ("snapshots-too-many", "open: corrupt image: too many snapshots (at host offset 0x0)", |i, _| put32(i, 60, u32::MAX)),
    ("snapshot-table-unaligned", "open: corrupt image: snapshot table offset not cluster aligned (at host offset 0x3)", |i, _| { put32(i, 60, 1); put64(i, 64, 3) }),
    // QEMU checks the alignment even without snapshots.
    ("snapshot-table-unaligned-none", "open: corrupt image: snapshot table offset not cluster aligned (at host offset 0x3)", |i, _| put64(i, 64, 3)),
    ("data-file-raw-without-data-file", "open: corrupt image: data-file-raw requires a data file (at host offset 0x0)", |i, _| put64(i, 88, 1 << 1)),
    // As QEMU: the size is rounded down to whole sectors.
    ("size-unaligned", "ok", |i, _| { let size = be64(i, 24); put64(i, 24, size - 24) }),
    ("extension-beyond-cluster", "open: corrupt image: header extension beyond the first cluster (at host offset 0x70)", |i, _| { put32(i, 112, 0x1234); put32(i, 116, 4096) }),
    ("extension-fde", "open: unsupported feature: encryption", |i, _| { put32(i, 112, 0x0537_be77); put32(i, 116, 16) }),
    // Without the incompatible bit QEMU ignores the data file name.
    ("extension-external-data", "ok", |i, _| { put32(i, 112, 0x4441_5441); put32(i, 116, 4); i[120..124].copy_from_slice(b"data") }),
    ("external-data-bit-and-name", "read: unsupported feature: the image has an external data file that is not attached (Qcow2::attach_data_file)", |i, _| { put64(i, 72, 1 << 2); put32(i, 112, 0x4441_5441); put32(i, 116, 4); i[120..124].copy_from_slice(b"data") }),
    ("external-data-name-beyond-cluster", "open: corrupt image: header extension beyond the first cluster (at host offset 0x70)", |i, _| { put32(i, 112, 0x4441_5441); put32(i, 116, 0xffff_fff0) }),
    ("bitmaps-extension-empty", "open: corrupt image: bitmaps extension of invalid length (at host offset 0x70)", |i, _| { put32(i, 112, 0x2385_2875); put32(i, 116, 0) }),
    ("backing-format-too-long", "open: corrupt image: backing format name too long (at host offset 0x70)", |i, _| { put32(i, 112, 0xe279_2aca); put32(i, 116, 16); i[120..136].copy_from_slice(b"qcow2qcow2qcow2q"); put64(i, 136, 0) }),
    ("extensions-without-end", "ok", |i, _| { for at in (112..512).step_by(8) { put32(i, at, 0x77); put32(i, at + 4, 0) } }),
    // Reads and writes ignore reserved bits as QEMU does; `check` reports them.
    ("l1-entry-reserved-bits", "ok", |i, l| i[l.l1 + 7] |= 0x01),
    ("l1-entry-bit-1", "ok", |i, l| i[l.l1 + 7] |= 0x02),
    ("l1-entry-unaligned", "ok", |i, l| put64(i, l.l1, (1 << 63) | (l.l2 as u64 + 256))),
    ("l1-entry-beyond-end", "read: corrupt image: L2 table beyond the end of the image (at host offset 0x100000)", |i, l| put64(i, l.l1, (1 << 63) | (1 << 20))),
    ("l1-entry-on-header", "ok", |i, l| put64(i, l.l1, (1 << 63) | 1)),
    ("l1-entry-on-reftable", "read: corrupt image: L2 table overlaps the header, L1 or refcount table (at host offset 0x200)", |i, l| put64(i, l.l1, (1 << 63) | l.reftable as u64)),
    ("l1-entry-on-l1", "read: corrupt image: L2 table overlaps the header, L1 or refcount table (at host offset 0x600)", |i, l| put64(i, l.l1, (1 << 63) | l.l1 as u64)),
    ("l2-entry-reserved-bits", "ok", |i, l| i[l.l2] |= 0x02),
    ("l2-entry-bit-1", "ok", |i, l| i[l.l2 + 7] |= 0x02),
    ("l2-unallocated-reserved-bit", "ok", |i, l| put64(i, l.l2 + 24, 0x2)),
    ("l2-zero-reserved-bits", "ok", |i, l| put64(i, l.l2 + 24, 0x1fe | 1)),
    ("l2-unallocated-bit-56", "ok", |i, l| put64(i, l.l2 + 24, 1 << 56)),
    ("l2-entry-offset-high-bit", "read: corrupt image: data cluster beyond the end of the image (at host offset 0x1000000000a00)", |i, l| i[l.l2 + 1] |= 0x01),
    ("l2-entry-unaligned", "ok", |i, l| put64(i, l.l2, (1 << 63) | (l.data as u64 + 256))),
    ("l2-entry-beyond-end", "read: corrupt image: data cluster beyond the end of the image (at host offset 0x10000000)", |i, l| put64(i, l.l2, (1 << 63) | (1 << 28))),
    ("l2-entry-max-offset", "read: corrupt image: data cluster beyond the end of the image (at host offset 0xfffffffffffe00)", |i, l| put64(i, l.l2, (1 << 63) | 0x00ff_ffff_ffff_fe00)),
    ("l2-entry-copied-without-offset", "ok", |i, l| put64(i, l.l2, 1 << 63)),
    ("l2-entry-on-l1", "read: corrupt image: data cluster overlaps the header, L1 or refcount table (at host offset 0x600)", |i, l| put64(i, l.l2, (1 << 63) | l.l1 as u64)),
    ("l2-entry-on-own-table", "write: corrupt image: data cluster is live metadata (at host offset 0x800)", |i, l| put64(i, l.l2, (1 << 63) | l.l2 as u64)),
    ("l2-entry-on-refblock", "write: corrupt image: data cluster is live metadata (at host offset 0x400)", |i, l| put64(i, l.l2, (1 << 63) | l.refblock as u64)),
    // Not detectable cheaply: the write lands on the uncached L2 table and the
    // damage is caught at the next lookup; `check` (and verified opens) see it.
    ("l2-entry-on-other-l2", "write: corrupt image: data cluster beyond the end of the image (at host offset 0xa5a5a5a5a5a400)", |i, l| { let l2b = be64(i, l.l1 + 8) & 0x00ff_ffff_ffff_fe00; put64(i, l.l2, (1 << 63) | l2b) }),
    ("l2-entry-copied-cleared", "write: corrupt image: L2 entry without COPIED flag (at host offset 0x800)", |i, l| i[l.l2] &= 0x7f),
    ("l1-entry-copied-cleared", "write: corrupt image: L1 entry without COPIED flag (at host offset 0x600)", |i, l| i[l.l1] &= 0x7f),
    // Compressed descriptors, read through the host's decoders: a whole
    // cluster or a precise `Corrupt` error.
    ("l2-entry-compressed", "read: corrupt image: invalid deflate stream (at host offset 0xa00)", |i, l| put64(i, l.l2, (1 << 62) | l.data as u64)),
    ("l2-entry-compressed-valid", "ok", |i, l| compress_guest_0(i, l, &stream(Compression::Zlib), 0, 1)),
    ("l2-entry-compressed-valid-zstd", "ok", |i, l| { zstd_image(i); compress_guest_0(i, l, &stream(Compression::Zstd), 0, 1) }),
    ("l2-entry-compressed-two-sectors", "ok", |i, l| compress_guest_0(i, l, &stream(Compression::Zlib), 500, 2)),
    ("l2-entry-compressed-on-header", "read: corrupt image: compressed cluster overlaps metadata (at host offset 0x10)", |i, l| put64(i, l.l2, compressed(16, 1))),
    ("l2-entry-compressed-on-l1", "read: corrupt image: compressed cluster overlaps metadata (at host offset 0x600)", |i, l| put64(i, l.l2, compressed(l.l1, 1))),
    ("l2-entry-compressed-beyond-end", "read: corrupt image: compressed cluster beyond the end of the image (at host offset 0x100000)", |i, l| put64(i, l.l2, compressed(1 << 20, 1))),
    ("l2-entry-compressed-offset-max", "read: corrupt image: compressed cluster beyond the end of the image (at host offset 0x1fffffffffffffff)", |i, l| put64(i, l.l2, compressed((1 << 61) - 1, 1))),
    // A stream that starts in the image's last sector and goes on past it
    // (the device's end cuts the input: the decoder reports it).
    ("l2-entry-compressed-across-end", "read: corrupt image: deflate stream ends before a whole cluster (at host offset 0x15f4)", |i, l| { let at = i.len() + 500; i.resize(i.len() + 512, 0); i[at..].copy_from_slice(&stream(Compression::Zlib)[..12]); put64(i, l.l2, compressed(at, 2)) }),
    // The stream goes on past the descriptor's last sector: the decoder,
    // told the input ends there, reports the stream cut short.
    ("l2-entry-compressed-too-short", "read: corrupt image: deflate stream ends before a whole cluster (at host offset 0xbf4)", |i, l| compress_guest_0(i, l, &stream(Compression::Zlib), 500, 1)),
    ("l2-entry-compressed-too-short-zstd", "read: corrupt image: zstd stream ends before a whole cluster (at host offset 0xbf4)", |i, l| { zstd_image(i); compress_guest_0(i, l, &stream(Compression::Zstd), 500, 1) }),
    ("l2-entry-compressed-garbage", "read: corrupt image: invalid deflate stream (at host offset 0xa00)", |i, l| { let c = l.cluster; i[l.data..l.data + c].fill(0xff); put64(i, l.l2, compressed(l.data, 1)) }),
    ("l2-entry-compressed-garbage-zstd", "read: corrupt image: invalid zstd stream (at host offset 0xa00)", |i, l| { zstd_image(i); put64(i, l.l2, compressed(l.data, 1)) }),
    ("reftable-entry-unaligned", "write: corrupt image: reserved bits set in a refcount table entry (at host offset 0x200)", |i, l| put64(i, l.reftable, l.refblock as u64 + 256)),
    ("reftable-entry-on-data", "write: corrupt image: data cluster is live metadata (at host offset 0xa00)", |i, l| put64(i, l.reftable, l.data as u64)),
    ("reftable-entry-on-l2", "write: corrupt image: metadata cluster used as two kinds of table (at host offset 0x800)", |i, l| put64(i, l.reftable, l.l2 as u64)),
    ("reftable-entry-reserved", "write: corrupt image: reserved bits set in a refcount table entry (at host offset 0x200)", |i, l| put64(i, l.reftable, l.refblock as u64 + 1)),
    ("reftable-entry-beyond-end", "write: corrupt image: refcount block beyond the end of the image (at host offset 0x100000)", |i, l| put64(i, l.reftable, 1 << 20)),
    ("reftable-entry-on-l1", "write: corrupt image: refcount block overlaps the header, L1 or refcount table (at host offset 0x600)", |i, l| put64(i, l.reftable, l.l1 as u64)),
    ("refcounts-zeroed", "ok", |i, l| { let c = l.cluster; i[l.refblock..l.refblock + c].fill(0) }),
    ("refcount-overflow-16", "ok", |i, l| { i[l.refblock..l.refblock + 2].copy_from_slice(&[0xff, 0xff]) }),
    ("l2-shared-by-two-l1-entries", "ok", |i, l| { let e = be64(i, l.l1); put64(i, l.l1 + 8, e) }),
    ("corrupt-bit", "write: corrupt image: image is marked corrupt; open it read-only (at host offset 0x0)", |i, _| put64(i, 72, 1 << 1)),
];

pub fn generate(dir: &Path) -> Result<(), String> {
    let (base, layout) = base();
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut manifest = String::from(
        "# Hostile images: file, then the outcome the `hostile` test must see.\n\
         # Regenerate with `cargo xtask corpus`.\n",
    );
    std::fs::write(dir.join("base.qcow2"), &base).map_err(|e| e.to_string())?;
    writeln!(manifest, "base.qcow2\tok").expect("string");
    for (name, outcome, mutate) in CASES {
        let mut img = base.clone();
        mutate(&mut img, &layout);
        let file = format!("{name}.qcow2");
        std::fs::write(dir.join(&file), &img).map_err(|e| e.to_string())?;
        writeln!(manifest, "{file}\t{outcome}").expect("string");
    }
    std::fs::write(dir.join("MANIFEST"), manifest).map_err(|e| e.to_string())?;
    println!(
        "wrote {} hostile images to {}",
        CASES.len() + 1,
        dir.display()
    );
    Ok(())
}

/// Runs a QEMU tool, failing with its stderr.
fn qemu(program: &str, args: &[&str]) -> Result<(), String> {
    output_of(program, args, None).map(drop)
}

/// Writes `bytes` as seed `name` of the fuzz targets that take a whole
/// image (`open_read`, `check_repair`).
fn seed_image_targets(fuzz: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    for dir in ["open_read", "check_repair"] {
        std::fs::write(fuzz.join("corpus").join(dir).join(name), bytes)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// `qemu-img convert -c` of the qcow2 image `source` into a qcow2 image at
/// `target` created with `options`; returns `target`.
fn compressed_copy(source: &str, target: &Path, options: &str) -> Result<PathBuf, String> {
    let t = target.to_str().ok_or("temp path not UTF-8")?;
    qemu(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", "-o", options, source, t],
    )?;
    Ok(target.to_path_buf())
}

/// Seeds for the fuzz targets: small images made by qemu-img and qemu-io
/// with varied options, their first sectors for the header target, and a
/// few operation scripts.
pub fn fuzz_seeds(fuzz: &Path) -> Result<(), String> {
    let tmp = std::env::temp_dir().join(format!("qcow2-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let images: &[(&str, &str)] = &[
        ("v3-c512-r16", "cluster_size=512"),
        ("v3-c512-r1", "cluster_size=512,refcount_bits=1"),
        ("v3-c512-r64", "cluster_size=512,refcount_bits=64"),
        ("v3-c4k-lazy", "cluster_size=4096,lazy_refcounts=on"),
        ("v2-c512", "cluster_size=512,compat=0.10"),
        ("v3-c1k-zstd", "cluster_size=1024,compression_type=zstd"),
    ];
    let mut made = 0;
    for dir in ["header", "open_read", "check_repair", "ops"] {
        std::fs::create_dir_all(fuzz.join("corpus").join(dir)).map_err(|e| e.to_string())?;
    }
    for (name, opts) in images {
        let path = tmp.join(format!("{name}.qcow2"));
        let p = path.to_str().ok_or("temp path not UTF-8")?;
        qemu(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, p, "256K"],
        )?;
        qemu(
            "qemu-io",
            &[
                "-c",
                "write -P 0x11 0 3k",
                "-c",
                "write -P 0x22 40k 1k",
                "-c",
                "write -z 100k 2k",
                "-c",
                "write -P 0x33 200k 700",
                p,
            ],
        )?;
        let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
        seed_image_targets(fuzz, name, &bytes)?;
        std::fs::write(fuzz.join("corpus/header").join(name), &bytes[..512])
            .map_err(|e| e.to_string())?;
        made += 1;
    }
    // Compressed images (zlib, zstd) and one with an internal snapshot.
    let plain = tmp.join("plain.qcow2");
    let p = plain.to_str().ok_or("temp path not UTF-8")?;
    qemu(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            p,
            "64K",
        ],
    )?;
    qemu("qemu-io", &["-c", "write -P 0x44 0 8k", p])?;
    let compressed = compressed_copy(p, &tmp.join("compressed.qcow2"), "cluster_size=512")?;
    let zstd = compressed_copy(
        p,
        &tmp.join("compressed-zstd.qcow2"),
        "cluster_size=512,compression_type=zstd",
    )?;
    qemu("qemu-img", &["snapshot", "-c", "s1", p])?;
    qemu("qemu-io", &["-c", "write -P 0x55 0 1k", p])?;
    for (name, path) in [
        ("compressed", &compressed),
        ("compressed-zstd", &zstd),
        ("snapshot", &plain),
    ] {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        seed_image_targets(fuzz, name, &bytes)?;
        made += 1;
    }
    // The hostile images with compressed descriptors, so that the image
    // targets start from streams the decoders reject in every way.
    let hostile = fuzz
        .parent()
        .unwrap_or(Path::new("."))
        .join("qcow2-std-shim/tests/hostile");
    let entries = std::fs::read_dir(&hostile).map_err(|e| format!("{}: {e}", hostile.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let Some(name) = path.file_stem().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with("l2-entry-compressed") {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
        seed_image_targets(fuzz, &format!("hostile-{name}"), &bytes)?;
        made += 1;
    }
    // Operation scripts: config bytes, then opcodes with arguments.
    let scripts: &[(&str, &[u8])] = &[
        ("write-read", &[0, 4, 0, 0, 0, 5, 4, 0, 0, 0, 5]),
        (
            "write-crash",
            &[1, 6, 0, 0, 2, 10, 0, 1, 3, 7, 2, 4, 0, 2, 10],
        ),
        (
            "reopen-lazy",
            &[0x41, 4, 2, 1, 0, 20, 6, 3, 0, 100, 4, 7, 1, 4, 0, 0, 30],
        ),
        (
            "v2-fill",
            &[
                0x80, 0, 0, 0, 0, 23, 0, 0, 24, 23, 0, 0, 48, 23, 5, 7, 0, 4, 0, 30, 20,
            ],
        ),
        // Compressed clusters (zstd, 1 KiB), overwritten in part,
        // discarded, zeroed, across a crash and a reopen.
        (
            "compressed-zstd",
            &[
                0x21, 0x83, 2, 0, 1, 0, 3, 0, 2, 0, 4, 0, 0, 20, 0, 0, 5, 3, 4, 0, 0, 20, 9, 0, 9,
                2, 5, 8, 0, 4, 6, 7, 2, 4, 0, 0, 24, 6, 2, 0, 1, 0, 4, 0, 0, 24,
            ],
        ),
        // A backing (2 KiB clusters, ending mid-cluster): copy-on-write,
        // discard and write-zeroes over it, a crash, a reopen.
        (
            "backing-v3",
            &[
                0x16, 0x03, 0, 0, 3, 2, 4, 0, 0, 20, 8, 0, 8, 20, 9, 1, 0, 5, 4, 0, 0, 24, 5, 0, 1,
                10, 7, 7, 1, 4, 1, 0, 24, 6, 4, 1, 0xf8, 8,
            ],
        ),
        // v2 over a backing ending past the disk, with compressed writes:
        // discards keep everything there.
        (
            "backing-v2-compressed",
            &[
                0x9d, 0x80, 2, 0, 3, 0, 0, 0, 0x20, 3, 8, 0, 0, 40, 4, 0, 0, 24, 9, 0, 0x30, 0x85,
                7, 2, 4, 0, 0, 24, 6, 4, 0, 0x30, 24,
            ],
        ),
    ];
    for (name, bytes) in scripts {
        std::fs::write(fuzz.join("corpus/ops").join(name), bytes).map_err(|e| e.to_string())?;
    }
    std::fs::remove_dir_all(&tmp).ok();
    println!(
        "wrote {made} image seeds and {} operation scripts under {}",
        scripts.len(),
        fuzz.display()
    );
    Ok(())
}
