//! `virsh`, libvirt's own client, as a subprocess: every command names the connection
//! (`-c URI`), runs in a process group of its own (Ctrl-C reaches hvbench alone) and
//! within a time limit. It runs here, or on another host through a transport (the Xen
//! lab's dom0, where libvirt's libxl driver runs beside `xl`).

use std::process::{Child, Output};
use std::time::Duration;

use hostutil::transport::{shell_quote, Transport, TransportError};
use thiserror::Error;

/// A `virsh` command that did not do its job.
#[derive(Debug, Error)]
pub enum VirshError {
    #[error("cannot run virsh (install Debian's libvirt-clients): {0}")]
    Spawn(String),
    #[error("`virsh {command}` took longer than {limit:?}")]
    Timeout { command: String, limit: Duration },
    #[error("`virsh {command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
}

impl VirshError {
    fn from_transport(args: &[&str], e: TransportError) -> Self {
        let command = args.join(" ");
        match e {
            TransportError::Timeout { limit, .. } => VirshError::Timeout { command, limit },
            TransportError::Failed { stderr, status, .. }
                if stderr.contains("not found") && status.contains("127") =>
            {
                VirshError::Spawn(stderr)
            }
            TransportError::Failed { stderr, .. } => VirshError::Failed {
                command,
                stderr: crate::console::escape_text(
                    &stderr
                        .lines()
                        .map(|l| l.trim().trim_start_matches("error: "))
                        .filter(|l| !l.is_empty())
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
            },
            other => VirshError::Spawn(other.to_string()),
        }
    }

    /// What virsh said on stderr, if it ran and failed.
    pub fn stderr(&self) -> Option<&str> {
        match self {
            VirshError::Failed { stderr, .. } => Some(stderr),
            _ => None,
        }
    }
}

/// Tries of a command whose SSH link to virsh's host failed.
const LINK_TRIES: u32 = 5;
/// What ssh says when the connection failed before the remote command ran.
const LINK_NEVER_UP: &[&str] = &[
    "kex_exchange_identification",
    "Connection refused",
    "banner exchange",
];

/// Limit for one ordinary command (create, resume, destroy, list).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for the first contact: libvirt probes QEMU's capabilities on the first
/// connection after a daemon starts (8.6 s here), so this is not short; an unreachable
/// daemon fails at once, well within it.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// A libvirt connection, spoken to through `virsh -c URI` run over `transport`.
#[derive(Clone, Debug)]
pub struct Virsh {
    pub uri: String,
    /// Where `virsh` runs (here, unless libvirt is reached through a dom0's shell).
    pub transport: Transport,
}

impl Virsh {
    /// `virsh` run on this machine.
    pub fn local(uri: &str) -> Self {
        Virsh {
            uri: uri.into(),
            transport: Transport::Local,
        }
    }

    fn command_line(&self, args: &[&str]) -> String {
        let mut line = format!("exec virsh -q -c {}", shell_quote(&self.uri));
        for arg in args {
            line.push(' ');
            line.push_str(&shell_quote(arg));
        }
        line
    }

    /// Runs `virsh ARGS` to completion, feeding it `input` on stdin.
    pub fn run(
        &self,
        args: &[&str],
        input: Option<&[u8]>,
        limit: Duration,
    ) -> Result<Output, VirshError> {
        self.transport
            .run(&self.command_line(args), input, limit)
            .map_err(|e| VirshError::from_transport(args, e))
    }

    /// Runs an idempotent `virsh ARGS` (destroy, domstate, list), again while the link
    /// to virsh's host failed (a TCG dom0's sshd drops a fresh connection now and then).
    pub fn run_idempotent(&self, args: &[&str], limit: Duration) -> Result<Output, VirshError> {
        self.retrying(args, None, limit, |_| true)
    }

    /// Runs `virsh ARGS` fed `input`, again only while the link never came up (SSH's key
    /// exchange or connection failed: the command did not run).
    pub fn run_once(
        &self,
        args: &[&str],
        input: Option<&[u8]>,
        limit: Duration,
    ) -> Result<Output, VirshError> {
        self.retrying(args, input, limit, |detail| {
            LINK_NEVER_UP.iter().any(|m| detail.contains(m))
        })
    }

