//! Starting the lab's QEMU (detached in its own session by `-daemonize`), telling our QEMU
//! from any other process, and stopping it.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::tools::{require_tool, run_with_timeout, tail_lines};
use super::{LabAccel, LabError};

pub(crate) const QEMU_BINARY: &str = "qemu-system-x86_64";
pub(crate) const QEMU_PACKAGE: &str = "qemu-system-x86";

/// dom0's share of the emulated machine; the rest is for guests.
pub const DOM0_MEMORY_MIB: u32 = 1024;

/// Fails on paths QEMU's option syntax cannot carry: `-initrd` separates multiboot
/// modules with commas (and a module's command line follows its path after a space).
fn check_paths(paths: &[&Path]) -> Result<(), LabError> {
    for path in paths {
        let text = path.to_string_lossy();
        if text.contains(',') || text.contains(' ') {
            return Err(LabError::InvalidOptions {
                reason: format!(
                    "{} contains a comma or space, which QEMU's -initrd option cannot carry; \
                     choose a cache directory without them",
                    path.display()
                ),
            });
        }
    }
    Ok(())
}

/// What every lab machine shares: accelerator and CPU, size, no devices but one NIC whose
/// user-mode network forwards 127.0.0.1:`ssh_port` to the guest's sshd, the serial port
/// into a file, and a daemonized QEMU with a pid file.
struct MachineBase<'a> {
    name: &'a str,
    serial_log: &'a Path,
    pid_file: &'a Path,
    ssh_port: u16,
    memory_mib: u32,
    cpus: u32,
    accel: LabAccel,
    /// Under TCG, run every vCPU on one host thread (`thread=single`) instead of one each.
    single_threaded_tcg: bool,
    /// The hvbench-insns TCG plugin and the log it appends to.
    insns: Option<(&'a Path, &'a Path)>,
    /// Share the log's directory read-only with the lab's Linux (9p, tag `INSNS_TAG`).
    share_insns: bool,
}

/// QEMU's virtual clock while instructions are counted: 2^0 ns per instruction, so the
/// lab's timer interrupts land after so many instructions, not after so much host time
/// (on a loaded host a sample took long enough for several ticks, each counted in it).
/// Idle time still runs at the host's pace (`sleep=on`), so ssh and 9p waits behave.
/// icount needs one TCG thread, which the plugin's exact count needs too.
pub(crate) const INSNS_ICOUNT: &str = "shift=0,align=off,sleep=on";

/// What records of a lab counting instructions say of its clock (`lab_clock`).
pub const INSNS_CLOCK: &str = "QEMU -icount shift=0,align=off,sleep=on: 1 ns of the lab's \
    time per instruction while a vCPU runs, so times measured in it follow instruction counts";

/// The 9p mount tag of the instruction-count log's directory in the KVM lab.
pub(crate) const INSNS_TAG: &str = "hvbinsns";

