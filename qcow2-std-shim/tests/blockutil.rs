//! The block utilities (`qcow2_core::blockutil`) and sparseness queries
//! (`qcow2_core::seek`) on host devices and real images, with QEMU 10
//! (`qemu-img`, `qemu-io`) as the oracle:
//!
//! * our `seek_mapped` / `seek_unmapped` walk of images QEMU wrote (data,
//!   sub-cluster writes, writes across L2 tables, zero clusters with and
//!   without a preallocated offset, discards, a partial last cluster)
//!   agrees with `qemu-img map` (`data: true` extents, merged);
//! * `fold_unmapped` finds exactly the holes between them, `fold_mapped`
//!   reads exactly QEMU's data, `fold` reads what `qemu-img convert` does;
//! * `sparse_copy` into fresh images: `qemu-img compare` says identical,
//!   `qemu-img check` is clean, and no more data is allocated than the
//!   source maps;
//! * `compare` finds the first differing sector where `qemu-img compare`
//!   does; `copy` between RAM devices, images and raw files;
//! * devices of different sizes, empty buffers, read-only destinations;
//! * a 2 PiB image is crossed with L1 lookups only.
//!
//! Set `QCOW2_TEST_KEEP=1` to keep the temporary directories.

use qcow2_core::blockutil::{
    compare, copy, fold, fold_mapped, fold_unmapped, sparse_copy, UtilError,
};
use qcow2_core::seek::{AllMapped, SeekableDevice};
use qcow2_core::{BlockDevice, CreateOptions, Error, Mapping, OpenOptions, Qcow2, Sector, SECTOR};
use qcow2_std_shim::{block_on, host_cache, FileDevice, HostCache, RamDevice, HOST_SLICE_SECTORS};

/// A host image without backing or workspace.
type HostQcow2<D> = Qcow2<D, HostCache, HOST_SLICE_SECTORS>;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use test_support::qemu;
use test_support::{noise, path_str, Scratch, KIB, MIB, PIB};

const S: u64 = SECTOR as u64;

/// The complement of `extents` within `[0, size)`.
fn holes_between(extents: &[(u64, u64)], size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0;
    for &(a, b) in extents {
        if a > pos {
            out.push((pos, a));
        }
        pos = b;
    }
    if pos < size {
        out.push((pos, size));
    }
    out
}

// ---------------------------------------------------------------------------
// Our side
// ---------------------------------------------------------------------------

fn open_ro(path: &Path) -> HostQcow2<FileDevice> {
    let dev = FileDevice::open(path, false).expect("open file");
    block_on(Qcow2::open(dev, host_cache(), OpenOptions::read_only()))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn open_rw(path: &Path) -> HostQcow2<FileDevice> {
    let dev = FileDevice::open(path, true).expect("open file");
    block_on(Qcow2::open(dev, host_cache(), OpenOptions::read_write()))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn create_ours(path: &Path, size: u64, cluster_bits: u32) -> HostQcow2<FileDevice> {
    let dev = FileDevice::create(path).expect("create file");
    let mut options = CreateOptions::new(size);
    options.cluster_bits = cluster_bits;
    block_on(Qcow2::create(dev, host_cache(), options))
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()))
}

fn close<D: BlockDevice>(image: HostQcow2<D>) {
    block_on(image.close()).expect("close");
}

/// The mapped regions of `dev` as byte ranges, walked with the seeks.
fn our_data_extents<D: SeekableDevice>(dev: &mut D) -> Vec<(u64, u64)> {
    let end = dev.sector_count();
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let start = block_on(dev.seek_mapped(pos)).expect("seek_mapped");
        assert!(start >= pos && start <= end, "seek_mapped({pos}) = {start}");
        if start == end {
            break;
        }
        let stop = block_on(dev.seek_unmapped(start)).expect("seek_unmapped");
        assert!(
            stop > start && stop <= end,
            "seek_unmapped({start}) = {stop}"
        );
        out.push((start * S, stop * S));
        pos = stop;
    }
    out
}

