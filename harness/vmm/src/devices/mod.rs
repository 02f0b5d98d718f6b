//! The devices of hvbench's VMM, all emulated in userspace on the vCPU thread: the COM1
//! UART, the exit port, the test port and page behind `io.*` workloads, the doorbell the
//! host rings (`mem.ksm`), (for `mem.balloon`) a virtio-balloon and (for `io.blk-*`) a
//! virtio-blk, whose requests an I/O thread of its own serves. The guest is
//! untrusted: every access is bounds-checked, and an access nothing claims is counted and
//! answered with all-ones, as on a real bus.

pub(crate) mod balloon;
pub(crate) mod blk;
pub(crate) mod serial;
pub(crate) mod virtio_mmio;

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use workloads::abi::{
    DOORBELL_HOLD_MS, DOORBELL_NOT_RUNG, DOORBELL_PORT, EXIT_PORT, MMIO_TEST_BASE, MMIO_TEST_LEN,
    MMIO_TEST_VALUE, PIO_KERNEL_PORT, PIO_TEST_PORT, PIO_TEST_VALUE, UART_PORT, UART_PORT_LEN,
    VIRTIO_BALLOON_BASE, VIRTIO_BALLOON_LEN,
};
use workloads::virtio_blk::{VIRTIO_BLK_BASE, VIRTIO_BLK_LEN};

use self::balloon::VirtioBalloon;
use self::blk::VirtioBlk;
use self::serial::ConsoleUart;

/// Exit reasons the VMM counts, in the order they appear in records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExitReason {
    PioSerial,
    PioExitPort,
    PioTest,
    /// Writes to the ioeventfd port that reached userspace (none should).
    PioKernelPortFallback,
    PioUnclaimed,
    /// Reads of the doorbell port (each may have been held while it was not rung).
    PioDoorbell,
    MmioTest,
    MmioBalloon,
    /// Register accesses of the virtio-blk (queue notifications go to its ioeventfd).
    MmioBlk,
    MmioUnclaimed,
    Hlt,
    /// KVM_RUN interrupted by a signal (a kick from the host).
    Interrupted,
}

impl ExitReason {
    pub(crate) const ALL: [ExitReason; 12] = [
        ExitReason::PioSerial,
        ExitReason::PioExitPort,
        ExitReason::PioTest,
        ExitReason::PioKernelPortFallback,
        ExitReason::PioUnclaimed,
        ExitReason::PioDoorbell,
        ExitReason::MmioTest,
        ExitReason::MmioBalloon,
        ExitReason::MmioBlk,
        ExitReason::MmioUnclaimed,
        ExitReason::Hlt,
        ExitReason::Interrupted,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            ExitReason::PioSerial => "pio_serial",
            ExitReason::PioExitPort => "pio_exit_port",
            ExitReason::PioTest => "pio_test",
            ExitReason::PioKernelPortFallback => "pio_kernel_port_fallback",
            ExitReason::PioUnclaimed => "pio_unclaimed",
            ExitReason::PioDoorbell => "pio_doorbell",
            ExitReason::MmioTest => "mmio_test",
            ExitReason::MmioBalloon => "mmio_balloon",
            ExitReason::MmioBlk => "mmio_blk",
            ExitReason::MmioUnclaimed => "mmio_unclaimed",
            ExitReason::Hlt => "hlt",
            ExitReason::Interrupted => "interrupted",
        }
    }
}

/// Exit counters, owned by the vCPU thread.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ExitCounters([u64; ExitReason::ALL.len()]);

impl ExitCounters {
    pub(crate) fn count(&mut self, reason: ExitReason) {
        self.0[reason as usize] += 1;
    }

    pub(crate) fn get(&self, reason: ExitReason) -> u64 {
        self.0[reason as usize]
    }

    /// The counts in [`ExitReason::ALL`]'s order (a migration carries them over).
    pub(crate) fn raw(&self) -> &[u64] {
        &self.0
    }

    /// Counts carried over from a migration's source; extra or missing ones are ignored.
    pub(crate) fn from_raw(counts: &[u64]) -> Self {
        let mut c = ExitCounters::default();
        for (to, from) in c.0.iter_mut().zip(counts) {
            *to = *from;
        }
        c
    }

    pub(crate) fn snapshot(&self) -> crate::ExitCounts {
        ExitReason::ALL
            .iter()
            .map(|r| (r.name(), self.get(*r)))
            .collect()
    }
}

