//! Waiting for a run in the KVM lab without polling it, for a lab that counts instructions.
//!
//! The KVM lab's Linux runs on one CPU when it counts (`maxcpus=1`), the CPU the plugin
//! counts, so whatever it does while a sample runs is in that sample's count. `lab run`
//! polls a run over a new ssh connection every second (key exchange, a shell, `cat`, `wc`,
//! `tail`), paced by host time, and each cost the lab about 4 million instructions: a
//! `mem.first-touch` sample (1024 pages, about 11 million instructions) took none, one,
//! two or three of them, and its count sat 0, 4.0, 8.0 or 12.0 million instructions
//! above the floor (the levels of issue 13; gone without the polls). While counting, `lab run`
//! therefore starts the run and waits in the same ssh session, in the lab's shell with
//! builtins only (`[`, `read -t` on a FIFO; no process started), until the run has a
//! status or a bound passes; then it polls once, and waits again.

use std::time::Duration;

/// The FIFO in the run's directory that the run's script writes to once it has a status.
pub(crate) const DONE_FIFO: &str = "done.fifo";
/// Seconds one builtin `read -t` waits before the status file is looked at again (the
/// wake-up on the FIFO can be missed when the run ends just before the read opens it).
const STEP_S: u64 = 5;

/// How long one quiet wait may last: half the silence limit, 10 to 300 s, so a stalled
/// lab is still noticed by the polls in between.
pub(crate) fn wait_bound(silence_limit: Duration) -> Duration {
    (silence_limit / 2).clamp(Duration::from_secs(10), Duration::from_secs(300))
}

/// The shell command that waits, in `remote_run`, until the run has a status or `bound`
/// has passed (in steps of `step_s` seconds). Builtins only: it starts no process.
pub(crate) fn wait_command(remote_run: &str, bound: Duration, step_s: u64) -> String {
    let step_s = step_s.max(1);
    let steps = bound.as_secs().div_ceil(step_s).max(1);
    format!(
        "cd {remote_run} 2>/dev/null || exit 0; i=0; \
         while [ ! -e status ] && [ $i -lt {steps} ]; do \
         read -t {step_s} x <> {DONE_FIFO}; i=$((i + 1)); done; true"
    )
}

/// [`wait_command`] with the lab's step.
pub(crate) fn lab_wait_command(remote_run: &str, bound: Duration) -> String {
    wait_command(remote_run, bound, STEP_S)
}

/// Appended to the run's script after its status is written: wakes a waiting
/// [`wait_command`] (opened read-write, the FIFO never blocks the script).
pub(crate) fn wake_command() -> String {
    format!("echo done 1<> {DONE_FIFO}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Instant;

    /// Runs `wait_command` with bash (the host's /bin/sh may lack `read -t`; the lab's is
    /// busybox ash, which has it) in a directory with the FIFO.
    fn start_wait(dir: &std::path::Path, bound_s: u64, step_s: u64) -> std::process::Child {
        let fifo = dir.join(DONE_FIFO);
        assert!(Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let command = wait_command(
            &dir.display().to_string(),
            Duration::from_secs(bound_s),
            step_s,
        );
        Command::new("bash").arg("-c").arg(command).spawn().unwrap()
    }

    #[test]
    fn a_wait_ends_when_the_run_has_a_status_and_wakes_it() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        // A 30 s step: only the wake can end it within 5 s.
        let mut waiting = start_wait(dir.path(), 60, 30);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            waiting.try_wait().unwrap().is_none(),
            "ended with no status"
        );
        std::fs::write(dir.path().join("status"), "0\n").unwrap();
        let wake = format!("cd {} && {}", dir.path().display(), wake_command());
        assert!(Command::new("bash")
            .arg("-c")
            .arg(wake)
            .status()
            .unwrap()
            .success());
        assert!(waiting.wait().unwrap().success());
        assert!(started.elapsed() < Duration::from_secs(5), "{started:?}");
    }

    #[test]
    fn a_wait_without_a_status_ends_at_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let mut waiting = start_wait(dir.path(), 2, 1);
        assert!(waiting.wait().unwrap().success());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(10),
            "{took:?}"
        );
    }

    #[test]
    fn the_bound_follows_the_silence_limit() {
        assert_eq!(
            wait_bound(Duration::from_secs(180)),
            Duration::from_secs(90)
        );
        assert_eq!(wait_bound(Duration::from_secs(4)), Duration::from_secs(10));
        assert_eq!(
            wait_bound(Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
    }
}
