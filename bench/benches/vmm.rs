//! Benchmarks of hvbench's VMM against the alternatives, measured by the guest itself
//! (TSC) or on the wall clock, interleaved (ABC CBA ...) so slow drift cancels:
//!
//! 1. exit path: `io.pio-out` under hvbench's VMM, under a bare KVM_RUN loop that boots
//!    the same image and does nothing per exit, and under QEMU microvm;
//! 2. boot: process start to the guest's first result line, hvbench's VMM vs QEMU;
//! 3. stability: the spread of `cpu.cpuid` medians over 10 boots.
//!
//! `cargo bench -p hvbench-bench --bench vmm` (needs /dev/kvm; QEMU parts need
//! qemu-system-x86_64). Not a test: it prints figures and asserts nothing.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use hvbench::backend::kvm::KvmBackend;
use hvbench::backend::qemu::{QemuBackend, QemuOptions};
use hvbench::backend::Hypervisor;
use hvbench::guest_image::GuestImage;
use hvbench::run::{self, RunOptions};
use kvm_ioctls::VcpuExit;
use reports::stats::{median, summarize};
use vmm::{BareVm, Vmm};
use workloads::abi::{EXIT_PORT, PIO_TEST_VALUE, UART_PORT};
use workloads::cmdline::{self, GuestConfig};
use workloads::protocol::{decode_event, Event};
use workloads::WorkloadId;

const ROUNDS: usize = 6;
const CHILD_ENV: &str = "HVBENCH_BENCH_CHILD";

fn guest_cmdline(w: WorkloadId, samples: u32, sample_us: u32) -> String {
    let mut c = GuestConfig {
        samples,
        warmup: 1,
        sample_us,
        ..Default::default()
    };
    c.select(w);
    cmdline::encode(&c)
}

/// Per-operation cycles of the measured samples in a console transcript.
fn samples_from_console(text: &[u8]) -> Vec<f64> {
    text.split(|b| *b == b'\n')
        .filter_map(|l| decode_event(l).ok().flatten())
        .filter_map(|e| match e {
            Event::Sample(s) if !s.warmup => Some(s.cycles as f64 / s.ops as f64),
            _ => None,
        })
        .collect()
}

/// The same image under a loop that does the least a VMM can: no device model, no
/// counters, no channel; bytes for the UART are appended to a buffer.
fn bare_loop(image: &GuestImage, cmdline: &str) -> Vec<f64> {
    let vmm = Vmm::new().expect("/dev/kvm");
    let mut vm = BareVm::new(&vmm, 64, image.bytes(), cmdline).expect("vm");
    let fd = vm.vcpu();
    let mut console = Vec::new();
    loop {
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == EXIT_PORT {
                    break;
                }
                if port == UART_PORT {
                    console.extend_from_slice(data);
                }
            }
            Ok(VcpuExit::IoIn(_, data)) => data.fill(PIO_TEST_VALUE),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0),
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Hlt) => {}
            Ok(other) => panic!("bare loop: unexpected exit {other:?}"),
            Err(e) => panic!("bare loop: KVM_RUN failed: {e}"),
        }
    }
    samples_from_console(&console)
}

