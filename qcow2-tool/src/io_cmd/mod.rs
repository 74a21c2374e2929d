//! `io`: run qemu-io style commands (`read`, `write`, `flush`) on an image.
//!
//! Output, messages and exit status follow qemu-io: results and command
//! errors go to stdout, usage problems to stderr; every command runs even
//! after a failure, and the exit status is 1 if any command failed.

mod getopt;
mod report;

use crate::disk::{Access, Disk, Format};
use crate::error::{core_message, errno_text, CliResult, CoreError};
use crate::size::{parse_size, SizeError};
use getopt::{getopt, Opt};
use qcow2_core::Error;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

/// Largest request qemu-io accepts (`BDRV_REQUEST_MAX_BYTES`).
const MAX_REQUEST: u64 = (i32::MAX as u64) & !511;

/// Arguments of `io`.
#[derive(Debug, clap::Args)]
pub struct IoArgs {
    /// Open the image read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Image format.
    #[arg(short = 'f', value_enum, default_value = "qcow2")]
    format: Format,
    /// Open the image in shared mode: let other processes write it
    /// meanwhile (like `qemu-io -U`; only with `-r`).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// A command to run: `read [-Cqv] [-P pattern [-s off] [-l len]] off len`,
    /// `write [-Cfqu] [-P pattern | -z] off len`, `flush`, `quit`. Repeat
    /// for several; without any, commands are read from standard input.
    #[arg(
        short = 'c',
        long = "cmd",
        value_name = "CMD",
        allow_hyphen_values = true
    )]
    commands: Vec<String>,
    /// The image file.
    file: PathBuf,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Failed,
    Quit,
}

/// A command qemu-io style: name, short alias, argument count bounds,
/// usage line.
struct CommandInfo {
    name: &'static str,
    alias: &'static str,
    min_args: usize,
    max_args: Option<usize>,
    usage: &'static str,
}

const READ: CommandInfo = CommandInfo {
    name: "read",
    alias: "r",
    min_args: 2,
    max_args: None,
    usage: "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- \
            reads a number of bytes at a specified offset",
};
const WRITE: CommandInfo = CommandInfo {
    name: "write",
    alias: "w",
    min_args: 2,
    max_args: None,
    usage: "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- \
            writes a number of bytes at a specified offset",
};
const FLUSH: CommandInfo = CommandInfo {
    name: "flush",
    alias: "f",
    min_args: 0,
    max_args: Some(0),
    usage: "flush -- flush all in-core file state to disk",
};
const DISCARD: CommandInfo = CommandInfo {
    name: "discard",
    alias: "d",
    min_args: 2,
    max_args: None,
    usage: "discard [-Cq] off len -- discards a number of bytes at a specified offset",
};
const QUIT: CommandInfo = CommandInfo {
    name: "quit",
    alias: "q",
    min_args: 0,
    max_args: None,
    usage: "quit -- exit the program",
};
const COMMANDS: [&CommandInfo; 5] = [&READ, &WRITE, &DISCARD, &FLUSH, &QUIT];

/// Runs `io`; returns whether every command succeeded.
pub fn run(args: &IoArgs) -> CliResult<bool> {
    let shown = args.file.display().to_string();
    let access = if args.read_only {
        Access::Read
    } else {
        Access::Write
    };
    // The image stays open, and locked, until every command has run (for
    // commands from standard input: until it ends or says `quit`).
    let mut disk = Disk::open(&args.file, Some(args.format), access, args.force_share)
        .map_err(|e| e.io(&shown))?;
    let mut session = Session {
        disk: &mut disk,
        read_only: args.read_only,
    };
    let mut ok = true;
    let mut step = |line: &str| -> bool {
        match session.execute(line) {
            Status::Ok => true,
            Status::Failed => {
                ok = false;
                true
            }
            Status::Quit => false,
        }
    };
    if args.commands.is_empty() {
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(|e| crate::error::io_error("reading commands", &e))?;
            if !step(&line) {
                break;
            }
        }
    } else {
        for line in &args.commands {
            if !step(line) {
                break;
            }
        }
    }
    disk.close()
        .map_err(|e| format!("{shown}: {}", core_message(&e)))?;
    Ok(ok)
}

/// An open image and the state commands share.
struct Session<'a> {
    disk: &'a mut Disk,
    read_only: bool,
}

