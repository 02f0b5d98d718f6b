//! `hvbench report` and `hvbench compare`: the reports crate over results directories.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Results directories (of `hvbench run`), any backends.
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Output directory: index.html, the charts and copies of the raw results.
    #[arg(long)]
    pub out: PathBuf,
    /// The backend every other is compared with (default: kvm, else qemu, else xen).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Page title.
    #[arg(long)]
    pub title: Option<String>,
    /// Leave out the per-workload sample charts (the group charts stay).
    #[arg(long)]
    pub no_sample_charts: bool,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Results directory of the base (e.g. the main branch).
    pub base: PathBuf,
    /// Results directory of the new build.
    pub new: PathBuf,
    /// Noise threshold: a change smaller than this fraction never counts (0.05 = 5%).
    #[arg(long, default_value_t = 0.05)]
    pub noise: f64,
    /// p-value threshold of the permutation test (Holm-adjusted over all measurements).
    #[arg(long, default_value_t = 0.01)]
    pub p: f64,
    /// Instruction counts (`insns`, from `--insns` runs under TCG): a change of the median
    /// beyond this fraction counts where both sides spread less than it, without the
    /// permutation test (0.02 = 2%).
    #[arg(long, default_value_t = reports::compare::DEFAULT_INSNS_THRESHOLD)]
    pub insns_threshold: f64,
    /// Also exit 1 when a measurement that succeeded in BASE was skipped, failed, crashed
    /// or timed out in NEW.
    #[arg(long)]
    pub fail_on_new_failures: bool,
}

/// `hvbench report`.
pub fn report(args: &ReportArgs) -> Result<i32> {
    let mut options = reports::report::ReportOptions {
        baseline: args.baseline.clone(),
        sample_charts: !args.no_sample_charts,
        ..Default::default()
    };
    if let Some(title) = &args.title {
        options.title = title.clone();
    }
    let summary = reports::report::render(&args.dirs, &args.out, &options)?;
    for warning in &summary.warnings {
        hvbench::say!("hvbench: warning: {warning}");
    }
    hvbench::tell_line!(
        "{}: {} records, {} measurements, backends {} ({} charts, {} not successful)",
        summary.index.display(),
        summary.records,
        summary.measurements,
        summary.backends.join(", "),
        summary.charts.len(),
        summary.problems
    );
    Ok(0)
}

/// `hvbench compare`; exit status 1 on a significant regression.
pub fn compare(args: &CompareArgs) -> Result<i32> {
    let options = reports::compare::CompareOptions {
        insns_threshold: args.insns_threshold,
        ..reports::compare::CompareOptions::with_thresholds(args.noise, args.p)
    };
    let comparison = reports::compare::compare(&args.base, &args.new, &options)?;
    hvbench::tell!("{}", comparison.render_table());
    let failing = comparison.newly_failing();
    if comparison.has_regression() {
        return Ok(1);
    }
    if args.fail_on_new_failures && !failing.is_empty() {
        hvbench::say!(
            "hvbench: {} measurement(s) succeeded in BASE and not in NEW",
            failing.len()
        );
        return Ok(1);
    }
    Ok(0)
}
