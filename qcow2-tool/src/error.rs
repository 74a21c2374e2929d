//! The tool's error type and the messages it prints for core and OS errors.

use qcow2_core::Error;
use std::fmt;
use std::io;

/// The core's error over a host file.
pub type CoreError = Error<io::Error>;

/// A failure reported to the user as one line: `qcow2-tool: <message>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub String);

/// Result of a subcommand.
pub type CliResult<T> = Result<T, CliError>;

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<String> for CliError {
    fn from(message: String) -> Self {
        CliError(message)
    }
}

impl From<&str> for CliError {
    fn from(message: &str) -> Self {
        CliError(message.to_string())
    }
}

/// The C library's text for an OS error, without Rust's `(os error N)`.
pub fn io_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_string(),
        _ => text,
    }
}

/// A readable message for a core error (the core's own `Display` shows
/// device errors in their debug form).
pub fn core_message(e: &CoreError) -> String {
    match e {
        Error::Io(e) => io_message(e),
        // As QEMU words ENOSPC.
        Error::NoSpace => errno_text(e),
        other => other.to_string(),
    }
}

/// `context: message` for a core error.
pub fn core_error(context: &str, e: &CoreError) -> CliError {
    CliError(format!("{context}: {}", core_message(e)))
}

/// `context: message` for an OS error.
pub fn io_error(context: &str, e: &io::Error) -> CliError {
    CliError(format!("{context}: {}", io_message(e)))
}

/// The `strerror` text QEMU prints when a request fails with `e`.
pub fn errno_text(e: &CoreError) -> String {
    match e {
        Error::Io(e) => io_message(e),
        Error::OutOfRange | Error::Corrupt { .. } | Error::Internal(_) => {
            "Input/output error".into()
        }
        Error::ReadOnly => "Operation not permitted".into(),
        Error::Unsupported(_) => "Operation not supported".into(),
        Error::NoSpace => "No space left on device".into(),
        Error::InvalidArgument(_) | Error::NotQcow2 => "Invalid argument".into(),
        _ => "Input/output error".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_os_error_suffix() {
        let e = io::Error::from_raw_os_error(2);
        assert_eq!(io_message(&e), "No such file or directory");
        let e = io::Error::other("plain");
        assert_eq!(io_message(&e), "plain");
    }
}
