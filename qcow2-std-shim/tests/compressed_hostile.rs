//! Hostile compressed-cluster descriptors: pointing at the header, past
//! the end of the image, over garbage, with a sector count too small for
//! the stream. Each read gives a precise `Corrupt` error (never a panic,
//! never bytes from outside the extent) through the host's decoder and the
//! core's no-heap decoders alike (inflate for zlib images, zstd-zero for
//! zstd images); the rest of the image still reads.

use qcow2_core::codec::DecoderWorkspace;
use qcow2_core::{Compression, Corruption, Error, OpenOptions, Qcow2, Slot, SECTOR};
use qcow2_std_shim::codec::CoreDecoders;
use qcow2_std_shim::{block_on, FileDevice, Image};
use test_support::qemu;
use test_support::raw::{peek64, poke, poke64};
use test_support::Scratch;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// A compressed image of 4 KiB clusters (`format`) whose first two
/// clusters are compressed; returns its path and the host offset of
/// cluster 0's L2 entry.
fn compressed_image(s: &Scratch, name: &str, format: Compression) -> (String, u64) {
    let plain = s.path("plain.raw");
    std::fs::write(&plain, data(1 << 20)).unwrap();
    let path = s.path(name);
    let options = format!("cluster_size=4096,compression_type={}", format.name());
    let opts = ["-f", "raw", "-O", "qcow2", "-o", &options];
    let mut args = vec!["convert", "-c"];
    args.extend(opts);
    args.extend([plain.as_str(), path.as_str()]);
    qemu::img(&args);
    let l1 = peek64(&path, 40);
    let l2 = peek64(&path, l1) & OFFSET_MASK;
    (path, l2)
}

/// The guest data: low-entropy bytes (streams of several sectors) in the
/// first 8 KiB, zeros after.
fn data(len: usize) -> Vec<u8> {
    let mut d: Vec<u8> = test_support::noise(8192, 5).iter().map(|b| b & 7).collect();
    d.resize(len, 0);
    d
}

/// Reads guest cluster `cluster` through the host workspace and through
/// the core's decoders ([`CoreDecoders`]); returns both results.
fn read_both(path: &str, cluster: u64) -> [Result<Vec<u8>, Error<std::io::Error>>; 2] {
    let mut host = Image::open(
        FileDevice::open(path, false).unwrap(),
        &OpenOptions::read_only(),
    )
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let a = host.read_at(cluster * 4096, &mut buf).map(|()| buf.clone());
    let dev = FileDevice::open(path, false).unwrap();
    let cache = vec![Slot::<1>::EMPTY; 8];
    let img = block_on(Qcow2::open(dev, cache, OpenOptions::read_only())).unwrap();
    let mut decoders = CoreDecoders::new(4096);
    let mut input = [[0u8; SECTOR]; 2];
    let mut img = img.with_workspace(DecoderWorkspace::new(
        decoders.decoder(),
        &mut [],
        &mut input,
    ));
    let mut sectors = vec![[0u8; SECTOR]; 8];
    let b = block_on(img.read(cluster * 8, &mut sectors)).map(|()| sectors.as_flattened().to_vec());
    [a, b]
}

fn corrupt_what<T>(r: &Result<T, Error<std::io::Error>>) -> Corruption {
    match r {
        Err(Error::Corrupt { what, .. }) => *what,
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("expected Corrupt, read fine"),
    }
}

#[test]
fn hostile_zlib_descriptors_are_corrupt_for_both_decoders() {
    hostile_descriptors(Compression::Zlib);
}

#[test]
fn hostile_zstd_descriptors_are_corrupt_for_both_decoders() {
    hostile_descriptors(Compression::Zstd);
}

fn hostile_descriptors(format: Compression) {
    let s = Scratch::new(&format!("compressed-hostile-{}", format.name()));
    let (good, entry) = compressed_image(&s, "good.qcow2", format);
    let guest = data(8192);
    for (i, r) in read_both(&good, 0).into_iter().enumerate() {
        let r = r.unwrap();
        let first = r.iter().zip(&guest).position(|(a, b)| a != b);
        assert!(
            first.is_none(),
            "decoder {i}: differs at {first:?}: {:?}",
            &r[..16]
        );
    }
    let raw = peek64(&good, entry);
    assert!(raw & (1 << 62) != 0, "cluster 0 is compressed");
    let offset_bits = 62 - (12 - 8);
    let count_shift = offset_bits;
    let cases: [(&str, u64, Option<Corruption>); 3] = [
        // The stream "starts" in the header.
        (
            "on-header",
            (raw & !((1u64 << offset_bits) - 1)) | 16,
            Some(Corruption::CompressedOverlapsMetadata),
        ),
        // Far past the end of the file.
        (
            "past-end",
            (raw & !((1u64 << offset_bits) - 1)) | (1 << 40),
            Some(Corruption::CompressedBeyondImage),
        ),
        // One sector where the stream needs more.
        ("too-short", raw & !(0xf << count_shift), None),
    ];
    for (name, entry_value, wanted) in cases {
        let path = s.path(&format!("{name}.qcow2"));
        std::fs::copy(&good, &path).unwrap();
        poke64(&path, entry, entry_value);
        for r in read_both(&path, 0) {
            let what = corrupt_what(&r);
            if let Some(wanted) = wanted {
                assert_eq!(what, wanted, "{name}");
            }
        }
        // The other compressed cluster still reads.
        for r in read_both(&path, 1) {
            assert!(r.unwrap() == guest[4096..], "{name}");
        }
    }
    // Garbage where the stream is.
    let path = s.path("garbage.qcow2");
    std::fs::copy(&good, &path).unwrap();
    let host = raw & ((1u64 << offset_bits) - 1);
    poke(&path, host, &[0xff; 64]);
    for r in read_both(&path, 0) {
        corrupt_what(&r);
    }
}
