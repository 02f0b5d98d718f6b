//! The guest side of every workload: one arm per row of the workload table. The `match`
//! is exhaustive, so a new row does not build until its guest function exists.

mod balloon;
mod blk;
mod ksm;
mod memory;
mod migration;
mod sched;

pub use self::sched::ap_user_main;

use core::hint::black_box;
use core::ptr::{read_volatile, write_volatile};

use workloads::abi::{
    LIFECYCLE_HOLD_CYCLES, LIFECYCLE_UP_KEY, MMIO_TEST_BASE, PIO_KERNEL_PORT, PIO_TEST_PORT,
};
use workloads::compute::{compute_init, compute_rounds, COMPUTE_WORDS};
use workloads::protocol::Status;
use workloads::{Hypervisor, WorkloadId};

use crate::arch::cpu::timed;
use crate::arch::cpu::{cpuid, hypercall, inb, outb, rdtsc, rdtsc_fenced};
use crate::arch::user::syscall;
use crate::global::Global;
use crate::hypervisor::xen::XENVER_VERSION;
use crate::hypervisor::KVM_HC_VAPIC_POLL_IRQ;
use crate::sampler::{Refusal, Sampler};
use crate::sysabi::{
    BootInfo, KernelOp, Syscall, KERNEL_LOOP_FAULTED, KERNEL_LOOP_TIMED_OUT, NO_KERNEL_LOOP,
};

/// An address no page table maps (256 GiB), for `selftest.page-fault`.
pub const SELFTEST_UNMAPPED_ADDRESS: u64 = 0x40_0000_0000;

pub type Outcome = Result<(), Refusal>;

pub fn kernel_loop(op: KernelOp, n: u64, arg: u64) -> Result<u64, Refusal> {
    match syscall(Syscall::KernelLoop as u64, op as u64, n, arg) {
        KERNEL_LOOP_FAULTED => Err((
            Status::Skip,
            "the hypervisor raised #UD for the hypercall instruction at CPL0: this KVM does \
             not accept hypercalls from guest kernel mode",
        )),
        NO_KERNEL_LOOP => Err((
            Status::Error,
            "the kernel has no loop for this workload on this hypervisor",
        )),
        KERNEL_LOOP_TIMED_OUT => Err((
            Status::Error,
            "what the kernel's loop waited for did not come within its limit",
        )),
        cycles => Ok(cycles),
    }
}

static COMPUTE_BUFFER: Global<[u64; COMPUTE_WORDS]> = Global::new([0; COMPUTE_WORDS]);

