//! `mig.*`, the guest's part: for `duration_ms` (guest-timed), dirty a working set at a
//! paced rate in a pattern and print a heartbeat every `beat_ms`
//! (`note k=beat v=SEQ pages=N`: SEQ counts intervals since the start, N the pages
//! written since the last beat). The host timestamps each beat as it arrives and moves
//! the guest meanwhile. The guest keeps a checksum of the working set as it writes
//! (each page's word hashed with its page number, summed) and at the end compares it
//! with one computed from memory: a write the migration lost makes them differ.
//! Everything runs at CPL3 (under kvm_pvm CPL0 is emulated). On Xen the loop also answers
//! the toolstack's suspend request (`hypervisor::suspend`), which is how `xl migrate`
//! moves a PVH domain; the guest notes how many it answered and its domain ids.

use core::ptr::{read_volatile, write_volatile};

use workloads::protocol::{LineBuilder, LineKind, Status};
use workloads::table::param::{
    MIG_AFTER_MOVE_MS, MIG_BEAT_MS, MIG_DURATION_MS, MIG_RATE, MIG_TSC_KHZ, MIG_WS,
};
use workloads::ParamSpec;

use crate::arch::cpu::rdtsc_fenced;
use crate::hypervisor::suspend::{Outcome, SuspendWatch};
use crate::mem::arena::{alloc_work, PAGE};
use crate::sampler::{emit, Refusal, Sampler};
use crate::sysabi::BootInfo;

/// Which pages are written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// None: only the heartbeat.
    Idle,
    Sequential,
    Random,
    /// Random within the first eighth of the working set.
    Hot,
}

/// Pages written between two looks at the clock.
const BATCH: u64 = 64;

fn refuse(reason: &'static str) -> Refusal {
    (Status::Error, reason)
}

/// What a page's word contributes to the checksum.
fn mix(page: u64, word: u64) -> u64 {
    let mut x = word ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 29)
}

struct WorkingSet {
    base: u64,
    pages: u64,
    /// The checksum as the writes so far should have left memory.
    expected: u64,
    rng: u64,
    next: u64,
}

impl WorkingSet {
    fn word(&self, page: u64) -> *mut u64 {
        (self.base + page * PAGE) as *mut u64
    }

    /// The checksum computed from memory.
    fn checksum(&self) -> u64 {
        (0..self.pages).fold(0u64, |sum, p| {
            // SAFETY: page p of the working set this workload allocated.
            sum.wrapping_add(mix(p, unsafe { read_volatile(self.word(p)) }))
        })
    }

    fn pick(&mut self, pattern: Pattern) -> u64 {
        match pattern {
            Pattern::Idle | Pattern::Sequential => {
                let p = self.next;
                self.next = (self.next + 1) % self.pages;
                p
            }
            Pattern::Random | Pattern::Hot => {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let span = if pattern == Pattern::Hot {
                    (self.pages / 8).max(1)
                } else {
                    self.pages
                };
                self.rng % span
            }
        }
    }

    /// Writes `n` pages: each page's word goes up by one, the checksum with it.
    fn write(&mut self, n: u64, pattern: Pattern) {
        for _ in 0..n {
            let p = self.pick(pattern);
            let at = self.word(p);
            // SAFETY: page p of the working set; one vCPU, nothing else writes it.
            let old = unsafe { read_volatile(at) };
            let new = old.wrapping_add(1);
            // SAFETY: as above.
            unsafe { write_volatile(at, new) };
            self.expected = self
                .expected
                .wrapping_sub(mix(p, old))
                .wrapping_add(mix(p, new));
        }
    }
}

fn beat(s: &Sampler, seq: u64, pages: u64) {
    emit(
        LineBuilder::new(LineKind::Note)
            .text("w", s.workload.name())
            .text("k", "beat")
            .num("v", seq)
            .num("pages", pages),
    );
}

pub fn run(s: &Sampler, info: &BootInfo, pattern: Pattern) -> Result<(), Refusal> {
    let number = |spec: &ParamSpec| -> Result<u64, Refusal> {
        s.param(spec)
            .ok_or(refuse("a parameter has no value"))
            .and_then(|text| spec.parse_one(text).map_err(|e| refuse(e.message())))
    };
    let khz = match (info.tsc_khz, number(&MIG_TSC_KHZ)?) {
        (0, 0) => {
            return Err(refuse(
                "the guest knows no TSC frequency to pace its heartbeat",
            ))
        }
        (0, host) => host,
        (own, _) => own,
    };
    let beat_cycles = number(&MIG_BEAT_MS)? * khz;
    let mut run_cycles = number(&MIG_DURATION_MS)? * khz;
    let after_move = number(&MIG_AFTER_MOVE_MS)? * khz;
    let (ws, rate) = match pattern {
        Pattern::Idle => (PAGE, 0),
        _ => (number(&MIG_WS)?, number(&MIG_RATE)?),
    };
    let base = alloc_work(ws, PAGE).ok_or(refuse("the working set does not fit in RAM"))?;
    let mut set = WorkingSet {
        base,
        pages: ws / PAGE,
        expected: 0,
        rng: 0x2545_f491_4f6c_dd1d,
        next: 0,
    };
    // Every page starts at a known word, so the checksum covers all of them.
    for p in 0..set.pages {
        // SAFETY: page p of the working set just allocated.
        unsafe { write_volatile(set.word(p), p) };
    }
    set.expected = set.checksum();
    s.note_hex("checksum_before", set.expected);
    s.note_hex("pages", set.pages);
    let mut watch = match info.hypervisor.kind {
        workloads::Hypervisor::Xen => SuspendWatch::open().map_err(refuse)?,
        _ => None,
    };

    let start = rdtsc_fenced();
    let (mut next_seq, mut since_beat, mut written) = (0u64, 0u64, 0u64);
    loop {
        let elapsed = rdtsc_fenced().wrapping_sub(start);
        if elapsed >= run_cycles {
            break;
        }
        let seq = elapsed / beat_cycles;
        if seq >= next_seq {
            beat(s, seq, since_beat);
            since_beat = 0;
            next_seq = seq + 1;
        }
        let n = match (pattern, rate) {
            (Pattern::Idle, _) => 0,
            (_, 0) => BATCH,
            // Pages allowed by now at `rate` MB/s: elapsed * rate * 10^6 / (khz * 10^3) / 4096.
            (_, _) => {
                let allowed = u128::from(elapsed) * u128::from(rate) * 1000
                    / (u128::from(khz) * u128::from(PAGE));
                u64::try_from(allowed)
                    .unwrap_or(u64::MAX)
                    .saturating_sub(written)
                    .min(BATCH)
            }
        };
        set.write(n, pattern);
        written += n;
        since_beat += n;
        if let Some(w) = watch.as_mut() {
            let moved = w.poll().map_err(refuse)? == Some(Outcome::Moved);
            if moved && after_move > 0 {
                let now = rdtsc_fenced().wrapping_sub(start);
                run_cycles = run_cycles.min(now.saturating_add(after_move));
            }
        }
    }
    beat(s, next_seq, since_beat);
    let after = set.checksum();
    s.note_hex("pages_written", written);
    s.note_hex("checksum_expected", set.expected);
    s.note_hex("checksum_after", after);
    if let Some(w) = &watch {
        s.note_hex("xen_suspends", w.suspends);
        s.note_hex("xen_moves", w.moves);
        s.note_hex("xen_domid_first", w.first_domid);
        s.note_hex("xen_domid_last", w.domid());
    }
    if after != set.expected {
        return Err((
            Status::Failure,
            "memory check failed: the working set does not hold what the guest wrote",
        ));
    }
    Ok(())
}
