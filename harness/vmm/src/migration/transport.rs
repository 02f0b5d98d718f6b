//! Where a migration stream goes: `tcp:HOST:PORT` or `unix:PATH`.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// A migration address as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationAddr {
    /// `tcp:HOST:PORT` (works across hosts).
    Tcp(String),
    /// `unix:PATH` (a socket file; removed when the listener is dropped).
    Unix(PathBuf),
}

impl FromStr for MigrationAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            let ok = rest
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            return if ok {
                Ok(MigrationAddr::Tcp(rest.to_string()))
            } else {
                Err(format!("`{s}`: expected tcp:HOST:PORT"))
            };
        }
        match s.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(MigrationAddr::Unix(PathBuf::from(path))),
            _ => Err(format!("`{s}`: expected tcp:HOST:PORT or unix:PATH")),
        }
    }
}

impl fmt::Display for MigrationAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationAddr::Tcp(a) => write!(f, "tcp:{a}"),
            MigrationAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected migration stream.
#[derive(Debug)]
pub enum MigrationStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl MigrationStream {
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            MigrationStream::Tcp(s) => MigrationStream::Tcp(s.try_clone()?),
            MigrationStream::Unix(s) => MigrationStream::Unix(s.try_clone()?),
        })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            MigrationStream::Tcp(s) => s.set_read_timeout(t),
            MigrationStream::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for MigrationStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            MigrationStream::Tcp(s) => s.read(buf),
            MigrationStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for MigrationStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            MigrationStream::Tcp(s) => s.write(buf),
            MigrationStream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            MigrationStream::Tcp(s) => s.flush(),
            MigrationStream::Unix(s) => s.flush(),
        }
    }
}

impl MigrationAddr {
    pub fn connect(&self) -> io::Result<MigrationStream> {
        Ok(match self {
            MigrationAddr::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                MigrationStream::Tcp(s)
            }
            MigrationAddr::Unix(p) => MigrationStream::Unix(UnixStream::connect(p)?),
        })
    }

    pub fn listen(&self) -> io::Result<MigrationListener> {
        Ok(match self {
            MigrationAddr::Tcp(a) => MigrationListener::Tcp(TcpListener::bind(a)?),
            MigrationAddr::Unix(p) => MigrationListener::Unix(UnixListener::bind(p)?, p.clone()),
        })
    }
}

/// The destination's listening socket; a Unix socket's file goes with it.
#[derive(Debug)]
pub enum MigrationListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl MigrationListener {
    /// Waits for the source.
    pub fn accept(&self) -> io::Result<MigrationStream> {
        Ok(match self {
            MigrationListener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                MigrationStream::Tcp(s)
            }
            MigrationListener::Unix(l, _) => MigrationStream::Unix(l.accept()?.0),
        })
    }

    /// The address it listens on (with the port the kernel chose for `tcp:HOST:0`).
    pub fn local_addr(&self) -> io::Result<MigrationAddr> {
        Ok(match self {
            MigrationListener::Tcp(l) => MigrationAddr::Tcp(l.local_addr()?.to_string()),
            MigrationListener::Unix(_, p) => MigrationAddr::Unix(p.clone()),
        })
    }
}

impl Drop for MigrationListener {
    fn drop(&mut self) {
        if let MigrationListener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_say_why_not() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse(),
            Ok(MigrationAddr::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "unix:/tmp/m.sock".parse(),
            Ok(MigrationAddr::Unix("/tmp/m.sock".into()))
        );
        for bad in ["tcp:host", "tcp::1", "tcp:h:99999", "unix:", "udp:x:1", ""] {
            assert!(bad.parse::<MigrationAddr>().is_err(), "{bad}");
        }
    }
}
