//! The report page: one self-contained HTML file (inline CSS, no script, no external
//! resource), with the charts beside it referenced relatively.
//!
//! Every string that came from a record goes through [`escape`]: the guest and the records
//! are untrusted input, and a workload name or a reason must show as text, never act as
//! markup. Numbers are formatted here and escaped all the same.

use std::fmt::Write as _;
use std::path::Path;

use crate::abtest::{runs_needed, Change, Direction};
use crate::format;
use crate::plot::{backend_color_hex, ChartFile, ChartFormat};
use crate::record::{GuestInfo, HostInfo};
use crate::report::{
    measurement_anchor, BackendView, Cell, Charts, Measurement, Model, RawCopy, ReportOptions,
    Versus, CHARTS_DIR,
};

/// Escapes text for HTML element content and quoted attribute values alike.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

pub(crate) struct Page<'a> {
    pub title: &'a str,
    pub model: &'a Model,
    pub charts: &'a Charts,
    pub raw: &'a [RawCopy],
    pub options: &'a ReportOptions,
    pub out: &'a Path,
}

const STYLE: &str = r#"
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d1d1f;margin:0 auto;max-width:1500px;padding:12px 24px 48px}
h1{font-size:24px;margin:8px 0 4px}h2{font-size:19px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:30px}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#555;margin:0 0 6px}nav{margin:0 0 12px}
table{border-collapse:collapse;margin:6px 0 14px}th,td{border:1px solid #d6d6d6;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f1f3f5;font-weight:600}
td.num{font-variant-numeric:tabular-nums;min-width:150px}.est{white-space:nowrap}.reason{max-width:300px}
.ci,.n,.detail{color:#666;font-size:12px}.n{display:block}
.warning{background:#fff3e0;border-left:5px solid #e8590c;padding:8px 12px;margin:8px 0}
.notice{background:#e7f0ff;border-left:5px solid #1c64d1;padding:8px 12px;margin:8px 0}
.warning b,.notice b{display:block}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
code{font:12px/1.35 ui-monospace,"DejaVu Sans Mono",monospace;word-break:break-all}
.badge{display:inline-block;font-size:11px;padding:0 6px;border-radius:8px;background:#ffe3e3;color:#a61e1e;margin-left:4px}
.status{font-weight:600;color:#a61e1e}.status-skip{color:#8a6d00}
.faster{font-weight:600}.same{color:#444}
tr.differs td{background:#fff8e6}
figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}figcaption{font-size:12px;color:#555}
img{border:1px solid #e3e3e3;max-width:100%;height:auto}
.cmd{width:380px;margin-bottom:3px}.cmd code{word-break:normal;overflow-wrap:anywhere}
table.hosts th{white-space:nowrap}table.hosts td{overflow-wrap:anywhere;max-width:560px}
details summary{cursor:pointer;color:#333}
"#;

pub(crate) fn render_page(page: &Page) -> String {
    let model = page.model;
    let mut html = String::with_capacity(64 * 1024 + model.measurements.len() * 2048);
    let backends = model.backend_names();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n",
        escape(page.title),
        escape(page.title)
    );
    let legend: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{}{}", swatch(i), escape(b)))
        .collect();
    let _ = writeln!(
        html,
        "<p class=\"sub\">Backends: {}{}. {} records, {} measurements.</p>",
        legend.join(", "),
        if backends.len() > 1 {
            format!(
                " (backend A is {}; ratios are A / other)",
                escape(&backends[0])
            )
        } else {
            String::new()
        },
        model.inputs.iter().map(|i| i.records).sum::<usize>(),
        model.measurements.len()
    );
    let mut nav = vec!["<a href=\"#hosts\">hosts</a>".to_string()];
    for (group, _) in model.groups() {
        nav.push(format!(
            "<a href=\"#group-{}\">{}</a>",
            escape(&format::slug(&group, 40)),
            escape(&group)
        ));
    }
    if !page.charts.curves.is_empty() {
        nav.push("<a href=\"#curves\">curves</a>".into());
    }
    nav.push(format!(
        "<a href=\"#problems\">skipped and failed ({})</a>",
        model.problems.len()
    ));
    nav.push("<a href=\"#raw\">raw results</a>".into());
    nav.push("<a href=\"#method\">method</a>".into());
    let _ = writeln!(html, "<nav>{}</nav>", nav.join(" · "));
    for notice in &model.notices {
        let _ = writeln!(html, "<div class=\"notice\">{}</div>", escape(notice));
    }
    for warning in &model.warnings {
        let _ = writeln!(
            html,
            "<div class=\"warning\" role=\"alert\"><b>Warning: {}</b>{}</div>",
            escape(&warning.title),
            escape(&warning.detail)
        );
    }

    hosts_section(&mut html, &model.backends);
    for (group, measurements) in model.groups() {
        group_section(&mut html, page, &group, &measurements);
    }
    curves_section(&mut html, page);
    problems_section(&mut html, model);
    raw_section(&mut html, page);
    method_section(&mut html, page.options, backends.len());
    html.push_str("</body>\n</html>\n");
    html
}

fn swatch(index: usize) -> String {
    format!(
        "<span class=\"swatch\" style=\"background:{}\"></span>",
        backend_color_hex(index)
    )
}

/// Distinct non-empty values, in order, joined.
fn join_distinct(values: impl IntoIterator<Item = String>) -> String {
    let mut seen: Vec<String> = Vec::new();
    for v in values {
        if !v.is_empty() && !seen.contains(&v) {
            seen.push(v);
        }
    }
    seen.join(" / ")
}

type HostField = (&'static str, fn(&HostInfo) -> String);
type GuestField = (&'static str, fn(&GuestInfo) -> String);

const HOST_FIELDS: &[HostField] = &[
    ("host class", |h| h.class.clone()),
    ("hostname", |h| h.hostname.clone()),
    ("CPU vendor", |h| h.cpu_vendor.clone()),
    ("CPU model", |h| h.cpu_model.clone()),
    ("CPUs", |h| h.cpus.to_string()),
    ("memory (MiB)", |h| h.memory_mib.to_string()),
    ("VMX / SVM", |h| format!("{} / {}", h.vmx, h.svm)),
    ("runs under a hypervisor", |h| h.hypervisor_flag.to_string()),
    ("kernel", |h| h.kernel.clone()),
    ("KVM module", |h| h.kvm_module.clone()),
    ("guest paging", |h| h.paging.clone()),
    ("guest CPL0", |h| h.cpl0.clone()),
    ("TSC", |h| match h.tsc_khz {
        Some(khz) => format!("{khz} kHz ({})", h.tsc_source),
        None => format!("unknown ({})", h.tsc_source),
    }),
    ("THP", |h| h.thp.clone()),
    ("KSM", |h| h.ksm.clone()),
];

fn hosts_section(html: &mut String, backends: &[BackendView]) {
    html.push_str(
        "<h2 id=\"hosts\">Hosts and backends</h2>\n<table class=\"hosts\">\n<tr><th></th>",
    );
    for (i, b) in backends.iter().enumerate() {
        let _ = write!(html, "<th>{}{}</th>", swatch(i), escape(&b.name));
    }
    html.push_str("</tr>\n");
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    for (label, field) in HOST_FIELDS {
        rows.push((
            label.to_string(),
            backends
                .iter()
                .map(|b| join_distinct(b.hosts.iter().map(field)))
                .collect(),
        ));
    }
    let extra_keys: std::collections::BTreeSet<&String> = backends
        .iter()
        .flat_map(|b| b.hosts.iter().flat_map(|h| h.extra.keys()))
        .collect();
    for key in extra_keys {
        rows.push((
            key.clone(),
            backends
                .iter()
                .map(|b| {
                    join_distinct(
                        b.hosts
                            .iter()
                            .map(|h| h.extra.get(key).cloned().unwrap_or_default()),
                    )
                })
                .collect(),
        ));
    }
    rows.push((
        "backend version".into(),
        backends
            .iter()
            .map(|b| join_distinct(b.infos.iter().map(|i| i.version.clone())))
            .collect(),
    ));
    let detail_keys: std::collections::BTreeSet<&String> = backends
        .iter()
        .flat_map(|b| b.infos.iter().flat_map(|i| i.details.keys()))
        .collect();
    for key in detail_keys {
        rows.push((
            format!("backend {key}"),
            backends
                .iter()
                .map(|b| {
                    join_distinct(
                        b.infos
                            .iter()
                            .map(|i| i.details.get(key).cloned().unwrap_or_default()),
                    )
                })
                .collect(),
        ));
    }
    let guest_rows: [GuestField; 4] = [
        ("guest saw hypervisor", |g| {
            format!("{} ({})", g.hypervisor, g.signature)
        }),
        ("guest image sha256", |g| g.image_sha256.clone()),
        ("guest TSC", |g| match g.tsc_khz {
            Some(khz) => format!("{khz} kHz ({})", g.tsc_source),
            None => format!("unknown ({})", g.tsc_source),
        }),
        ("guest RAM", |g| {
            g.ram_bytes
                .map(|b| format!("{} MiB", b / (1024 * 1024)))
                .unwrap_or_default()
        }),
    ];
    for (label, field) in guest_rows {
        rows.push((
            label.into(),
            backends
                .iter()
                .map(|b| {
                    // Records skipped before any boot carry no guest's view.
                    join_distinct(
                        b.guests
                            .iter()
                            .filter(|g| !g.hypervisor.is_empty())
                            .map(field),
                    )
                })
                .collect(),
        ));
    }
    rows.push((
        "run parameters".into(),
        backends
            .iter()
            .map(|b| {
                join_distinct(b.parameters.iter().map(|p| {
                    format!(
                        "{} samples, {} warm-up, {} µs/sample, {} vCPU, {} MiB",
                        p.samples, p.warmup, p.sample_us, p.vcpus, p.memory_mib
                    )
                }))
            })
            .collect(),
    ));
    rows.push((
        "hvbench".into(),
        backends
            .iter()
            .map(|b| {
                join_distinct(
                    b.tools
                        .iter()
                        .map(|t| format!("{} ({})", t.version, t.git_revision)),
                )
            })
            .collect(),
    ));
    rows.push((
        "runs × repeats, records".into(),
        backends
            .iter()
            .map(|b| format!("{} × {}, {}", b.run_ids.len(), b.repeats.len(), b.records))
            .collect(),
    ));
    for (label, values) in rows {
        let differs = values.windows(2).any(|w| w[0] != w[1]);
        let _ = write!(
            html,
            "<tr{}><th>{}</th>",
            if differs && values.len() > 1 {
                " class=\"differs\""
            } else {
                ""
            },
            escape(&label)
        );
        for v in values {
            let _ = write!(html, "<td>{}</td>", escape(&v));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    if backends.len() > 1 {
        html.push_str("<p class=\"detail\">Rows where the backends differ are highlighted.</p>\n");
    }
}

fn estimate_html(e: &crate::bootstrap::Estimate) -> String {
    format!(
        "<span class=\"est\">{} <span class=\"ci\">[{}, {}]</span></span>",
        escape(&format::number(e.value)),
        escape(&format::number(e.low)),
        escape(&format::number(e.high))
    )
}

fn cell_html(cell: &Cell, backend: &BackendView, privilege: &str) -> String {
    let Some(pool) = &cell.pool else {
        return "<span class=\"detail\">not run</span>".into();
    };
    let mut out = String::new();
    match (&cell.median, &cell.error) {
        (Some(e), _) => out.push_str(&estimate_html(e)),
        (None, Some(error)) => {
            let _ = write!(out, "<span class=\"status\">{}</span>", escape(error));
        }
        (None, None) => {
            let status = pool.worst_status.name();
            let _ = write!(
                out,
                "<span class=\"status status-{}\">{}</span>",
                escape(status),
                escape(status)
            );
            if let Some(reason) = pool.reasons.iter().next() {
                let _ = write!(out, "<div class=\"detail reason\">{}</div>", escape(reason));
            }
        }
    }
    if pool.is_measured() {
        let _ = write!(
            out,
            "<span class=\"n\">n = {} from {} record{}",
            pool.samples.len(),
            pool.measured_records,
            if pool.measured_records == 1 { "" } else { "s" }
        );
        if pool.records > pool.measured_records {
            let _ = write!(
                out,
                ", {} not successful ({})",
                pool.records - pool.measured_records,
                escape(pool.worst_status.name())
            );
        }
        out.push_str("</span>");
    }
    if backend.emulates(privilege) {
        out.push_str(
            "<span class=\"badge\" title=\"this code ran under emulation, not hardware \
             virtualization\">emulated</span>",
        );
    }
    out
}

/// `runs_needed`: runs per side with which the test takes runs as its units.
fn verdict_html(versus: &Versus, a: &str, b: &str, runs_needed: usize) -> String {
    let Some(test) = &versus.test else {
        return "<span class=\"detail\">needs samples on both sides</span>".into();
    };
    let detail = format!(
        "<span class=\"n\">Δmean {} · p {}</span>",
        escape(&format::percent(test.relative_change)),
        escape(&if test.p_value < 0.001 {
            format::p_value(test.p_value)
        } else {
            format!("= {}", format::p_value(test.p_value))
        })
    );
    let faster = |name: &str| format!("<span class=\"faster\">{} faster</span>", escape(name));
    let verdict = match test.change {
        Change::Worse => faster(a),
        Change::Better => faster(b),
        Change::Changed => {
            "<span class=\"faster\">differ (which is better is unknown)</span>".into()
        }
        Change::NoSignificantChange => {
            "<span class=\"same\">no significant difference</span>".into()
        }
    };
    let caveat = if versus.per_run {
        String::new()
    } else {
        format!(
            "<span class=\"n\" title=\"the test pooled the samples of too few runs to see how \
             much a boot shifts all its samples together; run --repeat {runs_needed} on each \
             side for a test on runs\">too few runs: boot-to-boot drift not measured</span>"
        )
    };
    format!("{verdict}{detail}{caveat}")
}

fn workload_html(m: &Measurement) -> String {
    let direction = match m.direction {
        Direction::LowerIsBetter => ", lower is better",
        Direction::HigherIsBetter => ", higher is better",
        Direction::Unknown => "",
    };
    let mut out = format!(
        "<b>{}</b><span class=\"n\">{}, {}{direction}{}</span>",
        escape(&m.key.workload),
        escape(&m.key.metric),
        escape(&m.unit),
        if m.key.series.is_empty() {
            String::new()
        } else {
            format!(", {}", escape(&m.key.series))
        }
    );
    if !m.privilege.is_empty() {
        let _ = write!(out, "<span class=\"n\">{}</span>", escape(&m.privilege));
    }
    let notes: Vec<String> = m
        .cells
        .iter()
        .filter_map(|c| c.pool.as_ref())
        .flat_map(|p| {
            p.notes.iter().map(move |(name, values)| {
                format!(
                    "{} {}={}",
                    p.backend,
                    name,
                    values.iter().cloned().collect::<Vec<_>>().join("|")
                )
            })
        })
        .collect();
    if !m.description.is_empty() || !notes.is_empty() {
        let _ = write!(
            out,
            "<details><summary class=\"detail\">about</summary><span class=\"detail\">{}</span>",
            escape(&m.description)
        );
        for note in notes {
            let _ = write!(out, "<span class=\"n\">note: {}</span>", escape(&note));
        }
        out.push_str("</details>");
    }
    out
}

fn reproduce_html(m: &Measurement, backends: &[String]) -> String {
    let mut out = String::new();
    for (i, cell) in m.cells.iter().enumerate() {
        let Some(pool) = &cell.pool else { continue };
        for command in &pool.reproduce {
            let _ = write!(
                out,
                "<div class=\"cmd\">{}<code>{}</code></div>",
                if backends.len() > 1 {
                    swatch(i)
                } else {
                    String::new()
                },
                escape(command)
            );
        }
    }
    out
}

fn chart_src(file: &ChartFile) -> String {
    let name = file
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{CHARTS_DIR}/{name}")
}

fn figure_html(files: &[ChartFile], alt: &str, caption: &str) -> String {
    let Some(shown) = files
        .iter()
        .find(|f| f.format == ChartFormat::Png)
        .or_else(|| files.first())
    else {
        return String::new();
    };
    let links: Vec<String> = files
        .iter()
        .map(|f| {
            format!(
                "<a href=\"{}\">{}</a>",
                escape(&chart_src(f)),
                f.format.extension().to_uppercase()
            )
        })
        .collect();
    format!(
        "<figure><img src=\"{}\" width=\"{}\" height=\"{}\" alt=\"{}\" loading=\"lazy\">\
         <figcaption>{} · {}</figcaption></figure>\n",
        escape(&chart_src(shown)),
        shown.width,
        shown.height,
        escape(alt),
        escape(caption),
        links.join(" · ")
    )
}

fn group_section(html: &mut String, page: &Page, group: &str, measurements: &[&Measurement]) {
    let model = page.model;
    let backends = model.backend_names();
    let level = crate::report::level_text(page.options.bootstrap.level);
    let _ = writeln!(
        html,
        "<h2 id=\"group-{}\">Group {}</h2>",
        escape(&format::slug(group, 40)),
        escape(group)
    );
    html.push_str("<table class=\"measurements\">\n<tr><th>measurement</th>");
    for (i, b) in backends.iter().enumerate() {
        let _ = write!(
            html,
            "<th>{}{} median <span class=\"ci\">[{} CI]</span></th>",
            swatch(i),
            escape(b),
            escape(&level)
        );
    }
    for b in backends.iter().skip(1) {
        let _ = write!(
            html,
            "<th>{} / {} <span class=\"ci\">[{} CI]</span></th><th>{} vs {}</th>",
            escape(&backends[0]),
            escape(b),
            escape(&level),
            escape(&backends[0]),
            escape(b)
        );
    }
    html.push_str("<th>reproduce</th></tr>\n");
    for m in measurements {
        let _ = write!(
            html,
            "<tr id=\"{}\"><td>{}</td>",
            escape(&m.anchor()),
            workload_html(m)
        );
        for (i, cell) in m.cells.iter().enumerate() {
            let _ = write!(
                html,
                "<td class=\"num\">{}</td>",
                cell_html(cell, &model.backends[i], &m.privilege)
            );
        }
        for (i, versus) in m.versus.iter().enumerate() {
            let ratio = versus
                .ratio
                .as_ref()
                .map(estimate_html)
                .unwrap_or_else(|| "<span class=\"detail\">—</span>".into());
            let _ = write!(
                html,
                "<td class=\"num\">{ratio}</td><td>{}</td>",
                verdict_html(
                    versus,
                    &backends[0],
                    &backends[i + 1],
                    runs_needed(page.options.ab.p_threshold, 1),
                )
            );
        }
        let _ = writeln!(html, "<td>{}</td></tr>", reproduce_html(m, &backends));
    }
    html.push_str("</table>\n");

    let level = crate::report::level_text(page.options.bootstrap.level);
    for ((chart_group, unit), parts) in &page.charts.groups {
        if chart_group != group {
            continue;
        }
        for files in parts {
            html.push_str(&figure_html(
                files,
                &format!("median {unit} of each {group} measurement per backend, with {level} CI"),
                &format!("{group}: medians with {level} bootstrap intervals ({unit})"),
            ));
        }
    }
    let sample_figures: Vec<String> = measurements
        .iter()
        .filter_map(|m| {
            let files = page.charts.samples.get(&m.anchor())?;
            Some(figure_html(
                files,
                &format!("every sample of {} per backend", m.key),
                &m.key.to_string(),
            ))
        })
        .collect();
    if !sample_figures.is_empty() {
        let _ = write!(
            html,
            "<h3>Every sample, per measurement</h3>\n<div class=\"samples\">\n{}</div>\n",
            sample_figures.concat()
        );
    }
}

/// Time series the host observed (KSM's sharing, a VMM's memory), one chart per curve.
fn curves_section(html: &mut String, page: &Page) {
    if page.charts.curves.is_empty() {
        return;
    }
    html.push_str(
        "<h2 id=\"curves\">Curves over time</h2>\n<p>What the host observed while a \
         host-driven workload ran, one line per run.</p>\n<div class=\"samples\">\n",
    );
    for ((workload, name), files) in &page.charts.curves {
        html.push_str(&figure_html(
            files,
            &format!("{name} of {workload} over time, one line per run"),
            &format!("{workload}: {name}"),
        ));
    }
    html.push_str("</div>\n");
}

fn problems_section(html: &mut String, model: &Model) {
    html.push_str("<h2 id=\"problems\">Skipped and failed workloads</h2>\n");
    if model.problems.is_empty() {
        html.push_str("<p>Every record succeeded.</p>\n");
        return;
    }
    html.push_str(
        "<table class=\"problems\">\n<tr><th>backend</th><th>measurement</th><th>status</th>\
         <th>reason</th><th>records</th><th>notes</th><th>reproduce</th></tr>\n",
    );
    for group in &model.problems {
        let p = &group.problem;
        let index = model
            .backends
            .iter()
            .position(|b| b.name == p.backend)
            .unwrap_or(0);
        let repeats: Vec<String> = group.repeats.iter().map(u32::to_string).collect();
        let notes: Vec<String> = p.notes.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            html,
            "<tr><td>{}{}</td><td><a href=\"#{}\">{}</a></td>\
             <td><span class=\"status status-{}\">{}</span></td><td>{}</td>\
             <td class=\"num\">{} <span class=\"n\">repeat {}</span></td><td>{}</td>\
             <td><div class=\"cmd\"><code>{}</code></div></td></tr>",
            swatch(index),
            escape(&p.backend),
            escape(&measurement_anchor(&p.key)),
            escape(&p.key.to_string()),
            escape(p.status.name()),
            escape(p.status.name()),
            escape(p.reason.as_deref().unwrap_or("no reason given")),
            group.count,
            escape(&repeats.join(", ")),
            escape(&notes.join(", ")),
            escape(&p.reproduce)
        );
    }
    html.push_str("</table>\n");
}

fn raw_section(html: &mut String, page: &Page) {
    html.push_str(
        "<h2 id=\"raw\">Raw results</h2>\n<p>Copies of every input, beside this page:</p>\n<ul>\n",
    );
    for copy in page.raw {
        let Some(input) = page.model.inputs.get(copy.input) else {
            continue;
        };
        let csv = match &copy.csv {
            Some(name) => format!("<a href=\"{}\">{}</a>", escape(name), escape(name)),
            None => "no CSV in the input".into(),
        };
        let _ = writeln!(
            html,
            "<li><a href=\"{}\">{}</a>, {} — {} records of {} from <code>{}</code></li>",
            escape(&copy.jsonl),
            escape(&copy.jsonl),
            csv,
            input.records,
            escape(&input.backends.join(", ")),
            escape(&input.dir.display().to_string())
        );
    }
    let _ = writeln!(
        html,
        "</ul>\n<p class=\"detail\">Report directory when written: <code>{}</code></p>",
        escape(&page.out.display().to_string())
    );
}

fn method_section(html: &mut String, options: &ReportOptions, backends: usize) {
    let b = &options.bootstrap;
    let ab = &options.ab;
    let _ = writeln!(
        html,
        "<h2 id=\"method\">Method</h2>\n<p>Samples of every repeat and run pool by backend and \
         measurement (workload, metric, series); n counts the pooled samples. Medians carry a \
         {level:.0}% percentile-bootstrap interval ({resamples} resamples, seed {seed:#x}, so \
         the page is reproducible).{ratio}</p>",
        level = b.level * 100.0,
        resamples = b.resamples,
        seed = b.seed,
        ratio = if backends > 1 {
            format!(
                " The ratio of medians A / B has its own interval, each side resampled \
                 independently. One backend is called faster only where a permutation test on \
                 the difference of means ({} relabellings) gives p &lt; {} and the means differ \
                 by more than {:.1}% (the noise threshold); otherwise there is no significant \
                 difference. With enough runs on both sides (at least {runs} each: --repeat {runs}) the \
                 test takes each run's median as one unit; with fewer it pools the samples of \
                 the runs there are, which cannot see how far a boot shifts all its samples \
                 together (several percent on some hosts), and the page says so. The test is \
                 on the means and the ratio on the medians, so where the tails of the two \
                 sides differ, the two can disagree.",
                ab.permutation.resamples,
                ab.p_threshold,
                ab.noise * 100.0,
                runs = runs_needed(ab.p_threshold, 1),
            )
        } else {
            String::new()
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_neutralises_markup() {
        assert_eq!(
            escape("<script>alert(1)</script> & \"q\" 'a'"),
            "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;q&quot; &#39;a&#39;"
        );
        assert_eq!(escape("plain"), "plain");
    }
}
