//! The guest as a libvirt domain: the same ELF on QEMU's q35 machine, started and stopped
//! by libvirt's QEMU driver, as users of virsh and virt-manager run KVM.
//!
//! hvbench speaks to libvirt through `virsh` (libvirt's own client) rather than linking
//! libvirt.so through the `virt` crate: hvbench then builds and runs where libvirt's
//! development files are missing, `virsh` is what users type (its timings are theirs),
//! and every command runs in a process group of its own under a time limit, which a
//! blocking library call on a wedged daemon would not give.
//!
//! Each boot is one `virsh create` of a transient domain `hvbench-<pid>-<n>` (transient:
//! its destruction also undefines it); its stop comes from one `virsh event` watcher the
//! backend keeps for all its domains (events.rs). Nothing is created paused: the console
//! file holds every byte from the guest's first, so reading it after the start loses
//! nothing, and a `virsh resume` would be one more process before the guest runs. The
//! console is a file (`<serial type='file'>`) that hvbench follows as QEMU writes it: a
//! socket or pipe would give back-pressure, but QEMU's UART drops bytes after a few
//! failed non-blocking writes (a damaged line on a loaded host), and a file never fails
//! a write. What hvbench reads of it is bounded (`MAX_CONSOLE_BYTES`; past it the domain
//! is destroyed). The exit device is isa-debug-exit,
//! added through `<qemu:commandline>`. The domain is destroyed on every path: end,
//! timeout, Ctrl-C, error and drop; a run that was killed outright leaves its domains,
//! which the next `--backend libvirt` run destroys first (their pid is gone).

pub mod domain;
pub mod events;
pub mod files;
pub mod flavour;
pub mod remote;
pub mod session;
pub mod stale;
pub mod virsh;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use reports::record::{BackendInfo, HostInfo};
use thiserror::Error;
use workloads::BackendFeature;

use self::domain::{CpuPolicy, DomainSpec};
use self::events::Events;
use self::files::Files;
use self::flavour::Flavour;
use self::remote::FilesHost;
use self::session::{Created, LibvirtSession};
use self::virsh::{Versions, Virsh, COMMAND_TIMEOUT, PROBE_TIMEOUT};
use super::{BackendError, BackendKind, BootRequest, GuestSession, Hypervisor, Unsupported};

/// The connection used unless `--libvirt-uri` names another.
pub const DEFAULT_URI: &str = "qemu:///system";

