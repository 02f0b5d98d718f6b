//! `sched.steal` and `sched.fairness` on Xen: the spinning guests are PVH domains booted
//! through the backend (each destroyed when its session goes), and the host's view is
//! Xen's own accounting read from the dom0: `xl vcpu-list` (each vCPU's running time, in
//! tenths of a second) with the dom0's clock (`/proc/uptime`) in the same command.
//!
//! The domains run in a cpupool of hvbench's own ([`SchedPool`]: one physical CPU taken
//! from Pool-0, destroyed and the CPU given back on every path; a pool a killed run left
//! is removed first) under credit2 or, with `xen_credit=1`, credit: the guests overcommit
//! that CPU, and dom0 keeps Pool-0's (in the TCG lab, dom0 sharing a CPU with busy HVM
//! vCPUs saw its processes fault on a wrong FS base).
//!
//! - steal: each vCPU's runnable + offline time from Xen's runstate as the guest read it,
//!   against wall time less running time as the dom0 saw it (a spinning vCPU never
//!   blocks, so what it did not run it waited), compared as rates over each side's span;
//! - fairness: weights (and caps) through `xl sched-credit2` / `xl sched-credit`.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use workloads::protocol::Status;
use workloads::WorkloadId;

use super::booted::BootedGuests;
use super::spin::{on_event, GuestView, Observed};
use super::{SchedError, SpinParams};
use crate::backend::xen::sched::XlHost;
use crate::run::host_context::{HostContext, HostDriven};
use crate::run::session::WorkloadOutcome;

/// Most host samples per run (the dom0's answers are bounded by the run's length anyway;
/// the guests' ticks are bounded where they are taken, `spin::on_event`).
const MAX_SAMPLES: usize = 100_000;
/// Time the domains get to boot and start their APs, beyond the spinning itself (TCG).
const BOOT_SLACK: Duration = Duration::from_secs(120);
/// The cpupool hvbench makes for the domains (scheduler credit2 or credit).
pub const POOL: &str = "hvbench-sched";
const POOL0: &str = "Pool-0";
/// Xen's default weight (credit and credit2): weight `w` is `w` times this.
const BASE_WEIGHT: u32 = 256;

/// Longest wait for a domain's next line before the loop looks at the clock again.
const QUIET_WAIT: Duration = Duration::from_millis(5);

/// One look at the dom0: its clock, and each guest's vCPUs' running time (ns, by vCPU).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct HostSample {
    pub uptime_ns: u64,
    pub vcpu_ns: Vec<Vec<u64>>,
}

/// The dom0 command of one sample: its clock before and after `xl vcpu-list` (which takes
/// up to a second in the TCG lab), so the sample is timed at the midpoint.
const SAMPLE_COMMAND: &str = "cat /proc/uptime; xl vcpu-list; cat /proc/uptime";

fn uptime(line: &str) -> Option<u64> {
    seconds_to_ns(line.split_whitespace().next()?)
}

/// Parses [`SAMPLE_COMMAND`]'s output for the domains `names` (in order). Lines of other
/// domains are skipped; a missing vCPU reads 0.
pub(crate) fn parse_sample(text: &str, names: &[String], vcpus: usize) -> Option<HostSample> {
    let lines: Vec<&str> = text.lines().collect();
    let (first, rest) = lines.split_first()?;
    let (last, rest) = rest.split_last()?;
    let (before, after) = (uptime(first)?, uptime(last)?);
    if after < before {
        return None;
    }
    let mut vcpu_ns = vec![vec![0u64; vcpus]; names.len()];
    for line in rest {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Name ID VCPU CPU State Time(s) Affinity...
        let [name, _id, vcpu, _cpu, _state, time, ..] = fields[..] else {
            continue;
        };
        let Some(g) = names.iter().position(|n| n == name) else {
            continue;
        };
        let Ok(vcpu) = vcpu.parse::<usize>() else {
            continue;
        };
        if let (Some(slot), Some(ns)) = (vcpu_ns[g].get_mut(vcpu), seconds_to_ns(time)) {
            *slot = ns;
        }
    }
    Some(HostSample {
        uptime_ns: before + (after - before) / 2,
        vcpu_ns,
    })
}

