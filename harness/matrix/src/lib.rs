//! The benchmark matrix: a matrix file (hosts, backends, paging modes, workload
//! selections, repeats, A/B interleaving, exclusions) planned into cells with stable ids,
//! packed into shards for a job engine (GitHub Actions), run into bundles, and merged
//! back into one results directory that `hvbench report` and `hvbench compare` read.
//!
//! matrix file -> plan (cells, shards) -> bundles (records + manifest) -> merge -> report

pub mod bundle;
pub mod file;
pub mod merge;
pub mod plan;

pub use file::{MatrixError, MatrixFile};
pub use plan::{Cell, Plan, PlanError, Shard};
