//! Decode stage: encoded image bytes (PNG, JPEG) -> the model's channels and size as 8-bit
//! (C, S, S) pixels, in parallel across cores. A row that cannot be decoded never fails the
//! batch: it becomes a [`DecodeFailure`] with a machine-readable reason for the dead-letter
//! output (or, in training, the skipped-rows report).

use std::io::Cursor;

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, StringArray, TimestampMicrosecondArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use image::{ImageReader, Limits};
use rayon::prelude::*;

use super::{PipelineError, Result};
use crate::glow::config::GlowConfig;
use crate::glow::preprocess::image_to_pixels;

/// Bounds on what a single record may make the decoder do, so a hostile header (say
/// 50,000 x 50,000 pixels) is refused before any pixel memory is allocated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeLimits {
    /// Largest encoded size in bytes.
    pub max_bytes: usize,
    /// Largest width or height in pixels.
    pub max_side: u32,
    /// Largest allocation the decoder may make, in bytes.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_bytes: 32 << 20,
            max_side: 16_384,
            max_alloc: 256 << 20,
        }
    }
}

/// Why a record could not be turned into model input (the dead-letter `reason` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DecodeReason {
    /// The image value is null.
    Null,
    /// The image value has zero bytes.
    Empty,
    /// More bytes than [`DecodeLimits::max_bytes`].
    TooManyBytes,
    /// The header declares dimensions beyond the limits.
    TooLarge,
    /// The bytes are not an image format this build decodes.
    UnknownFormat,
    /// The format is known but the data is corrupt or truncated.
    Corrupt,
    /// The image cannot be brought to the model's size under its resize mode.
    WrongSize,
}

impl DecodeReason {
    /// Stable snake_case name, as written to dead-letter outputs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Empty => "empty",
            Self::TooManyBytes => "too_many_bytes",
            Self::TooLarge => "too_large",
            Self::UnknownFormat => "unknown_format",
            Self::Corrupt => "corrupt",
            Self::WrongSize => "wrong_size",
        }
    }
}

/// A record that could not be decoded: the reason and the decoder's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeFailure {
    /// Category of the failure.
    pub reason: DecodeReason,
    /// Human-readable detail (the decoder's error text).
    pub detail: String,
}

impl std::fmt::Display for DecodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

fn fail(reason: DecodeReason, detail: impl Into<String>) -> DecodeFailure {
    DecodeFailure {
        reason,
        detail: detail.into(),
    }
}

/// Decodes one encoded image to the model's (C, S, S) 8-bit pixels.
pub fn decode_image(
    bytes: &[u8],
    cfg: &GlowConfig,
    limits: &DecodeLimits,
) -> std::result::Result<Vec<u8>, DecodeFailure> {
    if bytes.is_empty() {
        return Err(fail(DecodeReason::Empty, "zero bytes"));
    }
    if bytes.len() > limits.max_bytes {
        return Err(fail(
            DecodeReason::TooManyBytes,
            format!("{} bytes > limit {}", bytes.len(), limits.max_bytes),
        ));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(DecodeReason::Corrupt, e.to_string()))?;
    if reader.format().is_none() {
        return Err(fail(
            DecodeReason::UnknownFormat,
            "not a PNG or JPEG (unrecognised signature)",
        ));
    }
    let mut reader = reader;
    let mut lim = Limits::default();
    lim.max_image_width = Some(limits.max_side);
    lim.max_image_height = Some(limits.max_side);
    lim.max_alloc = Some(limits.max_alloc);
    reader.limits(lim);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => fail(DecodeReason::TooLarge, e.to_string()),
        image::ImageError::Unsupported(_) => fail(DecodeReason::UnknownFormat, e.to_string()),
        _ => fail(DecodeReason::Corrupt, e.to_string()),
    })?;
    image_to_pixels(&img, cfg).map_err(|e| fail(DecodeReason::WrongSize, e.to_string()))
}

