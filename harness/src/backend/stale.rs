//! What a killed run left on another host (a Xen dom0, a remote libvirt host). A run's
//! private directory there and its domains go when the run ends, on every path a process
//! can take; SIGKILL (or a lost machine) is the one it cannot. Each directory (and each
//! libvirt domain, in its metadata) therefore names its owner (this machine's boot, the
//! process id and its start time), and the next run removes the directories, and destroys
//! the domains, of owners that are gone, and says so. An owner on another machine (a host
//! shared by several) or from an earlier boot cannot be judged from here and is left alone.

use std::time::Duration;

use hostutil::transport::{shell_quote, Transport, TransportError};

/// The file in a run's directory that names its owner.
pub const OWNER_FILE: &str = "owner";
/// Where runs make their directories (`RemoteDir`'s template lives here).
pub const DEFAULT_BASE: &str = "\"${TMPDIR:-/tmp}\"";
/// Longest owner line read back (a directory's file, a domain's metadata).
const MAX_OWNER_LINE: usize = 200;
/// First word of an owner line (its format's version).
const MAGIC: &str = "hvbench-owner-1";
/// Limit for one sweep command (the TCG lab is slow).
pub const SWEEP_TIMEOUT: Duration = Duration::from_secs(60);

/// The process that made a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    boot_id: String,
    pid: u32,
    /// Its start time in clock ticks after boot (`/proc/PID/stat` field 22): a reused pid
    /// has another.
    start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> Option<Owner> {
        Owner::of(std::process::id())
    }

    /// The process `pid` on this machine, if it runs.
    fn of(pid: u32) -> Option<Owner> {
        Some(Owner {
            boot_id: hostutil::read_trimmed("/proc/sys/kernel/random/boot_id")?,
            pid,
            start: start_ticks(pid)?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The owner file's one line.
    pub fn line(&self) -> String {
        format!("{MAGIC} {} {} {}", self.boot_id, self.pid, self.start)
    }

    /// Reads an owner line strictly; anything else is `None` (and its directory is kept).
    pub fn parse(text: &str) -> Option<Owner> {
        let mut words = text.split_ascii_whitespace();
        let (Some(MAGIC), Some(boot_id), Some(pid), Some(start), None) = (
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
        ) else {
            return None;
        };
        let uuid_like =
            boot_id.len() == 36 && boot_id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        uuid_like.then_some(())?;
        Some(Owner {
            boot_id: boot_id.to_string(),
            pid: pid.parse().ok()?,
            start: start.parse().ok()?,
        })
    }

    /// Whether this owner is known to be gone: it ran on this machine in this boot, and
    /// no process with its pid and start time runs now.
    pub fn gone(&self, here: &Owner) -> bool {
        self.boot_id == here.boot_id && Owner::of(self.pid).as_ref() != Some(self)
    }
}

/// Field 22 of `/proc/PID/stat`, counted after the command name's closing parenthesis
/// (the name may hold spaces and parentheses).
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards: field 22 is the 20th.
    after_name.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// A path hvbench may put into a shell command and an xl config unquoted: absolute, plain
/// characters only.
pub fn plain_path(path: &str) -> bool {
    path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b))
}

/// The shell words that, after `mktemp -d` put a directory's path in `$d`, write this
/// process's owner file into it (nothing when this process cannot name itself).
pub fn write_owner_file() -> String {
    Owner::current()
        .map(|o| {
            format!(
                " && printf '%s\\n' {} > \"$d/{OWNER_FILE}\"",
                shell_quote(&o.line())
            )
        })
        .unwrap_or_default()
}

/// How a killed run's directory goes: `remove(transport, dir, owner)` takes it and what
/// it names away, and says what went.
pub type Remover = dyn Fn(&Transport, &str, &Owner) -> Result<String, TransportError>;

/// Removes the directories matching `glob` (shell words, e.g. `{DEFAULT_BASE}/hvbench.*`)
/// of owners that are gone, through `remove`; returns one sentence per directory removed.
pub fn sweep(
    transport: &Transport,
    glob: &str,
    remove: &Remover,
) -> Result<Vec<String>, TransportError> {
    let Some(here) = Owner::current() else {
        return Ok(Vec::new());
    };
    let listing = transport.run(
        &format!(
            "for d in {glob}; do [ -f \"$d/{OWNER_FILE}\" ] || continue; \
             printf '%s ' \"$d\"; head -c {MAX_OWNER_LINE} \"$d/{OWNER_FILE}\" | head -n 1; echo; done"
        ),
        None,
        SWEEP_TIMEOUT,
    )?;
    let mut said = Vec::new();
    for (dir, owner) in String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(dir, _)| plain_path(dir))
        .filter_map(|(dir, owner)| Some((dir, Owner::parse(owner)?)))
        .filter(|(_, owner)| owner.gone(&here))
    {
        said.push(remove(transport, dir, &owner)?);
    }
    Ok(said)
}

/// Removes `dir` alone (a directory whose domains went another way); says so.
pub fn remove_dir_only(
    transport: &Transport,
    dir: &str,
    owner: &Owner,
) -> Result<String, TransportError> {
    transport.run(
        &format!("rm -rf -- {}", shell_quote(dir)),
        None,
        SWEEP_TIMEOUT,
    )?;
    Ok(format!(
        "removed {dir}, left by hvbench process {} (killed before it could clean up)",
        owner.pid
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn owner_lines_round_trip_and_anything_else_is_refused() {
        let me = Owner::current().unwrap();
        assert_eq!(Owner::parse(&me.line()), Some(me.clone()));
        assert!(!me.gone(&me));
        for bad in [
            "",
            "hvbench-owner-1",
            "hvbench-owner-2 0123 1 2",
            &format!("{} extra", me.line()),
            "hvbench-owner-1 not-a-boot-id-not-a-boot-id-not-a-boot 1 2",
            &me.line().replace(&me.pid.to_string(), "-1"),
        ] {
            assert_eq!(Owner::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_killed_runs_directory_goes_and_everyone_elses_stays() {
        let base = tempfile::tempdir().unwrap();
        let me = Owner::current().unwrap();
        let dead = Owner {
            pid: dead_pid(),
            ..me.clone()
        };
        let elsewhere = Owner {
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            pid: dead.pid,
            ..me.clone()
        };
        let make = |name: &str, owner: Option<&Owner>| {
            let dir = base.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("hvbench-1-1.cfg"), "name = \"hvbench-1-1\"\n").unwrap();
            if let Some(owner) = owner {
                std::fs::write(dir.join(OWNER_FILE), owner.line() + "\n").unwrap();
            }
            dir
        };
        let killed = make("hvbench.killed", Some(&dead));
        let running = make("hvbench.running", Some(&me));
        let other_machine = make("hvbench.other", Some(&elsewhere));
        let unknown = make("hvbench.unknown", None);
        let glob = format!("{}/hvbench.*", shell_quote(&base.path().to_string_lossy()));
        let said = sweep(&Transport::Local, &glob, &remove_dir_only).unwrap();
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].contains(&dead.pid.to_string()), "{said:?}");
        assert!(!killed.exists());
        for kept in [running, other_machine, unknown] {
            assert!(kept.exists(), "{} removed", kept.display());
        }
    }
}
