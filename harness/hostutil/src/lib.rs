//! What hvbench's runner (the `hvbench` crate) and its labs (`hvbench-lab`) share, below
//! both: running commands on a host, locally or over ssh, each with a time limit and in its
//! own process group (`transport`); state files that survive a killed process
//! (`statefile`); lines for the person watching that never panic (`output`, `say!`,
//! `tell!`); RFC 3339 time; the KVM paging mode; and transparent huge pages (`huge_pages`).

// Progress goes through `say!`, output through `tell!`/`tell_line!`: `eprintln!` and
// `println!` panic on a closed stream.
#![deny(clippy::print_stderr, clippy::print_stdout)]

pub mod huge_pages;
pub mod output;
mod paging;
pub mod statefile;
pub mod transport;

use std::path::Path;
use std::time::SystemTime;

pub use paging::PagingMode;

/// UTC time as RFC 3339 to the second (`2026-11-26T05:12:00Z`).
pub fn rfc3339(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Reads a sysfs/procfs file, trimmed; `None` if absent.
pub fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}
