//! PNG charts of a [`SpectrumReport`] (plotters, bitmap backend, text in the bundled DejaVu Sans
//! through ab_glyph, so no system font library is involved):
//!
//! - `{module}.png` per module type, four panels over the block index i = 1..k: σ-ratio of the
//!   top block (one line per layer, hue from violet = layer 0 to red = last layer), matched
//!   alignment of u and of v (same colouring), and the principal-angle cosines of the top,
//!   middle and bottom blocks for U (solid) and V (dashed), averaged over layers (with
//!   `--control`, also the random-change control's U top and bottom blocks in grey);
//! - `layers.png`: per layer, one line per module type: ρ_1, ‖ΔW‖/‖W‖, and the mean
//!   principal-angle cosine of U's top block and of U's bottom block (same y scale).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::{MatrixSpectrum, SpectrumReport};
use crate::error::{Error, Result};

const SIZE: (u32, u32) = (1100, 780);
pub(crate) const FONT: &str = "sans-serif";

/// Colours of the module types (q, k, v, o, gate, up, down) in the `layers.png` legend.
const MODULE_COLORS: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];
const BLOCK_COLORS: [RGBColor; 3] = [RGBColor(214, 39, 40), RGBColor(44, 160, 44), RGBColor(31, 119, 180)];

pub(crate) fn register() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| ok = register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("spectrum plot", "the bundled DejaVu Sans font could not be parsed"))
    }
}

/// Hue from violet (layer 0) to red (last layer).
fn layer_color(layer: usize, layers: usize) -> HSLColor {
    let t = if layers > 1 { layer as f64 / (layers - 1) as f64 } else { 0.0 };
    HSLColor(0.78 * (1.0 - t), 0.75, 0.45)
}

/// A y range covering `values` (finite ones) with 5 % padding; never empty.
fn y_range<'a>(values: impl IntoIterator<Item = &'a f64>) -> Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &v in values {
        if v.is_finite() {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.05).max(1e-6 * hi.abs().max(1.0));
    (lo - pad)..(hi + pad)
}

/// One line of a panel.
struct Line {
    points: Vec<(f64, f64)>,
    color: RGBAColor,
    dashed: bool,
    width: u32,
    label: Option<String>,
}

fn rgba(c: impl Color) -> RGBAColor {
    c.to_rgba()
}

/// What one panel shows.
struct Panel<'a> {
    title: &'a str,
    x_desc: &'a str,
    y_desc: &'a str,
    x: Range<f64>,
    y: Range<f64>,
    lines: &'a [Line],
    /// A thin grey horizontal line at this y.
    reference: Option<f64>,
    /// Logarithmic y axis (y must be > 0).
    log_y: bool,
    /// Where the legend goes (if any line has a label).
    legend: SeriesLabelPosition,
}

pub(crate) type DynError = Box<dyn std::error::Error>;
/// The (U, V) principal-angle cosines of one block of a matrix.
type BlockCosines = fn(&MatrixSpectrum) -> (&[f64], &[f64]);
pub(crate) type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Axes, lines and legend of a built chart (the same code for linear and log y axes).
macro_rules! draw_chart {
    ($chart:ident, $p:ident, $fmt:expr) => {{
        $chart
            .configure_mesh()
            .x_desc($p.x_desc)
            .y_desc($p.y_desc)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(WHITE.mix(0.0))
            .y_label_formatter(&$fmt)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        if let Some(r) = $p.reference {
            $chart.draw_series(LineSeries::new(vec![($p.x.start, r), ($p.x.end, r)], ShapeStyle::from(&BLACK.mix(0.35)).stroke_width(1)))?;
        }
        let mut labelled = false;
        for l in $p.lines {
            let style = ShapeStyle::from(&l.color).stroke_width(l.width);
            let anno = if l.dashed {
                $chart.draw_series(DashedLineSeries::new(l.points.iter().copied(), 7, 5, style))?
            } else {
                $chart.draw_series(LineSeries::new(l.points.iter().copied(), style))?
            };
            if let Some(label) = &l.label {
                labelled = true;
                let (c, dashed) = (l.color, l.dashed);
                anno.label(label.as_str()).legend(move |(px, py)| {
                    let seg = if dashed { vec![(px, py), (px + 8, py)] } else { vec![(px, py), (px + 22, py)] };
                    PathElement::new(seg, ShapeStyle::from(&c).stroke_width(2))
                });
            }
        }
        if labelled {
            $chart
                .configure_series_labels()
                .label_font((FONT, 13))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .position($p.legend.clone())
                .draw()?;
        }
    }};
}

