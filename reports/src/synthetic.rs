//! Synthetic records for tests, benchmarks and demonstrations: the shape `hvbench run`
//! writes, with samples drawn from a seeded generator. Nothing here is measured.

use std::collections::BTreeMap;
use std::path::Path;

use crate::record::{
    BackendInfo, GuestInfo, HostInfo, Record, RunParameters, Status, ToolInfo, SCHEMA_VERSION,
};
use crate::results::{ResultsError, ResultsWriter};
use crate::rng::Rng;
use crate::stats::summarize;

/// `n` log-normal samples around `median` with log-standard deviation `sigma`: the
/// right-skewed shape latency samples have.
pub fn lognormal_samples(seed: u64, n: usize, median: f64, sigma: f64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| median * (sigma * rng.normal()).exp())
        .collect()
}

/// A host fingerprint of the given class and CPU model.
pub fn host(class: &str, cpu_model: &str) -> HostInfo {
    HostInfo {
        class: class.into(),
        hostname: "bench-host".into(),
        cpu_vendor: "AuthenticAMD".into(),
        cpu_model: cpu_model.into(),
        cpus: 2,
        memory_mib: 24_000,
        vmx: false,
        svm: true,
        hypervisor_flag: class != "bare-metal",
        kernel: "6.12.0".into(),
        kvm_module: "kvm_amd".into(),
        paging: "npt".into(),
        cpl0: "native".into(),
        tsc_khz: Some(2_450_000),
        tsc_source: "cpuid".into(),
        thp: "madvise".into(),
        ksm: "0".into(),
        extra: BTreeMap::new(),
    }
}

/// A successful record of `workload` on `backend` (group, privilege and description from
/// the workload table where the name is known).
pub fn record(backend: &str, workload: &str, samples: &[f64]) -> Record {
    let spec = workloads::WORKLOADS.iter().find(|w| w.name == workload);
    let group = spec.map(|w| w.group.name().to_string()).unwrap_or_else(|| {
        workload
            .split_once('.')
            .map(|(g, _)| g)
            .unwrap_or("other")
            .to_string()
    });
    Record {
        schema: SCHEMA_VERSION,
        run_id: format!("{backend}-run-1"),
        repeat: 0,
        timestamp: "2026-01-01T00:00:00Z".into(),
        workload: workload.into(),
        group,
        description: spec.map(|w| w.description).unwrap_or("").into(),
        privilege: spec
            .map(|w| format!("cpl{}", w.privilege.cpl()))
            .unwrap_or_else(|| "cpl3".into()),
        metric: "latency".into(),
        unit: "ns".into(),
        direction: "lower_is_better".into(),
        series: BTreeMap::new(),
        status: Status::Success,
        reason: None,
        samples: samples.to_vec(),
        samples_cycles: samples.iter().map(|s| s * 2.45).collect(),
        ops_per_sample: samples.iter().map(|_| 1024).collect(),
        warmup_samples: Vec::new(),
        summary: summarize(samples),
        native: None,
        notes: BTreeMap::new(),
        exits: BTreeMap::new(),
        curves: Default::default(),
        backend: BackendInfo {
            kind: backend.into(),
            version: "synthetic".into(),
            details: BTreeMap::new(),
        },
        host: host("bare-metal", "AMD EPYC 7763 64-Core Processor"),
        guest: GuestInfo {
            image_sha256: "0".repeat(64),
            hypervisor: backend.into(),
            signature: "synthetic".into(),
            cpu_vendor: "AuthenticAMD".into(),
            tsc_khz: Some(2_450_000),
            tsc_source: "cpuid".into(),
            ram_bytes: Some(256 << 20),
            boot_ms: None,
        },
        parameters: RunParameters {
            samples: u32::try_from(samples.len()).unwrap_or(u32::MAX),
            warmup: 1,
            sample_us: 1000,
            timeout_s: 60,
            memory_mib: 256,
            vcpus: 1,
            repeats: 1,
            workload_params: Default::default(),
        },
        hvbench: ToolInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            git_revision: "synthetic".into(),
        },
        reproduce: format!("hvbench run --backend {backend} --workload {workload}"),
    }
}

/// A record that did not succeed, with its reason.
pub fn problem(backend: &str, workload: &str, status: Status, reason: &str) -> Record {
    let mut r = record(backend, workload, &[]);
    r.status = status;
    r.reason = Some(reason.into());
    r
}

/// A suite of records: for each backend and repeat, `keys` measurements (the workload
/// table's non-self-test workloads in turn, each with a `variant` series beyond the first
/// round), `samples` samples each. Backend i is (1 + 0.15 i) times slower than the first,
/// so comparisons have something to find. `cpu.hlt` is skipped on `qemu`, as QEMU does.
pub fn suite(backends: &[&str], repeats: u32, keys: usize, samples: usize) -> Vec<Record> {
    let names: Vec<&str> = workloads::WORKLOADS
        .iter()
        .filter(|w| !w.explicit_only)
        .map(|w| w.name)
        .collect();
    let mut records = Vec::new();
    for (b, backend) in backends.iter().enumerate() {
        for repeat in 0..repeats {
            for k in 0..keys {
                let workload = names[k % names.len()];
                let round = k / names.len();
                let seed = (b as u64) << 48 | u64::from(repeat) << 24 | k as u64;
                let median = 40.0 * (1.0 + (k % names.len()) as f64).powf(1.6);
                let median = median * (1.0 + 0.15 * b as f64);
                let mut r = if *backend == "qemu" && workload == "cpu.hlt" {
                    problem(
                        backend,
                        workload,
                        Status::Skip,
                        "QEMU parks a halted vCPU until an interrupt arrives",
                    )
                } else {
                    record(
                        backend,
                        workload,
                        &lognormal_samples(seed, samples, median, 0.03),
                    )
                };
                if round > 0 {
                    r.series.insert("variant".into(), round.to_string());
                }
                r.repeat = repeat;
                r.parameters.repeats = repeats;
                records.push(r);
            }
        }
    }
    records
}

/// Writes `records` as a new results directory at `dir`.
pub fn write_results(dir: &Path, records: &[Record]) -> Result<(), ResultsError> {
    let mut writer = ResultsWriter::create(dir, false)?;
    for r in records {
        writer.write(r)?;
    }
    Ok(())
}
