//! QEMU as the peer VMM: the same ELF booted by QEMU's own PVH loader on its microvm
//! machine, with a COM1 console and isa-debug-exit. It proves the image follows the PVH
//! ABI rather than our VMM's habits, and puts our VMM beside the one users would
//! otherwise pick.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use reports::host::Cpl0;
use reports::record::{BackendInfo, HostInfo};
use thiserror::Error;
use workloads::abi::{EXIT_PORT, PIO_KERNEL_PORT};
use workloads::BackendFeature;

use super::{
    BackendError, BackendKind, BootRequest, GuestEnd, GuestMessage, GuestSession, Hypervisor,
};

#[derive(Debug, Error)]
pub enum QemuError {
    #[error("cannot run {binary}: {source} (install Debian's qemu-system-x86 package, or pass --qemu PATH)")]
    NotFound {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("{binary} --version failed: {detail}")]
    Version { binary: PathBuf, detail: String },
    #[error("--qemu-accel kvm, but /dev/kvm cannot be opened: {0}")]
    NoKvm(std::io::Error),
    #[error("cannot write the guest image for QEMU: {0}")]
    Image(std::io::Error),
    #[error("cannot start QEMU: {0}")]
    Spawn(std::io::Error),
    #[error("--insns counts instructions with a TCG plugin: it needs --qemu-accel tcg")]
    InsnsNeedTcg,
    #[error(transparent)]
    Insns(#[from] crate::insns::InsnsError),
}

/// The accelerator asked for (`--qemu-accel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QemuAccel {
    /// KVM where /dev/kvm opens, else TCG.
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator QEMU runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// QEMU's translator: every guest instruction is emulated.
    Tcg,
}

impl Accel {
    /// QEMU's `-accel` word, also what records and reproduce commands say.
    pub const fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The machine type QEMU emulates (`--qemu-machine`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum QemuMachine {
    /// microvm: no PCI, no firmware; QEMU's own PVH loader jumps to the guest.
    Microvm,
    /// q35 (ICH9, PCIe), the machine libvirt gives a `<type machine='q35'>` domain:
    /// SeaBIOS runs, then QEMU's PVH option ROM boots the guest.
    Q35,
}

impl QemuMachine {
    /// QEMU's name for it, also what records and reproduce commands say.
    pub const fn name(self) -> &'static str {
        match self {
            QemuMachine::Microvm => "microvm",
            QemuMachine::Q35 => "q35",
        }
    }

    /// The `-machine` argument. microvm drops its option ROMs and RTC (nothing there
    /// needs them); q35 keeps its defaults, as libvirt leaves them.
    fn argument(self) -> &'static str {
        match self {
            QemuMachine::Microvm => "microvm,x-option-roms=off,rtc=off,isa-serial=on",
            QemuMachine::Q35 => "q35",
        }
    }

    /// The backend kind records carry: reports pool by it, so each machine is a column
    /// of its own (the ladder: our VMM, microvm, q35, libvirt).
    pub const fn record_kind(self) -> &'static str {
        match self {
            QemuMachine::Microvm => "qemu",
            QemuMachine::Q35 => "qemu-q35",
        }
    }
}

#[derive(Clone, Debug)]
pub struct QemuOptions {
    pub binary: PathBuf,
    pub accel: QemuAccel,
    pub machine: QemuMachine,
    /// `-cpu` model; `None` picks one (see `default_cpu_model`).
    pub cpu: Option<String>,
    /// Load the hvbench-insns plugin (TCG only) and count instructions per operation.
    pub insns: bool,
}

/// Why QEMU cannot run a CPL0 hypercall on a kvm_pvm host.
pub(crate) const KVM_PVM_QEMU_HYPERCALL: &str =
    "on kvm_pvm hosts KVM_RUN never returns from a CPL0 hypercall unless the VMM disables \
     KVM's hypercall-patching quirk, which QEMU does not";

/// Why a q35 guest has no balloon (QEMU q35 and libvirt alike).
pub const Q35_NO_VIRTIO_MMIO: &str =
    "the guest's balloon and block drivers speak virtio-mmio, which q35 does not have (q35 \
     offers virtio-pci, a transport the guest lacks)";

/// Why `io.pio-out-kernel` has no path on QEMU (plain and under libvirt alike).
pub(crate) fn qemu_no_ioeventfd() -> String {
    format!(
        "QEMU registers no ioeventfd on port {PIO_KERNEL_PORT:#x}: the write would exit to \
         QEMU's userspace, not the in-kernel path this workload measures"
    )
}

