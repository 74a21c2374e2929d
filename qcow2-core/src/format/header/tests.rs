use super::*;
use crate::format::{compatible, incompatible};

fn sample(version: Version) -> Header {
    Header {
        version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: 16,
        size: 1 << 30,
        crypt_method: 0,
        l1_size: 2,
        l1_table_offset: 0x30000,
        refcount_table_offset: 0x10000,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: if version == Version::V3 {
            compatible::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: 4,
        header_length: if version == Version::V3 {
            V3_LENGTH
        } else {
            V2_LENGTH
        },
        compression_type: 0,
    }
}

#[test]
fn round_trip_both_versions() {
    for v in [Version::V2, Version::V3] {
        let h = sample(v);
        let mut buf = [0u8; 512];
        h.encode(&mut buf).unwrap();
        assert_eq!(&buf[..4], b"QFI\xfb");
        let back = Header::decode::<()>(&buf).unwrap();
        assert_eq!(back, h);
        back.validate::<()>().unwrap();
    }
}

#[test]
fn encode_leaves_extension_bytes_alone() {
    let mut h = sample(Version::V3);
    h.header_length = 104;
    let mut buf = [0xeeu8; 512];
    h.encode(&mut buf).unwrap();
    assert!(buf[104..].iter().all(|b| *b == 0xee));
    let mut buf = [0xeeu8; 512];
    sample(Version::V2).encode(&mut buf).unwrap();
    assert!(buf[72..].iter().all(|b| *b == 0xee));
}

#[test]
fn field_offsets_match_the_spec() {
    let h = sample(Version::V3);
    let mut buf = [0u8; 512];
    h.encode(&mut buf).unwrap();
    assert_eq!(u32::from_be_bytes(buf[20..24].try_into().unwrap()), 16);
    assert_eq!(u64::from_be_bytes(buf[24..32].try_into().unwrap()), 1 << 30);
    assert_eq!(u64::from_be_bytes(buf[40..48].try_into().unwrap()), 0x30000);
    assert_eq!(u64::from_be_bytes(buf[48..56].try_into().unwrap()), 0x10000);
    assert_eq!(u64::from_be_bytes(buf[80..88].try_into().unwrap()), 1);
    assert_eq!(u32::from_be_bytes(buf[96..100].try_into().unwrap()), 4);
    assert_eq!(u32::from_be_bytes(buf[100..104].try_into().unwrap()), 112);
}

#[test]
fn bad_fields_are_refused_precisely() {
    let mut buf = [0u8; 512];
    assert_eq!(Header::decode::<()>(&buf), Err(Error::NotQcow2));
    sample(Version::V3).encode(&mut buf).unwrap();
    buf[7] = 4;
    assert!(matches!(
        Header::decode::<()>(&buf),
        Err(Error::Unsupported(_))
    ));

    let check = |f: &dyn Fn(&mut Header)| {
        let mut h = sample(Version::V3);
        f(&mut h);
        h.validate::<()>()
    };
    assert_eq!(
        check(&|h| h.crypt_method = 1),
        Err(Error::Unsupported(Feature::Encryption))
    );
    assert_eq!(check(&|h| h.backing_file_offset = 0x200), Ok(()));
    assert!(matches!(
        check(&|h| h.cluster_bits = 8),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        check(&|h| h.cluster_bits = 22),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(
        check(&|h| h.refcount_order = 7),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        check(&|h| h.l1_size = 1),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        check(&|h| h.l1_table_offset = 0x30200),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        check(&|h| h.l1_table_offset = 0),
        Err(Error::Corrupt { .. })
    ));
    // Overlapping tables pass field validation; read-write opens refuse them.
    let mut h = sample(Version::V3);
    h.l1_table_offset = 0x10000;
    assert!(h.validate::<()>().is_ok());
    assert!(matches!(
        h.check_tables_apart::<()>(),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        check(&|h| h.snapshots_offset = 0x10008),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        check(&|h| h.autoclear_features = crate::format::autoclear::RAW_EXTERNAL),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        check(&|h| h.refcount_table_clusters = 0),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        check(&|h| h.refcount_table_offset = 1 << 56),
        Err(Error::Corrupt { .. })
    ));
    assert!(matches!(
        check(&|h| h.header_length = 96),
        Err(Error::Corrupt { .. })
    ));
    assert_eq!(
        check(&|h| h.incompatible_features = 1 << 5),
        Err(Error::Unsupported(Feature::UnknownIncompatibleBits))
    );
    assert_eq!(
        check(&|h| h.incompatible_features = incompatible::EXTENDED_L2),
        Err(Error::Unsupported(Feature::ExtendedL2))
    );
    // External data files open (the data file is attached later).
    assert_eq!(
        check(&|h| h.incompatible_features = incompatible::EXTERNAL_DATA),
        Ok(())
    );
    assert!(matches!(
        check(&|h| h.compression_type = 1),
        Err(Error::Corrupt { .. })
    ));
    assert!(check(&|h| {
        h.compression_type = 1;
        h.incompatible_features = incompatible::COMPRESSION_TYPE
    })
    .is_ok());
}

#[test]
fn empty_ranges_overlap_nothing() {
    assert!(!overlaps(0x600, 512, 0x670, 0));
    assert!(!overlaps(0x670, 0, 0x600, 512));
    assert!(overlaps(0x600, 512, 0x670, 1));
    assert!(!overlaps(0, 512, 512, 512));
}

/// The header cluster `area` makes, as far as `len` bytes.
fn area_bytes(area: &HeaderArea, len: usize) -> [u8; 2048] {
    let mut out = [0xeeu8; 2048];
    // In odd windows, to exercise the overlap arithmetic.
    let mut at = 0;
    for step in [1, 7, 100, 512, 3].iter().cycle() {
        if at >= len {
            break;
        }
        let end = (at + step).min(len);
        area.fill(at as u64, &mut out[at..end]);
        at = end;
    }
    out
}

#[test]
fn header_area_matches_qemu() {
    // qemu-img create -f qcow2 -b base.raw -F raw ov.qcow2: format
    // extension, feature table, end marker, name at 0x210.
    let files = ExternalFiles {
        backing_file: Some(b"base.raw"),
        backing_format: Some("raw"),
        ..ExternalFiles::NONE
    };
    let area = HeaderArea::new::<()>(&sample(Version::V3), &files).unwrap();
    assert_eq!(area.header().backing_file_offset, 0x210);
    assert_eq!(area.header().backing_file_size, 8);
    assert_eq!(area.end(), 0x218);
    let b = area_bytes(&area, 0x300);
    assert_eq!(&b[8..20], &[0, 0, 0, 0, 0, 0, 2, 0x10, 0, 0, 0, 8]);
    assert_eq!(&b[0x70..0x80], b"\xe2\x79\x2a\xca\0\0\0\x03raw\0\0\0\0\0");
    assert_eq!(&b[0x80..0x88], &[0x68, 0x03, 0xf8, 0x57, 0, 0, 1, 0x80]);
    assert_eq!(&b[0x88..0x94], b"\0\0dirty bit\0");
    assert_eq!(
        &b[0x88 + 48 * 2..0x88 + 48 * 2 + 20],
        b"\0\x02external data file"
    );
    assert_eq!(
        &b[0x88 + 48 * 7..0x88 + 48 * 7 + 19],
        b"\x02\x01raw external data"
    );
    assert!(b[0x208..0x210].iter().all(|&x| x == 0));
    assert_eq!(&b[0x210..0x218], b"base.raw");
    assert!(b[0x218..0x300].iter().all(|&x| x == 0));
    assert_eq!(Header::decode::<()>(&b).unwrap(), *area.header());

    // v2: no feature table; 512-byte clusters: none either.
    let area = HeaderArea::new::<()>(&sample(Version::V2), &files).unwrap();
    assert_eq!(area.header().backing_file_offset, 0x60);
    let b = area_bytes(&area, 0x100);
    assert_eq!(&b[0x48..0x50], &[0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 3]);
    assert_eq!(&b[0x60..0x68], b"base.raw");
    let mut h = sample(Version::V3);
    h.cluster_bits = 9;
    let area = HeaderArea::new::<()>(&h, &files).unwrap();
    assert_eq!(area.header().backing_file_offset, 0x88);
    // 4 KiB clusters are the largest without the table, as in QEMU.
    h.cluster_bits = 12;
    assert_eq!(HeaderArea::new::<()>(&h, &files).unwrap().end(), 0x90);
    h.cluster_bits = 13;
    assert_eq!(HeaderArea::new::<()>(&h, &files).unwrap().end(), 0x218);
    // Nothing named: the feature table and the end marker only.
    let area = HeaderArea::new::<()>(&sample(Version::V3), &ExternalFiles::NONE).unwrap();
    assert_eq!(area.header().backing_file_offset, 0);
    assert_eq!(area.end(), 0x70 + 8 + 384 + 8);
}

#[test]
fn header_area_data_file() {
    // qemu-img create -f qcow2 -o data_file=d.raw,data_file_raw=on.
    let files = ExternalFiles {
        data_file: Some(b"d.raw"),
        data_file_raw: true,
        ..ExternalFiles::NONE
    };
    files.validate::<()>(Version::V3).unwrap();
    let area = HeaderArea::new::<()>(&sample(Version::V3), &files).unwrap();
    let h = area.header();
    assert_eq!(h.incompatible_features, incompatible::EXTERNAL_DATA);
    assert_eq!(h.autoclear_features, crate::format::autoclear::RAW_EXTERNAL);
    assert!(h.has_data_file() && h.data_file_raw() && !h.has_backing_file());
    let b = area_bytes(&area, 0x100);
    assert_eq!(&b[0x70..0x80], b"DATA\0\0\0\x05d.raw\0\0\0");
    assert_eq!(&b[0x80..0x84], &[0x68, 0x03, 0xf8, 0x57]);
    // Both: the format extension comes first.
    let files = ExternalFiles {
        backing_file: Some(b"b"),
        backing_format: Some("qcow2"),
        data_file: Some(b"data"),
        data_file_raw: false,
    };
    let area = HeaderArea::new::<()>(&sample(Version::V3), &files).unwrap();
    let b = area_bytes(&area, 0x300);
    assert_eq!(&b[0x70..0x78], &[0xe2, 0x79, 0x2a, 0xca, 0, 0, 0, 5]);
    assert_eq!(&b[0x80..0x90], b"DATA\0\0\0\x04data\0\0\0\0");
    assert_eq!(area.header().backing_file_offset, 0x90 + 8 + 384 + 8);
}

#[test]
fn external_files_are_checked_as_qemu_does() {
    let long = [b'a'; 1024];
    let bad = |f: ExternalFiles, v| matches!(f.validate::<()>(v), Err(Error::InvalidArgument(_)));
    let backing = |name| ExternalFiles {
        backing_file: Some(name),
        ..ExternalFiles::NONE
    };
    assert!(bad(backing(&long), Version::V3));
    assert!(!bad(backing(&long[..1023]), Version::V3));
    assert!(bad(backing(b""), Version::V3));
    assert!(bad(backing(b"a\0b"), Version::V3));
    let format_only = ExternalFiles {
        backing_format: Some("raw"),
        ..ExternalFiles::NONE
    };
    assert!(bad(format_only, Version::V3));
    let long_format = ExternalFiles {
        backing_format: Some("qcow2qcow2qcow2q"),
        ..backing(b"b")
    };
    assert!(bad(long_format, Version::V3));
    let data = ExternalFiles {
        data_file: Some(b"d"),
        ..ExternalFiles::NONE
    };
    assert!(bad(data, Version::V2));
    assert!(!bad(data, Version::V3));
    let raw_only = ExternalFiles {
        data_file_raw: true,
        ..ExternalFiles::NONE
    };
    assert!(bad(raw_only, Version::V3));
    let raw_and_backing = ExternalFiles {
        data_file_raw: true,
        ..ExternalFiles {
            backing_file: Some(b"b"),
            ..data
        }
    };
    assert!(bad(raw_and_backing, Version::V3));
    // A name that does not fit: no space, as QEMU's ENOSPC.
    let mut h = sample(Version::V3);
    h.cluster_bits = 9;
    assert_eq!(
        HeaderArea::new::<()>(&h, &backing(&long[..1023])).map(|_| ()),
        Err(Error::NoSpace)
    );
    // Header, end marker, name: to the last byte of the cluster.
    assert!(HeaderArea::new::<()>(&h, &backing(&long[..512 - 0x78])).is_ok());
    assert_eq!(
        HeaderArea::new::<()>(&h, &backing(&long[..512 - 0x77])).map(|_| ()),
        Err(Error::NoSpace)
    );
}

#[test]
fn backing_names_are_checked_as_qemu_does() {
    let check = |off, len| {
        let mut h = sample(Version::V3);
        h.backing_file_offset = off;
        h.backing_file_size = len;
        h.validate::<()>()
    };
    assert_eq!(check(0x200, 4), Ok(()));
    assert_eq!(check(0, 4000), Ok(()));
    assert_eq!(check(0x200, 0), Ok(()));
    assert_eq!(check(0x400, 1023), Ok(()));
    assert_eq!(check(65536 - 1023, 1023), Ok(()));
    for (off, len) in [
        (0x400, 1024),
        (65535, 2),
        (65536, 1),
        (65537, 0),
        (1 << 62, 4),
        (u64::MAX, u32::MAX),
    ] {
        assert!(
            matches!(check(off, len), Err(Error::Corrupt { .. })),
            "{off} {len}"
        );
    }
}

#[test]
fn extension_bounds() {
    let raw = [0x68, 0x03, 0xf8, 0x57, 0, 0, 0, 48];
    let e = Extension::decode::<()>(raw, 112, 65536).unwrap();
    assert_eq!(e.kind, ExtensionKind::FeatureNames);
    assert_eq!(e.next(), 112 + 8 + 48);
    let raw = [0, 0, 0, 9, 0, 0, 0, 5];
    let e = Extension::decode::<()>(raw, 112, 65536).unwrap();
    assert_eq!(e.kind, ExtensionKind::Unknown(9));
    assert_eq!(e.next(), 112 + 8 + 8);
    let raw = [0, 0, 0, 9, 0, 0, 2, 0];
    assert!(Extension::decode::<()>(raw, 112, 512).is_err());
}
