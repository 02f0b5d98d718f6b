//! `hvbench merge BUNDLE... --out DIR`: checks the bundles against their plan (every cell
//! present exactly once, nothing foreign, one revision per revision label, one record
//! schema) and writes one results directory with `matrix.json` beside the records.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use reports::matrix::{host_identity, CellStatus, GridCell, MatrixSummary, MATRIX_SUMMARY_NAME};
use reports::{Record, ResultsError, ResultsWriter};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::bundle::{cell_dir, cell_log, BundleError, CellRun, Manifest};
use crate::plan::{Cell, Plan};

#[derive(Clone, Debug, Default)]
pub struct MergeOptions {
    /// Go on when planned cells are missing (or were interrupted before they ended).
    pub allow_missing: bool,
    /// Merge records of different hvbench revisions under one revision label.
    pub allow_mixed_revisions: bool,
    /// Merge records of different record schemas.
    pub allow_mixed_schemas: bool,
    /// The plan to check against (from the matrix file); default: the first bundle's.
    pub plan: Option<Plan>,
}

/// Something wrong with the set of bundles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// Planned, and in no bundle that ran it to an end.
    Missing {
        cell: String,
        what: String,
        last: Option<(CellStatus, String)>,
    },
    /// Run in more than one bundle.
    Duplicated { cell: String, bundles: Vec<String> },
    /// In a bundle, not in the plan.
    Foreign { cell: String, bundle: String },
    /// A bundle of another plan.
    OtherPlan {
        bundle: String,
        plan_id: String,
        expected: String,
    },
    /// Records of one revision label from several hvbench revisions.
    MixedRevisions {
        label: String,
        revisions: Vec<String>,
    },
    /// Records of several schemas.
    MixedSchemas { schemas: Vec<u32> },
    /// A cell that ran and failed (kept: its status is in the grid).
    Failed {
        cell: String,
        status: CellStatus,
        bundle: String,
    },
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Missing { cell, what, last: None } => {
                write!(f, "missing cell {cell} ({what}): in no bundle")
            }
            Finding::Missing { cell, what, last: Some((status, bundle)) } => write!(
                f,
                "missing cell {cell} ({what}): {} in {bundle}, never ended",
                status.name()
            ),
            Finding::Duplicated { cell, bundles } => {
                write!(f, "duplicated cell {cell}: in {}", bundles.join(" and "))
            }
            Finding::Foreign { cell, bundle } => {
                write!(f, "foreign cell {cell} in {bundle}: not in the plan")
            }
            Finding::OtherPlan { bundle, plan_id, expected } => write!(
                f,
                "{bundle} is of plan {plan_id}, not {expected}: its matrix file differs"
            ),
            Finding::MixedRevisions { label, revisions } => write!(
                f,
                "records of {label} come from several hvbench revisions: {} (--allow-mixed-revisions to merge them)",
                revisions.join(", ")
            ),
            Finding::MixedSchemas { schemas } => write!(
                f,
                "records of several schemas: {:?} (--allow-mixed-schemas to merge them)",
                schemas
            ),
            Finding::Failed { cell, status, bundle } => {
                write!(f, "cell {cell} {} in {bundle}", status.name())
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum MergeError {
    #[error("no bundles to merge")]
    NoBundles,
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("the bundles do not make one matrix:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Refused(Vec<Finding>),
    #[error("{cell} in {bundle}: {source}")]
    Records {
        cell: String,
        bundle: String,
        source: ResultsError,
    },
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What a merge wrote and put up with.
#[derive(Debug)]
pub struct Merged {
    pub summary: MatrixSummary,
    pub records: usize,
    /// Findings let through (missing cells with `allow_missing`, failed cells).
    pub findings: Vec<Finding>,
    /// Lines the record reader skipped.
    pub warnings: Vec<String>,
}

/// One cell's place in the merge: the bundle that ran it and how it went.
struct Present<'a> {
    bundle: &'a Path,
    run: &'a CellRun,
}

/// Merges `bundles` into `out`, refusing (before writing anything) what `options` does
/// not allow.
pub fn merge(
    bundles: &[PathBuf],
    out: &Path,
    options: &MergeOptions,
) -> Result<Merged, MergeError> {
    if bundles.is_empty() {
        return Err(MergeError::NoBundles);
    }
    let manifests: Vec<Manifest> = bundles
        .iter()
        .map(|b| Manifest::read(b))
        .collect::<Result<_, _>>()?;
    let plan = options
        .plan
        .clone()
        .unwrap_or_else(|| manifests[0].plan.clone());
    let (present, mut findings) = place_cells(&plan, bundles, &manifests);
    let mut records: Vec<(usize, Vec<Record>)> = Vec::new();
    let mut warnings = Vec::new();
    for (i, cell) in plan.cells.iter().enumerate() {
        if let Some(p) = present.get(&cell.id) {
            let dir = cell_dir(p.bundle, &cell.id);
            if !dir.join(reports::results::JSONL_NAME).exists() {
                continue;
            }
            let read = reports::read_results_with_warnings(&dir).or_else(|e| match e {
                ResultsError::Empty { .. } => Ok(reports::ResultsRead {
                    records: vec![],
                    warnings: vec![],
                }),
                e => Err(e),
            });
            let read = read.map_err(|source| MergeError::Records {
                cell: cell.id.clone(),
                bundle: p.bundle.display().to_string(),
                source,
            })?;
            warnings.extend(read.warnings.iter().map(ToString::to_string));
            records.push((i, read.records));
        }
    }
    findings.extend(revision_findings(&plan, &manifests, &records));
    findings.extend(schema_findings(&manifests, &records));
    let fatal: Vec<Finding> = findings
        .iter()
        .filter(|f| match f {
            Finding::Missing { .. } => !options.allow_missing,
            Finding::MixedRevisions { .. } => !options.allow_mixed_revisions,
            Finding::MixedSchemas { .. } => !options.allow_mixed_schemas,
            Finding::Failed { .. } => false,
            Finding::Duplicated { .. } | Finding::Foreign { .. } | Finding::OtherPlan { .. } => {
                true
            }
        })
        .cloned()
        .collect();
    if !fatal.is_empty() {
        return Err(MergeError::Refused(fatal));
    }
    let summary = summarize(&plan, &present, &records, &findings);
    let total = write_out(out, &plan, &present, &records, &summary)?;
    Ok(Merged {
        summary,
        records: total,
        findings,
        warnings,
    })
}

/// Which bundle ran each cell to an end, and what is missing, duplicated or foreign.
fn place_cells<'a>(
    plan: &Plan,
    bundles: &'a [PathBuf],
    manifests: &'a [Manifest],
) -> (BTreeMap<String, Present<'a>>, Vec<Finding>) {
    let planned: BTreeSet<&str> = plan.cells.iter().map(|c| c.id.as_str()).collect();
    let mut findings = Vec::new();
    let mut ended: BTreeMap<String, Vec<Present<'a>>> = BTreeMap::new();
    let mut unended: BTreeMap<&str, (CellStatus, String)> = BTreeMap::new();
    for (bundle, manifest) in bundles.iter().zip(manifests) {
        let name = bundle.display().to_string();
        if manifest.plan.plan_id != plan.plan_id {
            findings.push(Finding::OtherPlan {
                bundle: name.clone(),
                plan_id: manifest.plan.plan_id.clone(),
                expected: plan.plan_id.clone(),
            });
        }
        for run in &manifest.cells {
            if !planned.contains(run.id.as_str()) {
                findings.push(Finding::Foreign {
                    cell: run.id.clone(),
                    bundle: name.clone(),
                });
            } else if matches!(run.status, CellStatus::Pending | CellStatus::Running) {
                unended.insert(&run.id, (run.status, name.clone()));
            } else {
                ended
                    .entry(run.id.clone())
                    .or_default()
                    .push(Present { bundle, run });
            }
        }
    }
    let mut present = BTreeMap::new();
    for cell in &plan.cells {
        match ended.remove(&cell.id) {
            None => findings.push(Finding::Missing {
                cell: cell.id.clone(),
                what: describe(cell),
                last: unended.get(cell.id.as_str()).cloned(),
            }),
            Some(mut runs) if runs.len() > 1 => findings.push(Finding::Duplicated {
                cell: cell.id.clone(),
                bundles: runs
                    .drain(..)
                    .map(|p| p.bundle.display().to_string())
                    .collect(),
            }),
            Some(mut runs) => {
                let p = runs.remove(0);
                if !p.run.status.completed() {
                    findings.push(Finding::Failed {
                        cell: cell.id.clone(),
                        status: p.run.status,
                        bundle: p.bundle.display().to_string(),
                    });
                }
                present.insert(cell.id.clone(), p);
            }
        }
    }
    (present, findings)
}

/// `host backend paging workloads rN [rev R]`.
pub fn describe(cell: &Cell) -> String {
    format!(
        "{} {} {} {} r{}{}",
        cell.host,
        cell.backend,
        cell.paging,
        cell.workloads,
        cell.repeat,
        cell.revision
            .as_deref()
            .map(|r| format!(" rev {r}"))
            .unwrap_or_default()
    )
}

fn revision_findings(
    plan: &Plan,
    manifests: &[Manifest],
    records: &[(usize, Vec<Record>)],
) -> Vec<Finding> {
    let mut by_label: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, rs) in records {
        let label = plan.cells[*i]
            .revision
            .clone()
            .unwrap_or_else(|| "the matrix".into());
        let set = by_label.entry(label).or_default();
        set.extend(rs.iter().map(|r| r.hvbench.git_revision.clone()));
    }
    if plan.revisions.is_empty() {
        // One revision: the bundles' own hvbench too.
        let set = by_label.entry("the matrix".into()).or_default();
        set.extend(manifests.iter().map(|m| m.hvbench.git_revision.clone()));
    }
    by_label
        .into_iter()
        .filter(|(_, set)| set.len() > 1)
        .map(|(label, set)| Finding::MixedRevisions {
            label,
            revisions: set.into_iter().collect(),
        })
        .collect()
}

