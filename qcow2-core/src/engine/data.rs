//! External data files: the image's devices, and where guest data goes.
//!
//! An image with the external data file feature (incompatible bit 2) keeps
//! its metadata (header, tables, refcounts) in the image file and its
//! guest data in a second device, the data file, whose name is in header
//! extension `0x44415441`. What QEMU 10.0 does with such images, and so
//! what this crate does:
//!
//! - **Host offsets are guest offsets.** A data cluster's host offset is
//!   its guest offset in the data file, always, with or without
//!   `data_file_raw` (`do_alloc_cluster_offset`, block/qcow2-cluster.c:1612:
//!   `*host_offset = start_of_cluster(s, guest_offset)`); an L2 entry
//!   pointing anywhere else is corruption when read (`qcow2_get_host_offset`,
//!   qcow2-cluster.c:696, "External data file host cluster offset ... does
//!   not match guest cluster offset").
//! - **No refcounts for data clusters.** They are not allocated from the
//!   image's refcounts (ibid.), never freed through them
//!   (`qcow2_free_any_cluster`, qcow2-refcount.c:1168;
//!   `qcow2_alloc_cluster_abort`, qcow2-cluster.c:1132), and `qemu-img
//!   check` neither counts references to them (qcow2-refcount.c:1822) nor
//!   expects a refcount: each is taken as 1, so COPIED must be set
//!   (qcow2-refcount.c:2024). They still count as allocated (and
//!   fragmented when not contiguous) clusters (qcow2-refcount.c:1737).
//! - **Offset 0 with COPIED is guest cluster 0's data**, not unallocated
//!   (`qcow2_get_cluster_type`, block/qcow2.h:729); without COPIED it is
//!   unallocated. With the zero flag and offset 0 it is a plain zero
//!   cluster.
//! - **Refused with a data file:** compressed clusters (reading one is
//!   corruption, qcow2-cluster.c:669; `qemu-img check` counts one as a
//!   corruption, qcow2-refcount.c:1714; compressed writes are `ENOTSUP`,
//!   block/qcow2.c:4767), internal snapshots (`check` counts them as a
//!   corruption, qcow2-refcount.c:2236; creating one is refused,
//!   qcow2-snapshot.c:651), downgrading to v2 (block/qcow2.c:5466): the
//!   feature needs v3.
//! - **Discard and write-zeroes.** Freeing a data cluster (discard, zeroing
//!   with unmap) passes the discard to the data file when discards pass
//!   through (`qcow2_free_any_cluster`, qcow2-refcount.c:1168; qemu-io's
//!   default `BDRV_O_UNMAP` enables it), and so does keeping the
//!   reference (qcow2-cluster.c:1985, 2099). With `data_file_raw`,
//!   write-zeroes first writes zeros to the data file over the whole range
//!   (`qcow2_subcluster_zeroize`, qcow2-cluster.c:2169) so that the data
//!   file stays a raw image of the disk.
//! - **`data_file_raw`** (autoclear bit 1) promises that the data file is a
//!   raw image of the guest disk. `qemu-img create` then preallocates the
//!   metadata (every cluster mapped at its own offset, block/qcow2.c:4413);
//!   it requires a data file (block/qcow2.c:1700, "data-file-raw requires
//!   a data file") and no backing file (block/qcow2.c:3635). This crate
//!   keeps the promise: data goes to its own offset anyway, write-zeroes
//!   writes zeros first as QEMU does, and a freed cluster gets zeros
//!   written rather than only a discard hint (which a device may ignore).
//! - **Opening.** QEMU opens the named file (block/qcow2.c:1666), or the
//!   `data-file` option, which it requires when the name is absent
//!   ("'data-file' is required for this image", block/qcow2.c:1680); a
//!   `data-file` option for an image without the feature is an error
//!   (block/qcow2.c:1691). `qemu-img info` does not open it (BDRV_O_NO_IO,
//!   block/qcow2.c:1639). A relative name is opened relative to QEMU's
//!   working directory, not the image's (`bdrv_open_child` with the bare
//!   name; checked with qemu-io 10.0.2 from another directory).
//! - **Ordering.** QEMU's L2 cache flushes only the image file before
//!   writing L2 tables (`qcow2_cache_entry_flush`, qcow2-cache.c:198), so
//!   a crash may leave an entry pointing at data that never reached the
//!   data file. This crate flushes the data file first (rule 3 of
//!   `ORDERING.md` covers both devices): see [`Devices`].

