//! SVG plots of a scenario's results, drawn with `plotters` (SVG backend only: text is
//! written as SVG `<text>` and laid out by plotters' own width estimate, so no font files and
//! no C libraries are involved).
//!
//! A scenario's JSON may carry `"plots": [ ... ]`; each entry is one file under
//! `bench/results/`:
//!
//! - `{"file": "x.svg", "kind": "lines", "title": "...", "x": "seconds", "y": "...",
//!   "series": [{"name": "...", "points": [[x, y], ...]}, ...]}`: one line per series. A
//!   series whose name ends in `: switch` holds vertical marks instead: its points are taken
//!   in pairs, each pair one thin segment (e.g. `[[t, 0], [t, max]]` per switch).
//! - `{"file": "x.svg", "kind": "bars", "title": "...", "y": "...", "categories": [...],
//!   "series": [{"name": "...", "values": [...]}, ...]}`: grouped bars, one group per
//!   category, one bar per series (a `null` value draws no bar).

use anyhow::{anyhow, bail, Context as _, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;
use std::path::Path;

const SIZE: (u32, u32) = (1000, 520);
/// Room right of a line plot for its legend.
const LEGEND_WIDTH: u32 = 250;

/// Distinguishable colours (Okabe–Ito, plus a few), in series order.
const PALETTE: &[RGBColor] = &[
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(0, 0, 0),
    RGBColor(160, 40, 40),
    RGBColor(90, 60, 150),
];

/// A rendered plot: its file name, its title and the SVG text.
#[derive(Debug, Clone)]
pub(crate) struct Plot {
    pub(crate) file: String,
    pub(crate) title: String,
    pub(crate) svg: String,
}

/// Renders every entry of `json["plots"]` (none if absent).
pub(crate) fn render_all(json: &Value) -> Vec<Result<Plot>> {
    json["plots"]
        .as_array()
        .map(|a| a.iter().map(render).collect())
        .unwrap_or_default()
}

/// Renders each plot of `json` into `dir`, returning (file, title) of those written and a
/// message for each that failed (a plot never fails the run).
pub(crate) fn write_all(json: &Value, dir: &Path) -> (Vec<(String, String)>, Vec<String>) {
    let mut written = Vec::new();
    let mut failed = Vec::new();
    for r in render_all(json) {
        match r.and_then(|p| {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(&p.file);
            std::fs::write(&path, &p.svg).with_context(|| format!("writing {}", path.display()))?;
            Ok(p)
        }) {
            Ok(p) => written.push((p.file, p.title)),
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    (written, failed)
}

/// Renders one plot entry.
pub(crate) fn render(spec: &Value) -> Result<Plot> {
    let file = spec["file"]
        .as_str()
        .ok_or_else(|| anyhow!("a plot without \"file\""))?;
    if file.is_empty()
        || !file.ends_with(".svg")
        || file.contains('/')
        || file.contains('\\')
        || file.starts_with('.')
    {
        bail!("plot file {file:?} must be a plain name ending in .svg");
    }
    let title = spec["title"].as_str().unwrap_or(file).to_string();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        match spec["kind"].as_str() {
            Some("lines") => lines(&root, spec, &title)?,
            Some("bars") => bars(&root, spec, &title)?,
            k => bail!("plot {file}: unknown kind {k:?} (expected \"lines\" or \"bars\")"),
        }
        root.present().map_err(draw_err)?;
    }
    Ok(Plot {
        file: file.to_string(),
        title,
        svg,
    })
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e:?}")
}

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn series_of(spec: &Value) -> Result<&Vec<Value>> {
    spec["series"]
        .as_array()
        .ok_or_else(|| anyhow!("a plot without \"series\""))
}

fn name_of(s: &Value) -> String {
    s["name"].as_str().unwrap_or("?").to_string()
}

/// The `[x, y]` pairs of a series (entries that are not two numbers are skipped).
fn points(s: &Value) -> Vec<(f64, f64)> {
    s["points"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?)))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .unwrap_or_default()
}

