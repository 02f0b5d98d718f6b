//! Files hvbench keeps so that a crash of hvbench loses nothing: JSON state written whole
//! (a crash leaves the old file or the new one, never half of one), read back as `None`
//! when there is none, and the lock files that keep two runs apart. The labs, the KSM
//! guard and the paging switch each keep theirs this way.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

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
    #[error("{}: {reason}", path.display())]
    Json { path: PathBuf, reason: String },
}

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
}
