//! SQL over scored datasets with DataFusion: tables registered from pipeline configs or
//! paths (Hive partition directories become columns), scoring UDFs ([`udf`]), a read-only
//! default, and output formats ([`output`]). `glowwatch sql` is the command-line face.
//!
//! Read-only means: statements that would write or delete data (INSERT, UPDATE, DELETE,
//! CREATE TABLE ... AS into a file-backed table) are refused unless the session allows writes.
//! `COPY ... TO` (exporting a result) is allowed, as are session-local definitions (CREATE
//! VIEW, CREATE EXTERNAL TABLE, DROP of a registered name), which never touch files.

pub mod output;
pub mod udf;

use std::path::Path;
use std::sync::Arc;

use crate::pipeline::source::parquet::ParquetSource;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::TableProvider;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::execution::context::{SessionConfig, SessionContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::DFParser;

use crate::pipeline::config::PipelineConfig;
use crate::pipeline::source::parquet::parquet_files;
use udf::SqlModels;

/// Errors of the SQL layer.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// DataFusion refused or failed the statement (its message, plus the position when known).
    #[error("{0}")]
    Query(String),
    /// A table could not be registered.
    #[error("table `{name}`: {reason}")]
    Table {
        /// Table name.
        name: String,
        /// What is wrong (e.g. the path does not exist).
        reason: String,
    },
    /// The statement would write or delete and the session is read-only.
    #[error(
        "refused: {0} would modify data and this session is read-only (use --allow-write; COPY ... TO is allowed)"
    )]
    ReadOnly(String),
}

impl From<DataFusionError> for SqlError {
    fn from(e: DataFusionError) -> Self {
        let at = e
            .diagnostic()
            .and_then(|d| d.span)
            .filter(|s| s.start.line > 0)
            .map(|s| format!(" (at line {}, column {})", s.start.line, s.start.column))
            .unwrap_or_default();
        SqlError::Query(format!("{e}{at}"))
    }
}

/// Result alias of the SQL layer.
pub type Result<T> = std::result::Result<T, SqlError>;

/// The rows of one statement.
#[derive(Debug, Clone)]
pub struct StatementResult {
    /// Output schema (also for zero rows).
    pub schema: SchemaRef,
    /// Output rows.
    pub batches: Vec<RecordBatch>,
}

impl StatementResult {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// A DataFusion session with glowwatch's tables, functions and write policy.
pub struct SqlSession {
    ctx: SessionContext,
    allow_write: bool,
}

impl SqlSession {
    /// A session with the helper UDFs; `allow_write` lifts the read-only default.
    pub fn new(allow_write: bool) -> Self {
        let mut config = SessionConfig::new().with_information_schema(true);
        let opts = config.options_mut();
        // Keep Parquet's Binary/Utf8 as written (not BinaryView/Utf8View), so that functions
        // such as octet_length(image) work and types read as in schemas/.
        opts.execution.parquet.schema_force_view_types = false;
        // Positions in planning errors.
        opts.sql_parser.collect_spans = true;
        let ctx = SessionContext::new_with_config(config);
        for f in udf::helper_udfs() {
            ctx.register_udf(f);
        }
        Self { ctx, allow_write }
    }

    /// Adds the scoring UDFs (`ood_log_p`, `ood_llr`, ...) backed by `models`.
    pub fn add_models(&self, models: Arc<SqlModels>) {
        for f in udf::scoring_udfs(models) {
            self.ctx.register_udf(f);
        }
    }

