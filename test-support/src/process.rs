//! Running programs and asserting on how they ended, with everything they
//! printed in the panic message.

use std::process::{Command, Output, Stdio};

/// Runs `program` (a name on `PATH` or a path, such as the tool's
/// `env!("CARGO_BIN_EXE_qcow2-tool")`) with `args` and waits for it. Its
/// input is empty, so nothing ever waits on the test's terminal.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed?): {e}"))
}

/// Runs `qemu-img` with `args`.
pub fn qemu_img(args: &[&str]) -> Output {
    run("qemu-img", args)
}

/// Runs `qemu-io` with `args`.
pub fn qemu_io(args: &[&str]) -> Output {
    run("qemu-io", args)
}

/// Runs `qemu-nbd` with `args`.
pub fn qemu_nbd(args: &[&str]) -> Output {
    run("qemu-nbd", args)
}

/// Bytes a program printed, as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Standard output as text.
pub fn stdout(out: &Output) -> String {
    text(&out.stdout)
}

/// Standard error as text.
pub fn stderr(out: &Output) -> String {
    text(&out.stderr)
}

/// The command line, exit status, stdout and stderr of a finished run, for
/// a panic message.
pub fn describe(program: &str, args: &[&str], out: &Output) -> String {
    format!(
        "{program} {}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        stdout(out),
        stderr(out)
    )
}

/// Asserts that `out` (described by `what`) succeeded and returns it.
pub fn succeeded(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    out
}

/// Asserts that `out` (described by `what`) succeeded and returns its
/// stdout.
pub fn ok(out: Output, what: &str) -> String {
    stdout(&succeeded(out, what))
}

/// Runs `program args`, asserts success (the panic message names the whole
/// command line) and returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(out.status.success(), "{}", describe(program, args, &out));
    stdout(&out)
}
