//! Which hypervisor runs us, from CPUID 0x40000000 and up, and what it tells us (TSC
//! frequency). Read at CPL0: on some hosts (kvm_pvm) CPUID at CPL3 shows the host's own
//! leaves, not the ones the VMM configured.

pub mod runstate;
pub mod suspend;
pub mod xen;
pub mod xen_smp;
pub mod xenstore;

use workloads::abi::CPUID_KVM_TSC_KHZ_LEAF;
use workloads::Hypervisor;

use crate::arch::cpu::{cpuid, HypercallInsn};

#[derive(Clone, Copy, Debug)]
pub struct Detected {
    pub kind: Hypervisor,
    /// Base leaf of the hypervisor's range (0x40000000, or 0x40000100 etc. for Xen with
    /// Viridian), 0 if none.
    pub base: u32,
    pub max_leaf: u32,
    pub signature: [u8; 12],
}

fn signature(r: &crate::arch::cpu::CpuidResult) -> [u8; 12] {
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
    sig[8..12].copy_from_slice(&r.edx.to_le_bytes());
    sig
}

/// Is there a hypervisor at all (CPUID.1:ECX bit 31)?
fn hypervisor_bit() -> bool {
    cpuid(1, 0).ecx & (1 << 31) != 0
}

/// KVM_FEATURE_STEAL_TIME (CPUID 0x40000001 EAX bit 5) under KVM. CPL0 for a true answer.
pub fn kvm_steal_time(hv: &Detected) -> bool {
    hv.kind == Hypervisor::Kvm && hv.max_leaf > hv.base && cpuid(hv.base + 1, 0).eax & (1 << 5) != 0
}

pub fn detect() -> Detected {
    let mut found = Detected {
        kind: Hypervisor::None,
        base: 0,
        max_leaf: 0,
        signature: [0; 12],
    };
    if !hypervisor_bit() {
        return found;
    }
    // Xen moves its leaves up by 0x100 steps when it also offers Viridian at 0x40000000.
    let mut base = 0x4000_0000u32;
    while base < 0x4001_0000 {
        let r = cpuid(base, 0);
        let sig = signature(&r);
        let kind = match &sig {
            b"XenVMMXenVMM" => Some(Hypervisor::Xen),
            b"KVMKVMKVM\0\0\0" => Some(Hypervisor::Kvm),
            _ => None,
        };
        if let Some(kind) = kind {
            return Detected {
                kind,
                base,
                max_leaf: r.eax,
                signature: sig,
            };
        }
        if base == 0x4000_0000 && r.eax >= base {
            found = Detected {
                kind: Hypervisor::Other,
                base,
                max_leaf: r.eax,
                signature: sig,
            };
        }
        base += 0x100;
    }
    found
}

/// The TSC frequency the hypervisor advertises, and where it came from.
pub fn tsc_khz(hv: &Detected) -> (u64, &'static str) {
    match hv.kind {
        Hypervisor::Kvm if hv.max_leaf >= CPUID_KVM_TSC_KHZ_LEAF => {
            let khz = cpuid(CPUID_KVM_TSC_KHZ_LEAF, 0).eax as u64;
            (
                khz,
                if khz > 0 {
                    "kvm-cpuid-0x40000010"
                } else {
                    "none"
                },
            )
        }
        Hypervisor::Xen if hv.max_leaf >= hv.base + 3 => {
            let khz = cpuid(hv.base + 3, 0).ecx as u64;
            (khz, if khz > 0 { "xen-cpuid-leaf4" } else { "none" })
        }
        _ => (0, "none"),
    }
}

/// CPU vendor string from CPUID leaf 0.
pub fn cpu_vendor() -> [u8; 12] {
    let r = cpuid(0, 0);
    let mut v = [0u8; 12];
    v[0..4].copy_from_slice(&r.ebx.to_le_bytes());
    v[4..8].copy_from_slice(&r.edx.to_le_bytes());
    v[8..12].copy_from_slice(&r.ecx.to_le_bytes());
    v
}

/// VMMCALL on AMD and Hygon, VMCALL elsewhere.
pub fn hypercall_insn(vendor: &[u8; 12]) -> HypercallInsn {
    match vendor {
        b"AuthenticAMD" | b"HygonGenuine" => HypercallInsn::Vmmcall,
        _ => HypercallInsn::Vmcall,
    }
}

/// KVM's no-op hypercall: returns 0 without doing anything (KVM_HC_VAPIC_POLL_IRQ).
pub const KVM_HC_VAPIC_POLL_IRQ: u64 = 1;
