//! Helpers shared by the tool's integration tests: a scratch directory and
//! running the tool and QEMU's programs.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// A scratch directory, removed with its contents when dropped.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// A new, empty directory named after `name` and this process.
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "qcow2-tool-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch directory");
        Scratch { dir }
    }

    /// `name` inside the directory, as a string for command lines.
    pub fn path(&self, name: &str) -> String {
        self.dir
            .join(name)
            .to_str()
            .expect("UTF-8 path")
            .to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `program` with `args` and waits for it.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs the tool.
pub fn tool(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_qcow2-tool"), args)
}

/// Runs `qemu-img`.
pub fn qemu_img(args: &[&str]) -> Output {
    run("qemu-img", args)
}

/// Runs `qemu-io`.
pub fn qemu_io(args: &[&str]) -> Output {
    run("qemu-io", args)
}

/// Standard output as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Standard error as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}
