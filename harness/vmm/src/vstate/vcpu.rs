//! The vCPU: its set-up for the PVH entry, and the run loop that dispatches every exit to
//! the devices. The loop runs on its own thread, which owns the whole VM; the host stops
//! it by setting a flag and interrupting KVM_RUN with a signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};
use workloads::abi::CPUID_KVM_TSC_KHZ_LEAF;

use super::ap::Aps;
use super::vcpu_ops::harvest;
use super::vm::Vm;
use crate::boot;
use crate::channel::{GuestEnd, GuestMessage, GuestSender};
use crate::devices::balloon::VirtioBalloon;
use crate::devices::blk::VirtioBlk;
use crate::devices::{Devices, Doorbell, ExitReason, PioAction};
use crate::migration::park::{Park, Verdict};
use crate::migration::ring::{DirtyRings, KVM_EXIT_DIRTY_RING_FULL};
use crate::VmmError;

const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
/// CPUID.1:ECX bit 31, "running under a hypervisor": guests read the 0x40000000 leaves
/// only when it is set. KVM_GET_SUPPORTED_CPUID leaves it to the VMM (QEMU sets it too).
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 9, a local APIC; ECX bit 21, x2APIC; ECX bit 24, the TSC-deadline timer.
const CPUID_1_EDX_APIC: u32 = 1 << 9;
const CPUID_1_ECX_X2APIC: u32 = 1 << 21;
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// The local APIC a vCPU has, as its CPUID tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LocalApic {
    /// No irqchip: CPUID says there is no APIC (KVM would otherwise advertise one).
    Absent,
    /// KVM's in-kernel local APIC, with the TSC-deadline timer where KVM emulates it.
    InKernel { tsc_deadline: bool },
}

/// What one vCPU's CPUID leaves are built from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuidFor {
    pub(crate) tsc_khz: u32,
    pub(crate) apic: LocalApic,
    /// The initial APIC ID (CPUID.1:EBX[31:24]): the vCPU's index.
    pub(crate) apic_id: u8,
}

/// CPUID for the guest: what KVM supports, with KVM's hypervisor leaves extended by the
/// TSC-frequency leaf (0x40000010) so the guest can convert cycles without calibrating.
fn guest_cpuid(kvm: &Kvm, this: CpuidFor) -> Result<CpuId, VmmError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmmError::Kvm {
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
    let entries = guest_cpuid_entries(supported.as_slice(), this);
    CpuId::from_entries(&entries).map_err(VmmError::Cpuid)
}

/// `guest_cpuid` from the entries KVM supports.
fn guest_cpuid_entries(supported: &[kvm_cpuid_entry2], this: CpuidFor) -> Vec<kvm_cpuid_entry2> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .copied()
        .filter(|e| e.function != CPUID_KVM_TSC_KHZ_LEAF)
        .collect();
    for entry in entries.iter_mut().filter(|e| e.function == 1) {
        entry.ecx |= CPUID_1_ECX_HYPERVISOR;
        entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(this.apic_id) << 24);
        match this.apic {
            LocalApic::Absent => {
                entry.edx &= !CPUID_1_EDX_APIC;
                entry.ecx &= !(CPUID_1_ECX_X2APIC | CPUID_1_ECX_TSC_DEADLINE);
            }
            LocalApic::InKernel { tsc_deadline } => {
                entry.edx |= CPUID_1_EDX_APIC;
                if tsc_deadline {
                    entry.ecx |= CPUID_1_ECX_TSC_DEADLINE;
                } else {
                    entry.ecx &= !CPUID_1_ECX_TSC_DEADLINE;
                }
            }
        }
    }
    let word =
        |i: usize| u32::from_le_bytes(KVM_SIGNATURE[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]));
    match entries.iter_mut().find(|e| e.function == 0x4000_0000) {
        Some(e) => {
            e.eax = e.eax.max(CPUID_KVM_TSC_KHZ_LEAF);
            (e.ebx, e.ecx, e.edx) = (word(0), word(1), word(2));
        }
        None => entries.push(kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: CPUID_KVM_TSC_KHZ_LEAF,
            ebx: word(0),
            ecx: word(1),
            edx: word(2),
            ..Default::default()
        }),
    }
    entries.push(kvm_cpuid_entry2 {
        function: CPUID_KVM_TSC_KHZ_LEAF,
        eax: this.tsc_khz,
        ..Default::default()
    });
    entries
}

