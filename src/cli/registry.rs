//! `glowwatch registry`: list, add, promote and roll back model versions (see
//! [`crate::registry`]). A running pipeline that scores from the registry follows `current`
//! between batches.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::glow::GlowModel;
use crate::registry::{CALIBRATION_FILE, Registry};

/// `glowwatch registry ...`.
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Versions of a model, the current one marked.
    List {
        /// The model's registry directory.
        dir: PathBuf,
    },
    /// Add a model file (and its calibration) as a new version; `--promote` makes it current.
    Add {
        /// The model's registry directory (created if missing).
        dir: PathBuf,
        /// Model file.
        model: PathBuf,
        /// Calibration file from `glowwatch calibrate` (default: the one beside the model).
        #[arg(long)]
        calibration: Option<PathBuf>,
        /// Point `current` at the new version.
        #[arg(long)]
        promote: bool,
    },
    /// Point `current` at a version.
    Promote {
        /// The model's registry directory.
        dir: PathBuf,
        /// Version name (`v0002`).
        version: String,
    },
    /// Point `current` back (at the previous version, or `--to`).
    Rollback {
        /// The model's registry directory.
        dir: PathBuf,
        /// Version to return to.
        #[arg(long)]
        to: Option<String>,
    },
}

/// Runs `glowwatch registry`.
pub fn run(c: RegistryCommand) -> Result<()> {
    match c {
        RegistryCommand::List { dir } => {
            let r = Registry::open(&dir)?;
            let cur = r.current()?.map(|v| v.name);
            for v in r.versions()? {
                let m = GlowModel::load(v.model(), &candle_core::Device::Cpu)?;
                println!(
                    "{} {}  {}  {}  calibration: {}",
                    if Some(&v.name) == cur.as_ref() {
                        "*"
                    } else {
                        " "
                    },
                    v.name,
                    m.model_id()?,
                    m.card.created,
                    if v.calibration().is_file() {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
        }
        RegistryCommand::Add {
            dir,
            model,
            calibration,
            promote,
        } => {
            let r = Registry::open(&dir)?;
            let cal = calibration
                .unwrap_or_else(|| crate::score::calibration::Calibration::path_for_model(&model));
            let extra = if cal.is_file() {
                vec![(
                    CALIBRATION_FILE,
                    std::fs::read(&cal).with_context(|| cal.display().to_string())?,
                )]
            } else {
                vec![]
            };
            let v = r.add_version(&model, &extra)?;
            if promote {
                r.promote(&v.name)?;
            }
            println!(
                "added {}{}",
                v.name,
                if promote { " (current)" } else { "" }
            );
        }
        RegistryCommand::Promote { dir, version } => {
            let v = Registry::open(&dir)?.promote(&version)?;
            println!("current: {}", v.name);
        }
        RegistryCommand::Rollback { dir, to } => {
            let v = Registry::open(&dir)?.rollback(to.as_deref())?;
            println!("current: {}", v.name);
        }
    }
    Ok(())
}
