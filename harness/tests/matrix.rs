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
