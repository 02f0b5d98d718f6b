//! Migrations of a small guest on /dev/kvm, over a socket pair: each pass, the guest
//! first checks that its 64 pages still hold the previous pass's number, then rewrites
//! them with its own (so a page the migration lost, at whatever point it paused the
//! guest, reads back stale at the next pass: exit status 9); it prints `p\n` per pass
//! and ends with 7.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use super::wire::{self, Kind};
use super::{
    DirtyTracking, IncomingReport, MigrateOptions, MigrationError, MigrationReport, MigrationStream,
};
use crate::boot::tests::pvh_image;
use crate::{DiskConfig, Doorbell, GuestEnd, GuestMessage, RunningVm, VmConfig, Vmm};

const PASSES: u32 = 3000;
/// Where [`dirtying_guest`] exits with [`OK`], and the immediates of its two `mov ecx, 64`.
const EXIT_AT: usize = 0x47;
const PAGE_COUNTS_AT: [usize; 2] = [0x0f, 0x29];
const OK: u32 = 7;

/// 32-bit protected mode, paging off (the PVH entry state). See the module comment.
fn dirtying_guest() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    c.extend([0xbd, 1, 0, 0, 0]); // 04: mov ebp, 1
    c.extend([0xbe, 0, 0, 0x20, 0]); // 09 outer: mov esi, 0x200000
    c.extend([0xb9, 64, 0, 0, 0]); // 0e: mov ecx, 64
    c.extend([0x8d, 0x45, 0xff]); // 13: lea eax, [ebp - 1]
    c.extend([0x39, 0x06, 0x75, 0x33]); // 16 v: cmp [esi], eax; jne bad
    c.extend([0x81, 0xc6, 0, 0x10, 0, 0]); // 1a: add esi, 0x1000
    c.extend([0x49, 0x75, 0xf3]); // 20: dec ecx; jnz v
    c.extend([0xbe, 0, 0, 0x20, 0]); // 23: mov esi, 0x200000
    c.extend([0xb9, 64, 0, 0, 0]); // 28: mov ecx, 64
    c.extend([0x89, 0x2e]); // 2d w: mov [esi], ebp
    c.extend([0x81, 0xc6, 0, 0x10, 0, 0]); // 2f: add esi, 0x1000
    c.extend([0x49, 0x75, 0xf5]); // 35: dec ecx; jnz w
    c.extend([0xb0, b'p', 0xee, 0xb0, b'\n', 0xee]); // 38: "p\n"
    c.push(0x45); // 3e: inc ebp
    c.extend([0x81, 0xfd]); // 3f: cmp ebp, PASSES + 1
    c.extend((PASSES + 1).to_le_bytes());
    c.extend([0x75, 0xc2]); // 45: jne outer
    c.extend([0xb0, 7, 0xe6, 0xf4, 0xeb, 0xfe]); // 47: exit 7
    assert_eq!(
        c.len(),
        EXIT_AT + 6,
        "the jumps above are relative to these offsets"
    );
    c.extend([0xb0, 9, 0xe6, 0xf4, 0xeb, 0xfe]); // 4d bad: exit 9
    c
}

fn vmm() -> Option<Vmm> {
    match Vmm::new() {
        Ok(vmm) => Some(vmm),
        Err(e) => {
            assert!(
                std::env::var_os("HVBENCH_REQUIRE_KVM").is_none(),
                "HVBENCH_REQUIRE_KVM is set but the VMM cannot start: {e}"
            );
            None
        }
    }
}

fn boot(vmm: &Vmm, image: &[u8]) -> RunningVm {
    boot_with(vmm, image, 1, false)
}

fn boot_with(vmm: &Vmm, image: &[u8], vcpus: u32, balloon: bool) -> RunningVm {
    boot_config(vmm, image, vcpus, balloon, None)
}

