//! Pipeline configuration (`pipelines/*.toml`): source, decode limits, models, the flagged
//! score and its threshold, and sinks. Unknown keys and bad values are errors that name the
//! key; relative paths are resolved against the config file's directory, so a pipeline runs the
//! same from any working directory.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::decode::{DEFAULT_SHAPE_COLUMNS, DecodeLimits, ImageColumns, PixelFormat};
use super::score::ScoreKind;
use super::{PipelineError, Result};

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
}

fn default_name() -> String {
    "pipeline".into()
}

/// Parquet source.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `parquet` (Kafka arrives with the streaming issue).
    pub kind: SourceKind,
    /// Files or directories (searched recursively for `*.parquet`).
    pub paths: Vec<PathBuf>,
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
    /// In-distribution model file.
    #[serde(rename = "in")]
    pub in_model: PathBuf,
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
    pub fn precision(&self) -> Result<crate::bench::Precision> {
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
    /// Score name: nll, scale_K, last_scale, llr, llr_scale_K.
    pub score: ScoreKind,
    /// Calibration file written by `glowwatch calibrate`.
    #[serde(default)]
    pub calibration: Option<PathBuf>,
    /// A fixed threshold (instead of a calibration file).
    #[serde(default)]
    pub threshold: Option<f64>,
}

/// Sinks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    /// Scored records.
    pub scored: ParquetSinkConfig,
    /// Records that could not be decoded.
    pub dead_letter: ParquetSinkConfig,
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
        fix(&mut self.models.in_model);
        if let Some(g) = &mut self.models.general {
            fix(g);
        }
        if let Some(c) = &mut self.flag.calibration {
            fix(c);
        }
        fix(&mut self.sinks.scored.path);
        fix(&mut self.sinks.dead_letter.path);
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PipelineError::Config(m));
        if self.source.paths.is_empty() {
            return bad("source.paths: at least one path is needed".into());
        }
        if self.source.batch_rows == 0 {
            return bad("source.batch_rows must be at least 1".into());
        }
        self.models.precision()?;
        if self.models.batch == 0 {
            return bad("models.batch must be at least 1".into());
        }
        match (&self.flag.calibration, self.flag.threshold) {
            (Some(_), Some(_)) => {
                return bad("flag: give either `calibration` or `threshold`, not both".into());
            }
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
        for (name, s) in [
            ("sinks.scored", &self.sinks.scored),
            ("sinks.dead_letter", &self.sinks.dead_letter),
        ] {
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
        assert_eq!(c.sinks.scored.partition, Partitioning::DateHour);
        assert_eq!(c.sinks.dead_letter.partition, Partitioning::None);
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
}
