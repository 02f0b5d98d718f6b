//! The benchmark matrix end to end: `hvbench matrix run` of a small matrix (KVM and QEMU
//! here), the same plan as 3 shards run one by one and merged (the same set of records),
//! a killed shard (the merge names its cells), and the GitHub Actions workflow (valid
//! against the published schema; its matrix consumes exactly what `hvbench plan` prints).

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use reports::matrix::{CellStatus, MatrixSummary};

const SMALL: &str = r#"
name = "e2e"
repeats = 2
[run]
samples = 3
warmup = 0
sample_us = 200
timeout_s = 30
[[host]]
label = "here"
backends = ["kvm", "qemu"]
needs = ["kvm", "qemu"]
[[backend]]
name = "kvm"
kind = "kvm"
[[backend]]
name = "qemu"
kind = "qemu"
[[workloads]]
name = "exits"
select = ["cpu.cpuid", "io.pio-out"]
"#;

fn run(args: &[&str], dir: &Path) -> Output {
    common::hvbench()
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What a merged directory measured: (cell id, workload, metric, series, status).
fn record_set(dir: &Path) -> BTreeSet<(String, String, String, String, String)> {
    let summary = MatrixSummary::read(dir).unwrap().unwrap();
    let cell_of = |run_id: &str| {
        summary
            .cells
            .iter()
            .find(|c| c.run_ids.iter().any(|r| r == run_id))
            .map(|c| c.id.clone())
            .unwrap_or_default()
    };
    reports::read_results(dir)
        .unwrap()
        .iter()
        .map(|r| {
            let k = r.key();
            (
                cell_of(&r.run_id),
                k.workload,
                k.metric,
                k.series,
                format!("{:?}", r.status),
            )
        })
        .collect()
}

/// The shards of `hvbench plan --shards n --format github`: (shard, bundle).
fn github_shards(dir: &Path, n: &str) -> Vec<(String, String)> {
    let text = ok(&run(
        &["plan", "m.toml", "--shards", n, "--format", "github"],
        dir,
    ));
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    value["include"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["shard"].as_str().unwrap().to_string(),
                e["bundle"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_matrix_run_whole_and_in_shards_gives_the_same_records() {
    if !common::kvm_available() || common::qemu_binary().is_none() {
        return;
    }
    let _serial = common::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("m.toml"), SMALL).unwrap();

    let started = Instant::now();
    let stdout = ok(&run(&["matrix", "run", "m.toml", "--out", "whole"], dir));
    eprintln!("matrix run: {:.1} s", started.elapsed().as_secs_f64());
    assert!(stdout.contains("Report: "), "{stdout}");
    let page = std::fs::read_to_string(dir.join("whole/report/index.html")).unwrap();
    assert!(page.contains("Matrix e2e") && page.contains("kvm · paging host"));
    let whole = record_set(&dir.join("whole/merged"));
    // 4 cells x 2 workloads, each succeeded.
    assert_eq!(whole.len(), 8, "{whole:?}");
    assert!(whole.iter().all(|r| r.4 == "Success"), "{whole:?}");

    let shards = github_shards(dir, "3");
    assert_eq!(shards.len(), 3);
    let mut bundles = Vec::new();
    for (shard, bundle) in &shards {
        let path = format!("bundles/{bundle}");
        ok(&run(
            &[
                "run", "--matrix", "m.toml", "--shard", shard, "--bundle", &path,
            ],
            dir,
        ));
        bundles.push(path);
    }
    let mut merge = vec!["merge", "--out", "sharded"];
    merge.extend(bundles.iter().map(String::as_str));
    ok(&run(&merge, dir));
    assert_eq!(record_set(&dir.join("sharded")), whole);
    ok(&run(&["report", "sharded", "--out", "sharded-report"], dir));

    // The same plan, its last shard killed while a cell ran.
    let (shard, bundle) = shards.last().unwrap();
    let killed = dir.join("killed").join(bundle);
    let cells = kill_while_running(dir, shard, &killed);
    let mut merge = vec!["merge", "--out", "partial"];
    merge.extend(bundles[..2].iter().map(String::as_str));
    let killed_arg = killed.display().to_string();
    merge.push(&killed_arg);
    let refused = run(&merge, dir);
    assert_eq!(refused.status.code(), Some(2));
    let said = String::from_utf8_lossy(&refused.stderr);
    for id in &cells {
        assert!(said.contains(&format!("missing cell {id}")), "{id}: {said}");
    }
    assert!(said.contains("running in"), "{said}");
    merge.push("--allow-missing");
    ok(&run(&merge, dir));
    let summary = MatrixSummary::read(&dir.join("partial")).unwrap().unwrap();
    let missing: BTreeSet<String> = summary
        .cells
        .iter()
        .filter(|c| c.status == CellStatus::Missing)
        .map(|c| c.id.clone())
        .collect();
    assert_eq!(missing, cells.into_iter().collect());
}

const XEN_LAB: &str = r#"
name = "e2e-xen"
repeats = 2
[run]
samples = 3
warmup = 0
sample_us = 200
timeout_s = 60
[[host]]
label = "xen-lab"
backends = ["xen"]
needs = ["xen-lab"]
[[backend]]
name = "xen"
kind = "xen"
args = ["--xen-host", "lab"]
[[workloads]]
name = "cpuid"
select = ["cpu.cpuid"]
"#;

/// The Xen lab as a matrix host: its cells run through `xl` in the lab, whole and as 2
/// shards, with the same records. The lab comes up for the test and goes down after it
/// (unless it was up before). Run where HVBENCH_MATRIX_XEN_LAB=1 (ci/test.sh sets it):
/// 80-83 s on this 2-core host at load average 7 (lab up, four Xen boots under TCG),
/// 206 s at load average 14.
#[test]
fn the_xen_lab_is_a_matrix_host() {
    if !common::required("HVBENCH_MATRIX_XEN_LAB") {
        eprintln!("notice: HVBENCH_MATRIX_XEN_LAB=1 runs the Xen lab as a matrix host; skipping");
        return;
    }
    let possible = common::qemu_binary().is_some()
        && ["apt-get", "dpkg-deb", "ssh"]
            .iter()
            .all(|c| common::on_path(c));
    if !possible {
        assert!(
            !common::required("HVBENCH_REQUIRE_XEN_LAB"),
            "the Xen lab cannot be deployed here"
        );
        eprintln!("notice: cannot deploy the Xen lab here; skipping");
        return;
    }
    let _serial = common::exclusive();
    let cache = lab::default_cache_dir().expect("HOME is set");
    let already_up =
        matches!(<lab::XenLab as lab::Lab>::status(&cache), Ok(Some(s)) if s.healthy());
    let _down = common::LabDownOnDrop::new(<lab::XenLab as lab::Lab>::down, &cache, already_up);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("m.toml"), XEN_LAB).unwrap();
    // Without the lab, its host is not for this machine.
    if !already_up {
        let out = run(&["matrix", "run", "m.toml", "--out", "none"], dir);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("the Xen lab is not up"));
    }
    let started = Instant::now();
    ok(&run(&["lab", "up", "xen"], dir));
    ok(&run(&["matrix", "run", "m.toml", "--out", "whole"], dir));
    let whole = record_set(&dir.join("whole/merged"));
    assert_eq!(whole.len(), 2, "{whole:?}");
    let mut merge = vec!["merge".to_string(), "--out".into(), "sharded".into()];
    for (shard, bundle) in github_shards(dir, "2") {
        ok(&run(
            &[
                "run", "--matrix", "m.toml", "--shard", &shard, "--bundle", &bundle,
            ],
            dir,
        ));
        merge.push(bundle);
    }
    ok(&run(
        &merge.iter().map(String::as_str).collect::<Vec<_>>(),
        dir,
    ));
    assert_eq!(record_set(&dir.join("sharded")), whole);
    eprintln!("xen lab matrix: {:.1} s", started.elapsed().as_secs_f64());
}

const KVM_LAB: &str = r#"
name = "e2e-kvm-lab"
repeats = 1
[run]
samples = 3
warmup = 0
sample_us = 200
timeout_s = 120
[[host]]
label = "kvm-lab"
backends = ["kvm-lab"]
needs = ["kvm-lab"]
[[backend]]
name = "kvm-lab"
kind = "kvm-lab"
paging = ["tdp", "shadow"]
[[workloads]]
name = "pt"
select = ["mem.pt-update"]
"#;

/// The KVM lab as a matrix host: one cell per paging mode, each `hvbench lab run kvm
/// --paging MODE`, merged into one directory whose records say which mode each ran
/// with. Runs with the KVM lab test (HVBENCH_REQUIRE_KVM_LAB=1; about 30 s with the lab
/// to bring up).
#[test]
fn the_kvm_lab_is_a_matrix_host() {
    if !common::required("HVBENCH_REQUIRE_KVM_LAB") {
        eprintln!("notice: HVBENCH_REQUIRE_KVM_LAB=1 runs the KVM lab as a matrix host; skipping");
        return;
    }
    let _serial = common::exclusive();
    let cache = lab::default_cache_dir().expect("HOME is set");
    let already_up =
        matches!(<lab::KvmLab as lab::Lab>::status(&cache), Ok(Some(s)) if s.healthy());
    let _down = common::LabDownOnDrop::new(<lab::KvmLab as lab::Lab>::down, &cache, already_up);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("m.toml"), KVM_LAB).unwrap();
    ok(&run(&["lab", "up", "kvm"], dir));
    ok(&run(&["matrix", "run", "m.toml", "--out", "whole"], dir));
    let records = reports::read_results(&dir.join("whole/merged")).unwrap();
    assert_eq!(records.len(), 2, "{records:#?}");
    let modes: BTreeSet<&str> = records.iter().map(|r| r.host.paging.as_str()).collect();
    assert_eq!(modes.len(), 2, "one record per paging mode: {modes:?}");
    assert!(
        records
            .iter()
            .all(|r| r.backend.details.contains_key("lab")),
        "{records:#?}"
    );
}