/// Why `cpu.hlt` cannot be timed on QEMU (plain and under libvirt alike).
pub(crate) const QEMU_PARKS_HLT: &str =
    "QEMU parks a halted vCPU until an interrupt arrives; with interrupts off it never \
     resumes, so HLT cannot be timed there";

/// The CPU model QEMU gets unless told otherwise: the host's CPU with an invariant TSC
/// (so QEMU advertises the TSC frequency in leaf 0x40000010), or `max` under TCG.
/// kvm_pvm refuses QEMU's write of IA32_ARCH_CAPABILITIES (QEMU then aborts), so that
/// feature is left out there.
pub fn default_cpu_model(accel: Accel, kvm_module: &str) -> String {
    match (accel, kvm_module) {
        (Accel::Kvm, "kvm_pvm") => "host,+invtsc,-arch-capabilities".into(),
        (Accel::Kvm, _) => "host,+invtsc".into(),
        (Accel::Tcg, _) => "max".into(),
    }
}

#[derive(Debug)]
pub struct QemuBackend {
    options: QemuOptions,
    accel: Accel,
    cpu: String,
    version: String,
    host: HostInfo,
    image_dir: tempfile_dir::TempDir,
    /// The plugin, where instructions are counted.
    insns_plugin: Option<PathBuf>,
    disk: Option<QemuDisk>,
}

/// A private directory removed on drop (for the guest image QEMU reads).
pub(crate) mod tempfile_dir {
    use std::path::{Path, PathBuf};

