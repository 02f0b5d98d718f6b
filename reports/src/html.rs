//! The report page: one self-contained HTML file (inline CSS, no script, no external
//! resource), with the charts beside it referenced relatively.
//!
//! The page is a maud template: every value spliced into it is escaped by the template
//! engine (the guest and the records are untrusted input, and a workload name or a reason
//! must show as text, never act as markup). The only unescaped text is the style sheet,
//! a constant of this file.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::abtest::{runs_needed, Change, Direction};
use crate::format;
use crate::matrix::{GridCell, MatrixSummary};
use crate::plot::{backend_color_hex, ChartFile, ChartFormat};
use crate::record::{GuestInfo, HostInfo};
use crate::report::charts::{level_text, Charts};
use crate::report::model::{
    measurement_anchor, BackendView, Cell, Measurement, Model, ProblemGroup, Versus,
};
use crate::report::options::{ReportOptions, CHARTS_DIR};
use crate::report::raw::RawCopy;
use std::path::Path;

pub(crate) struct Page<'a> {
    pub title: &'a str,
    pub model: &'a Model,
    pub charts: &'a Charts,
    pub raw: &'a [RawCopy],
    /// Merged benchmark matrices among the inputs: their grids.
    pub matrices: &'a [MatrixSummary],
    pub options: &'a ReportOptions,
    pub out: &'a Path,
    /// The scheduling summary (`sched.*` records), empty without any.
    pub sched: &'a [crate::sched::SchedRow],
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
    let backends = model.backend_names();
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (page.title) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                h1 { (page.title) }
                (summary_line(model, &backends))
                (navigation(page))
                @for notice in &model.notices {
                    div.notice { (notice) }
                }
                @for warning in &model.warnings {
                    div.warning role="alert" { b { "Warning: " (warning.title) } (warning.detail) }
                }
                @for m in page.matrices {
                    (matrix_section(m))
                }
                (hosts_section(&model.backends))
                (insns_section(model))
                @for (group, measurements) in model.groups() {
                    (group_section(page, &group, &measurements))
                }
                (sched_section(page))
                (curves_section(page))
                (cdf_section(page))
                (convergence_section(page))
                (problems_section(model))
                (raw_section(page))
                (method_section(page.options, backends.len()))
            }
        }
    }
    .into_string()
}

fn summary_line(model: &Model, backends: &[String]) -> Markup {
    let records: usize = model.inputs.iter().map(|i| i.records).sum();
    html! {
        p.sub {
            "Backends: "
            @for (i, b) in backends.iter().enumerate() {
                @if i > 0 { ", " }
                (swatch(i)) (b)
            }
            @if let (true, Some(first)) = (backends.len() > 1, backends.first()) {
                " (backend A is " (first) "; ratios are A / other)"
            }
            ". " (records) " records, " (model.measurements.len()) " measurements."
        }
    }
}

fn navigation(page: &Page) -> Markup {
    let model = page.model;
    let mut links: Vec<Markup> = vec![html! { a href="#hosts" { "hosts" } }];
    if model.insns.is_some() {
        links.push(html! { a href="#insns" { "instructions per operation" } });
    }
    if !page.matrices.is_empty() {
        links.insert(0, html! { a href="#matrix" { "matrix" } });
    }
    for (group, _) in model.groups() {
        let anchor = format!("#group-{}", format::slug(&group, 40));
        links.push(html! { a href=(anchor) { (group) } });
    }
    if !page.sched.is_empty() {
        links.push(html! { a href="#scheduling" { "scheduling" } });
    }
    if !page.charts.curves.is_empty() {
        links.push(html! { a href="#curves" { "curves" } });
    }
    if !page.charts.cdfs.is_empty() {
        links.push(html! { a href="#latency-cdf" { "latency CDFs" } });
    }
    if !page.charts.convergence.is_empty() {
        links.push(html! { a href="#convergence" { "migration convergence" } });
    }
    links.push(html! { a href="#problems" { "skipped and failed (" (model.problems.len()) ")" } });
    links.push(html! { a href="#raw" { "raw results" } });
    links.push(html! { a href="#method" { "method" } });
    html! {
        nav {
            @for (i, link) in links.into_iter().enumerate() {
                @if i > 0 { " · " }
                (link)
            }
        }
    }
}

