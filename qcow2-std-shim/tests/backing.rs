//! Overlays on a backing device, against a byte model: random writes
//! (unaligned, partial clusters, across the backing's end), write-zeroes
//! and discards, with and without a bounce buffer, every cluster size
//! class, v2 and v3. The image must read as the model after every step and
//! check clean at the end.

use qcow2_core::codec::{Buffers, Workspace};
use qcow2_core::{bytes, CreateOptions, Qcow2, Sector, Slot, Version, SECTOR};
use qcow2_std_shim::{block_on, RamDevice};
use test_support::{noise, Rng};

type Image<W> = Qcow2<RamDevice, Vec<Slot<1>>, 1, RamDevice, W>;

struct Case {
    cluster_bits: u32,
    version: Version,
    size: u64,
    backing_len: u64,
    bounce: bool,
    seed: u64,
}

/// The guest after a discard of `[first, end)` sectors: whole clusters
/// read as zeros (v3 zero flag; v2 keeps them), QEMU's rule for the last
/// partial cluster included.
fn discard_model(model: &mut [u8], case: &Case, first: u64, end: u64) {
    let cs = 1u64 << (case.cluster_bits - 9);
    let sectors = case.size / SECTOR as u64;
    let start = first.div_ceil(cs);
    let stop = if end == sectors {
        end.div_ceil(cs)
    } else {
        end / cs
    };
    for c in start..stop {
        let from = (c * cs * SECTOR as u64) as usize;
        let to = (((c + 1) * cs).min(sectors) * SECTOR as u64) as usize;
        // v2 over a backing discards nothing (no zero flag).
        if case.version == Version::V3 {
            model[from..to].fill(0);
        }
    }
}

fn check_reads<W: Workspace>(image: &mut Image<W>, model: &[u8], what: &str) {
    let mut back = vec![[0u8; SECTOR]; model.len() / SECTOR];
    // Poison: a read must overwrite every byte (zeros past the backing).
    for s in back.iter_mut() {
        s.fill(0xee);
    }
    block_on(image.read(0, &mut back)).unwrap_or_else(|e| panic!("{what}: read: {e}"));
    test_support::model::assert_same_bytes(what, 0, back.as_flattened(), model);
}

fn run<W: Workspace>(case: &Case, workspace: W) {
    let base = noise(case.backing_len as usize, case.seed);
    let options = CreateOptions {
        cluster_bits: case.cluster_bits,
        version: case.version,
        ..CreateOptions::new(case.size)
    };
    let cache = vec![Slot::<1>::EMPTY; 16];
    let image = block_on(Qcow2::create(RamDevice::new(), cache, options)).unwrap();
    let mut image: Image<W> = image
        .with_backing(RamDevice::from_bytes(&base))
        .with_workspace(workspace);
    let mut model = vec![0u8; case.size as usize];
    let n = base.len().min(model.len());
    model[..n].copy_from_slice(&base[..n]);
    let what = format!(
        "cluster_bits {} {:?} backing {} bounce {} seed {}",
        case.cluster_bits, case.version, case.backing_len, case.bounce, case.seed
    );
    check_reads(&mut image, &model, &what);
    let mut rng = Rng::new(case.seed);
    let sectors = case.size / SECTOR as u64;
    let mut scratch = [0u8; SECTOR];
    for step in 0..60 {
        let op = rng.below(10);
        if op < 6 {
            let offset = rng.below(case.size);
            let len = 1 + rng.below((case.size - offset).min(3 << case.cluster_bits));
            let data = noise(len as usize, case.seed * 1000 + step);
            block_on(bytes::write_at(&mut image, offset, &data, &mut scratch))
                .unwrap_or_else(|e| panic!("{what}: write {offset}+{len}: {e:?}"));
            model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        } else {
            let first = rng.below(sectors);
            let count = 1 + rng.below((sectors - first).min(4 << (case.cluster_bits - 9)));
            let (from, to) = (
                (first * SECTOR as u64) as usize,
                ((first + count) * SECTOR as u64) as usize,
            );
            if op < 8 {
                let unmap = rng.below(2) == 0;
                block_on(image.write_zeroes(first, count, unmap))
                    .unwrap_or_else(|e| panic!("{what}: zeroes {first}+{count}: {e}"));
                model[from..to].fill(0);
            } else {
                block_on(image.discard(first, count))
                    .unwrap_or_else(|e| panic!("{what}: discard {first}+{count}: {e}"));
                discard_model(&mut model, case, first, first + count);
            }
        }
        check_reads(&mut image, &model, &format!("{what} step {step}"));
    }
    block_on(image.flush()).unwrap();
    let mut check_scratch = vec![0u8; 1 << 16];
    let report = block_on(image.check(&mut check_scratch)).unwrap();
    assert!(report.is_clean(), "{what}: {report:?}");
    // The backing is never written.
    assert_eq!(
        &image.backing().as_bytes()[..base.len()],
        &base[..],
        "{what}"
    );
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut seed = 1;
    for cluster_bits in [9, 12, 16] {
        for version in [Version::V3, Version::V2] {
            let cluster = 1u64 << cluster_bits;
            let size = 8 * cluster + 7 * SECTOR as u64;
            // Shorter than the overlay and not a multiple of the cluster
            // size; as long; longer.
            for backing_len in [3 * cluster + 5 * SECTOR as u64, size, size + cluster] {
                for bounce in [false, true] {
                    cases.push(Case {
                        cluster_bits,
                        version,
                        size,
                        backing_len,
                        bounce,
                        seed,
                    });
                    seed += 1;
                }
            }
        }
    }
    cases
}

#[test]
fn overlay_reads_and_writes_match_the_model() {
    for case in cases() {
        if case.bounce {
            let sectors = 1usize << (case.cluster_bits - 9);
            let buffer: Vec<Sector> = vec![[0; SECTOR]; sectors];
            run(&case, Buffers::new(buffer));
        } else {
            run(&case, qcow2_core::NoWorkspace::default());
        }
    }
}

/// A qcow2 image backs another: chains compose, and reads past the
/// middle layer's end are zeros even where the raw base has data.
#[test]
fn chains_compose_and_stop_at_each_layers_end() {
    let cluster = 4096u64;
    let base = noise(6 * cluster as usize, 7);
    let cache = || vec![Slot::<1>::EMPTY; 16];
    let options = |size| CreateOptions {
        cluster_bits: 12,
        ..CreateOptions::new(size)
    };
    // The middle layer: 4 clusters over a 6-cluster base, one written.
    let middle = block_on(Qcow2::create(
        RamDevice::new(),
        cache(),
        options(4 * cluster),
    ))
    .unwrap();
    let mut middle = middle.with_backing(RamDevice::from_bytes(&base));
    let data = [[0x5au8; SECTOR]; 2];
    block_on(middle.write(9, &data)).unwrap();
    // The top: 8 clusters.
    let top = block_on(Qcow2::create(
        RamDevice::new(),
        cache(),
        options(8 * cluster),
    ))
    .unwrap();
    let mut top = top.with_backing(middle);
    let mut back = vec![[0xeeu8; SECTOR]; (8 * cluster) as usize / SECTOR];
    block_on(top.read(0, &mut back)).unwrap();
    let flat = back.as_flattened();
    let mut expected = vec![0u8; 8 * cluster as usize];
    expected[..4 * cluster as usize].copy_from_slice(&base[..4 * cluster as usize]);
    expected[9 * SECTOR..11 * SECTOR].fill(0x5a);
    test_support::model::assert_same_bytes("chain", 0, flat, &expected);
}