fn schema_findings(manifests: &[Manifest], records: &[(usize, Vec<Record>)]) -> Vec<Finding> {
    let mut schemas: BTreeSet<u32> = manifests.iter().map(|m| m.record_schema).collect();
    schemas.extend(
        records
            .iter()
            .flat_map(|(_, rs)| rs.iter().map(|r| r.schema)),
    );
    if schemas.len() > 1 {
        vec![Finding::MixedSchemas {
            schemas: schemas.into_iter().collect(),
        }]
    } else {
        vec![]
    }
}

/// Short hash of the host identities a cell's records carry.
fn fingerprint(records: &[Record]) -> String {
    let ids: BTreeSet<String> = records.iter().map(host_identity).collect();
    ids.iter()
        .map(|id| {
            Sha256::digest(id.as_bytes())
                .iter()
                .take(4)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("+")
}

fn summarize(
    plan: &Plan,
    present: &BTreeMap<String, Present<'_>>,
    records: &[(usize, Vec<Record>)],
    findings: &[Finding],
) -> MatrixSummary {
    let by_cell: BTreeMap<usize, &Vec<Record>> = records.iter().map(|(i, r)| (*i, r)).collect();
    let cells = plan
        .cells
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let rs: &[Record] = by_cell.get(&i).map_or(&[], |r| r.as_slice());
            let p = present.get(&c.id);
            let run_ids: BTreeSet<&str> = rs.iter().map(|r| r.run_id.as_str()).collect();
            let revisions: BTreeSet<&str> =
                rs.iter().map(|r| r.hvbench.git_revision.as_str()).collect();
            GridCell {
                id: c.id.clone(),
                host: c.host.clone(),
                backend: c.backend.clone(),
                paging: c.paging.name().into(),
                workloads: c.workloads.clone(),
                repeat: c.repeat,
                revision: c.revision.clone(),
                status: p.map_or(CellStatus::Missing, |p| p.run.status),
                exit_code: p.and_then(|p| p.run.exit_code),
                records: rs.len(),
                run_ids: run_ids.into_iter().map(String::from).collect(),
                fingerprint: fingerprint(rs),
                git_revision: revisions.into_iter().collect::<Vec<_>>().join(","),
                bundle: p
                    .map(|p| p.bundle.display().to_string())
                    .unwrap_or_default(),
                log: p
                    .filter(|p| cell_log(p.bundle, &c.id).exists())
                    .map(|_| format!("cells/{}.log", c.id)),
            }
        })
        .collect();
    MatrixSummary {
        name: plan.name.clone(),
        plan_id: plan.plan_id.clone(),
        revisions: plan.revisions.clone(),
        cells,
        notes: findings.iter().map(ToString::to_string).collect(),
    }
}

