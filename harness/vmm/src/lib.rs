//! hvbench's own VMM on /dev/kvm: the boot vCPU runs the guest; with more than one vCPU
//! the VM gets KVM's in-kernel irqchip and each application processor a thread of its own
//! that the guest starts by INIT/SIPI (a uniprocessor guest gets no interrupt controller:
//! it polls, and its HLT exits to the VMM); a UART, an exit port and the test devices.
//!
//! [`Vmm::boot`] loads a PVH image into a fresh VM as a [`VmConfig`] says and runs its
//! vCPU on a thread of its own; the [`RunningVm`] it returns carries the guest's messages
//! ([`GuestMessage`]: console bytes with the exit counts, then how the guest ended) on a
//! bounded channel, and stops the guest when asked or dropped. The guest is untrusted:
//! every device access is bounds-checked, and what it prints is rate-limited by the
//! channel, never buffered without limit.

mod boot;
mod cast;
mod channel;
mod devices;
pub mod migration;
mod vstate;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::signal::Killable;

pub use self::channel::{
    guest_channel, ExitCounts, GuestEnd, GuestMessage, GuestSender, CHANNEL_CAPACITY,
};
pub use self::devices::balloon::{BalloonHandle, Refusals};
pub use self::devices::blk::{BlkError, BlkHandle, DiskConfig};
pub use self::devices::{Devices, Doorbell, PioAction};
pub use self::vstate::memory::MIN_MEMORY_MIB;

use self::devices::balloon::VirtioBalloon;
use self::devices::blk::VirtioBlk;
use self::migration::park::Park;
use self::migration::{
    IncomingReport, MigrateOptions, MigrationError, MigrationReport, MigrationStream, Source,
};
use self::vstate::memory::{self as memory, Advice, GuestMemory};
pub use self::vstate::vcpu::MAX_VCPUS;
use self::vstate::vcpu::{create_secondary, Vcpu};
use self::vstate::vcpu_ops::{install_kick_handler, kick_signal};
use self::vstate::vm::Vm;

#[derive(Debug, Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user open it?)")]
    Open(kvm_ioctls::Error),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory of {mib} MiB is outside {min}..={max} MiB")]
    MemorySize { mib: u32, min: u32, max: u32 },
    #[error("mapping {mib} MiB of guest memory: {source}")]
    Allocate {
        mib: u32,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("finding guest memory in the VMM: {0}")]
    HostAddress(vm_memory::GuestMemoryError),
    #[error("madvise({advice}) on {len} bytes of guest RAM: {source}")]
    Madvise {
        advice: &'static str,
        len: usize,
        source: std::io::Error,
    },
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("installing the vCPU kick signal handler: {0}")]
    KickSignal(vmm_sys_util::errno::Error),
    #[error("building the guest's CPUID: {0:?}")]
    Cpuid(vmm_sys_util::fam::Error),
    #[error("guest memory has more regions than KVM has memory slots")]
    TooManyRegions,
    #[error("loading the guest image: {0}")]
    Load(String),
    #[error("{asked} vCPUs asked for; this KVM allows 1..={max}")]
    Vcpus { asked: u32, max: u32 },
    #[error("the vCPU thread could not be started: {0}")]
    Thread(std::io::Error),
    #[error("the vCPU thread did not stop within {0:?}")]
    StopTimeout(Duration),
    #[error("virtio-balloon: {0}")]
    Balloon(String),
    #[error("virtio-blk: {0}")]
    Blk(#[from] BlkError),
    #[error("KVM's dirty ring: {0}")]
    DirtyRing(String),
}

/// /dev/kvm, opened once, from which VMs are booted.
#[derive(Debug)]
pub struct Vmm {
    kvm: Kvm,
    /// VMs get KVM's dirty ring of this many bytes per vCPU where the host offers it
    /// (else, and when `None`, the dirty log serves).
    dirty_ring: Option<u32>,
}