/// The byte values of a binary column (Binary, LargeBinary, BinaryView or FixedSizeBinary);
/// `None` for nulls.
pub fn binary_values(array: &ArrayRef) -> Result<Vec<Option<&[u8]>>> {
    let n = array.len();
    Ok(match array.data_type() {
        DataType::Binary => {
            let a = array.as_binary::<i32>();
            (0..n).map(|i| a.is_valid(i).then(|| a.value(i))).collect()
        }
        DataType::LargeBinary => {
            let a = array.as_binary::<i64>();
            (0..n).map(|i| a.is_valid(i).then(|| a.value(i))).collect()
        }
        DataType::BinaryView => {
            let a = array.as_binary_view();
            (0..n).map(|i| a.is_valid(i).then(|| a.value(i))).collect()
        }
        DataType::FixedSizeBinary(_) => {
            let a = array.as_fixed_size_binary();
            (0..n).map(|i| a.is_valid(i).then(|| a.value(i))).collect()
        }
        other => {
            return Err(PipelineError::Schema(format!(
                "image column has type {other}, expected a binary type (encoded PNG/JPEG bytes)"
            )));
        }
    })
}

/// Decodes every row of a binary image column in parallel; row `i` of the result is row `i`
/// of the input.
pub fn decode_array(
    array: &ArrayRef,
    cfg: &GlowConfig,
    limits: &DecodeLimits,
) -> Result<Vec<std::result::Result<Vec<u8>, DecodeFailure>>> {
    Ok(decode_values(&binary_values(array)?, cfg, limits))
}

/// Decodes already extracted byte values (nulls as `None`) in parallel, row for row.
pub fn decode_values(
    values: &[Option<&[u8]>],
    cfg: &GlowConfig,
    limits: &DecodeLimits,
) -> Vec<std::result::Result<Vec<u8>, DecodeFailure>> {
    values
        .par_iter()
        .map(|v| match v {
            None => Err(fail(DecodeReason::Null, "image is null")),
            Some(b) => decode_image(b, cfg, limits),
        })
        .collect()
}

/// Where a batch came from: its coordinates for dead-letter rows and reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOrigin {
    /// Source file (or topic/partition).
    pub source: String,
    /// Row group within the file, when the source has them.
    pub row_group: Option<u64>,
    /// Row number (within the file) of the batch's first row.
    pub first_row: u64,
}

/// A batch after decoding: the decodable input rows with their pixels, and dead-letter
/// records for the rest. Every input row is in exactly one of the two.
#[derive(Debug, Clone)]
pub struct DecodedBatch {
    /// Coordinates of the input batch.
    pub origin: BatchOrigin,
    /// Input rows that decoded (all input columns, in input order).
    pub rows: RecordBatch,
    /// Their (C, S, S) pixels, concatenated.
    pub pixels: Vec<u8>,
    /// Dead-letter records (schema [`crate::pipeline::schema::dead_letter_schema`]).
    pub dead: RecordBatch,
    /// Dead-letter reasons, one per dead row (for counting).
    pub reasons: Vec<DecodeReason>,
}

