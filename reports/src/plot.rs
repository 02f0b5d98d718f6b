//! Charts, as PNG (drawn with the embedded font) and SVG:
//!
//! - per group, horizontal bars of each measurement's median with its confidence interval
//!   as whiskers, one bar per backend side by side. Horizontal, so long workload names stay
//!   readable; on a log axis when values span more than a decade, since exit costs range
//!   from nanoseconds to microseconds within one group;
//! - per measurement, every sample as a jittered strip per backend, with the median and
//!   its interval drawn over it.

use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;
use thiserror::Error;

use crate::bootstrap::Estimate;
use crate::font;
use crate::format;
use crate::rng::Rng;

#[derive(Debug, Error)]
pub enum ChartError {
    #[error("the embedded chart font could not be loaded")]
    Font,
    #[error("cannot draw chart {path}: {message}")]
    Draw { path: PathBuf, message: String },
    #[error("cannot write chart {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChartFormat {
    Png,
    Svg,
}

impl ChartFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ChartFormat::Png => "png",
            ChartFormat::Svg => "svg",
        }
    }
}

/// One chart file written.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChartFile {
    /// Where it was written.
    pub path: PathBuf,
    pub format: ChartFormat,
    pub width: u32,
    pub height: u32,
}

/// Colours of the backends, in report order (Tableau 10: distinct, colour-blind friendly).
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// The colour of the backend at `index` in the report's order, as `#rrggbb`.
pub fn backend_color_hex(index: usize) -> String {
    let RGBColor(r, g, b) = PALETTE[index % PALETTE.len()];
    format!("#{r:02x}{g:02x}{b:02x}")
}

fn backend_color(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

const TITLE_SIZE: f64 = 17.0;
const LABEL_SIZE: f64 = 13.0;
const LABEL_MAX_CHARS: usize = 40;

/// Something drawable on any plotters backend.
pub trait Chart {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String>;
}

/// Writes `chart` as `<dir>/<stem>.png` and/or `.svg`.
pub fn write_chart(
    chart: &impl Chart,
    dir: &Path,
    stem: &str,
    formats: &[ChartFormat],
) -> Result<Vec<ChartFile>, ChartError> {
    if !font::ensure_registered() {
        return Err(ChartError::Font);
    }
    let (width, height) = chart.size();
    let mut files = Vec::new();
    for &format in formats {
        let path = dir.join(format!("{stem}.{}", format.extension()));
        let draw_error = |message: String| ChartError::Draw {
            path: path.clone(),
            message,
        };
        let write_error = |source: std::io::Error| ChartError::Write {
            path: path.clone(),
            source,
        };
        match format {
            ChartFormat::Png => {
                let mut pixels = vec![0u8; width as usize * height as usize * 3];
                {
                    let root = BitMapBackend::with_buffer(&mut pixels, (width, height))
                        .into_drawing_area();
                    chart.draw(&root).map_err(draw_error)?;
                    root.present().map_err(|e| draw_error(e.to_string()))?;
                }
                write_png(&path, width, height, &pixels).map_err(write_error)?;
            }
            ChartFormat::Svg => {
                let mut svg = String::new();
                {
                    let root =
                        SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
                    chart.draw(&root).map_err(draw_error)?;
                    root.present().map_err(|e| draw_error(e.to_string()))?;
                }
                std::fs::write(&path, svg).map_err(write_error)?;
            }
        }
        files.push(ChartFile {
            path,
            format,
            width,
            height,
        });
    }
    Ok(files)
}

fn write_png(path: &Path, width: u32, height: u32, rgb: &[u8]) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // Flat-coloured charts compress well even at the fast setting, which is several
        // times quicker than the default.
        encoder.set_compression(png::Compression::Fast);
        let mut writer = encoder.write_header().map_err(std::io::Error::other)?;
        writer
            .write_image_data(rgb)
            .map_err(std::io::Error::other)?;
        writer.finish().map_err(std::io::Error::other)?;
    }
    std::fs::write(path, bytes)
}

/// A value axis: logarithmic where the values span more than a decade and are all
/// positive, else linear.
#[derive(Clone, Debug, PartialEq)]
enum Axis {
    Linear(Range<f64>),
    Log(Range<f64>),
}

