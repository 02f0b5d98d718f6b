//! hvbench's results: the record schema, reading and writing results directories, and the
//! statistics computed from samples.
//!
//! Data flows one way: records -> statistics -> report.

pub mod abtest;
pub mod bootstrap;
pub mod compare;
mod convergence;
pub mod font;
pub mod format;
pub mod host;
pub mod html;
pub mod insns;
mod latency_cdf;
pub mod matrix;
pub mod plot;
pub mod pool;
pub mod record;
pub mod report;
pub mod results;
pub mod rng;
pub mod sched;
pub mod stats;
pub mod synthetic;

pub use record::{Record, RecordKey, Status};
pub use results::{
    read_results, read_results_with_warnings, ResultsError, ResultsRead, ResultsWarning,
    ResultsWriter,
};
pub use stats::{summarize, Summary};
