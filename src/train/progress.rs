//! Training progress: an indicatif bar on a terminal, JSON lines (one object per event, on
//! stderr) when not on a terminal, so schedulers and log collectors can parse it.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// One thing worth reporting during training.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// Periodic step report.
    Step {
        epoch: u64,
        step: u64,
        total_steps: u64,
        /// Mean training bits/dim of the recent steps (the NLL part of the loss).
        bpd: f64,
        /// Mean outlier term of the recent steps (bits/dim units), when the outlier loss is on.
        outlier: Option<f64>,
        images_per_s: f64,
        eta_s: f64,
        skipped_steps: u64,
    },
    /// Held-out bits/dim.
    Validation {
        epoch: u64,
        step: u64,
        val_bpd: f64,
        non_finite: usize,
    },
    /// A checkpoint was written.
    Checkpoint { step: u64, path: String },
    /// Training ended (finished, interrupted or out of time).
    Done { step: u64, reason: String },
}

/// Where progress goes.
pub enum Progress {
    /// A terminal progress bar.
    Bar(ProgressBar),
    /// JSON lines on stderr.
    Json,
    /// Nothing (tests).
    Quiet,
}

impl Progress {
    /// A bar when stderr is a terminal, JSON lines otherwise.
    pub fn auto(total_steps: u64) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps, ETA {eta} | {msg}",
                )
                .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            Progress::Bar(bar)
        } else {
            Progress::Json
        }
    }

    /// Reports an event.
    pub fn report(&self, ev: &TrainEvent) {
        match self {
            Progress::Quiet => {}
            Progress::Json => {
                eprintln!("{}", serde_json::to_string(ev).expect("events serialise"));
            }
            Progress::Bar(bar) => match ev {
                TrainEvent::Step {
                    epoch,
                    step,
                    total_steps,
                    bpd,
                    outlier,
                    images_per_s,
                    skipped_steps,
                    ..
                } => {
                    bar.set_length(*total_steps);
                    bar.set_position(*step);
                    let o = outlier
                        .map(|o| format!(" outlier {o:.4}"))
                        .unwrap_or_default();
                    bar.set_message(format!(
                        "epoch {epoch} bpd {bpd:.3}{o} {images_per_s:.0} img/s skipped {skipped_steps}"
                    ));
                }
                TrainEvent::Validation { epoch, val_bpd, .. } => {
                    bar.println(format!("epoch {epoch}: validation bpd {val_bpd:.4}"));
                }
                TrainEvent::Checkpoint { path, .. } => {
                    bar.println(format!("checkpoint: {path}"));
                }
                TrainEvent::Done { reason, .. } => {
                    bar.finish_with_message(reason.clone());
                }
            },
        }
    }
}
