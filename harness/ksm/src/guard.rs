//! The only way hvbench changes KSM's settings: a guard that saves the old values to a
//! state file before it writes anything, and writes them back when it is dropped (the
//! workload's end, an error, Ctrl-C) or explicitly. A run that dies without dropping it
//! (SIGKILL, a second Ctrl-C) leaves the state file behind; the next run that takes the
//! lock finds it, restores those values and says so.
//!
//! An exclusive `flock` on a lock file beside the state file is held for the guard's life:
//! two runs never drive KSM at once, and a state file whose lock nobody holds is, for
//! certain, one a dead run left. The files live in `/run`, which is emptied at boot, as are
//! KSM's settings: a state file never outlives the settings it describes.
//!
//! The state and lock files are hvbench's state files (`hostutil::statefile`: written whole,
//! the old file or the new one, never half).

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime};

use hostutil::{rfc3339, statefile};
use nix::fcntl::Flock;
use serde::{Deserialize, Serialize};

use super::sysfs::KsmSysfs;
use super::KsmError;

const LOCK_FILE: &str = "ksm.lock";
const STATE_FILE: &str = "ksm-settings.json";
const STATE_FORMAT: u32 = 1;

/// KSM's sysfs directory, and where the guard keeps its lock and state file.
#[derive(Clone, Debug)]
pub struct KsmPaths {
    pub sysfs: KsmSysfs,
    pub state_dir: PathBuf,
}

impl KsmPaths {
    /// The real `/sys/kernel/mm/ksm`, with the lock and state file in hvbench's state
    /// directory.
    pub fn system() -> Self {
        KsmPaths {
            sysfs: KsmSysfs::system(),
            state_dir: statefile::SYSTEM_STATE_DIR.into(),
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join(STATE_FILE)
    }

    fn lock_file(&self) -> PathBuf {
        self.state_dir.join(LOCK_FILE)
    }
}

/// One tunable the guard changed: its value before, and what the run wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSetting {
    pub name: String,
    pub before: String,
    pub applied: String,
}

/// The state file: everything needed to undo a run's changes without that run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSettings {
    pub format: u32,
    /// The hvbench process that changed the settings.
    pub pid: u32,
    pub saved_at: String,
    /// In the order they were written; restored in reverse.
    pub settings: Vec<SavedSetting>,
}

impl statefile::Versioned for SavedSettings {
    fn format(&self) -> u32 {
        self.format
    }
}