impl MachineBase<'_> {
    fn arguments(&self, kernel: &Path, append: &str, initrd: &str) -> Vec<OsString> {
        let (accel, cpu) = match self.accel {
            LabAccel::Tcg if self.single_threaded_tcg => ("tcg,thread=single", "max"),
            LabAccel::Tcg => ("tcg", "max"),
            LabAccel::Kvm => ("kvm", "host"),
        };
        let mut arguments: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| arguments.extend(items.iter().map(OsString::from));
        push(&["-name", self.name]);
        push(&["-accel", accel, "-cpu", cpu]);
        push(&[
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.cpus.to_string(),
        ]);
        push(&[
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-monitor",
            "none",
        ]);
        push(&["-kernel", &kernel.to_string_lossy()]);
        push(&["-append", append]);
        push(&["-initrd", initrd]);
        // Only QEMU's forward on the host's loopback reaches the lab's sshd.
        push(&[
            "-netdev",
            &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{}-:22", self.ssh_port),
        ]);
        push(&["-device", "virtio-net-pci,netdev=n0"]);
        push(&["-serial", &format!("file:{}", self.serial_log.display())]);
        push(&["-pidfile", &self.pid_file.to_string_lossy()]);
        push(&["-daemonize"]);
        if let Some((plugin, log)) = self.insns {
            push(&["-icount", INSNS_ICOUNT]);
            push(&[
                "-plugin",
                &format!("{},out={}", plugin.display(), log.display()),
            ]);
            if let (true, Some(dir)) = (self.share_insns, log.parent()) {
                push(&[
                    "-virtfs",
                    &format!(
                        "local,path={},mount_tag={INSNS_TAG},security_model=none,readonly=on",
                        dir.display()
                    ),
                ]);
            }
        }
        arguments
    }

    /// Starts QEMU; returns once it has daemonized, with its pid.
    fn start(&self, arguments: Vec<OsString>) -> Result<u32, LabError> {
        let qemu = require_tool(QEMU_BINARY, QEMU_PACKAGE)?;
        let _ = fs::remove_file(self.pid_file);
        let _ = fs::remove_file(self.serial_log);
        let mut command = Command::new(qemu);
        command.args(arguments);
        // The foreground QEMU exits as soon as the daemon is initialised.
        let output =
            run_with_timeout(&mut command, None, Duration::from_secs(60)).map_err(|e| {
                LabError::Qemu {
                    reason: format!("cannot run {QEMU_BINARY}: {e}"),
                }
            })?;
        let Some(output) = output else {
            // It may have daemonized after all: leave nothing behind.
            if let Some(pid) = read_pid_file(self.pid_file) {
                let _ = terminate(pid, self.pid_file);
            }
            return Err(LabError::Qemu {
                reason: "qemu-system-x86_64 did not daemonize within 60 s".into(),
            });
        };
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(LabError::Qemu {
                reason: format!("{}: {}", output.status, tail_lines(&stderr, 6)),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(pid) = read_pid_file(self.pid_file) {
                return Ok(pid);
            }
            if Instant::now() >= deadline {
                return Err(LabError::Qemu {
                    reason: format!(
                        "QEMU started but wrote no pid to {}",
                        self.pid_file.display()
                    ),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A Linux host booted straight from its kernel and initramfs (the KVM lab).
pub(crate) struct LinuxBoot<'a> {
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    /// Kernel command-line words beyond the console.
    pub extra_append: &'a str,
    pub serial_log: &'a Path,
    pub pid_file: &'a Path,
    pub ssh_port: u16,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: LabAccel,
    /// The hvbench-insns TCG plugin and its log, shared with the lab's Linux.
    pub insns: Option<(&'a Path, &'a Path)>,
}

impl LinuxBoot<'_> {
    fn base(&self) -> MachineBase<'_> {
        MachineBase {
            name: "hvbench-kvm-lab",
            serial_log: self.serial_log,
            pid_file: self.pid_file,
            ssh_port: self.ssh_port,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            accel: self.accel,
            // Every VM the lab's KVM creates or destroys flips static keys, and Linux
            // patches its text through INT3 while the other CPU runs. Under multi-threaded
            // TCG (QEMU 7.2) both vCPUs then looped on an INT3 left at __schedule+0x2ab for
            // good, after 7 back-to-back guest boots (issue 8): the lab never answered
            // again. One TCG thread for both vCPUs booted 60 guests in 20 s.
            single_threaded_tcg: true,
            insns: self.insns,
            share_insns: true,
        }
    }

    pub(crate) fn arguments(&self) -> Result<Vec<OsString>, LabError> {
        check_paths(&[self.kernel, self.initramfs, self.serial_log, self.pid_file])?;
        if let Some((plugin, log)) = self.insns {
            check_paths(&[plugin, log])?;
        }
        // panic=-1 with -no-reboot: a kernel panic stops QEMU instead of looping.
        let mut append = format!("console=ttyS0 panic=-1 {}", self.extra_append)
            .trim()
            .to_string();
        if self.insns.is_some() {
            // Under QEMU 7.2's icount (see INSNS_ICOUNT) Linux 6.1 hung for good bringing
            // up its second CPU ("x86: Booting SMP configuration:"); with one it booted. The
            // machine keeps its CPUs (the Xen lab's identical hardware), Linux uses one.
            append.push_str(" maxcpus=1");
        }
        Ok(self
            .base()
            .arguments(self.kernel, &append, &self.initramfs.to_string_lossy()))
    }

    pub(crate) fn start(&self) -> Result<u32, LabError> {
        let arguments = self.arguments()?;
        self.base().start(arguments)
    }
}

/// Everything one boot of the Xen lab needs.
pub(crate) struct XenBoot<'a> {
    pub hypervisor: &'a Path,
    pub dom0_kernel: &'a Path,
    pub dom0_initramfs: &'a Path,
    pub serial_log: &'a Path,
    pub pid_file: &'a Path,
    pub ssh_port: u16,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: LabAccel,
    /// The hvbench-insns TCG plugin and its log, when instructions are counted.
    pub insns: Option<(&'a Path, &'a Path)>,
}

impl XenBoot<'_> {
    fn base(&self) -> MachineBase<'_> {
        MachineBase {
            name: "hvbench-xen-lab",
            serial_log: self.serial_log,
            pid_file: self.pid_file,
            ssh_port: self.ssh_port,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            accel: self.accel,
            // The plugin's exact count and icount need one TCG thread.
            single_threaded_tcg: self.insns.is_some(),
            insns: self.insns,
            share_insns: false,
        }
    }

    /// QEMU's arguments. Fails on paths with a comma: `-initrd` separates multiboot modules
    /// with commas (and a module's command line follows its path after a space).
    pub(crate) fn arguments(&self) -> Result<Vec<OsString>, LabError> {
        check_paths(&[
            self.hypervisor,
            self.dom0_kernel,
            self.dom0_initramfs,
            self.serial_log,
            self.pid_file,
        ])?;
        if let Some((plugin, log)) = self.insns {
            check_paths(&[plugin, log])?;
        }
        let xen_command_line = xen_command_line(self.insns.is_some());
        let modules = format!(
            "{} console=hvc0 earlyprintk=xen,{}",
            self.dom0_kernel.display(),
            self.dom0_initramfs.display()
        );
        Ok(self
            .base()
            .arguments(self.hypervisor, &xen_command_line, &modules))
    }

    /// Starts QEMU; returns once it has daemonized, with its pid.
    pub(crate) fn start(&self) -> Result<u32, LabError> {
        let arguments = self.arguments()?;
        self.base().start(arguments)
    }
}

