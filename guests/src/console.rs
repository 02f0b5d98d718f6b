//! The console the result lines go to: the COM1 UART on KVM-based hosts, the PV console
//! ring on Xen. One small interface, chosen once at boot.

use workloads::abi::UART_PORT;

use crate::arch::cpu::rep_outsb;
use crate::arch::user::syscall;
use crate::global::Global;
use crate::hypervisor::xen;
use crate::sysabi::Syscall;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Console {
    /// 16550 UART at COM1. The host side is always ready, so no status polling: a whole
    /// line goes out as one string instruction, issued by the kernel.
    Uart,
    /// Xen's PV console ring, signalled through its event channel.
    XenRing,
}

static CONSOLE: Global<Console> = Global::new(Console::Uart);

pub fn select(console: Console) {
    CONSOLE.set(console);
}

fn current_cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe {
        core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags))
    }
    cs & 3
}

fn kick_from_user() {
    syscall(Syscall::ConsoleKick as u64, 0, 0, 0);
}

fn wait_from_user() {
    syscall(Syscall::Yield as u64, 0, 0, 0);
}

/// Writes bytes (whole lines, normally) to the console, from CPL0 or CPL3.
pub fn write(bytes: &[u8]) {
    match CONSOLE.get() {
        Console::Uart if current_cpl() == 0 => rep_outsb(UART_PORT, bytes),
        // String I/O from CPL3 faults on some hosts (kvm_pvm); the kernel's write is one
        // string instruction, one exit per line instead of one per byte.
        Console::Uart => {
            syscall(
                Syscall::ConsoleWrite as u64,
                bytes.as_ptr() as u64,
                bytes.len() as u64,
                0,
            );
        }
        Console::XenRing if current_cpl() == 0 => {
            xen::console_write(bytes, xen::notify_console, xen::yield_cpu)
        }
        Console::XenRing => xen::console_write(bytes, kick_from_user, wait_from_user),
    }
}

/// Waits until the host has taken everything written (Xen's ring); CPL0.
pub fn drain() {
    if CONSOLE.get() == Console::XenRing {
        xen::console_drain(xen::notify_console, xen::yield_cpu);
    }
}
