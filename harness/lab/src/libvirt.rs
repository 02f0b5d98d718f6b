//! `lab up xen --with-libvirt`: libvirt's libxl driver in the running Xen lab's dom0, so
//! that `virsh -c xen:///system` drives Xen as `virsh -c qemu:///system` drives KVM.
//!
//! The default lab stays as it is (small, fast to build): libvirt is added to a lab that
//! is up, over its SSH link. Debian 12's `libvirt-daemon` (libvirtd), `libvirt-daemon-
//! driver-xen` (the libxl driver, built against Xen 4.17's libxenlight, the lab's),
//! `libvirt-clients` (virsh) and the libraries they link are downloaded with the lab's
//! private apt (`<cache>/libvirt/debs`), unpacked (`<cache>/libvirt/stage`), and the
//! daemons, virsh, the libxl driver alone (the other drivers would need more), the shared
//! libraries and libvirt's CPU map are copied into dom0, never over a file dom0 already
//! has (its libc and Xen libraries stay). Then virtlogd and libvirtd are started there.
//!
//! One addition the packages lack: under TCG, Xen reports host CPU features without VME,
//! and libvirt 9.0's libxl driver refuses to start when no CPU model of its map fits the
//! host ("Cannot find suitable CPU model for given data"; every x86 model, 486 included,
//! needs VME). dom0's copy of the map gets one model, `hvbench-tcg`, with FPU alone, used
//! only to describe the host, never offered to guests.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hostutil::transport::Transport;

use crate::bringup::Layout;
use crate::packages::{remove_dir_if_present, PrivateApt, BOOKWORM_SOURCES};
use crate::tools::{require_tool, run_checked, run_checked_bytes};
use crate::LabError;

/// libvirt and every library package its daemons, virsh and the libxl driver link
/// (from their DT_NEEDED, beyond what dom0 has: libc6's libm and libresolv come through
/// libc6 and are copied only where dom0 lacks them).
const LIBVIRT_PACKAGES: &[&str] = &[
    "libvirt-daemon",
    "libvirt-daemon-driver-xen",
    "libvirt-clients",
    "libvirt0",
    "libc6",
    "libacl1",
    "libapparmor1",
    "libaudit1",
    "libblkid1",
    "libbrotli1",
    "libcap-ng0",
    "libcom-err2",
    "libcurl3-gnutls",
    "libffi8",
    "libglib2.0-0",
    "libgmp10",
    "libgnutls30",
    "libgssapi-krb5-2",
    "libhogweed6",
    "libicu72",
    "libidn2-0",
    "libk5crypto3",
    "libkeyutils1",
    "libkrb5-3",
    "libkrb5support0",
    "libldap-2.5-0",
    "libmount1",
    "libnettle8",
    "libnghttp2-14",
    "libnl-3-200",
    "libnuma1",
    "libp11-kit0",
    "libpcre2-8-0",
    "libpsl5",
    "libreadline8",
    "librtmp1",
    "libsasl2-2",
    "libselinux1",
    "libssh-4",
    "libssh2-1",
    "libssl3",
    "libstdc++6",
    "libtasn1-6",
    "libtinfo6",
    "libtirpc3",
    "libunistring2",
    "libxml2",
];

/// What is copied into dom0, relative to the unpacked tree (library directories are
/// taken whole, one level deep; see `bundle`).
const PROGRAMS: &[&str] = &[
    "usr/sbin/libvirtd",
    "usr/sbin/virtlogd",
    "usr/bin/virsh",
    "usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_libxl.so",
    "usr/share/libvirt/cpu_map",
];
const LIBRARY_DIRS: &[&str] = &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"];

/// The CPU model dom0's libvirt describes a TCG host with (see the module comment).
const TCG_CPU_MODEL: &str = "<cpus>\n  <model name='hvbench-tcg'>\n    \
    <decode host='on' guest='off'/>\n    <feature name='fpu'/>\n  </model>\n</cpus>\n";

/// Runs in dom0 after the bundle arrived in /tmp/hvbench-libvirt: copies what dom0 lacks,
/// adds the CPU model, starts the daemons, waits for libvirt to answer.
const SETUP: &str = r#"set -e
cd /tmp/hvbench-libvirt
find . ! -type d | while read -r f; do
  t="/${f#./}"
  [ -e "$t" ] || [ -L "$t" ] || { mkdir -p "$(dirname "$t")"; cp -a "$f" "$t"; }