impl Axis {
    /// An axis covering `low..high`; `from_zero` starts a linear axis at 0 (bars).
    fn fit(low: f64, high: f64, from_zero: bool) -> Axis {
        let (low, high) = if low.is_finite() && high.is_finite() && low <= high {
            (low, high)
        } else {
            (0.0, 1.0)
        };
        if low > 0.0 && high / low > 10.0 {
            // Whole decades: 1, 10, 100 ... read best on a log axis.
            let start = 10f64.powf(low.log10().floor());
            let end = 10f64.powf(high.log10().ceil());
            return Axis::Log(start..end);
        }
        let (start, end) = if from_zero {
            (low.min(0.0), high.max(0.0))
        } else {
            (low, high)
        };
        let span = end - start;
        let pad = if span > 0.0 {
            span * 0.05
        } else {
            start.abs().max(1.0) * 0.05
        };
        let start = if from_zero && start >= 0.0 {
            0.0
        } else {
            start - pad
        };
        Axis::Linear(start..end + pad)
    }

    /// Where bars start: the left edge of the axis, or 0 on a linear axis that spans it.
    fn base(&self) -> f64 {
        match self {
            Axis::Log(r) => r.start,
            Axis::Linear(r) => 0f64.clamp(r.start, r.end),
        }
    }
}

fn label_style(size: f64) -> TextStyle<'static> {
    (font::FAMILY, size).into_font().color(&BLACK)
}

/// Width of the left label area for `labels`, from the embedded font's metrics.
/// A chart of horizontal bands, one per row label (`rows` of them, top to bottom), over
/// the value axis `x_spec`: what the group and the samples charts share.
struct BandLayout {
    margin_top: u32,
    x_labels: usize,
}

type BandedChart<'a, DB, X> = ChartContext<
    'a,
    DB,
    Cartesian2d<
        <X as plotters::coord::ranged1d::AsRangedCoord>::CoordDescType,
        plotters::coord::types::RangedCoordf64,
    >,
>;

fn banded_chart<'a, DB: DrawingBackend, X>(
    root: &'a DrawingArea<DB, Shift>,
    x_spec: X,
    labels: &[String],
    rows: f64,
    unit: &str,
    layout: BandLayout,
) -> Result<BandedChart<'a, DB, X>, String>
where
    X: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    X::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut chart = ChartBuilder::on(root)
        .margin_top(layout.margin_top)
        .margin_right(24)
        .x_label_area_size(46)
        .y_label_area_size(label_area_width(root, labels))
        .build_cartesian_2d(x_spec, 0f64..rows)
        .map_err(|e| e.to_string())?;
    let formatter = |v: &f64| format::tick(*v);
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(layout.x_labels)
        .x_label_formatter(&formatter)
        .x_desc(format::label(unit, 20))
        .label_style(label_style(LABEL_SIZE))
        .axis_desc_style(label_style(LABEL_SIZE))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(chart)
}

/// A band's label, centred on the band at height `y`, right-aligned against the axis.
fn draw_band_label<DB: DrawingBackend, C: Ranged<ValueType = f64>>(
    root: &DrawingArea<DB, Shift>,
    chart: &ChartContext<'_, DB, Cartesian2d<C, plotters::coord::types::RangedCoordf64>>,
    label: &str,
    x: f64,
    y: f64,
) -> Result<(), String> {
    let (_, centre_y) = chart.backend_coord(&(x, y));
    let (plot_x, _) = chart.plotting_area().get_pixel_range();
    root.draw_text(
        label,
        &label_style(LABEL_SIZE).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Right,
            plotters::style::text_anchor::VPos::Center,
        )),
        (plot_x.start - 8, centre_y),
    )
    .map_err(|e| e.to_string())
}

