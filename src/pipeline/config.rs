//! Pipeline configuration (`pipelines/*.toml`): source, decode limits, models, the flagged
//! score and its threshold, and sinks. Unknown keys and bad values are errors that name the
//! key; relative paths are resolved against the config file's directory, so a pipeline runs the
//! same from any working directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::decode::{DEFAULT_SHAPE_COLUMNS, DecodeLimits, ImageColumns, PixelFormat};
use super::{PipelineError, Result};
use crate::score::ScoreKind;

/// A whole pipeline.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Name used in logs and summaries.
    #[serde(default = "default_name")]
    pub name: String,
    /// Where records come from.
    pub source: SourceConfig,
    /// Decode limits.
    #[serde(default)]
    pub decode: DecodeConfig,
    /// Models and how to run them.
    pub models: ModelsConfig,
    /// Which score is flagged and at what threshold.
    pub flag: FlagConfig,
    /// Where scored and dead-letter records go.
    pub sinks: SinksConfig,
    /// Optional evaluation of a labelled run (the demo).
    #[serde(default)]
    pub summary: SummaryConfig,
    /// The dashboard and Prometheus `/metrics` endpoint of a running pipeline.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Drift alarms on the score distributions.
    #[serde(default)]
    pub drift: DriftConfigToml,
}

/// Drift alarms (`[drift]`): an online two-sample Cramér–von Mises test of each watched
/// score's live distribution against its calibration quantiles (`crate::score::drift`). On
/// whenever the calibration has quantiles; watched: the flagged score and each scale's
/// likelihood ratio (each scale's -lp without a general model).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfigToml {
    /// Off switch.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Window sizes (records).
    #[serde(default = "default_drift_windows")]
    pub windows: Vec<usize>,
    /// Expected run time between false alarms, in records.
    #[serde(default = "default_drift_ert")]
    pub ert: f64,
    /// Records between two checks.
    #[serde(default = "default_drift_stride")]
    pub stride: usize,
}

fn default_true() -> bool {
    true
}
fn default_drift_windows() -> Vec<usize> {
    vec![64, 256]
}
fn default_drift_ert() -> f64 {
    10_000.0
}
fn default_drift_stride() -> usize {
    16
}

impl Default for DriftConfigToml {
    fn default() -> Self {
        Self {
            enabled: true,
            windows: default_drift_windows(),
            ert: default_drift_ert(),
            stride: default_drift_stride(),
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve the dashboard (`/`) and Prometheus text (`/metrics`) on (e.g.
    /// `127.0.0.1:9898`; port 0: any free port, logged); none = no server.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
}

fn default_name() -> String {
    "pipeline".into()
}

/// Where records come from: Parquet files (`paths`) or Kafka topics (`[source.kafka]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `parquet` or `kafka`.
    pub kind: SourceKind,
    /// Parquet: files or directories (searched recursively for `*.parquet`).
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Kafka: brokers, group, topics, batching (see [`KafkaSourceConfig`]).
    #[serde(default)]
    pub kafka: Option<KafkaSourceConfig>,
    /// Column of the image: encoded bytes, or raw pixels when `pixels = "raw"`.
    #[serde(default = "default_image_column")]
    pub image_column: String,
    /// `encoded` (PNG/JPEG/... bytes, the default) or `raw` (8-bit pixels, row-major, channels
    /// interleaved, with the three shape columns below).
    #[serde(default)]
    pub pixels: PixelFormat,
    /// Raw pixels: the column holding each image's height.
    #[serde(default = "default_height_column")]
    pub height_column: String,
    /// Raw pixels: the column holding each image's width.
    #[serde(default = "default_width_column")]
    pub width_column: String,
    /// Raw pixels: the column holding each image's channel count (1, 2, 3 or 4).
    #[serde(default = "default_channels_column")]
    pub channels_column: String,
    /// Column of record ids.
    #[serde(default = "default_id_column")]
    pub id_column: String,
    /// Rows per pipeline batch (row groups are split into batches of at most this many rows).
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
}

impl SourceConfig {
    /// A Parquet source over `paths` with default batching.
    pub fn parquet(paths: Vec<PathBuf>, image: ImageColumns, id_column: &str) -> Self {
        let [height_column, width_column, channels_column] = image.shape;
        Self {
            kind: SourceKind::Parquet,
            paths,
            kafka: None,
            image_column: image.image,
            pixels: image.format,
            height_column,
            width_column,
            channels_column,
            id_column: id_column.to_string(),
            batch_rows: default_batch_rows(),
        }
    }

    /// Where the image of a record is and in what form.
    pub fn image_columns(&self) -> ImageColumns {
        ImageColumns {
            image: self.image_column.clone(),
            format: self.pixels,
            shape: [
                self.height_column.clone(),
                self.width_column.clone(),
                self.channels_column.clone(),
            ],
        }
    }
}

/// Kinds of source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Parquet files.
    Parquet,
    /// Kafka topics, consumed in a consumer group (runs until stopped).
    Kafka,
}

/// How Kafka message values carry the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageFormat {
    /// The value is the encoded image; the key is the record id; headers carry metadata.
    #[default]
    Image,
    /// The value is JSON `{"id", "image_b64", "content_type", "source", "capture_time"}` for
    /// producers that cannot set headers.
    JsonEnvelope,
}