fn boot_config(
    vmm: &Vmm,
    image: &[u8],
    vcpus: u32,
    balloon: bool,
    disk: Option<&DiskConfig>,
) -> RunningVm {
    vmm.boot(&VmConfig {
        image,
        cmdline: "hvbench",
        memory_mib: 32,
        vcpus,
        name: "mig-test",
        mergeable: false,
        huge_pages: false,
        balloon,
        doorbell: Doorbell::new(),
        disk,
    })
    .unwrap()
}

/// The exit AP_STOPPED: the AP's counter did not move at the end.
const AP_STOPPED: u8 = 10;

/// The dirtying guest on two vCPUs: the boot vCPU starts the AP (real mode: `inc dword
/// [0x9000]; jmp` back, for ever), waits until it counted, then dirties and checks; at
/// the end, instead of exiting at once, it checks that the AP still counts (exit
/// [`AP_STOPPED`] where it does not: an AP the migration lost).
fn smp_dirtying_guest() -> Vec<u8> {
    let ap = [0x66, 0xff, 0x06, 0x00, 0x90, 0xeb, 0xf9];
    let mut code = crate::tests::start_ap_at_0x8000(&ap);
    // cmp dword [0x9000], 0; je back
    code.extend([0x83, 0x3d, 0x00, 0x90, 0x00, 0x00, 0x00, 0x74, 0xf7]);
    let mut body = dirtying_guest();
    // At its exit 7: jmp to the check appended after the bad path.
    let end = body.len();
    let rel = i32::try_from(end - (EXIT_AT + 5)).unwrap();
    body[EXIT_AT] = 0xe9;
    body[EXIT_AT + 1..EXIT_AT + 5].copy_from_slice(&rel.to_le_bytes());
    body[EXIT_AT + 5] = 0x90;
    body.extend([0xa1, 0x00, 0x90, 0x00, 0x00]); // mov eax, [0x9000]
    body.extend([0xb9, 0x00, 0x00, 0x01, 0x00]); // mov ecx, 0x10000
    body.extend([0xf3, 0x90, 0x49, 0x75, 0xfb]); // l: pause; dec ecx; jnz l
    body.extend([0x39, 0x05, 0x00, 0x90, 0x00, 0x00]); // cmp [0x9000], eax
    body.extend([0x74, 0x06]); // je dead
    body.extend([0xb0, u8::try_from(OK).unwrap(), 0xe6, 0xf4, 0xeb, 0xfe]); // exit OK
    body.extend([0xb0, AP_STOPPED, 0xe6, 0xf4, 0xeb, 0xfe]); // dead: exit AP_STOPPED
    code.extend(body);
    code
}

/// Console bytes and the end, reading until the end (at most `wait` between messages).
fn drain(vm: &RunningVm, wait: Duration) -> (Vec<u8>, Option<GuestEnd>) {
    let mut console = Vec::new();
    loop {
        match vm.messages().recv_timeout(wait) {
            Ok(GuestMessage::Console { bytes, .. }) => console.extend(bytes),
            Ok(GuestMessage::Ended(end)) => return (console, Some(end)),
            Ok(GuestMessage::Notice(_)) => {}
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                return (console, None)
            }
        }
    }
}

/// Reads console messages until `lines` lines have come.
fn wait_lines(vm: &RunningVm, lines: usize) -> Vec<u8> {
    let mut console = Vec::new();
    while console.iter().filter(|b| **b == b'\n').count() < lines {
        match vm.messages().recv_timeout(Duration::from_secs(10)) {
            Ok(GuestMessage::Console { bytes, .. }) => console.extend(bytes),
            other => panic!("the guest stopped early: {other:?}"),
        }
    }
    console
}

fn expected_output() -> Vec<u8> {
    b"p\n".repeat(PASSES as usize)
}

impl MigrationStream {
    fn shutdown_write(&self) -> std::io::Result<()> {
        match self {
            MigrationStream::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            MigrationStream::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        }
    }
}

fn pair() -> (MigrationStream, MigrationStream) {
    let (a, b) = UnixStream::pair().unwrap();
    (MigrationStream::Unix(a), MigrationStream::Unix(b))
}

