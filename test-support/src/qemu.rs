//! QEMU as the oracle for qcow2 images: `qemu-img` and `qemu-io` run on
//! image files, their JSON output read with serde_json.
//!
//! Every function names the format (`-f qcow2`) rather than letting QEMU
//! probe it, and panics with the command line, status and output when
//! QEMU fails.

use crate::process::{describe, run, run_ok, stdout};
use crate::scratch::{path_str, Scratch};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;
use std::process::Output;

/// Parses JSON a program printed; panics with the text if it is not JSON.
pub fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

/// Runs `qemu-img args`, asserts success, returns stdout.
pub fn img(args: &[&str]) -> String {
    run_ok("qemu-img", args)
}

/// `qemu-img create -f qcow2 [-o options] path size`.
pub fn create(path: impl AsRef<Path>, options: &str, size: u64) {
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([path_str(path.as_ref()), &size]);
    img(&args);
}

/// Runs `qemu-io` commands on a qcow2 image (discards honoured: `-d
/// unmap`), asserts that all of them succeeded (exit status, no failed
/// request, no failed pattern verification), returns stdout and stderr.
pub fn io(path: impl AsRef<Path>, commands: &[impl AsRef<str>]) -> String {
    let mut args = vec!["-f", "qcow2", "-d", "unmap"];
    for c in commands {
        args.extend(["-c", c.as_ref()]);
    }
    args.push(path_str(path.as_ref()));
    let out = run("qemu-io", &args);
    let text = format!("{}{}", stdout(&out), crate::process::stderr(&out));
    assert!(
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("failed:"),
        "{}",
        describe("qemu-io", &args, &out)
    );
    text
}

/// `qemu-img convert -f qcow2 -O raw`: the guest contents of a qcow2
/// image as QEMU reads them, in the (sparse) raw file `raw`.
pub fn convert_to_raw(qcow2: impl AsRef<Path>, raw: impl AsRef<Path>) {
    let (qcow2, raw) = (path_str(qcow2.as_ref()), path_str(raw.as_ref()));
    img(&["convert", "-f", "qcow2", "-O", "raw", qcow2, raw]);
}

/// `qemu-img info` of a qcow2 image, as JSON.
pub fn info(path: impl AsRef<Path>) -> Value {
    let path = path_str(path.as_ref());
    json(&img(&["info", "-f", "qcow2", "--output", "json", path]))
}

/// `qemu-img check` of a qcow2 image: exit status 0, no corruptions,
/// leaks or check errors (found or fixed) in the JSON report, and every
/// cluster the refcounts hold inside the file.
pub fn check_clean(path: impl AsRef<Path>) {
    let path = path.as_ref();
    let args = ["check", "-f", "qcow2", "--output", "json", path_str(path)];
    let out = run("qemu-img", &args);
    let report = describe("qemu-img", &args, &out);
    assert!(out.status.success(), "qemu-img check failed:\n{report}");
    let json = json(&stdout(&out));
    for key in [
        "corruptions",
        "leaks",
        "check-errors",
        "corruptions-fixed",
        "leaks-fixed",
    ] {
        let n = json.get(key).map_or(0, |v| v.as_u64().expect("number"));
        assert_eq!(n, 0, "qemu-img check reports {key} = {n}:\n{report}");
    }
    let end = json["image-end-offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no image-end-offset:\n{report}"));
    let len = std::fs::metadata(path).expect("stat image").len();
    assert!(
        end <= len.next_multiple_of(512),
        "image end {end} beyond the file's {len} bytes:\n{report}"
    );
}

/// `program check --output json [args] image` (`program` is `qemu-img` or
/// the tool's path): the report without the file name, and the exit code.
pub fn check_json(program: &str, args: &[&str], image: &str) -> (Value, Option<i32>) {
    let mut all = vec!["check", "--output", "json"];
    all.extend_from_slice(args);
    all.push(image);
    let out = run(program, &all);
    let mut value: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", describe(program, &all, &out)));
    value
        .as_object_mut()
        .unwrap_or_else(|| panic!("not an object: {}", describe(program, &all, &out)))
        .remove("filename");
    (value, out.status.code())
}

fn compare_run(a: &Path, fa: &str, b: &Path, fb: &str) -> (Output, String) {
    let args = ["compare", "-f", fa, "-F", fb, path_str(a), path_str(b)];
    let out = run("qemu-img", &args);
    let report = describe("qemu-img", &args, &out);
    (out, report)
}

/// `qemu-img compare -f FA -F FB a b`: its exit status (0 identical, 1
/// different; anything else panics) and, on a mismatch, the byte offset
/// QEMU reports (the start of the sector).
pub fn compare(a: impl AsRef<Path>, fa: &str, b: impl AsRef<Path>, fb: &str) -> (i32, Option<u64>) {
    let (out, report) = compare_run(a.as_ref(), fa, b.as_ref(), fb);
    let code = out.status.code().expect("exit code");
    assert!(code == 0 || code == 1, "{report}");
    let text = stdout(&out);
    let at = text
        .split("Content mismatch at offset ")
        .nth(1)
        .map(|rest| {
            let number = rest.split('!').next().expect("offset");
            number.parse().expect("number")
        });
    (code, at)
}

