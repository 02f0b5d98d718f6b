//! The machine state that travels in the stop-and-copy phase: the vCPU (registers,
//! segment and control registers, FPU/SSE/XSAVE, XCRs, debug registers, pending events,
//! MP state, every MSR KVM lets the VMM read, the TSC with the host time it was read at)
//! and the devices (the UART's registers and FIFO, the exit counters, the doorbell).
//!
//! Encoded as a sequence of sections, each `length u32 LE | bytes`, in a fixed order; the
//! KVM structures travel as their bytes (zerocopy views from kvm-bindings' `serde`
//! feature), so a section whose length is not the structure's size is refused.

use std::time::{SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_superio::serial::SerialState;
use zerocopy::{FromBytes, IntoBytes};

use super::wire::{le_u32, le_u64, Kind, WireError};
use super::MigrationError;
use crate::devices::Devices;

/// IA32_TIME_STAMP_COUNTER.
const MSR_IA32_TSC: u32 = 0x10;
/// MSR_KVM_ASYNC_PF_INT: the vector of KVM's async page-fault "page ready" interrupt.
/// KVM refuses every write to it, 0 included, on a vCPU without the in-kernel local APIC
/// (`kvm_pv_enable_async_pf_int`), which uniprocessor guests of this VMM have not: it
/// was the one MSR KVM_SET_MSRS stopped at. At 0 (the guest never enabled async page
/// faults, as a fresh vCPU) it is left out there, and nothing is lost; otherwise it
/// travels and a refusal is counted and named.
const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
/// More MSRs than any KVM lists (a bound on what a stream may name).
const MAX_MSRS: usize = 1024;
/// vm-superio's FIFO.
const MAX_UART_FIFO: usize = 64;
/// More than any device's state, a disk's path included (a bound on what a stream may
/// send).
const MAX_DEVICE_STATE: usize = 8192;
/// How long the virtio-blk's requests in flight may take to complete at the pause.
const BLK_PAUSE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);
/// KVM_SET_XSAVE reads the kernel's XSAVE size, which exceeds `kvm_xsave` only when the
/// process enabled dynamic features (AMX); the VMM never does, and checks.
const LEGACY_XSAVE_BYTES: i32 = 4096;

/// Everything the destination needs to resume the vCPU.
#[derive(Debug)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// The in-kernel local APIC's registers (VMs with the irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// Every MSR read, the TSC among them.
    pub msrs: Vec<kvm_msr_entry>,
    /// MSRs KVM listed but would not read (left out of `msrs`).
    pub msrs_unreadable: u32,
    /// MSRs read but deliberately not carried, with the reason at their constant (the
    /// source's record names them; they do not travel).
    pub msrs_left_out: Vec<u32>,
    pub tsc_khz: u32,
    /// CLOCK_REALTIME (ns) at which the TSC was read: the destination advances the TSC by
    /// the time since, so the guest's clock keeps up with the host's across the pause.
    pub captured_realtime_ns: u64,
}

/// The devices' state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceState {
    pub uart: SerialState,
    pub exit_counts: Vec<u64>,
    pub doorbell: u32,
    /// The virtio-balloon's transport, queues and configuration (see `balloon::save`).
    pub balloon: Option<Vec<u8>>,
    /// The virtio-blk's transport, queue and disk (see `VirtioBlk::pause`).
    pub blk: Option<Vec<u8>>,
}

/// KVM's in-kernel irqchip: the two PICs and the IOAPIC (KVM_GET_IRQCHIP, chips 0..=2).
/// The VMM creates no PIT, so there is none to carry.
#[derive(Clone, Copy)]
pub struct IrqchipState {
    pub chips: [kvm_irqchip; IRQCHIPS],
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IrqchipState({} chips)", self.chips.len())
    }
}

/// PIC master, PIC slave, IOAPIC.
const IRQCHIPS: usize = 3;

