//! Native twins: the identical code of a guest workload, run here on the host, so a
//! record can give the guest's performance relative to native. Timed the way the guest
//! times itself (TSC reads fenced with LFENCE, the iteration count doubled until one run
//! lasts a sample), and run only while no guest runs (on SMT siblings a busy guest slowed
//! the native run 2.6-fold).
//!
//! Everything a twin sizes or loops over comes from the host's own parameters (the series
//! the host asked for, bounded by the workload's row, and `--sample-us`), never from a
//! guest line; a twin checks the interrupt flag between runs. Its buffers get the same
//! huge-page advice as the guest's RAM, so the ratio compares like with like.

mod fio;
mod loops;
mod twin;

use workloads::{NativeTwin, WorkloadId};

pub use loops::compute_checksum;
pub use twin::{cycles_from_tsc_khz, TwinError, TwinPlan};

/// step, per byte). `None` for a workload whose row names no twin.
pub fn twin(workload: WorkloadId, plan: &TwinPlan) -> Option<Result<Vec<f64>, TwinError>> {
    Some(match workload.spec().native_twin? {
        NativeTwin::Compute => loops::compute(plan),
        NativeTwin::TlbChase => loops::tlb_chase(plan),
        NativeTwin::SeqRead => loops::seq_read(plan),
        NativeTwin::Copy => loops::copy(plan),
        NativeTwin::Fio => fio::samples(workload, plan),
    })
}

#[cfg(test)]
mod tests;
