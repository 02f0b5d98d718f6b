//! The VM: its file descriptor, its memory, and the ioeventfd behind `io.pio-out-kernel`.

use std::sync::Arc;

use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use workloads::abi::PIO_KERNEL_PORT;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{self, GuestMemory};
use crate::migration::ring::DirtyRings;
use crate::migration::MigrationError;
use crate::VmmError;

/// Where KVM may put the TSS it needs for real mode on Intel (unused by our guest, but
/// KVM requires the address to be set before the first KVM_RUN on VMX).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// KVM's quirk that rewrites a guest's VMCALL/VMMCALL into the host vendor's instruction.
/// On kvm_pvm hosts it never finishes (KVM_RUN does not return), so it is turned off
/// where KVM allows: a wrong-vendor instruction then raises #UD in the guest instead.
const KVM_X86_QUIRK_FIX_HYPERCALL_INSN: u64 = 1 << 5;

fn disable_hypercall_patching(fd: &VmFd) -> Result<(), VmmError> {
    let supported = fd.check_extension_raw(kvm_bindings::KVM_CAP_DISABLE_QUIRKS2.into());
    let supported = u64::try_from(supported).unwrap_or(0);
    if supported & KVM_X86_QUIRK_FIX_HYPERCALL_INSN == 0 {
        return Ok(());
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_DISABLE_QUIRKS2,
        ..Default::default()
    };
    cap.args[0] = KVM_X86_QUIRK_FIX_HYPERCALL_INSN;
    fd.enable_cap(&cap).map_err(|source| VmmError::Kvm {
        what: "KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2)",
        source,
    })
}

#[derive(Debug)]
pub(crate) struct Vm {
    /// Shared with a migration, which reads the dirty log while the vCPU runs.
    pub(crate) fd: Arc<VmFd>,
    pub(crate) memory: GuestMemory,
    /// Signalled by KVM, in the kernel, on every write to `PIO_KERNEL_PORT`. Never read:
    /// its counter saturates long after any run ends.
    _kernel_port_event: EventFd,
    /// vCPUs 1.. (application processors; with the irqchip they wait for the guest's
    /// INIT/SIPI on threads of their own, without it they are created and never run).
    pub(crate) secondary_vcpus: Vec<kvm_ioctls::VcpuFd>,
    /// KVM's in-kernel irqchip (PIC, IOAPIC and a local APIC per vCPU) was created.
    pub(crate) irqchip: bool,
    /// KVM's dirty ring is enabled, of this many bytes per vCPU (see `migration::ring`).
    pub(crate) dirty_ring: Option<u32>,
}

impl Vm {
    /// Enables KVM's dirty ring of up to `bytes` per vCPU where the host offers it; call
    /// before any vCPU exists.
    pub(crate) fn enable_dirty_ring(&mut self, bytes: u32) {
        self.dirty_ring = crate::migration::ring::enable(&self.fd, bytes);
    }

    /// Maps every vCPU's dirty ring, where the VM has them; `vcpus` all of them.
    pub(crate) fn dirty_rings(
        &self,
        vcpus: &[&kvm_ioctls::VcpuFd],
    ) -> Result<Option<Arc<DirtyRings>>, MigrationError> {
        let Some(bytes) = self.dirty_ring else {
            return Ok(None);
        };
        let slots = self
            .memory
            .iter()
            .map(|r| (r.start_addr().raw_value() / 4096, r.len() / 4096))
            .collect();
        DirtyRings::new(self.fd.clone(), vcpus, bytes, slots).map(|r| Some(Arc::new(r)))
    }

    /// A VM of `memory_mib` MiB; with `irqchip`, KVM's in-kernel irqchip, which must exist
    /// before the first vCPU.
    pub(crate) fn new(kvm: &Kvm, memory_mib: u32, irqchip: bool) -> Result<Self, VmmError> {
        let fd = kvm.create_vm().map_err(|source| VmmError::Kvm {
            what: "KVM_CREATE_VM",
            source,
        })?;
        if kvm.check_extension(Cap::SetTssAddr) {
            fd.set_tss_address(KVM_TSS_ADDRESS)
                .map_err(|source| VmmError::Kvm {
                    what: "KVM_SET_TSS_ADDR",
                    source,
                })?;
        }
        disable_hypercall_patching(&fd)?;
        if irqchip {
            fd.create_irq_chip().map_err(|source| VmmError::Kvm {
                what: "KVM_CREATE_IRQCHIP",
                source,
            })?;
        }
        let memory = memory::allocate(memory_mib)?;
        memory::register(&fd, &memory)?;
        let event = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        fd.register_ioevent(
            &event,
            &IoEventAddress::Pio(PIO_KERNEL_PORT as u64),
            NoDatamatch,
        )
        .map_err(|source| VmmError::Kvm {
            what: "KVM_IOEVENTFD",
            source,
        })?;
        Ok(Vm {
            fd: Arc::new(fd),
            memory,
            _kernel_port_event: event,
            secondary_vcpus: Vec::new(),
            irqchip,
            dirty_ring: None,
        })
    }
}
