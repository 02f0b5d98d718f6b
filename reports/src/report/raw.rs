//! Copies of the raw results beside the page, so a report directory stands alone.

use std::collections::BTreeSet;
use std::path::Path;

use super::error::ReportError;
use super::model::Input;

use crate::format;
use crate::results::{CSV_NAME, JSONL_NAME};

/// The copies of one input's raw files, named relative to the report directory.
#[derive(Clone, Debug)]
pub(crate) struct RawCopy {
    pub input: usize,
    pub jsonl: String,
    pub csv: Option<String>,
}

pub(super) fn copy_raw_files(
    inputs: &[Input],
    backends: &[String],
    out: &Path,
) -> Result<Vec<RawCopy>, ReportError> {
    let mut used = BTreeSet::new();
    let mut copies = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let kinds: BTreeSet<&str> = input
            .records
            .iter()
            .map(|r| r.backend.kind.as_str())
            .collect();
        let mut kinds: Vec<&str> = kinds.into_iter().collect();
        kinds.sort_by_key(|k| backends.iter().position(|b| b == k));
        let base = format::slug(&kinds.join("+"), 40);
        let mut stem = base.clone();
        let mut n = 2;
        while !used.insert(stem.clone()) {
            stem = format!("{base}-{n}");
            n += 1;
        }
        let copy = |name: &str, target: String| -> Result<Option<String>, ReportError> {
            let from = input.dir.join(name);
            if !from.is_file() {
                return Ok(None);
            }
            let to = out.join(&target);
            std::fs::copy(&from, &to).map_err(|source| ReportError::Copy {
                from: from.clone(),
                to: to.clone(),
                source,
            })?;
            Ok(Some(target))
        };
        let jsonl = copy(JSONL_NAME, format!("{stem}-{JSONL_NAME}"))?
            .unwrap_or_else(|| format!("{stem}-{JSONL_NAME}"));
        let csv = copy(CSV_NAME, format!("{stem}-{CSV_NAME}"))?;
        copies.push(RawCopy {
            input: i,
            jsonl,
            csv,
        });
    }
    Ok(copies)
}