use crate::cache::SlotStorage;
use crate::engine::Engine;
use crate::{BlockDevice, Error, Feature, Sector, SECTOR};

/// The devices of an image: `meta` holds the image file (header, tables,
/// refcounts, and the guest data of images without a data file), `data`
/// the external data file when one is attached.
///
/// As a [`BlockDevice`] it is the metadata device whose flush is a barrier
/// for both: the data file is flushed first when it has unflushed writes.
/// So the metadata cache, which flushes its device before writing any
/// L1/L2 slice after guest data was written (rule 3), orders data-file
/// writes before the entries that point at them without knowing about
/// data files. Guest data goes through the `data_*` methods, which pick
/// the device.
pub(crate) struct Devices<D> {
    /// The image file.
    pub(crate) meta: D,
    /// The external data file, when attached.
    pub(crate) data: Option<D>,
    /// Writes to `data` since its last flush.
    data_unflushed: bool,
}

impl<D: BlockDevice> Devices<D> {
    pub(crate) const fn new(meta: D) -> Self {
        Devices {
            meta,
            data: None,
            data_unflushed: false,
        }
    }

    /// Attaches `dev` as the data file; returns the one attached before.
    pub(crate) fn attach(&mut self, dev: D) -> Option<D> {
        self.data_unflushed = false;
        self.data.replace(dev)
    }

    /// Reads guest data at host sector `first`: from the data file (zeros
    /// past its end, as QEMU reads a file past its end), else the image.
    pub(crate) async fn data_read(
        &mut self,
        first: u64,
        buf: &mut [Sector],
    ) -> Result<(), D::Error> {
        let Some(data) = self.data.as_mut() else {
            return self.meta.read(first, buf).await;
        };
        let have = data.sector_count().saturating_sub(first);
        let n = have.min(buf.len() as u64) as usize;
        let Some((inside, past_end)) = buf.split_at_mut_checked(n) else {
            return data.read(first, buf).await;
        };
        if !inside.is_empty() {
            data.read(first, inside).await?;
        }
        past_end.fill([0; SECTOR]);
        Ok(())
    }

    /// The data file grown to at least `end` sectors (a write there
    /// extends it, as a file grows under QEMU's writes).
    async fn data_reaching(&mut self, end: u64) -> Result<Option<&mut D>, D::Error> {
        let Some(data) = self.data.as_mut() else {
            return Ok(None);
        };
        if end > data.sector_count() {
            data.set_sector_count(end).await?;
        }
        self.data_unflushed = true;
        Ok(Some(data))
    }

    /// Writes guest data at host sector `first`.
    pub(crate) async fn data_write(&mut self, first: u64, buf: &[Sector]) -> Result<(), D::Error> {
        let end = first.saturating_add(buf.len() as u64);
        match self.data_reaching(end).await? {
            Some(data) => data.write(first, buf).await,
            None => self.meta.write(first, buf).await,
        }
    }

    /// Writes `count` zero sectors of guest data from host sector `first`.
    pub(crate) async fn data_write_zeros(
        &mut self,
        first: u64,
        count: u64,
    ) -> Result<(), D::Error> {
        let end = first.saturating_add(count);
        match self.data_reaching(end).await? {
            Some(data) => data.write_zeros(first, count).await,
            None => self.meta.write_zeros(first, count).await,
        }
    }

