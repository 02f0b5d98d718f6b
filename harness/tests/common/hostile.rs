//! A hostile guest, built by the test in milliseconds: a PVH ELF whose few bytes of 32-bit
//! code `rep outsb` a blob the test composes to COM1 (once, N times, or forever), then write
//! an exit code to the exit port or spin. The blob is protocol lines built with
//! `LineBuilder` (CRC-valid, so the host believes them) or any raw bytes. It is booted by
//! the real `hvbench run --backend kvm --guest FILE`, so every scenario goes through the
//! whole host: session, run loop, records, summary and terminal output.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use workloads::abi::{EXIT_PORT, UART_PORT};
use workloads::protocol::{LineBuilder, LineKind};

/// Where the image loads (the PVH entry protocol starts in 32-bit protected mode with
/// paging off, so these are physical addresses).
const LOAD_ADDR: u32 = 0x10_0000;
/// File offset (and offset from `LOAD_ADDR`) of the code.
const CODE_OFFSET: usize = 0x100;
/// `XEN_ELFNOTE_PHYS32_ENTRY`.
const PHYS32_ENTRY: u32 = 18;

/// What the guest does after printing.
#[derive(Clone, Copy, Debug)]
pub enum Ending {
    /// Writes the code to the exit port (as the real guest's final status).
    Exit(u32),
    /// Spins forever with the vCPU busy (`jmp $`).
    Spin,
}

/// A guest: print `blob` `repeat` times (0: forever), then end as `ending` says.
#[derive(Clone, Debug)]
pub struct Script {
    pub blob: Vec<u8>,
    pub repeat: u32,
    pub ending: Ending,
}

impl Script {
    /// Prints `blob` once, then exits with status 0.
    pub fn once(blob: Vec<u8>) -> Self {
        Script {
            blob,
            repeat: 1,
            ending: Ending::Exit(0),
        }
    }

    /// Prints `blob` once, then spins.
    pub fn then_spin(blob: Vec<u8>) -> Self {
        Script {
            blob,
            repeat: 1,
            ending: Ending::Spin,
        }
    }

    /// Prints `blob` `repeat` times (0: forever), then exits with status 0.
    pub fn flood(blob: Vec<u8>, repeat: u32) -> Self {
        Script {
            blob,
            repeat,
            ending: Ending::Exit(0),
        }
    }
}

/// The 32-bit code: print loop, then the ending. `blob_addr` and `blob_len` locate the blob.
fn code(script: &Script, blob_addr: u32) -> Vec<u8> {
    let mut c = Vec::new();
    let len = u32::try_from(script.blob.len()).expect("blob under 4 GiB");
    // mov ebx, repeat
    c.push(0xbb);
    c.extend(script.repeat.to_le_bytes());
    let top = c.len();
    // mov esi, blob_addr ; mov ecx, len ; mov dx, UART_PORT ; rep outsb
    c.push(0xbe);
    c.extend(blob_addr.to_le_bytes());
    c.push(0xb9);
    c.extend(len.to_le_bytes());
    c.extend([0x66, 0xba]);
    c.extend(UART_PORT.to_le_bytes());
    c.extend([0xf3, 0x6e]);
    if script.repeat == 0 {
        // jmp top (rel8, back to the top of the loop)
        c.extend([0xeb, rel8(top, c.len() + 2)]);
    } else {
        // dec ebx ; jnz top
        c.push(0x4b);
        c.extend([0x75, rel8(top, c.len() + 2)]);
    }
    if let Ending::Exit(code) = script.ending {
        // mov eax, code ; out EXIT_PORT, eax
        c.push(0xb8);
        c.extend(code.to_le_bytes());
        c.extend([0xe7, u8::try_from(EXIT_PORT).expect("exit port below 256")]);
    }
    // jmp $ (also after an exit write, should the VMM let the guest go on)
    c.extend([0xeb, 0xfe]);
    c
}

