//! Training data: image Parquet files read through the pipeline's source and decode stages (one
//! implementation of decoding for training and scoring), streamed row group by row group
//! through a bounded shuffle buffer, so memory is bounded by the buffer and not the dataset.
//!
//! The order of an epoch is a pure function of (seed, epoch): row-group order is shuffled, then
//! rows pass through a shuffle buffer. A resumed run replays the epoch's order and skips the
//! batches already trained on, so it sees exactly the batches an uninterrupted run would.

use std::collections::BTreeMap;
use std::path::PathBuf;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::DataType;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::glow::config::GlowConfig;
use crate::pipeline::decode::{DecodeLimits, DecodeReason, ImageColumns, decode_rows};
use crate::pipeline::source::{ParquetSource, RowGroupRef};
use crate::pipeline::{PipelineError, Result};

/// Which rows of a source a reader yields: all, or one side of a stable split by id hash.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// Every row.
    All,
    /// Rows whose id hashes outside the held-out fraction.
    Train(f64),
    /// Rows whose id hashes inside the held-out fraction (the validation rows).
    Holdout(f64),
}

/// A stable pseudo-random number in [0, 1) from a record id (the split's hash).
pub fn id_unit(id: &str) -> f64 {
    (fnv1a(id.as_bytes()) >> 11) as f64 / (1u64 << 53) as f64
}

impl Split {
    fn keeps(self, id: &str) -> bool {
        let u = id_unit(id);
        match self {
            Split::All => true,
            Split::Train(f) => u >= f,
            Split::Holdout(f) => u < f,
        }
    }
}

fn fnv1a(b: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // Final avalanche (splitmix64) so nearby ids spread over the whole range.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Rows that could not be decoded: a count per reason and the first ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SkippedRows {
    /// Number of skipped rows by reason.
    pub by_reason: BTreeMap<&'static str, u64>,
    /// Ids of skipped rows (first [`SkippedRows::MAX_IDS`]).
    pub ids: Vec<String>,
}

impl SkippedRows {
    /// How many ids are kept for the report.
    pub const MAX_IDS: usize = 1000;

    /// Total skipped rows.
    pub fn total(&self) -> u64 {
        self.by_reason.values().sum()
    }

    fn add(&mut self, id: String, reason: DecodeReason) {
        *self.by_reason.entry(reason.as_str()).or_default() += 1;
        if self.ids.len() < Self::MAX_IDS {
            self.ids.push(id);
        }
    }
}

/// An image dataset on Parquet: files, the id and image columns, the model's input format.
#[derive(Debug, Clone)]
pub struct ImageDataset {
    source: ParquetSource,
    id_column: Option<String>,
    image: ImageColumns,
    config: GlowConfig,
    limits: DecodeLimits,
    split: Split,
}

/// A batch of decoded images, (C, S, S) 8-bit pixels each, concatenated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PixelBatch {
    /// n * C * S * S bytes.
    pub pixels: Vec<u8>,
    /// Record ids.
    pub ids: Vec<String>,
}

impl PixelBatch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl ImageDataset {
    /// Opens Parquet files/directories whose `image_column` holds encoded images; ids come from
    /// `id_column` when the files have it, else from `file#row`. Schema problems (missing image
    /// column, wrong type) are errors here, before any work.
    pub fn open(
        paths: &[PathBuf],
        image_column: &str,
        id_column: &str,
        config: &GlowConfig,
    ) -> Result<Self> {
        Self::open_columns(
            paths,
            &ImageColumns::encoded(image_column),
            id_column,
            config,
        )
    }

    /// [`ImageDataset::open`] for any image layout (encoded bytes or raw pixel columns).
    pub fn open_columns(
        paths: &[PathBuf],
        image: &ImageColumns,
        id_column: &str,
        config: &GlowConfig,
    ) -> Result<Self> {
        let source = ParquetSource::open(paths)?;
        image.check(source.schema())?;
        let id_column = source
            .schema()
            .index_of(id_column)
            .ok()
            .map(|_| id_column.to_string());
        Ok(Self {
            source,
            id_column,
            image: image.clone(),
            config: config.clone(),
            limits: DecodeLimits::default(),
            split: Split::All,
        })
    }

