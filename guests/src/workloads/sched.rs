//! `sched.*`: the application processors started by INIT/SIPI (from user mode: the local
//! APIC's page is mapped to CPL3), the IPI round trip and the timer wake-up.

use core::sync::atomic::Ordering;

use workloads::protocol::Status;
use workloads::table::param;

use crate::arch::apic;
use crate::arch::cpu::rdtsc_fenced;
use crate::arch::smp::{self, TrampolineParams, MAX_CPUS, TRAMPOLINE_ADDR};
use crate::global::Global;
use crate::kernel::{BootInfo, KernelOp};
use crate::runner::{Refusal, Sampler};
use crate::start_info;

use super::{kernel_loop, Outcome};

/// How long an AP has to come up after its SIPI, and the IPI answer to come back.
const START_MS: u64 = 500;
const ANSWER_MS: u64 = 1000;
/// The SIPI vector: the trampoline's page number (0x8000 >> 12).
const TRAMPOLINE_PAGE: u8 = 0x08;
const _: () = assert!(TRAMPOLINE_PAGE as u64 == TRAMPOLINE_ADDR >> 12);
/// Most timer wake-ups in one sample.
const MAX_WAKES_PER_SAMPLE: u64 = 100_000;

/// CPUs online (the boot vCPU included), once the APs were started.
static STARTED: Global<Option<usize>> = Global::new(None);

fn cycles_in_ms(info: &BootInfo, ms: u64) -> u64 {
    info.tsc_khz.max(1_000_000).saturating_mul(ms)
}

fn lapic(info: &BootInfo) -> Result<(), Refusal> {
    if !info.lapic.present {
        return Err((
            Status::Skip,
            "CPUID says this vCPU has no local APIC (hvbench's VMM creates the in-kernel \
             irqchip only with --vcpus 2 or more)",
        ));
    }
    Ok(())
}

/// Whether the trampoline's page would overwrite what the loader left low in memory.
fn trampoline_clashes(info: &BootInfo, len: u64) -> bool {
    let page = TRAMPOLINE_ADDR..TRAMPOLINE_ADDR + len;
    let Some(start) = start_info::read(info.start_info) else {
        return true;
    };
    [info.start_info, start.cmdline_paddr, start.memmap_paddr]
        .iter()
        .any(|a| page.contains(a) || (*a < TRAMPOLINE_ADDR && a + 4096 > TRAMPOLINE_ADDR))
}

/// Starts every AP the host gave (up to `MAX_CPUS` in all) once; returns the CPUs online.
pub fn start_aps(s: &Sampler, info: &BootInfo) -> Result<usize, Refusal> {
    if let Some(n) = STARTED.get() {
        return Ok(n);
    }
    lapic(info)?;
    let cpus = (s.config.cpus as usize).min(MAX_CPUS);
    apic::enable();
    let code = smp::trampoline();
    if trampoline_clashes(info, code.len() as u64) {
        return Err((
            Status::Error,
            "the AP trampoline's page (0x8000) holds the loader's start info or command line",
        ));
    }
    // SAFETY: the page at TRAMPOLINE_ADDR is identity-mapped RAM that nothing else uses
    // (checked above); the copy is as long as the trampoline.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), TRAMPOLINE_ADDR as *mut u8, code.len())
    };
    for cpu in 1..cpus {
        start_one(info, cpu)?;
    }
    STARTED.set(Some(cpus));
    if s.config.cpus as usize > MAX_CPUS {
        s.note_text("cpus_ignored", "the guest brings up at most 8 vCPUs");
    }
    Ok(cpus)
}

/// INIT, SIPI, and a second SIPI if the AP is not up in time (the MP protocol).
fn start_one(info: &BootInfo, cpu: usize) -> Result<(), Refusal> {
    let params = (crate::convert::usize_from(TRAMPOLINE_ADDR) + smp::params_offset())
        as *mut TrampolineParams;
    // SAFETY: the parameters lie inside the trampoline's copy, written before the SIPI.
    unsafe {
        params.write_volatile(TrampolineParams {
            cr3: crate::mem::paging::root() as u64,
            stack: smp::stack_top(cpu, 0),
            cpu: cpu as u64,
            entry: smp::ap_entry as *const () as u64,
        })
    };
    // APIC IDs are the vCPU indices on KVM and QEMU; `cpu` < MAX_CPUS.
    let id = u8::try_from(cpu).map_err(|_| (Status::Error, "CPU index past 255"))?;
    apic::send_init(id);
    for _ in 0..2 {
        apic::send_startup(id, TRAMPOLINE_PAGE);
        if wait(info, START_MS, || {
            smp::ONLINE[cpu].load(Ordering::Acquire) != 0
        }) {
            return Ok(());
        }
    }
    ap_failed()?;
    Err((
        Status::Error,
        "an application processor did not come up after INIT and two SIPIs",
    ))
}

