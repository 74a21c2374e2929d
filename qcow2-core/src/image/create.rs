//! Creating a new, empty image.

use core::future::Future;

use crate::cache::SlotStorage;
use crate::engine::geometry::ENTRY_BYTES;
use crate::engine::tables;
use crate::format::entry::COPIED;
use crate::format::header::{ExternalFiles, HeaderArea, V2_LENGTH, V3_LENGTH};
use crate::format::{
    compatible, incompatible, refcount, shr_ceil, Header, Version, MAX_CLUSTER_BITS, MAX_L1_BYTES,
    MAX_REFCOUNT_ORDER, MIN_CLUSTER_BITS,
};
use crate::image::Prepare;
use crate::{BlockDevice, Compression, Error, OpenError, OpenOptions, Qcow2, Sector, SECTOR};

/// Parameters of a new image, with `qemu-img create`'s defaults.
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; a multiple of 512.
    pub size: u64,
    /// log2 of the cluster size, 9..=21 (default 16: 64 KiB).
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits, 0..=6 (default 4: 16 bits).
    pub refcount_order: u32,
    /// Format version (default v3).
    pub version: Version,
    /// Set the lazy refcounts compatible bit (v3 only).
    pub lazy_refcounts: bool,
    /// The compression format of the image's compressed clusters (the
    /// header's `compression_type`; default zlib). Anything but zlib needs
    /// v3 and sets the compression-type incompatible bit, as QEMU does.
    pub compression: Compression,
}

impl CreateOptions {
    /// Defaults for a disk of `size` bytes: 64 KiB clusters, 16-bit
    /// refcounts, version 3, no lazy refcounts, zlib compression.
    pub const fn new(size: u64) -> Self {
        CreateOptions {
            size,
            cluster_bits: 16,
            refcount_order: 4,
            version: Version::V3,
            lazy_refcounts: false,
            compression: Compression::Zlib,
        }
    }

    /// Writes a new image's metadata to `dev` as [`Qcow2::create`] does,
    /// naming the backing file and external data file of `files` in its
    /// header (see [`ExternalFiles`]), without opening it: open it with
    /// [`Qcow2::open`] (an image with an external data file then needs
    /// [`Qcow2::attach_data_file`] before guest I/O). The header cluster is
    /// laid out as QEMU lays it out.
    ///
    /// With [`ExternalFiles::data_file_raw`], every guest cluster is mapped
    /// up front to the same offset of the data file (QEMU's metadata
    /// preallocation, which `data_file_raw` implies): the L2 tables for
    /// the whole disk are written.
    ///
    /// Errors: [`Error::InvalidArgument`] for options or names that do not
    /// go together, [`Error::NoSpace`] when the names do not fit in the
    /// first cluster or the device cannot grow.
    pub async fn format<D: BlockDevice>(
        &self,
        dev: &mut D,
        files: &ExternalFiles<'_>,
    ) -> Result<(), Error<D::Error>> {
        format(dev, self, files).await.map(|_| ())
    }

    fn validate<E>(&self) -> Result<(), Error<E>> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Error::InvalidArgument(
                "cluster size must be 512 B..=2 MiB, a power of two",
            ));
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(Error::InvalidArgument(
                "refcount width must be 1..=64 bits, a power of two",
            ));
        }
        if self.version == Version::V2 && self.refcount_order != 4 {
            return Err(Error::InvalidArgument(
                "compat 0.10 requires 16-bit refcounts",
            ));
        }
        if self.version == Version::V2 && self.lazy_refcounts {
            return Err(Error::InvalidArgument("lazy refcounts require compat 1.1"));
        }
        if self.version == Version::V2 && self.compression != Compression::Zlib {
            return Err(Error::InvalidArgument(
                "compression other than zlib requires compat 1.1",
            ));
        }
        if !self.size.is_multiple_of(SECTOR as u64) {
            return Err(Error::InvalidArgument(
                "size must be a multiple of 512 bytes",
            ));
        }
        Ok(())
    }
}

/// Where create puts each structure, in clusters.
struct Layout {
    reftable: u64,
    reftable_clusters: u64,
    refblocks: u64,
    refblock_count: u64,
    l1: u64,
    l1_entries: u64,
    /// First preallocated L2 table (one per L1 entry), if any.
    l2: u64,
    l2_tables: u64,
    total: u64,
}

