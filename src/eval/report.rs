//! HTML evaluation report: for every score, a histogram of in-distribution vs each OOD set and
//! the ROC curves, drawn as inline SVG with plotters (no fonts or system libraries needed).

use std::fmt::Write;

use plotters::prelude::*;

use super::{EvalReport, ScoredSet, roc_curve};
use crate::score::ScoreKind;

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

type PlotResult<T> = Result<T, Box<dyn std::error::Error>>;

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Density histograms (as step lines) of one score over several sets, one SVG.
pub fn histogram_svg(title: &str, sets: &[(&str, Vec<f64>)]) -> PlotResult<String> {
    let mut pooled: Vec<f64> = sets
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    pooled.sort_by(f64::total_cmp);
    if pooled.is_empty() {
        return Ok(format!("<p>{title}: no finite scores</p>"));
    }
    let (mut lo, mut hi) = (quantile(&pooled, 0.005), quantile(&pooled, 0.995));
    if hi <= lo {
        lo -= 0.5;
        hi += 0.5;
    }
    let bins = 50;
    let width = (hi - lo) / bins as f64;
    let mut curves = Vec::new();
    let mut ymax = 0f64;
    for (name, v) in sets {
        let mut counts = vec![0usize; bins];
        let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        for x in &finite {
            let b = (((x - lo) / width).floor() as i64).clamp(0, bins as i64 - 1) as usize;
            counts[b] += 1;
        }
        let norm = finite.len().max(1) as f64 * width;
        let mut pts = Vec::with_capacity(2 * bins);
        for (i, c) in counts.iter().enumerate() {
            let d = *c as f64 / norm;
            ymax = ymax.max(d);
            pts.push((lo + i as f64 * width, d));
            pts.push((lo + (i + 1) as f64 * width, d));
        }
        curves.push((name.to_string(), pts, v.len() - finite.len()));
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (520, 320)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(lo..hi, 0f64..ymax * 1.1)?;
        chart
            .configure_mesh()
            .x_desc("score (higher = more anomalous)")
            .y_desc("density")
            .draw()?;
        for (i, (name, pts, nonfinite)) in curves.into_iter().enumerate() {
            let c = COLOURS[i % COLOURS.len()];
            let label = if nonfinite > 0 {
                format!("{name} ({nonfinite} non-finite)")
            } else {
                name
            };
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// ROC curves of one score, in-distribution vs each OOD set, one SVG.
pub fn roc_svg(title: &str, neg: &[f64], oods: &[(&str, Vec<f64>, f64)]) -> PlotResult<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (340, 320)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc("false-positive rate")
            .y_desc("true-positive rate")
            .draw()?;
        chart.draw_series(LineSeries::new(
            vec![(0.0, 0.0), (1.0, 1.0)],
            BLACK.mix(0.3),
        ))?;
        for (i, (name, pos, auroc)) in oods.iter().enumerate() {
            let c = COLOURS[(i + 1) % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(
                    thin(&roc_curve(neg, pos), 0.002),
                    c.stroke_width(2),
                ))?
                .label(format!("{name} (AUROC {auroc:.3})"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Drops curve points closer than `step` (in both coordinates) to the last kept one: a 340-pixel
/// plot shows no difference below ~0.003, and 10,000-image sets otherwise write every one of
/// their thousands of ROC points into the SVG. The first and last points are kept.
fn thin(points: &[(f64, f64)], step: f64) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for (i, &p) in points.iter().enumerate() {
        let far = out
            .last()
            .is_none_or(|q| (p.0 - q.0).abs() >= step || (p.1 - q.1).abs() >= step);
        if far || i + 1 == points.len() {
            out.push(p);
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The whole report as one self-contained HTML page.
pub fn html(report: &EvalReport, in_set: &ScoredSet, oods: &[ScoredSet]) -> PlotResult<String> {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>glowwatch eval</title>\
         <style>body{{font-family:sans-serif;margin:20px}} pre{{background:#f6f6f6;padding:8px}} \
         .row{{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}}</style></head><body>\
         <h1>glowwatch eval</h1><p>in-distribution model <code>{}</code>, general model <code>{}</code>; \
         negatives: {} ({} images)</p><pre>{}</pre>",
        escape(&report.in_model),
        escape(report.general_model.as_deref().unwrap_or("none")),
        escape(&report.in_set.0),
        report.in_set.1,
        escape(&report.table())
    );
    let mut kinds: Vec<ScoreKind> = report.results.iter().map(|r| r.score).collect();
    kinds.dedup();
    for k in kinds {
        let neg = in_set.values(k);
        let mut sets = vec![(in_set.name.as_str(), neg.clone())];
        let mut rocs = Vec::new();
        for o in oods {
            let pos = o.values(k);
            let auroc = report
                .results
                .iter()
                .find(|r| r.score == k && r.ood == o.name)
                .map(|r| r.metrics.auroc)
                .unwrap_or(f64::NAN);
            sets.push((o.name.as_str(), pos.clone()));
            rocs.push((o.name.as_str(), pos, auroc));
        }
        let _ = write!(
            h,
            "<h2>{k}</h2><div class=\"row\">{}{}</div>",
            histogram_svg(&k.to_string(), &sets)?,
            roc_svg(&format!("ROC {k}"), &neg, &rocs)?
        );
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinning_keeps_the_ends_and_drops_sub_step_points() {
        let pts: Vec<(f64, f64)> = (0..=1000).map(|i| (i as f64 / 1000.0, 0.5)).collect();
        let t = thin(&pts, 0.0095);
        assert_eq!(t.first(), Some(&(0.0, 0.5)));
        assert_eq!(t.last(), Some(&(1.0, 0.5)));
        assert_eq!(t.len(), 101);
    }
}
