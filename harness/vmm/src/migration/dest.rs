//! The receiving side: every chunk checked, RAM filled, the VM built from the state.

use std::io::{BufReader, Write};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

use super::state::MachineState;
use super::wire::{self, Hello, Kind, Run, WireError, PAGE_SIZE};
use super::{IncomingReport, MigrationError, MigrationStream};
use crate::cast::u64_to_usize;
use crate::vstate::vcpu::MAX_VCPUS;
use crate::vstate::vm::Vm;

const READ_BUFFER: usize = 4 << 20;

/// RAM and state, received and checked, before the vCPU is built.
pub(crate) struct Received {
    pub(crate) vm: Vm,
    pub(crate) state: MachineState,
    pub(crate) report: IncomingReport,
    pub(crate) started: Instant,
}

/// Reads the whole stream up to `Done`.
/// `has_disk`: this destination was given a disk for a guest's virtio-blk; `dirty_ring`:
/// the VM gets KVM's dirty ring of that size where the host offers it (for its next
/// migration).
pub(crate) fn receive(
    kvm: &Kvm,
    stream: &MigrationStream,
    has_disk: bool,
    dirty_ring: Option<u32>,
) -> Result<Received, MigrationError> {
    let started = Instant::now();
    let reader = stream.try_clone().map_err(|source| MigrationError::Io {
        what: "cloning the stream",
        source,
    })?;
    let mut r = BufReader::with_capacity(READ_BUFFER, reader);
    let mut buf = Vec::new();
    let kind = wire::read_chunk(&mut r, &mut buf)?;
    if kind != Kind::Hello {
        return Err(WireError::Unexpected {
            expected: "Hello",
            got: kind,
        }
        .into());
    }
    let hello = Hello::decode(&buf)?;
    let mib = check_hello(kvm, &hello, has_disk)?;
    // Vm::new bounds the size (as for a boot) before it maps anything.
    let mut vm = Vm::new(kvm, mib, hello.irqchip)?;
    if let Some(bytes) = dirty_ring {
        vm.enable_dirty_ring(bytes);
    }
    let mut report = IncomingReport {
        ram_bytes: hello.ram_bytes,
        bytes: 44,
        ..Default::default()
    };
    let state = fill(&vm, &mut r, &mut buf, &mut report, hello.vcpus)?;
    if state.devices.balloon.is_some() != hello.balloon
        || state.devices.blk.is_some() != hello.blk
        || state.irqchip.is_some() != hello.irqchip
    {
        return Err(MigrationError::State(
            "the state's balloon, virtio-blk or irqchip is not the one the Hello announced".into(),
        ));
    }
    Ok(Received {
        vm,
        state,
        report,
        started,
    })
}

/// Whether this destination can build the machine `hello` announces; its RAM in MiB.
fn check_hello(kvm: &Kvm, hello: &Hello, has_disk: bool) -> Result<u32, MigrationError> {
    if !hello.ram_bytes.is_multiple_of(1 << 20) {
        return Err(MigrationError::State(format!(
            "RAM of {} bytes is not whole MiB",
            hello.ram_bytes
        )));
    }
    let max = u32::try_from(kvm.get_max_vcpus())
        .unwrap_or(0)
        .min(MAX_VCPUS);
    if hello.vcpus > max {
        return Err(MigrationError::State(format!(
            "{} vCPUs; this KVM allows {max}",
            hello.vcpus
        )));
    }
    if hello.blk && !has_disk {
        return Err(MigrationError::State(
            "the guest has a virtio-blk and this destination was given no disk (it must \
             reach the source's disk file at the same path)"
                .into(),
        ));
    }
    Ok(u32::try_from(hello.ram_bytes >> 20).unwrap_or(u32::MAX))
}

/// Page runs, rounds and the state, until `Done`.
fn fill(
    vm: &Vm,
    r: &mut BufReader<MigrationStream>,
    buf: &mut Vec<u8>,
    report: &mut IncomingReport,
    vcpus: u32,
) -> Result<MachineState, MigrationError> {
    let ram_pages = report.ram_bytes / PAGE_SIZE;
    // RAM starts zeroed: until the first round ends, a zero page needs no write.
    let mut fresh = true;
    let zeros = vec![0u8; u64_to_usize(u64::from(wire::MAX_RUN_PAGES) * PAGE_SIZE)];
    let mut state = None;
    loop {
        let kind = wire::read_chunk(r, buf)?;
        report.bytes += 12 + buf.len() as u64;
        match kind {
            Kind::Pages | Kind::Zeros => {
                let run = Run::decode(kind, buf, ram_pages)?;
                let len = u64_to_usize(u64::from(run.count) * PAGE_SIZE);
                let data = if kind == Kind::Pages {
                    report.pages += u64::from(run.count);
                    run.data
                } else {
                    report.zero_pages += u64::from(run.count);
                    if fresh {
                        continue;
                    }
                    &zeros[..len]
                };
                vm.memory
                    .write_slice(data, GuestAddress(run.first_pfn * PAGE_SIZE))
                    .map_err(|e| MigrationError::State(format!("writing guest RAM: {e}")))?;
            }
            Kind::RoundEnd => fresh = false,
            Kind::State => state = Some(MachineState::decode(buf, vcpus)?),
            Kind::Done => {
                return state
                    .ok_or_else(|| MigrationError::State("Done came before the state".into()))
            }
            got @ (Kind::Hello | Kind::Go | Kind::Ack | Kind::Refuse | Kind::Ready) => {
                return Err(WireError::Unexpected {
                    expected: "pages, state or Done",
                    got,
                }
                .into())
            }
        }
    }
}

/// Tells the source the VM is built and waits for its `Go` (at most `limit`): only then
/// may the guest run here. Anything else (a timeout, a closed stream, another chunk)
/// is an error, and the guest must not run here: the source may run it.
pub(crate) fn handshake(
    stream: &mut MigrationStream,
    limit: Duration,
) -> Result<(), MigrationError> {
    let io = |what| move |source| MigrationError::Io { what, source };
    wire::write_chunk(stream, Kind::Ready, &[])
        .and_then(|_| stream.flush())
        .map_err(io("telling the source the VM is ready"))?;
    stream
        .set_read_timeout(Some(limit))
        .map_err(io("waiting for the source's Go"))?;
    let mut buf = Vec::new();
    match wire::read_chunk(stream, &mut buf)? {
        Kind::Go => Ok(()),
        got => Err(WireError::Unexpected {
            expected: "Go",
            got,
        }
        .into()),
    }
}

/// Tells the source the guest runs here (with the realtime it started at).
pub(crate) fn acknowledge(
    stream: &mut MigrationStream,
    resumed_ns: u64,
) -> Result<(), MigrationError> {
    wire::write_chunk(stream, Kind::Ack, &[&resumed_ns.to_le_bytes()])
        .and_then(|_| stream.flush())
        .map_err(|source| MigrationError::Io {
            what: "acknowledging to the source",
            source,
        })
}

/// Tells the source why not (best effort: the source may be gone).
pub(crate) fn refuse(stream: &mut MigrationStream, error: &MigrationError) {
    let text = error.to_string();
    let text = &text.as_bytes()[..text.len().min(512)];
    let _ = wire::write_chunk(stream, Kind::Refuse, &[text]).and_then(|_| stream.flush());
}
