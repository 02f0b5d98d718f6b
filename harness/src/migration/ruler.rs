//! The downtime ruler, the same for every backend: the guest prints a heartbeat every
//! `interval` (guest-timed), the host stamps each as it arrives, and the downtime seen
//! from outside is the largest gap between consecutive heartbeats minus the interval.
//!
//! Resolution: a pause of D that begins at a random point of an interval shows as a gap
//! of D + (0..interval), so the reading lies in (D - interval, D]: the interval is the
//! resolution, and the record says so. A pause shorter than one interval may not show.

use std::time::Duration;

/// One heartbeat as the host received it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// When it arrived (CLOCK_REALTIME, ns), so that events timed by other processes on
    /// this host can be placed among the beats.
    pub at_ns: u64,
    /// Intervals since the guest's loop began.
    pub seq: u64,
    /// Pages the guest wrote since its previous heartbeat.
    pub pages: u64,
}

/// The largest gap within a span of heartbeats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gap {
    /// Between the arrival of these two beats.
    pub from_ns: u64,
    pub to_ns: u64,
    /// The gap minus the interval (zero when the gap is shorter).
    pub downtime: Duration,
    pub resolution: Duration,
}

impl Gap {
    pub fn gap(&self) -> Duration {
        Duration::from_nanos(self.to_ns.saturating_sub(self.from_ns))
    }
}

/// The largest gap between consecutive beats that arrived in `[from_ns, to_ns]` (the
/// beat before `from_ns` included, so a pause that begins at `from_ns` is seen).
pub fn largest_gap(beats: &[Beat], interval: Duration, from_ns: u64, to_ns: u64) -> Option<Gap> {
    let first = beats.iter().rposition(|b| b.at_ns <= from_ns).unwrap_or(0);
    beats[first..]
        .windows(2)
        .filter(|w| w[1].at_ns <= to_ns)
        .max_by_key(|w| w[1].at_ns.saturating_sub(w[0].at_ns))
        .map(|w| {
            let gap = Duration::from_nanos(w[1].at_ns.saturating_sub(w[0].at_ns));
            Gap {
                from_ns: w[0].at_ns,
                to_ns: w[1].at_ns,
                downtime: gap.saturating_sub(interval),
                resolution: interval,
            }
        })
}

/// Pages per millisecond the guest wrote over the beats that arrived in `(from_ns,
/// to_ns]` (each beat counts the pages since the one before it); `None` without two
/// beats or time between them.
pub fn pages_per_ms(beats: &[Beat], from_ns: u64, to_ns: u64) -> Option<f64> {
    let inside: Vec<&Beat> = beats
        .iter()
        .filter(|b| b.at_ns > from_ns && b.at_ns <= to_ns)
        .collect();
    let (first, last) = (inside.first()?, inside.last()?);
    let span_ms = last.at_ns.saturating_sub(first.at_ns) as f64 / 1e6;
    let pages: u64 = inside.iter().skip(1).map(|b| b.pages).sum();
    (span_ms > 0.0).then(|| pages as f64 / span_ms)
}

/// How late heartbeats arrive in steady state: the 99th percentile of (gap - interval)
/// over the beats that arrived in `(from_ns, to_ns]` (the host's scheduling and console
/// path; on an idle host well under a millisecond, on a loaded one tens). `None` with
/// fewer than 10 gaps.
pub fn jitter(beats: &[Beat], interval: Duration, from_ns: u64, to_ns: u64) -> Option<Duration> {
    let mut late: Vec<u64> = beats
        .windows(2)
        .filter(|w| w[0].at_ns > from_ns && w[1].at_ns <= to_ns)
        .map(|w| w[1].at_ns.saturating_sub(w[0].at_ns))
        .map(|gap| gap.saturating_sub(u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX)))
        .collect();
    if late.len() < 10 {
        return None;
    }
    late.sort_unstable();
    let at = (late.len() * 99).div_ceil(100).saturating_sub(1);
    Some(Duration::from_nanos(late[at]))
}