/// What one guest is booted with.
#[derive(Clone, Debug)]
pub struct VmConfig<'a> {
    /// The guest: an ELF image with a PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`).
    pub image: &'a [u8],
    /// The guest's command line (under 4 KiB, no NUL).
    pub cmdline: &'a str,
    pub memory_mib: u32,
    /// vCPUs created; the first runs the guest. With more than one, the VM gets KVM's
    /// in-kernel irqchip and each further vCPU a thread that waits for the guest's
    /// INIT/SIPI (HLT is then handled inside KVM and no longer exits to the VMM).
    pub vcpus: u32,
    /// Names the vCPU thread (`vcpu0-<name>`).
    pub name: &'a str,
    /// Guest RAM is marked MADV_MERGEABLE (KSM may merge it).
    pub mergeable: bool,
    /// Guest RAM is backed by transparent huge pages (MADV_HUGEPAGE).
    pub huge_pages: bool,
    /// Attaches the virtio-balloon; [`RunningVm::take_balloon`] then hands its handle out.
    pub balloon: bool,
    /// Attaches a virtio-blk over this disk; [`RunningVm::blk`] then hands its handle out.
    pub disk: Option<&'a DiskConfig>,
    /// Answers the guest's doorbell port; whoever holds a clone rings it.
    pub doorbell: Arc<Doorbell>,
}

impl Vmm {
    /// Opens /dev/kvm and installs the signal handler that interrupts a running vCPU.
    pub fn new() -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::Open)?;
        install_kick_handler()?;
        Ok(Vmm {
            kvm,
            dirty_ring: Some(migration::ring::RING_BYTES),
        })
    }

    /// VMs of this VMM track dirty pages with KVM's dirty log even where the host offers
    /// the dirty ring (to compare the two, and to test the log on such a host).
    pub fn without_dirty_ring(self) -> Self {
        Vmm {
            dirty_ring: None,
            ..self
        }
    }

    /// VMs get a dirty ring of `bytes` per vCPU (a power of two, at least a page): a
    /// small one fills, which the tests need.
    #[cfg(test)]
    pub(crate) fn with_dirty_ring_bytes(self, bytes: u32) -> Self {
        Vmm {
            dirty_ring: Some(bytes),
            ..self
        }
    }

    /// KVM_GET_API_VERSION.
    pub fn api_version(&self) -> i32 {
        self.kvm.get_api_version()
    }

    /// Builds the VM `config` describes, loads the guest and starts its vCPU thread.
    pub fn boot(&self, config: &VmConfig) -> Result<RunningVm, VmmError> {
        let max = u32::try_from(self.kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        let max = max.min(MAX_VCPUS);
        if config.vcpus == 0 || config.vcpus > max {
            return Err(VmmError::Vcpus {
                asked: config.vcpus,
                max,
            });
        }
        // An SMP guest gets KVM's in-kernel irqchip (its APs start by INIT/SIPI through
        // their local APICs); a uniprocessor guest gets none, so HLT exits to the VMM.
        let mut vm = Vm::new(&self.kvm, config.memory_mib, config.vcpus > 1)?;
        if let Some(bytes) = self.dirty_ring {
            vm.enable_dirty_ring(bytes);
        }
        if config.mergeable {
            memory::advise(&vm.memory, Advice::Mergeable)?;
        }
        if config.huge_pages {
            memory::advise(&vm.memory, Advice::HugePages)?;
        }
        let entry = boot::load(&vm.memory, config.image, config.cmdline)?;
        let mut vcpu = Vcpu::new(&self.kvm, &vm, entry)?;
        vcpu.attach_doorbell(config.doorbell.clone());
        vm.secondary_vcpus = create_secondary(&self.kvm, &vm, config.vcpus - 1)?;
        let balloon = if config.balloon {
            let (device, handle) = VirtioBalloon::new(vm.memory.clone())
                .map_err(|e| VmmError::Balloon(e.to_string()))?;
            vcpu.attach_balloon(device);
            Some(handle)
        } else {
            None
        };
        let blk = match config.disk {
            Some(disk) => Some(attach_blk(&vm, &mut vcpu, disk, config.name)?),
            None => None,
        };
        start(vcpu, vm, config.name, balloon, blk)
    }

    /// Receives a guest migrated over `stream` (see [`migration`]), starts it, and
    /// tells the source it runs. On an error the source is told why (as far as the
    /// stream still carries it) and nothing is left running here.
    pub fn incoming(
        &self,
        stream: MigrationStream,
        name: &str,
        doorbell: Arc<Doorbell>,
    ) -> Result<(RunningVm, IncomingReport), MigrationError> {
        self.incoming_with_disk(stream, name, doorbell, None)
    }

    /// [`Vmm::incoming`] for a guest that may have a virtio-blk: `disk` must be the
    /// source's disk, reached here at the same path (a guest's disk is never opened by a
    /// path the stream names alone).
    pub fn incoming_with_disk(
        &self,
        mut stream: MigrationStream,
        name: &str,
        doorbell: Arc<Doorbell>,
        disk: Option<&DiskConfig>,
    ) -> Result<(RunningVm, IncomingReport), MigrationError> {
        let (prepared, mut report, started) = match self.restore(&stream, name, doorbell, disk) {
            Ok(restored) => restored,
            Err(e) => {
                migration::dest::refuse(&mut stream, &e);
                return Err(e);
            }
        };
        // The guest runs here only on the source's Go (else `prepared` is dropped unrun).
        migration::dest::handshake(&mut stream, GO_TIMEOUT)?;
        prepared.vcpu.resume_devices();
        let running = start(
            prepared.vcpu,
            prepared.vm,
            name,
            prepared.balloon,
            prepared.blk,
        )?;
        report.total = started.elapsed();
        // The guest is ours now: a lost Ack leaves it running here, and the source,
        // which sent Go, does not run it.
        report.ack_error =
            migration::dest::acknowledge(&mut stream, migration::state::realtime_ns())
                .err()
                .map(|e| e.to_string());
        Ok((running, report))
    }

    fn restore(
        &self,
        stream: &MigrationStream,
        name: &str,
        doorbell: Arc<Doorbell>,
        disk: Option<&DiskConfig>,
    ) -> Result<(Prepared, IncomingReport, Instant), MigrationError> {
        let received =
            migration::dest::receive(&self.kvm, stream, disk.is_some(), self.dirty_ring)?;
        let restore_started = Instant::now();
        let (mut vm, state, mut report) = (received.vm, received.state, received.report);
        let xsave_size = vm
            .fd
            .check_extension_raw(kvm_bindings::KVM_CAP_XSAVE2.into());
        let fd = vstate::vcpu::create(&self.kvm, &vm, 0)?;
        report.msrs_refused = restore_vcpu(&fd, &state.vcpu, vm.irqchip, xsave_size)?;
        for (id, ap) in (1u8..).zip(&state.aps) {
            let ap_fd = vstate::vcpu::create(&self.kvm, &vm, id)?;
            report
                .msrs_refused
                .extend(restore_vcpu(&ap_fd, ap, vm.irqchip, xsave_size)?);
            vm.secondary_vcpus.push(ap_fd);
        }
        if let Some(chips) = &state.irqchip {
            chips.restore(&vm.fd)?;
        }
        let here_khz = fd.get_tsc_khz().unwrap_or(0);
        report.tsc_khz = (state.vcpu.tsc_khz, here_khz);
        let (devices, balloon, blk) = restore_devices(&vm, &state.devices, doorbell, disk, name)?;
        let prepared = Prepared {
            vcpu: Vcpu::from_parts(fd, devices),
            vm,
            balloon,
            blk,
        };
        report.restore = restore_started.elapsed();
        Ok((prepared, report, received.started))
    }
}