fn panel(area: &Area<'_>, p: &Panel<'_>) -> std::result::Result<(), DynError> {
    let mut builder = ChartBuilder::on(area);
    builder.caption(p.title, (FONT, 17)).margin(10).x_label_area_size(38).y_label_area_size(70);
    if p.log_y {
        let mut chart = builder.build_cartesian_2d(p.x.clone(), p.y.clone().log_scale())?;
        draw_chart!(chart, p, |v: &f64| format!("{v:.0e}"));
    } else {
        let mut chart = builder.build_cartesian_2d(p.x.clone(), p.y.clone())?;
        draw_chart!(chart, p, |v: &f64| format!("{v:.4}"));
    }
    Ok(())
}

/// A log-axis range covering the positive `values` (floored at 1e-12), padded by ×/÷ 1.5.
fn log_range<'a>(values: impl IntoIterator<Item = &'a f64>) -> Range<f64> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &v in values {
        if v.is_finite() {
            let v = v.max(LOG_FLOOR);
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if !lo.is_finite() {
        return LOG_FLOOR..1.0;
    }
    (lo / 1.5)..(hi * 1.5).max(lo * 10.0)
}

const LOG_FLOOR: f64 = 1e-12;

/// Renders `draw` on a white RGB canvas of [`SIZE`] and writes it to `path` as an indexed PNG
/// (see [`palette`]) with best compression: the charts are mostly flat white, so a 150–300 KB RGB
/// image becomes a few tens of KB.
pub(crate) fn render_png(path: &Path, draw: impl FnOnce(&Area<'_>) -> std::result::Result<(), DynError>) -> std::result::Result<(), DynError> {
    let (w, h) = SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        draw(&root)?;
        root.present()?;
    }
    let (pal, idx) = palette(&buf);
    let file = std::fs::File::create(path)?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(pal);
    enc.set_compression(png::Compression::Best);
    enc.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&idx)?;
    writer.finish()?;
    Ok(())
}

/// Reduces an RGB buffer to at most 256 colours: the most frequent colours form the palette
/// (white, text, grid and the pure line colours always make it), every other colour (the
/// anti-aliased edge blends) maps to its nearest palette entry in RGB distance. Returns the
/// palette (RGB triples) and one index per pixel.
fn palette(rgb: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use std::collections::HashMap;
    let mut counts: HashMap<[u8; 3], u32> = HashMap::new();
    for p in rgb.chunks_exact(3) {
        *counts.entry([p[0], p[1], p[2]]).or_default() += 1;
    }
    let mut by_count: Vec<([u8; 3], u32)> = counts.into_iter().collect();
    by_count.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let pal: Vec<[u8; 3]> = by_count.iter().take(256).map(|c| c.0).collect();
    let nearest = |c: [u8; 3]| -> u8 {
        let d = |p: &[u8; 3]| (0..3).map(|i| (p[i] as i32 - c[i] as i32).pow(2)).sum::<i32>();
        (0..pal.len()).min_by_key(|&i| d(&pal[i])).unwrap_or(0) as u8
    };
    let map: HashMap<[u8; 3], u8> = by_count.iter().map(|c| (c.0, nearest(c.0))).collect();
    let idx = rgb.chunks_exact(3).map(|p| map[&[p[0], p[1], p[2]]]).collect();
    (pal.into_iter().flatten().collect(), idx)
}

fn per_layer_lines(ms: &[&MatrixSpectrum], layers: usize, get: impl Fn(&MatrixSpectrum) -> &[f64]) -> Vec<Line> {
    ms.iter()
        .map(|m| Line {
            points: get(m).iter().enumerate().map(|(i, &v)| ((i + 1) as f64, v)).collect(),
            color: rgba(layer_color(m.layer, layers)),
            dashed: false,
            width: 1,
            label: None,
        })
        .collect()
}

/// Elementwise mean over layers (up to the shortest length).
fn mean_curve(ms: &[&MatrixSpectrum], get: impl Fn(&MatrixSpectrum) -> &[f64]) -> Vec<(f64, f64)> {
    let len = ms.iter().map(|m| get(m).len()).min().unwrap_or(0);
    (0..len).map(|i| ((i + 1) as f64, ms.iter().map(|m| get(m)[i]).sum::<f64>() / ms.len() as f64)).collect()
}

