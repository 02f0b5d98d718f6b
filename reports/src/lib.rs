//! hvbench's results: the record schema, reading and writing results directories, and the
//! statistics computed from samples.
//!
//! Data flows one way: records -> statistics -> report.

pub mod record;
pub mod results;
pub mod stats;

pub use record::{Record, RecordKey, Status};
pub use results::{read_results, ResultsError, ResultsWriter};
pub use stats::{summarize, Summary};
