//! COM1: vm-superio's 16550 model, its output collected for the result-line reader.

use std::io::Write;

use vm_superio::{Serial, Trigger};

/// The guest runs without interrupts, so the UART's interrupt line goes nowhere.
#[derive(Debug)]
pub(crate) struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Bytes the guest transmitted, until the vCPU loop collects them.
#[derive(Default, Debug)]
pub(crate) struct OutputBuffer(Vec<u8>);

/// Most console bytes held between two collections; the vCPU loop collects after every
/// exit, so only a guest writing megabytes in one string instruction could reach it.
const MAX_PENDING: usize = 1 << 20;

impl Write for OutputBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = MAX_PENDING.saturating_sub(self.0.len());
        self.0.extend_from_slice(&buf[..buf.len().min(room)]);
        // Bytes beyond the limit are dropped; the line reader then sees a damaged line.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Pending output sent on even without a newline.
const FLUSH_AT: usize = 4096;

#[derive(Debug)]
pub(crate) struct ConsoleUart {
    serial: Serial<NoInterrupt, vm_superio::serial::NoEvents, OutputBuffer>,
}

impl Default for ConsoleUart {
    fn default() -> Self {
        Self::new()
    }
}

impl ConsoleUart {
    pub(crate) fn new() -> Self {
        ConsoleUart {
            serial: Serial::new(NoInterrupt, OutputBuffer::default()),
        }
    }

    /// The UART as a migration's source left it (its FIFO bounded by vm-superio).
    pub(crate) fn from_state(state: &vm_superio::serial::SerialState) -> Result<Self, String> {
        Serial::from_state(
            state,
            NoInterrupt,
            vm_superio::serial::NoEvents,
            OutputBuffer::default(),
        )
        .map(|serial| ConsoleUart { serial })
        .map_err(|e| format!("UART state: {e:?}"))
    }

    pub(crate) fn state(&self) -> vm_superio::serial::SerialState {
        self.serial.state()
    }

    /// A write at `offset` from COM1. A string OUT (`rep outsb`) to the data register
    /// arrives as many bytes at once: each is one transmitted byte.
    pub(crate) fn write(&mut self, offset: u8, data: &[u8]) {
        for &byte in data {
            // Writes to our in-memory buffer cannot fail.
            let _ = self.serial.write(offset, byte);
        }
    }

    pub(crate) fn read(&mut self, offset: u8) -> u8 {
        self.serial.read(offset)
    }

    /// Pending output, if a line is complete, much is pending, or `force` is set.
    pub(crate) fn take_output(&mut self, force: bool) -> Option<Vec<u8>> {
        let pending = &mut self.serial.writer_mut().0;
        let ready = force || pending.last() == Some(&b'\n') || pending.len() >= FLUSH_AT;
        (ready && !pending.is_empty()).then(|| std::mem::take(pending))
    }
}
