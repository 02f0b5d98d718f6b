//! How hvbench reaches a dom0: locally (hvbench runs in dom0) or over SSH. Every command
//! has a time limit, so an unreachable or wedged host is an error within seconds, never
//! a hang.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

/// An SSH destination and how to authenticate it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshTarget {
    pub user: String,
    pub host: String,
    pub port: u16,
    /// Private key; the user's default keys when absent.
    pub identity: Option<PathBuf>,
    /// known_hosts file pinning the host key; the user's own when absent.
    pub known_hosts: Option<PathBuf>,
    /// Name the host key is pinned under (the lab pins one key whatever the port).
    pub host_key_alias: Option<String>,
}

impl SshTarget {
    /// Parses `ssh://[user@]host[:port]`.
    pub fn parse(url: &str) -> Result<Self, TransportError> {
        let bad = || TransportError::BadUrl(url.to_string());
        let rest = url.strip_prefix("ssh://").ok_or_else(bad)?;
        let (user, hostport) = match rest.split_once('@') {
            Some((u, h)) if !u.is_empty() => (u.to_string(), h),
            Some(_) => return Err(bad()),
            None => ("root".to_string(), rest),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (hostport, 22),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                && !s.starts_with('-')
        };
        if !valid(host) || !valid(&user) || port == 0 {
            return Err(bad());
        }
        Ok(SshTarget {
            user,
            host: host.to_string(),
            port,
            identity: None,
            known_hosts: None,
            host_key_alias: None,
        })
    }

    pub fn url(&self) -> String {
        format!("ssh://{}@{}:{}", self.user, self.host, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// hvbench runs in dom0.
    Local,
    Ssh(SshTarget),
}

#[derive(Debug, Error)]
pub enum TransportError {
    #[error("--xen-host {0:?} is not `local`, `lab` or ssh://[user@]host[:port]")]
    BadUrl(String),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("`{command}` on {target} took longer than {limit:?}")]
    Timeout {
        command: String,
        target: String,
        limit: Duration,
    },
    #[error("`{command}` on {target} failed ({status}): {stderr}")]
    Failed {
        command: String,
        target: String,
        status: String,
        stderr: String,
    },
    #[error("cannot reach {target}: {detail}")]
    Unreachable { target: String, detail: String },
}

/// How long SSH may take to connect before the host counts as unreachable.
const CONNECT_TIMEOUT_S: u32 = 5;

impl Transport {
    pub fn describe(&self) -> String {
        match self {
            Transport::Local => "local dom0".to_string(),
            Transport::Ssh(t) => t.url(),
        }
    }

    /// A `Command` that runs the shell command `remote` on the target, in a process group
    /// of its own: Ctrl-C reaches hvbench alone, which then stops the guest and records
    /// the interruption, instead of every `xl` and `ssh` dying under it.
    pub fn command(&self, remote: &str) -> Command {
        let mut command = self.bare_command(remote);
        command.process_group(0);
        command
    }

    fn bare_command(&self, remote: &str) -> Command {
        match self {
            Transport::Local => {
                let mut c = Command::new("sh");
                c.arg("-c").arg(remote);
                c
            }
            Transport::Ssh(t) => {
                let mut c = Command::new("ssh");
                c.args([
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    &format!("ConnectTimeout={CONNECT_TIMEOUT_S}"),
                    "-o",
                    "ServerAliveInterval=5",
                    "-o",
                    "ServerAliveCountMax=3",
                    "-o",
                    "LogLevel=ERROR",
                    "-p",
                    &t.port.to_string(),
                ]);
                if let Some(key) = &t.identity {
                    c.arg("-i").arg(key).args(["-o", "IdentitiesOnly=yes"]);
                }
                if let Some(file) = &t.known_hosts {
                    // A pinned host (the lab): the user's own ssh configuration and
                    // known hosts must not change how it is reached.
                    c.args(["-F", "/dev/null", "-o", "GlobalKnownHostsFile=/dev/null"])
                        .arg("-o")
                        .arg(format!("UserKnownHostsFile={}", file.display()))
                        .args(["-o", "StrictHostKeyChecking=yes"]);
                }
                if let Some(alias) = &t.host_key_alias {
                    c.arg("-o").arg(format!("HostKeyAlias={alias}"));
                }
                c.arg(format!("{}@{}", t.user, t.host))
                    .arg("--")
                    .arg(remote);
                c
            }
        }
    }

