//! Which files an image may make the library open, and how they are
//! opened: the policy shared by backing chains ([`crate::chain`]) and
//! external data files ([`crate::data_file`]).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::FileDevice;

/// Where a file named in the header of the image at `image` is (a backing
/// file, an external data file): an absolute name as it is, a relative one
/// in the image's directory.
pub(crate) fn resolve_named(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(name),
        None => name.to_path_buf(),
    }
}

/// Which files an image's header may make the library open (backing
/// files, external data files), and how each is opened. An image from an
/// untrusted source must not make the host open arbitrary paths: `allow`
/// is where the caller says no.
#[derive(Clone, Copy)]
pub struct FilePolicy<'a> {
    /// Whether the file at this path (resolved, not canonical) may be
    /// opened; asked before the file is touched. Not asked for a file the
    /// caller named itself (such as
    /// [`DataFileOptions::data_file`](crate::data_file::DataFileOptions::data_file)).
    pub allow: &'a dyn Fn(&Path) -> bool,
    /// Opens a file, writable or not (backing files are never writable):
    /// the place for locking and direct I/O.
    pub open_file: &'a dyn Fn(&Path, bool) -> io::Result<FileDevice>,
}

fn allow_any(_: &Path) -> bool {
    true
}

fn open_plain(path: &Path, writable: bool) -> io::Result<FileDevice> {
    FileDevice::open(path, writable)
}

impl FilePolicy<'static> {
    /// Opens every file the image names, without locking
    /// ([`FileDevice::open`]): for images whose origin is trusted.
    pub fn trusting() -> Self {
        FilePolicy {
            allow: &allow_any,
            open_file: &open_plain,
        }
    }
}

impl fmt::Debug for FilePolicy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FilePolicy").finish_non_exhaustive()
    }
}