fn module_chart(report: &SpectrumReport, module: &str, root: &Area<'_>) -> std::result::Result<(), DynError> {
    let ms: Vec<&MatrixSpectrum> = report.matrices.iter().filter(|m| m.module == module).collect();
    let layers = report.matrices.iter().map(|m| m.layer + 1).max().unwrap_or(1);
    let k = ms.iter().map(|m| m.stats.k).max().unwrap_or(1);
    let x = 0.5..(k as f64 + 0.5);
    let (m, n) = ms.first().map(|m| (m.stats.shape[0], m.stats.shape[1])).unwrap_or((0, 0));
    let root = root.titled(
        &format!(
            "{module} [{m}×{n}], {} ({}), {} layers, k = {k}; per-layer lines: layer 0 (violet) → {} (red)",
            report.method,
            source_name(report),
            ms.len(),
            layers - 1
        ),
        (FONT, 19),
    )?;
    let areas = root.split_evenly((2, 2));
    let ratio = per_layer_lines(&ms, layers, |m| &m.stats.ratio.top);
    let p = Panel {
        title: "singular-value ratio σ_i(W')/σ_i(W0), top k",
        x_desc: "i",
        y_desc: "ratio",
        x: x.clone(),
        y: y_range(ms.iter().flat_map(|m| m.stats.ratio.top.iter()).chain([1.0].iter())),
        lines: &ratio,
        reference: Some(1.0),
        log_y: false,
        legend: SeriesLabelPosition::LowerRight,
    };
    panel(&areas[0], &p)?;
    let au = per_layer_lines(&ms, layers, |m| &m.stats.align_u.top);
    let av = per_layer_lines(&ms, layers, |m| &m.stats.align_v.top);
    let yr = y_range(ms.iter().flat_map(|m| m.stats.align_u.top.iter().chain(&m.stats.align_v.top)).chain([1.0].iter()));
    let p = Panel {
        title: "matched left vectors |⟨u_i, u'_i⟩|, top k",
        x_desc: "i",
        y_desc: "|cos|",
        x: x.clone(),
        y: yr.clone(),
        lines: &au,
        reference: Some(1.0),
        log_y: false,
        legend: SeriesLabelPosition::LowerRight,
    };
    panel(&areas[1], &p)?;
    let p = Panel { title: "matched right vectors |⟨v_i, v'_i⟩|, top k", lines: &av, ..p };
    panel(&areas[2], &p)?;
    let mut lines = Vec::new();
    let blocks: [(&str, BlockCosines); 3] = [
        ("top", |m| (&m.stats.cos_u.top, &m.stats.cos_v.top)),
        ("middle", |m| (&m.stats.cos_u.mid, &m.stats.cos_v.mid)),
        ("bottom", |m| (&m.stats.cos_u.bottom, &m.stats.cos_v.bottom)),
    ];
    // 1 − cos θ_j on a log axis: a stable block sits near the floor, a rotated one near 1.
    let sines = |pts: Vec<(f64, f64)>| -> Vec<(f64, f64)> { pts.into_iter().map(|(j, c)| (j, (1.0 - c).max(LOG_FLOOR))).collect() };
    for (bi, (name, get)) in blocks.iter().enumerate() {
        let c = rgba(BLOCK_COLORS[bi]);
        lines.push(Line { points: sines(mean_curve(&ms, |m| get(m).0)), color: c, dashed: false, width: 2, label: Some(format!("U {name}")) });
        lines.push(Line { points: sines(mean_curve(&ms, |m| get(m).1)), color: c, dashed: true, width: 2, label: Some(format!("V {name}")) });
    }
    // The random-change control, if computed: U's top and bottom blocks in grey.
    let with_control: Vec<&MatrixSpectrum> = ms.iter().copied().filter(|m| m.control.is_some()).collect();
    if !with_control.is_empty() {
        let grey = rgba(RGBColor(120, 120, 120));
        let top = sines(mean_curve(&with_control, |m| m.control.as_ref().map(|c| c.cos_u.top.as_slice()).unwrap_or(&[])));
        let bottom = sines(mean_curve(&with_control, |m| m.control.as_ref().map(|c| c.cos_u.bottom.as_slice()).unwrap_or(&[])));
        lines.push(Line { points: top, color: grey, dashed: false, width: 2, label: Some("noise: U top".into()) });
        lines.push(Line { points: bottom, color: grey, dashed: true, width: 2, label: Some("noise: U bottom".into()) });
    }
    let p = Panel {
        title: "1 − cos θ_j, principal angles per block (mean over layers)",
        x_desc: "j (cosines in descending order)",
        y_desc: "1 − cos θ_j",
        x,
        y: log_range(lines.iter().flat_map(|l| l.points.iter().map(|p| &p.1))),
        lines: &lines,
        reference: None,
        log_y: true,
        legend: SeriesLabelPosition::UpperLeft,
    };
    panel(&areas[3], &p)
}

