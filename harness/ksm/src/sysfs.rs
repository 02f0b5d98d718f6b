//! `/sys/kernel/mm/ksm`: KSM's counters and tunables, read and parsed. Writing goes
//! through [`crate::KsmGuard`] alone, which saves what it changes first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::KsmError;

/// Where the kernel exposes KSM.
pub(crate) const SYSTEM_DIR: &str = "/sys/kernel/mm/ksm";

/// KSM's sysfs directory (the real one, or a stand-in for tests).
#[derive(Clone, Debug)]
pub struct KsmSysfs {
    dir: PathBuf,
}

/// KSM's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KsmCounters {
    /// KSM pages in use (one per set of merged pages).
    pub pages_shared: u64,
    /// Page mappings that share a KSM page: pages saved.
    pub pages_sharing: u64,
    /// Pages scanned that matched nothing (yet).
    pub pages_unshared: u64,
    /// Pages that changed too fast to be considered.
    pub pages_volatile: u64,
    /// Completed passes over all mergeable memory.
    pub full_scans: u64,
    /// Pages looked at since KSM first ran (kernels from 6.9; `None` before).
    pub pages_scanned: Option<u64>,
}

/// A tunable's value as written back: a number, or the chosen word of a choice list.
///
/// Choice files read as `[none] scan-time` and take `none`; plain files read and take
/// the same text.
pub(crate) fn current_value(raw: &str) -> String {
    let raw = raw.trim();
    match (raw.find('['), raw.find(']')) {
        (Some(open), Some(close)) if open < close => raw[open + 1..close].to_string(),
        _ => raw.to_string(),
    }
}

/// Parses one counter file's contents.
pub(crate) fn parse_count(raw: &str) -> Option<u64> {
    raw.trim().parse().ok()
}

impl KsmSysfs {
    pub fn system() -> Self {
        Self::at(SYSTEM_DIR)
    }

    pub fn at(dir: impl Into<PathBuf>) -> Self {
        KsmSysfs { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn has(&self, name: &str) -> bool {
        self.dir.join(name).exists()
    }

    /// The value of `name` (a choice file's chosen word).
    pub fn read(&self, name: &str) -> Result<String, KsmError> {
        let path = self.dir.join(name);
        std::fs::read_to_string(&path)
            .map(|raw| current_value(&raw))
            .map_err(|source| KsmError::Io {
                what: format!("reading {}", path.display()),
                source,
            })
    }

    pub fn read_count(&self, name: &str) -> Result<u64, KsmError> {
        let value = self.read(name)?;
        parse_count(&value).ok_or_else(|| KsmError::Parse {
            what: format!("{}/{name}", self.dir.display()),
            text: value,
        })
    }

    /// Writes one tunable. Only the guard calls this, after saving the old value.
    pub(crate) fn write(&self, name: &str, value: &str) -> Result<(), KsmError> {
        let path = self.dir.join(name);
        std::fs::write(&path, value).map_err(|source| KsmError::Io {
            what: format!("writing {value:?} to {}", path.display()),
            source,
        })
    }

    pub fn counters(&self) -> Result<KsmCounters, KsmError> {
        Ok(KsmCounters {
            pages_shared: self.read_count("pages_shared")?,
            pages_sharing: self.read_count("pages_sharing")?,
            pages_unshared: self.read_count("pages_unshared")?,
            pages_volatile: self.read_count("pages_volatile")?,
            full_scans: self.read_count("full_scans")?,
            pages_scanned: self
                .has("pages_scanned")
                .then(|| self.read_count("pages_scanned"))
                .transpose()?,
        })
    }

    /// Every tunable (a file its owner may write) with its value: what a run must leave
    /// as it found it.
    pub fn tunables(&self) -> Result<BTreeMap<String, String>, KsmError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |source| KsmError::Io {
            what: format!("listing {}", self.dir.display()),
            source,
        };
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let writable = entry
                .metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o200 != 0)
                .unwrap_or(false);
            if let (true, Some(name)) = (writable, entry.file_name().to_str()) {
                out.insert(name.to_string(), self.read(name)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_choices() {
        assert_eq!(current_value("100\n"), "100");
        assert_eq!(current_value("[none] scan-time\n"), "none");
        assert_eq!(current_value("none [scan-time]"), "scan-time");
        assert_eq!(current_value("] odd ["), "] odd [");
        assert_eq!(parse_count("12345\n"), Some(12345));
        assert_eq!(parse_count(" 0 "), Some(0));
        assert_eq!(parse_count("-1"), None);
        assert_eq!(parse_count(""), None);
        assert_eq!(parse_count("18446744073709551616"), None);
    }

    #[test]
    fn counters_and_tunables_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        for (name, value) in [
            ("pages_shared", "10\n"),
            ("pages_sharing", "30\n"),
            ("pages_unshared", "5\n"),
            ("pages_volatile", "0\n"),
            ("full_scans", "7\n"),
            ("run", "0\n"),
            ("advisor_mode", "[none] scan-time\n"),
        ] {
            std::fs::write(dir.path().join(name), value).unwrap();
        }
        let ksm = KsmSysfs::at(dir.path());
        assert_eq!(
            ksm.counters().unwrap(),
            KsmCounters {
                pages_shared: 10,
                pages_sharing: 30,
                pages_unshared: 5,
                pages_volatile: 0,
                full_scans: 7,
                pages_scanned: None,
            }
        );
        let t = ksm.tunables().unwrap();
        assert_eq!(t.get("advisor_mode").map(String::as_str), Some("none"));
        assert_eq!(t.get("run").map(String::as_str), Some("0"));

        std::fs::write(dir.path().join("full_scans"), "lots\n").unwrap();
        let e = ksm.counters().unwrap_err().to_string();
        assert!(e.contains("full_scans") && e.contains("lots"), "{e}");
        std::fs::remove_file(dir.path().join("pages_shared")).unwrap();
        ksm.counters().unwrap_err();
    }

    #[test]
    fn the_real_directory_parses_where_present() {
        let ksm = KsmSysfs::system();
        if !ksm.has("run") {
            return;
        }
        ksm.counters().unwrap();
        let t = ksm.tunables().unwrap();
        for name in ["run", "pages_to_scan", "sleep_millisecs"] {
            assert!(parse_count(&t[name]).is_some(), "{name}: {t:?}");
        }
    }
}