fn options() -> MigrateOptions {
    MigrateOptions {
        downtime_limit: Duration::from_millis(50),
        max_rounds: 5,
        ack_timeout: Duration::from_secs(5),
    }
}

/// Migrates `source` (20 lines in) to a destination in this process; checks that the
/// source handed over and the guest finished there with every page and line intact.
fn migrate_whole(
    vmm: &Vmm,
    source: &RunningVm,
    disk: Option<&DiskConfig>,
    seen: Vec<u8>,
) -> (MigrationReport, IncomingReport, RunningVm) {
    let mut console = seen;
    console.extend(wait_lines(source, 20));
    let (to_dest, at_dest) = pair();
    let (report, (dest, incoming), (before_end, source_end)) = std::thread::scope(|s| {
        let dest = s.spawn(|| {
            vmm.incoming_with_disk(at_dest, "mig-dest", Doorbell::new(), disk)
                .unwrap()
        });
        let migrator = source.migrator().unwrap();
        let migration = s.spawn(move || migrator.migrate(to_dest, options()).unwrap());
        let before_end = drain(source, Duration::from_secs(10));
        (migration.join().unwrap(), dest.join().unwrap(), before_end)
    });
    assert_eq!(
        source_end,
        Some(GuestEnd::Stopped),
        "the source ends once handed over"
    );
    console.extend(before_end);
    let (after, end) = drain(&dest, Duration::from_secs(60));
    console.extend(after);
    assert_eq!(
        end,
        Some(GuestEnd::Exited { code: OK }),
        "9: a page was lost; 10: the AP stopped"
    );
    assert!(
        console == expected_output(),
        "every line once, none lost or repeated: {} bytes, not {}",
        console.len(),
        expected_output().len()
    );
    (report, incoming, dest)
}

#[test]
fn a_dirtying_guest_migrates_and_its_memory_and_console_survive() {
    let Some(vmm) = vmm() else { return };
    let image = pvh_image(&dirtying_guest());
    let source = boot(&vmm, &image);
    let (report, incoming, _) = migrate_whole(&vmm, &source, None, Vec::new());
    assert!(report.downtime > Duration::ZERO && report.total >= report.downtime);
    assert!(report.rounds.len() >= 2 && report.rounds.last().unwrap().paused);
    assert_eq!(
        report.rounds[0].pages + report.rounds[0].zero_pages,
        32 * 256
    );
    assert!(report.rounds[0].pages >= 64, "the working set is not zero");
    assert_eq!(incoming.ram_bytes, 32 << 20);
    assert_eq!(report.dirty_tracking, offered_tracking());
    // Without a local APIC, MSR_KVM_ASYNC_PF_INT (0) is left out: KVM takes every MSR.
    assert_eq!(report.msrs_left_out, vec![0x4b56_4d06]);
    assert_eq!(incoming.msrs_refused, Vec::<u32>::new());
    assert_eq!(
        incoming.pages + incoming.zero_pages,
        report
            .rounds
            .iter()
            .map(|r| r.pages + r.zero_pages)
            .sum::<u64>()
    );
}

/// What a VMM tracks dirty pages with here by default.
fn offered_tracking() -> DirtyTracking {
    let offered = kvm_ioctls::Kvm::new()
        .map(|k| k.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING.into()) > 0)
        .unwrap_or(false);
    if offered {
        DirtyTracking::DirtyRing
    } else {
        DirtyTracking::DirtyLog
    }
}

/// The dirty log where the VMM is told not to use the ring (the path hosts without the
/// ring take): every page arrives.
#[test]
fn a_dirtying_guest_migrates_with_the_dirty_log() {
    let Some(vmm) = vmm().map(Vmm::without_dirty_ring) else {
        return;
    };
    let image = pvh_image(&dirtying_guest());
    let source = boot(&vmm, &image);
    let (report, _, _) = migrate_whole(&vmm, &source, None, Vec::new());
    assert_eq!(report.dirty_tracking, DirtyTracking::DirtyLog);
}

