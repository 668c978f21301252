//! The dashboard's memory of a feed: totals, a per-block flag rate history, a ring of the most
//! recent scored rows (with their model-input pixels, for thumbnails), drift status and alarms.
//! Everything is bounded by [`BoardConfig`]; the scoring thread pays one mutex lock and a copy
//! of each row's few numbers and pixels per batch.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use arrow::array::{Array, ArrayRef, StringArray};
use serde::Serialize;

use crate::pipeline::drift::{DriftEvent, DriftStatus, scale_kinds};
use crate::pipeline::flag::{Flag, Flagger};
use crate::pipeline::score::ModelScorer;
use crate::score::calibration::Calibration;
use crate::score::{ImageScores, ScoreKind};

/// How much the board keeps. Memory: `recent` rows of `C*S*S` pixel bytes plus a few numbers
/// (512 rows of 32x32 RGB: 1.6 MB), `blocks` flag-rate points, `alarms` alarm rows.
#[derive(Debug, Clone, PartialEq)]
pub struct BoardConfig {
    /// Scored rows kept: the "last window" of the histograms and the top anomalies.
    pub recent: usize,
    /// Top anomalies shown (highest flagged score in the recent rows).
    pub top: usize,
    /// Records per flag-rate point.
    pub block: usize,
    /// Flag-rate points kept.
    pub blocks: usize,
    /// Alarm rows kept.
    pub alarms: usize,
}

impl Default for BoardConfig {
    fn default() -> Self {
        Self {
            recent: 512,
            top: 12,
            block: 64,
            blocks: 400,
            alarms: 100,
        }
    }
}

/// A score the board follows: its name, calibrated threshold and calibration distribution.
#[derive(Debug, Clone, Serialize)]
pub struct Watch {
    /// Which score.
    pub kind: ScoreKind,
    /// Its calibrated threshold (the flagged score's is the pipeline's), when known.
    pub threshold: Option<f64>,
    /// Its calibration quantiles (empty in older calibrations).
    #[serde(skip)]
    pub quantiles: Vec<f64>,
}

/// What the board knows of the models scoring now; replaced when a new version is loaded.
#[derive(Debug, Clone, Serialize)]
pub struct BoardModels {
    /// The flagged score, with the pipeline's threshold.
    pub flagged: Watch,
    /// The target false-positive rate of the flagged score's calibration, when calibrated.
    pub target_fpr: Option<f64>,
    /// Each scale's watched score (likelihood ratio with a general model, else -lp).
    pub scales: Vec<Watch>,
    /// In-distribution model id.
    pub model_id: String,
    /// Registry version, when scoring from a registry.
    pub model_version: Option<String>,
    /// General model id.
    pub general_model_id: Option<String>,
    /// Model input (channels, side): the thumbnails' shape.
    #[serde(skip)]
    pub input: (usize, usize),
}

impl BoardModels {
    /// From the loaded models, the flag stage and the calibration the threshold came from.
    pub fn new(scorer: &ModelScorer, flagger: &Flagger, cal: Option<&Calibration>) -> Self {
        let watch = |kind: ScoreKind, threshold: Option<f64>| {
            let t = cal.and_then(|c| c.thresholds.get(&kind));
            Watch {
                kind,
                threshold: threshold.or(t.map(|t| t.threshold)),
                quantiles: t.map(|t| t.quantiles.clone()).unwrap_or_default(),
            }
        };
        let c = scorer.config();
        Self {
            flagged: watch(flagger.score, Some(flagger.threshold)),
            target_fpr: cal
                .and_then(|c| c.thresholds.get(&flagger.score))
                .map(|t| t.target_fpr),
            scales: scale_kinds(scorer.scales(), scorer.general_model_id().is_some())
                .into_iter()
                .map(|k| watch(k, None))
                .collect(),
            model_id: scorer.in_model_id().to_string(),
            model_version: scorer.version().map(String::from),
            general_model_id: scorer.general_model_id().map(String::from),
            input: (c.in_channels, c.image_size),
        }
    }
}

