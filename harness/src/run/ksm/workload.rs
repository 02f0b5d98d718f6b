//! The `mem.ksm` sequence: guests up and filled, KSM on with stated settings, counters
//! sampled until the sharing settles, KSM's settings back, write costs timed, guests
//! ended, figures into a [`WorkloadOutcome`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use reports::record::Curve;
use workloads::cmdline::encode_with_params;
use workloads::ksm::{PAGE_BYTES, RING_END, RING_MEASURE};
use workloads::protocol::{CrashReport, Event, Hello, Status};
use workloads::table::param::{KSM_IDENTICAL, KSM_SEED, KSM_SIZE};
use workloads::WorkloadId;

use ksm::analysis::{self, SavedByKsm, Tick};
use ksm::procstat::{self, SmapsRollup};
use ksm::{KsmCounters, KsmGuard, KsmSysfs};

use super::guests::{hvbench_exe, runs_vmm, ConsoleEvent, Fleet, GuestSpec};
use super::params::KsmParams;
use super::{system_paths, MemKsmError};
use crate::run::host_context::HostContext;
use crate::run::session::{SeriesSamples, WorkloadOutcome};

const ID: WorkloadId = WorkloadId::MemKsm;
/// Most write samples kept per metric (the guest is untrusted).
const MAX_SAMPLES: usize = 100_000;
/// How long a run waits for another run that holds the KSM lock.
const LOCK_WAIT: Duration = Duration::from_secs(600);
/// The KSM tunables worth recording beside the ones hvbench sets.
const OBSERVED_TUNABLES: &[&str] = &[
    "run",
    "pages_to_scan",
    "sleep_millisecs",
    "advisor_mode",
    "smart_scan",
    "use_zero_pages",
    "max_page_sharing",
    "merge_across_nodes",
];

fn progress(text: &str) {
    crate::say!("hvbench: mem.ksm: {text}");
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Runs `mem.ksm` to its outcome; never panics, failures are statuses with reasons.
pub(crate) fn run(ctx: &HostContext) -> WorkloadOutcome {
    let mut outcome = WorkloadOutcome::new(ID);
    if let Err(e) = measure(ctx, &mut outcome) {
        // After Ctrl-C, whatever failed first (a guest's console closing, say) is a
        // consequence; the interruption is the reason.
        let (status, reason) = if ctx.interrupted.load(Ordering::Relaxed) {
            (Status::Error, format!("interrupted (Ctrl-C): {e}"))
        } else {
            (e.status(), e.to_string())
        };
        outcome.ratchet(status, reason);
    }
    outcome
}

/// What hvbench knows about one guest from its console.
#[derive(Debug, Default)]
struct GuestState {
    hello: Option<Hello>,
    pages: Option<u64>,
    identical_pages: Option<u64>,
    ready: bool,
    result: Option<(Status, Option<String>)>,
    /// Its end was asked for: a result or a closed console is no longer an error.
    may_end: bool,
    closed: bool,
}

/// The guests and what their consoles said.
struct Guests<'a> {
    fleet: Fleet,
    state: Vec<GuestState>,
    /// Guest 0's write samples, by metric.
    samples: BTreeMap<&'static str, SeriesSamples>,
    interrupted: &'a AtomicBool,
}

fn parse_hex(text: &str) -> Option<u64> {
    u64::from_str_radix(text.strip_prefix("0x")?, 16).ok()
}

fn describe_crash(c: &CrashReport) -> String {
    format!(
        "exception {} at rip={:#x} cr2={:#x} error={:#x}",
        c.vector, c.rip, c.cr2, c.error_code
    )
}