fn label_area_width<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, labels: &[String]) -> u32 {
    let style = label_style(LABEL_SIZE);
    let widest = labels
        .iter()
        .map(|l| {
            root.estimate_text_size(l, &style)
                .map(|(w, _)| w)
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    (widest + 16).clamp(60, 360)
}

/// A legend of backend colours along the top right.
fn draw_legend<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    backends: &[String],
) -> Result<(), String> {
    let style = label_style(LABEL_SIZE);
    let (width, _) = root.dim_in_pixel();
    let mut x = i32::try_from(width).unwrap_or(i32::MAX) - 10;
    for (i, backend) in backends.iter().enumerate().rev() {
        let text = format::label(backend, 20);
        let text_width = root
            .estimate_text_size(&text, &style)
            .ok()
            .and_then(|(w, _)| i32::try_from(w).ok())
            .unwrap_or(40);
        x -= text_width;
        root.draw_text(&text, &style, (x, 12))
            .map_err(|e| e.to_string())?;
        x -= 18;
        root.draw(&Rectangle::new(
            [(x, 13), (x + 12, 25)],
            backend_color(i).filled(),
        ))
        .map_err(|e| e.to_string())?;
        x -= 14;
    }
    Ok(())
}

/// One measurement in a group chart: its label and one estimate per backend (None where
/// that backend has no samples).
#[derive(Clone, Debug)]
pub struct BarRow {
    pub label: String,
    pub medians: Vec<Option<Estimate>>,
}

/// Bars of medians with CI whiskers for one group and unit.
#[derive(Clone, Debug)]
pub struct GroupChart {
    pub title: String,
    pub unit: String,
    pub backends: Vec<String>,
    pub rows: Vec<BarRow>,
    pub width: u32,
}

const TOP: u32 = 56;
const BOTTOM: u32 = 56;

/// `count` bands of `band` pixels, saturating: the counts (backends, rows, series) come
/// from records on disk.
fn bands(count: usize, band: u32) -> u32 {
    u32::try_from(count.max(1))
        .unwrap_or(u32::MAX)
        .saturating_mul(band)
}

impl GroupChart {
    fn band_height(&self) -> u32 {
        bands(self.backends.len(), 14).saturating_add(14)
    }

    fn axis(&self) -> Axis {
        let estimates = self.rows.iter().flat_map(|r| r.medians.iter().flatten());
        let (low, high) = estimates.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), e| {
            (lo.min(e.low).min(e.value), hi.max(e.high).max(e.value))
        });
        Axis::fit(low, high, true)
    }

    fn draw_on<DB: DrawingBackend, X>(
        &self,
        root: &DrawingArea<DB, Shift>,
        x_spec: X,
        base: f64,
    ) -> Result<(), String>
    where
        X: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
        X::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
    {
        let labels: Vec<String> = self
            .rows
            .iter()
            .map(|r| format::label(&r.label, LABEL_MAX_CHARS))
            .collect();
        let rows = self.rows.len().max(1) as f64;
        let mut chart = banded_chart(
            root,
            x_spec,
            &labels,
            rows,
            &self.unit,
            BandLayout {
                margin_top: TOP,
                x_labels: 8,
            },
        )?;

        let backends = self.backends.len().max(1) as f64;
        let bar = 0.8 / backends;
        for (i, row) in self.rows.iter().enumerate() {
            let row_top = rows - i as f64;
            draw_band_label(root, &chart, &labels[i], base, row_top - 0.5)?;
            for (j, median) in row.medians.iter().enumerate() {
                let top = row_top - 0.1 - bar * j as f64;
                let bottom = top - bar * 0.9;
                let middle = (top + bottom) / 2.0;
                let color = backend_color(j);
                let Some(e) = median else {
                    chart
                        .draw_series(std::iter::once(Text::new(
                            "not measured",
                            (base, middle),
                            label_style(10.0).color(&RGBColor(120, 120, 120)).pos(
                                plotters::style::text_anchor::Pos::new(
                                    plotters::style::text_anchor::HPos::Left,
                                    plotters::style::text_anchor::VPos::Center,
                                ),
                            ),
                        )))
                        .map_err(|e| e.to_string())?;
                    continue;
                };
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(base, top), (e.value, bottom)],
                        color.mix(0.85).filled(),
                    )))
                    .map_err(|e| e.to_string())?;
                let whisker = BLACK.stroke_width(1);
                let cap = bar * 0.3;
                chart
                    .draw_series([
                        PathElement::new(vec![(e.low, middle), (e.high, middle)], whisker),
                        PathElement::new(
                            vec![(e.low, middle - cap), (e.low, middle + cap)],
                            whisker,
                        ),
                        PathElement::new(
                            vec![(e.high, middle - cap), (e.high, middle + cap)],
                            whisker,
                        ),
                    ])
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

