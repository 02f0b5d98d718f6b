//! The sending side: pre-copy rounds, then stop-and-copy, then the destination's answer.

use std::io::{BufWriter, Write};
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::dirty::{self, DirtyBitmap};
use super::pagemap::Pagemap;
use super::park::{Park, Verdict};
use super::ring::DirtyRings;
use super::state::{IrqchipState, MachineState};
use super::wire::{self, Hello, Kind, PAGE_SIZE};
use super::{
    DirtyTracking, MigrateOptions, MigrationError, MigrationReport, MigrationStream, RoundReport,
};
use crate::cast::u64_to_usize;
use crate::vstate::memory::GuestMemory;

/// How long the vCPU may take to park.
const PAUSE_LIMIT: Duration = Duration::from_secs(2);
/// Bytes buffered before a write to the socket.
const WRITE_BUFFER: usize = 4 << 20;

/// Everything the source needs from the running VM.
pub(crate) struct Source<'a> {
    pub(crate) vm: &'a VmFd,
    pub(crate) memory: &'a GuestMemory,
    pub(crate) park: &'a Park,
    pub(crate) options: MigrateOptions,
    /// The machine the destination must build (RAM size aside).
    pub(crate) vcpus: u32,
    pub(crate) irqchip: bool,
    pub(crate) balloon: bool,
    pub(crate) blk: bool,
    /// The VM's dirty rings, where it has them (else KVM's dirty log serves).
    pub(crate) rings: Option<&'a DirtyRings>,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Io { what, source }
}

