//! The Xen lab's hypervisor: Debian's binary package as it ships, or built here from
//! Debian's own source package with a configuration delta (`CONFIG_SHADOW_PAGING=y`, which
//! Debian's Xen 4.17 leaves out, so that `hap = 0` guests can run).
//!
//! A source build is cached under `<cache>/xen/hypervisors/<source version>-<delta hash>/`
//! with a `build.json` naming what it is; a bring-up with the same choice reuses it without
//! touching the network. The unpacked source tree is removed once the image is out.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::bringup::{sha256_hex, Layout};
use crate::packages::{self, PrivateApt, BOOKWORM_SOURCE_SOURCES};
use crate::tools::{require_tool, run_checked};
use crate::LabError;

/// Which hypervisor the Xen lab boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum XenHypervisor {
    /// Debian's `xen-hypervisor-4.17-amd64` as it ships (no shadow paging).
    #[default]
    Debian,
    /// Built from Debian's `xen` source package with `CONFIG_SHADOW_PAGING=y`.
    Shadow,
}

impl XenHypervisor {
    pub fn as_str(self) -> &'static str {
        match self {
            XenHypervisor::Debian => "debian",
            XenHypervisor::Shadow => "shadow",
        }
    }

    /// The Kconfig lines added to Debian's own `debian/xen-kconfig`.
    pub fn config_delta(self) -> &'static [&'static str] {
        match self {
            XenHypervisor::Debian => &[],
            XenHypervisor::Shadow => &["CONFIG_SHADOW_PAGING=y"],
        }
    }
}

/// What the lab's hypervisor is, as the lab's state and the records name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HypervisorBuild {
    pub choice: XenHypervisor,
    /// "debian-binary" (the .deb) or "debian-source" (built here).
    pub origin: String,
    /// The binary package's version, or the source package's.
    pub version: String,
    /// Kconfig lines added to Debian's configuration; empty for Debian's binary.
    pub config_delta: Vec<String>,
    /// Seconds the build took when it was made (0 for Debian's binary).
    #[serde(default)]
    pub build_seconds: f64,
}

impl HypervisorBuild {
    /// One line for records: "debian-source xen 4.17.5+72-... +CONFIG_SHADOW_PAGING=y".
    pub fn describe(&self) -> String {
        let mut line = format!("{} xen {}", self.origin, self.version);
        for delta in &self.config_delta {
            line.push_str(" +");
            line.push_str(delta);
        }
        line
    }
}

/// The Debian source package and its hypervisor sub-tree's make arguments (as
/// debian/rules' `make_args_xen`, less its reproducibility flags).
const SOURCE_PACKAGE: &str = "xen";
const MAKE_ARGS: &[&str] = &["XEN_TARGET_ARCH=x86_64", "XEN_COMPILE_ARCH=x86_64"];
/// Bump when the build recipe changes in a way the key does not capture.
const BUILD_RECIPE: &str = "1";

/// Tools the source build needs, with the Debian package that has each.
pub(crate) const BUILD_TOOLS: &[(&str, &str)] = &[
    ("dpkg-source", "dpkg-dev"),
    ("make", "make"),
    ("gcc", "gcc"),
    ("bison", "bison"),
    ("flex", "flex"),
    ("python3", "python3"),
];

fn builds_dir(layout: &Layout) -> PathBuf {
    layout.boot_dir.with_file_name("hypervisors")
}

