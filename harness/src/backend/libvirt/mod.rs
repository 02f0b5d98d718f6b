//! The guest as a libvirt domain: the same ELF on QEMU's q35 machine, started and stopped
//! by libvirt's QEMU driver, as users of virsh and virt-manager run KVM.
//!
//! hvbench speaks to libvirt through `virsh` (libvirt's own client) rather than linking
//! libvirt.so through the `virt` crate: hvbench then builds and runs where libvirt's
//! development files are missing, `virsh` is what users type (its timings are theirs),
//! and every command runs in a process group of its own under a time limit, which a
//! blocking library call on a wedged daemon would not give.
//!
//! Each boot: `virsh create --paused` of a transient domain `hvbench-<pid>-<n>` (transient:
//! its destruction also undefines it), a `virsh event` watcher, then `virsh resume`. The
//! console is a file (`<serial type='file'>`) that hvbench follows as QEMU writes it: a
//! socket or pipe would give back-pressure, but QEMU's UART drops bytes after a few
//! failed non-blocking writes (a damaged line on a loaded host), and a file never fails
//! a write. What hvbench reads of it is bounded (`MAX_CONSOLE_BYTES`; past it the domain
//! is destroyed). The exit device is isa-debug-exit,
//! added through `<qemu:commandline>`. The domain is destroyed on every path: end,
//! timeout, Ctrl-C, error and drop; a run that was killed outright leaves its domains,
//! which the next `--backend libvirt` run destroys first (their pid is gone).

pub mod domain;
pub mod session;
pub mod virsh;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use reports::record::{BackendInfo, HostInfo};
use thiserror::Error;
use workloads::abi::PIO_KERNEL_PORT;
use workloads::BackendFeature;

use self::domain::{CpuPolicy, DomainSpec};
use self::session::LibvirtSession;
use self::virsh::{Versions, Virsh, COMMAND_TIMEOUT, PROBE_TIMEOUT};
use super::qemu::tempfile_dir::TempDir;
use super::{BackendError, BackendKind, BootRequest, GuestSession, Hypervisor, Unsupported};

/// The connection used unless `--libvirt-uri` names another.
pub const DEFAULT_URI: &str = "qemu:///system";

#[derive(Debug, Error)]
pub enum LibvirtError {
    #[error("cannot reach libvirt at {uri}: {detail} (is libvirtd or virtqemud running? ci/test.sh shows how to start them)")]
    Unreachable { uri: String, detail: String },
    #[error("{uri} names another host: hvbench hands QEMU the guest image and console file by their paths on this machine, which a remote libvirt cannot open")]
    Remote { uri: String },
    #[error(transparent)]
    Virsh(#[from] virsh::VirshError),
    #[error("preparing the domain's files in {dir}: {source}")]
    Files {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Whether `uri` names a libvirt on another host (`driver+transport://host/...`).
pub fn is_remote(uri: &str) -> bool {
    uri.split_once("://")
        .map(|(_, rest)| {
            let authority = rest.split(['/', '?']).next().unwrap_or("");
            !authority.is_empty()
        })
        .unwrap_or(false)
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
    let virsh = Virsh { uri: uri.into() };
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
    /// Guest image, console sockets and domain XML; readable by the user QEMU runs as.
    dir: TempDir,
    cpu_features: Vec<(CpuPolicy, &'static str)>,
}

impl LibvirtBackend {
    /// Connects to `uri`, reads the versions, and destroys domains that earlier runs,
    /// killed outright, left behind.
    pub fn new(uri: &str, host: HostInfo) -> Result<Self, LibvirtError> {
        if is_remote(uri) {
            return Err(LibvirtError::Remote { uri: uri.into() });
        }
        let virsh = Virsh { uri: uri.into() };
        let versions = match virsh.text(&["version"], PROBE_TIMEOUT) {
            Ok(text) => Versions::parse(&text),
            Err(e) => {
                return Err(LibvirtError::Unreachable {
                    uri: uri.into(),
                    detail: e.to_string(),
                })
            }
        };
        for left in sweep_stale(&virsh)? {
            crate::say!(
                "hvbench: destroyed libvirt domain {left}, left by a run that no longer exists"
            );
        }
        let dir = TempDir::new("hvbench-libvirt").map_err(|source| LibvirtError::Files {
            dir: std::env::temp_dir(),
            source,
        })?;
        // QEMU runs as libvirt's unprivileged user: it must reach the image and sockets.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).map_err(
            |source| LibvirtError::Files {
                dir: dir.path().to_path_buf(),
                source,
            },
        )?;
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
            dir,
            cpu_features,
        })
    }

    fn files_error(&self, source: std::io::Error) -> LibvirtError {
        LibvirtError::Files {
            dir: self.dir.path().to_path_buf(),
            source,
        }
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
        }
    }

    /// The domain XML as every boot renders it, with the boot's own name and command line
    /// left as `NAME` and `CMDLINE` (records carry the command line in `reproduce`).
    pub fn domain_xml_template(&self) -> String {
        let kernel = self.dir.path().join("guest-SHA.elf");
        let console = self.dir.path().join("NAME.console");
        DomainSpec {
            name: "NAME",
            kernel: &kernel,
            cmdline: "CMDLINE",
            memory_mib: 0,
            vcpus: 0,
            console_file: &console,
            cpu_features: &self.cpu_features,
        }
        .render()
        .replace(
            "<memory unit='MiB'>0</memory>",
            "<memory unit='MiB'>MEMORY_MIB</memory>",
        )
        .replace("<vcpu>0</vcpu>", "<vcpu>VCPUS</vcpu>")
    }
}

