//! A bundle: what one job (`hvbench run --cell ID` or `--shard K/N`) leaves behind.
//!
//! ```text
//! BUNDLE/manifest.json         the plan, this part's cells with status, exit code, times
//! BUNDLE/cells/ID/results.*    each cell's records (an ordinary results directory)
//! BUNDLE/cells/ID.log          each cell's `hvbench run` output
//! ```
//!
//! The manifest is written before the first cell starts (every cell `pending`) and again,
//! atomically, as each cell starts and ends, so a killed job leaves a manifest that says
//! which cell was running and which never started: no cell goes silently missing.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use reports::matrix::CellStatus;
use reports::record::HostInfo;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::plan::{Cell, Plan};

pub const MANIFEST_NAME: &str = "manifest.json";
/// Version of the bundle layout; merge refuses others.
pub const BUNDLE_FORMAT: u32 = 1;
/// Largest manifest read (a plan of the largest size, with every cell's command).
const MAX_MANIFEST_BYTES: u64 = 256 << 20;

#[derive(Debug, Error)]
pub enum BundleError {
    #[error("{path} already holds a bundle: choose another directory")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the bundle manifest {path}: {message}")]
    Read { path: PathBuf, message: String },
}

/// The hvbench that ran a bundle.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolRef {
    pub version: String,
    pub git_revision: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// `cell ID`, `shard K/N` or `local` (`hvbench matrix run`).
    pub part: String,
    pub plan: Plan,
    pub hvbench: ToolRef,
    /// The record schema this hvbench writes.
    pub record_schema: u32,
    /// The machine that ran the job (a Xen cell's records carry the dom0's).
    pub host: HostInfo,
    pub started: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    pub cells: Vec<CellRun>,
}

/// One cell of the part, as far as it got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellRun {
    pub id: String,
    pub status: CellStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// Records in its results directory when it ended.
    #[serde(default)]
    pub records: usize,
    /// Why it failed, where the command could not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// How one cell's command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellOutcome {
    /// `None`: it could not start, or died by a signal.
    pub exit_code: Option<i32>,
    pub message: Option<String>,
}

/// Runs cells for [`run_bundle`]: the harness spawns `hvbench`; tests fake it.
pub trait Executor {
    /// Runs `cell`, its records into `out`, its output into `log`.
    fn run(&mut self, cell: &Cell, out: &Path, log: &Path) -> CellOutcome;
    /// Now, RFC 3339.
    fn now(&self) -> String;
    /// Whether the user asked to stop (no further cell starts).
    fn cancelled(&self) -> bool;
}

/// The results directory of cell `id` in bundle `dir`.
pub fn cell_dir(dir: &Path, id: &str) -> PathBuf {
    dir.join("cells").join(id)
}

/// The output log of cell `id` in bundle `dir`.
pub fn cell_log(dir: &Path, id: &str) -> PathBuf {
    dir.join("cells").join(format!("{id}.log"))
}

impl Manifest {
    /// Writes `dir/manifest.json` atomically (a temporary file renamed over it).
    pub fn write(&self, dir: &Path) -> Result<(), BundleError> {
        let path = dir.join(MANIFEST_NAME);
        let tmp = dir.join(format!("{MANIFEST_NAME}.tmp"));
        let error = |source| BundleError::Write {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| error(std::io::Error::other(e)))?;
        let mut file = std::fs::File::create(&tmp).map_err(error)?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(error)?;
        std::fs::rename(&tmp, &path).map_err(error)
    }

    /// Reads `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest, BundleError> {
        let path = dir.join(MANIFEST_NAME);
        let error = |message: String| BundleError::Read {
            path: path.clone(),
            message,
        };
        let len = std::fs::metadata(&path)
            .map_err(|e| error(e.to_string()))?
            .len();
        if len > MAX_MANIFEST_BYTES {
            return Err(error("larger than 256 MiB".into()));
        }
        let bytes = std::fs::read(&path).map_err(|e| error(e.to_string()))?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|e| error(e.to_string()))?;
        if manifest.format != BUNDLE_FORMAT {
            return Err(error(format!(
                "bundle format {} (this hvbench reads {BUNDLE_FORMAT})",
                manifest.format
            )));
        }
        Ok(manifest)
    }
}

