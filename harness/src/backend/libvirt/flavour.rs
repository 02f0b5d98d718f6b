//! Which hypervisor the libvirt connection drives, from its URI's driver: QEMU/KVM
//! (`qemu://`: the guest on q35) or Xen (`xen://`: libvirt's libxl driver, the guest as a
//! `xenpvh` domain). One set of virsh commands drives both; what differs is here: the
//! domain XML, where the console and libvirt's log are, what a stop means, and which
//! workloads have their path.

use std::path::Path;

use workloads::BackendFeature;

use super::domain::{escape, DomainSpec};
use super::virsh::Stopped;
use crate::backend::Unsupported;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    /// QEMU's q35 under KVM (libvirt's QEMU driver).
    Q35,
    /// A Xen PVH domain (libvirt's libxl driver).
    XenPvh,
}

impl Flavour {
    /// From the URI's driver (`xen`, `xen+ssh` -> Xen; anything else -> QEMU).
    pub fn of_uri(uri: &str) -> Self {
        let scheme = uri.split("://").next().unwrap_or("");
        match scheme.split('+').next() {
            Some("xen") => Flavour::XenPvh,
            _ => Flavour::Q35,
        }
    }

    /// The machine records name.
    pub fn machine(self) -> &'static str {
        match self {
            Flavour::Q35 => "q35",
            Flavour::XenPvh => "xenpvh",
        }
    }

    /// Where libvirt's daemon writes each domain's log.
    pub fn log_dir(self) -> &'static str {
        match self {
            Flavour::Q35 => "/var/log/libvirt/qemu",
            Flavour::XenPvh => "/var/log/libvirt/libxl",
        }
    }

    /// The guest's console file for domain `name`: hvbench's own file for QEMU's serial
    /// port; on Xen the PV console's log that xenconsoled writes (`--log=guest`, Debian's
    /// log directory), which libxl offers no file console to replace.
    pub fn console_path(self, files_dir: &str, name: &str) -> String {
        match self {
            Flavour::Q35 => format!("{files_dir}/{name}.console"),
            Flavour::XenPvh => format!("/var/log/xen/console/guest-{name}.log"),
        }
    }

    /// The domain XML.
    pub fn render(self, spec: &DomainSpec<'_>) -> String {
        match self {
            Flavour::Q35 => spec.render(),
            Flavour::XenPvh => render_xen_pvh(spec),
        }
    }

    /// How `stopped` reads for this hypervisor, in the q35 domain's words: on Xen the
    /// guest's own end (SCHEDOP_shutdown, poweroff) is libvirt's `Stopped Shutdown`, which
    /// on q35 (`on_reboot=destroy`) means a reset; the guest's end line then says how.
    pub fn normalise(self, stopped: Stopped) -> Stopped {
        match (self, stopped) {
            (Flavour::XenPvh, Stopped::Shutdown) => Stopped::Failed,
            (_, other) => other,
        }
    }

    pub fn supports(self, feature: BackendFeature, kvm_pvm: bool) -> Result<(), Unsupported> {
        match self {
            Flavour::Q35 => q35_supports(feature, kvm_pvm),
            Flavour::XenPvh => xen_supports(feature),
        }
    }
}

fn render_xen_pvh(spec: &DomainSpec<'_>) -> String {
    format!(
        "<domain type='xen'>
  <name>{name}</name>
{metadata}  <memory unit='MiB'>{memory}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='xenpvh'>xenpvh</type>
    <kernel>{kernel}</kernel>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <console type='pty'>
      <target type='xen' port='0'/>
    </console>
  </devices>
</domain>
",
        name = escape(spec.name),
        metadata = super::stale::metadata_element(spec.owner),
        memory = spec.memory_mib,
        vcpus = spec.vcpus,
        kernel = escape(&Path::new(spec.kernel).display().to_string()),
        cmdline = escape(spec.cmdline),
    )
}

