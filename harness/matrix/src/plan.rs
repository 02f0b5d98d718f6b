//! The plan: every cell of a matrix file (host x backend x paging x workloads x repeat x
//! revision, less the exclusions), each with a stable content-hashed id and its exact
//! `hvbench` command, and the shards that pack cells into jobs.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::file::{BackendKind, MatrixFile, Paging, RunOptions, MAX_CELLS};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("the matrix expands to {0} cells, more than {MAX_CELLS}")]
    TooManyCells(usize),
    #[error("every cell of the matrix is excluded")]
    Empty,
    #[error("--shards {asked}: each of the {hosts} host labels needs a shard of its own, so at least {hosts}")]
    TooFewShards { asked: usize, hosts: usize },
    #[error("shard `{0}` is not K/N with 1 <= K <= N")]
    BadShard(String),
    #[error("shard {k}/{n} does not exist: with --shards {n} this plan has {actual} shard(s)")]
    NoSuchShard { k: usize, n: usize, actual: usize },
    #[error("no cell `{0}` in this plan (`hvbench plan` lists them)")]
    NoSuchCell(String),
}

/// One cell: one `hvbench run` on one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// `c` and the first 12 hex digits of the SHA-256 of what the cell runs.
    pub id: String,
    pub host: String,
    pub backend: String,
    pub kind: BackendKind,
    pub paging: Paging,
    pub workloads: String,
    pub repeat: u32,
    /// The A/B revision label, where the matrix interleaves two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// The command, `hvbench` first; its results go to `cells/ID` in the bundle.
    pub argv: Vec<String>,
}

/// A combination the file excludes, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Excluded {
    pub host: String,
    pub backend: String,
    pub paging: Paging,
    pub workloads: String,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    /// Hash of every cell id in order: bundles of one plan carry the same.
    pub plan_id: String,
    /// The interleaved revision labels (baseline first), or empty.
    #[serde(default)]
    pub revisions: Vec<String>,
    pub cells: Vec<Cell>,
    #[serde(default)]
    pub excluded: Vec<Excluded>,
}

/// Cells packed into one job, all for one host label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Shard {
    /// 1-based.
    pub index: usize,
    pub of: usize,
    pub host: String,
    /// Indices into [`Plan::cells`], in plan order.
    pub cells: Vec<usize>,
}

impl Shard {
    /// `K/N`, as `hvbench run --shard` takes it.
    pub fn name(&self) -> String {
        format!("{}/{}", self.index, self.of)
    }

    /// A name without `/` (artefact names cannot hold one).
    pub fn bundle_name(&self) -> String {
        format!("bundle-{:03}-of-{:03}", self.index, self.of)
    }
}

/// What hashes into a cell id: everything that shapes its run, nothing about the file's
/// layout (order, comments, other cells).
#[derive(Serialize)]
struct Identity<'a> {
    host: &'a str,
    backend: &'a str,
    kind: BackendKind,
    args: &'a [String],
    paging: Paging,
    workloads: &'a str,
    select: &'a [String],
    params: &'a [String],
    run: &'a RunOptions,
    repeat: u32,
    revision: Option<&'a str>,
}

