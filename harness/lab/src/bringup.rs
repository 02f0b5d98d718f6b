//! What every lab's bring-up shares: where its files live under the cache directory, the
//! cache lock, ssh keys, QEMU started on a free loopback port, and waiting for the boot
//! script's ready marker on the serial log.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use super::initramfs;
use super::packages::{self, PackageManifest};
use super::qemu::{self, QemuGuard};
use super::tools::{require_tool, run_checked, tail_lines};
use super::LabError;
use hostutil::statefile;

pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Limit for one ssh attempt while a lab boots.
const SSH_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

/// The cache directory as bring-up recorded it (canonical), so that paths compare equal
/// to those in QEMU's command line however the caller spelled it.
pub(super) fn absolute_cache_dir(cache_dir: &Path) -> PathBuf {
    cache_dir
        .canonicalize()
        .unwrap_or_else(|_| cache_dir.to_path_buf())
}

/// What stopping a lab needs of its saved state (the rest of it may not even parse).
#[derive(serde::Deserialize)]
struct QemuRef {
    qemu_pid: u32,
    qemu_pid_file: PathBuf,
}

/// Stops the QEMU of the lab whose state is in `state_file` (SIGTERM, then SIGKILL) and
/// forgets that state. True if one was running. Also stops a QEMU left by a bring-up that
/// was killed before saving its state.
pub(super) fn stop_lab(
    cache_dir: &Path,
    state_file: &Path,
    layout_of: fn(&Path) -> Layout,
) -> Result<bool, LabError> {
    let mut stopped = false;
    // A corrupt state file must not keep a QEMU alive: fall back to the pid file.
    if let Ok(Some(state)) = statefile::read_json::<QemuRef>(state_file) {
        stopped |= qemu::terminate(state.qemu_pid, &state.qemu_pid_file)?;
    }
    let pid_file = layout_of(cache_dir).pid_file;
    if let Some(pid) = qemu::read_pid_file(&pid_file) {
        stopped |= qemu::terminate(pid, &pid_file)?;
    }
    statefile::remove(state_file)?;
    Ok(stopped)
}

/// Where to ssh into a lab: root@127.0.0.1 on the forwarded port, with the lab's own key
/// and its host key pinned under `alias`.
pub(super) fn loopback_ssh_target(
    port: u16,
    key: &Path,
    known_hosts: &Path,
    alias: &str,
) -> hostutil::transport::SshTarget {
    hostutil::transport::SshTarget {
        user: "root".into(),
        host: "127.0.0.1".into(),
        port,
        identity: Some(key.to_path_buf()),
        known_hosts: Some(known_hosts.to_path_buf()),
        host_key_alias: Some(alias.into()),
    }
}
const PORT_ATTEMPTS: usize = 3;

/// Where one lab's files live under the cache directory.
pub(super) struct Layout {
    pub lock_file: PathBuf,
    pub apt_dir: PathBuf,
    pub debs_dir: PathBuf,
    pub stage_dir: PathBuf,
    pub boot_dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub build_stamp: PathBuf,
    pub keys_dir: PathBuf,
    pub client_key: PathBuf,
    pub host_key: PathBuf,
    pub known_hosts: PathBuf,
    pub run_dir: PathBuf,
    pub pid_file: PathBuf,
    pub serial_log: PathBuf,
    /// Where the hvbench-insns plugin appends its counts, when loaded.
    pub insns_log: PathBuf,
}

impl Layout {
    /// The Xen lab: downloads in `<cache>/debs` and `<cache>/apt` (its first layout),
    /// the rest under `<cache>/xen`.
    pub(crate) fn xen(cache_dir: &Path) -> Self {
        Self::build(
            cache_dir,
            "xen",
            cache_dir.join("apt"),
            cache_dir.join("debs"),
            "dom0-initramfs.cpio",
        )
    }

    /// The KVM lab: everything under `<cache>/kvm`, its own apt state included, so that
    /// it never touches what the Xen lab downloaded.
    pub(crate) fn kvm(cache_dir: &Path) -> Self {
        let kvm = cache_dir.join("kvm");
        Self::build(
            cache_dir,
            "kvm",
            kvm.join("apt"),
            kvm.join("debs"),
            "initramfs.cpio",
        )
    }

