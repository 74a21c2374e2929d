//! Model-based random testing: random reads and writes against a plain byte
//! array, with a tiny metadata cache so eviction happens constantly, close
//! and reopen in between, and `qemu-img check` / `compare` at the end.

use qcow2_core::{
    BlockDevice, CreateOptions, Error, OpenOptions, Qcow2, Sector, Slot, Version, SECTOR,
};
use qcow2_std_shim::{block_on, RamDevice};
use test_support::model::assert_image_matches;
use test_support::{ok, path_str, qemu_img, qemu_io, Rng, Scratch};

type Tiny<const K: usize> = Qcow2<RamDevice, [Slot<K>; 3], K>;

/// Runs `ops` random operations on a fresh image and checks every read
/// against the model; returns the final device and model.
fn run_model<const K: usize>(
    options: CreateOptions,
    seed: u64,
    ops: usize,
) -> (RamDevice, Vec<u8>) {
    let size = options.size as usize;
    let sectors = (size / SECTOR) as u64;
    let cluster_sectors = (1u64 << options.cluster_bits) / SECTOR as u64;
    let mut model = vec![0u8; size];
    let mut rng = Rng::new(seed);
    let cache = || [const { Slot::<K>::EMPTY }; 3];
    let mut img: Tiny<K> = block_on(Qcow2::create(RamDevice::new(), cache(), options)).unwrap();
    for op in 0..ops {
        // Lengths up to three clusters so writes straddle cluster and L2 boundaries.
        let len = 1 + rng.below(3 * cluster_sectors);
        let first = rng.below(sectors - len.min(sectors - 1));
        let len = len.min(sectors - first);
        let range = first as usize * SECTOR..(first + len) as usize * SECTOR;
        match rng.below(12) {
            0..=3 => {
                let tag = rng.next_u64();
                let mut buf = vec![[0u8; SECTOR]; len as usize];
                for (i, s) in buf.iter_mut().enumerate() {
                    s.fill((tag as u8).wrapping_add(i as u8));
                    s[..8].copy_from_slice(&(first + i as u64).to_le_bytes());
                }
                block_on(img.write(first, &buf)).unwrap();
                model[range].copy_from_slice(buf.as_flattened());
            }
            4 => {
                // Whole clusters only (and the disk's partial last one).
                block_on(img.discard(first, len)).unwrap();
                let start = first.next_multiple_of(cluster_sectors);
                let end = first + len;
                let stop = if end == sectors {
                    end
                } else {
                    end / cluster_sectors * cluster_sectors
                };
                if start < stop {
                    model[start as usize * SECTOR..stop as usize * SECTOR].fill(0);
                }
            }
            5 => {
                let unmap = rng.below(2) == 0;
                block_on(img.write_zeroes(first, len, unmap)).unwrap();
                model[range].fill(0);
            }
            6..=9 => {
                let mut buf = vec![[0u8; SECTOR]; len as usize];
                block_on(img.read(first, &mut buf)).unwrap();
                assert!(
                    buf.as_flattened() == &model[range],
                    "seed {seed} op {op}: read of {len} sectors at {first} differs"
                );
            }
            _ => {
                if rng.below(4) == 0 {
                    let (dev, _) = block_on(img.close()).unwrap();
                    let opts = OpenOptions::read_write();
                    img = block_on(Qcow2::open(dev, cache(), opts)).unwrap();
                } else {
                    block_on(img.flush()).unwrap();
                }
            }
        }
    }
    // Everything reads back after a final reopen.
    let (dev, _) = block_on(img.close()).unwrap();
    let mut img: Tiny<K> = block_on(Qcow2::open(dev, cache(), OpenOptions::read_only())).unwrap();
    let mut buf = vec![[0u8; SECTOR]; sectors as usize];
    block_on(img.read(0, &mut buf)).unwrap();
    assert!(
        buf.as_flattened() == &model[..],
        "seed {seed}: final contents differ"
    );
    let (dev, _) = block_on(img.close()).unwrap();
    (dev, model)
}

/// `qemu-img check` finds the image clean, and its contents equal the model.
fn qemu_agrees(dev: &RamDevice, model: &[u8], name: &str) {
    let dir = Scratch::new(&format!("model-{name}"));
    assert_image_matches(&dir, name, dev.as_bytes(), model);
}