/// Parses a number argument like qemu-io's `cvtnum`; prints qemu-io's
/// message on failure.
fn cvtnum(arg: &str) -> Option<u64> {
    match parse_size(arg) {
        Ok(n) if n <= i64::MAX as u64 => Some(n),
        Ok(_) | Err(SizeError::Range) => {
            outln!("Parsing error: argument too large -- {arg}");
            None
        }
        Err(SizeError::Invalid) => {
            outln!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
            );
            None
        }
    }
}

/// Parses a pattern byte like qemu-io (C `strtol` with base 0: decimal,
/// `0x` hex, `0` octal); prints qemu-io's message on failure.
fn parse_pattern(arg: &str) -> Option<u8> {
    let value = crate::size::parse_c_unsigned(arg)
        .ok()
        .and_then(|v| u8::try_from(v).ok());
    if value.is_none() {
        outln!("{arg} is not a valid pattern byte");
    }
    value
}

/// The `off len` operands of read, write and discard, parsed as qemu-io
/// does (each error printed as qemu-io prints it).
fn offset_and_length(off_arg: &str, len_arg: &str) -> Option<(u64, u64)> {
    let offset = cvtnum(off_arg)?;
    let count = cvtnum(len_arg)?;
    check_length(count, len_arg).then_some((offset, count))
}

/// Checks that a length is within qemu-io's request limit; prints its
/// message otherwise.
fn check_length(count: u64, arg: &str) -> bool {
    if count > MAX_REQUEST {
        outln!("length cannot exceed {MAX_REQUEST}, given {arg}");
        return false;
    }
    true
}

/// A zeroed buffer of `len` bytes; `ENOMEM` if the memory is not available.
fn alloc(len: u64) -> Result<Vec<u8>, CoreError> {
    let no_memory = || Error::Io(std::io::Error::from_raw_os_error(12));
    let len = usize::try_from(len).map_err(|_| no_memory())?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).map_err(|_| no_memory())?;
    buf.resize(len, 0);
    Ok(buf)
}

/// Prints the usage line of `cmd` and reports failure.
fn usage(cmd: &CommandInfo) -> Status {
    outln!("{}", cmd.usage);
    Status::Failed
}

/// Reports a getopt error as glibc does and prints the usage line.
fn bad_option(cmd: &CommandInfo, opt: &Opt) -> Status {
    match opt {
        Opt::MissingArg(c) => errln!("{}: option requires an argument -- '{c}'", cmd.name),
        // Options the command's option string lists are all handled, so
        // only invalid ones arrive here.
        Opt::Invalid(c) | Opt::Flag(c) | Opt::Arg(c, _) => {
            errln!("{}: invalid option -- '{c}'", cmd.name)
        }
    }
    usage(cmd)
}

/// Prints a failed request as qemu-io does, with details on stderr when the
/// errno text alone would hide them.
fn request_failed(op: &str, e: &CoreError) -> Status {
    if matches!(
        e,
        Error::Corrupt { .. } | Error::Unsupported(_) | Error::InvalidArgument(_)
    ) {
        errln!("qcow2-tool: {}", core_message(e));
    }
    outln!("{op} failed: {}", errno_text(e));
    Status::Failed
}

