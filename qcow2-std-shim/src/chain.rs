//! Opening an image with its backing chain from files.
//!
//! An image names its backing file (and usually the backing's format) in
//! its header. The name is resolved relative to the directory of the image
//! naming it, as QEMU does; the format comes from the backing format
//! extension, or, when absent, from probing the file (qcow2 magic, else
//! raw). Backings are opened read-only, the chain's depth is bounded and a
//! chain that comes back to a file it already holds is refused.
//!
//! Which files an image may make the library open is the caller's
//! decision ([`ChainOptions::allow`]): an image from an untrusted source
//! must not make the host open arbitrary paths. [`ChainOptions::trusting`]
//! opens whatever the chain names, as `qemu-img` does.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use qcow2_core::{Error, OpenOptions};

use crate::{FileDevice, HostBacking, Image};

/// The deepest chain [`ChainOptions::trusting`] opens (the image itself
/// not counted).
pub const DEFAULT_MAX_DEPTH: usize = 64;

/// How [`open_chain`] opens an image's backing files.
pub struct ChainOptions<'a> {
    /// Whether the backing file at this path (resolved, not canonical) may
    /// be opened; asked before each backing file is touched.
    pub allow: &'a dyn Fn(&Path) -> bool,
    /// Opens a file, writable or not (backings are never writable): the
    /// place for locking.
    pub open_file: &'a dyn Fn(&Path, bool) -> io::Result<FileDevice>,
    /// Backing files beyond this depth are refused.
    pub max_depth: usize,
}

fn allow_any(_: &Path) -> bool {
    true
}

fn open_plain(path: &Path, writable: bool) -> io::Result<FileDevice> {
    FileDevice::open(path, writable)
}

impl ChainOptions<'static> {
    /// Opens every backing file the chain names, without locking, up to
    /// [`DEFAULT_MAX_DEPTH`]: for images whose origin is trusted.
    pub fn trusting() -> Self {
        ChainOptions {
            allow: &allow_any,
            open_file: &open_plain,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Why [`open_chain`] failed.
#[derive(Debug)]
pub enum ChainError {
    /// A file could not be opened.
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// An image in the chain could not be opened or read.
    Image {
        /// The image.
        path: PathBuf,
        /// Why.
        error: Error<io::Error>,
    },
    /// [`ChainOptions::allow`] refused a backing file.
    Refused {
        /// The backing file.
        path: PathBuf,
    },
    /// The chain comes back to a file it already holds.
    Loop {
        /// The backing file that closes the loop.
        path: PathBuf,
    },
    /// The chain is deeper than [`ChainOptions::max_depth`].
    TooDeep {
        /// The first backing file beyond the limit.
        path: PathBuf,
        /// The limit.
        max_depth: usize,
    },
    /// The backing format is not one this library reads.
    UnknownFormat {
        /// The backing file.
        path: PathBuf,
        /// The format the image names.
        format: String,
    },
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainError::Open { path, error } => {
                write!(f, "Could not open '{}': {error}", path.display())
            }
            ChainError::Image { path, error } => write!(f, "'{}': {error}", path.display()),
            ChainError::Refused { path } => {
                write!(f, "backing file '{}' is not allowed", path.display())
            }
            ChainError::Loop { path } => write!(
                f,
                "Backing file '{}' creates an infinite loop.",
                path.display()
            ),
            ChainError::TooDeep { path, max_depth } => write!(
                f,
                "backing file '{}' is deeper than {max_depth} levels",
                path.display()
            ),
            ChainError::UnknownFormat { path, format } => write!(
                f,
                "backing file '{}': unknown format '{format}'",
                path.display()
            ),
        }
    }
}

impl std::error::Error for ChainError {}

/// Where backing file `name`, named by the image at `image`, is: an
/// absolute name as it is, a relative one in the image's directory.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_path_buf(),
    }
}

/// The backing file name and format an open image names, as UTF-8 (lossy).
pub fn backing_of(
    image: &mut Image<FileDevice>,
) -> Result<Option<(String, Option<String>)>, Error<io::Error>> {
    let mut buf = vec![0u8; 1024];
    let inner = image.inner_mut();
    let Some(len) = crate::block_on(inner.backing_file_name(&mut buf))? else {
        return Ok(None);
    };
    let name = String::from_utf8_lossy(&buf[..len]).into_owned();
    let format = crate::block_on(inner.backing_format(&mut buf))?
        .map(|len| String::from_utf8_lossy(&buf[..len]).into_owned());
    Ok(Some((name, format)))
}

