//! The disk file behind the block workloads (`io.blk-*`): created by hvbench where the user
//! says (`--disk-dir`), preallocated and written through once (so reads reach allocated
//! blocks, as fio lays its files out), given to the backend, checked after the run (every
//! 4 KiB block holds zeros or the guest's pattern for its offset), and removed on every
//! exit path (drop). The records name its filesystem and the device under it.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;
use workloads::blk::{classify, BlockContent};

/// Bytes written or read per call while laying out or checking the file.
const CHUNK: usize = 1 << 20;
/// The unit the check classifies.
const BLOCK: usize = 4096;

static DISKS: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("the disk directory {0} does not exist (create it, or pass another --disk-dir)")]
    Missing(PathBuf),
    #[error("the disk directory {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("the disk directory {dir} is not writable: {source}")]
    Unwritable {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the disk directory {0} is on tmpfs: O_DIRECT there would measure memory copies, not a \
         disk; pass a --disk-dir on a disk-backed filesystem, or --disk-buffered"
    )]
    Tmpfs(PathBuf),
    #[error("the filesystem of {dir} refuses O_DIRECT ({source}); pass --disk-buffered")]
    NoDirect {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("creating the disk file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checking the disk file {path}: {source}")]
    Check {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where and how the disk is made.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    pub dir: PathBuf,
    /// Bytes; a multiple of 1 MiB.
    pub size: u64,
    /// The backends open it with O_DIRECT (QEMU: cache=none).
    pub direct: bool,
}

/// The disk file; removed when dropped.
#[derive(Debug)]
pub struct TestDisk {
    path: PathBuf,
    size: u64,
    direct: bool,
    filesystem: String,
    device: String,
}

/// What the check after the run found, in 4 KiB blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCheck {
    pub written: u64,
    pub zero: u64,
    pub corrupt: u64,
    /// The first corrupt block's byte offset.
    pub first_corrupt: Option<u64>,
}

fn check_dir(dir: &Path, direct: bool) -> Result<(), DiskError> {
    let meta = std::fs::metadata(dir).map_err(|_| DiskError::Missing(dir.to_path_buf()))?;
    if !meta.is_dir() {
        return Err(DiskError::NotADirectory(dir.to_path_buf()));
    }
    nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).map_err(|e| {
        DiskError::Unwritable {
            dir: dir.to_path_buf(),
            source: std::io::Error::from_raw_os_error(e as i32),
        }
    })?;
    if direct {
        let fs = nix::sys::statfs::statfs(dir).map_err(|e| DiskError::Unwritable {
            dir: dir.to_path_buf(),
            source: std::io::Error::from_raw_os_error(e as i32),
        })?;
        if fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
            return Err(DiskError::Tmpfs(dir.to_path_buf()));
        }
    }
    Ok(())
}

