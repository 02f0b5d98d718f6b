//! One `mig.*` run on Xen: the guest as a PVH domain on the dom0 (local, over SSH, or the
//! lab), migrated by the dom0's own toolstack to itself, `xl -vvv migrate -s "" DOM
//! "xl migrate-receive -e"` (the receiver runs as xl's child instead of behind ssh).
//!
//! - **Console**: `xl console` of the domain by its id; when the migration starts, a
//!   second reader waits on the dom0 for the incoming domain (`DOM--incoming`, found
//!   through xenstore) to have a console and attaches to it by id, so the stream follows
//!   the domain to its new id while the old one still drains. Each reader assembles its
//!   own lines (the two rings are separate, so nothing is duplicated; the guest drains its
//!   ring before it suspends, so nothing is cut); every line is stamped as it arrives.
//! - **Calibration**: `xl pause`, 200 ms, `xl unpause` in one dom0 shell, timed there with
//!   CLOCK_MONOTONIC from /proc/timer_list (busybox's `date` has no `%N`): the pause is
//!   taken from `xl pause` returning to `xl unpause` returning (each takes effect at its
//!   hypercall, near the command's end), with the bounds that timing allows beside it.
//! - **xl's figures**: the moments its milestone lines arrive (`xl_log`): xl prints no
//!   times of its own below a second.
//! - **Cleanup**: on every way out (end, failure, timeout, Ctrl-C, panic) the guard kills
//!   the `xl migrate` it started (by the pid it wrote), destroys the domain under each
//!   name a migration gives it (`DOM`, `DOM--incoming`, `DOM--migratedaway`), removes its
//!   files on the dom0, and kills and reaps its local processes.

use std::io::Read;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::peer::{stamp_lines, take_console, PeerRun, Side};
use super::realtime_ns;
use super::xl_log::{Milestone, XlLog};
use crate::backend::xen::XenBackend;
use crate::backend::BootRequest;
use crate::console::printable;
use hostutil::transport::{shell_quote, Transport};

/// Limit for one short toolstack command (the TCG lab is slow).
const XL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the run waits, after the guest's result, for `xl migrate` to end.
const XL_AFTER_RESULT: Duration = Duration::from_secs(90);
/// Lines of the second console's stderr (its domain id, or why it failed) kept.
const MAX_MARKERS: usize = 16;

/// When to pause and when to migrate, after the guest's first heartbeat.
#[derive(Clone, Debug)]
pub struct XenSpec {
    pub migrate_at: Duration,
    pub pause_at: Duration,
    pub pause: Duration,
}

enum Event {
    Console(Side, u64, Vec<u8>),
    /// A line of the second console's stderr.
    Marker(String),
    Xl(u64, String),
    XlEnded,
    Paused(Result<Value, String>),
}

/// What the run started on the dom0 and here; all of it goes on drop.
struct Guard {
    transport: Transport,
    name: String,
    cfg: String,
    pid_file: String,
    children: Vec<Child>,
}

