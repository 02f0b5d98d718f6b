//! `lab up xen`: packages -> staging tree -> hypervisor, dom0 kernel and initramfs -> QEMU ->
//! wait for the ready marker and for `xl info` over ssh.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hostutil::transport::{SshTarget, Transport};
use serde::{Deserialize, Serialize};

use crate::bringup::{self, sha256_hex, write_file, Layout};
use crate::initramfs::{self, Dom0Config, READY_MARKER};
use crate::packages::{self, PackageManifest};
use crate::qemu::XenBoot;
use crate::recipe::{self, Booted, Lab, LabStatus, MachineOptions, Recipe};
use crate::tools::{require_tool, run_checked_bytes};
use crate::xen_build::{self, HypervisorBuild, XenHypervisor};
use crate::LabError;

pub use crate::qemu::DOM0_MEMORY_MIB;

/// The name dom0's host key is pinned under in the lab's known_hosts, whatever the port.
pub const HOST_KEY_ALIAS: &str = "hvbench-xen-lab";
/// Bump when the initramfs recipe changes in a way the inputs below do not capture.
const BUILD_FORMAT: u32 = 2;

/// The Xen lab: Debian 12's Xen 4.17 with a busybox dom0.
#[derive(Debug, Clone, Copy)]
pub struct XenLab;

#[derive(Debug)]
pub struct XenLabOptions {
    /// The emulated machine (3072 MiB by default); dom0 gets `DOM0_MEMORY_MIB` of it.
    pub machine: MachineOptions,
    /// Debian's hypervisor as it ships, or one built from its source with shadow paging.
    pub hypervisor: XenHypervisor,
}

impl XenLabOptions {
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            machine: MachineOptions::new(cache_dir, 3072),
            hypervisor: XenHypervisor::Debian,
        }
    }
}

/// A running Xen lab, as saved in `<cache_dir>/xen-lab.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XenLabState {
    /// "xen".
    pub kind: String,
    pub qemu_pid: u32,
    /// QEMU's `-pidfile`; its path in QEMU's command line identifies our QEMU.
    pub qemu_pid_file: PathBuf,
    pub ssh_port: u16,
    pub ssh_key: PathBuf,
    pub known_hosts: PathBuf,
    /// As `xl info` reports it, e.g. "4.17.7".
    pub xen_version: String,
    /// The Debian package versions the lab was built from.
    pub xen_package_version: String,
    pub dom0_kernel_package: String,
    /// The hypervisor booted: Debian's binary, or a build from Debian's source (a state
    /// saved before builds existed has none: Debian's binary).
    #[serde(default)]
    pub hypervisor: Option<HypervisorBuild>,
    /// Where the hvbench-insns plugin appends its counts, when the lab loaded it.
    #[serde(default)]
    pub insns_log: Option<PathBuf>,
    /// Xen's command line at this boot (a state saved before it was recorded has none, and
    /// such a lab is not reused: its Xen may lack settings the lab now needs).
    #[serde(default)]
    pub xen_command_line: Option<String>,
    /// "tcg" or "kvm": with tcg, every timing inside the lab is an emulation artefact.
    pub accel: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// From QEMU's start to `xl info` answering over ssh.
    pub boot_seconds: f64,
    pub serial_log: PathBuf,
}

/// Xen's own image sits beside the dom0 kernel.
fn hypervisor_path(layout: &Layout) -> PathBuf {
    layout.boot_dir.join("xen-4.17")
}

/// Inputs of a build; a rebuild happens when any of them changes.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct BuildStamp {
    format: u32,
    inputs_sha256: String,
    xen_package_version: String,
    dom0_kernel_package: String,
    hypervisor: HypervisorBuild,
}

/// Where to ssh into the lab described by `state`: root@127.0.0.1 on the forwarded port,
/// with the lab's own key and its pinned host key.
pub(crate) fn ssh_target(state: &XenLabState) -> SshTarget {
    bringup::loopback_ssh_target(
        state.ssh_port,
        &state.ssh_key,
        &state.known_hosts,
        HOST_KEY_ALIAS,
    )
}

