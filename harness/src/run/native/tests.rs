use super::loops::{compute_run, Buffer};
use super::*;
use crate::run::plan::series_points;
use crate::run::plan::SeriesPoint;
use crate::run::WorkloadParam;
use hostutil::huge_pages::HugePageAdvice;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;

fn point(workload: WorkloadId, params: &[&str]) -> SeriesPoint {
    let params: Vec<WorkloadParam> = params
        .iter()
        .map(|t| WorkloadParam::parse(t).unwrap())
        .collect();
    series_points(&params, workload).remove(0)
}

fn plan<'a>(point: &'a SeriesPoint, flag: &'a AtomicBool) -> TwinPlan<'a> {
    TwinPlan {
        point,
        backing: HugePageAdvice::NoAdvice,
        min_cycles: 100_000,
        warmup: 0,
        samples: 2,
        interrupted: flag,
        metric: "latency",
        sample_us: 100,
        tsc_khz: 1_000_000,
        run_id: "test",
        repeat: 0,
        params: &[],
        disk: None,
    }
}

#[test]
fn twins_run_on_the_hosts_series() {
    let flag = AtomicBool::new(false);
    let compute = point(WorkloadId::CpuCompute, &[]);
    let c = twin(WorkloadId::CpuCompute, &plan(&compute, &flag))
        .unwrap()
        .unwrap();
    assert!(c.len() == 2 && c.iter().all(|c| *c > 0.0), "{c:?}");
    let chase = point(WorkloadId::MemTlbChase, &["mem.tlb-chase.ws=64k"]);
    let c = twin(WorkloadId::MemTlbChase, &plan(&chase, &flag))
        .unwrap()
        .unwrap();
    assert!(c.iter().all(|c| *c > 0.0), "{c:?}");
    let read = point(WorkloadId::MemSeqRead, &["mem.seq-read.size=1m"]);
    let r = twin(WorkloadId::MemSeqRead, &plan(&read, &flag))
        .unwrap()
        .unwrap();
    assert!(
        r.iter().all(|c| *c > 0.0 && *c < 100.0),
        "{r:?} cycles per byte"
    );
    let copy = point(WorkloadId::MemCopy, &["mem.copy.size=1m"]);
    assert_eq!(
        twin(WorkloadId::MemCopy, &plan(&copy, &flag))
            .unwrap()
            .unwrap()
            .len(),
        2
    );
    // A series without the value the twin needs is an error, not a guess.
    let none = point(WorkloadId::CpuIdle, &[]);
    assert_eq!(
        twin(WorkloadId::MemTlbChase, &plan(&none, &flag)).unwrap(),
        Err(TwinError::NoSeriesValue("ws"))
    );
}

#[test]
fn hostile_sizes_are_errors_not_crashes() {
    // What `ws:0` and `ws:18446744073709551615` used to size: refused before mmap.
    assert_eq!(
        Buffer::new(0, HugePageAdvice::NoAdvice).err(),
        Some(TwinError::BadSize(0))
    );
    assert_eq!(
        Buffer::new(usize::MAX, HugePageAdvice::NoAdvice).err(),
        Some(TwinError::BadSize(u64::MAX))
    );
    assert!(matches!(
        Buffer::new(usize::MAX - (4 << 20), HugePageAdvice::NoAdvice),
        Err(TwinError::Map { .. })
    ));
}

#[test]
fn a_huge_round_count_is_refused_and_an_interrupt_stops_the_twin() {
    let flag = AtomicBool::new(false);
    let p = point(WorkloadId::CpuCompute, &[]);
    let plan = plan(&p, &flag);
    assert_eq!(compute_checksum(1000, &plan), Ok(compute_run(1000)));
    assert!(matches!(
        compute_checksum(u64::MAX, &plan),
        Err(TwinError::TooManyRounds { .. })
    ));
    flag.store(true, Ordering::Relaxed);
    assert_eq!(
        twin(WorkloadId::CpuCompute, &plan).unwrap(),
        Err(TwinError::Interrupted)
    );
    assert_eq!(compute_checksum(1000, &plan), Err(TwinError::Interrupted));
}