/// What a port write asks of the VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum PioAction {
    Continue,
    /// The guest wrote its final status to the exit port.
    Exit(u32),
}

/// A value the host sets and the guest reads from [`DOORBELL_PORT`]; shared between the
/// vCPU thread and whoever rings it.
#[derive(Debug, Default)]
pub struct Doorbell {
    value: Mutex<u32>,
    rung: Condvar,
}

impl Doorbell {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Sets the value the guest reads next, and wakes a read being held.
    pub fn ring(&self, value: u32) {
        // A poisoned lock still holds a valid u32.
        let mut v = self.value.lock().unwrap_or_else(|p| p.into_inner());
        *v = value;
        self.rung.notify_all();
    }

    pub fn value(&self) -> u32 {
        *self.value.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value, waiting up to `hold` while it is still [`DOORBELL_NOT_RUNG`], so that
    /// a guest polling an unrung doorbell does not keep a host CPU busy.
    fn read_holding(&self, hold: Duration) -> u32 {
        let v = self.value.lock().unwrap_or_else(|p| p.into_inner());
        let (v, _) = self
            .rung
            .wait_timeout_while(v, hold, |v| *v == DOORBELL_NOT_RUNG)
            .unwrap_or_else(|p| p.into_inner());
        *v
    }
}

#[derive(Debug)]
pub struct Devices {
    uart: ConsoleUart,
    doorbell: Arc<Doorbell>,
    pub(crate) counters: ExitCounters,
    /// Present only in VMs booted for `mem.balloon`; elsewhere its page is unclaimed.
    balloon: Option<VirtioBalloon>,
    /// Present only in VMs booted with a disk.
    blk: Option<VirtioBlk>,
}

impl Default for Devices {
    fn default() -> Self {
        Self::new()
    }
}

impl Devices {
    pub fn new() -> Self {
        Devices {
            uart: ConsoleUart::new(),
            doorbell: Doorbell::new(),
            counters: ExitCounters::default(),
            balloon: None,
            blk: None,
        }
    }

    /// Answers the doorbell port with `doorbell` (by default, one nobody rings).
    pub(crate) fn attach_doorbell(&mut self, doorbell: Arc<Doorbell>) {
        self.doorbell = doorbell;
    }

    /// Puts the virtio-balloon at `VIRTIO_BALLOON_BASE`.
    pub(crate) fn attach_balloon(&mut self, balloon: VirtioBalloon) {
        self.balloon = Some(balloon);
    }

    pub(crate) fn has_balloon(&self) -> bool {
        self.balloon.is_some()
    }

    /// The UART's registers and FIFO (a migration carries them over).
    pub(crate) fn uart_state(&self) -> vm_superio::serial::SerialState {
        self.uart.state()
    }

    pub(crate) fn doorbell_value(&self) -> u32 {
        self.doorbell.value()
    }

    /// The balloon's state, where there is one (a migration carries it over).
    pub(crate) fn balloon_state(&self) -> Option<Vec<u8>> {
        self.balloon.as_ref().map(VirtioBalloon::save)
    }

    /// Pauses the virtio-blk, where there is one, and returns its state (see
    /// `VirtioBlk::pause`).
    pub(crate) fn pause_blk(&self, limit: Duration) -> Result<Option<Vec<u8>>, String> {
        self.blk.as_ref().map(|b| b.pause(limit)).transpose()
    }

    /// Lets a paused virtio-blk serve requests again (the migration failed).
    pub(crate) fn resume_blk(&self) {
        if let Some(blk) = &self.blk {
            blk.resume();
        }
    }

    /// Devices as a migration's source left them.
    pub(crate) fn restored(
        uart: &vm_superio::serial::SerialState,
        counts: &[u64],
        doorbell: Arc<Doorbell>,
        balloon: Option<VirtioBalloon>,
        blk: Option<VirtioBlk>,
    ) -> Result<Self, String> {
        Ok(Devices {
            uart: ConsoleUart::from_state(uart)?,
            doorbell,
            counters: ExitCounters::from_raw(counts),
            balloon,
            blk,
        })
    }

    /// Puts the virtio-blk at `VIRTIO_BLK_BASE`.
    pub(crate) fn attach_blk(&mut self, blk: VirtioBlk) {
        self.blk = Some(blk);
    }

    fn blk_offset(addr: u64, len: usize) -> Option<u64> {
        let offset = addr.checked_sub(VIRTIO_BLK_BASE)?;
        let end = offset.checked_add(len as u64)?;
        (end <= VIRTIO_BLK_LEN).then_some(offset)
    }

