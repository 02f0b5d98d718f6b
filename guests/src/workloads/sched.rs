//! `sched.*`: the application processors started by INIT/SIPI (from user mode: the local
//! APIC's page is mapped to CPL3), the IPI round trip and the timer wake-up.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use workloads::protocol::Status;
use workloads::table::param;
use workloads::Hypervisor;

use crate::arch::apic;
use crate::arch::apic_oneshot::{self, OneShotArgs};
use crate::arch::cpu::rdtsc_fenced;
use crate::arch::ipi::IpiArgs;
use crate::arch::smp::{self, ApMode, TrampolineParams, MAX_CPUS, TRAMPOLINE_ADDR};
use crate::arch::user::syscall;
use crate::global::Global;
use crate::hypervisor::xen_smp;
use crate::sampler::{Refusal, Sampler};
use crate::start_info;
use crate::sysabi::{BootInfo, KernelOp, Syscall};

use super::{kernel_loop, Outcome};

/// How long an AP has to come up after its SIPI, and the IPI answer to come back.
const START_MS: u64 = 500;
const ANSWER_MS: u64 = 1000;
/// The SIPI vector: the trampoline's page number (0x8000 >> 12).
const TRAMPOLINE_PAGE: u8 = 0x08;
const _: () = assert!(TRAMPOLINE_PAGE as u64 == TRAMPOLINE_ADDR >> 12);
/// Fewest acquisitions in one `sched.lock-holder` sample.
const MIN_ACQUIRES: u64 = 16;
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
    if info.hypervisor.kind == Hypervisor::Xen {
        for cpu in 1..cpus {
            start_one_xen(s, info, cpu)?;
        }
        s.note_text("ap_start", "xen-vcpuop-up");
        return Ok(finish_start(s, cpus));
    }
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
    s.note_text("ap_start", "init-sipi");
    Ok(finish_start(s, cpus))
}

fn finish_start(s: &Sampler, cpus: usize) -> usize {
    STARTED.set(Some(cpus));
    if s.config.cpus as usize > MAX_CPUS {
        s.note_text("cpus_ignored", "the guest brings up at most 8 vCPUs");
    }
    cpus
}

/// Xen: VCPUOP_initialise and VCPUOP_up through the kernel, then wait for the AP.
fn start_one_xen(s: &Sampler, info: &BootInfo, cpu: usize) -> Result<(), Refusal> {
    let status = syscall(Syscall::XenVcpuUp as u64, cpu as u64, 0, 0);
    if status != 0 {
        s.note_hex("vcpu_up_status", status);
        return Err((
            Status::Error,
            match status >> 32 {
                xen_smp::UP_STEP_INITIALISE => "Xen refused VCPUOP_initialise for an AP",
                xen_smp::UP_STEP_UP => "Xen refused VCPUOP_up for an AP",
                _ => "the kernel would not start the AP on Xen",
            },
        ));
    }
    if wait(info, START_MS * 4, || {
        smp::ONLINE[cpu].load(Ordering::Acquire) != 0
    }) {
        return Ok(());
    }
    ap_failed()?;
    Err((
        Status::Error,
        "an application processor did not come up after VCPUOP_up",
    ))
}

