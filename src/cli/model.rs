//! `glowwatch model new|info|sample|card|import-torch`: create, inspect and sample model files,
//! record detection figures in their cards, and import checkpoints of the paper authors'
//! PyTorch code.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Subcommand;

use crate::bench::random_batch;
use crate::device::DeviceSpec;
use crate::glow::config::ResizeMode;
use crate::glow::file::{DetectionCard, DetectionResult, now_rfc3339};
use crate::glow::torch::{ImportOptions, import_file};
use crate::glow::{GlowModel, ModelCard};
use crate::score::ScoreKind;

/// Model-file subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a freshly initialised model file (random orthogonal 1x1 convs; ActNorms initialised
    /// on uniform-noise images unless --no-init).
    New {
        /// `small`, `paper`, `small3`, `paper1`, or a JSON/TOML config file.
        #[arg(long, default_value = "small")]
        config: String,
        /// Seed of the random initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Leave ActNorms at identity (no data-dependent init).
        #[arg(long)]
        no_init: bool,
        /// Name written into the model card.
        #[arg(long, default_value = "untrained")]
        name: String,
        /// Output path (.safetensors).
        out: PathBuf,
    },
    /// Record detection figures in a model file's card: one score's results from an
    /// `eval.json` written by `glowwatch eval` (the weights and the model id stay as they are).
    Card {
        /// Model file (rewritten in place).
        path: PathBuf,
        /// `eval.json` of an evaluation of this model.
        #[arg(long)]
        detection: PathBuf,
        /// The score to record.
        #[arg(long)]
        score: ScoreKind,
        /// How the figures were produced (e.g. the eval command).
        #[arg(long, default_value = "")]
        measured: String,
    },
    /// Import a Glow checkpoint saved by the paper authors' PyTorch code (invglow's
    /// `create_glow_model`): the whole pickled module (`torch.save(model, f)`) or its state
    /// dict; no Python needed. Writes one of our model files; the card records the source
    /// checkpoint's SHA-256.
    ImportTorch {
        /// The torch checkpoint (`.th`, `.pt`, `.pth`; torch >= 1.6 zip format).
        checkpoint: PathBuf,
        /// Output model file (.safetensors).
        #[arg(long)]
        out: PathBuf,
        /// How images that are not 32x32 reach the model's size: `pad` (zero padding, as the
        /// authors' code does for 28x28 images), `bilinear`, or `none`.
        #[arg(long, default_value = "pad")]
        resize: String,
        /// Name written into the model card (default: the checkpoint's file stem).
        #[arg(long)]
        name: Option<String>,
        /// What the model was trained on, for the model card.
        #[arg(long)]
        trained_on: Option<String>,
    },
    /// Write a model file with its weights stored as f32, f16 or bf16 (16 bits: half the size;
    /// the weights are rounded, so the converted file has its own id).
    Convert {
        /// Model file.
        path: PathBuf,
        /// Output model file.
        #[arg(long)]
        out: PathBuf,
        /// f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: String,
    },
    /// Print a model file's id, config, card and size.
    Info {
        /// Model file.
        path: PathBuf,
    },
    /// Draw samples from a model and write them as one PNG grid.
    Sample {
        /// Model file.
        path: PathBuf,
        /// Number of samples.
        #[arg(long, default_value_t = 16)]
        n: usize,
        /// Sampling temperature (std of the latents).
        #[arg(long, default_value_t = 0.7)]
        temperature: f64,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// auto, cpu or cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceSpec,
        /// Output PNG.
        #[arg(long, default_value = "samples.png")]
        out: PathBuf,
    },
}

