//! Replays the saved fuzz corpora (`fuzz/corpus/<target>/`) and the hostile
//! images through the fuzz harnesses on stable Rust, so every input the
//! fuzzers kept, and every bug they found, stays tested.

use qcow2_std_shim::fuzzing;
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn replay(target: &str, harness: fn(&[u8]), extra: &[PathBuf]) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut inputs = files(&root.join("fuzz/corpus").join(target));
    inputs.extend(files(&root.join("fuzz/regressions").join(target)));
    inputs.extend_from_slice(extra);
    for path in &inputs {
        let data = std::fs::read(path).expect("corpus file");
        let result = std::panic::catch_unwind(|| harness(&data));
        assert!(result.is_ok(), "{target}: {} fails", path.display());
    }
    inputs.len()
}

fn hostile() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile");
    files(&dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect()
}

#[test]
fn header_corpus() {
    assert!(replay("header", fuzzing::header, &hostile()) > 0);
}

#[test]
fn open_read_corpus() {
    assert!(replay("open_read", fuzzing::open_read, &hostile()) > 0);
}

#[test]
fn check_repair_corpus() {
    assert!(replay("check_repair", fuzzing::check_repair, &hostile()) > 0);
}

#[test]
fn ops_corpus() {
    let n = replay("ops", fuzzing::ops, &[]);
    eprintln!("ops: {n} inputs");
    assert!(n > 0);
}
