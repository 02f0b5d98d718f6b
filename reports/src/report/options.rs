//! What a report is asked for: its title, baseline, statistics and charts.

use crate::abtest::AbOptions;
use crate::bootstrap::BootstrapOptions;
use crate::plot::ChartFormat;

pub const INDEX_NAME: &str = "index.html";
pub const CHARTS_DIR: &str = "charts";

#[derive(Clone, Debug, PartialEq)]
pub struct ReportOptions {
    pub title: String,
    /// Backend A, which every other backend is compared with; default: the first of kvm,
    /// qemu, xen (then others by name) present in the records.
    pub baseline: Option<String>,
    pub bootstrap: BootstrapOptions,
    /// Decides "faster" versus "no significant difference".
    pub ab: AbOptions,
    /// Chart files to write; the page shows the first and links the others.
    pub formats: Vec<ChartFormat>,
    /// One strip chart of every sample per measurement (the group charts are always drawn).
    pub sample_charts: bool,
    pub group_chart_width: u32,
    pub sample_chart_width: u32,
}

impl Default for ReportOptions {
    fn default() -> Self {
        ReportOptions {
            title: "hvbench report".into(),
            baseline: None,
            bootstrap: BootstrapOptions::default(),
            ab: AbOptions::default(),
            formats: vec![ChartFormat::Png, ChartFormat::Svg],
            sample_charts: true,
            group_chart_width: 960,
            sample_chart_width: 600,
        }
    }
}