    fn build(
        cache_dir: &Path,
        kind: &str,
        apt_dir: PathBuf,
        debs_dir: PathBuf,
        initramfs_name: &str,
    ) -> Self {
        let root = cache_dir.join(kind);
        let boot_dir = root.join("boot");
        let keys_dir = root.join("keys");
        let run_dir = root.join("run");
        Self {
            lock_file: cache_dir.join(format!("{kind}-lab.lock")),
            apt_dir,
            debs_dir,
            stage_dir: root.join("stage"),
            kernel: boot_dir.join("vmlinuz"),
            initramfs: boot_dir.join(initramfs_name),
            build_stamp: boot_dir.join("build.json"),
            boot_dir,
            client_key: keys_dir.join("id_ed25519"),
            host_key: keys_dir.join("dropbear_ed25519_host_key"),
            known_hosts: keys_dir.join("known_hosts"),
            keys_dir,
            pid_file: run_dir.join("qemu.pid"),
            serial_log: run_dir.join("serial.log"),
            // In a directory of its own: the KVM lab shares it with its Linux (9p).
            insns_log: run_dir.join("insns/insns.log"),
            run_dir,
        }
    }

    pub(crate) fn package_cache(&self) -> super::packages::PackageCache {
        super::packages::PackageCache {
            apt_root: self.apt_dir.clone(),
            debs_dir: self.debs_dir.clone(),
        }
    }
}

pub(super) fn now_rfc3339() -> String {
    hostutil::rfc3339(SystemTime::now())
}

pub(super) fn check_cancelled(cancel: Option<&AtomicBool>) -> Result<(), LabError> {
    match cancel {
        Some(flag) if flag.load(Ordering::SeqCst) => Err(LabError::Interrupted),
        _ => Ok(()),
    }
}

/// A cache directory opened for bring-up: created, made absolute (QEMU chdirs to / when it
/// daemonizes, and the paths go into the state file), laid out, and locked.
pub(super) struct OpenCache {
    pub dir: PathBuf,
    pub layout: Layout,
    _lock: Flock<fs::File>,
}

pub(super) fn open_cache(
    cache_dir: &Path,
    layout_of: fn(&Path) -> Layout,
    progress: fn(&str),
) -> Result<OpenCache, LabError> {
    fs::create_dir_all(cache_dir).map_err(|e| LabError::io(cache_dir, e))?;
    let dir = cache_dir
        .canonicalize()
        .map_err(|e| LabError::io(cache_dir, e))?;
    let layout = layout_of(&dir);
    let lock = lock_cache(&layout, progress)?;
    Ok(OpenCache {
        dir,
        layout,
        _lock: lock,
    })
}

/// The checks every lab's machine options get (each lab checks its memory itself).
pub(super) fn check_machine(
    cpus: u32,
    ssh_port: Option<u16>,
    accel: super::LabAccel,
) -> Result<(), LabError> {
    let invalid = |reason: String| Err(LabError::InvalidOptions { reason });
    if cpus == 0 || cpus > 64 {
        return invalid(format!("cpus must be 1..=64, not {cpus}"));
    }
    if ssh_port == Some(0) {
        return invalid("ssh_port 0 is not a port; leave it None to pick a free one".into());
    }
    if accel == super::LabAccel::Kvm {
        if let Some(reason) = super::kvm_unusable_reason() {
            return Err(LabError::AccelUnavailable { reason });
        }
    }
    Ok(())
}

/// Checks the host tools a bring-up needs, then downloads `packages` (cached) and unpacks
/// them into the layout's staging tree.
pub(super) fn fetch_and_stage(
    layout: &Layout,
    packages: &[&str],
    size_hint: &str,
    cancel: Option<&AtomicBool>,
    progress: fn(&str),
) -> Result<PackageManifest, LabError> {
    require_tool("ssh", "openssh-client")?;
    require_tool("ssh-keygen", "openssh-client")?;
    require_tool(qemu::QEMU_BINARY, qemu::QEMU_PACKAGE)?;
    let manifest = packages::ensure_packages(&layout.package_cache(), packages, size_hint, &|m| {
        progress(m)
    })?;
    check_cancelled(cancel)?;
    packages::ensure_staging_tree(&layout.debs_dir, &manifest, &layout.stage_dir, &|m| {
        progress(m)
    })?;
    check_cancelled(cancel)?;
    Ok(manifest)
}

/// Holds the lab's lock file so two bring-ups never race over one cache.
fn lock_cache(layout: &Layout, progress: fn(&str)) -> Result<Flock<fs::File>, LabError> {
    let file = statefile::open_lock_file(&layout.lock_file)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((file, Errno::EWOULDBLOCK)) => {
            progress("waiting for another `lab up` on the same cache directory");
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, e)| LabError::io(&layout.lock_file, std::io::Error::from(e)))
        }
        Err((_, e)) => Err(LabError::io(&layout.lock_file, std::io::Error::from(e))),
    }
}

