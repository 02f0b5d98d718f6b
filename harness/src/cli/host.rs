//! `hvbench host`: the fingerprint, and `host paging` (KVM's paging mode switch).

use anyhow::Result;
use clap::{Args, Subcommand};
use hvbench::{host, interrupt};

#[derive(Debug, Subcommand)]
pub enum HostAction {
    /// KVM's paging mode: print it, or run one command with EPT/NPT (`tdp`) or shadow
    /// paging by reloading kvm_intel (ept=) or kvm_amd (npt=), restoring it afterwards.
    /// Refused on kvm_pvm and while any VM runs; needs root.
    Paging(PagingArgs),
    /// Whether libvirt answers at URI, its and its hypervisor's versions, the domain types
    /// it offers and the drivers installed here.
    Libvirt {
        /// The connection to probe.
        #[arg(long, default_value = hvbench::backend::libvirt::DEFAULT_URI)]
        uri: String,
    },
}

#[derive(Debug, Args)]
pub struct PagingArgs {
    /// The mode to run COMMAND with; without it, print the current mode.
    #[arg(value_enum, requires = "command")]
    pub mode: Option<hvbench::host_paging::PagingMode>,
    /// Undo a switch whose `hvbench host paging` was killed before it could.
    #[arg(long, conflicts_with_all = ["mode", "command"])]
    pub restore: bool,
    /// The command to run under MODE, after `--`.
    #[arg(last = true, requires = "mode")]
    pub command: Vec<String>,
}

/// `hvbench host [--json]` and `hvbench host paging ...`.
pub fn host(json: bool, action: Option<&HostAction>) -> Result<i32> {
    match action {
        Some(HostAction::Paging(args)) => return host_paging(args),
        Some(HostAction::Libvirt { uri }) => {
            let reach = hvbench::backend::libvirt::probe(uri);
            hvbench::tell_line!("{}", describe_libvirt(&reach));
            return Ok(if reach.versions.is_ok() { 0 } else { 1 });
        }
        None => {}
    }
    let host = host::fingerprint();
    if json {
        hvbench::tell_line!("{}", serde_json::to_string_pretty(&host)?);
    } else {
        hvbench::tell!("{}", host::describe(&host));
        let reach = hvbench::backend::libvirt::probe(hvbench::backend::libvirt::DEFAULT_URI);
        hvbench::tell_line!("{}", describe_libvirt(&reach));
    }
    Ok(0)
}

/// One line on libvirt: reachable or why not, versions, domain types, drivers here.
fn describe_libvirt(reach: &hvbench::backend::libvirt::Reachability) -> String {
    let drivers = if reach.installed_drivers.is_empty() {
        "none".to_string()
    } else {
        reach.installed_drivers.join(", ")
    };
    match &reach.versions {
        Ok(v) => {
            format!(
            "libvirt: {} reachable ({}{}; hypervisor {}; domain types {}); drivers installed: {}",
            reach.uri,
            v.library,
            v.daemon
                .as_deref()
                .map(|d| format!(", daemon {d}"))
                .unwrap_or_default(),
            if v.hypervisor.is_empty() { "?" } else { &v.hypervisor },
            if reach.domain_types.is_empty() {
                "?".to_string()
            } else {
                reach.domain_types.join(", ")
            },
            drivers
        )
        }
        Err(e) => format!(
            "libvirt: {} not reachable ({}); drivers installed: {drivers}",
            reach.uri,
            hvbench::console::escape_text(e.lines().next().unwrap_or(""))
        ),
    }
}

/// `hvbench host paging ...`; returns the command's exit status under a switch.
pub fn host_paging(args: &PagingArgs) -> Result<i32> {
    use hvbench::host_paging::{self as paging, HostPaths, SystemModules};
    let paths = HostPaths::system();
    // Never a panic on a closed stderr (an ssh session gone): the restore must still run.
    let progress = |message: &str| {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "hvbench host paging: {message}");
    };
    let mut control = SystemModules;
    if args.restore {
        match paging::restore_stale(&paths, &mut control, &progress)? {
            Some(_) => {}
            None => hvbench::say!("hvbench host paging: no switch to undo"),
        }
        hvbench::tell_line!("{}", paging::read_kvm_paging(&paths).describe());
        return Ok(0);
    }
    let Some(mode) = args.mode else {
        hvbench::tell_line!("{}", paging::read_kvm_paging(&paths).describe());
        if let Some(state) = paging::read_state(&paths.state_file())? {
            hvbench::tell_line!(
                "switched by pid {} to {}={} for `{}`; `hvbench host paging --restore` undoes \
                 it if that process is gone",
                state.pid,
                state.parameter,
                u8::from(state.requested),
                state.command.join(" ")
            );
        }
        return Ok(0);
    };
    let cancel = interrupt::install();
    Ok(paging::run_with_paging(
        &paths,
        &mut control,
        mode,
        &args.command,
        cancel,
        &progress,
    )?)
}
