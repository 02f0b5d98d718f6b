//! `mig.dirty` on Xen in the lab (only with HVBENCH_REQUIRE_XEN_LAB=1: it boots a
//! TCG-nested Xen; HVBENCH_XEN_LAB_CACHE_DIR picks the lab): `xl migrate` moves the guest
//! to a new domain on the same dom0 while it dirties a small working set; the guest
//! answers the suspend request, resumes in the new domain, its console goes on there,
//! its memory check passes, and no domain is left behind.
//!
//! Under TCG the dom0 copies a few MB/s (one dom0 vCPU: the lab is brought up with
//! `--insns`, which keeps dom0 on CPU 0 and guests on CPU 1, as dom0's processes crash
//! now and then when they share a CPU with a guest under TCG), so the guest is small
//! (32 MiB) and its loop long (guest-timed), ended 3 s after the move (`after_move_ms`).

mod common;

use std::time::{Duration, Instant};

use reports::read_results;
use reports::record::{Record, Status};

fn metric<'a>(records: &'a [Record], name: &str) -> &'a Record {
    records
        .iter()
        .find(|r| r.metric == name)
        .unwrap_or_else(|| panic!("no {name} record in {records:#?}"))
}

/// A guest note written as hex (`0x...`), as a number.
fn hex(r: &Record, key: &str) -> u64 {
    let v = r
        .notes
        .get(key)
        .unwrap_or_else(|| panic!("no {key} note: {:?}", r.notes));
    u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
}

/// The domains on the lab's dom0 other than dom0 itself.
fn domains(ssh: &hostutil::transport::Transport) -> Vec<String> {
    let list = ssh.run("xl list", None, Duration::from_secs(60)).unwrap();
    common::guest_domains(&list.stdout)
}

#[test]
fn xl_migrate_moves_a_dirtying_guest_with_its_memory_and_console() {
    if !common::required("HVBENCH_REQUIRE_XEN_LAB") {
        eprintln!(
            "notice: mig.dirty on Xen needs the TCG-nested Xen lab; set \
             HVBENCH_REQUIRE_XEN_LAB=1 to run it (HVBENCH_XEN_LAB_CACHE_DIR picks the lab)"
        );
        return;
    }
    assert!(
        common::qemu_binary().is_some(),
        "the Xen lab needs qemu-system-x86_64"
    );
    let _serial = common::exclusive();
    let started = Instant::now();
    let lab = common::XenLabUse::new();
    let cache = lab.cache.clone();
    let already_up = lab.already_up;
    if !already_up {
        lab.up(&["--insns"]);
    }
    let ssh = lab::xen_host_in(&cache)
        .expect("the lab as --xen-host")
        .transport;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let run = common::hvbench()
        .args(["run", "--backend", "xen", "--xen-host"])
        .arg(format!("lab:{}", cache.display()))
        .args(["-w", "mig.dirty", "--memory-mib", "32", "--out"])
        .arg(&out)
        .args([
            "--param",
            "mig.dirty.ws=1m",
            "--param",
            "mig.dirty.rate=2",
            "--param",
            "mig.dirty.beat_ms=20",
            "--param",
            "mig.dirty.migrate_at_ms=3000",
            // Long enough for the slowest migration seen here (about 80 s for 32 MiB at
            // load 10); the guest ends 3 s after it resumed in the new domain.
            "--param",
            "mig.dirty.duration_ms=300000",
            "--param",
            "mig.dirty.after_move_ms=3000",
        ])
        .output()
        .unwrap();
    let records = read_results(&out).unwrap();
    let downtime = metric(&records, "downtime");
    assert_eq!(
        downtime.status,
        Status::Success,
        "{:?}\n{}",
        downtime.reason,
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(downtime.host.class, "nested-tcg", "labelled as emulation");
    assert_eq!(downtime.notes["memory_check"], "passed");
    // The guest answered one suspend request and ran on in a new domain.
    assert_eq!(hex(downtime, "xen_suspends"), 1);
    assert_eq!(hex(downtime, "xen_moves"), 1);
    assert_ne!(
        hex(downtime, "xen_domid_first"),
        hex(downtime, "xen_domid_last")
    );
    // The console followed it: the new domain's reader passed on heartbeats and the
    // result, and the sequence numbers never went back (nothing replayed or doubled).
    let lines = &downtime.notes["xen_console_lines"];
    let second: serde_json::Value = serde_json::from_str(lines).unwrap();
    assert!(second["second"].as_u64().unwrap() > 10, "{lines}");
    assert!(downtime.notes["xen_xl"].contains("target_started"));
    assert!(downtime.notes.contains_key("calibration"));
    for name in ["downtime", "downtime_hypervisor", "total_time"] {
        let r = metric(&records, name);
        assert!(r.samples[0] > 0.0, "{name}: {:?}", r.samples);
    }
    assert!(
        metric(&records, "total_time").samples[0]
            >= metric(&records, "downtime_hypervisor").samples[0]
    );
    let left = domains(&ssh);
    assert!(left.is_empty(), "domains left behind: {left:?}");
    lab.finish();
    eprintln!(
        "mig.dirty on the Xen lab took {:.1} s (lab already up: {already_up})",
        started.elapsed().as_secs_f64()
    );
}