/// "x: switch" -> Some("x").
fn switch_method(name: &str) -> Option<&str> {
    name.strip_suffix(": switch")
}

fn lines(root: &DrawingArea<SVGBackend<'_>, Shift>, spec: &Value, title: &str) -> Result<()> {
    let series = series_of(spec)?;
    let all: Vec<(f64, f64)> = series.iter().flat_map(points).collect();
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let ymax = all.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let ymin = all.iter().map(|p| p.1).fold(0.0_f64, f64::min);
    let ytop = if ymax > 0.0 { ymax * 1.08 } else { 1.0 };
    // The legend goes right of the plot, where it hides no data.
    let (plot_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, ymin..ytop)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc(spec["x"].as_str().unwrap_or(""))
        .y_desc(spec["y"].as_str().unwrap_or(""))
        .y_label_formatter(&|v| tick(*v, ytop))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)?;
    // Line series first, each method keeps its colour for its switch marks.
    let mut colours: Vec<(String, RGBColor)> = Vec::new();
    let mut legend: Vec<(String, ShapeStyle, bool)> = Vec::new();
    let mut n = 0;
    for s in series {
        let name = name_of(s);
        if switch_method(&name).is_some() {
            continue;
        }
        let c = color(n);
        n += 1;
        colours.push((name.clone(), c));
        chart
            .draw_series(LineSeries::new(points(s), c.stroke_width(2)))
            .map_err(draw_err)?;
        legend.push((name, c.stroke_width(2), false));
    }
    for s in series {
        let name = name_of(s);
        let Some(method) = switch_method(&name) else {
            continue;
        };
        let c = colours
            .iter()
            .find(|(n, _)| n.starts_with(method))
            .map(|(_, c)| *c)
            .unwrap_or_else(|| color(n));
        let style = c.mix(0.6).stroke_width(1);
        let segs: Vec<PathElement<(f64, f64)>> = points(s)
            .chunks(2)
            .filter(|p| p.len() == 2)
            .map(|p| PathElement::new(vec![p[0], p[1]], style))
            .collect();
        chart.draw_series(segs).map_err(draw_err)?;
        legend.push((name, style, true));
    }
    let text = TextStyle::from(("sans-serif", 13).into_font())
        .pos(Pos::new(HPos::Left, VPos::Center))
        .color(&BLACK);
    for (i, (name, style, vertical)) in legend.into_iter().enumerate() {
        let y = 60 + 20 * i as i32;
        let mark = if vertical {
            vec![(9, y - 7), (9, y + 7)]
        } else {
            vec![(0, y), (18, y)]
        };
        legend_area
            .draw(&PathElement::new(mark, style))
            .map_err(draw_err)?;
        legend_area
            .draw(&Text::new(name, (26, y), text.clone()))
            .map_err(draw_err)?;
    }
    Ok(())
}