/// `xen_version` from `xl info` run in the lab's dom0.
fn xen_version_over_ssh(state: &XenLabState, timeout: Duration) -> Result<String, LabError> {
    let output = Transport::Ssh(ssh_target(state))
        .run("xl info", None, timeout)
        .map_err(|e| LabError::Ssh {
            reason: e.to_string(),
        })?;
    xl_info_value(&String::from_utf8_lossy(&output.stdout), "xen_version").ok_or_else(|| {
        LabError::Ssh {
            reason: "`xl info` printed no xen_version".into(),
        }
    })
}

/// The value of `key` in `xl info`'s `key : value` lines.
fn xl_info_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, value)| value.trim().to_string())
}

impl Lab for XenLab {
    const NAME: &'static str = "Xen";
    type Options = XenLabOptions;
    type State = XenLabState;

    fn options(cache_dir: PathBuf) -> Result<XenLabOptions, LabError> {
        Ok(XenLabOptions::new(cache_dir))
    }

    fn machine_mut(options: &mut XenLabOptions) -> &mut MachineOptions {
        &mut options.machine
    }

    fn up(options: &XenLabOptions) -> Result<XenLabState, LabError> {
        recipe::up::<Self>(options)
    }

    fn status(cache_dir: &Path) -> Result<Option<LabStatus<XenLabState>>, LabError> {
        recipe::status::<Self>(cache_dir)
    }

    fn down(cache_dir: &Path) -> Result<bool, LabError> {
        recipe::down::<Self>(cache_dir)
    }

    fn up_report(state: &XenLabState) -> Vec<String> {
        let mut lines = vec![
            format!(
                "Xen {} lab is up ({} under QEMU, booted in {:.1} s).",
                state.xen_version, state.accel, state.boot_seconds
            ),
            format!(
                "dom0: ssh -i {} -p {} -o UserKnownHostsFile={} -o HostKeyAlias={HOST_KEY_ALIAS} root@127.0.0.1",
                state.ssh_key.display(),
                state.ssh_port,
                state.known_hosts.display()
            ),
            "run:  hvbench run --backend xen --xen-host lab".to_string(),
        ];
        if let Some(build) = &state.hypervisor {
            lines.insert(1, format!("hypervisor: {}", build.describe()));
        }
        if let Some(log) = &state.insns_log {
            lines.push(format!(
                "Instructions per operation are counted (hvbench-insns plugin, {}): records \
                 of runs on this lab get an insns metric.",
                log.display()
            ));
        }
        if state.accel == "tcg" {
            lines.push(crate::TCG_CAVEAT.to_string());
        }
        lines
    }

    fn status_line(status: &LabStatus<XenLabState>) -> String {
        format!(
            "Xen {} lab ({}), started {}, ssh port {}: QEMU {}, dom0 {}",
            status.state.xen_version,
            status.state.accel,
            status.state.started_at,
            status.state.ssh_port,
            if status.qemu_running {
                "running"
            } else {
                "not running"
            },
            if status.answer.is_some() {
                "answers"
            } else {
                "does not answer"
            },
        )
    }
}

