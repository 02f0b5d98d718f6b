//! `mig.*`: the host live-migrates the running guest and measures it from outside.
//!
//! On `--backend kvm` two `hvbench vmm` processes do it (`crate::migration::pair`):
//! the source pauses the guest once for a known 200 ms (the ruler's calibration), then
//! migrates it at `migrate_at_ms`. Figures per migration:
//! - `downtime`: the heartbeat ruler (largest gap between heartbeats after the migration
//!   started, minus the interval; resolution = the interval) — what the guest's outside
//!   world saw, the same quantity on every backend;
//! - `downtime_hypervisor`: the hypervisor's own figure (our VMM: from asking the vCPU to
//!   park to the destination's Ack, the Ready/Go handshake's two round trips included) —
//!   a different quantity;
//! - `total_time`: from the start of the migration to the Ack;
//! - `slowdown`: the guest's pages per ms before the migration over those during it.

use reports::record::Curve;
use serde_json::Value;
use std::time::Duration;
use workloads::protocol::Status;
use workloads::table::param::{
    MIG_AT_MS, MIG_BEAT_MS, MIG_DOWNTIME_MS, MIG_DURATION_MS, MIG_RATE, MIG_TSC_KHZ,
};
use workloads::{ParamSpec, WorkloadId};

use super::host_context::{HostContext, HostDriven};
use super::ksm::guests::{hvbench_exe, runs_vmm};
use super::plan::param_value;
use super::session::{SeriesSamples, WorkloadOutcome};
use crate::backend::BackendKind;
use crate::backend::BootRequest;
use crate::migration::pair;
use crate::migration::peer::{PeerKind, PeerRun, PeerSpec};
use crate::migration::ruler::{self, largest_gap};
use crate::migration::xen_peer::{self, XenSpec};

/// The calibration pause.
pub const CALIBRATION_PAUSE: Duration = Duration::from_millis(200);
/// Host-side latency allowed on top of the ruler's resolution when judging the
/// calibration (console pipe, reader thread, scheduler on a shared host).
const HOST_SLACK: Duration = Duration::from_millis(2);

/// The `mig.*` parameters of this run.
#[derive(Clone, Debug)]
pub struct MigParams {
    /// The series the figures belong to (`rate:N` for the dirtying rows).
    pub series: String,
    pub duration: Duration,
    pub beat: Duration,
    pub migrate_at: Duration,
    pub downtime_limit: Duration,
}

fn ms_param(
    params: &[super::WorkloadParam],
    id: WorkloadId,
    spec: &ParamSpec,
) -> Result<Duration, String> {
    let text = param_value(params, id, spec)
        .ok_or_else(|| format!("{}.{} has no value", id.name(), spec.key))?;
    spec.parse_one(text)
        .map(Duration::from_millis)
        .map_err(|e| format!("{}.{}={text}: {}", id.name(), spec.key, e.message()))
}

impl MigParams {
    pub fn from_run(params: &[super::WorkloadParam], id: WorkloadId) -> Result<Self, String> {
        let series = match param_value(params, id, &MIG_RATE) {
            Some(rate) if id.spec().param(MIG_RATE.key).is_some() => format!("rate:{rate}"),
            _ => String::new(),
        };
        let p = MigParams {
            series,
            duration: ms_param(params, id, &MIG_DURATION_MS)?,
            beat: ms_param(params, id, &MIG_BEAT_MS)?,
            migrate_at: ms_param(params, id, &MIG_AT_MS)?,
            downtime_limit: ms_param(params, id, &MIG_DOWNTIME_MS)?,
        };
        // The calibration pause comes halfway to the migration, and the guest must beat
        // well past the migration for the ruler to see it end.
        if p.migrate_at < 2 * CALIBRATION_PAUSE + 4 * p.beat {
            return Err(format!(
                "{}.migrate_at_ms must leave room for the {} ms calibration pause before it \
                 (at least {} ms)",
                id.name(),
                CALIBRATION_PAUSE.as_millis(),
                (2 * CALIBRATION_PAUSE + 4 * p.beat).as_millis()
            ));
        }
        if p.duration < p.migrate_at + Duration::from_millis(1000) {
            return Err(format!(
                "{}.duration_ms must exceed migrate_at_ms by at least 1000 ms",
                id.name()
            ));
        }
        Ok(p)
    }
}

