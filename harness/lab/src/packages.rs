//! Fetches the Debian 12 packages a lab is built from, with `apt-get download`, and
//! unpacks them with `dpkg-deb -x`. Nothing is installed on the host.
//!
//! apt runs with its own sources, lists and cache under the lab's cache directory, so it
//! works without root, leaves the host's apt state alone and always asks bookworm, whatever
//! the host's own sources say.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::tools::{require_tool, run_checked};
use super::LabError;

/// The packages the dom0 initramfs is assembled from (the kernel is added by name, resolved
/// from `linux-image-amd64` at download time, since its ABI name changes with point releases).
pub(crate) const XEN_LAB_PACKAGES: &[&str] = &[
    // The hypervisor and its toolstack.
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "libxencall1",
    "libxendevicemodel1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenhypfs1",
    "libxenmisc4.17",
    "libxenstore4",
    "libxentoolcore1",
    "libxentoollog1",
    "libyajl2",
    // Libraries the Xen tools need beyond the libxen* ones (found from DT_NEEDED).
    "libuuid1",
    "liblzma5",
    "libzstd1",
    "zlib1g",
    "libncurses6",
    "libtinfo6",
    // dom0 userland, and its ssh server with the libraries it links.
    "busybox-static",
    "dropbear-bin",
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "libcrypt1",
    // The C runtime, from the same release as the rest (never copied from the host).
    "libc6",
    "libgcc-s1",
];

/// The KVM lab's host userland: busybox, dropbear and the C runtime hvbench itself links
/// (the kernel, with kvm.ko and kvm-amd.ko, is added by name as for Xen).
pub(crate) const KVM_LAB_PACKAGES: &[&str] = &[
    "busybox-static",
    "dropbear-bin",
    "libtomcrypt1",
    "libtommath1",
    "libgmp10",
    "libcrypt1",
    "zlib1g",
    "libc6",
    "libgcc-s1",
];

pub(crate) const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// Where one lab's private apt state and its downloaded .deb files live.
pub(crate) struct PackageCache {
    /// apt's lists, cache and configuration.
    pub apt_root: PathBuf,
    /// The .deb files and their manifest.
    pub debs_dir: PathBuf,
}

const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub(crate) const BOOKWORM_SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
";

/// The same suites' source packages, for the hypervisor built from Debian's own source.
pub(crate) const BOOKWORM_SOURCE_SOURCES: &str = "\
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
";

/// What was downloaded: one .deb per package, with the version apt picked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PackageManifest {
    pub packages: Vec<DownloadedPackage>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct DownloadedPackage {
    pub name: String,
    pub version: String,
    pub file: String,
}

impl PackageManifest {
    /// A short fingerprint of exactly which .deb files went into a build.
    pub(crate) fn fingerprint(&self) -> String {
        let mut files: Vec<&str> = self.packages.iter().map(|p| p.file.as_str()).collect();
        files.sort_unstable();
        files.join("\n")
    }

    pub(crate) fn version_of(&self, name: &str) -> Option<&str> {
        self.packages
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.version.as_str())
    }

    pub(crate) fn kernel_package(&self) -> Option<&DownloadedPackage> {
        self.packages
            .iter()
            .find(|p| p.name.starts_with("linux-image-") && p.name != KERNEL_META_PACKAGE)
    }
}

/// Splits `name_version_arch.deb` as `apt-get download` names files (epoch colon as `%3a`).
pub(crate) fn parse_deb_file_name(file_name: &str) -> Option<(String, String)> {
    let stem = file_name.strip_suffix(".deb")?;
    let mut parts = stem.splitn(3, '_');
    let name = parts.next()?;
    let version = parts.next()?;
    let _arch = parts.next()?;
    if name.is_empty() || version.is_empty() {
        return None;
    }
    Some((name.to_string(), version.replace("%3a", ":")))
}

/// The `Version:` fields of `apt-cache showsrc` output, each once, in order.
pub(crate) fn parse_source_versions(showsrc: &str) -> Vec<String> {
    let mut versions: Vec<String> = Vec::new();
    for version in showsrc
        .lines()
        .filter_map(|line| line.strip_prefix("Version:"))
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        if !versions.iter().any(|known| known == version) {
            versions.push(version.to_string());
        }
    }
    versions
}

/// Finds the versioned kernel package in `apt-cache depends linux-image-amd64` output.
pub(crate) fn parse_kernel_dependency(apt_cache_depends: &str) -> Option<String> {
    apt_cache_depends.lines().find_map(|line| {
        let target = line.trim().strip_prefix("Depends:")?.trim();
        (target.starts_with("linux-image-") && !target.starts_with('<')).then(|| target.to_string())
    })
}

/// apt-get/apt-cache with a private configuration rooted in `root`.
pub(crate) struct PrivateApt {
    root: PathBuf,
}