fn through_backend(
    backend: &dyn Hypervisor,
    image: &GuestImage,
    w: WorkloadId,
    samples: u32,
    sample_us: u32,
) -> Vec<f64> {
    let dir = std::env::temp_dir().join(format!(
        "hvbench-bench-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    let options = RunOptions {
        workloads: vec![w],
        samples,
        warmup: 1,
        sample_us,
        repeat: 1,
        workload_timeout: Duration::from_secs(60),
        boot_timeout: Duration::from_secs(60),
        memory_mib: 64,
        vcpus: 1,
        guest_path: None,
        out: dir.clone(),
        params: Vec::new(),
        insn_markers: true,
    };
    let mut writer = reports::ResultsWriter::create(&dir, false).expect("results dir");
    let flag = AtomicBool::new(false);
    let summary = run::run(backend, image, &options, &mut writer, &flag).expect("run");
    let _ = std::fs::remove_dir_all(&dir);
    summary
        .records
        .iter()
        .find(|r| r.workload == w.name())
        .map(|r| r.samples_cycles.clone())
        .unwrap_or_default()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn qemu_backend() -> Option<QemuBackend> {
    QemuBackend::new(
        QemuOptions {
            binary: "qemu-system-x86_64".into(),
            accel: hvbench::backend::qemu::QemuAccel::Kvm,
            machine: hvbench::backend::qemu::QemuMachine::Microvm,
            cpu: None,
            insns: false,
        },
        hvbench::host::fingerprint(),
    )
    .ok()
}

fn describe(name: &str, medians: &[f64], unit: &str) -> String {
    match summarize(medians) {
        Some(s) => format!(
            "{name:<24} median {:>10.1} {unit}  [{:.1}, {:.1}]  cv {:>5.2}%  n={}",
            s.median,
            s.median_ci95.low,
            s.median_ci95.high,
            s.cv * 100.0,
            s.n
        ),
        None => format!("{name:<24} no data"),
    }
}

fn exit_path(image: &GuestImage, qemu: Option<&QemuBackend>) {
    println!("\n== io.pio-out: exit to the VMM and back (cycles per exit, guest-measured; median of each boot)");
    let kvm = KvmBackend::new(hvbench::host::fingerprint()).expect("kvm backend");
    let cmd = guest_cmdline(WorkloadId::IoPioOut, 10, 10_000);
    let (mut ours, mut bare, mut peer) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let mut order: Vec<u8> = vec![0, 1, 2];
        if round % 2 == 1 {
            order.reverse();
        }
        for which in order {
            match which {
                0 => ours.extend(median(&through_backend(
                    &kvm,
                    image,
                    WorkloadId::IoPioOut,
                    10,
                    10_000,
                ))),
                1 => bare.extend(median(&bare_loop(image, &cmd))),
                _ => {
                    if let Some(q) = qemu {
                        peer.extend(median(&through_backend(
                            q,
                            image,
                            WorkloadId::IoPioOut,
                            10,
                            10_000,
                        )));
                    }
                }
            }
        }
    }
    println!("{}", describe("hvbench VMM", &ours, "cycles"));
    println!("{}", describe("bare KVM_RUN loop", &bare, "cycles"));
    println!("{}", describe("QEMU microvm (kvm)", &peer, "cycles"));
    if let (Some(o), Some(b)) = (median(&ours), median(&bare)) {
        println!("hvbench / bare  = {:.3}", o / b);
    }
    if let (Some(o), Some(q)) = (median(&ours), median(&peer)) {
        println!("hvbench / QEMU  = {:.3}", o / q);
    }
}

/// Wall time from spawning `command` to the first `sample` line on its stdout.
fn time_to_first_sample(mut command: Command) -> Option<Duration> {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let stdout = child.stdout.take()?;
    let mut found = None;
    for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
        if matches!(decode_event(&line), Ok(Some(Event::Sample(_)))) {
            found = Some(started.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    found
}

fn boot_time(image: &GuestImage, qemu_ok: bool) {
    println!("\n== process start to the guest's first result line (ms, wall clock)");
    let cmd = "hvbench run=cpu.idle samples=1 warmup=0 sample_us=100";
    let exe = std::env::current_exe().expect("own path");
    let kernel = image.write_to(&std::env::temp_dir()).expect("image file");
    let (mut ours, mut peer) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS * 2 {
        let ours_first = round % 2 == 0;
        for pass in 0..2 {
            if (pass == 0) == ours_first {
                let mut c = Command::new(&exe);
                c.env(CHILD_ENV, "vmm").arg(cmd);
                ours.extend(time_to_first_sample(c).map(|d| d.as_secs_f64() * 1e3));
            } else if qemu_ok {
                let mut c = Command::new("qemu-system-x86_64");
                c.args([
                    "-machine",
                    "microvm,x-option-roms=off,rtc=off,isa-serial=on",
                    "-accel",
                    "kvm",
                    "-cpu",
                    &hvbench::backend::qemu::default_cpu_model(
                        hvbench::backend::qemu::Accel::Kvm,
                        hvbench::host::kvm_paging().module,
                    ),
                    "-m",
                    "64M",
                    "-smp",
                    "1",
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-monitor",
                    "none",
                    "-serial",
                    "stdio",
                    "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=0x04",
                    "-no-reboot",
                    "-kernel",
                ])
                .arg(&kernel)
                .args(["-append", cmd]);
                peer.extend(time_to_first_sample(c).map(|d| d.as_secs_f64() * 1e3));
            }
        }
    }
    let _ = std::fs::remove_file(&kernel);
    println!("{}", describe("hvbench vmm", &ours, "ms"));
    println!("{}", describe("QEMU microvm (kvm)", &peer, "ms"));
}

fn cpuid_spread(image: &GuestImage) {
    println!("\n== cpu.cpuid: spread of the median over 10 boots (ns)");
    let host = hvbench::host::fingerprint();
    let khz = host.tsc_khz.unwrap_or(1_000_000) as f64;
    let kvm = KvmBackend::new(host).expect("kvm backend");
    let medians: Vec<f64> = (0..10)
        .filter_map(|_| {
            median(&through_backend(
                &kvm,
                image,
                WorkloadId::CpuCpuid,
                10,
                10_000,
            ))
        })
        .map(|cycles| cycles * 1e6 / khz)
        .collect();
    println!("{}", describe("cpu.cpuid median", &medians, "ns"));
}

fn child_vmm(cmdline: &str) -> ExitCode {
    let options = hvbench::standalone::Options {
        cmdline: cmdline.to_string(),
        memory_mib: 64,
        guest: None,
        timeout: std::time::Duration::from_secs(30),
        mergeable: false,
        doorbell_stdin: false,
        migration: None,
        vcpus: 1,
    };
    let code = hvbench::standalone::run(&options).unwrap_or(2);
    // An exit status is one byte: a code outside it is a failure, not its low byte.
    ExitCode::from(u8::try_from(code).unwrap_or(2))
}

fn main() -> ExitCode {
    if std::env::var(CHILD_ENV).as_deref() == Ok("vmm") {
        let cmdline = std::env::args().nth(1).unwrap_or_default();
        return child_vmm(&cmdline);
    }
    // `cargo bench` passes --bench; a filter argument selects sections.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let image = GuestImage::embedded().expect("guest image");
    let qemu = qemu_backend();
    if qemu.is_none() {
        println!("(qemu-system-x86_64 not usable: QEMU columns stay empty)");
    }
    if wanted("exit_path") {
        exit_path(&image, qemu.as_ref());
    }
    if wanted("boot_time") {
        boot_time(&image, qemu.is_some());
    }
    if wanted("cpuid_spread") {
        cpuid_spread(&image);
    }
    ExitCode::SUCCESS
}
