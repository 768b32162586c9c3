//! `omr plot RUN`: the curves of a run from its `metrics.jsonl`, as PNG and/or SVG, for a
//! look without TensorBoard (over ssh, in a report, in a pull request).
//!
//! It reads the stable names that `omr_train::metrics` writes: `loss` draws `train/loss` and
//! `eval/loss`, `lr` draws `train/lr`, `eval` draws every other `eval/*` metric (and is left out
//! when there is none). A `null` value (a non-finite step) is a missing point. The last line may
//! be cut short when the run is still writing; it is skipped, while a malformed line elsewhere
//! is an error naming it. Text is drawn with DejaVu Sans built into the binary
//! (`assets/DejaVuSans.ttf`), since plotters' ab_glyph backend has no system fonts to find.

use crate::exit::Tag;
use crate::Result;
use anyhow::{anyhow, Context};
use clap::Args;
use omr_train::metrics::METRICS_FILE;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct PlotArgs {
    /// Run folder holding metrics.jsonl.
    run: PathBuf,
    /// Where the charts go [default: RUN/plots].
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Format::Both)]
    format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Png,
    Svg,
    Both,
}

/// Pixels of every chart, PNG and SVG alike.
pub const SIZE: (u32, u32) = (960, 540);

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

pub fn run(a: PlotArgs) -> Result<()> {
    let out = a.out.unwrap_or_else(|| a.run.join("plots"));
    let series = read_metrics(&a.run.join(METRICS_FILE)).usage()?;
    for path in plot(&series, &out, a.format)? {
        println!("{}", path.display());
    }
    Ok(())
}

/// Points `(step, value)` of each metric name, in file order.
pub type Series = BTreeMap<String, Vec<(u64, f64)>>;

/// Every numeric value of every record, by name. `step` and `wall_time` are not series.
pub fn read_metrics(path: &Path) -> anyhow::Result<Series> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "{}: cannot read the run's metrics; is this a training run folder?",
            path.display()
        )
    })?;
    let mut series = Series::new();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    for (i, raw) in lines.iter().enumerate() {
        let (n, body) = (i + 1, raw.trim());
        if body.is_empty() {
            continue;
        }
        let bad = |what: String| anyhow!("{}:{n}: {what}", path.display());
        let record = match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(body)
        {
            Ok(record) => record,
            Err(_) if n == lines.len() && !raw.ends_with('\n') => {
                tracing::warn!("{}:{n}: incomplete last line skipped", path.display());
                continue;
            }
            Err(e) => return Err(bad(format!("malformed record ({e})"))),
        };
        let step = record
            .get("step")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad("record without an integer \"step\"".into()))?;
        for (name, value) in record {
            if let (false, Some(v)) = (name == "step" || name == "wall_time", value.as_f64()) {
                series.entry(name).or_default().push((step, v));
            }
        }
    }
    Ok(series)
}

struct Chart<'a> {
    file: &'static str,
    title: &'static str,
    y_desc: &'static str,
    lines: Vec<(&'a str, &'a [(u64, f64)])>,
}

/// Draws the charts that have data into `out` and returns the files written.
pub fn plot(series: &Series, out: &Path, format: Format) -> Result<Vec<PathBuf>> {
    let pick = |names: &[&'static str]| -> Vec<(&'static str, &[(u64, f64)])> {
        names
            .iter()
            .filter_map(|n| series.get(*n).map(|pts| (*n, pts.as_slice())))
            .collect()
    };
    let evals = series
        .iter()
        .filter(|(name, _)| name.starts_with("eval/") && *name != "eval/loss")
        .map(|(name, pts)| (name.as_str(), pts.as_slice()))
        .collect();
    let charts = [
        Chart {
            file: "loss",
            title: "Loss",
            y_desc: "loss",
            lines: pick(&["train/loss", "eval/loss"]),
        },
        Chart {
            file: "lr",
            title: "Learning rate",
            y_desc: "learning rate",
            lines: pick(&["train/lr"]),
        },
        Chart {
            file: "eval",
            title: "Evaluation metrics",
            y_desc: "value",
            lines: evals,
        },
    ];
    let charts: Vec<&Chart> = charts.iter().filter(|c| !c.lines.is_empty()).collect();
    if charts.is_empty() {
        return Err(anyhow!("no train/loss, train/lr or eval/* values to plot")).usage();
    }
    register_font()?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut written = Vec::new();
    for chart in charts {
        if format != Format::Png {
            let path = out.join(format!("{}.svg", chart.file));
            draw(SVGBackend::new(&path, SIZE).into_drawing_area(), chart)
                .map_err(|e| anyhow!("{}: {e}", path.display()))?;
            written.push(path);
        }
        if format != Format::Svg {
            let path = out.join(format!("{}.png", chart.file));
            draw(BitMapBackend::new(&path, SIZE).into_drawing_area(), chart)
                .map_err(|e| anyhow!("{}: {e}", path.display()))?;
            written.push(path);
        }
    }
    Ok(written)
}