/// Shell that ends this run's `xl migrate` and every domain a migration of `name` can
/// leave, and removes the run's files.
fn cleanup_command(name: &str, pid_file: &str, cfg: &str) -> String {
    let (n, p) = (shell_quote(name), shell_quote(pid_file));
    format!(
        "for f in {p} {p}.console; do [ -s \"$f\" ] && kill \"$(cat \"$f\")\" 2>/dev/null; done; \
         [ -s {p} ] && sleep 1; \
         for d in {n} {inc} {away}; do xl destroy \"$d\" >/dev/null 2>&1; done; \
         rm -f -- {p} {p}.console {c}; true",
        inc = shell_quote(&format!("{name}--incoming")),
        away = shell_quote(&format!("{name}--migratedaway")),
        c = shell_quote(cfg),
    )
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.transport.run(
            &cleanup_command(&self.name, &self.pid_file, &self.cfg),
            None,
            XL_TIMEOUT,
        );
        for child in &mut self.children {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Reads a console process's output into lines, each stamped as it arrives.
fn read_console(side: Side, out: impl Read, tx: SyncSender<Event>) {
    stamp_lines(out, |at, bytes| {
        tx.send(Event::Console(side, at, bytes)).is_ok()
    });
}

/// Longest line of text passed on whole (longer ones are cut there).
const MAX_TEXT_LINE: usize = 4096;

/// Passes on the lines of `err` (at most `limit` bytes in all; `\n` or `\r` ends one),
/// each stamped when its end arrived. Sender and receiver write whole lines, but a read
/// may end inside one: lines are assembled across reads.
fn read_text(
    mut err: impl Read,
    limit: u64,
    tx: SyncSender<Event>,
    wrap: fn(u64, String) -> Event,
) {
    let mut buf = [0u8; 4096];
    let mut line = Vec::new();
    let mut left = limit;
    while left > 0 {
        let n = match err.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        left = left.saturating_sub(n as u64);
        let at = realtime_ns();
        for &b in &buf[..n] {
            if b != b'\n' && b != b'\r' && line.len() < MAX_TEXT_LINE {
                line.push(b);
                continue;
            }
            if b != b'\n' && b != b'\r' {
                continue; // past the bound: the rest of this line is dropped
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            line.clear();
            if tx.send(wrap(at, text)).is_err() {
                return;
            }
        }
    }
    if !line.is_empty() {
        let _ = tx.send(wrap(
            realtime_ns(),
            String::from_utf8_lossy(&line).into_owned(),
        ));
    }
    // Drain the rest unread, so the process is never blocked on a full pipe.
    let _ = std::io::copy(&mut err, &mut std::io::sink());
}

/// Starts `command` on the dom0 with its stdout read as console `side`.
fn spawn_console(
    t: &Transport,
    command: &str,
    side: Side,
    tx: &SyncSender<Event>,
) -> Result<Child, String> {
    let mut child = t
        .spawn(command, false)
        .map_err(|e| format!("attaching the console: {e}"))?;
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || read_console(side, out, tx));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            read_text(err, 64 << 10, tx, |_, text| Event::Marker(text));
        });
    }
    Ok(child)
}

/// Dom0 shell that finds the incoming domain of `name` (`name--incoming`, through
/// xenstore), waits for it to have a console, says its id (a line before the console's),
/// and reads that console by id. The id is taken while the domain still has the incoming
/// name (xenconsoled may make the console only around the domain's start, after the
/// rename to `name`); the console's appearance is waited for with a xenstore watch, not by
/// polling: the dom0 is busy with the migration. It gives up when the domain goes.
pub(crate) fn successor_console_command(name: &str) -> String {
    let incoming = shell_quote(&format!("{name}--incoming"));
    format!(
        "d=; while [ -z \"$d\" ]; do for i in $(xenstore-list /local/domain 2>/dev/null); do \
         [ \"$(xenstore-read /local/domain/$i/name 2>/dev/null)\" = {incoming} ] && d=$i; \
         done; [ -n \"$d\" ] || sleep 0.2; done; t=/local/domain/$d/console/tty; \
         until xenstore-read $t >/dev/null 2>&1; do \
         xenstore-read /local/domain/$d/name >/dev/null 2>&1 || exit 0; \
         timeout 2 xenstore-watch -n 2 $t >/dev/null 2>&1; done; \
         echo \"{CONSOLE_DOMID}$d\"; exec xl console \"$d\""
    )
}

/// Dom0 shell for the calibration: `xl pause`, `ms` of sleep, `xl unpause`, printing
/// CLOCK_MONOTONIC (ns, from /proc/timer_list) before and after each.
pub(crate) fn pause_command(name: &str, ms: u128) -> String {
    let n = shell_quote(name);
    format!(
        "now() {{ {{ read -r a; read -r b; read -r c; }} < /proc/timer_list; set -- $c; echo $3; }}; \
         t0=$(now); xl pause {n} || exit 1; t1=$(now); sleep {s}.{f:03}; t2=$(now); \
         xl unpause {n} || exit 1; t3=$(now); echo \"$t0 $t1 $t2 $t3\"",
        s = ms / 1000,
        f = ms % 1000,
    )
}