/// Runs one `mig.*` workload to its outcome.
pub fn run(id: WorkloadId, ctx: &HostContext) -> HostDriven {
    let mut outcome = WorkloadOutcome::new(id);
    let p = match MigParams::from_run(&ctx.options.params, id) {
        Ok(p) => p,
        Err(e) => {
            outcome.ratchet(Status::Error, e);
            return outcome.into();
        }
    };
    let kind = match ctx.backend.kind() {
        BackendKind::Kvm => our_vmm(),
        BackendKind::Xen => {
            on_xen(id, ctx, &p, &mut outcome);
            return outcome.into();
        }
        _ => other_backend(id, ctx),
    };
    match kind {
        Ok(kind) => migrate(id, ctx, p, kind, &mut outcome),
        Err((status, reason)) => outcome.ratchet(status, reason),
    }
    outcome.into()
}

fn our_vmm() -> Result<PeerKind, (Status, String)> {
    match hvbench_exe() {
        Ok(exe) if runs_vmm(&exe) => Ok(PeerKind::Vmm {
            exe,
            guest_image: None,
        }),
        Ok(exe) => Err((
            Status::Error,
            format!("{} has no `vmm` command (set HVBENCH_EXE)", exe.display()),
        )),
        Err(e) => Err((Status::Error, e.to_string())),
    }
}

/// The guest's command line, with the host's TSC rate for a guest not told one.
fn guest_cmdline(id: WorkloadId, ctx: &HostContext) -> String {
    let khz = ctx.backend.host().tsc_khz.unwrap_or(0).to_string();
    let mut params: Vec<(WorkloadId, &str, &str)> = ctx
        .options
        .params
        .iter()
        .map(|p| (p.workload, p.key.as_str(), p.value.as_str()))
        .collect();
    params.push((id, MIG_TSC_KHZ.key, &khz));
    workloads::cmdline::encode_with_params(&ctx.options.guest_config(&[id]), &params)
}

fn other_backend(id: WorkloadId, ctx: &HostContext) -> Result<PeerKind, (Status, String)> {
    let cmdline = guest_cmdline(id, ctx);
    let request = BootRequest {
        image: ctx.image,
        cmdline: &cmdline,
        memory_mib: ctx.options.memory_mib,
        vcpus: ctx.options.vcpus,
        name: format!("hvbench-{}-mig", std::process::id()),
    };
    match ctx.backend.migration_command(&request) {
        Some(Ok((binary, args))) => Ok(PeerKind::Qemu { binary, args }),
        Some(Err(e)) => Err((Status::Error, e.to_string())),
        None => Err((
            Status::Skip,
            format!("hvbench does not migrate on {}", ctx.backend.kind().name()),
        )),
    }
}

/// `xl migrate` of the domain on its own dom0 (`crate::migration::xen_peer`).
fn on_xen(id: WorkloadId, ctx: &HostContext, p: &MigParams, outcome: &mut WorkloadOutcome) {
    let Some(backend) = ctx.backend.as_xen() else {
        outcome.ratchet(
            Status::Error,
            "a Xen backend that is not hvbench's Xen backend",
        );
        return;
    };
    let cmdline = guest_cmdline(id, ctx);
    let request = BootRequest {
        image: ctx.image,
        cmdline: &cmdline,
        memory_mib: ctx.options.memory_mib,
        vcpus: 1,
        name: format!("hvbench-{}-mig", std::process::id()),
    };
    let spec = XenSpec {
        migrate_at: p.migrate_at,
        pause_at: p.migrate_at / 2,
        pause: CALIBRATION_PAUSE,
    };
    // A TCG lab takes seconds to create, migrate and destroy a domain.
    let limit = p.duration + ctx.options.workload_timeout + Duration::from_secs(180);
    match xen_peer::run(backend, &request, &spec, limit, ctx.interrupted) {
        Ok(peer) => interpret(&peer, p, outcome),
        Err(e) => outcome.ratchet(Status::Error, e),
    }
}