done
cd / && rm -rf /tmp/hvbench-libvirt
mkdir -p /var/log/libvirt/libxl /var/run/libvirt /var/lib/libvirt/libxl /etc/libvirt
m=/usr/share/libvirt/cpu_map
if ! grep -q hvbench-tcg $m/index.xml; then
  cat > $m/x86_hvbench-tcg.xml
  sed -i "s|    <include filename='x86_486.xml'/>|&\n    <include filename='x86_hvbench-tcg.xml'/>|" $m/index.xml
else
  cat > /dev/null
fi
pidof virtlogd >/dev/null || virtlogd -d
pidof libvirtd >/dev/null || libvirtd -d
i=0
until virsh -q -c xen:///system version >/dev/null 2>&1; do
  i=$((i+1)); [ $i -lt 120 ] || { echo "libvirt did not answer in dom0" >&2; exit 1; }
  sleep 1
done
virsh -q -c xen:///system version | grep -i 'running hypervisor'
"#;

/// libvirt in dom0 already answering: its `Running hypervisor` line.
const PROBE: &str = "virsh -q -c xen:///system version 2>/dev/null | grep -i 'running hypervisor'";

/// Adds libvirt to the Xen lab in `cache_dir` (which must be up) unless it already
/// answers there; returns libvirt's `Running hypervisor: Xen ...` line.
pub fn add_libvirt(cache_dir: &Path, progress: &dyn Fn(&str)) -> Result<String, LabError> {
    let transport = crate::xen_host_in(cache_dir)?.transport;
    if let Ok(out) = transport.run(PROBE, None, Duration::from_secs(60)) {
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !line.is_empty() {
            return Ok(line);
        }
    }
    let layout = Layout::xen(cache_dir);
    let dir = cache_dir.join("libvirt");
    let debs = ensure_debs(&layout, &dir.join("debs"), progress)?;
    let stage = dir.join("stage");
    unpack(&debs, &stage)?;
    let bundle = bundle(&stage)?;
    // Unpacked again each time from the cached .debs: not kept (about 90 MB).
    remove_dir_if_present(&stage)?;
    progress(&format!(
        "libvirt: copying {:.1} MiB into dom0",
        bundle.len() as f64 / (1 << 20) as f64
    ));
    ssh(
        &transport,
        "rm -rf /tmp/hvbench-libvirt && mkdir /tmp/hvbench-libvirt && cd /tmp/hvbench-libvirt && tar xzf -",
        &bundle,
    )?;
    progress("libvirt: starting virtlogd and libvirtd (libxl driver) in dom0");
    let out = ssh(&transport, SETUP, TCG_CPU_MODEL.as_bytes())?;
    Ok(out.trim().to_string())
}

fn ssh(transport: &Transport, command: &str, input: &[u8]) -> Result<String, LabError> {
    transport
        .run(command, Some(input), Duration::from_secs(600))
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .map_err(|e| LabError::Ssh {
            reason: format!("adding libvirt to dom0: {e}"),
        })
}

