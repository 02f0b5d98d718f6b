//! `sched.steal` and `sched.fairness`: several SMP guests spinning on fewer host CPUs than
//! vCPUs, driven by the host.
//!
//! - [`spin`]: the guests (VMM processes), their ticks and the host's samples;
//! - [`booted`]: guests whose VMM processes the backend starts (QEMU);
//! - [`threads`]: the host's view of vCPU threads (schedstat, pinning);
//! - [`analysis`]: ticks, shares, Jain's index, steal agreement;
//! - here: parameters, the host set-up (CPU cgroups through the `cgroup` crate's guard),
//!   and the figures of each workload.

pub(crate) mod analysis;
mod booted;
mod spin;
mod threads;
mod xen;

use std::time::Duration;

use cgroup::{CgroupError, CgroupGuard, CgroupPaths, GroupLimits, CAP_PERIOD_US};
use reports::record::Curve;
use thiserror::Error;
use workloads::protocol::Status;
use workloads::table::param;
use workloads::{ParamSpec, WorkloadId};

use self::spin::{run_guests, Observed};
use super::host_context::{HostContext, HostDriven};
use super::plan::param_value;
use super::session::{SeriesSamples, WorkloadOutcome};
use super::WorkloadParam;

#[derive(Debug, Error)]
pub(crate) enum SchedError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("guest {index}: {problem}")]
    Guest { index: usize, problem: String },
    #[error("guest {index} crashed: {detail}")]
    Crash { index: usize, detail: String },
    #[error("guest {index} skipped the workload: {reason}")]
    Skipped { index: usize, reason: String },
    #[error("{0}")]
    Timeout(String),
    #[error("interrupted (Ctrl-C) while {0}")]
    Interrupted(String),
    #[error("{0}")]
    Host(String),
    /// This host cannot run the workload as asked (a `skip`, with the reason).
    #[error("{0}")]
    Unsupported(String),
}

impl SchedError {
    fn status(&self) -> Status {
        match self {
            SchedError::Timeout(_) => Status::Timeout,
            SchedError::Crash { .. } => Status::Crash,
            SchedError::Skipped { .. }
            | SchedError::Unsupported(_)
            | SchedError::Cgroup(CgroupError::NoCpuController(_)) => Status::Skip,
            _ => Status::Error,
        }
    }
}

/// At the start of every `hvbench run`: removes the CPU cgroups a killed run left.
pub fn remove_stale_at_start() -> Result<Option<String>, CgroupError> {
    cgroup::remove_stale(&CgroupPaths::system())
}

/// One run's parameters (the row's defaults, overridden by `--param`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SpinParams {
    pub guests: usize,
    pub vcpus: u32,
    pub duration: Duration,
    pub window: Duration,
    /// Host CPUs 0..pin every vCPU thread is pinned to; 0: not pinned.
    pub pin: usize,
    pub ratio: u32,
    pub capped: bool,
    /// Xen: the guests' cpupool runs credit (else credit2).
    pub xen_credit: bool,
    /// The series the figures belong to (`ratio:2,capped:0` for sched.fairness).
    pub series: String,
}

fn number(id: WorkloadId, params: &[WorkloadParam], spec: &ParamSpec) -> Result<u64, String> {
    let text = param_value(params, id, spec).unwrap_or("");
    spec.parse_one(text)
        .map_err(|e| format!("{}.{}={text}: {}", id.name(), spec.key, e.message()))
}

impl SpinParams {
    pub fn from_run(id: WorkloadId, params: &[WorkloadParam]) -> Result<Self, String> {
        let n = |spec: &ParamSpec| number(id, params, spec);
        let has = |spec: &ParamSpec| id.spec().param(spec.key).is_some();
        let small = |v: u64| u32::try_from(v).map_err(|_| format!("{v} is too large"));
        Ok(SpinParams {
            guests: usize::try_from(n(&param::SPIN_GUESTS)?).map_err(|e| e.to_string())?,
            vcpus: small(n(&param::SPIN_VCPUS)?)?,
            duration: Duration::from_secs(n(&param::SPIN_DURATION_S)?),
            window: Duration::from_millis(n(&param::SPIN_WINDOW_MS)?),
            pin: usize::try_from(n(&param::SPIN_PIN)?).map_err(|e| e.to_string())?,
            ratio: if has(&param::FAIRNESS_RATIO) {
                small(n(&param::FAIRNESS_RATIO)?)?
            } else {
                1
            },
            capped: has(&param::FAIRNESS_CAPPED) && n(&param::FAIRNESS_CAPPED)? == 1,
            xen_credit: has(&param::FAIRNESS_XEN_CREDIT) && n(&param::FAIRNESS_XEN_CREDIT)? == 1,
            series: super::plan::series_points(params, id)
                .first()
                .map(|p| p.name.clone())
                .unwrap_or_default(),
        })
    }