/// Whether the file starts with the qcow2 magic.
fn probe_qcow2(dev: &FileDevice) -> bool {
    let mut magic = [0u8; 4];
    use std::os::unix::fs::FileExt;
    dev.file().read_exact_at(&mut magic, 0).is_ok() && magic == qcow2_core::format::MAGIC
}

/// Opens the image at `path` with `options` and attaches its backing
/// chain as `chain` allows. With [`OpenOptions::no_backing`] the chain is
/// not opened.
pub fn open_chain(
    path: &Path,
    options: &OpenOptions,
    chain: &ChainOptions<'_>,
) -> Result<Image<FileDevice>, ChainError> {
    let dev = (chain.open_file)(path, !options.read_only).map_err(|error| ChainError::Open {
        path: path.to_path_buf(),
        error,
    })?;
    let image = Image::open(dev, options).map_err(|error| ChainError::Image {
        path: path.to_path_buf(),
        error,
    })?;
    if options.no_backing {
        return Ok(image);
    }
    attach_chain(image, path, chain)
}

/// Attaches the backing chain `image` (opened from `path`) names, as
/// `chain` allows: for callers that open the image file themselves.
pub fn attach_chain(
    image: Image<FileDevice>,
    path: &Path,
    chain: &ChainOptions<'_>,
) -> Result<Image<FileDevice>, ChainError> {
    let mut seen = Vec::new();
    if let Ok(canonical) = path.canonicalize() {
        seen.push(canonical);
    }
    attach_backing(image, path, chain, 1, &mut seen)
}

/// Attaches the backing `image` (at `path`, at depth `depth - 1`) names.
fn attach_backing(
    mut image: Image<FileDevice>,
    path: &Path,
    chain: &ChainOptions<'_>,
    depth: usize,
    seen: &mut Vec<PathBuf>,
) -> Result<Image<FileDevice>, ChainError> {
    let image_error = |error| ChainError::Image {
        path: path.to_path_buf(),
        error,
    };
    let Some((name, format)) = backing_of(&mut image).map_err(image_error)? else {
        return Ok(image);
    };
    let backing_path = resolve_backing(path, &name);
    if depth > chain.max_depth {
        return Err(ChainError::TooDeep {
            path: backing_path,
            max_depth: chain.max_depth,
        });
    }
    if !(chain.allow)(&backing_path) {
        return Err(ChainError::Refused { path: backing_path });
    }
    let open_error = |error| ChainError::Open {
        path: backing_path.clone(),
        error,
    };
    let canonical = backing_path.canonicalize().map_err(open_error)?;
    if seen.contains(&canonical) {
        return Err(ChainError::Loop { path: backing_path });
    }
    seen.push(canonical);
    let dev = (chain.open_file)(&backing_path, false).map_err(open_error)?;
    let qcow2 = match format.as_deref() {
        Some("qcow2") => true,
        Some("raw") => false,
        None => probe_qcow2(&dev),
        Some(other) => {
            return Err(ChainError::UnknownFormat {
                path: backing_path,
                format: other.to_string(),
            })
        }
    };
    let backing = if qcow2 {
        let mut backing_image =
            Image::open(dev, &OpenOptions::read_only()).map_err(|error| ChainError::Image {
                path: backing_path.clone(),
                error,
            })?;
        // A backing with an external data file reads through it.
        let data = crate::data_file::DataFileOptions {
            allow: chain.allow,
            open_file: chain.open_file,
            ..crate::data_file::DataFileOptions::trusting()
        };
        crate::data_file::attach_data_file(&mut backing_image, &backing_path, &data).map_err(
            |e| ChainError::Open {
                path: backing_path.clone(),
                error: io::Error::other(e.to_string()),
            },
        )?;
        attach_backing(backing_image, &backing_path, chain, depth + 1, seen)?.into_backing()
    } else {
        HostBacking::Raw(dev)
    };
    Ok(image.with_backing(backing))
}
