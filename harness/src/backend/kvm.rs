//! The `kvm` backend: hvbench's own VMM (the `vmm` crate) behind the [`Hypervisor`]
//! trait. The VMM boots and runs the guest; this adapter adds what a run needs around it:
//! the records' backend section, which features the VMM provides, KSM's and the balloon's
//! host side, and the reproduce command's options.

use std::collections::BTreeMap;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Duration;

use reports::record::{BackendInfo, HostInfo};
use vmm::{BalloonHandle, Doorbell, RunningVm, VmConfig, Vmm};
use workloads::BackendFeature;

use super::balloon::{BalloonBackend, BalloonBoot, BalloonControl, HostMemory, Refusals};
use super::{BackendError, BackendKind, BootRequest, GuestMessage, GuestSession, Hypervisor};
use crate::host_paging::PagingMode;
use hostutil::huge_pages::HugePageAdvice;

pub use vmm::VmmError;

#[derive(Debug)]
pub struct KvmBackend {
    vmm: Vmm,
    host: HostInfo,
    /// Guest RAM is marked MADV_MERGEABLE (`mem.ksm`'s guests).
    mergeable: bool,
    /// Guest RAM is backed by transparent huge pages (MADV_HUGEPAGE).
    huge_pages: bool,
    /// Answers the doorbell port of every guest this backend boots.
    doorbell: Arc<Doorbell>,
    /// The mode `hvbench host paging` switched KVM to for this run, if it did.
    paging_switch: Option<PagingMode>,
    /// The disk every guest gets as a virtio-blk (`io.blk-*`), and what records say of it.
    disk: Option<(vmm::DiskConfig, BTreeMap<String, String>)>,
    /// vCPUs of the guests this backend boots: with more than one, the VMM creates
    /// KVM's in-kernel irqchip (local APICs; HLT is then handled inside KVM).
    vcpus: u32,
    /// The log an outer QEMU's hvbench-insns plugin writes (the KVM lab's, through 9p).
    insns_log: Option<std::path::PathBuf>,
}

impl KvmBackend {
    pub fn new(host: HostInfo) -> Result<Self, VmmError> {
        Ok(KvmBackend {
            vmm: Vmm::new()?,
            host,
            mergeable: false,
            huge_pages: false,
            doorbell: Doorbell::new(),
            paging_switch: None,
            disk: None,
            insns_log: None,
            vcpus: 1,
        })
    }

    /// Gives every guest booted from now on a virtio-blk over `disk`.
    pub fn with_disk(mut self, disk: Option<&crate::disk::TestDisk>) -> Self {
        self.disk = disk.map(|d| (d.config(), d.details()));
        self
    }

    /// The vCPUs of the guests this run boots (`--vcpus`), which decide the irqchip.
    pub fn with_vcpus(mut self, vcpus: u32) -> Self {
        self.vcpus = vcpus;
        self
    }

    fn irqchip(&self) -> bool {
        self.vcpus > 1
    }