fn hex_prefix(bytes: &[u8], n: usize) -> String {
    bytes
        .iter()
        .take(n / 2)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha256_hex(text: &[u8], n: usize) -> String {
    hex_prefix(&Sha256::digest(text), n)
}

impl Plan {
    /// Expands `file` into cells, in order host, backend, paging, workloads, then the
    /// repeats (ABBA across them where two revisions are interleaved).
    pub fn new(file: &MatrixFile) -> Result<Plan, PlanError> {
        let revisions: Vec<String> = file
            .interleave
            .as_ref()
            .map(|i| i.revisions.clone())
            .unwrap_or_default();
        let mut cells = Vec::new();
        let mut excluded = Vec::new();
        for host in &file.hosts {
            for backend in file
                .backends
                .iter()
                .filter(|b| host.backends.contains(&b.name))
            {
                for paging in MatrixFile::paging_of(backend) {
                    for sel in &file.selections {
                        if let Some(x) = file.exclusions.iter().find(|x| {
                            x.host.as_ref().is_none_or(|h| *h == host.label)
                                && x.backend.as_ref().is_none_or(|b| *b == backend.name)
                                && x.paging.is_none_or(|p| p == paging)
                                && x.workloads.as_ref().is_none_or(|w| *w == sel.name)
                        }) {
                            excluded.push(Excluded {
                                host: host.label.clone(),
                                backend: backend.name.clone(),
                                paging,
                                workloads: sel.name.clone(),
                                reason: x.reason.clone(),
                            });
                            continue;
                        }
                        for (repeat, revision) in rounds(file.repeats, &revisions) {
                            if cells.len() >= MAX_CELLS {
                                return Err(PlanError::TooManyCells(cells.len() + 1));
                            }
                            let identity = Identity {
                                host: &host.label,
                                backend: &backend.name,
                                kind: backend.kind,
                                args: &backend.args,
                                paging,
                                workloads: &sel.name,
                                select: &sel.select,
                                params: &sel.params,
                                run: &file.run,
                                repeat,
                                revision: revision.as_deref(),
                            };
                            cells.push(cell(&identity, revision.clone(), file));
                        }
                    }
                }
            }
        }
        if cells.is_empty() {
            return Err(PlanError::Empty);
        }
        let ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
        Ok(Plan {
            name: file.name.clone(),
            plan_id: sha256_hex(ids.join("\n").as_bytes(), 16),
            revisions,
            cells,
            excluded,
        })
    }

    /// Whether every id and revision label is one this module makes (`c` and 12 hex
    /// digits; a revision label of the file's name rule): a plan read from a bundle
    /// names files with them, and must not name any others.
    pub fn well_formed(&self) -> bool {
        let id_ok = |id: &str| {
            id.len() == 13
                && id.starts_with('c')
                && id[1..]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        self.cells.iter().all(|c| id_ok(&c.id))
            && self
                .revisions
                .iter()
                .all(|r| crate::file::check_name("", r).is_ok())
            && self.cells.iter().all(|c| {
                c.revision
                    .as_deref()
                    .is_none_or(|r| self.revisions.iter().any(|x| x == r))
            })
    }

    /// The plan of the cells of `hosts` alone (what one machine runs of it): its own
    /// plan id, so its bundles never pass for the whole plan's.
    pub fn restricted(&self, hosts: &[&str]) -> Plan {
        let cells: Vec<Cell> = self
            .cells
            .iter()
            .filter(|c| hosts.contains(&c.host.as_str()))
            .cloned()
            .collect();
        let ids: Vec<&str> = cells.iter().map(|c| c.id.as_str()).collect();
        Plan {
            name: self.name.clone(),
            plan_id: sha256_hex(ids.join("\n").as_bytes(), 16),
            revisions: self.revisions.clone(),
            excluded: self
                .excluded
                .iter()
                .filter(|x| hosts.contains(&x.host.as_str()))
                .cloned()
                .collect(),
            cells,
        }
    }

    pub fn cell(&self, id: &str) -> Result<usize, PlanError> {
        self.cells
            .iter()
            .position(|c| c.id == id)
            .ok_or_else(|| PlanError::NoSuchCell(id.to_string()))
    }

    /// Host labels in plan order.
    pub fn hosts(&self) -> Vec<&str> {
        let mut seen = BTreeSet::new();
        self.cells
            .iter()
            .map(|c| c.host.as_str())
            .filter(|h| seen.insert(*h))
            .collect()
    }

    /// The cells that must run on one runner one after another: the repeats of one
    /// combination when revisions are interleaved (so each host runs A B B A), else
    /// each cell alone.
    fn units(&self) -> Vec<Vec<usize>> {
        let mut units: Vec<Vec<usize>> = Vec::new();
        let mut by_combination: BTreeMap<(&str, &str, Paging, &str), usize> = BTreeMap::new();
        for (i, c) in self.cells.iter().enumerate() {
            if self.revisions.is_empty() {
                units.push(vec![i]);
                continue;
            }
            let key = (
                c.host.as_str(),
                c.backend.as_str(),
                c.paging,
                c.workloads.as_str(),
            );
            match by_combination.get(&key) {
                Some(&u) => units[u].push(i),
                None => {
                    by_combination.insert(key, units.len());
                    units.push(vec![i]);
                }
            }
        }
        units
    }

    /// Packs the cells into at most `n` shards, each for one host label: every cell in
    /// exactly one shard, shards per host in proportion to its cells, cells spread so
    /// that shards of a host hold about as many cells each. Deterministic.
    pub fn shards(&self, n: usize) -> Result<Vec<Shard>, PlanError> {
        let hosts = self.hosts();
        if n < hosts.len() {
            return Err(PlanError::TooFewShards {
                asked: n,
                hosts: hosts.len(),
            });
        }
        let units = self.units();
        let per_host: Vec<Vec<&Vec<usize>>> = hosts
            .iter()
            .map(|h| {
                units
                    .iter()
                    .filter(|u| self.cells[u[0]].host == *h)
                    .collect()
            })
            .collect();
        let counts = shard_counts(&per_host, n);
        let total: usize = counts.iter().sum();
        let mut shards = Vec::with_capacity(total);
        for ((host, host_units), count) in hosts.iter().zip(&per_host).zip(counts) {
            for cells in pack(host_units, count) {
                shards.push(Shard {
                    index: shards.len() + 1,
                    of: total,
                    host: host.to_string(),
                    cells,
                });
            }
        }
        Ok(shards)
    }

    /// The cells of shard `K/N`, as `hvbench run --shard` names it.
    pub fn shard(&self, spec: &str) -> Result<Shard, PlanError> {
        let bad = || PlanError::BadShard(spec.to_string());
        let (k, n) = spec.split_once('/').ok_or_else(bad)?;
        let (k, n): (usize, usize) = (k.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
        if k == 0 || k > n {
            return Err(bad());
        }
        let shards = self.shards(n)?;
        let actual = shards.len();
        if actual != n {
            return Err(PlanError::NoSuchShard { k, n, actual });
        }
        shards
            .into_iter()
            .nth(k - 1)
            .ok_or(PlanError::NoSuchShard { k, n, actual })
    }
}

/// Repeat and revision of each cell of one combination: 0..repeats, and with revisions
/// [A, B] the order A B, B A, A B, ... (ABBA over each two repeats).
fn rounds(repeats: u32, revisions: &[String]) -> Vec<(u32, Option<String>)> {
    let mut out = Vec::new();
    for r in 0..repeats {
        match revisions {
            [a, b] => {
                let (first, second) = if r % 2 == 0 { (a, b) } else { (b, a) };
                out.push((r, Some(first.clone())));
                out.push((r, Some(second.clone())));
            }
            _ => out.push((r, None)),
        }
    }
    out
}

fn cell(identity: &Identity<'_>, revision: Option<String>, file: &MatrixFile) -> Cell {
    // serde_json of a struct is in field order: canonical for the hash.
    let canonical = serde_json::to_vec(identity).unwrap_or_default();
    let id = format!("c{}", sha256_hex(&canonical, 12));
    let argv = command(identity, &id, &file.run);
    Cell {
        id,
        host: identity.host.to_string(),
        backend: identity.backend.to_string(),
        kind: identity.kind,
        paging: identity.paging,
        workloads: identity.workloads.to_string(),
        repeat: identity.repeat,
        revision,
        argv,
    }
}

/// The cell's `hvbench` command line.
fn command(c: &Identity<'_>, id: &str, run: &RunOptions) -> Vec<String> {
    let mut argv: Vec<String> = vec!["hvbench".into()];
    let switched = matches!(c.paging, Paging::Tdp | Paging::Shadow);
    match c.kind {
        BackendKind::KvmLab => {
            argv.extend(["lab", "run", "kvm"].map(String::from));
            if switched {
                argv.extend(["--paging".into(), c.paging.name().into()]);
            }
            argv.extend(["--out".into(), format!("cells/{id}"), "--".into()]);
        }
        BackendKind::Kvm if switched => {
            argv.extend(["host", "paging", c.paging.name(), "--", "hvbench"].map(String::from));
        }
        _ => {}
    }
    if c.kind != BackendKind::KvmLab {
        argv.extend(["run", "--backend", c.kind.name()].map(String::from));
    }
    if c.kind == BackendKind::Xen {
        argv.extend(["--paging".into(), c.paging.name().into()]);
    }
    for glob in c.select {
        argv.extend(["-w".into(), glob.clone()]);
    }
    for p in c.params {
        argv.extend(["--param".into(), p.clone()]);
    }
    let options = [
        ("--samples", run.samples.map(u64::from)),
        ("--warmup", run.warmup.map(u64::from)),
        ("--sample-us", run.sample_us.map(u64::from)),
        ("--timeout-s", run.timeout_s),
        ("--memory-mib", run.memory_mib.map(u64::from)),
    ];
    for (name, value) in options {
        if let Some(v) = value {
            argv.extend([name.to_string(), v.to_string()]);
        }
    }
    if c.kind == BackendKind::KvmLab {
        // `lab run kvm` options come before `--`: after the run options they would be
        // `hvbench run` options in the lab.
        let at = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
        argv.splice(at..at, c.args.iter().cloned());
    } else {
        argv.extend(c.args.iter().cloned());
        argv.extend(["--out".into(), format!("cells/{id}")]);
    }
    argv
}

/// Shards per host: one each, the rest one at a time to the host whose shards hold the
/// most cells each, never more shards than a host has units.
fn shard_counts(per_host: &[Vec<&Vec<usize>>], n: usize) -> Vec<usize> {
    let mut counts = vec![1usize; per_host.len()];
    let cells: Vec<usize> = per_host
        .iter()
        .map(|units| units.iter().map(|u| u.len()).sum())
        .collect();
    let mut left = n.saturating_sub(per_host.len());
    while left > 0 {
        // Largest cells-per-shard first; compare a/b > c/d as a*d > c*b.
        let best = (0..per_host.len())
            .filter(|&h| counts[h] < per_host[h].len())
            .max_by(|&a, &b| {
                (cells[a] * counts[b])
                    .cmp(&(cells[b] * counts[a]))
                    .then(b.cmp(&a))
            });
        let Some(h) = best else { break };
        counts[h] += 1;
        left -= 1;
    }
    counts
}

/// Longest-processing-time packing of units into `count` shards; each shard's cells in
/// plan order.
fn pack(units: &[&Vec<usize>], count: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<&&Vec<usize>> = units.iter().collect();
    order.sort_by(|a, b| b.len().cmp(&a.len()).then(a[0].cmp(&b[0])));
    let mut shards: Vec<Vec<usize>> = vec![Vec::new(); count];
    for unit in order {
        let lightest = (0..count)
            .min_by_key(|&s| (shards[s].len(), s))
            .unwrap_or(0);
        shards[lightest].extend(unit.iter().copied());
    }
    for s in &mut shards {
        s.sort_unstable();
    }
    shards.retain(|s| !s.is_empty());
    shards
}

/// `strategy.matrix` for GitHub Actions: exactly `{"include": [...]}`, one entry per
/// shard with the keys the workflow reads (`matrix.shard`, `.host`, `.runs_on`,
/// `.bundle`); any other top-level key would become a matrix axis.
pub fn github_matrix(shards: &[Shard]) -> serde_json::Value {
    let include: Vec<serde_json::Value> = shards
        .iter()
        .map(|s| {
            serde_json::json!({
                "shard": s.name(),
                "host": s.host,
                "runs_on": ["self-hosted", "hvbench", s.host],
                "bundle": s.bundle_name(),
            })
        })
        .collect();
    serde_json::json!({ "include": include })
}

/// An argv as one shell-readable line (arguments quoted where they need it).
pub fn shell_line(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+%".contains(&b));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The plan as text: shards, their cells and commands, the exclusions.
pub fn render_text(plan: &Plan, shards: &[Shard]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "matrix {}: {} cell(s) on {} host label(s) in {} shard(s); plan {}",
        plan.name,
        plan.cells.len(),
        plan.hosts().len(),
        shards.len(),
        plan.plan_id
    );
    for s in shards {
        let _ = writeln!(
            out,
            "shard {}  host {}  {} cell(s)",
            s.name(),
            s.host,
            s.cells.len()
        );
        for &i in &s.cells {
            let c = &plan.cells[i];
            let rev = c
                .revision
                .as_deref()
                .map(|r| format!(" rev {r}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {}  {} {} {} r{}{}  {}",
                c.id,
                c.backend,
                c.paging,
                c.workloads,
                c.repeat,
                rev,
                shell_line(&c.argv)
            );
        }
    }
    for x in &plan.excluded {
        let _ = writeln!(
            out,
            "excluded: {} {} {} {}{}",
            x.host,
            x.backend,
            x.paging,
            x.workloads,
            if x.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", x.reason)
            }
        );
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;

    pub(crate) const SMALL: &str = r#"
name = "t"
repeats = 2
[run]
samples = 3
[[host]]
label = "pvm"
backends = ["kvm", "qemu"]
[[host]]
label = "dom0"
backends = ["xen"]
[[backend]]
name = "kvm"
kind = "kvm"
paging = ["host", "shadow"]
[[backend]]
name = "qemu"
kind = "qemu"
[[backend]]
name = "xen"
kind = "xen"
paging = ["hap", "shadow"]
args = ["--xen-host", "ssh://root@dom0"]
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

    pub(crate) fn plan_of(text: &str) -> Plan {
        Plan::new(&MatrixFile::parse(text, Path::new("m.toml")).unwrap()).unwrap()
    }

    #[test]
    fn cells_expand_with_exclusions() {
        let plan = plan_of(SMALL);
        // pvm: kvm 2 paging x 2 sel + qemu 1 x 1 (mem excluded); dom0: 2 x 2; x 2 repeats.
        assert_eq!(plan.cells.len(), (4 + 1 + 4) * 2);
        assert_eq!(plan.excluded.len(), 1);
        assert_eq!(plan.excluded[0].reason, "not needed");
        let ids: BTreeSet<&str> = plan.cells.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids.len(), plan.cells.len(), "ids are unique");
        assert!(plan
            .cells
            .iter()
            .all(|c| c.id.len() == 13 && c.id.starts_with('c')));
        assert_eq!(plan.hosts(), ["pvm", "dom0"]);
        assert!(plan.well_formed());
        let mut odd = plan.clone();
        odd.cells[3].id = "../../etc".into();
        assert!(!odd.well_formed());
    }

    #[test]
    fn commands_are_exact() {
        let plan = plan_of(SMALL);
        let shadow = plan
            .cells
            .iter()
            .find(|c| c.backend == "kvm" && c.paging == Paging::Shadow && c.workloads == "mem")
            .unwrap();
        let expected = format!(
            "hvbench host paging shadow -- hvbench run --backend kvm -w mem.tlb-chase \
             --param mem.tlb-chase.ws=64k --samples 3 --out cells/{}",
            shadow.id
        );
        assert_eq!(shell_line(&shadow.argv), expected);
        let xen = plan
            .cells
            .iter()
            .find(|c| c.kind == BackendKind::Xen)
            .unwrap();
        assert_eq!(
            shell_line(&xen.argv),
            format!(
                "hvbench run --backend xen --paging hap -w 'cpu.*' --samples 3 --xen-host \
                 ssh://root@dom0 --out cells/{}",
                xen.id
            )
        );
    }

    #[test]
    fn kvm_lab_cells_run_in_the_lab() {
        let text = SMALL.replace("kind = \"qemu\"", "kind = \"kvm-lab\"\npaging = [\"tdp\"]");
        let plan = plan_of(&text);
        let c = plan
            .cells
            .iter()
            .find(|c| c.kind == BackendKind::KvmLab)
            .unwrap();
        assert_eq!(
            shell_line(&c.argv),
            format!(
                "hvbench lab run kvm --paging tdp --out cells/{} -- -w 'cpu.*' --samples 3",
                c.id
            )
        );
    }

    #[test]
    fn libvirt_cells_run_a_domain_and_refuse_a_paging_switch() {
        let text = SMALL.replace(
            "kind = \"qemu\"",
            "kind = \"libvirt\"\nargs = [\"--libvirt-uri\", \"qemu:///system\"]",
        );
        let plan = plan_of(&text);
        let c = plan
            .cells
            .iter()
            .find(|c| c.kind == BackendKind::Libvirt)
            .unwrap();
        assert_eq!(
            shell_line(&c.argv),
            format!(
                "hvbench run --backend libvirt -w 'cpu.*' --samples 3 --libvirt-uri \
                 qemu:///system --out cells/{}",
                c.id
            )
        );
        let switched = text.replace(
            "kind = \"libvirt\"",
            "kind = \"libvirt\"\npaging = [\"shadow\"]",
        );
        let error = MatrixFile::parse(&switched, Path::new("m.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("shadow"), "{error}");
    }

    #[test]
    fn ids_are_stable_and_depend_only_on_content() {
        let a = plan_of(SMALL);
        assert_eq!(a, plan_of(SMALL), "same file, same plan");
        // Reordering and comments change nothing but the order.
        let reordered = SMALL.replace("[[workloads]]\nname = \"cpu\"\nselect = [\"cpu.*\"]\n", "")
            + "# a comment\n[[workloads]]\nname = \"cpu\"\nselect = [\"cpu.*\"]\n";
        let b = plan_of(&reordered);
        let ids = |p: &Plan| {
            p.cells
                .iter()
                .map(|c| c.id.clone())
                .collect::<BTreeSet<_>>()
        };
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(a.plan_id, b.plan_id, "the plan id follows the order");
        // A changed option changes every id; a new host adds ids and keeps the others.
        let changed = plan_of(&SMALL.replace("samples = 3", "samples = 4"));
        assert!(ids(&a).is_disjoint(&ids(&changed)));
        let more = plan_of(&SMALL.replace(
            "label = \"dom0\"\nbackends = [\"xen\"]",
            "label = \"dom0\"\nbackends = [\"xen\", \"qemu\"]",
        ));
        assert!(ids(&a).is_subset(&ids(&more)) && ids(&more).len() > ids(&a).len());
    }

    #[test]
    fn interleaving_is_abba_per_combination() {
        let plan = plan_of(&format!(
            "{SMALL}\n[interleave]\nrevisions = [\"base\", \"new\"]\n"
        ));
        assert_eq!(plan.cells.len(), 9 * 2 * 2);
        let first: Vec<(u32, &str)> = plan.cells[..4]
            .iter()
            .map(|c| (c.repeat, c.revision.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(first, [(0, "base"), (0, "new"), (1, "new"), (1, "base")]);
        // A shard never splits one combination's rounds.
        for n in 2..=9 {
            for s in plan.shards(n).unwrap() {
                let mut seen: BTreeMap<(&str, Paging, &str), usize> = BTreeMap::new();
                for &i in &s.cells {
                    let c = &plan.cells[i];
                    *seen
                        .entry((c.backend.as_str(), c.paging, c.workloads.as_str()))
                        .or_default() += 1;
                }
                assert!(seen.values().all(|&k| k == 4), "n={n}: {seen:?}");
            }
        }
    }

    #[test]
    fn sharding_covers_every_cell_once_for_any_n() {
        let plan = plan_of(SMALL);
        assert_eq!(
            plan.shards(1),
            Err(PlanError::TooFewShards { asked: 1, hosts: 2 })
        );
        for n in 2..=40 {
            let shards = plan.shards(n).unwrap();
            assert_eq!(shards.len(), n.min(plan.cells.len()), "n={n}");
            let mut seen = vec![0; plan.cells.len()];
            for s in &shards {
                assert_eq!(s.of, shards.len());
                assert!(!s.cells.is_empty());
                for &i in &s.cells {
                    seen[i] += 1;
                    assert_eq!(plan.cells[i].host, s.host, "a shard holds one host label");
                }
                // Shards of one host differ by at most one cell.
                let same: Vec<usize> = shards
                    .iter()
                    .filter(|t| t.host == s.host)
                    .map(|t| t.cells.len())
                    .collect();
                assert!(
                    same.iter().max().unwrap() - same.iter().min().unwrap() <= 1,
                    "n={n}"
                );
            }
            assert!(seen.iter().all(|&k| k == 1), "n={n}: {seen:?}");
            assert_eq!(shards, plan.shards(n).unwrap(), "deterministic");
            // `--shard K/N` finds the same shard from its printed name.
            for s in &shards {
                assert_eq!(&plan.shard(&s.name()).unwrap(), s);
            }
        }
    }

    #[test]
    fn a_restricted_plan_keeps_its_hosts_cells_and_ids() {
        let plan = plan_of(SMALL);
        let local = plan.restricted(&["dom0"]);
        assert_eq!(local.cells.len(), 8);
        assert!(local.cells.iter().all(|c| c.host == "dom0"));
        assert!(local.cells.iter().all(|c| plan.cells.contains(c)));
        assert_ne!(local.plan_id, plan.plan_id);
        assert!(local.excluded.is_empty());
        assert_eq!(plan.restricted(&["pvm", "dom0"]), plan);
    }

    #[test]
    fn bad_shard_names_are_refused() {
        let plan = plan_of(SMALL);
        for bad in ["0/3", "4/3", "1", "a/b", "1/3/4", "-1/3"] {
            assert_eq!(
                plan.shard(bad),
                Err(PlanError::BadShard(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(
            plan.shard("1/100"),
            Err(PlanError::NoSuchShard {
                k: 1,
                n: 100,
                actual: 18
            })
        );
        assert_eq!(
            plan.cell("cnope"),
            Err(PlanError::NoSuchCell("cnope".into()))
        );
    }

    #[test]
    fn github_matrix_is_include_only() {
        let plan = plan_of(SMALL);
        let shards = plan.shards(3).unwrap();
        let m = github_matrix(&shards);
        let object = m.as_object().unwrap();
        assert_eq!(object.keys().collect::<Vec<_>>(), ["include"]);
        let include = object["include"].as_array().unwrap();
        assert_eq!(include.len(), 3);
        assert_eq!(
            include[2]["runs_on"],
            serde_json::json!(["self-hosted", "hvbench", "dom0"])
        );
        assert_eq!(include[0]["shard"], "1/3");
        assert_eq!(include[0]["bundle"], "bundle-001-of-003");
    }

    #[test]
    fn shell_quoting() {
        let argv: Vec<String> = ["a", "cpu.*", "it's", ""].map(String::from).to_vec();
        assert_eq!(shell_line(&argv), "a 'cpu.*' 'it'\\''s' ''");
    }
}
