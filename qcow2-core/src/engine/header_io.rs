//! Header I/O: reading the first cluster's extensions and rewriting the
//! header in place (one sector write, extensions untouched).

use crate::format::{Extension, ExtensionKind, Header};
use crate::{BlockDevice, Corruption, Error, Feature, Sector, SECTOR};

/// Upper bound on extensions walked, so a hostile header cannot loop long.
const MAX_EXTENSIONS: usize = 1024;
/// Length of the bitmaps extension's data (QEMU accepts no other).
const BITMAPS_EXTENSION_LEN: u32 = 24;
/// QEMU keeps the backing format name in 16 bytes with its terminator.
const MAX_BACKING_FORMAT: u32 = crate::format::header::MAX_BACKING_FORMAT;

/// Reads the 8 bytes at byte `at` (8-aligned) using `scratch`, which holds
/// sector `*loaded` (if any) and is only re-read for another sector.
async fn read8<D: BlockDevice>(
    dev: &mut D,
    scratch: &mut Sector,
    loaded: &mut Option<u64>,
    at: u64,
) -> Result<[u8; 8], Error<D::Error>> {
    let sector = at / SECTOR as u64;
    if sector >= dev.sector_count() {
        return Err(Error::corrupt(Corruption::ExtensionBeyondImage, at));
    }
    if *loaded != Some(sector) {
        dev.read(sector, core::slice::from_mut(scratch))
            .await
            .map_err(Error::Io)?;
        *loaded = Some(sector);
    }
    let i = (at % SECTOR as u64) as usize;
    let mut out = [0u8; 8];
    out.copy_from_slice(
        scratch
            .get(i..i + 8)
            .ok_or(Error::corrupt(Corruption::ExtensionMisaligned, at))?,
    );
    Ok(out)
}

/// A walk over the extension area, one extension at a time, reading a
/// sector at a time through the caller's scratch sector.
pub(crate) struct ExtensionWalk {
    /// Byte offset of the next extension header.
    at: u64,
    /// The sector `scratch` holds, if any.
    loaded: Option<u64>,
    /// Extensions returned so far.
    steps: usize,
}

impl ExtensionWalk {
    /// A walk from `header`'s first extension. `loaded` names the sector
    /// the scratch sector already holds (`Some(0)` right after the header
    /// read), if any.
    pub(crate) const fn new(header: &Header, loaded: Option<u64>) -> Self {
        ExtensionWalk {
            at: header.extensions_offset(),
            loaded,
            steps: 0,
        }
    }

    /// The next extension, bounds-checked against the first cluster;
    /// `None` at the end marker or at the end of the cluster without one
    /// (tolerated, as QEMU does).
    pub(crate) async fn next<D: BlockDevice>(
        &mut self,
        dev: &mut D,
        scratch: &mut Sector,
        header: &Header,
    ) -> Result<Option<Extension>, Error<D::Error>> {
        let cluster = header.cluster_size();
        if self.at + 8 > cluster {
            return Ok(None);
        }
        if self.steps >= MAX_EXTENSIONS {
            return Err(Error::corrupt(Corruption::TooManyExtensions, self.at));
        }
        let raw = read8(dev, scratch, &mut self.loaded, self.at).await?;
        let ext = Extension::decode(raw, self.at, cluster)?;
        if ext.kind == ExtensionKind::End {
            return Ok(None);
        }
        self.steps += 1;
        self.at = ext.next();
        Ok(Some(ext))
    }
}

/// Walks the extension area, checking bounds and refusing extensions of
/// unsupported features. Unknown extensions are left as they are.
///
/// Returns the bitmaps extension, if any, for `check` to account for the
/// clusters it owns.
///
/// `scratch` must hold sector 0 (as it does right after the header read).
pub(crate) async fn check_extensions<D: BlockDevice>(
    dev: &mut D,
    scratch: &mut Sector,
    header: &Header,
) -> Result<Option<Extension>, Error<D::Error>> {
    let mut walk = ExtensionWalk::new(header, Some(0));
    let mut bitmaps = None;
    while let Some(ext) = walk.next(dev, scratch, header).await? {
        let at = ext.offset - 8;
        match ext.kind {
            // QEMU refuses both at open, whatever the feature bits say.
            ExtensionKind::Bitmaps if ext.len != BITMAPS_EXTENSION_LEN => {
                return Err(Error::corrupt(Corruption::BitmapsExtensionLength, at))
            }
            ExtensionKind::BackingFormat if ext.len > MAX_BACKING_FORMAT => {
                return Err(Error::corrupt(Corruption::BackingFormatTooLong, at))
            }
            ExtensionKind::Bitmaps => bitmaps = Some(ext),
            ExtensionKind::FullDiskEncryption => {
                return Err(Error::Unsupported(Feature::Encryption))
            }
            // The data file name means something only with the
            // incompatible bit, which the header check handles (QEMU
            // ignores the extension without it).
            _ => {}
        }
    }
    Ok(bitmaps)
}

/// The last extension of `kind` (QEMU keeps the last of duplicates), if
/// any. Reads through `scratch`, which need not hold anything.
pub(crate) async fn find_extension<D: BlockDevice>(
    dev: &mut D,
    scratch: &mut Sector,
    header: &Header,
    kind: ExtensionKind,
) -> Result<Option<Extension>, Error<D::Error>> {
    let mut walk = ExtensionWalk::new(header, None);
    let mut found = None;
    while let Some(ext) = walk.next(dev, scratch, header).await? {
        if ext.kind == kind {
            found = Some(ext);
        }
    }
    Ok(found)
}

/// Rewrites the header fields in sector 0, keeping every other byte.
pub(crate) async fn write_header<D: BlockDevice>(
    dev: &mut D,
    scratch: &mut Sector,
    header: &Header,
) -> Result<(), Error<D::Error>> {
    dev.read(0, core::slice::from_mut(scratch))
        .await
        .map_err(Error::Io)?;
    header
        .encode(scratch)
        .ok_or(Error::Internal("header does not fit its sector"))?;
    dev.write(0, core::slice::from_ref(scratch))
        .await
        .map_err(Error::Io)
}

/// Reads `out.len()` bytes at byte `at`, a sector at a time through `scratch`.
pub(crate) async fn read_bytes<D: BlockDevice>(
    dev: &mut D,
    scratch: &mut Sector,
    at: u64,
    out: &mut [u8],
) -> Result<(), Error<D::Error>> {
    let mut done = 0;
    while done < out.len() {
        let pos = at + done as u64;
        let sector = pos / SECTOR as u64;
        if sector >= dev.sector_count() {
            return Err(Error::corrupt(Corruption::StructureBeyondImage, pos));
        }
        dev.read(sector, core::slice::from_mut(scratch))
            .await
            .map_err(Error::Io)?;
        let skip = (pos % SECTOR as u64) as usize;
        let n = (SECTOR - skip).min(out.len() - done);
        let src = scratch
            .get(skip..skip + n)
            .ok_or(Error::Internal("header_io::read_bytes range"))?;
        out.get_mut(done..done + n)
            .ok_or(Error::Internal("header_io::read_bytes range"))?
            .copy_from_slice(src);
        done += n;
    }
    Ok(())
}
