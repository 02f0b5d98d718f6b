//! Live migration of hvbench's VMM, in one process over TCP loopback (source and
//! destination VMs side by side):
//!
//! 1. stream throughput: an idle guest of 1 GiB (`mig.idle`), round 0 (every page) —
//!    guest RAM covered per second and bytes on the wire per second;
//! 2. convergence: `mig.dirty` at several dirty rates (MB/s, 0 = flat out) with the
//!    default downtime limit (300 ms) — the VMM's own downtime, total time, rounds.
//!
//! `cargo bench -p hvbench-bench --bench migration` (needs /dev/kvm). Not a test: it
//! prints figures (every run, then the median) and asserts nothing.

use std::net::TcpListener;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use hvbench::guest_image::GuestImage;
use vmm::migration::{MigrateOptions, MigrationReport, MigrationStream};
use vmm::{Doorbell, GuestMessage, RunningVm, VmConfig, Vmm};
use workloads::cmdline::{self, GuestConfig};
use workloads::WorkloadId;

const RUNS: usize = 3;

fn guest_cmdline(id: WorkloadId, params: &[(&str, &str)]) -> String {
    let mut c = GuestConfig {
        samples: 1,
        warmup: 0,
        ..Default::default()
    };
    c.select(id);
    let params: Vec<(WorkloadId, &str, &str)> = params.iter().map(|(k, v)| (id, *k, *v)).collect();
    cmdline::encode_with_params(&c, &params)
}

fn boot(vmm: &Vmm, image: &[u8], mib: u32, cmdline: &str) -> RunningVm {
    vmm.boot(&VmConfig {
        image,
        cmdline,
        memory_mib: mib,
        vcpus: 1,
        name: "bench-mig",
        mergeable: false,
        huge_pages: false,
        balloon: false,
        doorbell: Doorbell::new(),
        disk: None,
    })
    .expect("boot")
}

/// Waits for the guest's first heartbeat.
fn wait_beat(vm: &RunningVm) {
    loop {
        match vm.messages().recv_timeout(Duration::from_secs(30)) {
            Ok(GuestMessage::Console { bytes, .. }) => {
                if bytes.windows(6).any(|w| w == b"k=beat") {
                    return;
                }
            }
            other => panic!("the guest stopped before its first heartbeat: {other:?}"),
        }
    }
}

/// Drains `vm`'s messages until it ends (or 60 s pass).
fn drain(vm: &RunningVm) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match vm.messages().recv_timeout(Duration::from_millis(200)) {
            Ok(GuestMessage::Ended(_)) | Err(RecvTimeoutError::Disconnected) => return,
            _ => {}
        }
    }
}

/// Boots `cmdline`, migrates it once over loopback TCP, returns the source's report.
fn migrate_once(vmm: &Vmm, image: &[u8], mib: u32, cmdline: &str) -> MigrationReport {
    let source = boot(vmm, image, mib, cmdline);
    wait_beat(&source);
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("address");
    std::thread::scope(|s| {
        let dest = s.spawn(|| {
            let (stream, _) = listener.accept().expect("accept");
            stream.set_nodelay(true).expect("nodelay");
            let (vm, _) = vmm
                .incoming(MigrationStream::Tcp(stream), "bench-dest", Doorbell::new())
                .expect("incoming");
            drain(&vm);
        });
        let migrator = source.migrator().expect("migrator");
        let report = s
            .spawn(move || {
                let stream = std::net::TcpStream::connect(addr).expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                migrator
                    .migrate(MigrationStream::Tcp(stream), MigrateOptions::default())
                    .expect("migrate")
            })
            .join()
            .expect("migration thread");
        drain(&source);
        dest.join().expect("destination thread");
        report
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn throughput(vmm: &Vmm, image: &[u8]) {
    println!("stream throughput, idle 1 GiB guest (mig.idle), round 0, TCP loopback:");
    let cmdline = guest_cmdline(WorkloadId::MigIdle, &[("duration_ms", "8000")]);
    let (mut ram, mut wire) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let r = migrate_once(vmm, image, 1024, &cmdline);
        let round = &r.rounds[0];
        let secs = round.duration.as_secs_f64();
        let covered = (round.pages + round.zero_pages) as f64 * 4096.0 / secs / 1e9;
        let on_wire = round.bytes as f64 / secs / 1e9;
        println!(
            "  run {run}: {} pages + {} zero in {:.1} ms: {covered:.2} GB/s of RAM, {on_wire:.3} GB/s on the wire; total {:.1} ms, downtime {:.2} ms",
            round.pages,
            round.zero_pages,
            secs * 1e3,
            r.total.as_secs_f64() * 1e3,
            r.downtime.as_secs_f64() * 1e3
        );
        ram.push(covered);
        wire.push(on_wire);
    }
    println!(
        "  median: {:.2} GB/s of RAM, {:.3} GB/s on the wire",
        median(ram),
        median(wire)
    );
}

fn convergence(vmm: &Vmm, image: &[u8]) {
    println!("mig.dirty (ws 64 MiB, sequential), 256 MiB guest, downtime limit 300 ms:");
    for rate in [100u32, 1000, 0] {
        let rate_text = rate.to_string();
        let cmdline = guest_cmdline(
            WorkloadId::MigDirty,
            &[("rate", &rate_text), ("duration_ms", "6000")],
        );
        let (mut down, mut total) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let r = migrate_once(vmm, image, 256, &cmdline);
            let first = &r.rounds[0];
            println!(
                "  rate {rate:>4} MB/s: downtime {:.2} ms, total {:.1} ms, {} rounds, {} bytes, converged {}, {}; round 0: {} bytes on the wire in {:.1} ms ({:.2} GB/s)",
                r.downtime.as_secs_f64() * 1e3,
                r.total.as_secs_f64() * 1e3,
                r.rounds.len(),
                r.bytes,
                r.converged,
                r.dirty_tracking.name(),
                first.bytes,
                first.duration.as_secs_f64() * 1e3,
                first.bytes as f64 / first.duration.as_secs_f64() / 1e9
            );
            down.push(r.downtime.as_secs_f64() * 1e3);
            total.push(r.total.as_secs_f64() * 1e3);
        }
        println!(
            "  rate {rate:>4} MB/s median: downtime {:.2} ms, total {:.1} ms",
            median(down),
            median(total)
        );
    }
}

fn main() {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let Ok(vmm) = Vmm::new() else {
        println!("/dev/kvm does not open: nothing to measure");
        return;
    };
    let image = GuestImage::embedded().expect("guest image");
    if wanted("throughput") {
        throughput(&vmm, image.bytes());
    }
    if wanted("convergence") {
        convergence(&vmm, image.bytes());
    }
}