impl Recipe for XenLab {
    const STATE_FILE: &'static str = "xen-lab.json";
    const PACKAGES: &'static [&'static str] = packages::XEN_LAB_PACKAGES;
    const DOWNLOAD_SIZE: &'static str = "about 81 MB";
    const READY_MARKER: &'static str = READY_MARKER;
    const BOOTED: &'static str = "dom0";
    const PROBE: &'static str = "`xl info`";
    type Stamp = BuildStamp;

    fn machine(options: &XenLabOptions) -> &MachineOptions {
        &options.machine
    }

    fn layout(cache_dir: &Path) -> Layout {
        Layout::xen(cache_dir)
    }

    fn validate(options: &XenLabOptions) -> Result<(), LabError> {
        if options.machine.insns_plugin.is_some() && options.machine.accel != crate::LabAccel::Tcg {
            return Err(LabError::InvalidOptions {
                reason: "the instruction-count plugin is a TCG plugin: it needs --accel tcg".into(),
            });
        }
        if options.machine.memory_mib < DOM0_MEMORY_MIB + 512 {
            return Err(LabError::InvalidOptions {
                reason: format!(
                    "memory_mib must be at least {} (dom0 takes {DOM0_MEMORY_MIB} MiB)",
                    DOM0_MEMORY_MIB + 512
                ),
            });
        }
        Ok(())
    }

    fn ensure_boot_files(
        layout: &Layout,
        manifest: &PackageManifest,
        options: &XenLabOptions,
        progress: fn(&str),
    ) -> Result<BuildStamp, LabError> {
        ensure_boot_files(layout, manifest, options.hypervisor, progress)
    }

    fn booting(stamp: &BuildStamp) -> String {
        format!("Xen ({})", stamp.hypervisor.describe())
    }

    fn start_qemu(
        layout: &Layout,
        machine: &MachineOptions,
        ssh_port: u16,
    ) -> Result<u32, LabError> {
        XenBoot {
            hypervisor: &hypervisor_path(layout),
            dom0_kernel: &layout.kernel,
            dom0_initramfs: &layout.initramfs,
            serial_log: &layout.serial_log,
            pid_file: &layout.pid_file,
            ssh_port,
            memory_mib: machine.memory_mib,
            cpus: machine.cpus,
            accel: machine.accel,
            insns: machine
                .insns_plugin
                .as_deref()
                .map(|plugin| (plugin, layout.insns_log.as_path())),
        }
        .start()
    }

    fn new_state(booted: &Booted<'_>, stamp: BuildStamp) -> XenLabState {
        let (layout, machine) = (booted.layout, booted.machine);
        XenLabState {
            kind: "xen".into(),
            qemu_pid: booted.qemu_pid,
            qemu_pid_file: layout.pid_file.clone(),
            ssh_port: booted.ssh_port,
            ssh_key: layout.client_key.clone(),
            known_hosts: layout.known_hosts.clone(),
            xen_version: String::new(),
            xen_package_version: stamp.xen_package_version,
            dom0_kernel_package: stamp.dom0_kernel_package,
            hypervisor: Some(stamp.hypervisor),
            insns_log: machine
                .insns_plugin
                .as_ref()
                .map(|_| layout.insns_log.clone()),
            xen_command_line: Some(crate::qemu::xen_command_line(
                machine.insns_plugin.is_some(),
            )),
            accel: machine.accel.as_str().into(),
            memory_mib: machine.memory_mib,
            cpus: machine.cpus,
            started_at: booted.started_at.clone(),
            boot_seconds: 0.0,
            serial_log: layout.serial_log.clone(),
        }
    }

    fn qemu(state: &XenLabState) -> (u32, &Path) {
        (state.qemu_pid, &state.qemu_pid_file)
    }

    fn probe(state: &XenLabState, timeout: Duration) -> Result<String, LabError> {
        xen_version_over_ssh(state, timeout)
    }

    fn finish(state: &mut XenLabState, answer: String, boot_seconds: f64) {
        state.xen_version = answer;
        state.boot_seconds = boot_seconds;
    }

    fn up_message(state: &XenLabState, total_seconds: f64) -> String {
        format!(
            "Xen {} is up: {:.1} s from QEMU start to `xl info` over ssh ({total_seconds:.1} s in all)",
            state.xen_version, state.boot_seconds
        )
    }

    fn reuse(
        cache_dir: &Path,
        status: LabStatus<XenLabState>,
        options: &XenLabOptions,
    ) -> Result<XenLabState, LabError> {
        let running = status
            .state
            .hypervisor
            .as_ref()
            .map_or(XenHypervisor::Debian, |h| h.choice);
        let counting = |on: bool| {
            if on {
                "counting instructions"
            } else {
                "not counting"
            }
        };
        let describe = |hypervisor: XenHypervisor, insns: bool| {
            format!(
                "with the {} hypervisor, {}",
                hypervisor.as_str(),
                counting(insns)
            )
        };
        let counting_now = options.machine.insns_plugin.is_some();
        let running = format!(
            "{} (Xen's command line: {})",
            describe(running, status.state.insns_log.is_some()),
            status
                .state
                .xen_command_line
                .as_deref()
                .unwrap_or("not recorded")
        );
        let wanted = format!(
            "{} (Xen's command line: {})",
            describe(options.hypervisor, counting_now),
            crate::qemu::xen_command_line(counting_now)
        );
        if running != wanted {
            return Err(LabError::SettingsDiffer {
                lab: "Xen",
                kind: "xen",
                running,
                wanted,
                cache_dir: cache_dir.display().to_string(),
            });
        }
        (options.machine.progress)(&format!(
            "Xen {} lab already up (QEMU pid {}, ssh port {})",
            status.state.xen_version, status.state.qemu_pid, status.state.ssh_port
        ));
        Ok(status.state)
    }
}

