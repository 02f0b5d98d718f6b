//! A results directory: `results.jsonl` (one record per line) and `results.csv` (one row
//! per sample). Each record is appended whole and synced, and a failed append is cut back
//! off, so an interrupted run (Ctrl-C, a crash, a full disk) keeps every record already
//! written and never leaves half a line.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::record::{Record, SCHEMA_VERSION};

pub const JSONL_NAME: &str = "results.jsonl";
pub const CSV_NAME: &str = "results.csv";

#[derive(Debug, Error)]
pub enum ResultsError {
    #[error("cannot create results directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists: choose another --out directory or pass --append")]
    AlreadyExists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("results directory {path} does not exist")]
    MissingDir { path: PathBuf },
    #[error("{path} has no {JSONL_NAME}: not an hvbench results directory")]
    MissingResults { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no records")]
    Empty { path: PathBuf },
    #[error("{path}, line {line}: not a valid record: {message}")]
    Malformed {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "{path}, line {line}: record schema {found} is newer than this hvbench ({SCHEMA_VERSION})"
    )]
    NewerSchema {
        path: PathBuf,
        line: usize,
        found: u32,
    },
}

/// Appends records to a results directory.
pub struct ResultsWriter {
    jsonl_path: PathBuf,
    csv_path: PathBuf,
    jsonl: File,
    csv: File,
}

const CSV_HEADER: &[&str] = &[
    "run_id",
    "repeat",
    "backend",
    "host_class",
    "workload",
    "group",
    "metric",
    "series",
    "unit",
    "status",
    "reason",
    "sample_index",
    "warmup",
    "value",
    "cycles_per_op",
    "ops",
];