/// The filesystem type and source device of the mount holding `path`.
fn mount_of(path: &Path) -> (String, String) {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(mounts) = procfs::process::Process::myself().and_then(|p| p.mountinfo()) else {
        return ("unknown".into(), "unknown".into());
    };
    mounts
        .into_iter()
        .filter(|m| canonical.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map(|m| (m.fs_type, m.mount_source.unwrap_or_else(|| "none".into())))
        .unwrap_or_else(|| ("unknown".into(), "unknown".into()))
}

/// The process that made a disk file named as [`TestDisk::create`] names them.
fn maker_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("hvbench-disk-")?.strip_suffix(".img")?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Removes the disk files in `dir` whose maker is gone (a run killed outright cannot
/// remove its own); the names of those removed.
pub fn remove_stale(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = maker_of(&name) else {
            continue;
        };
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        if !alive && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

impl TestDisk {
    /// Checks the directory, creates the file, preallocates and writes it through with
    /// zeros. Every failure is an error before any guest boots.
    pub fn create(options: &DiskOptions) -> Result<Self, DiskError> {
        check_dir(&options.dir, options.direct)?;
        let n = DISKS.fetch_add(1, Ordering::Relaxed);
        let path = options
            .dir
            .join(format!("hvbench-disk-{}-{n}.img", std::process::id()));
        let (filesystem, device) = mount_of(&options.dir);
        let disk = TestDisk {
            path,
            size: options.size,
            direct: options.direct,
            filesystem,
            device,
        };
        // From here on, drop removes the file whatever fails.
        disk.lay_out().map_err(|source| DiskError::Create {
            path: disk.path.clone(),
            source,
        })?;
        if options.direct {
            let probe = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(&disk.path);
            if let Err(source) = probe {
                return Err(DiskError::NoDirect {
                    dir: options.dir.clone(),
                    source,
                });
            }
        }
        Ok(disk)
    }

    fn lay_out(&self) -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&self.path)?;
        let len = libc::off_t::try_from(self.size).map_err(std::io::Error::other)?;
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let zeros = vec![0u8; CHUNK];
        let mut left = self.size;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_all()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The disk as hvbench's VMM opens it.
    pub fn config(&self) -> vmm::DiskConfig {
        vmm::DiskConfig {
            path: self.path.clone(),
            direct: self.direct,
        }
    }

    /// What the records' backend details say about the disk.
    pub fn details(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("disk_path".into(), self.path.display().to_string()),
            ("disk_bytes".into(), self.size.to_string()),
            ("disk_filesystem".into(), self.filesystem.clone()),
            ("disk_device".into(), self.device.clone()),
            (
                "disk_mode".into(),
                if self.direct { "O_DIRECT" } else { "buffered" }.into(),
            ),
        ])
    }

    /// Reads the file back: every 4 KiB block holds zeros or the pattern of its offset.
    pub fn check(&self) -> Result<DiskCheck, DiskError> {
        let err = |source| DiskError::Check {
            path: self.path.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(err)?;
        let mut buf = vec![0u8; CHUNK];
        let mut check = DiskCheck::default();
        let mut offset = 0u64;
        loop {
            let n = read_full(&mut file, &mut buf).map_err(err)?;
            for block in buf[..n].chunks(BLOCK) {
                match classify(block, offset) {
                    BlockContent::Pattern => check.written += 1,
                    BlockContent::Zero => check.zero += 1,
                    BlockContent::Other => {
                        check.corrupt += 1;
                        check.first_corrupt.get_or_insert(offset);
                    }
                }
                offset += block.len() as u64;
            }
            if n < buf.len() {
                return Ok(check);
            }
        }
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match file.read(&mut buf[at..])? {
            0 => break,
            n => at += n,
        }
    }
    Ok(at)
}

impl Drop for TestDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, direct: bool) -> DiskOptions {
        DiskOptions {
            dir: dir.to_path_buf(),
            size: 2 << 20,
            direct,
        }
    }

    #[test]
    fn a_missing_or_unusable_directory_is_a_clear_error() {
        let missing = Path::new("/nonexistent/hvbench-disks");
        assert!(matches!(
            TestDisk::create(&options(missing, false)),
            Err(DiskError::Missing(_))
        ));
        let file = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            TestDisk::create(&options(file.path(), false)),
            Err(DiskError::NotADirectory(_))
        ));
        // /dev/shm is tmpfs on Linux: refused for O_DIRECT, with the reason.
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            let err = TestDisk::create(&options(shm, true)).unwrap_err();
            assert!(matches!(err, DiskError::Tmpfs(_)), "{err}");
            assert!(err.to_string().contains("tmpfs"));
        }
    }

    #[test]
    fn disk_files_of_processes_that_are_gone_are_removed_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        // pid_max is at most 2^22: this process cannot exist.
        let stale = dir.path().join("hvbench-disk-4294967-0.img");
        let ours = dir
            .path()
            .join(format!("hvbench-disk-{}-7.img", std::process::id()));
        let other = dir.path().join("hvbench-disk-notes.img");
        for f in [&stale, &ours, &other] {
            std::fs::write(f, b"x").unwrap();
        }
        assert_eq!(remove_stale(dir.path()), vec!["hvbench-disk-4294967-0.img"]);
        assert!(!stale.exists() && ours.exists() && other.exists());
    }

    #[test]
    fn the_disk_is_laid_out_checked_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let disk = TestDisk::create(&options(dir.path(), false)).unwrap();
        let path = disk.path().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 20);
        assert_eq!(
            disk.check().unwrap(),
            DiskCheck {
                zero: 512,
                ..DiskCheck::default()
            }
        );
        // One block with the guest's pattern, one with garbage.
        let mut block = vec![0u8; BLOCK];
        workloads::blk::fill(&mut block, 8192);
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, &block, 8192).unwrap();
        std::os::unix::fs::FileExt::write_at(&f, &block, 4 * 4096).unwrap();
        f.flush().unwrap();
        let check = disk.check().unwrap();
        assert_eq!((check.written, check.corrupt, check.zero), (1, 1, 510));
        assert_eq!(check.first_corrupt, Some(4 * 4096));
        assert_ne!(disk.details()["disk_filesystem"], "unknown");
        drop(disk);
        assert!(!path.exists(), "removed on drop");
    }
}