/// A Kafka source: a consumer in a consumer group with manual, at-least-once commits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub brokers: String,
    /// Consumer group id.
    pub group: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Message layout.
    #[serde(default)]
    pub format: MessageFormat,
    /// A micro-batch is sent to decoding when it has this many records ...
    #[serde(default = "default_max_batch_rows")]
    pub max_batch_rows: usize,
    /// ... or when its first record has waited this long (low latency at low load).
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: u64,
    /// Commit durable offsets at most this often (and always on shutdown and revocation).
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// Where a group without committed offsets starts: `earliest` or `latest`.
    #[serde(default = "default_offset_reset")]
    pub offset_reset: String,
    /// On partition revocation, wait this long for in-flight batches of those partitions to
    /// become durable before giving them up (uncommitted records are redelivered).
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// When one micro-batch has waited this long for room in the decode queue (the scorer is
    /// stuck, not merely busy), pause the partitions and poll only to serve the group. Until
    /// then librdkafka's bounded prefetch queue holds back fetching. Pausing purges that queue
    /// and discards in-flight fetches, which costs a fetch round trip per resume, so it is kept
    /// for long stalls; it must stay below librdkafka's `max.poll.interval.ms` (300 s).
    #[serde(default = "default_pause_after_ms")]
    pub pause_after_ms: u64,
    /// Extra librdkafka settings passed through (security.protocol, sasl.*, ssl.*, ...).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

fn default_pause_after_ms() -> u64 {
    30_000
}
fn default_max_batch_rows() -> usize {
    256
}
fn default_max_wait_ms() -> u64 {
    200
}
fn default_commit_interval_ms() -> u64 {
    1000
}
fn default_offset_reset() -> String {
    "earliest".into()
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}

/// Scored records and dead letters to Kafka topics.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// `bootstrap.servers`; defaults to the Kafka source's.
    #[serde(default)]
    pub brokers: Option<String>,
    /// Topic of scored records (keyed by record id).
    #[serde(default)]
    pub scored_topic: Option<String>,
    /// `json` (one record per message, the default) or `arrow` (one Arrow IPC stream per
    /// micro-batch).
    #[serde(default)]
    pub format: ScoredFormat,
    /// Keep the image bytes in scored messages (off: scored messages carry scores and metadata).
    #[serde(default)]
    pub include_image: bool,
    /// Topic of dead letters: original bytes, with reason and coordinates in headers.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Topic of drift alarms: one JSON record when an alarm starts and one when it clears
    /// (keyed by the score's name).
    #[serde(default)]
    pub alarm_topic: Option<String>,
    /// Extra librdkafka producer settings.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

/// Encoding of scored Kafka messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoredFormat {
    /// One JSON object per record.
    #[default]
    Json,
    /// One Arrow IPC stream per micro-batch.
    Arrow,
}

