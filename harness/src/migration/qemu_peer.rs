//! The same `mig.*` run on QEMU: two QEMU processes with the guest as `-kernel`, the
//! destination with `-incoming unix:...`, the source with a QMP socket. A thread speaks
//! QMP for the host's triggers (`pause MS`: `stop`, wait, `cont`; `migrate`:
//! `migrate-set-parameters` with the downtime limit, `migrate`, then `query-migrate`
//! every 5 ms until it ends) and reports in the same JSON lines `hvbench vmm` writes, so
//! the runner reads both alike. QEMU's own figures (`total-time`, `setup-time`,
//! `downtime`, `ram.transferred`, `dirty-sync-count`, ...) go into the report as QEMU gave
//! them.
//!
//! QMP is spoken by hand (a line of JSON each way, `serde_json`): the five commands used
//! need no schema, and the `qapi` crate's generated QMP bindings would add a large
//! dependency to build on every machine for them.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::sync::mpsc::{channel, Receiver, Sender, SyncSender};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::peer::{spawn, Event, PeerSpec, Side};
use super::{realtime_ns, Command, FAILED, PAUSED, REPORT};

/// Longest QMP reply read (query-migrate's is well under a KiB).
const MAX_REPLY: u64 = 1 << 20;
/// How long a migration may take before it is called failed.
const MIGRATION_LIMIT: Duration = Duration::from_secs(120);

/// Starts both QEMUs; returns where to send the host's triggers.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    spec: &PeerSpec,
    binary: &Path,
    args: &[String],
    address: &str,
    socket: &Path,
    qmp: &Path,
    tx: &SyncSender<Event>,
    children: &mut Vec<Child>,
) -> Result<Sender<String>, String> {
    let mut dest = args.to_vec();
    dest.extend(["-incoming".to_string(), address.to_string()]);
    children.push(spawn(binary, &dest, Side::Destination, tx)?);
    wait_for(socket, Duration::from_secs(10))
        .map_err(|()| "the destination QEMU did not listen within 10 s".to_string())?;
    let mut source = args.to_vec();
    source.extend([
        "-qmp".to_string(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ]);
    children.push(spawn(binary, &source, Side::Source, tx)?);
    let (control, commands) = channel();
    let (tx, qmp, address) = (tx.clone(), qmp.to_path_buf(), address.to_string());
    let limit = spec.downtime_limit;
    std::thread::spawn(move || speak(&qmp, &address, limit, &commands, &tx));
    Ok(control)
}

fn wait_for(path: &Path, limit: Duration) -> Result<(), ()> {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A QMP connection: one JSON object a line each way.
struct Qmp {
    out: UnixStream,
    input: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self, String> {
        wait_for(path, Duration::from_secs(10))
            .map_err(|()| "QEMU's QMP socket did not appear within 10 s".to_string())?;
        let out = UnixStream::connect(path).map_err(|e| format!("connecting to QMP: {e}"))?;
        let _ = out.set_read_timeout(Some(Duration::from_secs(30)));
        let input = BufReader::new(out.try_clone().map_err(|e| format!("QMP: {e}"))?);
        let mut qmp = Qmp { out, input };
        qmp.line()?; // the greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut buf = Vec::new();
        let n = (&mut self.input)
            .take(MAX_REPLY)
            .read_until(b'\n', &mut buf)
            .map_err(|e| format!("reading QMP: {e}"))?;
        if n == 0 {
            return Err("QEMU closed its QMP socket".into());
        }
        serde_json::from_slice(&buf)
            .map_err(|e| format!("QMP sent something that is not JSON: {e}"))
    }

    /// Runs `command`; its `return`, or QEMU's error.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.out, "{request}").map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let reply = self.line()?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(error) = reply.get("error") {
                let desc = error
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description");
                return Err(format!("QMP {command}: {desc}"));
            }
            // An asynchronous event (STOP, RESUME, MIGRATION, ...): not the reply.
        }
    }
}

fn say(tx: &SyncSender<Event>, line: String) {
    let _ = tx.send(Event::Stderr(Side::Source, line));
}

/// The QMP thread: takes the host's triggers until the sender goes away.
fn speak(
    qmp: &Path,
    address: &str,
    limit: Duration,
    commands: &Receiver<String>,
    tx: &SyncSender<Event>,
) {
    let mut qmp = match Qmp::connect(qmp) {
        Ok(q) => q,
        Err(e) => return say(tx, format!("{FAILED}{e}")),
    };
    while let Ok(line) = commands.recv() {
        let result = match Command::parse(&line) {
            Some(Command::Pause(length)) => pause(&mut qmp, length, tx),
            Some(Command::Migrate) => migrate(&mut qmp, address, limit, tx),
            None => Err(format!("unknown trigger {line:?}")),
        };
        if let Err(e) = result {
            say(tx, format!("{FAILED}{}", crate::console::escape_text(&e)));
        }
    }
}

