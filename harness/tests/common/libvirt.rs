//! The libvirt daemons the libvirt tests need: the running ones where libvirt already
//! answers on its standard socket, else libvirtd and virtlogd started here (these
//! machines have no service manager) and stopped again when the fixture is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::required;

pub const URI: &str = "qemu:///system";
/// The first connection probes QEMU's capabilities (8.6 s here on a cold cache).
const READY_LIMIT: Duration = Duration::from_secs(60);

/// Daemons this fixture started (none when libvirt was already running).
pub struct Daemons {
    started: Vec<(&'static str, Child)>,
    _logs: tempfile::TempDir,
}

fn answers() -> bool {
    Command::new("virsh")
        .args(["-q", "-c", URI, "version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Why the daemons cannot be started here, if so.
fn missing() -> Option<String> {
    if !super::on_path("virsh") {
        return Some("virsh is not installed (Debian's libvirt-clients)".into());
    }
    for daemon in ["libvirtd", "virtlogd"] {
        if !Path::new("/usr/sbin").join(daemon).exists() && !super::on_path(daemon) {
            return Some(format!(
                "{daemon} is not installed (Debian's libvirt-daemon)"
            ));
        }
    }
    if !nix::unistd::Uid::effective().is_root() {
        return Some("starting libvirt's system daemons needs root".into());
    }
    if nix::unistd::User::from_name("libvirt-qemu")
        .ok()
        .flatten()
        .is_none()
    {
        return Some(
            "the user libvirt-qemu, which libvirt's QEMU driver runs guests as, is missing \
             (ci/test.sh creates it)"
                .into(),
        );
    }
    None
}

impl Daemons {
    /// libvirt on its standard socket, started here if it is not running. `None` (the
    /// test returns) where libvirt is missing, unless HVBENCH_REQUIRE_LIBVIRT=1.
    pub fn ensure() -> Option<Daemons> {
        let logs = tempfile::tempdir().unwrap();
        if answers() {
            return Some(Daemons {
                started: Vec::new(),
                _logs: logs,
            });
        }
        if let Some(why) = missing() {
            assert!(
                !required("HVBENCH_REQUIRE_LIBVIRT"),
                "{why}, and HVBENCH_REQUIRE_LIBVIRT=1"
            );
            eprintln!("notice: {why}; skipping this test");
            return None;
        }
        for dir in ["/var/log/libvirt", "/run/libvirt", "/var/lib/libvirt/qemu"] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let mut daemons = Daemons {
            started: Vec::new(),
            _logs: logs,
        };
        for name in ["virtlogd", "libvirtd"] {
            let child = daemons.spawn(name);
            daemons.started.push((name, child));
        }
        let started = Instant::now();
        while !answers() {
            let exited = daemons
                .started
                .iter_mut()
                .find_map(|(name, child)| Some((*name, child.try_wait().ok()??)));
            if let Some((name, status)) = exited {
                panic!("{name} exited ({status}): {}", daemons.log(name));
            }
            assert!(
                started.elapsed() < READY_LIMIT,
                "libvirt did not answer within {READY_LIMIT:?}: {}",
                daemons.log("libvirtd")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(daemons)
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self._logs.path().join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    fn spawn(&self, name: &str) -> Child {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        Command::new(name)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
    }

    /// Whether this fixture started the daemons (and will stop them).
    pub fn started_here(&self) -> bool {
        !self.started.is_empty()
    }
}

impl Drop for Daemons {
    /// Stops what it started, libvirtd first (it holds virtlogd's clients), by pid.
    fn drop(&mut self) {
        for (_, child) in self.started.iter_mut().rev() {
            let pid = Pid::from_raw(child.id().cast_signed());
            let _ = kill(pid, Signal::SIGTERM);
            let asked = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && asked.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Names of the domains libvirt has (running or defined).
pub fn domains() -> Vec<String> {
    let out = Command::new("virsh")
        .args(["-q", "-c", URI, "list", "--all", "--name"])
        .output()
        .unwrap();
    assert!(out.status.success(), "virsh list failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// An sshd on 127.0.0.1 that only this fixture's key opens, for `qemu+ssh://` tests: its
/// own host key, authorized keys and port (the standard sshd, if any, is left alone).
/// Stopped (by pid) and its files removed when dropped.
pub struct Sshd {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Sshd {
    /// `None` (the test returns) where sshd or ssh-keygen is missing, unless
    /// HVBENCH_REQUIRE_LIBVIRT=1 (ci/test.sh installs openssh-server).
    pub fn start() -> Option<Sshd> {
        let sshd = Path::new("/usr/sbin/sshd");
        if !sshd.exists() || !super::on_path("ssh-keygen") || !super::on_path("ssh-keyscan") {
            let why = "sshd is not installed (Debian's openssh-server)";
            assert!(
                !required("HVBENCH_REQUIRE_LIBVIRT"),
                "{why}, and HVBENCH_REQUIRE_LIBVIRT=1"
            );
            eprintln!("notice: {why}; skipping this test");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        for key in ["host_key", "id"] {
            let status = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(path(key))
                .status()
                .unwrap();
            assert!(status.success(), "ssh-keygen failed");
        }
        std::fs::copy(path("id.pub"), path("authorized_keys")).unwrap();
        // libvirt's own ssh, with no_verify, would add the host key to the user's
        // known_hosts: this wrapper (the URI's `command=`) keeps it out.
        std::fs::write(
            path("ssh"),
            "#!/bin/sh\nexec ssh -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \"$@\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path("ssh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        // A free port: the kernel's pick, released just before sshd binds it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nPidFile none\nStrictModes no\n",
            path("host_key").display(),
            path("authorized_keys").display()
        );
        std::fs::write(path("sshd_config"), config).unwrap();
        // sshd's privilege separation directory (a service manager would make it).
        std::fs::create_dir_all("/run/sshd").unwrap();
        let log = std::fs::File::create(path("sshd.log")).unwrap();
        let child = Command::new(sshd)
            .args(["-D", "-e", "-f"])
            .arg(path("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut sshd = Sshd { child, dir, port };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = sshd.child.try_wait() {
                panic!("sshd exited ({status}): {}", sshd.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "sshd did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(sshd)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// `qemu+ssh://root@127.0.0.1:PORT/system` with this fixture's key.
    pub fn uri(&self) -> String {
        let path = |name: &str| self.dir.path().join(name).display().to_string();
        format!(
            "qemu+ssh://root@127.0.0.1:{}/system?keyfile={}&no_verify=1&command={}",
            self.port,
            path("id"),
            path("ssh")
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = kill(
            Pid::from_raw(self.child.id().cast_signed()),
            Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}