impl Guests<'_> {
    fn died(&self, index: usize, what: &str) -> MemKsmError {
        let stderr = self.fleet.stderr_tail(index);
        MemKsmError::Guest {
            index,
            problem: if stderr.is_empty() {
                what.to_string()
            } else {
                format!("{what} (its VMM said: {stderr})")
            },
        }
    }

    fn handle(&mut self, index: usize, event: ConsoleEvent) -> Result<(), MemKsmError> {
        let Some(guest) = self.state.get_mut(index) else {
            return Ok(());
        };
        let event = match event {
            ConsoleEvent::Event(event) => event,
            ConsoleEvent::Damaged(text) => {
                return Err(MemKsmError::Guest {
                    index,
                    problem: format!("printed a damaged result line ({text})"),
                })
            }
            ConsoleEvent::Closed => {
                guest.closed = true;
                if guest.may_end && guest.result.is_some() {
                    return Ok(());
                }
                let what = match &guest.result {
                    Some((status, reason)) => format!(
                        "ended early with {}{}",
                        status.name(),
                        reason
                            .as_deref()
                            .map(|r| format!(": {r}"))
                            .unwrap_or_default()
                    ),
                    None => "its VMM ended without a result".into(),
                };
                return Err(self.died(index, &what));
            }
        };
        match event {
            Event::Hello(hello) => guest.hello = Some(hello),
            Event::Start(w) if w == ID => {}
            Event::Start(w) | Event::Skip { workload: w, .. } if w != ID => {
                return Err(MemKsmError::Guest {
                    index,
                    problem: format!("ran {}, which was not asked for", w.name()),
                })
            }
            Event::Skip { reason, .. } => {
                return Err(MemKsmError::Skipped { index, reason });
            }
            Event::Note { key, value, .. } => match key.as_str() {
                "pages" => guest.pages = parse_hex(&value),
                "identical_pages" => guest.identical_pages = parse_hex(&value),
                "ready" => guest.ready = true,
                _ => {}
            },
            Event::Sample(s) => {
                if index != 0 || !matches!(s.metric, "write_merged" | "write_unmerged") {
                    return Err(MemKsmError::Guest {
                        index,
                        problem: format!("sent a {} sample it was not asked for", s.metric),
                    });
                }
                let series = self.samples.entry(s.metric).or_default();
                let list = if s.warmup {
                    &mut series.warmup
                } else {
                    &mut series.measured
                };
                if list.len() >= MAX_SAMPLES {
                    return Err(MemKsmError::Guest {
                        index,
                        problem: "sent more samples than the host keeps".into(),
                    });
                }
                list.push((s.ops, s.cycles));
            }
            Event::Result { status, reason, .. } => {
                guest.result = Some((status, reason.clone()));
                if !guest.may_end {
                    return Err(MemKsmError::Guest {
                        index,
                        problem: format!(
                            "ended before the host asked ({}{})",
                            status.name(),
                            reason.map(|r| format!(": {r}")).unwrap_or_default()
                        ),
                    });
                }
            }
            Event::Crash(c) => {
                return Err(MemKsmError::Crash {
                    index,
                    detail: describe_crash(&c),
                })
            }
            // Starts of other workloads were refused above; `end` follows the result.
            Event::Start(_) | Event::End(_) => {}
        }
        Ok(())
    }

    /// Handles console events until `until`; an error as soon as a guest misbehaves.
    fn pump_until(&mut self, until: Instant, doing: &str) -> Result<(), MemKsmError> {
        loop {
            if self.interrupted.load(Ordering::Relaxed) {
                return Err(MemKsmError::Interrupted(doing.to_string()));
            }
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            match self
                .fleet
                .next_event((until - now).min(Duration::from_millis(100)))
            {
                Ok((index, event)) => self.handle(index, event)?,
                Err(RecvTimeoutError::Timeout) => {}
                // Every console closed and was handled; nothing more will come.
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep((until - now).min(Duration::from_millis(100)))
                }
            }
        }
    }

    /// Handles events until `done` holds, or fails at `deadline`.
    fn wait_for(
        &mut self,
        doing: &str,
        deadline: Instant,
        done: impl Fn(&[GuestState]) -> bool,
    ) -> Result<(), MemKsmError> {
        while !done(&self.state) {
            if Instant::now() >= deadline {
                return Err(MemKsmError::Timeout(format!(
                    "no progress while {doing}: the guests did not get there in time"
                )));
            }
            self.pump_until(
                (Instant::now() + Duration::from_millis(100)).min(deadline),
                doing,
            )?;
        }
        Ok(())
    }
}

/// The guest command line of guest `index`.
fn guest_cmdline(ctx: &HostContext, p: &KsmParams, index: usize) -> String {
    let config = ctx.options.guest_config(&[ID]);
    // Seeds from 1: each guest's unique pages differ from every other guest's.
    let seed = (index + 1).to_string();
    let mut params = vec![
        (ID, KSM_SEED.key, seed.as_str()),
        (ID, KSM_IDENTICAL.key, &p.identical),
    ];
    if let Some(size) = &p.size {
        params.push((ID, KSM_SIZE.key, size));
    }
    encode_with_params(&config, &params)
}

