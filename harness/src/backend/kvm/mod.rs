//! hvbench's own VMM on /dev/kvm: the boot vCPU runs the guest (further vCPUs are created
//! and stay parked: the guest is uniprocessor), no interrupt controller (the guest polls
//! and never enables interrupts), a UART, an exit port and the test devices.

pub mod boot;
pub mod devices;
pub mod vstate;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use reports::record::{BackendInfo, HostInfo};
use thiserror::Error;
use vmm_sys_util::signal::Killable;
use workloads::BackendFeature;

use self::devices::Doorbell;
use self::vstate::vcpu::{create_secondary, install_kick_handler, kick_signal, Vcpu};
use self::vstate::vm::Vm;
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
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("loading the guest image: {0}")]
    Load(String),
    #[error("{asked} vCPUs asked for; this KVM allows 1..={max}")]
    Vcpus { asked: u32, max: u32 },
    #[error("the vCPU thread could not be started: {0}")]
    Thread(std::io::Error),
    #[error("the vCPU thread did not stop within {0:?}")]
    StopTimeout(Duration),
}

pub struct KvmBackend {
    kvm: Kvm,
    host: HostInfo,
    /// Guest RAM is marked MADV_MERGEABLE (`mem.ksm`'s guests).
    mergeable: bool,
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

    /// The doorbell every guest of this backend reads; ringing it reaches them all.
    pub fn doorbell(&self) -> Arc<Doorbell> {
        self.doorbell.clone()
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

impl Hypervisor for KvmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    fn info(&self) -> BackendInfo {
        let mut details = BTreeMap::new();
        details.insert("vmm".into(), "hvbench (kvm-ioctls)".into());
        details.insert(
            "kvm_api_version".into(),
            self.kvm.get_api_version().to_string(),
        );
        details.insert("irqchip".into(), "none".into());
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

    fn supports(&self, feature: BackendFeature) -> Result<(), String> {
        match feature {
            BackendFeature::UserspacePioPort
            | BackendFeature::KernelIoeventfdPort
            | BackendFeature::UserspaceMmioPage
            | BackendFeature::HltExitsToVmm
            | BackendFeature::HypercallFromKernel => Ok(()),
            BackendFeature::KernelSamePageMerging => match ksm_unusable_reason() {
                None => Ok(()),
                Some(reason) => Err(reason),
            },
            BackendFeature::Balloon => Err("hvbench's VMM has no balloon device yet".into()),
        }
    }

    fn guest_runs_locally(&self) -> bool {
        true
    }

    fn reproduce_prefix(&self) -> Option<String> {
        self.paging_switch
            .map(|mode| format!("hvbench host paging {} --", mode.name()))
    }

    fn boot(&self, request: &BootRequest) -> Result<Box<dyn GuestSession>, BackendError> {
        let max = self.kvm.get_max_vcpus() as u32;
        if request.vcpus == 0 || request.vcpus > max {
            return Err(VmmError::Vcpus {
                asked: request.vcpus,
                max,
            }
            .into());
        }
        let mut vm = Vm::new(&self.kvm, request.memory_mib)?;
        if self.mergeable {
            vstate::memory::mark_mergeable(&vm.memory)?;
        }
        let entry = boot::load(&vm.memory, request.image, request.cmdline)?;
        let mut vcpu = Vcpu::new(&self.kvm, &vm, entry)?;
        vcpu.attach_doorbell(self.doorbell.clone());
        vm.secondary_vcpus = create_secondary(&self.kvm, &vm, request.vcpus - 1)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu0-{}", request.name))
            .spawn(move || vcpu.run(vm, thread_stop, tx))
            .map_err(VmmError::Thread)?;
        Ok(Box::new(KvmSession {
            messages: rx,
            stop,
            thread: Some(thread),
        }))
    }
}

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
