//! What procfs says about the VMM processes and ksmd: resident and proportional memory
//! (`smaps_rollup`), CPU time (`stat`), KSM's per-process view (`ksm_stat`).

use std::collections::BTreeMap;
use std::path::Path;

use super::KsmError;

/// A process's memory, summed over its mappings, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmapsRollup {
    /// Resident pages, each counted whole (a page shared by four processes counts four
    /// times across them).
    pub rss_kib: u64,
    /// Proportional set size: each resident page divided by the number of processes
    /// mapping it, so the sum over processes is the memory they really hold.
    pub pss_kib: u64,
    /// The anonymous part of `pss_kib` (guest RAM is anonymous), where the kernel says.
    pub pss_anon_kib: Option<u64>,
}

impl std::ops::Add for SmapsRollup {
    type Output = SmapsRollup;
    fn add(self, o: SmapsRollup) -> SmapsRollup {
        SmapsRollup {
            rss_kib: self.rss_kib + o.rss_kib,
            pss_kib: self.pss_kib + o.pss_kib,
            pss_anon_kib: match (self.pss_anon_kib, o.pss_anon_kib) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            },
        }
    }
}

/// Parses `/proc/PID/smaps_rollup` (`Rss:   1234 kB` lines after a header line).
pub fn parse_smaps_rollup(text: &str) -> Option<SmapsRollup> {
    let mut fields = BTreeMap::new();
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut words = rest.split_ascii_whitespace();
        if let (Some(n), Some("kB"), None) = (words.next(), words.next(), words.next()) {
            if let Ok(n) = n.parse::<u64>() {
                fields.insert(key.trim(), n);
            }
        }
    }
    Some(SmapsRollup {
        rss_kib: *fields.get("Rss")?,
        pss_kib: *fields.get("Pss")?,
        pss_anon_kib: fields.get("Pss_Anon").copied(),
    })
}

pub fn smaps_rollup(pid: u32) -> Result<SmapsRollup, KsmError> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = read(&path)?;
    parse_smaps_rollup(&text).ok_or_else(|| KsmError::Parse {
        what: path,
        text: text.chars().take(200).collect(),
    })
}

/// The fields of `/proc/PID/stat` that hvbench uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub comm: String,
    pub ppid: i64,
    /// `PF_*` flags (`PF_KTHREAD` marks a kernel thread).
    pub flags: u64,
    /// CPU time in user and kernel mode, in clock ticks.
    pub utime: u64,
    pub stime: u64,
}

/// The kernel-thread flag in `/proc/PID/stat`'s flags field.
pub(crate) const PF_KTHREAD: u64 = 0x0020_0000;

/// Parses `/proc/PID/stat`. The command name is in parentheses and may itself hold spaces
/// and parentheses, so the fields are counted from the last `)`.
pub(crate) fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // Fields from the third (state) on; field n is rest[n - 3].
    let rest: Vec<&str> = text.get(close + 1..)?.split_ascii_whitespace().collect();
    let field = |n: usize| rest.get(n - 3).copied();
    Some(ProcStat {
        comm,
        ppid: field(4)?.parse().ok()?,
        flags: field(9)?.parse().ok()?,
        utime: field(14)?.parse().ok()?,
        stime: field(15)?.parse().ok()?,
    })
}

pub(crate) fn proc_stat(pid: u32) -> Result<ProcStat, KsmError> {
    let path = format!("/proc/{pid}/stat");
    let text = read(&path)?;
    parse_proc_stat(&text).ok_or_else(|| KsmError::Parse {
        what: path,
        text: text.chars().take(200).collect(),
    })
}

/// The pid of the `ksmd` kernel thread, if there is one.
pub fn find_ksmd() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = proc_stat(pid).ok()?;
            (stat.comm == "ksmd" && stat.flags & PF_KTHREAD != 0).then_some(pid)
        })
}

/// Clock ticks per second, the unit of `utime` and `stime`.
pub(crate) fn ticks_per_second() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t.cast_unsigned(),
        // Linux has used 100 on every architecture hvbench runs on.
        _ => 100,
    }
}

/// CPU time (user + system) of a process or thread, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64, KsmError> {
    let s = proc_stat(pid)?;
    Ok((s.utime + s.stime) as f64 / ticks_per_second() as f64)
}

/// Parses `/proc/PID/ksm_stat` (`ksm_merging_pages 123` lines) into its numeric fields.
pub(crate) fn parse_ksm_stat(text: &str) -> BTreeMap<String, i64> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Whether `/proc/PID/ksm_stat` says the process has memory KSM may merge.
pub(crate) fn ksm_stat_mergeable(text: &str) -> bool {
    text.lines()
        .any(|l| matches!(l.trim(), "ksm_mergeable: yes" | "ksm_merge_any: yes"))
}

/// Pages of process `pid` that KSM merged (`/proc/PID/ksm_merging_pages`, kernels from
/// 5.19); `None` where the kernel does not say.
pub fn merging_pages(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/ksm_merging_pages"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Other processes whose memory KSM may merge too (QEMU marks guest RAM mergeable by
/// default), as `pid comm (N rmap items)`: ksmd scans them as well.
pub fn other_mergeable_processes(ours: &[u32]) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found: Vec<(u32, String)> = dir
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            if ours.contains(&pid) {
                return None;
            }
            let text = std::fs::read_to_string(format!("/proc/{pid}/ksm_stat")).ok()?;
            if !ksm_stat_mergeable(&text) {
                return None;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let items = parse_ksm_stat(&text)
                .get("ksm_rmap_items")
                .copied()
                .unwrap_or(0);
            Some((pid, format!("{pid} {} ({items} rmap items)", comm.trim())))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, text)| text).collect()
}

