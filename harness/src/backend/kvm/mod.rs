//! hvbench's own VMM on /dev/kvm: the boot vCPU runs the guest (further vCPUs are created
//! and stay parked: the guest is uniprocessor), no interrupt controller (the guest polls
//! and never enables interrupts), a UART, an exit port and the test devices.

pub mod boot;
pub mod devices;
pub mod vstate;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use reports::record::{BackendInfo, HostInfo};
use thiserror::Error;
use vmm_sys_util::signal::Killable;
use workloads::BackendFeature;

use self::devices::balloon::{BalloonHandle, VirtioBalloon};
use self::devices::Doorbell;
use self::vstate::vcpu::{create_secondary, install_kick_handler, kick_signal, Vcpu};
use self::vstate::vm::Vm;
use super::balloon::{BalloonBackend, BalloonBoot, BalloonControl, HostMemory, Refusals};
use super::{BackendError, BackendKind, BootRequest, GuestMessage, GuestSession, Hypervisor};
use crate::host_paging::PagingMode;

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
}

#[derive(Debug)]
pub struct KvmBackend {
    kvm: Kvm,
    host: HostInfo,
    /// Guest RAM is marked MADV_MERGEABLE (`mem.ksm`'s guests).
    mergeable: bool,
    /// Guest RAM is backed by transparent huge pages (MADV_HUGEPAGE).
    huge_pages: bool,
    /// Answers the doorbell port of every guest this backend boots.
    doorbell: Arc<Doorbell>,
    /// The mode `hvbench host paging` switched KVM to for this run, if it did.
    paging_switch: Option<PagingMode>,
}

impl KvmBackend {
    pub fn new(host: HostInfo) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::Open)?;
        install_kick_handler()?;
        Ok(KvmBackend {
            kvm,
            host,
            mergeable: false,
            huge_pages: false,
            doorbell: Doorbell::new(),
            paging_switch: None,
        })
    }

    /// Records that this run was started by `hvbench host paging MODE --`, so that its
    /// reproduce commands switch the same way.
    pub fn with_paging_switch(mut self, mode: Option<PagingMode>) -> Self {
        self.paging_switch = mode;
        self
    }

    /// Marks the RAM of guests booted from now on MADV_MERGEABLE (or not).
    pub fn with_mergeable_memory(mut self, mergeable: bool) -> Self {
        self.mergeable = mergeable;
        self
    }

    /// Backs the RAM of guests booted from now on with transparent huge pages (or not).
    pub fn with_huge_pages(mut self, huge_pages: bool) -> Self {
        self.huge_pages = huge_pages;
        self
    }

    /// The doorbell every guest of this backend reads; ringing it reaches them all.
    pub fn doorbell(&self) -> Arc<Doorbell> {
        self.doorbell.clone()
    }

    /// Boots the guest, with the virtio-balloon if asked; the balloon's handle comes back
    /// beside the session.
    pub fn start(
        &self,
        request: &BootRequest,
        with_balloon: bool,
    ) -> Result<(KvmSession, Option<BalloonHandle>), VmmError> {
        let max = u32::try_from(self.kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        if request.vcpus == 0 || request.vcpus > max {
            return Err(VmmError::Vcpus {
                asked: request.vcpus,
                max,
            });
        }
        let mut vm = Vm::new(&self.kvm, request.memory_mib)?;
        if self.mergeable {
            vstate::memory::advise(&vm.memory, vstate::memory::Advice::Mergeable)?;
        }
        if self.huge_pages {
            vstate::memory::advise(&vm.memory, vstate::memory::Advice::HugePages)?;
        }
        let entry = boot::load(&vm.memory, request.image, request.cmdline)?;
        let mut vcpu = Vcpu::new(&self.kvm, &vm, entry)?;
        vcpu.attach_doorbell(self.doorbell.clone());
        vm.secondary_vcpus = create_secondary(&self.kvm, &vm, request.vcpus - 1)?;
        let handle = if with_balloon {
            let (device, handle) = VirtioBalloon::new(vm.memory.clone())
                .map_err(|e| VmmError::Balloon(e.to_string()))?;
            vcpu.attach_balloon(device);
            Some(handle)
        } else {
            None
        };
        let stop = Arc::new(AtomicBool::new(false));
        // Bounded: a guest that floods the console makes its vCPU wait for the host.
        let (tx, rx) = crate::console::guest_channel(stop.clone());
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu0-{}", request.name))
            .spawn(move || vcpu.run(vm, thread_stop, tx))
            .map_err(VmmError::Thread)?;
        let session = KvmSession {
            messages: rx,
            stop,
            thread: Some(thread),
        };
        Ok((session, handle))
    }
}

/// Why hvbench cannot drive KSM on this host, if it cannot.
fn ksm_unusable_reason() -> Option<String> {
    let run = std::path::Path::new("/sys/kernel/mm/ksm/run");
    if !run.exists() {
        return Some("this host's kernel has no KSM (/sys/kernel/mm/ksm is missing)".into());
    }
    if nix::unistd::access(run, nix::unistd::AccessFlags::W_OK).is_err() {
        return Some(
            "hvbench may not change KSM's settings (/sys/kernel/mm/ksm/run is not writable: \
             run as root)"
                .into(),
        );
    }
    None
}