fn register_font() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if *ok {
        Ok(())
    } else {
        Err(anyhow!(
            "the built-in font assets/DejaVuSans.ttf does not load"
        ))
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    chart: &Chart,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let finite = || {
        chart
            .lines
            .iter()
            .flat_map(|(_, pts)| pts.iter())
            .filter(|(_, v)| v.is_finite())
    };
    let x_min = finite().map(|p| p.0).min().unwrap_or(0);
    let x_max = finite().map(|p| p.0).max().unwrap_or(1).max(x_min + 1);
    let y_min = finite().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = finite().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (y_min, y_max) = if y_min.is_finite() {
        (y_min, y_max)
    } else {
        (0.0, 1.0)
    };
    let pad = match (y_max - y_min) * 0.05 {
        p if p > 0.0 => p,
        _ if y_min != 0.0 => y_min.abs() * 0.1,
        _ => 1.0,
    };
    let headroom = 1.2 * chart.lines.len() as f64;
    let mut c = ChartBuilder::on(&root)
        .caption(chart.title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80)
        // Headroom over the curves for the legend box in the upper right, one row per line.
        .build_cartesian_2d(
            x_min..x_max,
            (y_min - pad)..(y_max + pad * (1.0 + headroom)),
        )?;
    c.configure_mesh()
        .x_desc("step")
        .y_desc(chart.y_desc)
        .y_label_formatter(&|v| tick(*v))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    for (i, (name, pts)) in chart.lines.iter().enumerate() {
        let (r, g, b) = COLORS[i % COLORS.len()];
        let color = RGBColor(r, g, b);
        // Eval curves have few points: mark each one.
        let marks = if name.starts_with("eval/") { 4 } else { 0 };
        let points = pts.iter().copied().filter(|(_, v)| v.is_finite());
        c.draw_series(LineSeries::new(points, color.stroke_width(2)).point_size(marks))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()
}

/// Blue, orange, green, red, purple, brown: distinct, and train (first) against eval (second)
/// reads at a glance.
const COLORS: [(u8, u8, u8); 6] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
];