    /// Guest `i`'s weight: 1 for even guests, `ratio` for odd ones.
    pub fn weight(&self, i: usize) -> u32 {
        if i.is_multiple_of(2) {
            1
        } else {
            self.ratio
        }
    }
}

fn direct(values: Vec<f64>) -> SeriesSamples {
    SeriesSamples {
        direct: values,
        ..Default::default()
    }
}

/// The kernel's scheduler and where the vCPU threads ran, for every record's notes.
fn host_notes(outcome: &mut WorkloadOutcome, p: &SpinParams) {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    outcome.note(
        "host_scheduler".into(),
        format!(
            "{} (Linux {release})",
            reports::sched::linux_scheduler(&release)
        ),
    );
    let host_cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    outcome.note(
        "placement".into(),
        format!(
            "{} guests x {} vCPUs on {} host CPUs; {}",
            p.guests,
            p.vcpus,
            host_cpus,
            if p.pin > 0 {
                format!("every vCPU thread pinned to host CPUs 0..{}", p.pin)
            } else {
                "vCPU threads not pinned".into()
            }
        ),
    );
}

fn finish(outcome: &mut WorkloadOutcome, result: Result<Observed, SchedError>) -> Option<Observed> {
    match result {
        Ok(observed) => Some(observed),
        Err(e) => {
            outcome.ratchet(e.status(), e.to_string());
            None
        }
    }
}

fn hello(observed: &Option<Observed>) -> Option<workloads::protocol::Hello> {
    observed.as_ref()?.guests.first()?.hello.clone()
}

/// `sched.steal`: no cgroups; each vCPU's steal as the guest read it against the run
/// delay of its thread, between the first and the last tick.
pub(crate) fn run_steal(id: WorkloadId, ctx: &HostContext) -> HostDriven {
    let mut outcome = WorkloadOutcome::new(id);
    let p = match SpinParams::from_run(id, &ctx.options.params) {
        Ok(p) => p,
        Err(e) => return WorkloadOutcome::failed(id, Status::Error, e).into(),
    };
    if let Some(xl) = ctx.backend.xl_host() {
        return xen::run_steal(id, ctx, xl, &p, outcome);
    }
    host_notes(&mut outcome, &p);
    let observed = finish(&mut outcome, run_guests(ctx, id, &p, &mut |_, _| Ok(())));
    if let Some(o) = &observed {
        if let Err(e) = steal_figures(&mut outcome, o) {
            outcome.ratchet(e.status(), e.to_string());
        }
    }
    HostDriven {
        hello: hello(&observed),
        outcome,
    }
}

/// The per-vCPU steal series (`steal_guest`, `steal_host`), and the two compared
/// figures as `steal_disagreement`, or a note saying why it is undefined
/// (`host_saw_none`: the host's view had no steal).
fn steal_series(
    outcome: &mut WorkloadOutcome,
    (guest, host): (Vec<f64>, Vec<f64>),
    (guest_figure, host_figure): (f64, f64),
    host_saw_none: &str,
) {
    match analysis::disagreement(guest_figure, host_figure) {
        Some(d) => {
            outcome
                .series
                .insert(("steal_disagreement", String::new()), direct(vec![d]));
        }
        None => outcome.note(
            "steal_disagreement".into(),
            format!("undefined: {host_saw_none}"),
        ),
    }
    outcome
        .series
        .insert(("steal_guest", String::new()), direct(guest));
    outcome
        .series
        .insert(("steal_host", String::new()), direct(host));
}