/// How long a destination waits for the source's `Go` after `Ready`.
const GO_TIMEOUT: Duration = Duration::from_secs(30);

/// A migrated VM, built and not running (until the source's `Go`).
struct Prepared {
    vcpu: Vcpu,
    vm: Vm,
    balloon: Option<BalloonHandle>,
    blk: Option<BlkHandle>,
}

/// The devices as the source left them, and the host's handles on the balloon and the
/// virtio-blk where the guest has them.
fn restore_devices(
    vm: &Vm,
    state: &migration::state::DeviceState,
    doorbell: Arc<Doorbell>,
    disk: Option<&DiskConfig>,
    name: &str,
) -> Result<(Devices, Option<BalloonHandle>, Option<BlkHandle>), MigrationError> {
    doorbell.ring(state.doorbell);
    let (balloon, balloon_handle) = match &state.balloon {
        Some(bytes) => {
            let (device, handle) =
                VirtioBalloon::restore(vm.memory.clone(), bytes).map_err(MigrationError::State)?;
            (Some(device), Some(handle))
        }
        None => (None, None),
    };
    let (blk, blk_handle) = match (&state.blk, disk) {
        (Some(bytes), Some(disk)) => {
            let (device, handle) = VirtioBlk::restore(vm.memory.clone(), disk, name, bytes)
                .map_err(MigrationError::State)?;
            register_blk_notify(vm, &device)?;
            (Some(device), Some(handle))
        }
        _ => (None, None),
    };
    let devices = Devices::restored(&state.uart, &state.exit_counts, doorbell, balloon, blk)
        .map_err(MigrationError::State)?;
    Ok((devices, balloon_handle, blk_handle))
}

