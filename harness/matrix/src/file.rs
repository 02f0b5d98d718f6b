//! The matrix file (`ci/matrix.toml`): hosts, backends with their paging modes, workload
//! selections, repeats, A/B interleaving and exclusions. Read through serde; every error
//! names the line and column it is on.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest file read: a matrix is a page of text, not data.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// Largest number of cells a plan may expand to (GitHub Actions caps a matrix at 256
/// jobs; shards pack cells, but a plan of more than this is a mistake in the file).
pub const MAX_CELLS: usize = 100_000;

#[derive(Debug, Error)]
pub enum MatrixError {
    #[error("cannot read the matrix file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the matrix file {path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The hypervisor stack a backend entry runs (`hvbench run --backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Kvm,
    Qemu,
    Xen,
    /// `hvbench lab run kvm`: KVM inside the KVM lab (TCG; the paging axis, not speed).
    KvmLab,
    /// A libvirt domain (q35) on the host's libvirt (`--libvirt-uri` in the backend's args).
    Libvirt,
}

impl BackendKind {
    pub const fn name(self) -> &'static str {
        match self {
            BackendKind::Kvm => "kvm",
            BackendKind::Qemu => "qemu",
            BackendKind::Xen => "xen",
            BackendKind::KvmLab => "kvm-lab",
            BackendKind::Libvirt => "libvirt",
        }
    }

    /// The paging modes this backend can be asked for.
    pub const fn paging_modes(self) -> &'static [Paging] {
        match self {
            BackendKind::Kvm | BackendKind::KvmLab => &[Paging::Host, Paging::Tdp, Paging::Shadow],
            BackendKind::Qemu | BackendKind::Libvirt => &[Paging::Host],
            BackendKind::Xen => &[Paging::Hap, Paging::Shadow],
        }
    }
}

/// The paging axis. `host`: as the host is (no switch). For kvm, `tdp`/`shadow` wrap the
/// run in `hvbench host paging MODE --` (a module reload on a real host, refused on
/// kvm_pvm); for xen, `hap`/`shadow` are `--paging` (the domain's `hap = 1/0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Paging {
    Host,
    Tdp,
    Shadow,
    Hap,
}

impl Paging {
    pub const fn name(self) -> &'static str {
        match self {
            Paging::Host => "host",
            Paging::Tdp => "tdp",
            Paging::Shadow => "shadow",
            Paging::Hap => "hap",
        }
    }
}

impl fmt::Display for Paging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a host must offer for `hvbench matrix run` to run its cells on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Need {
    /// `/dev/kvm` opens.
    Kvm,
    /// `qemu-system-x86_64` is on PATH.
    Qemu,
    /// The Xen lab (`hvbench lab up xen`) is up.
    XenLab,
    /// The KVM lab (`hvbench lab up kvm`) is up.
    KvmLab,
    /// libvirt answers at its default URI (`virsh version`).
    Libvirt,
}

impl Need {
    pub const fn name(self) -> &'static str {
        match self {
            Need::Kvm => "kvm",
            Need::Qemu => "qemu",
            Need::XenLab => "xen-lab",
            Need::KvmLab => "kvm-lab",
            Need::Libvirt => "libvirt",
        }
    }
}

/// The file as written.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixFile {
    /// A name for the matrix (reports and bundles carry it).
    pub name: String,
    /// Runs of each (host, backend, paging, workloads) combination: one cell each.
    #[serde(default = "one")]
    pub repeats: u32,
    /// Options every cell's `hvbench run` gets.
    #[serde(default)]
    pub run: RunOptions,
    /// A/B revisions interleaved on every host (ABBA); absent: one revision.
    #[serde(default)]
    pub interleave: Option<Interleave>,
    #[serde(rename = "host")]
    pub hosts: Vec<Host>,
    #[serde(rename = "backend")]
    pub backends: Vec<Backend>,
    #[serde(rename = "workloads")]
    pub selections: Vec<Selection>,
    #[serde(default, rename = "exclude")]
    pub exclusions: Vec<Exclusion>,
}

