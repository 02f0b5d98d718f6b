//! Assembles a lab's initramfs from the unpacked Debian packages: busybox as init and
//! shell, the lab's programs (the Xen toolstack in Debian's layout, since libxl has
//! compiled-in `/usr/lib/xen-4.17/bin` paths; or hvbench itself), every shared library
//! they need, the kernel modules in dependency order, dropbear, and the boot script.
//!
//! The archive is a plain (uncompressed) newc cpio: Linux takes it as is, and under TCG
//! skipping the gunzip saves about two seconds of dom0 boot.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::BufWriter;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::cpio::CpioWriter;
use super::elf::{self, ElfFile};
use super::tools::run_checked;
use super::LabError;

/// The dom0 boot script (run by busybox init as `sysinit`).
pub(crate) const RC_SCRIPT: &str = include_str!("assets/rc");
pub(crate) const INITTAB: &str = include_str!("assets/inittab");
/// The line the boot script prints on the serial console once dropbear listens.
pub const READY_MARKER: &str = "HVBENCH-XEN-LAB-READY";

/// Xen's backend drivers for dom0 (and loop: a file-backed vbd is a loop device), then the
/// NIC for QEMU's user-mode network.
pub(crate) const DOM0_MODULES: &[&str] = &[
    "xen-privcmd",
    "xenfs",
    "xen-evtchn",
    "xen-gntdev",
    "xen-gntalloc",
    "xen-blkback",
    "loop",
    "xen-netback",
    "virtio_pci",
    "virtio_net",
];

/// Where Debian 12 puts shared libraries (searched in this order, inside the staging tree).
const LIBRARY_DIRS: &[&str] = &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"];
const DYNAMIC_LOADER: &str = "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
/// glibc dlopens it for pthread_cancel (xl save/restore abort without it); no binary names it.
const DLOPENED_LIBRARIES: &[&str] = &["libgcc_s.so.1"];

/// Staging directories copied whole, keeping Debian's layout.
const STAGE_TREES: &[&str] = &[
    "usr/lib/xen-4.17/bin",
    "usr/lib/xen-common/bin",
    "usr/sbin",
    "etc/xen",
];
/// Single files from the staging tree.
const STAGE_FILES: &[&str] = &[
    "usr/bin/dropbearkey",
    "usr/bin/xenstore",
    "usr/bin/xenstore-chmod",
    "usr/bin/xenstore-exists",
    "usr/bin/xenstore-list",
    "usr/bin/xenstore-ls",
    "usr/bin/xenstore-read",
    "usr/bin/xenstore-rm",
    "usr/bin/xenstore-watch",
    "usr/bin/xenstore-write",
    "usr/bin/xen-detect",
];

const MAX_SYMLINK_HOPS: usize = 16;

/// What goes into a lab's initramfs.
pub(crate) struct InitramfsSpec<'a> {
    pub stage_dir: &'a Path,
    pub kernel_release: &'a str,
    /// Staging directories copied whole, keeping Debian's layout.
    pub stage_trees: &'a [&'a str],
    /// Single files from the staging tree (skipped when absent).
    pub stage_files: &'a [&'a str],
    /// Files of this machine, (path inside, path here): their shared libraries are
    /// resolved in the staging tree like everyone else's.
    pub host_files: &'a [(&'a str, &'a Path)],
    /// Kernel modules to put in, with everything they depend on.
    pub modules: &'a [&'a str],
    /// The boot script, run by busybox init as `sysinit`.
    pub rc_script: &'a str,
    pub hostname: &'a str,
    /// One `ssh-ed25519 AAAA... comment` line.
    pub authorized_key: &'a str,
    /// Dropbear's ed25519 host key (dropbearkey format).
    pub host_key: &'a [u8],
}

