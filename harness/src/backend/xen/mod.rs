//! Xen through its own toolstack: `xl` on a dom0, reached locally or over SSH.
//!
//! Each boot follows XTF's runner: `xl create -p` (paused), attach `xl console`, start a
//! watcher that reports the domain's shutdown with Xen's reason code, `xl unpause`. Every
//! domain is configured to stay after it shuts down (so its reason can be read) and is
//! destroyed by the session on every path: end, timeout, Ctrl-C, error, drop.

pub mod console;
pub mod sched;
pub mod stale;
pub mod tsc;
pub mod xl;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use reports::record::{BackendInfo, HostInfo};
use thiserror::Error;
use workloads::abi::ExitCode;
use workloads::BackendFeature;

use self::console::ConsoleLink;
use self::xl::{DomainConfig, Paging, ShutdownReason, XlInfo};
use super::balloon::{BalloonBackend, BalloonBoot, BalloonControl, HostMemory, Refusals};
use super::{
    BackendError, BackendKind, BootRequest, GuestEnd, GuestMessage, GuestSession, Hypervisor,
};
use hostutil::transport::{shell_quote, Transport, TransportError};
use lab::LabKind;

/// `mktemp -d` template of the run's directory for images and configs on the dom0.
const REMOTE_DIR_TEMPLATE: &str = "${TMPDIR:-/tmp}/hvbench.XXXXXXXXXX";
/// Limit for one toolstack command (the TCG lab is slow; a real host answers in ms).
const XL_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for the reachability check.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Error)]
pub enum XenError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{target} answered `xl info` without a Xen version: is it a Xen dom0? ({detail})")]
    NotXen { target: String, detail: String },
    #[error("ballooning domain {domain}: {detail}")]
    Balloon { domain: String, detail: String },
    #[error("the dom0 sent {got} bytes of the disk, not its {want}")]
    DiskSize { got: u64, want: u64 },
    #[error("writing the disk fetched from the dom0 to {path}: {source}")]
    DiskFetch {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("`mktemp -d` on {target} printed {printed:?}, not a directory hvbench can use")]
    RemoteDir { target: String, printed: String },
}

/// This run's directory on the dom0, for images and domain configs: made by `mktemp -d`
/// (a fresh name nobody else can have made first, mode 0700, owned by the user hvbench
/// runs `xl` as) and removed with everything in it when dropped, on every path out of the
/// run. A fixed name such as `/tmp/hvbench` could be made first by another user, who
/// would then own the images and configs Xen boots.
#[derive(Debug)]
pub struct RemoteDir {
    transport: Transport,
    path: String,
}

