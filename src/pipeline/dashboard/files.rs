//! A board fed from a pipeline's output files (`glowwatch dashboard --pipeline P`): its scored
//! and dead-letter Parquet files, read in run order (file names start with the run's UTC time),
//! new ones picked up as they appear. Thumbnails are the image column decoded again to the
//! model's input; drift is checked again over the scores read, with the pipeline's detectors.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::TimestampMicrosecondType;

use super::board::{Board, ScoredRows};
use crate::pipeline::config::PipelineConfig;
use crate::pipeline::decode::{BatchOrigin, decode_batch};
use crate::pipeline::drift::DriftMonitor;
use crate::pipeline::flag::{Flag, Status};
use crate::pipeline::score::{ModelScorer, scores_from_scored};
use crate::pipeline::sink::parquet::is_own_file;
use crate::pipeline::source::ParquetSource;
use crate::pipeline::{PipelineError, Result};

/// Reads a pipeline's output into a board.
pub struct FileFeed {
    cfg: PipelineConfig,
    model: crate::glow::config::GlowConfig,
    seen: HashSet<PathBuf>,
    drift: Option<DriftMonitor>,
}

/// The sink's finished files under `dir` (none when it does not exist yet), in run order;
/// `_`-prefixed and hidden folders (a `glowwatch score` output's `_dead_letter`) are skipped.
fn finished_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let (p, name) = (e.path(), e.file_name().to_string_lossy().into_owned());
            if p.is_dir() {
                // As the pipeline's own listing: `_dead_letter` and hidden folders are not data.
                if !name.starts_with(['_', '.']) {
                    stack.push(p);
                }
            } else if is_own_file(&name) {
                out.push(p);
            }
        }
    }
    // part-<run time>-<pid>-<seq>.parquet: the name orders runs and files within a run.
    out.sort_by(|a, b| (a.file_name(), a).cmp(&(b.file_name(), b)));
    out
}

fn micros(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(t.max(0) as u64)
}

impl FileFeed {
    /// A feed of `cfg`'s outputs, scored by models like `scorer`'s, with `drift` re-checked.
    pub fn new(cfg: &PipelineConfig, scorer: &ModelScorer, drift: Option<DriftMonitor>) -> Self {
        Self {
            cfg: cfg.clone(),
            model: scorer.config().clone(),
            seen: HashSet::new(),
            drift,
        }
    }

