//! From KSM's counters over time to the workload's figures: when the sharing has stopped
//! growing, how long it took to reach 90% of it, and whether KSM's host-wide count of
//! pages saved is the guests' alone.

use workloads::ksm::PAGE_BYTES;

use super::sysfs::KsmCounters;

/// One sample, `t` seconds after KSM was started: how many pages are merged (the
/// guests' own count where the kernel gives it, else KSM's pages_sharing) and KSM's
/// count of full scans.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tick {
    pub t: f64,
    pub merged: u64,
    pub full_scans: u64,
}

/// Full scans KSM must have finished before the sharing may count as final: one that
/// records checksums, one that merges, and one to see nothing more merges.
pub const MIN_FULL_SCANS: u64 = 3;

/// Whether the sharing has settled at the last tick: at least [`MIN_FULL_SCANS`] full scans
/// since KSM started, and the merged count unchanged over the shortest stretch of ticks in
/// which at least two full scans completed (so one whole scan lies inside it and merged
/// nothing).
pub fn converged(ticks: &[Tick], full_scans_at_start: u64) -> bool {
    let Some(last) = ticks.last() else {
        return false;
    };
    if last.full_scans < full_scans_at_start.saturating_add(MIN_FULL_SCANS) {
        return false;
    }
    let n = ticks.len();
    // The latest earlier tick with at least two scans completed since it.
    let Some(from) = (0..n - 1)
        .rev()
        .find(|&j| last.full_scans >= ticks[j].full_scans + 2)
    else {
        return false;
    };
    ticks[from..].iter().all(|t| t.merged == last.merged)
}

/// Seconds until the merged count first reached `fraction` of its final gain over
/// `baseline` (the first tick at or above it; resolution one sampling interval). `None`
/// when nothing was gained.
pub fn time_to_fraction(ticks: &[Tick], baseline: u64, fraction: f64) -> Option<f64> {
    let last = ticks.last()?;
    let gain = last.merged.checked_sub(baseline).filter(|g| *g > 0)? as f64;
    ticks
        .iter()
        .find(|t| t.merged.saturating_sub(baseline) as f64 >= fraction * gain)
        .map(|t| t.t)
}

/// KSM's own figure for the memory saved (pages_sharing's gain x 4 KiB), in MiB.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SavedByKsm {
    /// Every mapping KSM merged or unmerged meanwhile was the guests'.
    Guests(f64),
    /// The kernel gives no per-process count, so this may include other processes.
    HostWide(f64),
    /// Other processes' merged mappings changed meanwhile (by `others` pages).
    NotTheGuestsAlone { others: i128, sharing_gain: i128 },
}