impl Layout {
    /// Header, refcount table, refcount blocks, L1 table, in that order, with
    /// enough blocks to cover all of them; then an L2 table for each L1
    /// entry when the metadata is `preallocated`.
    fn plan<E>(o: &CreateOptions, preallocated: bool) -> Result<Self, Error<E>> {
        let cs = 1u64 << o.cluster_bits;
        // One L1 entry maps cs / 8 clusters of cs bytes.
        let l1_entries = shr_ceil(o.size, 2 * o.cluster_bits - 3);
        if l1_entries * ENTRY_BYTES > MAX_L1_BYTES || l1_entries > u64::from(u32::MAX) {
            return Err(Error::InvalidArgument(
                "size too large for this cluster size",
            ));
        }
        let l1_clusters = shr_ceil(l1_entries * ENTRY_BYTES, o.cluster_bits);
        let l2_tables = if preallocated { l1_entries } else { 0 };
        let per_block = refcount::entries_in(cs, o.refcount_order);
        // The refcount structures start after the header and must cover the
        // L1 table (and L2 tables) that follow them too.
        let (blocks, table) =
            refcount::self_covering_layout_before(per_block, cs, 0, 1, l1_clusters + l2_tables)
                .ok_or(Error::Internal("refcount layout does not settle"))?;
        let l1 = 1 + table + blocks;
        Ok(Layout {
            reftable: 1,
            reftable_clusters: table,
            refblocks: 1 + table,
            refblock_count: blocks,
            l1,
            l1_entries,
            l2: l1 + l1_clusters,
            l2_tables,
            total: l1 + l1_clusters + l2_tables,
        })
    }
}

impl<D, S, const K: usize> Qcow2<D, S, K>
where
    D: BlockDevice,
    S: SlotStorage<K>,
{
    /// Formats `dev` as a new empty image and opens it read-write.
    ///
    /// A device that grows (a file) is grown to the metadata's size; a fixed
    /// one must be large enough, and its first clusters are overwritten. On
    /// failure the device and cache come back in the [`OpenError`].
    /// Cancelled, it leaves a device that may not open as an image.
    pub fn create(
        dev: D,
        cache: S,
        options: CreateOptions,
    ) -> impl Future<Output = Result<Self, OpenError<D, S>>> + use<D, S, K> {
        Self::create_with_files(dev, cache, options, &ExternalFiles::NONE)
    }

    /// Formats `dev` like [`Qcow2::create`], naming the backing file and
    /// data file of `files` in the header as QEMU writes them (see
    /// [`CreateOptions::format`]), and opens it read-write. An overlay
    /// opens without its backing attached (attach it with
    /// [`Qcow2::with_backing`] before guest I/O), and an image with a data
    /// file without it (attach it with [`Qcow2::attach_data_file`]).
    pub fn create_with_files<'a>(
        dev: D,
        cache: S,
        options: CreateOptions,
        files: &'a ExternalFiles<'a>,
    ) -> impl Future<Output = Result<Self, OpenError<D, S>>> + use<'a, D, S, K> {
        // The open formats the device first, in the same future: the device
        // is held once, and format's frame is on the stack only while it
        // runs. A fresh image is clean and not verified, so the open never
        // rebuilds or checks it: no rebuild scratch.
        Self::open_from(
            dev,
            cache,
            OpenOptions::read_write(),
            [0u8; 0],
            Format { options, files },
        )
    }
}

/// Create's [`Prepare`]: formats the device with `options`, naming
/// `files`; allocation then starts right after the metadata (on a fixed
/// device larger than that, data follows it).
struct Format<'a> {
    options: CreateOptions,
    files: &'a ExternalFiles<'a>,
}

impl<D: BlockDevice> Prepare<D> for Format<'_> {
    async fn prepare(self, dev: &mut D) -> Result<u64, Error<D::Error>> {
        format(dev, &self.options, self.files).await
    }
}