fn options(size: u64, cluster_bits: u32, refcount_order: u32, version: Version) -> CreateOptions {
    CreateOptions {
        size,
        cluster_bits,
        refcount_order,
        version,
        ..CreateOptions::new(size)
    }
}

#[test]
fn random_ops_512_byte_clusters_every_refcount_width() {
    for order in 0..=6 {
        let opts = options(2 << 20, 9, order, Version::V3);
        let (dev, model) = run_model::<1>(opts, 0x1234 + u64::from(order), 2500);
        qemu_agrees(&dev, &model, &format!("c512-r{order}"));
    }
}

#[test]
fn random_ops_4k_clusters_v2_and_slices_larger_than_clusters() {
    let (dev, model) = run_model::<1>(options(8 << 20, 12, 4, Version::V2), 77, 3000);
    qemu_agrees(&dev, &model, "c4k-v2");
    // 4 KiB cache slices on 512-byte clusters: slices shrink to a cluster.
    let (dev, model) = run_model::<8>(options(1 << 20, 9, 4, Version::V3), 78, 3000);
    qemu_agrees(&dev, &model, "c512-k8");
}

#[test]
fn random_ops_64k_clusters_large_slices() {
    let (dev, model) = run_model::<8>(options(64 << 20, 16, 4, Version::V3), 99, 1500);
    qemu_agrees(&dev, &model, "c64k-k8");
}

#[test]
fn fixed_device_reports_no_space_and_stays_consistent() {
    // Room for the metadata and a handful of clusters only.
    let opts = options(1 << 20, 9, 4, Version::V3);
    let mut img: Tiny<1> = block_on(Qcow2::create(
        RamDevice::fixed(24),
        [const { Slot::<1>::EMPTY }; 3],
        opts,
    ))
    .unwrap();
    let data = [[0x5a_u8; SECTOR]; 1];
    let mut written = 0u64;
    let err = loop {
        match block_on(img.write(written * 4, &data)) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 100, "a 24-sector device cannot take 100 clusters");
    };
    assert_eq!(err, Error::NoSpace);
    // What was written before stays readable after a clean close.
    let (dev, _) = block_on(img.close()).unwrap();
    let mut img: Tiny<1> = block_on(Qcow2::open(
        dev,
        [const { Slot::<1>::EMPTY }; 3],
        OpenOptions::read_only(),
    ))
    .unwrap();
    for i in 0..written {
        let mut back: [Sector; 1] = [[0; SECTOR]];
        block_on(img.read(i * 4, &mut back)).unwrap();
        assert_eq!(back, data);
    }
}

#[test]
fn sequential_fill_moves_the_refcount_table_twice() {
    // 64-bit refcounts on 512-byte clusters: a block covers 64 clusters and
    // the initial one-cluster table 64 blocks, so 6 MiB of data outgrows it.
    let opts = options(6 << 20, 9, 6, Version::V3);
    let mut img: Tiny<1> = block_on(Qcow2::create(
        RamDevice::new(),
        [const { Slot::<1>::EMPTY }; 3],
        opts,
    ))
    .unwrap();
    let sectors = (opts.size / SECTOR as u64) as usize;
    let mut model = vec![0u8; opts.size as usize];
    let mut tables = vec![img.header().refcount_table_offset];
    for first in (0..sectors).step_by(7) {
        let n = 7.min(sectors - first);
        let buf: Vec<Sector> = (first..first + n)
            .map(|s| [(s % 251) as u8 + 1; SECTOR])
            .collect();
        block_on(img.write(first as u64, &buf)).unwrap();
        model[first * SECTOR..(first + n) * SECTOR].copy_from_slice(buf.as_flattened());
        let table = img.header().refcount_table_offset;
        if tables.last() != Some(&table) {
            tables.push(table);
        }
    }
    assert!(
        tables.len() >= 3,
        "refcount table moved only {} times",
        tables.len() - 1
    );
    let (dev, _) = block_on(img.close()).unwrap();
    qemu_agrees(&dev, &model, "reftable-growth");
}

