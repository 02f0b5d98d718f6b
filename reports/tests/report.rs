//! `reports::report::render` end to end, on results directories built in code.

mod common;

use std::path::{Path, PathBuf};

use reports::plot::ChartFormat;
use reports::record::Status;
use reports::report::{render, ReportError, ReportOptions};
use reports::results::{ResultsError, JSONL_NAME};
use reports::synthetic::{host, lognormal_samples, problem, record, write_results};

use common::{links, two_backends, HOSTILE_WORKLOAD};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn untrusted_text_shows_as_text_never_as_markup() {
    let root = tempfile::tempdir().unwrap();
    let (kvm, xen) = two_backends(root.path());
    let out = root.path().join("report");
    let summary = render(&[kvm, xen], &out, &ReportOptions::default()).unwrap();
    let html = read(&summary.index);
    // The run count the page asks for is the one the per-run test needs at its p (0.01).
    assert!(html.contains("at least 5 each: --repeat 5"), "method text");

    // The page has exactly the markup it writes: no <script> at all (it uses none).
    assert!(!html.contains("<script"), "raw <script> in the page");
    assert!(!html.contains("\"quotes\""), "raw quotes in the page");
    let escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&quot;quotes&quot;";
    // Workload name, series, note, reason, hostname, run id, reproduce, description: all
    // shown, all escaped.
    for context in [
        format!("<b>cpu.{escaped}</b>"),
        format!("size={escaped}"),
        format!("note: kvm {escaped}={escaped}"),
        format!("<td>{escaped}</td>"),
        format!("host-{escaped}"),
        // A single quote is inert in text and in the page's double-quoted attributes.
        format!("hvbench run --workload '{escaped}'"),
    ] {
        assert!(html.contains(&context), "missing escaped {context}");
    }
    // The hostile key's charts exist and carry the name escaped too.
    let svgs: Vec<&PathBuf> = summary
        .charts
        .iter()
        .filter(|c| c.format == ChartFormat::Svg)
        .map(|c| &c.path)
        .collect();
    let hostile_svg = svgs
        .iter()
        .map(|p| read(p))
        .find(|svg| svg.contains("cpu.&lt;script&gt;alert(1)&lt;/script&gt;&quot;quotes&quot;"))
        .expect("an SVG shows the hostile workload name, escaped");
    assert!(!hostile_svg.contains("<script"));
}

#[test]
fn report_content_tables_verdicts_and_problems() {
    let root = tempfile::tempdir().unwrap();
    let (kvm, xen) = two_backends(root.path());
    let out = root.path().join("report");
    let summary = render(&[kvm, xen], &out, &ReportOptions::default()).unwrap();
    assert_eq!(summary.backends, ["kvm", "xen"]);
    let html = read(&summary.index);

    // Groups cpu and io, each with its table and chart.
    assert!(html.contains("<h2 id=\"group-cpu\">Group cpu</h2>"));
    assert!(html.contains("<h2 id=\"group-io\">Group io</h2>"));
    assert_eq!(html.matches("<table class=\"measurements\">").count(), 2);
    // xen is 15% slower: kvm faster; cpu.same is one distribution on both sides.
    let row = |workload: &str| {
        let start = html
            .find(&format!("<b>{workload}</b>"))
            .unwrap_or_else(|| panic!("no row for {workload}"));
        let end = start + html[start..].find("</tr>").unwrap();
        html[start..end].to_string()
    };
    assert!(
        row("cpu.cpuid").contains("kvm faster"),
        "{}",
        row("cpu.cpuid")
    );
    assert!(
        row("cpu.same").contains("no significant difference"),
        "{}",
        row("cpu.same")
    );
    // n pools the 3 repeats: 3 x 12 samples.
    assert!(row("cpu.cpuid").contains("n = 36 from 3 records"));
    // The reproduce command of each side.
    assert!(row("cpu.cpuid").contains("hvbench run --backend xen --workload cpu.cpuid"));
    // A ratio with an interval, below 1 (kvm / xen, xen slower).
    assert!(
        row("cpu.cpuid").contains("<td class=\"num\"><span class=\"est\">0.8"),
        "{}",
        row("cpu.cpuid")
    );
    // Skipped on kvm and xen, crashed and timed out on xen: listed with reasons.
    let problems = &html[html.find("id=\"problems\"").unwrap()..];
    for text in [
        "triple fault after HLT",
        "no answer in 60 s",
        ">crash<",
        ">timeout<",
        ">skip<",
    ] {
        assert!(problems.contains(text), "problems section lacks {text}");
    }
    assert_eq!(summary.problems, 4);
    // Raw copies beside the page, linked.
    assert!(out.join("kvm-results.jsonl").is_file());
    assert!(out.join("xen-results.csv").is_file());
    assert!(html.contains("href=\"kvm-results.jsonl\""));
    assert!(html.contains("href=\"xen-results.csv\""));
    // No warning: same host class and CPU model on both sides.
    assert!(summary.warnings.is_empty(), "{:?}", summary.warnings);
}