/// Scored rows of one batch, as the board takes them.
pub struct ScoredRows<'a> {
    /// Row ids (any Arrow type; shown as text).
    pub ids: &'a ArrayRef,
    /// Their scores.
    pub scores: &'a [ImageScores],
    /// Their flags.
    pub flags: &'a [Flag],
    /// Each row's model version; `None`: the board's current one.
    pub versions: Option<&'a StringArray>,
    /// Model-input pixels, (C, S, S) per row, concatenated; empty: no thumbnails.
    pub pixels: &'a [u8],
    /// When they were scored.
    pub at: SystemTime,
}

#[derive(Debug, Clone)]
struct Recent {
    seq: u64,
    id: String,
    score: f64,
    is_ood: bool,
    scales: Vec<f64>,
    version: Option<String>,
    pixels: Vec<u8>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Block {
    first: u64,
    n: u32,
    flagged: u32,
    scales: Vec<u32>,
}

/// One alarm in the dashboard's list.
#[derive(Debug, Clone, Serialize)]
pub struct AlarmRow {
    /// The watched score.
    pub score: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// The record of its start (1-based, among the finite scores since the detectors started).
    pub record: u64,
    /// Windows over their thresholds.
    pub detail: String,
    /// When it cleared, if it has.
    pub cleared_at: Option<String>,
}

/// A row of the top anomalies.
#[derive(Debug, Clone, Serialize)]
pub struct TopRow {
    /// Position in the feed (0-based among scored rows); the thumbnail's key.
    pub seq: u64,
    /// Row id.
    pub id: String,
    /// The flagged score.
    pub score: f64,
    /// Flagged.
    pub is_ood: bool,
    /// Each scale's watched score, in [`BoardModels::scales`] order.
    pub scales: Vec<f64>,
    /// Model version that scored it.
    pub model_version: Option<String>,
    /// Whether a thumbnail exists (`/thumb/{seq}.png`).
    pub thumbnail: bool,
}

/// Everything the page shows, as served at `/api/state`.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Pipeline name.
    pub pipeline: String,
    /// Whether the board follows a running pipeline (else: a pipeline's output files).
    pub live: bool,
    /// The models and scores.
    pub models: BoardModels,
    /// Records consumed (Kafka) or read (Parquet): scored + dead-lettered.
    pub records: u64,
    /// Scored rows.
    pub scored: u64,
    /// Flagged rows.
    pub flagged: u64,
    /// Scored rows with a non-finite likelihood.
    pub non_finite: u64,
    /// Dead letters by reason.
    pub dead_by_reason: BTreeMap<String, u64>,
    /// Records per second over the last 10 s (live) or the files' scoring times.
    pub records_per_s: f64,
    /// Flagged share of the recent rows.
    pub recent_flag_rate: f64,
    /// Rows in the recent window.
    pub recent_rows: usize,
    /// Consumer lag per `topic/partition` (Kafka).
    pub lag: BTreeMap<String, i64>,
    /// The highest flagged scores of the recent rows.
    pub top: Vec<TopRow>,
    /// Each watched score's last drift check.
    pub drift: Vec<DriftStatus>,
    /// Alarms, newest first.
    pub alarms: Vec<AlarmRow>,
    /// When the board last changed (RFC 3339).
    pub updated_at: Option<String>,
}

struct State {
    models: BoardModels,
    scored: u64,
    flagged: u64,
    non_finite: u64,
    dead: BTreeMap<String, u64>,
    /// (time, records) of each observation, the last minute's.
    arrivals: VecDeque<(SystemTime, u64)>,
    first_at: Option<SystemTime>,
    last_at: Option<SystemTime>,
    blocks: VecDeque<Block>,
    open: Block,
    recent: VecDeque<Recent>,
    drift: Vec<DriftStatus>,
    alarms: VecDeque<AlarmRow>,
    lag: BTreeMap<String, i64>,
}