/// Xen's own command line in the lab: the same for every boot with the same `counting`
/// (the state records it, so a lab booted with other settings is not silently reused).
pub(crate) fn xen_command_line(counting: bool) -> String {
    // smap=0: PV dom0 crashes under TCG without it. noreboot + -no-reboot: a crash
    // stops the machine instead of looping through reboots.
    let mut line = format!(
        "console=com1 com1=115200,8n1 dom0_mem={DOM0_MEMORY_MIB}M,max:{DOM0_MEMORY_MIB}M \
         loglvl=all guest_loglvl=all noreboot smap=0"
    );
    // Eager FPU switching and one dom0 vCPU (issue 12). With Xen's default on AMD
    // (lazy FPU: CR0.TS and #NM on the next FPU use) and a dom0 vCPU per CPU, dom0's
    // processes were corrupted whenever its vCPUs had to share a CPU: busybox/xl
    // segfaults ("segfault at 0 ... in busybox"), mangled shell words ("sh: dat: not
    // found"). Measured on 2026-12-05, one variable at a time: 5-11 faults in each
    // 40 s two-domain `sched.fairness` run (dom0's 3 vCPUs on the 2 CPUs a pool of one
    // left), also with single-threaded TCG, `-cpu max,-fsgsbase`, `-pcid,-invpcid`,
    // and a Xen without svm_load_segs(); 5-7 with no guest at all, dom0's 4 vCPUs
    // busy on 2 CPUs, pinned or not. `spec-ctrl=eager-fpu` gave none in each of those
    // set-ups, nor did dom0_max_vcpus=1 or 2 in the pool runs (it still faulted when
    // guests shared dom0's CPU). So it is the lazy switch of a PV vCPU's FPU state
    // under QEMU's TCG; the faulty instruction's emulation was not pinned down.
    line.push_str(" spec-ctrl=eager-fpu dom0_max_vcpus=1");
    if counting {
        // Instruction counts are per CPU: dom0 keeps to CPU 0, guests are put on CPU 1
        // (the xen backend pins them), so neither moves nor mixes into the other's count.
        line.push_str(" dom0_vcpus_pin");
    }
    line
}

