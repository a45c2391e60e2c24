//! Output of the one-shot commands (`status`, `flows`, `policy check`, `policy explain`, the
//! control commands): a reader that stops early (`enforcer status | head`, or
//! `policy check DIR 2>&1 | head`) ends the command quietly, as it ends `enforcer events`,
//! instead of the panic `println!` and `eprintln!` raise when a write fails.
//!
//! Rust starts every program with `SIGPIPE` ignored, so a write to a closed pipe is an
//! `EPIPE` error, not a signal death. Restoring the signal is not the way out: the control
//! and `events` clients write to the agent's socket too, where a refusal must be reported.
//!
//! Use [`outln!`](crate::outln), [`out!`](crate::out) and [`errln!`](crate::errln) where
//! `println!`, `print!` and `eprintln!` would be.

use std::fmt;
use std::io::{self, Write};
use std::process::exit;

/// The status a command ends with when standard output closed under it: success, as for
/// `enforcer events`, since the reader chose to stop reading.
const STDOUT_CLOSED: i32 = 0;
/// The status a command ends with when standard error closed under it: failure, since
/// standard error is written on the way to a failure (a policy's problems), and a failure
/// must not turn into a success because nobody read why.
const STDERR_CLOSED: i32 = 1;

/// Writes `args` to standard output; ends the process when it cannot (see the module).
pub fn write_out(args: fmt::Arguments) {
    if let Err(error) = io::stdout().lock().write_fmt(args) {
        ended("standard output", STDOUT_CLOSED, &error);
    }
}

/// Writes `args` to standard error; ends the process when it cannot (see the module).
pub fn write_err(args: fmt::Arguments) {
    if let Err(error) = io::stderr().lock().write_fmt(args) {
        ended("standard error", STDERR_CLOSED, &error);
    }
}

fn ended(stream: &str, closed: i32, error: &io::Error) -> ! {
    if error.kind() == io::ErrorKind::BrokenPipe {
        exit(closed);
    }
    // Another failure (a full disk behind a redirect): said where it still can be.
    let _ = writeln!(io::stderr(), "error: writing to {stream}: {error}");
    exit(1);
}

/// `println!` that ends the command quietly when standard output is closed
/// ([`crate::stdio`]).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::stdio::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdio::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that ends the command quietly when standard output is closed ([`crate::stdio`]).
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::stdio::write_out(format_args!($($arg)*))
    };
}

/// `eprintln!` that ends the command (as a failure) when standard error is closed
/// ([`crate::stdio`]).
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::stdio::write_err(format_args!("{}\n", format_args!($($arg)*)))
    };
}