fn steal_figures(outcome: &mut WorkloadOutcome, o: &Observed) -> Result<(), SchedError> {
    let (mut guest, mut host) = (Vec::new(), Vec::new());
    for (g, view) in o.guests.iter().enumerate() {
        if view.steal_msr.as_deref() != Some("kvm") {
            return Err(SchedError::Skipped {
                index: g,
                reason: "the guest has no KVM steal-time MSR: CPUID 0x40000001 EAX bit 5 \
                         (KVM_FEATURE_STEAL_TIME) is clear, so the VMM's CPU model leaves \
                         it out (QEMU: the -cpu model's kvm-steal-time)"
                    .into(),
            });
        }
        let (Some((first, s0)), Some((last, s1))) = (view.ticks.first(), view.ticks.last()) else {
            return Err(SchedError::Guest {
                index: g,
                problem: "reported no tick".into(),
            });
        };
        for cpu in 0..view.threads.len() {
            let at = |t: &analysis::Tick| t.cpus.get(cpu).map_or(0, |c| c.1);
            let g_ns = at(last).saturating_sub(at(first));
            let h_ns = s1[cpu].wait_ns.saturating_sub(s0[cpu].wait_ns);
            guest.push(g_ns as f64 / 1e9);
            host.push(h_ns as f64 / 1e9);
            outcome.note(
                format!("steal_g{g}_vcpu{cpu}"),
                format!("guest {g_ns} ns, host run delay {h_ns} ns"),
            );
        }
    }
    let (sum_guest, sum_host): (f64, f64) = (guest.iter().sum(), host.iter().sum());
    steal_series(
        outcome,
        (guest, host),
        (sum_guest, sum_host),
        "the host saw no run delay (nothing was overcommitted)",
    );
    Ok(())
}

/// `sched.fairness`: each guest's VMM in a weighted (and, capped, quota'd) CPU cgroup.
pub(crate) fn run_fairness(id: WorkloadId, ctx: &HostContext) -> HostDriven {
    let mut outcome = WorkloadOutcome::new(id);
    let p = match SpinParams::from_run(id, &ctx.options.params) {
        Ok(p) => p,
        Err(e) => return WorkloadOutcome::failed(id, Status::Error, e).into(),
    };
    if let Some(xl) = ctx.backend.xl_host() {
        return xen::run_fairness(id, ctx, xl, &p, outcome);
    }
    if p.xen_credit {
        outcome.ratchet(Status::Skip, "xen_credit=1 asks for Xen's credit scheduler");
        return outcome.into();
    }
    host_notes(&mut outcome, &p);
    let result = fairness_guests(ctx, id, &p, &mut outcome);
    let observed = finish(&mut outcome, result);
    if let Some(o) = &observed {
        fairness_figures(&mut outcome, o, &p);
    }
    HostDriven {
        hello: hello(&observed),
        outcome,
    }
}

fn fairness_guests(
    ctx: &HostContext,
    id: WorkloadId,
    p: &SpinParams,
    outcome: &mut WorkloadOutcome,
) -> Result<Observed, SchedError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(SchedError::Unsupported(
            "sched.fairness creates CPU cgroups, which needs root".into(),
        ));
    }
    // Declared before the guests: dropped after them, so it removes empty groups.
    let mut guard = CgroupGuard::acquire(
        CgroupPaths::system(),
        Duration::from_secs(30),
        ctx.interrupted,
    )?;
    if let Some(message) = guard.stale_removed.take() {
        hostutil::say!("hvbench: {message}");
    }
    outcome.note("cgroups".into(), guard.hierarchy().describe().into());
    let host_cpus = match p.pin {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        pin => pin,
    };
    let total: u32 = (0..p.guests).map(|i| p.weight(i)).sum();
    let mut groups = Vec::new();
    for i in 0..p.guests {
        // Its entitled share of the host CPUs, per period.
        let quota_us = p.capped.then(|| {
            u64::from(p.weight(i)) * host_cpus as u64 * CAP_PERIOD_US / u64::from(total.max(1))
        });
        let limits = GroupLimits {
            weight: p.weight(i),
            quota_us,
        };
        groups.push(guard.create(i, limits)?);
    }
    let observed = run_guests(ctx, id, p, &mut |i, pid| {
        Ok(guard.add_process(&groups[i], pid)?)
    });
    let removed = guard.remove()?;
    outcome.note(
        "cgroups_removed".into(),
        format!("{} groups removed at the end", removed.len()),
    );
    observed
}

