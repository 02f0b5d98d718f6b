//! A results directory: `results.jsonl` (one record per line) and `results.csv` (one row
//! per sample). Each record is appended whole and synced, and a failed append is cut back
//! off, so an interrupted run (Ctrl-C, a crash, a full disk) keeps every record already
//! written and never leaves half a line.
//!
//! A run killed in the middle of a write (SIGKILL, a power cut) can still leave a torn last
//! line. Opening the directory to append repairs it: the bytes after the last newline are
//! moved into a file beside it (`results.jsonl.torn`, `.torn-1`, ...) so nothing is lost
//! and the next record starts on a line of its own; [`ResultsWriter::repairs`] says what
//! was moved, for the caller to print. [`read_results_with_warnings`] reads every line it
//! can and names the lines it could not.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::record::{NonFinite, Record, SCHEMA_VERSION};

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
    #[error("cannot write a record to {path}: {source}")]
    NonFinite { path: PathBuf, source: NonFinite },
    #[error("cannot move the torn last line of {path} aside to {aside}: {source}")]
    Repair {
        path: PathBuf,
        aside: PathBuf,
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

/// Something a reader or writer of a results directory put up with, for the caller to
/// print: the rest of the directory is good.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ResultsWarning {
    #[error(
        "{path} ended in a torn line ({bytes} bytes after the last newline, from a run \
         killed mid-write): moved to {aside}"
    )]
    TornTailMoved {
        path: PathBuf,
        bytes: u64,
        aside: PathBuf,
    },
    #[error("{path}, line {line}: skipped, not a valid record: {message}")]
    UnreadableLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// The records of a results directory and the lines that could not be read.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultsRead {
    pub records: Vec<Record>,
    pub warnings: Vec<ResultsWarning>,
}

/// Appends records to a results directory.
#[derive(Debug)]
pub struct ResultsWriter {
    jsonl_path: PathBuf,
    csv_path: PathBuf,
    jsonl: File,
    csv: File,
    repairs: Vec<ResultsWarning>,
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
    /// `append` is set; appending, first moves a torn last line of either file aside
    /// (see [`ResultsWriter::repairs`]).
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
        let repairs = [&jsonl_path, &csv_path]
            .into_iter()
            .filter_map(|path| move_torn_tail_aside(path).transpose())
            .collect::<Result<Vec<_>, _>>()?;
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
            repairs,
        };
        let csv_is_new = writer.csv.metadata().map(|m| m.len() == 0).unwrap_or(true);
        if csv_is_new {
            let header = csv_line(CSV_HEADER.iter().copied())?;
            writer.append_whole(false, header.as_bytes())?;
        }
        Ok(writer)
    }

    /// The torn last lines that opening moved aside: one warning for the caller to print
    /// per repaired file (none for a new or intact directory).
    pub fn repairs(&self) -> &[ResultsWarning] {
        &self.repairs
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

    /// Appends one record: its JSON line, then one CSV row per sample. Optional figures
    /// that are not finite are left out and a required one is an error, before anything
    /// is written ([`Record::to_finite`]): the file only ever holds records it can read.
    pub fn write(&mut self, record: &Record) -> Result<(), ResultsError> {
        let record = &record
            .to_finite()
            .map_err(|source| ResultsError::NonFinite {
                path: self.jsonl_path.clone(),
                source,
            })?;
        let mut line = serde_json::to_string(record).map_err(|e| ResultsError::Write {
            path: self.jsonl_path.clone(),
            source: std::io::Error::other(e),
        })?;
        line.push('\n');
        self.append_whole(true, line.as_bytes())?;
        let rows = csv_rows(record)?;
        self.append_whole(false, rows.as_bytes())
    }

    /// Appends many records with one write and one sync per file (a merge of thousands
    /// of records), with the same checks as [`ResultsWriter::write`]: every record is
    /// checked before anything is written, so an error leaves the files as they were.
    pub fn write_batch(&mut self, records: &[Record]) -> Result<(), ResultsError> {
        let (mut lines, mut rows) = (String::new(), String::new());
        for record in records {
            let record = &record
                .to_finite()
                .map_err(|source| ResultsError::NonFinite {
                    path: self.jsonl_path.clone(),
                    source,
                })?;
            let line = serde_json::to_string(record).map_err(|e| ResultsError::Write {
                path: self.jsonl_path.clone(),
                source: std::io::Error::other(e),
            })?;
            lines.push_str(&line);
            lines.push('\n');
            rows.push_str(&csv_rows(record)?);
        }
        self.append_whole(true, lines.as_bytes())?;
        self.append_whole(false, rows.as_bytes())
    }
}

