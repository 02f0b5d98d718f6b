//! User mode (CPL3): reads the command line, runs the selected workloads in table order
//! and prints their result lines. Everything here runs natively on every host.

use workloads::abi::ExitCode;
use workloads::cmdline::{self, GuestConfig, MAX_CMDLINE};
use workloads::protocol::{LineBuilder, LineKind, Status, VERSION};
use workloads::{Requirement, WorkloadId};

use crate::arch::user::syscall;
use crate::mem;
use crate::sampler::{emit, Sampler};

/// TSC rate assumed for sizing samples when the hypervisor advertises none. It only sets
/// how long a sample runs; every figure is reported in cycles and converted by the host.
const FALLBACK_TSC_KHZ: u64 = 1_000_000;
use crate::start_info;
use crate::sysabi::{self, BootInfo, Syscall};
use crate::workloads as guest_workloads;

pub fn exit(code: ExitCode) -> ! {
    syscall(Syscall::Exit as u64, code as u64, 0, 0);
    // The kernel does not return from Exit.
    loop {
        core::hint::spin_loop();
    }
}

fn printable(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    match core::str::from_utf8(&bytes[..end]) {
        Ok(s) if s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') => s,
        _ => "?",
    }
}

fn hello(info: &BootInfo) {
    let mut line = LineBuilder::new(LineKind::Hello);
    line.num("proto", VERSION as u64)
        .text("hv", info.hypervisor.kind.name())
        .text("sig", printable(&info.hypervisor.signature))
        .text("vendor", printable(&info.vendor))
        .num("tsc_khz", info.tsc_khz)
        .text("tsc_src", info.tsc_source);
    if let Some(start) = start_info::read(info.start_info) {
        let ram: u64 = start_info::ram_ranges(&start).map(|(_, size)| size).sum();
        line.num("ram", ram);
    }
    emit(&mut line);
    if let Some(reason) = info.platform_error {
        emit(
            LineBuilder::new(LineKind::Note)
                .text("k", "platform_error")
                .text("v", reason),
        );
    }
}

fn end(status: Status) -> ! {
    emit(LineBuilder::new(LineKind::End).text("status", status.name()));
    exit(match status {
        Status::Success => ExitCode::Success,
        Status::Skip => ExitCode::Skip,
        Status::Error => ExitCode::Error,
        Status::Failure => ExitCode::Failure,
        Status::Timeout | Status::Crash => ExitCode::Crash,
    })
}

fn config(info: &BootInfo) -> Result<(GuestConfig, &'static str), &'static str> {
    let start = start_info::read(info.start_info).ok_or("no PVH start info (bad magic)")?;
    let line = start_info::cmdline(&start, MAX_CMDLINE).ok_or("no ASCII command line")?;
    let config = cmdline::parse(line).map_err(|e| e.message())?;
    Ok((config, line))
}

fn guest_side_skip(id: WorkloadId, info: &BootInfo) -> Option<&'static str> {
    for req in id.spec().requires {
        if let Requirement::OnHypervisor(allowed) = req {
            if !allowed.contains(&info.hypervisor.kind) {
                return Some("needs KVM or Xen; the guest detected neither (CPUID 0x40000000)");
            }
        }
    }
    None
}

/// Entered in user mode after an exception: prints the crash line and ends the run.
pub extern "C" fn report_crash() -> ! {
    if let Some(c) = sysabi::crash_info() {
        let mut line = LineBuilder::new(LineKind::Crash);
        if let Some(w) = c.workload {
            line.text("w", w.name());
        }
        line.num("vector", c.vector)
            .hex("err", c.error_code)
            .hex("rip", c.rip)
            .hex("cs", c.cs)
            .hex("rsp", c.rsp)
            .hex("cr2", c.cr2);
        emit(&mut line);
    }
    exit(ExitCode::Crash)
}

pub extern "C" fn user_main() -> ! {
    crate::arch::smp::set_ap_user_entry(guest_workloads::ap_user_main);
    let info = sysabi::boot_info();
    hello(&info);
    let (config, cmdline_text) = match config(&info) {
        Ok(c) => c,
        Err(reason) => {
            emit(
                LineBuilder::new(LineKind::Note)
                    .text("k", "cmdline_error")
                    .text("v", reason),
            );
            end(Status::Error);
        }
    };
    mem::arena::init(start_info::ram_end(info.start_info));
    let tsc_khz = if info.tsc_khz > 0 {
        info.tsc_khz
    } else {
        FALLBACK_TSC_KHZ
    };
    let min_cycles = config.sample_us as u64 * tsc_khz / 1000;
    let mut run_status = Status::Success;
    for id in config.workloads() {
        let name = id.name();
        if let Some(reason) = guest_side_skip(id, &info) {
            emit(
                LineBuilder::new(LineKind::Skip)
                    .text("w", name)
                    .text("reason", reason),
            );
            run_status = run_status.ratchet(Status::Skip);
            continue;
        }
        emit(LineBuilder::new(LineKind::Start).text("w", name));
        sysabi::set_current(Some(id));
        let sampler = Sampler {
            workload: id,
            config,
            min_cycles,
            cmdline: cmdline_text,
        };
        let (status, reason) = match guest_workloads::run(&sampler, &info) {
            Ok(()) => (Status::Success, None),
            Err((status, reason)) => (status, Some(reason)),
        };
        sysabi::set_current(None);
        // Whatever the workload mapped or allocated is given back.
        mem::paging::unmap();
        mem::arena::reset_work();
        let mut line = LineBuilder::new(LineKind::Result);
        line.text("w", name).text("status", status.name());
        if let Some(reason) = reason {
            line.text("reason", reason);
        }
        emit(&mut line);
        run_status = run_status.ratchet(status);
    }
    end(run_status)
}