#[test]
fn charts_decode_at_their_stated_sizes() {
    let root = tempfile::tempdir().unwrap();
    let (kvm, xen) = two_backends(root.path());
    let summary = render(
        &[kvm, xen],
        &root.path().join("r"),
        &ReportOptions::default(),
    )
    .unwrap();
    let pngs: Vec<_> = summary
        .charts
        .iter()
        .filter(|c| c.format == ChartFormat::Png)
        .collect();
    // Two group charts (cpu, io) and one strip chart per measured key.
    assert!(pngs.len() >= 2 + 13, "{} PNG charts", pngs.len());
    for chart in &pngs {
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(&chart.path).unwrap(),
        ));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let frame = reader.next_frame(&mut pixels).unwrap();
        assert_eq!(
            (frame.width, frame.height),
            (chart.width, chart.height),
            "{}",
            chart.path.display()
        );
        // Not blank: a chart has dark pixels (axes, text) and coloured ones (bars, dots).
        let dark = pixels
            .chunks(3)
            .filter(|p| p.iter().all(|&c| c < 80))
            .count();
        assert!(dark > 100, "{} looks blank", chart.path.display());
    }
    let svgs: Vec<_> = summary
        .charts
        .iter()
        .filter(|c| c.format == ChartFormat::Svg)
        .collect();
    assert_eq!(svgs.len(), pngs.len());
    let cpu_group = svgs
        .iter()
        .find(|c| {
            c.path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("group-cpu-")
        })
        .expect("cpu group chart");
    let svg = read(&cpu_group.path);
    assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains(&format!("width=\"{}\"", cpu_group.width)));
    for name in ["cpu.idle", "cpu.cpuid", "cpu.same", "kvm", "xen"] {
        // plotters writes each text node on its own line.
        assert!(
            svg.contains(&format!("\n{name}\n</text>")),
            "SVG lacks {name}"
        );
    }
}

#[test]
fn the_report_directory_stands_alone() {
    let root = tempfile::tempdir().unwrap();
    let (kvm, xen) = two_backends(root.path());
    let out = root.path().join("report");
    render(&[kvm.clone(), xen.clone()], &out, &ReportOptions::default()).unwrap();
    // Move it and delete the inputs: every link of the page still resolves.
    let moved = root.path().join("elsewhere");
    std::fs::rename(&out, &moved).unwrap();
    std::fs::remove_dir_all(&kvm).unwrap();
    std::fs::remove_dir_all(&xen).unwrap();
    let html = read(&moved.join("index.html"));
    let targets = links(&html);
    assert!(targets.len() > 20);
    for target in targets {
        if let Some(anchor) = target.strip_prefix('#') {
            assert!(
                html.contains(&format!("id=\"{anchor}\"")),
                "dangling #{anchor}"
            );
            continue;
        }
        assert!(
            !target.contains("://") && !target.starts_with('/'),
            "{target} not relative"
        );
        assert!(moved.join(&target).is_file(), "{target} missing");
    }
}

#[test]
fn rendering_is_reproducible() {
    let root = tempfile::tempdir().unwrap();
    let (kvm, xen) = two_backends(root.path());
    let out = root.path().join("r");
    let dirs = [kvm, xen];
    render(&dirs, &out, &ReportOptions::default()).unwrap();
    let first = read(&out.join("index.html"));
    render(&dirs, &out, &ReportOptions::default()).unwrap();
    assert_eq!(first, read(&out.join("index.html")));
}