fn migrate(
    id: WorkloadId,
    ctx: &HostContext,
    p: MigParams,
    kind: PeerKind,
    outcome: &mut WorkloadOutcome,
) {
    let kind = match kind {
        PeerKind::Vmm { exe, .. } => PeerKind::Vmm {
            exe,
            guest_image: ctx.options.guest_path.clone(),
        },
        qemu => qemu,
    };
    let spec = PeerSpec {
        kind,
        memory_mib: ctx.options.memory_mib,
        vcpus: ctx.options.vcpus,
        cmdline: guest_cmdline(id, ctx),
        timeout: p.duration + Duration::from_secs(60),
        migrate_at: p.migrate_at,
        pause_at: p.migrate_at / 2,
        pause: CALIBRATION_PAUSE,
        downtime_limit: p.downtime_limit,
        max_rounds: 30,
    };
    let limit = p.duration + ctx.options.workload_timeout + Duration::from_secs(30);
    match pair::run(&spec, limit, ctx.interrupted) {
        Ok(peer) => interpret(&peer, &p, outcome),
        Err(e) => outcome.ratchet(Status::Error, e),
    }
}

fn direct(value: f64) -> SeriesSamples {
    SeriesSamples {
        direct: vec![value],
        ..Default::default()
    }
}

fn num(v: Option<&Value>, key: &str) -> Option<f64> {
    v.and_then(|v| v.get(key))
        .and_then(Value::as_f64)
        .filter(|x| x.is_finite())
}

fn int(v: Option<&Value>, key: &str) -> Option<u64> {
    v.and_then(|v| v.get(key)).and_then(Value::as_u64)
}

/// Turns what the VMMs and the guest said into the record.
pub fn interpret(peer: &PeerRun, p: &MigParams, outcome: &mut WorkloadOutcome) {
    guest_outcome(peer, outcome);
    for e in &peer.errors {
        outcome.ratchet(Status::Error, format!("migration: {e}"));
    }
    if !ruler::monotonic(&peer.beats) {
        outcome.ratchet(
            Status::Failure,
            "the guest's heartbeats went backwards: a stretch of its life was replayed",
        );
    }
    let notes = &mut outcome.notes;
    notes.insert(
        "ruler_resolution_ms".into(),
        format!("{}", p.beat.as_millis()),
    );
    notes.insert("heartbeats".into(), peer.beats.len().to_string());
    if peer.damaged > 0 {
        notes.insert("damaged_lines".into(), peer.damaged.to_string());
    }
    calibration(peer, p, outcome);
    let Some(report) = peer.report.as_ref() else {
        if peer.errors.is_empty() {
            outcome.ratchet(Status::Error, "the source VMM reported no migration");
        }
        return;
    };
    migration_figures(peer, report, p, outcome);
}

fn guest_outcome(peer: &PeerRun, outcome: &mut WorkloadOutcome) {
    match &peer.result {
        Some((Status::Success, _)) => {}
        Some((status, reason)) => outcome.ratchet(
            *status,
            reason.clone().unwrap_or_else(|| "the guest said so".into()),
        ),
        None => outcome.ratchet(
            Status::Error,
            format!(
                "the guest printed no result (source exit {:?}, destination exit {:?}): {} | {}",
                peer.source_status,
                peer.destination_status,
                peer.stderr_tails[0],
                peer.stderr_tails[1]
            ),
        ),
    }
    for key in [
        "checksum_before",
        "checksum_expected",
        "checksum_after",
        "pages",
        "pages_written",
        "xen_suspends",
        "xen_moves",
        "xen_domid_first",
        "xen_domid_last",
    ] {
        if let Some(v) = peer.notes.get(key) {
            outcome.notes.insert(key.into(), v.clone());
        }
    }
    let check = match (
        peer.notes.get("checksum_expected"),
        peer.notes.get("checksum_after"),
    ) {
        (Some(a), Some(b)) if a == b => "passed",
        (Some(_), Some(_)) => "failed",
        _ => "not made",
    };
    outcome.notes.insert("memory_check".into(), check.into());
}