/// A ring of one page (192 entries before KVM calls it full) and a guest that dirties
/// 256 pages a pass: vCPU exits for a full ring happen, its thread harvests them, and
/// no page is lost.
#[test]
fn a_full_dirty_ring_is_harvested_by_its_vcpu_and_loses_nothing() {
    if offered_tracking() != DirtyTracking::DirtyRing {
        return;
    }
    let Some(vmm) = vmm().map(|v| v.with_dirty_ring_bytes(4096)) else {
        return;
    };
    let mut code = dirtying_guest();
    for at in PAGE_COUNTS_AT {
        code[at..at + 4].copy_from_slice(&256u32.to_le_bytes()); // mov ecx, 256
    }
    let image = pvh_image(&code);
    let source = boot(&vmm, &image);
    let (report, _, _) = migrate_whole(&vmm, &source, None, Vec::new());
    assert_eq!(report.dirty_tracking, DirtyTracking::DirtyRing);
    assert!(report.ring_full_exits > 0, "the ring never filled");
}

/// Two vCPUs, KVM's irqchip: both vCPUs' state (the AP mid-loop), their local APICs and
/// the PICs and IOAPIC travel; the guest finishes at the destination with its memory
/// check intact.
#[test]
fn an_smp_guest_with_the_irqchip_migrates() {
    let Some(vmm) = vmm() else { return };
    let image = pvh_image(&smp_dirtying_guest());
    let source = boot_with(&vmm, &image, 2, false);
    // Holds back to back (a calibration pause, then the migration's) each get every AP.
    for _ in 0..3 {
        source
            .migrator()
            .unwrap()
            .pause_for(Duration::from_millis(5))
            .unwrap();
    }
    let (report, incoming, _) = migrate_whole(&vmm, &source, None, Vec::new());
    assert!(report.rounds.last().is_some_and(|r| r.paused));
    assert!(
        report.msrs_left_out.is_empty(),
        "with the irqchip every MSR travels"
    );
    assert_eq!(incoming.msrs_refused, Vec::<u32>::new());
}

/// A VM with the virtio-balloon: its device state (here the host's target and the
/// configuration generation) travels, and the guest's memory check holds.
#[test]
fn a_guest_with_the_balloon_migrates_with_its_device_state() {
    let Some(vmm) = vmm() else { return };
    let image = pvh_image(&dirtying_guest());
    let mut source = boot_with(&vmm, &image, 1, true);
    let balloon = source.take_balloon().unwrap();
    balloon.set_target_pages(123);
    let (_, _, mut dest) = migrate_whole(&vmm, &source, None, Vec::new());
    let moved = dest
        .take_balloon()
        .expect("the destination has the balloon");
    assert_eq!(moved.target_pages(), 123);
}

/// A VM with a virtio-blk migrates to a destination given the same disk (path and
/// size): the device state goes with it. A destination given no disk refuses at the
/// Hello, saying why, and the guest runs on at the source.
#[test]
fn a_guest_with_a_disk_migrates_to_a_destination_that_has_the_disk() {
    let Some(vmm) = vmm() else { return };
    let path = std::env::temp_dir().join(format!("hvbench-mig-disk-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let disk = DiskConfig {
        path: path.clone(),
        direct: false,
    };
    let image = pvh_image(&dirtying_guest());
    let source = boot_config(&vmm, &image, 1, false, Some(&disk));
    let seen = wait_lines(&source, 5);
    let (to_dest, at_dest) = pair();
    let refused = std::thread::scope(|s| {
        let dest = s.spawn(|| vmm.incoming(at_dest, "mig-nodisk", Doorbell::new()).err());
        let migrator = source.migrator().unwrap();
        let error = migrator.migrate(to_dest, options()).unwrap_err();
        assert!(dest.join().unwrap().is_some());
        error
    });
    assert!(
        refused.to_string().contains("no disk"),
        "the reason reaches the source: {refused}"
    );
    let (_, _, dest) = migrate_whole(&vmm, &source, Some(&disk), seen);
    assert!(dest.blk().is_some(), "the destination has the virtio-blk");
    drop(dest);
    drop(source);
    std::fs::remove_file(&path).unwrap();
}

/// A destination that reads `keep` chunks (all of them when `None`), keeps their bytes,
/// and goes away without a word.
fn vanishing_destination(mut stream: MigrationStream, keep: Option<usize>) -> Vec<u8> {
    let mut recorder = Recorder {
        inner: &mut stream,
        bytes: Vec::new(),
    };
    let mut buf = Vec::new();
    let mut chunks = 0;
    while keep.is_none_or(|k| chunks < k) {
        match wire::read_chunk(&mut recorder, &mut buf) {
            Ok(Kind::Done) | Err(_) => break,
            Ok(_) => chunks += 1,
        }
    }
    recorder.bytes
}

struct Recorder<'a> {
    inner: &'a mut MigrationStream,
    bytes: Vec<u8>,
}