fn write_out(
    out: &Path,
    plan: &Plan,
    present: &BTreeMap<String, Present<'_>>,
    records: &[(usize, Vec<Record>)],
    summary: &MatrixSummary,
) -> Result<usize, MergeError> {
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| MergeError::Write { path, source }
    };
    let all: Vec<Record> = records
        .iter()
        .flat_map(|(_, r)| r.iter().cloned())
        .collect();
    ResultsWriter::create(out, false)?.write_batch(&all)?;
    for label in &plan.revisions {
        let mine: Vec<Record> = records
            .iter()
            .filter(|(i, _)| plan.cells[*i].revision.as_ref() == Some(label))
            .flat_map(|(_, r)| r.iter().cloned())
            .collect();
        ResultsWriter::create(&out.join("revisions").join(label), false)?.write_batch(&mine)?;
    }
    let cells_dir = out.join("cells");
    std::fs::create_dir_all(&cells_dir).map_err(write_error(&cells_dir))?;
    for (id, p) in present {
        let log = cell_log(p.bundle, id);
        if log.exists() {
            let to = cells_dir.join(format!("{id}.log"));
            std::fs::copy(&log, &to).map_err(write_error(&to))?;
        }
    }
    let path = out.join(MATRIX_SUMMARY_NAME);
    let json = serde_json::to_vec_pretty(summary).map_err(|e| MergeError::Write {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&path, json).map_err(write_error(&path))?;
    Ok(all.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::run_bundle;
    use crate::bundle::tests::{info, Fake};
    use crate::plan::tests::{plan_of, SMALL};

    /// The plan run as `n` shards, one bundle each.
    fn shards(plan: &Plan, n: usize, root: &Path, fake: &mut Fake) -> Vec<PathBuf> {
        plan.shards(n)
            .unwrap()
            .iter()
            .map(|s| {
                let dir = root.join(s.bundle_name());
                run_bundle(plan, &s.cells, &dir, info(&s.name()), fake, &mut |_| {}).unwrap();
                dir
            })
            .collect()
    }

    fn refused(result: Result<Merged, MergeError>) -> Vec<Finding> {
        match result {
            Err(MergeError::Refused(f)) => f,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn shards_merge_into_every_record_once() {
        let plan = plan_of(SMALL);
        let tmp = tempfile::tempdir().unwrap();
        let bundles = shards(&plan, 3, tmp.path(), &mut Fake::new());
        let out = tmp.path().join("out");
        let merged = merge(&bundles, &out, &MergeOptions::default()).unwrap();
        assert_eq!(merged.records, plan.cells.len());
        assert!(merged.findings.is_empty(), "{:?}", merged.findings);
        let records = reports::read_results(&out).unwrap();
        let runs: BTreeSet<&str> = records.iter().map(|r| r.run_id.as_str()).collect();
        let expected: BTreeSet<String> =
            plan.cells.iter().map(|c| format!("run-{}", c.id)).collect();
        assert_eq!(runs, expected.iter().map(String::as_str).collect());
        let summary = MatrixSummary::read(&out).unwrap().unwrap();
        assert_eq!(summary.cells.len(), plan.cells.len());
        assert!(summary
            .cells
            .iter()
            .all(|c| c.status == CellStatus::Succeeded && c.records == 1));
        assert!(out.join(summary.cells[0].log.as_deref().unwrap()).exists());
        // A second merge into the same directory is refused, not mixed.
        assert!(matches!(
            merge(&bundles, &out, &MergeOptions::default()),
            Err(MergeError::Results(_))
        ));
    }

    #[test]
    fn missing_and_interrupted_cells_are_named() {
        let plan = plan_of(SMALL);
        let tmp = tempfile::tempdir().unwrap();
        let mut fake = Fake::new();
        let mut bundles = shards(&plan, 3, tmp.path(), &mut fake);
        // Shard 2 lost entirely; shard 3 killed after its first cell.
        let lost = bundles.remove(1);
        let s3 = plan.shard("3/3").unwrap();
        let mut m = Manifest::read(&bundles[1]).unwrap();
        for run in &mut m.cells[1..] {
            run.status = CellStatus::Pending;
        }
        m.cells[1].status = CellStatus::Running;
        m.write(&bundles[1]).unwrap();
        let findings = refused(merge(
            &bundles,
            &tmp.path().join("o1"),
            &MergeOptions::default(),
        ));
        let lost_ids: BTreeSet<String> = Manifest::read(&lost)
            .unwrap()
            .cells
            .iter()
            .map(|c| c.id.clone())
            .collect();
        let missing: BTreeSet<String> = findings
            .iter()
            .filter_map(|f| match f {
                Finding::Missing { cell, .. } => Some(cell.clone()),
                _ => None,
            })
            .collect();
        let mut expected = lost_ids.clone();
        expected.extend(s3.cells[1..].iter().map(|&i| plan.cells[i].id.clone()));
        assert_eq!(missing, expected);
        let text = MergeError::Refused(findings).to_string();
        assert!(
            text.contains("running in") && text.contains("in no bundle"),
            "{text}"
        );
        // --allow-missing goes on, and the grid says which are missing.
        let options = MergeOptions {
            allow_missing: true,
            ..Default::default()
        };
        let merged = merge(&bundles, &tmp.path().join("o2"), &options).unwrap();
        let grid_missing = merged
            .summary
            .cells
            .iter()
            .filter(|c| c.status == CellStatus::Missing)
            .count();
        assert_eq!(grid_missing, expected.len());
        assert_eq!(merged.records, plan.cells.len() - expected.len());
    }

    #[test]
    fn duplicated_foreign_and_other_plans_are_refused() {
        let plan = plan_of(SMALL);
        let tmp = tempfile::tempdir().unwrap();
        let mut bundles = shards(&plan, 2, tmp.path(), &mut Fake::new());
        bundles.push(bundles[0].clone());
        let f = refused(merge(
            &bundles,
            &tmp.path().join("o"),
            &MergeOptions::default(),
        ));
        assert!(f.iter().all(|f| matches!(f, Finding::Duplicated { .. })) && !f.is_empty());
        bundles.pop();
        let other = plan_of(&SMALL.replace("samples = 3", "samples = 4"));
        let odd = tmp.path().join("odd");
        run_bundle(
            &other,
            &[0],
            &odd,
            info("cell"),
            &mut Fake::new(),
            &mut |_| {},
        )
        .unwrap();
        bundles.push(odd);
        let f = refused(merge(
            &bundles,
            &tmp.path().join("o"),
            &MergeOptions::default(),
        ));
        assert!(f.iter().any(|f| matches!(f, Finding::OtherPlan { .. })));
        assert!(f
            .iter()
            .any(|f| matches!(f, Finding::Foreign { cell, .. } if *cell == other.cells[0].id)));
        assert!(
            !tmp.path().join("o").exists(),
            "nothing written when refused"
        );
    }

    #[test]
    fn mixed_revisions_are_refused_unless_asked() {
        let plan = plan_of(SMALL);
        let tmp = tempfile::tempdir().unwrap();
        let s = plan.shards(2).unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        run_bundle(
            &plan,
            &s[0].cells,
            &a,
            info("1/2"),
            &mut Fake::new(),
            &mut |_| {},
        )
        .unwrap();
        let mut other = Fake::new();
        other.git_revision = "rev2".into();
        run_bundle(&plan, &s[1].cells, &b, info("2/2"), &mut other, &mut |_| {}).unwrap();
        let f = refused(merge(
            &[a.clone(), b.clone()],
            &tmp.path().join("o"),
            &MergeOptions::default(),
        ));
        assert_eq!(
            f,
            [Finding::MixedRevisions {
                label: "the matrix".into(),
                revisions: vec!["rev1".into(), "rev2".into()]
            }]
        );
        let options = MergeOptions {
            allow_mixed_revisions: true,
            ..Default::default()
        };
        merge(&[a, b], &tmp.path().join("o"), &options).unwrap();
    }

    #[test]
    fn interleaved_revisions_merge_into_one_directory_each() {
        let plan = plan_of(&format!(
            "{SMALL}\n[interleave]\nrevisions = [\"base\", \"new\"]\n"
        ));
        let tmp = tempfile::tempdir().unwrap();
        let bundles = shards(&plan, 2, tmp.path(), &mut Fake::new());
        let out = tmp.path().join("out");
        merge(&bundles, &out, &MergeOptions::default()).unwrap();
        for label in ["base", "new"] {
            let records = reports::read_results(&out.join("revisions").join(label)).unwrap();
            assert_eq!(records.len(), plan.cells.len() / 2);
            assert!(records
                .iter()
                .all(|r| r.hvbench.git_revision == format!("rev1-{label}")));
        }
    }

    #[test]
    fn failed_cells_stay_in_the_grid() {
        let plan = plan_of(SMALL);
        let tmp = tempfile::tempdir().unwrap();
        let mut fake = Fake::new();
        fake.fail = vec![plan.cells[0].id.clone()];
        let bundles = shards(&plan, 2, tmp.path(), &mut fake);
        let merged = merge(&bundles, &tmp.path().join("o"), &MergeOptions::default()).unwrap();
        assert_eq!(merged.summary.cells[0].status, CellStatus::Failed);
        assert!(matches!(&merged.findings[..], [Finding::Failed { .. }]));
    }

    /// Two merged matrices of one host label: NEW twice as slow is a regression, found
    /// cell for cell; a host whose fingerprint changed is not compared at all.
    #[test]
    fn the_gate_compares_like_with_like() {
        let text = SMALL.replace("repeats = 2", "repeats = 8");
        let plan = plan_of(&text);
        let tmp = tempfile::tempdir().unwrap();
        let merged = |name: &str, fake: &mut Fake| {
            let root = tmp.path().join(name);
            let bundles = shards(&plan, 2, &root, fake);
            let out = root.join("merged");
            merge(&bundles, &out, &MergeOptions::default()).unwrap();
            out
        };
        let base = merged("base", &mut Fake::new());
        let mut slower = Fake::new();
        slower.scale = 2.0;
        let new = merged("new", &mut slower);
        let options = reports::compare::CompareOptions::default();
        let c = reports::compare::compare(&base, &new, &options).unwrap();
        assert!(c.has_regression(), "{}", c.render_table());
        assert!(c
            .rows
            .iter()
            .all(|r| r.backend.starts_with("pvm ") || r.backend.starts_with("dom0 ")));
        // Same label and backend, another CPU: nothing compared, and the note says why.
        let mut moved = Fake::new();
        moved.scale = 2.0;
        moved.cpu_model = "another".into();
        let other = merged("other", &mut moved);
        let c = reports::compare::compare(&base, &other, &options).unwrap();
        assert!(c.rows.is_empty() && !c.has_regression());
        assert!(
            c.notes.iter().any(|n| n.contains("fingerprint differs")),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn the_report_draws_the_grid() {
        let plan = plan_of(SMALL);
        let tmp = tempfile::tempdir().unwrap();
        let mut fake = Fake::new();
        fake.fail = vec![plan.cells[0].id.clone()];
        let mut bundles = shards(&plan, 3, tmp.path(), &mut fake);
        bundles.pop();
        let out = tmp.path().join("merged");
        let options = MergeOptions {
            allow_missing: true,
            ..Default::default()
        };
        merge(&bundles, &out, &options).unwrap();
        let report = tmp.path().join("report");
        let options = reports::report::ReportOptions {
            sample_charts: false,
            ..Default::default()
        };
        reports::report::render(&[out], &report, &options).unwrap();
        let page = std::fs::read_to_string(report.join("index.html")).unwrap();
        assert!(page.contains("id=\"matrix\"") && page.contains("Matrix t"));
        assert!(
            page.contains(">failed<") && page.contains(">missing<") && page.contains(">succeeded<")
        );
        let log = format!("cells/{}.log", plan.cells[1].id);
        assert!(
            page.contains(&log) && report.join(&log).exists(),
            "logs linked and copied"
        );
        assert!(page.contains("kvm · paging shadow"));
    }
}