/// The same gap on the guest's own clock: its heartbeats' sequence numbers (TSC-timed
/// intervals) across it, which no host-side latency touches (the console path, a slow
/// dom0); `None` when the gap's beats are not found.
fn guest_clock(beats: &[ruler::Beat], gap: &ruler::Gap, beat: Duration) -> Option<String> {
    // Beats that arrived together share a stamp: the last before the gap, the first after.
    let from = beats.iter().rev().find(|b| b.at_ns == gap.from_ns)?;
    let to = beats.iter().find(|b| b.at_ns == gap.to_ns)?;
    let intervals = to.seq.checked_sub(from.seq)?;
    let ms = intervals as f64 * beat.as_secs_f64() * 1e3;
    Some(format!(
        "{ms:.0} ms on the guest's clock ({intervals} heartbeat intervals between the gap's \
         two beats, give or take one) against {:.1} ms between their arrivals here",
        gap.gap().as_secs_f64() * 1e3
    ))
}

/// The known pause, as the ruler read it.
fn calibration(peer: &PeerRun, p: &MigParams, outcome: &mut WorkloadOutcome) {
    let pause = peer.pause.as_ref();
    let (Some(requested), Some(parked_ms)) = (int(pause, "requested_ns"), num(pause, "parked_ms"))
    else {
        outcome.notes.insert(
            "calibration".into(),
            "not made: the VMM did not pause the guest".into(),
        );
        return;
    };
    let until = int(peer.report.as_ref(), "started_realtime_ns").unwrap_or(u64::MAX);
    let Some(gap) = largest_gap(&peer.beats, p.beat, requested, until) else {
        outcome.notes.insert(
            "calibration".into(),
            "not made: no heartbeats around the pause".into(),
        );
        return;
    };
    // Steady-state lateness of the beats before the pause (host scheduling, console path).
    let late = ruler::jitter(&peer.beats, p.beat, 0, requested).unwrap_or(HOST_SLACK);
    let tolerance_ms = late.max(HOST_SLACK).as_secs_f64() * 1e3;
    let read_ms = gap.downtime.as_secs_f64() * 1e3;
    // Where the pause itself is known only within bounds (Xen: timed around two `xl`
    // commands), the reading may fall anywhere within them.
    let bounds = pause
        .and_then(|v| v.get("parked_bounds_ms"))
        .and_then(Value::as_array)
        .and_then(|b| Some((b.first()?.as_f64()?, b.get(1)?.as_f64()?)));
    let (low_ms, high_ms) = bounds.unwrap_or((parked_ms, parked_ms));
    let lower = low_ms.min(parked_ms) - p.beat.as_secs_f64() * 1e3 - tolerance_ms;
    let upper = high_ms.max(parked_ms) + tolerance_ms;
    let ok = (lower..=upper).contains(&read_ms);
    if let Some((lo, hi)) = bounds {
        outcome.notes.insert(
            "calibration_pause_bounds_ms".into(),
            format!("{lo:.3} .. {hi:.3}"),
        );
    }
    outcome.notes.insert(
        "calibration".into(),
        format!(
            "paused {parked_ms:.3} ms (asked {} ms); the ruler read {read_ms:.3} ms (gap \
             {:.3} ms minus the {} ms interval); expected from {} ms below to the pause, \
             give or take {tolerance_ms:.3} ms (the beats' p99 lateness before the pause, \
             at least {} ms): {}",
            CALIBRATION_PAUSE.as_millis(),
            gap.gap().as_secs_f64() * 1e3,
            p.beat.as_millis(),
            p.beat.as_millis(),
            HOST_SLACK.as_millis(),
            if ok { "within" } else { "outside" }
        ),
    );
    if let Some(text) = guest_clock(&peer.beats, &gap, p.beat) {
        outcome.notes.insert("calibration_guest_clock".into(), text);
    }
    outcome.notes.insert(
        "ruler_jitter_p99_ms".into(),
        format!("{:.3}", late.as_secs_f64() * 1e3),
    );
    outcome
        .notes
        .insert("calibration_ok".into(), ok.to_string());
}