    /// Reads the files that appeared since the last call; returns how many.
    ///
    /// Errors: a file cannot be read, or is not scored / dead-letter output.
    pub fn poll(&mut self, board: &Board) -> Result<usize> {
        let mut n = 0;
        if let Some(s) = &self.cfg.sinks.dead_letter {
            for f in finished_files(&s.path) {
                if self.seen.insert(f.clone()) {
                    self.read_dead(&f, board)?;
                    n += 1;
                }
            }
        }
        if let Some(s) = &self.cfg.sinks.scored {
            for f in finished_files(&s.path) {
                if self.seen.insert(f.clone()) {
                    self.read_scored(&f, board)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn read_dead(&self, f: &Path, board: &Board) -> Result<()> {
        let src = ParquetSource::open(&[f.to_path_buf()])?;
        for rg in src.row_groups() {
            let b = src.read(rg, &["reason", "failed_at"])?;
            let at = b
                .column(1)
                .as_primitive_opt::<TimestampMicrosecondType>()
                .and_then(|t| t.iter().flatten().max())
                .map_or_else(SystemTime::now, micros);
            board.dead_letters(b.column(0).as_string::<i32>().iter().flatten(), at);
        }
        Ok(())
    }

    fn read_scored(&mut self, f: &Path, board: &Board) -> Result<()> {
        let src = ParquetSource::open(&[f.to_path_buf()])?;
        let cols: Vec<String> = src
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let cols: Vec<&str> = cols.iter().map(String::as_str).collect();
        for rg in src.row_groups() {
            let b = src.read(rg, &cols)?;
            let times = b
                .column_by_name("scored_at")
                .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>())
                .ok_or_else(|| {
                    PipelineError::Schema(format!("{}: no scored_at column", f.display()))
                })?
                .clone();
            // Rows scored together share a time: feed them as the batches they were.
            let mut start = 0;
            while start < b.num_rows() {
                let t = times.value(start);
                let mut end = start + 1;
                while end < b.num_rows() && times.value(end) == t {
                    end += 1;
                }
                self.feed(&b.slice(start, end - start), micros(t), f, rg.index, board)?;
                start = end;
            }
        }
        Ok(())
    }

    fn feed(
        &mut self,
        b: &RecordBatch,
        at: SystemTime,
        f: &Path,
        rg: usize,
        board: &Board,
    ) -> Result<()> {
        let scores = scores_from_scored(b, self.model.scales, self.model.dims())?;
        let (Some(score), Some(is_ood)) = (b.column_by_name("score"), b.column_by_name("is_ood"))
        else {
            return Err(PipelineError::Schema(format!(
                "{}: not scored output (no score / is_ood)",
                f.display()
            )));
        };
        let score = score.as_primitive::<arrow::datatypes::Float64Type>();
        let is_ood = is_ood.as_boolean();
        let status = b
            .column_by_name("status")
            .map(|c| c.as_string::<i32>().clone());
        let flags: Vec<Flag> = (0..b.num_rows())
            .map(|i| Flag {
                score: score.value(i),
                is_ood: is_ood.value(i),
                status: match &status {
                    Some(s) if s.is_valid(i) && s.value(i) == "non_finite" => Status::NonFinite,
                    _ => Status::Ok,
                },
            })
            .collect();
        // The rows decoded once; decoding them again gives the model-input pixels.
        let image = self.cfg.source.image_columns();
        let pixels = decode_batch(
            BatchOrigin {
                source: f.display().to_string(),
                row_group: Some(rg as u64),
                first_row: 0,
            },
            b,
            &image,
            &self.cfg.source.id_column,
            &self.model,
            &self.cfg.decode.limits(),
            at,
        )
        .ok()
        .filter(|d| d.rows.num_rows() == b.num_rows())
        .map(|d| d.pixels)
        .unwrap_or_default();
        let id = b
            .column_by_name(&self.cfg.source.id_column)
            .or_else(|| b.column_by_name("id"))
            .cloned()
            .unwrap_or_else(|| {
                arrow::array::new_null_array(&arrow::datatypes::DataType::Utf8, b.num_rows())
            });
        let versions = b
            .column_by_name("model_version")
            .map(|c| c.as_string::<i32>().clone());
        board.observe(ScoredRows {
            ids: &id,
            scores: &scores,
            flags: &flags,
            versions: versions.as_ref(),
            pixels: &pixels,
            at,
        });
        if let Some(m) = &mut self.drift {
            let events = m.observe(&scores);
            board.drift(m.status(), &events, at);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the sink's finished files, in run order across partition folders; temporary files,
    /// foreign files, `_dead_letter` and hidden folders are left out.
    #[test]
    fn finished_files_are_the_sinks_own_in_run_order() {
        let d = tempfile::tempdir().unwrap();
        let touch = |p: &str| {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        };
        for p in [
            "date=2/part-20261130T090000-1-00001.parquet",
            "date=1/part-20261130T080000-1-00002.parquet",
            "date=1/part-20261130T080000-1-00001.parquet",
            "date=1/.part-20261130T100000-1-00001.parquet.tmp",
            "_dead_letter/part-20261130T080000-1-00001.parquet",
            ".hidden/part-20261130T070000-1-00001.parquet",
            "notes.parquet",
        ] {
            touch(p);
        }
        let got: Vec<String> = finished_files(d.path())
            .iter()
            .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            got,
            [
                "date=1/part-20261130T080000-1-00001.parquet",
                "date=1/part-20261130T080000-1-00002.parquet",
                "date=2/part-20261130T090000-1-00001.parquet",
            ]
        );
    }
}