/// The rel8 displacement of a jump back to `target` from the instruction ending at `next`.
fn rel8(target: usize, next: usize) -> u8 {
    let back = i8::try_from(next - target).expect("a short jump back");
    (-back).to_le_bytes()[0]
}

/// The ELF image (64-bit ELF, as PVH loaders want, holding 32-bit code).
pub fn elf(script: &Script) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_offset = EHDR + 2 * PHDR;
    let entry = LOAD_ADDR + u32::try_from(CODE_OFFSET).unwrap();
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // namesz
    note.extend(4u32.to_le_bytes()); // descsz
    note.extend(PHYS32_ENTRY.to_le_bytes());
    note.extend(b"Xen\0");
    note.extend(entry.to_le_bytes());
    assert!(note_offset + note.len() <= CODE_OFFSET);
    // The code is at most 40 bytes; the blob follows it, 16-byte aligned.
    let blob_offset = CODE_OFFSET + 64;
    let code = code(script, LOAD_ADDR + u32::try_from(blob_offset).unwrap());
    assert!(code.len() <= 64, "code of {} bytes", code.len());
    let file_len = blob_offset + script.blob.len();

    let mut f = Vec::with_capacity(file_len);
    // ELF header: ELFCLASS64, little-endian, version 1, ET_EXEC, EM_X86_64.
    f.extend(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    f.extend(2u16.to_le_bytes());
    f.extend(62u16.to_le_bytes());
    f.extend(1u32.to_le_bytes());
    f.extend(u64::from(entry).to_le_bytes()); // e_entry
    f.extend((EHDR as u64).to_le_bytes()); // e_phoff
    f.extend(0u64.to_le_bytes()); // e_shoff
    f.extend(0u32.to_le_bytes()); // e_flags
    f.extend(u16::try_from(EHDR).unwrap().to_le_bytes());
    f.extend(u16::try_from(PHDR).unwrap().to_le_bytes());
    f.extend(2u16.to_le_bytes()); // e_phnum
    f.extend([0u8; 6]); // e_shentsize, e_shnum, e_shstrndx
    assert_eq!(f.len(), EHDR);
    // PT_LOAD: the whole file at LOAD_ADDR, read-write-execute.
    let phdr = |f: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, addr: u64, size: u64| {
        f.extend(kind.to_le_bytes());
        f.extend(flags.to_le_bytes());
        f.extend(offset.to_le_bytes());
        f.extend(addr.to_le_bytes()); // p_vaddr
        f.extend(addr.to_le_bytes()); // p_paddr
        f.extend(size.to_le_bytes()); // p_filesz
        f.extend(size.to_le_bytes()); // p_memsz
        f.extend(4u64.to_le_bytes()); // p_align
    };
    phdr(&mut f, 1, 7, 0, u64::from(LOAD_ADDR), file_len as u64);
    phdr(
        &mut f,
        4,
        4,
        note_offset as u64,
        u64::from(LOAD_ADDR) + note_offset as u64,
        note.len() as u64,
    );
    f.extend(&note);
    f.resize(CODE_OFFSET, 0);
    f.extend(&code);
    f.resize(blob_offset, 0);
    f.extend(&script.blob);
    f
}

/// Protocol lines, composed as a real guest would print them.
#[derive(Clone, Debug, Default)]
pub struct Lines(pub Vec<u8>);

impl Lines {
    pub fn new() -> Self {
        Self::default()
    }

    /// Any finished line (or bytes).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    /// A line built with `LineBuilder` (CRC-valid).
    pub fn line(
        self,
        f: impl FnOnce(&mut LineBuilder) -> &mut LineBuilder,
        kind: LineKind,
    ) -> Self {
        let mut b = LineBuilder::new(kind);
        f(&mut b);
        let bytes = b.finish().to_vec();
        self.raw(&bytes)
    }