fn bars(root: &DrawingArea<SVGBackend<'_>, Shift>, spec: &Value, title: &str) -> Result<()> {
    let categories: Vec<String> = spec["categories"]
        .as_array()
        .ok_or_else(|| anyhow!("a bars plot without \"categories\""))?
        .iter()
        .map(|c| {
            c.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| c.to_string())
        })
        .collect();
    let series = series_of(spec)?;
    let values: Vec<(String, Vec<Option<f64>>)> = series
        .iter()
        .map(|s| {
            let v = s["values"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_f64().filter(|x| x.is_finite()))
                        .collect()
                })
                .unwrap_or_default();
            (name_of(s), v)
        })
        .collect();
    let ymax = values
        .iter()
        .flat_map(|(_, v)| v.iter().flatten())
        .fold(0.0_f64, |a, &b| a.max(b));
    let ytop = if ymax > 0.0 { ymax * 1.15 } else { 1.0 };
    let n = categories.len().max(1) as f64;
    // Category names are wrapped to the width of their group.
    let per_line = ((SIZE.0 as f64 - 100.0) / n / 7.5).max(6.0) as usize;
    let wrapped: Vec<Vec<String>> = categories.iter().map(|c| wrap(c, per_line)).collect();
    let lines_needed = wrapped.iter().map(Vec::len).max().unwrap_or(1) as u32;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(24 + 16 * lines_needed)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..n, 0.0..ytop)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_desc(spec["y"].as_str().unwrap_or(""))
        .y_label_formatter(&|v| tick(*v, ytop))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(draw_err)?;
    let k = values.len().max(1) as f64;
    let width = 0.8 / k;
    for (j, (name, vals)) in values.iter().enumerate() {
        let c = color(j);
        let left = |i: usize| i as f64 + 0.1 + j as f64 * width;
        let rects: Vec<Rectangle<(f64, f64)>> = vals
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)))
            .filter(|(i, _)| *i < categories.len())
            .map(|(i, v)| Rectangle::new([(left(i), 0.0), (left(i) + width, v)], c.filled()))
            .collect();
        chart
            .draw_series(rects)
            .map_err(draw_err)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
        // The value above each bar.
        let top = TextStyle::from(("sans-serif", 12).into_font())
            .pos(Pos::new(HPos::Center, VPos::Bottom))
            .color(&BLACK);
        let labels: Vec<Text<(f64, f64), String>> = vals
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.map(|v| (i, v)))
            .filter(|(i, _)| *i < categories.len())
            .map(|(i, v)| Text::new(short(v), (left(i) + width / 2.0, v), top.clone()))
            .collect();
        chart.draw_series(labels).map_err(draw_err)?;
    }
    // Category names under the axis, centred under their group.
    let under = TextStyle::from(("sans-serif", 14).into_font())
        .pos(Pos::new(HPos::Center, VPos::Top))
        .color(&BLACK);
    let names: Vec<_> = wrapped
        .iter()
        .enumerate()
        .flat_map(|(i, lines)| {
            let under = &under;
            lines.iter().enumerate().map(move |(k, line)| {
                EmptyElement::at((i as f64 + 0.5, 0.0))
                    + Text::new(line.clone(), (0, 8 + 16 * k as i32), under.clone())
            })
        })
        .collect();
    chart.draw_series(names).map_err(draw_err)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(draw_err)?;
    Ok(())
}

/// Words of `text` in lines of at most `width` characters (a longer word gets a line of
/// its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split_whitespace() {
        match lines.last_mut() {
            Some(l) if l.chars().count() + 1 + word.chars().count() <= width => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    if lines.is_empty() {
        lines.push(String::new());
    }
    lines
}

/// An axis tick: no decimals when the axis goes past 100, else up to two, trailing zeros
/// dropped.
fn tick(v: f64, top: f64) -> String {
    if top >= 100.0 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.2}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".into()
        } else {
            s.to_string()
        }
    }
}