impl Read for Recorder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.extend(&buf[..n]);
        Ok(n)
    }
}

/// Migrates to a destination that vanishes; the guest must run on at the source.
fn migrate_to_vanishing(vmm: &Vmm, keep: Option<usize>) -> (MigrationError, Vec<u8>) {
    let image = pvh_image(&dirtying_guest());
    let source = boot(vmm, &image);
    let mut console = wait_lines(&source, 20);
    let (to_dest, at_dest) = pair();
    let (error, recorded, (rest, end)) = std::thread::scope(|s| {
        let dest = s.spawn(move || vanishing_destination(at_dest, keep));
        let migrator = source.migrator().unwrap();
        let migration = s.spawn(move || migrator.migrate(to_dest, options()).unwrap_err());
        let rest = drain(&source, Duration::from_secs(30));
        (migration.join().unwrap(), dest.join().unwrap(), rest)
    });
    console.extend(rest);
    assert_eq!(end, Some(GuestEnd::Exited { code: OK }), "after {error}");
    assert_eq!(
        console,
        expected_output(),
        "the source ran on, losing nothing"
    );
    (error, recorded)
}

#[test]
fn a_destination_that_dies_leaves_the_source_running_with_the_cause() {
    let Some(vmm) = vmm() else { return };
    let (mid_way, _) = migrate_to_vanishing(&vmm, Some(3));
    assert!(
        matches!(mid_way, MigrationError::Io { .. }),
        "died mid-way: {mid_way}"
    );
    let (before_ack, _) = migrate_to_vanishing(&vmm, None);
    assert!(
        matches!(before_ack, MigrationError::Wire(_)),
        "died before its Ack: {before_ack}"
    );
}

/// Feeds `bytes` to a destination; what it answers. With `go`, answers its `Ready` with
/// `Go`, as a source does.
fn incoming_from(vmm: &Vmm, bytes: Vec<u8>, go: bool) -> Result<RunningVm, MigrationError> {
    let (mut feed, at_dest) = pair();
    let writer = std::thread::spawn(move || {
        let _ = feed.write_all(&bytes);
        let mut buf = Vec::new();
        if go && matches!(wire::read_chunk(&mut feed, &mut buf), Ok(Kind::Ready)) {
            let _ = wire::write_chunk(&mut feed, Kind::Go, &[]);
        }
        // The stream ends here; the rest of the answer (Ack or Refuse) is read.
        let _ = feed.shutdown_write();
        let mut answer = Vec::new();
        let _ = feed.read_to_end(&mut answer);
    });
    let result = vmm
        .incoming(at_dest, "mig-replay", Doorbell::new())
        .map(|(vm, _)| vm);
    writer.join().unwrap();
    result
}

