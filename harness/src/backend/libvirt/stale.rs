//! What killed runs left with libvirt. Every domain names its owner (this machine's boot,
//! hvbench's pid and start time: `backend::stale::Owner`) in its `<metadata>`, so the next
//! run destroys the domains of owners that are gone, on this host or another one; a
//! domain without that metadata (made by hand from a record's XML) is judged here by the
//! pid in its name, and on another host left alone.

use std::path::Path;

use super::domain::escape;
use super::session;
use super::virsh::{Virsh, COMMAND_TIMEOUT};
use super::LibvirtError;
use crate::backend::stale::Owner;

/// The namespace of hvbench's element in a domain's `<metadata>`.
pub const OWNER_NS: &str = "http://hvbench.invalid/owner/1";
/// Longest `virsh metadata` answer read.
const MAX_METADATA: usize = 300;

/// The `<metadata>` element naming `owner` (an owner line), or nothing.
pub fn metadata_element(owner: Option<&str>) -> String {
    owner.map_or_else(String::new, |line| {
        format!(
            "  <metadata>\n    <hvbench:owner xmlns:hvbench='{OWNER_NS}'>{}</hvbench:owner>\n  \
             </metadata>\n",
            escape(line)
        )
    })
}

/// What `virsh metadata NAME --uri OWNER_NS` says, as an owner (`<owner>LINE</owner>`).
fn parse_metadata(text: &str) -> Option<Owner> {
    let text = text.get(..text.len().min(MAX_METADATA)).unwrap_or("");
    let inner = text
        .trim()
        .strip_prefix("<owner>")?
        .strip_suffix("</owner>")?;
    Owner::parse(inner)
}

/// `hvbench-<pid>-...` whose pid runs nowhere here.
fn name_pid_gone(name: &str) -> bool {
    name.strip_prefix("hvbench-")
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Whether the domain `name` belongs to a run that is gone.
fn left_behind(virsh: &Virsh, name: &str, here: Option<&Owner>, remote: bool) -> bool {
    let owner = virsh
        .text(&["metadata", name, "--uri", OWNER_NS], COMMAND_TIMEOUT)
        .ok()
        .and_then(|text| parse_metadata(&text));
    match (owner, here) {
        (Some(owner), Some(here)) => owner.gone(here),
        (Some(_), None) => false,
        (None, _) => !remote && name_pid_gone(name),
    }
}

/// Destroys (and undefines) the `hvbench-*` domains of runs that are gone; returns their
/// names, escaped.
pub fn sweep_domains(virsh: &Virsh, remote: bool) -> Result<Vec<String>, LibvirtError> {
    let here = Owner::current();
    let names = virsh.text(&["list", "--all", "--name"], COMMAND_TIMEOUT)?;
    let mut destroyed = Vec::new();
    for name in names.lines().map(str::trim) {
        if !name.starts_with("hvbench-") || !left_behind(virsh, name, here.as_ref(), remote) {
            continue;
        }
        session::destroy(virsh, name)?;
        // A persistent one (defined by hand from a record's XML) goes too.
        let _ = virsh.run(&["undefine", name], None, COMMAND_TIMEOUT);
        destroyed.push(crate::console::escape_text(name));
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_owner_element_with_a_strict_owner_line_is_read() {
        let me = Owner::current().unwrap();
        let element = metadata_element(Some(&me.line()));
        assert!(element.contains(OWNER_NS), "{element}");
        assert_eq!(
            parse_metadata(&format!("<owner>{}</owner>\n\n", me.line())),
            Some(me.clone())
        );
        for bad in [
            String::new(),
            me.line(),
            format!("<owner>{}</owner><x/>", me.line()),
            format!("<owner>{} 1</owner>", me.line()),
            format!("<owner>{}{}</owner>", me.line(), " ".repeat(400)),
        ] {
            assert_eq!(parse_metadata(&bad), None, "{bad:?}");
        }
        assert_eq!(metadata_element(None), "");
        assert!(!name_pid_gone(&format!("hvbench-{}-1", std::process::id())));
        assert!(!name_pid_gone("other-1"));
    }
}