/// The calibration's record from the dom0's four times (ns): before and after `xl pause`,
/// before and after `xl unpause`.
pub(crate) fn pause_record(requested_ns: u64, asked: Duration, out: &str) -> Result<Value, String> {
    let times: Vec<u64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| {
            format!(
                "the pause's timing is not four numbers: {:?}",
                printable(out.as_bytes())
            )
        })?;
    let [t0, t1, t2, t3] = times[..] else {
        return Err(format!(
            "the pause's timing is not four numbers: {:?}",
            printable(out.as_bytes())
        ));
    };
    if !(t0 <= t1 && t1 <= t2 && t2 <= t3) {
        return Err(format!(
            "the dom0's clock went backwards during the pause: {out:?}"
        ));
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    Ok(json!({
        "requested_ns": requested_ns,
        "asked_ms": asked.as_secs_f64() * 1e3,
        "to_park_ms": ms(t1 - t0),
        "parked_ms": ms(t3 - t1),
        "parked_bounds_ms": [ms(t2 - t1), ms(t3 - t0)],
        "parked_is": "on the dom0's CLOCK_MONOTONIC, from `xl pause` returning to `xl unpause` \
                      returning; the pause lies between the bounds (unpause instant .. \
                      pause started)",
    }))
}

/// Runs the domain to its end, pausing it once and migrating it once, and gathers what
/// the guest and xl said.
pub fn run(
    backend: &XenBackend,
    request: &BootRequest,
    spec: &XenSpec,
    limit: Duration,
    interrupted: &AtomicBool,
) -> Result<PeerRun, String> {
    let t = backend.transport().clone();
    let name = request.name.clone();
    // The guard first: an `xl create` that fails or times out may leave a domain.
    let mut guard = Guard {
        transport: t.clone(),
        name: name.clone(),
        cfg: backend.remote_file(&format!("{name}.cfg")),
        pid_file: backend.remote_file(&format!("{name}.migrate-pid")),
        children: Vec::new(),
    };
    guard.cfg = backend
        .create_paused(request)
        .map_err(|e| format!("creating the domain: {e}"))?;
    let domid = xl(&t, &format!("xl domid {}", shell_quote(&name)))?;
    let domid: u32 = domid
        .trim()
        .parse()
        .map_err(|_| format!("`xl domid` printed {:?}", printable(domid.as_bytes())))?;
    let (tx, rx) = sync_channel(crate::console::CHANNEL_CAPACITY);
    guard.children.push(spawn_console(
        &t,
        &format!("exec xl console {domid}"),
        Side::Source,
        &tx,
    )?);
    xl(&t, &format!("xl unpause {}", shell_quote(&name)))?;
    let mut state = State {
        run: PeerRun::default(),
        xl: XlLog::default(),
        first_domid: domid,
        ..State::default()
    };
    collect(&rx, &tx, &mut guard, spec, &mut state, limit, interrupted);
    drop(tx);
    Ok(finish(state))
}

fn xl(t: &Transport, command: &str) -> Result<String, String> {
    t.run(command, None, XL_TIMEOUT)
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .map_err(|e| e.to_string())
}

#[derive(Default)]
struct State {
    run: PeerRun,
    xl: XlLog,
    first_domid: u32,
    /// The incoming domain's id, as the second console said.
    second_domid: Option<String>,
    /// Lines each console passed on, and when the second one's first beat came.
    lines: [u64; 2],
    first_beat_after: Option<u64>,
    migrate_started_ns: Option<u64>,
    xl_ended: bool,
    xl_status: Option<i32>,
    markers: Vec<String>,
    attempts: u32,
    /// The calibration pause has ended (or failed).
    pause_over: bool,
    /// The last session ended without running xl: start it again.
    retry: bool,
}

/// Dom0 shell for one migration, in one SSH session (the TCG lab's dom0 refuses SSH
/// handshakes now and then when several come at once): the second console in the
/// background (its output is this session's stdout), `xl migrate` (its output this
/// session's stderr), both pids written for the cleanup, and xl's exit status. The
/// session then lasts as long as the second console (an SSH server may close a session's
/// channel once its shell exits, which would kill the console with SIGPIPE); after a
/// failed migration the console is ended at once. The console runs at a higher priority
/// (renice -10, where allowed): on a busy dom0 it must attach soon after the new domain
/// starts, or the heartbeats written meanwhile arrive late and the ruler counts that.
pub(crate) fn migrate_command(name: &str, pid_file: &str) -> String {
    format!(
        "( {console} ) 2>/dev/null & c=$!; echo $c > {p}.console; \
         renice -n -10 -p $c >/dev/null 2>&1; \
         xl -vvv migrate -s '' {n} 'xl migrate-receive -e' </dev/null >/dev/null & x=$!; \
         echo $x > {p}; wait $x; s=$?; echo \"{XL_EXIT}$s\" >&2; \
         [ $s -eq 0 ] || kill \"$(cat {p}.console)\" 2>/dev/null; wait",
        console = successor_console_command(name),
        p = shell_quote(pid_file),
        n = shell_quote(name),
    )
}