/// Spins (at CPL3) until `done` or `ms` milliseconds pass; whether `done`.
fn wait(info: &BootInfo, ms: u64, mut done: impl FnMut() -> bool) -> bool {
    let limit = cycles_in_ms(info, ms);
    let start = rdtsc_fenced();
    while !done() {
        if rdtsc_fenced().wrapping_sub(start) > limit {
            return false;
        }
        core::hint::spin_loop();
    }
    true
}

/// An AP's recorded exception, as an error.
fn ap_failed() -> Result<(), Refusal> {
    if smp::FAULT_VECTOR.load(Ordering::Acquire) != 0 {
        return Err((Status::Error, "an application processor took an exception"));
    }
    Ok(())
}

fn report_fault(s: &Sampler) {
    let vector = smp::FAULT_VECTOR.load(Ordering::Acquire);
    if vector != 0 {
        s.note_hex("ap_fault_vector", vector - 1);
        s.note_hex("ap_fault_rip", smp::FAULT_RIP.load(Ordering::Acquire));
    }
}

/// `sched.ipi`: the boot vCPU to AP 1 and back.
pub fn ipi(s: &Sampler, info: &BootInfo) -> Outcome {
    if s.config.cpus < 2 {
        return Err((Status::Skip, "needs 2 vCPUs or more (--vcpus 2)"));
    }
    let started = start_aps(s, info);
    report_fault(s);
    if started? < 2 {
        return Err((Status::Skip, "needs 2 vCPUs or more (--vcpus 2)"));
    }
    let target = u8::try_from(smp::ONLINE[1].load(Ordering::Acquire).saturating_sub(1))
        .map_err(|_| (Status::Error, "the AP reported an APIC ID past 255"))?;
    let mut sequence = smp::IPI_ANSWER.load(Ordering::Acquire);
    let result = s.latency("", |n| {
        let start = rdtsc_fenced();
        for _ in 0..n {
            sequence = sequence.wrapping_add(1);
            smp::IPI_REQUEST.store(sequence, Ordering::Release);
            apic::send_ipi(target, apic::IPI_VECTOR);
            let answered = wait(info, ANSWER_MS, || {
                smp::IPI_ANSWER.load(Ordering::Acquire) == sequence
            });
            if !answered {
                ap_failed()?;
                return Err((
                    Status::Error,
                    "the application processor did not answer the IPI",
                ));
            }
        }
        Ok(rdtsc_fenced().wrapping_sub(start))
    });
    report_fault(s);
    result.map(|_| ())
}

/// `sched.wakeup`: the kernel arms the TSC-deadline timer and halts; deadline -> running.
pub fn wakeup(s: &Sampler, info: &BootInfo) -> Outcome {
    lapic(info)?;
    if !info.lapic.tsc_deadline {
        return Err((
            Status::Skip,
            "CPUID says the local APIC has no TSC-deadline timer",
        ));
    }
    apic::enable();
    let delay_us = s
        .param(&param::WAKEUP_DELAY_US)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(100);
    let delay = info.tsc_khz.max(1).saturating_mul(delay_us) / 1000;
    s.note_hex("delay_cycles", delay);
    // Each wake-up takes at least `delay`; the sample's cycles are only the lateness, so
    // the count is set from the delay rather than doubled on the lateness.
    let n = (s.min_cycles / delay.max(1)).clamp(1, MAX_WAKES_PER_SAMPLE);
    for (index, warmup) in s.rounds() {
        let late = kernel_loop(KernelOp::TimerWake, n, delay)?;
        s.emit_sample("", index, warmup, n, late);
    }
    Ok(())
}