    /// Writes zeros over the part of host sectors `[first, first + count)`
    /// that the data file holds (past its end it reads zeros already).
    pub(crate) async fn data_clear(&mut self, first: u64, count: u64) -> Result<(), D::Error> {
        let Some(data) = self.data.as_mut() else {
            // Only images with a data file call this.
            return Ok(());
        };
        let n = count.min(data.sector_count().saturating_sub(first));
        if n > 0 {
            self.data_unflushed = true;
            data.write_zeros(first, n).await?;
        }
        Ok(())
    }

    /// Passes the discard of a freed data cluster to the data file (the
    /// image file's clusters are discarded through the refcounts instead).
    pub(crate) async fn data_discard(&mut self, first: u64, count: u64) -> Result<(), D::Error> {
        match self.data.as_mut() {
            Some(data) => {
                self.data_unflushed = true;
                data.discard(first, count).await
            }
            None => Ok(()),
        }
    }
}

impl<D: BlockDevice> BlockDevice for Devices<D> {
    type Error = D::Error;

    async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), Self::Error> {
        self.meta.read(first, buf).await
    }

    async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), Self::Error> {
        self.meta.write(first, buf).await
    }

    /// Flushes the data file (when written since its last flush), then the
    /// image file.
    async fn flush(&mut self) -> Result<(), Self::Error> {
        if self.data_unflushed {
            if let Some(data) = self.data.as_mut() {
                data.flush().await?;
            }
            self.data_unflushed = false;
        }
        self.meta.flush().await
    }

    fn sector_count(&self) -> u64 {
        self.meta.sector_count()
    }

    async fn set_sector_count(&mut self, n: u64) -> Result<(), Self::Error> {
        self.meta.set_sector_count(n).await
    }

    async fn write_zeros(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        self.meta.write_zeros(first, count).await
    }

    async fn discard(&mut self, first: u64, count: u64) -> Result<(), Self::Error> {
        self.meta.discard(first, count).await
    }

    async fn is_zeroed(&mut self, first: u64, count: u64) -> Result<bool, Self::Error> {
        self.meta.is_zeroed(first, count).await
    }
}

impl<D: BlockDevice, S: SlotStorage<K>, const K: usize> Engine<D, S, K> {
    /// See [`crate::Qcow2::attach_data_file`].
    pub(crate) async fn attach_data_file(
        &mut self,
        dev: D,
    ) -> Result<Option<D>, (Error<D::Error>, D)> {
        if !self.header.has_data_file() {
            return Err((
                Error::InvalidArgument(
                    "a data file can only be attached to an image with an external data file",
                ),
                dev,
            ));
        }
        if self.dev.data.is_some() && !self.read_only {
            if let Err(e) = self.cache.flush(&mut self.dev).await {
                return Err((e, dev));
            }
        }
        Ok(self.dev.attach(dev))
    }

    /// See [`crate::Qcow2::data_file`].
    pub(crate) fn data_file(&self) -> Option<&D> {
        self.dev.data.as_ref()
    }

    /// See [`crate::Qcow2::data_file_mut`].
    pub(crate) fn data_file_mut(&mut self) -> Option<&mut D> {
        self.dev.data.as_mut()
    }

    /// Refuses guest I/O when the image keeps its data in an external data
    /// file that is not attached.
    pub(crate) fn require_data_file(&self) -> Result<(), Error<D::Error>> {
        if self.header.has_data_file() && self.dev.data.is_none() {
            return Err(Error::Unsupported(Feature::DataFileNotAttached));
        }
        Ok(())
    }

    /// Refuses, as QEMU does ("'data-file' is required for this image"),
    /// an image whose external data feature bit is set but which neither
    /// names its data file nor has one attached. Nothing then shows that
    /// the bit is genuine: a check would take the image's own data
    /// clusters for guest data in a data file, and a repair would free
    /// them.
    pub(crate) async fn require_data_file_known(&mut self) -> Result<(), Error<D::Error>> {
        if !self.header.has_data_file() || self.dev.data.is_some() {
            return Ok(());
        }
        let named = self
            .find_extension(crate::format::ExtensionKind::ExternalDataFile)
            .await?;
        match named {
            Some(_) => Ok(()),
            None => Err(Error::Unsupported(Feature::DataFileUnnamed)),
        }
    }

