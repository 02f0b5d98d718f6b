//! The arithmetic of `sched.steal` and `sched.fairness`, apart from the processes: the
//! guests' `tick` notes (parsed with bounds: the guest is untrusted), shares received
//! against shares entitled, Jain's index, and the agreement of two views of steal time.

/// Most CPUs one tick may name (the guest brings up at most 8).
pub const MAX_TICK_CPUS: usize = 8;

/// One guest report: its TSC, and per CPU (in order) the work counted and the steal (ns).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick {
    pub tsc: u64,
    pub cpus: Vec<(u64, u64)>,
}

/// Parses `t:<hex>;<cpu>:<work>:<steal>;...` (hexadecimal, CPUs 0.. in order).
pub fn parse_tick(text: &str) -> Result<Tick, String> {
    let mut parts = text.split(';');
    let tsc = parts
        .next()
        .and_then(|p| p.strip_prefix("t:"))
        .and_then(hex)
        .ok_or_else(|| format!("a tick without its TSC: {:.60}", text))?;
    let mut cpus = Vec::new();
    for (i, part) in parts.enumerate() {
        if i >= MAX_TICK_CPUS {
            return Err(format!("a tick naming more than {MAX_TICK_CPUS} CPUs"));
        }
        let fields: Vec<&str> = part.split(':').collect();
        let [cpu, work, steal] = fields[..] else {
            return Err(format!(
                "a tick entry that is not cpu:work:steal: {part:.60}"
            ));
        };
        if hex(cpu) != Some(i as u64) {
            return Err(format!("a tick whose CPUs are out of order: {part:.60}"));
        }
        let (Some(work), Some(steal)) = (hex(work), hex(steal)) else {
            return Err(format!("a tick entry with a bad number: {part:.60}"));
        };
        cpus.push((work, steal));
    }
    Ok(Tick { tsc, cpus })
}

fn hex(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 16 {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

/// Jain's fairness index of `x`: (sum x)^2 / (n * sum x^2); 1 when all are equal.
pub fn jain(x: &[f64]) -> Option<f64> {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    let index = sum * sum / (x.len() as f64 * squares);
    index.is_finite().then_some(index)
}

/// Each guest's share of `used`, relative to its entitlement (`weights` normalised):
/// 1.0 means exactly its share. `None` where nothing was used.
pub fn relative_shares(used: &[f64], weights: &[f64]) -> Option<Vec<f64>> {
    let total: f64 = used.iter().sum();
    let weight: f64 = weights.iter().sum();
    if total <= 0.0 || weight <= 0.0 || used.len() != weights.len() {
        return None;
    }
    Some(
        used.iter()
            .zip(weights)
            .map(|(u, w)| (u / total) / (w / weight))
            .collect(),
    )
}

/// The fairness figures of a run: CPU time per guest per window (rows: windows).
#[derive(Clone, Debug, PartialEq)]
pub struct Fairness {
    /// Largest |received/entitled - 1| over the whole run.
    pub share_error: f64,
    /// Jain's index of received/entitled over the whole run.
    pub jain: f64,
    /// Smallest received/entitled of any guest in any window.
    pub worst_window: f64,
    /// received/entitled of each guest over the whole run.
    pub relative: Vec<f64>,
}

pub fn fairness(windows: &[Vec<f64>], weights: &[f64]) -> Option<Fairness> {
    let guests = weights.len();
    let mut totals = vec![0.0; guests];
    let mut worst_window = f64::INFINITY;
    for window in windows {
        for (t, u) in totals.iter_mut().zip(window) {
            *t += u;
        }
        if let Some(rel) = relative_shares(window, weights) {
            worst_window = rel.iter().copied().fold(worst_window, f64::min);
        }
    }
    let relative = relative_shares(&totals, weights)?;
    let share_error = relative.iter().map(|r| (r - 1.0).abs()).fold(0.0, f64::max);
    Some(Fairness {
        share_error,
        jain: jain(&relative)?,
        worst_window: worst_window.is_finite().then_some(worst_window)?,
        relative,
    })
}

/// |guest/host - 1|: how far the guest's steal is from the host's run delay.
pub fn disagreement(guest: f64, host: f64) -> Option<f64> {
    let d = (guest / host - 1.0).abs();
    (host > 0.0 && d.is_finite()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_parse_and_hostile_ones_are_refused() {
        let t = parse_tick("t:ff;0:10:20;1:a:0").unwrap();
        assert_eq!(t.tsc, 255);
        assert_eq!(t.cpus, vec![(16, 32), (10, 0)]);
        assert_eq!(parse_tick("t:1").unwrap().cpus, vec![]);
        for bad in [
            "",
            "x:1",
            "t:1;1:0:0",
            "t:1;0:0",
            "t:1;0:g:0",
            "t:1;0:11111111111111111:0",
            "t:1;0:0:0:0",
        ] {
            parse_tick(bad).expect_err(bad);
        }
        let many: String = (0..9).map(|i| format!(";{i:x}:1:1")).collect();
        parse_tick(&format!("t:1{many}")).unwrap_err();
    }

    #[test]
    fn shares_meet_their_weights_or_say_by_how_much_not() {
        // Guests weighted 1:2 that got 1:2 in every window: exact.
        let windows = vec![vec![1.0, 2.0], vec![2.0, 4.0]];
        let f = fairness(&windows, &[1.0, 2.0]).unwrap();
        assert!(
            f.share_error < 1e-12 && (f.jain - 1.0).abs() < 1e-12,
            "{f:?}"
        );
        assert!((f.worst_window - 1.0).abs() < 1e-12);
        // Equal CPU time against weights 1:2: the light one got 1.5x its share, the heavy
        // one 0.75x; one window where the heavy one got nothing.
        let windows = vec![vec![1.0, 1.0], vec![1.0, 0.0]];
        let f = fairness(&windows, &[1.0, 2.0]).unwrap();
        let light = (2.0 / 3.0) / (1.0 / 3.0);
        assert!((f.relative[0] - light).abs() < 1e-12, "{f:?}");
        assert!((f.share_error - (light - 1.0)).abs() < 1e-12);
        assert_eq!(f.worst_window, 0.0);
        assert!(f.jain < 1.0);
        assert!(fairness(&[vec![0.0, 0.0]], &[1.0, 1.0]).is_none());
    }

    #[test]
    fn jain_and_disagreement() {
        assert_eq!(jain(&[1.0, 1.0, 1.0]), Some(1.0));
        assert_eq!(jain(&[1.0, 0.0]), Some(0.5));
        assert_eq!(jain(&[0.0, 0.0]), None);
        assert_eq!(
            disagreement(1.1, 1.0).map(|d| (d * 100.0).round()),
            Some(10.0)
        );
        assert_eq!(disagreement(1.0, 0.0), None);
    }
}
