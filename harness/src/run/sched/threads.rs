//! The host's view of a VMM process's vCPU threads: found by name (each VMM's own
//! pattern, [`VcpuNaming`]), accounted by `/proc/PID/task/TID/schedstat` (time on a CPU
//! and time runnable but waiting, the run delay KVM turns into steal time), and pinned.

use std::path::Path;

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// One vCPU thread of a VMM process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuThread {
    pub index: usize,
    pub tid: u32,
}

/// What schedstat says of one thread, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStat {
    pub run_ns: u64,
    pub wait_ns: u64,
}

/// Most threads looked at in one VMM process.
const MAX_THREADS: usize = 64;

/// How a VMM names its vCPU threads (the `comm` procfs shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuNaming {
    /// hvbench's VMM: `vcpu<N>-<name>`.
    Hvbench,
    /// QEMU started with `-name ...,debug-threads=on`: `CPU <N>/<accelerator>` (`CPU 0/KVM`).
    Qemu,
}

impl VcpuNaming {
    /// The vCPU index a thread named `comm` runs, if it is a vCPU thread.
    pub fn index(self, comm: &str) -> Option<usize> {
        let (prefix, separator) = match self {
            VcpuNaming::Hvbench => ("vcpu", '-'),
            VcpuNaming::Qemu => ("CPU ", '/'),
        };
        let rest = comm.trim().strip_prefix(prefix)?;
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 || !rest[digits..].starts_with(separator) {
            return None;
        }
        rest[..digits].parse().ok()
    }
}

/// The vCPU threads of process `pid` (under `proc_root`, normally `/proc`), by index.
pub fn vcpu_threads(
    proc_root: &Path,
    pid: u32,
    naming: VcpuNaming,
) -> std::io::Result<Vec<VcpuThread>> {
    let mut threads = Vec::new();
    let tasks = proc_root.join(pid.to_string()).join("task");
    for entry in std::fs::read_dir(tasks)?.take(MAX_THREADS) {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if let Some(index) = naming.index(&comm) {
            threads.push(VcpuThread { index, tid });
        }
    }
    threads.sort_by_key(|t| t.index);
    Ok(threads)
}

/// Parses schedstat's "run_ns wait_ns timeslices".
pub fn parse_schedstat(text: &str) -> Option<SchedStat> {
    let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<u64>().ok());
    Some(SchedStat {
        run_ns: fields.next()??,
        wait_ns: fields.next()??,
    })
}

pub fn schedstat(proc_root: &Path, pid: u32, tid: u32) -> Option<SchedStat> {
    let path = proc_root
        .join(pid.to_string())
        .join("task")
        .join(tid.to_string())
        .join("schedstat");
    parse_schedstat(&std::fs::read_to_string(path).ok()?)
}

/// Pins thread `tid` to host CPUs `0..cpus`.
pub fn pin(tid: u32, cpus: usize) -> Result<(), String> {
    let mut set = CpuSet::new();
    for cpu in 0..cpus {
        set.set(cpu)
            .map_err(|e| format!("host CPU {cpu} cannot be named in an affinity mask: {e}"))?;
    }
    let tid = i32::try_from(tid).map_err(|_| format!("thread id {tid} out of range"))?;
    sched_setaffinity(Pid::from_raw(tid), &set)
        .map_err(|e| format!("pinning thread {tid} to CPUs 0..{cpus}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_are_found_by_name_and_schedstat_parses() {
        let ours = VcpuNaming::Hvbench;
        assert_eq!(ours.index("vcpu0-vmm\n"), Some(0));
        assert_eq!(ours.index("vcpu12-hvbench-1"), Some(12));
        for other in [
            "vcpu-x",
            "vcpux-1",
            "main",
            "doorbell-stdin",
            "vcpu1",
            "CPU 0/KVM",
        ] {
            assert_eq!(ours.index(other), None, "{other}");
        }
        let dir = tempfile::tempdir().unwrap();
        for (tid, comm) in [(10, "hvbench"), (12, "vcpu1-vmm"), (11, "vcpu0-vmm")] {
            let task = dir.path().join(format!("7/task/{tid}"));
            std::fs::create_dir_all(&task).unwrap();
            std::fs::write(task.join("comm"), format!("{comm}\n")).unwrap();
            std::fs::write(task.join("schedstat"), format!("{tid}000 {tid} 3\n")).unwrap();
        }
        let threads = vcpu_threads(dir.path(), 7, VcpuNaming::Hvbench).unwrap();
        assert_eq!(
            threads,
            vec![
                VcpuThread { index: 0, tid: 11 },
                VcpuThread { index: 1, tid: 12 }
            ]
        );
        assert_eq!(
            schedstat(dir.path(), 7, 12),
            Some(SchedStat {
                run_ns: 12000,
                wait_ns: 12
            })
        );
        assert_eq!(parse_schedstat("1"), None);
        assert_eq!(parse_schedstat("x 1 1"), None);
    }

    #[test]
    fn qemus_vcpu_threads_are_found_by_its_debug_thread_names() {
        let qemu = VcpuNaming::Qemu;
        assert_eq!(qemu.index("CPU 0/KVM\n"), Some(0));
        assert_eq!(qemu.index("CPU 7/KVM"), Some(7));
        assert_eq!(qemu.index("CPU 3/TCG"), Some(3));
        for other in [
            "qemu-system-x86",
            "CPU /KVM",
            "CPU 0",
            "CPU x/KVM",
            "ALL CPUs/TCG",
            "call_rcu",
            "vcpu0-vmm",
            "CPU 99999999999999999999/KVM",
        ] {
            assert_eq!(qemu.index(other), None, "{other}");
        }
        let dir = tempfile::tempdir().unwrap();
        for (tid, comm) in [
            (20, "qemu-system-x86"),
            (22, "CPU 1/KVM"),
            (21, "CPU 0/KVM"),
        ] {
            let task = dir.path().join(format!("9/task/{tid}"));
            std::fs::create_dir_all(&task).unwrap();
            std::fs::write(task.join("comm"), format!("{comm}\n")).unwrap();
        }
        let tids: Vec<u32> = vcpu_threads(dir.path(), 9, qemu)
            .unwrap()
            .iter()
            .map(|t| t.tid)
            .collect();
        assert_eq!(tids, vec![21, 22]);
        assert!(vcpu_threads(dir.path(), 9, VcpuNaming::Hvbench)
            .unwrap()
            .is_empty());
    }

    /// The real procfs: this thread's own schedstat reads, and counts the CPU it used.
    #[test]
    fn this_threads_schedstat_reads() {
        let tid = nix::unistd::gettid().as_raw().cast_unsigned();
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(20) {
            std::hint::black_box(0u64);
        }
        // A switch away brings the counters up to date.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let s = schedstat(Path::new("/proc"), std::process::id(), tid).unwrap();
        assert!(s.run_ns > 0);
    }
}
