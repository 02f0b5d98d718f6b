//! What the `sched.*` runners ask of a Xen host: `xl` commands on its dom0 (scheduler
//! parameters, cpupools, vCPU accounting). The runners own what those commands create
//! and remove it on every path (`run::sched::xen`).

use std::time::Duration;

use hostutil::transport::TransportError;

use super::XenBackend;

/// Limit for one sched command on the dom0 (the TCG lab is slow).
const SCHED_TIMEOUT: Duration = Duration::from_secs(60);

/// A Xen host's toolstack as the `sched.*` runners use it.
pub trait XlHost {
    /// Runs the shell command line `command` (xl and coreutils) on the dom0; its standard
    /// output, or a sentence with its exit status and standard error.
    fn xl(&self, command: &str) -> Result<String, String>;
    /// Domains booted from now on are created in cpupool `pool` (`None`: Pool-0).
    fn set_pool(&self, pool: Option<&str>);
}

/// Tries of one command when ssh itself fails (the TCG lab's dom0 now and then drops a
/// login while its CPUs are busy), and the pause between them.
const TRIES: u32 = 3;
const RETRY_PAUSE: Duration = Duration::from_secs(1);

impl XlHost for XenBackend {
    fn xl(&self, command: &str) -> Result<String, String> {
        let mut tries = 0;
        let out = loop {
            tries += 1;
            match self.transport().run(command, None, SCHED_TIMEOUT) {
                Ok(out) => break out,
                Err(TransportError::Unreachable { .. }) if tries < TRIES => {
                    std::thread::sleep(RETRY_PAUSE)
                }
                Err(e) => return Err(format!("`{command}` on the dom0: {e}")),
            }
        };
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(format!(
                "`{command}` on the dom0 failed ({}): {}",
                out.status,
                stderr.trim().chars().take(300).collect::<String>()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn set_pool(&self, pool: Option<&str>) {
        if let Ok(mut slot) = self.pool.lock() {
            *slot = pool.map(str::to_string);
        }
    }
}