/// Creates vCPU `id` with the guest's CPUID.
pub(crate) fn create(kvm: &Kvm, vm: &Vm, id: u8) -> Result<VcpuFd, VmmError> {
    let fd = vm
        .fd
        .create_vcpu(u64::from(id))
        .map_err(|source| VmmError::Kvm {
            what: "KVM_CREATE_VCPU",
            source,
        })?;
    let tsc_khz = fd.get_tsc_khz().map_err(|source| VmmError::Kvm {
        what: "KVM_GET_TSC_KHZ",
        source,
    })?;
    let apic = if vm.irqchip {
        LocalApic::InKernel {
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        }
    } else {
        LocalApic::Absent
    };
    let this = CpuidFor {
        tsc_khz,
        apic,
        apic_id: id,
    };
    fd.set_cpuid2(&guest_cpuid(kvm, this)?)
        .map_err(|source| VmmError::Kvm {
            what: "KVM_SET_CPUID2",
            source,
        })?;
    Ok(fd)
}

/// vCPUs beyond the boot one: application processors, which with the in-kernel irqchip
/// wait (in KVM) for the guest's INIT/SIPI, as on a real machine.
pub(crate) fn create_secondary(kvm: &Kvm, vm: &Vm, count: u32) -> Result<Vec<VcpuFd>, VmmError> {
    (1..=count)
        .map(|id| {
            let id = u8::try_from(id).map_err(|_| VmmError::Vcpus {
                asked: count + 1,
                max: MAX_VCPUS,
            })?;
            create(kvm, vm, id)
        })
        .collect()
}

/// Most vCPUs a guest may have: APIC IDs are 8 bits in xAPIC mode, and 0xff is broadcast.
pub const MAX_VCPUS: u32 = 254;

#[derive(Debug)]
pub(crate) struct Vcpu {
    fd: VcpuFd,
    devices: Devices,
    /// Where a migration asks this vCPU to pause.
    park: Arc<Park>,
    /// The VM's dirty rings, which this thread harvests when its ring fills.
    rings: Option<Arc<DirtyRings>>,
}

impl Vcpu {
    /// Creates vCPU 0 in the PVH entry state at `entry`.
    pub(crate) fn new(kvm: &Kvm, vm: &Vm, entry: u64) -> Result<Self, VmmError> {
        let fd = create(kvm, vm, 0)?;
        let sregs = fd.get_sregs().map_err(|source| VmmError::Kvm {
            what: "KVM_GET_SREGS",
            source,
        })?;
        fd.set_sregs(&boot::entry_sregs(sregs))
            .map_err(|source| VmmError::Kvm {
                what: "KVM_SET_SREGS",
                source,
            })?;
        fd.set_regs(&boot::entry_regs(entry))
            .map_err(|source| VmmError::Kvm {
                what: "KVM_SET_REGS",
                source,
            })?;
        Ok(Vcpu {
            fd,
            devices: Devices::new(),
            park: Arc::default(),
            rings: None,
        })
    }

    /// A vCPU already in its state (a migrated guest's), with its devices.
    pub(crate) fn from_parts(fd: VcpuFd, devices: Devices) -> Self {
        Vcpu {
            fd,
            devices,
            park: Arc::default(),
            rings: None,
        }
    }

    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Gives the thread the VM's dirty rings to harvest when its own fills.
    pub(crate) fn attach_rings(&mut self, rings: Option<Arc<DirtyRings>>) {
        self.rings = rings;
    }

    /// A migrated-in VM's paused devices start serving (the guest is about to run).
    pub(crate) fn resume_devices(&self) {
        self.devices.resume_blk();
    }

    /// The migration's handle on this vCPU's pause.
    pub(crate) fn park(&self) -> Arc<Park> {
        self.park.clone()
    }

    pub(crate) fn has_balloon(&self) -> bool {
        self.devices.has_balloon()
    }

    /// Answers the doorbell port with `doorbell`, which the host rings.
    pub(crate) fn attach_doorbell(&mut self, doorbell: Arc<Doorbell>) {
        self.devices.attach_doorbell(doorbell);
    }

    /// Adds the virtio-balloon to this vCPU's devices (`mem.balloon`).
    pub(crate) fn attach_balloon(&mut self, balloon: VirtioBalloon) {
        self.devices.attach_balloon(balloon);
    }

