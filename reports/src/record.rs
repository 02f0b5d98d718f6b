//! The record: one JSON object per workload, metric and series in `results.jsonl`.
//!
//! Everything needed to judge and to reproduce a figure travels with it: every sample,
//! the host it ran on, the backend, the guest image, the parameters and one command that
//! measures it again.
//!
//! JSON has no NaN or infinity (serde_json writes them as `null`, which a required number
//! cannot read back), so a record is written through [`Record::to_finite`]: an optional
//! figure that is not finite is left out, a required one makes the record an error.
//! Optional fields are optional in the schema: absent or `null`, they read as `None`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use workloads::protocol::Status;

use crate::stats::Summary;

/// Version of this schema; readers refuse records of a newer one.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub schema: u32,
    /// One invocation of `hvbench run`; shared by all its records.
    pub run_id: String,
    /// Which repetition (`--repeat`) of the run, from 0.
    pub repeat: u32,
    /// When the record was written (UTC, RFC 3339).
    pub timestamp: String,
    pub workload: String,
    pub group: String,
    pub description: String,
    /// `cpl0` or `cpl3`: where the measured loop ran.
    pub privilege: String,
    pub metric: String,
    pub unit: String,
    /// `lower_is_better` or `higher_is_better`.
    pub direction: String,
    /// Parameters of this series (a working-set size, a page size); empty if none.
    #[serde(default)]
    pub series: BTreeMap<String, String>,
    pub status: Status,
    /// Why the status is not `success`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every measured sample, in `unit`, in the order taken.
    pub samples: Vec<f64>,
    /// The same samples in TSC cycles per operation, as the guest measured them.
    #[serde(default)]
    pub samples_cycles: Vec<f64>,
    /// Operations timed per sample.
    #[serde(default)]
    pub ops_per_sample: Vec<u64>,
    /// Warm-up samples (in `unit`): kept, left out of the statistics.
    #[serde(default)]
    pub warmup_samples: Vec<f64>,
    /// Statistics of `samples`; absent when there are none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
    /// The identical code run natively on the host, where the workload has a native twin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native: Option<NativeComparison>,
    /// Named values the guest reported beside its samples (checksums, values read).
    #[serde(default)]
    pub notes: BTreeMap<String, String>,
    /// VM exits seen by the VMM while this workload ran, by reason (where the backend
    /// can count them).
    #[serde(default)]
    pub exits: BTreeMap<String, u64>,
    /// Time series the host observed while the workload ran (KSM's sharing, a VMM's
    /// resident memory), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub curves: BTreeMap<String, Curve>,
    pub backend: BackendInfo,
    pub host: HostInfo,
    pub guest: GuestInfo,
    pub parameters: RunParameters,
    pub hvbench: ToolInfo,
    /// One command that measures this figure again.
    pub reproduce: String,
}

impl Record {
    /// The identity of the measured quantity, shared across runs: what `compare` and
    /// `report` match records by.
    pub fn key(&self) -> RecordKey {
        RecordKey {
            workload: self.workload.clone(),
            metric: self.metric.clone(),
            series: self
                .series
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// This record as it may be written to JSON, where NaN and infinity do not exist.
    /// Optional figures that are not finite are left out: the native ratio, the boot time,
    /// the summary (its figures are derived from the samples) and single points of a
    /// curve. A required figure that is not finite (a sample, a native sample or median)
    /// is an error: the record cannot be written truthfully.
    pub fn to_finite(&self) -> Result<Record, NonFinite> {
        let required = |field: &'static str, values: &[f64]| {
            if values.iter().all(|v| v.is_finite()) {
                Ok(())
            } else {
                Err(NonFinite {
                    workload: self.workload.clone(),
                    field,
                })
            }
        };
        required("samples", &self.samples)?;
        required("samples_cycles", &self.samples_cycles)?;
        required("warmup_samples", &self.warmup_samples)?;
        let mut record = self.clone();
        if let Some(native) = &mut record.native {
            required("native.samples", &native.samples)?;
            required("native.median", &[native.median])?;
            native.ratio = native.ratio.filter(|r| r.is_finite());
        }
        record.guest.boot_ms = record.guest.boot_ms.filter(|b| b.is_finite());
        record.summary = record.summary.filter(Summary::is_finite);
        for curve in record.curves.values_mut() {
            curve.points.retain(|p| p.iter().all(|v| v.is_finite()));
        }
        Ok(record)
    }

    /// Whether the guest ran under QEMU's TCG translator (the lab, or QEMU without KVM):
    /// its figures measure the emulator.
    pub fn ran_under_tcg(&self) -> bool {
        self.host.class().under_tcg
            || self.backend.details.get("accel").map(String::as_str) == Some("tcg")
    }
}

/// A figure a record cannot do without is not a finite number.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("record of {workload}: {field} holds a value that is not a finite number")]
pub struct NonFinite {
    pub workload: String,
    pub field: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RecordKey {
    pub workload: String,
    pub metric: String,
    pub series: String,
}

impl std::fmt::Display for RecordKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.workload, self.metric)?;
        if !self.series.is_empty() {
            write!(f, " [{}]", self.series)?;
        }
        Ok(())
    }
}

