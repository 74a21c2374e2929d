//! Releasing compressed clusters (rule 9 of `ORDERING.md`): a descriptor
//! whose release would free a cluster must own it. A hostile descriptor
//! pointing into the unused tail of an (uncached) L2 table, where a valid
//! stream was planted, must not free the table; without a decoder,
//! genuine compressed clusters are still released (no leaks).

use qcow2_core::{Compression, CreateOptions, OpenOptions, Qcow2, Sector, Slot, SECTOR};
use qcow2_std_shim::codec::{compress_cluster, HostWorkspace};
use qcow2_std_shim::{block_on, RamDevice};

type Cache = [Slot<1>; 4];

fn cache() -> Cache {
    [const { Slot::<1>::EMPTY }; 4]
}

fn be64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

const MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// 512-byte clusters (64 entries an L2 table): guest clusters 0..16 hold
/// data in the first L2 table, T0; guest cluster 65 makes a second, T1.
fn image() -> (Vec<u8>, Vec<Sector>) {
    let mut options = CreateOptions::new(1 << 20);
    options.cluster_bits = 9;
    let mut img = block_on(Qcow2::create(RamDevice::new(), cache(), options)).unwrap();
    let data: Vec<Sector> = (0..16u8).map(|i| [i + 1; SECTOR]).collect();
    block_on(img.write(0, &data)).unwrap();
    block_on(img.write(65, &[[0x65; SECTOR]])).unwrap();
    let (dev, _) = block_on(img.close()).unwrap();
    (dev.as_bytes().to_vec(), data)
}

#[test]
fn a_planted_stream_in_an_l2_table_does_not_free_the_table() {
    let (mut bytes, data) = image();
    let l1 = be64(&bytes, 40) as usize;
    let t0 = (be64(&bytes, l1) & MASK) as usize;
    let t1 = (be64(&bytes, l1 + 8) & MASK) as usize;
    // A valid stream of a zero cluster in T0's unused entries (16..).
    let mut stream = Vec::new();
    assert!(compress_cluster(
        Compression::Zlib,
        &[0; SECTOR],
        &mut stream
    ));
    bytes[t0 + 128..t0 + 128 + stream.len()].copy_from_slice(&stream);
    // Guest cluster 64 (T1's first entry): that stream, one sector.
    let descriptor = (1u64 << 62) | (t0 as u64 + 128);
    bytes[t1..t1 + 8].copy_from_slice(&descriptor.to_be_bytes());

    let mut scratch = vec![0u8; 1 << 14];
    let dev = RamDevice::from_bytes(&bytes);
    let mut img = block_on(Qcow2::open(dev, cache(), OpenOptions::read_only())).unwrap();
    // The planted bytes read as entries of T0 too: the hostile image's own
    // corruption, which the discard must not make worse.
    let found = block_on(img.check(&mut scratch)).unwrap().corruptions;

    let dev = RamDevice::from_bytes(&bytes);
    let img = block_on(Qcow2::open(dev, cache(), OpenOptions::read_write())).unwrap();
    let mut img = img.with_workspace(HostWorkspace::new(512));
    block_on(img.discard(64, 1)).unwrap();
    block_on(img.flush()).unwrap();
    // Allocations after the discard must not land on T0.
    for guest in 70..80 {
        block_on(img.write(guest, &[[0xee; SECTOR]])).unwrap();
    }
    block_on(img.flush()).unwrap();
    let mut back = vec![[0u8; SECTOR]; 16];
    block_on(img.read(0, &mut back)).expect("T0's clusters read");
    assert!(back == data, "T0's clusters changed");
    let (dev, _) = block_on(img.close()).unwrap();
    let mut img = block_on(Qcow2::open(dev, cache(), OpenOptions::read_only())).unwrap();
    let report = block_on(img.check(&mut scratch)).unwrap();
    assert!(report.corruptions <= found, "{found} before: {report:?}");
}

#[test]
fn without_a_decoder_genuine_compressed_clusters_are_released() {
    let mut options = CreateOptions::new(1 << 20);
    options.cluster_bits = 12;
    let img = block_on(Qcow2::create(RamDevice::new(), cache(), options)).unwrap();
    let mut img = img.with_workspace(HostWorkspace::new(4096));
    for guest in 0..8u8 {
        let mut stream = Vec::new();
        assert!(compress_cluster(
            Compression::Zlib,
            &[guest; 4096],
            &mut stream
        ));
        block_on(img.write_compressed(u64::from(guest), &stream)).unwrap();
    }
    let (dev, _) = block_on(img.close()).unwrap();

    // No workspace: nothing can decode, and the structural checks decide.
    let mut img = block_on(Qcow2::open(dev, cache(), OpenOptions::read_write())).unwrap();
    block_on(img.discard(0, 4 * 8)).unwrap();
    block_on(img.write(32, &[[7; SECTOR]; 8])).unwrap();
    block_on(img.write_zeroes(40, 8, true)).unwrap();
    let mut scratch = vec![0u8; 1 << 14];
    let report = block_on(img.check(&mut scratch)).unwrap();
    assert!(report.is_clean(), "{report:?}");
}