fn migration_figures(peer: &PeerRun, report: &Value, p: &MigParams, outcome: &mut WorkloadOutcome) {
    let r = Some(report);
    let started = int(r, "started_realtime_ns").unwrap_or(0);
    let resumed = int(r, "resumed_realtime_ns").unwrap_or(u64::MAX);
    // The migration's window: from its start to a little after the guest resumed (later
    // gaps are the host's, not the migration's).
    let settle =
        u64::try_from((10 * p.beat).max(Duration::from_millis(100)).as_nanos()).unwrap_or(u64::MAX);
    // Xen: the new domain's console may attach after it resumed; the window reaches its
    // first heartbeat.
    let window_end = int(r, "window_end_realtime_ns")
        .unwrap_or(resumed)
        .max(resumed);
    if let Some(gap) = largest_gap(
        &peer.beats,
        p.beat,
        started,
        window_end.saturating_add(settle),
    ) {
        outcome.series.insert(
            ("downtime", p.series.clone()),
            direct(gap.downtime.as_secs_f64()),
        );
        let when = if gap.to_ns >= resumed {
            format!(
                "ending {:.1} ms after the destination resumed the guest (the stop-and-copy)",
                (gap.to_ns - resumed) as f64 / 1e6
            )
        } else {
            format!(
                "ending {:.1} ms before the destination resumed the guest (the guest stalled \
                 during pre-copy)",
                (resumed - gap.to_ns) as f64 / 1e6
            )
        };
        if let Some(text) = guest_clock(&peer.beats, &gap, p.beat) {
            outcome.notes.insert("downtime_guest_clock".into(), text);
        }
        let window_to = window_end.saturating_add(settle);
        if let Some((from, to, n)) = ruler::largest_guest_gap(&peer.beats, started, window_to) {
            outcome.notes.insert(
                "downtime_guest_clock_largest".into(),
                format!(
                    "{:.0} ms on the guest's clock ({n} heartbeat intervals, give or take one): \
                     the largest gap its own clock saw in the migration's window, its two \
                     beats arriving {:.1} ms apart here",
                    n as f64 * p.beat.as_secs_f64() * 1e3,
                    to.at_ns.saturating_sub(from.at_ns) as f64 / 1e6
                ),
            );
        }
        outcome.notes.insert(
            "downtime_ruler".into(),
            format!(
                "largest heartbeat gap {:.3} ms minus the {} ms interval (resolution {} ms), {when}",
                gap.gap().as_secs_f64() * 1e3,
                p.beat.as_millis(),
                p.beat.as_millis()
            ),
        );
    }
    if let Some(d) = num(r, "downtime_ms") {
        outcome
            .series
            .insert(("downtime_hypervisor", p.series.clone()), direct(d / 1e3));
        let is = report.get("downtime_is").and_then(Value::as_str).unwrap_or(
            "hvbench's VMM: from asking the vCPU to park to the destination's Ack (the guest \
             runs there by then; the Ready/Go handshake's two round trips included)",
        );
        outcome.notes.insert(
            "downtime_hypervisor_is".into(),
            format!(
                "{is}; the ruler is the gap the guest's outside world saw, console path included"
            ),
        );
    }
    if let Some(t) = num(r, "total_ms") {
        outcome
            .series
            .insert(("total_time", p.series.clone()), direct(t / 1e3));
    }
    let before = ruler::pages_per_ms(
        &peer.beats,
        started.saturating_sub(u64::try_from(p.migrate_at.as_nanos() / 4).unwrap_or(u64::MAX)),
        started,
    );
    let during = ruler::pages_per_ms(&peer.beats, started, resumed);
    match (before, during) {
        (Some(b), Some(d)) if b > 0.0 && d > 0.0 => {
            outcome
                .series
                .insert(("slowdown", p.series.clone()), direct(b / d));
            outcome
                .notes
                .insert("pages_per_ms_before".into(), format!("{b:.1}"));
            outcome
                .notes
                .insert("pages_per_ms_during".into(), format!("{d:.1}"));
        }
        _ => {
            outcome.notes.insert(
                "slowdown".into(),
                "undefined: the guest wrote no pages before or during the migration (mig.idle, \
                 or too short a migration for two heartbeats)"
                    .into(),
            );
        }
    }
    round_notes(report, peer, outcome);
    progress_curve(peer, outcome);
}