#[test]
fn one_backend_is_reported_alone_and_says_so() {
    let root = tempfile::tempdir().unwrap();
    let (kvm, _) = two_backends(root.path());
    let summary = render(&[kvm], &root.path().join("r"), &ReportOptions::default()).unwrap();
    assert_eq!(summary.backends, ["kvm"]);
    let html = read(&summary.index);
    assert!(html.contains("Only kvm records were given: this report shows kvm alone"));
    assert!(
        !html.contains(" vs "),
        "no comparison column with one backend"
    );
    assert!(html.contains("n = 36 from 3 records"));
}

#[test]
fn records_pool_across_runs_and_directories() {
    let root = tempfile::tempdir().unwrap();
    let run = |dir: &str, run_id: &str, seed: u64| {
        let mut records = Vec::new();
        for repeat in 0..2 {
            let mut r = record(
                "kvm",
                "cpu.cpuid",
                &lognormal_samples(seed + repeat, 10, 200.0, 0.02),
            );
            r.run_id = run_id.into();
            r.repeat = u32::try_from(repeat).unwrap();
            records.push(r);
        }
        write_results(&root.path().join(dir), &records).unwrap();
        root.path().join(dir)
    };
    let dirs = [run("a", "run-a", 1), run("b", "run-b", 5)];
    let summary = render(&dirs, &root.path().join("r"), &ReportOptions::default()).unwrap();
    let html = read(&summary.index);
    assert!(
        html.contains("n = 40 from 4 records"),
        "2 runs x 2 repeats x 10 samples"
    );
    assert!(
        html.contains("<td>2 × 2, 4</td>"),
        "runs x repeats, records"
    );
    // Two inputs of one backend: two raw copies, distinct names.
    assert!(html.contains("href=\"kvm-results.jsonl\""));
    assert!(html.contains("href=\"kvm-2-results.jsonl\""));
}

#[test]
fn warnings_for_different_hosts_and_emulation() {
    let root = tempfile::tempdir().unwrap();
    let with_host = |backend: &str, class: &str, cpu: &str, cpl0: &str| {
        let mut records = Vec::new();
        for workload in ["cpu.cpuid", "cpu.msr-read"] {
            let mut r = record(backend, workload, &lognormal_samples(3, 10, 100.0, 0.02));
            r.host = host(class, cpu);
            r.host.cpl0 = cpl0.into();
            records.push(r);
        }
        let dir = root.path().join(backend);
        write_results(&dir, &records).unwrap();
        dir
    };
    let kvm = with_host("kvm", "pvm", "AMD EPYC 7763", "emulated");
    let qemu = with_host("qemu", "bare-metal+tcg", "Intel Xeon 8375C", "emulated");
    let summary = render(
        &[kvm, qemu],
        &root.path().join("r"),
        &ReportOptions::default(),
    )
    .unwrap();
    let all = summary.warnings.join("\n");
    for expected in [
        "kvm and qemu ran on different kinds of host",
        "kvm and qemu ran on different CPU models",
        "qemu ran under emulation (TCG)",
        "kvm ran on a kvm_pvm host: guest CPL0 is emulated",
        "The CPL0 workloads (cpu.msr-read)",
    ] {
        assert!(
            all.contains(expected),
            "missing warning {expected:?} in\n{all}"
        );
    }
    let html = read(&summary.index);
    assert!(html.matches("class=\"warning\"").count() >= 4);
    // The pvm side's cpl0 row is marked; its cpl3 row is not; every TCG cell is.
    let badge = "title=\"this code ran under emulation, not hardware virtualization\">emulated";
    let row = |w: &str| {
        let start = html.find(&format!("<b>{w}</b>")).unwrap();
        html[start..start + html[start..].find("</tr>").unwrap()].to_string()
    };
    assert_eq!(row("cpu.msr-read").matches(badge).count(), 2);
    assert_eq!(row("cpu.cpuid").matches(badge).count(), 1);
}

