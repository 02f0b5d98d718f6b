//! What `xl -vvv migrate -s "" DOM "xl migrate-receive -e"` prints on stderr (sender and
//! receiver share it), read line by line as it arrives and stamped by hvbench.
//!
//! xl prints no times of its own finer than a second (`xl -T` prefixes whole seconds), so
//! its figures are the moments its milestone lines reached hvbench: the sender's and
//! receiver's fixed sentences (tools/xl/xl_migrate.c) and, at `-vvv`, libxl's debug lines
//! about the suspend (tools/libs/light/libxl_dom_suspend.c). A milestone counts only
//! when its line is exactly xl's sentence (or, for libxl's, a `libxl: debug:` line of
//! libxl_dom_suspend.c ending in it): text that merely contains one is not one. xl's
//! progress output (`\r`-separated) splits into lines like any other.

use serde_json::{json, Map, Value};

use crate::console::escape_text;

/// Lines looked at; xl at `-vvv` prints a few hundred for one migration.
const MAX_LINES: usize = 20_000;
/// Characters kept of a line (xl's longest sentence is under 100).
const MAX_LINE: usize = 400;
/// Error lines kept for the record.
const MAX_ERRORS: usize = 8;
/// Other lines kept, the last ones.
const TAIL: usize = 4;

/// The steps of a migration that xl's output shows, in their order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Milestone {
    /// libxl wrote `suspend` to the guest's `control/shutdown`.
    SuspendRequested,
    /// The guest changed the value (its acknowledgement).
    GuestAcked,
    /// Xen reports the domain shut down for suspend: the guest stopped running.
    GuestSuspended,
    /// The receiver has read the whole stream (memory, vCPU, params) and built the domain.
    TransferComplete,
    /// The sender heard so.
    TargetAcked,
    /// The sender renamed its domain away and says "go".
    PermissionToStart,
    /// The receiver unpauses its domain.
    TargetStarting,
    /// The receiver's domain runs.
    TargetStarted,
    /// The sender heard so (it destroys its copy next).
    SenderConfirmed,
    Successful,
}

use Milestone as M;

impl Milestone {
    pub const ALL: [Milestone; 10] = [
        M::SuspendRequested,
        M::GuestAcked,
        M::GuestSuspended,
        M::TransferComplete,
        M::TargetAcked,
        M::PermissionToStart,
        M::TargetStarting,
        M::TargetStarted,
        M::SenderConfirmed,
        M::Successful,
    ];

    /// Its key in the record.
    pub fn key(self) -> &'static str {
        match self {
            M::SuspendRequested => "suspend_requested",
            M::GuestAcked => "guest_acked",
            M::GuestSuspended => "guest_suspended",
            M::TransferComplete => "transfer_complete",
            M::TargetAcked => "target_acked",
            M::PermissionToStart => "permission_to_start",
            M::TargetStarting => "target_starting",
            M::TargetStarted => "target_started",
            M::SenderConfirmed => "sender_confirmed",
            M::Successful => "successful",
        }
    }

    /// Whether `line` (trimmed) is this milestone's line.
    fn matches(self, line: &str) -> bool {
        let sentence = |s: &str| line == s;
        // `libxl: debug: libxl_dom_suspend.c:NNN:function: Domain N:TEXT`.
        let libxl = |text: &str| {
            line.starts_with("libxl: debug: libxl_dom_suspend.c:") && line.ends_with(text)
        };
        match self {
            M::SuspendRequested => libxl("suspend request via XenBus control node"),
            M::GuestAcked => libxl(":guest acknowledged suspend request"),
            M::GuestSuspended => libxl(":guest has suspended"),
            M::TransferComplete => sentence(
                "migration target: Transfer complete, requesting permission to start domain.",
            ),
            M::TargetAcked => sentence("migration sender: Target has acknowledged transfer."),
            M::PermissionToStart => {
                sentence("migration sender: Giving target permission to start.")
            }
            M::TargetStarting => sentence("migration target: Got permission, starting domain."),
            // xl 4.17 spells it "successsfully"; a later xl may not.
            M::TargetStarted => {
                sentence("migration target: Domain started successsfully.")
                    || sentence("migration target: Domain started successfully.")
            }
            M::SenderConfirmed => sentence("migration sender: Target reports successful startup."),
            M::Successful => sentence("Migration successful."),
        }
    }
}

