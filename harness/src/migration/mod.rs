//! Live migration as `hvbench vmm` does it: the destination listens (`--incoming`), the
//! source migrates after a delay (`--migrate-to`), and each says what happened on stderr
//! as one line a driver can parse (`hvbench: migration-... {json}`).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::migration::{
    IncomingReport, MigrateOptions, MigrationAddr, MigrationError, MigrationReport,
};
use vmm::{Migrator, RunningVm};

use crate::backend::kvm::KvmBackend;

/// Prefixes of the lines `hvbench vmm` writes on stderr about a migration.
pub const LISTENING: &str = "hvbench: migration-listening ";
pub const REPORT: &str = "hvbench: migration-report ";
pub const INCOMING: &str = "hvbench: migration-incoming ";
pub const FAILED: &str = "hvbench: migration-error ";
pub const PAUSED: &str = "hvbench: migration-pause ";

pub mod pair;
pub mod peer;
mod qemu_peer;
pub mod ruler;
pub mod xen_peer;
pub mod xl_log;

/// What this `hvbench vmm` process does about migration.
#[derive(Clone, Debug)]
pub enum Role {
    /// Wait for a guest on this address instead of booting one.
    Incoming(MigrationAddr),
    /// Boot, and migrate to this address once `after` has passed (first pausing the
    /// guest as `pause` says, if it says).
    Outgoing {
        to: MigrationAddr,
        after: Duration,
        options: MigrateOptions,
        pause: Option<Pause>,
        /// Ignore the timers: wait for `pause MS` and `migrate` lines on stdin (how a
        /// driver triggers both at moments it chooses, e.g. from the guest's heartbeat).
        on_stdin: bool,
    },
}

/// What the driver of `hvbench vmm --migrate-to ADDR --control-stdin` may write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `pause MS`: park the guest for MS milliseconds (the ruler's calibration).
    Pause(Duration),
    /// `migrate`: start the migration now.
    Migrate,
}

impl Command {
    pub fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_ascii_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("migrate"), None, None) => Some(Command::Migrate),
            (Some("pause"), Some(ms), None) => ms
                .parse::<u64>()
                .ok()
                .filter(|ms| (1..=60_000).contains(ms))
                .map(|ms| Command::Pause(Duration::from_millis(ms))),
            _ => None,
        }
    }
}

/// A known pause for the ruler's calibration: `length`, `at` after the boot.
#[derive(Clone, Copy, Debug)]
pub struct Pause {
    pub at: Duration,
    pub length: Duration,
}

pub(crate) fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The source's report as the JSON object of its stderr line.
pub fn report_json(r: &MigrationReport) -> Value {
    let rounds: Vec<Value> = r
        .rounds
        .iter()
        .map(|round| {
            json!({
                "pages": round.pages,
                "zero_pages": round.zero_pages,
                "bytes": round.bytes,
                "ms": ms(round.duration),
                "dirtied": round.dirtied,
                "paused": round.paused,
            })
        })
        .collect();
    json!({
        "ram_bytes": r.ram_bytes,
        "total_ms": ms(r.total),
        "setup_ms": ms(r.setup),
        "downtime_ms": ms(r.downtime),
        "pause_ms": ms(r.pause),
        "converged": r.converged,
        "bytes": r.bytes,
        "msrs_unreadable": r.msrs_unreadable,
        "msrs_left_out": hex(&r.msrs_left_out),
        "dirty_tracking": r.dirty_tracking.name(),
        "ring_full_exits": r.ring_full_exits,
        "resumed_realtime_ns": r.resumed_realtime_ns,
        "rounds": rounds,
    })
}

/// MSR indices as `0x...` strings.
fn hex(indices: &[u32]) -> Vec<String> {
    indices.iter().map(|i| format!("{i:#x}")).collect()
}

/// The destination's report as the JSON object of its stderr line.
pub fn incoming_json(r: &IncomingReport) -> Value {
    json!({
        "ram_bytes": r.ram_bytes,
        "pages": r.pages,
        "zero_pages": r.zero_pages,
        "bytes": r.bytes,
        "total_ms": ms(r.total),
        "restore_ms": ms(r.restore),
        "msrs_refused": hex(&r.msrs_refused),
        "tsc_khz_source": r.tsc_khz.0,
        "tsc_khz_here": r.tsc_khz.1,
    })
}