/// Decodes a batch of input records (columns `image_column` and optionally `id_column`),
/// splitting it into decodable rows and dead-letter records with reason, detail, coordinates
/// and the original bytes.
pub fn decode_batch(
    origin: BatchOrigin,
    batch: &RecordBatch,
    image_column: &str,
    id_column: &str,
    cfg: &GlowConfig,
    limits: &DecodeLimits,
    at: std::time::SystemTime,
) -> Result<DecodedBatch> {
    let images = batch
        .column_by_name(image_column)
        .ok_or_else(|| PipelineError::Schema(format!("input has no column `{image_column}`")))?;
    let bytes = binary_values(images)?;
    let decoded = decode_values(&bytes, cfg, limits);
    let ids: Option<Vec<Option<String>>> = match batch.column_by_name(id_column) {
        Some(a) => {
            let s = arrow::compute::cast(a, &DataType::Utf8)?;
            let s = s.as_string::<i32>();
            Some(
                (0..s.len())
                    .map(|i| s.is_valid(i).then(|| s.value(i).to_string()))
                    .collect(),
            )
        }
        None => None,
    };
    let mut ok_idx = Vec::new();
    let mut pixels = Vec::new();
    let (mut d_id, mut d_reason, mut d_detail, mut d_row, mut d_img) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut reasons = Vec::new();
    for (i, d) in decoded.into_iter().enumerate() {
        match d {
            Ok(px) => {
                ok_idx.push(i as u32);
                pixels.extend_from_slice(&px);
            }
            Err(f) => {
                d_id.push(ids.as_ref().and_then(|v| v[i].clone()));
                d_reason.push(f.reason.as_str());
                d_detail.push(f.detail);
                d_row.push(origin.first_row + i as u64);
                d_img.push(bytes[i]);
                reasons.push(f.reason);
            }
        }
    }
    let rows = arrow::compute::take_record_batch(batch, &UInt32Array::from(ok_idx))?;
    let n = d_id.len();
    let micros = at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let dead = RecordBatch::try_new(
        crate::pipeline::schema::dead_letter_schema(),
        vec![
            Arc::new(StringArray::from(d_id)),
            Arc::new(StringArray::from(d_reason)),
            Arc::new(StringArray::from(d_detail)),
            Arc::new(StringArray::from(vec![origin.source.as_str(); n])),
            Arc::new(UInt64Array::from(vec![origin.row_group; n])),
            Arc::new(UInt64Array::from(d_row)),
            Arc::new(BinaryArray::from(d_img)),
            Arc::new(TimestampMicrosecondArray::from(vec![micros; n]).with_timezone("UTC")),
        ],
    )?;
    Ok(DecodedBatch {
        origin,
        rows,
        pixels,
        dead,
        reasons,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, ImageFormat, Luma};

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = GrayImage::from_fn(w, h, |x, y| Luma([((x + y) * 4) as u8]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// A PNG whose IHDR declares `side` x `side` pixels (CRC fixed up), with no image data.
    fn huge_header_png(side: u32) -> Vec<u8> {
        let mut b = png(8, 8);
        b[16..20].copy_from_slice(&side.to_be_bytes());
        b[20..24].copy_from_slice(&side.to_be_bytes());
        let crc = crc32(&b[12..29]);
        b[29..33].copy_from_slice(&crc.to_be_bytes());
        b
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &byte in data {
            c ^= byte as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn good_and_bad_records_get_pixels_or_reasons() {
        let cfg = GlowConfig::small(1);
        let lim = DecodeLimits::default();
        let good = png(28, 28);
        assert_eq!(decode_image(&good, &cfg, &lim).unwrap().len(), 1024);
        let reason = |b: &[u8]| decode_image(b, &cfg, &lim).unwrap_err().reason;
        assert_eq!(reason(&[]), DecodeReason::Empty);
        assert_eq!(
            reason(b"definitely not an image"),
            DecodeReason::UnknownFormat
        );
        assert_eq!(reason(&good[..good.len() / 2]), DecodeReason::Corrupt);
        assert_eq!(reason(&huge_header_png(50_000)), DecodeReason::TooLarge);
        let small = DecodeLimits {
            max_bytes: 10,
            ..lim
        };
        assert_eq!(
            decode_image(&good, &cfg, &small).unwrap_err().reason,
            DecodeReason::TooManyBytes
        );
    }

    #[test]
    fn arrays_of_every_binary_type_decode_row_for_row() {
        use arrow::array::{BinaryArray, BinaryViewArray, LargeBinaryArray};
        use std::sync::Arc;
        let cfg = GlowConfig::small(1);
        let good = png(32, 32);
        let rows: Vec<Option<&[u8]>> = vec![Some(&good), None, Some(b"xx"), Some(&good)];
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(BinaryArray::from(rows.clone())),
            Arc::new(LargeBinaryArray::from(rows.clone())),
            Arc::new(BinaryViewArray::from(rows.clone())),
        ];
        for a in arrays {
            let out = decode_array(&a, &cfg, &DecodeLimits::default()).unwrap();
            assert!(out[0].is_ok() && out[3].is_ok());
            assert_eq!(out[1].as_ref().unwrap_err().reason, DecodeReason::Null);
            assert_eq!(
                out[2].as_ref().unwrap_err().reason,
                DecodeReason::UnknownFormat
            );
        }
        let ints: ArrayRef = Arc::new(arrow::array::Int32Array::from(vec![1]));
        assert!(decode_array(&ints, &cfg, &DecodeLimits::default()).is_err());
    }
}
