//! A QEMU TCG plugin (API version 1) that counts the instructions a vCPU executes between
//! the hvbench guest's start and stop markers, and appends one line per sample to a file.
//! See README.md for the markers, the output and the method. GPL-2.0-or-later: it is
//! loaded into QEMU.

use std::sync::atomic::{AtomicU64, Ordering};

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
        }
    }
}

/// Per-vCPU instruction counters and the open sample.
#[derive(Debug)]
pub struct Counters {
    executed: [AtomicU64; MAX_VCPUS],
    /// The counter position of the open start marker on each vCPU; `NONE` when none.
    started_at: [AtomicU64; MAX_VCPUS],
    /// The vCPU of the last start marker, and the sequence number of samples.
    last_start_vcpu: AtomicU64,
    seq: AtomicU64,
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
            started_at: [const { AtomicU64::new(NONE) }; MAX_VCPUS],
            last_start_vcpu: AtomicU64::new(NONE),
            seq: AtomicU64::new(0),
        }
    }

    /// A block of `insns` instructions starts on `vcpu`.
    pub fn block(&self, vcpu: usize, insns: u64) {
        if let Some(counter) = self.executed.get(vcpu) {
            // Only this vCPU's thread writes its slot: no contention.
            counter.fetch_add(insns, Ordering::Relaxed);
        }
    }

    /// The marker at `index` of a block of `block_insns` instructions ran on `vcpu`.
    pub fn marker(
        &self,
        vcpu: usize,
        marker: Marker,
        index: u64,
        block_insns: u64,
    ) -> Option<Sample> {
        let executed = self.executed.get(vcpu)?.load(Ordering::Relaxed);
        let position = executed.saturating_sub(block_insns).saturating_add(index);
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
            return Some(Sample::Counted {
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
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
    use std::fs::File;
    use std::io::Write;
    use std::sync::Mutex;

    use qemu_plugin::install::{Args, Info};
    use qemu_plugin::plugin::{HasCallbacks, Register};
    use qemu_plugin::{register, PluginId, TranslationBlock};

    static COUNTERS: Counters = Counters::new();
    static OUT: Mutex<Option<File>> = Mutex::new(None);

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
            let insns = tb.size() as u64;
            tb.register_execute_callback(move |vcpu| {
                COUNTERS.block(vcpu as usize, insns);
            });
            for (index, insn) in tb.instructions().enumerate() {
                let Some(marker) = Marker::of(&insn.data()) else {
                    continue;
                };
                let index = index as u64;
                insn.register_execute_callback(move |vcpu| {
                    if let Some(sample) = COUNTERS.marker(vcpu as usize, marker, index, insns) {
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
    fn a_sample_counts_from_start_to_stop_on_its_vcpu() {
        let c = Counters::new();
        // Block of 10 on vCPU 1 with the start marker at index 4: 4 instructions before it.
        c.block(1, 10);
        assert_eq!(c.marker(1, Marker::Start, 4, 10), None);
        // Another vCPU's work is not counted.
        c.block(0, 1000);
        // Two more blocks on vCPU 1, the stop at index 2 of the second (of 5).
        c.block(1, 7);
        c.block(1, 5);
        let sample = c.marker(1, Marker::Stop, 2, 5).unwrap();
        // From index 4 of the first block: 6 + 7 + 2.
        assert_eq!(
            sample,
            Sample::Counted {
                seq: 0,
                vcpu: 1,
                insns: 15
            }
        );
        assert_eq!(sample.line(), "hvbench-insns 1 seq=0 vcpu=1 insns=15\n");
    }

    #[test]
    fn a_stop_on_another_vcpu_yields_no_count() {
        let c = Counters::new();
        c.block(0, 3);
        c.marker(0, Marker::Start, 0, 3);
        c.block(1, 3);
        let sample = c.marker(1, Marker::Stop, 1, 3).unwrap();
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
        assert_eq!(c.marker(1, Marker::Stop, 0, 3), None);
        assert_eq!(c.marker(MAX_VCPUS, Marker::Start, 0, 3), None);
    }

    #[test]
    fn the_output_path_comes_from_out() {
        assert_eq!(out_path(["x=1", "out=/tmp/a"]), Some("/tmp/a"));
        assert_eq!(out_path(["out="]), None);
        assert_eq!(out_path(["x=1"]), None);
    }
}
