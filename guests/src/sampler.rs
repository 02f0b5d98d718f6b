//! What a workload function measures and reports through: the sampler (sample sizing,
//! markers, result and note lines) and the refusal a workload returns when it cannot run.
//! The runner builds one per workload; workloads never see the runner.

use core::sync::atomic::{AtomicU64, Ordering};

use workloads::cmdline::{self, GuestConfig};
use workloads::protocol::{LineBuilder, LineKind, Status};
use workloads::{ParamSpec, WorkloadId};

use crate::console;

/// Marker pairs completed in this boot: the `mk` of the next marked sample. The plugin
/// numbers the stop markers it sees the same way.
static MARKER_PAIRS: AtomicU64 = AtomicU64::new(0);

/// Operations per sample when instructions are counted (`markers=1`): the same on every
/// backend, so that a sample's fixed cost (the markers' neighbours, the TSC reads) is
/// shared alike and counts of two machines compare; a calibrated count would follow each
/// machine's speed.
const MARKED_ITERATIONS: u64 = 64;

/// Most iterations one sample may take, so a pathological host cannot spin forever.
const MAX_ITERATIONS: u64 = 1 << 32;

pub fn emit(line: &mut LineBuilder) {
    console::write(line.finish());
}

/// Why a workload stopped: its status (skip for a host that cannot run it) and reason.
pub type Refusal = (Status, &'static str);

/// How one workload's samples are taken.
pub struct Sampler {
    pub workload: WorkloadId,
    pub config: GuestConfig,
    pub min_cycles: u64,
    /// The command line, for the workload's own parameters.
    pub cmdline: &'static str,
}

impl Sampler {
    /// The sample rounds of one series: the warm-ups, then the measured samples, each as
    /// (its index among its kind, whether it is a warm-up).
    pub fn rounds(&self) -> impl Iterator<Item = (u64, bool)> {
        let warmups = (0..u64::from(self.config.warmup)).map(|i| (i, true));
        warmups.chain((0..u64::from(self.config.samples)).map(|i| (i, false)))
    }

    /// The workload's parameter `spec` (one of its row's): the host's value, else the
    /// row's default. The command line was checked against the row when it was parsed.
    pub fn param(&self, spec: &ParamSpec) -> Option<&'static str> {
        debug_assert!(self.workload.spec().param(spec.key) == Some(spec));
        cmdline::param_or_default(self.cmdline, self.workload, spec)
    }

    /// Prints one sample line of the workload's first metric.
    pub fn emit_sample(&self, params: &str, index: u64, warmup: bool, ops: u64, cycles: u64) {
        self.emit_metric_sample(self.metric(), params, index, warmup, ops, cycles);
    }

    /// Prints one sample line of `metric` (a metric of the workload's table row).
    pub fn emit_metric_sample(
        &self,
        metric: &str,
        params: &str,
        index: u64,
        warmup: bool,
        ops: u64,
        cycles: u64,
    ) {
        self.emit_full_sample(metric, params, (index, warmup), ops, cycles, None);
    }

    /// As [`Sampler::emit_sample`], for a sample taken inside [`Sampler::mark`]: with the
    /// number of its marker pair, if it has one.
    pub fn emit_marked_sample(
        &self,
        params: &str,
        (index, warmup): (u64, bool),
        ops: u64,
        cycles: u64,
        marker: Option<u64>,
    ) {
        self.emit_full_sample(self.metric(), params, (index, warmup), ops, cycles, marker);
    }

    /// Runs `op`, a sample that times itself, between the instruction-count markers when
    /// the host asked for them, as the latency path does; returns its result and the
    /// number of the pair for [`Sampler::emit_marked_sample`].
    pub fn mark<T>(&self, op: impl FnOnce() -> T) -> (T, Option<u64>) {
        let (result, marker) = self.marked(|| Ok::<T, core::convert::Infallible>(op()));
        match result {
            Ok(value) => (value, marker),
            Err(never) => match never {},
        }
    }

    /// Prints one sample line, with the number of the marker pair around it if any.
    fn emit_full_sample(
        &self,
        metric: &str,
        params: &str,
        (index, warmup): (u64, bool),
        ops: u64,
        cycles: u64,
        marker: Option<u64>,
    ) {
        let mut line = LineBuilder::new(LineKind::Sample);
        line.text("w", self.workload.name()).text("m", metric);
        if !params.is_empty() {
            line.text("p", params);
        }
        line.num("n", index).num("ops", ops).num("cycles", cycles);
        if warmup {
            line.num("warm", 1);
        }
        if let Some(mk) = marker {
            line.num("mk", mk);
        }
        emit(&mut line);
    }

    fn metric(&self) -> &'static str {
        self.workload
            .spec()
            .metrics
            .first()
            .map(|m| m.name)
            .unwrap_or("latency")
    }

    /// As [`Sampler::latency`], for operations that count their own work: `op(n)` runs n
    /// repetitions and returns (operations, cycles), where an operation may be a byte.
    pub fn measure(
        &self,
        params: &str,
        mut op: impl FnMut(u64) -> Result<(u64, u64), Refusal>,
    ) -> Result<u64, Refusal> {
        let iterations = if self.config.markers {
            MARKED_ITERATIONS
        } else {
            self.calibrate(&mut op)?
        };
        for round in self.rounds() {
            let (result, marker) = self.marked(|| op(iterations));
            let (ops, cycles) = result?;
            self.emit_full_sample(self.metric(), params, round, ops, cycles, marker);
        }
        Ok(iterations)
    }

    /// Doubles the iteration count from 1 until one run of `op` lasts `min_cycles`.
    fn calibrate(
        &self,
        op: &mut impl FnMut(u64) -> Result<(u64, u64), Refusal>,
    ) -> Result<u64, Refusal> {
        let mut iterations = 1u64;
        loop {
            let (_, cycles) = op(iterations)?;
            if cycles >= self.min_cycles || iterations >= MAX_ITERATIONS {
                return Ok(iterations);
            }
            iterations *= 2;
        }
    }

    /// Runs `op` between the instruction-count markers when the host asked for them
    /// (`markers=1`), and numbers the pair; otherwise runs it bare. The markers sit outside
    /// the timed region (`op` reads the TSC itself) and are NOPs: they cost nothing
    /// measurable. A sample whose `op` failed gets no number (its stop never ran).
    fn marked<T, E>(&self, op: impl FnOnce() -> Result<T, E>) -> (Result<T, E>, Option<u64>) {
        if !self.config.markers {
            return (op(), None);
        }
        crate::arch::cpu::insns_marker_start();
        let result = op();
        if result.is_err() {
            return (result, None);
        }
        crate::arch::cpu::insns_marker_stop();
        let number = MARKER_PAIRS.fetch_add(1, Ordering::Relaxed);
        (result, Some(number))
    }

    /// Grows the iteration count until one run of `op` lasts `min_cycles` (kvm-unit-tests'
    /// method), then prints the warm-up samples (marked, kept) and the measured samples.
    /// `op(n)` runs n operations and returns the cycles they took, or why it cannot.
    pub fn latency(
        &self,
        params: &str,
        mut op: impl FnMut(u64) -> Result<u64, Refusal>,
    ) -> Result<u64, Refusal> {
        self.measure(params, |n| op(n).map(|cycles| (n, cycles)))
    }

    pub fn note_text(&self, key: &str, value: &str) {
        emit(
            LineBuilder::new(LineKind::Note)
                .text("w", self.workload.name())
                .text("k", key)
                .text("v", value),
        );
    }

    pub fn note_hex(&self, key: &str, value: u64) {
        emit(
            LineBuilder::new(LineKind::Note)
                .text("w", self.workload.name())
                .text("k", key)
                .hex("v", value),
        );
    }
}