fn round_notes(report: &Value, peer: &PeerRun, outcome: &mut WorkloadOutcome) {
    let rounds = report
        .get("rounds")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let text: Vec<String> = rounds
        .iter()
        .map(|round| {
            format!(
                "{}{} pages + {} zero, {} bytes, {:.1} ms, {} dirtied meanwhile",
                if round.get("paused").and_then(Value::as_bool) == Some(true) {
                    "stop-and-copy: "
                } else {
                    ""
                },
                round.get("pages").and_then(Value::as_u64).unwrap_or(0),
                round.get("zero_pages").and_then(Value::as_u64).unwrap_or(0),
                round.get("bytes").and_then(Value::as_u64).unwrap_or(0),
                round.get("ms").and_then(Value::as_f64).unwrap_or(0.0),
                round.get("dirtied").and_then(Value::as_u64).unwrap_or(0),
            )
        })
        .collect();
    let notes = &mut outcome.notes;
    // QEMU reports no rounds, only how often it synchronised the dirty log.
    let count = match report.get("dirty_sync_count").and_then(Value::as_u64) {
        Some(syncs) if rounds.is_empty() => syncs,
        _ => rounds.len() as u64,
    };
    if report.get("xl").is_some() {
        // xl hides its pre-copy progress during a migration and prints no rounds.
        notes.insert("rounds".into(), "not printed by xl".into());
    } else {
        notes.insert("rounds".into(), count.to_string());
    }
    notes.insert("per_round".into(), text.join("; "));
    for key in ["xl", "console_domids", "console_lines"] {
        if let Some(v) = report.get(key) {
            let text = v.to_string();
            notes.insert(format!("xen_{key}"), text.chars().take(2000).collect());
        }
    }
    if let Some(qemu) = report.get("qemu") {
        let text = qemu.to_string();
        notes.insert(
            "qemu_query_migrate".into(),
            text.chars().take(2000).collect(),
        );
    }
    for key in [
        "bytes",
        "converged",
        "setup_ms",
        "pause_ms",
        "msrs_unreadable",
        "msrs_left_out",
        "dirty_tracking",
        "ring_full_exits",
        "dirty_sync_count",
    ] {
        if let Some(v) = report.get(key) {
            notes.insert(format!("hypervisor_{key}"), note_text(v));
        }
    }
    if let Some(incoming) = &peer.incoming {
        for key in [
            "restore_ms",
            "msrs_refused",
            "tsc_khz_source",
            "tsc_khz_here",
        ] {
            if let Some(v) = incoming.get(key) {
                notes.insert(format!("destination_{key}"), note_text(v));
            }
        }
    }
}

/// Pages per ms at each heartbeat, x in seconds since the first.
fn progress_curve(peer: &PeerRun, outcome: &mut WorkloadOutcome) {
    let Some(first) = peer.beats.first() else {
        return;
    };
    let points: Vec<[f64; 2]> = peer
        .beats
        .windows(2)
        .filter_map(|w| {
            let dt = w[1].at_ns.saturating_sub(w[0].at_ns) as f64 / 1e6;
            let t = w[1].at_ns.saturating_sub(first.at_ns) as f64 / 1e9;
            (dt > 0.0).then(|| [t, w[1].pages as f64 / dt])
        })
        .take(20_000)
        .collect();
    outcome.curves.insert(
        "guest_pages_per_ms".into(),
        (
            "downtime".into(),
            Curve {
                x_unit: "s".into(),
                y_unit: "pages/ms".into(),
                points,
            },
        ),
    );
}

/// A JSON value as a note: a string as its text (no quotes), anything else as JSON.
fn note_text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}