/// Runs a model subcommand.
pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::New {
            config,
            seed,
            no_init,
            name,
            out,
        } => {
            let cfg = super::bench::named_config(&config)?;
            let mut model = GlowModel::new_random(&cfg, seed, &Device::Cpu)?;
            if !no_init {
                model.init_from_data(&random_batch(&cfg, 64, seed ^ 0x5eed, &Device::Cpu)?)?;
            }
            model.card = ModelCard {
                name,
                trained_on: "nothing (fresh initialisation)".into(),
                created: now_rfc3339(),
                ..Default::default()
            };
            let id = model.save(&out)?;
            println!("{id}  {}", out.display());
        }
        ModelCommand::Card {
            path,
            detection,
            score,
            measured,
        } => {
            let mut model = GlowModel::load(&path, &Device::Cpu)?;
            let id = model.model_id()?;
            model.card.detection = Some(detection_card(&detection, &id, score, &measured)?);
            let saved = model.save(&path)?;
            anyhow::ensure!(saved == id, "model id changed from {id} to {saved}");
            println!("{}", serde_json::to_string_pretty(&model.card.detection)?);
        }
        ModelCommand::ImportTorch {
            checkpoint,
            out,
            resize,
            name,
            trained_on,
        } => {
            let resize: ResizeMode = serde_json::from_value(serde_json::json!(resize))
                .map_err(|_| anyhow::anyhow!("--resize must be pad, bilinear or none"))?;
            let mut opts = ImportOptions {
                resize,
                name,
                ..ImportOptions::default()
            };
            if let Some(t) = trained_on {
                opts.trained_on = t;
            }
            let imported = import_file(&checkpoint, &opts)
                .with_context(|| format!("importing {}", checkpoint.display()))?;
            let model = imported.model;
            let id = model.save(&out)?;
            let cfg = model.config();
            println!(
                "imported {} ({}): {} channel(s), {} scales, K = {}, width {}, {} parameters",
                checkpoint.display(),
                imported.form.as_str(),
                cfg.in_channels,
                cfg.scales,
                cfg.steps,
                cfg.hidden,
                model.param_count()
            );
            println!("{id}  {}", out.display());
        }
        ModelCommand::Convert { path, out, dtype } => {
            let dtype = match dtype.as_str() {
                "f32" => DType::F32,
                "f16" => DType::F16,
                "bf16" => DType::BF16,
                other => anyhow::bail!("--dtype must be f32, f16 or bf16, not {other}"),
            };
            let model = GlowModel::load(&path, &Device::Cpu)?;
            let id = model.save_as(&out, dtype)?;
            let size = std::fs::metadata(&out)?.len();
            println!("{id}  {}  ({size} bytes, weights {dtype:?})", out.display());
        }
        ModelCommand::Info { path } => {
            let model = GlowModel::load(&path, &Device::Cpu)?;
            let cfg = model.config();
            println!("model id:   {}", model.model_id()?);
            println!("parameters: {}", model.param_count());
            println!("config:     {}", serde_json::to_string(cfg)?);
            println!("GFLOP/img:  {:.3}", cfg.flops_per_image() / 1e9);
            println!("card:       {}", serde_json::to_string_pretty(&model.card)?);
        }
        ModelCommand::Sample {
            path,
            n,
            temperature,
            seed,
            device,
            out,
        } => {
            let device = device.open().map_err(anyhow::Error::msg)?;
            let model = GlowModel::load(&path, &device)?;
            let x = model.glow.sample(n, temperature, seed)?;
            write_grid(&x, &out)?;
            println!("{}", out.display());
        }
    }
    Ok(())
}

/// The card entry of `score` from an `eval.json` of model `id`.
fn detection_card(
    eval_json: &std::path::Path,
    id: &str,
    score: ScoreKind,
    measured: &str,
) -> Result<DetectionCard> {
    let text = std::fs::read_to_string(eval_json)
        .with_context(|| format!("reading {}", eval_json.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}", eval_json.display()))?;
    anyhow::ensure!(
        v["in_model"] == id,
        "{} evaluates model {}, not {id}",
        eval_json.display(),
        v["in_model"]
    );
    let name = score.to_string();
    let results: Vec<DetectionResult> = v["results"]
        .as_array()
        .context("eval.json has no results")?
        .iter()
        .filter(|r| r["score"] == name.as_str())
        .map(|r| DetectionResult {
            ood: r["ood"].as_str().unwrap_or_default().to_string(),
            auroc: r["auroc"].as_f64().unwrap_or(f64::NAN),
            tpr_at_1pct_fpr: r["tpr_at_1pct_fpr"].as_f64().unwrap_or(f64::NAN),
            recall_at_threshold: r["calibrated"]["recall"].as_f64(),
        })
        .collect();
    anyhow::ensure!(
        !results.is_empty(),
        "{} has no results for score {name}",
        eval_json.display()
    );
    Ok(DetectionCard {
        score: name,
        general_model: v["general_model"].as_str().map(String::from),
        in_set: v["in_set"][0].as_str().unwrap_or_default().to_string(),
        results,
        measured: format!("{measured} ({})", now_rfc3339()),
    })
}

/// Writes (N, C, S, S) model-space images as a square PNG grid (k = round((x + 0.5) * 256)).
fn write_grid(x: &candle_core::Tensor, out: &PathBuf) -> Result<()> {
    let (n, c, s, _) = x.dims4()?;
    let v = x
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let cols = (n as f64).sqrt().ceil() as usize;
    let rows = n.div_ceil(cols);
    let (w, h) = ((cols * s) as u32, (rows * s) as u32);
    let px = |i: usize, ch: usize, y: usize, xx: usize| {
        let val = v[((i * c + ch) * s + y) * s + xx];
        ((val + 0.5) * 256.0 - 0.5).round().clamp(0.0, 255.0) as u8
    };
    let img = image::RgbImage::from_fn(w, h, |gx, gy| {
        let (gx, gy) = (gx as usize, gy as usize);
        let i = (gy / s) * cols + gx / s;
        if i >= n {
            return image::Rgb([0, 0, 0]);
        }
        let (y, xx) = (gy % s, gx % s);
        let ch = |k: usize| px(i, if c == 1 { 0 } else { k }, y, xx);
        image::Rgb([ch(0), ch(1), ch(2)])
    });
    img.save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}