/// Listens on `addr`, says where, and receives one guest.
pub fn receive(backend: &KvmBackend, addr: &MigrationAddr) -> Result<RunningVm, MigrationError> {
    let io = |what| move |source| MigrationError::Io { what, source };
    let listener = addr.listen().map_err(io("listening for the source"))?;
    let local = listener
        .local_addr()
        .map_err(io("listening for the source"))?;
    crate::say!("{LISTENING}{local}");
    let stream = listener.accept().map_err(io("accepting the source"))?;
    let (vm, report) = backend.incoming(stream, "vmm-incoming")?;
    crate::say!("{INCOMING}{}", incoming_json(&report));
    Ok(vm)
}

/// Connects to `to`, trying again for up to 5 s while nobody listens there yet.
fn connect(to: &MigrationAddr) -> Result<vmm::migration::MigrationStream, MigrationError> {
    let started = Instant::now();
    loop {
        match to.connect() {
            Ok(stream) => return Ok(stream),
            Err(e) if started.elapsed() < Duration::from_secs(5) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => {
                return Err(MigrationError::Io {
                    what: "connecting to the destination",
                    source,
                })
            }
        }
    }
}

/// After `after`, migrates the guest to `to` and says how it went; whether it did.
/// (`migrator` is taken on the thread that reads the guest's messages, which goes on
/// reading while this runs on another.)
pub fn send(
    migrator: Result<Migrator<'_>, MigrationError>,
    to: &MigrationAddr,
    after: Duration,
    options: MigrateOptions,
    pause: Option<Pause>,
) -> bool {
    let booted = Instant::now();
    if let (Some(pause), Ok(m)) = (pause, &migrator) {
        calibration_pause(m, pause);
    }
    std::thread::sleep(after.saturating_sub(booted.elapsed()));
    migrate_now(migrator, to, options)
}

fn migrate_now(
    migrator: Result<Migrator<'_>, MigrationError>,
    to: &MigrationAddr,
    options: MigrateOptions,
) -> bool {
    let started_ns = realtime_ns();
    let result = migrator.and_then(|m| connect(to).and_then(|stream| m.migrate(stream, options)));
    match result {
        Ok(report) => {
            let mut line = report_json(&report);
            line["started_realtime_ns"] = json!(started_ns);
            crate::say!("{REPORT}{line}");
            true
        }
        Err(e) => {
            crate::say!("{FAILED}{}", crate::console::escape_text(&e.to_string()));
            false
        }
    }
}

/// Waits for `pause MS` and `migrate` lines on stdin; migrates at `migrate` and says
/// how it went; whether it did (not if stdin ends first).
pub fn send_on_commands(
    migrator: Result<Migrator<'_>, MigrationError>,
    to: &MigrationAddr,
    options: MigrateOptions,
) -> bool {
    use std::io::BufRead;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match (Command::parse(&line), &migrator) {
            (Some(Command::Pause(length)), Ok(m)) => calibration_pause(
                m,
                Pause {
                    at: Duration::ZERO,
                    length,
                },
            ),
            (Some(Command::Migrate), _) => return migrate_now(migrator, to, options),
            (Some(Command::Pause(_)), Err(_)) => {}
            (None, _) => crate::say!(
                "hvbench: vmm: ignored control input {:?}",
                crate::console::escape_text(&line)
            ),
        }
    }
    false
}

/// Sleeps until `pause.at`, parks the guest for `pause.length`, and says when and how long.
fn calibration_pause(m: &Migrator<'_>, pause: Pause) {
    std::thread::sleep(pause.at);
    let requested_ns = realtime_ns();
    match m.pause_for(pause.length) {
        Ok((to_park, parked)) => crate::say!(
            "{PAUSED}{}",
            json!({
                "requested_ns": requested_ns,
                "asked_ms": ms(pause.length),
                "to_park_ms": ms(to_park),
                "parked_ms": ms(parked),
            })
        ),
        Err(e) => crate::say!(
            "{FAILED}pause: {}",
            crate::console::escape_text(&e.to_string())
        ),
    }
}
