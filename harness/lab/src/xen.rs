//! `lab up xen`: packages -> staging tree -> hypervisor, dom0 kernel and initramfs -> QEMU ->
//! wait for the ready marker and for `xl info` over ssh.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::bringup::{
    self, check_cancelled, now_rfc3339, open_cache, sha256_hex, write_file, BootWatch, Layout,
};
use super::initramfs::{self, Dom0Config, READY_MARKER};
use super::packages::{self, PackageManifest};
use super::qemu::XenBoot;
use super::tools::{require_tool, run_checked_bytes};
use super::{
    lab_down, lab_status, write_state, xen_version_over_ssh, LabError, LabState, XenLabOptions,
    HOST_KEY_ALIAS,
};

pub use super::qemu::DOM0_MEMORY_MIB;

/// Bump when the initramfs recipe changes in a way the inputs below do not capture.
const BUILD_FORMAT: u32 = 1;

/// Xen's own image sits beside the dom0 kernel.
fn hypervisor_path(layout: &Layout) -> std::path::PathBuf {
    layout.boot_dir.join("xen-4.17")
}

/// Inputs of a build; a rebuild happens when any of them changes.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct BuildStamp {
    format: u32,
    inputs_sha256: String,
    xen_package_version: String,
    dom0_kernel_package: String,
}

fn validate(options: &XenLabOptions) -> Result<(), LabError> {
    let invalid = |reason: String| Err(LabError::InvalidOptions { reason });
    if options.memory_mib < DOM0_MEMORY_MIB + 512 {
        return invalid(format!(
            "memory_mib must be at least {} (dom0 takes {DOM0_MEMORY_MIB} MiB)",
            DOM0_MEMORY_MIB + 512
        ));
    }
    bringup::check_machine(options.cpus, options.ssh_port, options.accel)
}