/// Asserts that `qemu-img compare -f raw -F qcow2 raw qcow2` finds the two
/// identical.
pub fn compare_identical(raw: impl AsRef<Path>, qcow2: impl AsRef<Path>) {
    let (out, report) = compare_run(raw.as_ref(), "raw", qcow2.as_ref(), "qcow2");
    assert!(out.status.code() == Some(0), "images differ: {report}");
}

/// One extent of `qemu-img map --output json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Extent {
    /// First guest byte.
    pub start: u64,
    /// Guest bytes in the extent.
    pub length: u64,
    /// Backing-chain depth of the layer that maps it (0: the image itself).
    pub depth: u64,
    /// Whether the image (or a backing file) maps the range at all.
    pub present: bool,
    /// Whether the range reads as zeros.
    pub zero: bool,
    /// Whether the range holds data (an allocated data cluster).
    pub data: bool,
    /// Whether the data is in compressed clusters.
    #[serde(default)]
    pub compressed: bool,
    /// Host offset of the data, when there is some.
    pub offset: Option<u64>,
}

/// `qemu-img map` of a qcow2 image.
pub fn map(path: impl AsRef<Path>) -> Vec<Extent> {
    let path = path_str(path.as_ref());
    let text = img(&["map", "-f", "qcow2", "--output", "json", path]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("qemu-img map ({e}):\n{text}"))
}

/// Guest ranges `[start, end)` `qemu-img map` reports as holding data,
/// adjacent ones merged.
pub fn data_ranges(path: impl AsRef<Path>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map(path).iter().filter(|e| e.data) {
        match out.last_mut() {
            Some(last) if last.1 == e.start => last.1 += e.length,
            _ => out.push((e.start, e.start + e.length)),
        }
    }
    out
}

/// `qemu-img map` without host offsets, adjacent runs of the same kind
/// merged: `(start, end, data, zero)`, what the guest sees of allocation
/// whatever the host layout.
pub fn guest_map(path: impl AsRef<Path>) -> Vec<(u64, u64, bool, bool)> {
    let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in map(path) {
        let end = e.start + e.length;
        match runs.last_mut() {
            Some(last) if last.1 == e.start && (last.2, last.3) == (e.data, e.zero) => last.1 = end,
            _ => runs.push((e.start, end, e.data, e.zero)),
        }
    }
    runs
}

/// Guest bytes `[offset, offset + len)` of a qcow2 image as QEMU reads
/// them, through a `raw` driver window (works at any offset, unlike
/// `qemu-img dd`); the window file lives in `dir` while it is read.
pub fn extract(dir: &Scratch, path: impl AsRef<Path>, offset: u64, len: u64) -> Vec<u8> {
    let start = offset / 512 * 512;
    let end = (offset + len).div_ceil(512) * 512;
    let spec = format!(
        r#"json:{{"driver":"raw","offset":{start},"size":{},"file":{{"driver":"qcow2","file":{{"driver":"file","filename":"{}"}}}}}}"#,
        end - start,
        path_str(path.as_ref())
    );
    let out = dir.join("window.raw");
    img(&["convert", "-O", "raw", &spec, path_str(&out)]);
    let bytes = std::fs::read(&out).expect("read window");
    std::fs::remove_file(&out).expect("remove window");
    assert_eq!(bytes.len() as u64, end - start, "window size");
    let skip = (offset - start) as usize;
    bytes[skip..skip + len as usize].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::{header, peek64, poke};

    #[test]
    fn an_image_qemu_wrote_is_read_back_through_json() {
        let dir = Scratch::new("support-qemu");
        let image = dir.join("a.qcow2");
        create(&image, "cluster_size=4096", 1 << 20);
        io(&image, &["write -P 7 4096 8192", "write -z 65536 4096"]);
        check_clean(&image);
        assert_eq!(info(&image)["cluster-size"], 4096);
        assert_eq!(data_ranges(&image), [(4096, 12288)]);
        let map = map(&image);
        assert!(map[1].data && map[1].offset.is_some(), "{map:?}");
        assert_eq!(
            guest_map(&image),
            [
                (0, 4096, false, true),
                (4096, 12288, true, false),
                (12288, 1 << 20, false, true)
            ]
        );
        assert_eq!(extract(&dir, &image, 4000, 200)[96..], [7; 104]);
        let raw = dir.join("a.raw");
        convert_to_raw(&image, &raw);
        compare_identical(&raw, &image);
        let (report, code) = check_json("qemu-img", &[], path_str(&image));
        assert_eq!(
            (report["allocated-clusters"].as_u64(), code),
            (Some(2), Some(0))
        );
        assert_eq!(report.get("filename"), None);
    }

    #[test]
    #[should_panic(expected = "qemu-img check failed")]
    fn a_leak_fails_check_clean() {
        let dir = Scratch::new("support-leak");
        let image = dir.join("a.qcow2");
        create(&image, "cluster_size=65536", 1 << 20);
        // A refcount of 1 for the (unused) fifth cluster: a leak, exit 3.
        let block = peek64(&image, header::REFCOUNT_TABLE_OFFSET) + 65536;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .and_then(|f| f.set_len(6 * 65536))
            .expect("grow image");
        poke(&image, block + 2 * 5, &1u16.to_be_bytes());
        check_clean(&image);
    }

    #[test]
    #[should_panic(expected = "Pattern verification failed")]
    fn a_failed_pattern_fails_io() {
        let dir = Scratch::new("support-pattern");
        let image = dir.join("a.qcow2");
        create(&image, "", 1 << 20);
        io(&image, &["read -P 1 0 512"]);
    }
}