fn one() -> u32 {
    1
}

/// `hvbench run` options shared by every cell (absent: hvbench's defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_us: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
}

/// Two revisions run in ABBA order on each host, so slow drift of the host cancels.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interleave {
    /// Exactly two labels: the baseline first (e.g. `["base", "new"]`).
    pub revisions: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// The runner label a job needs (`runs-on: [self-hosted, hvbench, LABEL]`).
    pub label: String,
    /// Names of `[[backend]]` entries this host runs.
    pub backends: Vec<String>,
    /// What `hvbench matrix run` checks on this machine before it runs this host's cells.
    #[serde(default)]
    pub needs: Vec<Need>,
    /// The host class this machine's fingerprint must have for `hvbench matrix run`
    /// (`bare-metal`, `nested`, `pvm`, `xen-host`, ...); absent: any.
    #[serde(default)]
    pub class: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// The name hosts and exclusions use (`kvm`, `xen-lab`, ...).
    pub name: String,
    pub kind: BackendKind,
    /// Paging modes to run (default: `host` for kvm and qemu, `hap` for xen).
    #[serde(default)]
    pub paging: Vec<Paging>,
    /// Further `hvbench run` options, e.g. `["--xen-host", "lab"]`.
    #[serde(default)]
    pub args: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    pub name: String,
    /// `--workload` globs.
    pub select: Vec<String>,
    /// `--param WORKLOAD.KEY=VALUE` values.
    #[serde(default)]
    pub params: Vec<String>,
}

/// Combinations left out: every field given must match (absent fields match anything).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exclusion {
    pub host: Option<String>,
    pub backend: Option<String>,
    pub paging: Option<Paging>,
    pub workloads: Option<String>,
    /// Why (kept in the plan's list of excluded combinations).
    #[serde(default)]
    pub reason: String,
}

/// Option names a backend's `args` may not hold: the plan sets them.
const RESERVED_ARGS: &[&str] = &[
    "--backend",
    "--out",
    "--append",
    "--repeat",
    "--workload",
    "-w",
    "--paging",
    "--param",
    "--samples",
    "--warmup",
    "--sample-us",
    "--timeout-s",
    "--memory-mib",
];