/// Ctrl-C (SIGINT) to a shard while a cell runs: the cell is told once, ends
/// `interrupted` with what it measured, the rest stay `pending`, exit status 130.
#[test]
fn an_interrupted_shard_says_so_in_its_manifest() {
    if !common::kvm_available() || common::qemu_binary().is_none() {
        return;
    }
    let _serial = common::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("m.toml"), SMALL).unwrap();
    let bundle = dir.join("b");
    let mut child = common::hvbench()
        .args(["run", "--matrix", "m.toml", "--shard", "1/1", "--bundle"])
        .arg(&bundle)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matrix_manifest(&bundle)
        .is_some_and(|m| m.cells.iter().any(|c| c.status == CellStatus::Running))
    {
        assert!(Instant::now() < deadline, "no cell started");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let m = matrix_manifest(&bundle).unwrap();
    let statuses: Vec<CellStatus> = m.cells.iter().map(|c| c.status).collect();
    // The cell that ran may have finished just before the signal reached it.
    let stopped = statuses
        .iter()
        .position(|s| *s == CellStatus::Interrupted)
        .or_else(|| statuses.iter().position(|s| *s == CellStatus::Pending))
        .expect("a cell interrupted or pending");
    assert!(
        statuses[..stopped]
            .iter()
            .all(|s| *s == CellStatus::Succeeded),
        "{statuses:?}"
    );
    assert!(
        statuses[stopped + 1..]
            .iter()
            .all(|s| *s == CellStatus::Pending),
        "{statuses:?}"
    );
    assert!(m.ended.is_some());
}

