//! Feature handling at open: what is refused with a precise error, what is
//! kept, and what is cleared, on images made by qemu-img or patched by hand.

use qcow2_core::{Corruption, CreateOptions, Error, Feature, OpenOptions};
use qcow2_std_shim::{FileDevice, Image};
use std::path::Path;
use test_support::qemu;
use test_support::raw::header::{
    AUTOCLEAR_FEATURES, CRYPT_METHOD, EXTENSIONS, INCOMPATIBLE_FEATURES,
};
use test_support::raw::{peek, poke};
use test_support::{path_str, Scratch};

fn open(path: &Path, read_only: bool) -> Result<Image<FileDevice>, Error<std::io::Error>> {
    let opts = if read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    Image::open(FileDevice::open(path, !read_only).unwrap(), &opts)
}

fn unsupported(path: &Path, read_only: bool) -> Feature {
    match open(path, read_only) {
        Err(Error::Unsupported(what)) => what,
        Err(e) => panic!("{}: expected Unsupported, got {e}", path.display()),
        Ok(_) => panic!("{}: expected Unsupported, opened fine", path.display()),
    }
}

#[test]
fn unimplemented_features_are_refused_by_name() {
    let d = Scratch::new("features-refused");
    let base = d.join("base.qcow2");
    qemu::create(&base, "", 1 << 20);

    let backed = d.join("backed.qcow2");
    qemu::img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        backed.to_str().unwrap(),
    ]);
    // Opened without its chain, an overlay refuses what needs the backing.
    let mut img = open(&backed, true).unwrap();
    let mut buf = vec![0; 512];
    match img.read_at(0, &mut buf) {
        Err(Error::Unsupported(what)) => assert_eq!(what, Feature::BackingNotAttached),
        other => panic!("reading an overlay without its backing: {other:?}"),
    }
    drop(img);
    let mut img = qcow2_std_shim::open_chain(
        &backed,
        &OpenOptions::read_only(),
        &qcow2_std_shim::ChainOptions::trusting(),
    )
    .unwrap();
    img.read_at(0, &mut buf).unwrap();

    let ext_l2 = d.join("extl2.qcow2");
    qemu::create(&ext_l2, "extended_l2=on", 1 << 20);
    assert_eq!(unsupported(&ext_l2, true), Feature::ExtendedL2);

    // An external data file opens; guest reads wait for the data device
    // (tests/data_file.rs covers the rest).
    let data_file = d.join("external.qcow2");
    let raw = d.join("external.raw");
    let opt = format!("data_file={}", raw.display());
    qemu::create(&data_file, &opt, 1 << 20);
    let mut img = open(&data_file, true).unwrap();
    let mut buf = vec![0; 512];
    assert!(matches!(
        img.read_at(0, &mut buf),
        Err(Error::Unsupported(Feature::DataFileNotAttached))
    ));
    drop(img);

    // Encryption: crypt_method 1 (AES) patched into a plain image.
    let enc = d.join("enc.qcow2");
    qemu::create(&enc, "", 1 << 20);
    poke(&enc, CRYPT_METHOD, &1u32.to_be_bytes());
    assert_eq!(unsupported(&enc, true), Feature::Encryption);

    // An incompatible bit nobody knows.
    let unknown = d.join("unknown.qcow2");
    qemu::create(&unknown, "", 1 << 20);
    poke(&unknown, INCOMPATIBLE_FEATURES, &(1u64 << 40).to_be_bytes());
    assert_eq!(
        unsupported(&unknown, true),
        Feature::UnknownIncompatibleBits
    );

    // Compressed clusters read as the data they hold (host workspace).
    let plain = d.join("plain.qcow2");
    qemu::create(&plain, "", 1 << 20);
    qemu::io(&plain, &["write -P 0x61 0 64k"]);
    let compressed = d.join("compressed.qcow2");
    qemu::img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        plain.to_str().unwrap(),
        compressed.to_str().unwrap(),
    ]);
    let mut img = open(&compressed, true).unwrap();
    let mut buf = vec![0; 4096];
    img.read_at(4096, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x61));
    // Unallocated parts of the same image still read as zeros.
    img.read_at(512 << 10, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
}