/// INIT, SIPI, and a second SIPI if the AP is not up in time (the MP protocol).
fn start_one(info: &BootInfo, cpu: usize) -> Result<(), Refusal> {
    let params = (crate::convert::usize_from(TRAMPOLINE_ADDR) + smp::params_offset())
        as *mut TrampolineParams;
    // SAFETY: the parameters lie inside the trampoline's copy, written before the SIPI.
    unsafe {
        params.write_volatile(TrampolineParams {
            cr3: crate::mem::paging::root() as u64,
            stack: smp::stack_top(cpu, smp::STACK_KERNEL),
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

/// `sched.ipi`: the boot vCPU to AP 1 and back: the answer an IPI of its own
/// (`ipi_back=1`, taken at CPL0) or the AP's memory write (`ipi_back=0`, seen at CPL3).
pub fn ipi(s: &Sampler, info: &BootInfo) -> Outcome {
    if s.config.cpus < 2 {
        return Err((Status::Skip, "needs 2 vCPUs or more (--vcpus 2)"));
    }
    let started = start_aps(s, info);
    report_fault(s);
    if started? < 2 {
        return Err((Status::Skip, "needs 2 vCPUs or more (--vcpus 2)"));
    }
    // On Xen the IPI goes through Xen's emulated local APIC (vlapic), not an event channel.
    s.note_text(
        "ipi_path",
        match info.hypervisor.kind {
            Hypervisor::Xen => "xen-emulated-lapic",
            _ => "lapic",
        },
    );
    let target = u8::try_from(smp::ONLINE[1].load(Ordering::Acquire).saturating_sub(1))
        .map_err(|_| (Status::Error, "the AP reported an APIC ID past 255"))?;
    let back = s.param(&param::IPI_BACK).is_none_or(|v| v != "0");
    s.note_text("ipi_answer", if back { "ipi" } else { "memory" });
    let result = if back {
        ipi_both_ways(s, info, target)
    } else {
        ipi_memory_answer(s, info, target)
    };
    smp::set_ipi_reply(None);
    report_fault(s);
    result
}

/// The round trip with an IPI each way, timed by the kernel with interrupts on.
fn ipi_both_ways(s: &Sampler, info: &BootInfo, target: u8) -> Outcome {
    smp::set_ipi_reply(Some(apic::id()));
    let args = IpiArgs {
        target: u32::from(target),
        limit_cycles: cycles_in_ms(info, ANSWER_MS),
    };
    s.latency("", |n| {
        // An AP that faulted says so rather than the loop's timeout.
        kernel_loop(KernelOp::IpiRoundTrip, n, &args as *const IpiArgs as u64)
            .map_err(|timeout| ap_failed().err().unwrap_or(timeout))
    })
    .map(drop)
}

/// The IPI there, the AP's memory write back, seen by the boot vCPU spinning at CPL3.
fn ipi_memory_answer(s: &Sampler, info: &BootInfo, target: u8) -> Outcome {
    let mut sequence = smp::IPI_ANSWER.load(Ordering::Acquire);
    s.latency("", |n| {
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
    })
    .map(drop)
}

/// `sched.wakeup`: the kernel arms the local APIC's timer and halts; deadline -> running.
/// The TSC-deadline mode where CPUID offers it, else one-shot mode at a rate measured
/// against the TSC first (Xen's emulated APIC for PVH in the lab); the record says which.
pub fn wakeup(s: &Sampler, info: &BootInfo) -> Outcome {
    lapic(info)?;
    apic::enable();
    let delay_us = s
        .param(&param::WAKEUP_DELAY_US)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(100);
    let delay = info.tsc_khz.max(1).saturating_mul(delay_us) / 1000;
    s.note_hex("delay_cycles", delay);
    let oneshot = if info.lapic.tsc_deadline {
        s.note_text("timer", "lapic-tsc-deadline");
        None
    } else {
        Some(oneshot_args(s, info, delay)?)
    };
    let wake = |n: u64| match &oneshot {
        None => kernel_loop(KernelOp::TimerWake, n, delay),
        Some(args) => kernel_loop(
            KernelOp::TimerWakeOneShot,
            n,
            args as *const OneShotArgs as u64,
        ),
    };
    // Each wake-up takes the delay plus its lateness; the sample's cycles are only the
    // lateness, so the count is set from both (one unrecorded wake-up measures the
    // lateness: under emulation it is many times the delay) rather than doubled on it.
    let probe = wake(1)?;
    let n = (s.min_cycles / delay.saturating_add(probe).max(1)).clamp(1, MAX_WAKES_PER_SAMPLE);
    for (index, warmup) in s.rounds() {
        let late = wake(n)?;
        s.emit_sample("", index, warmup, n, late);
    }
    Ok(())
}

/// TSC cycles over which the one-shot timer's rate is measured (10 ms).
const CALIBRATE_MS: u64 = 10;

/// The one-shot timer's count for `delay` TSC cycles, from its measured rate.
fn oneshot_args(s: &Sampler, info: &BootInfo, delay: u64) -> Result<OneShotArgs, Refusal> {
    let Some(rate) = apic_oneshot::calibrate(cycles_in_ms(info, CALIBRATE_MS)) else {
        return Err((
            Status::Skip,
            "the local APIC has no TSC-deadline timer and its one-shot timer did not count",
        ));
    };
    s.note_text("timer", "lapic-oneshot");
    s.note_hex("timer_calibration_ticks", rate.ticks);
    s.note_hex("timer_calibration_cycles", rate.cycles);
    let count = rate.ticks_for(delay);
    s.note_hex("timer_count", u64::from(count));
    Ok(OneShotArgs {
        count,
        delay_cycles: delay,
    })
}

/// Sets the APs' mode and wakes those halted (an IPI each; APs in user mode poll it).
fn set_ap_mode(mode: ApMode, cpus: usize) {
    smp::AP_MODE.store(mode as u32, Ordering::Release);
    for cpu in 1..cpus {
        let online = smp::ONLINE[cpu].load(Ordering::Acquire);
        if let Ok(id) = u8::try_from(online.saturating_sub(1)) {
            apic::send_ipi(id, apic::IPI_VECTOR);
        }
    }
}

/// The AP's CPL3 loop: spin counting work, or contend for the lock, until the mode says
/// halt; then back to the kernel's halt loop.
pub extern "C" fn ap_user_main() -> ! {
    let id = u32::from(apic::id()) + 1;
    let cpu = (1..MAX_CPUS)
        .find(|&c| smp::ONLINE[c].load(Ordering::Acquire) == id)
        .unwrap_or(0);
    let hold = LOCK_HOLD.load(Ordering::Acquire);
    loop {
        match smp::ap_mode() {
            ApMode::Spin if cpu > 0 => spin_chunk(cpu),
            ApMode::Lock if cpu > 0 => {
                let _ = contend_once(hold);
                bump(cpu, 1);
            }
            _ => {
                syscall(Syscall::ApIdle as u64, cpu as u64, 0, 0);
            }
        }
    }
}

/// Adds to `cpu`'s own counter (only that CPU writes it: no locked instruction).
fn bump(cpu: usize, by: u64) {
    let counter = &smp::WORK[cpu];
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// Work units between two looks at the clock or the mode.
const SPIN_CHUNK: u64 = 100_000;

fn spin_chunk(cpu: usize) {
    let mut x = 0u64;
    for i in 0..SPIN_CHUNK {
        x = core::hint::black_box(x.wrapping_add(i));
    }
    bump(cpu, SPIN_CHUNK);
}

/// `sched.steal` and `sched.fairness` in each guest: every vCPU spins at CPL3 counting
/// work for `duration_s`; every `window_ms` the boot vCPU reports each CPU's work and
/// steal time (`tick` notes: `t:<tsc>;<cpu>:<work>:<steal ns>;...`, hexadecimal).
pub fn spin_report(s: &Sampler, info: &BootInfo) -> Outcome {
    let duration_s = count_param(s, &param::SPIN_DURATION_S, 10);
    let window_ms = count_param(s, &param::SPIN_WINDOW_MS, 500);
    let steal = if info.steal_time {
        smp::STEAL_WANTED.store(1, Ordering::Release);
        syscall(Syscall::EnableStealTime as u64, 0, 0, 0);
        "kvm"
    } else if info.hypervisor.kind == Hypervisor::Xen && xen_runstate(s) {
        "xen-runstate"
    } else {
        "none"
    };
    s.note_text("steal_msr", steal);
    smp::AP_MODE.store(ApMode::Spin as u32, Ordering::Release);
    let cpus = if s.config.cpus > 1 {
        start_aps(s, info)?
    } else {
        1
    };
    set_ap_mode(ApMode::Spin, cpus);
    let window = cycles_in_ms(info, window_ms);
    let end = rdtsc_fenced().wrapping_add(cycles_in_ms(info, duration_s.saturating_mul(1000)));
    let mut next = rdtsc_fenced();
    loop {
        let now = rdtsc_fenced();
        if now >= next {
            tick(s, now, cpus);
            next = now.wrapping_add(window);
        }
        if now >= end {
            break;
        }
        spin_chunk(0);
    }
    set_ap_mode(ApMode::Halt, cpus);
    report_fault(s);
    ap_failed()
}

/// Whether Xen answers VCPUOP_get_runstate_info for every vCPU (then ticks read it).
fn xen_runstate(s: &Sampler) -> bool {
    let cpus = (s.config.cpus as usize).clamp(1, MAX_CPUS);
    let all = (0..cpus).all(|cpu| xen_steal(cpu).is_some());
    XEN_STEAL.store(all, Ordering::Release);
    all
}

static XEN_STEAL: AtomicBool = AtomicBool::new(false);

fn xen_steal(cpu: usize) -> Option<u64> {
    let steal = syscall(Syscall::XenSteal as u64, cpu as u64, 0, 0);
    (steal != u64::MAX).then_some(steal)
}

/// `cpu`'s steal so far: Xen's runstate where Xen answers, else KVM's area.
fn steal_of(cpu: usize) -> u64 {
    if XEN_STEAL.load(Ordering::Acquire) {
        xen_steal(cpu).unwrap_or(0)
    } else {
        smp::steal_ns(cpu)
    }
}

fn count_param(s: &Sampler, spec: &workloads::ParamSpec, default: u64) -> u64 {
    s.param(spec)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(default)
}

/// One `tick` note: the TSC, then each CPU's work and steal.
fn tick(s: &Sampler, now: u64, cpus: usize) {
    let mut text = TextBuffer::new();
    text.push(b"t:");
    text.hex(now);
    for cpu in 0..cpus {
        text.push(b";");
        text.hex(cpu as u64);
        text.push(b":");
        text.hex(smp::WORK[cpu].load(Ordering::Relaxed));
        text.push(b":");
        text.hex(steal_of(cpu));
    }
    s.note_text("tick", text.as_str());
}

/// A small fixed buffer for a note's value (no allocator in the guest).
struct TextBuffer {
    bytes: [u8; 384],
    len: usize,
}

impl TextBuffer {
    fn new() -> Self {
        TextBuffer {
            bytes: [0; 384],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn hex(&mut self, value: u64) {
        let digits = b"0123456789abcdef";
        let mut out = [0u8; 16];
        let mut i = out.len();
        let mut v = value;
        loop {
            i -= 1;
            out[i] = digits[(v & 15) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(&out[i..]);
    }

    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

/// The ticket lock `sched.lock-holder` contends for (FIFO, as Linux's spinlocks are: a
/// test-and-set lock lets the CPU that just released it take it again, starving the
/// others), the data it guards, and the work per hold.
static NEXT_TICKET: AtomicU32 = AtomicU32::new(0);
static NOW_SERVING: AtomicU32 = AtomicU32::new(0);
static LOCKED_DATA: AtomicU64 = AtomicU64::new(0);
static LOCK_HOLD: AtomicU64 = AtomicU64::new(200);

/// Takes a ticket, waits for its turn, holds the lock for `hold` units, releases it;
/// returns the cycles spent acquiring.
fn contend_once(hold: u64) -> u64 {
    let start = rdtsc_fenced();
    let ticket = NEXT_TICKET.fetch_add(1, Ordering::Relaxed);
    while NOW_SERVING.load(Ordering::Acquire) != ticket {
        core::hint::spin_loop();
    }
    let waited = rdtsc_fenced().wrapping_sub(start);
    for _ in 0..hold {
        let v = LOCKED_DATA.load(Ordering::Relaxed);
        LOCKED_DATA.store(core::hint::black_box(v.wrapping_add(1)), Ordering::Relaxed);
    }
    NOW_SERVING.store(ticket.wrapping_add(1), Ordering::Release);
    waited
}

/// `sched.lock-holder`: every vCPU contends; the boot vCPU times its acquires.
pub fn lock_holder(s: &Sampler, info: &BootInfo) -> Outcome {
    if s.config.cpus < 2 {
        return Err((Status::Skip, "needs 2 vCPUs or more (--vcpus 2)"));
    }
    let cpus = start_aps(s, info)?;
    LOCK_HOLD.store(count_param(s, &param::LOCK_HOLD, 200), Ordering::Release);
    let hold = LOCK_HOLD.load(Ordering::Acquire);
    set_ap_mode(ApMode::Lock, cpus);
    // As many acquisitions as fill one sample, found by doubling; at least
    // MIN_ACQUIRES, so that a sample's mean and its worst differ.
    let mut n = MIN_ACQUIRES;
    loop {
        let start = rdtsc_fenced();
        for _ in 0..n {
            contend_once(hold);
        }
        if rdtsc_fenced().wrapping_sub(start) >= s.min_cycles || n >= 1 << 24 {
            break;
        }
        n *= 2;
    }
    let work_before: u64 = (0..cpus)
        .map(|c| smp::WORK[c].load(Ordering::Relaxed))
        .sum();
    let started = rdtsc_fenced();
    for (index, warmup) in s.rounds() {
        let (mut total, mut worst) = (0u64, 0u64);
        for _ in 0..n {
            let waited = contend_once(hold);
            total = total.wrapping_add(waited);
            worst = worst.max(waited);
        }
        bump(0, n);
        s.emit_metric_sample("acquire", "", index, warmup, n, total);
        s.emit_metric_sample("acquire_max", "", index, warmup, 1, worst);
    }
    let elapsed = rdtsc_fenced().wrapping_sub(started).max(1);
    set_ap_mode(ApMode::Halt, cpus);
    let work_after: u64 = (0..cpus)
        .map(|c| smp::WORK[c].load(Ordering::Relaxed))
        .sum();
    let per_second = work_after
        .wrapping_sub(work_before)
        .saturating_mul(info.tsc_khz.max(1) * 1000)
        / elapsed;
    s.note_hex("acquisitions_per_s", per_second);
    s.note_hex("contenders", cpus as u64);
    report_fault(s);
    ap_failed()
}