impl Chart for GroupChart {
    fn size(&self) -> (u32, u32) {
        let height = (TOP + BOTTOM).saturating_add(bands(self.rows.len(), self.band_height()));
        (self.width, height.max(160))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        root.draw_text(
            &format::label(&self.title, 80),
            &label_style(TITLE_SIZE),
            (10, 10),
        )
        .map_err(|e| e.to_string())?;
        draw_legend(root, &self.backends)?;
        match self.axis() {
            Axis::Linear(r) => {
                let base = Axis::Linear(r.clone()).base();
                self.draw_on(root, r, base)
            }
            Axis::Log(r) => {
                let base = r.start;
                self.draw_on(root, r.log_scale(), base)
            }
        }
    }
}

/// Points drawn per strip at most. Past this a strip is a solid band anyway, and an SVG
/// of 100,000 circles is megabytes; larger sets draw this many evenly spaced quantiles.
pub const MAX_POINTS: usize = 5_000;

/// The finite samples, or MAX_POINTS evenly spaced order statistics of them.
fn thinned(samples: &[f64]) -> Vec<f64> {
    let mut finite: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.len() <= MAX_POINTS {
        return finite;
    }
    finite.sort_by(f64::total_cmp);
    let last = finite.len() - 1;
    (0..MAX_POINTS)
        .map(|i| finite[i * last / (MAX_POINTS - 1)])
        .collect()
}

/// Every sample of one measurement, per backend.
#[derive(Clone, Debug)]
pub struct SamplesChart {
    pub title: String,
    pub unit: String,
    /// (backend, samples, median with its interval) in report order.
    pub series: Vec<(String, Vec<f64>, Option<Estimate>)>,
    /// Colour index of each series (its backend's position in the report).
    pub colors: Vec<usize>,
    pub width: u32,
    /// Seeds the vertical jitter, so the same data always draws the same picture.
    pub seed: u64,
}

impl SamplesChart {
    fn axis(&self) -> Axis {
        let values = self.series.iter().flat_map(|(_, s, _)| s.iter().copied());
        let (low, high) = values
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        Axis::fit(low, high, false)
    }

    fn draw_on<DB: DrawingBackend, X>(
        &self,
        root: &DrawingArea<DB, Shift>,
        x_spec: X,
    ) -> Result<(), String>
    where
        X: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
        X::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
    {
        let labels: Vec<String> = self
            .series
            .iter()
            .map(|(backend, samples, _)| {
                let drawn = if samples.len() > MAX_POINTS {
                    format!(", {MAX_POINTS} drawn")
                } else {
                    String::new()
                };
                format!(
                    "{} (n={}{drawn})",
                    format::label(backend, 20),
                    samples.len()
                )
            })
            .collect();
        let rows = self.series.len().max(1) as f64;
        let mut chart = banded_chart(
            root,
            x_spec,
            &labels,
            rows,
            &self.unit,
            BandLayout {
                margin_top: 40,
                x_labels: 6,
            },
        )?;
        let mut rng = Rng::new(self.seed);
        for (i, (_, samples, median)) in self.series.iter().enumerate() {
            let centre = rows - i as f64 - 0.5;
            draw_band_label(root, &chart, &labels[i], 0.0, centre)?;
            let color = backend_color(self.colors.get(i).copied().unwrap_or(i));
            if let Some(e) = median {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(e.low, centre - 0.42), (e.high, centre + 0.42)],
                        color.mix(0.15).filled(),
                    )))
                    .map_err(|e| e.to_string())?;
            }
            let points = thinned(samples).into_iter().map(|v| {
                let jitter = (rng.uniform() - 0.5) * 0.6;
                Circle::new((v, centre + jitter), 2, color.mix(0.55).filled())
            });
            chart.draw_series(points).map_err(|e| e.to_string())?;
            if let Some(e) = median {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(e.value, centre - 0.45), (e.value, centre + 0.45)],
                        BLACK.stroke_width(2),
                    )))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

impl Chart for SamplesChart {
    fn size(&self) -> (u32, u32) {
        (self.width, bands(self.series.len(), 56).saturating_add(96))
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        root.draw_text(
            &format::label(&self.title, 70),
            &label_style(LABEL_SIZE + 1.0),
            (10, 10),
        )
        .map_err(|e| e.to_string())?;
        match self.axis() {
            Axis::Linear(r) => self.draw_on(root, r),
            Axis::Log(r) => self.draw_on(root, r.log_scale()),
        }
    }
}