    fn uart_offset(port: u16) -> Option<u8> {
        port.checked_sub(UART_PORT)
            .filter(|o| *o < UART_PORT_LEN)
            .and_then(|o| u8::try_from(o).ok())
    }

    /// An OUT (or a string OUT: `data` then holds every byte of the string).
    pub fn pio_out(&mut self, port: u16, data: &[u8]) -> PioAction {
        if let Some(offset) = Self::uart_offset(port) {
            self.counters.count(ExitReason::PioSerial);
            self.uart.write(offset, data);
            return PioAction::Continue;
        }
        match port {
            EXIT_PORT => {
                self.counters.count(ExitReason::PioExitPort);
                let mut word = [0u8; 4];
                let n = data.len().min(4);
                word[..n].copy_from_slice(&data[..n]);
                PioAction::Exit(u32::from_le_bytes(word))
            }
            PIO_TEST_PORT => {
                self.counters.count(ExitReason::PioTest);
                PioAction::Continue
            }
            PIO_KERNEL_PORT => {
                self.counters.count(ExitReason::PioKernelPortFallback);
                PioAction::Continue
            }
            _ => {
                self.counters.count(ExitReason::PioUnclaimed);
                PioAction::Continue
            }
        }
    }

    /// An IN: fills `data`.
    pub fn pio_in(&mut self, port: u16, data: &mut [u8]) {
        if let Some(offset) = Self::uart_offset(port) {
            self.counters.count(ExitReason::PioSerial);
            for b in data.iter_mut() {
                *b = self.uart.read(offset);
            }
            return;
        }
        if port == PIO_TEST_PORT {
            self.counters.count(ExitReason::PioTest);
            data.fill(PIO_TEST_VALUE);
        } else if port == DOORBELL_PORT {
            self.counters.count(ExitReason::PioDoorbell);
            let value = self
                .doorbell
                .read_holding(Duration::from_millis(DOORBELL_HOLD_MS))
                .to_le_bytes();
            // A narrower read gets the low bytes; a wider one (string IN) is refused.
            if data.len() <= value.len() {
                data.copy_from_slice(&value[..data.len()]);
            } else {
                data.fill(0xff);
            }
        } else {
            self.counters.count(ExitReason::PioUnclaimed);
            data.fill(0xff);
        }
    }

    fn test_page_offset(addr: u64, len: usize) -> Option<u64> {
        let offset = addr.checked_sub(MMIO_TEST_BASE)?;
        let end = offset.checked_add(len as u64)?;
        (end <= MMIO_TEST_LEN).then_some(offset)
    }