pub(super) fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

pub(super) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), LabError> {
    let mut file = fs::File::create(path).map_err(|e| LabError::io(path, e))?;
    file.write_all(bytes).map_err(|e| LabError::io(path, e))
}

/// What goes into a lab's image: its host key, and the client key it lets in.
pub(super) struct LabKeys {
    pub host_key: Vec<u8>,
    pub client_public: Vec<u8>,
}

/// The client key pair (ssh-keygen) and the lab's host key (the downloaded dropbearkey,
/// run through the downloaded loader since the host may lack its libraries); made once.
/// known_hosts pins the host key under `host_key_alias`, whatever the port.
pub(super) fn ensure_keys(layout: &Layout, host_key_alias: &str) -> Result<LabKeys, LabError> {
    fs::create_dir_all(&layout.keys_dir).map_err(|e| LabError::io(&layout.keys_dir, e))?;
    keep_private(layout)?;
    if !layout.client_key.is_file() || !layout.client_key.with_extension("pub").is_file() {
        let _ = fs::remove_file(&layout.client_key);
        let _ = fs::remove_file(layout.client_key.with_extension("pub"));
        let mut keygen = Command::new("ssh-keygen");
        keygen
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "hvbench-lab", "-f"])
            .arg(&layout.client_key);
        run_checked(&mut keygen, "ssh-keygen (lab client key)")?;
    }

    let stage = &layout.stage_dir;
    let loader = initramfs::resolve_in_stage(stage, "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        .ok_or_else(|| LabError::Packages {
            reason: "the downloaded libc6 has no ld-linux-x86-64.so.2".into(),
        })?;
    let library_path = format!(
        "{}:{}",
        stage.join("lib/x86_64-linux-gnu").display(),
        stage.join("usr/lib/x86_64-linux-gnu").display()
    );
    let dropbearkey = |arguments: &[&str]| {
        let mut command = Command::new(stage.join(&loader));
        command
            .arg("--library-path")
            .arg(&library_path)
            .arg(stage.join("usr/bin/dropbearkey"))
            .args(arguments)
            .arg(&layout.host_key);
        command
    };
    if !layout.host_key.is_file() {
        run_checked(
            &mut dropbearkey(&["-t", "ed25519", "-f"]),
            "dropbearkey (lab host key)",
        )?;
    }
    let public = run_checked(&mut dropbearkey(&["-y", "-f"]), "dropbearkey -y")?;
    let key_line = public
        .lines()
        .find(|line| line.starts_with("ssh-ed25519 "))
        .ok_or_else(|| LabError::Command {
            what: "dropbearkey -y".into(),
            detail: "printed no ssh-ed25519 public key".into(),
        })?;
    let mut fields = key_line.split_whitespace();
    let (Some(kind), Some(key)) = (fields.next(), fields.next()) else {
        return Err(LabError::Command {
            what: "dropbearkey -y".into(),
            detail: format!("unexpected public key line {key_line:?}"),
        });
    };
    write_file(
        &layout.known_hosts,
        format!("{host_key_alias} {kind} {key}\n").as_bytes(),
    )?;
    let client_public_path = layout.client_key.with_extension("pub");
    Ok(LabKeys {
        host_key: fs::read(&layout.host_key).map_err(|e| LabError::io(&layout.host_key, e))?,
        client_public: fs::read(&client_public_path)
            .map_err(|e| LabError::io(&client_public_path, e))?,
    })
}

/// Narrows what holds the lab's private keys to its owner: the keys directory, and a boot
/// image that an older hvbench left readable by all (every image holds the host key; new
/// ones are written 0600). What is not there yet is skipped.
fn keep_private(layout: &Layout) -> Result<(), LabError> {
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [(&layout.keys_dir, 0o700), (&layout.initramfs, 0o600)] {
        match fs::set_permissions(path, fs::Permissions::from_mode(mode)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(LabError::io(path, e))
            }
            _ => {}
        }
    }
    Ok(())
}

fn pick_free_port() -> Result<u16, LabError> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(|e| LabError::Qemu {
        reason: format!("cannot find a free port on 127.0.0.1: {e}"),
    })?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|e| LabError::Qemu {
            reason: format!("cannot find a free port on 127.0.0.1: {e}"),
        })
}