impl ResultsWriter {
    /// Opens `dir` for writing, creating it. Refuses to mix with earlier results unless
    /// `append` is set.
    pub fn create(dir: &Path, append: bool) -> Result<Self, ResultsError> {
        std::fs::create_dir_all(dir).map_err(|source| ResultsError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let jsonl_path = dir.join(JSONL_NAME);
        let csv_path = dir.join(CSV_NAME);
        if !append && (jsonl_path.exists() || csv_path.exists()) {
            return Err(ResultsError::AlreadyExists { path: jsonl_path });
        }
        let open = |path: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ResultsError::Write {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let jsonl = open(&jsonl_path)?;
        let csv = open(&csv_path)?;
        let mut writer = ResultsWriter {
            jsonl_path,
            csv_path,
            jsonl,
            csv,
        };
        let csv_is_new = writer.csv.metadata().map(|m| m.len() == 0).unwrap_or(true);
        if csv_is_new {
            let header = csv_line(CSV_HEADER.iter().copied())?;
            writer.append_whole(false, header.as_bytes())?;
        }
        Ok(writer)
    }

    pub fn jsonl_path(&self) -> &Path {
        &self.jsonl_path
    }

    pub fn csv_path(&self) -> &Path {
        &self.csv_path
    }

    /// Appends `bytes` to one of the files in one write and syncs it; on failure cuts the
    /// file back to its previous length so no partial line stays behind.
    fn append_whole(&mut self, jsonl: bool, bytes: &[u8]) -> Result<(), ResultsError> {
        let (file, path) = if jsonl {
            (&mut self.jsonl, &self.jsonl_path)
        } else {
            (&mut self.csv, &self.csv_path)
        };
        let error = |source| ResultsError::Write {
            path: path.clone(),
            source,
        };
        let before = file.metadata().map_err(error)?.len();
        let result = file.write_all(bytes).and_then(|()| file.sync_data());
        if let Err(source) = result {
            let _ = file.set_len(before);
            return Err(error(source));
        }
        Ok(())
    }

    /// Appends one record: its JSON line, then one CSV row per sample.
    pub fn write(&mut self, record: &Record) -> Result<(), ResultsError> {
        let mut line = serde_json::to_string(record).map_err(|e| ResultsError::Write {
            path: self.jsonl_path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push('\n');
        self.append_whole(true, line.as_bytes())?;
        let rows = csv_rows(record)?;
        self.append_whole(false, rows.as_bytes())
    }
}

fn csv_line<'a>(fields: impl IntoIterator<Item = &'a str>) -> Result<String, ResultsError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(fields).map_err(csv_error)?;
    let bytes = w
        .into_inner()
        .map_err(|e| csv_error(e.into_error().into()))?;
    String::from_utf8(bytes).map_err(|e| csv_error(std::io::Error::other(e).into()))
}

fn csv_error(e: csv::Error) -> ResultsError {
    ResultsError::Write {
        path: PathBuf::from(CSV_NAME),
        source: std::io::Error::other(e),
    }
}

fn csv_rows(r: &Record) -> Result<String, ResultsError> {
    let series = r.key().series;
    let status = r.status.name();
    let reason = r.reason.clone().unwrap_or_default();
    let repeat = r.repeat.to_string();
    let fixed = |index: String, warmup: &str, value: String, cycles: String, ops: String| {
        vec![
            r.run_id.clone(),
            repeat.clone(),
            r.backend.kind.clone(),
            r.host.class.clone(),
            r.workload.clone(),
            r.group.clone(),
            r.metric.clone(),
            series.clone(),
            r.unit.clone(),
            status.to_string(),
            reason.clone(),
            index,
            warmup.to_string(),
            value,
            cycles,
            ops,
        ]
    };
    let mut out = String::new();
    let mut push = |row: Vec<String>| -> Result<(), ResultsError> {
        out.push_str(&csv_line(row.iter().map(String::as_str))?);
        Ok(())
    };
    if r.samples.is_empty() && r.warmup_samples.is_empty() {
        // A record without samples (skip, crash) still gets a row, so nothing vanishes
        // from the CSV view.
        return csv_line(
            fixed(
                String::new(),
                "",
                String::new(),
                String::new(),
                String::new(),
            )
            .iter()
            .map(String::as_str),
        );
    }
    let ops_at = |i: usize| {
        r.ops_per_sample
            .get(i)
            .map(|o| o.to_string())
            .unwrap_or_default()
    };
    for (i, v) in r.warmup_samples.iter().enumerate() {
        push(fixed(
            i.to_string(),
            "1",
            v.to_string(),
            String::new(),
            String::new(),
        ))?;
    }
    for (i, v) in r.samples.iter().enumerate() {
        let cycles = r
            .samples_cycles
            .get(i)
            .map(|c| c.to_string())
            .unwrap_or_default();
        push(fixed(i.to_string(), "0", v.to_string(), cycles, ops_at(i)))?;
    }
    Ok(out)
}

/// Reads every record of a results directory, strictly: a malformed line is an error
/// naming the file and line, never skipped in silence.
pub fn read_results(dir: &Path) -> Result<Vec<Record>, ResultsError> {
    if !dir.is_dir() {
        return Err(ResultsError::MissingDir {
            path: dir.to_path_buf(),
        });
    }
    let path = dir.join(JSONL_NAME);
    if !path.is_file() {
        return Err(ResultsError::MissingResults {
            path: dir.to_path_buf(),
        });
    }
    let file = File::open(&path).map_err(|source| ResultsError::Read {
        path: path.clone(),
        source,
    })?;
    let mut records = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| ResultsError::Read {
            path: path.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        // Check the schema version before the full parse, so a newer file says so.
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| ResultsError::Malformed {
                path: path.clone(),
                line: i + 1,
                message: e.to_string(),
            })?;
        if let Some(found) = value.get("schema").and_then(|s| s.as_u64()) {
            if found > SCHEMA_VERSION as u64 {
                return Err(ResultsError::NewerSchema {
                    path: path.clone(),
                    line: i + 1,
                    found: found as u32,
                });
            }
        }
        let record: Record =
            serde_json::from_value(value).map_err(|e| ResultsError::Malformed {
                path: path.clone(),
                line: i + 1,
                message: e.to_string(),
            })?;
        records.push(record);
    }
    if records.is_empty() {
        return Err(ResultsError::Empty { path });
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::*;
    use crate::stats::summarize;

    pub(crate) fn record(workload: &str, samples: &[f64]) -> Record {
        Record {
            schema: SCHEMA_VERSION,
            run_id: "run-1".into(),
            repeat: 0,
            timestamp: "2026-11-26T00:00:00Z".into(),
            workload: workload.into(),
            group: "cpu".into(),
            description: "d".into(),
            privilege: "cpl3".into(),
            metric: "latency".into(),
            unit: "ns".into(),
            direction: "lower_is_better".into(),
            series: Default::default(),
            status: Status::Success,
            reason: None,
            samples: samples.to_vec(),
            samples_cycles: samples.iter().map(|s| s * 2.0).collect(),
            ops_per_sample: samples.iter().map(|_| 64).collect(),
            warmup_samples: vec![9.0],
            summary: summarize(samples),
            native: None,
            notes: Default::default(),
            exits: Default::default(),
            curves: Default::default(),
            backend: BackendInfo {
                kind: "kvm".into(),
                ..Default::default()
            },
            host: HostInfo::default(),
            guest: GuestInfo::default(),
            parameters: RunParameters::default(),
            hvbench: ToolInfo::default(),
            reproduce: "hvbench run".into(),
        }
    }

    #[test]
    fn write_then_read_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ResultsWriter::create(dir.path(), false).unwrap();
        let a = record("cpu.cpuid", &[1.0, 2.0, 3.0]);
        let mut b = record("cpu.hlt", &[]);
        b.status = Status::Skip;
        b.reason = Some("no \"hlt\", <b>".into());
        b.warmup_samples.clear();
        w.write(&a).unwrap();
        w.write(&b).unwrap();
        drop(w);
        assert_eq!(read_results(dir.path()).unwrap(), vec![a, b]);

        let csv = std::fs::read_to_string(dir.path().join(CSV_NAME)).unwrap();
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        // 1 warm-up + 3 samples for a, one row for the skipped b.
        assert_eq!(rows.len(), 5);
        assert_eq!(&rows[0][12], "1");
        assert_eq!(&rows[3][13], "3");
        assert_eq!(&rows[4][9], "skip");
        assert_eq!(&rows[4][10], "no \"hlt\", <b>");
    }

    #[test]
    fn refuses_to_overwrite_without_append() {
        let dir = tempfile::tempdir().unwrap();
        ResultsWriter::create(dir.path(), false).unwrap();
        assert!(matches!(
            ResultsWriter::create(dir.path(), false),
            Err(ResultsError::AlreadyExists { .. })
        ));
        let mut w = ResultsWriter::create(dir.path(), true).unwrap();
        w.write(&record("cpu.idle", &[1.0])).unwrap();
        let csv = std::fs::read_to_string(dir.path().join(CSV_NAME)).unwrap();
        assert_eq!(csv.matches("run_id").count(), 1, "header written once");
    }

    #[test]
    fn bad_directories_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            read_results(&missing),
            Err(ResultsError::MissingDir { .. })
        ));
        assert!(matches!(
            read_results(dir.path()),
            Err(ResultsError::MissingResults { .. })
        ));
        std::fs::write(dir.path().join(JSONL_NAME), "").unwrap();
        assert!(matches!(
            read_results(dir.path()),
            Err(ResultsError::Empty { .. })
        ));
        let good = serde_json::to_string(&record("cpu.idle", &[1.0])).unwrap();
        std::fs::write(
            dir.path().join(JSONL_NAME),
            format!("{good}\n{{\"schema\":1,\n"),
        )
        .unwrap();
        match read_results(dir.path()) {
            Err(e @ ResultsError::Malformed { line: 2, .. }) => {
                assert!(e.to_string().contains("line 2"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let newer = good.replacen("\"schema\":1", "\"schema\":99", 1);
        std::fs::write(dir.path().join(JSONL_NAME), newer).unwrap();
        assert!(matches!(
            read_results(dir.path()),
            Err(ResultsError::NewerSchema { found: 99, .. })
        ));
    }
}