/// Two revisions interleaved ABBA (here both this hvbench): each host runs A B B A, merge
/// writes one directory per revision, and the gate compares them cell for cell.
#[test]
fn an_interleaved_matrix_gates_revision_against_revision() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text = SMALL
        .replace(
            "backends = [\"kvm\", \"qemu\"]\nneeds = [\"kvm\", \"qemu\"]",
            "backends = [\"kvm\"]\nneeds = [\"kvm\"]",
        )
        .replace(
            "select = [\"cpu.cpuid\", \"io.pio-out\"]",
            "select = [\"cpu.cpuid\"]",
        )
        + "[interleave]\nrevisions = [\"base\", \"new\"]\n";
    std::fs::write(dir.join("m.toml"), text).unwrap();
    let exe = env!("CARGO_BIN_EXE_hvbench");
    let refused = run(&["matrix", "run", "m.toml", "--out", "none"], dir);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--hvbench base=PATH"));
    let (base, new) = (format!("base={exe}"), format!("new={exe}"));
    ok(&run(
        &[
            "matrix",
            "run",
            "m.toml",
            "--out",
            "ab",
            "--hvbench",
            &base,
            "--hvbench",
            &new,
        ],
        dir,
    ));
    let order: Vec<String> = MatrixSummary::read(&dir.join("ab/merged"))
        .unwrap()
        .unwrap()
        .cells
        .iter()
        .map(|c| c.revision.clone().unwrap_or_default())
        .collect();
    assert_eq!(order, ["base", "new", "new", "base"]);
    let compared = run(
        &[
            "compare",
            "ab/merged/revisions/base",
            "ab/merged/revisions/new",
        ],
        dir,
    );
    let table = ok(&compared);
    // Matched cell for cell (the matrix path of compare), two runs a side: A B B A.
    assert!(
        table.contains("compared only between cells of the same host label"),
        "{table}"
    );
    assert!(table.contains("inconclusive: 2 vs 2 runs"), "{table}");
    assert!(table.contains("0 only in BASE, 0 only in NEW"), "{table}");
}