/// Loads one vCPU's state; its local APIC must be there exactly when the VM has the
/// irqchip. Returns the MSRs KVM would not take.
fn restore_vcpu(
    fd: &VcpuFd,
    state: &migration::state::VcpuState,
    irqchip: bool,
    xsave_size: i32,
) -> Result<Vec<u32>, MigrationError> {
    if state.lapic.is_some() != irqchip {
        return Err(MigrationError::State(format!(
            "a vCPU's local APIC {} in a VM {} the irqchip",
            if irqchip { "is missing" } else { "arrived" },
            if irqchip { "with" } else { "without" }
        )));
    }
    state.restore(fd, xsave_size)
}

/// Starts the vCPU thread, which owns the VM from then on.
fn start(
    vcpu: Vcpu,
    vm: Vm,
    name: &str,
    balloon: Option<BalloonHandle>,
    blk: Option<BlkHandle>,
) -> Result<RunningVm, VmmError> {
    let stop = Arc::new(AtomicBool::new(false));
    // Bounded: a guest that floods the console makes its vCPU wait for the host.
    let (tx, rx) = guest_channel(stop.clone());
    let thread_stop = stop.clone();
    let mut vcpu = vcpu;
    let fds: Vec<&VcpuFd> = std::iter::once(vcpu.fd())
        .chain(vm.secondary_vcpus.iter())
        .collect();
    let rings = vm
        .dirty_rings(&fds)
        .map_err(|e| VmmError::DirtyRing(e.to_string()))?;
    vcpu.attach_rings(rings.clone());
    let (vm_fd, memory, park) = (vm.fd.clone(), vm.memory.clone(), vcpu.park());
    let machine = Machine {
        vcpus: 1 + u32::try_from(vm.secondary_vcpus.len()).unwrap_or(u32::MAX),
        irqchip: vm.irqchip,
        balloon: vcpu.has_balloon(),
        blk: blk.is_some(),
    };
    let thread_name = name.to_string();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu0-{name}"))
        .spawn(move || vcpu.run(vm, thread_stop, tx, &thread_name))
        .map_err(VmmError::Thread)?;
    Ok(RunningVm {
        messages: rx,
        stop,
        thread: Some(thread),
        balloon,
        blk,
        migration: MigrationHandles {
            vm_fd,
            memory,
            park,
            machine,
            rings,
        },
    })
}

/// Migrates one running guest; see [`RunningVm::migrator`].
#[derive(Debug)]
pub struct Migrator<'a> {
    thread: &'a JoinHandle<()>,
    handles: &'a MigrationHandles,
}

impl Migrator<'_> {
    /// Pauses the guest for `length` (vCPU parked, its state captured, then resumed as
    /// it was; its TSC runs on, as the host's clock does): the downtime ruler's known
    /// pause. Returns how long the vCPU took to park and how long it stayed parked.
    pub fn pause_for(&self, length: Duration) -> Result<(Duration, Duration), MigrationError> {
        let kick = || {
            let _ = self.thread.kill(kick_signal());
            !self.thread.is_finished()
        };
        let started = Instant::now();
        self.handles
            .park
            .request(Vec::new(), Duration::from_secs(2), kick)
            .map_err(MigrationError::Pause)?;
        let parked = Instant::now();
        std::thread::sleep(length);
        self.handles.park.decide(migration::park::Verdict::Resume);
        Ok((parked - started, parked.elapsed()))
    }

    /// Live-migrates the guest over `stream` to a destination in [`Vmm::incoming`]. On
    /// success the guest runs there and this VM's vCPU thread ends (its last messages
    /// are a `Notice` and `Ended(Stopped)`); on an error the guest runs on here.
    pub fn migrate(
        &self,
        stream: MigrationStream,
        options: MigrateOptions,
    ) -> Result<MigrationReport, MigrationError> {
        let msr_indices = Kvm::new()
            .and_then(|kvm| kvm.get_msr_index_list())
            .map(|list| list.as_slice().to_vec())
            .map_err(|source| MigrationError::Kvm {
                what: "KVM_GET_MSR_INDEX_LIST",
                source,
            })?;
        let kick = || {
            let _ = self.thread.kill(kick_signal());
            !self.thread.is_finished()
        };
        let machine = &self.handles.machine;
        let source = Source {
            vm: &self.handles.vm_fd,
            memory: &self.handles.memory,
            park: &self.handles.park,
            options,
            vcpus: machine.vcpus,
            irqchip: machine.irqchip,
            balloon: machine.balloon,
            blk: machine.blk,
            rings: self.handles.rings.as_deref(),
        };
        source.run(stream, kick, msr_indices)
    }
}

