//! Scheduled offline retraining: select fresh inliers with SQL, fine-tune the registry's current
//! model with the shared training code, evaluate candidate and current model on a held-out slice
//! of the same window and on reference OOD sets, promote the candidate only if it passes the
//! gates, and recalibrate the threshold of the promoted version on held-out inliers.
//!
//! One run is idempotent: the selection, the split and the training are deterministic for the
//! same data and seed, and a candidate whose weights equal the current version's is not added
//! again. A lock on the registry keeps two retrains of one model from overlapping.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::{BinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::device::DeviceSpec;
use crate::eval::detection_metrics;
use crate::glow::Precision;
use crate::glow::{GlowModel, bits_per_dim};
use crate::pipeline::decode::ImageColumns;
use crate::pipeline::score::ModelScorer;
use crate::registry::{CALIBRATION_FILE, Registry};
use crate::score::calibration::{Calibration, calibrate};
use crate::score::{ComplexityReference, ScoreKind};
use crate::sql::SqlSession;
use crate::train::data::{ImageDataset, PixelBatch, SkippedRows, Split, id_unit};
use crate::train::optimizer::AdamaxConfig;
use crate::train::progress::Progress;
use crate::train::trainer::{OutlierLoss, OutlierSetup, TrainOptions, Trainer};

/// A retrain job (`pipelines/retrain-*.toml`). Relative paths are resolved against the file's
/// directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrainConfig {
    /// Name in logs and reports.
    #[serde(default = "default_name")]
    pub name: String,
    /// The registry of the model being retrained.
    pub registry: PathBuf,
    /// The general model (likelihood-ratio scores, outlier loss).
    #[serde(default)]
    pub general: Option<PathBuf>,
    /// `auto`, `cpu` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Which rows to train on.
    pub select: SelectConfig,
    /// How to fine-tune.
    #[serde(default)]
    pub train: RetrainTrain,
    /// What the candidate is judged on.
    pub evaluate: EvaluateConfig,
    /// When the candidate may replace the current version.
    #[serde(default)]
    pub gates: Gates,
    /// False-positive rate of the recalibrated threshold.
    #[serde(default = "default_fpr")]
    pub target_fpr: f64,
    /// Where selected data and candidates go (default `<registry>/.work`).
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
}

fn default_name() -> String {
    "retrain".into()
}
fn default_device() -> String {
    "auto".into()
}
fn default_fpr() -> f64 {
    0.01
}

/// Training data selection: a SQL query over scored tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    /// Tables to register: name -> Parquet file or directory (Hive partitions become columns).
    pub tables: BTreeMap<String, PathBuf>,
    /// The query; it must return `id` and `image` (encoded bytes). Default: rows of `scored`
    /// not flagged, status ok, scored in the last `days` days.
    #[serde(default)]
    pub query: Option<String>,
    /// Window of the default query, in days.
    #[serde(default = "default_days")]
    pub days: u32,
    /// At most this many rows (a stable sample by id hash).
    #[serde(default = "default_sample")]
    pub sample: usize,
    /// Share of the selected rows held out (by id hash) for evaluation and calibration.
    #[serde(default = "default_holdout")]
    pub holdout_fraction: f64,
}

fn default_days() -> u32 {
    7
}
fn default_sample() -> usize {
    20_000
}
fn default_holdout() -> f64 {
    0.1
}

impl SelectConfig {
    /// The query that runs.
    pub fn query(&self) -> String {
        self.query.clone().unwrap_or_else(|| {
            format!(
                "SELECT id, image FROM scored WHERE NOT is_ood AND status = 'ok' \
                 AND scored_at > now() - INTERVAL '{} days'",
                self.days
            )
        })
    }
}

/// Where the candidate starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The registry's current version (fine-tuning on the new window).
    #[default]
    Current,
    /// The general model (a fresh in-distribution model from the general one).
    General,
}