/// Decimal seconds as the dom0 prints them (`12.34`) in ns, exactly (no float): digits,
/// optionally a point and up to 9 more; anything else (a sign, NaN, 20 digits) is `None`.
fn seconds_to_ns(text: &str) -> Option<u64> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |t: &str| t.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty()
        || whole.len() > 9
        || fraction.len() > 9
        || !digits(whole)
        || !digits(fraction)
    {
        return None;
    }
    let scale = 10u64.pow(9 - u32::try_from(fraction.len()).ok()?);
    let fraction: u64 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    whole
        .parse::<u64>()
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(fraction * scale)
}

/// A cpupool of hvbench's own under `scheduler`, holding one CPU taken from Pool-0.
/// `remove` (also on drop) destroys it and gives the CPU back.
pub(crate) struct SchedPool<'a> {
    xl: &'a dyn XlHost,
    removed: bool,
}

/// The CPUs of pool `name` from `xl cpupool-list -c` (`Name  CPU list`), if it exists.
pub(crate) fn pool_cpus(list: &str, name: &str) -> Option<Vec<u32>> {
    let line = list
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))?;
    let cpus = line.split_whitespace().nth(1).unwrap_or("");
    Some(cpus.split(',').filter_map(|c| c.parse().ok()).collect())
}

/// Destroys pool `POOL` (moving any domain left in it to Pool-0 first) and returns its
/// CPUs to Pool-0. `Ok(false)` when there was none.
fn remove_pool(xl: &dyn XlHost) -> Result<bool, SchedError> {
    let list = xl.xl("xl cpupool-list -c").map_err(SchedError::Host)?;
    let Some(cpus) = pool_cpus(&list, POOL) else {
        return Ok(false);
    };
    // Domains still in the pool (a run stopped between boot and destroy) go to Pool-0.
    xl.xl(&format!(
        "xl list -c | awk 'NR > 1 && $NF == \"{POOL}\" {{ print $1 }}' | \
         while read -r d; do xl cpupool-migrate \"$d\" {POOL0} || true; done"
    ))
    .map_err(SchedError::Host)?;
    xl.xl(&format!("xl cpupool-destroy {POOL}"))
        .map_err(SchedError::Host)?;
    for cpu in cpus {
        xl.xl(&format!("xl cpupool-cpu-add {POOL0} {cpu}"))
            .map_err(SchedError::Host)?;
    }
    Ok(true)
}

impl<'a> SchedPool<'a> {
    /// Takes Pool-0's highest CPU into a new pool under `scheduler` (`credit2` or
    /// `credit`); Pool-0 keeps the rest (dom0).
    pub fn create(xl: &'a dyn XlHost, scheduler: &str) -> Result<Self, SchedError> {
        if remove_pool(xl)? {
            hostutil::say!("hvbench: removed the cpupool {POOL} that a killed run left");
        }
        let list = xl.xl("xl cpupool-list -c").map_err(SchedError::Host)?;
        let cpus = pool_cpus(&list, POOL0).unwrap_or_default();
        let (Some(&cpu), true) = (cpus.iter().max(), cpus.len() >= 2) else {
            return Err(SchedError::Unsupported(format!(
                "a cpupool of hvbench's own needs a CPU of Pool-0's {} to spare (Pool-0 \
                 keeps dom0)",
                cpus.len()
            )));
        };
        xl.xl(&format!("xl cpupool-cpu-remove {POOL0} {cpu}"))
            .map_err(SchedError::Host)?;
        let pool = SchedPool { xl, removed: false };
        // Domains are created in it: they never share a CPU with dom0.
        xl.set_pool(Some(POOL));
        // From here the pool (or the removed CPU) is given back on drop.
        xl.xl(&format!(
            "xl cpupool-create name=\\\"{POOL}\\\" sched=\\\"{scheduler}\\\" cpus=\\\"{cpu}\\\""
        ))
        .map_err(|e| {
            let _ = xl.xl(&format!("xl cpupool-cpu-add {POOL0} {cpu}"));
            SchedError::Host(e)
        })?;
        Ok(pool)
    }

    pub fn remove(&mut self) -> Result<(), SchedError> {
        if self.removed {
            return Ok(());
        }
        self.xl.set_pool(None);
        // Marked removed only once it is: a failure here is tried again on drop.
        remove_pool(self.xl)?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for SchedPool<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            hostutil::say!("hvbench: warning: removing the cpupool {POOL}: {e}");
        }
    }
}

