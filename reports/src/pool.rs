//! Pooling: every record of one measured quantity (one [`RecordKey`]) on one backend,
//! across repeats and runs, becomes one set of samples. Reports and comparisons work on
//! pools, never on single records.

use std::collections::{BTreeMap, BTreeSet};

use crate::abtest::Direction;
use crate::record::{Record, RecordKey, Status};

/// A record that did not succeed, kept with its reason.
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    pub backend: String,
    pub key: RecordKey,
    pub status: Status,
    pub reason: Option<String>,
    pub run_id: String,
    pub repeat: u32,
    pub notes: BTreeMap<String, String>,
    pub reproduce: String,
}

/// All records of one key on one backend.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub backend: String,
    pub key: RecordKey,
    pub group: String,
    pub unit: String,
    /// `None` where the record names a direction this version does not know.
    pub direction: Option<Direction>,
    /// `cpl0` or `cpl3`.
    pub privilege: String,
    pub description: String,
    /// Samples of every successful record, in record order.
    pub samples: Vec<f64>,
    /// Records pooled, successful or not.
    pub records: usize,
    /// Records that succeeded with samples.
    pub measured_records: usize,
    /// The worst status among the records.
    pub worst_status: Status,
    /// Distinct reasons given by records that did not succeed.
    pub reasons: BTreeSet<String>,
    /// Distinct commands that measure this again (one per run, usually the same).
    pub reproduce: BTreeSet<String>,
    /// Distinct values of each note the guest reported.
    pub notes: BTreeMap<String, BTreeSet<String>>,
    pub run_ids: BTreeSet<String>,
    pub repeats: BTreeSet<u32>,
    /// Units other than `unit` that records of this key carried: pooling them is wrong,
    /// and the report says so.
    pub conflicting_units: BTreeSet<String>,
    /// Guest/native ratios where the workload has a native twin.
    pub native_ratios: Vec<f64>,
    /// The median of each successful record: one value per run and repeat. Samples of one
    /// boot are not independent of each other across boots (a boot shifts them all
    /// together), so tests between builds take these as their units.
    pub run_medians: Vec<f64>,
}

impl Pool {
    fn new(backend: &str, record: &Record) -> Pool {
        Pool {
            backend: backend.to_string(),
            key: record.key(),
            group: record.group.clone(),
            unit: record.unit.clone(),
            direction: Direction::from_name(&record.direction),
            privilege: record.privilege.clone(),
            description: record.description.clone(),
            samples: Vec::new(),
            records: 0,
            measured_records: 0,
            worst_status: Status::Success,
            reasons: BTreeSet::new(),
            reproduce: BTreeSet::new(),
            notes: BTreeMap::new(),
            run_ids: BTreeSet::new(),
            repeats: BTreeSet::new(),
            conflicting_units: BTreeSet::new(),
            native_ratios: Vec::new(),
            run_medians: Vec::new(),
        }
    }

    fn add(&mut self, record: &Record) {
        self.records += 1;
        self.worst_status = self.worst_status.ratchet(record.status);
        if record.unit != self.unit {
            self.conflicting_units.insert(record.unit.clone());
        }
        if record.status == Status::Success && !record.samples.is_empty() {
            self.measured_records += 1;
            self.samples.extend_from_slice(&record.samples);
            if let Some(m) = crate::stats::median(&record.samples) {
                self.run_medians.push(m);
            }
        }
        if let Some(reason) = &record.reason {
            self.reasons.insert(reason.clone());
        }
        if !record.reproduce.is_empty() {
            self.reproduce.insert(record.reproduce.clone());
        }
        for (name, value) in &record.notes {
            self.notes
                .entry(name.clone())
                .or_default()
                .insert(value.clone());
        }
        self.run_ids.insert(record.run_id.clone());
        self.repeats.insert(record.repeat);
        if let Some(ratio) = record.native.as_ref().and_then(|n| n.ratio) {
            self.native_ratios.push(ratio);
        }
    }

    /// Whether there are samples to compute statistics from.
    pub fn is_measured(&self) -> bool {
        !self.samples.is_empty()
    }
}