/// The host's side of the KVM balloon: the device's `num_pages`, and guest RAM residency.
#[derive(Debug)]
pub struct KvmBalloon {
    handle: BalloonHandle,
}

impl KvmBalloon {
    pub fn handle(&self) -> &BalloonHandle {
        &self.handle
    }
}

impl BalloonControl for KvmBalloon {
    fn set_balloon(&mut self, bytes: u64) -> Result<(), BackendError> {
        let pages = u32::try_from(bytes / 4096)
            .map_err(|_| VmmError::Balloon(format!("a target of {bytes} bytes is too large")))?;
        self.handle.set_target_pages(pages);
        Ok(())
    }

    fn measure(&mut self) -> Result<HostMemory, BackendError> {
        let guest_bytes = self
            .handle
            .resident_bytes()
            .map_err(|e| VmmError::Balloon(format!("mincore over guest RAM: {e}")))?;
        Ok(HostMemory {
            guest_bytes,
            host_free_bytes: None,
        })
    }

    fn method(&self) -> &'static str {
        "resident pages of the guest's RAM mapping in the VMM process (mincore)"
    }

    fn reported_pages(&self) -> Option<u64> {
        Some(self.handle.actual_pages() as u64)
    }

    fn curve_interval(&self) -> Option<Duration> {
        Some(Duration::from_millis(5))
    }

    fn refusals(&self) -> Option<Refusals> {
        Some(self.handle.refusals())
    }
}

impl BalloonBackend for KvmBackend {
    fn boot_with_balloon(&self, request: &BootRequest) -> Result<BalloonBoot, BackendError> {
        let (session, handle) = self.start(request, true)?;
        let handle = handle.ok_or_else(|| VmmError::Balloon("no balloon was attached".into()))?;
        Ok(BalloonBoot {
            session: Box::new(session),
            control: Box::new(KvmBalloon { handle }),
        })
    }
}

impl Hypervisor for KvmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn guest_ram_advice(&self) -> Option<crate::native::HugePageAdvice> {
        Some(vstate::memory::huge_page_advice(self.huge_pages))
    }

    fn info(&self) -> BackendInfo {
        let mut details = BTreeMap::new();
        details.insert("vmm".into(), "hvbench (kvm-ioctls)".into());
        details.insert(
            "kvm_api_version".into(),
            self.kvm.get_api_version().to_string(),
        );
        details.insert("irqchip".into(), "none".into());
        details.insert(
            "guest_ram".into(),
            if self.huge_pages {
                "transparent huge pages (MADV_HUGEPAGE)"
            } else {
                "anonymous memory, no huge-page advice"
            }
            .into(),
        );
        if !self.host.paging.is_empty() {
            details.insert("paging".into(), self.host.paging.clone());
        }
        BackendInfo {
            kind: "kvm".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            details,
        }
    }

    fn host(&self) -> HostInfo {
        self.host.clone()
    }

    fn supports(&self, feature: BackendFeature) -> Result<(), crate::backend::Unsupported> {
        match feature {
            BackendFeature::UserspacePioPort
            | BackendFeature::KernelIoeventfdPort
            | BackendFeature::UserspaceMmioPage
            | BackendFeature::HltExitsToVmm
            | BackendFeature::HypercallFromKernel => Ok(()),
            BackendFeature::KernelSamePageMerging => match ksm_unusable_reason() {
                None => Ok(()),
                Some(reason) => Err(reason.into()),
            },
            BackendFeature::Balloon | BackendFeature::VirtioBalloon => Ok(()),
        }
    }

    fn balloon(&self) -> Option<&dyn BalloonBackend> {
        Some(self)
    }

    fn guest_runs_locally(&self) -> bool {
        true
    }

    fn reproduce_args(&self) -> Vec<String> {
        if self.huge_pages {
            vec!["--host-hugepages".into()]
        } else {
            Vec::new()
        }
    }

    fn reproduce_prefix(&self) -> Vec<String> {
        self.paging_switch
            .map(|mode| ["hvbench", "host", "paging", mode.name(), "--"].map(String::from))
            .map_or_else(Vec::new, Vec::from)
    }

    fn boot(&self, request: &BootRequest) -> Result<Box<dyn GuestSession>, BackendError> {
        let (session, _) = self.start(request, false)?;
        Ok(Box::new(session))
    }
}

#[derive(Debug)]
pub struct KvmSession {
    messages: Receiver<GuestMessage>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How long a stop may take before it is reported as a failure.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

impl GuestSession for KvmSession {
    fn messages(&self) -> &Receiver<GuestMessage> {
        &self.messages
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.store(true, Ordering::Release);
        let started = Instant::now();
        // Kick until the thread notices: a signal that lands between its check of the flag
        // and KVM_RUN would otherwise be lost.
        while !thread.is_finished() {
            if started.elapsed() > STOP_TIMEOUT {
                return Err(VmmError::StopTimeout(STOP_TIMEOUT).into());
            }
            let _ = thread.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = thread.join();
        Ok(())
    }
}

impl Drop for KvmSession {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
