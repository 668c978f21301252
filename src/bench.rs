//! Scoring-throughput benchmark behind `glowwatch bench`: images/s (median of several timed
//! runs after warm-up), achieved TFLOP/s and, when given, % of a peak and the ratio to a
//! reference figure. Numbers come only from runs made by this code; nothing is asserted.

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;

use crate::device::device_name;
use crate::glow::config::GlowConfig;
use crate::glow::fused_train::{Backprop, loss_and_gradients};
use crate::glow::preprocess::{BIN_CENTRE, pixels_to_tensor};
use crate::glow::scorer::StageTimer;
use crate::glow::{GlowModel, Precision, Result};
use crate::train::OutlierLoss;
use crate::train::optimizer::{Adamax, AdamaxConfig};
use crate::train::trainer::mean_nll_bpd;

/// What a timed run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchMode {
    /// The fused inference scorer (what the product runs; on the CPU in f32 the fused forward
    /// kernels shared with training).
    Score,
    /// The scorer's candle-kernel path ([`crate::glow::GlowScorer::kernel_path`]), for
    /// comparison on the CPU.
    ScoreKernels,
    /// The trainable reference path's forward pass (what the fused scorer is tested against).
    Reference,
    /// One training step as `glowwatch train` runs it: forward and backward of the mean NLL
    /// (the fused CPU path where it applies, [`Backprop::auto`]) and the Adamax update;
    /// counted as 3x the forward FLOPs.
    TrainStep,
    /// A step of the outlier loss as `glowwatch train --general` runs it: the NLL of one batch
    /// plus the outlier term of a second (general) batch through the same model, against a
    /// frozen general model's fused scorer; counted as 2 x 3 + 1 forward passes.
    TrainStepOutlier,
    /// The same as `TrainStep` with candle's autograd over the channels-last path
    /// ([`crate::glow::Glow::scale_log_p`]).
    TrainStepAutograd,
    /// The same through the NCHW reference path ([`crate::glow::Glow::forward`]).
    TrainStepReference,
}

impl std::str::FromStr for BenchMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "score" => Ok(Self::Score),
            "score-kernels" => Ok(Self::ScoreKernels),
            "reference" => Ok(Self::Reference),
            "train-step" => Ok(Self::TrainStep),
            "train-step-autograd" => Ok(Self::TrainStepAutograd),
            "train-step-outlier" => Ok(Self::TrainStepOutlier),
            "train-step-reference" => Ok(Self::TrainStepReference),
            _ => Err(format!(
                "unknown mode `{s}`: use score, score-kernels, reference, train-step, train-step-outlier, \
                 train-step-autograd or train-step-reference"
            )),
        }
    }
}

impl BenchMode {
    fn name(self) -> &'static str {
        match self {
            Self::Score => "score",
            Self::ScoreKernels => "score-kernels",
            Self::Reference => "reference",
            Self::TrainStep => "train-step",
            Self::TrainStepAutograd => "train-step-autograd",
            Self::TrainStepOutlier => "train-step-outlier",
            Self::TrainStepReference => "train-step-reference",
        }
    }
}

/// One benchmark configuration, measured at every batch size and precision.
#[derive(Debug, Clone)]
pub struct BenchCase {
    /// Label of the configuration (`paper`, `small`, or a file name).
    pub name: String,
    /// The architecture.
    pub config: GlowConfig,
    /// Images per scoring call.
    pub batches: Vec<usize>,
    /// Numeric precisions.
    pub precisions: Vec<Precision>,
}

/// One measured row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub config: String,
    pub mode: BenchMode,
    pub channels: usize,
    pub params: usize,
    pub device: String,
    pub precision: Precision,
    pub batch: usize,
    pub runs: usize,
    pub images_per_s_median: f64,
    pub images_per_s_min: f64,
    pub images_per_s_max: f64,
    pub tflops: f64,
    pub pct_of_peak: Option<f64>,
    pub ratio_to_reference: Option<f64>,
    /// Seconds per stage of one profiled forward pass (when profiling).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<(String, f64)>,
}

/// Options shared by all cases of a run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Timed runs per case (the median is reported).
    pub runs: usize,
    /// Untimed warm-up runs per case.
    pub warmup: usize,
    /// Peak TFLOP/s of the device for the % column.
    pub peak_tflops: Option<f64>,
    /// Reference images/s for the ratio column.
    pub reference_ips: Option<f64>,
    /// Also time the stages of one forward pass per row (see [`StageTimer`]; score mode).
    pub profile: bool,
    /// What each timed run does.
    pub mode: BenchMode,
}

/// `n` images of uniformly random 8-bit pixels from `seed`, as scoring inputs on `device`.
pub fn random_batch(cfg: &GlowConfig, n: usize, seed: u64, device: &Device) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let px: Vec<u8> = (0..n * cfg.dims()).map(|_| rng.random::<u8>()).collect();
    pixels_to_tensor(&px, cfg, BIN_CENTRE, device)
}