    /// The same files restricted to one side of a split.
    pub fn with_split(mut self, split: Split) -> Self {
        self.split = split;
        self
    }

    /// The underlying source.
    pub fn source(&self) -> &ParquetSource {
        &self.source
    }

    /// Rows in the files (before the split and before skipping undecodable rows).
    pub fn total_rows(&self) -> u64 {
        self.source.total_rows()
    }

    /// A short description for model cards: file names and row count.
    pub fn describe(&self) -> String {
        let names: Vec<String> = self
            .source
            .files()
            .iter()
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        format!("{} ({} rows)", names.join(", "), self.total_rows())
    }

    /// Decodes one row group: the kept rows' pixels and ids; undecodable rows go to `skipped`.
    pub fn decode_row_group(
        &self,
        rg: &RowGroupRef,
        skipped: &mut SkippedRows,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let mut cols = self.image.columns();
        if let Some(id) = &self.id_column {
            cols.push(id);
        }
        let batch = self.source.read(rg, &cols)?;
        // A projection keeps the file's column order, so look columns up by name.
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| PipelineError::Schema(format!("column `{name}` missing")))
        };
        let ids = match &self.id_column {
            Some(id) => id_strings(&column(id)?)?,
            None => (0..batch.num_rows())
                .map(|i| {
                    format!(
                        "{}#{}",
                        self.source.files()[rg.file].display(),
                        rg.first_row + i as u64
                    )
                })
                .collect(),
        };
        let decoded = decode_rows(&self.image.values(&batch)?, &self.config, &self.limits);
        let mut out = Vec::with_capacity(decoded.len());
        for (id, d) in ids.into_iter().zip(decoded) {
            if !self.split.keeps(&id) {
                continue;
            }
            match d {
                Ok(px) => out.push((id, px)),
                Err(f) => skipped.add(id, f.reason),
            }
        }
        Ok(out)
    }

    /// Reads up to `max` kept rows in file order (for validation sets).
    pub fn read_head(&self, max: usize, skipped: &mut SkippedRows) -> Result<PixelBatch> {
        let mut batch = PixelBatch {
            pixels: Vec::new(),
            ids: Vec::new(),
        };
        for rg in self.source.row_groups() {
            if batch.len() >= max {
                break;
            }
            for (id, px) in self.decode_row_group(rg, skipped)? {
                if batch.len() >= max {
                    break;
                }
                batch.ids.push(id);
                batch.pixels.extend_from_slice(&px);
            }
        }
        Ok(batch)
    }

    /// The batches of one epoch, in an order fixed by (seed, epoch); the last partial batch
    /// is dropped so every step sees `batch` images.
    pub fn epoch(
        &self,
        seed: u64,
        epoch: u64,
        batch: usize,
        shuffle_rows: usize,
    ) -> EpochReader<'_> {
        let mut rng = StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut order: Vec<RowGroupRef> = self.source.row_groups().to_vec();
        order.shuffle(&mut rng);
        EpochReader {
            data: self,
            order,
            next: 0,
            buffer: Vec::new(),
            rng,
            batch: batch.max(1),
            shuffle_rows: shuffle_rows.max(batch),
            skipped: SkippedRows::default(),
        }
    }
}

fn id_strings(a: &ArrayRef) -> Result<Vec<String>> {
    let n = a.len();
    let s = arrow::compute::cast(a, &DataType::Utf8)?;
    let s = s.as_string::<i32>();
    Ok((0..n)
        .map(|i| {
            if s.is_valid(i) {
                s.value(i).to_string()
            } else {
                format!("<null id, row {i}>")
            }
        })
        .collect())
}

/// Iterator over the batches of one epoch (see [`ImageDataset::epoch`]).
pub struct EpochReader<'a> {
    data: &'a ImageDataset,
    order: Vec<RowGroupRef>,
    next: usize,
    buffer: Vec<(String, Vec<u8>)>,
    rng: StdRng,
    batch: usize,
    shuffle_rows: usize,
    skipped: SkippedRows,
}

