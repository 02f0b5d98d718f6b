//! The domain's files (guest image, console file) on the host whose hypervisor opens
//! them: a private directory here for a local libvirt, or one made over SSH on the host a
//! remote URI names (`qemu+ssh://`), or in the dom0 virsh runs in. The image is copied
//! once per run; the console file is followed where it is written (a local file read as
//! it grows, or `tail -f` over SSH, then the rest fetched by offset once libvirt says the
//! domain stopped). Everything is removed on every path: each boot's files with its
//! session, the directory with the backend.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Mutex;
use std::time::Duration;

use hostutil::transport::{shell_quote, Transport, TransportError};

use super::remote::FilesHost;
use super::LibvirtError;
use crate::backend::qemu::tempfile_dir::TempDir;
use crate::guest_image::GuestImage;

/// Limit for one file operation on a remote host (the image is a few hundred KiB).
const REMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the files are.
#[derive(Debug)]
enum Place {
    Local(TempDir),
    /// `host` is kept for its pinned host key, which the removal still needs.
    Remote {
        host: FilesHost,
        dir: String,
    },
}

/// The backend's directory of domain files.
#[derive(Debug)]
pub struct Files {
    place: Place,
    /// Images already copied there (by file name, which carries their hash).
    images: Mutex<HashSet<String>>,
}

fn files_error(dir: &str, source: std::io::Error) -> LibvirtError {
    LibvirtError::Files {
        dir: PathBuf::from(dir),
        source,
    }
}