#[test]
fn image_on_a_fixed_partition_uses_the_space_inside_it() {
    // A fixed 2 MiB device holding a 1 MiB disk: every write fits without growing.
    let opts = options(1 << 20, 12, 4, Version::V3);
    let mut img: Tiny<1> = block_on(Qcow2::create(
        RamDevice::fixed(4096),
        [const { Slot::<1>::EMPTY }; 3],
        opts,
    ))
    .unwrap();
    let data: Vec<Sector> = (0..2048u32).map(|s| [(s % 253) as u8; SECTOR]).collect();
    block_on(img.write(0, &data[..1024])).unwrap();
    let (dev, _) = block_on(img.close()).unwrap();
    assert_eq!(dev.sector_count(), 4096);
    // Reopened, the free search starts at the device end and must wrap around.
    let mut img: Tiny<1> = block_on(Qcow2::open(
        dev,
        [const { Slot::<1>::EMPTY }; 3],
        OpenOptions::read_write(),
    ))
    .unwrap();
    block_on(img.write(1024, &data[1024..])).unwrap();
    let (dev, _) = block_on(img.close()).unwrap();
    assert_eq!(dev.sector_count(), 4096);
    qemu_agrees(&dev, data.as_flattened(), "fixed-partition");
}

#[test]
fn host_offsets_beyond_4_gib_round_trip_through_qemu() {
    use qcow2_std_shim::{FileDevice, Image};
    let dir = Scratch::new("model-beyond-4g");
    let path = dir.join("beyond-4g.qcow2");
    let img = Image::create(
        FileDevice::create(&path).unwrap(),
        &CreateOptions::new(8 << 30),
    )
    .unwrap();
    img.close().unwrap();
    // A sparse 5 GiB file: the allocator continues at its end, past 4 GiB.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(5 << 30)
        .unwrap();
    let mut img = Image::open(
        FileDevice::open(&path, true).unwrap(),
        &OpenOptions::read_write(),
    )
    .unwrap();
    img.write_at(0, &[0x11; 65536]).unwrap();
    img.write_at((6 << 30) + 512, &[0x22; 70000]).unwrap();
    match img.map(0).unwrap().0 {
        qcow2_core::Mapping::Data { host } => assert!(host >= 5 << 30, "host offset {host:#x}"),
        other => panic!("guest offset 0 not mapped to data: {other:?}"),
    }
    img.close().unwrap();
    let p = path_str(&path);
    ok(qemu_img(&["check", p]), "qemu-img check");
    let io = qemu_io(&[
        "-r",
        "-c",
        "read -P 0x11 0 64k",
        "-c",
        "read -P 0x22 6442451456 70000",
        "-c",
        "read -P 0 6442521456 512",
        p,
    ]);
    let out = ok(io, "qemu-io");
    assert!(!out.contains("failed"), "{out}");
}

#[test]
fn an_image_inside_an_image() {
    // The outer image is a fixed-size BlockDevice; the inner one lives on it.
    let outer_opts = options(4 << 20, 12, 4, Version::V3);
    let outer: Tiny<1> = block_on(Qcow2::create(
        RamDevice::new(),
        [const { Slot::<1>::EMPTY }; 3],
        outer_opts,
    ))
    .unwrap();
    let inner_opts = options(2 << 20, 9, 4, Version::V3);
    let mut inner = block_on(Qcow2::create(
        outer,
        [const { Slot::<1>::EMPTY }; 3],
        inner_opts,
    ))
    .unwrap();
    let data: Vec<Sector> = (0..700u32).map(|s| [(s % 199) as u8 + 1; SECTOR]).collect();
    block_on(inner.write(1000, &data)).unwrap();
    let (outer, _) = block_on(inner.close()).unwrap();
    let (ram, _) = block_on(outer.close()).unwrap();
    // Both layers pass qemu-img: the outer directly, the inner via its raw contents.
    let mut model = vec![0u8; 4 << 20];
    let outer_img: Tiny<1> = block_on(Qcow2::open(
        ram.clone(),
        [const { Slot::<1>::EMPTY }; 3],
        OpenOptions::read_only(),
    ))
    .unwrap();
    let mut inner_bytes = vec![[0u8; SECTOR]; (4 << 20) / SECTOR];
    let mut outer_img = outer_img;
    block_on(outer_img.read(0, &mut inner_bytes)).unwrap();
    model.copy_from_slice(inner_bytes.as_flattened());
    qemu_agrees(&ram, &model, "outer");
    let inner_model = {
        let mut m = vec![0u8; 2 << 20];
        m[1000 * SECTOR..1700 * SECTOR].copy_from_slice(data.as_flattened());
        m
    };
    qemu_agrees(&RamDevice::from_bytes(&model), &inner_model, "inner");
}