/// The largest gap on the guest's own clock among consecutive beats that arrived in
/// `[from_ns, to_ns]` (the beat before `from_ns` included): the pair whose sequence
/// numbers lie furthest apart, and how many intervals that is. Unlike [`largest_gap`]
/// it does not see host-side lateness (a slow console path), only time the guest's
/// clock saw pass between two of its beats: a stop that its TSC kept counting through.
pub fn largest_guest_gap(beats: &[Beat], from_ns: u64, to_ns: u64) -> Option<(Beat, Beat, u64)> {
    let first = beats.iter().rposition(|b| b.at_ns <= from_ns).unwrap_or(0);
    beats[first..]
        .windows(2)
        .filter(|w| w[1].at_ns <= to_ns)
        .max_by_key(|w| w[1].seq.saturating_sub(w[0].seq))
        .map(|w| (w[0], w[1], w[1].seq.saturating_sub(w[0].seq)))
}

/// Whether the guest's sequence numbers only go up (a replayed or lost stretch of the
/// guest's life would show as a repeat).
pub fn monotonic(beats: &[Beat]) -> bool {
    beats.windows(2).all(|w| w[1].seq > w[0].seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Beats every 5 ms from 0, with a pause of `pause_ms` starting at `at_ms` (the beats
    /// due inside it come as one when it ends).
    fn beats(pause_at_ms: u64, pause_ms: u64) -> Vec<Beat> {
        let mut out = Vec::new();
        let mut seq_time = 0;
        while seq_time < 1000 {
            let due = seq_time;
            let at = if due >= pause_at_ms && due < pause_at_ms + pause_ms {
                pause_at_ms + pause_ms
            } else {
                due
            };
            if out.last().is_none_or(|b: &Beat| b.at_ns < at * MS) {
                out.push(Beat {
                    at_ns: at * MS,
                    seq: due / 5,
                    pages: 10,
                });
            }
            seq_time += 5;
        }
        out
    }

    #[test]
    fn a_pause_reads_as_itself_within_one_interval() {
        let interval = Duration::from_millis(5);
        for (at, pause) in [(301, 200), (300, 200), (304, 200), (500, 37)] {
            let b = beats(at, pause);
            let gap = largest_gap(&b, interval, 0, u64::MAX).unwrap();
            let d = Duration::from_millis(pause);
            assert!(
                gap.downtime <= d && gap.downtime + interval > d,
                "pause {pause} ms at {at}: read {:?}",
                gap.downtime
            );
            assert!(monotonic(&b));
        }
    }

    #[test]
    fn the_window_picks_the_gap_inside_it_and_rates_count_pages() {
        let b = beats(300, 100);
        assert_eq!(
            largest_gap(&b, Duration::from_millis(5), 500 * MS, 900 * MS)
                .unwrap()
                .downtime,
            Duration::ZERO
        );
        let rate = pages_per_ms(&b, 500 * MS, 900 * MS).unwrap();
        assert!((rate - 2.0).abs() < 0.01, "{rate}");
        assert_eq!(pages_per_ms(&b, 0, 0), None);
        assert!(largest_gap(&[], Duration::from_millis(5), 0, 1).is_none());
        let steady = jitter(&b, Duration::from_millis(5), 500 * MS, 900 * MS).unwrap();
        assert_eq!(steady, Duration::ZERO, "beats on time");
        assert_eq!(jitter(&b, Duration::from_millis(5), 0, 20 * MS), None);
        let replayed = [b[3], b[2]];
        assert!(!monotonic(&replayed));
    }

    #[test]
    fn the_guest_clock_sees_a_stop_and_not_a_late_console() {
        let beat = |at_ms: u64, seq: u64| Beat {
            at_ns: at_ms * MS,
            seq,
            pages: 0,
        };
        // Beats 10..=12 arrive 900 ms late together (console lag: no intervals missing),
        // then the guest stops for 300 ms (60 intervals of 5 ms skipped).
        let beats = [
            beat(45, 9),
            beat(950, 10),
            beat(950, 11),
            beat(950, 12),
            beat(955, 13),
            beat(1260, 73),
            beat(1265, 74),
        ];
        let (from, to, n) = largest_guest_gap(&beats, 0, u64::MAX).unwrap();
        assert_eq!((from.seq, to.seq, n), (13, 73, 60));
        // The arrival ruler picks the console lag instead.
        let gap = largest_gap(&beats, Duration::from_millis(5), 0, u64::MAX).unwrap();
        assert_eq!(gap.to_ns, 950 * MS);
        // Outside the window, nothing.
        assert!(largest_guest_gap(&beats, 0, 40 * MS).is_none());
    }
}