    /// Adds the virtio-blk to this vCPU's devices (`io.blk-*`).
    pub(crate) fn attach_blk(&mut self, blk: VirtioBlk) {
        self.devices.attach_blk(blk);
    }

    /// The bare vCPU file descriptor, for benchmarks that drive KVM_RUN themselves.
    pub(crate) fn into_fd(self) -> VcpuFd {
        self.fd
    }

    fn registers(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rax={:#x} cs={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rax, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            _ => "registers unavailable".to_string(),
        }
    }

    fn flush_console(&mut self, tx: &GuestSender, force: bool) {
        if let Some(bytes) = self.devices.take_console_output(force) {
            let _ = tx.send(GuestMessage::Console {
                bytes,
                exits: Some(self.devices.counters.snapshot()),
            });
        }
    }

    /// Runs until the guest ends or `stop` is set; the last message is always `Ended`.
    /// Takes the VM so that it lives exactly as long as its vCPUs run: the application
    /// processors (threads of their own, started here) are stopped and joined first.
    pub(crate) fn run(mut self, mut vm: Vm, stop: Arc<AtomicBool>, tx: GuestSender, name: &str) {
        let aps = if vm.irqchip && !vm.secondary_vcpus.is_empty() {
            let vcpus = std::mem::take(&mut vm.secondary_vcpus);
            match Aps::start(vcpus, name, stop.clone(), self.rings.clone()) {
                Ok(aps) => Some(aps),
                Err(e) => {
                    let detail = format!("starting the application processors: {e}");
                    let _ = tx.send(GuestMessage::Ended(GuestEnd::Failed { detail }));
                    return;
                }
            }
        } else {
            None
        };
        let mut end = self.run_loop(&stop, &tx, aps.as_ref());
        if let Some(aps) = aps {
            if let Some(failure) = aps.shared().take_failure() {
                end = failure;
            }
            aps.stop();
        }
        self.flush_console(&tx, true);
        let _ = tx.send(GuestMessage::Ended(end));
        drop(vm);
    }