/// Destroys `hvbench-<pid>-...` domains whose hvbench process is gone; returns their names.
fn sweep_stale(virsh: &Virsh) -> Result<Vec<String>, LibvirtError> {
    let names = virsh.text(&["list", "--all", "--name"], COMMAND_TIMEOUT)?;
    let mut destroyed = Vec::new();
    for name in names.lines().map(str::trim) {
        let Some(pid) = name
            .strip_prefix("hvbench-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        session::destroy(virsh, name)?;
        // A persistent one (defined by hand from a record's XML) goes too.
        let _ = virsh.run(&["undefine", name], None, COMMAND_TIMEOUT);
        destroyed.push(crate::console::escape_text(name));
    }
    Ok(destroyed)
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
        details.insert("machine".into(), "q35".into());
        details.insert("accel".into(), "kvm".into());
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
        match feature {
            BackendFeature::UserspacePioPort | BackendFeature::UserspaceMmioPage => Ok(()),
            BackendFeature::KernelIoeventfdPort => Err(format!(
                "QEMU registers no ioeventfd on port {PIO_KERNEL_PORT:#x}: the write would exit to \
                 QEMU's userspace, not the in-kernel path this workload measures"
            )
            .into()),
            BackendFeature::HypercallFromKernel if self.host.kvm_module == "kvm_pvm" => Err(
                "on kvm_pvm hosts KVM_RUN never returns from a CPL0 hypercall unless the VMM \
                 disables KVM's hypercall-patching quirk, which QEMU does not"
                    .into(),
            ),
            BackendFeature::HypercallFromKernel => Ok(()),
            BackendFeature::Balloon
            | BackendFeature::VirtioBalloon
            | BackendFeature::BlockDevice
            | BackendFeature::VirtioBlk => Err(super::qemu::Q35_NO_VIRTIO_MMIO.into()),
            // q35 has a local APIC per vCPU and the domain's <vcpu> APs wait for INIT/SIPI.
            BackendFeature::LocalApic => Ok(()),
            BackendFeature::VcpuThreads => Err(
                "sched.steal and sched.fairness weigh, pin and account hvbench's own VMM \
                 processes; a libvirt domain's vCPU threads are QEMU's: run them with \
                 --backend kvm"
                    .into(),
            ),
            BackendFeature::KernelSamePageMerging => Err(
                "hvbench measures KSM with its own VMM, whose processes it controls; run it \
                 with --backend kvm"
                    .into(),
            ),
            BackendFeature::HltExitsToVmm => Err(
                "QEMU parks a halted vCPU until an interrupt arrives; with interrupts off it \
                 never resumes, so HLT cannot be timed there"
                    .into(),
            ),
        }
    }

    fn guest_runs_locally(&self) -> bool {
        true
    }

    /// QEMU advises MADV_HUGEPAGE on every RAM block it allocates, under libvirt too.
    fn guest_ram_advice(&self) -> Option<hostutil::huge_pages::HugePageAdvice> {
        Some(hostutil::huge_pages::HugePageAdvice::HugePages)
    }

    fn reproduce_args(&self) -> Vec<String> {
        vec!["--libvirt-uri".into(), self.virsh.uri.clone()]
    }

    fn boot(&self, request: &BootRequest) -> Result<Box<dyn GuestSession>, BackendError> {
        let kernel = request
            .image
            .write_to(self.dir.path())
            .map_err(|e| self.files_error(e))?;
        let _ = std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644));
        let console = self.dir.path().join(format!("{}.console", request.name));
        let xml_path = self.dir.path().join(format!("{}.xml", request.name));
        let files = vec![console.clone(), xml_path.clone()];
        let remove = |files: &[PathBuf]| {
            for file in files {
                let _ = std::fs::remove_file(file);
            }
        };
        let xml = self.spec(request, &kernel, &console).render();
        if let Err(e) = std::fs::write(&xml_path, xml) {
            return Err(self.files_error(e).into());
        }
        let path = xml_path.display().to_string();
        if let Err(e) = self
            .virsh
            .run(&["create", "--paused", &path], None, COMMAND_TIMEOUT)
        {
            // A create that timed out may still have made the domain.
            let _ = session::destroy(&self.virsh, &request.name);
            remove(&files);
            return Err(LibvirtError::from(e).into());
        }
        let session = LibvirtSession::start(self.virsh.clone(), request.name.clone(), files)?;
        Ok(Box::new(session))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_uris_are_told_apart_from_local_ones() {
        assert!(!is_remote("qemu:///system"));
        assert!(!is_remote("qemu:///system?socket=/tmp/x/libvirt-sock"));
        assert!(!is_remote("qemu:///session"));
        assert!(is_remote("qemu+ssh://root@host/system"));
        assert!(is_remote("qemu+tcp://10.0.0.1:16509/system"));
        assert!(!is_remote("test:///default"));
    }

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