    pub fn hello(self) -> Self {
        self.line(
            |b| {
                b.num("proto", 1)
                    .text("hv", "kvm")
                    .text("sig", "KVMKVMKVM")
                    .text("vendor", "HostileCPU")
                    .num("tsc_khz", 1_000_000)
                    .text("tsc_src", "hostile")
            },
            LineKind::Hello,
        )
    }

    pub fn start(self, w: &str) -> Self {
        self.line(|b| b.text("w", w), LineKind::Start)
    }

    /// A measured sample `n` of the workload's `latency` metric.
    pub fn sample(self, w: &str, n: u64) -> Self {
        self.line(
            |b| {
                b.text("w", w)
                    .text("m", "latency")
                    .num("n", n)
                    .num("ops", 100)
                    .num("cycles", 10_000 + n)
            },
            LineKind::Sample,
        )
    }

    pub fn result(self, w: &str, status: &str) -> Self {
        self.line(|b| b.text("w", w).text("status", status), LineKind::Result)
    }

    pub fn skip(self, w: &str, reason: &str) -> Self {
        self.line(|b| b.text("w", w).text("reason", reason), LineKind::Skip)
    }

    pub fn note(self, w: &str, key: &str, value: &str) -> Self {
        self.line(
            |b| b.text("w", w).text("k", key).text("v", value),
            LineKind::Note,
        )
    }

    pub fn end(self, status: &str) -> Self {
        self.line(|b| b.text("status", status), LineKind::End)
    }

    /// `start`, `samples` measured samples and a successful `result`.
    pub fn measured(self, w: &str, samples: u64) -> Self {
        let mut s = self.start(w);
        for n in 0..samples {
            s = s.sample(w, n);
        }
        s.result(w, "success")
    }

    pub fn bytes(self) -> Vec<u8> {
        self.0
    }
}

/// What `hvbench run` did with the hostile guest.
#[derive(Debug)]
pub struct HostileRun {
    /// `None` when the test's bound ran out and the run was killed.
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The records in `results.jsonl`, as JSON.
    pub records: Vec<serde_json::Value>,
    /// Bytes of `results.jsonl`.
    pub jsonl_bytes: u64,
    pub elapsed: Duration,
    /// Peak resident set of `hvbench` (VmHWM), in KiB, where it could be read.
    pub peak_rss_kib: Option<u64>,
    /// The results directory (kept until the `HostileRun` is dropped).
    pub out: PathBuf,
    _dir: tempfile::TempDir,
}

impl HostileRun {
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The records of workload `w`.
    pub fn of(&self, w: &str) -> Vec<&serde_json::Value> {
        self.records.iter().filter(|r| r["workload"] == w).collect()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

/// Builds the guest for `script`, runs `hvbench run --backend kvm --guest IMAGE` with
/// `args` (e.g. `-w cpu.idle`), kills it if it is still running after `bound`, and
/// collects what came out. The run is in its own process group.
pub fn run_hostile(script: &Script, args: &[&str], bound: Duration) -> HostileRun {
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = dir.path().join("hostile.elf");
    std::fs::write(&image, elf(script)).expect("write the hostile image");
    let out = dir.path().join("results");
    let mut command = super::hvbench();
    command
        .args(["run", "--backend", "kvm", "--memory-mib", "64", "--guest"])
        .arg(&image)
        .arg("--out")
        .arg(&out)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let started = Instant::now();
    let mut child = command.spawn().expect("start hvbench");
    let pid = child.id();
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut peak_rss_kib = None;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        peak_rss_kib = vm_hwm_kib(pid).or(peak_rss_kib);
        if started.elapsed() > bound {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let jsonl = out.join("results.jsonl");
    let text = std::fs::read_to_string(&jsonl).unwrap_or_default();
    let records = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    HostileRun {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        records,
        jsonl_bytes: text.len() as u64,
        elapsed,
        peak_rss_kib,
        out,
        _dir: dir,
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// The peak resident set of `pid` (VmHWM), in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