    fn balloon_offset(addr: u64, len: usize) -> Option<u64> {
        let offset = addr.checked_sub(VIRTIO_BALLOON_BASE)?;
        let end = offset.checked_add(len as u64)?;
        (end <= VIRTIO_BALLOON_LEN).then_some(offset)
    }

    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if let (Some(offset), Some(balloon)) = (
            Self::balloon_offset(addr, data.len()),
            self.balloon.as_mut(),
        ) {
            self.counters.count(ExitReason::MmioBalloon);
            balloon.read(offset, data);
            return;
        }
        if let (Some(offset), Some(blk)) = (Self::blk_offset(addr, data.len()), self.blk.as_mut()) {
            self.counters.count(ExitReason::MmioBlk);
            blk.read(offset, data);
            return;
        }
        match Self::test_page_offset(addr, data.len()) {
            Some(offset) => {
                self.counters.count(ExitReason::MmioTest);
                let value = MMIO_TEST_VALUE.to_le_bytes();
                for (i, b) in data.iter_mut().enumerate() {
                    *b = value[(crate::cast::u64_to_usize(offset) + i) % value.len()];
                }
            }
            None => {
                self.counters.count(ExitReason::MmioUnclaimed);
                data.fill(0xff);
            }
        }
    }

    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if let (Some(offset), Some(balloon)) = (
            Self::balloon_offset(addr, data.len()),
            self.balloon.as_mut(),
        ) {
            self.counters.count(ExitReason::MmioBalloon);
            balloon.write(offset, data);
            return;
        }
        if let (Some(offset), Some(blk)) = (Self::blk_offset(addr, data.len()), self.blk.as_mut()) {
            self.counters.count(ExitReason::MmioBlk);
            blk.write(offset, data);
            return;
        }
        match Self::test_page_offset(addr, data.len()) {
            Some(_) => self.counters.count(ExitReason::MmioTest),
            None => self.counters.count(ExitReason::MmioUnclaimed),
        }
    }

    /// Console bytes written since the last call, once a line is complete (or much
    /// output is pending): one message per line keeps the host's work per byte low.
    pub fn take_console_output(&mut self, force: bool) -> Option<Vec<u8>> {
        self.uart.take_output(force)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_port_and_counters() {
        let mut d = Devices::new();
        assert_eq!(d.pio_out(EXIT_PORT, &[3, 0, 0, 0]), PioAction::Exit(3));
        assert_eq!(d.pio_out(EXIT_PORT, &[1]), PioAction::Exit(1));
        assert_eq!(d.pio_out(EXIT_PORT, &[]), PioAction::Exit(0));
        assert_eq!(d.pio_out(PIO_TEST_PORT, &[0]), PioAction::Continue);
        assert_eq!(d.pio_out(0x80, &[0]), PioAction::Continue);
        assert_eq!(d.counters.get(ExitReason::PioExitPort), 3);
        assert_eq!(d.counters.get(ExitReason::PioTest), 1);
        assert_eq!(d.counters.get(ExitReason::PioUnclaimed), 1);
        assert_eq!(d.counters.snapshot()["pio_test"], 1);
    }

    #[test]
    fn reads_are_answered_within_bounds() {
        let mut d = Devices::new();
        let mut b = [0u8; 1];
        d.pio_in(PIO_TEST_PORT, &mut b);
        assert_eq!(b, [PIO_TEST_VALUE]);
        d.pio_in(0x1234, &mut b);
        assert_eq!(b, [0xff]);

        let mut w = [0u8; 4];
        d.mmio_read(MMIO_TEST_BASE, &mut w);
        assert_eq!(u32::from_le_bytes(w), MMIO_TEST_VALUE);
        // Straddling the end of the page, or overflowing the address space: unclaimed.
        d.mmio_read(MMIO_TEST_BASE + MMIO_TEST_LEN - 2, &mut w);
        assert_eq!(w, [0xff; 4]);
        d.mmio_read(u64::MAX - 1, &mut w);
        assert_eq!(w, [0xff; 4]);
        d.mmio_write(MMIO_TEST_BASE + 8, &[1, 2, 3, 4]);
        assert_eq!(d.counters.get(ExitReason::MmioTest), 2);
        assert_eq!(d.counters.get(ExitReason::MmioUnclaimed), 2);
    }

    #[test]
    fn the_doorbell_holds_reads_until_rung() {
        let mut d = Devices::new();
        let doorbell = Doorbell::new();
        d.attach_doorbell(doorbell.clone());
        let mut w = [0u8; 4];
        let started = std::time::Instant::now();
        d.pio_in(DOORBELL_PORT, &mut w);
        assert_eq!(u32::from_le_bytes(w), DOORBELL_NOT_RUNG);
        assert!(started.elapsed() >= Duration::from_millis(DOORBELL_HOLD_MS / 2));

        // Rung from another thread while a read is held: the read returns at once.
        let ringer = {
            let doorbell = doorbell.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                doorbell.ring(0x0102_0304);
            })
        };
        d.pio_in(DOORBELL_PORT, &mut w);
        ringer.join().unwrap();
        assert_eq!(u32::from_le_bytes(w), 0x0102_0304);
        let mut b = [0u8; 1];
        d.pio_in(DOORBELL_PORT, &mut b);
        assert_eq!(b, [0x04]);
        let mut wide = [0u8; 8];
        d.pio_in(DOORBELL_PORT, &mut wide);
        assert_eq!(wide, [0xff; 8]);
        assert_eq!(d.counters.get(ExitReason::PioDoorbell), 4);
    }

    #[test]
    fn string_writes_reach_the_console() {
        let mut d = Devices::new();
        d.pio_out(UART_PORT, b"@hvb1 hello\n");
        assert_eq!(
            d.take_console_output(false).as_deref(),
            Some(&b"@hvb1 hello\n"[..])
        );
        assert_eq!(d.take_console_output(false), None);
        d.pio_out(UART_PORT, b"partial");
        assert_eq!(d.take_console_output(false), None);
        assert_eq!(
            d.take_console_output(true).as_deref(),
            Some(&b"partial"[..])
        );
    }
}