/// Fine-tuning settings (the recipe of `glowwatch train --init-from`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrainTrain {
    /// Start from the current version or from the general model.
    pub from: StartFrom,
    /// Optimizer steps.
    pub steps: u64,
    /// Images per step.
    pub batch: usize,
    /// Adamax learning rate.
    pub lr: f64,
    /// Linear warm-up steps (default: min(300, steps / 2)).
    pub warmup: Option<u64>,
    /// Seed.
    pub seed: u64,
    /// Fine-tune with the outlier loss against the general model on these general images.
    pub outlier_data: Vec<PathBuf>,
    /// Outlier loss weight w.
    pub outlier_weight: f64,
    /// Outlier loss temperature T.
    pub outlier_temperature: f64,
}

impl Default for RetrainTrain {
    fn default() -> Self {
        let o = OutlierLoss::grey_default();
        Self {
            from: StartFrom::Current,
            steps: 500,
            batch: 64,
            lr: 5e-4,
            warmup: None,
            seed: 0,
            outlier_data: vec![],
            outlier_weight: o.weight,
            outlier_temperature: o.temperature,
        }
    }
}

/// Evaluation of candidate and current model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateConfig {
    /// The flagged score (its AUROC is gated, its threshold recalibrated).
    pub score: ScoreKind,
    /// Reference OOD sets (Parquet with `id`, `image`): held-out inliers vs each.
    #[serde(default)]
    pub reference_ood: Vec<PathBuf>,
    /// Rows read from each reference set.
    #[serde(default = "default_reference_rows")]
    pub reference_rows: usize,
}

fn default_reference_rows() -> usize {
    2000
}

/// Training rows of the selection that a complexity reference is built from (scores
/// `complexity_cond` and `combined`; the same rows for the current and the candidate model).
const COMPLEXITY_REFERENCE_ROWS: usize = 5000;

/// Promotion gates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gates {
    /// The candidate's AUROC on each reference set may be at most this much below the current's.
    pub max_auroc_drop: f64,
    /// The candidate's held-out bits/dim may be at most this much above the current's.
    pub max_bpd_increase: f64,
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            max_auroc_drop: 0.01,
            max_bpd_increase: 0.0,
        }
    }
}

impl RetrainConfig {
    /// Reads a retrain file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let mut c: Self =
            toml::from_str(&text).with_context(|| format!("retrain config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut c.registry);
        if let Some(g) = &mut c.general {
            fix(g);
        }
        c.select.tables.values_mut().for_each(fix);
        c.train.outlier_data.iter_mut().for_each(fix);
        c.evaluate.reference_ood.iter_mut().for_each(fix);
        if let Some(w) = &mut c.work_dir {
            fix(w);
        }
        if c.train.from == StartFrom::General && c.general.is_none() {
            bail!("train.from = \"general\" needs `general`");
        }
        if c.evaluate.score.needs_general() && c.general.is_none() {
            bail!("evaluate.score = \"{}\" needs `general`", c.evaluate.score);
        }
        if !(0.0..1.0).contains(&c.select.holdout_fraction) || c.select.holdout_fraction == 0.0 {
            bail!("select.holdout_fraction must be in (0, 1)");
        }
        Ok(c)
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The candidate passed the gates and is the current version now.
    Promoted,
    /// The current version stays (a gate failed, or the candidate equals it).
    Kept,
}

/// Quality of one model on the evaluation data.
#[derive(Debug, Clone, Serialize)]
pub struct Quality {
    /// Model id.
    pub model_id: String,
    /// Mean bits/dim on the held-out rows.
    pub holdout_bpd: f64,
    /// AUROC of the score: held-out rows vs each reference set.
    pub auroc: BTreeMap<String, f64>,
}

/// The JSON report of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RetrainReport {
    /// Job name.
    pub name: String,
    /// promoted / kept.
    pub outcome: Outcome,
    /// Why (the gates that failed, or what was promoted).
    pub reasons: Vec<String>,
    /// The version current before the run.
    pub previous_version: String,
    /// The version current after the run.
    pub current_version: String,
    /// The version added for the candidate (when promoted).
    pub candidate_version: Option<String>,
    /// Rows returned by the selection query.
    pub rows_selected: usize,
    /// Rows kept after sampling.
    pub rows_sampled: usize,
    /// Held-out rows (evaluation and calibration).
    pub holdout_rows: usize,
    /// Training steps taken.
    pub steps: u64,
    /// The current model on the evaluation data.
    pub current: Quality,
    /// The candidate on the evaluation data.
    pub candidate: Quality,
    /// The promoted version's threshold (when promoted).
    pub threshold: Option<f64>,
    /// Wall time.
    pub wall_s: f64,
}

/// Runs the selection query and returns (id, image) rows.
fn select(cfg: &SelectConfig) -> Result<Vec<(String, Vec<u8>)>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let s = SqlSession::new(false);
        for (name, path) in &cfg.tables {
            s.register(name, &path.display().to_string()).await?;
        }
        let q = cfg.query();
        let out = s
            .run(&q)
            .await
            .with_context(|| format!("selection query: {q}"))?;
        let res = out
            .last()
            .ok_or_else(|| anyhow!("the selection ran no statement"))?;
        let mut rows = Vec::new();
        for b in &res.batches {
            rows.extend(crate::pipeline::decode::id_image_rows(b)?);
        }
        Ok(rows)
    })
}