fn q35_supports(feature: BackendFeature, kvm_pvm: bool) -> Result<(), Unsupported> {
    match feature {
        BackendFeature::UserspacePioPort | BackendFeature::UserspaceMmioPage => Ok(()),
        BackendFeature::KernelIoeventfdPort => {
            Err(crate::backend::qemu::qemu_no_ioeventfd().into())
        }
        BackendFeature::HypercallFromKernel if kvm_pvm => {
            Err(crate::backend::qemu::KVM_PVM_QEMU_HYPERCALL.into())
        }
        BackendFeature::HypercallFromKernel => Ok(()),
        BackendFeature::Balloon
        | BackendFeature::VirtioBalloon
        | BackendFeature::BlockDevice
        | BackendFeature::VirtioBlk => Err(crate::backend::qemu::Q35_NO_VIRTIO_MMIO.into()),
        // q35 has a local APIC per vCPU and the domain's <vcpu> APs wait for INIT/SIPI.
        BackendFeature::LocalApic => Ok(()),
        BackendFeature::LiveMigration => Err(
            "hvbench migrates with its own VMM and with plain QEMU (QMP); `virsh migrate` \
             is not driven yet"
                .into(),
        ),
        BackendFeature::VcpuThreads => Err(
            "sched.steal and sched.fairness weigh, pin and account VMM processes that \
             hvbench starts itself; a libvirt domain's QEMU is libvirtd's: run them with \
             --backend kvm or --backend qemu"
                .into(),
        ),
        BackendFeature::KernelSamePageMerging => Err(
            "hvbench measures KSM with its own VMM, whose processes it controls; run it \
             with --backend kvm"
                .into(),
        ),
        BackendFeature::HltExitsToVmm => Err(crate::backend::qemu::QEMU_PARKS_HLT.into()),
    }
}

/// A PVH domain through libvirt has the paths it has under `xl` (backend/xen), less what
/// hvbench drives through `xl` itself (balloon, disk) and not yet through libvirt.
fn xen_supports(feature: BackendFeature) -> Result<(), Unsupported> {
    match feature {
        BackendFeature::HypercallFromKernel => Ok(()),
        BackendFeature::UserspacePioPort | BackendFeature::UserspaceMmioPage => Err(
            "a PVH guest has no device model behind its ports and unbacked pages: Xen itself \
             answers, which is not the VMM path this workload measures on KVM"
                .into(),
        ),
        BackendFeature::KernelIoeventfdPort => Err(
            "ioeventfd is a KVM interface; Xen has no equivalent for a PVH guest's ports".into(),
        ),
        BackendFeature::HltExitsToVmm => Err(
            "Xen blocks a vCPU that halts with interrupts off instead of returning to a VMM; \
             there is no VMM behind a PVH guest"
                .into(),
        ),
        BackendFeature::LocalApic => Err(
            "the guest does not yet start vCPUs on Xen (a PVH domain's vCPUs come up by \
             VCPUOP_initialise/VCPUOP_up, not INIT/SIPI)"
                .into(),
        ),
        BackendFeature::Balloon
        | BackendFeature::VirtioBalloon
        | BackendFeature::BlockDevice
        | BackendFeature::VirtioBlk
        | BackendFeature::LiveMigration
        | BackendFeature::VcpuThreads
        | BackendFeature::KernelSamePageMerging => {
            Err("not driven through libvirt's libxl driver yet: run it with --backend xen".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uri_picks_the_hypervisor() {
        assert_eq!(Flavour::of_uri("qemu:///system"), Flavour::Q35);
        assert_eq!(Flavour::of_uri("qemu+ssh://h/system"), Flavour::Q35);
        assert_eq!(Flavour::of_uri("xen:///system"), Flavour::XenPvh);
        assert_eq!(Flavour::of_uri("xen+ssh://root@h/system"), Flavour::XenPvh);
    }

    #[test]
    fn the_xen_domain_is_pvh_with_its_console_on_xenconsoled() {
        let spec = DomainSpec {
            name: "hvbench-1-2",
            kernel: Path::new("/tmp/d/guest.elf"),
            cmdline: "hvbench run=cpu.idle </x>",
            memory_mib: 64,
            vcpus: 1,
            console_file: Path::new("/unused"),
            cpu_features: &[],
            owner: None,
        };
        let xml = Flavour::XenPvh.render(&spec);
        for part in [
            "<domain type='xen'>",
            "machine='xenpvh'>xenpvh</type>",
            "<kernel>/tmp/d/guest.elf</kernel>",
            "<cmdline>hvbench run=cpu.idle &lt;/x&gt;</cmdline>",
            "<console type='pty'>",
            "<on_crash>destroy</on_crash>",
        ] {
            assert!(xml.contains(part), "{part} missing from\n{xml}");
        }
        assert!(!xml.contains("qemu"), "{xml}");
        assert_eq!(
            Flavour::XenPvh.console_path("/d", "n"),
            "/var/log/xen/console/guest-n.log"
        );
        // The guest's poweroff on Xen is its end; on q35 a shutdown is a reset.
        assert_eq!(
            Flavour::XenPvh.normalise(Stopped::Shutdown),
            Stopped::Failed
        );
        assert_eq!(Flavour::Q35.normalise(Stopped::Shutdown), Stopped::Shutdown);
    }
}
