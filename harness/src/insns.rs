//! Instructions per operation under TCG, from the hvbench-insns QEMU plugin
//! (harness/insns-plugin, GPL-2.0-or-later, loaded by QEMU, never linked here).
//!
//! The guest places a start and a stop marker (8-byte NOPs) around each timed sample and
//! numbers the pair in the sample line (`mk`); the plugin appends one line per stop marker
//! to a log file. A boot's window of that log (from its length when the boot began) gives
//! the pairs of that boot in order, which join the samples by their number. The log is
//! written by the plugin but its volume is the guest's doing: it is read bounded.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The plugin's file name as cargo builds it.
pub const PLUGIN_FILE: &str = "libhvbench_insns.so";
/// The plugin's output format, as its lines start.
const LINE_TAG: &str = "hvbench-insns 1";
/// What records say of how the counts were taken.
pub const METHOD: &str = "QEMU TCG plugin hvbench-insns (API v1): instructions a vCPU \
    executed from the guest's start marker to its stop marker around each sample, \
    hypervisor included; exact: each instruction counts as it starts (a block left early \
    counts only what ran, a faulting instruction again when it restarts), under one TCG \
    thread (`thread=single`)";
/// QEMU's `-accel` with the plugin: one host thread runs every vCPU, as its exact
/// per-vCPU count needs (see harness/insns-plugin).
pub const TCG_ACCEL: &str = "tcg,thread=single";
/// The most of one boot's log read (about 40 bytes a sample).
const MAX_WINDOW_BYTES: u64 = 16 << 20;

