//! Our VMM as a plain process (`hvbench vmm`): boot the guest with a command line, copy
//! its console to stdout, and end with its status. For debugging guests and timing the
//! VMM's start; `mem.ksm` drives such processes through the doorbell.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::backend::kvm::{KvmBackend, VmmError};
use crate::backend::{BackendError, BootRequest, GuestEnd, GuestMessage, Hypervisor};
use crate::guest_image::{GuestImage, ImageError};

/// What `hvbench vmm` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// The guest's command line.
    pub cmdline: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest image to boot instead of the one built into hvbench.
    pub guest: Option<PathBuf>,
    /// How long the guest may run before it is stopped.
    pub timeout: Duration,
    /// Mark guest RAM MADV_MERGEABLE (KSM may merge it).
    pub mergeable: bool,
    /// Read `ring N` lines from stdin; end of input stops the guest.
    pub doorbell_stdin: bool,
    /// vCPUs (more than one: KVM's in-kernel irqchip, APs started by the guest).
    pub vcpus: u32,
}

#[derive(Debug, Error)]
pub enum StandaloneError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("starting the doorbell reader: {0}")]
    Doorbell(std::io::Error),
    #[error("writing the guest's console to stdout: {0}")]
    Stdout(std::io::Error),
}

/// What `hvbench vmm --doorbell-stdin` understands on stdin: `ring N`.
pub fn parse_doorbell_line(line: &str) -> Option<u32> {
    let mut words = line.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("ring"), Some(value), None) => value.parse().ok(),
        _ => None,
    }
}

/// Exit status of `hvbench vmm` when the guest ran past `--timeout-s`.
pub const EXIT_VMM_TIMEOUT: i32 = 124;
/// Exit status of `hvbench vmm` when the guest died without an exit code, or the
/// doorbell's input ended first.
pub const EXIT_VMM_NO_STATUS: i32 = 125;

/// Boots the guest and pumps its console to stdout until it ends; returns the exit status
/// (the guest's exit code, [`EXIT_VMM_TIMEOUT`] or [`EXIT_VMM_NO_STATUS`]).
pub fn run(options: &Options) -> Result<i32, StandaloneError> {
    let image = GuestImage::load(options.guest.as_deref())?;
    // No fingerprint: it would only delay the boot being timed.
    let backend = KvmBackend::new(reports::record::HostInfo::default())?
        .with_mergeable_memory(options.mergeable)
        .with_vcpus(options.vcpus);
    let input_ended = Arc::new(AtomicBool::new(false));
    if options.doorbell_stdin {
        spawn_doorbell_reader(&backend, input_ended.clone())?;
    }
    let mut session = backend.boot(&BootRequest {
        image: &image,
        cmdline: &options.cmdline,
        memory_mib: options.memory_mib,
        vcpus: options.vcpus,
        name: "vmm".into(),
    })?;
    let code = pump(session.as_ref(), options.timeout, &input_ended);
    session.stop()?;
    code
}

/// Reads `ring N` lines from stdin into the doorbell; sets `ended` at end of input.
fn spawn_doorbell_reader(
    backend: &KvmBackend,
    ended: Arc<AtomicBool>,
) -> Result<(), StandaloneError> {
    let doorbell = backend.doorbell();
    std::thread::Builder::new()
        .name("doorbell-stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                match parse_doorbell_line(&line) {
                    Some(value) => doorbell.ring(value),
                    None => crate::say!("hvbench: vmm: ignored doorbell input {line:?}"),
                }
            }
            ended.store(true, Ordering::Release);
        })
        .map(drop)
        .map_err(StandaloneError::Doorbell)
}

/// Copies the guest's console to stdout until it ends, the time is up or the doorbell's
/// input ends; returns the exit status.
fn pump(
    session: &dyn crate::backend::GuestSession,
    timeout: Duration,
    input_ended: &AtomicBool,
) -> Result<i32, StandaloneError> {
    let deadline = Instant::now() + timeout;
    let stdout = std::io::stdout();
    let mut sink = ConsoleSink::new(stdout.is_terminal(), stdout.lock());
    loop {
        if input_ended.load(Ordering::Acquire) {
            crate::say!("hvbench: vmm: the doorbell's input ended; stopping the guest");
            return Ok(EXIT_VMM_NO_STATUS);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            crate::say!("hvbench: guest stopped after {} s", timeout.as_secs());
            return Ok(EXIT_VMM_TIMEOUT);
        }
        // Wake at least every 100 ms to look at the doorbell's input.
        match session
            .messages()
            .recv_timeout(left.min(Duration::from_millis(100)))
        {
            Ok(GuestMessage::Console { bytes, .. }) => {
                sink.write(&bytes).map_err(StandaloneError::Stdout)?;
            }
            Ok(GuestMessage::Notice(text)) => crate::say!("hvbench: {text}"),
            Ok(GuestMessage::Ended(GuestEnd::Exited { code })) => return Ok(code.cast_signed()),
            Ok(GuestMessage::Ended(end)) => {
                crate::say!("hvbench: guest ended: {end:?}");
                return Ok(EXIT_VMM_NO_STATUS);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                crate::say!("hvbench: the vCPU stopped without saying how the guest ended");
                return Ok(EXIT_VMM_NO_STATUS);
            }
        }
    }
}

/// Where the guest's console goes. A pipe gets the bytes as the guest wrote them (the
/// reader decodes them with its own bounds, as `mem.ksm` does); a terminal gets whole
/// lines with every character a terminal could act on escaped, so that a guest cannot
/// move the cursor, retitle the window or hide text.
struct ConsoleSink<W: Write> {
    out: W,
    lines: Option<crate::console::LineAssembler>,
}

impl<W: Write> ConsoleSink<W> {
    fn new(terminal: bool, out: W) -> Self {
        let lines = terminal.then(crate::console::LineAssembler::new);
        ConsoleSink { out, lines }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.lines {
            None => self.out.write_all(bytes)?,
            Some(lines) => {
                for line in lines.push(bytes) {
                    let text = match line {
                        crate::console::ConsoleLine::Line(bytes) => bytes,
                        crate::console::ConsoleLine::Overlong { head, .. } => head,
                    };
                    let text = crate::console::escape_text(&String::from_utf8_lossy(&text));
                    writeln!(self.out, "{text}")?;
                }
            }
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_lines() {
        assert_eq!(parse_doorbell_line("ring 1"), Some(1));
        assert_eq!(parse_doorbell_line("  ring   4294967295 "), Some(u32::MAX));
        assert_eq!(parse_doorbell_line("ring"), None);
        assert_eq!(parse_doorbell_line("ring -1"), None);
        assert_eq!(parse_doorbell_line("ring 1 2"), None);
        assert_eq!(parse_doorbell_line("ring 4294967296"), None);
        assert_eq!(parse_doorbell_line("knock 1"), None);
    }

    #[test]
    fn a_terminal_gets_escaped_lines_and_a_pipe_the_bytes() {
        let hostile = b"@hvb1 ok\n\x1b]0;owned\x07title\r\n\x1b[2Jpartial";
        let mut terminal = ConsoleSink::new(true, Vec::new());
        terminal.write(hostile).unwrap();
        let shown = String::from_utf8(terminal.out).unwrap();
        assert_eq!(shown, "@hvb1 ok\n\\u{1b}]0;owned\\u{7}title\\r\n");
        assert!(!shown.contains('\x1b'));
        let mut pipe = ConsoleSink::new(false, Vec::new());
        pipe.write(hostile).unwrap();
        assert_eq!(pipe.out, hostile);
    }
}
