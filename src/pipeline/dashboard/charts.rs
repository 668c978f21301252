//! The dashboard's charts, drawn on the server as SVG with `plotters` (no chart library in the
//! page): the flag rate over the feed, and a score's recent histogram against its calibration
//! distribution with the threshold drawn.

use plotters::prelude::*;

use super::board::Watch;

type PlotResult<T> = Result<T, Box<dyn std::error::Error>>;

const COLOURS: [RGBColor; 6] = [
    RGBColor(214, 39, 40),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// An empty chart with a message (no data yet).
fn empty(title: &str, size: (u32, u32), msg: &str) -> PlotResult<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(title, ("sans-serif", 15))?;
        root.draw_text(
            msg,
            &("sans-serif", 13).into_font().color(&BLACK.mix(0.6)),
            (20, 30),
        )?;
        root.present()?;
    }
    Ok(svg)
}

/// Flag rate (%) per block of records: `rates` from [`super::Board::flag_rates`], `names` of
/// the flagged score then each scale, `expected` the calibration's target FPR, `alarms` the
/// records where drift alarms started. Returns the SVG text.
pub fn flag_rate_svg(
    rates: &[(u64, f64, Vec<f64>)],
    names: &[String],
    expected: Option<f64>,
    alarms: &[(u64, String)],
) -> PlotResult<String> {
    let title = "flag rate per block of records";
    let size = (640, 300);
    if rates.is_empty() {
        return empty(title, size, "no scored records yet");
    }
    let x0 = rates[0].0 as f64;
    let x1 = (rates.last().map(|r| r.0).unwrap_or(0) as f64).max(x0 + 1.0);
    let ymax = rates
        .iter()
        .flat_map(|(_, f, s)| std::iter::once(*f).chain(s.iter().copied()))
        .filter(|v| v.is_finite())
        .fold(expected.unwrap_or(0.0), f64::max)
        .max(0.02)
        * 110.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(x0..x1, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("record")
            .y_desc("% flagged")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        for (s, name) in names.iter().enumerate() {
            let c = COLOURS[s % COLOURS.len()];
            let pts: Vec<(f64, f64)> = rates
                .iter()
                .filter_map(|(x, f, sc)| {
                    let v = if s == 0 { *f } else { sc.get(s - 1).copied()? };
                    v.is_finite().then_some((*x as f64, 100.0 * v))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let width = if s == 0 { 3 } else { 1 };
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(width)))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c));
        }
        if let Some(e) = expected {
            chart
                .draw_series(LineSeries::new(
                    vec![(x0, 100.0 * e), (x1, 100.0 * e)],
                    BLACK.mix(0.4),
                ))?
                .label(format!("target FPR {:.1}%", 100.0 * e))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.4)));
        }
        for (r, _) in alarms {
            let x = (*r as f64).clamp(x0, x1);
            chart.draw_series(LineSeries::new(
                vec![(x, 0.0), (x, ymax)],
                RGBColor(200, 0, 0).mix(0.5).stroke_width(2),
            ))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Share of the calibration distribution (given by its evenly spaced `quantiles`) below `x`.
fn cdf(quantiles: &[f64], x: f64) -> f64 {
    let n = quantiles.len();
    if n < 2 || x <= quantiles[0] {
        return 0.0;
    }
    if x >= quantiles[n - 1] {
        return 1.0;
    }
    let i = quantiles.partition_point(|&q| q <= x).clamp(1, n - 1);
    let (a, b) = (quantiles[i - 1], quantiles[i]);
    let frac = if b > a { (x - a) / (b - a) } else { 1.0 };
    ((i - 1) as f64 + frac) / (n - 1) as f64
}

/// Histogram shares of `values` and of the calibration over `bins` equal bins spanning
/// `lo..hi` (values outside go to the end bins). Returns (edges, live shares, calibration
/// shares; the last empty without quantiles).
pub fn histograms(
    values: &[f64],
    quantiles: &[f64],
    lo: f64,
    hi: f64,
    bins: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let w = (hi - lo) / bins as f64;
    let edges: Vec<f64> = (0..=bins).map(|i| lo + i as f64 * w).collect();
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let mut live = vec![0.0; bins];
    for v in &finite {
        let b = (((v - lo) / w).floor() as i64).clamp(0, bins as i64 - 1) as usize;
        live[b] += 1.0 / finite.len() as f64;
    }
    let cal = if quantiles.len() >= 2 {
        (0..bins)
            .map(|b| {
                let a = if b == 0 { f64::NEG_INFINITY } else { edges[b] };
                let z = if b + 1 == bins {
                    f64::INFINITY
                } else {
                    edges[b + 1]
                };
                cdf(quantiles, z) - cdf(quantiles, a)
            })
            .collect()
    } else {
        vec![]
    };
    (edges, live, cal)
}

/// A score's recent values against its calibration distribution, threshold drawn. Returns
/// the SVG text.
pub fn histogram_svg(watch: &Watch, values: &[f64]) -> PlotResult<String> {
    let title = format!("{}: last {} rows vs calibration", watch.kind, values.len());
    let size = (420, 260);
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let q = &watch.quantiles;
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    // The calibration's central 99.8 % and the live values set the range.
    if q.len() > 10 {
        lo = q[1];
        hi = q[q.len() - 2];
    }
    for v in finite.iter().chain(watch.threshold.as_ref()) {
        lo = lo.min(*v);
        hi = hi.max(*v);
    }
    if !(lo.is_finite() && hi.is_finite()) {
        return empty(&title, size, "no values yet");
    }
    if hi - lo < 1e-9 {
        lo -= 0.5;
        hi += 0.5;
    }
    let pad = 0.02 * (hi - lo);
    let (lo, hi) = (lo - pad, hi + pad);
    let (edges, live, cal) = histograms(&finite, q, lo, hi, 40);
    let ymax = live.iter().chain(&cal).copied().fold(0.01, f64::max) * 1.15 * 100.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&title, ("sans-serif", 14))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(40)
            .build_cartesian_2d(lo..hi, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_labels(6)
            .y_desc("% of rows")
            .draw()?;
        let steps = |shares: &[f64]| -> Vec<(f64, f64)> {
            shares
                .iter()
                .enumerate()
                .flat_map(|(i, s)| [(edges[i], 100.0 * s), (edges[i + 1], 100.0 * s)])
                .collect()
        };
        if !cal.is_empty() {
            chart
                .draw_series(AreaSeries::new(steps(&cal), 0.0, COLOURS[1].mix(0.25)))?
                .label("calibration")
                .legend(|(x, y)| {
                    Rectangle::new([(x, y - 4), (x + 18, y + 4)], COLOURS[1].mix(0.25).filled())
                });
        }
        chart
            .draw_series(LineSeries::new(steps(&live), COLOURS[0].stroke_width(2)))?
            .label("recent")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], COLOURS[0]));
        if let Some(t) = watch.threshold {
            chart
                .draw_series(LineSeries::new(
                    vec![(t, 0.0), (t, ymax)],
                    BLACK.stroke_width(2),
                ))?
                .label(format!("threshold {t:.3}"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calibration's shares come from its quantiles: a uniform(0, 1) calibration puts a
    /// tenth in each tenth, whatever the live values.
    #[test]
    fn calibration_histogram_follows_the_quantiles() {
        let q: Vec<f64> = (0..1001).map(|i| i as f64 / 1000.0).collect();
        let (edges, live, cal) = histograms(&[0.05, 0.05, 0.95, f64::NAN], &q, 0.0, 1.0, 10);
        assert_eq!(edges.len(), 11);
        for c in &cal {
            assert!((c - 0.1).abs() < 1e-9, "{cal:?}");
        }
        assert!((live[0] - 2.0 / 3.0).abs() < 1e-12 && (live[9] - 1.0 / 3.0).abs() < 1e-12);
        assert!((cdf(&q, 0.25) - 0.25).abs() < 1e-12);
        assert_eq!(cdf(&q, -1.0), 0.0);
        assert_eq!(cdf(&q, 2.0), 1.0);
        // Without quantiles: no calibration curve.
        assert!(histograms(&[0.5], &[], 0.0, 1.0, 4).2.is_empty());
    }
}