fn source_name(report: &SpectrumReport) -> String {
    let source = report.adapter.as_deref().or(report.tuned.as_deref()).unwrap_or("?");
    let p = Path::new(source);
    // An adapter is usually `<run>/adapter`: name the run folder too.
    match (p.parent().and_then(|d| d.file_name()), p.file_name()) {
        (Some(d), Some(f)) => format!("{}/{}", d.to_string_lossy(), f.to_string_lossy()),
        (_, Some(f)) => f.to_string_lossy().into_owned(),
        _ => source.to_string(),
    }
}

fn layers_chart(report: &SpectrumReport, root: &Area<'_>) -> std::result::Result<(), DynError> {
    let layers = report.matrices.iter().map(|m| m.layer + 1).max().unwrap_or(1);
    let x = -0.5..(layers as f64 - 0.5);
    let root = root.titled(&format!("per layer and module type: {} ({})", report.method, source_name(report)), (FONT, 19))?;
    let areas = root.split_evenly((2, 2));
    let modules: Vec<&str> = report.summary.iter().map(|s| s.module.as_str()).collect();
    let lines = |get: &dyn Fn(&MatrixSpectrum) -> f64| -> Vec<Line> {
        modules
            .iter()
            .enumerate()
            .map(|(mi, &module)| {
                let pos = mi;
                Line {
                    points: report.matrices.iter().filter(|m| m.module == module).map(|m| (m.layer as f64, get(m))).collect(),
                    color: rgba(MODULE_COLORS[pos % MODULE_COLORS.len()]),
                    dashed: false,
                    width: 2,
                    label: Some(module.to_string()),
                }
            })
            .collect()
    };
    let all_y = |ls: &[Line]| -> Vec<f64> { ls.iter().flat_map(|l| l.points.iter().map(|p| p.1)).collect() };
    let rho1 = lines(&|m| m.stats.ratio.top.first().copied().unwrap_or(f64::NAN));
    let ys = all_y(&rho1);
    let p = Panel {
        title: "ρ_1 = σ_1(W')/σ_1(W0)",
        x_desc: "layer",
        y_desc: "ratio",
        x: x.clone(),
        y: y_range(ys.iter().chain([1.0].iter())),
        lines: &rho1,
        reference: Some(1.0),
        log_y: false,
        legend: SeriesLabelPosition::UpperLeft,
    };
    panel(&areas[0], &p)?;
    let rel = lines(&|m| m.stats.rel_delta);
    let ys = all_y(&rel);
    let p = Panel {
        title: "‖W' − W0‖_F / ‖W0‖_F", y_desc: "relative change", y: y_range(ys.iter().chain([0.0].iter())), lines: &rel, reference: None, ..p
    };
    panel(&areas[1], &p)?;
    let mean_sine = |v: &[f64]| (v.iter().map(|c| 1.0 - c).sum::<f64>() / v.len().max(1) as f64).max(LOG_FLOOR);
    let top = lines(&|m| mean_sine(&m.stats.cos_u.top));
    let bottom = lines(&|m| mean_sine(&m.stats.cos_u.bottom));
    let ys: Vec<f64> = all_y(&top).into_iter().chain(all_y(&bottom)).collect();
    let p = Panel {
        title: "U top block: mean (1 − cos θ) of the principal angles",
        x_desc: "layer",
        y_desc: "1 − cos θ",
        x,
        y: log_range(ys.iter()),
        lines: &top,
        reference: None,
        log_y: true,
        legend: SeriesLabelPosition::UpperLeft,
    };
    panel(&areas[2], &p)?;
    let p = Panel { title: "U bottom block: mean (1 − cos θ), same scale", lines: &bottom, ..p };
    panel(&areas[3], &p)
}

/// Writes `{module}.png` for every module type in the report and `layers.png` into `dir`
/// (created if needed). Returns the files written.
pub fn write_plots(report: &SpectrumReport, dir: &Path) -> Result<Vec<PathBuf>> {
    register()?;
    std::fs::create_dir_all(dir).map_err(|e| Error::Io { path: dir.to_path_buf(), source: e })?;
    let fail = |p: &Path, e: DynError| Error::invalid("spectrum plot", format!("{}: {e}", p.display()));
    let mut written = Vec::new();
    for s in &report.summary {
        let p = dir.join(format!("{}.png", s.module));
        render_png(&p, |root| module_chart(report, &s.module, root)).map_err(|e| fail(&p, e))?;
        written.push(p);
    }
    let p = dir.join("layers.png");
    render_png(&p, |root| layers_chart(report, root)).map_err(|e| fail(&p, e))?;
    written.push(p);
    Ok(written)
}