impl EpochReader<'_> {
    /// Rows skipped so far in this epoch because they could not be decoded.
    pub fn skipped(&self) -> &SkippedRows {
        &self.skipped
    }

    fn fill(&mut self) -> Result<()> {
        while self.buffer.len() < self.shuffle_rows && self.next < self.order.len() {
            let rg = self.order[self.next];
            self.next += 1;
            let rows = self.data.decode_row_group(&rg, &mut self.skipped)?;
            self.buffer.extend(rows);
        }
        Ok(())
    }
}

impl Iterator for EpochReader<'_> {
    type Item = Result<PixelBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Err(e) = self.fill() {
            return Some(Err(e));
        }
        if self.buffer.len() < self.batch {
            return None;
        }
        let mut out = PixelBatch {
            pixels: Vec::with_capacity(self.batch * self.data.config.dims()),
            ids: Vec::with_capacity(self.batch),
        };
        for _ in 0..self.batch {
            let i = self.rng.random_range(0..self.buffer.len());
            let (id, px) = self.buffer.swap_remove(i);
            out.ids.push(id);
            out.pixels.extend_from_slice(&px);
        }
        Some(Ok(out))
    }
}

/// Training-time augmentation of 8-bit (C, S, S) images (method.md: translations up to +-10 %
/// with zero fill; horizontal flips for natural images only).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Largest shift as a fraction of the side (0.1 = +-10 %).
    pub translate: f64,
    /// Random horizontal flips.
    pub flip: bool,
}

impl Augment {
    /// Shifts (and maybe flips) every image of `pixels` in place, `c` channels of `s` x `s`.
    pub fn apply(&self, pixels: &mut [u8], c: usize, s: usize, rng: &mut impl Rng) {
        let max = (self.translate * s as f64).round() as i64;
        let per = c * s * s;
        let mut tmp = vec![0u8; per];
        for img in pixels.chunks_mut(per) {
            let (dx, dy) = if max > 0 {
                (rng.random_range(-max..=max), rng.random_range(-max..=max))
            } else {
                (0, 0)
            };
            let flip = self.flip && rng.random_bool(0.5);
            if dx == 0 && dy == 0 && !flip {
                continue;
            }
            tmp.fill(0);
            for ch in 0..c {
                for y in 0..s as i64 {
                    let sy = y - dy;
                    if !(0..s as i64).contains(&sy) {
                        continue;
                    }
                    for x in 0..s as i64 {
                        let mut sx = x - dx;
                        if !(0..s as i64).contains(&sx) {
                            continue;
                        }
                        if flip {
                            sx = s as i64 - 1 - sx;
                        }
                        tmp[ch * s * s + (y as usize) * s + x as usize] =
                            img[ch * s * s + (sy as usize) * s + sx as usize];
                    }
                }
            }
            img.copy_from_slice(&tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sides_are_disjoint_and_sized() {
        let ids: Vec<String> = (0..20_000).map(|i| format!("row-{i}")).collect();
        let hold = ids.iter().filter(|i| Split::Holdout(0.1).keeps(i)).count();
        let train = ids.iter().filter(|i| Split::Train(0.1).keeps(i)).count();
        assert_eq!(hold + train, ids.len());
        assert!((1700..2300).contains(&hold), "holdout {hold}");
    }

    #[test]
    fn translation_moves_pixels_and_fills_zero() {
        let s = 4;
        let mut px: Vec<u8> = (1..=16).collect();
        let aug = Augment {
            translate: 0.25,
            flip: false,
        };
        let mut rng = StdRng::seed_from_u64(3);
        let orig = px.clone();
        aug.apply(&mut px, 1, s, &mut rng);
        // Every nonzero output pixel is some input pixel, and the multiset shrinks only by
        // pixels shifted out (replaced by zeros).
        assert!(px.iter().all(|v| *v == 0 || orig.contains(v)));
        let kept = px.iter().filter(|v| **v != 0).count();
        assert!(kept >= 9, "a shift of at most 1 keeps at least 3x3 pixels");
        let flip = Augment {
            translate: 0.0,
            flip: true,
        };
        let mut seen_flip = false;
        for _ in 0..10 {
            let mut p = orig.clone();
            flip.apply(&mut p, 1, s, &mut rng);
            if p != orig {
                assert_eq!(&p[..4], &[4, 3, 2, 1]);
                seen_flip = true;
            }
        }
        assert!(seen_flip);
    }
}