#[test]
fn missing_empty_or_malformed_results_are_clear_errors() {
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("r");
    let options = ReportOptions::default();
    let expect = |dirs: &[PathBuf], what: &str| {
        let e = render(dirs, &out, &options).unwrap_err();
        let message = e.to_string();
        assert!(message.contains(what), "{message:?} lacks {what:?}");
        e
    };
    assert!(matches!(
        expect(&[], "no results directory"),
        ReportError::NoInputs
    ));
    let missing = root.path().join("missing");
    assert!(matches!(
        expect(&[missing], "does not exist"),
        ReportError::Results(ResultsError::MissingDir { .. })
    ));
    let empty_dir = root.path().join("empty-dir");
    std::fs::create_dir(&empty_dir).unwrap();
    assert!(matches!(
        expect(
            std::slice::from_ref(&empty_dir),
            "not an hvbench results directory"
        ),
        ReportError::Results(ResultsError::MissingResults { .. })
    ));
    std::fs::write(empty_dir.join(JSONL_NAME), "\n").unwrap();
    assert!(matches!(
        expect(std::slice::from_ref(&empty_dir), "holds no records"),
        ReportError::Results(ResultsError::Empty { .. })
    ));
    std::fs::write(
        empty_dir.join(JSONL_NAME),
        "{\"schema\": 1, \"workload\": 3}\n",
    )
    .unwrap();
    assert!(matches!(
        expect(&[empty_dir], "line 1: not a valid record"),
        ReportError::Results(ResultsError::Malformed { line: 1, .. })
    ));
    // A good directory beside a bad one still fails: no half report.
    let good = root.path().join("good");
    write_results(&good, &[problem("kvm", "cpu.hlt", Status::Skip, "no")]).unwrap();
    let e = render(&[good.clone(), root.path().join("nope")], &out, &options).unwrap_err();
    assert!(e.to_string().contains("nope"), "{e}");
    // A baseline that is not there.
    let e = render(
        &[good],
        &out,
        &ReportOptions {
            baseline: Some("xen".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, ReportError::UnknownBaseline { .. }), "{e}");
    assert!(!out.join("index.html").exists());
}

#[test]
fn a_report_of_only_failed_records_still_renders() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("k");
    write_results(
        &dir,
        &[
            problem("kvm", "cpu.hlt", Status::Crash, "boom"),
            problem("kvm", HOSTILE_WORKLOAD, Status::Error, "bad"),
        ],
    )
    .unwrap();
    let summary = render(&[dir], &root.path().join("r"), &ReportOptions::default()).unwrap();
    assert!(summary.charts.is_empty());
    assert_eq!(summary.problems, 2);
    let html = read(&summary.index);
    assert!(html.contains("boom"));
}

#[test]
fn large_groups_split_and_stale_charts_go() {
    let root = tempfile::tempdir().unwrap();
    let records: Vec<_> = (0..45)
        .map(|size| {
            let mut r = record("kvm", "cpu.cpuid", &lognormal_samples(size, 5, 100.0, 0.02));
            r.series.insert("size".into(), size.to_string());
            r
        })
        .collect();
    let dir = root.path().join("k");
    write_results(&dir, &records).unwrap();
    let out = root.path().join("r");
    let dirs = [dir];
    let summary = render(&dirs, &out, &ReportOptions::default()).unwrap();
    let group_pngs = |charts: &[reports::plot::ChartFile]| {
        charts
            .iter()
            .filter(|c| c.format == ChartFormat::Png)
            .filter(|c| {
                c.path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("group-")
            })
            .count()
    };
    assert_eq!(group_pngs(&summary.charts), 2, "45 measurements: 40 + 5");
    assert_eq!(summary.charts.len(), 2 * (2 + 45));
    let files = || std::fs::read_dir(out.join("charts")).unwrap().count();
    assert_eq!(files(), summary.charts.len());
    // Without strip charts, the earlier ones are removed: the directory matches the page.
    let without = ReportOptions {
        sample_charts: false,
        ..Default::default()
    };
    let summary = render(&dirs, &out, &without).unwrap();
    assert_eq!(summary.charts.len(), 4);
    assert_eq!(files(), 4);
}