/// Runs an idempotent `command` on `transport`, again while SSH could not reach the host
/// (a TCG dom0's sshd drops a fresh connection now and then).
fn run_remote(
    transport: &Transport,
    command: &str,
    input: Option<&[u8]>,
) -> Result<std::process::Output, TransportError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match transport.run(command, input, REMOTE_TIMEOUT) {
            Err(TransportError::Unreachable { .. }) if tries < LINK_TRIES => {
                std::thread::sleep(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

/// Tries of a remote file command whose link failed.
const LINK_TRIES: u32 = 5;

fn remote_error(e: TransportError) -> LibvirtError {
    LibvirtError::RemoteFiles(e.to_string())
}

/// A directory name `mktemp -d` made: absolute, and nothing a shell or XML would read.
fn plain_dir(text: &str) -> Option<&str> {
    let dir = text.trim();
    let ok = dir.starts_with("/tmp/hvbench-libvirt.")
        && dir.len() < 128
        && dir
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._".contains(&b));
    ok.then_some(dir)
}

/// Where a run's directory goes on another host (`mktemp -d` adds `.XXXXXXXX`).
const REMOTE_BASE: &str = "/tmp/hvbench-libvirt";

/// Removes the directories killed runs of this machine left on the host `transport`
/// reaches (their domains went with `stale::sweep_domains`), and says so.
fn sweep_remote(transport: &Transport) {
    let glob = format!("{REMOTE_BASE}.*");
    match crate::backend::stale::sweep(transport, &glob, &crate::backend::stale::remove_dir_only) {
        Ok(said) => said.iter().for_each(|m| crate::say!("hvbench: {m}")),
        Err(e) => crate::say!("hvbench: warning: looking for what killed runs left: {e}"),
    }
}

impl Files {
    /// A private directory on this machine, readable by the user QEMU runs as.
    pub fn local() -> Result<Self, LibvirtError> {
        let dir = TempDir::new("hvbench-libvirt")
            .map_err(|e| files_error(&std::env::temp_dir().display().to_string(), e))?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .map_err(|e| files_error(&dir.path().display().to_string(), e))?;
        Ok(Files {
            place: Place::Local(dir),
            images: Mutex::new(HashSet::new()),
        })
    }

    /// A private directory made on the host `host` reaches.
    pub fn remote(host: FilesHost) -> Result<Self, LibvirtError> {
        let transport = &host.transport;
        sweep_remote(transport);
        // Not retried: a mktemp that ran before its link dropped would leave a directory.
        // Its owner file lets the next run remove it if this one is killed.
        let owner = crate::backend::stale::write_owner_file();
        let out = transport
            .run(
                &format!(
                    "d=$(mktemp -d {REMOTE_BASE}.XXXXXXXX) && chmod 755 \"$d\"{owner} && echo \"$d\""
                ),
                None,
                REMOTE_TIMEOUT,
            )
            .map_err(remote_error)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(dir) = plain_dir(&text) else {
            return Err(LibvirtError::RemoteFiles(format!(
                "mktemp on {} gave an unexpected directory name",
                transport.describe()
            )));
        };
        let dir = dir.to_string();
        Ok(Files {
            place: Place::Remote { host, dir },
            images: Mutex::new(HashSet::new()),
        })
    }

    pub fn dir(&self) -> &str {
        match &self.place {
            Place::Local(dir) => dir.path().to_str().unwrap_or("/"),
            Place::Remote { dir, .. } => dir,
        }
    }

    /// The path of `name` in the directory, as the hypervisor's host sees it.
    pub fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.dir())
    }

    /// Whether the files are on another host.
    pub fn transport(&self) -> Option<&Transport> {
        match &self.place {
            Place::Local(_) => None,
            Place::Remote { host, .. } => Some(&host.transport),
        }
    }

    /// Puts the guest image there (once per image) and returns its path.
    pub fn put_image(&self, image: &GuestImage) -> Result<String, LibvirtError> {
        let name = format!("hvbench-guest-{}.elf", &image.sha256()[..12]);
        let path = self.path(&name);
        let mut images = self.images.lock().unwrap_or_else(|p| p.into_inner());
        if images.contains(&name) {
            return Ok(path);
        }
        match &self.place {
            Place::Local(_) => {
                std::fs::write(&path, image.bytes())
                    .and_then(|()| {
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                    })
                    .map_err(|e| files_error(self.dir(), e))?;
            }
            Place::Remote { host, .. } => {
                let quoted = shell_quote(&path);
                let command = format!("cat > {quoted} && chmod 644 {quoted}");
                run_remote(&host.transport, &command, Some(image.bytes())).map_err(remote_error)?;
            }
        }
        images.insert(name);
        Ok(path)
    }

    /// Removes `paths` (a boot's console file; a domain's log): best effort, as on every
    /// exit path.
    pub fn remove(&self, paths: &[String]) {
        match &self.place {
            Place::Local(_) => {
                for path in paths {
                    let _ = std::fs::remove_file(path);
                }
            }
            Place::Remote { host, .. } => {
                let quoted: Vec<String> = paths.iter().map(|p| shell_quote(p)).collect();
                let command = format!("rm -f -- {}", quoted.join(" "));
                let _ = run_remote(&host.transport, &command, None);
            }
        }
    }

    /// Starts following the console file at `path`.
    pub fn follow(&self, path: &str) -> Result<Console, String> {
        match &self.place {
            Place::Local(_) => open_when_there(path)
                .map(Console::Local)
                .map_err(|e| format!("cannot read the console file {path}: {e}")),
            Place::Remote { host, .. } => RemoteConsole::start(&host.transport, path)
                .map(|c| Console::Remote(Box::new(c)))
                .map_err(|e| format!("cannot follow the console file {path}: {e}")),
        }
    }
}

/// Opens `path`, waiting up to `APPEAR_LIMIT` for it to appear (xenconsoled makes a
/// domain's console log only once it has seen the domain).
fn open_when_there(path: &str) -> std::io::Result<std::fs::File> {
    let started = std::time::Instant::now();
    loop {
        match std::fs::File::open(path) {
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && started.elapsed() < APPEAR_LIMIT =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// How long a console file may take to appear after the domain started.
const APPEAR_LIMIT: Duration = Duration::from_secs(10);
/// After the domain stopped, a remote console counts as complete once a fetch this long
/// after the last one brings nothing (xenconsoled writes its log a moment after the
/// guest wrote its ring).
const SETTLE: Duration = Duration::from_millis(300);
/// Fetches at most after the domain stopped.
const MAX_FETCHES: u32 = 5;

impl Drop for Files {
    fn drop(&mut self) {
        if let Place::Remote { host, dir } = &self.place {
            if plain_dir(dir).is_some() {
                let _ = run_remote(
                    &host.transport,
                    &format!("rm -rf -- {}", shell_quote(dir)),
                    None,
                );
            }
        }
    }
}

/// A console file being followed.
#[derive(Debug)]
pub enum Console {
    Local(std::fs::File),
    Remote(Box<RemoteConsole>),
}

impl Console {
    /// What was written since the last read (empty when nothing new), never blocking.
    pub fn read_new(&mut self, buf: &mut [u8]) -> Vec<u8> {
        match self {
            Console::Local(file) => {
                let n = file.read(buf).unwrap_or(0);
                buf[..n].to_vec()
            }
            Console::Remote(remote) => remote.read_new(),
        }
    }

    /// The domain has stopped: whatever QEMU wrote that has not been read yet, up to
    /// `limit` bytes. (A local file is simply read to its end.)
    pub fn finish(&mut self, limit: u64) -> Vec<u8> {
        match self {
            Console::Local(_) => Vec::new(),
            Console::Remote(remote) => remote.finish(limit),
        }
    }
}

/// `tail -f` of a console file over SSH. The remote shell kills its `tail` when hvbench
/// closes its stdin (or its SSH connection goes), so nothing is left running there.
#[derive(Debug)]
pub struct RemoteConsole {
    transport: Transport,
    path: String,
    child: Child,
    stdin: Option<ChildStdin>,
    chunks: Receiver<Vec<u8>>,
    received: u64,
    /// How often the `tail` was started again after its link dropped.
    restarts: u32,
    /// `finish` ran: the `tail` is stopped for good.
    finished: bool,
}

/// Restarts of a remote console's `tail` allowed per boot.
const MAX_RESTARTS: u32 = 20;

impl RemoteConsole {
    fn start(transport: &Transport, path: &str) -> Result<Self, TransportError> {
        let (child, stdin, chunks) = Self::tail(transport, path, 0)?;
        Ok(RemoteConsole {
            transport: transport.clone(),
            path: path.to_string(),
            child,
            stdin,
            chunks,
            received: 0,
            restarts: 0,
            finished: false,
        })
    }

    /// `tail -F` of `path` from byte `from` (0-based) over the transport, read by a thread.
    #[allow(clippy::type_complexity)]
    fn tail(
        transport: &Transport,
        path: &str,
        from: u64,
    ) -> Result<(Child, Option<ChildStdin>, Receiver<Vec<u8>>), TransportError> {
        // -F: the file may appear only after the domain started (xenconsoled's log).
        let command = format!(
            "tail -c +{} -F {} 2>/dev/null & t=$!; cat >/dev/null; kill $t",
            from + 1,
            shell_quote(path)
        );
        let mut child = transport.spawn(&command, true)?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, rx) = std::sync::mpsc::sync_channel(64);
        std::thread::spawn(move || {
            let Some(mut out) = stdout else { return };
            let mut buf = [0u8; 16384];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Ok((child, stdin, rx))
    }

    fn read_new(&mut self) -> Vec<u8> {
        match self.chunks.try_recv() {
            Ok(bytes) => {
                self.received += bytes.len() as u64;
                bytes
            }
            Err(TryRecvError::Empty) => Vec::new(),
            // The link dropped (or never came up): follow again from the first byte not
            // yet received, a bounded number of times.
            Err(TryRecvError::Disconnected) => {
                if !self.finished && self.restarts < MAX_RESTARTS {
                    self.restarts += 1;
                    self.stop_tail();
                    std::thread::sleep(Duration::from_millis(200));
                    if let Ok((child, stdin, chunks)) =
                        Self::tail(&self.transport, &self.path, self.received)
                    {
                        self.child = child;
                        self.stdin = stdin;
                        self.chunks = chunks;
                    }
                }
                Vec::new()
            }
        }
    }

    /// Closes the shell's stdin (it then kills its `tail` and exits); kills it only if
    /// it has not gone within a second.
    fn stop_tail(&mut self) {
        self.stdin.take();
        for _ in 0..100 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the `tail`, then fetches the file from the first byte not yet received.
    fn finish(&mut self, limit: u64) -> Vec<u8> {
        self.finished = true;
        self.stop_tail();
        let mut rest = Vec::new();
        while let Ok(bytes) = self.chunks.recv_timeout(Duration::from_millis(200)) {
            self.received += bytes.len() as u64;
            rest.extend_from_slice(&bytes);
        }
        for fetch in 0..MAX_FETCHES {
            if fetch > 0 {
                std::thread::sleep(SETTLE);
            }
            let allowed = limit.saturating_sub(rest.len() as u64);
            let command = format!(
                "tail -c +{} {} | head -c {allowed}",
                self.received + 1,
                shell_quote(&self.path)
            );
            match run_remote(&self.transport, &command, None) {
                Ok(out) if !out.stdout.is_empty() && allowed > 0 => {
                    self.received += out.stdout.len() as u64;
                    rest.extend_from_slice(&out.stdout);
                }
                _ => break,
            }
        }
        rest
    }
}

impl Drop for RemoteConsole {
    fn drop(&mut self) {
        self.stop_tail();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_mktemp_directory_is_taken() {
        assert_eq!(
            plain_dir("/tmp/hvbench-libvirt.AbC123xy\n"),
            Some("/tmp/hvbench-libvirt.AbC123xy")
        );
        for bad in [
            "",
            "/",
            "/tmp/other.AbC",
            "/tmp/hvbench-libvirt.a b",
            "/tmp/hvbench-libvirt.a;rm -rf /",
            "/tmp/hvbench-libvirt.'x'",
        ] {
            assert_eq!(plain_dir(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_remote_console_is_followed_then_finished_by_offset() {
        // `Transport::Local` stands in for SSH: the same shell commands run here.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.console");
        std::fs::write(&path, b"first\n").unwrap();
        let path = path.to_str().unwrap().to_string();
        let mut console = RemoteConsole::start(&Transport::Local, &path).unwrap();
        let mut seen = Vec::new();
        let started = std::time::Instant::now();
        while seen.len() < 6 && started.elapsed() < Duration::from_secs(10) {
            seen.extend(console.read_new());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(seen, b"first\n");
        // Written after the tail is stopped: fetched by offset.
        console.stop_tail();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"second\nthird\n"))
            .unwrap();
        seen.extend(console.finish(7));
        assert_eq!(seen, b"first\nsecond\n");
        // Finished: no tail is started again.
        assert!(console.read_new().is_empty());
        assert_eq!(console.restarts, 0);
    }

    #[test]
    fn a_dropped_console_link_follows_again_from_the_first_byte_not_received() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.console");
        std::fs::write(&path, b"first\n").unwrap();
        let path = path.to_str().unwrap().to_string();
        let mut console = RemoteConsole::start(&Transport::Local, &path).unwrap();
        let read_until = |console: &mut RemoteConsole, seen: &mut Vec<u8>, len: usize| {
            let started = std::time::Instant::now();
            while seen.len() < len && started.elapsed() < Duration::from_secs(10) {
                seen.extend(console.read_new());
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let mut seen = Vec::new();
        read_until(&mut console, &mut seen, 6);
        // The link drops: its tail is gone; the guest writes on.
        console.stop_tail();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"second\n"))
            .unwrap();
        read_until(&mut console, &mut seen, 13);
        assert_eq!(seen, b"first\nsecond\n");
        assert_eq!(console.restarts, 1);
    }
}