/// Axis numbers: plain for ordinary magnitudes, `1.0e-4` for learning rates and the like.
fn tick(v: f64) -> String {
    if v != 0.0 && !(1e-2..1e5).contains(&v.abs()) {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ten train steps (step 4 non-finite), evals at 5 and 10, and a torn last line.
    fn metrics_file(dir: &Path) -> PathBuf {
        let mut text = String::new();
        for step in 1..=10u64 {
            let loss = if step == 4 {
                "null".to_string()
            } else {
                format!("{}", 3.0 / step as f64)
            };
            let lr = 1e-4 * step as f64 / 10.0;
            text += &format!(
                "{{\"step\":{step},\"wall_time\":1.5,\"train/loss\":{loss},\"train/lr\":{lr}}}\n"
            );
            if step % 5 == 0 {
                text += &format!(
                    "{{\"step\":{step},\"wall_time\":2.5,\"eval/loss\":1.5,\"eval/accuracy\":0.{step}}}\n"
                );
            }
        }
        text += "{\"step\":11,\"train/l";
        let path = dir.join(METRICS_FILE);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn reads_series_skipping_nulls_and_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let s = read_metrics(&metrics_file(dir.path())).unwrap();
        let names: Vec<&str> = s.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["eval/accuracy", "eval/loss", "train/loss", "train/lr"]
        );
        assert_eq!(s["train/loss"].len(), 9);
        assert_eq!(s["train/loss"][3], (5, 0.6));
        assert_eq!(s["eval/accuracy"], [(5, 0.5), (10, 0.1)]);
    }

    /// Whether the SVG has `label` as a text element.
    fn has_text(svg: &str, label: &str) -> bool {
        svg.contains(&format!(">\n{label}\n</text>"))
    }

    /// Point counts of the polylines stroked in the `i`-th series colour (curve, then legend).
    fn curves(svg: &str, i: usize) -> Vec<usize> {
        let (r, g, b) = COLORS[i];
        let stroke = format!("stroke=\"#{r:02X}{g:02X}{b:02X}\"");
        svg.lines()
            .filter(|l| l.starts_with("<polyline") && l.contains(&stroke))
            .filter_map(|l| l.split("points=\"").nth(1))
            .map(|pts| pts.split_whitespace().take_while(|p| *p != "\"/>").count())
            .collect()
    }

    #[test]
    fn draws_png_and_svg_of_each_chart() {
        let dir = tempfile::tempdir().unwrap();
        let series = read_metrics(&metrics_file(dir.path())).unwrap();
        let out = dir.path().join("plots");
        let written = plot(&series, &out, Format::Both)
            .map_err(|e| e.err)
            .unwrap();
        assert_eq!(written.len(), 6);
        let mut svgs = BTreeMap::new();
        for name in ["loss", "lr", "eval"] {
            let png = image::open(out.join(format!("{name}.png"))).unwrap();
            assert_eq!((png.width(), png.height()), SIZE);
            let svg = std::fs::read_to_string(out.join(format!("{name}.svg"))).unwrap();
            assert!(has_text(&svg, "step"), "{name}.svg has no x label");
            svgs.insert(name, svg);
        }
        let (loss, lr, eval) = (&svgs["loss"], &svgs["lr"], &svgs["eval"]);
        assert!(has_text(loss, "Loss") && has_text(loss, "loss"));
        // 9 finite train points and the legend's 2-point stroke; the 2 evals and theirs.
        assert!(has_text(loss, "train/loss") && has_text(loss, "eval/loss"));
        assert_eq!((curves(loss, 0), curves(loss, 1)), (vec![9, 2], vec![2, 2]));
        assert!(has_text(lr, "Learning rate") && has_text(lr, "learning rate"));
        assert!(has_text(lr, "1.0e-4"), "lr ticks in scientific notation");
        assert_eq!(curves(lr, 0), [10, 2]);
        assert!(has_text(eval, "eval/accuracy") && !has_text(eval, "eval/loss"));
        assert_eq!(curves(eval, 0), [2, 2]);
    }

    #[test]
    fn leaves_out_the_eval_chart_without_eval_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let mut series = read_metrics(&metrics_file(dir.path())).unwrap();
        series.remove("eval/accuracy");
        let out = dir.path().join("plots");
        let written = plot(&series, &out, Format::Svg).map_err(|e| e.err).unwrap();
        let names: Vec<_> = written.iter().map(|p| p.file_name().unwrap()).collect();
        assert_eq!(names, ["loss.svg", "lr.svg"]);
        assert!(!out.join("eval.png").exists());
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let err = read_metrics(&path).unwrap_err();
        assert!(format!("{err:#}").contains(&format!("{}: cannot read", path.display())));
        std::fs::write(
            &path,
            "{\"step\":1,\"train/loss\":2}\n{\"step\":2,\n{\"step\":3}\n",
        )
        .unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}:2: malformed record", path.display())),
            "{err}"
        );
        std::fs::write(&path, "{\"train/loss\":2}\n").unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(
            err.contains(":1: record without an integer \"step\""),
            "{err}"
        );
        let empty = plot(&Series::new(), dir.path(), Format::Both)
            .err()
            .unwrap();
        assert_eq!(empty.code(), 2);
    }
}