/// What the migration's shell prints on stderr after xl ended, with xl's exit status.
const XL_EXIT: &str = "hvbench-xl-exit ";
/// What the second console prints before it attaches, with the domain's id.
const CONSOLE_DOMID: &str = "hvbench-console-domid ";
/// Times a migration is started when its SSH session never ran the command.
const MIGRATE_ATTEMPTS: u32 = 3;

/// Starts the second console and `xl migrate`.
fn start_migration(
    guard: &mut Guard,
    tx: &SyncSender<Event>,
    state: &mut State,
) -> Result<(), String> {
    let t = guard.transport.clone();
    state.attempts += 1;
    state.migrate_started_ns = Some(realtime_ns());
    let mut child = t
        .spawn(&migrate_command(&guard.name, &guard.pid_file), false)
        .map_err(|e| format!("starting xl migrate: {e}"))?;
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        std::thread::spawn(move || read_console(Side::Destination, out, tx));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            read_text(err, 16 << 20, tx.clone(), Event::Xl);
            let _ = tx.send(Event::XlEnded);
        });
    }
    guard.children.push(child);
    Ok(())
}

/// Pauses the domain for `length` on a thread; says how it went. A session that failed
/// (the TCG lab's dom0 refuses an SSH handshake, or loses a shell, now and then) may have
/// left the domain paused: it is unpaused (refused harmlessly when it was not) and the
/// pause tried once more.
fn start_pause(t: &Transport, name: &str, length: Duration, tx: &SyncSender<Event>) {
    let (t, tx) = (t.clone(), tx.clone());
    let command = pause_command(name, length.as_millis());
    let unpause = format!("xl unpause {}", shell_quote(name));
    std::thread::spawn(move || {
        let mut result = Err(String::new());
        for _ in 0..2 {
            let requested = realtime_ns();
            match t.run(&command, None, XL_TIMEOUT) {
                Ok(o) => {
                    result = pause_record(requested, length, &String::from_utf8_lossy(&o.stdout));
                    break;
                }
                Err(e) => {
                    let _ = t.run(&unpause, None, XL_TIMEOUT);
                    result = Err(format!("pausing the domain: {e}"));
                }
            }
        }
        let _ = tx.send(Event::Paused(result));
    });
}

#[allow(clippy::too_many_arguments)]
fn collect(
    rx: &Receiver<Event>,
    tx: &SyncSender<Event>,
    guard: &mut Guard,
    spec: &XenSpec,
    state: &mut State,
    limit: Duration,
    interrupted: &AtomicBool,
) {
    let deadline = Instant::now() + limit;
    let mut first_beat: Option<Instant> = None;
    let (mut paused, mut finished) = (false, None::<Instant>);
    loop {
        if first_beat.is_none() && !state.run.beats.is_empty() {
            first_beat = Some(Instant::now());
        }
        if let Some(t0) = first_beat {
            if !paused && t0.elapsed() >= spec.pause_at {
                paused = true;
                start_pause(&guard.transport, &guard.name, spec.pause, tx);
            }
            // Not before the calibration pause has ended: on a slow dom0 (the TCG lab)
            // `xl pause` can take seconds to act, and the two must not overlap.
            if state.migrate_started_ns.is_none()
                && state.pause_over
                && t0.elapsed() >= spec.migrate_at
            {
                if let Err(e) = start_migration(guard, tx, state) {
                    state.run.errors.push(e);
                    state.xl_ended = true;
                }
            }
        }
        if interrupted.load(Ordering::Relaxed) {
            state.run.errors.push("interrupted".into());
            break;
        }
        if Instant::now() >= deadline {
            state
                .run
                .errors
                .push(format!("the domain had not finished after {limit:?}"));
            break;
        }
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok(event) => take(event, state),
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if std::mem::take(&mut state.retry) {
            std::thread::sleep(Duration::from_secs(1));
            if let Err(e) = start_migration(guard, tx, state) {
                state.run.errors.push(e);
                state.xl_ended = true;
            }
        }
        if state.run.result.is_some() {
            let done = *finished.get_or_insert_with(Instant::now);
            let migration_over = state.xl_ended || state.migrate_started_ns.is_none();
            if (migration_over && done.elapsed() > Duration::from_millis(500))
                || done.elapsed() > XL_AFTER_RESULT
            {
                break;
            }
        }
    }
}

