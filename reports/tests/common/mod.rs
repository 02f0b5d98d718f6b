//! Results directories for the integration tests, built in code.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use reports::record::{Record, Status};
use reports::synthetic::{lognormal_samples, problem, record, suite, write_results};

pub const HOSTILE: &str = "<script>alert(1)</script>\"quotes\"";
pub const HOSTILE_WORKLOAD: &str = "cpu.<script>alert(1)</script>\"quotes\"";

/// kvm and xen results (xen 15% slower everywhere but on `cpu.same`), 3 repeats, groups
/// cpu and io, with skips, a crash and a timeout, and untrusted text in every field a
/// record carries. Returns (kvm dir, xen dir).
pub fn two_backends(root: &Path) -> (PathBuf, PathBuf) {
    let all = suite(&["kvm", "xen"], 3, 13, 12);
    let (mut kvm, mut xen): (Vec<Record>, Vec<Record>) =
        all.into_iter().partition(|r| r.backend.kind == "kvm");
    xen.push(problem(
        "xen",
        "cpu.hlt",
        Status::Crash,
        "triple fault after HLT",
    ));
    xen.push(problem(
        "xen",
        "io.mmio-read",
        Status::Timeout,
        "no answer in 60 s",
    ));
    for (backend, records, seed) in [("kvm", &mut kvm, 1), ("xen", &mut xen, 2)] {
        for repeat in 0..3 {
            let mut same = record(
                backend,
                "cpu.same",
                &lognormal_samples(seed * 10 + repeat, 12, 500.0, 0.05),
            );
            same.repeat = u32::try_from(repeat).unwrap();
            records.push(same);
        }
        let mut hostile = record(
            backend,
            HOSTILE_WORKLOAD,
            &lognormal_samples(seed, 12, 300.0, 0.05),
        );
        hostile.series.insert("size".into(), HOSTILE.into());
        hostile.notes.insert(HOSTILE.into(), HOSTILE.into());
        hostile.reproduce = format!("hvbench run --workload '{HOSTILE}'");
        hostile.description = HOSTILE.into();
        records.push(hostile);
        let mut skipped = problem(backend, "io.pio-out-kernel", Status::Skip, HOSTILE);
        skipped.notes.insert("why".into(), HOSTILE.into());
        records.push(skipped);
        for r in records.iter_mut() {
            r.host.hostname = format!("host-{HOSTILE}");
            r.run_id = format!("{backend}-{HOSTILE}");
            r.parameters.samples = 12;
        }
    }
    let (kvm_dir, xen_dir) = (root.join("kvm"), root.join("xen"));
    write_results(&kvm_dir, &kvm).expect("write kvm results");
    write_results(&xen_dir, &xen).expect("write xen results");
    (kvm_dir, xen_dir)
}

/// Every `src="..."` and `href="..."` target of a page, unescaped.
pub fn links(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attribute in ["src=\"", "href=\""] {
        let mut rest = html;
        while let Some(start) = rest.find(attribute) {
            rest = &rest[start + attribute.len()..];
            let end = rest.find('"').unwrap_or(rest.len());
            out.push(rest[..end].replace("&amp;", "&"));
            rest = &rest[end..];
        }
    }
    out
}
