//! Which host a libvirt URI's domains run on, and how hvbench reaches it to put the
//! guest image and console file there. `virsh` itself runs here and connects as libvirt
//! does (its own SSH for `qemu+ssh://`); hvbench's file commands use the same user, host,
//! port and key (`?keyfile=`), and `?no_verify=1` (libvirt then skips the host key check)
//! pins whatever key the host offers now (`ssh-keyscan`) for hvbench's own connections.

use std::path::PathBuf;
use std::process::Command;

use hostutil::transport::{SshTarget, Transport};

use super::LibvirtError;
use crate::backend::qemu::tempfile_dir::TempDir;

/// The parts of `driver[+transport]://[user@]host[:port]/path[?query]` hvbench needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Uri {
    pub transport: Option<String>,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub keyfile: Option<String>,
    pub no_verify: bool,
}

/// Parses `uri`; `None` for a URI without a host (this machine's libvirt).
pub fn parse(uri: &str) -> Result<Option<Uri>, LibvirtError> {
    let bad = |why: &str| LibvirtError::BadUri(format!("libvirt URI {uri:?}: {why}"));
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(bad("no `://`"));
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if authority.is_empty() {
        return Ok(None);
    }
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, authority),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad("bad port"))?)),
        None => (hostport, None),
    };
    let plain = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    };
    if !plain(host) || user.as_deref().is_some_and(|u| !plain(u)) {
        return Err(bad(
            "the user and host may hold letters, digits, '-', '.', '_'",
        ));
    }
    let mut parsed = Uri {
        transport: scheme.split_once('+').map(|(_, t)| t.to_string()),
        user,
        host: host.to_string(),
        port,
        ..Uri::default()
    };
    let query = tail.split_once('?').map(|(_, q)| q).unwrap_or("");
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("keyfile", path)) => parsed.keyfile = Some(path.to_string()),
            Some(("no_verify", value)) => parsed.no_verify = value == "1",
            _ => {}
        }
    }
    Ok(Some(parsed))
}

/// How hvbench reaches the host of `uri`'s domains: `None` for this machine, SSH for
/// `+ssh`, an error for a transport hvbench cannot copy files over.
#[derive(Debug)]
pub struct FilesHost {
    pub transport: Transport,
    /// The pinned key of a `no_verify` host, removed with the backend.
    _known_hosts: Option<TempDir>,
}

impl FilesHost {
    /// A host already reached through `transport` (a dom0 virsh runs in).
    pub fn over(transport: Transport) -> Self {
        FilesHost {
            transport,
            _known_hosts: None,
        }
    }
}

pub fn files_host(uri: &str) -> Result<Option<FilesHost>, LibvirtError> {
    let Some(parsed) = parse(uri)? else {
        return Ok(None);
    };
    if parsed.transport.as_deref() != Some("ssh") {
        return Err(LibvirtError::Remote { uri: uri.into() });
    }
    let port = parsed.port.unwrap_or(22);
    let mut target = SshTarget::parse(&format!("ssh://{}:{port}", parsed.host))
        .map_err(|e| LibvirtError::BadUri(e.to_string()))?;
    // ssh's default user is this one's, as libvirt's ssh would use.
    target.user = match parsed.user {
        Some(user) => user,
        None => nix::unistd::User::from_uid(nix::unistd::Uid::effective())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| "root".into()),
    };
    target.identity = parsed.keyfile.map(PathBuf::from);
    let mut known_hosts = None;
    if parsed.no_verify {
        let dir = pin_host_key(&parsed.host, port)?;
        target.known_hosts = Some(dir.path().join("known_hosts"));
        known_hosts = Some(dir);
    }
    Ok(Some(FilesHost {
        transport: Transport::Ssh(target),
        _known_hosts: known_hosts,
    }))
}

/// `ssh-keyscan` of `host:port` into a private known_hosts file.
fn pin_host_key(host: &str, port: u16) -> Result<TempDir, LibvirtError> {
    let failed =
        |why: String| LibvirtError::RemoteFiles(format!("reading {host}:{port}'s host key: {why}"));
    let dir = TempDir::new("hvbench-libvirt-ssh").map_err(|e| failed(e.to_string()))?;
    let out = Command::new("ssh-keyscan")
        .args(["-T", "5", "-p", &port.to_string(), host])
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| failed(format!("ssh-keyscan: {e}")))?;
    if out.stdout.is_empty() {
        return Err(failed("ssh-keyscan got no key".into()));
    }
    std::fs::write(dir.path().join("known_hosts"), &out.stdout)
        .map_err(|e| failed(e.to_string()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_remote_uris_are_told_apart() {
        for local in [
            "qemu:///system",
            "qemu:///system?socket=/tmp/x/libvirt-sock",
            "qemu:///session",
            "test:///default",
        ] {
            assert_eq!(parse(local).unwrap(), None, "{local}");
            assert!(files_host(local).unwrap().is_none());
        }
        let uri = parse("qemu+ssh://me@10.0.0.1:2222/system?keyfile=/k/id&no_verify=1")
            .unwrap()
            .unwrap();
        assert_eq!(uri.transport.as_deref(), Some("ssh"));
        assert_eq!(uri.user.as_deref(), Some("me"));
        assert_eq!(uri.host, "10.0.0.1");
        assert_eq!(uri.port, Some(2222));
        assert_eq!(uri.keyfile.as_deref(), Some("/k/id"));
        assert!(uri.no_verify);
        let Some(host) = files_host("qemu+ssh://root@host.example/system").unwrap() else {
            panic!("remote")
        };
        let Transport::Ssh(t) = host.transport else {
            panic!("ssh")
        };
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("root", "host.example", 22)
        );
    }

    #[test]
    fn transports_without_ssh_and_odd_hosts_are_refused() {
        assert!(matches!(
            files_host("qemu+tcp://10.0.0.1:16509/system"),
            Err(LibvirtError::Remote { .. })
        ));
        assert!(matches!(
            files_host("qemu://host/system"),
            Err(LibvirtError::Remote { .. })
        ));
        for bad in [
            "qemu+ssh://-oProxyCommand=x/system",
            "qemu+ssh://a b/system",
            "qemu+ssh://h:99999/system",
            "nonsense",
        ] {
            assert!(matches!(parse(bad), Err(LibvirtError::BadUri(_))), "{bad}");
        }
    }
}