    /// Whether guest data lives in an external data file (attached or not):
    /// data clusters then sit at their guest offset, outside the refcounts.
    pub(crate) fn external_data(&self) -> bool {
        self.header.has_data_file()
    }
}

#[cfg(test)]
#[cfg(all(feature = "write", feature = "check"))]
mod tests {
    extern crate std;
    use super::*;
    use crate::format::entry::{COMPRESSED, COPIED, ZERO};
    use crate::format::header::ExternalFiles;
    use crate::{Corruption, CreateOptions, OpenOptions};
    use crate::{Qcow2, Slot};
    use core::cell::RefCell;
    use embassy_futures::block_on;
    use std::rc::Rc;
    use std::vec;
    use std::vec::Vec;

    /// What the devices did, in order: (device, first sector, is a flush).
    type Log = Rc<RefCell<Vec<(char, u64, bool)>>>;

    /// A growable RAM device that logs its writes and flushes.
    #[derive(Debug)]
    struct Dev {
        name: char,
        sectors: Vec<Sector>,
        log: Log,
        discards: usize,
    }

    impl Dev {
        fn new(name: char, log: &Log) -> Self {
            Dev {
                name,
                sectors: Vec::new(),
                log: log.clone(),
                discards: 0,
            }
        }
    }

    impl BlockDevice for Dev {
        type Error = ();
        async fn read(&mut self, first: u64, buf: &mut [Sector]) -> Result<(), ()> {
            let s = self.sectors.get(first as usize..first as usize + buf.len());
            buf.copy_from_slice(s.ok_or(())?);
            Ok(())
        }
        async fn write(&mut self, first: u64, buf: &[Sector]) -> Result<(), ()> {
            let s = self
                .sectors
                .get_mut(first as usize..first as usize + buf.len());
            s.ok_or(())?.copy_from_slice(buf);
            self.log.borrow_mut().push((self.name, first, false));
            Ok(())
        }
        async fn flush(&mut self) -> Result<(), ()> {
            self.log.borrow_mut().push((self.name, 0, true));
            Ok(())
        }
        fn sector_count(&self) -> u64 {
            self.sectors.len() as u64
        }
        async fn set_sector_count(&mut self, n: u64) -> Result<(), ()> {
            self.sectors.resize(n as usize, [0; SECTOR]);
            Ok(())
        }
        async fn discard(&mut self, first: u64, count: u64) -> Result<(), ()> {
            self.discards += 1;
            // Punched: reads zeros.
            let s = self
                .sectors
                .get_mut(first as usize..(first + count) as usize);
            s.ok_or(())?.fill([0; SECTOR]);
            Ok(())
        }
    }

    type Image = Qcow2<Dev, Vec<Slot<1>>, 1>;

