//! The contract between the guest and whatever boots it: ports, addresses and exit codes.
//!
//! The ports follow QEMU's conventions where one exists (COM1, isa-debug-exit), so the
//! same image runs unchanged under our VMM and under QEMU.

/// 16550 UART (COM1): the console on KVM-based backends.
pub const UART_PORT: u16 = 0x3f8;
/// Width of the UART's register window.
pub const UART_PORT_LEN: u16 = 8;

/// Exit port, compatible with QEMU's `isa-debug-exit,iobase=0xf4,iosize=4`: the guest writes
/// its final [`ExitCode`]; QEMU exits with `(code << 1) | 1`.
pub const EXIT_PORT: u16 = 0xf4;

/// I/O port the VMM handles in userspace (`io.pio-out`, `io.pio-in`). Unclaimed on QEMU's
/// microvm, so QEMU handles it in userspace too.
pub const PIO_TEST_PORT: u16 = 0x4f0;
/// What a VMM that implements [`PIO_TEST_PORT`] answers to a 1-byte read.
pub const PIO_TEST_VALUE: u8 = 0x5a;

/// I/O port the VMM registers as an ioeventfd (`io.pio-out-kernel`).
pub const PIO_KERNEL_PORT: u16 = 0x4f4;

/// Doorbell the host rings (`mem.ksm`): a 4-byte IN returns the value the host last set,
/// [`DOORBELL_NOT_RUNG`] until it sets one. While it is not rung, hvbench's VMM may hold the
/// read for up to [`DOORBELL_HOLD_MS`] before answering, so a guest that waits by reading
/// in a loop costs the host one exit per hold instead of a busy vCPU. A VMM without the
/// doorbell answers all-ones, as for any unclaimed port.
pub const DOORBELL_PORT: u16 = 0x4f8;
/// The doorbell's value before the host rings it.
pub const DOORBELL_NOT_RUNG: u32 = 0;
/// Longest time hvbench's VMM holds a read of an unrung doorbell.
pub const DOORBELL_HOLD_MS: u64 = 100;

/// Guest-physical page with no RAM behind it, emulated by the VMM (`io.mmio-*`). Below the
/// 32-bit MMIO hole's devices and above any RAM hvbench gives a guest below 4 GiB.
pub const MMIO_TEST_BASE: u64 = 0xd000_0000;
pub const MMIO_TEST_LEN: u64 = 0x1000;
/// What a VMM that implements [`MMIO_TEST_BASE`] answers to a 4-byte read.
pub const MMIO_TEST_VALUE: u32 = 0x5a5a_a5a5;

/// virtio-mmio (version 2) balloon device of hvbench's VMM (`mem.balloon`): the page after
/// [`MMIO_TEST_BASE`], in the range the guest maps uncached. Its registers are in
/// [`crate::virtio`].
pub const VIRTIO_BALLOON_BASE: u64 = MMIO_TEST_BASE + MMIO_TEST_LEN;
pub const VIRTIO_BALLOON_LEN: u64 = 0x1000;

/// Most RAM hvbench gives a guest below the MMIO hole (the guest maps 0..4 GiB).
pub const MAX_LOW_RAM: u64 = 0xc000_0000;

/// KVM: leaf with the TSC frequency in kHz in EAX (the "VMware timing leaf").
pub const CPUID_KVM_TSC_KHZ_LEAF: u32 = 0x4000_0010;

/// The guest's final status, written to [`EXIT_PORT`] (KVM) or carried by the shutdown
/// reason (Xen). Ordered as XTF orders results: a run's status only ratchets upwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum ExitCode {
    Success = 0,
    Skip = 1,
    Error = 2,
    Failure = 3,
    Crash = 4,
}

impl ExitCode {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Success,
            1 => Self::Skip,
            2 => Self::Error,
            3 => Self::Failure,
            4 => Self::Crash,
            _ => return None,
        })
    }
}

/// `vm.lifecycle`: the note the guest prints as soon as the workload runs (the host's
/// "first result"), and how long it then stays up, in TSC cycles (6-9 s at 2-3 GHz;
/// the host destroys it long before on a quiet machine), so the host reads its memory and
/// destroys it while it runs.
pub const LIFECYCLE_UP_KEY: &str = "up";
pub const LIFECYCLE_HOLD_CYCLES: u64 = 1 << 34;
