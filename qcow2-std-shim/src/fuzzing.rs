//! Fuzz harnesses, shared by the cargo-fuzz targets in `fuzz/` and by the
//! tests that replay their saved corpora on stable Rust.
//!
//! Each harness takes arbitrary bytes and panics only when the library
//! breaks a promise (a wrong read, an unclean image after repair); errors
//! the library reports for bad input are expected and ignored.

use crate::codec::{compress_cluster, CoreDecoders, HostWorkspace};
use crate::{block_on, FaultDevice, RamDevice, Survival};
use qcow2_core::codec::DecoderWorkspace;
use qcow2_core::format::{incompatible, Header};
use qcow2_core::{
    Compression, CreateOptions, OpenOptions, Qcow2, Repair, Sector, Slot, Version, SECTOR,
};

type Small<D> = Qcow2<D, [Slot<1>; 4], 1>;

fn cache() -> [Slot<1>; 4] {
    [const { Slot::<1>::EMPTY }; 4]
}

/// Header decoding, validation and re-encoding.
pub fn header(data: &[u8]) {
    if let Ok(h) = Header::decode::<()>(data) {
        let _ = h.validate::<()>();
        let mut out = [0u8; SECTOR];
        if h.encode(&mut out).is_some() {
            // What was decoded encodes to bytes that decode the same.
            assert_eq!(Header::decode::<()>(&out), Ok(h));
        }
    }
}

/// Opening arbitrary bytes read-only, mapping and reading the whole disk
/// (bounded), and checking: no panic, no hang. Compressed clusters are
/// read through both decoders, the host's and the core's no-heap one
/// ([`crate::codec::CoreDecoders`]: inflate with a 4 KiB ring for zlib
/// images, zstd-zero with a cluster of history for zstd images), which must
/// agree whenever both succeed.
pub fn open_read(data: &[u8]) {
    let dev = RamDevice::from_bytes(data);
    let Ok(img) = block_on(Small::open(dev, cache(), OpenOptions::read_only())) else {
        return;
    };
    let cluster = img.info().cluster_size;
    let host = read_all(img.with_workspace(crate::codec::HostWorkspace::new(cluster)));
    let dev = RamDevice::from_bytes(data);
    let Ok(img) = block_on(Small::open(dev, cache(), OpenOptions::read_only())) else {
        return;
    };
    let mut decoders = CoreDecoders::new(cluster as usize);
    let mut input = [[0u8; SECTOR]; 1];
    let workspace = DecoderWorkspace::new(decoders.decoder(), &mut [], &mut input);
    let core = read_all(img.with_workspace(workspace));
    for (h, c) in host.iter().zip(&core) {
        if let (Some(h), Some(c)) = (h, c) {
            assert_eq!(h, c, "the two decoders read different data");
        }
    }
}

/// Maps and reads the first 512 extents of `img` a sector each, then
/// checks it; returns what each read returned (`None`: an error).
fn read_all<W: qcow2_core::Workspace>(
    mut img: Qcow2<RamDevice, [Slot<1>; 4], 1, qcow2_core::NoBacking<RamDevice>, W>,
) -> Vec<Option<Sector>> {
    let mut reads = Vec::new();
    let size = img.virtual_size();
    let mut offset = 0;
    let mut sector = [[0u8; SECTOR]; 1];
    for _ in 0..512 {
        if offset >= size {
            break;
        }
        match block_on(img.map(offset)) {
            Ok((_, len)) => {
                let read = block_on(img.read(offset / SECTOR as u64, &mut sector));
                reads.push(read.ok().map(|()| sector[0]));
                offset += len.max(1);
            }
            Err(_) => break,
        }
    }
    let mut scratch = [0u8; 256];
    let _ = block_on(img.check(&mut scratch));
    reads
}

/// Guest sectors compared before and after a repair (the first ones).
const REPAIR_SECTORS: u64 = 1024;

/// What reading each of the first guest sectors returns (`None`: an error).
fn readable<D: qcow2_core::BlockDevice>(img: &mut Small<D>) -> Vec<Option<Sector>> {
    let sectors = (img.virtual_size() / SECTOR as u64).min(REPAIR_SECTORS);
    (0..sectors)
        .map(|s| {
            let mut buf = [[0u8; SECTOR]; 1];
            block_on(img.read(s, &mut buf)).ok().map(|()| buf[0])
        })
        .collect()
}

