//! Models of the guest disk: what a test expects an image to read as.

use crate::Scratch;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The expected guest contents as a list of writes applied in order over
/// zeros; cheap for huge sparse disks.
#[derive(Debug, Default)]
pub struct SparseModel {
    writes: Vec<(u64, Vec<u8>)>,
}

impl SparseModel {
    /// Records `data` written at guest byte `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }

    /// Fills `buf` with the guest bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for (at, data) in &self.writes {
            let (from, to) = ((*at).max(offset), (at + data.len() as u64).min(end));
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
            }
        }
    }
}

/// A flat model of the guest disk as a (sparse) raw file on the host, for
/// `qemu-img compare` against the image (see [`RawModel::assert_matches`]).
#[derive(Debug)]
pub struct RawModel {
    path: PathBuf,
    file: File,
}

impl RawModel {
    /// A new model of a `size`-byte disk of zeros at `path`.
    pub fn create(path: &Path, size: u64) -> Self {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .expect("create raw model");
        file.set_len(size).expect("size raw model");
        RawModel {
            path: path.to_path_buf(),
            file,
        }
    }

    /// An existing raw file (say from `qemu-img convert`) as the model.
    pub fn open(path: &Path) -> Self {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open raw model");
        RawModel {
            path: path.to_path_buf(),
            file,
        }
    }

    /// The raw file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `data` written at guest byte `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) {
        self.file
            .write_all_at(data, offset)
            .expect("write raw model");
    }

    /// Fills `buf` with the guest bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) {
        read_file_at(&self.file, offset, buf);
    }

    /// Asserts that `qemu-img compare` finds the qcow2 image at `qcow2`
    /// identical to the model.
    pub fn assert_matches(&self, qcow2: &Path) {
        crate::qemu::compare_identical(&self.path, qcow2);
    }
}

/// Reads `buf.len()` bytes of `file` at `offset`; panics if the file is
/// shorter.
pub fn read_file_at(file: &File, offset: u64, buf: &mut [u8]) {
    file.read_exact_at(buf, offset).expect("read raw file");
}

/// Asserts that `ours` equals `expected` (guest bytes at `offset`); the
/// panic names the first differing byte and how far the difference
/// reaches.
pub fn assert_same_bytes(what: &str, offset: u64, ours: &[u8], expected: &[u8]) {
    assert_eq!(ours.len(), expected.len(), "{what}: lengths differ");
    if let Some(i) = ours.iter().zip(expected).position(|(a, b)| a != b) {
        let j = ours[i..]
            .iter()
            .zip(&expected[i..])
            .rposition(|(a, b)| a != b)
            .map_or(i, |k| i + k);
        panic!(
            "{what}: mismatch at guest offset {:#x} (first of a differing span up to {:#x}): \
             ours {:#04x}, expected {:#04x}",
            offset + i as u64,
            offset + j as u64,
            ours[i],
            expected[i]
        );
    }
}

/// Writes `image` (an image's bytes, say from a RAM device) and `model`
/// (the guest bytes it should hold) to `NAME.qcow2` and `NAME.raw` in
/// `dir`, asserts that `qemu-img check` finds the image clean and `qemu-img
/// compare` finds it equal to the model, then removes both files.
pub fn assert_image_matches(dir: &Scratch, name: &str, image: &[u8], model: &[u8]) {
    let (qcow2, raw) = (
        dir.join(format!("{name}.qcow2")),
        dir.join(format!("{name}.raw")),
    );
    std::fs::write(&qcow2, image).expect("write image");
    std::fs::write(&raw, model).expect("write model");
    crate::qemu::check_clean(&qcow2);
    crate::qemu::compare_identical(&raw, &qcow2);
    std::fs::remove_file(qcow2).expect("remove image");
    std::fs::remove_file(raw).expect("remove model");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_writes_win_and_the_rest_reads_zeros() {
        let mut model = SparseModel::default();
        model.write(2, &[1, 1, 1, 1]);
        model.write(4, &[2, 2, 2]);
        let mut buf = [9; 8];
        model.read(1, &mut buf);
        assert_eq!(buf, [0, 1, 1, 2, 2, 2, 0, 0]);
    }

    #[test]
    #[should_panic(
        expected = "mismatch at guest offset 0x102 (first of a differing span up to 0x104)"
    )]
    fn a_difference_is_named_by_guest_offset() {
        assert_same_bytes("test", 0x100, &[0, 0, 1, 0, 1], &[0, 0, 0, 0, 0]);
    }
}