    /// A 64 KiB image of 512-byte clusters with a data file.
    fn create(raw: bool, log: &Log) -> Image {
        let files = ExternalFiles {
            data_file: Some(b"d.raw"),
            data_file_raw: raw,
            ..ExternalFiles::NONE
        };
        let options = CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::new(64 << 10)
        };
        let cache = vec![Slot::<1>::EMPTY; 8];
        let meta = Dev::new('m', log);
        let create = Qcow2::create_with_files(meta, cache, options, &files);
        block_on(create).map_err(|e| e.error).unwrap()
    }

    fn with_data(mut image: Image, log: &Log) -> Image {
        let data = Dev::new('d', log);
        assert!(block_on(image.attach_data_file(data)).unwrap().is_none());
        image
    }

    fn check(image: &mut Image) -> crate::CheckReport {
        let mut scratch = [0u8; 4096];
        block_on(image.check(&mut scratch)).unwrap()
    }

    /// The raw L2 entry of guest cluster `guest`.
    fn l2_raw(image: &mut Image, guest: u64) -> u64 {
        let l2 = block_on(image.engine.l2_table(guest)).unwrap();
        block_on(image.engine.l2_entry_raw(l2, guest)).map_or(u64::MAX, |e| e.2)
    }

    #[test]
    fn guest_data_lives_at_its_guest_offset_in_the_data_file() {
        let log = Log::default();
        let mut image = create(false, &log);
        let mut buf = [[0u8; SECTOR]; 2];
        assert_eq!(
            block_on(image.read(0, &mut buf)),
            Err(Error::Unsupported(Feature::DataFileNotAttached))
        );
        assert!(matches!(
            block_on(image.write(0, &buf)),
            Err(Error::Unsupported(_))
        ));
        let mut image = with_data(image, &log);
        let data = [[0xa5u8; SECTOR], [0x5a; SECTOR]];
        block_on(image.write(0, &data)).unwrap();
        block_on(image.write(7, &data[..1])).unwrap();
        block_on(image.flush()).unwrap();
        block_on(image.read(0, &mut buf)).unwrap();
        assert_eq!(buf, data);
        let d = image.data_file().unwrap();
        assert_eq!(d.sectors[..2], data);
        assert_eq!(d.sectors[7], data[0]);
        assert_eq!(
            d.sectors.len(),
            8,
            "grown to the end of the cluster written"
        );
        let m = image.device().sectors.clone();
        assert!(!m.contains(&data[0]) && !m.contains(&data[1]));
        // Guest cluster 0 at data file offset 0: COPIED alone.
        assert_eq!(l2_raw(&mut image, 0), COPIED);
        assert_eq!(l2_raw(&mut image, 7), COPIED | 7 << 9);
        // Data reached the data file and was flushed before any L2 write.
        let log = log.borrow();
        let data_flush = log.iter().position(|e| *e == ('d', 0, true)).unwrap();
        let last_data_write = log.iter().rposition(|e| e.0 == 'd' && !e.2).unwrap();
        assert!(last_data_write < data_flush);
        let l2 = block_on(image.engine.l2_table(0)).unwrap() / SECTOR as u64;
        let l2_write = log.iter().rposition(|e| *e == ('m', l2, false)).unwrap();
        assert!(data_flush < l2_write, "{log:?}");
        drop(log);
        // As qemu-img check: allocated, not referenced in the image file.
        let r = check(&mut image);
        assert_eq!((r.corruptions, r.leaks), (0, 0));
        assert_eq!((r.allocated_clusters, r.fragmented_clusters), (3, 1));
        // Reopened: reads through the attached data file.
        let (meta, cache, file) = image.abandon_with_data_file();
        let image = block_on(Qcow2::open(meta, cache, OpenOptions::read_only()))
            .map_err(|e| e.error)
            .unwrap();
        let mut image: Image = image;
        assert!(block_on(image.attach_data_file(file.unwrap()))
            .unwrap()
            .is_none());
        block_on(image.read(0, &mut buf)).unwrap();
        assert_eq!(buf, data);
    }

    #[test]
    fn discard_and_zeroes_reach_the_data_file() {
        let log = Log::default();
        let mut image = with_data(create(false, &log), &log);
        let data = [[0x11u8; SECTOR]; 4];
        block_on(image.write(0, &data)).unwrap();
        block_on(image.discard(1, 1)).unwrap();
        assert_eq!(l2_raw(&mut image, 1), ZERO);
        assert_eq!(image.data_file().unwrap().discards, 1);
        block_on(image.write_zeroes(2, 1, false)).unwrap();
        assert_eq!(l2_raw(&mut image, 2), COPIED | ZERO | 2 << 9);
        // Not raw: the zero flag alone, the data file keeps its bytes.
        assert_eq!(image.data_file().unwrap().sectors[2], data[0]);
        block_on(image.write(2, &data[..1])).unwrap();
        assert_eq!(l2_raw(&mut image, 2), COPIED | 2 << 9);
        let r = check(&mut image);
        assert_eq!((r.corruptions, r.leaks, r.allocated_clusters), (0, 0, 3));
    }

    #[test]
    fn raw_data_file_stays_a_raw_image() {
        let log = Log::default();
        let mut image = with_data(create(true, &log), &log);
        assert!(image.data_file_raw());
        let r = check(&mut image);
        assert_eq!((r.corruptions, r.allocated_clusters), (0, 128));
        let data = [[0x22u8; SECTOR]; 4];
        block_on(image.write(0, &data)).unwrap();
        // Preallocated: written in place, nothing new mapped.
        assert_eq!(l2_raw(&mut image, 3), COPIED | 3 << 9);
        block_on(image.write_zeroes(1, 1, false)).unwrap();
        block_on(image.discard(2, 1)).unwrap();
        let d = image.data_file().unwrap();
        assert_eq!(d.sectors[1], [0; SECTOR]);
        assert_eq!(d.sectors[2], [0; SECTOR]);
        assert_eq!(d.sectors[3], data[0]);
        assert_eq!(d.discards, 0, "zeros written, not a discard hint");
        block_on(image.close()).unwrap();
    }

    #[test]
    fn data_file_images_refuse_what_qemu_refuses() {
        let log = Log::default();
        let mut image = with_data(create(false, &log), &log);
        block_on(image.write(0, &[[1u8; SECTOR]])).unwrap();
        // A compressed entry: corruption to read (QEMU signals corruption).
        let l2 = block_on(image.engine.l2_table(3)).unwrap();
        let at = l2 + 3 * 8;
        block_on(image.engine.cache.write_u64(
            &mut image.engine.dev,
            at,
            crate::cache::Kind::L2,
            COMPRESSED | 0x10000,
        ))
        .unwrap();
        let mut buf = [[0u8; SECTOR]; 1];
        assert!(matches!(
            block_on(image.read(3, &mut buf)),
            Err(Error::Corrupt { .. })
        ));
        let r = check(&mut image);
        assert_eq!((r.corruptions, r.allocated_clusters), (1, 1));
        // A data cluster elsewhere than its guest offset.
        let at = l2 + 4 * 8;
        block_on(image.engine.cache.write_u64(
            &mut image.engine.dev,
            at,
            crate::cache::Kind::L2,
            COPIED | 9 << 9,
        ))
        .unwrap();
        assert!(matches!(
            block_on(image.read(4, &mut buf)),
            Err(Error::Corrupt {
                what: Corruption::DataFileOffsetMismatch,
                ..
            })
        ));
        // COPIED missing: a corruption a repair fixes.
        block_on(image.engine.cache.write_u64(
            &mut image.engine.dev,
            at,
            crate::cache::Kind::L2,
            4 << 9,
        ))
        .unwrap();
        let r = check(&mut image);
        assert_eq!((r.corruptions, r.allocated_clusters), (2, 2));
        let mut scratch = [0u8; 4096];
        let r = block_on(image.repair(&mut scratch, crate::Repair::All)).unwrap();
        assert_eq!(r.corruptions_fixed, 2);
        let r = check(&mut image);
        assert_eq!((r.corruptions, r.leaks, r.allocated_clusters), (0, 0, 2));
        assert_eq!(l2_raw(&mut image, 4), COPIED | 4 << 9);
    }

    #[test]
    fn only_data_file_images_take_a_data_file() {
        let log = Log::default();
        let options = CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::new(64 << 10)
        };
        let cache = vec![Slot::<1>::EMPTY; 8];
        let mut image: Image = block_on(Qcow2::create(Dev::new('m', &log), cache, options))
            .map_err(|e| e.error)
            .unwrap();
        let refused = block_on(image.attach_data_file(Dev::new('d', &log)));
        assert!(matches!(refused, Err((Error::InvalidArgument(_), _))));
    }
}
