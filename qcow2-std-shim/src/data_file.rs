//! Opening an image's external data file from files.
//!
//! An image with the external data file feature keeps its guest data in a
//! second file, named in its header (see [`qcow2_core::Qcow2::attach_data_file`]).
//! [`attach_data_file`] finds that file, asks the caller whether it may be
//! opened ([`FilePolicy::allow`] in [`DataFileOptions::policy`]: an image
//! from an untrusted source must not make the host open arbitrary paths),
//! opens it read-only or
//! writable as the image, and attaches it. Like a backing file, the data
//! file must be a regular file or a block device whose size can be found
//! ([`crate::chain::open_checked`]).
//!
//! A relative name is resolved against the image's directory, as backing
//! file names are. QEMU 10 differs
//! here: it opens a relative data file name relative to its working
//! directory (`bdrv_open_child` with the bare name), so the two agree when
//! run from the image's directory or with absolute names;
//! [`DataFileOptions::relative_to_cwd`] gives QEMU's behaviour.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use qcow2_core::Error;

use crate::chain::{open_checked, OpenCheckedError, UnusableFile};
use crate::{FileDevice, FilePolicy, Image};

/// How [`attach_data_file`] opens an image's data file.
#[derive(Debug, Clone, Copy)]
pub struct DataFileOptions<'a> {
    /// Whether the data file the image names may be opened (asked before
    /// the file is touched; not asked for [`DataFileOptions::data_file`],
    /// which the caller chose), and how it is opened.
    pub policy: FilePolicy<'a>,
    /// The data file to use instead of the name in the header (QEMU's
    /// `data-file` option); required for an image that names none.
    pub data_file: Option<&'a Path>,
    /// Resolve a relative name against the working directory, as QEMU 10
    /// does, rather than the image's directory.
    pub relative_to_cwd: bool,
    /// Open the data file writable (`Some(true)`) or read-only
    /// (`Some(false)`) whatever the image was opened as; `None` (the
    /// default): as the image. A caller that only checks that the file
    /// opens as a writable open of the image would open it needs this.
    pub writable: Option<bool>,
}

impl DataFileOptions<'static> {
    /// Opens the data file the image names, without locking
    /// ([`FilePolicy::trusting`]), relative to the image's directory: for
    /// images whose origin is trusted.
    pub fn trusting() -> Self {
        DataFileOptions {
            policy: FilePolicy::trusting(),
            data_file: None,
            relative_to_cwd: false,
            writable: None,
        }
    }
}

/// Why [`attach_data_file`] failed.
#[derive(Debug)]
pub enum DataFileError {
    /// The image has an external data file but names none, and no
    /// [`DataFileOptions::data_file`] was given.
    Required,
    /// A [`DataFileOptions::data_file`] was given for an image without an
    /// external data file.
    NotExternal,
    /// [`FilePolicy::allow`] refused the data file.
    Refused {
        /// The data file.
        path: PathBuf,
    },
    /// The data file is not a regular file or block device, or its size
    /// cannot be found (see [`crate::chain::open_checked`]).
    Unusable {
        /// The data file.
        path: PathBuf,
        /// Why.
        why: UnusableFile,
    },
    /// The data file could not be opened.
    Open {
        /// The data file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The image could not be read (its data file name), or refused the
    /// device.
    Image {
        /// Why.
        error: Error<io::Error>,
    },
}

impl fmt::Display for DataFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // QEMU's words for both.
            DataFileError::Required => f.write_str("'data-file' is required for this image"),
            DataFileError::NotExternal => {
                f.write_str("'data-file' can only be set for images with an external data file")
            }
            DataFileError::Refused { path } => {
                write!(f, "data file '{}' is not allowed", path.display())
            }
            DataFileError::Unusable { path, why } => f.write_str(&why.message(path)),
            DataFileError::Open { path, error } => {
                write!(f, "Could not open '{}': {error}", path.display())
            }
            DataFileError::Image { error } => write!(f, "{error}"),
        }
    }
}

impl std::error::Error for DataFileError {}

/// Where data file `name`, named by the image at `image`, is: an absolute
/// name as it is, a relative one in the image's directory.
pub fn resolve_data_file(image: &Path, name: &str) -> PathBuf {
    crate::policy::resolve_named(image, name)
}

/// The data file name an open image's header holds (the extension, shown
/// by `qemu-img info` even without the feature bit), as UTF-8 (lossy).
pub fn data_file_name(image: &mut Image<FileDevice>) -> Result<Option<String>, Error<io::Error>> {
    let mut buf = vec![0u8; image.info().cluster_size as usize];
    let Some(len) = crate::block_on(image.inner_mut().data_file_name(&mut buf))? else {
        return Ok(None);
    };
    Ok(Some(String::from_utf8_lossy(&buf[..len]).into_owned()))
}

/// Opens and attaches the external data file of `image` (opened from
/// `path`) as `options` allow, read-only or writable as the image was
/// opened (or as [`DataFileOptions::writable`] says). Returns the data
/// file's path, or `None` for an image without an external data file
/// (nothing to do).
pub fn attach_data_file(
    image: &mut Image<FileDevice>,
    path: &Path,
    options: &DataFileOptions<'_>,
) -> Result<Option<PathBuf>, DataFileError> {
    let external = image.inner_mut().has_data_file();
    let data_path = match (external, options.data_file) {
        (false, None) => return Ok(None),
        (false, Some(_)) => return Err(DataFileError::NotExternal),
        (true, Some(given)) => given.to_path_buf(),
        (true, None) => {
            let name = data_file_name(image).map_err(|error| DataFileError::Image { error })?;
            let name = name.ok_or(DataFileError::Required)?;
            let resolved = if options.relative_to_cwd {
                PathBuf::from(&name)
            } else {
                resolve_data_file(path, &name)
            };
            if !(options.policy.allow)(&resolved) {
                return Err(DataFileError::Refused { path: resolved });
            }
            resolved
        }
    };
    let writable = options.writable.unwrap_or(!image.info().read_only);
    let dev =
        open_checked(&data_path, writable, options.policy.open_file).map_err(|e| match e {
            OpenCheckedError::Open(error) => DataFileError::Open {
                path: data_path.clone(),
                error,
            },
            OpenCheckedError::Unusable(why) => DataFileError::Unusable {
                path: data_path.clone(),
                why,
            },
        })?;
    crate::block_on(image.inner_mut().attach_data_file(dev))
        .map_err(|(error, _)| DataFileError::Image { error })?;
    Ok(Some(data_path))
}