    fn retrying(
        &self,
        args: &[&str],
        input: Option<&[u8]>,
        limit: Duration,
        again: impl Fn(&str) -> bool,
    ) -> Result<Output, VirshError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.run(args, input, limit) {
                Err(VirshError::Spawn(detail))
                    if self.transport != Transport::Local
                        && tries < LINK_TRIES
                        && again(&detail) =>
                {
                    std::thread::sleep(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// Runs `virsh ARGS` and returns its stdout as text.
    pub fn text(&self, args: &[&str], limit: Duration) -> Result<String, VirshError> {
        self.run(args, None, limit)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Starts `virsh ARGS` with piped stdout and stderr (for `virsh event`). On another
    /// host it runs beside a guard that kills it when its stdin closes (hvbench ended the
    /// SSH link): a remote virsh would otherwise outlive the link until it next writes.
    pub fn spawn(&self, args: &[&str]) -> Result<Child, VirshError> {
        let line = self.command_line(args);
        let (line, guarded) = match self.transport {
            Transport::Local => (line, false),
            Transport::Ssh(_) => (format!("{line} & v=$!; cat >/dev/null; kill $v"), true),
        };
        self.transport
            .spawn(&line, guarded)
            .map_err(|e| VirshError::from_transport(args, e))
    }
}

/// What `virsh version` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Versions {
    /// The client library (`Using library: libvirt 9.0.0`).
    pub library: String,
    /// The daemon (`Running against daemon: 9.0.0`), where it says.
    pub daemon: Option<String>,
    /// The hypervisor the driver runs (`Running hypervisor: QEMU 7.2.22`).
    pub hypervisor: String,
}

impl Versions {
    pub fn parse(text: &str) -> Self {
        let mut v = Versions::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim().to_string();
            match key.trim() {
                "Using library" => v.library = value,
                "Running against daemon" => v.daemon = Some(value),
                "Running hypervisor" => v.hypervisor = value,
                _ => {}
            }
        }
        v
    }
}

/// The domain types (`kvm`, `qemu`, ...) `virsh capabilities` offers for x86_64 guests.
pub fn domain_types(capabilities: &str) -> Vec<String> {
    let mut types: Vec<String> = capabilities
        .match_indices("<domain type='")
        .filter_map(|(at, m)| {
            let rest = &capabilities[at + m.len()..];
            rest.split_once('\'').map(|(t, _)| t.to_string())
        })
        .filter(|t| !t.is_empty() && t.len() < 32 && t.bytes().all(|b| b.is_ascii_alphanumeric()))
        .collect();
    types.sort();
    types.dedup();
    types
}

/// What a `virsh event --event lifecycle` line says about the domain stopping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// QEMU exited on its own (the exit device; or QEMU failed).
    Failed,
    /// The guest asked for a shutdown; for this guest, a reset (triple fault) under
    /// `on_reboot=destroy`.
    Shutdown,
    /// Someone destroyed it (hvbench's `stop`, or another client).
    Destroyed,
    /// Any other detail libvirt gives.
    Other(String),
}

/// `event 'lifecycle' for domain 'NAME': Stopped Failed` -> `Some(("NAME",
/// Stopped::Failed))`; lines about other transitions or not of this shape -> `None`.
pub fn parse_event(line: &str) -> Option<(&str, Stopped)> {
    let rest = line.strip_prefix("event 'lifecycle' for domain '")?;
    let (name, what) = rest.rsplit_once("': ")?;
    let detail = what.trim().strip_prefix("Stopped")?.trim();
    let stopped = match detail {
        "Failed" => Stopped::Failed,
        "Shutdown" => Stopped::Shutdown,
        "Destroyed" => Stopped::Destroyed,
        other => Stopped::Other(other.chars().take(80).collect()),
    };
    Some((name, stopped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_virsh_version() {
        let v = Versions::parse(
            "Compiled against library: libvirt 9.0.0\nUsing library: libvirt 9.0.0\n\
             Using API: QEMU 9.0.0\nRunning hypervisor: QEMU 7.2.22\n",
        );
        assert_eq!(v.library, "libvirt 9.0.0");
        assert_eq!(v.hypervisor, "QEMU 7.2.22");
        assert_eq!(v.daemon, None);
        let v = Versions::parse("Running against daemon: 9.0.0\n");
        assert_eq!(v.daemon.as_deref(), Some("9.0.0"));
    }

    #[test]
    fn lifecycle_lines_say_how_the_domain_stopped() {
        let l = |d: &str| format!("event 'lifecycle' for domain 'hvbench-1-1': {d}");
        let stopped = |d: &str| parse_event(&l(d)).map(|(name, s)| (name.to_string(), s));
        let ours = |s: Stopped| Some(("hvbench-1-1".to_string(), s));
        assert_eq!(stopped("Stopped Failed"), ours(Stopped::Failed));
        assert_eq!(stopped("Stopped Shutdown"), ours(Stopped::Shutdown));
        assert_eq!(stopped("Stopped Destroyed"), ours(Stopped::Destroyed));
        assert_eq!(
            stopped("Stopped Crashed"),
            ours(Stopped::Other("Crashed".into()))
        );
        assert_eq!(stopped("Resumed Unpaused"), None);
        assert_eq!(parse_event("garbage"), None);
        // The watcher sees every domain: the name says whose stop it is.
        assert_eq!(
            parse_event("event 'lifecycle' for domain 'a': b': Stopped Failed"),
            Some(("a': b", Stopped::Failed))
        );
    }

    #[test]
    fn domain_types_come_from_capabilities() {
        let caps = "<guest><arch name='x86_64'><domain type='qemu'/>\
                    <domain type='kvm'/></arch></guest><domain type='kvm'/>";
        assert_eq!(domain_types(caps), vec!["kvm", "qemu"]);
        assert!(domain_types("<domain type='").is_empty());
    }
}