fn default_image_column() -> String {
    "image".into()
}
fn default_height_column() -> String {
    DEFAULT_SHAPE_COLUMNS[0].into()
}
fn default_width_column() -> String {
    DEFAULT_SHAPE_COLUMNS[1].into()
}
fn default_channels_column() -> String {
    DEFAULT_SHAPE_COLUMNS[2].into()
}
fn default_id_column() -> String {
    "id".into()
}
fn default_batch_rows() -> usize {
    1024
}

/// Decode limits (see [`DecodeLimits`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// Largest encoded image in bytes.
    pub max_bytes: usize,
    /// Largest width or height.
    pub max_side: u32,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        let d = DecodeLimits::default();
        Self {
            max_bytes: d.max_bytes,
            max_side: d.max_side,
        }
    }
}

impl DecodeConfig {
    /// As decode limits.
    pub fn limits(&self) -> DecodeLimits {
        DecodeLimits {
            max_bytes: self.max_bytes,
            max_side: self.max_side,
            ..DecodeLimits::default()
        }
    }
}

/// Models.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// In-distribution model file (or use `registry`).
    #[serde(rename = "in", default)]
    pub in_model: PathBuf,
    /// A model registry directory (see [`crate::registry`]): its `current` version is scored,
    /// and a promoted version is picked up between batches without a restart.
    #[serde(default)]
    pub registry: Option<PathBuf>,
    /// General model file (for ratio scores).
    #[serde(default)]
    pub general: Option<PathBuf>,
    /// `auto`, `cpu` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Images per model call.
    #[serde(default = "default_model_batch")]
    pub batch: usize,
    /// `f32` (default), `tf32` (CUDA), `bf16` or `bf16-all`: see `glowwatch bench`.
    #[serde(default = "default_precision")]
    pub precision: String,
}

fn default_precision() -> String {
    "f32".into()
}

impl ModelsConfig {
    /// The parsed precision.
    pub fn precision(&self) -> Result<crate::glow::Precision> {
        self.precision
            .parse()
            .map_err(|e: String| PipelineError::Config(format!("models.precision: {e}")))
    }
}

fn default_device() -> String {
    "auto".into()
}
fn default_model_batch() -> usize {
    256
}

/// The flagged score and its threshold: from a calibration file or given directly.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlagConfig {
    /// Score name: nll, scale_K, last_scale, llr, llr_scale_K, complexity,
    /// complexity_<codec>, complexity_cond, combined ([`crate::score`]).
    pub score: ScoreKind,
    /// Calibration file written by `glowwatch calibrate`.
    #[serde(default)]
    pub calibration: Option<PathBuf>,
    /// A fixed threshold (instead of a calibration file).
    #[serde(default)]
    pub threshold: Option<f64>,
}

/// Sinks. A Parquet source needs both Parquet sinks; a Kafka source needs somewhere for scored
/// records and somewhere for dead letters (Parquet, Kafka topics or both).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    /// Scored records (Parquet).
    #[serde(default)]
    pub scored: Option<ParquetSinkConfig>,
    /// Records that could not be decoded (Parquet).
    #[serde(default)]
    pub dead_letter: Option<ParquetSinkConfig>,
    /// Kafka topics for scored records and dead letters.
    #[serde(default)]
    pub kafka: Option<KafkaSinkConfig>,
}

impl SinksConfig {
    /// Both Parquet sinks and no Kafka sink (the batch pipeline).
    pub fn parquet(scored: ParquetSinkConfig, dead_letter: ParquetSinkConfig) -> Self {
        Self {
            scored: Some(scored),
            dead_letter: Some(dead_letter),
            kafka: None,
        }
    }

    /// The scored Kafka topic, if any.
    pub fn scored_topic(&self) -> Option<&str> {
        self.kafka.as_ref().and_then(|k| k.scored_topic.as_deref())
    }

    /// The dead-letter Kafka topic, if any.
    pub fn dead_letter_topic(&self) -> Option<&str> {
        self.kafka
            .as_ref()
            .and_then(|k| k.dead_letter_topic.as_deref())
    }
}

