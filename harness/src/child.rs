//! Child processes that must not outlive hvbench.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the child `command` starts die (SIGKILL) with the thread that starts it; a child
/// whose parent is already no longer hvbench when this takes effect refuses to start.
pub(crate) fn die_with_this_thread(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe, and the closure allocates nothing
    // before it returns Ok.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid().cast_unsigned() != parent {
                return Err(std::io::Error::other("hvbench exited"));
            }
            Ok(())
        });
    }
}
