//! The paging axis on KVM, end to end: hvbench deploys a Linux host nested in QEMU (the KVM
//! lab, TCG here), runs the memory workloads there with kvm_amd npt=1 and npt=0 through
//! `hvbench host paging`, brings the records back, and leaves no QEMU behind. Under TCG the
//! figures are emulation artefacts; this test proves the path and the labels, not speeds.
//!
//! It boots a machine for a minute or two, so it runs only when asked:
//! HVBENCH_REQUIRE_KVM_LAB=1 (then a missing prerequisite is a failure, not a skip).

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use hvbench::backend::xen::transport::Transport;
use hvbench::lab;
use reports::read_results;
use reports::record::Status;

fn prerequisites_present() -> bool {
    common::qemu_binary().is_some()
        && ["apt-get", "dpkg-deb", "ssh", "ssh-keygen"]
            .iter()
            .all(|cmd| common::on_path(cmd))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_ok(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
}

#[test]
fn kvm_lab_measures_memory_with_npt_and_with_shadow_paging() {
    if !common::required("HVBENCH_REQUIRE_KVM_LAB") {
        eprintln!(
            "notice: the KVM lab test boots Linux nested in QEMU for a minute or two; \
             set HVBENCH_REQUIRE_KVM_LAB=1 to run it"
        );
        return;
    }
    assert!(
        prerequisites_present(),
        "HVBENCH_REQUIRE_KVM_LAB=1, but the KVM lab cannot be deployed here (needs \
         qemu-system-x86_64, apt-get, dpkg-deb, ssh, ssh-keygen)"
    );
    let _serial = common::exclusive();
    let cache = lab::default_cache_dir().expect("HOME is set");
    let already_up = matches!(lab::kvm_lab_status(&cache), Ok(Some(s)) if s.healthy());

    let mut down_on_drop = common::LabDownOnDrop::new(lab::kvm_lab_down, &cache, already_up);

    // Through the CLI, as a user deploys it.
    let started = Instant::now();
    let up = common::hvbench()
        .args(["lab", "up", "kvm"])
        .output()
        .unwrap();
    assert_ok(&up, "lab up kvm");
    assert!(text(&up.stdout).contains("emulation artefacts"));
    eprintln!(
        "lab up kvm in {:.1} s (already up: {already_up})",
        started.elapsed().as_secs_f64()
    );
    let state = lab::kvm_lab_status(&cache)
        .unwrap()
        .expect("a KVM lab")
        .state;
    assert!(state.kvm_at_boot.starts_with("kvm_amd: npt"), "{state:?}");

    for (mode, paging) in [("tdp", "npt"), ("shadow", "shadow")] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let started = Instant::now();
        let run = common::hvbench()
            .args(["lab", "run", "kvm", "--paging", mode, "--out"])
            .arg(&out)
            .args([
                "--",
                "--workload",
                "mem.tlb-chase",
                "--workload",
                "mem.pt-update",
                "--param",
                "mem.tlb-chase.ws=16k,1m",
                "--samples",
                "3",
                "--sample-us",
                "1000",
                "--memory-mib",
                "64",
                "--timeout-s",
                "60",
            ])
            .output()
            .unwrap();
        assert_ok(&run, &format!("lab run kvm --paging {mode}"));
        eprintln!(
            "lab run --paging {mode}: {:.1} s",
            started.elapsed().as_secs_f64()
        );
        assert!(
            text(&run.stdout).contains("emulation artefacts"),
            "{}",
            text(&run.stdout)
        );
        let records = read_results(&out).expect("records copied back");
        // pt-update, and tlb-chase over 2 working sets x 2 page sizes.
        assert_eq!(records.len(), 5, "{records:#?}");
        for workload in ["mem.tlb-chase", "mem.pt-update"] {
            assert!(records.iter().any(|r| r.workload == workload), "{workload}");
        }
        for record in &records {
            let what = format!("{} {:?} ({mode})", record.workload, record.series);
            assert_eq!(
                record.status,
                Status::Success,
                "{what}: {:?}",
                record.reason
            );
            assert!(record.samples.iter().all(|s| *s > 0.0), "{what}");
            assert_eq!(record.host.paging, paging, "{what}");
            assert_eq!(
                record.host.class, "nested-tcg",
                "{what}: labelled as emulation"
            );
            assert_eq!(record.host.kvm_module, "kvm_amd", "{what}");
            assert_eq!(record.host.cpl0, "emulated", "{what}");
            assert_eq!(record.backend.kind, "kvm", "{what}");
            assert_eq!(
                record.backend.details.get("paging").map(String::as_str),
                Some(paging),
                "{what}"
            );
            assert!(record.backend.details.contains_key("lab"), "{what}");
            assert!(
                record
                    .reproduce
                    .starts_with(&format!("hvbench lab run kvm --paging {mode} --out ")),
                "{what}: {}",
                record.reproduce
            );
        }
    }

    // The switch was undone: the lab's kvm_amd is back at npt=1.
    let status = lab::kvm_lab_status(&cache).unwrap().expect("a KVM lab");
    assert_eq!(
        status.kvm_now.as_deref(),
        Some("kvm_amd: npt (npt=Y), not in use")
    );

    let in_lab = Transport::Ssh(lab::kvm_ssh_target(&state));
    let sh = |script: &str| {
        in_lab
            .run(script, None, Duration::from_secs(120))
            .map(|o| text(&o.stdout))
            .unwrap_or_else(|e| panic!("`{script}` in the lab: {e}"))
    };
    // Refused while anything holds /dev/kvm, and nothing changes.
    let refused = sh(&format!(
        "exec 3</dev/kvm; {hv} host paging shadow -- touch /tmp/ran 2>&1; echo rc=$?; \
         test -e /tmp/ran && echo ran; cat /sys/module/kvm_amd/parameters/npt",
        hv = lab::LAB_HVBENCH
    ));
    assert!(refused.contains("is in use"), "{refused}");
    assert!(refused.contains("rc=2"), "{refused}");
    assert!(!refused.contains("ran\n"), "{refused}");
    assert!(refused.trim_end().ends_with('Y'), "{refused}");

    // A switch whose process is killed is undone by the next one, which says so.
    let stale = sh(&format!(
        "{hv} host paging shadow -- sleep 60 >/dev/null 2>&1 & pid=$!; \
         i=0; while [ \"$(cat /sys/module/kvm_amd/parameters/npt)\" != N ] && [ $i -lt 100 ]; \
         do sleep 0.2; i=$((i+1)); done; kill -9 $pid; \
         echo npt=$(cat /sys/module/kvm_amd/parameters/npt); \
         {hv} host paging --restore 2>&1; echo npt=$(cat /sys/module/kvm_amd/parameters/npt)",
        hv = lab::LAB_HVBENCH
    ));
    assert!(stale.contains("npt=N"), "{stale}");
    assert!(stale.contains("never restored"), "{stale}");
    assert!(stale.trim_end().ends_with("npt=Y"), "{stale}");

    if !already_up {
        down_on_drop.disarm();
        let down = common::hvbench()
            .args(["lab", "down", "kvm"])
            .output()
            .unwrap();
        assert_ok(&down, "lab down kvm");
        assert!(text(&down.stdout).contains("KVM lab stopped"));
        assert!(
            !common::qemu_alive(state.qemu_pid, &state.qemu_pid_file),
            "the KVM lab's QEMU survived lab down"
        );
        assert!(lab::kvm_lab_status(&cache).unwrap().is_none());
    }
}
