//! Drift alarms of a running pipeline: one [`CvmDetector`] per watched score (the flagged score,
//! and each scale's likelihood ratio, or each scale's -lp without a general model), referenced
//! by the calibration's quantiles of that score. An alarm is a Prometheus gauge
//! (`glowwatch_drift_alarm{score}` = 1 from a check above a threshold until the largest
//! window's span of checks below them, with
//! `glowwatch_drift_statistic{score,window}` and `glowwatch_drift_threshold{score,window}`),
//! one structured log line when it starts and one when it clears, and a count in the run
//! summary. `[drift] ert` is the pipeline's expected run time between false alarms over all
//! its watched scores: each detector is set for `ert` times their number.

use std::collections::BTreeMap;

use metrics::gauge;
use tracing::{info, warn};

use super::config::DriftConfigToml;
use super::metrics as m;
use crate::score::calibration::Calibration;
use crate::score::drift::{CvmDetector, DriftConfig};
use crate::score::{ImageScores, ScoreKind};

/// Permutations per window size when thresholds are set: 10 / level (the detector's minimum),
/// at least 10,000.
fn simulations(ert: f64, stride: usize, windows: usize) -> usize {
    let level = stride as f64 / (ert * windows as f64);
    ((10.0 / level).ceil() as usize).clamp(10_000, 1_000_000)
}

/// Each scale's watched score: its likelihood ratio with a general model, else its -lp.
pub fn scale_kinds(scales: usize, general: bool) -> Vec<ScoreKind> {
    (0..scales)
        .map(|k| {
            if general {
                ScoreKind::LlrScale(k)
            } else {
                ScoreKind::Scale(k)
            }
        })
        .collect()
}

/// An alarm starting or clearing (what the dashboard lists).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DriftEvent {
    /// The watched score.
    pub score: String,
    /// `true` when the alarm starts, `false` when it clears.
    pub started: bool,
    /// The record (1-based, among this monitor's finite scores) of the check.
    pub record: u64,
    /// The windows over their thresholds (`window 64: 0.91 > 0.74`), when it starts.
    pub detail: String,
}

/// A watched score's last check.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DriftStatus {
    /// The watched score.
    pub score: String,
    /// Whether an alarm is on.
    pub alarmed: bool,
    /// Per window: size, last statistic (NaN before the first check), threshold.
    pub windows: Vec<(usize, f64, f64)>,
}

struct Watched {
    kind: ScoreKind,
    name: String,
    detector: CvmDetector,
    alarmed: bool,
    /// Consecutive checks below every threshold since the last one above.
    calm: usize,
    /// Last statistic per window.
    last: Vec<f64>,
}

/// The drift detectors of a pipeline.
pub struct DriftMonitor {
    watched: Vec<Watched>,
    /// Checks below threshold that clear an alarm: the largest window's span, so one alarm is
    /// one episode, not a flicker around the threshold.
    clear_after: usize,
    /// Alarms started so far, per score name.
    pub alarms: BTreeMap<String, u64>,
    /// The record (1-based, among this monitor's finite scores) of each score's first alarm.
    pub first_alarm: BTreeMap<String, u64>,
}

impl DriftMonitor {
    /// Detectors for `flagged` and the per-scale scores that `cal` has quantiles of; `None`
    /// when drift is off or nothing can be watched (a fixed threshold, an old calibration).
    ///
    /// Errors: settings the detector refuses (e.g. a window above half the reference).
    pub fn new(
        cfg: &DriftConfigToml,
        cal: Option<&Calibration>,
        flagged: ScoreKind,
        scales: usize,
        general: bool,
    ) -> Result<Option<Self>, String> {
        let Some(cal) = cal.filter(|_| cfg.enabled) else {
            return Ok(None);
        };
        let mut kinds = vec![flagged];
        kinds.extend(scale_kinds(scales, general));
        kinds.dedup();
        let watchable = kinds
            .iter()
            .filter(|k| {
                cal.thresholds
                    .get(k)
                    .is_some_and(|t| !t.quantiles.is_empty())
            })
            .count()
            .max(1);
        // `ert` is the pipeline's: each of its detectors gets that times their number.
        let dc = DriftConfig {
            windows: cfg.windows.clone(),
            ert: cfg.ert * watchable as f64,
            stride: cfg.stride,
            simulations: simulations(cfg.ert * watchable as f64, cfg.stride, cfg.windows.len()),
            seed: 0x0d71f7,
        };
        // Thresholds take ~10^5 permutations per score; scores with tie-free references share.
        let sources: Vec<(ScoreKind, &[f64])> = kinds
            .into_iter()
            .filter_map(|k| {
                let t = cal.thresholds.get(&k).filter(|t| !t.quantiles.is_empty())?;
                Some((k, t.quantiles.as_slice()))
            })
            .collect();
        let refs: Vec<&[f64]> = sources.iter().map(|(_, q)| *q).collect();
        let detectors = CvmDetector::calibrate_all(&refs, &dc)?;
        let mut watched = vec![];
        for ((kind, _), detector) in sources.into_iter().zip(detectors) {
            let name = kind.to_string();
            for (w, th) in cfg.windows.iter().zip(detector.thresholds()) {
                gauge!(m::DRIFT_THRESHOLD, "score" => name.clone(), "window" => w.to_string())
                    .set(*th);
            }
            gauge!(m::DRIFT_ALARM, "score" => name.clone()).set(0.0);
            watched.push(Watched {
                kind,
                name,
                detector,
                alarmed: false,
                calm: 0,
                last: vec![f64::NAN; cfg.windows.len()],
            });
        }
        let widest = cfg.windows.iter().copied().max().unwrap_or(1);
        Ok((!watched.is_empty()).then_some(Self {
            watched,
            clear_after: widest.div_ceil(cfg.stride.max(1)),
            alarms: BTreeMap::new(),
            first_alarm: BTreeMap::new(),
        }))
    }