    fn run_loop(&mut self, stop: &AtomicBool, tx: &GuestSender, aps: Option<&Aps>) -> GuestEnd {
        loop {
            if stop.load(Ordering::Acquire) {
                return GuestEnd::Stopped;
            }
            if self.park.asked()
                && self.park.park(&mut self.fd, &self.devices, aps) == Verdict::HandedOver
            {
                self.flush_console(tx, true);
                let _ = tx.send(GuestMessage::Notice(
                    "migrated: handed over to the destination (Go sent)".into(),
                ));
                return GuestEnd::Stopped;
            }
            let exit = match self.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.devices.counters.count(ExitReason::Interrupted);
                    continue;
                }
                Err(e) => {
                    return GuestEnd::Failed {
                        detail: format!("KVM_RUN failed: {e}"),
                    }
                }
            };
            match exit {
                VcpuExit::IoOut(port, data) => {
                    if let PioAction::Exit(code) = self.devices.pio_out(port, data) {
                        return GuestEnd::Exited { code };
                    }
                }
                VcpuExit::IoIn(port, data) => self.devices.pio_in(port, data),
                VcpuExit::MmioRead(addr, data) => self.devices.mmio_read(addr, data),
                VcpuExit::MmioWrite(addr, data) => self.devices.mmio_write(addr, data),
                VcpuExit::Hlt => self.devices.counters.count(ExitReason::Hlt),
                VcpuExit::Intr => self.devices.counters.count(ExitReason::Interrupted),
                VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                    if let Err(e) = harvest(self.rings.as_deref()) {
                        return GuestEnd::Failed { detail: e };
                    }
                }
                VcpuExit::Shutdown => {
                    return GuestEnd::TripleFault {
                        detail: format!("triple fault (KVM_EXIT_SHUTDOWN): {}", self.registers()),
                    }
                }
                VcpuExit::InternalError => {
                    let suberror = self.internal_error();
                    return GuestEnd::Failed {
                        detail: format!(
                            "KVM could not emulate the guest (KVM_EXIT_INTERNAL_ERROR, {suberror}): {}",
                            self.registers()
                        ),
                    };
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return GuestEnd::Failed {
                        detail: format!(
                            "VM entry failed on cpu {cpu}: hardware reason {reason:#x}"
                        ),
                    }
                }
                VcpuExit::SystemEvent(kind, _) => {
                    return GuestEnd::Failed {
                        detail: format!("guest requested system event {kind} (reset or shutdown)"),
                    }
                }
                other => {
                    let exit = format!("{other:?}");
                    return GuestEnd::Failed {
                        detail: format!("unexpected VM exit {exit}: {}", self.registers()),
                    };
                }
            }
            self.flush_console(tx, false);
        }
    }

    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, which makes
        // `internal` the active member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        format!(
            "suberror {} data {:x?}",
            internal.suberror,
            &internal.data[..n]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the hypervisor bit the guest never reads KVM's leaves: it said `hv=none`
    /// and skipped cpu.hypercall* where KVM_GET_SUPPORTED_CPUID lacks the bit (the KVM
    /// lab's kvm_amd on Linux 6.1; kvm_pvm here sets it).
    #[test]
    fn the_guest_is_told_it_runs_under_kvm() {
        let leaf1 = kvm_cpuid_entry2 {
            function: 1,
            ecx: 0x0080_2001,
            ..Default::default()
        };
        let this = CpuidFor {
            tsc_khz: 2_000_000,
            apic: LocalApic::Absent,
            apic_id: 0,
        };
        let entries = guest_cpuid_entries(&[leaf1], this);
        let leaf = |function: u32| entries.iter().find(|e| e.function == function).copied();
        assert_eq!(
            leaf(1).map(|e| e.ecx),
            Some(0x0080_2001 | CPUID_1_ECX_HYPERVISOR)
        );
        let signature = leaf(0x4000_0000).unwrap();
        let bytes: Vec<u8> = [signature.ebx, signature.ecx, signature.edx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(bytes, KVM_SIGNATURE);
        assert_eq!(leaf(CPUID_KVM_TSC_KHZ_LEAF).map(|e| e.eax), Some(2_000_000));
    }

    /// The local APIC the CPUID shows follows the irqchip: none without it (KVM would
    /// advertise one), present with it, the TSC-deadline timer only where KVM emulates it;
    /// each vCPU sees its own initial APIC ID.
    #[test]
    fn cpuid_shows_the_local_apic_only_with_the_irqchip() {
        let leaf1 = kvm_cpuid_entry2 {
            function: 1,
            ecx: CPUID_1_ECX_TSC_DEADLINE | CPUID_1_ECX_X2APIC,
            edx: CPUID_1_EDX_APIC,
            ebx: 0x0001_0800,
            ..Default::default()
        };
        let leaf = |apic, apic_id| {
            let this = CpuidFor {
                tsc_khz: 1,
                apic,
                apic_id,
            };
            guest_cpuid_entries(&[leaf1], this)
                .into_iter()
                .find(|e| e.function == 1)
                .unwrap()
        };
        let none = leaf(LocalApic::Absent, 0);
        assert_eq!(none.edx & CPUID_1_EDX_APIC, 0);
        assert_eq!(
            none.ecx & (CPUID_1_ECX_TSC_DEADLINE | CPUID_1_ECX_X2APIC),
            0
        );
        let with = leaf(LocalApic::InKernel { tsc_deadline: true }, 3);
        assert_ne!(with.edx & CPUID_1_EDX_APIC, 0);
        assert_ne!(with.ecx & CPUID_1_ECX_TSC_DEADLINE, 0);
        assert_eq!(with.ebx, 0x0301_0800);
        let no_deadline = leaf(
            LocalApic::InKernel {
                tsc_deadline: false,
            },
            1,
        );
        assert_eq!(no_deadline.ecx & CPUID_1_ECX_TSC_DEADLINE, 0);
    }

    /// What this host's KVM gives, through the real ioctl.
    #[test]
    fn this_kvm_gives_the_guest_the_hypervisor_bit() {
        let Ok(kvm) = Kvm::new() else {
            // Skipped without /dev/kvm, unless the run requires KVM (CI does).
            assert!(
                std::env::var_os("HVBENCH_REQUIRE_KVM").is_none(),
                "HVBENCH_REQUIRE_KVM is set but /dev/kvm does not open"
            );
            return;
        };
        let this = CpuidFor {
            tsc_khz: 2_000_000,
            apic: LocalApic::Absent,
            apic_id: 0,
        };
        let cpuid = guest_cpuid(&kvm, this).unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).copied();
        assert!(leaf1.is_some_and(|e| e.ecx & CPUID_1_ECX_HYPERVISOR != 0));
    }
}
