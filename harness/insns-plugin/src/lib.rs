//! A QEMU TCG plugin (API version 1) that counts the instructions a vCPU executes between
//! the hvbench guest's start and stop markers, and appends one line per sample to a file.
//! See README.md for the markers, the output and the method. GPL-2.0-or-later: it is
//! loaded into QEMU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// The start marker: `nop dword [rax+rax*1+0x53627668]` ("hvbS").
pub const START_MARKER: [u8; 8] = [0x0f, 0x1f, 0x84, 0x00, b'h', b'v', b'b', b'S'];
/// The stop marker: the same NOP with "hvbE".
pub const STOP_MARKER: [u8; 8] = [0x0f, 0x1f, 0x84, 0x00, b'h', b'v', b'b', b'E'];
/// The first word of every output line, and the format's version after it.
pub const LINE_TAG: &str = "hvbench-insns 1";
/// vCPUs counted; instructions of a vCPU beyond these are not counted (and a marker there
/// yields no line).
pub const MAX_VCPUS: usize = 64;

/// Which marker an instruction is, from its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    Start,
    Stop,
}

impl Marker {
    pub fn of(bytes: &[u8]) -> Option<Marker> {
        if bytes == START_MARKER {
            Some(Marker::Start)
        } else if bytes == STOP_MARKER {
            Some(Marker::Stop)
        } else {
            None
        }
    }
}

/// What one stop marker yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sample {
    /// Instructions from the start marker (included) to the stop marker (excluded).
    Counted { seq: u64, vcpu: usize, insns: u64 },
    /// The stop marker ran on another vCPU than its start: no count.
    Moved { seq: u64, vcpu: usize, from: usize },
    /// vCPUs ran on more than one host thread (QEMU without `thread=single`): no count.
    Concurrent { seq: u64, vcpu: usize },
}

impl Sample {
    pub fn line(&self) -> String {
        match *self {
            Sample::Counted { seq, vcpu, insns } => {
                format!("{LINE_TAG} seq={seq} vcpu={vcpu} insns={insns}\n")
            }
            Sample::Moved { seq, vcpu, from } => {
                format!("{LINE_TAG} seq={seq} vcpu={vcpu} moved={from}\n")
            }
            Sample::Concurrent { seq, vcpu } => {
                format!("{LINE_TAG} seq={seq} vcpu={vcpu} concurrent=1\n")
            }
        }
    }
}

/// Per-vCPU instruction counts, kept exact from one running count of every instruction
/// started (QEMU adds 1 to it before each instruction, an inline operation: API v1 has one
/// location for all vCPUs). That is exact only while one host thread runs every vCPU
/// (`-accel tcg,thread=single`): at each translation block's start the count since the
/// last block goes to the vCPU that ran it. A block left early counts only what ran.
#[derive(Debug)]
pub struct Counters {
    /// Instructions of each vCPU up to the start of the block running now.
    executed: [AtomicU64; MAX_VCPUS],
    /// The vCPU running now, and the running count when its block started.
    running: AtomicU64,
    running_since: AtomicU64,
    /// The counter position of the open start marker on each vCPU; `NONE` when none.
    started_at: [AtomicU64; MAX_VCPUS],
    /// The vCPU of the last start marker, and the sequence number of samples.
    last_start_vcpu: AtomicU64,
    seq: AtomicU64,
    /// The first host thread seen running vCPUs; another one makes every count void.
    owner: AtomicU64,
    concurrent: AtomicBool,
}

const NONE: u64 = u64::MAX;

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

impl Counters {
    pub const fn new() -> Self {
        Self {
            executed: [const { AtomicU64::new(0) }; MAX_VCPUS],
            running: AtomicU64::new(NONE),
            running_since: AtomicU64::new(0),
            started_at: [const { AtomicU64::new(NONE) }; MAX_VCPUS],
            last_start_vcpu: AtomicU64::new(NONE),
            seq: AtomicU64::new(0),
            owner: AtomicU64::new(0),
            concurrent: AtomicBool::new(false),
        }
    }

    /// A block starts on `vcpu`, run by host thread `thread` (non-zero), with the running
    /// count at `total`: what ran since the last block start goes to the vCPU that ran it.
    pub fn block(&self, vcpu: usize, thread: u64, total: u64) {
        // One thread runs every vCPU, so plain loads and stores suffice: these run on
        // every block, and a locked read-modify-write tripled the plugin's cost.
        let owner = self.owner.load(Ordering::Relaxed);
        if owner != thread {
            if owner == 0 {
                self.owner.store(thread, Ordering::Relaxed);
            } else {
                // Two threads add to one count: nothing can be attributed any more.
                self.concurrent.store(true, Ordering::Relaxed);
            }
        }
        let since = self.running_since.load(Ordering::Relaxed);
        let previous = self.running.load(Ordering::Relaxed);
        self.running_since.store(total, Ordering::Relaxed);
        if previous != vcpu as u64 {
            self.running.store(vcpu as u64, Ordering::Relaxed);
        }
        let previous = usize::try_from(previous).ok();
        if let Some(counter) = previous.and_then(|p| self.executed.get(p)) {
            let ran = total.wrapping_sub(since);
            counter.store(
                counter.load(Ordering::Relaxed).wrapping_add(ran),
                Ordering::Relaxed,
            );
        }
    }