    /// Counts instructions per operation from `log`, written by the hvbench-insns plugin
    /// of the QEMU this machine runs in (`--insns-log`; the KVM lab's `lab run` passes
    /// it): the guest then places its markers.
    pub fn with_insns_log(mut self, log: Option<std::path::PathBuf>) -> Self {
        self.insns_log = log;
        self
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

    /// Boots the guest as a VM the caller holds (`hvbench vmm`, which may migrate it).
    pub fn boot_vm(&self, request: &BootRequest) -> Result<RunningVm, VmmError> {
        self.start(request, false)
    }

    /// Receives a guest migrated over `stream`, starts it and acknowledges it.
    pub fn incoming(
        &self,
        stream: vmm::migration::MigrationStream,
        name: &str,
    ) -> Result<(RunningVm, vmm::migration::IncomingReport), vmm::migration::MigrationError> {
        self.vmm.incoming(stream, name, self.doorbell.clone())
    }

    /// Boots the guest, with the virtio-balloon if asked.
    fn start(&self, request: &BootRequest, balloon: bool) -> Result<RunningVm, VmmError> {
        self.vmm.boot(&VmConfig {
            image: request.image.bytes(),
            cmdline: request.cmdline,
            memory_mib: request.memory_mib,
            vcpus: request.vcpus,
            name: &request.name,
            mergeable: self.mergeable,
            huge_pages: self.huge_pages,
            balloon,
            disk: self.disk.as_ref().map(|(config, _)| config),
            doorbell: self.doorbell.clone(),
        })
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
        let mut vm = self.start(request, true)?;
        let handle = vm
            .take_balloon()
            .ok_or_else(|| VmmError::Balloon("no balloon was attached".into()))?;
        Ok(BalloonBoot {
            session: Box::new(KvmSession(vm)),
            control: Box::new(KvmBalloon { handle }),
        })
    }
}

impl Hypervisor for KvmBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Kvm
    }

    /// MADV_HUGEPAGE with `--host-hugepages`, none otherwise (so transparent huge pages
    /// only where the host's THP mode is `always`; QEMU, by contrast, always advises
    /// MADV_HUGEPAGE).
    fn guest_ram_advice(&self) -> Option<HugePageAdvice> {
        Some(if self.huge_pages {
            HugePageAdvice::HugePages
        } else {
            HugePageAdvice::NoAdvice
        })
    }

    fn info(&self) -> BackendInfo {
        let mut details = BTreeMap::new();
        details.insert("vmm".into(), "hvbench (kvm-ioctls)".into());
        details.insert("kvm_api_version".into(), self.vmm.api_version().to_string());
        let irqchip = if self.irqchip() {
            "in-kernel (KVM_CREATE_IRQCHIP: PIC, IOAPIC, a local APIC per vCPU); APs started \
             by the guest's INIT/SIPI"
        } else {
            "none"
        };
        details.insert("irqchip".into(), irqchip.into());
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
        if let Some((_, disk)) = &self.disk {
            details.extend(disk.clone());
            details.insert(
                "blk".into(),
                "virtio-blk (virtio-mmio v2): notify by ioeventfd, one I/O thread handing every \
                 request to io_uring (preadv/pwritev one by one where the kernel has none), \
                 completions polled by the guest (no interrupts)"
                    .into(),
            );
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

    fn supports(&self, feature: BackendFeature) -> Result<(), super::Unsupported> {
        match feature {
            BackendFeature::UserspacePioPort
            | BackendFeature::KernelIoeventfdPort
            | BackendFeature::UserspaceMmioPage
            | BackendFeature::HypercallFromKernel => Ok(()),
            BackendFeature::HltExitsToVmm if self.irqchip() => Err(
                "with more than one vCPU the VMM has KVM's in-kernel irqchip, which handles HLT \
                 itself (a vCPU that halts with interrupts off is parked in KVM): run cpu.hlt \
                 with --vcpus 1"
                    .into(),
            ),
            BackendFeature::HltExitsToVmm => Ok(()),
            // sched.steal and sched.fairness start VMM processes of their own.
            BackendFeature::VcpuThreads => Ok(()),
            BackendFeature::LocalApic if self.irqchip() => Ok(()),
            BackendFeature::LocalApic => Err(
                "hvbench's VMM creates the in-kernel irqchip (local APICs) only for an SMP guest: \
                 run with --vcpus 2 or more"
                    .into(),
            ),
            BackendFeature::KernelSamePageMerging => match ksm_unusable_reason() {
                None => Ok(()),
                Some(reason) => Err(reason.into()),
            },
            BackendFeature::Balloon | BackendFeature::VirtioBalloon => Ok(()),
            BackendFeature::LiveMigration => Ok(()),
            BackendFeature::BlockDevice | BackendFeature::VirtioBlk => match self.disk {
                Some(_) => Ok(()),
                None => Err("this run made no disk for the guest".into()),
            },
        }
    }

    fn balloon(&self) -> Option<&dyn BalloonBackend> {
        Some(self)
    }

    fn disk(&self) -> Option<(&std::path::Path, bool)> {
        self.disk
            .as_ref()
            .map(|(config, _)| (config.path.as_path(), config.direct))
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

    fn insns_log(&self) -> Option<std::path::PathBuf> {
        self.insns_log.clone()
    }

    fn reproduce_prefix(&self) -> Vec<String> {
        self.paging_switch
            .map(|mode| ["hvbench", "host", "paging", mode.name(), "--"].map(String::from))
            .map_or_else(Vec::new, Vec::from)
    }

    fn boot(&self, request: &BootRequest) -> Result<Box<dyn GuestSession>, BackendError> {
        Ok(Box::new(KvmSession(self.start(request, false)?)))
    }
}

/// A guest on hvbench's VMM, as a session.
#[derive(Debug)]
pub struct KvmSession(RunningVm);

impl GuestSession for KvmSession {
    fn messages(&self) -> &Receiver<GuestMessage> {
        self.0.messages()
    }

    fn stack_processes(&self) -> super::StackProcesses {
        super::StackProcesses {
            vmm: Some(std::process::id()),
            daemons: Vec::new(),
            note: Some(
                "hvbench's VMM runs inside the hvbench process: its figures include the \
                 harness (about what `hvbench vmm` would hold, plus the runner)",
            ),
            on: None,
        }
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        let stopped = self.0.stop();
        if let Some(blk) = self.0.blk() {
            report_blk_refusals(&blk.refusals());
        }
        Ok(stopped?)
    }
}

/// Says what the VMM's virtio-blk refused during a boot (the host's own account, beside
/// the guest's in `selftest.blk-corrupt`'s record); once per boot, after the guest stopped.
fn report_blk_refusals(refusals: &vmm::Refusals) {
    if refusals.total == 0 {
        return;
    }
    crate::say!(
        "hvbench: the VMM's virtio-blk refused {} request(s){}",
        refusals.total,
        if refusals.kept.is_empty() { "" } else { ":" }
    );
    for why in &refusals.kept {
        crate::say!("hvbench:   {why}");
    }
}