pub(crate) fn read_pid_file(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// True when `pid` is a live (not zombie) QEMU whose command line names `pid_file`: our
/// pid file path is unique to this cache directory, so a recycled pid never matches.
pub(crate) fn is_our_qemu(pid: u32, pid_file: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(command_line) = fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let arguments: Vec<&[u8]> = command_line.split(|&b| b == 0).collect();
    let is_qemu = arguments
        .first()
        .map(|program| String::from_utf8_lossy(program).contains("qemu-system"))
        .unwrap_or(false);
    let names_pid_file = arguments.contains(&pid_file.as_os_str().as_encoded_bytes());
    is_qemu && names_pid_file && !is_zombie(pid)
}

/// A killed QEMU whose parent never reaps it (a daemon's parent is init, and some
/// containers' init does not reap) lingers as a zombie: dead for our purposes.
fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    // The state follows the parenthesised command name, which may itself hold ") ".
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .map(|state| state == 'Z' || state == 'X')
        .unwrap_or(true)
}

/// SIGTERM, then SIGKILL after 5 s; only if `pid` is still our QEMU. True if one was running.
pub(crate) fn terminate(pid: u32, pid_file: &Path) -> Result<bool, LabError> {
    if !is_our_qemu(pid, pid_file) {
        return Ok(false);
    }
    let target = Pid::from_raw(i32::try_from(pid).map_err(|_| LabError::Qemu {
        reason: format!("pid {pid} out of range"),
    })?);
    for (signal, grace) in [
        (Signal::SIGTERM, Duration::from_secs(5)),
        (Signal::SIGKILL, Duration::from_secs(5)),
    ] {
        match kill(target, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                return Err(LabError::Qemu {
                    reason: format!("cannot signal QEMU (pid {pid}): {e}"),
                })
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !is_our_qemu(pid, pid_file) {
                let _ = fs::remove_file(pid_file);
                return Ok(true);
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
    Err(LabError::Qemu {
        reason: format!("QEMU (pid {pid}) survived SIGKILL"),
    })
}

/// Kills the QEMU it holds when dropped, unless disarmed: every early return of a failed
/// bring-up takes the machine down with it.
pub(crate) struct QemuGuard {
    pid: u32,
    pid_file: PathBuf,
    armed: bool,
}

impl QemuGuard {
    pub(crate) fn new(pid: u32, pid_file: &Path) -> Self {
        Self {
            pid,
            pid_file: pid_file.to_path_buf(),
            armed: true,
        }
    }

    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = terminate(self.pid, &self.pid_file);
        }
    }
}

/// Serial-log lines that mean the boot has failed for good.
pub(crate) fn fatal_boot_line(serial_log: &str) -> Option<&str> {
    const FATAL: &[&str] = &[
        "Panic on CPU",
        "Kernel panic",
        "Reboot in five seconds",
        "Manual reset required",
        "(XEN) Fatal",
    ];
    serial_log
        .lines()
        .find(|line| FATAL.iter().any(|pattern| line.contains(pattern)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot<'a>(dir: &'a Path, paths: &'a [PathBuf; 5]) -> XenBoot<'a> {
        let _ = dir;
        XenBoot {
            hypervisor: &paths[0],
            dom0_kernel: &paths[1],
            dom0_initramfs: &paths[2],
            serial_log: &paths[3],
            pid_file: &paths[4],
            ssh_port: 10022,
            memory_mib: 3072,
            cpus: 2,
            accel: LabAccel::Tcg,
            insns: None,
        }
    }

    #[test]
    fn arguments_carry_the_known_good_command_line() {
        let dir = Path::new("/cache/xen");
        let paths =
            ["xen", "vmlinuz", "initrd.cpio", "serial.log", "qemu.pid"].map(|n| dir.join(n));
        let arguments: Vec<String> = boot(dir, &paths)
            .arguments()
            .unwrap()
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = arguments.join(" ");
        assert!(joined.contains("-accel tcg -cpu max"), "{joined}");
        assert!(joined.contains("smap=0"), "{joined}");
        // Issue 12: lazy FPU switching corrupted dom0's processes under TCG.
        assert!(
            joined.contains(" spec-ctrl=eager-fpu dom0_max_vcpus=1"),
            "{joined}"
        );
        assert!(!joined.contains("dom0_vcpus_pin"), "{joined}");
        assert!(
            joined.contains("hostfwd=tcp:127.0.0.1:10022-:22"),
            "{joined}"
        );
        assert!(arguments.contains(
            &"/cache/xen/vmlinuz console=hvc0 earlyprintk=xen,/cache/xen/initrd.cpio".to_string()
        ));
        assert!(arguments.contains(&"-daemonize".to_string()));
        // Counting: one TCG thread, the clock by instructions, dom0 on CPU 0.
        let log = Path::new("/cache/xen/run/insns.log");
        let counting = XenBoot {
            insns: Some((Path::new("/t/libhvbench_insns.so"), log)),
            ..boot(dir, &paths)
        }
        .arguments()
        .unwrap()
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
        assert!(
            counting.contains("-accel tcg,thread=single -cpu max"),
            "{counting}"
        );
        assert!(
            counting.contains("-icount shift=0,align=off,sleep=on"),
            "{counting}"
        );
        assert!(counting.contains("dom0_vcpus_pin"), "{counting}");
    }

    /// Issue 8: with a TCG thread per vCPU the KVM lab wedged after a few guest boots.
    #[test]
    fn the_kvm_lab_runs_its_vcpus_on_one_tcg_thread() {
        let dir = Path::new("/cache/kvm");
        let paths = ["vmlinuz", "initramfs.cpio", "serial.log", "qemu.pid"].map(|n| dir.join(n));
        let linux = LinuxBoot {
            kernel: &paths[0],
            initramfs: &paths[1],
            extra_append: "loglevel=4",
            serial_log: &paths[2],
            pid_file: &paths[3],
            ssh_port: 10023,
            memory_mib: 1536,
            cpus: 2,
            accel: LabAccel::Tcg,
            insns: None,
        };
        let joined = |arguments: Vec<OsString>| {
            arguments
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let tcg = joined(linux.arguments().unwrap());
        assert!(tcg.contains("-accel tcg,thread=single -cpu max"), "{tcg}");
        assert!(tcg.contains("-smp 2"), "{tcg}");
        let kvm = joined(
            LinuxBoot {
                accel: LabAccel::Kvm,
                ..linux
            }
            .arguments()
            .unwrap(),
        );
        assert!(kvm.contains("-accel kvm -cpu host"), "{kvm}");
        assert!(
            !tcg.contains("-plugin") && !tcg.contains("-virtfs"),
            "{tcg}"
        );
        // Counting: the plugin writes its log, whose directory the lab's Linux mounts.
        let log = Path::new("/c/kvm/run/insns/insns.log");
        let counting = joined(
            LinuxBoot {
                insns: Some((Path::new("/t/libhvbench_insns.so"), log)),
                ..linux
            }
            .arguments()
            .unwrap(),
        );
        assert!(
            counting.contains("-plugin /t/libhvbench_insns.so,out=/c/kvm/run/insns/insns.log"),
            "{counting}"
        );
        assert!(
            counting.contains(
                "-virtfs local,path=/c/kvm/run/insns,mount_tag=hvbinsns,security_model=none,readonly=on"
            ),
            "{counting}"
        );
        assert!(
            counting.contains("maxcpus=1") && !tcg.contains("maxcpus"),
            "{counting}"
        );
        // Counting runs the virtual clock by instructions; without it, host time.
        assert!(
            counting.contains("-icount shift=0,align=off,sleep=on"),
            "{counting}"
        );
        assert!(!tcg.contains("-icount"), "{tcg}");
    }

    #[test]
    fn commas_in_paths_are_refused() {
        let dir = Path::new("/cache,odd/xen");
        let paths =
            ["xen", "vmlinuz", "initrd.cpio", "serial.log", "qemu.pid"].map(|n| dir.join(n));
        boot(dir, &paths).arguments().unwrap_err();
    }

    #[test]
    fn our_own_process_is_not_our_qemu() {
        assert!(!is_our_qemu(
            std::process::id(),
            Path::new("/nonexistent/qemu.pid")
        ));
        assert!(!is_our_qemu(u32::MAX, Path::new("/nonexistent/qemu.pid")));
        assert!(!terminate(std::process::id(), Path::new("/nonexistent/qemu.pid")).unwrap());
    }

    #[test]
    fn fatal_lines_are_recognised() {
        assert!(fatal_boot_line(
            "(XEN) ****************************************\n(XEN) Panic on CPU 0:\n"
        )
        .is_some());
        assert!(fatal_boot_line("[    1.0] Kernel panic - not syncing: VFS").is_some());
        assert!(fatal_boot_line("(XEN) Xen version 4.17.7\nHVBENCH-XEN-LAB-READY\n").is_none());
    }
}
