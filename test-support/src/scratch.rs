//! Scratch directories for tests, removed with their contents when dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Set this environment variable (to anything) to keep every scratch
/// directory for a look after the test.
pub const KEEP_VARIABLE: &str = "QCOW2_TEST_KEEP";

/// A fresh, empty directory under the system temp dir, removed with its
/// contents when dropped (unless [`KEEP_VARIABLE`] is set).
///
/// Tests run in parallel threads and several test binaries at once: the
/// name holds the process id and a per-process counter, so no two
/// scratch directories collide.
#[derive(Debug)]
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// A new, empty directory named after `name`.
    pub fn new(name: &str) -> Self {
        Scratch::new_in(&std::env::temp_dir(), name)
    }

    /// A new, empty directory named after `name` inside `parent` rather
    /// than the system temp dir: for tests that need a particular file
    /// system (direct I/O, which tmpfs refuses, wants a disk's: a test
    /// binary's `CARGO_TARGET_TMPDIR` is usually on one).
    pub fn new_in(parent: &Path, name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!("qcow2-test-{}-{n}-{name}", std::process::id()));
        // A directory left by an earlier process with the same id.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch directory");
        Scratch { dir }
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `name` inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.dir.join(name)
    }

    /// `name` inside the directory, as a string for command lines.
    pub fn path(&self, name: &str) -> String {
        path_str(&self.join(name)).to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_VARIABLE).is_some() {
            eprintln!("keeping {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A path as a string for a command line; panics if it is not UTF-8
/// (scratch paths always are).
pub fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}
