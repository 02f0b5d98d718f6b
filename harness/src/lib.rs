//! hvbench: boots one identical guest on KVM (its own VMM), QEMU and Xen, measures it and
//! records every sample.
//!
//! workload table -> guest -> result lines (console) -> records (run) -> statistics
//! (reports) -> report

// Progress goes through `say!`, output through `tell!`/`tell_line!`: `eprintln!` and
// `println!` panic on a closed stream (`hvbench list | head -1`).
#![deny(clippy::print_stderr, clippy::print_stdout)]

pub mod backend;
mod child;
pub mod console;
pub mod disk;
pub mod guest_image;
pub mod host;
pub mod host_paging;
pub mod insns;
pub mod interrupt;
pub mod migration;
pub mod run;
pub mod standalone;
pub mod summary;

// Below the runner and the labs both; re-exported where the runner always found them.
pub use hostutil::{output, say, statefile, tell, tell_line};