/// Compares the host-wide merged mappings (pages_shared + pages_sharing, which count every
/// page mapping KSM merged) with the guests' own count (`vmm_*`: their VMMs' summed
/// ksm_merging_pages) over the same span.
pub fn saved_by_pages_sharing(
    before: &KsmCounters,
    after: &KsmCounters,
    vmm_before: Option<u64>,
    vmm_after: Option<u64>,
) -> SavedByKsm {
    // Differences of kernel counters, in i128: no u64 value can overflow or wrap there.
    let mappings = |c: &KsmCounters| i128::from(c.pages_shared) + i128::from(c.pages_sharing);
    let sharing_gain = i128::from(after.pages_sharing) - i128::from(before.pages_sharing);
    let mib = (sharing_gain * i128::from(PAGE_BYTES)) as f64 / f64::from(1u32 << 20);
    match (vmm_before, vmm_after) {
        (Some(b), Some(a)) => {
            let others = (mappings(after) - mappings(before)) - (i128::from(a) - i128::from(b));
            if others == 0 {
                SavedByKsm::Guests(mib)
            } else {
                SavedByKsm::NotTheGuestsAlone {
                    others,
                    sharing_gain,
                }
            }
        }
        _ => SavedByKsm::HostWide(mib),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticks(rows: &[(f64, u64, u64)]) -> Vec<Tick> {
        rows.iter()
            .map(|&(t, merged, full_scans)| Tick {
                t,
                merged,
                full_scans,
            })
            .collect()
    }

    #[test]
    fn settles_only_after_a_whole_scan_without_change() {
        // Slow scans (one per ~3 s): checksums, merging during scan 2, then quiet.
        let rows = [
            (0.0, 0, 10),
            (1.0, 0, 10),
            (3.0, 0, 11),
            (4.0, 500, 11),
            (5.0, 900, 11),
            (6.0, 1000, 12),
            (7.0, 1000, 12),
            (9.0, 1000, 13),
            (10.0, 1000, 13),
            (12.0, 1000, 14),
        ];
        let all = ticks(&rows);
        let first_settled = (1..=all.len()).find(|&k| converged(&all[..k], 10)).unwrap();
        // At 12 s: scans 13 and 14 completed since 6 s, and nothing changed since.
        assert_eq!(all[first_settled - 1].t, 12.0);
        // Not before three scans, however flat the curve.
        assert!(!converged(&ticks(&[(0.0, 0, 10), (1.0, 0, 12)]), 10));
        assert!(converged(&ticks(&[(0.0, 0, 10), (1.0, 0, 13)]), 10));
        assert!(!converged(&[], 0));
    }

    #[test]
    fn a_change_inside_the_window_defers_it() {
        let rows = [(0.0, 0, 0), (1.0, 10, 3), (2.0, 20, 4), (3.0, 20, 5)];
        // 2 s -> 3 s holds one scan completion only; 1 s -> 3 s holds two but a change.
        assert!(!converged(&ticks(&rows), 0));
        let rows = [(0.0, 0, 0), (1.0, 10, 3), (2.0, 20, 4), (3.0, 20, 6)];
        assert!(converged(&ticks(&rows), 0));
        // Fast scans: two completions between two ticks with the same sharing suffice.
        let rows = [(0.0, 0, 0), (1.0, 20, 4), (2.0, 20, 7)];
        assert!(converged(&ticks(&rows), 0));
    }

    #[test]
    fn time_to_ninety_percent() {
        let t = ticks(&[
            (0.0, 100, 0),
            (1.0, 100, 1),
            (2.0, 400, 2),
            (3.0, 1000, 2),
            (4.0, 1090, 3),
            (5.0, 1100, 4),
        ]);
        // Gain 1000 over the baseline of 100: 90% is 900 gained, first seen at 3 s.
        assert_eq!(time_to_fraction(&t, 100, 0.9), Some(3.0));
        assert_eq!(time_to_fraction(&t, 100, 0.3), Some(2.0));
        assert_eq!(time_to_fraction(&t, 100, 1.0), Some(5.0));
        // Nothing gained: undefined.
        assert_eq!(time_to_fraction(&t, 1100, 0.9), None);
        assert_eq!(time_to_fraction(&t, 5000, 0.9), None);
        assert_eq!(time_to_fraction(&[], 0, 0.9), None);
    }

    #[test]
    fn saved_by_ksm_counts_only_when_the_guests_alone_merged() {
        let counters = |shared, sharing| KsmCounters {
            pages_shared: shared,
            pages_sharing: sharing,
            ..Default::default()
        };
        let (before, after) = (counters(10, 30), counters(1010, 3030));
        // Four guests, 1000 identical pages each: 4000 mappings merged, 3000 saved.
        assert_eq!(
            saved_by_pages_sharing(&before, &after, Some(0), Some(4000)),
            SavedByKsm::Guests(3000.0 * 4096.0 / 1048576.0)
        );
        assert_eq!(
            saved_by_pages_sharing(&before, &after, Some(0), Some(3990)),
            SavedByKsm::NotTheGuestsAlone {
                others: 10,
                sharing_gain: 3000
            }
        );
        assert_eq!(
            saved_by_pages_sharing(&after, &before, None, Some(0)),
            SavedByKsm::HostWide(-3000.0 * 4096.0 / 1048576.0)
        );
    }
}