#[test]
fn a_corrupt_or_truncated_stream_is_refused_and_an_intact_one_restores() {
    let Some(vmm) = vmm() else { return };
    let (_, recorded) = migrate_to_vanishing(&vmm, None);
    assert!(recorded.len() > 64 * 4096, "a whole stream was recorded");
    let mut flipped = recorded.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x10;
    assert!(
        matches!(
            incoming_from(&vmm, flipped, false),
            Err(MigrationError::Wire(
                wire::WireError::Checksum { .. }
                    | wire::WireError::UnknownKind(_)
                    | wire::WireError::TooLong { .. }
                    | wire::WireError::Malformed { .. }
            ))
        ),
        "a flipped bit"
    );
    for cut in [5, 100, recorded.len() / 3, recorded.len() - 1] {
        let result = incoming_from(&vmm, recorded[..cut].to_vec(), false);
        assert!(
            matches!(
                result,
                Err(MigrationError::Wire(
                    wire::WireError::Truncated(_) | wire::WireError::Ended
                ))
            ),
            "cut at {cut}: {:?}",
            result.err()
        );
    }
    // The recorded stream, intact, is a guest paused mid-run: it resumes and finishes.
    // Whole, but the source never said Go: the destination does not run it.
    let unsent = incoming_from(&vmm, recorded.clone(), false);
    assert!(
        matches!(unsent, Err(MigrationError::Wire(wire::WireError::Ended))),
        "ran without Go: {:?}",
        unsent.err()
    );
    let vm = incoming_from(&vmm, recorded, true).unwrap();
    let (console, end) = drain(&vm, Duration::from_secs(30));
    assert_eq!(end, Some(GuestEnd::Exited { code: OK }));
    assert!(console.ends_with(b"p\n"));
}

