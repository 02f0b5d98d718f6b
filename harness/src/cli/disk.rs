//! `hvbench run`'s disk options: where the block workloads' disk file is made, how large,
//! and whether the backends bypass the host's page cache.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use hvbench::disk::{DiskOptions, TestDisk};
use workloads::{BackendFeature, Requirement, WorkloadId};

#[derive(Debug, Args)]
pub struct DiskArgs {
    /// Directory of the block workloads' disk file (created there, removed at the end;
    /// default: the results directory, or its nearest existing parent before it exists,
    /// so the results' filesystem).
    #[arg(long)]
    pub disk_dir: Option<PathBuf>,
    /// Size of the disk file (preallocated and written through before the run).
    #[arg(long, default_value = "256m", value_parser = parse_disk_size)]
    pub disk_size: u64,
    /// Let the backends use the host's page cache (default: O_DIRECT; QEMU cache=none).
    #[arg(long)]
    pub disk_buffered: bool,
}

fn parse_disk_size(text: &str) -> Result<u64, String> {
    let size = workloads::params::parse_size(text).ok_or("not a size (4096, 64k, 16m, 1g)")?;
    if size < (1 << 20) || !size.is_multiple_of(1 << 20) {
        return Err("the disk must be whole MiB, at least 1m".into());
    }
    Ok(size)
}

/// Whether a workload needs the disk.
fn needs_disk(id: WorkloadId) -> bool {
    id.spec().requires.iter().any(|r| {
        matches!(
            r,
            Requirement::Backend(BackendFeature::BlockDevice | BackendFeature::VirtioBlk)
        )
    })
}

/// The results directory, or (before it exists) its nearest existing ancestor: the
/// filesystem the results will be on.
fn on_the_filesystem_of(out: &Path) -> PathBuf {
    out.ancestors()
        .find(|p| p.is_dir())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Makes the disk when a selected workload needs one (before any guest boots).
pub fn prepare(args: &DiskArgs, workloads: &[WorkloadId], out: &Path) -> Result<Option<TestDisk>> {
    if !workloads.iter().copied().any(needs_disk) {
        return Ok(None);
    }
    let dir = args
        .disk_dir
        .clone()
        .unwrap_or_else(|| on_the_filesystem_of(out));
    for name in hvbench::disk::remove_stale(&dir) {
        hvbench::say!(
            "hvbench: removed {name} in {}, left by a run that was killed",
            dir.display()
        );
    }
    let disk = TestDisk::create(&DiskOptions {
        dir,
        size: args.disk_size,
        direct: !args.disk_buffered,
    })
    .context("the block workloads' disk")?;
    Ok(Some(disk))
}

/// Checks the disk after the run; false where it holds data the guest never wrote.
pub fn check(disk: &TestDisk) -> bool {
    match disk.check() {
        Ok(c) if c.corrupt == 0 => {
            hvbench::say!(
                "hvbench: disk check: {} blocks of 4 KiB hold the guest's pattern, {} are \
                 untouched, none corrupted",
                c.written,
                c.zero
            );
            true
        }
        Ok(c) => {
            hvbench::say!(
                "hvbench: disk check FAILED: {} blocks of 4 KiB hold data the guest never \
                 wrote (first at byte {})",
                c.corrupt,
                c.first_corrupt.unwrap_or(0)
            );
            false
        }
        Err(e) => {
            hvbench::say!("hvbench: disk check failed: {e}");
            false
        }
    }
}