/// What goes into dom0 besides the staging tree's files.
pub(crate) struct Dom0Config<'a> {
    pub stage_dir: &'a Path,
    pub kernel_release: &'a str,
    /// One `ssh-ed25519 AAAA... comment` line.
    pub authorized_key: &'a str,
    /// Dropbear's ed25519 host key (dropbearkey format).
    pub host_key: &'a [u8],
}

/// What was put in, for the progress line and for FINDINGS-style reporting.
#[derive(Debug, Clone)]
pub(crate) struct InitramfsSummary {
    pub entries: usize,
    pub bytes: u64,
    pub libraries: Vec<String>,
    pub modules: Vec<String>,
}

enum Node {
    Directory {
        permissions: u32,
    },
    File {
        permissions: u32,
        content: Content,
    },
    Symlink {
        target: String,
    },
    CharDevice {
        permissions: u32,
        major: u32,
        minor: u32,
    },
}

enum Content {
    FromStage(PathBuf),
    /// A file of this machine (hvbench itself).
    FromHost(PathBuf),
    Inline(Vec<u8>),
}

/// Mode of a file that holds a private key.
const PRIVATE_FILE_MODE: u32 = 0o600;

/// The initramfs as a sorted map, so parents always precede children in the archive.
#[derive(Default)]
struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    fn insert(&mut self, path: &str, node: Node) {
        let mut parent = String::new();
        for component in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            self.nodes
                .entry(parent.clone())
                .or_insert(Node::Directory { permissions: 0o755 });
        }
        self.nodes.insert(path.to_string(), node);
    }

    fn directory(&mut self, path: &str, permissions: u32) {
        self.insert(path, Node::Directory { permissions });
    }

    fn inline_file(&mut self, path: &str, permissions: u32, content: impl Into<Vec<u8>>) {
        self.insert(
            path,
            Node::File {
                permissions,
                content: Content::Inline(content.into()),
            },
        );
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_string(),
            },
        );
    }

    /// Writes the archive to `out`, readable by its owner only: every lab image holds the
    /// lab's private host key (also when `out` was there before, with another mode).
    fn write(&self, out: &Path) -> Result<u64, LabError> {
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PRIVATE_FILE_MODE)
            .open(out)
            .map_err(|e| LabError::io(out, e))?;
        file.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))
            .map_err(|e| LabError::io(out, e))?;
        let mut writer = CpioWriter::new(BufWriter::new(file));
        let io_error = |e| LabError::io(out, e);
        for (path, node) in &self.nodes {
            match node {
                Node::Directory { permissions } => {
                    writer.directory(path, *permissions).map_err(io_error)?
                }
                Node::File {
                    permissions,
                    content,
                } => {
                    let bytes = match content {
                        Content::FromStage(source) | Content::FromHost(source) => {
                            fs::read(source).map_err(|e| LabError::io(source, e))?
                        }
                        Content::Inline(bytes) => bytes.clone(),
                    };
                    writer.file(path, *permissions, &bytes).map_err(io_error)?
                }
                Node::Symlink { target } => writer.symlink(path, target).map_err(io_error)?,
                Node::CharDevice {
                    permissions,
                    major,
                    minor,
                } => writer
                    .char_device(path, *permissions, *major, *minor)
                    .map_err(io_error)?,
            }
        }
        writer.finish().map_err(io_error)?;
        Ok(fs::metadata(out).map_err(|e| LabError::io(out, e))?.len())
    }
}

fn initramfs_error(reason: impl Into<String>) -> LabError {
    LabError::Initramfs {
        reason: reason.into(),
    }
}

/// Follows symlinks inside the staging tree (absolute targets mean the tree's root) and
/// returns the path, relative to the tree, of the regular file at the end.
pub(crate) fn resolve_in_stage(stage_dir: &Path, relative: &str) -> Option<String> {
    let mut current = relative.trim_start_matches('/').to_string();
    for _ in 0..MAX_SYMLINK_HOPS {
        let full = stage_dir.join(&current);
        let metadata = fs::symlink_metadata(&full).ok()?;
        if !metadata.file_type().is_symlink() {
            return metadata.is_file().then_some(current);
        }
        let target = fs::read_link(&full).ok()?;
        let target = target.to_str()?;
        current = if let Some(absolute) = target.strip_prefix('/') {
            absolute.to_string()
        } else {
            let parent = Path::new(&current).parent().unwrap_or(Path::new(""));
            normalize(&parent.join(target))?
        };
    }
    None
}