/// Check and repair: a repair never changes guest data that a read
/// returned before it (whether it succeeds or fails); one that succeeds
/// leaves no leaks, and a second repair finds nothing more to fix.
///
/// Input that starts with the qcow2 magic is the image itself. Any other
/// input builds an image (geometry and written sectors from the input),
/// then mutates the header fields that size or place metadata (refcount
/// table size and offset, L1 size and offset, incompatible bits): see
/// `check_repair_mutated` below.
pub fn check_repair(data: &[u8]) {
    if !data.starts_with(b"QFI\xfb") {
        return check_repair_mutated(data);
    }
    let dev = RamDevice::from_bytes(data);
    let Ok(img) = block_on(Small::open(dev, cache(), OpenOptions::repair())) else {
        return;
    };
    repair_keeps_reads(img, None);
}

/// Header fields `check_repair_mutated` may change, one bit each in its
/// second input byte.
const MUTATE_REFTABLE_CLUSTERS: u8 = 1;
const MUTATE_REFTABLE_OFFSET: u8 = 2;
const MUTATE_L1_SIZE: u8 = 4;
const MUTATE_L1_OFFSET: u8 = 8;
const MUTATE_INCOMPATIBLE: u8 = 16;

/// An image made here (cluster size, refcount width, version, lazy
/// refcounts and up to 48 written sectors from the input), whose header
/// then gets new values for the fields the second byte selects. The
/// refcount table and the dirty and corrupt bits change nothing a read
/// returns, so when only they changed, every sector must read after the
/// repair as it did before the mutation; otherwise what our reads of the
/// mutated image returned before the repair must hold.
fn check_repair_mutated(data: &[u8]) {
    let mut input = Input(data);
    let (Some(a), Some(mutate)) = (input.byte(), input.byte()) else {
        return;
    };
    let v2 = a & 0x80 != 0;
    let options = CreateOptions {
        size: 512 << 10,
        cluster_bits: 9 + u32::from(a % 4),
        refcount_order: if v2 { 4 } else { u32::from((a >> 2) % 7) },
        version: if v2 { Version::V2 } else { Version::V3 },
        lazy_refcounts: a & 0x40 != 0 && !v2,
        ..CreateOptions::new(512 << 10)
    };
    let sectors = options.size / SECTOR as u64;
    let Ok(mut img) = block_on(Small::create(RamDevice::new(), cache(), options)) else {
        return;
    };
    let count = input.byte().map_or(0, |n| n % 48);
    for id in 1..=u64::from(count) {
        let Some(at) = input.u16() else { break };
        let run = 1 + u64::from(at >> 13);
        let first = u64::from(at) % sectors;
        let buf: Vec<Sector> = (0..run.min(sectors - first))
            .map(|k| sector_of(id << 8 | k))
            .collect();
        block_on(img.write(first, &buf)).expect("write");
    }
    let (dev, _) = block_on(img.close()).expect("close");
    let mut bytes = dev.as_bytes().to_vec();
    let original = {
        let dev = RamDevice::from_bytes(&bytes);
        let mut img = block_on(Small::open(dev, cache(), OpenOptions::read_only())).expect("open");
        readable(&mut img)
    };
    let cs = 1u64 << options.cluster_bits;
    let clusters = (bytes.len() as u64).div_ceil(cs) + 2;
    let mut field = |at: usize, value: &[u8]| bytes[at..at + value.len()].copy_from_slice(value);
    let mut value = || input.u16().map_or(0, u64::from);
    if mutate & MUTATE_REFTABLE_CLUSTERS != 0 {
        field(56, &((value() % 70) as u32).to_be_bytes());
    }
    if mutate & MUTATE_REFTABLE_OFFSET != 0 {
        field(48, &((value() % clusters) * cs).to_be_bytes());
    }
    if mutate & MUTATE_L1_SIZE != 0 {
        field(36, &((value() % 300) as u32).to_be_bytes());
    }
    if mutate & MUTATE_L1_OFFSET != 0 {
        field(40, &((value() % clusters) * cs).to_be_bytes());
    }
    let mut incompatible = 0;
    if mutate & MUTATE_INCOMPATIBLE != 0 && !v2 {
        incompatible = value() & 0x1f;
        let at = 72 + 7;
        bytes[at] ^= incompatible as u8;
    }
    let dev = RamDevice::from_bytes(&bytes);
    let Ok(img) = block_on(Small::open(dev, cache(), OpenOptions::repair())) else {
        return;
    };
    // Dirty and corrupt change no read; the other bits refuse every read.
    let reads_unchanged = mutate & (MUTATE_L1_SIZE | MUTATE_L1_OFFSET) == 0
        && incompatible & !(incompatible::DIRTY | incompatible::CORRUPT) == 0;
    repair_keeps_reads(img, reads_unchanged.then_some(original));
}