/// The .deb files of `LIBVIRT_PACKAGES` in `debs` (downloaded once).
fn ensure_debs(
    layout: &Layout,
    debs: &Path,
    progress: &dyn Fn(&str),
) -> Result<Vec<PathBuf>, LabError> {
    let complete = debs.join("complete");
    if !complete.exists() {
        require_tool("apt-get", "apt")?;
        let apt = PrivateApt::prepare_with(&layout.apt_dir, BOOKWORM_SOURCES)?;
        let partial = debs.with_extension("partial");
        remove_dir_if_present(&partial)?;
        fs::create_dir_all(&partial).map_err(|e| LabError::io(&partial, e))?;
        let wanted: Vec<String> = LIBVIRT_PACKAGES.iter().map(|s| s.to_string()).collect();
        progress(&format!(
            "libvirt: apt-get download ({} packages, about 20 MB)",
            wanted.len()
        ));
        if apt.download(&wanted, &partial).is_err() {
            apt.update()?;
            apt.download(&wanted, &partial)?;
        }
        fs::write(partial.join("complete"), "").map_err(|e| LabError::io(&partial, e))?;
        remove_dir_if_present(debs)?;
        fs::rename(&partial, debs).map_err(|e| LabError::io(debs, e))?;
    }
    let mut files: Vec<PathBuf> = fs::read_dir(debs)
        .map_err(|e| LabError::io(debs, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    files.sort();
    Ok(files)
}

/// `dpkg-deb -x` of every .deb into a fresh `stage`.
fn unpack(debs: &[PathBuf], stage: &Path) -> Result<(), LabError> {
    require_tool("dpkg-deb", "dpkg")?;
    remove_dir_if_present(stage)?;
    fs::create_dir_all(stage).map_err(|e| LabError::io(stage, e))?;
    for deb in debs {
        run_checked(
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(stage),
            &format!("dpkg-deb -x {}", deb.display()),
        )?;
    }
    Ok(())
}

/// A gzipped tar of `PROGRAMS` and the shared libraries (files and links at the top of
/// `LIBRARY_DIRS`), relative to `stage`.
fn bundle(stage: &Path) -> Result<Vec<u8>, LabError> {
    let mut paths: Vec<String> = PROGRAMS.iter().map(|s| s.to_string()).collect();
    for dir in LIBRARY_DIRS {
        let Ok(entries) = fs::read_dir(stage.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if !is_dir && name.contains(".so") {
                paths.push(format!("{dir}/{name}"));
            }
        }
    }
    for path in &paths {
        if fs::symlink_metadata(stage.join(path)).is_err() {
            return Err(LabError::Packages {
                reason: format!("{path} is in none of libvirt's packages"),
            });
        }
    }
    paths.sort();
    require_tool("tar", "tar")?;
    run_checked_bytes(
        Command::new("tar")
            .arg("-C")
            .arg(stage)
            .args(["-czf", "-", "--"])
            .args(&paths),
        "tar of libvirt for dom0",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_holds_the_programs_and_top_level_libraries_only() {
        let stage = tempfile::tempdir().unwrap();
        let s = stage.path();
        for file in PROGRAMS.iter().filter(|p| !p.ends_with("cpu_map")) {
            fs::create_dir_all(s.join(file).parent().unwrap()).unwrap();
            fs::write(s.join(file), b"x").unwrap();
        }
        fs::create_dir_all(s.join("usr/share/libvirt/cpu_map")).unwrap();
        fs::write(s.join("usr/share/libvirt/cpu_map/index.xml"), b"<cpus/>").unwrap();
        fs::create_dir_all(s.join("lib/x86_64-linux-gnu")).unwrap();
        fs::write(s.join("lib/x86_64-linux-gnu/libfoo.so.1.2"), b"x").unwrap();
        std::os::unix::fs::symlink("libfoo.so.1.2", s.join("lib/x86_64-linux-gnu/libfoo.so.1"))
            .unwrap();
        fs::write(s.join("usr/lib/x86_64-linux-gnu/libvirt/other.so"), b"x").unwrap();
        fs::write(s.join("usr/lib/x86_64-linux-gnu/README"), b"x").unwrap();
        let tar = bundle(s).unwrap();
        let out = tempfile::tempdir().unwrap();
        let mut child = Command::new("tar")
            .arg("-C")
            .arg(out.path())
            .args(["-xzf", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), &tar).unwrap();
        assert!(child.wait().unwrap().success());
        let o = out.path();
        assert!(o.join("usr/sbin/libvirtd").is_file());
        assert!(o.join("usr/share/libvirt/cpu_map/index.xml").is_file());
        assert!(o.join("lib/x86_64-linux-gnu/libfoo.so.1").is_symlink());
        // Only the libxl driver of libvirt's modules, no other file of the library dirs.
        assert!(!o.join("usr/lib/x86_64-linux-gnu/libvirt/other.so").exists());
        assert!(!o.join("usr/lib/x86_64-linux-gnu/README").exists());
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let stage = tempfile::tempdir().unwrap();
        let err = bundle(stage.path()).unwrap_err().to_string();
        assert!(err.contains("usr/sbin/libvirtd"), "{err}");
    }
}
