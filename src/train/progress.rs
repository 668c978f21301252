//! Training progress: an indicatif bar on a terminal, JSON lines (one object per event, on
//! stderr) when not on a terminal, so schedulers and log collectors can parse it. Every JSON line
//! carries `time` (RFC 3339, UTC) so a log read later says when each event happened.

use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime};

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
        /// Images per second since the previous step report of this process.
        images_per_s: f64,
        /// Seconds to the end of the run: the remaining steps at the current rate, or the time
        /// left before `--max-time`, whichever is sooner.
        eta_s: f64,
        /// Training wall time of the run so far, earlier (resumed-from) parts included.
        elapsed_s: f64,
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
                    // Our own ETA in the message, not indicatif's: after `--resume` the position
                    // jumps to the resumed step, which indicatif would count as this run's speed.
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps | {msg}",
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
            Progress::Json => eprintln!("{}", json_line(ev, SystemTime::now())),
            Progress::Bar(bar) => match ev {
                TrainEvent::Step {
                    epoch,
                    step,
                    total_steps,
                    bpd,
                    outlier,
                    images_per_s,
                    eta_s,
                    skipped_steps,
                    ..
                } => {
                    bar.set_length(*total_steps);
                    bar.set_position(*step);
                    let o = outlier
                        .map(|o| format!(" outlier {o:.4}"))
                        .unwrap_or_default();
                    let eta = humantime::format_duration(Duration::from_secs(eta_s.round() as u64));
                    bar.set_message(format!(
                        "epoch {epoch} bpd {bpd:.3}{o} {images_per_s:.0} img/s ETA {eta} skipped {skipped_steps}"
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

/// One JSON line for `ev`, with the wall-clock `time` it was reported at.
fn json_line(ev: &TrainEvent, now: SystemTime) -> String {
    let mut v = serde_json::to_value(ev).expect("events serialise");
    if let serde_json::Value::Object(m) = &mut v {
        let time = humantime::format_rfc3339_millis(now).to_string();
        m.insert("time".into(), serde_json::Value::String(time));
    }
    v.to_string()
}

/// Training throughput between two step reports. Starts at the step the run (or resumed run)
/// starts at, so the first report after `--resume` counts only the steps this process took.
#[derive(Debug, Clone, Copy)]
pub struct RateWindow {
    since: Instant,
    step: u64,
}

impl RateWindow {
    /// A window opening now at `step`.
    pub fn starting_at(step: u64) -> Self {
        RateWindow {
            since: Instant::now(),
            step,
        }
    }

    /// Images per second from the window's start to `step` (batches of `batch`) at `now`, and a
    /// new window opening there.
    pub fn close(self, step: u64, batch: usize, now: Instant) -> (f64, RateWindow) {
        let dt = now.duration_since(self.since).as_secs_f64();
        let ips = step.saturating_sub(self.step) as f64 * batch as f64 / dt.max(1e-9);
        (ips, RateWindow { since: now, step })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_after_a_resume_counts_only_this_process_steps() {
        // Regression: the first report after resuming at step 1,020 divided all 1,030 steps by
        // this process's 25 s (4,323 img/s instead of ~26).
        let w = RateWindow::starting_at(1_020);
        let (ips, next) = w.close(1_030, 64, w.since + Duration::from_secs(25));
        assert!((ips - 10.0 * 64.0 / 25.0).abs() < 1e-9, "{ips}");
        let (ips, _) = next.close(1_040, 64, next.since + Duration::from_secs(20));
        assert!((ips - 32.0).abs() < 1e-9, "{ips}");
    }

    #[test]
    fn json_lines_carry_the_event_and_its_time() {
        let ev = TrainEvent::Done {
            step: 7,
            reason: "max_time".into(),
        };
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_000_000_123);
        let v: serde_json::Value = serde_json::from_str(&json_line(&ev, t)).unwrap();
        assert_eq!(v["event"], "done");
        assert_eq!(v["step"], 7);
        assert_eq!(v["reason"], "max_time");
        assert_eq!(v["time"], "2026-11-30T00:53:20.123Z");
    }
}
