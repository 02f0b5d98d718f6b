//! What a merged benchmark matrix adds to a results directory: `matrix.json`, the cells
//! with their host label, backend, paging, status and host fingerprint. The report draws
//! the grid from it; `compare` matches measurements cell for cell (same host label and
//! fingerprint) through it. Written by the matrix crate's merge.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::record::Record;
use crate::results::ResultsError;

/// The file beside `results.jsonl` in a merged matrix.
pub const MATRIX_SUMMARY_NAME: &str = "matrix.json";
/// Largest `matrix.json` read (about 2,000 bytes a cell).
const MAX_SUMMARY_BYTES: u64 = 256 << 20;

/// How a cell ended (a bundle's manifest says it; merge adds `missing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CellStatus {
    /// Planned in the bundle's part, not started (the job ended first).
    Pending,
    /// Started and never finished: the job was killed while it ran.
    Running,
    /// `hvbench run` exited 0: every workload succeeded or was skipped.
    Succeeded,
    /// Exit 3: records written, some workloads failed, crashed or timed out.
    NotAllSucceeded,
    /// Exit 130: interrupted; the records measured so far are kept.
    Interrupted,
    /// Any other exit, or the command could not start.
    Failed,
    /// In no bundle at all (merge only).
    Missing,
}

impl CellStatus {
    pub const fn name(self) -> &'static str {
        match self {
            CellStatus::Pending => "pending",
            CellStatus::Running => "running",
            CellStatus::Succeeded => "succeeded",
            CellStatus::NotAllSucceeded => "not_all_succeeded",
            CellStatus::Interrupted => "interrupted",
            CellStatus::Failed => "failed",
            CellStatus::Missing => "missing",
        }
    }

    /// The status of `hvbench run`'s exit code.
    pub const fn of_exit(code: i32) -> CellStatus {
        match code {
            0 => CellStatus::Succeeded,
            3 => CellStatus::NotAllSucceeded,
            130 => CellStatus::Interrupted,
            _ => CellStatus::Failed,
        }
    }

    /// Whether the cell ran to its end (its records are all it will have).
    pub const fn completed(self) -> bool {
        matches!(self, CellStatus::Succeeded | CellStatus::NotAllSucceeded)
    }
}

/// One cell of a merged matrix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GridCell {
    pub id: String,
    pub host: String,
    pub backend: String,
    pub paging: String,
    pub workloads: String,
    pub repeat: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    pub status: CellStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    pub records: usize,
    /// `run_id`s of its records (one `hvbench run`).
    #[serde(default)]
    pub run_ids: Vec<String>,
    /// Short hash of the host fingerprint its records carry (see [`host_identity`]).
    #[serde(default)]
    pub fingerprint: String,
    #[serde(default)]
    pub git_revision: String,
    /// Which bundle held it.
    #[serde(default)]
    pub bundle: String,
    /// Its `hvbench run` output, relative to the merged directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixSummary {
    pub name: String,
    pub plan_id: String,
    #[serde(default)]
    pub revisions: Vec<String>,
    pub cells: Vec<GridCell>,
    /// What merge found wrong (missing cells, failed cells) and let through.
    #[serde(default)]
    pub notes: Vec<String>,
}

impl MatrixSummary {
    /// `matrix.json` of `dir`, or `None` where the directory is not a merged matrix.
    pub fn read(dir: &Path) -> Result<Option<MatrixSummary>, ResultsError> {
        let path = dir.join(MATRIX_SUMMARY_NAME);
        let io = |source| ResultsError::Read {
            path: path.clone(),
            source,
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        if meta.len() > MAX_SUMMARY_BYTES {
            return Err(io(std::io::Error::other("larger than 256 MiB")));
        }
        let text = std::fs::read(&path).map_err(io)?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| io(std::io::Error::other(e)))
    }

    /// The like-with-like label of every record of a cell, by `run_id`: host label,
    /// backend, paging and host fingerprint.
    pub fn labels_by_run(&self) -> BTreeMap<&str, String> {
        let mut map = BTreeMap::new();
        for c in &self.cells {
            let label = format!("{} {} {} [{}]", c.host, c.backend, c.paging, c.fingerprint);
            for r in &c.run_ids {
                map.insert(r.as_str(), label.clone());
            }
        }
        map
    }
}

/// What makes two hosts alike for a comparison: class, CPU, kernel, KVM module, paging,
/// how CPL0 runs. Not the hostname (a fleet has many hosts of one label) nor the TSC
/// calibration (it varies by a few kHz between boots).
pub fn host_identity(record: &Record) -> String {
    let h = &record.host;
    [
        h.class.as_str(),
        &h.cpu_vendor,
        &h.cpu_model,
        &h.cpus.to_string(),
        &h.kernel,
        &h.kvm_module,
        &h.paging,
        &h.cpl0,
    ]
    .join("\u{1f}")
}
