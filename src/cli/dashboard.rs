//! `glowwatch dashboard --pipeline P`: the dashboard of a pipeline's output files (batch runs),
//! the same page a running pipeline serves on its metrics listener; new output files are picked
//! up while it runs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::pipeline::config::PipelineConfig;
use crate::pipeline::dashboard::files::FileFeed;
use crate::pipeline::dashboard::{Board, BoardConfig, BoardModels, server};
use crate::pipeline::models::{LoadedModels, drift_monitor, load_scorer};

/// Arguments of `glowwatch dashboard`.
#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Pipeline config (TOML) whose scored and dead-letter output to show.
    #[arg(long, default_value = "pipelines/demo.toml")]
    pub pipeline: PathBuf,
    /// Address to serve on (default: the pipeline's `[metrics] listen`, else 127.0.0.1:9898;
    /// port 0 picks a free port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Seconds between looks for new output files.
    #[arg(long, default_value_t = 2.0)]
    pub poll_s: f64,
}

/// Runs `glowwatch dashboard` until interrupted.
pub fn run(a: DashboardArgs) -> Result<()> {
    let cfg = PipelineConfig::load(&a.pipeline)?;
    let what = || format!("pipeline {}", a.pipeline.display());
    super::run::init_logging();
    let LoadedModels {
        scorer,
        flagger,
        calibration: cal,
    } = load_scorer(&cfg).with_context(what)?;
    let board = Arc::new(Board::new(
        &cfg.name,
        BoardModels::new(&scorer, &flagger, cal.as_ref()),
        false,
        BoardConfig::default(),
    ));
    let drift = drift_monitor(&cfg, &scorer, &flagger, cal.as_ref()).with_context(what)?;
    let mut feed = FileFeed::new(&cfg, &scorer, drift);
    let files = feed.poll(&board).with_context(what)?;
    let listen = a
        .listen
        .or(cfg.metrics.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9898)));
    let server = server::spawn(listen, Arc::clone(&board), None)?;
    let addr = server.addr;
    let s = board.snapshot();
    println!(
        "dashboard of pipeline {} on http://{addr}/ ({files} files: {} scored, {} flagged, {} dead letters); Ctrl-C stops it",
        cfg.name,
        s.scored,
        s.flagged,
        s.dead_by_reason.values().sum::<u64>()
    );
    loop {
        std::thread::sleep(Duration::from_secs_f64(a.poll_s.max(0.1)));
        match feed.poll(&board) {
            Ok(0) => {}
            Ok(n) => tracing::info!(files = n, "read new output files"),
            Err(e) => tracing::warn!("reading output files: {e}"),
        }
    }
}