/// `/proc/loadavg`'s first three fields: how busy the (shared) host was.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| {
            t.split_ascii_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Memory the host could still hand out, in MiB.
pub fn mem_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        let kib: u64 = l
            .strip_prefix("MemAvailable:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024)
    })
}

fn read(path: &str) -> Result<String, KsmError> {
    std::fs::read_to_string(Path::new(path)).map_err(|source| KsmError::Io {
        what: format!("reading {path}"),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLLUP: &str = "\
5581e3a4c000-7ffc5d5f5000 ---p 00000000 00:00 0                          [rollup]
Rss:              270412 kB
Pss:              137005 kB
Pss_Dirty:        135000 kB
Pss_Anon:         134720 kB
Pss_File:           2285 kB
Pss_Shmem:             0 kB
Shared_Clean:       2304 kB
Shared_Dirty:     131072 kB
Private_Clean:       120 kB
Private_Dirty:    136916 kB
Referenced:       270412 kB
Anonymous:        268000 kB
KSM:              131072 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
";

    #[test]
    fn smaps_rollup_parsing() {
        let r = parse_smaps_rollup(ROLLUP).unwrap();
        assert_eq!(
            r,
            SmapsRollup {
                rss_kib: 270_412,
                pss_kib: 137_005,
                pss_anon_kib: Some(134_720),
            }
        );
        // Older kernels have no Pss_Anon; garbage and missing fields are refused.
        let old = "x [rollup]\nRss: 10 kB\nPss: 5 kB\n";
        assert_eq!(parse_smaps_rollup(old).unwrap().pss_anon_kib, None);
        assert_eq!(parse_smaps_rollup("Rss: 10 kB\n"), None);
        assert_eq!(parse_smaps_rollup("Rss: ten kB\nPss: 5 kB\n"), None);
        assert_eq!(parse_smaps_rollup("Rss: 10 MB\nPss: 5 kB\n"), None);
        assert_eq!(parse_smaps_rollup(""), None);
        let sum = r + parse_smaps_rollup(old).unwrap();
        assert_eq!(
            (sum.rss_kib, sum.pss_kib, sum.pss_anon_kib),
            (270_422, 137_010, None)
        );
    }

    #[test]
    fn smaps_rollup_of_this_process() {
        let r = smaps_rollup(std::process::id()).unwrap();
        assert!(
            r.rss_kib > 0 && r.pss_kib > 0 && r.pss_kib <= r.rss_kib,
            "{r:?}"
        );
    }

    #[test]
    fn proc_stat_parsing() {
        let ksmd = "37 (ksmd) S 2 0 0 0 -1 2129984 0 0 0 0 51 1234 0 0 25 5 1 0 9 0 0 \
                    18446744073709551615 0 0 0 0 0 0 0 2147483647 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_proc_stat(ksmd).unwrap();
        assert_eq!(s.comm, "ksmd");
        assert_eq!((s.ppid, s.utime, s.stime), (2, 51, 1234));
        assert_ne!(s.flags & PF_KTHREAD, 0);
        // A command name with spaces and parentheses.
        let odd = "4242 (a) b (c)) R 1 2 3 4 5 4194560 0 0 0 0 7 8 0 0";
        let s = parse_proc_stat(odd).unwrap();
        assert_eq!(
            (s.comm.as_str(), s.ppid, s.utime, s.stime),
            ("a) b (c)", 1, 7, 8)
        );
        assert_eq!(s.flags & PF_KTHREAD, 0);
        assert_eq!(parse_proc_stat("12 (x) S 1 2"), None);
        assert_eq!(parse_proc_stat("no parentheses"), None);
        assert_eq!(parse_proc_stat(") (backwards"), None);
    }

    #[test]
    fn ksm_stat_parsing() {
        let s = parse_ksm_stat(
            "ksm_rmap_items 100\nksm_zero_pages 0\nksm_merging_pages 42\n\
             ksm_process_profit -4096\nksm_merge_any: no\nksm_mergeable: yes\n",
        );
        assert_eq!(s.get("ksm_merging_pages"), Some(&42));
        assert_eq!(s.get("ksm_process_profit"), Some(&-4096));
        assert!(!s.contains_key("ksm_merge_any:"));
        assert_eq!(s.len(), 4);
        assert!(ksm_stat_mergeable(
            "ksm_merge_any: no\nksm_mergeable: yes\n"
        ));
        assert!(ksm_stat_mergeable("ksm_merge_any: yes\n"));
        assert!(!ksm_stat_mergeable(
            "ksm_merge_any: no\nksm_mergeable: no\n"
        ));
        assert!(!ksm_stat_mergeable("ksm_rmap_items 5\n"));
    }

    #[test]
    fn ksmd_and_host_figures() {
        if std::path::Path::new("/sys/kernel/mm/ksm/run").exists() {
            let pid = find_ksmd().expect("a kernel with KSM has a ksmd thread");
            assert!(cpu_seconds(pid).unwrap() >= 0.0);
        }
        assert_eq!(load_average().split(' ').count(), 3);
        assert!(mem_available_mib().unwrap_or(0) > 0);
        assert!(ticks_per_second() > 0);
    }
}
