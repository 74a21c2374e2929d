//! The names an image's header holds: its backing file, the backing
//! file's format and the external data file. Read from the device on
//! demand into the caller's buffer, never kept in the image (firmware RAM
//! matters more than a few reads of the first cluster).

use crate::cache::SlotStorage;
use crate::engine::header_io;
use crate::engine::Engine;
use crate::format::{Extension, ExtensionKind};
use crate::{BlockDevice, Corruption, Error};

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// See [`crate::Qcow2::has_backing_file`].
    pub(crate) fn has_backing_file(&self) -> bool {
        self.header.has_backing_file()
    }

    /// See [`crate::Qcow2::has_data_file`].
    pub(crate) fn has_data_file(&self) -> bool {
        self.header.has_data_file()
    }

    /// See [`crate::Qcow2::data_file_raw`].
    pub(crate) fn data_file_raw(&self) -> bool {
        self.header.data_file_raw()
    }

    /// See [`crate::Qcow2::backing_file_name`].
    pub(crate) async fn backing_file_name(
        &mut self,
        buf: &mut [u8],
    ) -> Result<Option<usize>, Error<D::Error>> {
        if !self.header.has_backing_file() {
            return Ok(None);
        }
        let at = self.header.backing_file_offset;
        let len = self.header.backing_file_size;
        // Validated at open, checked again for a header changed since.
        if len > crate::format::header::MAX_BACKING_FILE_NAME
            || at + u64::from(len) > self.geo.cluster_size
        {
            return Err(Error::corrupt(Corruption::BackingNameOutsideCluster, at));
        }
        self.read_name(at, len, Corruption::BackingNameBeyondImage, buf)
            .await
    }

    /// See [`crate::Qcow2::backing_format`].
    pub(crate) async fn backing_format(
        &mut self,
        buf: &mut [u8],
    ) -> Result<Option<usize>, Error<D::Error>> {
        if !self.header.has_backing_file() {
            return Ok(None);
        }
        let Some(ext) = self.find_extension(ExtensionKind::BackingFormat).await? else {
            return Ok(None);
        };
        if ext.len > crate::format::header::MAX_BACKING_FORMAT {
            return Err(Error::corrupt(
                Corruption::BackingFormatTooLong,
                ext.offset - 8,
            ));
        }
        self.read_name(
            ext.offset,
            ext.len,
            Corruption::BackingFormatBeyondImage,
            buf,
        )
        .await
    }

    /// See [`crate::Qcow2::data_file_name`].
    pub(crate) async fn data_file_name(
        &mut self,
        buf: &mut [u8],
    ) -> Result<Option<usize>, Error<D::Error>> {
        let Some(ext) = self.find_extension(ExtensionKind::ExternalDataFile).await? else {
            return Ok(None);
        };
        self.read_name(
            ext.offset,
            ext.len,
            Corruption::DataFileNameBeyondImage,
            buf,
        )
        .await
    }

    /// The last header extension of `kind`, if any.
    pub(crate) async fn find_extension(
        &mut self,
        kind: ExtensionKind,
    ) -> Result<Option<Extension>, Error<D::Error>> {
        header_io::find_extension(&mut self.dev, &mut self.scratch, &self.header, kind).await
    }

    /// Reads the `len` bytes at `at` into `buf` and returns the length up
    /// to the first NUL (`None` if that is 0), as QEMU reads names.
    /// `past_end` is the error when the device ends before the name.
    async fn read_name(
        &mut self,
        at: u64,
        len: u32,
        past_end: Corruption,
        buf: &mut [u8],
    ) -> Result<Option<usize>, Error<D::Error>> {
        let len = len as usize;
        let out = buf
            .get_mut(..len)
            .ok_or(Error::InvalidArgument("buffer too small for the name"))?;
        let end = at + len as u64;
        if end > self.dev.sector_count().saturating_mul(crate::SECTOR as u64) {
            return Err(Error::corrupt(past_end, at));
        }
        header_io::read_bytes(&mut self.dev, &mut self.scratch, at, out).await?;
        let used = out.iter().position(|&b| b == 0).unwrap_or(len);
        Ok((used > 0).then_some(used))
    }
}

#[cfg(test)]
#[cfg(feature = "write")]
mod tests {
    extern crate std;
    use super::*;
    use crate::format::header::{
        EXT_BACKING_FORMAT, EXT_DATA_FILE, EXT_FEATURE_NAMES, MAX_BACKING_FILE_NAME,
    };
    use crate::format::{autoclear, incompatible, Header};
    use crate::testing::{ram, Ram};
    use crate::{CreateOptions, OpenOptions, SECTOR};
    use crate::{Qcow2, Slot};
    use embassy_futures::block_on;
    use std::vec::Vec;

    type Image = Qcow2<Ram, [Slot<1>; 8], 1>;
    type Result<T> = core::result::Result<T, Error<()>>;