    /// Instructions `vcpu` has started, with the running count at `total`.
    fn position(&self, vcpu: usize, total: u64) -> Option<u64> {
        let mut position = self.executed.get(vcpu)?.load(Ordering::Relaxed);
        if self.running.load(Ordering::Relaxed) == vcpu as u64 {
            let since = self.running_since.load(Ordering::Relaxed);
            position = position.wrapping_add(total.wrapping_sub(since));
        }
        Some(position)
    }

    /// A marker ran on `vcpu`, with the running count at `total`.
    pub fn marker(&self, vcpu: usize, marker: Marker, total: u64) -> Option<Sample> {
        let position = self.position(vcpu, total)?;
        match marker {
            Marker::Start => {
                self.started_at[vcpu].store(position, Ordering::Relaxed);
                self.last_start_vcpu.store(vcpu as u64, Ordering::Relaxed);
                None
            }
            Marker::Stop => self.stop(vcpu, position),
        }
    }

    fn stop(&self, vcpu: usize, position: u64) -> Option<Sample> {
        let started = self.started_at[vcpu].swap(NONE, Ordering::Relaxed);
        if started != NONE {
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            if self.concurrent.load(Ordering::Relaxed) {
                return Some(Sample::Concurrent { seq, vcpu });
            }
            return Some(Sample::Counted {
                seq,
                vcpu,
                insns: position.saturating_sub(started),
            });
        }
        // A stop without a start here: the sample moved, if another vCPU has one open.
        let from = self.last_start_vcpu.swap(NONE, Ordering::Relaxed);
        let from = usize::try_from(from).ok().filter(|f| *f < MAX_VCPUS)?;
        if self.started_at[from].swap(NONE, Ordering::Relaxed) == NONE {
            return None;
        }
        Some(Sample::Moved {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            vcpu,
            from,
        })
    }
}

/// The `out=PATH` argument among QEMU's plugin arguments.
pub fn out_path<'a>(args: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    args.into_iter()
        .find_map(|arg| arg.strip_prefix("out="))
        .filter(|p| !p.is_empty())
}

#[cfg(not(test))]
mod plugin {
    use super::*;
    use std::cell::UnsafeCell;
    use std::ffi::c_void;
    use std::fs::File;
    use std::io::Write;
    use std::sync::Mutex;

    use qemu_plugin::install::{Args, Info};
    use qemu_plugin::plugin::{HasCallbacks, Register};
    use qemu_plugin::{
        qemu_plugin_register_vcpu_insn_exec_inline, register, PluginId, PluginOp, TranslationBlock,
    };

    static COUNTERS: Counters = Counters::new();
    static OUT: Mutex<Option<File>> = Mutex::new(None);

    /// The running count QEMU's generated code adds 1 to before every instruction.
    struct Total(UnsafeCell<u64>);
    // SAFETY: written by QEMU's generated code and read by the callbacks below, all on the
    // one host thread that runs the vCPUs (`Counters` voids the counts if there are more).
    unsafe impl Sync for Total {}
    static TOTAL: Total = Total(UnsafeCell::new(0));

    fn total() -> u64 {
        // SAFETY: a plain aligned u64 that lives for the process; see `Total`.
        unsafe { TOTAL.0.get().read_volatile() }
    }

    /// A non-zero number for the calling host thread: the address of its own copy of a
    /// thread-local (cheap: it runs on every block).
    fn thread() -> u64 {
        thread_local! { static MINE: u8 = const { 0 }; }
        MINE.with(|mine| std::ptr::from_ref(mine) as u64)
    }

    /// Appends a sample's line; a failed write loses that line only (QEMU goes on).
    fn write_sample(sample: Sample) {
        if let Ok(mut out) = OUT.lock() {
            if let Some(file) = out.as_mut() {
                let _ = file.write_all(sample.line().as_bytes());
            }
        }
    }

    #[derive(Debug)]
    struct InsnsPlugin;

    impl Register for InsnsPlugin {
        fn register(
            &mut self,
            _id: PluginId,
            args: &Args,
            _info: &Info,
        ) -> qemu_plugin::Result<()> {
            let path = out_path(args.raw.iter().map(String::as_str)).ok_or_else(|| {
                qemu_plugin::Error::MissingArgValue {
                    argument: "out".into(),
                }
            })?;
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            if let Ok(mut out) = OUT.lock() {
                *out = Some(file);
            }
            Ok(())
        }
    }