/// The header of a new image with `options` laid out as `layout`.
fn new_header(options: &CreateOptions, layout: &Layout) -> Header {
    let cs = 1u64 << options.cluster_bits;
    let v3 = options.version == Version::V3;
    Header {
        version: options.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: options.cluster_bits,
        size: options.size,
        crypt_method: 0,
        l1_size: layout.l1_entries as u32,
        l1_table_offset: layout.l1 * cs,
        refcount_table_offset: layout.reftable * cs,
        refcount_table_clusters: layout.reftable_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: match options.compression {
            Compression::Zlib => 0,
            _ => incompatible::COMPRESSION_TYPE,
        },
        compatible_features: if options.lazy_refcounts {
            compatible::LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: options.refcount_order,
        header_length: if v3 { V3_LENGTH } else { V2_LENGTH },
        compression_type: options.compression.type_byte(),
    }
}

/// Writes an empty image's metadata to `dev`, naming `files`; returns its
/// size in clusters.
async fn format<D: BlockDevice>(
    dev: &mut D,
    options: &CreateOptions,
    files: &ExternalFiles<'_>,
) -> Result<u64, Error<D::Error>> {
    options.validate()?;
    files.validate(options.version)?;
    let layout = Layout::plan(options, files.data_file_raw)?;
    let cs = 1u64 << options.cluster_bits;
    let cluster_sectors = cs / SECTOR as u64;
    let total_sectors = layout.total * cluster_sectors;

    // Old contents of the metadata area must read as zeros.
    let old = dev.sector_count();
    if old < total_sectors {
        dev.set_sector_count(total_sectors)
            .await
            .map_err(|_| Error::NoSpace)?;
    }
    dev.write_zeros(0, old.min(total_sectors))
        .await
        .map_err(Error::Io)?;

    let header = new_header(options, &layout);
    // The header, its extensions and the backing file name, as QEMU
    // writes them, a sector at a time.
    let area = HeaderArea::new(&header, files)?;
    let mut sector: Sector = [0; SECTOR];
    for i in 0..area.end().div_ceil(SECTOR as u64) {
        area.fill(i * SECTOR as u64, &mut sector);
        dev.write(i, core::slice::from_ref(&sector))
            .await
            .map_err(Error::Io)?;
    }

    // Refcount table entries, then refcount 1 for every cluster the
    // metadata occupies (the blocks are contiguous).
    let refblocks = layout.refblocks;
    tables::write_entries(
        dev,
        &mut sector,
        layout.reftable * cluster_sectors,
        layout.refblock_count,
        |j| (refblocks + j) * cs,
    )
    .await?;
    tables::write_ones(
        dev,
        &mut sector,
        layout.refblocks * cluster_sectors,
        options.refcount_order,
        0,
        layout.total,
    )
    .await?;
    if layout.l2_tables > 0 {
        preallocate(dev, &layout, options).await?;
    }
    dev.flush().await.map_err(Error::Io)?;
    Ok(layout.total)
}

/// Writes the L1 entries of the preallocated L2 tables and the tables,
/// which map every guest cluster to the same offset of the data file.
async fn preallocate<D: BlockDevice>(
    dev: &mut D,
    layout: &Layout,
    options: &CreateOptions,
) -> Result<(), Error<D::Error>> {
    let cs = 1u64 << options.cluster_bits;
    let cluster_sectors = cs / SECTOR as u64;
    let guest_clusters = shr_ceil(options.size, options.cluster_bits);
    let mut sector: Sector = [0; SECTOR];
    let l2 = layout.l2;
    let l1 = layout.l1 * cluster_sectors;
    tables::write_entries(dev, &mut sector, l1, layout.l2_tables, |j| {
        COPIED | ((l2 + j) * cs)
    })
    .await?;
    let l2_entries = cs / 8;
    for j in 0..layout.l2_tables {
        let first = j * l2_entries;
        let count = guest_clusters.saturating_sub(first).min(l2_entries);
        let table = (l2 + j) * cluster_sectors;
        tables::write_entries(dev, &mut sector, table, count, |i| {
            COPIED | ((first + i) * cs)
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ram;
    use crate::Slot;
    use embassy_futures::block_on;

    fn small(compression: Compression, version: Version) -> CreateOptions {
        CreateOptions {
            cluster_bits: 9,
            version,
            compression,
            ..CreateOptions::new(64 << 10)
        }
    }

    #[test]
    fn zstd_sets_the_type_and_its_incompatible_bit() {
        let mut cache = [const { Slot::<1>::EMPTY }; 8];
        let options = small(Compression::Zstd, Version::V3);
        let image = block_on(Qcow2::create(ram(), &mut cache, options)).unwrap();
        assert_eq!(image.info().compression_type, 1);
        let dev = block_on(image.close()).unwrap().0;
        let header = &dev.data[0];
        // Incompatible features end at byte 79; compression_type is byte 104.
        assert_eq!(header[79], incompatible::COMPRESSION_TYPE as u8);
        assert_eq!(header[104], 1);
        // QEMU's v3 header length: 112 bytes, with the compression type.
        assert_eq!(&header[100..104], &112u32.to_be_bytes());

        let zlib = block_on(Qcow2::create(
            ram(),
            &mut cache,
            small(Compression::Zlib, Version::V3),
        ));
        let dev = block_on(zlib.unwrap().close()).unwrap().0;
        assert_eq!((dev.data[0][79], dev.data[0][104]), (0, 0));
    }

    #[test]
    fn zstd_needs_v3() {
        let mut cache = [const { Slot::<1>::EMPTY }; 8];
        let options = small(Compression::Zstd, Version::V2);
        let err = block_on(Qcow2::create(ram(), &mut cache, options)).err();
        assert!(matches!(
            err.map(|e| e.error),
            Some(Error::InvalidArgument(m)) if m.contains("zlib")
        ));
    }
}