/// If `path` does not end in a newline, moves the bytes after its last newline into a new
/// file beside it and cuts them off. The aside copy is written and synced before the cut.
fn move_torn_tail_aside(path: &Path) -> Result<Option<ResultsWarning>, ResultsError> {
    let read_error = |source| ResultsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_error(e)),
    };
    let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let tail = &bytes[keep..];
    if tail.is_empty() {
        return Ok(None);
    }
    let (mut file, aside) = create_aside(path)?;
    let repair_error = |aside: &Path, source| ResultsError::Repair {
        path: path.to_path_buf(),
        aside: aside.to_path_buf(),
        source,
    };
    file.write_all(tail)
        .and_then(|()| file.sync_all())
        .map_err(|e| repair_error(&aside, e))?;
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(keep as u64).and_then(|()| f.sync_all()))
        .map_err(|e| repair_error(&aside, e))?;
    Ok(Some(ResultsWarning::TornTailMoved {
        path: path.to_path_buf(),
        bytes: tail.len() as u64,
        aside,
    }))
}

/// A new file `<path>.torn`, or `<path>.torn-N` for the first N free: an earlier repair's
/// file is never overwritten.
fn create_aside(path: &Path) -> Result<(File, PathBuf), ResultsError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".torn");
    let base = PathBuf::from(name);
    let mut candidate = base.clone();
    for n in 1..=1000u32 {
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&candidate)
        {
            Ok(file) => return Ok((file, candidate)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let mut next = base.clone().into_os_string();
                next.push(format!("-{n}"));
                candidate = PathBuf::from(next);
            }
            Err(source) => {
                return Err(ResultsError::Repair {
                    path: path.to_path_buf(),
                    aside: candidate,
                    source,
                })
            }
        }
    }
    Err(ResultsError::Repair {
        path: path.to_path_buf(),
        aside: base,
        source: std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a thousand earlier torn lines are already beside it",
        ),
    })
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

/// Reads every record of a results directory, strictly: a line that is not a valid
/// record is an error naming the file and line. For checking what hvbench itself wrote;
/// `report` and `compare` read with [`read_results_with_warnings`].
pub fn read_results(dir: &Path) -> Result<Vec<Record>, ResultsError> {
    let read = read_lines(dir)?;
    match read.warnings.into_iter().next() {
        Some(ResultsWarning::UnreadableLine {
            path,
            line,
            message,
        }) => Err(ResultsError::Malformed {
            path,
            line,
            message,
        }),
        _ => Ok(read.records),
    }
}

/// Reads every record of a results directory that can be read; a line that cannot (a torn
/// last line, a damaged one) is skipped with a warning naming its file and line. Still an
/// error: no directory or no `results.jsonl`, a record of a newer schema (its fields may
/// mean something else), and no readable record at all.
pub fn read_results_with_warnings(dir: &Path) -> Result<ResultsRead, ResultsError> {
    read_lines(dir)
}

fn read_lines(dir: &Path) -> Result<ResultsRead, ResultsError> {
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
    let mut read = ResultsRead {
        records: Vec::new(),
        warnings: Vec::new(),
    };
    // Split on newlines as bytes: a line torn inside a UTF-8 sequence is a bad line,
    // not an unreadable file.
    for (i, line) in BufReader::new(file).split(b'\n').enumerate() {
        let line = line.map_err(|source| ResultsError::Read {
            path: path.clone(),
            source,
        })?;
        match parse_line(&line) {
            Ok(None) => {}
            Ok(Some(record)) => read.records.push(record),
            Err(LineError::Newer(found)) => {
                return Err(ResultsError::NewerSchema {
                    path,
                    line: i + 1,
                    found,
                })
            }
            Err(LineError::Invalid(message)) => {
                read.warnings.push(ResultsWarning::UnreadableLine {
                    path: path.clone(),
                    line: i + 1,
                    // serde's message can quote the line, which is untrusted text.
                    message: crate::format::terminal_safe(&message),
                })
            }
        }
    }
    if read.records.is_empty() {
        return Err(match read.warnings.into_iter().next() {
            Some(ResultsWarning::UnreadableLine {
                path,
                line,
                message,
            }) => ResultsError::Malformed {
                path,
                line,
                message,
            },
            _ => ResultsError::Empty { path },
        });
    }
    Ok(read)
}