impl PrivateApt {
    /// Creates apt's directories under `root`, its sources list saying `sources`.
    pub(crate) fn prepare_with(root: &Path, sources: &str) -> Result<Self, LabError> {
        let apt = Self::prepare(root)?;
        let list = root.join("etc/sources.list");
        fs::write(&list, sources).map_err(|e| LabError::io(&list, e))?;
        Ok(apt)
    }

    fn prepare(root: &Path) -> Result<Self, LabError> {
        for dir in ["lists/partial", "archives/partial", "cache", "etc"] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(|e| LabError::io(&path, e))?;
        }
        let sources = root.join("etc/sources.list");
        fs::write(&sources, BOOKWORM_SOURCES).map_err(|e| LabError::io(&sources, e))?;
        let status = root.join("status");
        if !status.exists() {
            fs::write(&status, "").map_err(|e| LabError::io(&status, e))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let root = self.root.display();
        let mut command = Command::new(program);
        for option in [
            format!("Dir::Etc::SourceList={root}/etc/sources.list"),
            // No host sources.list.d, no host preferences: only bookworm is asked.
            format!("Dir::Etc::SourceParts={root}/etc/sources.list.d"),
            format!("Dir::Etc::Preferences={root}/etc/preferences"),
            format!("Dir::Etc::PreferencesParts={root}/etc/preferences.d"),
            format!("Dir::State::Lists={root}/lists"),
            format!("Dir::State::status={root}/status"),
            format!("Dir::Cache={root}/cache"),
            format!("Dir::Cache::archives={root}/archives"),
            "APT::Architecture=amd64".to_string(),
            // As root, apt would drop to _apt, which cannot write into a user's cache.
            "APT::Sandbox::User=root".to_string(),
            "Debug::NoLocking=true".to_string(),
        ] {
            command.arg("-o").arg(option);
        }
        command
    }

    pub(crate) fn update(&self) -> Result<(), LabError> {
        let mut command = self.command("apt-get");
        command.args(["-q", "update"]);
        run_checked(&mut command, "apt-get update (Debian bookworm lists)").map(|_| ())
    }

    fn kernel_package(&self) -> Result<String, LabError> {
        let mut command = self.command("apt-cache");
        command.args(["depends", KERNEL_META_PACKAGE]);
        let output = run_checked(&mut command, "apt-cache depends linux-image-amd64")?;
        parse_kernel_dependency(&output).ok_or_else(|| LabError::Packages {
            reason: format!("apt-cache depends {KERNEL_META_PACKAGE} named no linux-image package"),
        })
    }

    /// The versions of source package `name` the lists offer (`apt-cache showsrc`).
    pub(crate) fn source_versions(&self, name: &str) -> Result<Vec<String>, LabError> {
        let mut command = self.command("apt-cache");
        command.args(["showsrc", "--only-source", name]);
        let output = run_checked(&mut command, &format!("apt-cache showsrc {name}"))?;
        Ok(parse_source_versions(&output))
    }

    /// `apt-get source --download-only name=version` into `into` (.dsc and tarballs).
    pub(crate) fn download_source(
        &self,
        name: &str,
        version: &str,
        into: &Path,
    ) -> Result<(), LabError> {
        let mut command = self.command("apt-get");
        command
            .args(["-q", "source", "--download-only"])
            .arg(format!("{name}={version}"))
            .current_dir(into);
        run_checked(&mut command, &format!("apt-get source {name}={version}")).map(|_| ())
    }

    pub(crate) fn download(&self, packages: &[String], into: &Path) -> Result<(), LabError> {
        let mut command = self.command("apt-get");
        command
            .args(["-q", "download"])
            .args(packages)
            .current_dir(into);
        run_checked(&mut command, "apt-get download").map(|_| ())
    }
}