/// Whether a line says something went wrong (kept as the cause of a failure).
fn is_error(line: &str) -> bool {
    line.starts_with("libxl: error:")
        || line.starts_with("xc: error:")
        || line.starts_with("Migration failed")
        || line.starts_with("** Migration failed")
        || line.contains("libxl_domain_suspend failed")
        || line.starts_with("migration target: Domain creation failed")
        || line.starts_with("migration target: Failure")
        || line.starts_with("migration sender: Target reports startup failure")
        || line.starts_with("migration sender: Trying to resume")
        || line.starts_with("migration sender: Resumed OK")
        || line.starts_with("xl: ")
}

/// xl's output as read so far.
#[derive(Debug, Default)]
pub struct XlLog {
    /// When each milestone's line arrived (CLOCK_REALTIME ns); the first of each only.
    seen: Vec<(Milestone, u64)>,
    errors: Vec<String>,
    /// The last lines that were neither (the cause when xl printed no error line).
    tail: std::collections::VecDeque<String>,
    lines: usize,
    /// Lines not looked at (past [`MAX_LINES`]).
    dropped: usize,
}

impl XlLog {
    /// Takes one chunk of xl's stderr that arrived at `at_ns` (one line or several;
    /// `\r` ends a line as `\n` does).
    pub fn take(&mut self, at_ns: u64, text: &str) {
        for raw in text.split(['\n', '\r']) {
            self.line(at_ns, raw);
        }
    }

    fn line(&mut self, at_ns: u64, raw: &str) {
        let head: String = raw.chars().take(MAX_LINE).collect();
        let clean = escape_text(&head);
        let line = clean.trim();
        if line.is_empty() {
            return;
        }
        if self.lines >= MAX_LINES {
            self.dropped += 1;
            return;
        }
        self.lines += 1;
        if let Some(m) = Milestone::ALL.into_iter().find(|m| m.matches(line)) {
            if self.at(m).is_none() {
                self.seen.push((m, at_ns));
            }
        } else if is_error(line) {
            if self.errors.len() < MAX_ERRORS {
                self.errors.push(line.to_string());
            }
        } else {
            if self.tail.len() == TAIL {
                self.tail.pop_front();
            }
            self.tail.push_back(line.to_string());
        }
    }

    /// When `m`'s line arrived.
    pub fn at(&self, m: Milestone) -> Option<u64> {
        self.seen.iter().find(|(s, _)| *s == m).map(|(_, at)| *at)
    }

    /// xl's error lines, joined (empty when it printed none).
    pub fn cause(&self) -> String {
        self.errors.join(" | ")
    }

