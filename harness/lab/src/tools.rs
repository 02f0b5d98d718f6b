//! Host programs the lab shells out to: presence checks with the package to install, and
//! running them with their output captured and an overall deadline.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::LabError;

/// Finds `tool` on PATH (or takes it as a path when it contains a slash).
pub(crate) fn find_tool(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        let path = PathBuf::from(tool);
        return is_executable(&path).then_some(path);
    }
    let search_path = std::env::var_os("PATH")?;
    std::env::split_paths(&search_path)
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Fails with one sentence naming the Debian package when `tool` is missing.
pub(crate) fn require_tool(tool: &str, package: &str) -> Result<PathBuf, LabError> {
    find_tool(tool).ok_or_else(|| LabError::MissingTool {
        tool: tool.to_string(),
        package: package.to_string(),
    })
}

/// The last few lines of a program's output, for error messages.
pub(crate) fn tail_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// Runs to completion; a non-zero exit becomes an error carrying the end of its stderr.
pub(crate) fn run_checked(command: &mut Command, what: &str) -> Result<String, LabError> {
    run_checked_bytes(command, what).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// As `run_checked`, for a program whose stdout is binary.
pub(crate) fn run_checked_bytes(command: &mut Command, what: &str) -> Result<Vec<u8>, LabError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            what: what.to_string(),
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(LabError::Command {
            what: what.to_string(),
            detail: format!("{}: {}", output.status, tail_lines(&stderr, 8)),
        });
    }
    Ok(output.stdout)
}

/// Runs `command` feeding it `stdin`, collecting stdout and stderr, and kills it when it
/// is still running after `timeout`. `Ok(None)` means it timed out.
pub(crate) fn run_with_timeout(
    command: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<Option<Output>> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    // Pipes are drained on threads so a chatty child cannot block on a full pipe.
    let writer = match (child.stdin.take(), stdin) {
        (Some(mut pipe), Some(bytes)) => {
            let bytes = bytes.to_vec();
            Some(thread::spawn(move || {
                // A child that exits early closes the pipe; its status reports that.
                let _ = pipe.write_all(&bytes);
            }))
        }
        _ => None,
    };
    let stdout_reader = child.stdout.take().map(spawn_reader);
    let stderr_reader = child.stderr.take().map(spawn_reader);

    let status = wait_until(&mut child, Instant::now() + timeout)?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return Ok(None);
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    let stdout = stdout_reader
        .and_then(|r| r.join().ok())
        .unwrap_or_default();
    let stderr = stderr_reader
        .and_then(|r| r.join().ok())
        .unwrap_or_default();
    Ok(Some(Output {
        status,
        stdout,
        stderr,
    }))
}

fn spawn_reader<R: Read + Send + 'static>(mut pipe: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = pipe.read_to_end(&mut buffer);
        buffer
    })
}

fn wait_until(child: &mut Child, deadline: Instant) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_reports_missing_tools() {
        assert!(find_tool("sh").is_some());
        let error = require_tool("hvbench-no-such-tool", "hvbench-pkg").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("hvbench-no-such-tool"), "{message}");
        assert!(message.contains("hvbench-pkg"), "{message}");
    }

    #[test]
    fn timeout_kills_a_slow_child() {
        let started = Instant::now();
        let result = run_with_timeout(
            Command::new("sleep").arg("5"),
            None,
            Duration::from_millis(200),
        )
        .unwrap();
        assert!(result.is_none());
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn feeds_stdin_and_collects_output() {
        let output = run_with_timeout(
            Command::new("sh").args(["-c", "cat; echo err >&2"]),
            Some(b"hello"),
            Duration::from_secs(5),
        )
        .unwrap()
        .unwrap();
        assert!(output.status.success());
        assert_eq!(output.stdout, b"hello");
        assert_eq!(output.stderr, b"err\n");
    }

    #[test]
    fn run_checked_reports_failures() {
        let error = run_checked(
            Command::new("sh").args(["-c", "echo boom >&2; exit 3"]),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("boom"), "{error}");
    }
}