fn sum_smaps(pids: &[u32]) -> Result<SmapsRollup, MemKsmError> {
    pids.iter().try_fold(SmapsRollup::default(), |sum, pid| {
        Ok(sum + procstat::smaps_rollup(*pid)?)
    })
}

/// The curves of one run, each with the metric whose record carries it.
#[derive(Default)]
struct Curves {
    by_name: BTreeMap<&'static str, (&'static str, Curve)>,
}

impl Curves {
    fn push(&mut self, name: &'static str, metric: &'static str, unit: &str, t: f64, y: f64) {
        let (_, curve) = self.by_name.entry(name).or_insert_with(|| {
            (
                metric,
                Curve {
                    x_unit: "s".into(),
                    y_unit: unit.into(),
                    points: Vec::new(),
                },
            )
        });
        curve.points.push([t, y]);
    }

    fn sample(&mut self, t: f64, s: &Snapshot, base: &Snapshot) {
        let pages = |n: u64| n as f64;
        let c = &s.counters;
        self.push(
            "ksm_pages_sharing",
            "pages_merged",
            "pages",
            t,
            pages(c.pages_sharing),
        );
        self.push(
            "ksm_pages_shared",
            "pages_merged",
            "pages",
            t,
            pages(c.pages_shared),
        );
        self.push(
            "ksm_pages_unshared",
            "pages_merged",
            "pages",
            t,
            pages(c.pages_unshared),
        );
        self.push(
            "ksm_pages_volatile",
            "pages_merged",
            "pages",
            t,
            pages(c.pages_volatile),
        );
        self.push(
            "ksm_full_scans",
            "pages_merged",
            "scans",
            t,
            pages(c.full_scans),
        );
        if let Some(scanned) = c.pages_scanned {
            self.push(
                "ksm_pages_scanned",
                "pages_merged",
                "pages",
                t,
                pages(scanned),
            );
        }
        if let Some(ours) = s.vmm_merging {
            self.push("vmm_merging_pages", "pages_merged", "pages", t, pages(ours));
        }
        self.push(
            "merged_gained",
            "time_to_90",
            "pages",
            t,
            pages(s.merged().saturating_sub(base.merged())),
        );
        let sharing_gain = c.pages_sharing.saturating_sub(base.counters.pages_sharing);
        self.push(
            "saved_by_pages_sharing",
            "saved_ksm",
            "MiB",
            t,
            (sharing_gain * PAGE_BYTES) as f64 / (1 << 20) as f64,
        );
        self.push(
            "vmm_pss_total",
            "saved_pss",
            "MiB",
            t,
            mib(s.memory.pss_kib),
        );
        self.push(
            "vmm_rss_total",
            "saved_pss",
            "MiB",
            t,
            mib(s.memory.rss_kib),
        );
        self.push("ksmd_cpu", "ksmd_cpu", "s", t, s.ksmd_cpu - base.ksmd_cpu);
    }
}

/// Everything sampled at one moment.
#[derive(Clone, Copy, Debug)]
struct Snapshot {
    counters: KsmCounters,
    /// The VMMs' pages that KSM merged, summed (`None`: the kernel does not say).
    vmm_merging: Option<u64>,
    memory: SmapsRollup,
    ksmd_cpu: f64,
}

impl Snapshot {
    fn take(sysfs: &KsmSysfs, pids: &[u32], ksmd: u32) -> Result<Self, MemKsmError> {
        let counters = sysfs.counters()?;
        let vmm_merging = pids
            .iter()
            .map(|pid| procstat::merging_pages(*pid))
            .sum::<Option<u64>>();
        Ok(Snapshot {
            counters,
            vmm_merging,
            memory: sum_smaps(pids)?,
            ksmd_cpu: procstat::cpu_seconds(ksmd)?,
        })
    }

    /// The merged count the figures follow: the VMMs' own, else KSM's host-wide one.
    fn merged(&self) -> u64 {
        self.vmm_merging.unwrap_or(self.counters.pages_sharing)
    }
}