/// The cached build for `choice` (any source version), if one is complete.
fn cached(layout: &Layout, choice: XenHypervisor) -> Option<(HypervisorBuild, PathBuf)> {
    let entries = fs::read_dir(builds_dir(layout)).ok()?;
    entries.flatten().find_map(|entry| {
        let dir = entry.path();
        let build: HypervisorBuild = fs::read(dir.join("build.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())?;
        let delta: Vec<&str> = build.config_delta.iter().map(String::as_str).collect();
        let image = dir.join("xen");
        (build.choice == choice
            && delta == choice.config_delta()
            && dir.file_name()? == build_key(&build.version, choice).as_str()
            && image.is_file())
        .then_some((build, image))
    })
}

/// The directory name of a build: the source version and a hash of the delta and recipe.
fn build_key(version: &str, choice: XenHypervisor) -> String {
    let delta = choice.config_delta().join("\n");
    let hash = sha256_hex(&[BUILD_RECIPE.as_bytes(), delta.as_bytes()]);
    format!("{}-{}", version.replace([':', '/'], "_"), &hash[..12])
}

/// The hypervisor image for `choice` built from source (cached), with what it is.
pub(crate) fn ensure_source_build(
    layout: &Layout,
    choice: XenHypervisor,
    binary_version: &str,
    progress: fn(&str),
) -> Result<(HypervisorBuild, PathBuf), LabError> {
    if let Some(found) = cached(layout, choice) {
        progress(&format!(
            "hypervisor: cached build {} ({})",
            found.0.describe(),
            found.1.display()
        ));
        return Ok(found);
    }
    for (tool, package) in BUILD_TOOLS {
        require_tool(tool, package)?;
    }
    let work = builds_dir(layout).join("work");
    packages::remove_dir_if_present(&work)?;
    fs::create_dir_all(&work).map_err(|e| LabError::io(&work, e))?;
    let result = build_in(layout, &work, choice, binary_version, progress);
    // The source tree (~300 MB built) never stays behind, whatever happened.
    let _ = fs::remove_dir_all(&work);
    result
}

fn build_in(
    layout: &Layout,
    work: &Path,
    choice: XenHypervisor,
    binary_version: &str,
    progress: fn(&str),
) -> Result<(HypervisorBuild, PathBuf), LabError> {
    let started = Instant::now();
    let version = download_source(layout, work, binary_version, progress)?;
    let tree = work.join("src");
    let dsc = find_dsc(work)?;
    progress(&format!(
        "hypervisor: unpacking Debian's xen {version} source"
    ));
    let mut unpack = Command::new("dpkg-source");
    unpack.arg("--no-check").arg("-x").arg(&dsc).arg(&tree);
    run_checked(&mut unpack, "dpkg-source -x")?;
    configure(&tree, choice)?;
    progress(&format!(
        "hypervisor: building xen {version} with {} (make -C xen)",
        choice.config_delta().join(" ")
    ));
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut make = Command::new("make");
    make.arg(format!("-j{jobs}"))
        .arg("-C")
        .arg(tree.join("xen"))
        .args(MAKE_ARGS);
    run_checked(&mut make, "make -C xen (the hypervisor)")?;
    let build = HypervisorBuild {
        choice,
        origin: "debian-source".into(),
        version: version.clone(),
        config_delta: choice
            .config_delta()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        build_seconds: started.elapsed().as_secs_f64(),
    };
    let dir = builds_dir(layout).join(build_key(&version, choice));
    packages::remove_dir_if_present(&dir)?;
    fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
    let image = dir.join("xen");
    let built = tree.join("xen/xen");
    fs::copy(&built, &image).map_err(|e| LabError::io(&built, e))?;
    // The stamp last: a directory without it is never taken for a build.
    packages::write_json(&dir.join("build.json"), &build)?;
    progress(&format!(
        "hypervisor: built {} in {:.1} s",
        build.describe(),
        build.build_seconds
    ));
    Ok((build, image))
}

/// Downloads the source package into `work`: the binary package's own version when the
/// registry serves it, else the newest it serves. Returns the version fetched.
fn download_source(
    layout: &Layout,
    work: &Path,
    binary_version: &str,
    progress: fn(&str),
) -> Result<String, LabError> {
    let apt = PrivateApt::prepare_with(
        &layout.apt_dir.with_file_name("apt-src"),
        BOOKWORM_SOURCE_SOURCES,
    )?;
    progress("hypervisor: apt-get update (Debian bookworm source lists)");
    apt.update()?;
    let mut versions = apt.source_versions(SOURCE_PACKAGE)?;
    sort_newest_first(&mut versions, binary_version);
    let mut failures = Vec::new();
    for version in &versions {
        match apt.download_source(SOURCE_PACKAGE, version, work) {
            Ok(()) => return Ok(version.clone()),
            Err(e) => {
                progress(&format!(
                    "hypervisor: source xen {version} not served; trying an older one"
                ));
                failures.push(e.to_string());
            }
        }
    }
    Err(LabError::Packages {
        reason: format!(
            "no version of Debian's xen source package could be downloaded (listed: {}): {}",
            versions.join(", "),
            failures.join("; ")
        ),
    })
}

/// The binary package's own version first, then the rest newest first (dpkg's order).
fn sort_newest_first(versions: &mut [String], preferred: &str) {
    versions.sort_by(|a, b| {
        if a == b {
            return std::cmp::Ordering::Equal;
        }
        if a == preferred || b == preferred {
            return if a == preferred {
                std::cmp::Ordering::Less
            } else {
                std::cmp::Ordering::Greater
            };
        }
        if dpkg_version_greater(a, b) {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Greater
        }
    });
}

fn dpkg_version_greater(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

fn find_dsc(work: &Path) -> Result<PathBuf, LabError> {
    fs::read_dir(work)
        .map_err(|e| LabError::io(work, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "dsc"))
        .ok_or_else(|| LabError::Packages {
            reason: "apt-get source produced no .dsc".into(),
        })
}

/// Debian's hypervisor configuration plus the delta, resolved by `make olddefconfig`;
/// fails unless every line of the delta survived (an option that lost its prompt would
/// silently fall back to its default).
fn configure(tree: &Path, choice: XenHypervisor) -> Result<(), LabError> {
    let debian = tree.join("debian/xen-kconfig");
    let mut config = fs::read_to_string(&debian).map_err(|e| LabError::io(&debian, e))?;
    for line in choice.config_delta() {
        config.push('\n');
        config.push_str(line);
    }
    config.push('\n');
    let dot_config = tree.join("xen/.config");
    fs::write(&dot_config, config).map_err(|e| LabError::io(&dot_config, e))?;
    let mut olddefconfig = Command::new("make");
    olddefconfig
        .arg("-C")
        .arg(tree.join("xen"))
        .arg("olddefconfig")
        .args(MAKE_ARGS);
    run_checked(&mut olddefconfig, "make -C xen olddefconfig")?;
    let resolved = fs::read_to_string(&dot_config).map_err(|e| LabError::io(&dot_config, e))?;
    match missing_delta(&resolved, choice.config_delta()) {
        None => Ok(()),
        Some(line) => Err(LabError::Command {
            what: "make -C xen olddefconfig".into(),
            detail: format!("the resolved configuration lost `{line}`"),
        }),
    }
}

/// The first line of `delta` that `config` does not contain as a whole line.
fn missing_delta<'a>(config: &str, delta: &[&'a str]) -> Option<&'a str> {
    delta
        .iter()
        .find(|line| !config.lines().any(|l| l.trim() == **line))
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shadow_choice_adds_shadow_paging_and_debian_adds_nothing() {
        assert!(XenHypervisor::Debian.config_delta().is_empty());
        assert_eq!(
            XenHypervisor::Shadow.config_delta(),
            ["CONFIG_SHADOW_PAGING=y"]
        );
        let build = HypervisorBuild {
            choice: XenHypervisor::Shadow,
            origin: "debian-source".into(),
            version: "4.17.5+72-g01140da4e8-1".into(),
            config_delta: vec!["CONFIG_SHADOW_PAGING=y".into()],
            build_seconds: 60.0,
        };
        assert_eq!(
            build.describe(),
            "debian-source xen 4.17.5+72-g01140da4e8-1 +CONFIG_SHADOW_PAGING=y"
        );
    }

    #[test]
    fn a_delta_lost_by_olddefconfig_is_found() {
        let config = "CONFIG_PV=y\n# CONFIG_SHADOW_PAGING is not set\n";
        assert_eq!(
            missing_delta(config, &["CONFIG_SHADOW_PAGING=y"]),
            Some("CONFIG_SHADOW_PAGING=y")
        );
        let config = "CONFIG_PV=y\nCONFIG_SHADOW_PAGING=y\n";
        assert_eq!(missing_delta(config, &["CONFIG_SHADOW_PAGING=y"]), None);
    }

    #[test]
    fn versions_sort_with_the_binary_one_first_then_newest() {
        let mut versions = vec![
            "4.17.3+10-g091466ba55-1~deb12u1".to_string(),
            "4.17.5+72-g01140da4e8-1".to_string(),
            "4.17.7+13-g2445b30a44-0+deb12u1".to_string(),
        ];
        sort_newest_first(&mut versions, "4.17.3+10-g091466ba55-1~deb12u1");
        assert_eq!(versions[0], "4.17.3+10-g091466ba55-1~deb12u1");
        if Path::new("/usr/bin/dpkg").exists() {
            assert_eq!(versions[1], "4.17.7+13-g2445b30a44-0+deb12u1");
            assert_eq!(versions[2], "4.17.5+72-g01140da4e8-1");
        }
    }

    #[test]
    fn a_cached_build_is_found_only_for_its_own_choice() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::xen(dir.path());
        assert!(cached(&layout, XenHypervisor::Shadow).is_none());
        let version = "4.17.5+72-g01140da4e8-1";
        let build_dir = builds_dir(&layout).join(build_key(version, XenHypervisor::Shadow));
        fs::create_dir_all(&build_dir).unwrap();
        fs::write(build_dir.join("xen"), b"image").unwrap();
        // Without its stamp a directory is no build.
        assert!(cached(&layout, XenHypervisor::Shadow).is_none());
        let build = HypervisorBuild {
            choice: XenHypervisor::Shadow,
            origin: "debian-source".into(),
            version: version.into(),
            config_delta: vec!["CONFIG_SHADOW_PAGING=y".into()],
            build_seconds: 1.0,
        };
        packages::write_json(&build_dir.join("build.json"), &build).unwrap();
        let (found, image) = cached(&layout, XenHypervisor::Shadow).unwrap();
        assert_eq!(found, build);
        assert_eq!(image, build_dir.join("xen"));
        assert!(cached(&layout, XenHypervisor::Debian).is_none());
    }
}
