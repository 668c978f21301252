//! `glowwatch retrain <retrain.toml>`: one idempotent retrain run (select with SQL, fine-tune,
//! gate, promote, recalibrate), or with `--every` a scheduler that runs it periodically.
//!
//! Exit status (one-shot): 0 promoted, 3 kept (a gate failed; the report says which), 75 another
//! retrain of the same model holds the lock, 1 failed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::registry::RegistryError;
use crate::retrain::{Outcome, RetrainConfig, retrain};
use crate::train::progress::Progress;

/// Arguments of `glowwatch retrain`.
#[derive(Debug, Args)]
pub struct RetrainArgs {
    /// Retrain config (TOML), e.g. pipelines/retrain-fashion.toml.
    pub config: PathBuf,
    /// Run every this long (e.g. `24h`) until stopped, instead of once.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
    /// Also write the JSON report here (atomically).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Exit status of a kept candidate.
pub const EXIT_KEPT: i32 = 3;
/// Exit status when another retrain holds the lock (EX_TEMPFAIL).
pub const EXIT_LOCKED: i32 = 75;

fn once(a: &RetrainArgs) -> i32 {
    let cfg = match RetrainConfig::load(&a.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 1;
        }
    };
    eprintln!(
        "retrain {}: selecting from {:?}",
        cfg.name,
        cfg.select.tables.keys().collect::<Vec<_>>()
    );
    match retrain(&cfg, &Progress::auto(cfg.train.steps)) {
        Ok(r) => {
            let json = serde_json::to_string_pretty(&r).unwrap_or_default();
            println!("{json}");
            if let Some(p) = &a.report
                && let Err(e) = crate::fsutil::write_atomic(p, json.as_bytes())
            {
                eprintln!("error: writing {}: {e}", p.display());
                return 1;
            }
            match r.outcome {
                Outcome::Promoted => {
                    eprintln!(
                        "promoted {} (was {}): {}",
                        r.current_version,
                        r.previous_version,
                        r.reasons.join("; ")
                    );
                    0
                }
                Outcome::Kept => {
                    eprintln!("kept {}: {}", r.current_version, r.reasons.join("; "));
                    EXIT_KEPT
                }
            }
        }
        Err(e) => {
            if let Some(RegistryError::Locked { .. }) = e.downcast_ref::<RegistryError>() {
                eprintln!("error: {e}");
                return EXIT_LOCKED;
            }
            eprintln!("error: retrain failed: {e:#}");
            1
        }
    }
}

/// Runs `glowwatch retrain`.
pub fn run(a: RetrainArgs) -> Result<()> {
    match a.every {
        None => std::process::exit(once(&a)),
        Some(every) => loop {
            let code = once(&a);
            eprintln!(
                "retrain: run ended with status {code}; next in {}",
                humantime::format_duration(every)
            );
            std::thread::sleep(every);
        },
    }
}
