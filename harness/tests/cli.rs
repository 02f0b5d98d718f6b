//! The `hvbench` binary as a user meets it: listing, fingerprint, a real run, and every
//! kind of bad input answered with one clear sentence and a non-zero exit.

mod common;

use std::io::Read;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use reports::read_results;
use reports::record::Status;

fn run(args: &[&str]) -> Output {
    common::hvbench().args(args).output().expect("hvbench runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn list_names_every_workload() {
    let o = run(&["list"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for w in workloads::WORKLOADS {
        assert!(
            text.lines().any(|l| l.starts_with(w.name)),
            "{} missing",
            w.name
        );
    }
    assert!(text.contains("runs only when named"));
}

#[test]
fn host_json_is_the_record_fingerprint() {
    let o = run(&["host", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let host: reports::record::HostInfo = serde_json::from_slice(&o.stdout).expect("HostInfo JSON");
    assert!(!host.class.is_empty());
    assert!(host.cpus > 0);
}

fn assert_clear_error(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(2), "{}", stderr(o));
    let err = stderr(o);
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("hvbench: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "one error sentence: {err}");
    assert!(lines[0].contains(needle), "expected {needle:?} in {err}");
}

#[test]
fn bad_input_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();

    let missing = dir.path().join("missing.elf");
    let o = run(&[
        "run",
        "--backend",
        "kvm",
        "--guest",
        missing.to_str().unwrap(),
        "--out",
        out,
    ]);
    assert_clear_error(&o, "cannot read guest image");
    assert_clear_error(&o, "missing.elf");

    let corrupt = dir.path().join("corrupt.elf");
    std::fs::write(&corrupt, b"\x7fELF\x02\x01\x01 truncated").unwrap();
    let o = run(&[
        "run",
        "--backend",
        "kvm",
        "--guest",
        corrupt.to_str().unwrap(),
        "--out",
        out,
    ]);
    assert_clear_error(&o, "truncated or corrupt");

    let o = run(&[
        "run",
        "--backend",
        "kvm",
        "--workload",
        "cpu.nothing",
        "--out",
        out,
    ]);
    assert_clear_error(&o, "matches no workload");

    let o = run(&[
        "run",
        "--backend",
        "qemu",
        "--qemu",
        "/nonexistent/qemu",
        "-w",
        "cpu.idle",
        "--out",
        out,
    ]);
    assert_clear_error(&o, "qemu-system-x86");

    // Nothing was measured, so nothing is left half-written.
    for name in ["results.jsonl", "results.csv"] {
        if let Ok(text) = std::fs::read_to_string(dir.path().join("out").join(name)) {
            assert!(text.lines().count() <= 1, "{name}: {text}");
        }
    }

    let started = std::time::Instant::now();
    let o = run(&[
        "run",
        "--backend",
        "xen",
        "--xen-host",
        "ssh://root@127.0.0.1:1",
        "--out",
        out,
    ]);
    assert_clear_error(&o, "cannot reach");
    assert!(started.elapsed() < Duration::from_secs(15));
    let o = run(&[
        "run",
        "--backend",
        "xen",
        "--xen-host",
        "http://nowhere",
        "--out",
        out,
    ]);
    assert_clear_error(&o, "is not `local`, `lab` or ssh://");
    let o = run(&["run", "--backend", "kvm", "--samples", "0"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn a_run_writes_records_and_a_summary_and_refuses_to_mix_runs() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let args = [
        "run",
        "--backend",
        "kvm",
        "-w",
        "cpu.idle",
        "-w",
        "cpu.cpuid",
        "--samples",
        "3",
        "--sample-us",
        "1000",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("WORKLOAD") && stdout.contains("cpu.cpuid"),
        "{stdout}"
    );
    assert!(
        stderr(&o).contains("cpu.idle latency: median"),
        "progress on stderr"
    );
    let records = read_results(&out).unwrap();
    assert_eq!(records.len(), 2);
    assert!(records
        .iter()
        .all(|r| r.status == Status::Success && r.samples.len() == 3));
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    // Header, then 1 warm-up + 3 samples per workload.
    assert_eq!(csv.lines().count(), 1 + 2 * 4);

    let o = run(&args);
    assert_clear_error(&o, "already exists");
    let mut appended = args.to_vec();
    appended.push("--append");
    let o = run(&appended);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_results(&out).unwrap().len(), 4);

    // The report and the A/B check read what the runs wrote.
    let page = dir.path().join("page");
    let o = run(&[
        "report",
        out.to_str().unwrap(),
        "--out",
        page.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(page.join("index.html")).unwrap();
    assert!(html.contains("cpu.cpuid"));
    let o = run(&["compare", out.to_str().unwrap(), out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(!table.contains("REGRESSION"), "{table}");
    assert!(table.contains("cpu.cpuid"), "{table}");
    let o = run(&[
        "report",
        dir.path().join("nothing").to_str().unwrap(),
        "--out",
        page.to_str().unwrap(),
    ]);
    assert_clear_error(&o, "does not exist");
    let o = run(&[
        "compare",
        out.to_str().unwrap(),
        dir.path().join("nothing").to_str().unwrap(),
    ]);
    assert_clear_error(&o, "NEW results");
}

#[test]
fn ctrl_c_keeps_every_record_already_measured() {
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let mut child = common::hvbench()
        .args([
            "run",
            "--backend",
            "kvm",
            "-w",
            "cpu.idle",
            "-w",
            "selftest.hang",
            "--samples",
            "3",
            "--sample-us",
            "1000",
            "--timeout-s",
            "120",
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until cpu.idle's record is on disk and the hang has begun.
    let started = Instant::now();
    loop {
        let written = std::fs::read_to_string(out.join("results.jsonl")).unwrap_or_default();
        if written.contains("\"cpu.idle\"") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "cpu.idle never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().cast_signed()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let stopped = Instant::now();
    let status = child.wait().unwrap();
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "Ctrl-C took {:?}",
        stopped.elapsed()
    );
    assert_eq!(status.code(), Some(130));
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("interrupted"), "{err}");
    // Every line is a whole record.
    let records = read_results(&out).unwrap();
    let idle = records.iter().find(|r| r.workload == "cpu.idle").unwrap();
    assert_eq!(idle.status, Status::Success);
    let hang = records
        .iter()
        .find(|r| r.workload == "selftest.hang")
        .unwrap();
    assert_eq!(hang.status, Status::Error);
    assert!(hang.reason.as_deref().unwrap().contains("interrupted"));
}

#[test]
fn host_paging_prints_the_mode_and_refuses_to_switch_kvm_pvm() {
    let o = run(&["host", "paging"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        ["kvm_pvm", "kvm_intel", "kvm_amd", "no KVM module"]
            .iter()
            .any(|w| text.contains(w)),
        "{text}"
    );

    // A mode needs a command, and a command needs a mode.
    assert_eq!(run(&["host", "paging", "shadow"]).status.code(), Some(2));
    assert_eq!(
        run(&["host", "paging", "--", "true"]).status.code(),
        Some(2)
    );
    assert_eq!(
        run(&["host", "paging", "ept", "--", "true"]).status.code(),
        Some(2)
    );

    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        // On a real KVM host this test must not reload the host's modules.
        eprintln!("notice: /dev/kvm is not kvm_pvm here; the refusal is not exercised");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let before = std::fs::read_dir("/sys/module/kvm_pvm/parameters")
        .map(|entries| entries.count())
        .unwrap_or(0);
    let o = run(&[
        "host",
        "paging",
        "shadow",
        "--",
        "touch",
        marker.to_str().unwrap(),
    ]);
    assert_clear_error(&o, "kvm_pvm");
    assert_clear_error(&o, "shadow paging only");
    assert!(
        !marker.exists(),
        "the command ran although the switch was refused"
    );
    assert!(!std::path::Path::new("/run/hvbench/host-paging.json").exists());
    assert!(std::path::Path::new("/sys/module/kvm_pvm").exists());
    let after = std::fs::read_dir("/sys/module/kvm_pvm/parameters")
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(before, after);
    let o = run(&["host", "paging", "tdp", "--", "true"]);
    assert_clear_error(&o, "kvm_pvm");
}

#[test]
fn an_error_says_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.elf");
    let o = run(&[
        "run",
        "--backend",
        "kvm",
        "--guest",
        missing.to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
    ]);
    assert_clear_error(&o, "missing.elf");
    let err = stderr(&o);
    let cause = std::io::Error::from_raw_os_error(libc::ENOENT).to_string();
    assert_eq!(err.matches(&cause).count(), 1, "{err}");
}

/// Runs hvbench with its stderr (and its stdout, if `stdout_too`) a pipe whose reader is
/// already gone: every write fails with EPIPE.
fn run_with_output_closed(args: &[&str], stdout_too: bool) -> Output {
    let mut child = common::hvbench()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hvbench runs");
    drop(child.stderr.take());
    if stdout_too {
        drop(child.stdout.take());
    }
    child.wait_with_output().expect("hvbench ends")
}

#[test]
fn a_closed_stderr_never_panics_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.elf");
    let out = dir.path().join("r");
    let o = run_with_output_closed(
        &[
            "run",
            "--backend",
            "kvm",
            "--guest",
            missing.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        false,
    );
    // The error's exit status, not a panic's (101).
    assert_eq!(o.status.code(), Some(2));
    if !common::kvm_available() {
        return;
    }
    let _serial = common::exclusive();
    // Progress on stderr, then also the summary table on stdout (a closed terminal).
    for stdout_too in [false, true] {
        let _ = std::fs::remove_dir_all(&out);
        let o = run_with_output_closed(
            &[
                "run",
                "--backend",
                "kvm",
                "-w",
                "cpu.idle",
                "--samples",
                "3",
                "--sample-us",
                "1000",
                "--out",
                out.to_str().unwrap(),
            ],
            stdout_too,
        );
        assert_eq!(o.status.code(), Some(0), "stdout closed too: {stdout_too}");
        let records = read_results(&out).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].status, Status::Success);
    }
}

#[test]
fn bad_options_are_refused_before_the_results_directory_exists() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (backend, mib) in [("kvm", "0"), ("kvm", "1"), ("qemu", "0"), ("kvm", "3073")] {
        let o = run(&[
            "run",
            "--backend",
            backend,
            "--memory-mib",
            mib,
            "-w",
            "cpu.idle",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("16..=3072"), "{}", stderr(&o));
        assert!(
            !out.exists(),
            "--memory-mib {mib} created {}",
            out.display()
        );
    }
}

/// `--xen-host local` against a fake `xl` that records where the domain config is and
/// then refuses to create the domain.
#[test]
fn xen_images_go_to_a_private_directory_of_the_run_removed_at_the_end() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let tmp = dir.path().join("tmp");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&tmp).unwrap();
    let log = dir.path().join("xl.log");
    let xl = bin.join("xl");
    std::fs::write(
        &xl,
        format!(
            "#!/bin/sh\ncase \"$1\" in\n\
             info) printf 'xen_major : 4\\nxen_minor : 17\\nxen_extra : .0\\nvirt_caps : pv hvm hap\\n' ;;\n\
             create) d=$(dirname \"$3\"); echo \"$d $(stat -c %a \"$d\") $(ls \"$d\" | wc -l)\" >> {log}; \
             echo 'no domain today' >&2; exit 1 ;;\n\
             *) exit 1 ;;\nesac\n",
            log = log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&xl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = common::hvbench()
        .args(["run", "--backend", "xen", "--xen-host", "local"])
        .args(["-w", "cpu.idle", "--samples", "1", "--out"])
        .arg(dir.path().join("out"))
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let first = logged.lines().next().unwrap_or_else(|| {
        panic!("xl create never ran: {}", stderr(&o));
    });
    let fields: Vec<&str> = first.split(' ').collect();
    let used = std::path::Path::new(fields[0]);
    assert!(used.starts_with(&tmp), "{first}");
    assert_ne!(used, tmp.join("hvbench"), "a predictable name: {first}");
    assert_eq!(fields[1], "700", "{first}");
    assert_eq!(
        fields[2], "3",
        "the image, the config and the owner file: {first}"
    );
    assert!(
        !used.exists(),
        "{} left behind: {}",
        used.display(),
        stderr(&o)
    );
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
}

/// `hvbench list | head -1` and the like: a reader that went away is no panic (101).
#[test]
fn listing_into_a_closed_pipe_never_panics() {
    for args in [&["list"][..], &["host"][..], &["host", "--json"][..]] {
        let o = run_with_output_closed(args, true);
        assert_eq!(o.status.code(), Some(0), "hvbench {args:?}: {o:?}");
    }
}