/// Repairs `img` and checks that it kept what reads returned: `expected`
/// when given (every sector then must read so after a successful repair),
/// else what reads of `img` return before the repair.
fn repair_keeps_reads(mut img: Small<RamDevice>, expected: Option<Vec<Option<Sector>>>) {
    let read_before = readable(&mut img);
    let must_read = expected.is_some();
    let before = expected.unwrap_or(read_before);
    let mut scratch = [0u8; 512];
    if block_on(img.check(&mut scratch)).is_err() {
        return;
    }
    let repaired = block_on(img.repair(&mut scratch, Repair::All)).is_ok();
    let read_after = readable(&mut img);
    for (sector, (was, is)) in before.iter().zip(&read_after).enumerate() {
        match (was, is) {
            (Some(was), Some(is)) => assert_eq!(was, is, "repair changed guest sector {sector}"),
            (Some(_), None) if repaired || !must_read => {
                panic!("guest sector {sector} unreadable after the repair")
            }
            _ => {}
        }
    }
    if !repaired {
        return;
    }
    let after = block_on(img.check(&mut scratch)).expect("check after a successful repair");
    assert_eq!(after.leaks, 0, "repair left {after:?}");
    let again = block_on(img.repair(&mut scratch, Repair::All)).expect("a second repair");
    assert_eq!(
        (
            again.corruptions,
            again.corruptions_fixed,
            again.leaks_fixed
        ),
        (after.corruptions, 0, 0),
        "a second repair found more to do: {again:?} after {after:?}"
    );
    // What the repair left on the device reads the same once reopened.
    let (dev, slots) = block_on(img.close()).expect("close after a repair");
    let mut img = block_on(Small::open(dev, slots, OpenOptions::read_only())).expect("reopen");
    assert!(
        readable(&mut img) == read_after,
        "reopened image reads differently"
    );
}

/// A little reader over the fuzz input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.byte()?) << 8 | u16::from(self.byte()?))
    }
}

/// The sector contents identified by `id` (0 = zeros).
fn sector_of(id: u64) -> Sector {
    let mut s = [(id % 251) as u8; SECTOR];
    if id != 0 {
        s[..8].copy_from_slice(&id.to_le_bytes());
    }
    s
}

fn id_of(s: &Sector) -> u64 {
    if *s == [0; SECTOR] {
        0
    } else {
        u64::from_le_bytes(s[..8].try_into().unwrap_or_default())
    }
}

/// The image `ops` drives: compressed clusters read through the host's
/// decoders; unallocated ones read a raw backing (one of no sectors, which
/// is no backing at all, unless the input asks for one).
type OpsImage = Qcow2<FaultDevice, [Slot<1>; 4], 1, FaultDevice, HostWorkspace>;

/// Opens `dev` read-write (or read-only) for `ops`, with a workspace and
/// `backing` (raw bytes, possibly none) attached.
fn ops_open(dev: FaultDevice, slots: [Slot<1>; 4], read_only: bool, backing: &[u8]) -> OpsImage {
    let options = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let img = block_on(Small::open(dev, slots, options)).expect("open");
    let cluster = img.info().cluster_size;
    img.with_backing(FaultDevice::from_bytes(backing))
        .with_workspace(HostWorkspace::new(cluster))
}

/// What backing sector `s` holds in `ops`: an id no write uses.
fn backing_id(s: usize) -> u64 {
    (1 << 40) | s as u64
}

/// Checks that `img`'s backing was only read, before `img` goes away.
fn assert_backing_unwritten(img: &OpsImage) {
    assert_eq!(img.backing().writes(), 0, "the backing was written");
}

