//! What a killed run left on the dom0: its directory (found by the shared sweep,
//! `backend::stale`), and the domains whose configs it holds.

use hostutil::transport::{shell_quote, Transport, TransportError};

use crate::backend::stale::SWEEP_TIMEOUT;
pub use crate::backend::stale::{plain_path, write_owner_file, Owner, DEFAULT_BASE, OWNER_FILE};

/// Removes the run directories on the dom0 of owners that are gone, destroying their
/// domains; returns one sentence per directory removed.
pub fn sweep(transport: &Transport) -> Result<Vec<String>, TransportError> {
    crate::backend::stale::sweep(transport, &format!("{DEFAULT_BASE}/hvbench.*"), &remove)
}

/// Destroys the domains of `dir`'s configs, detaches the loop device its disk was on
/// (the block hotplug script notes it in `<disk>.loop`; destroying the domain normally
/// detached it already), and removes it; says what went.
fn remove(transport: &Transport, dir: &str, owner: &Owner) -> Result<String, TransportError> {
    let dir_word = shell_quote(dir);
    let out = transport.run(
        &format!(
            // A run killed during `mig.*` on Xen may leave its domain under the names
            // `xl migrate` gives it.
            "for c in {dir_word}/*.cfg; do [ -f \"$c\" ] || continue; n=$(basename \"$c\" .cfg); \
             for d in \"$n\" \"$n--incoming\" \"$n--migratedaway\"; do \
             xl destroy \"$d\" >/dev/null 2>&1 && printf '%s\\n' \"$d\"; done; done; \
             for l in {dir_word}/*.loop; do [ -f \"$l\" ] && losetup -d \"$(cat \"$l\")\" 2>/dev/null; done; \
             rm -rf -- {dir_word}"
        ),
        None,
        SWEEP_TIMEOUT,
    )?;
    let destroyed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| crate::console::escape_text(l.trim()))
        .filter(|l| !l.is_empty())
        .take(64)
        .collect();
    Ok(format!(
        "removed {dir}, left on the Xen host by hvbench process {} (killed before it could \
         clean up){}",
        owner.pid(),
        if destroyed.is_empty() {
            String::new()
        } else {
            format!(", and destroyed its domains {}", destroyed.join(", "))
        }
    ))
}