impl Session<'_> {
    /// Runs one command line.
    fn execute(&mut self, line: &str) -> Status {
        let words: Vec<String> = line
            .split(' ')
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect();
        let Some((name, args)) = words.split_first() else {
            return Status::Ok;
        };
        let Some(cmd) = COMMANDS
            .into_iter()
            .find(|c| c.name == name || c.alias == name)
        else {
            errln!("command \"{name}\" not found");
            return Status::Failed;
        };
        let n = args.len();
        if n < cmd.min_args || cmd.max_args.is_some_and(|max| n > max) {
            match cmd.max_args {
                Some(max) if max == cmd.min_args => {
                    errln!("bad argument count {n} to {name}, expected {max} arguments")
                }
                Some(max) => errln!(
                    "bad argument count {n} to {name}, expected between {} and {max} arguments",
                    cmd.min_args
                ),
                None => errln!(
                    "bad argument count {n} to {name}, expected at least {} arguments",
                    cmd.min_args
                ),
            }
            return Status::Failed;
        }
        match cmd.name {
            "read" => self.read(args),
            "write" if self.read_only => {
                errln!("qcow2-tool: Block node is read-only");
                Status::Failed
            }
            "write" => self.write(args),
            "discard" if self.read_only => {
                errln!("qcow2-tool: Block node is read-only");
                Status::Failed
            }
            "discard" => self.discard(args),
            "flush" => match self.disk.flush() {
                Ok(()) => Status::Ok,
                Err(e) => {
                    errln!("qcow2-tool: flush failed: {}", core_message(&e));
                    Status::Failed
                }
            },
            _ => Status::Quit,
        }
    }

    /// `read [-Cqv] [-P pattern [-s off] [-l len]] off len`.
    fn read(&mut self, args: &[String]) -> Status {
        let (opts, operands) = getopt(args, "Cl:pP:qrs:v");
        let (mut parsable, mut quiet, mut verbose) = (false, false, false);
        let mut pattern: Option<u8> = None;
        let mut pattern_offset: Option<u64> = None;
        let mut pattern_count: Option<u64> = None;
        for opt in &opts {
            match opt {
                Opt::Flag('C') => parsable = true,
                Opt::Flag('p' | 'r') => {}
                Opt::Flag('q') => quiet = true,
                Opt::Flag('v') => verbose = true,
                Opt::Arg('P', arg) => match parse_pattern(arg) {
                    Some(p) => pattern = Some(p),
                    None => return Status::Failed,
                },
                Opt::Arg('s', arg) => match cvtnum(arg) {
                    Some(n) => pattern_offset = Some(n),
                    None => return Status::Failed,
                },
                Opt::Arg('l', arg) => match cvtnum(arg) {
                    Some(n) => pattern_count = Some(n),
                    None => return Status::Failed,
                },
                other => return bad_option(&READ, other),
            }
        }
        let [off_arg, len_arg] = operands.as_slice() else {
            return usage(&READ);
        };
        let Some((offset, count)) = offset_and_length(off_arg, len_arg) else {
            return Status::Failed;
        };
        if pattern.is_none() && (pattern_offset.is_some() || pattern_count.is_some()) {
            return usage(&READ);
        }
        let skip = pattern_offset.unwrap_or(0);
        let verify_len = match pattern_count {
            Some(n) => Some(n),
            None => count.checked_sub(skip),
        };
        let Some(verify_len) =
            verify_len.filter(|&n| u128::from(n) + u128::from(skip) <= u128::from(count))
        else {
            outln!("pattern verification range exceeds end of read data");
            return Status::Failed;
        };
        let start = Instant::now();
        let result = self.read_range(offset, count);
        let elapsed = start.elapsed();
        let buf = match result {
            Ok(buf) => buf,
            Err(e) => return request_failed("read", &e),
        };
        let mut status = Status::Ok;
        if let Some(p) = pattern {
            // Both bounds were checked against `count` above.
            let from = usize::try_from(skip).unwrap_or(usize::MAX);
            let to = usize::try_from(skip + verify_len).unwrap_or(usize::MAX);
            let region = buf.get(from..to).unwrap_or_default();
            if region.iter().any(|&b| b != p) {
                outln!(
                    "Pattern verification failed at offset {}, {verify_len} bytes",
                    offset.saturating_add(skip)
                );
                status = Status::Failed;
            }
        }
        if quiet {
            return status;
        }
        if verbose {
            out!("{}", report::dump(&buf, offset));
        }
        outln!(
            "{}",
            report::report("read", elapsed, offset, count, parsable)
        );
        status
    }

    /// Reads `count` bytes at `offset` into a new buffer.
    fn read_range(&mut self, offset: u64, count: u64) -> Result<Vec<u8>, CoreError> {
        self.check_range(offset, count)?;
        let mut buf = alloc(count)?;
        self.disk.read_at(offset, &mut buf)?;
        Ok(buf)
    }

    /// Fails like the block layer for a request past the end of the disk.
    fn check_range(&self, offset: u64, count: u64) -> Result<(), CoreError> {
        match offset.checked_add(count) {
            Some(end) if end <= self.disk.size() => Ok(()),
            _ => Err(Error::OutOfRange),
        }
    }

    /// `write [-Cfqu] [-P pattern | -z] off len`.
    fn write(&mut self, args: &[String]) -> Status {
        let (opts, operands) = getopt(args, "CcfpP:qruz");
        let (mut parsable, mut quiet, mut fua, mut unmap, mut zero, mut compress) =
            (false, false, false, false, false, false);
        let mut pattern: Option<u8> = None;
        for opt in &opts {
            match opt {
                Opt::Flag('C') => parsable = true,
                Opt::Flag('c') => compress = true,
                Opt::Flag('f') => fua = true,
                Opt::Flag('p' | 'r') => {}
                Opt::Flag('q') => quiet = true,
                Opt::Flag('u') => unmap = true,
                Opt::Flag('z') => zero = true,
                Opt::Arg('P', arg) => match parse_pattern(arg) {
                    Some(p) => pattern = Some(p),
                    None => return Status::Failed,
                },
                other => return bad_option(&WRITE, other),
            }
        }
        let [off_arg, len_arg] = operands.as_slice() else {
            return usage(&WRITE);
        };
        if fua && compress {
            outln!("-f and -b or -c cannot be specified at the same time");
            return Status::Failed;
        }
        if unmap && !zero {
            outln!("-u requires -z to be specified");
            return Status::Failed;
        }
        if zero && pattern.is_some() {
            outln!("Only one of -z, -P, and -s can be specified at the same time");
            return Status::Failed;
        }
        let Some((offset, count)) = offset_and_length(off_arg, len_arg) else {
            return Status::Failed;
        };
        if compress {
            for (value, what) in [(offset, "offset"), (count, "count")] {
                if value % 512 != 0 {
                    outln!("{value} is not a sector-aligned value for '{what}'");
                    return Status::Failed;
                }
            }
        }
        let start = Instant::now();
        let result = if zero {
            self.check_range(offset, count)
                .and_then(|()| self.disk.write_zeroes(offset, count, unmap))
        } else if compress {
            self.write_compressed(offset, count, pattern.unwrap_or(0xcd))
        } else {
            self.write_pattern(offset, count, pattern.unwrap_or(0xcd))
        }
        .and_then(|()| if fua { self.disk.flush() } else { Ok(()) });
        let elapsed = start.elapsed();
        if let Err(e) = result {
            return request_failed("write", &e);
        }
        if !quiet {
            outln!(
                "{}",
                report::report("wrote", elapsed, offset, count, parsable)
            );
        }
        Status::Ok
    }

    /// Writes `count` bytes of `pattern` at `offset`, compressed.
    fn write_compressed(&mut self, offset: u64, count: u64, pattern: u8) -> Result<(), CoreError> {
        self.check_range(offset, count)?;
        let mut buf = alloc(count)?;
        buf.fill(pattern);
        self.disk.write_compressed(offset, &buf)
    }

    /// Writes `count` bytes of `pattern` at `offset`.
    fn write_pattern(&mut self, offset: u64, count: u64, pattern: u8) -> Result<(), CoreError> {
        self.check_range(offset, count)?;
        let mut buf = alloc(count)?;
        buf.fill(pattern);
        self.disk.write_at(offset, &buf)
    }

    /// `discard [-Cq] off len`.
    fn discard(&mut self, args: &[String]) -> Status {
        let (opts, operands) = getopt(args, "Cq");
        let (mut parsable, mut quiet) = (false, false);
        for opt in &opts {
            match opt {
                Opt::Flag('C') => parsable = true,
                Opt::Flag('q') => quiet = true,
                other => return bad_option(&DISCARD, other),
            }
        }
        let [off_arg, len_arg] = operands.as_slice() else {
            return usage(&DISCARD);
        };
        let Some((offset, count)) = offset_and_length(off_arg, len_arg) else {
            return Status::Failed;
        };
        let start = Instant::now();
        let result = self
            .check_range(offset, count)
            .and_then(|()| self.disk.discard(offset, count));
        let elapsed = start.elapsed();
        if let Err(e) = result {
            return request_failed("discard", &e);
        }
        if !quiet {
            outln!(
                "{}",
                report::report("discard", elapsed, offset, count, parsable)
            );
        }
        Status::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_like_strtol() {
        assert_eq!(parse_pattern("0x11"), Some(0x11));
        assert_eq!(parse_pattern("0XfF"), Some(0xff));
        assert_eq!(parse_pattern("17"), Some(17));
        assert_eq!(parse_pattern("0377"), Some(0o377));
        assert_eq!(parse_pattern("+5"), Some(5));
        assert_eq!(parse_pattern("-0"), Some(0));
        assert_eq!(parse_pattern("0"), Some(0));
        for bad in ["zz", "300", "-1", "0x", "08", "1k", "\"\""] {
            assert_eq!(parse_pattern(bad), None, "{bad}");
        }
    }

    #[test]
    fn request_limit() {
        assert_eq!(MAX_REQUEST, 2147483136);
    }
}