/// Starts QEMU with `start(port)`, retrying on another port when a picked port was taken
/// in the meantime. Returns (pid, port, the guard that kills it, when it started).
pub(super) fn start_qemu(
    layout: &Layout,
    ssh_port: Option<u16>,
    start: &dyn Fn(u16) -> Result<u32, LabError>,
) -> Result<(u32, u16, QemuGuard, Instant), LabError> {
    let mut last_error = None;
    for _ in 0..PORT_ATTEMPTS {
        let port = match ssh_port {
            Some(port) => port,
            None => pick_free_port()?,
        };
        let started = Instant::now();
        match start(port) {
            Ok(pid) => {
                return Ok((pid, port, QemuGuard::new(pid, &layout.pid_file), started));
            }
            Err(LabError::Qemu { reason })
                if ssh_port.is_none() && reason.contains("forwarding") =>
            {
                last_error = Some(LabError::Qemu { reason });
            }
            Err(error) => return Err(error),
        }
    }
    Err(last_error.unwrap_or(LabError::Qemu {
        reason: "could not start QEMU".into(),
    }))
}

pub(super) fn serial_text(layout: &Layout) -> String {
    fs::read(&layout.serial_log)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// A boot failure of the lab called `lab` ("Xen", "KVM"), with the serial log's telling
/// lines.
pub(super) fn boot_failed(layout: &Layout, lab: &str, reason: impl Into<String>) -> LabError {
    let serial = serial_text(layout);
    // The boot script's own failure lines say most; then the end of the log.
    let mut tail: Vec<&str> = serial
        .lines()
        .filter(|line| line.contains("hvbench-lab: FAILED"))
        .collect();
    let last = tail_lines(&serial, 15);
    tail.extend(last.lines());
    LabError::BootFailed {
        lab: lab.to_string(),
        reason: reason.into(),
        serial_log: layout.serial_log.clone(),
        serial_tail: tail.join("\n"),
    }
}

/// How a bring-up watches its machine boot.
pub(super) struct BootWatch<'a> {
    pub layout: &'a Layout,
    /// "Xen" or "KVM", for messages.
    pub lab: &'a str,
    pub pid: u32,
    pub deadline: Instant,
    pub boot_timeout: Duration,
    pub cancel: Option<&'a AtomicBool>,
}

impl BootWatch<'_> {
    /// Fails when cancelled, when QEMU is gone, or past the deadline.
    pub(crate) fn check(&self, waiting_for: &str) -> Result<(), LabError> {
        check_cancelled(self.cancel)?;
        if !qemu::is_our_qemu(self.pid, &self.layout.pid_file) {
            return Err(boot_failed(self.layout, self.lab, "QEMU exited"));
        }
        if Instant::now() >= self.deadline {
            return Err(boot_failed(
                self.layout,
                self.lab,
                format!("{waiting_for} within {} s", self.boot_timeout.as_secs()),
            ));
        }
        Ok(())
    }

    /// Retries `attempt` (given the time it may take) until it answers, while the boot
    /// lasts; an ssh failure is retried, any other error ends the wait.
    pub(crate) fn wait_for_ssh<T>(
        &self,
        what: &str,
        mut attempt: impl FnMut(Duration) -> Result<T, LabError>,
    ) -> Result<T, LabError> {
        let mut last_error = String::new();
        loop {
            self.check(&format!(
                "{what} over ssh did not answer (last error: {last_error})"
            ))?;
            let remaining = self.deadline.saturating_duration_since(Instant::now());
            match attempt(SSH_ATTEMPT_TIMEOUT.min(remaining)) {
                Err(LabError::Ssh { reason }) => last_error = reason,
                answer => return answer,
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits for the boot script's `marker` line on the serial log.
    pub(crate) fn wait_for_marker(&self, marker: &str) -> Result<(), LabError> {
        loop {
            let serial = serial_text(self.layout);
            if serial.contains(marker) {
                return Ok(());
            }
            if let Some(line) = qemu::fatal_boot_line(&serial) {
                return Err(boot_failed(
                    self.layout,
                    self.lab,
                    format!("crashed: {}", line.trim()),
                ));
            }
            self.check(&format!("no {marker} line"))?;
            thread::sleep(POLL_INTERVAL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn keys_and_an_old_world_readable_image_become_private() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::kvm(dir.path());
        fs::create_dir_all(&layout.keys_dir).unwrap();
        // Nothing built yet: nothing to narrow, no error.
        keep_private(&layout).unwrap();
        assert_eq!(mode(&layout.keys_dir), 0o700);
        fs::create_dir_all(&layout.boot_dir).unwrap();
        fs::write(&layout.initramfs, b"an image with a host key").unwrap();
        fs::set_permissions(&layout.initramfs, fs::Permissions::from_mode(0o644)).unwrap();
        keep_private(&layout).unwrap();
        assert_eq!(mode(&layout.initramfs), 0o600);
    }
}
