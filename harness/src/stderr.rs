//! Lines for the person watching, on stderr, that never panic: stderr may be a closed pipe
//! (`2>&1 | head`, an ssh session gone, a terminal closed), and a run must still save its
//! records and restore what it changed. `eprintln!` panics there; [`say!`](crate::say)
//! drops the line instead.

use std::fmt;
use std::io::Write;

/// Writes one line to stderr in a single write, ignoring every error (EPIPE, EBADF, EIO).
pub fn write_line(args: fmt::Arguments<'_>) {
    let mut line = args.to_string();
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// `eprintln!` that cannot panic: see [`write_line`].
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::stderr::write_line(format_args!($($arg)*))
    };
}