/// Fails early where this host cannot run the workload: memory, the hvbench binary, ksmd.
fn preflight(p: &KsmParams) -> Result<(std::path::PathBuf, u32), MemKsmError> {
    let need_mib = u64::from(p.guests) * u64::from(p.guest_mib);
    if let Some(available) = procstat::mem_available_mib() {
        if need_mib > available * 8 / 10 {
            return Err(MemKsmError::Host(format!(
                "{} guests of {} MiB need {need_mib} MiB before any merging; this host has \
                 {available} MiB available (hvbench leaves a fifth free)",
                p.guests, p.guest_mib
            )));
        }
    }
    let exe = hvbench_exe()?;
    if !runs_vmm(&exe) {
        return Err(MemKsmError::Host(format!(
            "{} cannot start guests (`vmm --doorbell-stdin`): set HVBENCH_EXE to the hvbench \
             binary",
            exe.display()
        )));
    }
    let ksmd = procstat::find_ksmd()
        .ok_or_else(|| MemKsmError::Host("no ksmd kernel thread on this host".into()))?;
    Ok((exe, ksmd))
}

/// Starts the guests and waits until each has filled its memory.
fn start_guests<'a>(
    ctx: &HostContext<'a>,
    p: &KsmParams,
    exe: std::path::PathBuf,
) -> Result<Guests<'a>, MemKsmError> {
    let options = ctx.options;
    let cmdlines: Vec<String> = (0..p.guests as usize)
        .map(|i| guest_cmdline(ctx, p, i))
        .collect();
    let ready_within = options.boot_timeout + options.workload_timeout;
    let spec = GuestSpec {
        exe,
        guest_image: options.guest_path.clone(),
        memory_mib: p.guest_mib,
        // A backstop only: hvbench ends them itself.
        timeout: ready_within + p.max + 2 * options.workload_timeout + Duration::from_secs(60),
        vcpus: 1,
        mergeable: true,
    };
    progress(&format!(
        "starting {} guests of {} MiB (identical fraction {})",
        p.guests, p.guest_mib, p.identical
    ));
    let mut guests = Guests {
        fleet: Fleet::spawn(&spec, &cmdlines)?,
        state: (0..p.guests).map(|_| GuestState::default()).collect(),
        samples: BTreeMap::new(),
        interrupted: ctx.interrupted,
    };
    let filling = "waiting for the guests to fill their memory";
    guests.wait_for(filling, Instant::now() + ready_within, |g| {
        g.iter().all(|g| g.ready)
    })?;
    Ok(guests)
}

/// What KSM should find (each identical page once per guest), checked to be the same for
/// every guest; returns the identical pages per guest.
fn note_expected(
    guests: &Guests,
    p: &KsmParams,
    notes: &mut BTreeMap<String, String>,
) -> Result<u64, MemKsmError> {
    let pages = guests.state[0].pages.unwrap_or(0);
    let identical = guests.state[0].identical_pages.unwrap_or(0);
    if guests
        .state
        .iter()
        .any(|g| g.pages != Some(pages) || g.identical_pages != Some(identical))
    {
        return Err(MemKsmError::Guest {
            index: 0,
            problem: "the guests disagree on how many pages they filled".into(),
        });
    }
    let guest_count = u64::from(p.guests);
    notes.insert("pages_per_guest".into(), pages.to_string());
    notes.insert("identical_pages_per_guest".into(), identical.to_string());
    notes.insert(
        "expected".into(),
        format!(
            "from the filled regions alone: {} guest pages merged, {} pages saved \
             (identical pages x guests, and x (guests - 1)); the guest kernel's own identical \
             pages add a few",
            identical.saturating_mul(guest_count),
            identical.saturating_mul(guest_count.saturating_sub(1))
        ),
    );
    Ok(identical)
}