enum LineError {
    Newer(u32),
    Invalid(String),
}

/// One line of `results.jsonl`: `None` if blank.
fn parse_line(line: &[u8]) -> Result<Option<Record>, LineError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    // Check the schema version before the full parse, so a newer file says so.
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| LineError::Invalid(e.to_string()))?;
    if let Some(found) = value.get("schema").and_then(|s| s.as_u64()) {
        if found > u64::from(SCHEMA_VERSION) {
            return Err(LineError::Newer(u32::try_from(found).unwrap_or(u32::MAX)));
        }
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| LineError::Invalid(e.to_string()))
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
    fn a_batch_writes_what_single_writes_write() {
        let tmp = tempfile::tempdir().unwrap();
        let records = [record("cpu.cpuid", &[1.0, 2.0]), record("cpu.idle", &[3.0])];
        let mut one = ResultsWriter::create(&tmp.path().join("one"), false).unwrap();
        for r in &records {
            one.write(r).unwrap();
        }
        let mut batch = ResultsWriter::create(&tmp.path().join("batch"), false).unwrap();
        batch.write_batch(&records).unwrap();
        for name in [JSONL_NAME, CSV_NAME] {
            let read = |d: &str| std::fs::read(tmp.path().join(d).join(name)).unwrap();
            assert_eq!(read("one"), read("batch"), "{name}");
        }
        // A record that cannot be written leaves the files as they were.
        let mut bad = record("cpu.idle", &[1.0]);
        bad.samples[0] = f64::NAN;
        let before = std::fs::read(batch.jsonl_path()).unwrap();
        assert!(matches!(
            batch.write_batch(&[records[0].clone(), bad]),
            Err(ResultsError::NonFinite { .. })
        ));
        assert_eq!(std::fs::read(batch.jsonl_path()).unwrap(), before);
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

    /// A record as an hvbench before issue 8's fix wrote it when a guest median was 0:
    /// the infinite guest/native ratio as `null` (serde_json's rendering of infinity),
    /// and `null` for the other optional numbers.
    pub(crate) fn old_null_ratio_line() -> String {
        let mut r = record("cpu.compute", &[4.0, 5.0, 6.0]);
        r.native = Some(NativeComparison {
            samples: vec![1.0, 2.0],
            median: 1.5,
            ratio: Some(1.0),
        });
        let json = serde_json::to_string(&r).unwrap();
        let old = json.replace("\"ratio\":1.0", "\"ratio\":null").replace(
            "\"guest\":{",
            "\"guest\":{\"boot_ms\":null,\"tsc_khz\":null,\"ram_bytes\":null,",
        );
        assert!(old.contains("\"ratio\":null") && old.contains("\"boot_ms\":null"));
        old
    }

    /// Issue 8, defect 7: a `null` where an optional number was expected still reads.
    #[test]
    fn null_optional_numbers_read_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let good = serde_json::to_string(&record("cpu.idle", &[1.0])).unwrap();
        std::fs::write(
            dir.path().join(JSONL_NAME),
            format!("{good}\n{}\n", old_null_ratio_line()),
        )
        .unwrap();
        let records = read_results(dir.path()).unwrap();
        assert_eq!(records.len(), 2);
        let native = records[1].native.as_ref().unwrap();
        assert_eq!((native.median, native.ratio), (1.5, None));
        assert_eq!(records[1].guest.boot_ms, None);
        let read = read_results_with_warnings(dir.path()).unwrap();
        assert_eq!((read.records.len(), read.warnings.len()), (2, 0));
    }

    /// Issue 8, defect 7: non-finite values are never written; what is written reads back.
    #[test]
    fn non_finite_optional_figures_are_left_out_and_the_file_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ResultsWriter::create(dir.path(), false).unwrap();
        let mut r = record("cpu.compute", &[0.0, 0.0, 0.0]);
        r.native = Some(NativeComparison {
            samples: vec![3.0],
            median: 3.0,
            ratio: Some(f64::INFINITY),
        });
        r.guest.boot_ms = Some(f64::NAN);
        r.summary.as_mut().unwrap().cv = f64::INFINITY;
        r.curves.insert(
            "rss".into(),
            Curve {
                x_unit: "s".into(),
                y_unit: "MiB".into(),
                points: vec![[0.0, 1.0], [1.0, f64::NEG_INFINITY], [2.0, 3.0]],
            },
        );
        w.write(&r).unwrap();
        let text = std::fs::read_to_string(dir.path().join(JSONL_NAME)).unwrap();
        assert!(!text.contains("null"), "{text}");
        let back = read_results(dir.path()).unwrap();
        assert_eq!(back.len(), 1);
        let back = &back[0];
        assert_eq!(back.native.as_ref().unwrap().ratio, None);
        assert_eq!(back.native.as_ref().unwrap().samples, vec![3.0]);
        assert_eq!(back.guest.boot_ms, None);
        assert_eq!(back.summary, None);
        assert_eq!(back.curves["rss"].points, vec![[0.0, 1.0], [2.0, 3.0]]);
        assert_eq!(back.samples, r.samples);

        // A required figure that is not finite: an error for that record, nothing written.
        let before = std::fs::read(dir.path().join(JSONL_NAME)).unwrap();
        let csv_before = std::fs::read(dir.path().join(CSV_NAME)).unwrap();
        for bad in [
            record("cpu.idle", &[1.0, f64::INFINITY]),
            Record {
                native: Some(NativeComparison {
                    samples: vec![f64::NAN],
                    median: 1.0,
                    ratio: None,
                }),
                ..record("cpu.idle", &[1.0])
            },
        ] {
            match w.write(&bad) {
                Err(e @ ResultsError::NonFinite { .. }) => {
                    assert!(e.to_string().contains("cpu.idle"), "{e}")
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(std::fs::read(dir.path().join(JSONL_NAME)).unwrap(), before);
        assert_eq!(
            std::fs::read(dir.path().join(CSV_NAME)).unwrap(),
            csv_before
        );
        w.write(&record("cpu.idle", &[2.0])).unwrap();
        assert_eq!(read_results(dir.path()).unwrap().len(), 2);
    }

    /// Issue 8, defect 12: a torn last line is moved aside on `--append`, losing nothing,
    /// and the next record starts on a line of its own; in both files.
    #[test]
    fn append_moves_a_torn_last_line_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ResultsWriter::create(dir.path(), false).unwrap();
        w.write(&record("cpu.idle", &[1.0, 2.0])).unwrap();
        drop(w);
        let jsonl_path = dir.path().join(JSONL_NAME);
        let csv_path = dir.path().join(CSV_NAME);
        let torn_json = "{\"schema\":1,\"run_id\":\"ru";
        let torn_csv = "run-1,0,kvm,,cpu.cpuid,cpu,lat";
        let append = |path: &Path, text: &str| {
            let mut f = OpenOptions::new().append(true).open(path).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        append(&jsonl_path, torn_json);
        append(&csv_path, torn_csv);
        let jsonl_before = std::fs::read_to_string(&jsonl_path).unwrap();

        let mut w = ResultsWriter::create(dir.path(), true).unwrap();
        let repairs = w.repairs().to_vec();
        assert_eq!(repairs.len(), 2, "{repairs:?}");
        let jsonl_aside = dir.path().join("results.jsonl.torn");
        let csv_aside = dir.path().join("results.csv.torn");
        assert_eq!(
            repairs[0],
            ResultsWarning::TornTailMoved {
                path: jsonl_path.clone(),
                bytes: torn_json.len() as u64,
                aside: jsonl_aside.clone(),
            }
        );
        assert!(repairs[1].to_string().contains("results.csv.torn"));
        assert_eq!(std::fs::read_to_string(&jsonl_aside).unwrap(), torn_json);
        assert_eq!(std::fs::read_to_string(&csv_aside).unwrap(), torn_csv);
        // Nothing lost: what stayed plus what was moved is the file as it was.
        let kept = std::fs::read_to_string(&jsonl_path).unwrap();
        assert_eq!(format!("{kept}{torn_json}"), jsonl_before);

        w.write(&record("cpu.rdtsc", &[3.0])).unwrap();
        drop(w);
        let records = read_results(dir.path()).unwrap();
        let names: Vec<&str> = records.iter().map(|r| r.workload.as_str()).collect();
        assert_eq!(names, ["cpu.idle", "cpu.rdtsc"]);
        let csv = std::fs::read_to_string(&csv_path).unwrap();
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        // cpu.idle: 1 warm-up + 2 samples; cpu.rdtsc: 1 warm-up + 1 sample.
        assert_eq!(rows.len(), 5);
        assert!(rows.iter().all(|r| r.len() == CSV_HEADER.len()));

        // An intact directory opens without repairs; a second tear goes to `.torn-1`.
        assert!(ResultsWriter::create(dir.path(), true)
            .unwrap()
            .repairs()
            .is_empty());
        append(&jsonl_path, "{");
        let w = ResultsWriter::create(dir.path(), true).unwrap();
        assert!(matches!(
            w.repairs(),
            [ResultsWarning::TornTailMoved { aside, bytes: 1, .. }]
                if aside == &dir.path().join("results.jsonl.torn-1")
        ));
        assert_eq!(std::fs::read_to_string(&jsonl_aside).unwrap(), torn_json);
    }

    /// A file that is all torn line (killed during the first write) is emptied, and the
    /// CSV gets its header again.
    #[test]
    fn a_file_without_a_newline_is_moved_aside_whole() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JSONL_NAME), "{\"sche").unwrap();
        std::fs::write(dir.path().join(CSV_NAME), "run_id,rep").unwrap();
        let mut w = ResultsWriter::create(dir.path(), true).unwrap();
        assert_eq!(w.repairs().len(), 2);
        w.write(&record("cpu.idle", &[1.0])).unwrap();
        assert_eq!(read_results(dir.path()).unwrap().len(), 1);
        let csv = std::fs::read_to_string(dir.path().join(CSV_NAME)).unwrap();
        assert!(csv.starts_with("run_id,repeat,"), "{csv}");
    }

    /// Issue 8, defect 12: the reader skips an unreadable line with a warning naming it
    /// and reads the rest, instead of refusing the whole directory.
    #[test]
    fn reader_warns_about_unreadable_lines_and_reads_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let a = serde_json::to_string(&record("cpu.idle", &[1.0])).unwrap();
        let b = serde_json::to_string(&record("cpu.rdtsc", &[2.0])).unwrap();
        // A damaged middle line (with an escape sequence in it), then a torn last line
        // that is not even UTF-8.
        let mut text = format!("{a}\n{{\"schema\":1,\"status\":\"\x1b[2J\"}}\n{b}\n").into_bytes();
        text.extend_from_slice(b"{\"schema\":1,\"run_id\":\"\xe2\x82");
        std::fs::write(dir.path().join(JSONL_NAME), text).unwrap();

        let read = read_results_with_warnings(dir.path()).unwrap();
        let names: Vec<&str> = read.records.iter().map(|r| r.workload.as_str()).collect();
        assert_eq!(names, ["cpu.idle", "cpu.rdtsc"]);
        let lines: Vec<usize> = read
            .warnings
            .iter()
            .map(|w| match w {
                ResultsWarning::UnreadableLine { line, .. } => *line,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lines, [2, 4]);
        let shown = read.warnings[0].to_string();
        assert!(
            shown.contains("line 2") && !shown.contains('\x1b'),
            "{shown}"
        );
        // The strict reader still refuses, naming the first bad line.
        assert!(matches!(
            read_results(dir.path()),
            Err(ResultsError::Malformed { line: 2, .. })
        ));
        // Nothing readable at all is still an error.
        std::fs::write(dir.path().join(JSONL_NAME), "{\n").unwrap();
        assert!(matches!(
            read_results_with_warnings(dir.path()),
            Err(ResultsError::Malformed { line: 1, .. })
        ));
    }
}
