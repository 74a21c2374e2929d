//! Hostile images: every file of `tests/hostile/` (made by `cargo xtask
//! corpus`) must give exactly the outcome its MANIFEST line names, never a
//! panic or a hang. Writes to an image that `check` calls clean must never
//! land on anything the original image referenced; an image `check` calls
//! corrupt must be refused by a verified open (`OpenOptions::verified`).
//! Compressed clusters read through the host's decoders, and the core's
//! no-heap decoders must give the same outcome.

use qcow2_core::codec::DecoderWorkspace;
use qcow2_core::{NoBacking, OpenOptions, Qcow2, Sector, Slot, Workspace, SECTOR};
use qcow2_std_shim::codec::{CoreDecoders, HostWorkspace};
use qcow2_std_shim::{block_on, RamDevice};
use std::collections::BTreeSet;
use std::path::Path;

type Image = Qcow2<RamDevice, [Slot<1>; 4], 1>;

fn cache() -> [Slot<1>; 4] {
    [const { Slot::<1>::EMPTY }; 4]
}

/// Guest data written by the test: no metadata sector looks like it.
const PATTERN: Sector = [0xa5; SECTOR];
/// Guest sectors written: 0 is allocated in the base image (an in-place
/// overwrite), the others are not, so writes there allocate.
const WRITTEN_SECTORS: [u64; 4] = [0, 40, 64, 100];

/// Whether our check finds corruption in the image (None: does not open).
fn corrupt(bytes: &[u8]) -> Option<bool> {
    let dev = RamDevice::from_bytes(bytes);
    let mut img = block_on(Image::open(dev, cache(), OpenOptions::read_only())).ok()?;
    let mut scratch = [0u8; 256];
    Some(block_on(img.check(&mut scratch)).map_or(true, |r| r.corruptions > 0))
}

/// Reads the whole guest of `img`.
fn read_guest<W: Workspace>(
    img: &mut Qcow2<RamDevice, [Slot<1>; 4], 1, NoBacking<RamDevice>, W>,
) -> Result<Vec<Sector>, String> {
    let sectors = img.virtual_size() / SECTOR as u64;
    let mut buf = vec![[0u8; SECTOR]; sectors as usize];
    block_on(img.read(0, &mut buf)).map_err(|e| format!("read: {e}"))?;
    Ok(buf)
}

/// An error's kind ("read: corrupt image") and place (" (at host offset
/// ...)", if any), without the detail between them.
fn kind_and_place(e: &str) -> (String, &str) {
    let mut parts = e.splitn(3, ": ");
    let kind = format!(
        "{}: {}",
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("")
    );
    (kind, e.rfind(" (at ").map_or("", |i| &e[i..]))
}

/// Reads the whole guest of `img` through the core's no-heap decoders
/// ([`CoreDecoders`]: inflate with a 4 KiB window, zstd-zero with a cluster
/// of history), a sector of compressed input at a time.
fn read_guest_core(img: Image) -> Result<Vec<Sector>, String> {
    let mut decoders = CoreDecoders::new(img.info().cluster_size as usize);
    let mut input = [[0u8; SECTOR]; 1];
    let workspace = DecoderWorkspace::new(decoders.decoder(), &mut [], &mut input);
    read_guest(&mut img.with_workspace(workspace))
}

/// What happens to an image: the first error of open, read, write, or ok.
/// Reads go through the host's decoders; the core's must agree on the
/// data, or on the error (its message may differ, not its kind and place).
fn outcome(bytes: &[u8]) -> (String, Option<RamDevice>) {
    let dev = RamDevice::from_bytes(bytes);
    let img = match block_on(Image::open(dev, cache(), OpenOptions::read_only())) {
        Ok(img) => img,
        Err(e) => return (format!("open: {e}"), None),
    };
    let cluster = img.info().cluster_size;
    let mut img = img.with_workspace(HostWorkspace::new(cluster));
    let read = read_guest(&mut img);
    let core = block_on(Image::open(
        RamDevice::from_bytes(bytes),
        cache(),
        OpenOptions::read_only(),
    ))
    .map_err(|e| format!("open: {e}"))
    .and_then(read_guest_core);
    match (&read, &core) {
        (Ok(host), Ok(core)) => assert!(host == core, "the decoders read different data"),
        (Err(host), Err(core)) => assert_eq!(
            kind_and_place(host),
            kind_and_place(core),
            "the decoders fail differently"
        ),
        _ => panic!("one decoder reads, the other fails: {read:?} / {core:?}"),
    }
    if let Err(e) = read {
        return (e, None);
    }
    // Check always terminates, whatever it finds.
    let mut scratch = [0u8; 64];
    let _ = block_on(img.check(&mut scratch));
    let (dev, _) = img.abandon();
    let img = match block_on(Image::open(dev, cache(), OpenOptions::read_write())) {
        Ok(img) => img,
        Err(e) => return (format!("write: {e}"), None),
    };
    // Writes go through a workspace too (copy-on-write of compressed
    // clusters decompresses them).
    let cluster = img.info().cluster_size;
    let mut img = img.with_workspace(HostWorkspace::new(cluster));
    for first in WRITTEN_SECTORS {
        if let Err(e) = block_on(img.write(first, &[PATTERN])) {
            return (format!("write: {e}"), Some(img.abandon().0));
        }
    }
    match block_on(img.close()) {
        Ok((dev, _)) => ("ok".into(), Some(dev)),
        Err(e) => (format!("write: {e}"), None),
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap()))
}