fn write_rows(path: &Path, rows: &[(String, Vec<u8>)]) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("image", DataType::Binary, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0))),
            Arc::new(BinaryArray::from_iter_values(rows.iter().map(|r| &r.1))),
        ],
    )?;
    let mut w = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path)?, schema, None)?;
    w.write(&batch)?;
    w.close()?;
    Ok(())
}

/// Held-out bpd and the score's AUROC against each reference OOD set; for a score that needs
/// a complexity reference, one is built for this model from `inliers` (training rows of the
/// selection, never the held-out ones) and returned with the held-out scores.
fn quality(
    model: &GlowModel,
    general: Option<&GlowModel>,
    device: &candle_core::Device,
    score: ScoreKind,
    holdout: &PixelBatch,
    references: &[(String, PixelBatch)],
    inliers: &PixelBatch,
) -> Result<(Quality, Vec<f64>, Option<ComplexityReference>)> {
    let mut s = ModelScorer::new(model, general, device, Precision::F32, 256)?;
    s.set_compressors(score.compressor().as_slice());
    let reference = match score.needs_reference() {
        true => Some(s.build_reference(
            &inliers.pixels,
            &format!("{} training rows of the retrain selection", inliers.len()),
        )?),
        false => None,
    };
    s.set_reference(reference.clone().map(Arc::new))?;
    let dims = s.config().dims();
    let scored = s.score_pixels(&holdout.pixels)?;
    let bpds: Vec<f64> = scored
        .iter()
        .map(|x| bits_per_dim(x.log_p_in(), dims))
        .filter(|v| v.is_finite())
        .collect();
    let in_scores: Vec<f64> = scored.iter().map(|x| score.value(x)).collect();
    let mut auroc = BTreeMap::new();
    for (name, px) in references {
        let ood: Vec<f64> = s
            .score_pixels(&px.pixels)?
            .iter()
            .map(|x| score.value(x))
            .collect();
        auroc.insert(name.clone(), detection_metrics(&in_scores, &ood).auroc);
    }
    Ok((
        Quality {
            model_id: model.model_id()?,
            holdout_bpd: bpds.iter().sum::<f64>() / bpds.len().max(1) as f64,
            auroc,
        },
        in_scores,
        reference,
    ))
}