    /// The DataFusion context (for callers that need more than SQL text).
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Registers Parquet at `location` (a file, a directory searched recursively through
    /// `key=value` partition directories, or an object-store URL) as table `name`. Partition
    /// directories become string columns.
    pub async fn register(&self, name: &str, location: &str) -> Result<()> {
        let table_err = |reason: String| SqlError::Table {
            name: name.to_string(),
            reason,
        };
        let is_url = location.contains("://");
        if !is_url && !Path::new(location).exists() {
            return Err(table_err(format!("{location} does not exist")));
        }
        let url = ListingTableUrl::parse(location).map_err(|e| table_err(e.to_string()))?;
        if self.ctx.runtime_env().object_store(&url).is_err() {
            return Err(table_err(format!(
                "no object store for `{}` URLs in this build (local paths and file:// URLs are \
                 supported)",
                url.scheme()
            )));
        }
        // INT96 timestamps (Spark's) as microseconds: nanoseconds wrap outside 1677-2262.
        let format = ParquetFormat::default().with_coerce_int96(Some("us".into()));
        let options = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
        let state = self.ctx.state();
        let partitioned = ListingTableConfig::new(url)
            .with_listing_options(options)
            .infer_partitions_from_path(&state)
            .await
            .map_err(|e| table_err(e.to_string()))?;
        let config = match partitioned.clone().infer_schema(&state).await {
            Ok(c) => c,
            // Files from different writers (string vs large_string, ...) do not merge in
            // DataFusion's inference; the pipeline's source unifies them, and the scan casts
            // each file's columns to that schema.
            Err(e) if !is_url => {
                let unified = ParquetSource::open(&[location.into()])
                    .map_err(|_| table_err(format!("{location}: {e}")))?;
                partitioned.with_schema(Arc::clone(unified.schema()))
            }
            Err(e) => return Err(table_err(format!("{location}: {e}"))),
        };
        let table = ListingTable::try_new(config).map_err(|e| table_err(e.to_string()))?;
        if table.schema().fields().is_empty() {
            return Err(table_err(format!("{location} holds no Parquet files")));
        }
        self.ctx
            .register_table(name, Arc::new(table))
            .map_err(|e| table_err(e.to_string()))?;
        Ok(())
    }

    /// Registers a pipeline's data: `scored` and `dead_letter` (its sinks, when they exist)
    /// and `input` (its source, when it is a single path). Returns the names registered.
    pub async fn register_pipeline(&self, cfg: &PipelineConfig) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let sinks = [
            ("scored", cfg.sinks.scored.as_ref().map(|s| &s.path)),
            (
                "dead_letter",
                cfg.sinks.dead_letter.as_ref().map(|s| &s.path),
            ),
        ];
        for (name, path) in sinks {
            let Some(path) = path else { continue };
            // A pipeline that has not run yet (or wrote no dead letters) has no such table.
            if parquet_files(path).is_ok_and(|f| !f.is_empty()) {
                self.register(name, &path.display().to_string()).await?;
                names.push(name.to_string());
            }
        }
        if let [path] = cfg.source.paths.as_slice() {
            self.register("input", &path.display().to_string()).await?;
            names.push("input".to_string());
        }
        Ok(names)
    }

    /// Runs one or more `;`-separated statements; each statement's rows.
    pub async fn run(&self, sql: &str) -> Result<Vec<StatementResult>> {
        let statements = DFParser::parse_sql(sql)?;
        let state = self.ctx.state();
        let mut out = Vec::with_capacity(statements.len());
        for st in statements {
            let plan = state.statement_to_plan(st).await?;
            self.check_write(&plan)?;
            let df = self.ctx.execute_logical_plan(plan).await?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            let batches = df.collect().await?;
            out.push(StatementResult { schema, batches });
        }
        Ok(out)
    }

    /// Names of the registered tables (sorted).
    pub fn tables(&self) -> Vec<String> {
        let mut names = Vec::new();
        let catalog = self.ctx.catalog("datafusion").expect("default catalog");
        if let Some(schema) = catalog.schema("public") {
            names = schema.table_names();
        }
        names.sort();
        names
    }

    /// A registered table's schema.
    pub async fn table_schema(&self, name: &str) -> Result<SchemaRef> {
        let t = self.ctx.table_provider(name).await?;
        Ok(t.schema())
    }

    fn check_write(&self, plan: &LogicalPlan) -> Result<()> {
        if self.allow_write {
            return Ok(());
        }
        match plan {
            LogicalPlan::Dml(dml) => {
                Err(SqlError::ReadOnly(format!("{} {}", dml.op, dml.table_name)))
            }
            _ => Ok(()),
        }
    }
}