/// What a migration needs of a running VM besides its vCPU thread.
#[derive(Debug)]
struct MigrationHandles {
    vm_fd: Arc<VmFd>,
    memory: GuestMemory,
    park: Arc<Park>,
    machine: Machine,
    rings: Option<Arc<migration::ring::DirtyRings>>,
}

/// The machine a migration rebuilds at the destination.
#[derive(Debug)]
struct Machine {
    vcpus: u32,
    irqchip: bool,
    balloon: bool,
    blk: bool,
}

/// Makes the virtio-blk over `disk`, routes its queue notifications to its ioeventfd and
/// gives it to the vCPU's devices.
fn attach_blk(
    vm: &Vm,
    vcpu: &mut Vcpu,
    disk: &DiskConfig,
    name: &str,
) -> Result<BlkHandle, VmmError> {
    let (device, handle) = VirtioBlk::new(vm.memory.clone(), disk, name)?;
    register_blk_notify(vm, &device)?;
    vcpu.attach_blk(device);
    Ok(handle)
}

/// Routes the virtio-blk's queue notifications to its ioeventfd.
fn register_blk_notify(vm: &Vm, device: &VirtioBlk) -> Result<(), VmmError> {
    let notify = workloads::virtio_blk::VIRTIO_BLK_BASE + workloads::virtio::REG_QUEUE_NOTIFY;
    vm.fd
        .register_ioevent(
            device.notify_event(),
            &kvm_ioctls::IoEventAddress::Mmio(notify),
            kvm_ioctls::NoDatamatch,
        )
        .map_err(|source| VmmError::Kvm {
            what: "KVM_IOEVENTFD (virtio-blk queue notify)",
            source,
        })
}

/// A booted guest: its messages, its balloon (where it has one), and the way to stop it.
#[derive(Debug)]
pub struct RunningVm {
    messages: Receiver<GuestMessage>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    balloon: Option<BalloonHandle>,
    blk: Option<BlkHandle>,
    migration: MigrationHandles,
}