fn pause(qmp: &mut Qmp, length: Duration, tx: &SyncSender<Event>) -> Result<(), String> {
    let requested_ns = realtime_ns();
    let asked = Instant::now();
    qmp.execute("stop", json!({}))?;
    let stopped = Instant::now();
    std::thread::sleep(length);
    qmp.execute("cont", json!({}))?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    say(
        tx,
        format!(
            "{PAUSED}{}",
            json!({
                "requested_ns": requested_ns,
                "asked_ms": ms(length),
                "to_park_ms": ms(stopped - asked),
                // `cont`'s reply comes once the vCPUs run again.
                "parked_ms": ms(stopped.elapsed()),
            })
        ),
    );
    Ok(())
}

fn migrate(
    qmp: &mut Qmp,
    address: &str,
    limit: Duration,
    tx: &SyncSender<Event>,
) -> Result<(), String> {
    let limit_ms = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
    qmp.execute(
        "migrate-set-parameters",
        json!({"downtime-limit": limit_ms}),
    )?;
    let started_ns = realtime_ns();
    qmp.execute("migrate", json!({"uri": address}))?;
    let started = Instant::now();
    loop {
        let info = qmp.execute("query-migrate", json!({}))?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => {
                let resumed_ns = realtime_ns();
                say(
                    tx,
                    format!("{REPORT}{}", report(&info, started_ns, resumed_ns)),
                );
                // The source stays paused after a migration ("postmigrate"): end it.
                let _ = qmp.execute("quit", json!({}));
                return Ok(());
            }
            Some(status @ ("failed" | "cancelled")) => {
                let why = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("QEMU gave no reason");
                return Err(format!("QEMU's migration {status}: {why}"));
            }
            _ if started.elapsed() > MIGRATION_LIMIT => {
                let _ = qmp.execute("migrate_cancel", json!({}));
                return Err(format!(
                    "QEMU's migration had not completed after {MIGRATION_LIMIT:?}"
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// QEMU's figures in the shape of `hvbench vmm`'s report, with QEMU's own object beside.
fn report(info: &Value, started_ns: u64, resumed_ns: u64) -> Value {
    let ram = info.get("ram");
    let get = |v: Option<&Value>, k: &str| v.and_then(|v| v.get(k)).cloned().unwrap_or(Value::Null);
    json!({
        "total_ms": get(Some(info), "total-time"),
        "downtime_ms": get(Some(info), "downtime"),
        "setup_ms": get(Some(info), "setup-time"),
        "bytes": get(ram, "transferred"),
        "rounds": [],
        "dirty_sync_count": get(ram, "dirty-sync-count"),
        "started_realtime_ns": started_ns,
        // When this side saw it complete: the destination runs by then, give or take a
        // poll (5 ms).
        "resumed_realtime_ns": resumed_ns,
        "downtime_is": "QEMU's query-migrate `downtime`: measured by the source QEMU from \
                        stopping the vCPUs to the end of the final transfer; the \
                        destination's loading and start are not in it",
        "qemu": info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> (Qmp, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let input = BufReader::new(ours.try_clone().unwrap());
        (Qmp { out: ours, input }, theirs)
    }

    #[test]
    fn an_endless_qmp_line_is_read_only_to_its_bound_and_refused() {
        let (mut qmp, mut theirs) = peer();
        // Past the bound, no newline, and the socket kept open: a reader without the bound
        // would wait for more and time out; with it, it stops at MAX_REPLY bytes.
        qmp.input
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let sent = usize::try_from(MAX_REPLY).unwrap() + 4096;
        let writer = std::thread::spawn(move || {
            theirs.write_all(&vec![b'x'; sent]).unwrap();
            theirs
        });
        let error = qmp.line().unwrap_err();
        assert!(error.contains("not JSON"), "{error}");
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_reply_after_events_is_returned_and_an_error_is_a_sentence() {
        let (mut qmp, mut theirs) = peer();
        theirs
            .write_all(b"{\"event\":\"STOP\"}\n{\"return\":{\"status\":\"ok\"}}\n")
            .unwrap();
        assert_eq!(
            qmp.execute("query-status", json!({})).unwrap(),
            json!({"status": "ok"})
        );
        theirs
            .write_all(b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"no\"}}\n")
            .unwrap();
        assert_eq!(
            qmp.execute("migrate", json!({})).unwrap_err(),
            "QMP migrate: no"
        );
        // QEMU going away (its end of the socket shut) ends the conversation with a sentence.
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        let closed = qmp.line().unwrap_err();
        assert!(closed.contains("closed its QMP socket"), "{closed}");
    }
}