/// A rolling Parquet sink.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetSinkConfig {
    /// Output directory.
    pub path: PathBuf,
    /// Hive-style partitioning of output files.
    #[serde(default)]
    pub partition: Partitioning,
    /// `zstd`, `snappy`, `lz4` or `none`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Rows per row group.
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    /// Start a new file after this many rows.
    #[serde(default = "default_max_file_rows")]
    pub max_file_rows: usize,
    /// Start a new file after about this many bytes.
    #[serde(default = "default_max_file_bytes")]
    pub max_file_bytes: usize,
    /// Start a new file after this many seconds.
    #[serde(default)]
    pub max_file_age_s: Option<f64>,
}

fn default_compression() -> String {
    "zstd".into()
}
fn default_row_group_rows() -> usize {
    8192
}
fn default_max_file_rows() -> usize {
    1_000_000
}
fn default_max_file_bytes() -> usize {
    256 << 20
}

impl ParquetSinkConfig {
    /// A sink writing unpartitioned files into `path` with the defaults of the config file.
    pub fn unpartitioned(path: PathBuf) -> Self {
        Self {
            path,
            partition: Partitioning::None,
            compression: default_compression(),
            row_group_rows: default_row_group_rows(),
            max_file_rows: default_max_file_rows(),
            max_file_bytes: default_max_file_bytes(),
            max_file_age_s: None,
        }
    }
}

/// Hive-style partition directories of a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Partitioning {
    /// All files in the sink directory.
    None,
    /// `date=YYYY-MM-DD/` by processing time (UTC).
    Date,
    /// `date=YYYY-MM-DD/hour=HH/` by processing time (UTC).
    #[default]
    DateHour,
}

/// Evaluation of a labelled run.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SummaryConfig {
    /// Boolean column that says which inputs are truly out of distribution; when present,
    /// the run summary reports the AUROC of the flagged score.
    #[serde(default)]
    pub truth_column: Option<String>,
}