pub fn run(s: &Sampler, info: &BootInfo) -> Outcome {
    let id = s.workload;
    match id {
        WorkloadId::CpuIdle => {
            // The cost of the timing pair itself: the floor under every figure.
            s.latency("", |n| {
                let mut sum = 0u64;
                for _ in 0..n {
                    let a = rdtsc_fenced();
                    let b = rdtsc_fenced();
                    sum = sum.wrapping_add(b.wrapping_sub(a));
                }
                Ok(sum)
            })?;
        }
        WorkloadId::CpuRdtsc => {
            s.latency("", |n| {
                Ok(timed(n, || {
                    black_box(rdtsc());
                }))
            })?;
        }
        WorkloadId::CpuCpuid => {
            s.latency("", |n| {
                Ok(timed(n, || {
                    black_box(cpuid(0, 0));
                }))
            })?;
        }
        WorkloadId::CpuHypercall => {
            let nr = match info.hypervisor.kind {
                Hypervisor::Xen => crate::hypervisor::xen::HYPERVISOR_XEN_VERSION,
                _ => KVM_HC_VAPIC_POLL_IRQ,
            };
            let mut last = 0;
            s.latency("", |n| {
                Ok(timed(n, || {
                    last = black_box(hypercall(info.hypercall, nr, XENVER_VERSION, 0, 0));
                }))
            })?;
            // The hypervisor's answer from CPL3: an error code (-KVM_EPERM, -EPERM).
            s.note_hex("return", last);
        }
        WorkloadId::CpuHypercallKernel => {
            s.latency("", |n| kernel_loop(KernelOp::Hypercall, n, 0))?;
        }
        WorkloadId::CpuMsrRead => {
            s.latency("", |n| kernel_loop(KernelOp::MsrRead, n, 0))?;
        }
        WorkloadId::CpuHlt => {
            s.latency("", |n| kernel_loop(KernelOp::Hlt, n, 0))?;
        }
        WorkloadId::CpuCompute => {
            let mut checksum = None;
            let mut consistent = true;
            let rounds = s.latency("", |n| {
                // SAFETY-free: the buffer is ours alone (one vCPU, no interrupts).
                let mut buf = COMPUTE_BUFFER.get();
                compute_init(&mut buf);
                let start = rdtsc_fenced();
                let sum = compute_rounds(&mut buf, n);
                let cycles = rdtsc_fenced().wrapping_sub(start);
                match checksum {
                    Some((rounds, c)) if rounds == n && c != sum => consistent = false,
                    _ => {}
                }
                checksum = Some((n, sum));
                Ok(cycles)
            })?;
            if let Some((_, sum)) = checksum {
                s.note_hex("rounds", rounds);
                s.note_hex("checksum", sum);
            }
            if !consistent {
                return Err((
                    Status::Failure,
                    "compute kernel gave different checksums for the same input",
                ));
            }
        }
        WorkloadId::IoPioOut => {
            s.latency("", |n| Ok(timed(n, || outb(PIO_TEST_PORT, 0))))?;
        }
        WorkloadId::IoPioIn => {
            let mut value = 0;
            s.latency("", |n| {
                Ok(timed(n, || value = black_box(inb(PIO_TEST_PORT))))
            })?;
            s.note_hex("value", value as u64);
        }
        WorkloadId::IoPioOutKernel => {
            s.latency("", |n| Ok(timed(n, || outb(PIO_KERNEL_PORT, 0))))?;
        }
        WorkloadId::IoMmioWrite => {
            let reg = MMIO_TEST_BASE as *mut u32;
            s.latency("", |n| {
                Ok(timed(n, || {
                    // SAFETY: an identity-mapped address with no RAM behind it; the store
                    // exits to the host, which emulates it.
                    unsafe { write_volatile(reg, 0) }
                }))
            })?;
        }
        WorkloadId::IoMmioRead => {
            let reg = MMIO_TEST_BASE as *const u32;
            let mut value = 0;
            s.latency("", |n| {
                Ok(timed(n, || {
                    // SAFETY: as for io.mmio-write; the host supplies the value.
                    value = black_box(unsafe { read_volatile(reg) });
                }))
            })?;
            s.note_hex("value", value as u64);
        }
        WorkloadId::IoBlkRandread
        | WorkloadId::IoBlkRandwrite
        | WorkloadId::IoBlkSeqread
        | WorkloadId::IoBlkSeqwrite => blk::transfer(s)?,
        WorkloadId::IoBlkFlush => blk::flush(s)?,
        WorkloadId::SelftestBlkCorrupt => blk::corrupt(s)?,
        WorkloadId::MemFirstTouch => memory::first_touch(s)?,
        WorkloadId::MemProtFault => memory::prot_fault(s)?,
        WorkloadId::MemTlbChase => memory::tlb_chase(s)?,
        WorkloadId::MemSeqRead => memory::seq_read(s)?,
        WorkloadId::MemCopy => memory::copy(s)?,
        WorkloadId::MemPtUpdate => memory::pt_update(s)?,
        WorkloadId::MemCr3Switch => {
            s.latency("", |n| kernel_loop(KernelOp::Cr3Switch, n, 0))?;
        }
        WorkloadId::MemKsm => ksm::ksm(s)?,
        WorkloadId::MemBalloon => balloon::balloon(s, info)?,
        WorkloadId::SelftestBalloonCorrupt => balloon::corrupt(s, info)?,
        WorkloadId::MigIdle => migration::run(s, info, migration::Pattern::Idle)?,
        WorkloadId::MigDirty => migration::run(s, info, migration::Pattern::Sequential)?,
        WorkloadId::MigDirtyRandom => migration::run(s, info, migration::Pattern::Random)?,
        WorkloadId::MigDirtyHot => migration::run(s, info, migration::Pattern::Hot)?,
        // The host times the boot to this note, reads the stack's memory and destroys the
        // guest while it holds here (seconds), so it is measured running.
        WorkloadId::VmLifecycle => {
            s.note_text(LIFECYCLE_UP_KEY, "1");
            let start = rdtsc();
            while rdtsc().wrapping_sub(start) < LIFECYCLE_HOLD_CYCLES {
                core::hint::spin_loop();
            }
        }
        WorkloadId::SelftestTripleFault => {
            syscall(Syscall::TripleFault as u64, 0, 0, 0);
            return Err((Status::Error, "the triple fault did not stop the guest"));
        }
        WorkloadId::SelftestPageFault => {
            // 256 GiB: beyond the boot page tables' 4 GiB identity map.
            let unmapped = SELFTEST_UNMAPPED_ADDRESS as *const u64;
            // SAFETY: deliberately faults; the kernel reports the #PF and ends the run.
            black_box(unsafe { read_volatile(unmapped) });
            return Err((Status::Error, "reading an unmapped address did not fault"));
        }
        WorkloadId::SchedIpi => sched::ipi(s, info)?,
        WorkloadId::SchedWakeup => sched::wakeup(s, info)?,
        WorkloadId::SchedLockHolder => sched::lock_holder(s, info)?,
        WorkloadId::SchedSteal | WorkloadId::SchedFairness => sched::spin_report(s, info)?,
        WorkloadId::SelftestHang => loop {
            core::hint::spin_loop();
        },
    }
    Ok(())
}