/// Holds the KSM lock; restores what it changed when dropped.
#[derive(Debug)]
pub struct KsmGuard {
    paths: KsmPaths,
    lock: Option<Flock<File>>,
    saved: Option<SavedSettings>,
    /// What was restored from a dead run's state file when the lock was taken, if anything.
    pub stale_restored: Option<String>,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> KsmError {
    move |source| KsmError::Io { what, source }
}

/// The lock, or `None` while another process holds it.
fn try_lock(paths: &KsmPaths) -> Result<Option<Flock<File>>, KsmError> {
    Ok(statefile::try_lock(&paths.lock_file())?)
}

fn write_state(paths: &KsmPaths, saved: &SavedSettings) -> Result<(), KsmError> {
    Ok(statefile::write_json(&paths.state_file(), saved)?)
}

fn read_state(paths: &KsmPaths) -> Result<Option<SavedSettings>, KsmError> {
    Ok(statefile::read_versioned(
        &paths.state_file(),
        STATE_FORMAT,
    )?)
}

/// Writes the saved values back, last change first, and checks they read back. A setting
/// that no longer reads what hvbench applied was changed since by someone else: it is left
/// as it is, and said so. Tries every setting even when one fails. Returns what changed
/// (`run 1 -> 0, ...`) and what was left alone.
fn write_back(sysfs: &KsmSysfs, saved: &SavedSettings) -> Result<String, KsmError> {
    let mut changes = Vec::new();
    let mut left_alone = Vec::new();
    let mut failures = Vec::new();
    for s in saved.settings.iter().rev() {
        let now = match sysfs.read(&s.name) {
            Ok(now) => now,
            Err(e) => {
                failures.push(e.to_string());
                continue;
            }
        };
        if now == s.before {
            continue;
        }
        if now != s.applied {
            left_alone.push(format!(
                "{} (now {now}; hvbench set {}, it was {} before)",
                s.name, s.applied, s.before
            ));
            continue;
        }
        match write_checked(sysfs, &s.name, &s.before) {
            Ok(()) => changes.push(format!("{} {now} -> {}", s.name, s.before)),
            Err(e) => failures.push(e),
        }
    }
    if !failures.is_empty() {
        return Err(KsmError::Restore(failures.join("; ")));
    }
    changes.reverse();
    left_alone.reverse();
    let mut message = if changes.is_empty() {
        "nothing differed".to_string()
    } else {
        changes.join(", ")
    };
    if !left_alone.is_empty() {
        message.push_str(&format!(
            "; left alone, as someone changed them since: {}",
            left_alone.join(", ")
        ));
    }
    Ok(message)
}

/// Writes `value` to the tunable `name` and checks that it reads back.
fn write_checked(sysfs: &KsmSysfs, name: &str, value: &str) -> Result<(), String> {
    sysfs.write(name, value).map_err(|e| e.to_string())?;
    match sysfs.read(name) {
        Ok(v) if v == value => Ok(()),
        Ok(v) => Err(format!("{name} reads {v} after writing {value}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Writes `saved` back, then removes the state file that held it (which must be there).
/// On failure the state file stays, for the next run to try again.
fn undo(paths: &KsmPaths, saved: &SavedSettings) -> Result<String, KsmError> {
    let changes = write_back(&paths.sysfs, saved)?;
    let path = paths.state_file();
    std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
    Ok(changes)
}

/// With the lock held: restores a state file left by a dead run, if one is there.
fn restore_stale_locked(paths: &KsmPaths) -> Result<Option<String>, KsmError> {
    let Some(saved) = read_state(paths)? else {
        return Ok(None);
    };
    let changes = undo(paths, &saved)?;
    let path = paths.state_file();
    Ok(Some(format!(
        "KSM settings left changed by hvbench pid {} (which did not finish; saved {}) were \
         restored from {}: {changes}",
        saved.pid,
        saved.saved_at,
        path.display()
    )))
}

/// At the start of a run: restores the settings a dead run left changed, if its state file
/// is there and no live run holds the lock. Never waits.
pub fn restore_stale(paths: &KsmPaths) -> Result<Option<String>, KsmError> {
    if !paths.state_file().exists() {
        return Ok(None);
    }
    match try_lock(paths)? {
        // A live run's state file: not stale.
        None => Ok(None),
        Some(_lock) => restore_stale_locked(paths),
    }
}

impl KsmGuard {
    /// Takes the KSM lock, waiting up to `wait` while another run holds it (unless
    /// `interrupted` is set), then restores a dead run's settings if it left any.
    pub fn acquire(
        paths: KsmPaths,
        wait: Duration,
        interrupted: &AtomicBool,
    ) -> Result<Self, KsmError> {
        let lock = statefile::lock_waiting(&paths.lock_file(), wait, interrupted, |holder| {
            hostutil::say!("hvbench: waiting for hvbench pid {holder}, which is using KSM")
        })?
        .map_err(|busy| KsmError::Busy {
            holder: busy.holder,
            waited: busy.waited,
        })?;
        let stale_restored = restore_stale_locked(&paths)?;
        Ok(KsmGuard {
            paths,
            lock: Some(lock),
            saved: None,
            stale_restored,
        })
    }

    /// Saves the current values of the named tunables to the state file, then writes the
    /// new ones in order. Call once; on an error the values already written are restored
    /// when the guard is dropped.
    pub fn apply(&mut self, settings: &[(&str, String)]) -> Result<(), KsmError> {
        if self.saved.is_some() {
            return Err(KsmError::Restore(
                "KSM settings applied twice without a restore".into(),
            ));
        }
        let mut saved = SavedSettings {
            format: STATE_FORMAT,
            pid: std::process::id(),
            saved_at: rfc3339(SystemTime::now()),
            settings: Vec::new(),
        };
        for (name, value) in settings {
            saved.settings.push(SavedSetting {
                name: name.to_string(),
                before: self.paths.sysfs.read(name)?,
                applied: value.clone(),
            });
        }
        write_state(&self.paths, &saved)?;
        self.saved = Some(saved);
        for (name, value) in settings {
            self.paths.sysfs.write(name, value)?;
        }
        Ok(())
    }

    /// Writes the saved values back and removes the state file; `None` if nothing was
    /// applied. On failure the state file stays, for the next run to try again.
    pub fn restore(&mut self) -> Result<Option<String>, KsmError> {
        let Some(saved) = self.saved.take() else {
            return Ok(None);
        };
        undo(&self.paths, &saved).map(Some)
    }

    /// Lets go of the lock without restoring, as a killed run would (tests only).
    #[cfg(test)]
    fn die(mut self) {
        self.saved = None;
        self.lock = None;
    }
}

impl Drop for KsmGuard {
    fn drop(&mut self) {
        match self.restore() {
            Ok(None) => {}
            Ok(Some(changes)) => hostutil::say!("hvbench: KSM settings restored: {changes}"),
            Err(e) => hostutil::say!(
                "hvbench: restoring KSM's settings failed: {e}; {} keeps the old values for \
                 the next run to restore",
                self.paths.state_file().display()
            ),
        }
        // The lock goes last, once the settings are back.
        self.lock = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A stand-in for /sys/kernel/mm/ksm and /run/hvbench in a temporary directory.
    fn fake() -> (tempfile::TempDir, KsmPaths) {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = dir.path().join("ksm");
        std::fs::create_dir(&sysfs).unwrap();
        for (name, value) in [
            ("run", "0\n"),
            ("pages_to_scan", "100\n"),
            ("sleep_millisecs", "20\n"),
            ("advisor_mode", "none [scan-time]\n"),
            ("max_page_sharing", "256\n"),
        ] {
            std::fs::write(sysfs.join(name), value).unwrap();
        }
        let paths = KsmPaths {
            sysfs: KsmSysfs::at(sysfs),
            state_dir: dir.path().join("run"),
        };
        (dir, paths)
    }

    fn settings() -> Vec<(&'static str, String)> {
        vec![
            ("advisor_mode", "none".into()),
            ("pages_to_scan", "1000".into()),
            ("sleep_millisecs", "10".into()),
            ("run", "1".into()),
        ]
    }

    fn tunables(paths: &KsmPaths) -> BTreeMap<String, String> {
        paths.sysfs.tunables().unwrap()
    }

    static NEVER: AtomicBool = AtomicBool::new(false);

    #[test]
    fn settings_are_restored_exactly_when_the_guard_goes() {
        let (_dir, paths) = fake();
        let before = tunables(&paths);
        let mut guard = KsmGuard::acquire(paths.clone(), Duration::ZERO, &NEVER).unwrap();
        assert_eq!(guard.stale_restored, None);
        guard.apply(&settings()).unwrap();
        assert_eq!(paths.sysfs.read("run").unwrap(), "1");
        assert_eq!(paths.sysfs.read("advisor_mode").unwrap(), "none");
        assert!(
            paths.state_file().exists(),
            "saved before anything is written"
        );
        let saved = read_state(&paths).unwrap().unwrap();
        assert_eq!(saved.settings[0].before, "scan-time");
        assert_eq!(saved.settings[3].applied, "1");
        assert_eq!(saved.pid, std::process::id());
        // RFC 3339 to the second, in UTC: `2026-11-26T03:34:56Z`.
        assert_eq!(saved.saved_at.len(), 20, "{}", saved.saved_at);
        assert!(saved.saved_at.ends_with('Z'), "{}", saved.saved_at);
        drop(guard);
        assert_eq!(tunables(&paths), before);
        assert!(!paths.state_file().exists());
        // The lock was released: the next run takes it at once.
        KsmGuard::acquire(paths, Duration::ZERO, &NEVER).unwrap();
    }

    #[test]
    fn an_explicit_restore_says_what_it_changed_and_is_idempotent() {
        let (_dir, paths) = fake();
        let mut guard = KsmGuard::acquire(paths.clone(), Duration::ZERO, &NEVER).unwrap();
        guard.apply(&settings()).unwrap();
        let changes = guard.restore().unwrap().unwrap();
        assert_eq!(
            changes,
            "advisor_mode none -> scan-time, pages_to_scan 1000 -> 100, \
             sleep_millisecs 10 -> 20, run 1 -> 0"
        );
        assert_eq!(guard.restore().unwrap(), None);
        assert!(
            guard.apply(&settings()).is_ok(),
            "a restored guard may apply again"
        );
    }

    #[test]
    fn a_dead_runs_settings_are_restored_by_the_next_run_with_a_message() {
        let (_dir, paths) = fake();
        let before = tunables(&paths);
        let mut guard = KsmGuard::acquire(paths.clone(), Duration::ZERO, &NEVER).unwrap();
        guard.apply(&settings()).unwrap();
        guard.die();
        assert_eq!(paths.sysfs.read("run").unwrap(), "1", "left changed");
        assert!(paths.state_file().exists());

        let message = restore_stale(&paths).unwrap().unwrap();
        assert!(message.contains("did not finish"), "{message}");
        assert!(message.contains("run 1 -> 0"), "{message}");
        assert!(
            message.contains(&std::process::id().to_string()),
            "{message}"
        );
        assert_eq!(tunables(&paths), before);
        assert!(!paths.state_file().exists());
        assert_eq!(restore_stale(&paths).unwrap(), None, "only once");
    }

    #[test]
    fn the_next_guard_restores_a_dead_runs_settings_too() {
        let (_dir, paths) = fake();
        let before = tunables(&paths);
        let mut guard = KsmGuard::acquire(paths.clone(), Duration::ZERO, &NEVER).unwrap();
        guard.apply(&settings()).unwrap();
        guard.die();
        let guard = KsmGuard::acquire(paths.clone(), Duration::ZERO, &NEVER).unwrap();
        assert!(guard
            .stale_restored
            .as_deref()
            .unwrap_or("")
            .contains("run 1 -> 0"));
        assert_eq!(tunables(&paths), before);
    }

    #[test]
    fn a_live_runs_state_is_left_alone_and_a_second_run_waits() {
        let (_dir, paths) = fake();
        let mut guard = KsmGuard::acquire(paths.clone(), Duration::ZERO, &NEVER).unwrap();
        guard.apply(&settings()).unwrap();
        assert_eq!(restore_stale(&paths).unwrap(), None);
        assert_eq!(paths.sysfs.read("run").unwrap(), "1");
        let busy = KsmGuard::acquire(paths.clone(), Duration::from_millis(300), &NEVER);
        match busy {
            Err(KsmError::Busy { holder, .. }) => {
                assert_eq!(holder, std::process::id().to_string())
            }
            other => panic!("expected Busy, got {:?}", other.map(|_| ())),
        }
        drop(guard);
        assert_eq!(paths.sysfs.read("run").unwrap(), "0");
    }

    #[test]
    fn settings_changed_since_by_someone_else_are_left_alone() {
        let (_dir, paths) = fake();
        let mut guard = KsmGuard::acquire(paths.clone(), Duration::ZERO, &NEVER).unwrap();
        guard.apply(&settings()).unwrap();
        guard.die();
        // While the dead run's state file waits, an administrator tunes KSM.
        paths.sysfs.write("pages_to_scan", "500").unwrap();
        paths.sysfs.write("advisor_mode", "scan-time").unwrap();

        let message = restore_stale(&paths).unwrap().unwrap();
        assert_eq!(paths.sysfs.read("pages_to_scan").unwrap(), "500");
        assert_eq!(paths.sysfs.read("advisor_mode").unwrap(), "scan-time");
        // What still read as hvbench left it is restored.
        assert_eq!(paths.sysfs.read("run").unwrap(), "0");
        assert_eq!(paths.sysfs.read("sleep_millisecs").unwrap(), "20");
        assert!(
            message.contains("sleep_millisecs 10 -> 20, run 1 -> 0"),
            "{message}"
        );
        assert!(
            message.contains(
                "left alone, as someone changed them since: pages_to_scan (now 500; \
                 hvbench set 1000, it was 100 before)"
            ),
            "{message}"
        );
        assert!(!paths.state_file().exists());

        // The same for a live run's own restore.
        let mut guard = KsmGuard::acquire(paths.clone(), Duration::ZERO, &NEVER).unwrap();
        guard.apply(&[("run", "1".into())]).unwrap();
        paths.sysfs.write("run", "2").unwrap();
        let message = guard.restore().unwrap().unwrap();
        assert!(message.contains("left alone"), "{message}");
        assert_eq!(paths.sysfs.read("run").unwrap(), "2");
    }

    #[test]
    fn a_failed_write_is_undone_and_a_bad_state_file_is_refused() {
        let (_dir, paths) = fake();
        let before = tunables(&paths);
        // A setting that reads but cannot be written, after the others were written.
        std::os::unix::fs::symlink("/proc/version", paths.sysfs.dir().join("stuck")).unwrap();
        let mut guard = KsmGuard::acquire(paths.clone(), Duration::ZERO, &NEVER).unwrap();
        let mut bad = settings();
        bad.push(("stuck", "1".into()));
        assert!(guard.apply(&bad).is_err());
        assert_eq!(paths.sysfs.read("run").unwrap(), "1");
        // Every setting written is restored.
        guard.restore().unwrap();
        assert_eq!(tunables(&paths), before);
        assert!(!paths.state_file().exists());
        drop(guard);

        // One that reads what hvbench applied but cannot be written back keeps the state
        // file, for the next run to try again (even root cannot write a 0444 sysctl).
        std::os::unix::fs::symlink("/proc/sys/kernel/ostype", paths.sysfs.dir().join("ro"))
            .unwrap();
        let applied = paths.sysfs.read("ro").unwrap();
        let stuck = SavedSettings {
            format: STATE_FORMAT,
            pid: 1,
            saved_at: "then".into(),
            settings: vec![SavedSetting {
                name: "ro".into(),
                before: "Unix".into(),
                applied,
            }],
        };
        write_state(&paths, &stuck).unwrap();
        let e = restore_stale(&paths).unwrap_err().to_string();
        assert!(e.contains("ksm/ro"), "{e}");
        assert!(paths.state_file().exists());
        std::fs::remove_file(paths.state_file()).unwrap();

        std::fs::write(paths.state_file(), "{ not json").unwrap();
        let e = restore_stale(&paths).unwrap_err().to_string();
        assert!(e.contains("ksm-settings.json"), "{e}");
        KsmGuard::acquire(paths.clone(), Duration::ZERO, &NEVER).unwrap_err();
    }
}
