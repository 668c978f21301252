//! `glowwatch sql`: one query (`glowwatch sql "SELECT ..."`) or an interactive shell (no
//! query) over tables registered from a pipeline config and/or `--table name=path`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::device::DeviceSpec;
use crate::pipeline::config::PipelineConfig;
use crate::score::ScoreKind;
use crate::sql::output::{self, Format};
use crate::sql::udf::SqlModels;
use crate::sql::{SqlSession, StatementResult};

/// Arguments of `glowwatch sql`.
#[derive(Debug, Args)]
pub struct SqlArgs {
    /// SQL to run (several `;`-separated statements allowed); none starts the shell.
    pub query: Option<String>,
    /// Register the tables of a pipeline (`scored`, `dead_letter`, `input`) and use its models
    /// for the scoring functions.
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// More tables: `name=path` (a Parquet file, a directory, or a URL), repeatable.
    #[arg(long = "table", value_name = "NAME=PATH")]
    pub tables: Vec<String>,
    /// In-distribution model for ood_* functions (overrides the pipeline's).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// General model for ood_llr / ood_gen_log_p (overrides the pipeline's).
    #[arg(long)]
    pub general: Option<PathBuf>,
    /// Calibration file whose complexity reference the complexity_cond and combined scores
    /// use (default: the pipeline's flag.calibration, else `<model>.calibration.json` when it
    /// exists).
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// What ood_score returns (default: the pipeline's flag.score, else llr with a general
    /// model, else nll).
    #[arg(long)]
    pub score: Option<ScoreKind>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Write the output to this file instead of stdout (needed for parquet).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Allow statements that write or delete (INSERT, ...). COPY ... TO is always allowed.
    #[arg(long)]
    pub allow_write: bool,
    /// auto, cpu or cuda:N (for the scoring functions).
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Images per model call in the scoring functions.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
}

/// Runs `glowwatch sql`.
pub fn run(a: SqlArgs) -> Result<()> {
    if a.format == Format::Parquet && a.output.is_none() {
        bail!("--format parquet needs --output FILE");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let session = open_session(&a).await?;
        match &a.query {
            Some(q) => {
                let results = session.run(q).await?;
                emit(&a, results.last())
            }
            None => shell(&a, &session).await,
        }
    })
}

/// Builds the session: pipeline tables, `--table`s, models for the scoring functions.
async fn open_session(a: &SqlArgs) -> Result<SqlSession> {
    let session = SqlSession::new(a.allow_write);
    let pipeline = match &a.pipeline {
        Some(p) => Some(PipelineConfig::load(p)?),
        None => None,
    };
    if let Some(cfg) = &pipeline {
        session.register_pipeline(cfg).await?;
    }
    for t in &a.tables {
        let (name, path) = t
            .split_once('=')
            .with_context(|| format!("--table {t}: expected NAME=PATH"))?;
        session.register(name, path).await?;
    }
    let model = a
        .model
        .clone()
        .or_else(|| pipeline.as_ref().map(|c| c.models.in_model.clone()));
    let general = a
        .general
        .clone()
        .or_else(|| pipeline.as_ref().and_then(|c| c.models.general.clone()));
    if let Some(model) = model {
        let score = a
            .score
            .or_else(|| pipeline.as_ref().map(|c| c.flag.score))
            .unwrap_or(if general.is_some() {
                ScoreKind::Llr
            } else {
                ScoreKind::Nll
            });
        let limits = pipeline
            .as_ref()
            .map(|c| c.decode.limits())
            .unwrap_or_default();
        let calibration = a
            .calibration
            .clone()
            .or_else(|| pipeline.as_ref().and_then(|c| c.flag.calibration.clone()))
            .or_else(|| {
                Some(crate::score::calibration::Calibration::path_for_model(
                    &model,
                ))
                .filter(|p| p.exists())
            });
        session.add_models(Arc::new(SqlModels::load(
            &model,
            general.as_deref(),
            calibration.as_deref(),
            a.device,
            a.batch,
            score,
            limits,
        )?));
    }
    Ok(session)
}

fn emit(a: &SqlArgs, result: Option<&StatementResult>) -> Result<()> {
    let Some(r) = result else { return Ok(()) };
    match &a.output {
        Some(path) => {
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("{}", path.display()))?,
            );
            output::write(a.format, &r.schema, &r.batches, &mut f)?;
            f.flush()?;
            eprintln!("wrote {} rows to {}", r.rows(), path.display());
        }
        None => {
            let stdout = std::io::stdout();
            let mut lock = stdout.lock();
            output::write(a.format, &r.schema, &r.batches, &mut lock)?;
        }
    }
    Ok(())
}

const SHELL_HELP: &str = "\
statements end with `;` and may span lines
\\d            list tables
\\d NAME       columns of a table
\\q            quit (or Ctrl-D)
\\?            this help";

/// The interactive shell: line editing and history (rustyline), multi-line statements,
/// `\d` listings. Errors are printed and the shell goes on.
async fn shell(a: &SqlArgs, session: &SqlSession) -> Result<()> {
    let mut rl = rustyline::DefaultEditor::new()?;
    let history = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".glowwatch_sql_history"))
        .unwrap_or_else(|| PathBuf::from(".glowwatch_sql_history"));
    let _ = rl.load_history(&history);
    println!(
        "glowwatch sql: tables {} (\\? for help)",
        session.tables().join(", ")
    );
    let mut buf = String::new();
    loop {
        let prompt = if buf.is_empty() { "sql> " } else { "  -> " };
        let line = match rl.readline(prompt) {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Interrupted) => {
                buf.clear();
                continue;
            }
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let trimmed = line.trim();
        if buf.is_empty() && trimmed.starts_with('\\') {
            let _ = rl.add_history_entry(trimmed);
            let mut parts = trimmed.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some("\\q"), _) => break,
                (Some("\\?"), _) => println!("{SHELL_HELP}"),
                (Some("\\d"), None) => {
                    for t in session.tables() {
                        println!("{t}");
                    }
                }
                (Some("\\d"), Some(name)) => match session.table_schema(name).await {
                    Ok(s) => {
                        for f in s.fields() {
                            println!("{:<24} {}", f.name(), f.data_type());
                        }
                    }
                    Err(e) => eprintln!("error: {e}"),
                },
                _ => eprintln!("unknown command {trimmed} (\\? for help)"),
            }
            continue;
        }
        if trimmed.is_empty() && buf.is_empty() {
            continue;
        }
        buf.push_str(&line);
        buf.push('\n');
        if !trimmed.ends_with(';') {
            continue;
        }
        let sql = std::mem::take(&mut buf);
        let _ = rl.add_history_entry(sql.trim());
        match session.run(&sql).await {
            Ok(results) => {
                for r in &results {
                    if let Err(e) = emit(a, Some(r)) {
                        eprintln!("error: {e:#}");
                    }
                }
            }
            Err(e) => eprintln!("error: {e}"),
        }
    }
    let _ = rl.save_history(&history);
    Ok(())
}