fn take(event: Event, state: &mut State) {
    match event {
        Event::Console(Side::Destination, _, line)
            if line.starts_with(CONSOLE_DOMID.as_bytes()) =>
        {
            let id = &line[CONSOLE_DOMID.len()..];
            state.second_domid = Some(printable(&id[..id.len().min(16)]));
        }
        Event::Console(side, at, line) => {
            let i = usize::from(side == Side::Destination);
            state.lines[i] += 1;
            let beats = state.run.beats.len();
            take_console(at, &line, &mut state.run);
            if side == Side::Destination && beats < state.run.beats.len() {
                state.first_beat_after.get_or_insert(at);
            }
        }
        Event::Marker(text) => {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                if state.markers.len() < MAX_MARKERS {
                    state
                        .markers
                        .push(printable(line.as_bytes()).chars().take(300).collect());
                }
            }
        }
        Event::Xl(at, text) => match text.trim().strip_prefix(XL_EXIT) {
            Some(code) => {
                state.xl_status = code.parse().ok();
                state.xl_ended = true;
            }
            None => state.xl.take(at, &text),
        },
        // The session ended (after xl, with the second console; or without running xl).
        Event::XlEnded if state.xl_status.is_some() => {}
        Event::XlEnded => {
            // A session that never ran xl (refused at the SSH handshake) is tried again,
            // while the guest still runs.
            let never_ran = state.xl.at(Milestone::SuspendRequested).is_none();
            if never_ran && state.attempts < MIGRATE_ATTEMPTS && state.run.result.is_none() {
                state.retry = true;
            } else {
                state.xl_ended = true;
            }
        }
        Event::Paused(Ok(v)) => {
            state.run.pause = Some(v);
            state.pause_over = true;
        }
        Event::Paused(Err(e)) => {
            state.run.errors.push(format!("calibration: {e}"));
            state.pause_over = true;
        }
    }
}