    impl HasCallbacks for InsnsPlugin {
        fn on_translation_block_translate(
            &mut self,
            _id: PluginId,
            tb: TranslationBlock,
        ) -> qemu_plugin::Result<()> {
            tb.register_execute_callback(move |vcpu| {
                COUNTERS.block(vcpu as usize, thread(), total());
            });
            for insn in tb.instructions() {
                qemu_plugin_register_vcpu_insn_exec_inline(
                    insn.clone(),
                    PluginOp::QEMU_PLUGIN_INLINE_ADD_U64,
                    TOTAL.0.get().cast::<c_void>(),
                    1,
                );
                let Some(marker) = Marker::of(&insn.data()) else {
                    continue;
                };
                insn.register_execute_callback(move |vcpu| {
                    if let Some(sample) = COUNTERS.marker(vcpu as usize, marker, total()) {
                        write_sample(sample);
                    }
                });
            }
            Ok(())
        }
    }

    register!(InsnsPlugin);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_matched_by_all_their_bytes() {
        assert_eq!(Marker::of(&START_MARKER), Some(Marker::Start));
        assert_eq!(Marker::of(&STOP_MARKER), Some(Marker::Stop));
        // Any other NOP, or the marker cut short, is no marker.
        assert_eq!(Marker::of(&[0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0]), None);
        assert_eq!(Marker::of(&START_MARKER[..7]), None);
    }

    #[test]
    fn a_sample_counts_what_its_vcpu_ran_from_start_to_stop() {
        let c = Counters::new();
        // vCPU 1 starts a block at total 0; its start marker runs at total 4.
        c.block(1, 7, 0);
        assert_eq!(c.marker(1, Marker::Start, 4), None);
        // It leaves the block early at 6; vCPU 0 runs 1000 instructions.
        c.block(0, 7, 6);
        // vCPU 1 again: its stop marker runs 9 instructions into its next block.
        c.block(1, 7, 1006);
        let sample = c.marker(1, Marker::Stop, 1015).unwrap();
        // 2 before the switch + 9 after; vCPU 0's work is not counted.
        assert_eq!(
            sample,
            Sample::Counted {
                seq: 0,
                vcpu: 1,
                insns: 11
            }
        );
        assert_eq!(sample.line(), "hvbench-insns 1 seq=0 vcpu=1 insns=11\n");
        // vCPU 0 was credited with exactly what it ran.
        assert_eq!(c.position(0, 1015), Some(1000));
    }

    #[test]
    fn a_block_left_early_counts_only_what_ran() {
        let c = Counters::new();
        c.block(0, 1, 0);
        c.marker(0, Marker::Start, 1);
        // A 50-instruction block faults after 3; the handler's block starts at total 4.
        c.block(0, 1, 1);
        c.block(0, 1, 4);
        let Some(Sample::Counted { insns, .. }) = c.marker(0, Marker::Stop, 10) else {
            panic!("no count");
        };
        assert_eq!(insns, 9);
    }

    #[test]
    fn vcpus_on_two_host_threads_void_the_counts() {
        let c = Counters::new();
        c.block(0, 1, 0);
        c.marker(0, Marker::Start, 0);
        c.block(1, 2, 5);
        c.block(0, 1, 9);
        let sample = c.marker(0, Marker::Stop, 12).unwrap();
        assert_eq!(sample, Sample::Concurrent { seq: 0, vcpu: 0 });
        assert_eq!(sample.line(), "hvbench-insns 1 seq=0 vcpu=0 concurrent=1\n");
    }

    #[test]
    fn a_stop_on_another_vcpu_yields_no_count() {
        let c = Counters::new();
        c.block(0, 1, 0);
        c.marker(0, Marker::Start, 0);
        c.block(1, 1, 3);
        let sample = c.marker(1, Marker::Stop, 4).unwrap();
        assert_eq!(
            sample,
            Sample::Moved {
                seq: 0,
                vcpu: 1,
                from: 0
            }
        );
        assert!(sample.line().contains("moved=0"));
        // A stop with no start at all yields nothing; a vCPU beyond the table neither.
        assert_eq!(c.marker(1, Marker::Stop, 5), None);
        assert_eq!(c.marker(MAX_VCPUS, Marker::Start, 5), None);
    }

    #[test]
    fn the_output_path_comes_from_out() {
        assert_eq!(out_path(["x=1", "out=/tmp/a"]), Some("/tmp/a"));
        assert_eq!(out_path(["out="]), None);
        assert_eq!(out_path(["x=1"]), None);
    }
}