impl PipelineConfig {
    /// Parses TOML text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let mut c: Self = toml::from_str(text).map_err(|e| PipelineError::Config(e.to_string()))?;
        c.resolve(base);
        c.validate()?;
        Ok(c)
    }

    /// Reads a pipeline file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| match e {
            PipelineError::Config(m) => PipelineError::Config(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    fn resolve(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.source.paths.iter_mut().for_each(fix);
        if !self.models.in_model.as_os_str().is_empty() {
            fix(&mut self.models.in_model);
        }
        if let Some(r) = &mut self.models.registry {
            fix(r);
        }
        if let Some(g) = &mut self.models.general {
            fix(g);
        }
        if let Some(c) = &mut self.flag.calibration {
            fix(c);
        }
        if let Some(s) = &mut self.sinks.scored {
            fix(&mut s.path);
        }
        if let Some(s) = &mut self.sinks.dead_letter {
            fix(&mut s.path);
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PipelineError::Config(m));
        match self.source.kind {
            SourceKind::Parquet => {
                if self.source.paths.is_empty() {
                    return bad("source.paths: at least one path is needed".into());
                }
                if self.source.kafka.is_some() {
                    return bad("source.kafka is for kind = \"kafka\"".into());
                }
                if self.sinks.scored.is_none() || self.sinks.dead_letter.is_none() {
                    return bad(
                        "sinks.scored and sinks.dead_letter (Parquet) are needed for a Parquet source"
                            .into(),
                    );
                }
                if self.sinks.kafka.is_some() {
                    return bad("sinks.kafka needs a Kafka source".into());
                }
            }
            SourceKind::Kafka => {
                let Some(k) = &self.source.kafka else {
                    return bad(
                        "source.kafka (brokers, group, topics) is needed for kind = \"kafka\""
                            .into(),
                    );
                };
                if !self.source.paths.is_empty() {
                    return bad("source.paths is for kind = \"parquet\"".into());
                }
                if k.topics.is_empty() {
                    return bad("source.kafka.topics: at least one topic is needed".into());
                }
                if k.max_batch_rows == 0 {
                    return bad("source.kafka.max_batch_rows must be at least 1".into());
                }
                let max_poll_ms = k
                    .options
                    .get("max.poll.interval.ms")
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(300_000);
                if k.pause_after_ms >= max_poll_ms {
                    return bad(format!(
                        "source.kafka.pause_after_ms ({}) must be below max.poll.interval.ms ({max_poll_ms}): \
                         the consumer does not poll while it waits that long",
                        k.pause_after_ms
                    ));
                }
                if !matches!(k.offset_reset.as_str(), "earliest" | "latest") {
                    return bad(format!(
                        "source.kafka.offset_reset: `{}` (earliest or latest)",
                        k.offset_reset
                    ));
                }
                if self.source.pixels != PixelFormat::Encoded {
                    return bad("source.pixels = \"raw\" is for Parquet sources; Kafka values are encoded images".into());
                }
                if self.sinks.scored.is_none() && self.sinks.scored_topic().is_none() {
                    return bad("scored records need a sink: sinks.scored (Parquet) or sinks.kafka.scored_topic".into());
                }
                if self.sinks.dead_letter.is_none() && self.sinks.dead_letter_topic().is_none() {
                    return bad("dead letters need a sink: sinks.dead_letter (Parquet) or sinks.kafka.dead_letter_topic".into());
                }
            }
        }
        if self.source.batch_rows == 0 {
            return bad("source.batch_rows must be at least 1".into());
        }
        self.models.precision()?;
        if self.models.batch == 0 {
            return bad("models.batch must be at least 1".into());
        }
        match (
            self.models.in_model.as_os_str().is_empty(),
            &self.models.registry,
        ) {
            (true, None) => {
                return bad("models: `in` (a model file) or `registry` (a model registry directory) is needed".into());
            }
            (false, Some(_)) => {
                return bad("models: give either `in` or `registry`, not both".into());
            }
            _ => {}
        }
        match (&self.flag.calibration, self.flag.threshold) {
            (Some(_), Some(_)) => {
                return bad("flag: give either `calibration` or `threshold`, not both".into());
            }
            // A registry version carries its own calibration.
            (None, None) if self.models.registry.is_some() => {}
            (None, None) => {
                return bad("flag: `calibration` (a file from `glowwatch calibrate`) or `threshold` is needed".into());
            }
            _ => {}
        }
        if self.flag.score.needs_general() && self.models.general.is_none() {
            return bad(format!(
                "flag.score = \"{}\" needs models.general",
                self.flag.score
            ));
        }
        if self.flag.score.needs_reference() && self.flag.threshold.is_some() {
            return bad(format!(
                "flag.score = \"{}\" needs the complexity reference of a calibration file: give `calibration`, not `threshold`",
                self.flag.score
            ));
        }
        for (name, s) in [
            ("sinks.scored", &self.sinks.scored),
            ("sinks.dead_letter", &self.sinks.dead_letter),
        ] {
            let Some(s) = s else { continue };
            super::sink::parquet::compression(&s.compression)
                .map_err(|e| PipelineError::Config(format!("{name}.compression: {e}")))?;
            if s.row_group_rows == 0 || s.max_file_rows == 0 {
                return bad(format!(
                    "{name}: row_group_rows and max_file_rows must be at least 1"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [source]
        kind = "parquet"
        paths = ["in"]
        [models]
        in = "m.safetensors"
        general = "/abs/g.safetensors"
        [flag]
        score = "llr"
        threshold = 1.5
        [sinks.scored]
        path = "out"
        [sinks.dead_letter]
        path = "dead"
        partition = "none"
    "#;

    #[test]
    fn parses_and_resolves_relative_paths() {
        let c = PipelineConfig::parse(GOOD, Path::new("/etc/p")).unwrap();
        assert_eq!(c.source.paths, vec![PathBuf::from("/etc/p/in")]);
        assert_eq!(c.models.general, Some(PathBuf::from("/abs/g.safetensors")));
        assert_eq!(c.flag.score, ScoreKind::Llr);
        assert_eq!(
            c.sinks.scored.as_ref().unwrap().partition,
            Partitioning::DateHour
        );
        assert_eq!(
            c.sinks.dead_letter.as_ref().unwrap().partition,
            Partitioning::None
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = |t: &str| {
            PipelineConfig::parse(t, Path::new("."))
                .unwrap_err()
                .to_string()
        };
        let e = err(&GOOD
            .replace("batch_rows", "x")
            .replace("kind = \"parquet\"", "kind = \"parquet\"\nbatch_row = 5"));
        assert!(e.contains("batch_row"), "{e}");
        let e = err(&GOOD.replace("\"llr\"", "\"lr\""));
        assert!(e.contains("unknown score `lr`"), "{e}");
        let e = err(&GOOD.replace("path = \"out\"", "path = \"out\"\ncompression = \"gzipp\""));
        assert!(e.contains("sinks.scored.compression"), "{e}");
        let e = err(&GOOD.replace("general = \"/abs/g.safetensors\"", ""));
        assert!(e.contains("needs models.general"), "{e}");
        let e = err(&GOOD.replace("threshold = 1.5", ""));
        assert!(e.contains("calibration"), "{e}");
    }

    const KAFKA: &str = r#"
        [source]
        kind = "kafka"
        [source.kafka]
        brokers = "127.0.0.1:9092"
        group = "g"
        topics = ["images"]
        [source.kafka.options]
        "security.protocol" = "SASL_PLAINTEXT"
        [models]
        in = "m.safetensors"
        [flag]
        score = "nll"
        threshold = 1.5
        [sinks.kafka]
        scored_topic = "scored"
        dead_letter_topic = "dead"
        [metrics]
        listen = "127.0.0.1:9898"
    "#;

    #[test]
    fn kafka_pipelines_parse_and_need_somewhere_to_write() {
        let c = PipelineConfig::parse(KAFKA, Path::new("/p")).unwrap();
        let k = c.source.kafka.as_ref().unwrap();
        assert_eq!((k.max_batch_rows, k.max_wait_ms), (256, 200));
        assert_eq!(k.format, MessageFormat::Image);
        assert_eq!(k.options["security.protocol"], "SASL_PLAINTEXT");
        assert_eq!(c.sinks.scored_topic(), Some("scored"));
        assert_eq!(c.sinks.kafka.as_ref().unwrap().format, ScoredFormat::Json);
        assert_eq!(c.metrics.listen.unwrap().port(), 9898);
        let err = |t: String| {
            PipelineConfig::parse(&t, Path::new("."))
                .unwrap_err()
                .to_string()
        };
        let e = err(KAFKA.replace("scored_topic = \"scored\"", ""));
        assert!(e.contains("scored records need a sink"), "{e}");
        let e = err(KAFKA.replace("dead_letter_topic = \"dead\"", ""));
        assert!(e.contains("dead letters need a sink"), "{e}");
        let e = err(KAFKA.replace("topics = [\"images\"]", "topics = []"));
        assert!(e.contains("at least one topic"), "{e}");
        let e = err(KAFKA.replace(
            "[source.kafka]\n",
            "[source.kafka]\noffset_reset = \"middle\"\n",
        ));
        assert!(e.contains("offset_reset"), "{e}");
        // The consumer does not poll while a batch waits for the scorer: pausing must come
        // before librdkafka's poll-interval limit expels it from the group.
        assert_eq!(k.pause_after_ms, 30_000);
        let e = err(KAFKA.replace(
            "\"security.protocol\" = \"SASL_PLAINTEXT\"",
            "\"max.poll.interval.ms\" = \"20000\"",
        ));
        assert!(e.contains("pause_after_ms (30000) must be below"), "{e}");
        // A Kafka sink needs a Kafka source; a Parquet source needs its Parquet sinks.
        let e = err(GOOD.to_string() + "[sinks.kafka]\nscored_topic = \"x\"\n");
        assert!(e.contains("sinks.kafka needs a Kafka source"), "{e}");
        let e = err(GOOD.replace("kind = \"parquet\"", "kind = \"kafka\""));
        assert!(e.contains("source.kafka"), "{e}");
    }
}