fn describe_tunables(t: &BTreeMap<String, String>) -> String {
    OBSERVED_TUNABLES
        .iter()
        .filter_map(|name| t.get(*name).map(|v| format!("{name}={v}")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The settings this run applies, given KSM's settings before it.
fn ksm_settings(p: &KsmParams, before: &BTreeMap<String, String>) -> Vec<(&'static str, String)> {
    let mut settings: Vec<(&str, String)> = Vec::new();
    if before.get("advisor_mode").is_some_and(|m| m != "none") {
        // The advisor would override pages_to_scan.
        settings.push(("advisor_mode", "none".into()));
    }
    settings.push(("pages_to_scan", p.pages_to_scan.to_string()));
    settings.push(("sleep_millisecs", p.sleep_millisecs.to_string()));
    settings.push(("run", "1".into()));
    settings
}

/// Notes on the state before KSM starts: its settings, the load, who else is mergeable.
fn note_baseline(
    notes: &mut BTreeMap<String, String>,
    before: &BTreeMap<String, String>,
    settings: &[(&str, String)],
    pids: &[u32],
    base: &Snapshot,
) {
    notes.insert("ksm_before".into(), describe_tunables(before));
    let applied: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
    notes.insert("ksm_applied".into(), applied.join(" "));
    notes.insert("load_at_start".into(), procstat::load_average());
    let others = procstat::other_mergeable_processes(pids);
    let others = if others.is_empty() {
        "none".to_string()
    } else {
        format!(
            "{} (ksmd scans them too): {}",
            others.len(),
            others.join(", ")
        )
    };
    notes.insert("other_mergeable_processes".into(), others);
    let merged_count = if base.vmm_merging.is_some() {
        "the VMM processes' /proc/PID/ksm_merging_pages, summed"
    } else {
        "KSM's host-wide pages_sharing (this kernel has no per-process count)"
    };
    notes.insert("merged_count".into(), merged_count.into());
}

/// What sampling KSM's merging from its start produced.
struct Sampling {
    curves: Curves,
    ticks: Vec<Tick>,
    last: Snapshot,
    converged: bool,
    /// Seconds from KSM's start to the last sample.
    observed: f64,
}

/// Samples every `sample_interval` until the merged count settles or `max` passes.
fn sample_merging(
    guests: &mut Guests,
    p: &KsmParams,
    sysfs: &KsmSysfs,
    ksmd: u32,
    base: &Snapshot,
) -> Result<Sampling, MemKsmError> {
    let pids = guests.fleet.pids();
    let t0 = Instant::now();
    let tick = |t: f64, s: &Snapshot| Tick {
        t,
        merged: s.merged(),
        full_scans: s.counters.full_scans,
    };
    let mut curves = Curves::default();
    curves.sample(0.0, base, base);
    let mut ticks = vec![tick(0.0, base)];
    let mut last = *base;
    let mut converged = false;
    for k in 1u32.. {
        guests.pump_until(t0 + p.sample_interval * k, "KSM was merging")?;
        let t = t0.elapsed().as_secs_f64();
        last = Snapshot::take(sysfs, &pids, ksmd)?;
        curves.sample(t, &last, base);
        ticks.push(tick(t, &last));
        converged = analysis::converged(&ticks, base.counters.full_scans);
        if converged || t0.elapsed() >= p.max {
            break;
        }
    }
    Ok(Sampling {
        curves,
        ticks,
        last,
        converged,
        observed: t0.elapsed().as_secs_f64(),
    })
}

/// Notes on the state at the end: KSM's counters and the VMMs' memory, both ends.
fn note_end(notes: &mut BTreeMap<String, String>, base: &Snapshot, s: &Sampling, pids: &[u32]) {
    notes.insert("load_at_end".into(), procstat::load_average());
    notes.insert("observed_s".into(), format!("{:.3}", s.observed));
    notes.insert("converged".into(), s.converged.to_string());
    let (b, e) = (&base.counters, &s.last.counters);
    notes.insert(
        "ksm_counters".into(),
        format!(
            "at the start: pages_shared={} pages_sharing={} pages_unshared={} full_scans={}; at \
             the end: pages_shared={} pages_sharing={} pages_unshared={} pages_volatile={} \
             full_scans={}",
            b.pages_shared,
            b.pages_sharing,
            b.pages_unshared,
            b.full_scans,
            e.pages_shared,
            e.pages_sharing,
            e.pages_unshared,
            e.pages_volatile,
            e.full_scans,
        ),
    );
    let (m0, m1) = (&base.memory, &s.last.memory);
    notes.insert(
        "vmm_memory".into(),
        format!(
            "before KSM: RSS {:.1} MiB, PSS {:.1} MiB; at the end: RSS {:.1} MiB, PSS {:.1} MiB \
             (summed over the {} VMM processes)",
            mib(m0.rss_kib),
            mib(m0.pss_kib),
            mib(m1.rss_kib),
            mib(m1.pss_kib),
            pids.len()
        ),
    );
    for (i, pid) in pids.iter().enumerate() {
        if let Some(merging) = procstat::merging_pages(*pid) {
            notes.insert(format!("vmm{i}_ksm_merging_pages"), merging.to_string());
        }
    }
    notes.insert("method".into(), METHOD.into());
}

const METHOD: &str = "time_to_90: seconds from KSM's start to the first sample at which the \
     merged count had gained 90% of its final gain (resolution: sample_ms); pages_merged: the \
     gain of the merged count (see merged_count); saved_pss: the VMM processes' summed PSS \
     (smaps_rollup) just before KSM started minus the same sum at the end; saved_ksm: KSM's \
     host-wide pages_sharing gain times 4 KiB, recorded only when the host-wide merged \
     mappings (pages_shared + pages_sharing) grew exactly as the VMMs' did; ksmd_cpu: ksmd's \
     utime+stime over the same span; write_*: guest 0's first write to each page, merged \
     (identical across guests) or unmerged (unique), after KSM's settings were restored";

/// Guest 0 times its writes, then every guest ends.
fn time_writes(guests: &mut Guests, workload_timeout: Duration) -> Result<(), MemKsmError> {
    guests.state[0].may_end = true;
    guests.fleet.ring(0, RING_MEASURE)?;
    guests.wait_for(
        "guest 0 timed its writes",
        Instant::now() + workload_timeout,
        |g| g[0].result.is_some(),
    )?;
    for i in 1..guests.state.len() {
        guests.state[i].may_end = true;
        guests.fleet.ring(i, RING_END)?;
    }
    guests.wait_for("the guests ended", Instant::now() + workload_timeout, |g| {
        g.iter().all(|g| g.result.is_some())
    })?;
    guests.fleet.wait_all(Duration::from_secs(5));
    Ok(())
}

fn direct(value: f64) -> SeriesSamples {
    SeriesSamples {
        direct: vec![value],
        ..Default::default()
    }
}

/// The sharing figures: time to 90%, pages merged, memory saved, ksmd's CPU time.
fn sharing_figures(outcome: &mut WorkloadOutcome, base: &Snapshot, s: &Sampling) {
    let last = &s.last;
    let series = &mut outcome.series;
    let notes = &mut outcome.notes;
    match analysis::time_to_fraction(&s.ticks, base.merged(), 0.9) {
        Some(t) => {
            series.insert(("time_to_90", String::new()), direct(t));
        }
        None => {
            let why = "undefined: KSM merged none of the guests' pages";
            notes.insert("time_to_90".into(), why.into());
        }
    }
    let merged_gain = last.merged().saturating_sub(base.merged());
    series.insert(("pages_merged", String::new()), direct(merged_gain as f64));
    let saved_pss = mib(base.memory.pss_kib) - mib(last.memory.pss_kib);
    series.insert(("saved_pss", String::new()), direct(saved_pss));
    let (b, e) = (&base.counters, &last.counters);
    match analysis::saved_by_pages_sharing(b, e, base.vmm_merging, last.vmm_merging) {
        SavedByKsm::Guests(saved) => {
            series.insert(("saved_ksm", String::new()), direct(saved));
        }
        SavedByKsm::HostWide(saved) => {
            series.insert(("saved_ksm", String::new()), direct(saved));
            let why = "host-wide: this kernel cannot say whose pages merged";
            notes.insert("saved_ksm".into(), why.into());
        }
        SavedByKsm::NotTheGuestsAlone {
            others,
            sharing_gain,
        } => {
            notes.insert(
                "saved_ksm".into(),
                format!(
                    "not recorded: while the guests merged, other processes' merged mappings \
                     changed by {others} pages, so KSM's host-wide pages_sharing gain \
                     ({sharing_gain}) is not the guests' alone; saved_pss is"
                ),
            );
        }
    }
    let ksmd_cpu = last.ksmd_cpu - base.ksmd_cpu;
    series.insert(("ksmd_cpu", String::new()), direct(ksmd_cpu));
    let share = format!("{:.3}", ksmd_cpu / s.observed.max(1e-9));
    notes.insert("ksmd_cpu_share".into(), share);
}

/// Guest 0's write samples, converted to nanoseconds with the TSC frequency it reported.
fn write_figures(outcome: &mut WorkloadOutcome, guests: &mut Guests, host_tsc_khz: Option<u64>) {
    let tsc_khz = guests.state[0]
        .hello
        .as_ref()
        .and_then(|h| h.tsc_khz)
        .or(host_tsc_khz);
    if let Some(khz) = tsc_khz {
        let khz = khz.to_string();
        outcome.notes.insert("write_tsc_khz".into(), khz);
    }
    for (metric, mut samples) in std::mem::take(&mut guests.samples) {
        if let Some(khz) = tsc_khz.filter(|k| *k > 0) {
            samples.direct = samples
                .measured
                .iter()
                .map(|(ops, cycles)| *cycles as f64 / (*ops).max(1) as f64 * 1e6 / khz as f64)
                .collect();
        }
        outcome.series.insert((metric, String::new()), samples);
    }
}

/// The outcome's status from guest 0's result and whether the sharing settled.
fn judge(outcome: &mut WorkloadOutcome, guests: &Guests, p: &KsmParams, converged: bool) {
    if let Some((status, reason)) = &guests.state[0].result {
        if *status != Status::Success {
            let why = reason.clone().unwrap_or_else(|| "no reason given".into());
            outcome.ratchet(*status, format!("guest 0 timing writes: {why}"));
        }
    }
    if !converged {
        outcome.ratchet(
            Status::Timeout,
            format!(
                "the sharing was still changing after max_s = {} s; the figures are those at \
                 the cut-off (raise mem.ksm.max_s or mem.ksm.pages_to_scan)",
                p.max.as_secs()
            ),
        );
    }
}

fn measure(ctx: &HostContext, outcome: &mut WorkloadOutcome) -> Result<(), MemKsmError> {
    let options = ctx.options;
    let p = KsmParams::from_run(&options.params, options.memory_mib)?;
    for (key, value) in p.describe() {
        outcome.notes.insert(key.to_string(), value);
    }
    let (exe, ksmd) = preflight(&p)?;
    let paths = system_paths();
    let sysfs: KsmSysfs = paths.sysfs.clone();
    // The lock first: nothing of this run starts while another run drives KSM.
    let mut guard = KsmGuard::acquire(paths, LOCK_WAIT, ctx.interrupted)?;
    if let Some(message) = &guard.stale_restored {
        crate::say!("hvbench: {message}");
        let message = message.clone();
        outcome
            .notes
            .insert("stale_settings_restored".into(), message);
    }
    let mut guests = start_guests(ctx, &p, exe)?;
    let identical = note_expected(&guests, &p, &mut outcome.notes)?;

    // The baseline, then KSM on.
    let pids = guests.fleet.pids();
    let before = sysfs.tunables()?;
    let settings = ksm_settings(&p, &before);
    let base = Snapshot::take(&sysfs, &pids, ksmd)?;
    note_baseline(&mut outcome.notes, &before, &settings, &pids, &base);
    guard.apply(&settings)?;
    progress(&format!(
        "KSM on (pages_to_scan {}, sleep_millisecs {}); sampling every {} ms until the merged \
         pages settle (at most {} s)",
        p.pages_to_scan,
        p.sleep_millisecs,
        p.sample_interval.as_millis(),
        p.max.as_secs()
    ));
    let mut sampling = sample_merging(&mut guests, &p, &sysfs, ksmd, &base)?;
    // KSM goes back to how it was before the writes are timed, so ksmd does not compete.
    let restored = guard.restore()?.unwrap_or_default();
    progress(&format!(
        "{} after {:.1} s: {} guest pages merged (expected about {}); KSM settings restored \
         ({restored})",
        if sampling.converged {
            "merging settled"
        } else {
            "stopped at max_s"
        },
        sampling.observed,
        sampling.last.merged().saturating_sub(base.merged()),
        identical.saturating_mul(u64::from(p.guests)),
    ));
    outcome.notes.insert("ksm_restored".into(), restored);
    note_end(&mut outcome.notes, &base, &sampling, &pids);

    time_writes(&mut guests, options.workload_timeout)?;
    sharing_figures(outcome, &base, &sampling);
    write_figures(outcome, &mut guests, ctx.backend.host().tsc_khz);
    outcome.curves = std::mem::take(&mut sampling.curves.by_name)
        .into_iter()
        .map(|(name, (metric, curve))| (name.to_string(), (metric.to_string(), curve)))
        .collect();
    judge(outcome, &guests, &p, sampling.converged);
    Ok(())
}