#[derive(Debug, Error)]
pub enum LibvirtError {
    #[error("cannot reach libvirt at {uri}: {detail} (is libvirtd or virtqemud running? ci/test.sh shows how to start them)")]
    Unreachable { uri: String, detail: String },
    #[error("{uri} names another host over a transport hvbench cannot put the guest image and console file through: use qemu+ssh://")]
    Remote { uri: String },
    #[error("{0}")]
    BadUri(String),
    #[error("the domain's files on the libvirt host: {0}")]
    RemoteFiles(String),
    #[error("libvirt still lists domain {name} after destroying it again for 5 s")]
    Lingering { name: String },
    #[error(transparent)]
    Virsh(#[from] virsh::VirshError),
    #[error("preparing the domain's files in {dir}: {source}")]
    Files {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// What `hvbench host` says about libvirt.
#[derive(Clone, Debug)]
pub struct Reachability {
    pub uri: String,
    pub versions: Result<Versions, String>,
    /// Domain types the connection offers (`kvm`, `qemu`).
    pub domain_types: Vec<String>,
    /// Hypervisor drivers installed on this machine (libvirt's connection-driver modules).
    pub installed_drivers: Vec<String>,
}

/// Asks the libvirt at `uri` what it is (`virsh version`, `virsh capabilities`).
pub fn probe(uri: &str) -> Reachability {
    let virsh = Virsh::local(uri);
    let versions = virsh
        .text(&["version"], PROBE_TIMEOUT)
        .map(|t| Versions::parse(&t))
        .map_err(|e| e.to_string());
    let domain_types = match &versions {
        Ok(_) => virsh
            .text(&["capabilities"], PROBE_TIMEOUT)
            .map(|caps| virsh::domain_types(&caps))
            .unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    Reachability {
        uri: uri.into(),
        versions,
        domain_types,
        installed_drivers: installed_drivers(),
    }
}

/// libvirt's hypervisor drivers present here (`libvirt_driver_qemu.so` -> `qemu`).
fn installed_drivers() -> Vec<String> {
    let mut drivers: Vec<String> = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"]
        .iter()
        .filter_map(|lib| std::fs::read_dir(Path::new(lib).join("libvirt/connection-driver")).ok())
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(
                name.strip_prefix("libvirt_driver_")?
                    .strip_suffix(".so")?
                    .to_string(),
            )
        })
        .collect();
    drivers.sort();
    drivers.dedup();
    drivers
}

#[derive(Debug)]
pub struct LibvirtBackend {
    virsh: Virsh,
    versions: Versions,
    host: HostInfo,
    /// Guest image and console files, where the hypervisor opens them; readable by the
    /// user QEMU runs as. Dropped after `events` (field order): nothing runs by then.
    files: Arc<Files>,
    /// The lifecycle watcher of every domain of this backend.
    events: Arc<Events>,
    cpu_features: Vec<(CpuPolicy, &'static str)>,
    flavour: Flavour,
    /// This run's owner line, in every domain's metadata (`stale`).
    owner: Option<String>,
}

impl LibvirtBackend {
    /// Connects to `uri`, reads the versions, destroys domains that earlier runs, killed
    /// outright, left behind, and starts the lifecycle watcher. A `qemu+ssh://` URI gets
    /// its files on that host, over SSH.
    pub fn new(uri: &str, host: HostInfo) -> Result<Self, LibvirtError> {
        Self::on(uri, host, hostutil::transport::Transport::Local)
    }

    /// As `new`, with `virsh` run through `at` (a dom0 reached over SSH: the Xen lab),
    /// where the domain's files then go too.
    pub fn on(
        uri: &str,
        host: HostInfo,
        at: hostutil::transport::Transport,
    ) -> Result<Self, LibvirtError> {
        let remote = match at {
            hostutil::transport::Transport::Local => remote::files_host(uri)?,
            ref shell => Some(FilesHost::over(shell.clone())),
        };
        let virsh = Virsh {
            uri: uri.into(),
            transport: at,
        };
        let versions = match virsh.text(&["version"], PROBE_TIMEOUT) {
            Ok(text) => Versions::parse(&text),
            Err(e) => {
                return Err(LibvirtError::Unreachable {
                    uri: uri.into(),
                    detail: e.to_string(),
                })
            }
        };
        let events = Arc::new(Events::start(virsh.clone())?);
        let not_here = remote.is_some();
        for left in stale::sweep_domains(&virsh, not_here)? {
            crate::say!(
                "hvbench: destroyed libvirt domain {left}, left by a run that no longer exists"
            );
        }
        let files = Arc::new(match remote {
            Some(host) => Files::remote(host)?,
            None => Files::local()?,
        });
        // As the qemu backend: the TSC frequency advertised; kvm_pvm refuses QEMU's write
        // of IA32_ARCH_CAPABILITIES.
        let mut cpu_features = vec![(CpuPolicy::Require, "invtsc")];
        if host.kvm_module == "kvm_pvm" {
            cpu_features.push((CpuPolicy::Disable, "arch-capabilities"));
        }
        Ok(LibvirtBackend {
            virsh,
            versions,
            host,
            files,
            events,
            cpu_features,
            flavour: Flavour::of_uri(uri),
            owner: crate::backend::stale::Owner::current().map(|o| o.line()),
        })
    }

    fn spec<'a>(
        &'a self,
        request: &'a BootRequest,
        kernel: &'a Path,
        console: &'a Path,
    ) -> DomainSpec<'a> {
        DomainSpec {
            name: &request.name,
            kernel,
            cmdline: request.cmdline,
            memory_mib: request.memory_mib,
            vcpus: request.vcpus,
            console_file: console,
            cpu_features: &self.cpu_features,
            owner: self.owner.as_deref(),
        }
    }

    /// The domain XML as every boot renders it, with the boot's own name and command line
    /// left as `NAME` and `CMDLINE` (records carry the command line in `reproduce`).
    pub fn domain_xml_template(&self) -> String {
        let kernel = PathBuf::from(self.files.path("guest-SHA.elf"));
        let console = PathBuf::from(self.flavour.console_path(self.files.dir(), "NAME"));
        let spec = DomainSpec {
            name: "NAME",
            kernel: &kernel,
            cmdline: "CMDLINE",
            memory_mib: 0,
            vcpus: 0,
            console_file: &console,
            cpu_features: &self.cpu_features,
            // A record's XML, defined by hand, must not name this run as its owner.
            owner: None,
        };
        self.flavour
            .render(&spec)
            .replace(
                "<memory unit='MiB'>0</memory>",
                "<memory unit='MiB'>MEMORY_MIB</memory>",
            )
            .replace("<vcpu>0</vcpu>", "<vcpu>VCPUS</vcpu>")
    }
}

impl Hypervisor for LibvirtBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Libvirt
    }

    fn info(&self) -> BackendInfo {
        let mut details = BTreeMap::new();
        details.insert("uri".into(), self.virsh.uri.clone());
        details.insert("libvirt".into(), self.versions.library.clone());
        if let Some(daemon) = &self.versions.daemon {
            details.insert("libvirt_daemon".into(), daemon.clone());
        }
        details.insert("qemu".into(), self.versions.hypervisor.clone());
        details.insert("machine".into(), self.flavour.machine().into());
        if self.flavour == Flavour::Q35 {
            details.insert("accel".into(), "kvm".into());
        }
        if self.virsh.transport != hostutil::transport::Transport::Local {
            details.insert("virsh_on".into(), self.virsh.transport.describe());
        }
        details.insert("domain_xml".into(), self.domain_xml_template());
        BackendInfo {
            kind: "libvirt".into(),
            version: format!("{}, {}", self.versions.library, self.versions.hypervisor),
            details,
        }
    }

    fn host(&self) -> HostInfo {
        self.host.clone()
    }

    fn supports(&self, feature: BackendFeature) -> Result<(), Unsupported> {
        self.flavour
            .supports(feature, self.host.kvm_module == "kvm_pvm")
    }

    fn guest_runs_locally(&self) -> bool {
        self.files.transport().is_none()
    }

    /// QEMU advises MADV_HUGEPAGE on every RAM block it allocates, under libvirt too.
    fn guest_ram_advice(&self) -> Option<hostutil::huge_pages::HugePageAdvice> {
        (self.flavour == Flavour::Q35).then_some(hostutil::huge_pages::HugePageAdvice::HugePages)
    }

    fn reproduce_args(&self) -> Vec<String> {
        vec!["--libvirt-uri".into(), self.virsh.uri.clone()]
    }

    fn boot(&self, request: &BootRequest) -> Result<Box<dyn GuestSession>, BackendError> {
        let kernel = self.files.put_image(request.image)?;
        let console = self.flavour.console_path(self.files.dir(), &request.name);
        let xml = self
            .flavour
            .render(&self.spec(request, Path::new(&kernel), Path::new(&console)));
        // Registered before the domain exists: its stop cannot come before it is awaited.
        let verdicts = self
            .events
            .register(&request.name)
            .map_err(LibvirtError::from)?;
        // `virsh create` reads the XML from its stdin (/proc/self/fd/0: a busybox dom0 has no
        // /dev/stdin): no file to clean.
        if let Err(e) = self.virsh.run_once(
            &["create", "/proc/self/fd/0"],
            Some(xml.as_bytes()),
            COMMAND_TIMEOUT,
        ) {
            // A create that timed out may still have made the domain.
            let _ = session::destroy(&self.virsh, &request.name);
            self.events.unregister(&request.name);
            self.files.remove(&[console]);
            return Err(LibvirtError::from(e).into());
        }
        let session = LibvirtSession::start(Created {
            virsh: self.virsh.clone(),
            name: request.name.clone(),
            files: self.files.clone(),
            events: self.events.clone(),
            verdicts,
            log: session::domain_log(self.flavour.log_dir(), &request.name),
            console,
            flavour: self.flavour,
        });
        Ok(Box::new(session))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_uri_is_a_clear_error_within_seconds() {
        let started = std::time::Instant::now();
        let err = LibvirtBackend::new(
            "qemu:///system?socket=/nonexistent/hvbench/libvirt-sock",
            HostInfo::default(),
        )
        .unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let text = err.to_string();
        assert!(text.contains("cannot reach libvirt"), "{text}");
    }
}
