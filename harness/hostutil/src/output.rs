//! Lines for the person watching that never panic: stderr or stdout may be a closed pipe
//! (`2>&1 | head`, an ssh session gone) or a terminal that was closed (EIO), and a run
//! must still save its records and restore what it changed. `eprintln!` and `println!`
//! panic there; [`say!`](crate::say) and [`tell!`](crate::tell) drop the text instead.

use std::fmt;
use std::io::Write;

/// Writes one line to stderr in a single write, ignoring every error (EPIPE, EBADF, EIO).
pub fn write_line(args: fmt::Arguments<'_>) {
    let mut line = args.to_string();
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Writes `args` to stdout, ignoring every error (EPIPE, EBADF, EIO).
pub fn write_out(args: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out
        .write_all(args.to_string().as_bytes())
        .and_then(|()| out.flush());
}

/// `eprintln!` that cannot panic: see [`write_line`].
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}

/// `println!` that cannot panic: see [`write_out`].
#[macro_export]
macro_rules! tell_line {
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that cannot panic: see [`write_out`].
#[macro_export]
macro_rules! tell {
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!($($arg)*))
    };
}