/// Downloads `packages` and the current Debian kernel into `cache.debs_dir` unless a
/// complete manifest of them is already there; returns the manifest. `size_hint` is for
/// the progress line ("about 81 MB").
pub(crate) fn ensure_packages(
    cache: &PackageCache,
    packages: &[&str],
    size_hint: &str,
    progress: &dyn Fn(&str),
) -> Result<PackageManifest, LabError> {
    let debs_dir = &cache.debs_dir;
    let manifest_path = debs_dir.join("manifest.json");
    if let Some(manifest) = read_manifest(&manifest_path)? {
        let complete = manifest.kernel_package().is_some()
            && packages
                .iter()
                .all(|name| manifest.version_of(name).is_some())
            && manifest
                .packages
                .iter()
                .all(|p| debs_dir.join(&p.file).is_file());
        if complete {
            progress(&format!(
                "packages: {} cached .deb files in {}",
                manifest.packages.len(),
                debs_dir.display()
            ));
            return Ok(manifest);
        }
    }

    require_tool("apt-get", "apt")?;
    require_tool("apt-cache", "apt")?;
    if !Path::new(DEBIAN_KEYRING).is_file() {
        return Err(LabError::MissingTool {
            tool: DEBIAN_KEYRING.to_string(),
            package: "debian-archive-keyring".to_string(),
        });
    }
    let apt = PrivateApt::prepare(&cache.apt_root)?;
    progress("packages: apt-get update (private lists for Debian 12 bookworm)");
    apt.update()?;
    let kernel = apt.kernel_package()?;
    let mut wanted: Vec<String> = packages.iter().map(|s| s.to_string()).collect();
    wanted.push(kernel);

    // Download into a fresh directory, then swap it in: never a half-filled cache.
    let partial = debs_dir.with_extension("partial");
    remove_dir_if_present(&partial)?;
    fs::create_dir_all(&partial).map_err(|e| LabError::io(&partial, e))?;
    progress(&format!(
        "packages: apt-get download ({} packages, {size_hint})",
        wanted.len()
    ));
    apt.download(&wanted, &partial)?;

    let mut packages = Vec::new();
    let entries = fs::read_dir(&partial).map_err(|e| LabError::io(&partial, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LabError::io(&partial, e))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some((name, version)) = parse_deb_file_name(&file) {
            packages.push(DownloadedPackage {
                name,
                version,
                file,
            });
        }
    }
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    for name in &wanted {
        if !packages.iter().any(|p| &p.name == name) {
            return Err(LabError::Packages {
                reason: format!("apt-get download did not produce a .deb for {name}"),
            });
        }
    }
    let manifest = PackageManifest { packages };
    write_json(&partial.join("manifest.json"), &manifest)?;
    remove_dir_if_present(debs_dir)?;
    fs::rename(&partial, debs_dir).map_err(|e| LabError::io(debs_dir, e))?;
    Ok(manifest)
}

/// Unpacks every .deb of the manifest into `stage_dir` (skipped when the stamp says this
/// exact set is already there).
pub(crate) fn ensure_staging_tree(
    debs_dir: &Path,
    manifest: &PackageManifest,
    stage_dir: &Path,
    progress: &dyn Fn(&str),
) -> Result<(), LabError> {
    let stamp_path = stage_dir.join(".hvbench-unpacked");
    let fingerprint = manifest.fingerprint();
    if fs::read_to_string(&stamp_path).ok().as_deref() == Some(fingerprint.as_str()) {
        return Ok(());
    }
    require_tool("dpkg-deb", "dpkg")?;
    progress(&format!(
        "packages: unpacking {} .deb files (dpkg-deb -x)",
        manifest.packages.len()
    ));
    remove_dir_if_present(stage_dir)?;
    fs::create_dir_all(stage_dir).map_err(|e| LabError::io(stage_dir, e))?;
    for package in &manifest.packages {
        let mut command = Command::new("dpkg-deb");
        command
            .arg("-x")
            .arg(debs_dir.join(&package.file))
            .arg(stage_dir);
        run_checked(&mut command, &format!("dpkg-deb -x {}", package.file))?;
    }
    fs::write(&stamp_path, fingerprint).map_err(|e| LabError::io(&stamp_path, e))
}

fn read_manifest(path: &Path) -> Result<Option<PackageManifest>, LabError> {
    match fs::read(path) {
        // A manifest we cannot parse is treated as absent: it is only a cache.
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LabError::io(path, e)),
    }
}

pub(super) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), LabError> {
    Ok(hostutil::statefile::write_json(path, value)?)
}

pub(super) fn remove_dir_if_present(path: &Path) -> Result<(), LabError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LabError::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_deb_file_names() {
        assert_eq!(
            parse_deb_file_name("busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"),
            Some(("busybox-static".into(), "1:1.35.0-4+deb12u1+b1".into()))
        );
        assert_eq!(
            parse_deb_file_name("xen-utils-4.17_4.17.7+13-g2445b30a44-0+deb12u1_amd64.deb"),
            Some((
                "xen-utils-4.17".into(),
                "4.17.7+13-g2445b30a44-0+deb12u1".into()
            ))
        );
        assert_eq!(parse_deb_file_name("manifest.json"), None);
        assert_eq!(parse_deb_file_name("noversion.deb"), None);
    }

    #[test]
    fn finds_the_kernel_behind_the_meta_package() {
        let output = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_kernel_dependency(output),
            Some("linux-image-6.1.0-56-amd64".into())
        );
        assert_eq!(parse_kernel_dependency("linux-image-amd64\n"), None);
        assert_eq!(
            parse_kernel_dependency("x\n  Depends: <linux-image-virtual>\n"),
            None
        );
    }

    #[test]
    fn fingerprint_ignores_order() {
        let package = |name: &str| DownloadedPackage {
            name: name.into(),
            version: "1".into(),
            file: format!("{name}_1_amd64.deb"),
        };
        let a = PackageManifest {
            packages: vec![package("a"), package("b")],
        };
        let b = PackageManifest {
            packages: vec![package("b"), package("a")],
        };
        assert_eq!(a.fingerprint(), b.fingerprint());
    }
}