/// What the seeks must answer at byte `p` given the data extents: the
/// next data start and the next hole start, in sectors.
fn expected_seeks(extents: &[(u64, u64)], p: u64, size: u64) -> (u64, u64) {
    let mut mapped = size;
    let mut unmapped = p;
    for &(a, b) in extents {
        if b <= p {
            continue;
        }
        if mapped == size {
            mapped = a.max(p);
        }
        if a <= unmapped {
            unmapped = unmapped.max(b);
        }
    }
    (mapped / S, unmapped.min(size) / S)
}

fn sectors(bytes: &[u8]) -> Vec<Sector> {
    bytes
        .chunks(SECTOR)
        .map(|c| {
            let mut s = [0; SECTOR];
            s[..c.len()].copy_from_slice(c);
            s
        })
        .collect()
}

/// FNV-1a over bytes.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    h
}
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// A device wrapper that counts reads and records written ranges.
struct Counting<D> {
    inner: D,
    reads: u64,
    writes: Vec<(u64, u64)>,
}

impl<D> Counting<D> {
    fn new(inner: D) -> Self {
        Counting {
            inner,
            reads: 0,
            writes: Vec::new(),
        }
    }

    /// Written ranges in bytes, sorted and merged.
    fn written(&self) -> Vec<(u64, u64)> {
        let mut w = self.writes.clone();
        w.sort();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (a, b) in w {
            match out.last_mut() {
                Some(last) if last.1 >= a => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        out.into_iter().map(|(a, b)| (a * S, b * S)).collect()
    }
}

impl<D: BlockDevice> BlockDevice for Counting<D> {
    type Error = D::Error;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), D::Error> {
        self.reads += 1;
        self.inner.read(first, buf).await
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), D::Error> {
        self.writes.push((first, first + buf.len() as u64));
        self.inner.write(first, buf).await
    }

    async fn flush(&mut self) -> Result<(), D::Error> {
        self.inner.flush().await
    }

    fn sector_count(&self) -> u64 {
        self.inner.sector_count()
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), D::Error> {
        self.inner.set_sector_count(n).await
    }
}

// ---------------------------------------------------------------------------
// A scattered image written by QEMU
// ---------------------------------------------------------------------------

/// An image QEMU wrote: data here and there, zero clusters with and
/// without preallocation, discards, writes across L2 tables, the last
/// (partial) cluster.
struct Scattered {
    path: PathBuf,
    size: u64,
    cluster: u64,
    v2: bool,
}

fn scattered(dir: &Scratch, name: &str, cluster_bits: u32, v2: bool) -> Scattered {
    let cs = 1u64 << cluster_bits;
    // Guest bytes one L2 table covers.
    let table = cs * (cs / 8);
    let size = 3 * table + 3 * cs + 1024;
    let path = dir.join(name);
    let compat = if v2 { "0.10" } else { "1.1" };
    qemu::create(&path, &format!("cluster_size={cs},compat={compat}"), size);
    let mut cmds = vec![
        "write -P 0x11 0 1".to_string(),
        format!("write -P 0x22 {} {}", cs * 3 + 100, cs * 2),
        format!("write -P 0x33 {} {}", table - cs, 2 * cs),
        format!("write -P 0x44 {} {}", 2 * table + 5 * cs, 4 * cs),
        // Zero over allocated data: zero flag, offset kept (v3).
        format!("write -z {} {}", 2 * table + 6 * cs, cs),
        // Zero over nothing: zero flag, no allocation (v3).
        format!("write -z {} {}", 2 * table + 20 * cs, 3 * cs),
        // Discard part of the data.
        format!("discard {} {}", 2 * table + 8 * cs, cs),
        // Unmapping zero write over the first data run's middle.
        format!("write -z -u {} {}", cs * 4, cs),
        format!("write -P 0x55 {} 512", size - 512),
        format!("write -P 0x66 {} 512", 3 * table),
    ];
    if v2 {
        // No zero flag in v2: QEMU writes zeros, and discards deallocate.
        cmds.retain(|c| !c.starts_with("write -z -u"));
    }
    qemu::io(&path, &cmds);
    Scattered {
        path,
        size,
        cluster: cs,
        v2,
    }
}

fn for_each_layout(f: impl Fn(&Scratch, &Scattered)) {
    for (bits, v2) in [(9, false), (12, false), (16, false), (12, true)] {
        let dir = Scratch::new(&format!("layout-{bits}-{v2}"));
        let img = scattered(&dir, "src.qcow2", bits, v2);
        f(&dir, &img);
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn seeks_agree_with_qemu_img_map() {
    for_each_layout(|_, img| {
        let expected = qemu::data_ranges(&img.path);
        assert!(expected.len() >= 4, "too few extents: {expected:?}");
        if !img.v2 {
            // The layout has zero clusters with and without a preallocated
            // offset, which must count as holes.
            let map = qemu::img(&[
                "map",
                "-f",
                "qcow2",
                "--output",
                "json",
                path_str(&img.path),
            ]);
            let zero = r#""present": true, "zero": true, "data": false, "compressed": false"#;
            assert!(map.contains(&format!("{zero}, \"offset\"")), "{map}");
            assert!(map.contains(&format!("{zero}}}")), "{map}");
        }
        let mut image = open_ro(&img.path);
        assert_eq!(image.sector_count() * S, img.size);
        let ours = our_data_extents(&mut image);
        assert_eq!(ours, expected, "cluster size {}", img.cluster);

        // Every extent boundary, a sector either side, the middle of each
        // region, and a spread of other positions.
        let mut probes = vec![0, img.size - S, img.size, img.size + 7 * S];
        for &(a, b) in &expected {
            for p in [a, b, (a + b) / 2 / S * S] {
                probes.extend([p.saturating_sub(S), p, p + S]);
            }
        }
        probes.extend((0..200).map(|i| (img.size / 200 * i) / S * S));
        for p in probes {
            let p_clamped = p.min(img.size);
            let (mapped, unmapped) = expected_seeks(&expected, p_clamped, img.size);
            assert_eq!(
                block_on(image.seek_mapped(p / S)).unwrap(),
                mapped,
                "seek_mapped at byte {p}, cluster size {}",
                img.cluster
            );
            assert_eq!(
                block_on(image.seek_unmapped(p / S)).unwrap(),
                unmapped,
                "seek_unmapped at byte {p}, cluster size {}",
                img.cluster
            );
        }
    });
}

/// Images up to this size are read whole (`fold`, raw comparisons).
const SMALL: u64 = 64 * MIB;

/// Bytes `[a, b)` of a file.
fn read_range(file: &std::fs::File, a: u64, b: u64) -> Vec<u8> {
    let mut v = vec![0; (b - a) as usize];
    file.read_exact_at(&mut v, a).expect("read raw");
    v
}

#[test]
fn folds_agree_with_qemu() {
    for_each_layout(|dir, img| {
        let expected = qemu::data_ranges(&img.path);
        let raw_path = dir.join("src.raw");
        qemu::convert_to_raw(&img.path, &raw_path);
        let raw = std::fs::File::open(&raw_path).expect("open raw");
        let mut image = open_ro(&img.path);

        // fold_unmapped: exactly the holes between QEMU's data, which QEMU
        // reads as zeros (checked at both ends of big holes).
        let holes = block_on(fold_unmapped(
            &mut image,
            Vec::new(),
            |mut v, start, len| {
                v.push((start * S, (start + len) * S));
                Ok::<_, ()>(v)
            },
        ))
        .unwrap();
        assert_eq!(holes, holes_between(&expected, img.size));
        for &(a, b) in &holes {
            let edge = (b - a).min(MIB);
            for (x, y) in [(a, a + edge), (b - edge, b)] {
                assert!(
                    read_range(&raw, x, y).iter().all(|&z| z == 0),
                    "hole {a}..{b}"
                );
            }
        }

        // fold_mapped: exactly QEMU's data, in order, with QEMU's bytes, in
        // chunks of at most the buffer's 5 sectors.
        let mut buf = vec![[0u8; SECTOR]; 5];
        let seen = block_on(fold_mapped(
            &mut image,
            &mut buf,
            Vec::<(u64, u64)>::new(),
            |mut v, sector, data| {
                assert!(!data.is_empty() && data.len() <= 5);
                let at = sector * S;
                let bytes = data.as_flattened();
                let end = at + bytes.len() as u64;
                assert!(read_range(&raw, at, end) == bytes, "data at {at}");
                match v.last_mut() {
                    Some(last) if last.1 == at => last.1 = end,
                    _ => v.push((at, end)),
                }
                Ok::<_, ()>(v)
            },
        ))
        .unwrap();
        assert_eq!(seen, expected);

        // fold: every byte, as qemu-img convert reads it.
        if img.size <= SMALL {
            let mut next = 0;
            let hash = block_on(fold(&mut image, &mut buf, FNV_START, |h, sector, data| {
                assert_eq!(sector, next);
                next += data.len() as u64;
                Ok::<_, ()>(fnv(h, data.as_flattened()))
            }))
            .unwrap();
            assert_eq!(next * S, img.size);
            assert_eq!(hash, fnv(FNV_START, &read_range(&raw, 0, img.size)));
        }
    });
}

#[test]
fn sparse_copy_into_fresh_images_qemu_compares_identical() {
    for_each_layout(|dir, img| {
        let src_extents = qemu::data_ranges(&img.path);
        let src_bytes: u64 = src_extents.iter().map(|(a, b)| b - a).sum();
        let bits = img.cluster.trailing_zeros();
        // Same cluster size, and smaller clusters (4 KiB, or 512 B).
        for dst_bits in [bits, if bits > 12 { 12 } else { 9 }] {
            let dst_path = dir.join(format!("copy-{dst_bits}.qcow2"));
            let mut src = open_ro(&img.path);
            let mut dst = create_ours(&dst_path, img.size, dst_bits);
            let mut buf = vec![[0u8; SECTOR]; 16];
            block_on(sparse_copy(&mut src, &mut dst, &mut buf)).unwrap();
            close(dst);

            let (code, at) = qemu::compare(&img.path, "qcow2", &dst_path, "qcow2");
            assert_eq!((code, at), (0, None), "sparse copy differs");
            qemu::check_clean(&dst_path);
            let dst_extents = qemu::data_ranges(&dst_path);
            let dst_bytes: u64 = dst_extents.iter().map(|(a, b)| b - a).sum();
            if dst_bits == bits {
                assert_eq!(dst_extents, src_extents);
            } else {
                assert!(dst_bytes <= src_bytes, "{dst_bytes} > {src_bytes}");
                for &(a, b) in &dst_extents {
                    assert!(
                        src_extents.iter().any(|&(c, d)| c <= a && b <= d),
                        "copy maps {a}..{b} the source does not"
                    );
                }
            }
            // And our own compare agrees.
            let mut dst = open_ro(&dst_path);
            let mut other = vec![[0u8; SECTOR]; 3];
            assert_eq!(
                block_on(compare(&mut src, &mut dst, &mut buf, &mut other)).unwrap(),
                None
            );
        }

        // Into a new (sparse, so zeroed) raw file, or a zeroed RAM device
        // when small: only the mapped ranges are written.
        let mut src = open_ro(&img.path);
        let mut buf = vec![[0u8; SECTOR]; 7];
        let raw_path = dir.join("copy.raw");
        let mut file = FileDevice::create(&raw_path).expect("create raw");
        block_on(file.set_sector_count(img.size / S)).unwrap();
        let mut file = Counting::new(file);
        block_on(sparse_copy(&mut src, &mut file, &mut buf)).unwrap();
        assert_eq!(file.written(), src_extents);
        drop(file);
        assert_eq!(
            qemu::compare(&img.path, "qcow2", &raw_path, "raw"),
            (0, None)
        );
        if img.size <= SMALL {
            let mut ram = Counting::new(RamDevice::fixed(img.size / S));
            block_on(sparse_copy(&mut src, &mut ram, &mut buf)).unwrap();
            assert_eq!(ram.written(), src_extents);
            assert!(ram.inner.as_bytes() == std::fs::read(&raw_path).expect("raw").as_slice());
        }
    });
}

#[test]
fn compare_finds_the_first_difference_as_qemu_img_compare() {
    let dir = Scratch::new("compare");
    let size = 8 * MIB;
    for (i, diff_at) in [0u64, 511, 512, 200_000, 3 * MIB + 4097, size - 1]
        .into_iter()
        .enumerate()
    {
        let a = dir.join(format!("a{i}.qcow2"));
        let b = dir.join(format!("b{i}.qcow2"));
        let common = [
            "write -P 0x71 4096 100000".to_string(),
            format!("write -P 0x72 {} 65536", 5 * MIB),
        ];
        for (path, pat) in [(&a, 0x01), (&b, 0x02)] {
            qemu::create(path, "cluster_size=65536", size);
            let mut cmds = common.to_vec();
            cmds.push(format!("write -P {pat} {diff_at} 1"));
            qemu::io(path, &cmds);
        }
        let (code, qemu_at) = qemu::compare(&a, "qcow2", &b, "qcow2");
        assert_eq!(code, 1);
        let qemu_sector = qemu_at.expect("mismatch offset") / S;
        assert_eq!(qemu_sector, diff_at / S);

        let mut ia = open_ro(&a);
        let mut ib = open_ro(&b);
        for (la, lb) in [(1, 1), (8, 3), (128, 128)] {
            let mut ba = vec![[0u8; SECTOR]; la];
            let mut bb = vec![[0u8; SECTOR]; lb];
            assert_eq!(
                block_on(compare(&mut ia, &mut ib, &mut ba, &mut bb)).unwrap(),
                Some(qemu_sector),
                "difference at byte {diff_at}, buffers {la}/{lb}"
            );
        }
    }

    // An image and its raw conversion (a FileDevice) are equal; one sector
    // more on the raw side is a size difference.
    let img = dir.join("a0.qcow2");
    let raw = dir.join("a0.raw");
    qemu::convert_to_raw(&img, &raw);
    let mut image = open_ro(&img);
    let mut file = FileDevice::open(&raw, false).expect("open raw");
    let mut ba = vec![[0u8; SECTOR]; 64];
    let mut bb = vec![[0u8; SECTOR]; 64];
    assert_eq!(
        block_on(compare(&mut image, &mut file, &mut ba, &mut bb)).unwrap(),
        None
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&raw)
        .expect("open raw")
        .set_len(size + S)
        .expect("grow raw");
    let mut file = FileDevice::open(&raw, false).expect("open raw");
    assert!(matches!(
        block_on(compare(&mut image, &mut file, &mut ba, &mut bb)),
        Err(UtilError::DifferentSizes {
            source: 16384,
            destination: 16385
        })
    ));
}

#[test]
fn copy_between_ram_devices_images_and_files() {
    // RAM to RAM, in odd chunks.
    let bytes = noise(300 * SECTOR, 1);
    let mut src = RamDevice::from_bytes(&bytes);
    let mut dst = RamDevice::fixed(300);
    let mut buf = vec![[0u8; SECTOR]; 7];
    block_on(copy(&mut src, &mut dst, &mut buf)).unwrap();
    assert!(dst.as_bytes() == bytes.as_slice());
    let mut other = vec![[0u8; SECTOR]; 11];
    assert_eq!(
        block_on(compare(&mut src, &mut dst, &mut buf, &mut other)).unwrap(),
        None
    );

    // Image to a raw file: what qemu-img reads; raw file into an image of
    // ours: qemu-img compares it identical too.
    let dir = Scratch::new("copy");
    let img = scattered(&dir, "src.qcow2", 12, false);
    let raw = dir.join("out.raw");
    let mut file = FileDevice::create(&raw).expect("create raw");
    block_on(file.set_sector_count(img.size / S)).unwrap();
    let mut image = open_ro(&img.path);
    block_on(copy(&mut image, &mut file, &mut buf)).unwrap();
    drop(file);
    assert_eq!(qemu::compare(&img.path, "qcow2", &raw, "raw"), (0, None));

    let copy_path = dir.join("copy.qcow2");
    let mut dst = create_ours(&copy_path, img.size, 16);
    let mut file = FileDevice::open(&raw, false).expect("open raw");
    block_on(copy(&mut file, &mut dst, &mut buf)).unwrap();
    close(dst);
    assert_eq!(qemu::compare(&raw, "raw", &copy_path, "qcow2"), (0, None));
    qemu::check_clean(&copy_path);
}

#[test]
fn sizes_buffers_and_read_only_destinations_are_refused() {
    let mut a = RamDevice::fixed(10);
    let mut b = RamDevice::fixed(11);
    let mut buf = vec![[0u8; SECTOR]; 4];
    let mut other = vec![[0u8; SECTOR]; 4];
    let sizes = UtilError::DifferentSizes {
        source: 10,
        destination: 11,
    };
    assert_eq!(block_on(copy(&mut a, &mut b, &mut buf)), Err(sizes));
    assert_eq!(
        block_on(compare(&mut a, &mut b, &mut buf, &mut other)),
        Err(sizes)
    );
    assert_eq!(
        block_on(sparse_copy(&mut AllMapped(&mut a), &mut b, &mut buf)),
        Err(sizes)
    );
    assert_eq!(
        sizes.to_string(),
        "devices differ in size: 10 and 11 sectors"
    );
    assert_eq!(
        block_on(copy(&mut a, &mut b, &mut [])),
        Err(UtilError::EmptyBuffer)
    );
    assert_eq!(
        block_on(fold(&mut a, &mut [], 0, |n, _, _| Ok::<_, ()>(n))),
        Err(UtilError::EmptyBuffer)
    );

    // A device error names its side: a read-only file as destination.
    let dir = Scratch::new("readonly");
    let raw = dir.join("ten.raw");
    std::fs::write(&raw, vec![0u8; 10 * SECTOR]).expect("write raw");
    let mut file = FileDevice::open(&raw, false).expect("open raw");
    let r = block_on(copy(&mut a, &mut file, &mut buf));
    assert!(matches!(r, Err(UtilError::Destination(_))), "{r:?}");
    let r = block_on(copy(&mut AllMapped(&mut file), &mut a, &mut buf));
    assert!(r.is_ok(), "{r:?}");

    // A read-only image as destination: the first write fails.
    let src = dir.join("src.qcow2");
    let dst = dir.join("dst.qcow2");
    for p in [&src, &dst] {
        qemu::create(p, "cluster_size=65536", 4 * MIB);
    }
    qemu::io(&src, &["write -P 9 1M 64k".to_string()]);
    let mut source = open_ro(&src);
    let mut target = open_ro(&dst);
    let r = block_on(sparse_copy(&mut source, &mut target, &mut buf));
    assert!(
        matches!(r, Err(UtilError::Destination(Error::ReadOnly))),
        "{r:?}"
    );
    let r = block_on(copy(&mut source, &mut target, &mut buf));
    assert!(matches!(r, Err(UtilError::Destination(Error::ReadOnly))));
    // Read-write, the same copy works and nothing else is allocated.
    let mut target = open_rw(&dst);
    block_on(sparse_copy(&mut source, &mut target, &mut buf)).unwrap();
    close(target);
    assert_eq!(qemu::compare(&src, "qcow2", &dst, "qcow2"), (0, None));
    assert_eq!(qemu::data_ranges(&dst), vec![(MIB, MIB + 64 * KIB)]);
}

#[test]
fn two_pib_image_is_crossed_by_l1_lookups() {
    let dir = Scratch::new("2pib");
    let path = dir.join("big.qcow2");
    qemu::create(&path, "cluster_size=65536", 2 * PIB);
    qemu::io(
        &path,
        &[
            format!("write -P 1 {} 4096", PIB),
            format!("write -P 2 {} 512", 2 * PIB - 512),
        ],
    );
    let dev = Counting::new(FileDevice::open(&path, false).expect("open"));
    let mut image = block_on(Qcow2::open(dev, host_cache(), OpenOptions::read_only()))
        .unwrap_or_else(|e| panic!("{e}"));
    let l1_bytes = u64::from(image.header().l1_size) * 8;
    let before = image.device().reads;
    let t = std::time::Instant::now();
    let extents = our_data_extents(&mut image);
    eprintln!(
        "walk {:?}, {} reads",
        t.elapsed(),
        image.device().reads - before
    );
    assert_eq!(
        extents,
        vec![(PIB, PIB + 64 * KIB), (2 * PIB - 64 * KIB, 2 * PIB)]
    );
    // (Not checked against `qemu-img map` here: it takes half a minute
    // on 2 PiB; the layouts above cover the agreement.)
    // The walk read the L1 table once (4 KiB cache slices), the two
    // allocated L2 tables (16 slices each) and nothing else: not one read
    // per cluster (2^35 of them).
    let reads = image.device().reads - before;
    assert!(
        reads <= l1_bytes / 4096 + 2 * 16 + 4,
        "{reads} reads for an L1 table of {l1_bytes} bytes"
    );

    let holes = block_on(fold_unmapped(&mut image, 0u64, |n, _, len| {
        Ok::<_, ()>(n + len)
    }))
    .unwrap();
    assert_eq!(holes * S, 2 * PIB - 128 * KIB);
    let mut buf = vec![[0u8; SECTOR]; 128];
    let mapped = block_on(fold_mapped(&mut image, &mut buf, 0u64, |n, _, d| {
        Ok::<_, ()>(n + d.iter().filter(|s| s.iter().any(|&b| b != 0)).count() as u64)
    }))
    .unwrap();
    assert_eq!(mapped, 8 + 1);
}

#[test]
fn seeks_of_images_we_wrote_agree_with_qemu() {
    let dir = Scratch::new("ours");
    let path = dir.join("ours.qcow2");
    let mut image = create_ours(&path, 64 * MIB, 12);
    let writes = [
        0u64,
        5 * 4096 + 512,
        2 * MIB - 512,
        40 * MIB,
        64 * MIB - 4096,
    ];
    for (i, at) in writes.into_iter().enumerate() {
        let data = sectors(&noise(3 * SECTOR, i as u64 + 10));
        block_on(image.write(at / S, &data)).unwrap();
    }
    // Seeks on the open, written image (its cache dirty), then reopened.
    let expected = [
        (0, 4 * KIB),
        (20 * KIB, 24 * KIB),
        (2 * MIB - 4 * KIB, 2 * MIB + 4 * KIB),
        (40 * MIB, 40 * MIB + 4 * KIB),
        (64 * MIB - 4 * KIB, 64 * MIB),
    ];
    assert_eq!(our_data_extents(&mut image), expected);
    close(image);
    qemu::check_clean(&path);
    assert_eq!(qemu::data_ranges(&path), expected);
    let mut image = open_ro(&path);
    assert_eq!(our_data_extents(&mut image), expected);
    let (mapping, _) = block_on(image.map(2 * MIB - 512)).unwrap();
    assert!(matches!(mapping, Mapping::Data { .. }), "{mapping:?}");
}