    #[derive(Debug)]
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(prefix: &str) -> std::io::Result<Self> {
            let base = std::env::temp_dir();
            for attempt in 0..100u32 {
                let path = base.join(format!("{prefix}-{}-{attempt}", std::process::id()));
                match std::fs::create_dir(&path) {
                    Ok(()) => return Ok(TempDir(path)),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(std::io::Error::other("no free temporary directory name"))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl QemuBackend {
    pub fn new(options: QemuOptions, host: HostInfo) -> Result<Self, QemuError> {
        let output = Command::new(&options.binary)
            .arg("--version")
            .output()
            .map_err(|source| QemuError::NotFound {
                binary: options.binary.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(QemuError::Version {
                binary: options.binary.clone(),
                detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let version = String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let kvm_opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm");
        let accel = match (options.accel, kvm_opens) {
            (QemuAccel::Kvm, Err(e)) => return Err(QemuError::NoKvm(e)),
            (QemuAccel::Kvm | QemuAccel::Auto, Ok(_)) => Accel::Kvm,
            (QemuAccel::Auto, Err(_)) | (QemuAccel::Tcg, _) => Accel::Tcg,
        };
        let image_dir = tempfile_dir::TempDir::new("hvbench-qemu").map_err(QemuError::Image)?;
        let cpu = options
            .cpu
            .clone()
            .unwrap_or_else(|| default_cpu_model(accel, &host.kvm_module));
        let insns_plugin = match (options.insns, accel) {
            (false, _) => None,
            (true, Accel::Kvm) => return Err(QemuError::InsnsNeedTcg),
            (true, Accel::Tcg) => Some(crate::insns::find_plugin()?),
        };
        Ok(QemuBackend {
            options,
            accel,
            cpu,
            version,
            host,
            image_dir,
            insns_plugin,
            disk: None,
        })
    }

    fn insns_log_path(&self) -> PathBuf {
        self.image_dir.path().join("insns.log")
    }

    /// `-accel`: the plugin's counts are exact only with every vCPU on one TCG thread.
    fn accel_argument(&self) -> String {
        match self.insns_plugin {
            Some(_) => crate::insns::TCG_ACCEL.into(),
            None => self.accel.name().into(),
        }
    }

    fn arguments(&self, request: &BootRequest, kernel: &Path) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "-machine".into(),
            self.options.machine.argument().into(),
            "-accel".into(),
            self.accel_argument(),
            "-cpu".into(),
            self.cpu.clone(),
            "-m".into(),
            format!("{}M", request.memory_mib),
            "-smp".into(),
            request.vcpus.to_string(),
            // Named threads (`CPU <n>/KVM`): sched.* finds the vCPU threads by name.
            "-name".into(),
            format!("{},debug-threads=on", request.name.replace(',', ",,")),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-device".into(),
            format!("isa-debug-exit,iobase={EXIT_PORT:#x},iosize=0x04"),
            // A triple fault resets the machine; without a reboot QEMU exits with 0.
            "-no-reboot".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-append".into(),
            request.cmdline.to_string(),
        ];
        if let Some(disk) = self
            .disk
            .as_ref()
            .filter(|_| self.options.machine != QemuMachine::Q35)
        {
            args.extend(disk_arguments(disk));
        }
        if let Some(plugin) = &self.insns_plugin {
            // Checked for commas when the backend was made (its own temporary directory).
            if let Ok(argument) = crate::insns::plugin_argument(plugin, &self.insns_log_path()) {
                args.extend(["-plugin".to_string(), argument]);
            }
        }
        args
    }

    /// Gives every guest booted from now on the disk as a virtio-blk on microvm's
    /// virtio-mmio bus.
    pub fn with_disk(mut self, disk: Option<&crate::disk::TestDisk>) -> Self {
        self.disk = disk.map(|d| QemuDisk {
            path: d.path().to_path_buf(),
            direct: d.direct(),
            details: d.details(),
        });
        self
    }
}

/// The disk QEMU is given.
#[derive(Clone, Debug)]
struct QemuDisk {
    path: PathBuf,
    direct: bool,
    details: BTreeMap<String, String>,
}

impl QemuDisk {
    /// `-drive` cache and AIO: O_DIRECT with Linux native AIO (cache=none), or the page
    /// cache with QEMU's thread pool.
    fn cache_aio(&self) -> &'static str {
        if self.direct {
            "cache=none,aio=native"
        } else {
            "cache=writeback,aio=threads"
        }
    }
}

/// The modern (version 2) virtio-mmio transport (microvm's default is legacy) and the
/// drive; a comma in the path is doubled, as QEMU's option syntax wants.
fn disk_arguments(disk: &QemuDisk) -> Vec<String> {
    let path = disk.path.display().to_string().replace(',', ",,");
    vec![
        "-global".into(),
        "virtio-mmio.force-legacy=false".into(),
        "-drive".into(),
        format!(
            "file={path},if=none,id=hvbd,format=raw,{}",
            disk.cache_aio()
        ),
        "-device".into(),
        "virtio-blk-device,drive=hvbd".into(),
    ]
}

impl Hypervisor for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    /// QEMU advises MADV_HUGEPAGE on every RAM block it allocates (`ram_block_add` in
    /// `system/physmem.c`), with no option to turn it off.
    fn guest_ram_advice(&self) -> Option<hostutil::huge_pages::HugePageAdvice> {
        Some(hostutil::huge_pages::HugePageAdvice::HugePages)
    }

    fn info(&self) -> BackendInfo {
        let mut details = BTreeMap::new();
        details.insert("accel".into(), self.accel.name().into());
        details.insert("machine".into(), self.options.machine.name().into());
        details.insert("cpu".into(), self.cpu.clone());
        details.insert("binary".into(), self.options.binary.display().to_string());
        if let Some(plugin) = &self.insns_plugin {
            details.insert("insns_plugin".into(), plugin.display().to_string());
        }
        if let Some(disk) = &self.disk {
            details.extend(disk.details.clone());
            details.insert(
                "blk".into(),
                format!(
                    "virtio-blk-device on microvm's virtio-mmio, {}, completions polled by the \
                     guest (no interrupts)",
                    disk.cache_aio()
                ),
            );
        }
        BackendInfo {
            kind: self.options.machine.record_kind().into(),
            version: self.version.clone(),
            details,
        }
    }

    fn host(&self) -> HostInfo {
        let mut host = self.host.clone();
        if self.accel == Accel::Tcg {
            // Every guest instruction is translated by QEMU: figures are emulation, not
            // virtualisation.
            host.class = host.class().with_tcg().to_string();
            host.paging = "tcg-softmmu".into();
            host.cpl0 = Cpl0::Emulated.name().into();
        }
        host
    }

    fn supports(&self, feature: BackendFeature) -> Result<(), crate::backend::Unsupported> {
        match feature {
            BackendFeature::UserspacePioPort | BackendFeature::UserspaceMmioPage => Ok(()),
            BackendFeature::KernelIoeventfdPort => Err(qemu_no_ioeventfd().into()),
            BackendFeature::HypercallFromKernel
                if self.accel == Accel::Kvm && self.host.kvm_module == "kvm_pvm" =>
            {
                Err(KVM_PVM_QEMU_HYPERCALL.into())
            }
            BackendFeature::HypercallFromKernel => Ok(()),
            BackendFeature::VirtioBalloon
            | BackendFeature::Balloon
            | BackendFeature::BlockDevice
                if self.options.machine == QemuMachine::Q35 =>
            {
                Err(Q35_NO_VIRTIO_MMIO.into())
            }
            BackendFeature::KernelSamePageMerging
            | BackendFeature::Balloon
            | BackendFeature::VirtioBalloon => Err(
                "hvbench measures KSM and ballooning with its own VMM, whose processes and \
                 devices it controls; run them with --backend kvm"
                    .into(),
            ),
            BackendFeature::LiveMigration => Ok(()),
            BackendFeature::BlockDevice => match self.disk {
                Some(_) => Ok(()),
                None => Err("this run made no disk for the guest".into()),
            },
            BackendFeature::VirtioBlk => Err(
                "the self-test proves hvbench's own VMM's request checks; QEMU's are its own"
                    .into(),
            ),
            // microvm has a local APIC per vCPU (in KVM's irqchip with -accel kvm, QEMU's
            // own under TCG) and -smp N APs waiting for INIT/SIPI.
            BackendFeature::LocalApic => Ok(()),
            // One QEMU process per guest; its vCPU threads are named (`-name
            // ...,debug-threads=on`) and KVM keeps their steal time.
            BackendFeature::VcpuThreads if self.accel == Accel::Kvm => Ok(()),
            BackendFeature::VcpuThreads => Err(
                "sched.steal and sched.fairness weigh and account vCPU threads that KVM runs; \
                 under TCG QEMU's threads run its translator and the guest has no steal \
                 time: run them with --qemu-accel kvm"
                    .into(),
            ),
            BackendFeature::HltExitsToVmm => Err(QEMU_PARKS_HLT.into()),
        }
    }

    fn guest_runs_locally(&self) -> bool {
        true
    }

    fn insns_log(&self) -> Option<PathBuf> {
        self.insns_plugin.as_ref().map(|_| self.insns_log_path())
    }

    fn disk(&self) -> Option<(&Path, bool)> {
        self.disk.as_ref().map(|d| (d.path.as_path(), d.direct))
    }

    fn reproduce_args(&self) -> Vec<String> {
        vec![
            "--qemu".into(),
            self.options.binary.display().to_string(),
            "--qemu-accel".into(),
            self.accel.name().into(),
            "--qemu-machine".into(),
            self.options.machine.name().into(),
            "--qemu-cpu".into(),
            self.cpu.clone(),
        ]
        .into_iter()
        .chain(self.insns_plugin.as_ref().map(|_| "--insns".to_string()))
        .collect()
    }

    fn migration_command(
        &self,
        request: &BootRequest,
    ) -> Option<Result<(PathBuf, Vec<String>), BackendError>> {
        let kernel = request.image.write_to(self.image_dir.path());
        Some(
            kernel
                .map(|kernel| {
                    let mut args = self.arguments(request, &kernel);
                    // QEMU refuses to migrate a CPU with an invariant TSC (and cannot fix
                    // its rate where KVM has no TSC scaling, as on kvm_pvm): drop it.
                    if let Some(cpu) = args.iter().position(|a| a == "-cpu").map(|i| i + 1) {
                        if let Some(model) = args.get_mut(cpu) {
                            *model = model.replace("+invtsc", "-invtsc");
                        }
                    }
                    (self.options.binary.clone(), args)
                })
                .map_err(|e| QemuError::Image(e).into()),
        )
    }

    fn boot(&self, request: &BootRequest) -> Result<Box<dyn GuestSession>, BackendError> {
        let kernel = request
            .image
            .write_to(self.image_dir.path())
            .map_err(QemuError::Image)?;
        let mut child = self.spawn(request, &kernel)?;
        let stdout = child.stdout.take();
        let complaints = keep_stderr(child.stderr.take());
        let child = Arc::new(Mutex::new(child));
        let stopping = Arc::new(AtomicBool::new(false));
        // Bounded: a guest that floods the console makes QEMU wait on its stdout.
        let (tx, rx) = crate::console::guest_channel(stopping.clone());
        let reader = {
            let child = child.clone();
            let stopping = stopping.clone();
            std::thread::spawn(move || {
                if let Some(out) = stdout {
                    forward_console(out, &tx);
                }
                let end = wait_for_end(&child, complaints);
                // Whatever QEMU's status says, a QEMU the host stopped was stopped.
                let end = if stopping.load(Ordering::Acquire) {
                    GuestEnd::Stopped
                } else {
                    end
                };
                let _ = tx.send(GuestMessage::Ended(end));
            })
        };
        Ok(Box::new(QemuSession {
            messages: rx,
            child,
            reader: Some(reader),
            stopping,
        }))
    }
}

impl QemuBackend {
    /// Starts QEMU on `kernel`, in a process group of its own and killed with hvbench.
    fn spawn(&self, request: &BootRequest, kernel: &std::path::Path) -> Result<Child, QemuError> {
        let mut command = Command::new(&self.options.binary);
        command
            .args(self.arguments(request, kernel))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A process group of its own: Ctrl-C reaches hvbench alone, which stops QEMU
            // and records the interruption (QEMU exits 0 on SIGINT, which would read as a
            // triple fault).
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill QEMU when
        // hvbench dies, so no QEMU outlives the run.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.spawn().map_err(QemuError::Spawn)
    }
}

/// QEMU's stderr, read on a thread of its own: the first 16 KiB kept, the rest drained.
/// Joining the thread gives the text.
fn keep_stderr(stderr: Option<ChildStderr>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let Some(mut err) = stderr else {
            return String::new();
        };
        let mut buf = Vec::new();
        let _ = err.by_ref().take(16 * 1024).read_to_end(&mut buf);
        let _ = std::io::copy(&mut err, &mut std::io::sink());
        String::from_utf8_lossy(&buf).trim().to_string()
    })
}

/// Copies QEMU's stdout (the guest's serial console) to the session until it closes.
fn forward_console(mut out: ChildStdout, tx: &crate::console::GuestSender) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = out.read(&mut buf) {
        if n == 0 {
            break;
        }
        let _ = tx.send(GuestMessage::Console {
            bytes: buf[..n].to_vec(),
            exits: None,
        });
    }
}

/// How QEMU ended, once it has: polled rather than waited for, so `stop` can always take
/// the lock to kill it.
fn wait_for_end(child: &Mutex<Child>, complaints: std::thread::JoinHandle<String>) -> GuestEnd {
    let status = loop {
        match child.lock().map(|mut c| c.try_wait()) {
            Ok(Ok(Some(status))) => break Some(status),
            Ok(Ok(None)) => std::thread::sleep(std::time::Duration::from_millis(5)),
            Ok(Err(_)) | Err(_) => break None,
        }
    };
    let complaints = complaints.join().unwrap_or_default();
    let Some(status) = status else {
        return GuestEnd::Failed {
            detail: "lost track of the QEMU process".into(),
        };
    };
    match (status.code(), status.signal()) {
        // isa-debug-exit: QEMU exits with (code << 1) | 1.
        (Some(code), _) if code & 1 == 1 => GuestEnd::Exited {
            code: (code >> 1).cast_unsigned(),
        },
        (Some(0), _) => GuestEnd::TripleFault {
            detail: "QEMU reset the guest (a triple fault, with -no-reboot) and exited".into(),
        },
        (_, Some(libc::SIGKILL)) => GuestEnd::Stopped,
        (code, signal) => GuestEnd::Failed {
            detail: format!(
                "QEMU ended with status {code:?}, signal {signal:?}: {}",
                if complaints.is_empty() {
                    "no message"
                } else {
                    &complaints
                }
            ),
        },
    }
}

#[derive(Debug)]
pub struct QemuSession {
    messages: Receiver<GuestMessage>,
    child: Arc<Mutex<Child>>,
    reader: Option<JoinHandle<()>>,
    /// Set before the host kills QEMU: the reader then neither waits on a full channel
    /// nor reads QEMU's status as the guest's.
    stopping: Arc<AtomicBool>,
}

impl GuestSession for QemuSession {
    fn messages(&self) -> &Receiver<GuestMessage> {
        &self.messages
    }

    fn stack_processes(&self) -> super::StackProcesses {
        super::StackProcesses {
            vmm: self.child.lock().ok().map(|c| c.id()),
            ..Default::default()
        }
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        // First, so that a reader waiting on a full channel gives up before it is joined.
        self.stopping.store(true, Ordering::Release);
        if let Ok(mut child) = self.child.lock() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok(())
    }
}

impl Drop for QemuSession {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