impl MigrationStream {
    fn shutdown_both(&self) {
        let _ = match self {
            MigrationStream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            MigrationStream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// Relays chunks `from` one side `to` the other, dropping the first of kind `drop`; when
/// either side ends, ends both.
fn relay(mut from: MigrationStream, mut to: MigrationStream, drop: Kind) {
    let mut buf = Vec::new();
    let mut dropped = false;
    while let Ok(kind) = wire::read_chunk(&mut from, &mut buf) {
        if kind == drop && !dropped {
            dropped = true;
            continue;
        }
        if wire::write_chunk(&mut to, kind, &[&buf])
            .and_then(|_| to.flush())
            .is_err()
        {
            break;
        }
    }
    from.shutdown_both();
    to.shutdown_both();
}

/// Where the guest ran on after a migration that lost one message of the switchover.
#[derive(Debug, PartialEq, Eq)]
enum RanOn {
    Source,
    Destination,
    /// Handed over and lost: never twice.
    Nowhere,
}

/// Migrates through a relay that drops the first `drop` chunk; checks that the guest
/// ran on at most one side, finishing there with every line once, and says which.
fn migrate_dropping(vmm: &Vmm, drop: Kind) -> (RanOn, Option<MigrationError>) {
    let image = pvh_image(&dirtying_guest());
    let source = boot(vmm, &image);
    let mut console = wait_lines(&source, 20);
    let (to_relay, relay_in) = pair();
    let (relay_out, at_dest) = pair();
    let options = MigrateOptions {
        ack_timeout: Duration::from_secs(1),
        ..options()
    };
    let (result, dest, (rest, source_end)) = std::thread::scope(|s| {
        let (a, b) = (
            relay_in.try_clone().unwrap(),
            relay_out.try_clone().unwrap(),
        );
        s.spawn(move || relay(relay_in, relay_out, drop));
        s.spawn(move || relay(b, a, drop));
        let dest = s.spawn(|| vmm.incoming(at_dest, "mig-drop", Doorbell::new()).ok());
        let migrator = source.migrator().unwrap();
        let migration = s.spawn(move || migrator.migrate(to_relay, options));
        let rest = drain(&source, Duration::from_secs(30));
        (migration.join().unwrap(), dest.join().unwrap(), rest)
    });
    console.extend(rest);
    let source_ran = source_end == Some(GuestEnd::Exited { code: OK });
    assert!(
        source_ran || source_end == Some(GuestEnd::Stopped),
        "{drop:?}: the source ended {source_end:?}"
    );
    assert!(
        !(source_ran && dest.is_some()),
        "{drop:?} lost: the guest ran on both sides"
    );
    let ran_on = match dest {
        Some((vm, _)) => {
            let (after, end) = drain(&vm, Duration::from_secs(30));
            console.extend(after);
            assert_eq!(end, Some(GuestEnd::Exited { code: OK }), "{drop:?}");
            RanOn::Destination
        }
        None if source_ran => RanOn::Source,
        None => RanOn::Nowhere,
    };
    if ran_on != RanOn::Nowhere {
        assert!(
            console == expected_output(),
            "{drop:?}: lines lost or repeated"
        );
    }
    (ran_on, result.err())
}

/// Each message of the switchover lost in turn: before `Go` the source runs the guest on;
/// after it the destination runs it (a lost `Ack`) or nobody does (a lost `Go`), and the
/// source says so; never both.
#[test]
fn a_lost_switchover_message_never_runs_the_guest_twice() {
    let Some(vmm) = vmm() else { return };
    let unconfirmed =
        |e: &Option<MigrationError>| matches!(e, Some(MigrationError::Unconfirmed(_)));
    let (ran, error) = migrate_dropping(&vmm, Kind::Done);
    assert_eq!(ran, RanOn::Source, "Done lost: {error:?}");
    assert!(error.is_some() && !unconfirmed(&error));
    let (ran, error) = migrate_dropping(&vmm, Kind::Ready);
    assert_eq!(ran, RanOn::Source, "Ready lost: {error:?}");
    assert!(error.is_some() && !unconfirmed(&error));
    let (ran, error) = migrate_dropping(&vmm, Kind::Go);
    assert_eq!(ran, RanOn::Nowhere, "Go lost: {error:?}");
    assert!(unconfirmed(&error), "{error:?}");
    let (ran, error) = migrate_dropping(&vmm, Kind::Ack);
    assert_eq!(ran, RanOn::Destination, "Ack lost: {error:?}");
    assert!(unconfirmed(&error), "{error:?}");
    // The Hello lost: the destination refuses what follows; the source runs on.
    let (ran, error) = migrate_dropping(&vmm, Kind::Hello);
    assert_eq!(ran, RanOn::Source, "Hello lost: {error:?}");
    assert!(error.is_some());
}

/// A device's write to guest RAM (through vm-memory, as the used rings and the balloon
/// write) is in the next fetch of a running VM's dirty pages, with the ring and with the
/// log, once: KVM sees only the guest's own writes.
#[test]
fn the_vmms_own_writes_are_in_the_next_fetch_once() {
    use vm_memory::{Bytes, GuestAddress};
    let Some(vmm) = vmm() else { return };
    for vmm in [vmm, Vmm::new().unwrap().without_dirty_ring()] {
        let vm = boot(&vmm, &pvh_image(&[0xeb, 0xfe])); // jmp $
        let h = &vm.migration;
        let rings = h.rings.as_deref();
        super::dirty::set_logging(&h.vm_fd, &h.memory, true).unwrap();
        let _ = super::dirty::fetch(&h.vm_fd, &h.memory, rings).unwrap();
        h.memory.write_obj(7u32, GuestAddress(0x50_0000)).unwrap();
        let pfn = 0x500;
        let set = |b: &super::dirty::DirtyBitmap| {
            b.0.get(pfn / 64)
                .is_some_and(|w| w & (1 << (pfn % 64)) != 0)
        };
        let first = super::dirty::fetch(&h.vm_fd, &h.memory, rings).unwrap();
        assert!(
            set(&first),
            "the write is missing (ring: {})",
            rings.is_some()
        );
        let second = super::dirty::fetch(&h.vm_fd, &h.memory, rings).unwrap();
        assert!(!set(&second), "the write came twice");
    }
}