fn fairness_figures(outcome: &mut WorkloadOutcome, o: &Observed, p: &SpinParams) {
    let weights: Vec<f64> = (0..p.guests).map(|i| f64::from(p.weight(i))).collect();
    share_curves(outcome, o, &weights, p);
    // Windows: differences of consecutive host samples.
    let windows: Vec<Vec<f64>> = o
        .samples
        .windows(2)
        .map(|w| {
            w[1].1
                .iter()
                .zip(&w[0].1)
                .map(|(b, a)| b.saturating_sub(*a) as f64)
                .collect()
        })
        .collect();
    let Some(f) = analysis::fairness(&windows, &weights) else {
        outcome.ratchet(
            Status::Error,
            "the host saw no CPU time used by the guests' vCPU threads in any window",
        );
        return;
    };
    let name = &p.series;
    let series = &mut outcome.series;
    series.insert(("share_error", name.clone()), direct(vec![f.share_error]));
    series.insert(("jain", name.clone()), direct(vec![f.jain]));
    series.insert(
        ("worst_window_share", name.clone()),
        direct(vec![f.worst_window]),
    );
    let relative: Vec<String> = f.relative.iter().map(|r| format!("{r:.4}")).collect();
    outcome.note("received_over_entitled".into(), relative.join(", "));
    let weights: Vec<String> = weights.iter().map(|w| w.to_string()).collect();
    outcome.note("weights".into(), weights.join(":"));
    outcome.note("windows".into(), windows.len().to_string());
    work_note(outcome, o);
}

/// Each guest's received/entitled share per window, over time.
fn share_curves(outcome: &mut WorkloadOutcome, o: &Observed, weights: &[f64], p: &SpinParams) {
    let mut curves: Vec<Vec<[f64; 2]>> = vec![Vec::new(); weights.len()];
    for w in o.samples.windows(2) {
        let used: Vec<f64> = w[1]
            .1
            .iter()
            .zip(&w[0].1)
            .map(|(b, a)| b.saturating_sub(*a) as f64)
            .collect();
        if let Some(rel) = analysis::relative_shares(&used, weights) {
            for (curve, r) in curves.iter_mut().zip(rel) {
                curve.push([w[1].0, r]);
            }
        }
    }
    for (g, points) in curves.into_iter().enumerate() {
        let curve = Curve {
            x_unit: "s".into(),
            y_unit: "received/entitled".into(),
            points,
        };
        outcome
            .curves
            .insert(curve_name(p, g), ("share_error".into(), curve));
    }
}

/// One chart per weight ratio (and cap) in reports: `share_g1_ratio2`, `..._capped`.
fn curve_name(p: &SpinParams, guest: usize) -> String {
    let capped = if p.capped { "_capped" } else { "" };
    format!("share_g{guest}_ratio{}{capped}", p.ratio)
}

/// The guests' own view: each guest's share of all work counted (CPL3 spinning).
fn work_note(outcome: &mut WorkloadOutcome, o: &Observed) {
    let work: Vec<u64> = o
        .guests
        .iter()
        .map(|g| match (g.ticks.first(), g.ticks.last()) {
            (Some((a, _)), Some((b, _))) => {
                let sum = |t: &analysis::Tick| t.cpus.iter().map(|c| c.0).sum::<u64>();
                sum(b).saturating_sub(sum(a))
            }
            _ => 0,
        })
        .collect();
    let total: u64 = work.iter().sum();
    if total > 0 {
        let shares: Vec<String> = work
            .iter()
            .map(|w| format!("{:.4}", *w as f64 / total as f64))
            .collect();
        outcome.note("guest_work_share".into(), shares.join(", "));
    }
}

/// Refuses parameters that cannot work before anything starts.
pub(crate) fn check_params(id: WorkloadId, params: &[WorkloadParam]) -> Result<(), String> {
    SpinParams::from_run(id, params).map(drop)
}