/// The same work run natively on the host: how close the guest comes to native speed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NativeComparison {
    /// Native samples, in the record's unit.
    pub samples: Vec<f64>,
    pub median: f64,
    /// The guest's performance relative to native, from the medians: 1.0 is native speed,
    /// below 1 the guest is slower (native/guest for times, guest/native for rates).
    /// Absent where it is not a finite number (a median of 0); `null`, as hvbench wrote
    /// such a ratio before, reads as absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

/// A time series: (x, y) points in the stated units, x ascending.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Curve {
    pub x_unit: String,
    pub y_unit: String,
    pub points: Vec<[f64; 2]>,
}

/// Which hypervisor stack ran the guest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// `kvm` (hvbench's own VMM), `qemu` or `xen`.
    pub kind: String,
    /// Version of the VMM or hypervisor (QEMU's, Xen's; hvbench's for its own VMM).
    #[serde(default)]
    pub version: String,
    /// Backend specifics: accelerator, machine type, Xen capabilities and scheduler, ...
    #[serde(default)]
    pub details: BTreeMap<String, String>,
}

/// The machine that produced a figure, as the harness fingerprinted it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// One word ([`crate::host::HostClass`]), with `+tcg` where QEMU's TCG ran the guest
    /// on that host; read it through [`HostInfo::class`].
    pub class: String,
    pub hostname: String,
    pub cpu_vendor: String,
    pub cpu_model: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Hardware virtualisation visible to this host.
    pub vmx: bool,
    pub svm: bool,
    /// Runs under a hypervisor itself (CPUID hypervisor bit).
    pub hypervisor_flag: bool,
    pub kernel: String,
    /// `kvm_intel`, `kvm_amd`, `kvm_pvm`, or empty without KVM.
    pub kvm_module: String,
    /// How guest memory is translated: `ept`, `npt`, `shadow`, or empty if unknown.
    pub paging: String,
    /// How guest CPL0 code runs: `native`, or `emulated` (kvm_pvm, TCG); read it through
    /// [`HostInfo::cpl0`].
    pub cpl0: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsc_khz: Option<u64>,
    /// How `tsc_khz` was obtained.
    pub tsc_source: String,
    /// Transparent huge pages setting (`always`, `madvise`, `never`).
    pub thp: String,
    /// KSM `run` value at the time of the fingerprint.
    pub ksm: String,
    /// Anything else worth keeping (cpufreq governor, Xen's own view of the host, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// The guest image and what it saw.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestInfo {
    pub image_sha256: String,
    /// Hypervisor the guest detected (CPUID 0x40000000): `kvm`, `xen`, `other`, `none`.
    pub hypervisor: String,
    pub signature: String,
    pub cpu_vendor: String,
    /// TSC frequency used to convert cycles, and where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsc_khz: Option<u64>,
    pub tsc_source: String,
    /// RAM the guest found in its PVH memory map, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_bytes: Option<u64>,
    /// From asking the backend to boot (VMM start, `xl create`) to the guest's first line,
    /// in milliseconds, for the boot that measured this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_ms: Option<f64>,
}

/// Everything about the run that shapes a figure.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunParameters {
    pub samples: u32,
    pub warmup: u32,
    pub sample_us: u32,
    pub timeout_s: u64,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub repeats: u32,
    /// This workload's own parameters (`--param`), by key.
    #[serde(default)]
    pub workload_params: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolInfo {
    pub version: String,
    pub git_revision: String,
}