/// The board: shared by the scoring thread (writer) and the HTTP server (reader).
pub struct Board {
    pipeline: String,
    live: bool,
    cfg: BoardConfig,
    state: Mutex<State>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn id_text(ids: &ArrayRef) -> Vec<String> {
    match arrow::compute::cast(ids, &arrow::datatypes::DataType::Utf8) {
        Ok(a) => {
            let s = a
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("cast to Utf8");
            (0..s.len())
                .map(|i| {
                    if s.is_valid(i) {
                        s.value(i).to_string()
                    } else {
                        String::new()
                    }
                })
                .collect()
        }
        Err(_) => vec![String::new(); ids.len()],
    }
}

impl Board {
    /// An empty board. `live`: it follows a running pipeline (rates are measured against the
    /// clock); otherwise against the rows' own scoring times.
    pub fn new(pipeline: &str, models: BoardModels, live: bool, cfg: BoardConfig) -> Self {
        let block = Block {
            scales: vec![0; models.scales.len()],
            ..Block::default()
        };
        Self {
            pipeline: pipeline.to_string(),
            live,
            cfg,
            state: Mutex::new(State {
                models,
                scored: 0,
                flagged: 0,
                non_finite: 0,
                dead: BTreeMap::new(),
                arrivals: VecDeque::new(),
                first_at: None,
                last_at: None,
                blocks: VecDeque::new(),
                open: block,
                recent: VecDeque::new(),
                drift: vec![],
                alarms: VecDeque::new(),
                lag: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking reader cannot leave the numbers half-written in a way that matters.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pipeline's name.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// Whether it follows a running pipeline.
    pub fn is_live(&self) -> bool {
        self.live
    }

    /// A new model version scores from now on.
    pub fn set_models(&self, models: BoardModels) {
        let mut st = self.lock();
        if models.scales.len() != st.models.scales.len() {
            st.open.scales = vec![0; models.scales.len()];
        }
        st.models = models;
    }

    /// The models scoring now.
    pub fn models(&self) -> BoardModels {
        self.lock().models.clone()
    }

    fn arrived(st: &mut State, at: SystemTime, n: u64) {
        st.first_at.get_or_insert(at);
        st.last_at = Some(st.last_at.map_or(at, |l| l.max(at)));
        st.arrivals.push_back((at, n));
        while st.arrivals.len() > 1
            && st.arrivals.front().is_some_and(|(t, _)| {
                at.duration_since(*t).unwrap_or_default() > Duration::from_secs(60)
            })
        {
            st.arrivals.pop_front();
        }
    }

    /// Takes a batch of scored rows.
    pub fn observe(&self, rows: ScoredRows<'_>) {
        let n = rows.flags.len();
        let ids = id_text(rows.ids);
        let mut st = self.lock();
        let pix = st.models.input.0 * st.models.input.1 * st.models.input.1;
        let thumbs = pix > 0 && rows.pixels.len() == n * pix;
        let kinds: Vec<(ScoreKind, Option<f64>)> = st
            .models
            .scales
            .iter()
            .map(|w| (w.kind, w.threshold))
            .collect();
        for (i, (f, s)) in rows.flags.iter().zip(rows.scores).enumerate() {
            let seq = st.scored;
            st.scored += 1;
            st.flagged += f.is_ood as u64;
            st.non_finite += (f.status == crate::pipeline::flag::Status::NonFinite) as u64;
            let scales: Vec<f64> = kinds.iter().map(|(k, _)| k.value(s)).collect();
            if st.open.n == 0 {
                st.open.first = seq;
            }
            st.open.n += 1;
            st.open.flagged += f.is_ood as u32;
            for (j, ((_, t), v)) in kinds.iter().zip(&scales).enumerate() {
                if t.is_some_and(|t| *v > t || v.is_nan()) {
                    st.open.scales[j] += 1;
                }
            }
            if st.open.n as usize >= self.cfg.block {
                let done = std::mem::replace(
                    &mut st.open,
                    Block {
                        scales: vec![0; kinds.len()],
                        ..Block::default()
                    },
                );
                st.blocks.push_back(done);
                if st.blocks.len() > self.cfg.blocks {
                    st.blocks.pop_front();
                }
            }
            let version = match rows.versions {
                Some(v) if v.is_valid(i) => Some(v.value(i).to_string()),
                Some(_) => None,
                None => st.models.model_version.clone(),
            };
            let pixels = if thumbs {
                rows.pixels[i * pix..(i + 1) * pix].to_vec()
            } else {
                vec![]
            };
            if st.recent.len() == self.cfg.recent {
                st.recent.pop_front();
            }
            st.recent.push_back(Recent {
                seq,
                id: ids.get(i).cloned().unwrap_or_default(),
                score: f.score,
                is_ood: f.is_ood,
                scales,
                version,
                pixels,
            });
        }
        Self::arrived(&mut st, rows.at, n as u64);
    }

    /// Counts dead letters by reason.
    pub fn dead_letters<'a>(&self, reasons: impl IntoIterator<Item = &'a str>, at: SystemTime) {
        let mut st = self.lock();
        let mut n = 0;
        for r in reasons {
            *st.dead.entry(r.to_string()).or_default() += 1;
            n += 1;
        }
        if n > 0 {
            Self::arrived(&mut st, at, n);
        }
    }

    /// The drift detectors' state after a batch, and the alarms that started or cleared in it.
    pub fn drift(&self, status: Vec<DriftStatus>, events: &[DriftEvent], at: SystemTime) {
        let mut st = self.lock();
        st.drift = status;
        for e in events {
            if e.started {
                st.alarms.push_back(AlarmRow {
                    score: e.score.clone(),
                    started_at: rfc3339(at),
                    record: e.record,
                    detail: e.detail.clone(),
                    cleared_at: None,
                });
                if st.alarms.len() > self.cfg.alarms {
                    st.alarms.pop_front();
                }
            } else if let Some(a) = st
                .alarms
                .iter_mut()
                .rev()
                .find(|a| a.score == e.score && a.cleared_at.is_none())
            {
                a.cleared_at = Some(rfc3339(at));
            }
        }
    }

    /// Consumer lag of a partition (from the Kafka client's statistics).
    pub fn lag(&self, topic: &str, partition: i32, lag: i64) {
        self.lock().lag.insert(format!("{topic}/{partition}"), lag);
    }

    /// Records per second: live, over the last 10 s to now; otherwise over the rows' own
    /// times (the last 10 s of them, or the whole span when shorter).
    fn rate(&self, st: &State) -> f64 {
        let Some(last) = st.last_at else { return 0.0 };
        let now = if self.live {
            SystemTime::now().max(last)
        } else {
            last
        };
        let span = Duration::from_secs(10);
        let since = now.checked_sub(span).unwrap_or(SystemTime::UNIX_EPOCH);
        let n: u64 = st
            .arrivals
            .iter()
            .filter(|(t, _)| *t > since)
            .map(|(_, n)| n)
            .sum();
        let first = st.first_at.unwrap_or(last);
        let secs = if self.live {
            now.duration_since(first.max(since)).unwrap_or_default()
        } else {
            // The first observation's records arrived over the time before it: count the span
            // from the batch before, approximated by the mean gap.
            let k = st.arrivals.len().max(2) as u32;
            let s = now.duration_since(first.max(since)).unwrap_or_default();
            s + s / (k - 1)
        };
        n as f64 / secs.as_secs_f64().max(1e-3)
    }

    /// Everything the page shows, now.
    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        let mut top: Vec<&Recent> = st.recent.iter().collect();
        top.sort_by(|a, b| {
            // Non-finite scores are the most anomalous.
            let key = |r: &Recent| {
                if r.score.is_nan() {
                    f64::INFINITY
                } else {
                    r.score
                }
            };
            key(b).total_cmp(&key(a))
        });
        let recent_flagged = st.recent.iter().filter(|r| r.is_ood).count();
        Snapshot {
            pipeline: self.pipeline.clone(),
            live: self.live,
            models: st.models.clone(),
            records: st.scored + st.dead.values().sum::<u64>(),
            scored: st.scored,
            flagged: st.flagged,
            non_finite: st.non_finite,
            dead_by_reason: st.dead.clone(),
            records_per_s: self.rate(&st),
            recent_flag_rate: recent_flagged as f64 / st.recent.len().max(1) as f64,
            recent_rows: st.recent.len(),
            lag: st.lag.clone(),
            top: top
                .into_iter()
                .take(self.cfg.top)
                .map(|r| TopRow {
                    seq: r.seq,
                    id: r.id.clone(),
                    score: r.score,
                    is_ood: r.is_ood,
                    scales: r.scales.clone(),
                    model_version: r.version.clone(),
                    thumbnail: !r.pixels.is_empty(),
                })
                .collect(),
            drift: st.drift.clone(),
            alarms: st.alarms.iter().rev().cloned().collect(),
            updated_at: st.last_at.map(rfc3339),
        }
    }

    /// Flag-rate history: per block of [`BoardConfig::block`] records, its first record, the
    /// flagged share, and each scale's share above its own threshold (NaN without one); the
    /// open block last when it has records.
    pub fn flag_rates(&self) -> Vec<(u64, f64, Vec<f64>)> {
        let st = self.lock();
        let thresholds: Vec<bool> = st
            .models
            .scales
            .iter()
            .map(|w| w.threshold.is_some())
            .collect();
        st.blocks
            .iter()
            .chain((st.open.n > 0).then_some(&st.open))
            .map(|b| {
                let n = b.n.max(1) as f64;
                let scales = b
                    .scales
                    .iter()
                    .zip(&thresholds)
                    .map(|(&c, &t)| if t { c as f64 / n } else { f64::NAN })
                    .collect();
                (b.first, b.flagged as f64 / n, scales)
            })
            .collect()
    }

    /// The recent values of a followed score (the flagged one or a scale's), with its watch.
    pub fn recent_values(&self, kind: ScoreKind) -> Option<(Watch, Vec<f64>)> {
        let st = self.lock();
        if st.models.flagged.kind == kind {
            return Some((
                st.models.flagged.clone(),
                st.recent.iter().map(|r| r.score).collect(),
            ));
        }
        let j = st.models.scales.iter().position(|w| w.kind == kind)?;
        Some((
            st.models.scales[j].clone(),
            st.recent
                .iter()
                .filter_map(|r| r.scales.get(j).copied())
                .collect(),
        ))
    }

    /// The model-input pixels of a recent row and its (channels, side), if it is still kept.
    pub fn thumbnail(&self, seq: u64) -> Option<(Vec<u8>, (usize, usize))> {
        let st = self.lock();
        let first = st.recent.front()?.seq;
        let r = st.recent.get(seq.checked_sub(first)? as usize)?;
        (!r.pixels.is_empty()).then(|| (r.pixels.clone(), st.models.input))
    }

    /// Alarm starts as (record among the scored rows when the alarm was raised, score).
    pub fn alarm_marks(&self) -> Vec<(u64, String)> {
        self.lock()
            .alarms
            .iter()
            .map(|a| (a.record, a.score.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pipeline::flag::Status;

    fn models() -> BoardModels {
        let watch = |kind, threshold| Watch {
            kind,
            threshold,
            quantiles: vec![],
        };
        BoardModels {
            flagged: watch(ScoreKind::Llr, Some(0.5)),
            target_fpr: Some(0.01),
            scales: vec![
                watch(ScoreKind::LlrScale(0), Some(0.25)),
                watch(ScoreKind::LlrScale(1), None),
            ],
            model_id: "glow-in".into(),
            model_version: Some("v1".into()),
            general_model_id: Some("glow-gen".into()),
            input: (1, 2),
        }
    }

    /// Feeds rows whose llr is `values[i]` (scale 0 carries it all), pixels = row index.
    fn feed(b: &Board, first: usize, values: &[f64], at: SystemTime) {
        let scores: Vec<ImageScores> = values
            .iter()
            .map(|v| ImageScores::from_lp(vec![0.0, 0.0], Some(vec![*v, 0.0]), 4))
            .collect();
        let flags: Vec<Flag> = values
            .iter()
            .map(|v| Flag {
                score: *v,
                is_ood: *v > 0.5 || v.is_nan(),
                status: if v.is_finite() {
                    Status::Ok
                } else {
                    Status::NonFinite
                },
            })
            .collect();
        let ids: ArrayRef = Arc::new(arrow::array::Int64Array::from_iter_values(
            (first..first + values.len()).map(|i| i as i64),
        ));
        let pixels: Vec<u8> = (first..first + values.len())
            .flat_map(|i| [i as u8; 4])
            .collect();
        b.observe(ScoredRows {
            ids: &ids,
            scores: &scores,
            flags: &flags,
            versions: None,
            pixels: &pixels,
            at,
        });
    }

    /// Totals, per-block flag rates (per scale against its own threshold, none without one),
    /// the bounded recent window, the top anomalies (non-finite first) and their thumbnails.
    #[test]
    fn board_counts_blocks_and_keeps_a_bounded_window_of_top_anomalies() {
        let cfg = BoardConfig {
            recent: 8,
            top: 3,
            block: 4,
            blocks: 2,
            alarms: 2,
        };
        let b = Board::new("p", models(), false, cfg);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        // Block 0: 1 of 4 flagged; block 1: 4 of 4; block 2: 0 of 4; open block: 1 row.
        feed(&b, 0, &[0.0, 0.1, 0.9, 0.2], t0);
        feed(
            &b,
            4,
            &[0.6, 0.7, 0.8, f64::NAN],
            t0 + Duration::from_secs(1),
        );
        feed(
            &b,
            8,
            &[0.0, 0.1, 0.2, 0.3, 0.4],
            t0 + Duration::from_secs(2),
        );
        b.dead_letters(
            ["corrupt", "corrupt", "truncated"],
            t0 + Duration::from_secs(2),
        );
        let s = b.snapshot();
        assert_eq!(
            (s.records, s.scored, s.flagged, s.non_finite),
            (16, 13, 5, 1)
        );
        assert_eq!(s.dead_by_reason["corrupt"], 2);
        assert_eq!(s.recent_rows, 8);
        // Recent rows are 5..=12: flagged 0.7, 0.8, NaN.
        assert!((s.recent_flag_rate - 3.0 / 8.0).abs() < 1e-12);
        let top: Vec<u64> = s.top.iter().map(|t| t.seq).collect();
        assert_eq!(top, [7, 6, 5], "NaN (7) first, then 0.8, 0.7");
        assert_eq!(s.top[1].id, "6");
        assert_eq!(s.top[0].model_version.as_deref(), Some("v1"));
        // Files mode: 16 records over the 2 s between the first and last of four arrivals,
        // plus one mean gap (2/3 s) for the first's.
        assert!((s.records_per_s - 6.0).abs() < 1e-6, "{}", s.records_per_s);
        // Two full blocks kept (the oldest dropped) and the open one.
        let rates = b.flag_rates();
        let firsts: Vec<u64> = rates.iter().map(|r| r.0).collect();
        assert_eq!(firsts, [4, 8, 12]);
        assert_eq!(rates[0].1, 1.0);
        assert_eq!(rates[1].1, 0.0);
        assert_eq!(rates[0].2[0], 1.0, "scale 0 above 0.25: all of block 1");
        assert_eq!(rates[1].2[0], 0.25, "scale 0 above 0.25: 0.3 of block 2");
        assert!(rates[0].2[1].is_nan(), "scale 1 has no threshold");
        // Thumbnails: kept for the recent window only.
        assert_eq!(b.thumbnail(6), Some((vec![6; 4], (1, 2))));
        assert_eq!(b.thumbnail(4), None);
        assert_eq!(b.thumbnail(13), None);
        let (w, v) = b.recent_values(ScoreKind::LlrScale(0)).unwrap();
        assert_eq!((w.threshold, v.len()), (Some(0.25), 8));
        assert!(b.recent_values(ScoreKind::Nll).is_none());
    }

    /// Drift events become alarm rows (newest first, bounded) that clear when the detector
    /// says so.
    #[test]
    fn drift_events_list_alarms_until_they_clear() {
        let b = Board::new("p", models(), true, BoardConfig::default());
        let t = SystemTime::now();
        let ev = |score: &str, started, record| DriftEvent {
            score: score.into(),
            started,
            record,
            detail: "window 64: 1.0 > 0.5".into(),
        };
        b.drift(
            vec![],
            &[ev("llr", true, 100), ev("llr_scale_0", true, 120)],
            t,
        );
        b.drift(vec![], &[ev("llr", false, 400)], t);
        let s = b.snapshot();
        assert_eq!(s.alarms.len(), 2);
        assert_eq!(s.alarms[0].score, "llr_scale_0");
        assert!(s.alarms[0].cleared_at.is_none());
        assert!(s.alarms[1].cleared_at.is_some());
        assert_eq!(
            b.alarm_marks(),
            [(100, "llr".into()), (120, "llr_scale_0".into())]
        );
    }
}