/// Records pooled by backend kind and key, with the records that did not succeed.
#[derive(Clone, Debug, Default)]
pub struct Pools {
    pub pools: BTreeMap<(String, RecordKey), Pool>,
    pub problems: Vec<Problem>,
}

impl Pools {
    /// Pools `records` by `record.backend.kind` and [`Record::key`].
    pub fn by_backend<'a>(records: impl IntoIterator<Item = &'a Record>) -> Pools {
        Self::build(records, |r| r.backend.kind.clone())
    }

    /// Pools `records` under one backend label, whatever their backend (for comparing a
    /// run on one backend against a run on another).
    pub fn under_label<'a>(records: impl IntoIterator<Item = &'a Record>, label: &str) -> Pools {
        Self::build(records, |_| label.to_string())
    }

    /// Pools `records` under a label of the caller's (a merged matrix's host label,
    /// backend, paging and host fingerprint).
    pub fn by_label<'a>(
        records: impl IntoIterator<Item = &'a Record>,
        label: impl Fn(&Record) -> String,
    ) -> Pools {
        Self::build(records, label)
    }

    fn build<'a>(
        records: impl IntoIterator<Item = &'a Record>,
        backend_of: impl Fn(&Record) -> String,
    ) -> Pools {
        let mut pools: BTreeMap<(String, RecordKey), Pool> = BTreeMap::new();
        let mut problems = Vec::new();
        for record in records {
            let backend = backend_of(record);
            let key = record.key();
            pools
                .entry((backend.clone(), key.clone()))
                .or_insert_with(|| Pool::new(&backend, record))
                .add(record);
            if record.status != Status::Success {
                problems.push(Problem {
                    backend,
                    key,
                    status: record.status,
                    reason: record.reason.clone(),
                    run_id: record.run_id.clone(),
                    repeat: record.repeat,
                    notes: record.notes.clone(),
                    reproduce: record.reproduce.clone(),
                });
            }
        }
        Pools { pools, problems }
    }

    /// Backend kinds present, in the order reports show them: kvm, qemu, qemu-q35, libvirt, xen,
    /// then others by name.
    pub fn backends(&self) -> Vec<String> {
        let kinds: BTreeSet<&String> = self.pools.keys().map(|(b, _)| b).collect();
        let mut kinds: Vec<String> = kinds.into_iter().cloned().collect();
        kinds.sort_by_key(|k| (backend_rank(k), k.clone()));
        kinds
    }

    pub fn get(&self, backend: &str, key: &RecordKey) -> Option<&Pool> {
        self.pools.get(&(backend.to_string(), key.clone()))
    }

    /// Every key present, in table order (see [`key_order`]).
    pub fn keys(&self) -> Vec<RecordKey> {
        let mut groups: BTreeMap<&RecordKey, &str> = BTreeMap::new();
        for ((_, key), pool) in &self.pools {
            groups.entry(key).or_insert(&pool.group);
        }
        let mut keys: Vec<(&RecordKey, &str)> = groups.into_iter().collect();
        keys.sort_by_cached_key(|(key, group)| key_order(group, key));
        keys.into_iter().map(|(key, _)| key.clone()).collect()
    }
}

fn backend_rank(kind: &str) -> usize {
    match kind {
        // The KVM ladder first, layer by layer (our VMM, QEMU microvm, QEMU q35, q35 as a
        // libvirt domain), then Xen.
        "kvm" => 0,
        "qemu" => 1,
        "qemu-q35" => 2,
        "libvirt" => 3,
        "xen" => 4,
        _ => 5,
    }
}

/// Rank of a group in reports: cpu, io, mem, then others by name.
pub fn group_rank(group: &str) -> usize {
    match group {
        "cpu" => 0,
        "io" => 1,
        "mem" => 2,
        _ => 3,
    }
}

/// Sort key that puts measurements in the order of `hvbench list` within their group.
pub fn key_order(group: &str, key: &RecordKey) -> (usize, String, usize, RecordKey) {
    let position = workloads::WORKLOADS
        .iter()
        .position(|w| w.name == key.workload)
        .unwrap_or(usize::MAX);
    (group_rank(group), group.to_string(), position, key.clone())
}