impl IrqchipState {
    /// Reads the chips; call with every vCPU out of KVM_RUN.
    pub(crate) fn capture(vm: &VmFd) -> Result<Self, MigrationError> {
        let mut chips = [kvm_irqchip::default(); IRQCHIPS];
        for (id, chip) in (0u32..).zip(chips.iter_mut()) {
            chip.chip_id = id;
            vm.get_irqchip(chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
        }
        Ok(IrqchipState { chips })
    }

    /// Loads the chips into a VM whose irqchip was created.
    pub(crate) fn restore(&self, vm: &VmFd) -> Result<(), MigrationError> {
        for (id, chip) in (0u32..).zip(&self.chips) {
            if chip.chip_id != id {
                return Err(MigrationError::State(format!(
                    "irqchip {id} arrived as chip {}",
                    chip.chip_id
                )));
            }
            vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

/// What the vCPU threads capture when they park.
#[derive(Debug)]
pub struct MachineState {
    /// The boot vCPU.
    pub vcpu: VcpuState,
    /// The application processors, vCPU 1 first.
    pub aps: Vec<VcpuState>,
    /// Where the VM has the in-kernel irqchip.
    pub irqchip: Option<IrqchipState>,
    pub devices: DeviceState,
}

pub(crate) fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> MigrationError {
    move |source| MigrationError::Kvm { what, source }
}

/// Reads the MSRs in `indices` that KVM will read: KVM_GET_MSRS stops at the first it
/// refuses, so that one is dropped and the rest read again.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<(Vec<kvm_msr_entry>, u32), MigrationError> {
    let mut wanted: Vec<u32> = indices.iter().copied().take(MAX_MSRS).collect();
    let mut unreadable = 0;
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| MigrationError::State(format!("MSR list: {e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if read >= wanted.len() {
            return Ok((msrs.as_slice().to_vec(), unreadable));
        }
        wanted.remove(read);
        unreadable += 1;
    }
}

impl VcpuState {
    /// Reads the vCPU's state; call on a vCPU that is not in KVM_RUN, after any pending
    /// I/O was completed (see `Park`).
    pub(crate) fn capture(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, MigrationError> {
        let (mut msrs, msrs_unreadable) = read_msrs(fd, msr_indices)?;
        // KVM refuses this without the in-kernel irqchip: then there is none.
        let lapic = fd.get_lapic().ok();
        let mut msrs_left_out = Vec::new();
        if lapic.is_none() {
            msrs.retain(|m| {
                let out = m.index == MSR_KVM_ASYNC_PF_INT && m.data == 0;
                if out {
                    msrs_left_out.push(m.index);
                }
                !out
            });
        }
        Ok(VcpuState {
            lapic,
            msrs_left_out,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            captured_realtime_ns: realtime_ns(),
            msrs,
            msrs_unreadable,
            tsc_khz: fd.get_tsc_khz().map_err(kvm("KVM_GET_TSC_KHZ"))?,
        })
    }

    /// The TSC moved on by the host time since capture, at the source's frequency.
    fn advanced_msrs(&self, now_ns: u64) -> Vec<kvm_msr_entry> {
        let elapsed = u128::from(now_ns.saturating_sub(self.captured_realtime_ns));
        let ticks = elapsed * u128::from(self.tsc_khz) / 1_000_000;
        let ticks = u64::try_from(ticks).unwrap_or(u64::MAX);
        self.msrs
            .iter()
            .map(|m| match m.index {
                MSR_IA32_TSC => kvm_msr_entry {
                    data: m.data.wrapping_add(ticks),
                    ..*m
                },
                _ => *m,
            })
            .collect()
    }

    /// Loads the state into a fresh vCPU; returns the MSRs KVM would not take.
    pub(crate) fn restore(&self, fd: &VcpuFd, xsave_size: i32) -> Result<Vec<u32>, MigrationError> {
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        if xsave_size > LEGACY_XSAVE_BYTES {
            return Err(MigrationError::State(format!(
                "this KVM's XSAVE area is {xsave_size} bytes, over the {LEGACY_XSAVE_BYTES} \
                 the stream carries"
            )));
        }
        // SAFETY: KVM_SET_XSAVE reads the kernel's XSAVE size, which was just checked to
        // fit in `kvm_xsave` (4096 bytes).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        let refused = self.restore_msrs(fd)?;
        if let Some(lapic) = &self.lapic {
            fd.set_lapic(lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        Ok(refused)
    }

    /// KVM_SET_MSRS stops at the first MSR it refuses: that one is skipped and named.
    fn restore_msrs(&self, fd: &VcpuFd) -> Result<Vec<u32>, MigrationError> {
        let mut rest = self.advanced_msrs(realtime_ns());
        let mut refused = Vec::new();
        while !rest.is_empty() {
            let msrs = Msrs::from_entries(&rest)
                .map_err(|e| MigrationError::State(format!("MSR list: {e:?}")))?;
            let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
            if set >= rest.len() {
                break;
            }
            if rest[set].index == MSR_IA32_TSC {
                return Err(MigrationError::State("KVM refused the guest's TSC".into()));
            }
            refused.push(rest[set].index);
            rest.drain(..=set);
        }
        Ok(refused)
    }

    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .iter()
            .find(|m| m.index == MSR_IA32_TSC)
            .map(|m| m.data)
    }
}

impl DeviceState {
    /// The devices' state; the virtio-blk is paused (and stays so until resumed).
    pub(crate) fn capture(devices: &Devices) -> Result<Self, String> {
        Ok(DeviceState {
            blk: devices.pause_blk(BLK_PAUSE_LIMIT)?,
            uart: devices.uart_state(),
            exit_counts: devices.counters.raw().to_vec(),
            doorbell: devices.doorbell_value(),
            balloon: devices.balloon_state(),
        })
    }
}

/// Appends `len u32 | bytes`.
fn section(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend(u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend(bytes);
}

fn uart_bytes(s: &SerialState) -> Vec<u8> {
    let mut b = vec![
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ];
    b.extend(&s.in_buffer);
    b
}

impl VcpuState {
    fn encode(&self, out: &mut Vec<u8>) {
        section(out, self.regs.as_bytes());
        section(out, self.sregs.as_bytes());
        section(out, self.xsave.as_bytes());
        section(out, self.xcrs.as_bytes());
        section(out, self.debugregs.as_bytes());
        section(out, self.events.as_bytes());
        section(out, self.mp_state.as_bytes());
        section(out, self.lapic.as_ref().map_or(&[][..], |l| l.as_bytes()));
        section(out, self.msrs.as_bytes());
        let mut clock = Vec::with_capacity(16);
        clock.extend(self.msrs_unreadable.to_le_bytes());
        clock.extend(self.tsc_khz.to_le_bytes());
        clock.extend(self.captured_realtime_ns.to_le_bytes());
        section(out, &clock);
    }

    fn decode(r: &mut Sections<'_>) -> Result<Self, WireError> {
        let vcpu = VcpuState {
            regs: r.fixed("regs")?,
            sregs: r.fixed("sregs")?,
            xsave: r.fixed("xsave")?,
            xcrs: r.fixed("xcrs")?,
            debugregs: r.fixed("debugregs")?,
            events: r.fixed("vcpu events")?,
            mp_state: r.fixed("mp state")?,
            lapic: r.optional("local APIC")?,
            msrs: r.list("MSRs", MAX_MSRS)?,
            msrs_unreadable: 0,
            msrs_left_out: Vec::new(),
            tsc_khz: 0,
            captured_realtime_ns: 0,
        };
        let clock = r.next("clock", 16)?;
        Ok(VcpuState {
            msrs_unreadable: le_u32(&clock[..4]),
            tsc_khz: le_u32(&clock[4..8]),
            captured_realtime_ns: le_u64(&clock[8..16]),
            ..vcpu
        })
    }
}

impl MachineState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192 * (1 + self.aps.len()));
        self.vcpu.encode(&mut out);
        let aps = u32::try_from(self.aps.len()).unwrap_or(u32::MAX);
        section(&mut out, &aps.to_le_bytes());
        for ap in &self.aps {
            ap.encode(&mut out);
        }
        section(
            &mut out,
            self.irqchip
                .as_ref()
                .map_or(&[][..], |c| c.chips.as_bytes()),
        );
        section(&mut out, &uart_bytes(&self.devices.uart));
        section(&mut out, self.devices.exit_counts.as_bytes());
        section(&mut out, &self.devices.doorbell.to_le_bytes());
        section(
            &mut out,
            self.devices.balloon.as_deref().unwrap_or_default(),
        );
        section(&mut out, self.devices.blk.as_deref().unwrap_or_default());
        out
    }

    /// Decodes a state of a guest with `vcpus` vCPUs.
    pub fn decode(payload: &[u8], vcpus: u32) -> Result<Self, WireError> {
        let mut r = Sections(payload);
        let vcpu = VcpuState::decode(&mut r)?;
        let aps = le_u32(r.next("AP count", 4)?);
        if aps.checked_add(1) != Some(vcpus) {
            return Err(malformed(format!(
                "{aps} application processors in a guest of {vcpus} vCPUs"
            )));
        }
        let aps = (0..aps)
            .map(|_| VcpuState::decode(&mut r))
            .collect::<Result<Vec<_>, _>>()?;
        let irqchip = r
            .optional::<[kvm_irqchip; IRQCHIPS]>("irqchip")?
            .map(|chips| IrqchipState { chips });
        let uart = decode_uart(r.next_any("uart", 9 + MAX_UART_FIFO)?)?;
        let exit_counts = r.list("exit counts", 64)?;
        let doorbell = le_u32(r.next("doorbell", 4)?);
        let balloon = r.next_any("balloon", MAX_DEVICE_STATE)?;
        let blk = r.next_any("virtio-blk", MAX_DEVICE_STATE)?;
        if !r.0.is_empty() {
            return Err(malformed(format!(
                "{} bytes after the last section",
                r.0.len()
            )));
        }
        Ok(MachineState {
            vcpu,
            aps,
            irqchip,
            devices: DeviceState {
                uart,
                exit_counts,
                doorbell,
                balloon: (!balloon.is_empty()).then(|| balloon.to_vec()),
                blk: (!blk.is_empty()).then(|| blk.to_vec()),
            },
        })
    }
}

fn malformed(detail: String) -> WireError {
    WireError::Malformed {
        kind: Kind::State,
        detail,
    }
}

fn decode_uart(b: &[u8]) -> Result<SerialState, WireError> {
    if b.len() < 9 {
        return Err(malformed(format!("UART state of {} bytes", b.len())));
    }
    Ok(SerialState {
        baud_divisor_low: b[0],
        baud_divisor_high: b[1],
        interrupt_enable: b[2],
        interrupt_identification: b[3],
        line_control: b[4],
        line_status: b[5],
        modem_control: b[6],
        modem_status: b[7],
        scratch: b[8],
        in_buffer: b[9..].to_vec(),
    })
}

/// A reader of `len u32 | bytes` sections.
struct Sections<'a>(&'a [u8]);

impl<'a> Sections<'a> {
    /// The next section, of at most `max` bytes.
    fn next_any(&mut self, what: &str, max: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < 4 {
            return Err(malformed(format!("the stream ends before {what}")));
        }
        let len = usize::try_from(le_u32(self.0)).unwrap_or(usize::MAX);
        let rest = &self.0[4..];
        if len > max || len > rest.len() {
            return Err(malformed(format!(
                "{what}: {len} bytes (at most {max}, {} left)",
                rest.len()
            )));
        }
        let (section, rest) = rest.split_at(len);
        self.0 = rest;
        Ok(section)
    }

    /// The next section, of exactly `len` bytes.
    fn next(&mut self, what: &str, len: usize) -> Result<&'a [u8], WireError> {
        let s = self.next_any(what, len)?;
        if s.len() != len {
            return Err(malformed(format!("{what}: {} bytes, not {len}", s.len())));
        }
        Ok(s)
    }

    /// A section that is either empty (`None`) or exactly a `T`.
    fn optional<T: FromBytes>(&mut self, what: &str) -> Result<Option<T>, WireError> {
        let bytes = self.next_any(what, size_of::<T>())?;
        if bytes.is_empty() {
            return Ok(None);
        }
        T::read_from_bytes(bytes)
            .map(Some)
            .map_err(|_| malformed(format!("{what}: {} bytes", bytes.len())))
    }

    fn fixed<T: FromBytes>(&mut self, what: &str) -> Result<T, WireError> {
        let bytes = self.next(what, size_of::<T>())?;
        T::read_from_bytes(bytes).map_err(|_| malformed(format!("{what}: wrong size")))
    }

    fn list<T: FromBytes + Clone>(&mut self, what: &str, max: usize) -> Result<Vec<T>, WireError> {
        let bytes = self.next_any(what, max * size_of::<T>())?;
        if bytes.len() % size_of::<T>() != 0 {
            return Err(malformed(format!("{what}: {} bytes", bytes.len())));
        }
        bytes
            .chunks_exact(size_of::<T>())
            .map(|c| T::read_from_bytes(c).map_err(|_| malformed(format!("{what}: wrong size"))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> MachineState {
        let regs = kvm_regs {
            rip: 0x1234,
            ..Default::default()
        };
        MachineState {
            vcpu: VcpuState {
                regs,
                sregs: kvm_sregs::default(),
                xsave: kvm_xsave::default(),
                xcrs: kvm_xcrs::default(),
                debugregs: kvm_debugregs::default(),
                events: kvm_vcpu_events::default(),
                mp_state: kvm_mp_state::default(),
                lapic: None,
                msrs: vec![kvm_msr_entry {
                    index: MSR_IA32_TSC,
                    data: 1000,
                    ..Default::default()
                }],
                msrs_unreadable: 2,
                msrs_left_out: Vec::new(),
                tsc_khz: 2_000_000,
                captured_realtime_ns: 5,
            },
            devices: DeviceState {
                uart: SerialState {
                    in_buffer: vec![1, 2],
                    ..SerialState::default()
                },
                exit_counts: vec![3, 4],
                doorbell: 9,
                balloon: None,
                blk: None,
            },
            aps: Vec::new(),
            irqchip: None,
        }
    }

    #[test]
    fn state_round_trips_and_the_tsc_moves_with_host_time() {
        let s = sample();
        let back = MachineState::decode(&s.encode(), 1).unwrap();
        assert_eq!(back.vcpu.regs.rip, 0x1234);
        assert_eq!(back.vcpu.tsc(), Some(1000));
        assert_eq!(back.vcpu.msrs_unreadable, 2);
        assert_eq!(back.devices, s.devices);
        // 1 ms later at 2 GHz: 2,000,000 ticks on.
        let moved = back.vcpu.advanced_msrs(5 + 1_000_000);
        assert_eq!(moved[0].data, 1000 + 2_000_000);
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_refused() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(
                MachineState::decode(&bytes[..cut], 1).is_err(),
                "cut at {cut}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        MachineState::decode(&long, 1).unwrap_err();
        let mut lying = bytes;
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        MachineState::decode(&lying, 1).unwrap_err();
    }

    #[test]
    fn an_smp_guests_state_carries_every_vcpu_its_apic_and_the_irqchip() {
        let mut s = sample();
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 1; // the APIC ID register
        s.vcpu.lapic = Some(lapic);
        let mut ap = sample().vcpu;
        ap.regs.rip = 0x8000;
        ap.lapic = Some(lapic);
        s.aps.push(ap);
        let mut chips = [kvm_irqchip::default(); IRQCHIPS];
        chips[2].chip_id = 2;
        s.irqchip = Some(IrqchipState { chips });
        s.devices.balloon = Some(vec![1, 2, 3]);
        s.devices.blk = Some(vec![4; 100]);
        let bytes = s.encode();
        let back = MachineState::decode(&bytes, 2).unwrap();
        assert_eq!(back.aps.len(), 1);
        assert_eq!(back.aps[0].regs.rip, 0x8000);
        assert_eq!(back.aps[0].lapic.unwrap().regs[0x20], 1);
        assert_eq!(back.irqchip.unwrap().chips[2].chip_id, 2);
        assert_eq!(back.devices.balloon, Some(vec![1, 2, 3]));
        assert_eq!(back.devices.blk, Some(vec![4; 100]));
        // The vCPU count the Hello announced must match.
        MachineState::decode(&bytes, 1).unwrap_err();
        MachineState::decode(&bytes, 3).unwrap_err();
        for cut in (0..bytes.len()).step_by(97) {
            assert!(
                MachineState::decode(&bytes[..cut], 2).is_err(),
                "cut at {cut}"
            );
        }
    }
}