/// Median of a non-empty slice.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Measures one configuration: one randomly initialised model (ActNorms initialised on random
/// images, which does not change the work done) scoring random 8-bit images with the fused
/// scorer at every precision and batch size. `on_row` sees each row as it is measured.
pub fn run_case(
    case: &BenchCase,
    device: &Device,
    opts: &BenchOptions,
    mut on_row: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    let model = GlowModel::new_random(&case.config, 0, device)?;
    let init_n = case.batches.iter().copied().min().unwrap_or(1).min(64);
    model.init_from_data(&random_batch(&case.config, init_n, 1, device)?)?;
    let mut rows = Vec::new();
    for &precision in &case.precisions {
        precision.apply();
        let (net, state) = precision.dtypes();
        let mut scorer = model.scorer_with_state(device, net, state)?;
        if opts.mode == BenchMode::ScoreKernels {
            scorer = scorer.kernel_path();
        }
        for &batch in &case.batches {
            let x = random_batch(&case.config, batch, 2, device)?;
            let vars = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
            let mut opt = Adamax::new(vars, AdamaxConfig::default())?;
            let mut tapes = Vec::new();
            let xg = random_batch(&case.config, batch, 3, device)?;
            // The outlier mode's frozen general model: the scorer, built before any update
            // (the same work as a separate general model of this configuration).
            let general = &scorer;
            let to_bpd = 1.0 / (case.config.dims() as f64 * std::f64::consts::LN_2);
            // Every mode ends by copying a result to the host, which includes the device sync.
            let mut work = || -> Result<usize> {
                Ok(match opts.mode {
                    BenchMode::Score | BenchMode::ScoreKernels => scorer.score(&x)?.log_p.len(),
                    BenchMode::Reference => {
                        model.glow.forward(&x)?.log_p()?.to_vec1::<f64>()?.len()
                    }
                    BenchMode::TrainStepReference => {
                        let loss = model.glow.forward(&x)?.log_p()?.mean(0)?.neg()?;
                        opt.step(&loss.backward()?)?;
                        let _ = loss.to_scalar::<f64>()?;
                        batch
                    }
                    BenchMode::TrainStepOutlier => {
                        let lp_gen = general.forward(&xg)?.sum(1)?;
                        let outlier = OutlierLoss::grey_default();
                        let (loss, grads) = loss_and_gradients(
                            &model.glow,
                            Backprop::auto(&model.glow, device),
                            &[&x, &xg],
                            &mut tapes,
                            |lp| {
                                let nll = mean_nll_bpd(&lp[0], to_bpd)?;
                                Ok((nll + outlier.term(&lp[1].sum(1)?, &lp_gen, to_bpd)?)?)
                            },
                        )?;
                        opt.step(&grads)?;
                        let _ = loss.to_scalar::<f64>()?;
                        batch
                    }
                    BenchMode::TrainStep | BenchMode::TrainStepAutograd => {
                        let backprop = if opts.mode == BenchMode::TrainStep {
                            Backprop::auto(&model.glow, device)
                        } else {
                            Backprop::Autograd
                        };
                        let (loss, grads) =
                            loss_and_gradients(&model.glow, backprop, &[&x], &mut tapes, |lp| {
                                Ok(lp[0].sum(1)?.mean(0)?.neg()?)
                            })?;
                        opt.step(&grads)?;
                        let _ = loss.to_scalar::<f64>()?;
                        batch
                    }
                })
            };
            for _ in 0..opts.warmup {
                work()?;
            }
            let mut ips = Vec::with_capacity(opts.runs);
            for _ in 0..opts.runs.max(1) {
                let t = Instant::now();
                let n = work()?;
                let dt = t.elapsed().as_secs_f64();
                assert_eq!(n, batch);
                ips.push(batch as f64 / dt);
            }
            let stages = if opts.profile
                && matches!(opts.mode, BenchMode::Score | BenchMode::ScoreKernels)
            {
                let mut timer = StageTimer::new(device)?;
                scorer.forward_timed(&x, Some(&mut timer))?;
                timer
                    .totals
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect()
            } else {
                vec![]
            };
            let med = median(&ips);
            let passes = match opts.mode {
                BenchMode::TrainStep
                | BenchMode::TrainStepAutograd
                | BenchMode::TrainStepReference => 3.0,
                BenchMode::TrainStepOutlier => 7.0,
                BenchMode::Score | BenchMode::ScoreKernels | BenchMode::Reference => 1.0,
            };
            let tflops = passes * med * case.config.flops_per_image() / 1e12;
            let row = BenchRow {
                config: case.name.clone(),
                mode: opts.mode,
                channels: case.config.in_channels,
                params: model.param_count(),
                device: device_name(device),
                precision,
                batch,
                runs: ips.len(),
                images_per_s_median: med,
                images_per_s_min: ips.iter().cloned().fold(f64::INFINITY, f64::min),
                images_per_s_max: ips.iter().cloned().fold(0.0, f64::max),
                tflops,
                pct_of_peak: opts.peak_tflops.map(|p| 100.0 * tflops / p),
                ratio_to_reference: opts.reference_ips.map(|r| med / r),
                stages,
            };
            on_row(&row);
            rows.push(row);
        }
    }
    Precision::F32.apply();
    Ok(rows)
}