/// A bar's value with about three significant digits.
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(svg: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("not well-formed: {e}\n{svg}"))
    }

    fn texts(doc: &roxmltree::Document<'_>) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text().map(|t| t.trim().to_string()))
            .collect()
    }

    #[test]
    fn a_timeline_has_its_title_series_and_switch_marks() {
        let spec = json!({
            "file": "t.svg", "kind": "lines", "title": "Switch <under> load & more",
            "x": "seconds", "y": "requests per 100 ms",
            "series": [
                {"name": "cutover blue-green: ok", "points": [[0.0, 41.0], [0.1, 40.0], [0.2, 42.0]]},
                {"name": "cutover blue-green: failed", "points": [[0.0, 0.0], [0.1, 0.0], [0.2, 0.0]]},
                {"name": "naive: failed", "points": [[0.0, 0.0], [0.1, 12.0], [0.2, 0.0]]},
                {"name": "cutover blue-green: switch", "points": [[0.05, 0.0], [0.05, 42.0], [0.15, 0.0], [0.15, 42.0]]}
            ]
        });
        let p = render(&spec).unwrap();
        assert_eq!(p.file, "t.svg");
        let doc = parse(&p.svg);
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let t = texts(&doc);
        for want in [
            "Switch <under> load & more",
            "cutover blue-green: ok",
            "cutover blue-green: failed",
            "naive: failed",
            "cutover blue-green: switch",
            "seconds",
            "requests per 100 ms",
        ] {
            assert!(t.iter().any(|x| x == want), "{want:?} not in {t:?}");
        }
        // Three polylines for the series, plus two switch segments.
        let lines = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline"))
            .count();
        assert!(lines >= 5, "{lines} polylines");
    }

    #[test]
    fn bars_have_categories_series_and_values() {
        let spec = json!({
            "file": "b.svg", "kind": "bars", "title": "Deploy speed", "y": "seconds",
            "categories": ["1 host", "4 hosts"],
            "series": [
                {"name": "cutover", "values": [1.2, 2.3]},
                {"name": "floor", "values": [0.9, null]}
            ]
        });
        let p = render(&spec).unwrap();
        let doc = parse(&p.svg);
        let t = texts(&doc);
        for want in [
            "Deploy speed",
            "1 host",
            "4 hosts",
            "cutover",
            "floor",
            "1.20",
            "2.30",
            "0.90",
        ] {
            assert!(t.iter().any(|x| x == want), "{want:?} not in {t:?}");
        }
        // Three bars with values (null draws none), plus the legend's two boxes.
        let filled_rects = doc
            .descendants()
            .filter(|n| n.has_tag_name("rect") && n.attribute("fill") != Some("#FFFFFF"))
            .count();
        assert!(filled_rects >= 5, "{filled_rects}");
    }

    #[test]
    fn long_category_names_wrap_and_ticks_are_short() {
        assert_eq!(
            wrap("direct to the published port (docker-proxy)", 16),
            vec!["direct to the", "published port", "(docker-proxy)"]
        );
        assert_eq!(wrap("", 5), vec![""]);
        assert_eq!(
            wrap("averyveryverylongword x", 4),
            vec!["averyveryverylongword", "x"]
        );
        assert_eq!(tick(40000.0, 45000.0), "40000");
        assert_eq!(tick(2.5, 10.0), "2.5");
        assert_eq!(tick(0.0, 10.0), "0");
        assert_eq!(tick(0.25, 0.5), "0.25");
    }

    #[test]
    fn bad_specs_are_errors_not_panics() {
        for spec in [
            json!({"kind": "lines", "series": []}),
            json!({"file": "../x.svg", "kind": "lines", "series": []}),
            json!({"file": "x.png", "kind": "lines", "series": []}),
            json!({"file": "x.svg", "kind": "pie", "series": []}),
            json!({"file": "x.svg", "kind": "bars", "series": []}),
        ] {
            assert!(render(&spec).is_err(), "{spec}");
        }
        // Empty or degenerate data still draws an empty, well-formed chart.
        let p = render(
            &json!({"file": "e.svg", "kind": "lines", "series": [{"name": "a", "points": []}]}),
        )
        .unwrap();
        parse(&p.svg);
        let p = render(&json!({"file": "z.svg", "kind": "bars", "categories": ["c"], "series": [{"name": "a", "values": [0.0]}]}))
            .unwrap();
        parse(&p.svg);
    }

    #[test]
    fn write_all_writes_files_and_reports_failures() {
        let dir = std::env::temp_dir().join(format!("cutover-bench-plot-{}", std::process::id()));
        let json = json!({"plots": [
            {"file": "ok.svg", "kind": "bars", "categories": ["a"], "series": [{"name": "s", "values": [1.0]}]},
            {"file": "bad.svg", "kind": "nope", "series": []}
        ]});
        let (written, failed) = write_all(&json, &dir);
        assert_eq!(written, vec![("ok.svg".to_string(), "ok.svg".to_string())]);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(std::fs::read_to_string(dir.join("ok.svg"))
            .unwrap()
            .starts_with("<svg"));
        assert!(!dir.join("bad.svg").exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(write_all(&json!({"no": "plots"}), &dir).0.is_empty());
    }
}