/// What a bundle says about the job that wrote it.
#[derive(Clone, Debug)]
pub struct BundleInfo {
    pub part: String,
    pub hvbench: ToolRef,
    pub host: HostInfo,
}

/// Runs `cells` (indices into `plan.cells`, in order) into the bundle `dir`, keeping its
/// manifest true at every step. Stops starting cells once the executor is cancelled or a
/// cell was interrupted; those left are `pending` in the manifest.
pub fn run_bundle(
    plan: &Plan,
    cells: &[usize],
    dir: &Path,
    info: BundleInfo,
    exec: &mut dyn Executor,
    progress: &mut dyn FnMut(&str),
) -> Result<Manifest, BundleError> {
    if dir.join(MANIFEST_NAME).exists() {
        return Err(BundleError::Exists {
            path: dir.to_path_buf(),
        });
    }
    std::fs::create_dir_all(dir.join("cells")).map_err(|source| BundleError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut manifest = Manifest {
        format: BUNDLE_FORMAT,
        part: info.part,
        plan: plan.clone(),
        hvbench: info.hvbench,
        record_schema: reports::record::SCHEMA_VERSION,
        host: info.host,
        started: exec.now(),
        ended: None,
        cells: cells
            .iter()
            .map(|&i| CellRun {
                id: plan.cells[i].id.clone(),
                status: CellStatus::Pending,
                exit_code: None,
                started: None,
                ended: None,
                records: 0,
                message: None,
            })
            .collect(),
    };
    manifest.write(dir)?;
    for (n, &i) in cells.iter().enumerate() {
        if exec.cancelled() {
            progress("stopped: the remaining cells stay pending");
            break;
        }
        let cell = &plan.cells[i];
        progress(&format!(
            "[{}/{}] {} {} {} {} r{}{}",
            n + 1,
            cells.len(),
            cell.id,
            cell.backend,
            cell.paging,
            cell.workloads,
            cell.repeat,
            cell.revision
                .as_deref()
                .map(|r| format!(" rev {r}"))
                .unwrap_or_default()
        ));
        manifest.cells[n].status = CellStatus::Running;
        manifest.cells[n].started = Some(exec.now());
        manifest.write(dir)?;
        let out = cell_dir(dir, &cell.id);
        let outcome = exec.run(cell, &out, &cell_log(dir, &cell.id));
        let run = &mut manifest.cells[n];
        run.ended = Some(exec.now());
        run.exit_code = outcome.exit_code;
        run.status = outcome
            .exit_code
            .map_or(CellStatus::Failed, CellStatus::of_exit);
        run.message = outcome.message;
        run.records = count_records(&out);
        progress(&format!(
            "[{}/{}] {}: {} ({} records)",
            n + 1,
            cells.len(),
            cell.id,
            run.status.name(),
            run.records
        ));
        let interrupted = run.status == CellStatus::Interrupted;
        manifest.write(dir)?;
        if interrupted {
            progress("interrupted: the remaining cells stay pending");
            break;
        }
    }
    manifest.ended = Some(exec.now());
    manifest.write(dir)?;
    Ok(manifest)
}

/// Lines of a cell's `results.jsonl` (0 where it wrote none).
fn count_records(out: &Path) -> usize {
    std::fs::read(out.join(reports::results::JSONL_NAME))
        .map(|b| b.split(|&c| c == b'\n').filter(|l| !l.is_empty()).count())
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell as Flag;

    use super::*;
    use crate::plan::tests::{plan_of, SMALL};

    /// Writes one synthetic record per cell (or fails chosen cells), as `hvbench run`.
    pub(crate) struct Fake {
        pub fail: Vec<String>,
        pub interrupt: Vec<String>,
        pub git_revision: String,
        pub cancel_after: Option<usize>,
        pub ran: Flag<usize>,
        /// Multiplies every sample (a slower build).
        pub scale: f64,
        pub cpu_model: String,
    }

    impl Fake {
        pub(crate) fn new() -> Fake {
            Fake {
                fail: vec![],
                interrupt: vec![],
                git_revision: "rev1".into(),
                cancel_after: None,
                ran: Flag::new(0),
                scale: 1.0,
                cpu_model: "cpu".into(),
            }
        }
    }

    impl Executor for Fake {
        fn run(&mut self, cell: &Cell, out: &Path, log: &Path) -> CellOutcome {
            self.ran.set(self.ran.get() + 1);
            std::fs::write(log, format!("ran {}\n", cell.id)).unwrap();
            if self.fail.contains(&cell.id) {
                return CellOutcome {
                    exit_code: Some(2),
                    message: None,
                };
            }
            let mut writer = reports::ResultsWriter::create(out, false).unwrap();
            // Each run a little different, as boots are.
            let base = 100.0 + f64::from(cell.repeat) * 0.5;
            let samples: Vec<f64> = [base, base + 1.0, base + 2.0]
                .map(|s| s * self.scale)
                .to_vec();
            let mut r = reports::synthetic::record(cell.kind.name(), "cpu.cpuid", &samples);
            r.host.cpu_model = self.cpu_model.clone();
            r.run_id = format!("run-{}", cell.id);
            r.hvbench.git_revision = cell
                .revision
                .as_ref()
                .map_or(self.git_revision.clone(), |l| {
                    format!("{}-{l}", self.git_revision)
                });
            writer.write(&r).unwrap();
            let code = if self.interrupt.contains(&cell.id) {
                130
            } else {
                0
            };
            CellOutcome {
                exit_code: Some(code),
                message: None,
            }
        }
        fn now(&self) -> String {
            "2026-12-05T00:00:00Z".into()
        }
        fn cancelled(&self) -> bool {
            self.cancel_after.is_some_and(|n| self.ran.get() >= n)
        }
    }

    pub(crate) fn info(part: &str) -> BundleInfo {
        BundleInfo {
            part: part.into(),
            hvbench: ToolRef {
                version: "0.1.0".into(),
                git_revision: "rev1".into(),
            },
            host: HostInfo::default(),
        }
    }

    #[test]
    fn a_bundle_records_every_cell_with_its_status() {
        let plan = plan_of(SMALL);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("b");
        let mut fake = Fake::new();
        fake.fail = vec![plan.cells[1].id.clone()];
        fake.interrupt = vec![plan.cells[2].id.clone()];
        let m = run_bundle(
            &plan,
            &[0, 1, 2, 3],
            &dir,
            info("shard 1/2"),
            &mut fake,
            &mut |_| {},
        )
        .unwrap();
        let statuses: Vec<CellStatus> = m.cells.iter().map(|c| c.status).collect();
        assert_eq!(
            statuses,
            [
                CellStatus::Succeeded,
                CellStatus::Failed,
                CellStatus::Interrupted,
                CellStatus::Pending
            ]
        );
        assert_eq!(m.cells[0].records, 1);
        assert_eq!(m.cells[1].exit_code, Some(2));
        assert_eq!(
            Manifest::read(&dir).unwrap(),
            m,
            "the manifest on disk is the last word"
        );
        assert!(cell_log(&dir, &plan.cells[1].id).exists());
        // A second run into the same directory is refused.
        let again = run_bundle(&plan, &[0], &dir, info("x"), &mut Fake::new(), &mut |_| {});
        assert!(matches!(again, Err(BundleError::Exists { .. })));
    }

    #[test]
    fn cancelling_leaves_the_rest_pending() {
        let plan = plan_of(SMALL);
        let tmp = tempfile::tempdir().unwrap();
        let mut fake = Fake::new();
        fake.cancel_after = Some(2);
        let m = run_bundle(
            &plan,
            &[0, 1, 2],
            tmp.path(),
            info("local"),
            &mut fake,
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(m.cells[2].status, CellStatus::Pending);
        assert_eq!(fake.ran.get(), 2);
    }
}