impl MatrixFile {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<MatrixFile, MatrixError> {
        let read = |source| MatrixError::Read {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > MAX_FILE_BYTES {
            return Err(MatrixError::TooLarge {
                path: path.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text` (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<MatrixFile, MatrixError> {
        let file: MatrixFile = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|s| line_column(text, s.start))
                .unwrap_or((1, 1));
            MatrixError::Syntax {
                path: path.to_path_buf(),
                line,
                column,
                message: e.message().trim().to_string(),
            }
        })?;
        file.check().map_err(|message| MatrixError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(file)
    }

    fn check(&self) -> Result<(), String> {
        check_name("name", &self.name)?;
        if !(1..=1000).contains(&self.repeats) {
            return Err(format!("repeats = {} is not within 1..=1000", self.repeats));
        }
        if let Some(i) = &self.interleave {
            if i.revisions.len() != 2 || i.revisions[0] == i.revisions[1] {
                return Err(
                    "[interleave] revisions must name two different revisions, the baseline first"
                        .into(),
                );
            }
            for r in &i.revisions {
                check_name("a revision", r)?;
            }
        }
        for (what, names) in [
            (
                "host label",
                self.hosts.iter().map(|h| &h.label).collect::<Vec<_>>(),
            ),
            ("backend", self.backends.iter().map(|b| &b.name).collect()),
            (
                "workloads",
                self.selections.iter().map(|s| &s.name).collect(),
            ),
        ] {
            if names.is_empty() {
                return Err(format!("no {what} entries"));
            }
            let mut seen = BTreeSet::new();
            for n in names {
                check_name(what, n)?;
                if !seen.insert(n) {
                    return Err(format!("{what} `{n}` is defined twice"));
                }
            }
        }
        self.backends.iter().try_for_each(check_backend)?;
        self.selections.iter().try_for_each(check_selection)?;
        self.check_references()
    }

    fn check_references(&self) -> Result<(), String> {
        let backends: BTreeSet<&str> = self.backends.iter().map(|b| b.name.as_str()).collect();
        for h in &self.hosts {
            if let Some(class) = &h.class {
                if reports::host::HostClass::from_name(class).is_none() {
                    return Err(format!(
                        "host `{}`: class `{}` is not a host class hvbench knows",
                        h.label,
                        class.escape_debug()
                    ));
                }
            }
            if h.backends.is_empty() {
                return Err(format!("host `{}` runs no backend", h.label));
            }
            for b in &h.backends {
                if !backends.contains(b.as_str()) {
                    return Err(format!(
                        "host `{}` names backend `{b}`, which no [[backend]] defines",
                        h.label
                    ));
                }
            }
        }
        for (i, x) in self.exclusions.iter().enumerate() {
            let n = i + 1;
            let known = |name: &Option<String>, set: &[&String]| {
                name.as_ref().is_none_or(|name| set.contains(&name))
            };
            let hosts: Vec<&String> = self.hosts.iter().map(|h| &h.label).collect();
            let backends: Vec<&String> = self.backends.iter().map(|b| &b.name).collect();
            let selections: Vec<&String> = self.selections.iter().map(|s| &s.name).collect();
            if !known(&x.host, &hosts)
                || !known(&x.backend, &backends)
                || !known(&x.workloads, &selections)
            {
                return Err(format!("exclusion {n} names a host, backend or workloads entry the file does not define"));
            }
            if x.host.is_none()
                && x.backend.is_none()
                && x.paging.is_none()
                && x.workloads.is_none()
            {
                return Err(format!("exclusion {n} matches every cell"));
            }
        }
        Ok(())
    }

    /// The paging modes a backend entry runs (its list, or the kind's default).
    pub fn paging_of(backend: &Backend) -> Vec<Paging> {
        if !backend.paging.is_empty() {
            return backend.paging.clone();
        }
        vec![match backend.kind {
            BackendKind::Kvm | BackendKind::Qemu | BackendKind::KvmLab | BackendKind::Libvirt => {
                Paging::Host
            }
            BackendKind::Xen => Paging::Hap,
        }]
    }
}

fn check_backend(b: &Backend) -> Result<(), String> {
    for p in &b.paging {
        if !b.kind.paging_modes().contains(p) {
            let allowed: Vec<&str> = b.kind.paging_modes().iter().map(|p| p.name()).collect();
            return Err(format!(
                "backend `{}` ({}) cannot run paging `{p}`: {} takes {}",
                b.name,
                b.kind.name(),
                b.kind.name(),
                allowed.join(", ")
            ));
        }
    }
    for a in &b.args {
        let option = a.split('=').next().unwrap_or(a);
        if RESERVED_ARGS.contains(&option) {
            return Err(format!(
                "backend `{}`: `{a}` in args is set by the plan (use the matrix file's own fields)",
                b.name
            ));
        }
        check_text(&format!("backend `{}` args", b.name), a)?;
    }
    Ok(())
}

fn check_selection(s: &Selection) -> Result<(), String> {
    if s.select.is_empty() {
        return Err(format!("workloads `{}` selects nothing", s.name));
    }
    for g in s.select.iter().chain(&s.params) {
        check_text(&format!("workloads `{}`", s.name), g)?;
        if g.starts_with('-') {
            return Err(format!(
                "workloads `{}`: `{g}` looks like an option",
                s.name
            ));
        }
    }
    Ok(())
}

/// Labels, names and revisions: they become runner labels, file names and JSON keys.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} `{}` must be 1-64 letters, digits, `-`, `_` or `.` (not first)",
            name.escape_debug()
        ))
    }
}

/// Arguments become one argv element each; they must be printable and of sane length.
fn check_text(what: &str, text: &str) -> Result<(), String> {
    if text.is_empty() || text.len() > 256 || text.chars().any(char::is_control) {
        return Err(format!(
            "{what}: `{}` is empty, too long or holds control characters",
            text.escape_debug()
        ));
    }
    Ok(())
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SMALL: &str = r#"
name = "t"
repeats = 2
[run]
samples = 3

[[host]]
label = "pvm"
backends = ["kvm", "qemu"]
needs = ["kvm", "qemu"]

[[host]]
label = "xen-dom0"
backends = ["xen"]

[[backend]]
name = "kvm"
kind = "kvm"

[[backend]]
name = "qemu"
kind = "qemu"

[[backend]]
name = "xen"
kind = "xen"
paging = ["hap", "shadow"]
args = ["--xen-host", "local"]

[[workloads]]
name = "cpu"
select = ["cpu.*"]

[[workloads]]
name = "mem"
select = ["mem.tlb-chase"]
params = ["mem.tlb-chase.ws=64k"]

[[exclude]]
backend = "qemu"
workloads = "mem"
reason = "not needed"
"#;

    fn parse(text: &str) -> Result<MatrixFile, MatrixError> {
        MatrixFile::parse(text, Path::new("m.toml"))
    }

    fn error(text: &str) -> String {
        parse(text).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn a_good_file_parses() {
        let f = parse(SMALL).unwrap();
        assert_eq!(f.hosts.len(), 2);
        assert_eq!(f.backends[2].paging, [Paging::Hap, Paging::Shadow]);
        assert_eq!(f.run.samples, Some(3));
        assert_eq!(f.exclusions[0].workloads.as_deref(), Some("mem"));
        assert_eq!(MatrixFile::paging_of(&f.backends[0]), [Paging::Host]);
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let bad = SMALL.replace("samples = 3", "samples = \"three\"");
        let e = error(&bad);
        assert!(e.starts_with("m.toml:5:11: "), "{e}");
        let unknown = SMALL.replace("repeats = 2", "repeat = 2");
        let e = error(&unknown);
        assert!(e.starts_with("m.toml:3:1: ") && e.contains("repeat"), "{e}");
        let kind = SMALL.replace("kind = \"qemu\"", "kind = \"vmware\"");
        let e = error(&kind);
        assert!(
            e.starts_with("m.toml:22:8: ") && e.contains("vmware"),
            "{e}"
        );
    }

    #[test]
    fn meaning_errors_are_refused() {
        for (from, to, says) in [
            (
                "backends = [\"xen\"]",
                "backends = [\"xn\"]",
                "names backend `xn`",
            ),
            (
                "paging = [\"hap\", \"shadow\"]",
                "paging = [\"tdp\"]",
                "cannot run paging `tdp`",
            ),
            ("label = \"pvm\"", "label = \"xen-dom0\"", "defined twice"),
            ("label = \"pvm\"", "label = \"a b\"", "must be 1-64"),
            ("repeats = 2", "repeats = 0", "repeats = 0"),
            (
                "[\"--xen-host\", \"local\"]",
                "[\"--out\", \"x\"]",
                "set by the plan",
            ),
            (
                "workloads = \"mem\"",
                "workloads = \"io\"",
                "does not define",
            ),
            ("select = [\"cpu.*\"]", "select = []", "selects nothing"),
            (
                "select = [\"cpu.*\"]",
                "select = [\"--repeat\"]",
                "looks like an option",
            ),
        ] {
            let text = SMALL.replacen(from, to, 1);
            assert_ne!(text, SMALL, "{from}");
            let e = error(&text);
            assert!(e.contains(says), "{from} -> {to}: {e}");
        }
        let all = SMALL.replace("backend = \"qemu\"\nworkloads = \"mem\"\n", "");
        assert!(error(&all).contains("matches every cell"));
        let interleave = format!("{SMALL}\n[interleave]\nrevisions = [\"a\"]\n");
        assert!(error(&interleave).contains("two different revisions"));
    }

    #[test]
    fn line_columns() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("ab\ncd", 99), (2, 3));
    }
}