    /// The last lines that were neither milestones nor errors, joined (what a session
    /// that failed before xl ran printed, e.g. ssh's complaint).
    pub fn tail(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// Whether xl said it migrated the domain, and the target runs it.
    pub fn succeeded(&self) -> bool {
        self.at(M::Successful).is_some() && self.at(M::TargetStarted).is_some()
    }

    /// Milliseconds between two milestones' lines, if both came in order.
    pub fn between(&self, from: Milestone, to: Milestone) -> Option<f64> {
        let (a, b) = (self.at(from)?, self.at(to)?);
        (b >= a).then(|| (b - a) as f64 / 1e6)
    }

    /// The record's `xl` object: each milestone's arrival in ms after `started_ns`, the
    /// error lines, and how many lines there were.
    pub fn to_json(&self, started_ns: u64) -> Value {
        let mut at = Map::new();
        for (m, ns) in &self.seen {
            at.insert(
                m.key().into(),
                json!(ns.saturating_sub(started_ns) as f64 / 1e6),
            );
        }
        json!({
            "milestones_ms": at,
            "errors": self.errors,
            "lines": self.lines,
            "lines_dropped": self.dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// What xl 4.17.7 printed for a successful localhost migration of a PVH domain
    /// (shape of the lab's output; the debug lines shortened to the ones that count).
    const SUCCESS: &[&str] = &[
        "migration target: Ready to receive domain.",
        "Saving to migration stream new xl format (info 0x3/0x0/1361)",
        "libxl: debug: libxl_dom_suspend.c:203:domain_suspend_callback_common: Domain 7:issuing PVH/HVM suspend request via XenBus control node",
        "libxl: debug: libxl_dom_suspend.c:281:domain_suspend_common_pvcontrol_suspending: Domain 7:guest acknowledged suspend request",
        "libxl: debug: libxl_dom_suspend.c:300:domain_suspend_common_wait_guest: Domain 7:wait for the guest to suspend",
        "libxl: debug: libxl_dom_suspend.c:358:suspend_common_wait_guest_check: Domain 7:guest has suspended",
        "migration target: Transfer complete, requesting permission to start domain.",
        "migration sender: Target has acknowledged transfer.",
        "migration sender: Giving target permission to start.",
        "migration target: Got permission, starting domain.",
        "migration target: Domain started successsfully.",
        "migration sender: Target reports successful startup.",
        "Migration successful.",
    ];

    fn log(lines: &[&str]) -> XlLog {
        let mut log = XlLog::default();
        for (i, line) in lines.iter().enumerate() {
            log.take(i as u64 * 10 * MS, &format!("{line}\n"));
        }
        log
    }

    #[test]
    fn a_successful_migration_has_every_milestone_in_order() {
        let log = log(SUCCESS);
        assert!(log.succeeded());
        assert_eq!(log.cause(), "");
        let times: Vec<u64> = Milestone::ALL
            .iter()
            .map(|m| log.at(*m).unwrap_or_else(|| panic!("{m:?} missing")))
            .collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
        assert_eq!(log.between(M::GuestSuspended, M::TargetStarted), Some(50.0));
        assert_eq!(log.between(M::TargetStarted, M::GuestSuspended), None);
        let json = log.to_json(5 * MS);
        assert_eq!(json["milestones_ms"]["guest_acked"], json!(25.0));
        assert_eq!(json["lines"], json!(SUCCESS.len()));
    }

    #[test]
    fn a_refused_suspend_is_a_failure_with_xls_cause() {
        // The lab's answer before the guest answered suspend requests.
        let log = log(&[
            "migration target: Ready to receive domain.",
            "libxl: error: libxl_dom_suspend.c:269:domain_suspend_common_pvcontrol_suspending: Domain 3:guest didn't acknowledge suspend, cancelling request",
            "xc: error: save callback suspend() failed: 0: Internal error",
            "migration sender: libxl_domain_suspend failed (rc=-3)",
            "Migration failed, resuming at sender.",
        ]);
        assert!(!log.succeeded());
        let cause = log.cause();
        assert!(
            cause.contains("guest didn't acknowledge suspend"),
            "{cause}"
        );
        assert!(cause.contains("rc=-3"), "{cause}");
        assert!(
            cause.ends_with("Migration failed, resuming at sender."),
            "{cause}"
        );
    }

    #[test]
    fn odd_and_hostile_lines_are_no_milestones() {
        let long = "x".repeat(100_000);
        let log = log(&[
            // A sentence inside other text, or with more after it.
            "note: Migration successful.",
            "Migration successful. (not really)",
            "guest has suspended",
            "libxl: debug: libxl_create.c:1:f: Domain 7:guest has suspended",
            "migration target: Domain started successsfully.\u{1b}[2J",
            &long,
            "\u{0}\u{7}\u{9b}",
        ]);
        assert!(!log.succeeded());
        for m in Milestone::ALL {
            assert_eq!(log.at(m), None, "{m:?}");
        }
        assert_eq!(log.cause(), "");
        assert_eq!(log.lines, 7);
    }

    #[test]
    fn progress_output_lines_split_and_only_the_first_of_a_milestone_counts() {
        let mut log = XlLog::default();
        log.take(
            MS,
            "Memory 10%\rMemory 100%\rMigration successful.\r\nmigration target: Domain started successsfully.\n",
        );
        log.take(9 * MS, "Migration successful.\n");
        assert!(log.succeeded());
        assert_eq!(log.at(M::Successful), Some(MS));
        assert_eq!(log.lines, 5);
    }

    #[test]
    fn a_flood_is_bounded_and_errors_are_capped() {
        let mut log = XlLog::default();
        for i in 0..(MAX_LINES + 50) {
            log.take(i as u64, "libxl: error: again\n");
        }
        assert_eq!(log.lines, MAX_LINES);
        assert_eq!(log.dropped, 50);
        assert_eq!(log.errors.len(), MAX_ERRORS);
        log.take(0, "Migration successful.\n");
        assert_eq!(
            log.at(M::Successful),
            None,
            "past the bound nothing is read"
        );
    }
}
