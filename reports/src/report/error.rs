//! How making a report fails.

use std::path::PathBuf;

use thiserror::Error;

use crate::bootstrap::StatsError;
use crate::plot::ChartError;
use crate::results::ResultsError;

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("no results directory was given to report on")]
    NoInputs,
    #[error(transparent)]
    Results(#[from] ResultsError),
    #[error("baseline backend {name:?} is not in the results, which hold: {available}")]
    UnknownBaseline { name: String, available: String },
    #[error("invalid report option: {0}")]
    Options(#[from] StatsError),
    #[error("invalid report option: chart widths must be between 200 and 10000 pixels")]
    ChartWidth,
    #[error("cannot create report directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy {from} to {to}: {source}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Chart(#[from] ChartError),
}