/// Brings the Xen lab up, or returns the one already up and healthy.
pub fn lab_up_xen(options: &XenLabOptions) -> Result<LabState, LabError> {
    validate(options)?;
    let progress = options.progress;
    let cache = open_cache(&options.cache_dir, Layout::xen, progress)?;
    let (cache_dir, layout) = (&cache.dir, &cache.layout);

    if let Some(status) = lab_status(cache_dir)? {
        if status.healthy() {
            progress(&format!(
                "Xen {} lab already up (QEMU pid {}, ssh port {})",
                status.state.xen_version, status.state.qemu_pid, status.state.ssh_port
            ));
            return Ok(status.state);
        }
        progress("a previous lab is not healthy; stopping it");
    }
    // Also catches a QEMU whose bring-up was killed before it saved any state.
    lab_down(cache_dir)?;

    let started = Instant::now();
    let manifest = bringup::fetch_and_stage(
        layout,
        packages::XEN_LAB_PACKAGES,
        "about 81 MB",
        options.cancel,
        progress,
    )?;
    let stamp = ensure_boot_files(layout, &manifest, progress)?;
    progress(&format!(
        "boot files ready after {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    check_cancelled(options.cancel)?;

    fs::create_dir_all(&layout.run_dir).map_err(|e| LabError::io(&layout.run_dir, e))?;
    let hypervisor = hypervisor_path(layout);
    let (pid, port, guard, boot_started) =
        bringup::start_qemu(layout, options.ssh_port, &|port| {
            XenBoot {
                hypervisor: &hypervisor,
                dom0_kernel: &layout.kernel,
                dom0_initramfs: &layout.initramfs,
                serial_log: &layout.serial_log,
                pid_file: &layout.pid_file,
                ssh_port: port,
                memory_mib: options.memory_mib,
                cpus: options.cpus,
                accel: options.accel,
            }
            .start()
        })?;
    progress(&format!(
        "booting Xen under QEMU ({}, {} MiB, {} CPUs; QEMU pid {pid}, ssh on 127.0.0.1:{port}; serial log {})",
        options.accel.as_str(),
        options.memory_mib,
        options.cpus,
        layout.serial_log.display()
    ));

    let mut state = LabState {
        kind: "xen".into(),
        qemu_pid: pid,
        qemu_pid_file: layout.pid_file.clone(),
        ssh_port: port,
        ssh_key: layout.client_key.clone(),
        known_hosts: layout.known_hosts.clone(),
        xen_version: String::new(),
        xen_package_version: stamp.xen_package_version.clone(),
        dom0_kernel_package: stamp.dom0_kernel_package.clone(),
        accel: options.accel.as_str().into(),
        memory_mib: options.memory_mib,
        cpus: options.cpus,
        started_at: now_rfc3339(),
        boot_seconds: 0.0,
        serial_log: layout.serial_log.clone(),
    };
    let watch = BootWatch {
        layout,
        lab: "Xen",
        pid,
        deadline: boot_started + options.boot_timeout,
        boot_timeout: options.boot_timeout,
        cancel: options.cancel,
    };
    watch.wait_for_marker(READY_MARKER)?;
    progress(&format!(
        "dom0 ready after {:.1} s; asking `xl info` over ssh",
        boot_started.elapsed().as_secs_f64()
    ));
    state.xen_version = wait_for_xl_info(&watch, &state)?;
    state.boot_seconds = boot_started.elapsed().as_secs_f64();
    write_state(cache_dir, &state)?;
    guard.disarm();
    progress(&format!(
        "Xen {} is up: {:.1} s from QEMU start to `xl info` over ssh ({:.1} s in all)",
        state.xen_version,
        state.boot_seconds,
        started.elapsed().as_secs_f64()
    ));
    Ok(state)
}

/// Hypervisor, dom0 kernel, keys and initramfs; rebuilt only when their inputs changed.
fn ensure_boot_files(
    layout: &Layout,
    manifest: &PackageManifest,
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
        ]),
        xen_package_version,
        dom0_kernel_package: format!("{} {}", kernel_package.name, kernel_package.version),
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

    // QEMU's multiboot loader takes Xen's uncompressed 32-bit ELF, not the .gz Debian ships.
    let compressed = stage.join("boot/xen-4.17-amd64.gz");
    progress("unpacking the hypervisor (boot/xen-4.17-amd64.gz)");
    let mut gunzip = Command::new("gzip");
    gunzip.arg("-dc").arg(&compressed);
    require_tool("gzip", "gzip")?;
    let hypervisor = run_checked_bytes(&mut gunzip, "gzip -dc xen-4.17-amd64.gz")?;
    write_file(&hypervisor_file, &hypervisor)?;

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

fn wait_for_xl_info(watch: &BootWatch<'_>, state: &LabState) -> Result<String, LabError> {
    watch.wait_for_ssh("`xl info`", |limit| xen_version_over_ssh(state, limit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu;
    use crate::ssh_target;
    use hostutil::transport::Transport;
    use std::path::PathBuf;
    use std::time::Duration;

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
        options.memory_mib = 1024;
        assert!(matches!(
            validate(&options),
            Err(LabError::InvalidOptions { .. })
        ));
        options.memory_mib = 3072;
        options.ssh_port = Some(0);
        assert!(validate(&options).is_err());
        options.ssh_port = None;
        options.cpus = 0;
        assert!(validate(&options).is_err());
        options.cpus = 2;
        validate(&options).unwrap();
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
        let state = lab_up_xen(&options).expect("lab up");
        assert_eq!(state.kind, "xen");
        assert!(
            state.xen_version.starts_with("4.17"),
            "{}",
            state.xen_version
        );

        // Idempotent: the same lab comes back.
        let again = lab_up_xen(&options).expect("second lab up");
        assert_eq!(again.qemu_pid, state.qemu_pid);

        let status = lab_status(&cache_dir).expect("status").expect("a lab");
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

        assert!(lab_down(&cache_dir).expect("down"));
        assert!(!qemu::is_our_qemu(state.qemu_pid, &state.qemu_pid_file));
        assert!(lab_status(&cache_dir).expect("status").is_none());
        assert!(!lab_down(&cache_dir).expect("second down"));
    }
}