/// One retrain run (see the module docs). Errors are failures; a failed gate is `Kept`.
pub fn retrain(cfg: &RetrainConfig, progress: &Progress) -> Result<RetrainReport> {
    let t0 = Instant::now();
    let registry = Registry::open(&cfg.registry)?;
    let _lock = registry.lock_retrain()?;
    let current = registry
        .current()?
        .ok_or_else(|| anyhow!("registry {}: no current version", cfg.registry.display()))?;
    let device = cfg
        .device
        .parse::<DeviceSpec>()
        .map_err(|e| anyhow!("device: {e}"))?
        .open()
        .map_err(|e| anyhow!(e))?;

    // 1. Select and sample; one file, split by id hash into training and held-out rows.
    let mut rows = select(&cfg.select)?;
    let rows_selected = rows.len();
    rows.sort_by(|a, b| id_unit(&a.0).total_cmp(&id_unit(&b.0)));
    rows.truncate(cfg.select.sample);
    let run = crate::pipeline::run::run_id();
    let work = cfg
        .work_dir
        .clone()
        .unwrap_or_else(|| cfg.registry.join(".work"))
        .join(&run);
    std::fs::create_dir_all(&work)?;
    let selected = work.join("selected.parquet");
    write_rows(&selected, &rows)?;

    let cur_model = GlowModel::load(current.model(), &device)?;
    let mcfg = cur_model.config().clone();
    let h = cfg.select.holdout_fraction;
    let columns = ImageColumns::encoded("image");
    let train_set =
        ImageDataset::open_columns(std::slice::from_ref(&selected), &columns, "id", &mcfg)?
            .with_split(Split::Train(h));
    let holdout =
        ImageDataset::open_columns(std::slice::from_ref(&selected), &columns, "id", &mcfg)?
            .with_split(Split::Holdout(h))
            .read_head(usize::MAX, &mut SkippedRows::default())?;
    let train_rows = rows.len() - holdout.len();
    if holdout.len() < 10 || train_rows < cfg.train.batch {
        bail!(
            "not enough data: {} rows selected, {} sampled, {} held out, {} to train on (batch {})",
            rows_selected,
            rows.len(),
            holdout.len(),
            train_rows,
            cfg.train.batch
        );
    }
    let references: Vec<(String, PixelBatch)> = cfg
        .evaluate
        .reference_ood
        .iter()
        .map(|p| -> Result<_> {
            let d = ImageDataset::open(std::slice::from_ref(p), "image", "id", &mcfg)?;
            let name = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok((
                name,
                d.read_head(cfg.evaluate.reference_rows, &mut SkippedRows::default())?,
            ))
        })
        .collect::<Result<_>>()?;
    let general = cfg
        .general
        .as_ref()
        .map(|p| GlowModel::load(p, &device))
        .transpose()?;

    // 2. Fine-tune the current model, or the general one (the shared training code,
    // `--init-from` recipe).
    let start = match (cfg.train.from, &cfg.general) {
        (StartFrom::General, Some(g)) => g.clone(),
        _ => current.model(),
    };
    let mut candidate = GlowModel::load(&start, &device)?;
    if candidate.config() != &mcfg {
        bail!(
            "{} has a different configuration from the current version; it cannot replace it",
            start.display()
        );
    }
    let parent_id = candidate.model_id()?;
    let gscorer = match (&general, cfg.train.outlier_data.is_empty()) {
        (Some(g), false) => Some(g.scorer(&device, DType::F32)?),
        _ => None,
    };
    let outlier_data = match &gscorer {
        Some(_) => Some(ImageDataset::open(
            &cfg.train.outlier_data,
            "image",
            "id",
            &mcfg,
        )?),
        None => None,
    };
    let loss = OutlierLoss {
        weight: cfg.train.outlier_weight,
        temperature: cfg.train.outlier_temperature,
    };
    let options = TrainOptions {
        // Enough epochs for the steps (the step limit ends the run).
        epochs: cfg
            .train
            .steps
            .div_ceil((train_rows / cfg.train.batch).max(1) as u64)
            .max(1),
        max_steps: Some(cfg.train.steps),
        batch: cfg.train.batch,
        seed: cfg.train.seed,
        optimizer: AdamaxConfig {
            lr: cfg.train.lr,
            warmup_steps: cfg
                .train
                .warmup
                .unwrap_or((cfg.train.steps / 2).min(crate::train::FINE_TUNE_WARMUP_STEPS)),
            ..Default::default()
        },
        init_actnorm: false,
        checkpoint_every: 0,
        log_every: 10,
        outlier: gscorer.as_ref().map(|_| loss),
        ..Default::default()
    };
    let trainer = Trainer {
        model: &candidate,
        data: &train_set,
        val: &holdout,
        outlier: match (&gscorer, &outlier_data) {
            (Some(g), Some(d)) => Some(OutlierSetup {
                data: d,
                general: g,
                loss,
            }),
            _ => None,
        },
        options: options.clone(),
        checkpoint_dir: None,
        job: serde_json::to_value(cfg)?,
    };
    let report = trainer.run(None, &AtomicBool::new(false), progress)?;
    candidate.card = crate::glow::ModelCard {
        name: cfg.name.clone(),
        trained_on: format!(
            "{} rows selected by `{}` ({} held out)",
            rows.len(),
            cfg.select.query(),
            holdout.len()
        ),
        created: crate::glow::file::now_rfc3339(),
        train_steps: cur_model.card.train_steps + report.steps,
        final_bpd: report.final_val_bpd,
        parent: Some(parent_id),
        notes: serde_json::to_string(&options)?,
        // Measured by `glowwatch model card --detection` after an evaluation.
        detection: None,
        imported_from: None,
    };
    let cand_path = work.join("candidate.safetensors");
    let cand_id = candidate.save(&cand_path)?;

    // 3. Evaluate both on the same held-out rows and reference sets.
    let score = cfg.evaluate.score;
    let inliers = match score.needs_reference() {
        true => train_set.read_head(COMPLEXITY_REFERENCE_ROWS, &mut SkippedRows::default())?,
        false => PixelBatch::default(),
    };
    let (cur_q, _, _) = quality(
        &cur_model,
        general.as_ref(),
        &device,
        score,
        &holdout,
        &references,
        &inliers,
    )?;
    let (cand_q, cand_scores, cand_reference) = quality(
        &candidate,
        general.as_ref(),
        &device,
        score,
        &holdout,
        &references,
        &inliers,
    )?;
    let mut failed = Vec::new();
    if cand_id == cur_q.model_id {
        failed.push("the candidate's weights equal the current version's".to_string());
    }
    if cand_q.holdout_bpd > cur_q.holdout_bpd + cfg.gates.max_bpd_increase {
        failed.push(format!(
            "held-out bpd {:.4} > current {:.4} + {}",
            cand_q.holdout_bpd, cur_q.holdout_bpd, cfg.gates.max_bpd_increase
        ));
    }
    for (name, a) in &cand_q.auroc {
        let c = cur_q.auroc[name];
        if *a < c - cfg.gates.max_auroc_drop {
            failed.push(format!(
                "AUROC of {score} vs {name} {a:.4} < current {c:.4} - {}",
                cfg.gates.max_auroc_drop
            ));
        }
    }
    let mut out = RetrainReport {
        name: cfg.name.clone(),
        outcome: Outcome::Kept,
        reasons: failed.clone(),
        previous_version: current.name.clone(),
        current_version: current.name.clone(),
        candidate_version: None,
        rows_selected,
        rows_sampled: rows.len(),
        holdout_rows: holdout.len(),
        steps: report.steps,
        current: cur_q,
        candidate: cand_q,
        threshold: None,
        wall_s: 0.0,
    };
    if failed.is_empty() {
        // 4. Recalibrate on held-out inliers, add the version, then move the pointer.
        let data = format!("{} held-out rows of the retrain selection", holdout.len());
        let t = calibrate(&cand_scores, cfg.target_fpr, &data);
        let cal = Calibration {
            in_model: cand_id.clone(),
            general_model: general.as_ref().map(|g| g.model_id()).transpose()?,
            thresholds: [(score, t.clone())].into_iter().collect(),
            reference: cand_reference,
        };
        out.threshold = Some(t.threshold);
        out.outcome = Outcome::Promoted;
        out.reasons = vec![format!(
            "passed the gates: bpd {:.4} vs {:.4}, AUROC {:?} vs {:?}",
            out.candidate.holdout_bpd,
            out.current.holdout_bpd,
            out.candidate.auroc,
            out.current.auroc
        )];
        out.wall_s = t0.elapsed().as_secs_f64();
        let v = registry.add_version(
            &cand_path,
            &[
                (CALIBRATION_FILE, serde_json::to_vec_pretty(&cal)?),
                ("retrain.json", serde_json::to_vec_pretty(&out)?),
            ],
        )?;
        registry.promote(&v.name)?;
        out.candidate_version = Some(v.name.clone());
        out.current_version = v.name;
    }
    out.wall_s = t0.elapsed().as_secs_f64();
    Ok(out)
}