#[test]
fn snapshots_corrupt_and_dirty_images_open_read_only_only() {
    let d = Scratch::new("features-read-only");
    let snap = d.join("snap.qcow2");
    qemu::create(&snap, "", 1 << 20);
    qemu::io(&snap, &["write -P 0x42 0 4k"]);
    qemu::img(&["snapshot", "-c", "s1", snap.to_str().unwrap()]);
    qemu::io(&snap, &["write -P 0x43 0 512"]);
    let mut img = open(&snap, true).unwrap();
    let mut buf = vec![0; 4096];
    img.read_at(0, &mut buf).unwrap();
    assert!(buf[..512].iter().all(|b| *b == 0x43) && buf[512..].iter().all(|b| *b == 0x42));
    drop(img);
    assert_eq!(unsupported(&snap, false), Feature::Snapshots);

    for (bit, name) in [(1u64, "dirty"), (2u64, "corrupt")] {
        let p = d.join(format!("{name}.qcow2"));
        qemu::create(&p, "lazy_refcounts=on", 1 << 20);
        qemu::io(&p, &["write -P 0x44 0 8k"]);
        poke(&p, INCOMPATIBLE_FEATURES, &bit.to_be_bytes());
        let img = open(&p, true).unwrap();
        assert_eq!(img.info().dirty, name == "dirty");
        assert_eq!(img.info().corrupt, name == "corrupt");
        drop(img);
        // A read-only open leaves the header untouched.
        assert_eq!(peek(&p, INCOMPATIBLE_FEATURES, 8), bit.to_be_bytes());
    }
    // Corrupt: read-write refused, header untouched.
    let corrupt = d.join("corrupt.qcow2");
    assert!(matches!(
        open(&corrupt, false),
        Err(Error::Corrupt {
            what: Corruption::MarkedCorrupt,
            ..
        })
    ));
    assert_eq!(peek(&corrupt, INCOMPATIBLE_FEATURES, 8), 2u64.to_be_bytes());
    // Dirty: read-write rebuilds the refcounts and clears the bit.
    let dirty = d.join("dirty.qcow2");
    let mut img = open(&dirty, false).unwrap();
    let mut buf = vec![0; 8192];
    img.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 0x44));
    assert!(!img.info().dirty);
    img.close().unwrap();
    assert_eq!(peek(&dirty, INCOMPATIBLE_FEATURES, 8), [0; 8]);
    qemu::img(&["check", path_str(&dirty)]);
}

#[test]
fn unknown_extensions_survive_and_autoclear_bits_are_cleared_on_write() {
    let d = Scratch::new("features-extensions");
    let p = d.join("ext.qcow2");
    let img = Image::create(
        FileDevice::create(&p).unwrap(),
        &CreateOptions::new(4 << 20),
    )
    .unwrap();
    img.close().unwrap();
    // An unknown extension after the 112-byte header, then the end marker.
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    ext.extend_from_slice(&5u32.to_be_bytes());
    ext.extend_from_slice(b"hello\0\0\0");
    ext.extend_from_slice(&[0; 8]);
    poke(&p, EXTENSIONS, &ext);
    // Autoclear: an unknown bit 7 (bit 0, bitmaps, refuses writes instead).
    poke(&p, AUTOCLEAR_FEATURES, &0x80u64.to_be_bytes());

    // Read-only: nothing changes.
    drop(open(&p, true).unwrap());
    assert_eq!(peek(&p, AUTOCLEAR_FEATURES, 8), 0x80u64.to_be_bytes());

    let mut img = open(&p, false).unwrap();
    img.write_at(100_000, &[7; 3000]).unwrap();
    img.close().unwrap();
    assert_eq!(
        peek(&p, AUTOCLEAR_FEATURES, 8),
        [0; 8],
        "autoclear bits not cleared"
    );
    assert_eq!(
        peek(&p, EXTENSIONS, ext.len()),
        ext,
        "unknown extension lost"
    );
    qemu::img(&["check", path_str(&p)]);
}

/// A failed open or create gives the device and cache back untouched, so
/// firmware can retry or fall back; `?` still yields the plain error.
#[test]
fn failed_open_and_create_return_device_and_cache() {
    use qcow2_core::{OpenError, Qcow2, Slot};
    use qcow2_std_shim::{block_on, RamDevice};

    let bytes: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    let mut cache = [const { Slot::<1>::EMPTY }; 4];
    let open = Qcow2::open(
        RamDevice::from_bytes(&bytes),
        &mut cache,
        OpenOptions::read_write(),
    );
    match block_on(open) {
        Err(OpenError {
            error: Error::NotQcow2,
            device,
            cache: back,
        }) => {
            assert_eq!(device.as_bytes(), &bytes[..], "device unchanged");
            assert_eq!(back.len(), 4);
        }
        Err(e) => panic!("expected NotQcow2, got {e}"),
        Ok(_) => panic!("random bytes opened as qcow2"),
    }

    // Too small to hold the metadata, and unable to grow.
    let create = Qcow2::create(RamDevice::fixed(8), &mut cache, CreateOptions::new(1 << 20));
    let Err(failed) = block_on(create) else {
        panic!("create on an 8-sector fixed device succeeded")
    };
    assert!(matches!(failed.error, Error::NoSpace), "{failed}");
    assert_eq!(failed.device.as_bytes().len(), 8 * 512);

    // The same device, once given back, takes an image on a second try.
    let mut device = RamDevice::new();
    let image = block_on(Qcow2::create(
        &mut device,
        &mut cache,
        CreateOptions::new(1 << 20),
    ));
    block_on(image.unwrap().close()).unwrap();
    let image = block_on(Qcow2::open(
        &mut device,
        &mut cache,
        OpenOptions::read_only(),
    ));
    assert_eq!(image.unwrap().virtual_size(), 1 << 20);

    // `?` turns an OpenError into the image's Error.
    fn via_question_mark() -> Result<(), Error<qcow2_std_shim::RamError>> {
        let mut cache = [const { Slot::<1>::EMPTY }; 2];
        let dev = RamDevice::new();
        block_on(Qcow2::open(dev, &mut cache, OpenOptions::read_only()))?;
        Ok(())
    }
    assert!(matches!(via_question_mark(), Err(Error::NotQcow2)));
}