/// Everything a Xen run produced: the shared view, and the dom0's per-vCPU samples.
pub(crate) struct XenObserved {
    pub observed: Observed,
    pub host: Vec<HostSample>,
    /// dom0 samples that failed (the lab's ssh now and then), with the last reason.
    pub failed_samples: Vec<String>,
}

/// Most failed dom0 samples a run tolerates before it is an error.
const MAX_FAILED_SAMPLES: usize = 10;

/// Boots `p.guests` domains, hands each name to `place` (weights, pools), and collects
/// until every guest has ended. The domains are destroyed before this returns.
pub(crate) fn run_domains(
    ctx: &HostContext,
    xl: &dyn XlHost,
    id: WorkloadId,
    p: &SpinParams,
    place: &mut dyn FnMut(usize, &str) -> Result<(), SchedError>,
) -> Result<XenObserved, SchedError> {
    let mut options = ctx.options.clone();
    options.vcpus = p.vcpus;
    let line = options.guest_cmdline(&[id]);
    // Paused until all are booted: spinning vCPUs would starve the dom0 that boots the
    // next one (the guest's duration runs on its TSC, so it must outlast this).
    let mut domains = BootedGuests::boot(ctx, &line, p.vcpus, p.guests, &mut |name| {
        xl.xl(&format!("xl pause {name}"))
            .map(drop)
            .map_err(SchedError::Host)
    })?;
    let names = domains.names();
    for (i, name) in names.iter().enumerate() {
        place(i, name)?;
    }
    for name in &names {
        unpause(xl, name)?;
    }
    // The domains are destroyed as `domains` drops.
    collect(ctx, xl, id, p, &mut domains, &names)
}

/// Tries of `xl unpause` (idempotent): in the TCG lab xl itself now and then crashes.
const UNPAUSE_TRIES: usize = 3;