#[derive(Debug, Error)]
pub enum InsnsError {
    #[error(
        "the instruction-count plugin {PLUGIN_FILE} was not found (looked in {looked}); build it \
         with `cargo build -p hvbench-insns-plugin` or set HVBENCH_INSNS_PLUGIN"
    )]
    NoPlugin { looked: String },
    #[error("the plugin path {0} has a comma, which QEMU's -plugin option cannot take")]
    Comma(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The plugin: `HVBENCH_INSNS_PLUGIN`, else beside this executable or one directory up
/// (test binaries live in target/<profile>/deps).
pub fn find_plugin() -> Result<PathBuf, InsnsError> {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("HVBENCH_INSNS_PLUGIN").filter(|v| !v.is_empty()) {
        candidates.push(PathBuf::from(path));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            candidates.push(dir.join(PLUGIN_FILE));
        }
    }
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    let path = found.ok_or_else(|| InsnsError::NoPlugin {
        looked: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let path = path.canonicalize().unwrap_or(path);
    if path.to_string_lossy().contains(',') {
        return Err(InsnsError::Comma(path));
    }
    Ok(path)
}

/// QEMU's `-plugin` argument for the plugin writing to `log`.
pub fn plugin_argument(plugin: &Path, log: &Path) -> Result<String, InsnsError> {
    if log.to_string_lossy().contains(',') {
        return Err(InsnsError::Comma(log.to_path_buf()));
    }
    Ok(format!("{},out={}", plugin.display(), log.display()))
}

/// One line of the plugin's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginLine {
    Counted {
        seq: u64,
        insns: u64,
    },
    /// The stop marker ran on another vCPU than its start, or QEMU ran vCPUs on several
    /// threads: no count.
    Moved {
        seq: u64,
    },
}

impl PluginLine {
    fn seq(self) -> u64 {
        match self {
            PluginLine::Counted { seq, .. } | PluginLine::Moved { seq } => seq,
        }
    }

    /// `hvbench-insns 1 seq=N vcpu=V insns=C`, `... moved=W` or `... concurrent=1`;
    /// anything else is None.
    pub fn parse(line: &str) -> Option<PluginLine> {
        let rest = line.strip_prefix(LINE_TAG)?;
        let fields: BTreeMap<&str, u64> = rest
            .split_ascii_whitespace()
            .filter_map(|f| f.split_once('='))
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        let seq = *fields.get("seq")?;
        fields.get("vcpu")?;
        let uncounted = fields.contains_key("moved") || fields.contains_key("concurrent");
        match (fields.get("insns"), uncounted) {
            (Some(&insns), false) => Some(PluginLine::Counted { seq, insns }),
            (None, true) => Some(PluginLine::Moved { seq }),
            _ => None,
        }
    }
}

/// One boot's window of the plugin's log.
#[derive(Clone, Debug)]
pub struct InsnLog {
    path: PathBuf,
    start: u64,
}

impl InsnLog {
    /// The window from the log's present end (a missing log starts at 0).
    pub fn begin(path: &Path) -> Self {
        let start = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Self {
            path: path.to_path_buf(),
            start,
        }
    }

    /// The marker pairs of this window by the guest's numbering (the first pair of the
    /// window is 0): the count, or None where the plugin could not count it.
    pub fn pairs(&self) -> Result<BTreeMap<u64, Option<u64>>, InsnsError> {
        let io = |source| InsnsError::Io {
            path: self.path.clone(),
            source,
        };
        let mut text = String::new();
        match fs::File::open(&self.path) {
            Ok(mut file) => {
                file.seek(SeekFrom::Start(self.start)).map_err(io)?;
                let mut bytes = Vec::new();
                file.take(MAX_WINDOW_BYTES)
                    .read_to_end(&mut bytes)
                    .map_err(io)?;
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        Ok(number_pairs(&text))
    }
}

/// The complete lines of `text` numbered from the window's first sequence number.
fn number_pairs(text: &str) -> BTreeMap<u64, Option<u64>> {
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let lines: Vec<PluginLine> = complete.lines().filter_map(PluginLine::parse).collect();
    let Some(base) = lines.first().map(|l| l.seq()) else {
        return BTreeMap::new();
    };
    lines
        .into_iter()
        .filter_map(|line| {
            let number = line.seq().checked_sub(base)?;
            let count = match line {
                PluginLine::Counted { insns, .. } => Some(insns),
                PluginLine::Moved { .. } => None,
            };
            Some((number, count))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_lines_parse_and_anything_else_is_ignored() {
        assert_eq!(
            PluginLine::parse("hvbench-insns 1 seq=4 vcpu=1 insns=1200"),
            Some(PluginLine::Counted {
                seq: 4,
                insns: 1200
            })
        );
        assert_eq!(
            PluginLine::parse("hvbench-insns 1 seq=5 vcpu=1 moved=0"),
            Some(PluginLine::Moved { seq: 5 })
        );
        assert_eq!(
            PluginLine::parse("hvbench-insns 1 seq=6 vcpu=0 concurrent=1"),
            Some(PluginLine::Moved { seq: 6 })
        );
        for bad in [
            "hvbench-insns 2 seq=1 vcpu=0 insns=3",
            "hvbench-insns 1 seq=x vcpu=0 insns=3",
            "hvbench-insns 1 vcpu=0 insns=3",
            "hvbench-insns 1 seq=1 vcpu=0 insns=3 moved=1",
            "hvbench-insns 1 seq=1 vcpu=0 insns=3 concurrent=1",
            "noise",
        ] {
            assert_eq!(PluginLine::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_window_numbers_its_pairs_from_zero_and_skips_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("insns.log");
        fs::write(&log, "hvbench-insns 1 seq=0 vcpu=0 insns=10\n").unwrap();
        let window = InsnLog::begin(&log);
        let mut text = fs::read_to_string(&log).unwrap();
        text.push_str(
            "hvbench-insns 1 seq=1 vcpu=0 insns=20\nhvbench-insns 1 seq=2 vcpu=1 moved=0\n\
             hvbench-insns 1 seq=3 vcpu=0 insns=4",
        );
        fs::write(&log, text).unwrap();
        let pairs = window.pairs().unwrap();
        assert_eq!(pairs.len(), 2, "{pairs:?}");
        assert_eq!(pairs[&0], Some(20));
        assert_eq!(pairs[&1], None);
        // A log that does not exist yet is an empty window.
        let missing = InsnLog::begin(&dir.path().join("none.log"));
        assert!(missing.pairs().unwrap().is_empty());
    }

    #[test]
    fn paths_with_commas_are_refused_for_qemu() {
        assert!(matches!(
            plugin_argument(Path::new("/p.so"), Path::new("/a,b/log")),
            Err(InsnsError::Comma(_))
        ));
        assert_eq!(
            plugin_argument(Path::new("/p.so"), Path::new("/l")).unwrap(),
            "/p.so,out=/l"
        );
    }
}