/// How long a stop may take before it is reported as a failure.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl RunningVm {
    /// The guest's messages, in order; the last is always [`GuestMessage::Ended`].
    pub fn messages(&self) -> &Receiver<GuestMessage> {
        &self.messages
    }

    /// The host's handle on the virtio-balloon, once, where the VM was booted with one.
    pub fn take_balloon(&mut self) -> Option<BalloonHandle> {
        self.balloon.take()
    }

    /// What migrates this guest ([`Migrator::migrate`]). It borrows only what can be
    /// shared between threads, so that one thread migrates while another reads the
    /// guest's messages (a guest whose console is not read would block, and could not
    /// pause).
    pub fn migrator(&self) -> Result<Migrator<'_>, MigrationError> {
        let thread = self
            .thread
            .as_ref()
            .ok_or_else(|| MigrationError::Pause("the guest was stopped".into()))?;
        Ok(Migrator {
            thread,
            handles: &self.migration,
        })
    }

    /// The host's view of the virtio-blk, where the VM was booted with a disk.
    pub fn blk(&self) -> Option<&BlkHandle> {
        self.blk.as_ref()
    }

    /// Stops the guest and waits for its vCPU thread, which releases the VM. Idempotent;
    /// also run on drop.
    pub fn stop(&mut self) -> Result<(), VmmError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.store(true, Ordering::Release);
        let started = Instant::now();
        // Kick until the thread notices: a signal that lands between its check of the flag
        // and KVM_RUN would otherwise be lost.
        while !thread.is_finished() {
            if started.elapsed() > STOP_TIMEOUT {
                return Err(VmmError::StopTimeout(STOP_TIMEOUT));
            }
            let _ = thread.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = thread.join();
        Ok(())
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// A VM with the guest loaded and vCPU 0 in the PVH entry state, but no devices and no run
/// loop: for benchmarks that drive KVM_RUN themselves (the least a VMM can do per exit).
#[derive(Debug)]
pub struct BareVm {
    vcpu: VcpuFd,
    /// Outlives the vCPU's use: the VM and its memory stay until this is dropped.
    _vm: Vm,
}

impl BareVm {
    /// A VM of `memory_mib` MiB with `image` loaded and `cmdline` in place.
    pub fn new(vmm: &Vmm, memory_mib: u32, image: &[u8], cmdline: &str) -> Result<Self, VmmError> {
        let vm = Vm::new(&vmm.kvm, memory_mib, false)?;
        let entry = boot::load(&vm.memory, image, cmdline)?;
        let vcpu = Vcpu::new(&vmm.kvm, &vm, entry)?.into_fd();
        Ok(BareVm { vcpu, _vm: vm })
    }

    /// vCPU 0, to run.
    pub fn vcpu(&mut self) -> &mut VcpuFd {
        &mut self.vcpu
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::RecvTimeoutError;

    use workloads::abi::{EXIT_PORT, UART_PORT};

    use super::*;
    use crate::boot::tests::pvh_image;

    /// /dev/kvm, or `None` where it does not open (then the test is skipped, unless the
    /// run requires KVM, as CI does).
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

    fn config(image: &[u8]) -> VmConfig<'_> {
        VmConfig {
            image,
            cmdline: "hvbench",
            memory_mib: 32,
            vcpus: 2,
            name: "test",
            mergeable: false,
            huge_pages: false,
            balloon: false,
            disk: None,
            doorbell: Doorbell::new(),
        }
    }

    /// Every message until the guest's end (at most `wait` between two).
    fn messages_until_end(vm: &RunningVm, wait: Duration) -> (Vec<u8>, Option<GuestEnd>) {
        let mut console = Vec::new();
        loop {
            match vm.messages().recv_timeout(wait) {
                Ok(GuestMessage::Console { bytes, exits }) => {
                    assert!(exits.is_some_and(|e| e["pio_serial"] > 0));
                    console.extend(bytes);
                }
                Ok(GuestMessage::Ended(end)) => return (console, Some(end)),
                Ok(GuestMessage::Notice(_)) => {}
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return (console, None)
                }
            }
        }
    }

    /// `mov al, byte; out dx, al` for each byte to COM1, then `mov al, 7; out EXIT_PORT, al`.
    fn print_then_exit(text: &[u8]) -> Vec<u8> {
        let mut code = vec![0x66, 0xba];
        code.extend(UART_PORT.to_le_bytes()); // mov dx, UART_PORT
        for &b in text {
            code.extend([0xb0, b, 0xee]); // mov al, b ; out dx, al
        }
        code.extend([0xb0, 7, 0xe6, u8::try_from(EXIT_PORT).unwrap()]);
        code.extend([0xeb, 0xfe]); // jmp $
        code
    }

    #[test]
    fn a_guest_prints_and_exits_with_its_status() {
        let Some(vmm) = vmm() else { return };
        let image = pvh_image(&print_then_exit(b"hi\n"));
        let mut vm = vmm.boot(&config(&image)).unwrap();
        let (console, end) = messages_until_end(&vm, Duration::from_secs(10));
        assert_eq!(console, b"hi\n");
        assert_eq!(end, Some(GuestEnd::Exited { code: 7 }));
        assert!(vm.take_balloon().is_none(), "booted without a balloon");
        vm.stop().unwrap();
        vm.stop().unwrap();
    }

    #[test]
    fn a_spinning_guest_is_stopped_and_its_balloon_outlives_it() {
        let Some(vmm) = vmm() else { return };
        let image = pvh_image(&[0xeb, 0xfe]); // jmp $
        let mut vm = vmm
            .boot(&VmConfig {
                balloon: true,
                ..config(&image)
            })
            .unwrap();
        let balloon = vm.take_balloon().unwrap();
        assert!(vm.take_balloon().is_none(), "handed out once");
        assert_eq!(
            messages_until_end(&vm, Duration::from_millis(200)).1,
            None,
            "still running"
        );
        vm.stop().unwrap();
        assert_eq!(
            messages_until_end(&vm, Duration::from_secs(5)).1,
            Some(GuestEnd::Stopped)
        );
        assert_eq!(balloon.ram_bytes(), 32 << 20);
    }

    /// `mov dword [addr], value` (32-bit code, flat segments).
    pub(crate) fn store32(addr: u32, value: u32) -> Vec<u8> {
        let mut code = vec![0xc7, 0x05];
        code.extend(addr.to_le_bytes());
        code.extend(value.to_le_bytes());
        code
    }

    /// Boot-vCPU code that copies real-mode code (padded to whole words) to 0x8000 and
    /// starts vCPU 1 there with INIT and a start-up IPI through its local APIC, as
    /// firmware does.
    pub(crate) fn start_ap_at_0x8000(ap_code: &[u8]) -> Vec<u8> {
        let mut code = Vec::new();
        for (i, chunk) in ap_code.chunks(4).enumerate() {
            let mut word = [0x90; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            let at = 0x8000 + 4 * u32::try_from(i).unwrap();
            code.extend(store32(at, u32::from_le_bytes(word)));
        }
        code.extend(store32(0xfee0_00f0, 0x1ff)); // SVR: APIC on, spurious vector 0xff
        code.extend(store32(0xfee0_0310, 1 << 24)); // ICR high: APIC ID 1
        code.extend(store32(0xfee0_0300, 0x4500)); // ICR low: INIT
        code.extend(store32(0xfee0_0300, 0x4608)); // ICR low: SIPI, page 0x8
        code
    }

    #[test]
    fn a_second_vcpu_starts_by_init_and_sipi_on_a_thread_of_its_own() {
        let Some(vmm) = vmm() else { return };
        // The AP (real mode): mov byte [0x9000], 0x5a; hlt; jmp hlt.
        let mut code = start_ap_at_0x8000(&[0xc6, 0x06, 0x00, 0x90, 0x5a, 0xf4, 0xeb, 0xfd]);
        // The boot vCPU: cmp byte [0x9000], 0x5a; jne back; then print and exit.
        code.extend([0x80, 0x3d, 0x00, 0x90, 0x00, 0x00, 0x5a, 0x75, 0xf7]);
        code.extend(print_then_exit(b"up\n"));
        let image = pvh_image(&code);
        let mut vm = vmm.boot(&config(&image)).unwrap();
        let (console, end) = messages_until_end(&vm, Duration::from_secs(10));
        assert_eq!(console, b"up\n");
        assert_eq!(end, Some(GuestEnd::Exited { code: 7 }));
        vm.stop().unwrap();
    }

    #[test]
    fn an_application_processors_triple_fault_ends_the_guest_and_names_it() {
        let Some(vmm) = vmm() else { return };
        // The AP: lidt [0x8020] (limit 0), into protected mode, a far jump through the
        // empty GDT: #GP, which the empty IDT turns into #DF and a shutdown.
        let mut code = start_ap_at_0x8000(&[
            0x0f, 0x01, 0x1e, 0x20, 0x80, // lidt [0x8020]
            0x0f, 0x01, 0x16, 0x20, 0x80, // lgdt [0x8020]
            0x0f, 0x20, 0xc0, // mov eax, cr0
            0x0c, 0x01, // or al, 1
            0x0f, 0x22, 0xc0, // mov cr0, eax
            0xea, 0x00, 0x00, 0x08, 0x00, // jmp far 0x08:0
        ]);
        code.extend([0xeb, 0xfe]); // the boot vCPU spins
        let image = pvh_image(&code);
        let mut vm = vmm.boot(&config(&image)).unwrap();
        let (_, end) = messages_until_end(&vm, Duration::from_secs(10));
        match end {
            Some(GuestEnd::TripleFault { detail }) => {
                assert!(detail.contains("vCPU 1"), "{detail}")
            }
            other => panic!("expected the AP's triple fault, got {other:?}"),
        }
        vm.stop().unwrap();
    }

    #[test]
    fn bad_configurations_are_refused_before_the_guest_runs() {
        let Some(vmm) = vmm() else { return };
        let image = pvh_image(&[0xf4]);
        let refused = |c: VmConfig| vmm.boot(&c).err();
        assert!(matches!(
            refused(VmConfig {
                vcpus: 0,
                ..config(&image)
            }),
            Some(VmmError::Vcpus { asked: 0, .. })
        ));
        assert!(matches!(
            refused(VmConfig {
                memory_mib: MIN_MEMORY_MIB - 1,
                ..config(&image)
            }),
            Some(VmmError::MemorySize { .. })
        ));
        assert!(matches!(
            refused(VmConfig {
                image: b"not an ELF",
                ..config(&image)
            }),
            Some(VmmError::Load(_))
        ));
    }
}