fn unpause(xl: &dyn XlHost, domain: &str) -> Result<(), SchedError> {
    let mut last = String::new();
    for _ in 0..UNPAUSE_TRIES {
        match xl.xl(&format!("xl unpause {domain}")) {
            Ok(_) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(SchedError::Host(last))
}

/// The event loop: the domains' lines, and a dom0 sample every window while all spin.
fn collect(
    ctx: &HostContext,
    xl: &dyn XlHost,
    id: WorkloadId,
    p: &SpinParams,
    domains: &mut BootedGuests,
    names: &[String],
) -> Result<XenObserved, SchedError> {
    let mut out = XenObserved {
        observed: Observed::default(),
        host: Vec::new(),
        failed_samples: Vec::new(),
    };
    out.observed
        .guests
        .resize_with(names.len(), GuestView::default);
    let deadline = Instant::now() + p.duration + BOOT_SLACK;
    let mut next_sample = Instant::now();
    let vcpus = p.vcpus as usize;
    while !out.observed.guests.iter().all(|g| g.done) {
        if ctx.interrupted.load(Ordering::Relaxed) {
            return Err(SchedError::Interrupted("the domains spun".into()));
        }
        if Instant::now() >= deadline {
            return Err(SchedError::Timeout(format!(
                "the domains did not end within {:?} of booting",
                p.duration + BOOT_SLACK
            )));
        }
        let all_spinning = out
            .observed
            .guests
            .iter()
            .all(|g| !g.ticks.is_empty() && !g.done);
        if all_spinning && Instant::now() >= next_sample && out.host.len() < MAX_SAMPLES {
            next_sample = Instant::now() + p.window;
            if let Err(e) = sample(xl, names, vcpus, &mut out) {
                out.failed_samples.push(e.to_string());
                if out.failed_samples.len() > MAX_FAILED_SAMPLES {
                    return Err(e);
                }
            }
        }
        if let Some((index, event)) = domains.next_event(QUIET_WAIT)? {
            // The dom0's samples are the host's view here: a tick carries none.
            on_event(
                id,
                &mut out.observed.guests[index],
                index,
                event,
                &mut |_| Ok(Vec::new()),
            )?;
        }
    }
    Ok(out)
}

fn sample(
    xl: &dyn XlHost,
    names: &[String],
    vcpus: usize,
    out: &mut XenObserved,
) -> Result<(), SchedError> {
    let text = xl.xl(SAMPLE_COMMAND).map_err(SchedError::Host)?;
    let s = parse_sample(&text, names, vcpus).ok_or_else(|| {
        SchedError::Host("the dom0's uptime and `xl vcpu-list` did not parse".into())
    })?;
    let first = out.host.first().map_or(s.uptime_ns, |f| f.uptime_ns);
    let used = s.vcpu_ns.iter().map(|v| v.iter().sum()).collect();
    let at = s.uptime_ns.saturating_sub(first) as f64 / 1e9;
    out.observed.samples.push((at, used));
    out.host.push(s);
    Ok(())
}

/// Why a run has no dom0 sample: the domains never all spun at once.
fn never_sampled(x: &XenObserved) -> SchedError {
    let ticks: Vec<usize> = x.observed.guests.iter().map(|g| g.ticks.len()).collect();
    SchedError::Host(format!(
        "the dom0 was never sampled: the domains never all spun at once (ticks per \
         domain: {ticks:?}; each is paused from its boot until all are up, and duration_s \
         must outlast the later boots)"
    ))
}

/// Steal per vCPU: the guest's (runstate) over its tick span, the dom0's (wall less
/// running) over its sample span; the disagreement compares the two rates.
pub(crate) fn steal_figures(
    outcome: &mut WorkloadOutcome,
    x: &XenObserved,
) -> Result<(), SchedError> {
    let (Some(h0), Some(h1)) = (x.host.first(), x.host.last()) else {
        return Err(never_sampled(x));
    };
    let host_span = h1.uptime_ns.saturating_sub(h0.uptime_ns);
    let (mut guest, mut host) = (Vec::new(), Vec::new());
    let (mut guest_span_sum, mut host_span_sum) = (0u64, 0u64);
    for (g, view) in x.observed.guests.iter().enumerate() {
        if view.steal_msr.as_deref() != Some("xen-runstate") {
            return Err(SchedError::Skipped {
                index: g,
                reason: "the guest did not register Xen's runstate area".into(),
            });
        }
        let khz = view.hello.as_ref().and_then(|h| h.tsc_khz).unwrap_or(0);
        let (Some((first, _)), Some((last, _)), true) =
            (view.ticks.first(), view.ticks.last(), khz > 0)
        else {
            return Err(SchedError::Guest {
                index: g,
                problem: "reported no tick, or no TSC frequency".into(),
            });
        };
        let span = last.tsc.saturating_sub(first.tsc).saturating_mul(1_000_000) / khz;
        for cpu in 0..first.cpus.len().min(last.cpus.len()) {
            let g_ns = last.cpus[cpu].1.saturating_sub(first.cpus[cpu].1);
            let ran = |s: &HostSample| s.vcpu_ns.get(g).and_then(|v| v.get(cpu)).copied();
            let ran_ns = ran(h1).unwrap_or(0).saturating_sub(ran(h0).unwrap_or(0));
            let h_ns = host_span.saturating_sub(ran_ns);
            guest.push(g_ns as f64 / 1e9);
            host.push(h_ns as f64 / 1e9);
            guest_span_sum += span;
            host_span_sum += host_span;
            outcome.note(
                format!("steal_g{g}_vcpu{cpu}"),
                format!(
                    "guest runstate {g_ns} ns of {span} ns; dom0 wall less running \
                     {h_ns} ns of {host_span} ns"
                ),
            );
        }
    }
    let rate = |sum: f64, span: u64| sum * 1e9 / span.max(1) as f64;
    let guest_rate = rate(guest.iter().sum(), guest_span_sum);
    let host_rate = rate(host.iter().sum(), host_span_sum);
    outcome.note(
        "steal_method".into(),
        format!(
            "Xen: guest = runstate runnable+offline; host = dom0 uptime less `xl vcpu-list` \
             time (0.1 s resolution; each sample at the midpoint of the dom0 clock read around \
             it), over {} dom0 samples; rates of steal per second of \
             span: guest {guest_rate:.4}, host {host_rate:.4}",
            x.host.len()
        ),
    );
    super::steal_series(
        outcome,
        (guest, host),
        (guest_rate, host_rate),
        "the dom0 saw no steal (nothing was overcommitted)",
    );
    Ok(())
}

/// Sets guest `i`'s weight (and cap) with `xl sched-<scheduler>`.
pub(crate) fn weigh(
    xl: &dyn XlHost,
    scheduler: &str,
    p: &SpinParams,
    pool_cpus: usize,
    i: usize,
    domain: &str,
) -> Result<(), SchedError> {
    let total: u32 = (0..p.guests).map(|g| p.weight(g)).sum();
    let mut command = format!(
        "xl sched-{scheduler} -d {domain} -w {}",
        BASE_WEIGHT * p.weight(i)
    );
    if p.capped {
        // Percent of one physical CPU: its entitled share of the pool's CPUs.
        let cap =
            (u64::from(p.weight(i)) * pool_cpus as u64 * 100 / u64::from(total.max(1))).max(1);
        command.push_str(&format!(" -c {cap}"));
    }
    xl.xl(&command).map(drop).map_err(SchedError::Host)
}

fn pin_refused(p: &SpinParams) -> Option<String> {
    (p.pin > 0).then(|| {
        "pin names host CPUs for hvbench's VMM threads; on Xen the domains run in a \
         cpupool of hvbench's own with one physical CPU"
            .to_string()
    })
}

fn placement(outcome: &mut WorkloadOutcome, p: &SpinParams) {
    outcome.note(
        "placement".into(),
        format!(
            "{} domains x {} vCPUs on one physical CPU (a cpupool of hvbench's own)",
            p.guests, p.vcpus
        ),
    );
    outcome.note(
        "figures".into(),
        "shares and steal rates are ratios of Xen's own CPU-time accounting (meaningful in \
         a TCG lab); seconds of steal, like any latency there, are emulation time"
            .into(),
    );
}

fn sample_notes(outcome: &mut WorkloadOutcome, x: &XenObserved) {
    outcome.note("dom0_samples".into(), x.host.len().to_string());
    if let Some(last) = x.failed_samples.last() {
        outcome.note(
            "dom0_samples_failed".into(),
            format!("{} (the last: {last})", x.failed_samples.len()),
        );
    }
}

fn first_hello(x: &Option<XenObserved>) -> Option<workloads::protocol::Hello> {
    x.as_ref()?.observed.guests.first()?.hello.clone()
}

/// `sched.steal` on Xen: the domains in a credit2 pool of their own, no weights.
pub(crate) fn run_steal(
    id: WorkloadId,
    ctx: &HostContext,
    xl: &dyn XlHost,
    p: &SpinParams,
    outcome: WorkloadOutcome,
) -> HostDriven {
    run_pooled(id, ctx, xl, p, outcome, false, steal_figures)
}

/// `sched.fairness` on Xen: weights (and caps) through `xl sched-*` in the pool.
pub(crate) fn run_fairness(
    id: WorkloadId,
    ctx: &HostContext,
    xl: &dyn XlHost,
    p: &SpinParams,
    outcome: WorkloadOutcome,
) -> HostDriven {
    run_pooled(id, ctx, xl, p, outcome, true, |outcome, x| {
        if x.host.is_empty() {
            return Err(never_sampled(x));
        }
        super::fairness_figures(outcome, &x.observed, p);
        Ok(())
    })
}

/// What both rows share: `pin` refused, the placement noted, the domains run in the pool
/// (weighed if `weights`), the dom0's samples noted, then the row's own `figures`.
fn run_pooled(
    id: WorkloadId,
    ctx: &HostContext,
    xl: &dyn XlHost,
    p: &SpinParams,
    mut outcome: WorkloadOutcome,
    weights: bool,
    figures: impl FnOnce(&mut WorkloadOutcome, &XenObserved) -> Result<(), SchedError>,
) -> HostDriven {
    if let Some(reason) = pin_refused(p) {
        outcome.ratchet(Status::Skip, reason);
        return outcome.into();
    }
    placement(&mut outcome, p);
    let x = pooled_domains(ctx, xl, id, p, &mut outcome, weights)
        .map_err(|e| outcome.ratchet(e.status(), e.to_string()))
        .ok();
    if let Some(x) = &x {
        sample_notes(&mut outcome, x);
        if let Err(e) = figures(&mut outcome, x) {
            outcome.ratchet(e.status(), e.to_string());
        }
    }
    HostDriven {
        hello: first_hello(&x),
        outcome,
    }
}

/// Makes the pool, runs the domains in it (weighed if `weights`), removes the pool.
fn pooled_domains(
    ctx: &HostContext,
    xl: &dyn XlHost,
    id: WorkloadId,
    p: &SpinParams,
    outcome: &mut WorkloadOutcome,
    weights: bool,
) -> Result<XenObserved, SchedError> {
    let scheduler = if p.xen_credit { "credit" } else { "credit2" };
    let mut pool = SchedPool::create(xl, scheduler)?;
    let cpus_list = xl.xl("xl cpupool-list -c").map_err(SchedError::Host)?;
    let cpus = pool_cpus(&cpus_list, POOL).map_or(1, |c| c.len().max(1));
    outcome.note(
        "xen_scheduler".into(),
        format!("{scheduler} in cpupool {POOL} ({cpus} physical CPU; dom0 in {POOL0})"),
    );
    let params = xl
        .xl(&format!("xl sched-{scheduler} -s -p {POOL}"))
        .unwrap_or_else(|e| e);
    outcome.note("xen_sched_params".into(), one_line(&params));
    let mut settings = Vec::new();
    let result = run_domains(ctx, xl, id, p, &mut |i, name| {
        if weights {
            weigh(xl, scheduler, p, cpus, i, name)?;
        }
        let set = xl
            .xl(&format!("xl sched-{scheduler} -d {name}"))
            .unwrap_or_else(|e| e);
        settings.push(one_line(set.lines().last().unwrap_or("")));
        Ok(())
    });
    outcome.note("xen_sched_domains".into(), settings.join("; "));
    match pool.remove() {
        Ok(()) => outcome.note(
            "cpupool_removed".into(),
            format!("{POOL} destroyed and its CPU given back to {POOL0}"),
        ),
        Err(e) => outcome.ratchet(Status::Error, format!("removing cpupool {POOL}: {e}")),
    }
    result
}

/// The dom0's words on one line, bounded.
fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(400)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VCPU_LIST: &str = "1234.56 2000.00\n\
Name                                ID  VCPU   CPU State   Time(s) Affinity (Hard / Soft)\n\
Domain-0                             0     0    0   r--      50.2  all / all\n\
hvbench-7-sched-1                    3     0    1   r--       2.1  all / all\n\
hvbench-7-sched-1                    3     1    0   -w-       1.9  all / all\n\
hvbench-7-sched-2                    4     1    -   --p       0.5  all / all\n\
1235.56 2001.00\n";

    #[test]
    fn a_dom0_sample_reads_our_domains_only() {
        let names = vec!["hvbench-7-sched-1".to_string(), "hvbench-7-sched-2".into()];
        let s = parse_sample(VCPU_LIST, &names, 2).unwrap();
        // The midpoint of the clock read before and after.
        assert_eq!(s.uptime_ns, 1_235_060_000_000);
        assert_eq!(
            s.vcpu_ns,
            vec![vec![2_100_000_000, 1_900_000_000], vec![0, 500_000_000]]
        );
        // A vCPU past the count asked for, or a hostile time, is not taken.
        let text = "1.0 1.0\nhvbench-7-sched-1 3 9 0 r-- 1.0 all\nhvbench-7-sched-1 3 0 0 r-- NaN all\n1.0 1.0\n";
        assert_eq!(
            parse_sample(text, &names, 2).unwrap().vcpu_ns[0],
            vec![0, 0]
        );
        assert!(parse_sample("", &names, 2).is_none());
        assert!(parse_sample("-1 0\n-1 0\n", &names, 2).is_none());
        // A clock that went back between the two reads is no sample.
        assert!(parse_sample("2.0 0\n1.0 0\n", &names, 2).is_none());
    }

    #[test]
    fn seconds_are_read_exactly_and_hostile_ones_refused() {
        assert_eq!(seconds_to_ns("12.34"), Some(12_340_000_000));
        assert_eq!(seconds_to_ns("7"), Some(7_000_000_000));
        assert_eq!(seconds_to_ns("0.000000001"), Some(1));
        for bad in [
            "",
            ".5",
            "-1",
            "NaN",
            "1e3",
            "1.2.3",
            "1234567890",
            "1.0000000001",
        ] {
            assert_eq!(seconds_to_ns(bad), None, "{bad}");
        }
    }

    /// A dom0 that keeps which CPUs each pool holds and answers the pool commands.
    #[derive(Default)]
    struct FakeXl {
        pool0: std::cell::RefCell<Vec<u32>>,
        ours: std::cell::RefCell<Option<Vec<u32>>>,
        create_pool: std::cell::RefCell<Option<String>>,
    }

    impl XlHost for FakeXl {
        fn xl(&self, command: &str) -> Result<String, String> {
            let number = |c: &str| c.rsplit(' ').next().and_then(|n| n.parse::<u32>().ok());
            if command == "xl cpupool-list -c" {
                let list = |c: &[u32]| c.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
                let mut text = format!("Name CPU list\nPool-0 {}\n", list(&self.pool0.borrow()));
                if let Some(cpus) = &*self.ours.borrow() {
                    text.push_str(&format!("{POOL} {}\n", list(cpus)));
                }
                return Ok(text);
            }
            if command.starts_with("xl cpupool-cpu-remove") {
                let cpu = number(command).ok_or("no cpu")?;
                self.pool0.borrow_mut().retain(|c| *c != cpu);
            } else if command.starts_with("xl cpupool-create") {
                let cpu = command
                    .split("cpus=\\\"")
                    .nth(1)
                    .and_then(|c| c.split('\\').next());
                *self.ours.borrow_mut() =
                    Some(vec![cpu.and_then(|c| c.parse().ok()).ok_or("cpus")?]);
            } else if command.starts_with("xl cpupool-destroy") {
                self.ours.borrow_mut().take().ok_or("no such pool")?;
            } else if command.starts_with("xl cpupool-cpu-add") {
                self.pool0
                    .borrow_mut()
                    .push(number(command).ok_or("no cpu")?);
            }
            Ok(String::new())
        }

        fn set_pool(&self, pool: Option<&str>) {
            *self.create_pool.borrow_mut() = pool.map(str::to_string);
        }
    }

    #[test]
    fn the_pool_takes_a_cpu_and_gives_it_back_on_drop_and_a_stale_one_goes_first() {
        let xl = FakeXl::default();
        *xl.pool0.borrow_mut() = vec![0, 1, 2];
        {
            let _pool = SchedPool::create(&xl, "credit").unwrap();
            assert_eq!(*xl.ours.borrow(), Some(vec![2]));
            assert_eq!(*xl.pool0.borrow(), vec![0, 1]);
            assert_eq!(xl.create_pool.borrow().as_deref(), Some(POOL));
        }
        // Dropped without `remove`: destroyed, its CPU back, domains no longer sent there.
        assert_eq!(*xl.ours.borrow(), None);
        assert_eq!(*xl.pool0.borrow(), vec![0, 1, 2]);
        assert_eq!(*xl.create_pool.borrow(), None);
        // A pool a killed run left (holding CPU 2) is removed before a new one is made.
        *xl.pool0.borrow_mut() = vec![0, 1];
        *xl.ours.borrow_mut() = Some(vec![2]);
        let mut pool = SchedPool::create(&xl, "credit2").unwrap();
        assert_eq!(*xl.ours.borrow(), Some(vec![2]));
        assert_eq!(*xl.pool0.borrow(), vec![0, 1]);
        pool.remove().unwrap();
        assert_eq!(*xl.pool0.borrow(), vec![0, 1, 2]);
        // Pool-0 with one CPU (dom0's) has none to spare: nothing changes.
        *xl.pool0.borrow_mut() = vec![0];
        assert!(matches!(
            SchedPool::create(&xl, "credit"),
            Err(SchedError::Unsupported(_))
        ));
        assert_eq!(*xl.pool0.borrow(), vec![0]);
        assert_eq!(*xl.ours.borrow(), None);
    }

    #[test]
    fn pool_cpus_are_read_from_xl() {
        let cpus = "Name               CPU list\nPool-0             0,1\nhvbench-sched      \n";
        assert_eq!(pool_cpus(cpus, "Pool-0"), Some(vec![0, 1]));
        assert_eq!(pool_cpus(cpus, POOL), Some(vec![]));
        assert_eq!(pool_cpus(cpus, "other"), None);
    }
}