/// The host cluster guest `sector` maps to in the original image, if any:
/// writing there is an in-place overwrite, which the image itself asks for.
fn mapped_cluster(b: &[u8], sector: u64) -> Option<u64> {
    let cluster_bits = u32::from_be_bytes(b[20..24].try_into().unwrap()).clamp(9, 21);
    let cs = 1u64 << cluster_bits;
    let guest = sector * SECTOR as u64 / cs;
    let l1 = be64(b, 40);
    let l2 = be64(b, (l1 + guest / (cs / 8) * 8) as usize) & 0x00ff_ffff_ffff_fe00;
    let data = be64(b, (l2 + guest % (cs / 8) * 8) as usize) & 0x00ff_ffff_ffff_fe00;
    (l2 != 0 && data != 0).then_some(data / cs)
}

/// Clusters the original image references as metadata and as data, by a
/// simple independent walk that trusts only what lies inside the file.
fn referenced_clusters(b: &[u8]) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let mut set = BTreeSet::from([0]);
    let mut data = BTreeSet::new();
    let cluster_bits = u32::from_be_bytes(b[20..24].try_into().unwrap());
    if !(9..=21).contains(&cluster_bits) {
        return (set, data);
    }
    let cs = 1u64 << cluster_bits;
    let len = b.len() as u64;
    let mask = 0x00ff_ffff_ffff_fe00;
    let add_range = |set: &mut BTreeSet<u64>, off: u64, bytes: u64| {
        if off < len {
            for c in off / cs..=(off + bytes.max(1) - 1).min(len - 1) / cs {
                set.insert(c);
            }
        }
    };
    let l1 = be64(b, 40);
    let l1_size = u64::from(u32::from_be_bytes(b[36..40].try_into().unwrap())).min(len / 8);
    let reftable = be64(b, 48);
    let rt_clusters = u64::from(u32::from_be_bytes(b[56..60].try_into().unwrap())).min(len / cs);
    add_range(&mut set, l1, l1_size * 8);
    add_range(&mut set, reftable, rt_clusters * cs);
    for i in 0..rt_clusters * cs / 8 {
        let e = be64(b, (reftable + i * 8) as usize) & !0x1ff;
        add_range(&mut set, e, cs);
    }
    for i in 0..l1_size {
        let l2 = be64(b, (l1 + i * 8) as usize) & mask;
        if l2 == 0 || l2 >= len {
            continue;
        }
        add_range(&mut set, l2, cs);
        for j in 0..cs / 8 {
            let d = be64(b, (l2 + j * 8) as usize) & mask;
            if d != 0 {
                add_range(&mut data, d, cs);
            }
        }
    }
    (set, data)
}

#[test]
fn every_hostile_image_gives_its_outcome_and_writes_stay_off_live_clusters() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile");
    let manifest = std::fs::read_to_string(dir.join("MANIFEST")).expect("MANIFEST");
    let (mut tried, mut verified_refusals) = (0, 0);
    let mut failures = Vec::new();
    for line in manifest
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (file, expected) = line.split_once('\t').expect("file<TAB>outcome");
        let bytes = std::fs::read(dir.join(file)).expect("image file");
        let (got, written) = outcome(&bytes);
        if got != expected {
            failures.push(format!("{file}: expected `{expected}`, got `{got}`"));
        }
        if corrupt(&bytes) == Some(true) {
            // Verification refuses what check calls corrupt: nothing is written.
            let dev = RamDevice::from_bytes(&bytes);
            let verified = block_on(Image::open(dev, cache(), OpenOptions::verified()));
            assert!(
                verified.is_err(),
                "{file}: verified open accepted a corrupt image"
            );
            verified_refusals += 1;
        } else if let Some(dev) = written {
            let after = dev.as_bytes();
            let cs = 1usize << u32::from_be_bytes(bytes[20..24].try_into().unwrap()).clamp(9, 21);
            let (metadata, mut data) = referenced_clusters(&bytes);
            // In-place overwrites may land on the cluster the image maps
            // the sector to, unless that cluster is also metadata.
            for sector in WRITTEN_SECTORS {
                if let Some(c) = mapped_cluster(&bytes, sector) {
                    data.remove(&c);
                }
            }
            for &c in metadata.union(&data) {
                let start = c as usize * cs;
                let cluster = after
                    .get(start..(start + cs).min(after.len()))
                    .unwrap_or(&[]);
                assert!(
                    !cluster.chunks(SECTOR).any(|s| s == PATTERN),
                    "{file}: guest data landed on referenced cluster {c}"
                );
            }
        }
        tried += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {tried} hostile images misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(tried >= 40, "only {tried} hostile images");
    eprintln!("{tried} hostile images, {verified_refusals} refused by verified opens");
}