    /// A fresh 1 MiB image of 512-byte clusters on a 64-sector RAM device.
    fn base() -> Ram {
        let mut cache = [const { Slot::<1>::EMPTY }; 8];
        let options = CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::new(1 << 20)
        };
        let image = block_on(Qcow2::create(ram(), &mut cache, options)).unwrap();
        block_on(image.close()).unwrap().0
    }

    fn open(dev: Ram) -> Result<Image> {
        let cache = [const { Slot::<1>::EMPTY }; 8];
        block_on(Image::open(dev, cache, OpenOptions::read_only())).map_err(|e| e.error)
    }

    /// Writes `bytes` at byte `at` (within one sector).
    fn poke(dev: &mut Ram, at: usize, bytes: &[u8]) {
        let (sector, i) = (at / SECTOR, at % SECTOR);
        dev.data[sector][i..i + bytes.len()].copy_from_slice(bytes);
    }

    fn put32(dev: &mut Ram, at: usize, v: u32) {
        poke(dev, at, &v.to_be_bytes());
    }

    /// Points the header at a backing name of `len` bytes at `at`.
    fn name_at(dev: &mut Ram, at: u64, len: u32) {
        poke(dev, 8, &at.to_be_bytes());
        put32(dev, 16, len);
    }

    /// An extension header at `at`.
    fn ext(dev: &mut Ram, at: usize, kind: u32, len: u32) {
        put32(dev, at, kind);
        put32(dev, at + 4, len);
    }

    fn backing(img: &mut Image) -> Result<Option<Vec<u8>>> {
        let mut buf = [0u8; 1024];
        let n = block_on(img.backing_file_name(&mut buf))?;
        Ok(n.map(|n| buf[..n].to_vec()))
    }

    fn format(img: &mut Image) -> Result<Option<Vec<u8>>> {
        let mut buf = [0u8; 16];
        let n = block_on(img.backing_format(&mut buf))?;
        Ok(n.map(|n| buf[..n].to_vec()))
    }

    fn data_file(img: &mut Image) -> Result<Option<Vec<u8>>> {
        let mut buf = [0u8; 512];
        let n = block_on(img.data_file_name(&mut buf))?;
        Ok(n.map(|n| buf[..n].to_vec()))
    }

    #[test]
    fn plain_image_names_nothing() {
        let mut img = open(base()).unwrap();
        assert!(!img.has_backing_file() && !img.has_data_file() && !img.data_file_raw());
        assert_eq!(backing(&mut img), Ok(None));
        assert_eq!(format(&mut img), Ok(None));
        assert_eq!(data_file(&mut img), Ok(None));
    }

    #[test]
    fn backing_name_and_format_are_read() {
        let mut b = base();
        // Backing format extension, end marker, then the name.
        ext(&mut b, 112, EXT_BACKING_FORMAT, 5);
        poke(&mut b, 120, b"qcow2");
        poke(&mut b, 136, b"base.img");
        name_at(&mut b, 136, 8);
        let mut img = open(b).unwrap();
        assert!(img.has_backing_file());
        assert_eq!(backing(&mut img), Ok(Some(b"base.img".to_vec())));
        assert_eq!(format(&mut img), Ok(Some(b"qcow2".to_vec())));
        // Too small a buffer is the caller's error, not the image's.
        let mut small = [0u8; 7];
        assert_eq!(
            block_on(img.backing_file_name(&mut small)),
            Err(Error::InvalidArgument("buffer too small for the name"))
        );
        let mut small = [0u8; 4];
        assert_eq!(
            block_on(img.backing_format(&mut small)),
            Err(Error::InvalidArgument("buffer too small for the name"))
        );
    }

    #[test]
    fn names_are_c_strings_as_in_qemu() {
        let mut b = base();
        poke(&mut b, 400, b"a\0b\0");
        name_at(&mut b, 400, 4);
        assert_eq!(backing(&mut open(b).unwrap()), Ok(Some(b"a".to_vec())));
        // A name of NULs, or of zero length, is no backing file.
        let mut b = base();
        name_at(&mut b, 400, 4);
        assert_eq!(backing(&mut open(b).unwrap()), Ok(None));
        let mut b = base();
        name_at(&mut b, 400, 0);
        let mut img = open(b).unwrap();
        assert!(!img.has_backing_file());
        assert_eq!(backing(&mut img), Ok(None));
        // Without an offset the length means nothing.
        let mut b = base();
        name_at(&mut b, 0, 4);
        assert_eq!(backing(&mut open(b).unwrap()), Ok(None));
    }

    #[test]
    fn hostile_backing_names_are_refused_at_open() {
        let corrupt = |what| Err(Error::Corrupt { what, offset: 0 });
        // The longest name QEMU takes, in a cluster large enough for it.
        let mut h = Header::decode::<()>(&base().data[0]).unwrap();
        h.cluster_bits = 16;
        h.l1_table_offset = 3 << 16;
        h.refcount_table_offset = 1 << 16;
        h.backing_file_offset = 0x400;
        h.backing_file_size = MAX_BACKING_FILE_NAME;
        assert_eq!(h.validate::<()>(), Ok(()));
        h.backing_file_size = MAX_BACKING_FILE_NAME + 1;
        assert_eq!(h.validate::<()>(), corrupt(Corruption::BackingNameTooLong));
        h.backing_file_offset = 65530;
        h.backing_file_size = 10;
        assert_eq!(
            h.validate::<()>(),
            corrupt(Corruption::BackingNameOutsideCluster)
        );
        h.backing_file_offset = 1 << 62;
        assert_eq!(
            h.validate::<()>(),
            corrupt(Corruption::BackingNameOutsideCluster)
        );
        h.backing_file_offset = u64::MAX;
        h.backing_file_size = u32::MAX;
        assert!(h.validate::<()>().is_err());
        // And through open, with 512-byte clusters.
        let mut b = base();
        name_at(&mut b, 500, 100);
        assert!(matches!(open(b), Err(Error::Corrupt { .. })));
        let mut b = base();
        name_at(&mut b, 512, 1);
        assert!(matches!(open(b), Err(Error::Corrupt { .. })));
        // Exactly to the end of the cluster is fine.
        let mut b = base();
        poke(&mut b, 508, b"last");
        name_at(&mut b, 508, 4);
        assert_eq!(backing(&mut open(b).unwrap()), Ok(Some(b"last".to_vec())));
        // A header changed under the open image is checked again.
        let mut img = open(base()).unwrap();
        img.engine.header.backing_file_offset = 500;
        img.engine.header.backing_file_size = 100;
        assert!(matches!(backing(&mut img), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn backing_format_extensions_are_bounded() {
        let mut b = base();
        name_at(&mut b, 400, 4);
        poke(&mut b, 400, b"base");
        ext(&mut b, 112, EXT_BACKING_FORMAT, 16);
        assert!(matches!(open(b), Err(Error::Corrupt { .. })));
        // A format past the cluster is refused by the extension bounds.
        let mut b = base();
        ext(&mut b, 112, EXT_BACKING_FORMAT, 1000);
        assert!(matches!(open(b), Err(Error::Corrupt { .. })));
        // The last of duplicates counts, as in QEMU; others are skipped.
        let mut b = base();
        name_at(&mut b, 400, 4);
        poke(&mut b, 400, b"base");
        ext(&mut b, 112, EXT_BACKING_FORMAT, 3);
        poke(&mut b, 120, b"raw");
        ext(&mut b, 128, EXT_FEATURE_NAMES, 0);
        ext(&mut b, 136, EXT_BACKING_FORMAT, 5);
        poke(&mut b, 144, b"qcow2");
        assert_eq!(format(&mut open(b).unwrap()), Ok(Some(b"qcow2".to_vec())));
        // Without a backing file the format means nothing.
        let mut b = base();
        ext(&mut b, 112, EXT_BACKING_FORMAT, 3);
        poke(&mut b, 120, b"raw");
        assert_eq!(format(&mut open(b).unwrap()), Ok(None));
        // A hostile length in an image changed after open.
        let mut b = base();
        name_at(&mut b, 400, 4);
        poke(&mut b, 400, b"base");
        let mut img = open(b).unwrap();
        ext(&mut img.engine.dev.meta, 112, EXT_BACKING_FORMAT, 300);
        assert!(matches!(format(&mut img), Err(Error::Corrupt { .. })));
        ext(&mut img.engine.dev.meta, 112, EXT_BACKING_FORMAT, 3000);
        assert!(matches!(format(&mut img), Err(Error::Corrupt { .. })));
    }

    #[test]
    fn data_file_extension_without_its_bit_is_ignored() {
        // QEMU opens such an image as a plain one (and shows the name).
        let mut b = base();
        ext(&mut b, 112, EXT_DATA_FILE, 6);
        poke(&mut b, 120, b"d.data");
        let mut img = open(b).unwrap();
        assert!(!img.has_data_file() && !img.data_file_raw());
        assert_eq!(data_file(&mut img), Ok(Some(b"d.data".to_vec())));
    }

    #[test]
    fn data_file_name_is_read() {
        // Set the bits in the open image's copy of the header.
        let mut b = base();
        ext(&mut b, 112, EXT_DATA_FILE, 6);
        poke(&mut b, 120, b"d.data");
        let mut img = open(b).unwrap();
        assert!(!img.data_file_raw());
        img.engine.header.incompatible_features |= incompatible::EXTERNAL_DATA;
        assert!(img.has_data_file() && !img.data_file_raw());
        img.engine.header.autoclear_features |= autoclear::RAW_EXTERNAL;
        assert!(img.data_file_raw());
        assert_eq!(data_file(&mut img), Ok(Some(b"d.data".to_vec())));
        let mut small = [0u8; 5];
        assert!(matches!(
            block_on(img.data_file_name(&mut small)),
            Err(Error::InvalidArgument(_))
        ));
        // A data file without the extension: no name to give.
        let mut img = open(base()).unwrap();
        img.engine.header.incompatible_features |= incompatible::EXTERNAL_DATA;
        assert_eq!(data_file(&mut img), Ok(None));
    }
}