fn swatch(index: usize) -> Markup {
    let style = format!("background:{}", backend_color_hex(index));
    html! { span.swatch style=(style) {} }
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

const GUEST_FIELDS: &[GuestField] = &[
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

/// One row of the hosts table: a label and one value per backend.
type HostRow = (String, Vec<String>);

/// Per backend, the distinct values of `field` over what `items` picks from it.
fn per_backend<T>(
    backends: &[BackendView],
    items: impl Fn(&BackendView) -> &[T],
    field: impl Fn(&T) -> String,
) -> Vec<String> {
    backends
        .iter()
        .map(|b| join_distinct(items(b).iter().map(&field)))
        .collect()
}

fn host_rows(backends: &[BackendView]) -> Vec<HostRow> {
    let mut rows: Vec<HostRow> = HOST_FIELDS
        .iter()
        .map(|(label, field)| {
            (
                label.to_string(),
                per_backend(backends, |b| &b.hosts, field),
            )
        })
        .collect();
    let extra_keys: std::collections::BTreeSet<&String> = backends
        .iter()
        .flat_map(|b| b.hosts.iter().flat_map(|h| h.extra.keys()))
        .collect();
    for key in extra_keys {
        let values = per_backend(
            backends,
            |b| &b.hosts,
            |h| h.extra.get(key).cloned().unwrap_or_default(),
        );
        rows.push((key.clone(), values));
    }
    let version = per_backend(backends, |b| &b.infos, |i| i.version.clone());
    rows.push(("backend version".into(), version));
    let detail_keys: std::collections::BTreeSet<&String> = backends
        .iter()
        .flat_map(|b| b.infos.iter().flat_map(|i| i.details.keys()))
        .collect();
    for key in detail_keys {
        let values = per_backend(
            backends,
            |b| &b.infos,
            |i| i.details.get(key).cloned().unwrap_or_default(),
        );
        rows.push((format!("backend {key}"), values));
    }
    rows
}

fn guest_and_run_rows(backends: &[BackendView]) -> Vec<HostRow> {
    let mut rows: Vec<HostRow> = GUEST_FIELDS
        .iter()
        .map(|(label, field)| {
            let values = backends
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
                .collect();
            (label.to_string(), values)
        })
        .collect();
    let parameters = per_backend(
        backends,
        |b| &b.parameters,
        |p| {
            format!(
                "{} samples, {} warm-up, {} µs/sample, {} vCPU, {} MiB",
                p.samples, p.warmup, p.sample_us, p.vcpus, p.memory_mib
            )
        },
    );
    rows.push(("run parameters".into(), parameters));
    let tools = per_backend(
        backends,
        |b| &b.tools,
        |t| format!("{} ({})", t.version, t.git_revision),
    );
    rows.push(("hvbench".into(), tools));
    let counts = backends
        .iter()
        .map(|b| format!("{} × {}, {}", b.run_ids.len(), b.repeats.len(), b.records))
        .collect();
    rows.push(("runs × repeats, records".into(), counts));
    rows
}

fn hosts_section(backends: &[BackendView]) -> Markup {
    let mut rows = host_rows(backends);
    rows.extend(guest_and_run_rows(backends));
    html! {
        h2 id="hosts" { "Hosts and backends" }
        table.hosts {
            tr {
                th {}
                @for (i, b) in backends.iter().enumerate() {
                    th { (swatch(i)) (b.name) }
                }
            }
            @for (label, values) in &rows {
                @let differs = values.len() > 1 && values.windows(2).any(|w| w[0] != w[1]);
                tr class=[differs.then_some("differs")] {
                    th { (label) }
                    @for v in values { td { (v) } }
                }
            }
        }
        @if backends.len() > 1 {
            p.detail { "Rows where the backends differ are highlighted." }
        }
    }
}

fn estimate_html(e: &crate::bootstrap::Estimate) -> Markup {
    html! {
        span.est {
            (format::number(e.value)) " "
            span.ci { "[" (format::number(e.low)) ", " (format::number(e.high)) "]" }
        }
    }
}

fn cell_html(cell: &Cell, backend: &BackendView, privilege: &str) -> Markup {
    let Some(pool) = &cell.pool else {
        return html! { span.detail { "not run" } };
    };
    let status = pool.worst_status.name();
    let unsuccessful = pool.records - pool.measured_records;
    html! {
        @match (&cell.median, &cell.error) {
            (Some(e), _) => (estimate_html(e)),
            (None, Some(error)) => span.status { (error) },
            (None, None) => {
                span class=(format!("status status-{status}")) { (status) }
                @if let Some(reason) = pool.reasons.iter().next() {
                    div.detail.reason { (reason) }
                }
            }
        }
        @if pool.is_measured() {
            span.n {
                "n = " (pool.samples.len()) " from " (pool.measured_records) " record"
                @if pool.measured_records != 1 { "s" }
                @if unsuccessful > 0 { ", " (unsuccessful) " not successful (" (status) ")" }
            }
        }
        @if backend.emulates(privilege) {
            span.badge title="this code ran under emulation, not hardware virtualization" {
                "emulated"
            }
        }
    }
}

/// `runs_needed`: runs per side with which the test takes runs as its units.
fn verdict_html(versus: &Versus, a: &str, b: &str, runs_needed: usize) -> Markup {
    let Some(test) = &versus.test else {
        return html! { span.detail { "needs samples on both sides" } };
    };
    let p = if test.p_value < 0.001 {
        format::p_value(test.p_value)
    } else {
        format!("= {}", format::p_value(test.p_value))
    };
    let caveat_title = format!(
        "the test pooled the samples of too few runs to see how much a boot shifts all its \
         samples together; run --repeat {runs_needed} on each side for a test on runs"
    );
    html! {
        @match test.change {
            Change::Worse => span.faster { (a) " faster" },
            Change::Better => span.faster { (b) " faster" },
            Change::Changed => span.faster { "differ (which is better is unknown)" },
            Change::NoSignificantChange => span.same { "no significant difference" },
        }
        span.n { "Δmean " (format::percent(test.relative_change)) " · p " (p) }
        @if !versus.per_run {
            span.n title=(caveat_title) { "too few runs: boot-to-boot drift not measured" }
        }
    }
}

fn workload_html(m: &Measurement) -> Markup {
    let direction = match m.direction {
        Some(Direction::LowerIsBetter) => ", lower is better",
        Some(Direction::HigherIsBetter) => ", higher is better",
        None => "",
    };
    let notes: Vec<String> = m
        .cells
        .iter()
        .filter_map(|c| c.pool.as_ref())
        .flat_map(|p| {
            p.notes.iter().map(move |(name, values)| {
                let values: Vec<&str> = values.iter().map(String::as_str).collect();
                format!("{} {}={}", p.backend, name, values.join("|"))
            })
        })
        .collect();
    html! {
        b { (m.key.workload) }
        span.n {
            (m.key.metric) ", " (m.unit) (direction)
            @if !m.key.series.is_empty() { ", " (m.key.series) }
        }
        @if !m.privilege.is_empty() { span.n { (m.privilege) } }
        @if !m.description.is_empty() || !notes.is_empty() {
            details {
                summary.detail { "about" }
                span.detail { (m.description) }
                @for note in &notes { span.n { "note: " (note) } }
            }
        }
    }
}

fn reproduce_html(m: &Measurement, backends: &[String]) -> Markup {
    html! {
        @for (i, cell) in m.cells.iter().enumerate() {
            @if let Some(pool) = &cell.pool {
                @for command in &pool.reproduce {
                    div.cmd {
                        @if backends.len() > 1 { (swatch(i)) }
                        code { (command) }
                    }
                }
            }
        }
    }
}

fn chart_src(file: &ChartFile) -> String {
    let name = file
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{CHARTS_DIR}/{name}")
}

fn figure_html(files: &[ChartFile], alt: &str, caption: &str) -> Markup {
    let Some(shown) = files
        .iter()
        .find(|f| f.format == ChartFormat::Png)
        .or_else(|| files.first())
    else {
        return html! {};
    };
    html! {
        figure {
            img src=(chart_src(shown)) width=(shown.width) height=(shown.height) alt=(alt)
                loading="lazy";
            figcaption {
                (caption) " · "
                @for (i, f) in files.iter().enumerate() {
                    @if i > 0 { " · " }
                    a href=(chart_src(f)) { (f.format.extension().to_uppercase()) }
                }
            }
        }
        "\n"
    }
}

fn measurements_table(page: &Page, measurements: &[&Measurement]) -> Markup {
    let model = page.model;
    let backends = model.backend_names();
    let level = level_text(page.options.bootstrap.level);
    let first = backends.first().map(String::as_str).unwrap_or_default();
    let runs = runs_needed(page.options.ab.p_threshold, 1);
    html! {
        table.measurements {
            tr {
                th { "measurement" }
                @for (i, b) in backends.iter().enumerate() {
                    th { (swatch(i)) (b) " median " span.ci { "[" (level) " CI]" } }
                }
                @for b in backends.iter().skip(1) {
                    th { (first) " / " (b) " " span.ci { "[" (level) " CI]" } }
                    th { (first) " vs " (b) }
                }
                th { "reproduce" }
            }
            @for m in measurements {
                tr id=(m.anchor()) {
                    td { (workload_html(m)) }
                    @for (cell, backend) in m.cells.iter().zip(&model.backends) {
                        td.num { (cell_html(cell, backend, &m.privilege)) }
                    }
                    @for (versus, other) in m.versus.iter().zip(backends.iter().skip(1)) {
                        td.num {
                            @match &versus.ratio {
                                Some(ratio) => (estimate_html(ratio)),
                                None => span.detail { "—" },
                            }
                        }
                        td { (verdict_html(versus, first, other, runs)) }
                    }
                    td { (reproduce_html(m, &backends)) }
                }
            }
        }
    }
}

fn group_section(page: &Page, group: &str, measurements: &[&Measurement]) -> Markup {
    let level = level_text(page.options.bootstrap.level);
    let group_charts = page
        .charts
        .groups
        .iter()
        .filter(|((chart_group, _), _)| chart_group == group)
        .flat_map(|((_, unit), parts)| parts.iter().map(move |files| (unit, files)));
    let sample_charts: Vec<(&Measurement, &Vec<ChartFile>)> = measurements
        .iter()
        .filter_map(|m| Some((*m, page.charts.samples.get(&m.anchor())?)))
        .collect();
    html! {
        h2 id=(format!("group-{}", format::slug(group, 40))) { "Group " (group) }
        (measurements_table(page, measurements))
        @for (unit, files) in group_charts {
            (figure_html(
                files,
                &format!("median {unit} of each {group} measurement per backend, with {level} CI"),
                &format!("{group}: medians with {level} bootstrap intervals ({unit})"),
            ))
        }
        @if !sample_charts.is_empty() {
            h3 { "Every sample, per measurement" }
            div.samples {
                @for (m, files) in &sample_charts {
                    (figure_html(files, &format!("every sample of {} per backend", m.key), &m.key.to_string()))
                }
            }
        }
    }
}

/// Time series the host observed (KSM's sharing, a VMM's memory), one chart per curve.
/// IPI and wake-up latency per backend, steal agreement and fairness (Jain's index, share
/// error) per weight ratio, beside the host scheduler and cgroup hierarchy under them.
fn sched_section(page: &Page) -> Markup {
    if page.sched.is_empty() {
        return html! {};
    }
    html! {
        h2 id="scheduling" { "vCPU scheduling by backend and host scheduler" }
        p {
            "The median over runs of each run's median, for every sched.* measurement, by \
             the scheduler the records name. Fairness and steal figures are ratios of CPU \
             time (meaningful under emulation too); IPI and wake-up latencies are timings, \
             artefacts where the host class says CPL0 is emulated or the backend is TCG."
        }
        table {
            tr {
                th { "backend" } th { "host scheduler" } th { "cgroups" } th { "measurement" }
                th { "series" } th { "runs" } th { "median" }
            }
            @for row in page.sched {
                tr {
                    td { (row.backend) } td { (row.scheduler) } td { (row.cgroups) }
                    td { (row.key.workload) " " (row.key.metric) }
                    td { (row.key.series) } td { (row.runs) }
                    td { (format!("{:.4}", row.median)) " " (row.unit) }
                }
            }
        }
    }
}

/// Instructions per operation side by side (KVM npt/shadow, Xen hap/shadow), with the
/// times of the same runs beside them.
fn insns_section(model: &Model) -> Markup {
    let Some(table) = &model.insns else {
        return html! {};
    };
    html! {
        h2 id="insns" { "Instructions per operation (TCG)" }
        p.sub {
            "Counted by the hvbench-insns QEMU plugin between the guest's markers: every \
             instruction of the hypervisor and the guest per operation, the median of the \
             runs' medians [their range] over the runs (n). Counts do not depend on the \
             host's load; the times beside them (in parentheses) are TCG emulation artefacts."
        }
        table.hosts {
            tr {
                th { "workload" }
                @for column in &table.columns { th { (column.label()) } }
            }
            @for (label, cells) in &table.rows {
                tr {
                    td { (label) }
                    @for cell in cells {
                        td {
                            @if let Some(c) = cell {
                                (format!("{:.1} [{:.1}-{:.1}] (n={})", c.median, c.low, c.high, c.runs))
                                @if let Some((time, unit)) = &c.time {
                                    br; span.sub { (format!("({time:.1} {unit})")) }
                                }
                            } @else { "-" }
                        }
                    }
                }
            }
        }
    }
}

fn curves_section(page: &Page) -> Markup {
    if page.charts.curves.is_empty() {
        return html! {};
    }
    html! {
        h2 id="curves" { "Curves over time" }
        p { "What the host observed while a host-driven workload ran, one line per run." }
        div.samples {
            @for ((workload, name), files) in &page.charts.curves {
                (figure_html(
                    files,
                    &format!("{name} of {workload} over time, one line per run"),
                    &format!("{workload}: {name}"),
                ))
            }
        }
    }
}

fn cdf_section(page: &Page) -> Markup {
    if page.charts.cdfs.is_empty() {
        return html! {};
    }
    html! {
        h2 id="latency-cdf" { "Block I/O: completion-latency CDFs" }
        p {
            "Per block workload and series, a line per backend and one for the host's fio \
             on the same file: the medians over every kept sample of the per-sample p50, p90, \
             p99, p99.9 and maximum, at 0.5, 0.9, 0.99, 0.999 and 1."
        }
        div.samples {
            @for ((workload, series), files) in &page.charts.cdfs {
                (figure_html(
                    files,
                    &format!("completion-latency CDF of {workload} [{series}], a line per backend and native"),
                    &format!("{workload} [{series}]"),
                ))
            }
        }
    }
}

fn convergence_section(page: &Page) -> Markup {
    if page.charts.convergence.is_empty() {
        return html! {};
    }
    html! {
        h2 id="convergence" { "Live migration: convergence against the dirty rate" }
        p {
            "Per mig.* workload and figure, a line per backend: the median over every kept \
             sample at each dirty rate asked of the guest. The heartbeat ruler's downtime is \
             one measure for every backend (the largest gap between heartbeats the host \
             received, less their interval); the hypervisor's own downtime is what each \
             reports of itself (ours: from parking the vCPUs to the destination's \
             acknowledgement; QEMU's: its downtime figure), so the two differ in kind. \
             Flat out (rate 0) has no place on a rate axis: its records are in the tables."
        }
        div.samples {
            @for ((workload, metric), files) in &page.charts.convergence {
                (figure_html(
                    files,
                    &format!("{metric} of {workload} against the dirty rate, a line per backend"),
                    &format!("{workload}: {metric}"),
                ))
            }
        }
    }
}

fn problems_section(model: &Model) -> Markup {
    html! {
        h2 id="problems" { "Skipped and failed workloads" }
        @if model.problems.is_empty() {
            p { "Every record succeeded." }
        } @else {
            table.problems {
                tr {
                    th { "backend" } th { "measurement" } th { "status" } th { "reason" }
                    th { "records" } th { "notes" } th { "reproduce" }
                }
                @for group in &model.problems {
                    (problem_row(model, group))
                }
            }
        }
    }
}

fn problem_row(model: &Model, group: &ProblemGroup) -> Markup {
    let p = &group.problem;
    let index = model
        .backends
        .iter()
        .position(|b| b.name == p.backend)
        .unwrap_or(0);
    let repeats: Vec<String> = group.repeats.iter().map(u32::to_string).collect();
    let notes: Vec<String> = p.notes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let status = p.status.name();
    html! {
        tr {
            td { (swatch(index)) (p.backend) }
            td { a href=(format!("#{}", measurement_anchor(&p.key))) { (p.key.to_string()) } }
            td { span class=(format!("status status-{status}")) { (status) } }
            td { (p.reason.as_deref().unwrap_or("no reason given")) }
            td.num { (group.count) " " span.n { "repeat " (repeats.join(", ")) } }
            td { (notes.join(", ")) }
            td { div.cmd { code { (p.reproduce) } } }
        }
        "\n"
    }
}

/// The grid of a merged matrix: a row per host label, a column per backend and paging,
/// each cell's status (linked to its `hvbench run` output where the bundle had it).
fn matrix_section(m: &MatrixSummary) -> Markup {
    let mut columns: Vec<(&str, &str)> = Vec::new();
    let mut rows: Vec<&str> = Vec::new();
    for c in &m.cells {
        if !columns.contains(&(c.backend.as_str(), c.paging.as_str())) {
            columns.push((&c.backend, &c.paging));
        }
        if !rows.contains(&c.host.as_str()) {
            rows.push(&c.host);
        }
    }
    let ok = m.cells.iter().filter(|c| c.status.completed()).count();
    html! {
        h2 id="matrix" { "Matrix " (m.name) }
        p.sub {
            (m.cells.len()) " cells, " (ok) " ran to their end; plan " code { (m.plan_id) }
            @if !m.revisions.is_empty() { "; revisions " (m.revisions.join(" / ")) " interleaved ABBA" }
        }
        @for note in &m.notes {
            div.warning { (note) }
        }
        table.matrix {
            tr {
                th { "host label" }
                @for (backend, paging) in &columns { th { (backend) " · paging " (paging) } }
            }
            @for host in &rows {
                tr {
                    th { (host) }
                    @for (backend, paging) in &columns {
                        td {
                            @for c in m.cells.iter().filter(|c| c.host == *host && c.backend == *backend && c.paging == *paging) {
                                (grid_cell(c)) br;
                            }
                        }
                    }
                }
            }
        }
    }
}

fn grid_cell(c: &GridCell) -> Markup {
    let class = if c.status.completed() {
        "same"
    } else {
        "status"
    };
    let label = format!(
        "{} r{}{}",
        c.workloads,
        c.repeat,
        c.revision
            .as_deref()
            .map(|r| format!(" {r}"))
            .unwrap_or_default()
    );
    html! {
        (label) ": "
        span class=(class) { (c.status.name()) }
        " (" (c.records) @if c.records == 1 { " record" } @else { " records" }
        @if !c.fingerprint.is_empty() { ", host " code { (c.fingerprint) } }
        ") "
        @match &c.log {
            Some(log) => a href=(log) title=(c.id) { "log" },
            None => code { (c.id) },
        }
    }
}

fn raw_section(page: &Page) -> Markup {
    let copies = page
        .raw
        .iter()
        .filter_map(|copy| Some((copy, page.model.inputs.get(copy.input)?)));
    html! {
        h2 id="raw" { "Raw results" }
        p { "Copies of every input, beside this page:" }
        ul {
            @for (copy, input) in copies {
                li {
                    a href=(copy.jsonl) { (copy.jsonl) } ", "
                    @match &copy.csv {
                        Some(name) => a href=(name) { (name) },
                        None => "no CSV in the input",
                    }
                    " — " (input.records) " records of " (input.backends.join(", "))
                    " from " code { (input.dir.display().to_string()) }
                }
            }
        }
        p.detail {
            "Report directory when written: " code { (page.out.display().to_string()) }
        }
    }
}

fn method_section(options: &ReportOptions, backends: usize) -> Markup {
    let b = &options.bootstrap;
    let ab = &options.ab;
    let intro = format!(
        "Samples of every repeat and run pool by backend and measurement (workload, metric, \
         series); n counts the pooled samples. Medians carry a {level:.0}% \
         percentile-bootstrap interval ({resamples} resamples, seed {seed:#x}, so the page is \
         reproducible).",
        level = b.level * 100.0,
        resamples = b.resamples,
        seed = b.seed,
    );
    let ratio = format!(
        " The ratio of medians A / B has its own interval, each side resampled \
         independently. One backend is called faster only where a permutation test on the \
         difference of means ({} relabellings) gives p < {} and the means differ by more \
         than {:.1}% (the noise threshold); otherwise there is no significant difference. \
         With enough runs on both sides (at least {runs} each: --repeat {runs}) the test \
         takes each run's median as one unit; with fewer it pools the samples of the runs \
         there are, which cannot see how far a boot shifts all its samples together \
         (several percent on some hosts), and the page says so. The test is on the means \
         and the ratio on the medians, so where the tails of the two sides differ, the two \
         can disagree.",
        ab.permutation.resamples,
        ab.p_threshold,
        ab.noise * 100.0,
        runs = runs_needed(ab.p_threshold, 1),
    );
    html! {
        h2 id="method" { "Method" }
        p { (intro) @if backends > 1 { (ratio) } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spliced_text_is_escaped() {
        let hostile = "<script>alert(1)</script> & \"q\"";
        let markup = html! { td title=(hostile) { (hostile) } }.into_string();
        assert_eq!(
            markup,
            "<td title=\"&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;q&quot;\">\
             &lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;q&quot;</td>"
        );
    }
}