/// Renders rows as an aligned text table.
pub fn table(rows: &[BenchRow]) -> String {
    let header = [
        "config",
        "mode",
        "C",
        "params",
        "device",
        "prec",
        "batch",
        "runs",
        "img/s (median)",
        "min",
        "max",
        "TFLOP/s",
        "% peak",
        "x ref",
    ];
    let opt = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.config.clone(),
                r.mode.name().to_string(),
                r.channels.to_string(),
                format!("{:.1}M", r.params as f64 / 1e6),
                r.device.clone(),
                r.precision.name().to_string(),
                r.batch.to_string(),
                r.runs.to_string(),
                format!("{:.1}", r.images_per_s_median),
                format!("{:.1}", r.images_per_s_min),
                format!("{:.1}", r.images_per_s_max),
                format!("{:.3}", r.tflops),
                opt(r.pct_of_peak, 1),
                opt(r.ratio_to_reference, 2),
            ]
        })
        .collect();
    debug_assert!(body.iter().all(|r| r.len() == header.len()));
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            body.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    out.push_str(&"-".repeat(out.len() - 1));
    for r in body {
        out.push('\n');
        out.push_str(&line(r));
    }
    out.push('\n');
    out
}

/// Renders the per-stage shares of profiled rows.
pub fn profile_table(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    for r in rows.iter().filter(|r| !r.stages.is_empty()) {
        let total: f64 = r.stages.iter().map(|(_, v)| v).sum();
        out.push_str(&format!(
            "profile {} {:?} batch {} ({:.1} ms, synchronised per stage):\n",
            r.config,
            r.precision,
            r.batch,
            total * 1e3
        ));
        let mut st = r.stages.clone();
        st.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (k, v) in st {
            out.push_str(&format!(
                "  {k:>16}  {:>9.2} ms  {:>5.1}%\n",
                v * 1e3,
                100.0 * v / total
            ));
        }
    }
    out
}

/// Peak resident set size of this process in MiB (Linux: `VmHWM` of /proc/self/status).
pub fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_and_precision_names_parse_back() {
        for m in [
            BenchMode::Score,
            BenchMode::ScoreKernels,
            BenchMode::Reference,
            BenchMode::TrainStep,
            BenchMode::TrainStepAutograd,
            BenchMode::TrainStepOutlier,
            BenchMode::TrainStepReference,
        ] {
            assert_eq!(m.name().parse::<BenchMode>(), Ok(m));
        }
        for p in [
            Precision::F32,
            Precision::Tf32,
            Precision::Bf16,
            Precision::Bf16All,
        ] {
            assert_eq!(p.name().parse::<Precision>(), Ok(p));
        }
        assert!("fast".parse::<BenchMode>().is_err());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn a_tiny_case_runs_and_renders() {
        let case = BenchCase {
            name: "tiny".into(),
            config: GlowConfig {
                image_size: 8,
                scales: 2,
                steps: 1,
                hidden: 4,
                ..GlowConfig::small(1)
            },
            batches: vec![4, 2],
            precisions: vec![Precision::F32],
        };
        let opts = BenchOptions {
            runs: 2,
            warmup: 0,
            peak_tflops: Some(1.0),
            reference_ips: Some(10.0),
            profile: true,
            mode: BenchMode::Score,
        };
        let rows = run_case(&case, &Device::Cpu, &opts, |_| {}).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].batch, rows[1].batch), (4, 2));
        assert!(
            rows.iter()
                .all(|r| r.runs == 2 && r.images_per_s_median > 0.0)
        );
        let t = table(&rows);
        assert!(t.contains("tiny") && t.contains("img/s"), "{t}");
        // Every row is as wide as the header (columns and widths agree).
        let widths: Vec<usize> = t.lines().map(|l| l.len()).collect();
        assert!(widths.iter().all(|&w| w == widths[0]), "{t}");
        for mode in [
            BenchMode::ScoreKernels,
            BenchMode::Reference,
            BenchMode::TrainStep,
            BenchMode::TrainStepAutograd,
            BenchMode::TrainStepOutlier,
            BenchMode::TrainStepReference,
        ] {
            let opts = BenchOptions {
                mode,
                profile: false,
                ..opts.clone()
            };
            let rows = run_case(&case, &Device::Cpu, &opts, |_| {}).unwrap();
            assert!(
                rows.iter()
                    .all(|r| r.mode == mode && r.images_per_s_median > 0.0)
            );
        }
    }
}