/// Time series the host observed while a workload ran (KSM's sharing, a VMM's resident
/// memory), one line per run.
#[derive(Clone, Debug)]
pub struct CurveChart {
    pub title: String,
    pub x_unit: String,
    pub y_unit: String,
    /// (label, points, colour index) per line.
    pub series: Vec<(String, Vec<[f64; 2]>, usize)>,
    pub width: u32,
}

impl CurveChart {
    fn range(&self, axis: usize) -> Range<f64> {
        let (low, high) = self
            .series
            .iter()
            .flat_map(|(_, points, _)| points.iter().map(move |p| p[axis]))
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        match Axis::fit(low.min(0.0), high, true) {
            Axis::Linear(r) => r,
            Axis::Log(r) => 0.0..r.end,
        }
    }
}

impl Chart for CurveChart {
    fn size(&self) -> (u32, u32) {
        (self.width, 340)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), String> {
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        root.draw_text(
            &format::label(&self.title, 70),
            &label_style(LABEL_SIZE + 1.0),
            (10, 10),
        )
        .map_err(|e| e.to_string())?;
        let mut chart = ChartBuilder::on(root)
            .margin_top(40)
            .margin_right(24)
            .x_label_area_size(46)
            .y_label_area_size(72)
            .build_cartesian_2d(self.range(0), self.range(1))
            .map_err(|e| e.to_string())?;
        let formatter = |v: &f64| format::tick(*v);
        chart
            .configure_mesh()
            .x_labels(8)
            .y_labels(6)
            .x_label_formatter(&formatter)
            .y_label_formatter(&formatter)
            .x_desc(format::label(&self.x_unit, 20))
            .y_desc(format::label(&self.y_unit, 20))
            .label_style(label_style(LABEL_SIZE))
            .axis_desc_style(label_style(LABEL_SIZE))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|e| e.to_string())?;
        for (label, points, color) in &self.series {
            let color = backend_color(*color);
            let finite: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p[0].is_finite() && p[1].is_finite())
                .map(|p| (p[0], p[1]))
                .collect();
            chart
                .draw_series(LineSeries::new(finite, color.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(format::label(label, 40))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(label_style(LABEL_SIZE))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chart heights grow with counts read from records: they saturate, never wrap.
    #[test]
    fn band_heights_saturate() {
        assert_eq!(bands(0, 14), 14);
        assert_eq!(bands(3, 14), 42);
        assert_eq!(bands(usize::MAX, 14), u32::MAX);
        assert_eq!(bands(1 << 32, 1), u32::MAX);
    }

    #[test]
    fn axes_fit_their_values() {
        assert_eq!(Axis::fit(20.0, 5000.0, true), Axis::Log(10.0..10_000.0));
        let Axis::Linear(r) = Axis::fit(100.0, 130.0, true) else {
            panic!("narrow positive range is linear")
        };
        assert_eq!(r.start, 0.0);
        assert!(r.end > 130.0);
        let Axis::Linear(r) = Axis::fit(100.0, 130.0, false) else {
            panic!()
        };
        assert!(r.start > 90.0 && r.start < 100.0);
        // Degenerate input still gives a usable axis.
        let Axis::Linear(r) = Axis::fit(f64::INFINITY, f64::NEG_INFINITY, true) else {
            panic!()
        };
        assert!(r.start < r.end);
        let Axis::Linear(r) = Axis::fit(5.0, 5.0, false) else {
            panic!()
        };
        assert!(r.start < 5.0 && r.end > 5.0);
        assert_eq!(Axis::fit(-3.0, 100.0, true).base(), 0.0);
    }

    #[test]
    fn large_sample_sets_are_thinned_to_quantiles() {
        let few = [3.0, f64::NAN, 1.0];
        assert_eq!(thinned(&few), [3.0, 1.0]);
        let many: Vec<f64> = (0..20_000).rev().map(f64::from).collect();
        let drawn = thinned(&many);
        assert_eq!(drawn.len(), MAX_POINTS);
        assert_eq!((drawn[0], drawn[MAX_POINTS - 1]), (0.0, 19_999.0));
    }
}