/// Resolves `.` and `..` lexically; None if it climbs above the root.
fn normalize(path: &Path) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for component in path.to_str()?.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    Some(parts.join("/"))
}

/// Computes the set of shared libraries `roots` need, transitively.
///
/// `needed_of` reads a file's DT_NEEDED list; `locate` maps a soname to the file that
/// provides it. Returns soname -> providing file.
pub(crate) fn library_closure(
    roots: &[String],
    needed_of: &dyn Fn(&str) -> Result<Vec<String>, LabError>,
    locate: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>, LabError> {
    let mut resolved: BTreeMap<String, String> = BTreeMap::new();
    let mut pending: Vec<(String, String)> = Vec::new();
    for root in roots {
        for soname in needed_of(root)? {
            pending.push((soname, root.clone()));
        }
    }
    while let Some((soname, needed_by)) = pending.pop() {
        if resolved.contains_key(&soname) {
            continue;
        }
        let provider = locate(&soname).ok_or_else(|| {
            initramfs_error(format!(
                "shared library {soname} (needed by {needed_by}) is in none of the \
                 downloaded packages"
            ))
        })?;
        for next in needed_of(&provider)? {
            pending.push((next, provider.clone()));
        }
        resolved.insert(soname, provider);
    }
    Ok(resolved)
}

/// Orders `wanted` modules so that each comes after everything it depends on.
/// Module names compare with `-` and `_` as equal, as the kernel does.
pub(crate) fn module_load_order(
    wanted: &[&str],
    dependencies_of: &dyn Fn(&str) -> Result<Vec<String>, LabError>,
) -> Result<Vec<String>, LabError> {
    fn visit(
        name: &str,
        dependencies_of: &dyn Fn(&str) -> Result<Vec<String>, LabError>,
        in_progress: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> Result<(), LabError> {
        let name = canonical_module_name(name);
        if order.contains(&name) {
            return Ok(());
        }
        if !in_progress.insert(name.clone()) {
            return Err(initramfs_error(format!(
                "kernel module dependency cycle through {name}"
            )));
        }
        for dependency in dependencies_of(&name)? {
            visit(&dependency, dependencies_of, in_progress, order)?;
        }
        in_progress.remove(&name);
        order.push(name);
        Ok(())
    }
    let mut order = Vec::new();
    let mut in_progress = BTreeSet::new();
    for name in wanted {
        visit(name, dependencies_of, &mut in_progress, &mut order)?;
    }
    Ok(order)
}

pub(crate) fn canonical_module_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Module name -> path relative to `lib/modules/<release>`, for every `.ko` under kernel/.
fn index_modules(modules_dir: &Path) -> Result<BTreeMap<String, String>, LabError> {
    let mut index = BTreeMap::new();
    let mut pending = vec![PathBuf::from("kernel")];
    while let Some(relative) = pending.pop() {
        let dir = modules_dir.join(&relative);
        for entry in fs::read_dir(&dir).map_err(|e| LabError::io(&dir, e))? {
            let entry = entry.map_err(|e| LabError::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let child = relative.join(&name);
            let file_type = entry.file_type().map_err(|e| LabError::io(&dir, e))?;
            if file_type.is_dir() {
                pending.push(child);
            } else if let Some(module) = name.strip_suffix(".ko") {
                index.insert(
                    canonical_module_name(module),
                    child.to_string_lossy().into_owned(),
                );
            }
        }
    }
    Ok(index)
}

/// The single kernel release under `lib/modules` of the staging tree.
pub(crate) fn kernel_release(stage_dir: &Path) -> Result<String, LabError> {
    let modules = stage_dir.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&modules)
        .map_err(|e| LabError::io(&modules, e))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    releases.sort();
    match releases.as_slice() {
        [release] => Ok(release.clone()),
        _ => Err(initramfs_error(format!(
            "expected one kernel under {}, found {releases:?}",
            modules.display()
        ))),
    }
}

fn read_stage_file(stage_dir: &Path, relative: &str) -> Result<Vec<u8>, LabError> {
    let path = stage_dir.join(relative);
    fs::read(&path).map_err(|e| LabError::io(&path, e))
}

/// DT_NEEDED of a staging-tree file; non-ELF files (scripts) need nothing.
fn needed_libraries(stage_dir: &Path, relative: &str) -> Result<Vec<String>, LabError> {
    let bytes = read_stage_file(stage_dir, relative)?;
    if !elf::is_elf(&bytes) {
        return Ok(Vec::new());
    }
    ElfFile::parse(&bytes)
        .map(|file| file.needed_libraries())
        .map_err(|e| initramfs_error(format!("{relative}: {e}")))
}

/// DT_NEEDED of a file outside the staging tree, named `inside` in error messages.
fn needed_libraries_of_file(path: &Path, inside: &str) -> Result<Vec<String>, LabError> {
    let bytes = fs::read(path).map_err(|e| LabError::io(path, e))?;
    ElfFile::parse(&bytes)
        .map(|file| file.needed_libraries())
        .map_err(|e| initramfs_error(format!("{inside} ({}): {e}", path.display())))
}

/// Adds a staging file or symlink at the same path.
fn add_from_stage(tree: &mut Tree, stage_dir: &Path, relative: &str) -> Result<(), LabError> {
    let full = stage_dir.join(relative);
    let metadata = fs::symlink_metadata(&full).map_err(|e| LabError::io(&full, e))?;
    if metadata.file_type().is_symlink() {
        let target = fs::read_link(&full).map_err(|e| LabError::io(&full, e))?;
        tree.symlink(relative, &target.to_string_lossy());
    } else if metadata.is_dir() {
        tree.directory(relative, metadata.permissions().mode() & 0o7777);
    } else if metadata.is_file() {
        tree.insert(
            relative,
            Node::File {
                permissions: metadata.permissions().mode() & 0o7777,
                content: Content::FromStage(full),
            },
        );
    }
    Ok(())
}

/// Adds a directory of the staging tree, recursively; returns the regular files added.
fn add_stage_tree(
    tree: &mut Tree,
    stage_dir: &Path,
    relative: &str,
) -> Result<Vec<String>, LabError> {
    let mut files = Vec::new();
    let mut pending = vec![relative.to_string()];
    while let Some(current) = pending.pop() {
        add_from_stage(tree, stage_dir, &current)?;
        let full = stage_dir.join(&current);
        let metadata = fs::symlink_metadata(&full).map_err(|e| LabError::io(&full, e))?;
        if metadata.is_dir() {
            for entry in fs::read_dir(&full).map_err(|e| LabError::io(&full, e))? {
                let entry = entry.map_err(|e| LabError::io(&full, e))?;
                pending.push(format!("{current}/{}", entry.file_name().to_string_lossy()));
            }
        } else if metadata.is_file() {
            files.push(current);
        }
    }
    Ok(files)
}

fn busybox_applets(stage_dir: &Path) -> Result<Vec<String>, LabError> {
    let busybox = stage_dir.join("bin/busybox");
    let listing = run_checked(Command::new(&busybox).arg("--list"), "busybox --list")?;
    Ok(listing
        .lines()
        .map(str::trim)
        .filter(|name| !name.is_empty() && *name != "busybox" && !name.contains('/'))
        .map(str::to_string)
        .collect())
}

/// Builds the Xen lab's dom0 initramfs at `out`.
pub(crate) fn build_dom0_initramfs(
    config: &Dom0Config<'_>,
    out: &Path,
) -> Result<InitramfsSummary, LabError> {
    build_initramfs(
        &InitramfsSpec {
            stage_dir: config.stage_dir,
            kernel_release: config.kernel_release,
            stage_trees: STAGE_TREES,
            stage_files: STAGE_FILES,
            host_files: &[],
            modules: DOM0_MODULES,
            rc_script: RC_SCRIPT,
            hostname: "hvbench-xen-dom0",
            authorized_key: config.authorized_key,
            host_key: config.host_key,
        },
        out,
    )
}

/// `modules.dep` for the modules in `order` (dependencies first): each module with every
/// module it needs, directly or not, nearest first, as depmod writes it; modprobe loads
/// the list from its end.
pub(crate) fn modules_dep(
    order: &[String],
    paths: &BTreeMap<String, String>,
    dependencies_of: &dyn Fn(&str) -> Result<Vec<String>, LabError>,
) -> Result<String, LabError> {
    let mut text = String::new();
    for name in order {
        let mut needed: BTreeSet<String> = BTreeSet::new();
        let mut pending = dependencies_of(name)?;
        while let Some(dependency) = pending.pop() {
            let dependency = canonical_module_name(&dependency);
            if needed.insert(dependency.clone()) {
                pending.extend(dependencies_of(&dependency)?);
            }
        }
        // Later in the load order means nearer to the module.
        let mut needed: Vec<&String> = order.iter().filter(|m| needed.contains(*m)).collect();
        needed.reverse();
        let path_of = |module: &str| {
            paths
                .get(module)
                .cloned()
                .ok_or_else(|| initramfs_error(format!("kernel module {module} has no path")))
        };
        text.push_str(&path_of(name)?);
        text.push(':');
        for dependency in needed {
            text.push(' ');
            text.push_str(&path_of(dependency)?);
        }
        text.push('\n');
    }
    Ok(text)
}

/// Builds a lab's initramfs at `out`.
pub(crate) fn build_initramfs(
    spec: &InitramfsSpec<'_>,
    out: &Path,
) -> Result<InitramfsSummary, LabError> {
    let mut tree = skeleton();
    let (binaries, host_files) = add_programs(&mut tree, spec)?;
    let libraries = add_libraries(&mut tree, spec.stage_dir, &binaries, &host_files)?;
    let modules = add_modules(&mut tree, spec)?;
    add_configuration(&mut tree, spec);
    let entries = tree.nodes.len();
    let bytes = tree.write(out)?;
    Ok(InitramfsSummary {
        entries,
        bytes,
        libraries,
        modules,
    })
}

/// The directories, device node and links every dom0 needs before any file.
fn skeleton() -> Tree {
    let mut tree = Tree::default();
    for dir in [
        "proc", "sys", "dev", "run", "tmp", "mnt", "var/lib", "var/log",
    ] {
        tree.directory(dir, 0o755);
    }
    tree.directory("tmp", 0o1777);
    tree.directory("root", 0o700);
    tree.directory("root/.ssh", 0o700);
    // The kernel opens /dev/console for init's stdio before anything mounts devtmpfs.
    tree.insert(
        "dev/console",
        Node::CharDevice {
            permissions: 0o600,
            major: 5,
            minor: 1,
        },
    );
    tree.symlink("var/run", "../run");
    tree.symlink("var/lock", "../run/lock");
    tree
}

/// busybox, the staged trees and files, and the host's own files; returns every program
/// added (for their libraries) and which of them came from the host.
fn add_programs(
    tree: &mut Tree,
    spec: &InitramfsSpec<'_>,
) -> Result<(Vec<String>, BTreeMap<String, PathBuf>), LabError> {
    let stage = spec.stage_dir;
    // busybox is PID 1 (it reaps orphans) and provides every shell tool.
    add_from_stage(tree, stage, "bin/busybox")?;
    for applet in busybox_applets(stage)? {
        tree.symlink(&format!("bin/{applet}"), "busybox");
    }
    tree.symlink("init", "bin/busybox");
    tree.symlink("sbin", "bin");

    let mut binaries = Vec::new();
    for dir in spec.stage_trees {
        binaries.extend(add_stage_tree(tree, stage, dir)?);
    }
    for file in spec.stage_files {
        if stage.join(file).exists() {
            add_from_stage(tree, stage, file)?;
            binaries.push(file.to_string());
        }
    }
    binaries.push("bin/busybox".to_string());
    let mut host_files: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (inside, here) in spec.host_files {
        tree.insert(
            inside,
            Node::File {
                permissions: 0o755,
                content: Content::FromHost(here.to_path_buf()),
            },
        );
        host_files.insert(inside.to_string(), here.to_path_buf());
        binaries.push(inside.to_string());
    }
    Ok((binaries, host_files))
}

/// The shared libraries `binaries` need (and those glibc opens at run time), resolved
/// within the staging tree only: never the host's, even for a file that came from the
/// host. Returns where each was installed.
fn add_libraries(
    tree: &mut Tree,
    stage: &Path,
    binaries: &[String],
    host_files: &BTreeMap<String, PathBuf>,
) -> Result<Vec<String>, LabError> {
    let locate = |soname: &str| {
        LIBRARY_DIRS
            .iter()
            .find_map(|dir| resolve_in_stage(stage, &format!("{dir}/{soname}")))
    };
    let needed_of = |relative: &str| match host_files.get(relative) {
        Some(here) => needed_libraries_of_file(here, relative),
        None => needed_libraries(stage, relative),
    };
    let mut libraries = library_closure(binaries, &needed_of, &locate)?;
    for soname in DLOPENED_LIBRARIES {
        let provider = locate(soname).ok_or_else(|| {
            initramfs_error(format!("{soname} is in none of the downloaded packages"))
        })?;
        for (name, path) in library_closure(std::slice::from_ref(&provider), &needed_of, &locate)? {
            libraries.insert(name, path);
        }
        libraries.insert(soname.to_string(), provider);
    }
    let loader = resolve_in_stage(stage, DYNAMIC_LOADER)
        .ok_or_else(|| initramfs_error(format!("{DYNAMIC_LOADER} missing (libc6)")))?;
    tree.insert(
        DYNAMIC_LOADER,
        Node::File {
            permissions: 0o755,
            content: Content::FromStage(stage.join(loader)),
        },
    );
    tree.symlink("lib64/ld-linux-x86-64.so.2", &format!("/{DYNAMIC_LOADER}"));
    let mut library_list = Vec::new();
    for (soname, provider) in &libraries {
        // Installed under the soname the loader asks for, in the provider's directory.
        let dir = Path::new(provider)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = format!("{dir}/{soname}");
        tree.insert(
            &path,
            Node::File {
                permissions: 0o755,
                content: Content::FromStage(stage.join(provider)),
            },
        );
        library_list.push(path);
    }
    Ok(library_list)
}

/// The kernel modules, in an order computed from each module's .modinfo depends=, with
/// the list init loads and a modules.dep; returns their paths.
fn add_modules(tree: &mut Tree, spec: &InitramfsSpec<'_>) -> Result<Vec<String>, LabError> {
    let stage = spec.stage_dir;
    let modules_root = format!("lib/modules/{}", spec.kernel_release);
    let index = index_modules(&stage.join(&modules_root))?;
    let dependencies_of = |name: &str| -> Result<Vec<String>, LabError> {
        let relative = index.get(&canonical_module_name(name)).ok_or_else(|| {
            initramfs_error(format!("kernel module {name} not in the kernel package"))
        })?;
        let bytes = read_stage_file(stage, &format!("{modules_root}/{relative}"))?;
        elf::module_dependencies(&bytes).map_err(|e| initramfs_error(format!("{relative}: {e}")))
    };
    let order = module_load_order(spec.modules, &dependencies_of)?;
    let mut module_paths = Vec::new();
    for name in &order {
        let relative = index.get(name).ok_or_else(|| {
            initramfs_error(format!("kernel module {name} not in the kernel package"))
        })?;
        add_from_stage(tree, stage, &format!("{modules_root}/{relative}"))?;
        module_paths.push(relative.clone());
    }
    let mut load_list = module_paths.join("\n");
    load_list.push('\n');
    tree.inline_file("etc/hvbench/modules.load", 0o644, load_list);
    // So that modprobe (busybox's, which reads modules.dep) can reload a module later.
    tree.inline_file(
        &format!("{modules_root}/modules.dep"),
        0o644,
        modules_dep(&order, &index, &dependencies_of)?,
    );
    Ok(module_paths)
}

/// The boot script and the accounts dropbear needs. The password field must not be
/// empty: dropbear refuses users with a blank password for every authentication method.
fn add_configuration(tree: &mut Tree, spec: &InitramfsSpec<'_>) {
    tree.inline_file("etc/hvbench/rc", 0o755, spec.rc_script);
    tree.inline_file("etc/inittab", 0o644, INITTAB);
    tree.inline_file("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n");
    tree.inline_file("etc/group", 0o644, "root:x:0:\n");
    tree.inline_file("etc/shells", 0o644, "/bin/sh\n");
    tree.inline_file("etc/hostname", 0o644, format!("{}\n", spec.hostname));
    tree.inline_file(
        "etc/dropbear/dropbear_ed25519_host_key",
        0o600,
        spec.host_key.to_vec(),
    );
    tree.inline_file(
        "root/.ssh/authorized_keys",
        0o600,
        format!("{}\n", spec.authorized_key.trim()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn needs<'a>(
        map: &'a HashMap<&'a str, Vec<&'a str>>,
    ) -> impl Fn(&str) -> Result<Vec<String>, LabError> + 'a {
        move |name| {
            Ok(map
                .get(name)
                .map(|v| v.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default())
        }
    }

    #[test]
    fn library_closure_is_transitive_and_deduplicated() {
        let graph: HashMap<&str, Vec<&str>> = HashMap::from([
            ("bin/xl", vec!["libxenlight.so", "libc.so.6"]),
            ("lib/libxenlight.so", vec!["libxenctrl.so", "libc.so.6"]),
            ("lib/libxenctrl.so", vec!["libc.so.6"]),
        ]);
        let locate = |soname: &str| {
            ["libxenlight.so", "libxenctrl.so", "libc.so.6"]
                .contains(&soname)
                .then(|| format!("lib/{soname}"))
        };
        let closure = library_closure(&["bin/xl".into()], &needs(&graph), &locate).unwrap();
        let names: Vec<&str> = closure.keys().map(String::as_str).collect();
        assert_eq!(names, ["libc.so.6", "libxenctrl.so", "libxenlight.so"]);
    }

    #[test]
    fn library_closure_names_the_missing_library_and_its_user() {
        let graph: HashMap<&str, Vec<&str>> = HashMap::from([("bin/xl", vec!["libmissing.so.1"])]);
        let error = library_closure(&["bin/xl".into()], &needs(&graph), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("libmissing.so.1"), "{error}");
        assert!(error.contains("bin/xl"), "{error}");
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        let graph: HashMap<&str, Vec<&str>> = HashMap::from([
            ("xenfs", vec!["xen-privcmd"]),
            ("virtio_net", vec!["virtio_ring", "virtio", "net_failover"]),
            ("virtio", vec!["virtio_ring"]),
            ("net_failover", vec!["failover"]),
        ]);
        let order =
            module_load_order(&["xenfs", "xen-privcmd", "virtio_net"], &needs(&graph)).unwrap();
        assert_eq!(
            order,
            [
                "xen_privcmd",
                "xenfs",
                "virtio_ring",
                "virtio",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
    }

    #[test]
    fn modules_dep_lists_every_dependency_nearest_first() {
        let graph: HashMap<&str, Vec<&str>> =
            HashMap::from([("kvm_amd", vec!["kvm", "ccp"]), ("kvm", vec!["irqbypass"])]);
        let order = module_load_order(&["kvm_amd", "virtio_ring"], &needs(&graph)).unwrap();
        assert_eq!(order, ["irqbypass", "kvm", "ccp", "kvm_amd", "virtio_ring"]);
        let paths: BTreeMap<String, String> = order
            .iter()
            .map(|m| (m.clone(), format!("kernel/{}.ko", m.replace('_', "-"))))
            .collect();
        let text = modules_dep(&order, &paths, &needs(&graph)).unwrap();
        assert_eq!(
            text,
            "kernel/irqbypass.ko:\n\
             kernel/kvm.ko: kernel/irqbypass.ko\n\
             kernel/ccp.ko:\n\
             kernel/kvm-amd.ko: kernel/ccp.ko kernel/kvm.ko kernel/irqbypass.ko\n\
             kernel/virtio-ring.ko:\n"
        );
    }

    #[test]
    fn module_cycles_are_errors() {
        let graph: HashMap<&str, Vec<&str>> = HashMap::from([("a", vec!["b"]), ("b", vec!["a"])]);
        module_load_order(&["a"], &needs(&graph)).unwrap_err();
    }

    #[test]
    fn symlinks_resolve_inside_the_stage() {
        let stage = tempfile::tempdir().unwrap();
        let root = stage.path();
        fs::create_dir_all(root.join("lib/x86_64-linux-gnu")).unwrap();
        fs::create_dir_all(root.join("lib64")).unwrap();
        fs::write(root.join("lib/x86_64-linux-gnu/libfoo.so.1.2"), b"x").unwrap();
        std::os::unix::fs::symlink(
            "libfoo.so.1.2",
            root.join("lib/x86_64-linux-gnu/libfoo.so.1"),
        )
        .unwrap();
        // Absolute targets point into the stage, never at the host.
        std::os::unix::fs::symlink(
            "/lib/x86_64-linux-gnu/libfoo.so.1",
            root.join("lib64/libfoo.so.1"),
        )
        .unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        std::os::unix::fs::symlink("../../../etc/passwd", root.join("lib64/escape")).unwrap();
        assert_eq!(
            resolve_in_stage(root, "lib/x86_64-linux-gnu/libfoo.so.1").as_deref(),
            Some("lib/x86_64-linux-gnu/libfoo.so.1.2")
        );
        assert_eq!(
            resolve_in_stage(root, "lib64/libfoo.so.1").as_deref(),
            Some("lib/x86_64-linux-gnu/libfoo.so.1.2")
        );
        assert_eq!(resolve_in_stage(root, "loop"), None);
        assert_eq!(resolve_in_stage(root, "lib64/escape"), None);
        assert_eq!(resolve_in_stage(root, "nope"), None);
    }

    #[test]
    fn images_holding_the_host_key_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("initrd.img");
        let mut tree = Tree::default();
        tree.inline_file("etc/dropbear/dropbear_ed25519_host_key", 0o600, "secret");
        tree.write(&out).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&out), 0o600);
        // A rebuild over an image an older hvbench left world-readable.
        fs::set_permissions(&out, fs::Permissions::from_mode(0o644)).unwrap();
        tree.write(&out).unwrap();
        assert_eq!(mode(&out), 0o600);
    }

    #[test]
    fn tree_adds_parent_directories_first() {
        let mut tree = Tree::default();
        tree.inline_file("a/b/c", 0o644, "x");
        tree.symlink("a-link", "a");
        let names: Vec<&str> = tree.nodes.keys().map(String::as_str).collect();
        assert_eq!(names, ["a", "a-link", "a/b", "a/b/c"]);
    }
}