/// Operation sequences (write, read, discard, write-zeroes, flush, reopen,
/// crash) on a fresh image, checked against a model of what each sector
/// may hold. When the second byte's top bit is set, half of the writes
/// store whole clusters compressed (zlib, or zstd when the first byte's
/// bit 5 is set on a v3 image), so that partial writes, discards and
/// write-zeroes land on compressed clusters and shared host clusters.
/// When the first byte's bit 4 is set, the image has a raw backing
/// (ending mid-cluster or past the disk, by bits 2 and 3) whose sectors
/// hold ids of their own: unallocated sectors read the backing's, past
/// its end zeros; writes copy the rest of the cluster from it, v3
/// discards and write-zeroes hide it, v2 discards keep everything.
pub fn ops(data: &[u8]) {
    let mut input = Input(data);
    let (Some(a), Some(b)) = (input.byte(), input.byte()) else {
        return;
    };
    let compressed_writes = b & 0x80 != 0;
    let options = CreateOptions {
        size: 256 << 10,
        cluster_bits: 9 + u32::from(a % 4),
        refcount_order: u32::from(b % 7),
        version: if a & 0x80 != 0 {
            Version::V2
        } else {
            Version::V3
        },
        lazy_refcounts: a & 0x40 != 0 && a & 0x80 == 0,
        ..CreateOptions::new(256 << 10)
    };
    let options = CreateOptions {
        refcount_order: if options.version == Version::V2 {
            4
        } else {
            options.refcount_order
        },
        compression: if a & 0x20 != 0 && options.version == Version::V3 {
            Compression::Zstd
        } else {
            Compression::Zlib
        },
        ..options
    };
    let sectors = (options.size / SECTOR as u64) as usize;
    let cluster_sectors = 1usize << (options.cluster_bits - 9);
    // Backings ending mid-cluster (whatever the cluster size) or past the
    // disk's end.
    let lengths = [
        sectors / 2 + 3,
        sectors - 1,
        sectors * 3 / 4 + 5,
        sectors + 8,
    ];
    let backing_sectors = if a & 0x10 != 0 {
        lengths[usize::from((a >> 2) & 3)]
    } else {
        0
    };
    let backing: Vec<u8> = (0..backing_sectors)
        .flat_map(|s| sector_of(backing_id(s)))
        .collect();
    let img = block_on(Small::create(FaultDevice::new(), cache(), options)).expect("create");
    let mut img = img
        .with_backing(FaultDevice::from_bytes(&backing))
        .with_workspace(HostWorkspace::new(1 << options.cluster_bits));
    let mut compressed = Vec::new();
    // Per sector: the flushed id and the ids written since the last flush
    // (the backing's where nothing is written yet).
    let mut current = vec![0u64; sectors];
    for (s, id) in current.iter_mut().enumerate().take(backing_sectors) {
        *id = backing_id(s);
    }
    let mut durable = current.clone();
    let mut recent: Vec<Vec<u64>> = vec![Vec::new(); sectors];
    let mut serial = 0u64;
    for _ in 0..64 {
        let Some(op) = input.byte() else { break };
        match op % 10 {
            2 | 3 if compressed_writes => {
                // A whole cluster, compressed (stored plainly when it
                // does not shrink, as QEMU does).
                let Some(at) = input.u16() else { break };
                let guest = usize::from(at) % (sectors / cluster_sectors);
                let first = guest * cluster_sectors;
                let mut plain = Vec::with_capacity(cluster_sectors * SECTOR);
                for s in first..first + cluster_sectors {
                    serial += 1;
                    recent[s].push(serial);
                    current[s] = serial;
                    plain.extend_from_slice(&sector_of(serial));
                }
                if compress_cluster(options.compression, &plain, &mut compressed) {
                    block_on(img.write_compressed(guest as u64, &compressed))
                        .expect("write_compressed");
                } else {
                    let buf: Vec<Sector> = plain
                        .chunks_exact(SECTOR)
                        .map(|c| c.try_into().unwrap_or([0; SECTOR]))
                        .collect();
                    block_on(img.write(first as u64, &buf)).expect("write");
                }
            }
            0..=3 => {
                let Some(first) = input.u16() else { break };
                let first = usize::from(first) % sectors;
                let len = (1 + usize::from(input.byte().unwrap_or(0)) % 24).min(sectors - first);
                let mut buf = Vec::with_capacity(len);
                for s in first..first + len {
                    serial += 1;
                    recent[s].push(serial);
                    current[s] = serial;
                    buf.push(sector_of(serial));
                }
                block_on(img.write(first as u64, &buf)).expect("write");
            }
            8 | 9 => {
                // Discard (whole clusters) or write-zeroes (every sector).
                let Some(first) = input.u16() else { break };
                let first = usize::from(first) % sectors;
                let flags = input.byte().unwrap_or(0);
                let len = (1 + usize::from(flags) % 40).min(sectors - first);
                let (from, to) = if op % 10 == 8 {
                    block_on(img.discard(first as u64, len as u64)).expect("discard");
                    if options.version == Version::V2 && backing_sectors > 0 {
                        // No zero flag to hide the backing: nothing changes.
                        continue;
                    }
                    let cluster = 1usize << (options.cluster_bits - 9);
                    let end = first + len;
                    let stop = if end == sectors {
                        end
                    } else {
                        end / cluster * cluster
                    };
                    (first.next_multiple_of(cluster), stop)
                } else {
                    let unmap = flags & 0x80 != 0;
                    block_on(img.write_zeroes(first as u64, len as u64, unmap))
                        .expect("write_zeroes");
                    (first, first + len)
                };
                for s in from..to {
                    recent[s].push(0);
                    current[s] = 0;
                }
            }
            4 => {
                let Some(first) = input.u16() else { break };
                let first = usize::from(first) % sectors;
                let len = (1 + usize::from(input.byte().unwrap_or(0)) % 24).min(sectors - first);
                let mut buf = vec![[0u8; SECTOR]; len];
                block_on(img.read(first as u64, &mut buf)).expect("read");
                for (i, s) in buf.iter().enumerate() {
                    assert_eq!(*s, sector_of(current[first + i]), "sector {}", first + i);
                }
            }
            5 => {
                block_on(img.flush()).expect("flush");
                durable.clone_from(&current);
                recent.iter_mut().for_each(Vec::clear);
            }
            6 => {
                assert_backing_unwritten(&img);
                let (dev, slots) = block_on(img.close()).expect("close");
                durable.clone_from(&current);
                recent.iter_mut().for_each(Vec::clear);
                img = ops_open(dev, slots, false, &backing);
            }
            _ => {
                // Crash: keep some of the unflushed writes, reopen, and
                // every sector must hold its flushed or a later value.
                let mode = match input.byte().unwrap_or(0) % 3 {
                    0 => Survival::FlushedOnly,
                    1 => Survival::AllWrites,
                    n => Survival::RandomSubset(u64::from(n) * 7919 + serial),
                };
                assert_backing_unwritten(&img);
                let (dev, _) = img.abandon();
                let survivor = dev.survivor(mode);
                let bytes = survivor.as_bytes().to_vec();
                let fresh = FaultDevice::from_bytes(&bytes);
                img = ops_open(fresh, cache(), false, &backing);
                let mut buf = vec![[0u8; SECTOR]; sectors];
                block_on(img.read(0, &mut buf)).expect("read after crash");
                for (s, got) in buf.iter().enumerate() {
                    let id = id_of(got);
                    assert!(
                        (id == durable[s] || recent[s].contains(&id)) && *got == sector_of(id),
                        "sector {s} after crash: {id} not in {} / {:?}",
                        durable[s],
                        recent[s]
                    );
                    current[s] = id;
                }
                durable.clone_from(&current);
                recent.iter_mut().for_each(Vec::clear);
                // Leaks are allowed after a crash; corruption never.
                let mut scratch = [0u8; 1024];
                let report = block_on(img.check(&mut scratch)).expect("check after crash");
                assert_eq!(report.corruptions, 0, "{report:?}");
                block_on(img.repair(&mut scratch, Repair::Leaks)).expect("repair leaks");
            }
        }
    }
    assert_backing_unwritten(&img);
    let (dev, slots) = block_on(img.close()).expect("close");
    let mut img = ops_open(dev, slots, true, &backing);
    let mut buf = vec![[0u8; SECTOR]; sectors];
    block_on(img.read(0, &mut buf)).expect("final read");
    for (s, got) in buf.iter().enumerate() {
        assert_eq!(*got, sector_of(current[s]), "sector {s} at the end");
    }
    let mut scratch = [0u8; 1024];
    let report = block_on(img.check(&mut scratch)).expect("final check");
    assert!(report.is_clean(), "{report:?}");
}