/// The destination's `Refuse`, if it sent one (waiting at most a second for it).
fn refusal(answers: &mut MigrationStream) -> Option<MigrationError> {
    answers
        .set_read_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    let mut buf = Vec::new();
    match wire::read_chunk(answers, &mut buf) {
        Ok(Kind::Refuse) => Some(MigrationError::Refused(
            String::from_utf8_lossy(&buf[..buf.len().min(512)]).into_owned(),
        )),
        _ => None,
    }
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets bytes.
        unsafe { page.align_to::<u128>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

impl Source<'_> {
    fn ram_bytes(&self) -> u64 {
        self.memory
            .iter()
            .map(vm_memory::GuestMemoryRegion::len)
            .sum()
    }

    /// Migrates over `stream`; `kick` interrupts the vCPU's KVM_RUN and says whether its
    /// thread still lives. On an error the guest runs on here and logging is off again.
    pub(crate) fn run(
        &self,
        stream: MigrationStream,
        kick: impl FnMut() -> bool,
        msr_indices: Vec<u32>,
    ) -> Result<MigrationReport, MigrationError> {
        dirty::set_logging(self.vm, self.memory, true)?;
        let mut answers = stream.try_clone().map_err(io("cloning the stream"))?;
        let result = self.precopy_then_stop(stream, kick, msr_indices);
        if result.is_err() {
            let _ = dirty::set_logging(self.vm, self.memory, false);
        }
        match result {
            // A destination that refused early closed the stream under our writes: its
            // reason, where it sent one, says more than the broken pipe.
            Err(MigrationError::Io { .. }) => Err(refusal(&mut answers).unwrap_or_else(|| {
                result
                    .err()
                    .unwrap_or(MigrationError::State("unknown".into()))
            })),
            other => other,
        }
    }

    fn precopy_then_stop(
        &self,
        stream: MigrationStream,
        kick: impl FnMut() -> bool,
        msr_indices: Vec<u32>,
    ) -> Result<MigrationReport, MigrationError> {
        let started = Instant::now();
        let reader = stream.try_clone().map_err(io("cloning the stream"))?;
        let mut w = BufWriter::with_capacity(WRITE_BUFFER, stream);
        let ram_bytes = self.ram_bytes();
        let mut report = MigrationReport {
            ram_bytes,
            dirty_tracking: if self.rings.is_some() {
                DirtyTracking::DirtyRing
            } else {
                DirtyTracking::DirtyLog
            },
            ..Default::default()
        };
        let hello = Hello {
            ram_bytes,
            vcpus: self.vcpus,
            irqchip: self.irqchip,
            balloon: self.balloon,
            blk: self.blk,
        }
        .encode();
        report.bytes +=
            wire::write_chunk(&mut w, Kind::Hello, &[&hello]).map_err(io("sending Hello"))? as u64;
        report.setup = started.elapsed();
        let mut pending = DirtyBitmap::all(ram_bytes / PAGE_SIZE);
        loop {
            let round = self.send_round(&mut w, &pending, report.rounds.len(), false)?;
            pending = dirty::fetch(self.vm, self.memory, self.rings)?;
            let bandwidth = round.bytes.max(1) as f64 / round.duration.as_secs_f64().max(1e-6);
            let left =
                Duration::from_secs_f64(pending.count() as f64 * PAGE_SIZE as f64 / bandwidth);
            report.bytes += round.bytes;
            report.rounds.push(RoundReport {
                dirtied: pending.count(),
                ..round
            });
            report.converged = left <= self.options.downtime_limit;
            if report.converged || report.rounds.len() >= self.options.max_rounds.max(1) as usize {
                break;
            }
        }
        self.stop_and_copy(&mut w, reader, pending, kick, msr_indices, &mut report)?;
        report.ring_full_exits = self.rings.map_or(0, DirtyRings::full_exits);
        report.total = started.elapsed();
        Ok(report)
    }

    /// Sends the pages set in `pages` as runs; all-zero pages travel as `Zeros`.
    fn send_round(
        &self,
        w: &mut impl Write,
        pages: &DirtyBitmap,
        round: usize,
        paused: bool,
    ) -> Result<RoundReport, MigrationError> {
        let started = Instant::now();
        let mut report = RoundReport {
            paused,
            ..Default::default()
        };
        let mut buf = vec![0u8; u64_to_usize(u64::from(wire::MAX_RUN_PAGES) * PAGE_SIZE)];
        let pagemap = Pagemap::open();
        for (first, count) in pages.runs(wire::MAX_RUN_PAGES) {
            let len = u64_to_usize(u64::from(count) * PAGE_SIZE);
            let host = self
                .memory
                .get_host_address(GuestAddress(first * PAGE_SIZE))
                .map_err(|e| MigrationError::State(format!("guest RAM address: {e}")))?;
            if pagemap.all_untouched(host as u64, u64_to_usize(u64::from(count))) {
                let header = wire::run_header(first, count);
                report.zero_pages += u64::from(count);
                report.bytes += wire::write_chunk(w, Kind::Zeros, &[&header])
                    .map_err(io("sending pages"))? as u64;
                continue;
            }
            let data = &mut buf[..len];
            self.memory
                .read_slice(data, GuestAddress(first * PAGE_SIZE))
                .map_err(|e| MigrationError::State(format!("reading guest RAM: {e}")))?;
            self.send_run(w, first, data, &mut report)?;
        }
        let mut end = Vec::with_capacity(16);
        end.extend(u32::try_from(round).unwrap_or(u32::MAX).to_le_bytes());
        end.extend(0u32.to_le_bytes());
        end.extend((report.pages + report.zero_pages).to_le_bytes());
        report.bytes +=
            wire::write_chunk(w, Kind::RoundEnd, &[&end]).map_err(io("sending pages"))? as u64;
        w.flush().map_err(io("sending pages"))?;
        report.duration = started.elapsed();
        Ok(report)
    }

    /// One run read from RAM, split where pages turn from zero to non-zero.
    fn send_run(
        &self,
        w: &mut impl Write,
        first: u64,
        data: &[u8],
        report: &mut RoundReport,
    ) -> Result<(), MigrationError> {
        let page = u64_to_usize(PAGE_SIZE);
        let zero: Vec<bool> = data.chunks_exact(page).map(is_zero).collect();
        let mut i = 0;
        while i < zero.len() {
            let n = zero[i..].iter().take_while(|z| **z == zero[i]).count();
            let header = wire::run_header(first + i as u64, u32::try_from(n).unwrap_or(0));
            let (kind, body): (Kind, &[u8]) = if zero[i] {
                report.zero_pages += n as u64;
                (Kind::Zeros, &[])
            } else {
                report.pages += n as u64;
                (Kind::Pages, &data[i * page..(i + n) * page])
            };
            report.bytes +=
                wire::write_chunk(w, kind, &[&header, body]).map_err(io("sending pages"))? as u64;
            i += n;
        }
        Ok(())
    }

    fn stop_and_copy(
        &self,
        w: &mut BufWriter<MigrationStream>,
        mut reader: MigrationStream,
        mut pending: DirtyBitmap,
        kick: impl FnMut() -> bool,
        msr_indices: Vec<u32>,
        report: &mut MigrationReport,
    ) -> Result<(), MigrationError> {
        let paused = Instant::now();
        let mut state = self
            .park
            .request(msr_indices, PAUSE_LIMIT, kick)
            .map_err(MigrationError::Pause)?;
        report.pause = paused.elapsed();
        report.msrs_unreadable = state.vcpu.msrs_unreadable;
        report.msrs_left_out = state.vcpu.msrs_left_out.clone();
        // Every vCPU is out of KVM_RUN: the irqchip holds still.
        let result = if self.irqchip {
            IrqchipState::capture(self.vm).map(|chips| state.irqchip = Some(chips))
        } else {
            Ok(())
        }
        .and_then(|()| self.final_copy(w, &mut pending, &state, report))
        .and_then(|()| self.handshake(&mut reader));
        match result {
            Ok(()) => {}
            Err(e) => {
                self.park.decide(Verdict::Resume);
                return Err(e);
            }
        }
        // Go is (being) sent: from here on the guest is the destination's, whatever comes.
        self.park.decide(Verdict::HandedOver);
        let resumed_ns = self.go(w, &mut reader)?;
        report.resumed_realtime_ns = resumed_ns;
        report.downtime = paused.elapsed();
        Ok(())
    }

    /// Waits for the destination's `Ready` (it built the VM and does not run it).
    fn handshake(&self, reader: &mut MigrationStream) -> Result<(), MigrationError> {
        reader
            .set_read_timeout(Some(self.options.ack_timeout))
            .map_err(io("waiting for the destination"))?;
        let mut buf = Vec::new();
        match wire::read_chunk(reader, &mut buf)? {
            Kind::Ready => Ok(()),
            Kind::Refuse => Err(MigrationError::Refused(
                String::from_utf8_lossy(&buf[..buf.len().min(512)]).into_owned(),
            )),
            got => Err(wire::WireError::Unexpected {
                expected: "Ready",
                got,
            }
            .into()),
        }
    }

    /// Sends `Go` and waits for the `Ack`: the realtime the guest resumed at there. Any
    /// failure is [`MigrationError::Unconfirmed`]: the guest is handed over regardless.
    fn go(
        &self,
        w: &mut BufWriter<MigrationStream>,
        reader: &mut MigrationStream,
    ) -> Result<u64, MigrationError> {
        let unconfirmed = |e: &dyn std::fmt::Display| MigrationError::Unconfirmed(e.to_string());
        wire::write_chunk(w, Kind::Go, &[])
            .and_then(|_| w.flush())
            .map_err(|e| unconfirmed(&format!("sending Go: {e}")))?;
        let mut buf = Vec::new();
        match wire::read_chunk(reader, &mut buf) {
            Ok(Kind::Ack) => Ok(wire::le_u64(&buf)),
            Ok(got) => Err(unconfirmed(&format!("{got:?} came instead of Ack"))),
            Err(e) => Err(unconfirmed(&format!("waiting for Ack: {e}"))),
        }
    }

    /// The last dirty pages, the state and `Done`.
    fn final_copy(
        &self,
        w: &mut BufWriter<MigrationStream>,
        pending: &mut DirtyBitmap,
        state: &MachineState,
        report: &mut MigrationReport,
    ) -> Result<(), MigrationError> {
        let last = dirty::fetch(self.vm, self.memory, self.rings)?;
        for (p, l) in pending.0.iter_mut().zip(&last.0) {
            *p |= *l;
        }
        let mut round = self.send_round(w, pending, report.rounds.len(), true)?;
        let started = Instant::now();
        round.bytes += wire::write_chunk(w, Kind::State, &[&state.encode()])
            .map_err(io("sending the vCPU state"))? as u64;
        round.bytes += wire::write_chunk(w, Kind::Done, &[]).map_err(io("sending Done"))? as u64;
        w.flush().map_err(io("sending the vCPU state"))?;
        round.duration += started.elapsed();
        report.bytes += round.bytes;
        report.rounds.push(round);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_found_wherever_the_byte_is() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        for at in [0, 1, 15, 16, 2048, 4095] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(is_zero(&page[3..]));
    }
}
