//! Files hvbench keeps so that a crash of hvbench loses nothing: JSON state written whole
//! (a crash leaves the old file or the new one, never half of one), read back as `None`
//! when there is none, and the lock files that keep two runs apart. The labs, the KSM
//! guard and the paging switch each keep theirs this way.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::Serialize;
use thiserror::Error;

/// Where a real host's state and lock files live: /run, which is emptied at boot, as are
/// the host settings (KSM, module parameters) that the files describe.
pub const SYSTEM_STATE_DIR: &str = "/run/hvbench";

#[derive(Debug, Error)]
pub enum StateFileError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not JSON of the expected shape, or another layout version.
    #[error("{}: {reason}", path.display())]
    Json { path: PathBuf, reason: String },
}

/// A state file's layout version, checked when it is read back.
pub trait Versioned {
    fn format(&self) -> u32;
}

/// The lock another process holds past the wait.
#[derive(Debug)]
pub struct LockBusy {
    /// The pid its holder wrote into the lock file (`?` when unreadable).
    pub holder: String,
    pub waited: Duration,
}

/// How often a waiting run tries the lock again.
const LOCK_RETRY: Duration = Duration::from_millis(200);

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateFileError {
    let path = path.to_path_buf();
    move |source| StateFileError::Io {
        action,
        path,
        source,
    }
}

/// The value saved at `path`; `None` when nothing was saved there.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateFileError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("reading", path)(e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StateFileError::Json {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The value saved at `path`, which must be of layout `expected`; `None` when nothing was
/// saved there.
pub fn read_versioned<T: DeserializeOwned + Versioned>(
    path: &Path,
    expected: u32,
) -> Result<Option<T>, StateFileError> {
    match read_json::<T>(path)? {
        Some(saved) if saved.format() != expected => Err(StateFileError::Json {
            path: path.to_path_buf(),
            reason: format!("format {} (this hvbench writes {expected})", saved.format()),
        }),
        saved => Ok(saved),
    }
}

/// Writes `value` whole: a temporary file, synced, renamed over `path`, and the directory
/// synced so that the rename itself survives a crash.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StateFileError> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| StateFileError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let temporary = path.with_extension("json.tmp");
    let mut file = File::create(&temporary).map_err(io("creating", &temporary))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(io("writing", &temporary))?;
    fs::rename(&temporary, path).map_err(io("renaming to", path))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    File::open(dir.unwrap_or(Path::new(".")))
        .and_then(|d| d.sync_all())
        .map_err(io("syncing the directory of", path))
}

/// Removes a state file; one that is already gone is fine.
pub fn remove(path: &Path) -> Result<(), StateFileError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("removing", path)(e)),
    }
}

/// Opens (creating it and its directory) a lock file, for `Flock`. Never truncated: a
/// holder may have written its pid there.
pub fn open_lock_file(path: &Path) -> Result<File, StateFileError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(io("creating", dir))?;
    }
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(io("opening", path))
}

/// Takes the exclusive `flock` on the lock file at `path` (opened as
/// [`open_lock_file`] does) without waiting; `None` while another process holds it.
pub fn try_lock(path: &Path) -> Result<Option<Flock<File>>, StateFileError> {
    match Flock::lock(open_lock_file(path)?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io("locking", path)(errno.into())),
    }
}

/// The pid the holder of the lock at `path` wrote there (for messages only).
pub fn lock_holder(path: &Path) -> String {
    fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "?".into())
}

/// Takes the lock at `path`, waiting up to `wait` while another process holds it, unless
/// `interrupted` is set; `on_wait` hears the holder's pid once, when the wait begins. The
/// lock file then holds this process's pid, for the messages of those who wait on it.
pub fn lock_waiting(
    path: &Path,
    wait: Duration,
    interrupted: &AtomicBool,
    on_wait: impl FnOnce(&str),
) -> Result<Result<Flock<File>, LockBusy>, StateFileError> {
    let started = Instant::now();
    let mut on_wait = Some(on_wait);
    let lock = loop {
        if let Some(lock) = try_lock(path)? {
            break lock;
        }
        let holder = lock_holder(path);
        if started.elapsed() >= wait || interrupted.load(Ordering::Relaxed) {
            let waited = started.elapsed();
            return Ok(Err(LockBusy { holder, waited }));
        }
        if let Some(say) = on_wait.take() {
            say(&holder);
        }
        std::thread::sleep(LOCK_RETRY);
    };
    let _ = lock
        .set_len(0)
        .and_then(|()| writeln!(&*lock, "{}", std::process::id()));
    Ok(Ok(lock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Saved {
        pid: u32,
        name: String,
    }

    #[test]
    fn round_trips_and_absent_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(read_json::<Saved>(&path).unwrap().is_none());
        let saved = Saved {
            pid: 7,
            name: "x".into(),
        };
        write_json(&path, &saved).unwrap();
        assert_eq!(read_json::<Saved>(&path).unwrap(), Some(saved));
        assert!(!path.with_extension("json.tmp").exists());
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert!(read_json::<Saved>(&path).unwrap().is_none());
    }

    #[test]
    fn a_corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, "{not json").unwrap();
        let e = read_json::<Saved>(&path).unwrap_err();
        assert!(matches!(e, StateFileError::Json { .. }), "{e}");
        assert!(e.to_string().contains("state.json"), "{e}");
    }

    #[test]
    fn a_lock_file_keeps_what_its_holder_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/run.lock");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, "1234\n").unwrap();
        drop(open_lock_file(&path).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), "1234\n");
        let fresh = dir.path().join("new/dir/run.lock");
        open_lock_file(&fresh).unwrap();
        assert!(fresh.exists());
    }

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Layout {
        format: u32,
    }

    impl Versioned for Layout {
        fn format(&self) -> u32 {
            self.format
        }
    }

    #[test]
    fn another_layout_is_refused_with_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert!(read_versioned::<Layout>(&path, 1).unwrap().is_none());
        write_json(&path, &Layout { format: 1 }).unwrap();
        assert_eq!(
            read_versioned::<Layout>(&path, 1).unwrap(),
            Some(Layout { format: 1 })
        );
        let e = read_versioned::<Layout>(&path, 2).unwrap_err().to_string();
        assert!(e.contains("format 1 (this hvbench writes 2)"), "{e}");
    }

    #[test]
    fn a_held_lock_is_waited_for_then_busy_with_its_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.lock");
        let flag = AtomicBool::new(false);
        let held = lock_waiting(&path, Duration::ZERO, &flag, |_| {})
            .unwrap()
            .unwrap();
        assert_eq!(lock_holder(&path), std::process::id().to_string());
        // flock is per open file: a second open in this process contends like another run.
        let mut heard = None;
        let busy = lock_waiting(&path, Duration::from_millis(300), &flag, |h| {
            heard = Some(h.to_string())
        })
        .unwrap()
        .unwrap_err();
        assert_eq!(busy.holder, std::process::id().to_string());
        assert_eq!(heard.as_deref(), Some(busy.holder.as_str()));
        assert!(
            busy.waited >= Duration::from_millis(300),
            "{:?}",
            busy.waited
        );
        drop(held);
        let again = lock_waiting(&path, Duration::ZERO, &flag, |_| {}).unwrap();
        assert!(again.is_ok(), "{again:?}");
    }
}