    fn program(&self) -> &'static str {
        match self {
            Transport::Local => "sh",
            Transport::Ssh(_) => "ssh (install Debian's openssh-client)",
        }
    }

    /// Starts `remote` with piped stdout/stderr (stdin from `input` if given).
    pub fn spawn(&self, remote: &str, stdin: bool) -> Result<Child, TransportError> {
        self.command(remote)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| TransportError::Spawn {
                program: self.program(),
                source,
            })
    }

    /// Runs `remote` to completion within `limit`, feeding it `input`; fails on a non-zero
    /// exit with its stderr.
    pub fn run(
        &self,
        remote: &str,
        input: Option<&[u8]>,
        limit: Duration,
    ) -> Result<Output, TransportError> {
        let mut child = self.spawn(remote, input.is_some())?;
        if let (Some(bytes), Some(mut stdin)) = (input, child.stdin.take()) {
            let bytes = bytes.to_vec();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            });
        }
        let collect = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = collect(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let err = collect(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let started = Instant::now();
        // Polled from 1 ms up to 10 ms: a command of a few ms is not kept waiting 10.
        let mut pause = Duration::from_millis(1);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if started.elapsed() < limit => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(10));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(TransportError::Timeout {
                        command: remote.to_string(),
                        target: self.describe(),
                        limit,
                    });
                }
            }
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        if !status.success() {
            let text = String::from_utf8_lossy(&stderr).trim().to_string();
            // ssh exits with 255 for its own failures (connection, authentication).
            if matches!(self, Transport::Ssh(_)) && status.code() == Some(255) {
                return Err(TransportError::Unreachable {
                    target: self.describe(),
                    detail: if text.is_empty() {
                        "ssh failed".into()
                    } else {
                        text
                    },
                });
            }
            return Err(TransportError::Failed {
                command: remote.to_string(),
                target: self.describe(),
                status: status.to_string(),
                stderr: text,
            });
        }
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}

/// Quotes a string for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dom0_commands_run_in_their_own_process_group() {
        let mut child = Transport::Local.spawn("exec sleep 5", false).unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id().cast_signed());
        let group = nix::unistd::getpgid(Some(pid));
        let _ = child.kill();
        let _ = child.wait();
        // Ctrl-C at the terminal goes to hvbench's group, not to xl or ssh.
        assert_eq!(group, Ok(pid));
        assert_ne!(group, nix::unistd::getpgid(None));
    }

    #[test]
    fn parses_ssh_urls() {
        let t = SshTarget::parse("ssh://alice@dom0.example:2222").unwrap();
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("alice", "dom0.example", 2222)
        );
        let t = SshTarget::parse("ssh://10.0.0.5").unwrap();
        assert_eq!((t.user.as_str(), t.port), ("root", 22));
        for bad in [
            "dom0",
            "ssh://",
            "ssh://@host",
            "ssh://host:0",
            "ssh://host:99999",
            "ssh://-oProxyCommand=evil",
            "ssh://a b",
            "http://host",
        ] {
            assert!(SshTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_commands_run_with_limits() {
        let out = Transport::Local
            .run("echo hi; cat", Some(b"there"), Duration::from_secs(5))
            .unwrap();
        assert_eq!(out.stdout, b"hi\nthere");
        let e = Transport::Local
            .run("exit 3", None, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(e, TransportError::Failed { .. }));
        let started = Instant::now();
        let e = Transport::Local
            .run("sleep 10", None, Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(e, TransportError::Timeout { .. }));
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn an_unreachable_host_fails_within_seconds() {
        // Nothing listens on port 1 of this machine: the connection is refused at once.
        let t = Transport::Ssh(SshTarget::parse("ssh://root@127.0.0.1:1").unwrap());
        let started = Instant::now();
        let e = t.run("xl info", None, Duration::from_secs(20)).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert!(
            matches!(
                e,
                TransportError::Unreachable { .. } | TransportError::Spawn { .. }
            ),
            "{e}"
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