/// The run's report, in the shape `run::migration::interpret` reads for every backend.
fn finish(mut state: State) -> PeerRun {
    state.run.beats.sort_by_key(|b| b.at_ns);
    state.run.source_status = state.xl_status;
    state.run.stderr_tails = [state.xl.cause(), state.markers.join(" | ")];
    let Some(started) = state.migrate_started_ns else {
        if state.run.errors.is_empty() {
            state
                .run
                .errors
                .push("the guest finished before the migration was due".into());
        }
        return state.run;
    };
    let xl = &state.xl;
    if !state.xl_ended {
        state.run.errors.push(format!(
            "xl migrate had not ended when the run did (the guest's loop ended first: a \
             longer duration_ms, with after_move_ms, gives the migration time); xl's last \
             lines: {}",
            xl.tail()
        ));
        return state.run;
    }
    if !xl.succeeded() {
        let cause = xl.cause();
        state.run.errors.push(format!(
            "xl migrate failed (exit {}): {}",
            state
                .xl_status
                .map_or_else(|| "status unknown".to_string(), |c| c.to_string()),
            match (cause.is_empty(), xl.tail()) {
                (false, _) => cause,
                (true, tail) if tail.is_empty() => "xl printed nothing".to_string(),
                (true, tail) => format!("xl printed no error line; its last lines: {tail}"),
            }
        ));
        return state.run;
    }
    let resumed = xl.at(Milestone::TargetStarted).unwrap_or(u64::MAX);
    let suspended = xl
        .at(Milestone::GuestSuspended)
        .or(xl.at(Milestone::GuestAcked));
    let ms = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1e6;
    let mut report = json!({
        "total_ms": ms(started, resumed),
        "rounds": [],
        "started_realtime_ns": started,
        "resumed_realtime_ns": resumed,
        // The first heartbeat the new domain's console passed on: the ruler's window must
        // reach it, however late the second console attached.
        "window_end_realtime_ns": state.first_beat_after.unwrap_or(resumed).max(resumed),
        "xl": xl.to_json(started),
        "console_domids": format!(
            "{} then {}",
            state.first_domid,
            state.second_domid.as_deref().unwrap_or("none")
        ),
        "console_lines": {"first": state.lines[0], "second": state.lines[1]},
    });
    if let Some(s) = suspended {
        report["downtime_ms"] = json!(ms(s, resumed));
        report["downtime_is"] = json!(
            "from xl's `guest has suspended` line (libxl, -vvv) to its `Domain started` line, \
             both as they reached hvbench (xl prints no times below a second): the guest's \
             stop, the last pages, the receiver's restore and the handshake"
        );
    }
    state.run.report = Some(report);
    state.run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_is_timed_from_the_dom0s_four_readings() {
        let v = pause_record(
            7,
            Duration::from_millis(200),
            "1000000 51000000 260000000 331000000\n",
        )
        .unwrap();
        assert_eq!(v["requested_ns"], json!(7));
        assert_eq!(v["to_park_ms"], json!(50.0));
        assert_eq!(v["parked_ms"], json!(280.0));
        assert_eq!(v["parked_bounds_ms"], json!([209.0, 330.0]));
        for bad in ["", "1 2 3", "1 2 3 4 5", "a b c d", "4 3 2 1", "1%N 2 3 4"] {
            assert!(
                pause_record(0, Duration::from_millis(200), bad).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    const MS: u64 = 1_000_000;

    fn xl_lines(state: &mut State, lines: &[(u64, &str)]) {
        for (at, line) in lines {
            state.xl.take(at * MS, line);
        }
    }

    #[test]
    fn a_failed_xl_migrate_is_an_error_with_xls_cause() {
        let mut state = State {
            migrate_started_ns: Some(1_000 * MS),
            xl_status: Some(1),
            xl_ended: true,
            ..State::default()
        };
        xl_lines(
            &mut state,
            &[
                (1_100, "migration target: Ready to receive domain."),
                (61_000, "libxl: error: libxl_dom_suspend.c:269:x: Domain 3:guest didn't acknowledge suspend, cancelling request"),
                (61_100, "Migration failed, failed to suspend at sender."),
            ],
        );
        let run = finish(state);
        assert!(run.report.is_none());
        assert_eq!(run.source_status, Some(1));
        assert_eq!(run.errors.len(), 1, "{:?}", run.errors);
        let e = &run.errors[0];
        assert!(
            e.starts_with("xl migrate failed (exit 1): libxl: error:"),
            "{e}"
        );
        assert!(e.contains("guest didn't acknowledge suspend"), "{e}");
        // A guest that ended before the migration was due says so.
        let early = finish(State::default());
        assert_eq!(
            early.errors,
            ["the guest finished before the migration was due"]
        );
        // One whose loop ended while xl still ran is told to give it more time.
        let unfinished = finish(State {
            migrate_started_ns: Some(MS),
            ..State::default()
        });
        assert!(
            unfinished.errors[0].contains("had not ended"),
            "{:?}",
            unfinished.errors
        );
    }

    #[test]
    fn a_successful_migration_reports_xls_milestones_and_the_consoles() {
        let mut state = State {
            migrate_started_ns: Some(1_000 * MS),
            xl_status: Some(0),
            xl_ended: true,
            first_domid: 3,
            second_domid: Some("4".into()),
            lines: [10, 20],
            first_beat_after: Some(2_600 * MS),
            ..State::default()
        };
        xl_lines(
            &mut state,
            &[
                (2_000, "libxl: debug: libxl_dom_suspend.c:358:suspend_common_wait_guest_check: Domain 3:guest has suspended"),
                (2_500, "migration target: Domain started successsfully."),
                (2_700, "Migration successful."),
            ],
        );
        let run = finish(state);
        assert!(run.errors.is_empty(), "{:?}", run.errors);
        let r = run.report.unwrap();
        assert_eq!(r["total_ms"], json!(1500.0));
        assert_eq!(r["downtime_ms"], json!(500.0));
        assert_eq!(r["started_realtime_ns"], json!(1_000 * MS));
        assert_eq!(r["resumed_realtime_ns"], json!(2_500 * MS));
        assert_eq!(r["window_end_realtime_ns"], json!(2_600 * MS));
        assert_eq!(r["console_domids"], json!("3 then 4"));
        assert_eq!(r["xl"]["milestones_ms"]["successful"], json!(1700.0));
    }

    #[test]
    fn dom0_commands_quote_the_name_and_time_the_pause() {
        let pause = pause_command("dom'x", 200);
        assert!(pause.contains("xl pause 'dom'\\''x'"), "{pause}");
        assert!(pause.contains("sleep 0.200"), "{pause}");
        let cleanup = cleanup_command("d", "/tmp/r/d.pid", "/tmp/r/d.cfg");
        for name in ["d", "d--incoming", "d--migratedaway"] {
            assert!(cleanup.contains(&format!("'{name}'")), "{cleanup}");
        }
        assert!(successor_console_command("d").contains("= 'd--incoming'"));
    }

    /// The migration's session against fake tools: xl's exit status is said on stderr,
    /// both pids are written, the second console runs on after a successful migration
    /// (its output on stdout) and is ended after a failed one.
    #[test]
    fn the_migration_session_says_xls_status_and_keeps_the_console_only_after_success() {
        use std::os::unix::fs::PermissionsExt;
        for (rc, console_reads) in [(0, true), (1, false)] {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path().display();
            let tools = [
                (
                    "xl",
                    format!(
                        "case \"$*\" in *migrate*) sleep 1; echo 'Migration failed.' >&2; exit {rc};; \
                         console*) echo console-line; exec sleep 3;; esac"
                    ),
                ),
                ("xenstore-list", "echo 9".to_string()),
                (
                    "xenstore-read",
                    "case $1 in */name) echo d--incoming;; */console/tty) echo /dev/pts/3;; esac"
                        .to_string(),
                ),
            ];
            for (name, body) in tools {
                let path = dir.path().join(name);
                std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            let pid_file = format!("{d}/d.pid");
            let started = Instant::now();
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(migrate_command("d", &pid_file))
                .env("PATH", format!("{d}:{}", std::env::var("PATH").unwrap()))
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(&format!("{XL_EXIT}{rc}")), "{stderr}");
            assert!(stderr.contains("Migration failed."), "{stderr}");
            for f in [pid_file.clone(), format!("{pid_file}.console")] {
                let pid = std::fs::read_to_string(&f).unwrap();
                assert!(pid.trim().parse::<u32>().is_ok(), "{f}: {pid:?}");
            }
            // After success the session lasts as long as the console (3 s here).
            assert_eq!(
                started.elapsed() >= Duration::from_secs(3),
                console_reads,
                "rc {rc}: {stdout}"
            );
            if console_reads {
                assert_eq!(stdout, format!("{CONSOLE_DOMID}9\nconsole-line\n"));
            }
        }
    }

    /// The dom0 scripts run against fake `xl` and `xenstore-*` tools: the pause prints four
    /// rising times, the second console finds the incoming domain once it has a console.
    #[test]
    fn the_dom0_scripts_work_against_fake_tools() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let tools = [
            ("xl", format!("echo \"$*\" >> {d}/xl.log")),
            ("xenstore-list", "echo 0; echo 4; echo 9".to_string()),
            (
                "xenstore-read",
                "case $1 in /local/domain/9/name) echo d--incoming;; \
                 /local/domain/4/name) echo d;; /local/domain/9/console/tty) echo /dev/pts/3;; \
                 *) exit 1;; esac"
                    .to_string(),
            ),
        ];
        for (name, body) in tools {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = format!("{d}:{}", std::env::var("PATH").unwrap());
        let sh = |script: String| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .env("PATH", &path)
                .output()
                .unwrap()
        };
        let out = sh(pause_command("d", 20));
        assert!(out.status.success(), "{out:?}");
        let v = pause_record(
            0,
            Duration::from_millis(20),
            &String::from_utf8_lossy(&out.stdout),
        )
        .unwrap();
        assert!(v["parked_ms"].as_f64().unwrap() >= 20.0, "{v}");
        let out = sh(successor_console_command("d"));
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "hvbench-console-domid 9"
        );
        let log = std::fs::read_to_string(dir.path().join("xl.log")).unwrap();
        assert_eq!(log, "pause d\nunpause d\nconsole 9\n");
    }
}