    /// The watched score names.
    pub fn scores(&self) -> Vec<&str> {
        self.watched.iter().map(|w| w.name.as_str()).collect()
    }

    /// Each watched score's last check.
    pub fn status(&self) -> Vec<DriftStatus> {
        self.watched
            .iter()
            .map(|w| DriftStatus {
                score: w.name.clone(),
                alarmed: w.alarmed,
                windows: w
                    .detector
                    .windows()
                    .iter()
                    .zip(w.detector.thresholds())
                    .zip(&w.last)
                    .map(|((&win, &th), &st)| (win, st, th))
                    .collect(),
            })
            .collect()
    }

    /// Feeds a batch of scored images, in arrival order; returns the alarms that started or
    /// cleared in it.
    pub fn observe(&mut self, scores: &[ImageScores]) -> Vec<DriftEvent> {
        let mut events = vec![];
        for w in &mut self.watched {
            for s in scores {
                let Some(check) = w.detector.push(w.kind.value(s)) else {
                    continue;
                };
                for (win, stat, _) in &check.windows {
                    if let Some(i) = w.detector.windows().iter().position(|x| x == win) {
                        w.last[i] = *stat;
                    }
                }
                for (win, stat, _) in &check.windows {
                    gauge!(m::DRIFT_STATISTIC, "score" => w.name.clone(), "window" => win.to_string())
                        .set(*stat);
                }
                w.calm = if check.alarm { 0 } else { w.calm + 1 };
                if check.alarm && !w.alarmed {
                    w.alarmed = true;
                    *self.alarms.entry(w.name.clone()).or_default() += 1;
                    self.first_alarm
                        .entry(w.name.clone())
                        .or_insert(check.records);
                    let over: Vec<String> = check
                        .windows
                        .iter()
                        .filter(|(_, s, t)| s > t)
                        .map(|(win, s, t)| format!("window {win}: {s:.4} > {t:.4}"))
                        .collect();
                    warn!(
                        score = %w.name,
                        records = check.records,
                        "drift alarm: the score's distribution left its calibration ({})",
                        over.join(", ")
                    );
                    events.push(DriftEvent {
                        score: w.name.clone(),
                        started: true,
                        record: check.records,
                        detail: over.join(", "),
                    });
                } else if w.alarmed && w.calm >= self.clear_after {
                    w.alarmed = false;
                    info!(score = %w.name, records = check.records, "drift alarm cleared");
                    events.push(DriftEvent {
                        score: w.name.clone(),
                        started: false,
                        record: check.records,
                        detail: String::new(),
                    });
                }
                gauge!(m::DRIFT_ALARM, "score" => w.name.clone()).set(if w.alarmed {
                    1.0
                } else {
                    0.0
                });
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::calibration::calibrate;

    fn scores(values: impl Iterator<Item = f64>) -> Vec<ImageScores> {
        // nll = -(lp_0 + lp_1): the value sits in lp_0.
        values
            .map(|v| ImageScores::from_lp(vec![-v, 0.0], None, 16))
            .collect()
    }

    fn ramp(n: usize, offset: f64) -> impl Iterator<Item = f64> {
        (0..n).map(move |i| ((i * 7919) % 1000) as f64 / 1000.0 + offset)
    }

    /// An alarm starts once when the watched score shifts, is counted with the record of its
    /// start, and clears after the widest window's span of calm checks; a fixed threshold or an
    /// old calibration watches nothing.
    #[test]
    fn alarms_start_once_and_clear_after_a_calm_span() {
        let reference: Vec<f64> = ramp(2000, 0.0).collect();
        let mut cal = Calibration::default();
        cal.thresholds
            .insert(ScoreKind::Nll, calibrate(&reference, 0.01, "test"));
        let cfg = DriftConfigToml {
            windows: vec![32, 128],
            ert: 5_000.0,
            stride: 8,
            enabled: true,
        };
        let mut m = DriftMonitor::new(&cfg, Some(&cal), ScoreKind::Nll, 2, false)
            .unwrap()
            .expect("nll has quantiles");
        assert_eq!(m.scores(), ["nll"]);
        m.observe(&scores(ramp(1_000, 0.0)));
        assert!(m.alarms.is_empty(), "{:?}", m.alarms);
        m.observe(&scores(ramp(300, 0.6)));
        assert_eq!(m.alarms.get("nll"), Some(&1));
        let first = m.first_alarm["nll"];
        assert!(first > 1_000 && first <= 1_128, "{first}");
        // Back to normal: the alarm clears, and a new shift is a new alarm.
        m.observe(&scores(ramp(1_000, 0.0)));
        assert!(!m.watched[0].alarmed);
        m.observe(&scores(ramp(300, 0.6)));
        assert_eq!(m.alarms.get("nll"), Some(&2));
        assert_eq!(m.first_alarm["nll"], first);
        // Nothing to watch without quantiles, or when switched off.
        let mut old = cal.clone();
        old.thresholds
            .get_mut(&ScoreKind::Nll)
            .unwrap()
            .quantiles
            .clear();
        assert!(
            DriftMonitor::new(&cfg, Some(&old), ScoreKind::Nll, 2, false)
                .unwrap()
                .is_none()
        );
        let off = DriftConfigToml {
            enabled: false,
            ..cfg
        };
        assert!(
            DriftMonitor::new(&off, Some(&cal), ScoreKind::Nll, 2, false)
                .unwrap()
                .is_none()
        );
    }
}