/// Starts shard `shard` into `bundle`, kills hvbench (SIGKILL) once its manifest says a
/// cell runs, and checks that the cell's own hvbench ended too. Returns the shard's cells.
fn kill_while_running(dir: &Path, shard: &str, bundle: &Path) -> Vec<String> {
    let mut child = common::hvbench()
        .args(["run", "--matrix", "m.toml", "--shard", shard, "--bundle"])
        .arg(bundle)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let manifest = loop {
        assert!(Instant::now() < deadline, "no cell started");
        let read = matrix_manifest(bundle);
        if read
            .as_ref()
            .is_some_and(|m| m.cells.iter().any(|c| c.status == CellStatus::Running))
        {
            break read.unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    // The cell's hvbench got SIGINT when its parent died, and ends.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cell_processes(bundle) > 0 {
        assert!(
            Instant::now() < deadline,
            "a cell's hvbench outlived its shard"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    manifest.cells.iter().map(|c| c.id.clone()).collect()
}

fn matrix_manifest(bundle: &Path) -> Option<matrix::bundle::Manifest> {
    matrix::bundle::Manifest::read(bundle).ok()
}

/// Processes whose command line names `bundle`.
fn cell_processes(bundle: &Path) -> usize {
    let needle = bundle.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| cmdline.windows(needle.len()).any(|w| w == needle))
        .count()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

const WORKFLOW: &str = ".github/workflows/bench-matrix.yml";

/// Every `matrix.KEY` inside `${{ }}` expressions of `text`.
fn matrix_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for expression in text.split("${{").skip(1) {
        let expression = expression.split("}}").next().unwrap_or_default();
        for (i, _) in expression.match_indices("matrix.") {
            let before = expression[..i].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '.' || c == '_') {
                continue;
            }
            let key: String = expression[i + "matrix.".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            keys.insert(key);
        }
    }
    keys
}

#[test]
fn the_workflow_matrix_consumes_exactly_what_plan_prints() {
    let root = repo_root();
    let workflow = std::fs::read_to_string(root.join(WORKFLOW)).unwrap();
    // The plan step: the command the workflow runs, with its shard count.
    let line = workflow
        .lines()
        .find(|l| l.contains("hvbench plan ") && l.contains("matrix=$("))
        .expect("the workflow runs hvbench plan");
    assert!(
        line.contains("matrix=$(") && line.contains(">> \"$GITHUB_OUTPUT\""),
        "{line}"
    );
    let command = line
        .split("hvbench plan ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let args: Vec<String> = command
        .split_whitespace()
        .map(|a| {
            a.trim_matches('"')
                .replace("$SHARDS", "8")
                .replace("${SHARDS}", "8")
        })
        .collect();
    assert!(args.contains(&"github".to_string()), "{args:?}");
    let mut plan = vec!["plan".to_string()];
    plan.extend(args);
    let out = common::hvbench()
        .args(&plan)
        .current_dir(&root)
        .output()
        .unwrap();
    let printed: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let object = printed.as_object().unwrap();
    assert_eq!(object.keys().collect::<Vec<_>>(), ["include"]);
    let include = object["include"].as_array().unwrap();
    assert!(!include.is_empty() && include.len() <= 256, "GitHub's cap");
    let printed_keys: BTreeSet<String> = include
        .iter()
        .flat_map(|e| e.as_object().unwrap().keys().cloned())
        .collect();
    // The job takes the plan's output whole, and reads every key and no other.
    assert!(workflow.contains("matrix: ${{ fromJSON(needs.plan.outputs.matrix) }}"));
    assert!(workflow.contains("matrix: ${{ steps.plan.outputs.matrix }}"));
    assert_eq!(matrix_keys(&workflow), printed_keys);
    assert!(workflow.contains("runs-on: ${{ matrix.runs_on }}"));
}

#[test]
fn the_workflow_is_valid_against_the_github_workflow_schema() {
    let found = std::process::Command::new("check-jsonschema")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            !common::required("HVBENCH_REQUIRE_WORKFLOW_SCHEMA"),
            "check-jsonschema is not on PATH, and HVBENCH_REQUIRE_WORKFLOW_SCHEMA=1"
        );
        eprintln!("notice: check-jsonschema is not on PATH; skipping this test");
        return;
    }
    let root = repo_root();
    let out = std::process::Command::new("check-jsonschema")
        .args(["--builtin-schema", "vendor.github-workflows"])
        .arg(root.join(WORKFLOW))
        .output()
        .unwrap();
    ok(&out);
    // And the checker does refuse a broken workflow.
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken.yml");
    let text = std::fs::read_to_string(root.join(WORKFLOW)).unwrap();
    std::fs::write(&broken, text.replacen("runs-on:", "runs_on:", 1)).unwrap();
    let out = std::process::Command::new("check-jsonschema")
        .args(["--builtin-schema", "vendor.github-workflows"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a job without runs-on passed");
}

#[test]
fn matrix_keys_are_found_in_expressions_only() {
    let text = "a: ${{ matrix.shard }} b: matrix.nope ${{ fromJSON(needs.plan.outputs.matrix) }} ${{ x.matrix.no }} ${{ matrix.runs_on }}";
    assert_eq!(
        matrix_keys(text),
        ["runs_on", "shard"].map(String::from).into_iter().collect()
    );
}
