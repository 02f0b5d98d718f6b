//! The hvbench guest: a freestanding x86-64 kernel with a PVH entry point.
//!
//! Boot (32-bit PVH entry, long mode) -> kernel (CPL0: traps, hypervisor detection) ->
//! runner (CPL3: command line, workloads, result lines) -> exit (port or shutdown).
#![no_std]
#![no_main]

mod arch;
mod blk;
mod builtins;
mod console;
mod convert;
mod global;
mod hypervisor;
mod kernel;
mod mem;
mod runner;
mod sampler;
mod start_info;
mod sysabi;
mod virtio;
mod workloads;

use core::fmt::Write;

use ::workloads::abi::ExitCode;
use ::workloads::protocol::{LineBuilder, LineKind};

/// Collects a panic message into a fixed buffer.
struct MessageBuffer {
    bytes: [u8; 200],
    len: usize,
}

impl Write for MessageBuffer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut message = MessageBuffer {
        bytes: [0; 200],
        len: 0,
    };
    let _ = write!(message, "{info}");
    let text = core::str::from_utf8(&message.bytes[..message.len]).unwrap_or("panic");
    console::write(
        LineBuilder::new(LineKind::Note)
            .text("k", "panic")
            .text("v", text)
            .finish(),
    );
    console::write(
        LineBuilder::new(LineKind::End)
            .text("status", "crash")
            .finish(),
    );
    kernel::exit(ExitCode::Crash)
}

/// The precompiled `core` references the unwinding personality routine even though this
/// image aborts on panic; nothing ever calls it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