/// Hypervisor, dom0 kernel, keys and initramfs; rebuilt only when their inputs changed.
fn ensure_boot_files(
    layout: &Layout,
    manifest: &PackageManifest,
    choice: XenHypervisor,
    progress: fn(&str),
) -> Result<BuildStamp, LabError> {
    let kernel_package = manifest
        .kernel_package()
        .ok_or_else(|| LabError::Packages {
            reason: "no linux-image package among the downloads".into(),
        })?;
    let xen_package_version = manifest
        .version_of("xen-hypervisor-4.17-amd64")
        .ok_or_else(|| LabError::Packages {
            reason: "xen-hypervisor-4.17-amd64 missing from the downloads".into(),
        })?
        .to_string();
    let keys = bringup::ensure_keys(layout, HOST_KEY_ALIAS)?;
    let (hypervisor, built_image) = match choice {
        XenHypervisor::Debian => (
            HypervisorBuild {
                choice,
                origin: "debian-binary".into(),
                version: xen_package_version.clone(),
                config_delta: Vec::new(),
                build_seconds: 0.0,
            },
            None,
        ),
        _ => {
            let (build, image) =
                xen_build::ensure_source_build(layout, choice, &xen_package_version, progress)?;
            (build, Some(image))
        }
    };
    let hypervisor_identity = serde_json::to_vec(&(
        &hypervisor.origin,
        &hypervisor.version,
        &hypervisor.config_delta,
    ))
    .unwrap_or_default();
    let modules = initramfs::DOM0_MODULES.join(",");
    let expected = BuildStamp {
        format: BUILD_FORMAT,
        inputs_sha256: sha256_hex(&[
            manifest.fingerprint().as_bytes(),
            initramfs::RC_SCRIPT.as_bytes(),
            initramfs::INITTAB.as_bytes(),
            modules.as_bytes(),
            &keys.host_key,
            &keys.client_public,
            &hypervisor_identity,
        ]),
        xen_package_version,
        dom0_kernel_package: format!("{} {}", kernel_package.name, kernel_package.version),
        hypervisor,
    };
    let current: Option<BuildStamp> = fs::read(&layout.build_stamp)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    let hypervisor_file = hypervisor_path(layout);
    let outputs_present = [&hypervisor_file, &layout.kernel, &layout.initramfs]
        .iter()
        .all(|path| path.is_file());
    if current.as_ref() == Some(&expected) && outputs_present {
        return Ok(expected);
    }

    fs::create_dir_all(&layout.boot_dir).map_err(|e| LabError::io(&layout.boot_dir, e))?;
    let _ = fs::remove_file(&layout.build_stamp);
    let stage = &layout.stage_dir;

    install_hypervisor(stage, built_image.as_deref(), &hypervisor_file, progress)?;

    let release = initramfs::kernel_release(stage)?;
    let kernel = stage.join(format!("boot/vmlinuz-{release}"));
    fs::copy(&kernel, &layout.kernel).map_err(|e| LabError::io(&kernel, e))?;

    progress("building the dom0 initramfs");
    let authorized_key = String::from_utf8_lossy(&keys.client_public).into_owned();
    let summary = initramfs::build_dom0_initramfs(
        &Dom0Config {
            stage_dir: stage,
            kernel_release: &release,
            authorized_key: &authorized_key,
            host_key: &keys.host_key,
        },
        &layout.initramfs,
    )?;
    progress(&format!(
        "dom0 initramfs: {} entries, {:.1} MiB, {} shared libraries, {} kernel modules ({})",
        summary.entries,
        summary.bytes as f64 / (1024.0 * 1024.0),
        summary.libraries.len(),
        summary.modules.len(),
        summary
            .modules
            .iter()
            .filter_map(|m| Path::new(m)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    packages::write_json(&layout.build_stamp, &expected)?;
    Ok(expected)
}

/// Puts the hypervisor image where QEMU boots it from: the source build's, or Debian's.
fn install_hypervisor(
    stage: &Path,
    built_image: Option<&Path>,
    hypervisor_file: &Path,
    progress: fn(&str),
) -> Result<(), LabError> {
    if let Some(image) = built_image {
        fs::copy(image, hypervisor_file).map_err(|e| LabError::io(image, e))?;
        return Ok(());
    }
    // QEMU's multiboot loader takes Xen's uncompressed 32-bit ELF, not the .gz Debian ships.
    let compressed = stage.join("boot/xen-4.17-amd64.gz");
    progress("unpacking the hypervisor (boot/xen-4.17-amd64.gz)");
    let mut gunzip = Command::new("gzip");
    gunzip.arg("-dc").arg(&compressed);
    require_tool("gzip", "gzip")?;
    let hypervisor = run_checked_bytes(&mut gunzip, "gzip -dc xen-4.17-amd64.gz")?;
    write_file(hypervisor_file, &hypervisor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bringup::now_rfc3339;
    use crate::qemu;
    use std::time::Instant;

    /// The flat image (0x100000..) of assets/pvh-test-guest.S: prints one line on the PV
    /// console and port 0xE9, then SCHEDOP_shutdown(poweroff).
    const PVH_TEST_GUEST_IMAGE_HEX: &str = concat!(
        "04000000040000001200000058656e0014001000fabc00301000fcbe54011000ac84c07404e6e9eb",
        "f7bf0000004089f80fa281fb58656e56751081f94d4d5865750881fa6e564d4d741381c700010000",
        "81ff0000014072d6e9d30000008d47020fa289d9b80010100031d20f30c7053c01100011000000bb",
        "01000000b938011000e8ba13000085c00f8593000000a140011000c1e00ca34c011000c7053c0110",
        "0012000000bb01000000b938011000e88c13000085c07569a140011000a3480110008b2d4c011000",
        "8b950c0c0000be54011000ac84c0741289d181e1ff07000088840d0004000042ebe90faef889950c",
        "0c0000bb04000000b948011000e8fe1200008b2d4c0110008b85080c00003b850c0c0000740b31db",
        "31c9e881120000ebe1bb02000000b950011000e870120000f4ebfd0000000000f07f000000000000",
        "0000000000000000000000000000000000000000687662656e63682d7076682d746573743a206865",
        "6c6c6f2066726f6d2061205056482067756573740a00",
    );

    /// Wraps the flat image in an ELF32 with a PT_LOAD and the PT_NOTE Xen reads
    /// (XEN_ELFNOTE_PHYS32_ENTRY is the image's first 20 bytes).
    fn pvh_test_guest_elf() -> Vec<u8> {
        let image: Vec<u8> = (0..PVH_TEST_GUEST_IMAGE_HEX.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&PVH_TEST_GUEST_IMAGE_HEX[i..i + 2], 16).unwrap())
            .collect();
        let load_address: u32 = 0x10_0000;
        let image_offset: u32 = 0x1000;
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0");
        for half in [2u16, 3] {
            elf.extend_from_slice(&half.to_le_bytes()); // ET_EXEC, EM_386
        }
        for word in [1u32, load_address + 0x14, 52, 0, 0] {
            elf.extend_from_slice(&word.to_le_bytes()); // version, entry, phoff, shoff, flags
        }
        for half in [52u16, 32, 2, 40, 0, 0] {
            elf.extend_from_slice(&half.to_le_bytes());
        }
        let segments: [[u32; 8]; 2] = [
            // PT_LOAD, RWX, with 0x3000 in memory for the hypercall page and the stack.
            [
                1,
                image_offset,
                load_address,
                load_address,
                u32::try_from(image.len()).expect("the test guest is a few bytes"),
                0x3000,
                7,
                0x1000,
            ],
            // PT_NOTE over the .note.Xen at the start of the image.
            [
                4,
                image_offset,
                load_address,
                load_address,
                0x14,
                0x14,
                4,
                4,
            ],
        ];
        for segment in segments {
            for word in segment {
                elf.extend_from_slice(&word.to_le_bytes());
            }
        }
        elf.resize(image_offset as usize, 0);
        elf.extend_from_slice(&image);
        elf
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let stamp = now_rfc3339();
        assert_eq!(stamp.len(), 20, "{stamp}");
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{stamp}"
        );
        assert!(stamp.as_str() > "2024-01-01T00:00:00Z", "{stamp}");
    }

    #[test]
    fn small_machines_and_bad_ports_are_refused() {
        let mut options = XenLabOptions::new("/tmp/unused");
        options.machine.memory_mib = 1024;
        assert!(matches!(
            recipe::validate::<XenLab>(&options),
            Err(LabError::InvalidOptions { .. })
        ));
        options.machine.memory_mib = 3072;
        options.machine.ssh_port = Some(0);
        assert!(recipe::validate::<XenLab>(&options).is_err());
        options.machine.ssh_port = None;
        options.machine.cpus = 0;
        assert!(recipe::validate::<XenLab>(&options).is_err());
        options.machine.cpus = 2;
        recipe::validate::<XenLab>(&options).unwrap();
    }

    /// Boots the real lab: downloads ~81 MB of Debian packages on first use, then about
    /// 10-20 s per boot under TCG. `cargo test -- --ignored lab_up_status_down`; the cache
    /// is `HVBENCH_LAB_TEST_CACHE` or `~/.cache/hvbench/lab-test`.
    #[test]
    #[ignore = "boots a nested Xen under QEMU; needs network for the first download"]
    fn lab_up_status_down() {
        let cache_dir = std::env::var_os("HVBENCH_LAB_TEST_CACHE")
            .map(PathBuf::from)
            .or_else(|| {
                crate::default_cache_dir().and_then(|dir| dir.parent().map(|p| p.join("lab-test")))
            })
            .expect("HOME or HVBENCH_LAB_TEST_CACHE must be set");
        let options = XenLabOptions::new(&cache_dir);
        let state = XenLab::up(&options).expect("lab up");
        assert_eq!(state.kind, "xen");
        assert!(
            state.xen_version.starts_with("4.17"),
            "{}",
            state.xen_version
        );

        // Idempotent: the same lab comes back.
        let again = XenLab::up(&options).expect("second lab up");
        assert_eq!(again.qemu_pid, state.qemu_pid);

        let status = XenLab::status(&cache_dir).expect("status").expect("a lab");
        assert!(status.healthy(), "{status:?}");
        let dom0 = Transport::Ssh(ssh_target(&state));
        let run = |command: &str, input: Option<&[u8]>| {
            let output = dom0
                .run(command, input, Duration::from_secs(120))
                .unwrap_or_else(|e| panic!("`{command}`: {e}"));
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        let list = run("xl list", None);
        assert!(list.contains("Domain-0"), "{list}");

        // A PVH guest through the whole xl path: create paused, unpause, console, shutdown.
        run("cat > /root/pvh-test.elf", Some(&pvh_test_guest_elf()));
        let config = "type = \"pvh\"\nname = \"hvbench-pvh-test\"\n\
                      kernel = \"/root/pvh-test.elf\"\nmemory = 32\nvcpus = 1\n\
                      on_poweroff = \"destroy\"\non_crash = \"destroy\"\n\
                      on_reboot = \"destroy\"\ncpuid = \"host,rdtscp=0\"\n";
        run("cat > /root/pvh-test.cfg", Some(config.as_bytes()));
        let log = "/var/log/xen/console/guest-hvbench-pvh-test.log";
        run(
            &format!("rm -f {log}; xl create -p /root/pvh-test.cfg && xl unpause hvbench-pvh-test"),
            None,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let console = run(&format!("cat {log} 2>/dev/null; xl list"), None);
            if console.contains("hello from a PVH guest") && !console.contains("hvbench-pvh-test ")
            {
                break;
            }
            assert!(Instant::now() < deadline, "guest did not finish: {console}");
            std::thread::sleep(Duration::from_millis(500));
        }

        assert!(XenLab::down(&cache_dir).expect("down"));
        assert!(!qemu::is_our_qemu(state.qemu_pid, &state.qemu_pid_file));
        assert!(XenLab::status(&cache_dir).expect("status").is_none());
        assert!(!XenLab::down(&cache_dir).expect("second down"));
    }
}

#[cfg(test)]
mod state_tests {
    use super::*;
    use crate::{xen_host_in, LabError};
    use std::path::Path;

    fn lab_status(cache_dir: &Path) -> Result<Option<LabStatus<XenLabState>>, LabError> {
        crate::recipe::status::<XenLab>(cache_dir)
    }
    fn lab_down(cache_dir: &Path) -> Result<bool, LabError> {
        crate::recipe::down::<XenLab>(cache_dir)
    }
    fn read_state(cache_dir: &Path) -> Result<Option<XenLabState>, LabError> {
        crate::recipe::read_state::<XenLab>(cache_dir)
    }
    fn write_state(cache_dir: &Path, state: &XenLabState) -> Result<(), LabError> {
        crate::recipe::write_state::<XenLab>(cache_dir, state)
    }
    fn state_path(cache_dir: &Path) -> PathBuf {
        crate::recipe::state_path::<XenLab>(cache_dir)
    }

    fn sample_state(cache_dir: &Path) -> XenLabState {
        XenLabState {
            kind: "xen".into(),
            qemu_pid: u32::MAX,
            qemu_pid_file: cache_dir.join("xen/run/qemu.pid"),
            ssh_port: 10022,
            ssh_key: cache_dir.join("xen/keys/id_ed25519"),
            known_hosts: cache_dir.join("xen/keys/known_hosts"),
            xen_version: "4.17.7".into(),
            xen_package_version: "4.17.7+13-g2445b30a44-0+deb12u1".into(),
            dom0_kernel_package: "linux-image-6.1.0-56-amd64 6.1.192-2".into(),
            hypervisor: None,
            insns_log: None,
            xen_command_line: Some(crate::qemu::xen_command_line(false)),
            accel: "tcg".into(),
            memory_mib: 3072,
            cpus: 2,
            started_at: "2026-11-26T05:00:00Z".into(),
            boot_seconds: 9.0,
            serial_log: cache_dir.join("xen/run/serial.log"),
        }
    }

    #[test]
    fn state_round_trips_and_a_dead_lab_is_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        assert!(lab_status(dir.path()).unwrap().is_none());
        let state = sample_state(dir.path());
        write_state(dir.path(), &state).unwrap();
        assert_eq!(read_state(dir.path()).unwrap(), Some(state.clone()));
        let status = lab_status(dir.path()).unwrap().unwrap();
        assert!(!status.qemu_running && status.answer.is_none() && !status.healthy());
        // Nothing of ours runs: down reports false and forgets the state.
        assert!(!lab_down(dir.path()).unwrap());
        assert!(lab_status(dir.path()).unwrap().is_none());
    }

    #[test]
    fn a_lab_with_other_settings_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let status = |insns: bool| LabStatus {
            state: XenLabState {
                insns_log: insns.then(|| dir.path().join("xen/run/insns.log")),
                xen_command_line: Some(crate::qemu::xen_command_line(insns)),
                ..sample_state(dir.path())
            },
            qemu_running: true,
            answer: Some("4.17.7".into()),
        };
        let mut options = XenLabOptions::new(dir.path());
        // The same settings: reused.
        XenLab::reuse(dir.path(), status(false), &options).unwrap();
        // Debian's hypervisor up, shadow asked for: refused, saying what is up and how.
        options.hypervisor = XenHypervisor::Shadow;
        let e = XenLab::reuse(dir.path(), status(false), &options).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, LabError::SettingsDiffer { .. }), "{text}");
        assert!(
            text.contains("with the debian hypervisor, not counting"),
            "{text}"
        );
        assert!(
            text.contains("not one with the shadow hypervisor"),
            "{text}"
        );
        assert!(text.contains("--replace"), "{text}");
        assert!(
            text.contains(&format!(
                "hvbench lab down xen --cache-dir {}",
                dir.path().display()
            )),
            "{text}"
        );
        // Counting differs alone: refused too.
        options.hypervisor = XenHypervisor::Debian;
        let e = XenLab::reuse(dir.path(), status(true), &options).unwrap_err();
        assert!(
            e.to_string().contains("counting instructions (Xen's"),
            "{e}"
        );
        // A lab booted before Xen's command line was recorded (without eager FPU): refused.
        let mut old = status(false);
        old.state.xen_command_line = None;
        let e = XenLab::reuse(dir.path(), old, &options).unwrap_err();
        assert!(e.to_string().contains("command line: not recorded"), "{e}");
        assert!(e.to_string().contains("spec-ctrl=eager-fpu"), "{e}");
    }

    #[test]
    fn down_never_kills_a_foreign_pid() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = sample_state(dir.path());
        // This test process is alive but is not a QEMU naming our pid file.
        state.qemu_pid = std::process::id();
        write_state(dir.path(), &state).unwrap();
        assert!(!lab_down(dir.path()).unwrap());
    }

    #[test]
    fn corrupt_state_is_an_error_for_status_but_not_for_down() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(state_path(dir.path()), "{not json").unwrap();
        assert!(matches!(
            lab_status(dir.path()),
            Err(LabError::State { .. })
        ));
        assert!(!lab_down(dir.path()).unwrap());
    }

    #[test]
    fn ssh_target_uses_the_state() {
        let state = sample_state(Path::new("/c"));
        let target = ssh_target(&state);
        assert_eq!(target.port, 10022);
        assert_eq!(target.user, "root");
        assert_eq!(target.host, "127.0.0.1");
        assert_eq!(
            target.identity,
            Some(PathBuf::from("/c/xen/keys/id_ed25519"))
        );
        assert_eq!(target.host_key_alias.as_deref(), Some(HOST_KEY_ALIAS));
    }

    #[test]
    fn xen_host_needs_a_running_lab() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(xen_host_in(dir.path()), Err(LabError::NoLab)));
        write_state(dir.path(), &sample_state(dir.path())).unwrap();
        assert!(matches!(xen_host_in(dir.path()), Err(LabError::NoLab)));
    }

    #[test]
    fn xl_info_values_are_found_by_key() {
        let text = "host : lab\nxen_version : 4.17.7\nxen caps : x\n";
        assert_eq!(
            xl_info_value(text, "xen_version").as_deref(),
            Some("4.17.7")
        );
        assert_eq!(xl_info_value(text, "xen_major"), None);
    }
}