impl RemoteDir {
    pub fn create(transport: &Transport) -> Result<Self, XenError> {
        // Its owner, so that a run killed before it can remove it is cleaned up by the next.
        let owner = stale::write_owner_file();
        let out = transport.run(
            &format!(
                "d=$(mktemp -d \"{REMOTE_DIR_TEMPLATE}\") && chmod 0700 \"$d\"{owner} && printf '%s\\n' \"$d\""
            ),
            None,
            XL_TIMEOUT,
        )?;
        let printed = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        // It goes into xl configs and shell commands: an absolute path of plain characters.
        if !stale::plain_path(&printed) {
            return Err(XenError::RemoteDir {
                target: transport.describe(),
                printed,
            });
        }
        Ok(RemoteDir {
            transport: transport.clone(),
            path: printed,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path of `name` in the directory.
    pub fn file(&self, name: &str) -> String {
        format!("{}/{name}", self.path)
    }
}

impl Drop for RemoteDir {
    fn drop(&mut self) {
        let _ = self.transport.run(
            &format!("rm -rf -- {}", shell_quote(&self.path)),
            None,
            XL_TIMEOUT,
        );
    }
}

/// The hotplug script that gives blkback the disk file as a loop device.
const BLOCK_SCRIPT: &str = include_str!("block-hotplug.sh");

/// The block workloads' disk on the dom0: a file of zeros as large as the run's disk, in
/// the run's [`RemoteDir`], behind a loop device while a domain has it. Dropped before
/// the directory: any loop device still on the file is detached first.
#[derive(Debug)]
struct RemoteDisk {
    transport: Transport,
    path: String,
    script: String,
    /// The run's disk file here: the dom0's copy is fetched into it after the run.
    local: std::path::PathBuf,
    size: u64,
    details: BTreeMap<String, String>,
}

/// Limit for making or fetching the dom0's copy of a disk of `bytes`: a toolstack
/// command's, and a second per MiB (SSH into the TCG lab moves a few MB/s).
fn disk_timeout(bytes: u64) -> Duration {
    XL_TIMEOUT + Duration::from_secs(bytes >> 20)
}

impl RemoteDisk {
    fn create(
        transport: &Transport,
        dir: &RemoteDir,
        disk: &crate::disk::TestDisk,
    ) -> Result<Self, XenError> {
        let path = dir.file("disk.img");
        let script = dir.file("block-hotplug");
        let mib = disk.size() >> 20;
        let mut remote = RemoteDisk {
            transport: transport.clone(),
            path,
            script,
            local: disk.path().to_path_buf(),
            size: disk.size(),
            details: disk.details(),
        };
        put(transport, &remote.script, BLOCK_SCRIPT.as_bytes())?;
        // The same content as the file here (zeros), made there rather than sent.
        transport.run(
            &format!(
                "chmod 0755 {s} && dd if=/dev/zero of={p} bs=1M count={mib} 2>/dev/null",
                s = shell_quote(&remote.script),
                p = shell_quote(&remote.path)
            ),
            None,
            disk_timeout(disk.size()),
        )?;
        remote
            .details
            .insert("disk_dom0_path".into(), remote.path.clone());
        remote.details.insert(
            "disk_dom0_mode".into(),
            "a loop device on the dom0 (its page cache), blkback".into(),
        );
        Ok(remote)
    }

    /// Copies the dom0's file over the one here, so the host's disk check sees what the
    /// guest wrote.
    fn fetch(&self) -> Result<(), BackendError> {
        let out = self
            .transport
            .run(
                &format!("cat {}", shell_quote(&self.path)),
                None,
                disk_timeout(self.size),
            )
            .map_err(XenError::from)?;
        if out.stdout.len() as u64 != self.size {
            return Err(XenError::DiskSize {
                got: out.stdout.len() as u64,
                want: self.size,
            }
            .into());
        }
        std::fs::write(&self.local, &out.stdout).map_err(|source| {
            XenError::DiskFetch {
                path: self.local.clone(),
                source,
            }
            .into()
        })
    }

    /// Shell that detaches every loop device still on the file.
    fn detach_command(&self) -> String {
        let p = shell_quote(&self.path);
        format!(
            "for d in $(losetup -a 2>/dev/null | grep -F {p} | cut -d: -f1); do losetup -d \"$d\"; done; \
             if [ -r {p}.loop ]; then losetup -d \"$(cat {p}.loop)\" 2>/dev/null; fi; true"
        )
    }
}

impl Drop for RemoteDisk {
    fn drop(&mut self) {
        let _ = self.transport.run(&self.detach_command(), None, XL_TIMEOUT);
    }
}

/// How the Xen host was reached and what it is.
#[derive(Clone, Debug)]
pub struct XenHostSpec {
    pub transport: Transport,
    /// The spelling of `--xen-host` (for reproduce commands).
    pub spec: String,
    /// A lab deployed by hvbench (nested in QEMU): figures are emulation artefacts.
    pub lab: Option<LabKind>,
}

impl XenHostSpec {
    /// A running Xen lab as the `--xen-host` spelled `spec`.
    pub fn lab(spec: &str, host: lab::LabHost) -> Self {
        Self {
            transport: host.transport,
            spec: spec.to_string(),
            lab: Some(host.kind),
        }
    }
}

#[derive(Debug)]
pub struct XenBackend {
    host: XenHostSpec,
    paging: Paging,
    info: XlInfo,
    fingerprint: HostInfo,
    /// Why nothing can run (the paging mode is missing), if so.
    unavailable: Option<String>,
    /// Remote paths of uploaded images, by SHA-256.
    uploaded: Mutex<BTreeMap<String, String>>,
    /// The block workloads' disk on the dom0 (goes before the directory holding it).
    disk: Option<RemoteDisk>,
    /// Where they and the domain configs go; removed when the backend goes.
    remote_dir: RemoteDir,
    /// The cpupool new domains are created in, while a `sched.*` runner holds one.
    pool: Mutex<Option<String>>,
}

impl XenBackend {
    /// The domains' TSC mode: what a real host would give them (see tsc.rs).
    fn tsc_mode(&self) -> tsc::TscMode {
        tsc::TscMode::for_host(self.host.lab.is_some())
    }

    /// Connects, checks that the host runs Xen, and fingerprints it.
    pub fn new(host: XenHostSpec, paging: Paging) -> Result<Self, XenError> {
        let t = &host.transport;
        let out = t.run("xl info", None, PROBE_TIMEOUT)?;
        let info = XlInfo::parse(&String::from_utf8_lossy(&out.stdout));
        if info.get("xen_major").is_none() {
            return Err(XenError::NotXen {
                target: t.describe(),
                detail: String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        let dom0 = t
            .run(
                "uname -r; grep -m1 '^vendor_id' /proc/cpuinfo; grep -m1 '^model name' /proc/cpuinfo",
                None,
                PROBE_TIMEOUT,
            )
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let fingerprint = xl::fingerprint(&info, &dom0, paging, host.lab.as_ref());
        let unavailable = (!info.virt_caps().iter().any(|c| c == paging.virt_cap())).then(|| {
            format!(
                "this Xen cannot run {} guests (virt_caps: {}){}",
                paging.name(),
                info.virt_caps().join(" "),
                if paging == Paging::Shadow {
                    "; Debian's Xen 4.17 is built without CONFIG_SHADOW_PAGING (in the lab, \
                     `hvbench lab up xen --hypervisor shadow` builds one with it)"
                } else {
                    ""
                }
            )
        });
        match stale::sweep(t) {
            Ok(said) => said.iter().for_each(|m| crate::say!("hvbench: {m}")),
            Err(e) => crate::say!("hvbench: warning: looking for what killed runs left: {e}"),
        }
        let remote_dir = RemoteDir::create(t)?;
        Ok(XenBackend {
            host,
            paging,
            info,
            fingerprint,
            unavailable,
            uploaded: Mutex::new(BTreeMap::new()),
            disk: None,
            remote_dir,
            pool: Mutex::new(None),
        })
    }

    /// Gives every domain booted from now on the run's disk as xvda (blkback), from a
    /// copy on the dom0.
    pub fn with_disk(mut self, disk: Option<&crate::disk::TestDisk>) -> Result<Self, XenError> {
        if let Some(disk) = disk {
            self.disk = Some(RemoteDisk::create(
                &self.host.transport,
                &self.remote_dir,
                disk,
            )?);
        }
        Ok(self)
    }

    pub(crate) fn transport(&self) -> &Transport {
        &self.host.transport
    }

    /// The path of `name` in this run's directory on the dom0.
    pub(crate) fn remote_file(&self, name: &str) -> String {
        self.remote_dir.file(name)
    }

    /// Uploads the image, writes the domain's config and runs `xl create -p`: the domain
    /// exists, paused, when this returns `Ok` (with its config's path), and the caller
    /// destroys it.
    pub(crate) fn create_paused(&self, request: &BootRequest) -> Result<String, BackendError> {
        let kernel = self.upload_image(request)?;
        let config = DomainConfig {
            name: request.name.clone(),
            kernel,
            cmdline: request.cmdline.to_string(),
            memory_mib: request.memory_mib,
            vcpus: request.vcpus,
            paging: self.paging,
            // Where instructions are counted (a lab with the plugin), the guest keeps to
            // CPU 1 and dom0 to CPU 0 (the lab pins it): the plugin counts per CPU, and a
            // guest that moved between them mid-sample would have no count.
            cpus: self.insns_log().map(|_| 1),
            disk: self
                .disk
                .as_ref()
                .map(|d| (d.path.clone(), d.script.clone())),
            tsc_mode: self.tsc_mode(),
            pool: self.pool.lock().ok().and_then(|p| p.clone()),
        };
        let cfg_path = self.remote_dir.file(&format!("{}.cfg", request.name));
        let t = self.transport();
        put(t, &cfg_path, config.render().as_bytes())?;
        t.run(
            &format!("xl create -p {}", shell_quote(&cfg_path)),
            None,
            XL_TIMEOUT,
        )
        .map_err(XenError::from)?;
        Ok(cfg_path)
    }

    fn upload_image(&self, request: &BootRequest) -> Result<String, XenError> {
        let sha = request.image.sha256();
        if let Some(path) = self.uploaded.lock().ok().and_then(|m| m.get(sha).cloned()) {
            return Ok(path);
        }
        let path = self.remote_dir.file(&format!("guest-{}.elf", &sha[..16]));
        put(self.transport(), &path, request.image.bytes())?;
        if let Ok(mut m) = self.uploaded.lock() {
            m.insert(sha.to_string(), path.clone());
        }
        Ok(path)
    }
}

impl Hypervisor for XenBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Xen
    }

    fn info(&self) -> BackendInfo {
        let mut details = BTreeMap::new();
        details.insert("xen_host".into(), self.host.spec.clone());
        details.insert("guest_type".into(), "pvh".into());
        details.insert("paging".into(), self.paging.name().into());
        details.insert("tsc_mode".into(), self.tsc_mode().detail().into());
        for key in [
            "virt_caps",
            "xen_scheduler",
            "xen_commandline",
            "xen_caps",
            "cc_compiler",
        ] {
            if let Some(v) = self.info.get(key) {
                details.insert(key.into(), v.to_string());
            }
        }
        if let Some(lab) = &self.host.lab {
            details.insert("lab".into(), format!("Xen nested in QEMU ({})", lab.accel));
            if let Some(build) = &lab.hypervisor {
                details.insert("lab_hypervisor".into(), build.clone());
            }
            if lab.insns_log.is_some() {
                details.insert("lab_clock".into(), lab::INSNS_CLOCK.into());
            }
        }
        if let Some(disk) = &self.disk {
            details.extend(disk.details.clone());
        }
        BackendInfo {
            kind: "xen".into(),
            version: self.info.version(),
            details,
        }
    }

    fn host(&self) -> HostInfo {
        self.fingerprint.clone()
    }

    fn unavailable(&self) -> Option<String> {
        self.unavailable.clone()
    }

    fn insns_log(&self) -> Option<std::path::PathBuf> {
        self.host.lab.as_ref()?.insns_log.clone()
    }

    fn supports(&self, feature: BackendFeature) -> Result<(), crate::backend::Unsupported> {
        match feature {
            BackendFeature::UserspacePioPort | BackendFeature::UserspaceMmioPage => Err(
                "a PVH guest has no device model behind its ports and unbacked pages: Xen \
                 itself answers (or crashes the domain), which is not the VMM path this \
                 workload measures on KVM"
                    .into(),
            ),
            BackendFeature::KernelIoeventfdPort => Err(
                "ioeventfd is a KVM interface; Xen has no equivalent for a PVH guest's ports"
                    .into(),
            ),
            BackendFeature::HltExitsToVmm => Err(
                "Xen blocks a vCPU that halts with interrupts off instead of returning to a \
                 VMM; there is no VMM behind a PVH guest"
                    .into(),
            ),
            BackendFeature::HypercallFromKernel => Ok(()),
            BackendFeature::KernelSamePageMerging => Err(
                "Xen has no KSM; its own page sharing (mem_sharing) is experimental and \
                 compiled out of release builds"
                    .into(),
            ),
            BackendFeature::Balloon => Ok(()),
            // `xl migrate` on the dom0 (crate::migration::xen_peer); the guest answers the
            // suspend request (guests/src/hypervisor/suspend.rs).
            BackendFeature::LiveMigration => Ok(()),
            BackendFeature::BlockDevice => match self.disk {
                Some(_) => Ok(()),
                None => Err("this run made no disk for the guest".into()),
            },
            BackendFeature::VirtioBlk => {
                Err("a Xen guest's disk is blkfront/blkback, not hvbench's virtio-blk".into())
            }
            // Xen's own vCPUs, weighed and accounted through xl (run::sched::xen).
            BackendFeature::VcpuThreads => Ok(()),
            // A PVH domain has Xen's emulated local APIC; the guest starts its APs with
            // VCPUOP_initialise/VCPUOP_up (hypervisor/xen_smp.rs), not INIT/SIPI.
            BackendFeature::LocalApic => Ok(()),
            BackendFeature::VirtioBalloon => Err(
                "a Xen guest balloons through hypercalls that Xen answers itself; there is no \
                 VMM queue of hvbench's to corrupt"
                    .into(),
            ),
        }
    }

    fn balloon(&self) -> Option<&dyn BalloonBackend> {
        Some(self)
    }

    fn xl_host(&self) -> Option<&dyn sched::XlHost> {
        Some(self)
    }

    fn fetch_disk(&self) -> Result<(), BackendError> {
        self.disk.as_ref().map_or(Ok(()), RemoteDisk::fetch)
    }

    fn guest_runs_locally(&self) -> bool {
        // Native twins run where hvbench runs; that is the Xen host only when hvbench is
        // in dom0 (and even then dom0 is itself a guest of Xen).
        false
    }

    fn reproduce_args(&self) -> Vec<String> {
        vec![
            "--xen-host".into(),
            self.host.spec.clone(),
            "--paging".into(),
            self.paging.name().into(),
        ]
    }

    fn as_xen(&self) -> Option<&XenBackend> {
        Some(self)
    }

    fn boot(&self, request: &BootRequest) -> Result<Box<dyn GuestSession>, BackendError> {
        let cfg_path = self.create_paused(request)?;
        let t = self.transport().clone();
        // From here on the domain exists: the session destroys it on every path.
        let mut session = XenSession::start(t, request.name.clone(), cfg_path)?;
        if let Err(e) = session.unpause() {
            let _ = session.stop();
            return Err(XenError::from(e).into());
        }
        Ok(Box::new(session))
    }
}

impl BalloonBackend for XenBackend {
    fn boot_with_balloon(&self, request: &BootRequest) -> Result<BalloonBoot, BackendError> {
        let session = self.boot(request)?;
        // The target xl wrote at creation (KiB) is the balloon's zero; the guest reads the
        // same key and measures its balloon from it. The session destroys the domain if
        // this fails.
        let command = format!(
            "xenstore-read /local/domain/$(xl domid {})/memory/target",
            shell_quote(&request.name)
        );
        let mut control = XenBalloon {
            transport: self.transport().clone(),
            name: request.name.clone(),
            initial_kib: 0,
            retries: 0,
        };
        control.initial_kib = control.run_retrying(&command, |text| {
            text.trim()
                .parse::<u64>()
                .map_err(|_| format!("memory/target in xenstore is {:?}, not KiB", text.trim()))
        })?;
        Ok(BalloonBoot {
            session,
            control: Box::new(control),
        })
    }
}

/// The host's side of a Xen balloon: `xl mem-set` sets the target (which xl writes to the
/// domain's `memory/target` in xenstore), `xl list` and `xl info` say what the domain
/// holds and what Xen has free.
///
/// Each phase is one SSH command (measure, then set), and a command that fails is run
/// again, up to [`BALLOON_ATTEMPTS`] times: both halves are idempotent, and in the TCG lab
/// dom0 loses a process now and then while a guest runs. Retries are counted and noted.
#[derive(Debug)]
pub struct XenBalloon {
    transport: Transport,
    name: String,
    initial_kib: u64,
    retries: u32,
}

/// Tries per toolstack command of the balloon.
const BALLOON_ATTEMPTS: u32 = 3;
/// Printed after `xl mem-set` succeeded in a combined command.
const SET_DONE: &str = "HVBENCH-MEM-SET-DONE";

impl XenBalloon {
    fn error(&self, detail: String) -> BackendError {
        XenError::Balloon {
            domain: self.name.clone(),
            detail,
        }
        .into()
    }

    fn mem_set_command(&self, bytes: u64) -> Result<String, BackendError> {
        let target_kib = self
            .initial_kib
            .checked_sub(bytes / 1024)
            .filter(|kib| *kib > 0)
            .ok_or_else(|| {
                self.error(format!(
                    "a balloon of {bytes} bytes leaves nothing of its {} KiB",
                    self.initial_kib
                ))
            })?;
        Ok(format!(
            "xl mem-set {} {target_kib}k",
            shell_quote(&self.name)
        ))
    }

    fn measure_command(&self) -> String {
        format!(
            "xl list {} | tail -n 1; xl info | grep '^free_memory'",
            shell_quote(&self.name)
        )
    }

    /// Runs `command` (idempotent) until it succeeds and `parse` accepts its output.
    fn run_retrying<T>(
        &mut self,
        command: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, BackendError> {
        let mut last = String::new();
        for attempt in 0..BALLOON_ATTEMPTS {
            if attempt > 0 {
                self.retries += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            match self.transport.run(command, None, XL_TIMEOUT) {
                Ok(out) => match parse(&String::from_utf8_lossy(&out.stdout)) {
                    Ok(value) => return Ok(value),
                    Err(detail) => last = detail,
                },
                Err(e) => last = e.to_string(),
            }
        }
        Err(self.error(format!(
            "{BALLOON_ATTEMPTS} tries of `{command}` failed; the last: {last}"
        )))
    }
}

impl BalloonControl for XenBalloon {
    fn set_balloon(&mut self, bytes: u64) -> Result<(), BackendError> {
        let command = self.mem_set_command(bytes)?;
        self.run_retrying(&command, |_| Ok(()))
    }

    fn measure(&mut self) -> Result<HostMemory, BackendError> {
        let command = self.measure_command();
        let name = self.name.clone();
        self.run_retrying(&command, |text| xl::parse_balloon_memory(text, &name))
    }

    fn measure_then_set(&mut self, bytes: u64) -> Result<HostMemory, BackendError> {
        // One SSH round trip where all goes well. The target changes only after a whole
        // measurement was taken (else a retry would measure after the guest moved), and a
        // measurement once read is kept: a retry then only sets the target again.
        let set = self.mem_set_command(bytes)?;
        let name = shell_quote(&self.name);
        let both = format!(
            "m=$(xl list {name} | tail -n 1); f=$(xl info | grep '^free_memory'); \
             printf '%s\\n%s\\n' \"$m\" \"$f\"; \
             case \"$m\" in {name}*) {set} && echo {SET_DONE};; esac"
        );
        let domain = self.name.clone();
        let (memory, done) = self.run_retrying(&both, |text| {
            let memory = xl::parse_balloon_memory(text, &domain)?;
            Ok((memory, text.lines().any(|l| l.trim() == SET_DONE)))
        })?;
        if !done {
            self.retries += 1;
            self.set_balloon(bytes)?;
        }
        Ok(memory)
    }

    fn diagnostics(&self) -> Option<String> {
        (self.retries > 0).then(|| {
            format!(
                "{} toolstack command(s) failed once and were run again (dom0 lost a process \
                 or the SSH connection)",
                self.retries
            )
        })
    }

    fn method(&self) -> &'static str {
        "the domain's memory in `xl list` (Mem, MiB) and Xen's free memory in `xl info`"
    }

    fn curve_interval(&self) -> Option<Duration> {
        None
    }

    fn refusals(&self) -> Option<Refusals> {
        None
    }
}

/// A running domain: its console stream, its shutdown watcher, and its destruction.
#[derive(Debug)]
pub struct XenSession {
    transport: Transport,
    name: String,
    messages: Receiver<GuestMessage>,
    console: Arc<ConsoleLink>,
    watcher: Arc<Mutex<Option<Child>>>,
    driver: Option<JoinHandle<()>>,
    /// The domain's config on the dom0, removed with the domain.
    config_path: String,
    /// Set before the host destroys the domain, so the driver reports `Stopped` rather
    /// than a vanished domain.
    stopping: Arc<AtomicBool>,
    destroyed: bool,
}

/// Shell loop run on the dom0: waits until the domain leaves the running states, then
/// prints `SHUTDOWN <reason code>` (from `xl list -v`) or `GONE`. A domain is gone only
/// when three looks a second apart miss it: an `xl` that dies (the TCG lab's dom0 loses a
/// freshly started process now and then while a guest runs) must not get a live domain
/// destroyed.
fn watcher_script(name: &str) -> String {
    let n = shell_quote(name);
    format!(
        "miss=0; while :; do l=$(xl list -v {n} 2>/dev/null | tail -n +2); \
         if [ -z \"$l\" ]; then miss=$((miss + 1)); [ $miss -lt 3 ] || {{ echo GONE; exit 0; }}; \
         sleep 1; continue; fi; miss=0; \
         set -- $l; case $5 in *s*|*c*) echo \"SHUTDOWN $8\"; exit 0;; esac; sleep 0.2; done"
    )
}

impl XenSession {
    fn start(transport: Transport, name: String, config_path: String) -> Result<Self, XenError> {
        let stopping = Arc::new(AtomicBool::new(false));
        // Bounded: a guest that floods the console makes the console reader wait.
        let (tx, rx) = crate::console::guest_channel(stopping.clone());
        let console = Arc::new(ConsoleLink::attach(&transport, &name)?);
        let watcher_child = match transport.spawn(&watcher_script(&name), false) {
            Ok(c) => c,
            Err(e) => {
                console.close();
                let _ = destroy(&transport, &name);
                return Err(e.into());
            }
        };
        console.start_reading(transport.clone(), tx.clone());
        let watcher = Arc::new(Mutex::new(Some(watcher_child)));
        let driver = {
            let session = DriverState {
                console: console.clone(),
                watcher: watcher.clone(),
                transport: transport.clone(),
                name: name.clone(),
                stopping: stopping.clone(),
            };
            std::thread::spawn(move || drive(session, tx))
        };
        Ok(XenSession {
            transport,
            name,
            messages: rx,
            console,
            watcher,
            driver: Some(driver),
            config_path,
            stopping,
            destroyed: false,
        })
    }

    fn unpause(&self) -> Result<(), TransportError> {
        self.transport
            .run(
                &format!("xl unpause {}", shell_quote(&self.name)),
                None,
                XL_TIMEOUT,
            )
            .map(|_| ())
    }
}

/// Writes `bytes` to `path` on the dom0 (in the run's [`RemoteDir`]).
fn put(transport: &Transport, path: &str, bytes: &[u8]) -> Result<(), XenError> {
    transport.run(
        &format!("cat > {}", shell_quote(path)),
        Some(bytes),
        XL_TIMEOUT,
    )?;
    Ok(())
}

/// `xl destroy` of the domain `name`.
fn destroy(transport: &Transport, name: &str) -> Result<std::process::Output, TransportError> {
    transport.run(
        &format!("xl destroy {}", shell_quote(name)),
        None,
        XL_TIMEOUT,
    )
}

/// Kills and reaps a helper process the session started, if it is still there.
fn kill_child(child: &Mutex<Option<Child>>) {
    if let Ok(mut c) = child.lock() {
        if let Some(c) = c.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn take_stdout(child: &Arc<Mutex<Option<Child>>>) -> Option<std::process::ChildStdout> {
    child.lock().ok()?.as_mut()?.stdout.take()
}

/// What the driver thread shares with its session.
struct DriverState {
    console: Arc<ConsoleLink>,
    watcher: Arc<Mutex<Option<Child>>>,
    transport: Transport,
    name: String,
    stopping: Arc<AtomicBool>,
}

/// Turns the watcher's verdict into `Ended`, once the console has passed everything on.
fn drive(state: DriverState, tx: crate::console::GuestSender) {
    let DriverState {
        console,
        watcher,
        transport,
        name,
        stopping,
    } = state;
    let verdict = take_stdout(&watcher).and_then(|out| {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .find(|l| !l.is_empty())
    });
    let gone = verdict.as_deref() == Some("GONE");
    let end = match verdict
        .as_deref()
        .map(str::split_whitespace)
        .map(|mut w| (w.next(), w.next()))
    {
        Some((Some("SHUTDOWN"), Some(code))) => match ShutdownReason::from_code(code) {
            ShutdownReason::Poweroff => GuestEnd::Exited { code: 0 },
            ShutdownReason::Crash => GuestEnd::Exited {
                code: ExitCode::Crash as u32,
            },
            ShutdownReason::Reboot => GuestEnd::TripleFault {
                detail: "Xen reported a reboot, which for a PVH guest is a triple fault".into(),
            },
            other => GuestEnd::Failed {
                detail: format!("the domain shut down with reason {other:?}"),
            },
        },
        Some((Some("GONE"), _)) => GuestEnd::Failed {
            detail: "the domain disappeared without a shutdown reason".into(),
        },
        // The watcher was killed: the host stopped the guest.
        _ => GuestEnd::Stopped,
    };
    let end = if stopping.load(Ordering::Acquire) {
        GuestEnd::Stopped
    } else {
        end
    };
    // The guest drained its ring before it stopped; once the console has passed that on,
    // destroy the domain.
    if end != GuestEnd::Stopped {
        if !gone {
            console.wait_drained();
        }
        console.shut();
        let _ = destroy(&transport, &name);
    }
    console.close();
    kill_child(&watcher);
    let _ = tx.send(GuestMessage::Ended(end));
}

impl GuestSession for XenSession {
    fn messages(&self) -> &Receiver<GuestMessage> {
        &self.messages
    }

    fn stop(&mut self) -> Result<(), BackendError> {
        if self.destroyed {
            return Ok(());
        }
        self.destroyed = true;
        self.stopping.store(true, Ordering::Release);
        // Destroy first: the console and watcher then end on their own.
        self.console.shut();
        let result = destroy(&self.transport, &self.name);
        let _ = self.transport.run(
            &format!("rm -f -- {}", shell_quote(&self.config_path)),
            None,
            XL_TIMEOUT,
        );
        self.console.close();
        kill_child(&self.watcher);
        if let Some(driver) = self.driver.take() {
            let _ = driver.join();
        }
        match result {
            // Already gone (it shut down and the driver destroyed it): nothing left behind.
            Ok(_) | Err(TransportError::Failed { .. }) => Ok(()),
            Err(e) => Err(XenError::from(e).into()),
        }
    }
}

impl Drop for XenSession {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Runs the watcher against a fake `xl` that prints, for each call, the next line of
    /// `answers` ("" for a domain it cannot see; the last answer repeats).
    fn watch(answers: &[&str]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let script = answers
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{i}) printf 'header\\n{a}\\n' | grep -v '^$' ;;"))
            .collect::<Vec<_>>()
            .join(" ");
        let last = answers.len() - 1;
        let xl = format!(
            "#!/bin/sh\nn=$(cat {d}/n 2>/dev/null || echo 0); echo $((n + 1)) > {d}/n\n\
             [ $n -gt {last} ] && n={last}\ncase $n in {script} esac\n",
            d = dir.path().display()
        );
        let path = dir.path().join("xl");
        std::fs::write(&path, xl).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(watcher_script("dom"))
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    dir.path().display(),
                    std::env::var("PATH").unwrap()
                ),
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn each_run_gets_a_private_directory_that_goes_with_it() {
        let first = RemoteDir::create(&Transport::Local).unwrap();
        let second = RemoteDir::create(&Transport::Local).unwrap();
        assert_ne!(first.path(), second.path());
        for dir in [&first, &second] {
            assert_ne!(dir.path(), "/tmp/hvbench");
            let meta = std::fs::metadata(dir.path()).unwrap();
            assert!(meta.is_dir());
            assert_eq!(meta.permissions().mode() & 0o7777, 0o700, "{}", dir.path());
            assert_eq!(
                std::os::unix::fs::MetadataExt::uid(&meta),
                nix::unistd::Uid::effective().as_raw()
            );
        }
        let owner = std::fs::read_to_string(format!("{}/{}", first.path(), stale::OWNER_FILE));
        assert_eq!(
            owner.ok().as_deref().and_then(stale::Owner::parse),
            stale::Owner::current()
        );
        let image = first.file("guest-0123.elf");
        put(&Transport::Local, &image, b"image").unwrap();
        assert_eq!(std::fs::read(&image).unwrap(), b"image");
        let path = first.path().to_string();
        drop(first);
        assert!(!std::path::Path::new(&path).exists(), "{path} left behind");
        assert!(std::path::Path::new(second.path()).exists());
    }

    /// Runs the block hotplug script with `action` against fake xenstore and losetup
    /// tools that keep their state in files of `dir`.
    fn hotplug(dir: &std::path::Path, action: &str) -> std::process::Output {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let d = dir.display();
        let tools = [
            // Keys are files named after the path's last component.
            ("xenstore-read", format!("cat {d}/xs/$(basename \"$1\")")),
            (
                "xenstore-write",
                format!(
                    "while [ $# -ge 2 ]; do printf '%s' \"$2\" > {d}/xs/$(basename \"$1\"); \
                     shift 2; done"
                ),
            ),
            (
                "losetup",
                format!(
                    "case \"$1\" in -f) echo /dev/null ;; -d) echo \"$2\" > {d}/detached ;; \
                     *) echo \"$1 $2\" > {d}/attached ;; esac"
                ),
            ),
            ("stat", "echo 7:3".to_string()),
        ];
        for (name, body) in tools {
            let path = bin.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let script = dir.join("block-hotplug");
        std::fs::write(&script, BLOCK_SCRIPT).unwrap();
        std::process::Command::new("sh")
            .arg(&script)
            .arg(action)
            .env("XENBUS_PATH", "/local/domain/0/backend/vbd/1/51712")
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .output()
            .unwrap()
    }

    #[test]
    fn the_block_hotplug_script_attaches_a_loop_device_and_detaches_it() {
        let dir = tempfile::tempdir().unwrap();
        let xs = dir.path().join("xs");
        std::fs::create_dir(&xs).unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(xs.join("params"), disk.display().to_string()).unwrap();
        let read = |key: &str| std::fs::read_to_string(xs.join(key)).unwrap_or_default();
        let add = hotplug(dir.path(), "add");
        assert!(add.status.success(), "{add:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("attached"))
                .unwrap()
                .trim(),
            format!("/dev/null {}", disk.display())
        );
        // blkback reads major:minor in hex; libxl and the sweep find the device again.
        assert_eq!(read("physical-device"), "7:3");
        assert_eq!(read("node"), "/dev/null");
        assert_eq!(read("hotplug-status"), "connected");
        let noted = dir.path().join("disk.img.loop");
        assert_eq!(std::fs::read_to_string(&noted).unwrap().trim(), "/dev/null");
        let remove = hotplug(dir.path(), "remove");
        assert!(remove.status.success(), "{remove:?}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("detached"))
                .unwrap()
                .trim(),
            "/dev/null"
        );
        assert!(!noted.exists());
        // Without params the add fails, and says why in xenstore.
        std::fs::remove_file(xs.join("params")).unwrap();
        let failed = hotplug(dir.path(), "add");
        assert!(!failed.status.success());
        assert!(
            read("hotplug-error").contains("no params"),
            "{}",
            read("hotplug-error")
        );
        assert_eq!(read("hotplug-status"), "error");
    }

    #[test]
    fn the_watcher_reports_shutdowns_and_survives_a_lost_look() {
        let running = "dom 3 128 1 -b---- 1.0 uuid - -";
        let off = "dom 3 128 1 ---s-- 1.0 uuid 0 -";
        assert_eq!(watch(&[running, off]), "SHUTDOWN 0");
        // Two looks that miss the domain (an xl that died) are not its end.
        assert_eq!(watch(&[running, "", "", running, off]), "SHUTDOWN 0");
        // Three are.
        assert_eq!(watch(&[running, "", "", ""]), "GONE");
    }
}
