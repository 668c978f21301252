//! Decode stage: encoded image bytes (PNG, JPEG) or raw 8-bit pixel columns -> the model's
//! channels and size as 8-bit (C, S, S) pixels, in parallel across cores. A row that cannot be decoded never fails the
//! batch: it becomes a [`DecodeFailure`] with a machine-readable reason for the dead-letter
//! output (or, in training, the skipped-rows report).

use std::io::Cursor;

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, StringArray, TimestampMicrosecondArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::{DataType, Int64Type, Schema, UInt8Type};
use arrow::record_batch::RecordBatch;
use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageReader, Limits};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

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
    /// The format is known but the data is corrupt.
    Corrupt,
    /// The image data ends before the image is complete (a file cut short).
    Truncated,
    /// A valid image in a variant this build does not decode (e.g. arithmetic-coded JPEG).
    Unsupported,
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
            Self::Truncated => "truncated",
            Self::Unsupported => "unsupported",
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
    let img = decode_upright(bytes, limits)?;
    image_to_pixels(&img, cfg).map_err(|e| fail(DecodeReason::WrongSize, e.to_string()))
}

/// Decodes one encoded image as a viewer shows it: its EXIF orientation (JPEG APP1, PNG eXIf,
/// WebP EXIF; all eight values) applied, so a picture stored turned with an orientation tag is
/// scored upright.
///
/// Errors: a [`DecodeFailure`] whose reason says what is wrong.
pub fn decode_upright(
    bytes: &[u8],
    limits: &DecodeLimits,
) -> std::result::Result<DynamicImage, DecodeFailure> {
    if bytes.is_empty() {
        return Err(fail(DecodeReason::Empty, "zero bytes"));
    }
    if bytes.len() > limits.max_bytes {
        return Err(fail(
            DecodeReason::TooManyBytes,
            format!("{} bytes > limit {}", bytes.len(), limits.max_bytes),
        ));
    }
    let format = image::guess_format(bytes).ok();
    if format.is_none() {
        return Err(fail(
            DecodeReason::UnknownFormat,
            "not a PNG, JPEG or WebP image (unrecognised signature)",
        ));
    }
    match format {
        Some(image::ImageFormat::Jpeg) => {
            if let Some(what) = jpeg::unsupported(bytes) {
                return Err(fail(DecodeReason::Unsupported, what));
            }
            if !bytes.ends_with(&[0xFF, 0xD9]) {
                return jpeg::missing_end_marker(bytes, |b| decode_any(b, limits));
            }
        }
        Some(image::ImageFormat::Png) if !bytes.ends_with(&PNG_IEND) => {
            // All image data there, only the end chunk missing: decoded, as libpng does; data
            // cut short fails the zlib stream's checks and is `truncated`.
            return decode_any(&[bytes, &PNG_IEND[..]].concat(), limits).map_err(|e| {
                if e.reason != DecodeReason::Corrupt {
                    return e; // e.g. a header beyond the limits: that is what is wrong
                }
                fail(
                    DecodeReason::Truncated,
                    format!(
                        "PNG data ends before the image is complete ({} bytes, no IEND chunk): {}",
                        bytes.len(),
                        e.detail
                    ),
                )
            });
        }
        Some(image::ImageFormat::WebP) => {
            // RIFF header: bytes 4..8 give the file's length minus 8.
            let declared = bytes
                .get(4..8)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize + 8);
            if let Some(declared) = declared.filter(|&d| d > bytes.len()) {
                return Err(fail(
                    DecodeReason::Truncated,
                    format!(
                        "WebP data ends before the image is complete ({} of {declared} bytes)",
                        bytes.len()
                    ),
                ));
            }
        }
        _ => {}
    }
    decode_any(bytes, limits)
}

/// The IEND chunk that ends every PNG: length 0, type, CRC.
const PNG_IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];

/// Decodes a PNG, JPEG or WebP with `image` under the limits, EXIF orientation applied.
fn decode_any(
    bytes: &[u8],
    limits: &DecodeLimits,
) -> std::result::Result<DynamicImage, DecodeFailure> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(DecodeReason::Corrupt, e.to_string()))?;
    let mut lim = Limits::default();
    lim.max_image_width = Some(limits.max_side);
    lim.max_image_height = Some(limits.max_side);
    lim.max_alloc = Some(limits.max_alloc);
    reader.limits(lim.clone());
    let image_error = |e: image::ImageError| match e {
        image::ImageError::Limits(_) => fail(DecodeReason::TooLarge, e.to_string()),
        image::ImageError::Unsupported(_) => fail(DecodeReason::Unsupported, e.to_string()),
        _ => fail(DecodeReason::Corrupt, e.to_string()),
    };
    let mut decoder = reader.into_decoder().map_err(image_error)?;
    // `into_decoder` applies the size limits but not the allocation limit: check it here.
    lim.reserve(decoder.total_bytes()).map_err(image_error)?;
    // An unreadable EXIF block is not a reason to lose the image: it is shown unturned.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(image_error)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// The JPEG policy for truncated data and unsupported variants (README, "Truncated and
/// unsupported images").
mod jpeg {
    use super::{DecodeFailure, DecodeReason, fail};

    const EOI: [u8; 2] = [0xFF, 0xD9];

    /// What the probe of [`missing_end_marker`] puts between the data and the end-of-image
    /// marker: bytes that are not a marker (0x55 = 0101...).
    const PROBE: [u8; 256] = [0x55; 256];

    /// The policy for a JPEG without its end-of-image marker: when all of its scan data is
    /// there, libjpeg decodes it to the full file's pixels, and so do we (`Ok(image)`, decoded
    /// with the marker put back); when data is missing it is an error `truncated` (a file cut
    /// short is never scored as if whole). `decode` is the ordinary decoder.
    ///
    /// Whether data is missing is probed, since the decoder fills missing blocks with grey
    /// silently: a complete scan ignores anything after its last block, while a cut scan goes
    /// on decoding whatever follows. So the file is decoded twice, with the marker appended
    /// right after the data and after 256 non-marker bytes: equal pixels mean complete. Costs a
    /// second decode of such files only. A progressive file cut exactly between two scans
    /// passes, as it does in libjpeg: its image is complete at a lower refinement.
    pub fn missing_end_marker<T: PartialEq>(
        bytes: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, DecodeFailure>,
    ) -> Result<T, DecodeFailure> {
        let with_marker = [bytes, &EOI[..]].concat();
        let probe = [bytes, &PROBE[..], &EOI[..]].concat();
        let truncated = |detail: String| {
            fail(
                DecodeReason::Truncated,
                format!(
                    "JPEG data ends before the image is complete ({} bytes, no end-of-image \
                     marker){detail}",
                    bytes.len()
                ),
            )
        };
        let image = decode(&with_marker).map_err(|e| truncated(format!(": {}", e.detail)))?;
        match decode(&probe) {
            Ok(other) if other == image => Ok(image),
            _ => Err(truncated(String::new())),
        }
    }

    /// Names a JPEG variant the decoder cannot read (found in the frame header before the
    /// first scan): arithmetic coding, lossless, hierarchical, or more than 8 bits per sample.
    pub fn unsupported(bytes: &[u8]) -> Option<String> {
        let mut i = 2; // after SOI
        while i + 4 <= bytes.len() {
            if bytes[i] != 0xFF {
                return None; // not at a marker: leave it to the decoder
            }
            let marker = bytes[i + 1];
            if marker == 0xFF {
                i += 1; // fill byte
                continue;
            }
            if marker == 0xDA {
                return None; // start of scan: every frame header has been seen
            }
            let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
            let what = match marker {
                0xC3 => Some("lossless JPEG (SOF3)"),
                0xC5..=0xC7 => Some("hierarchical JPEG (SOF5-7)"),
                0xC9..=0xCB | 0xCD..=0xCF => Some("arithmetic-coded JPEG (SOF9-11/13-15)"),
                0xCC => Some("arithmetic-coded JPEG (DAC segment)"),
                _ => None,
            };
            if let Some(what) = what {
                return Some(format!(
                    "{what}: not supported by this build's JPEG decoder"
                ));
            }
            if matches!(marker, 0xC0..=0xC2) && bytes.get(i + 4).is_some_and(|&p| p != 8) {
                return Some(format!(
                    "{}-bit JPEG: only 8 bits per sample are supported",
                    bytes[i + 4]
                ));
            }
            i += 2 + len;
        }
        None
    }
}

/// Turns raw 8-bit pixels (row-major, `channels` interleaved: 1 grey, 2 grey+alpha, 3 RGB,
/// 4 RGBA) into the model's (C, S, S) pixels, with the same conversion and resize as decoded
/// images.
pub fn decode_raw(
    bytes: &[u8],
    shape: RawShape,
    cfg: &GlowConfig,
    limits: &DecodeLimits,
) -> std::result::Result<Vec<u8>, DecodeFailure> {
    let RawShape {
        height,
        width,
        channels,
    } = shape;
    if bytes.is_empty() {
        return Err(fail(DecodeReason::Empty, "zero bytes"));
    }
    if bytes.len() > limits.max_bytes {
        return Err(fail(
            DecodeReason::TooManyBytes,
            format!("{} bytes > limit {}", bytes.len(), limits.max_bytes),
        ));
    }
    let side = |v: i64, what: &str| -> std::result::Result<u32, DecodeFailure> {
        if v <= 0 {
            return Err(fail(DecodeReason::WrongSize, format!("{what} is {v}")));
        }
        if v > limits.max_side as i64 {
            return Err(fail(
                DecodeReason::TooLarge,
                format!("{what} {v} > limit {}", limits.max_side),
            ));
        }
        Ok(v as u32)
    };
    let (h, w) = (side(height, "height")?, side(width, "width")?);
    if !(1..=4).contains(&channels) {
        return Err(fail(
            DecodeReason::WrongSize,
            format!("channels is {channels}, expected 1, 2, 3 or 4"),
        ));
    }
    let expected = h as u64 * w as u64 * channels as u64;
    if bytes.len() as u64 != expected {
        return Err(fail(
            DecodeReason::WrongSize,
            format!(
                "{} bytes, but height x width x channels = {height} x {width} x {channels} = {expected}",
                bytes.len()
            ),
        ));
    }
    let v = bytes.to_vec();
    let img = match channels {
        1 => ImageBuffer::from_raw(w, h, v).map(DynamicImage::ImageLuma8),
        2 => ImageBuffer::from_raw(w, h, v).map(DynamicImage::ImageLumaA8),
        3 => ImageBuffer::from_raw(w, h, v).map(DynamicImage::ImageRgb8),
        _ => ImageBuffer::from_raw(w, h, v).map(DynamicImage::ImageRgba8),
    }
    .expect("length checked above");
    image_to_pixels(&img, cfg).map_err(|e| fail(DecodeReason::WrongSize, e.to_string()))
}

/// Height, width and channel count of a raw pixel record (as stored; checked by [`decode_raw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawShape {
    /// Rows of pixels.
    pub height: i64,
    /// Pixels per row.
    pub width: i64,
    /// Interleaved channels per pixel.
    pub channels: i64,
}

/// How records store their image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PixelFormat {
    /// Encoded image files (PNG, JPEG, ...) in a binary column.
    #[default]
    Encoded,
    /// Raw 8-bit pixels (binary or list<uint8>, row-major, channels interleaved) with integer
    /// height, width and channels columns.
    Raw,
}

/// Which columns hold a record's image, and in what form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageColumns {
    /// The image column: encoded bytes, or raw pixels.
    pub image: String,
    /// Encoded or raw.
    pub format: PixelFormat,
    /// Raw only: the height, width and channels columns (any integer type).
    pub shape: [String; 3],
}

/// Default names of the raw-pixel shape columns.
pub const DEFAULT_SHAPE_COLUMNS: [&str; 3] = ["height", "width", "channels"];

/// One record's image as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageValue<'a> {
    /// No image (null value).
    Null,
    /// Encoded image bytes.
    Encoded(&'a [u8]),
    /// Raw pixels; `None` in the shape when one of its columns is null.
    Raw(&'a [u8], Option<RawShape>),
}

impl ImageValue<'_> {
    /// The stored bytes (for dead-letter records).
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Self::Null => None,
            Self::Encoded(b) | Self::Raw(b, _) => Some(b),
        }
    }
}

impl ImageColumns {
    /// Encoded images in `image`.
    pub fn encoded(image: &str) -> Self {
        Self {
            image: image.to_string(),
            format: PixelFormat::Encoded,
            shape: DEFAULT_SHAPE_COLUMNS.map(String::from),
        }
    }

    /// Raw pixels in `image` with shape columns `[height, width, channels]`.
    pub fn raw(image: &str, shape: [&str; 3]) -> Self {
        Self {
            image: image.to_string(),
            format: PixelFormat::Raw,
            shape: shape.map(String::from),
        }
    }

    /// Every column a decoder needs.
    pub fn columns(&self) -> Vec<&str> {
        let mut c = vec![self.image.as_str()];
        if self.format == PixelFormat::Raw {
            c.extend(self.shape.iter().map(String::as_str));
        }
        c
    }

    /// Refuses a schema without these columns or with the wrong types, naming the column, so
    /// bad input fails before any work.
    pub fn check(&self, schema: &Schema) -> Result<()> {
        let field = |name: &str| {
            schema.field_with_name(name).map_err(|_| {
                PipelineError::Schema(format!(
                    "input has no column `{name}` (columns: {})",
                    schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
        };
        let ty = field(&self.image)?.data_type();
        if !is_byte_column(ty) {
            let want = match self.format {
                PixelFormat::Encoded => "binary (encoded PNG/JPEG bytes)",
                PixelFormat::Raw => "binary or list<uint8> (raw pixels)",
            };
            return Err(PipelineError::Schema(format!(
                "column `{}` has type {ty}, expected {want}",
                self.image
            )));
        }
        if self.format == PixelFormat::Raw {
            for name in &self.shape {
                let ty = field(name)?.data_type();
                if !ty.is_integer() {
                    return Err(PipelineError::Schema(format!(
                        "raw-pixel shape column `{name}` has type {ty}, expected an integer type"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Each row's image as stored (columns looked up by name).
    pub fn values<'a>(&self, batch: &'a RecordBatch) -> Result<Vec<ImageValue<'a>>> {
        self.check(batch.schema_ref())?;
        let column = |name: &str| batch.column_by_name(name).expect("checked");
        let bytes = binary_values(column(&self.image))?;
        Ok(match self.format {
            PixelFormat::Encoded => bytes
                .into_iter()
                .map(|b| b.map_or(ImageValue::Null, ImageValue::Encoded))
                .collect(),
            PixelFormat::Raw => {
                let dims = self
                    .shape
                    .iter()
                    .map(|name| Ok(arrow::compute::cast(column(name), &DataType::Int64)?))
                    .collect::<Result<Vec<ArrayRef>>>()?;
                let dims: Vec<_> = dims.iter().map(|d| d.as_primitive::<Int64Type>()).collect();
                bytes
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| match b {
                        None => ImageValue::Null,
                        Some(b) => {
                            let shape = dims.iter().all(|d| d.is_valid(i)).then(|| RawShape {
                                height: dims[0].value(i),
                                width: dims[1].value(i),
                                channels: dims[2].value(i),
                            });
                            ImageValue::Raw(b, shape)
                        }
                    })
                    .collect()
            }
        })
    }
}

/// Decodes one stored image to the model's (C, S, S) 8-bit pixels.
pub fn decode_value(
    value: &ImageValue,
    cfg: &GlowConfig,
    limits: &DecodeLimits,
) -> std::result::Result<Vec<u8>, DecodeFailure> {
    match value {
        ImageValue::Null => Err(fail(DecodeReason::Null, "image is null")),
        ImageValue::Encoded(b) => decode_image(b, cfg, limits),
        ImageValue::Raw(_, None) => Err(fail(
            DecodeReason::Null,
            "a height, width or channels value is null",
        )),
        ImageValue::Raw(b, Some(shape)) => decode_raw(b, *shape, cfg, limits),
    }
}

/// Decodes every record of a batch in parallel; row `i` of the result is row `i` of the batch.
pub fn decode_rows(
    values: &[ImageValue],
    cfg: &GlowConfig,
    limits: &DecodeLimits,
) -> Vec<std::result::Result<Vec<u8>, DecodeFailure>> {
    values
        .par_iter()
        .map(|v| decode_value(v, cfg, limits))
        .collect()
}

/// Whether a column type can hold an image's bytes: binary types and lists of uint8, their
/// dictionary-encoded forms, and the Hugging Face `datasets` image struct `{bytes, path}`.
pub fn is_byte_column(ty: &DataType) -> bool {
    match ty {
        DataType::Dictionary(_, values) => is_byte_column(values),
        DataType::Struct(fields) => fields
            .iter()
            .any(|f| f.name() == "bytes" && is_byte_column(f.data_type())),
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => true,
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            f.data_type() == &DataType::UInt8
        }
        _ => false,
    }
}

/// The byte values of a byte column (Binary, LargeBinary, BinaryView, FixedSizeBinary, or a
/// List / LargeList / FixedSizeList of uint8, whose null elements read as 0; any of these
/// dictionary-encoded; or the `bytes` field of a Hugging Face image struct `{bytes, path}`);
/// `None` for nulls (a struct whose `bytes` is null, e.g. an image stored by path only, too).
pub fn binary_values(array: &ArrayRef) -> Result<Vec<Option<&[u8]>>> {
    let n = array.len();
    Ok(match array.data_type() {
        DataType::Dictionary(_, _) => {
            let dict = array.as_any_dictionary();
            let values = binary_values(dict.values())?;
            dict.normalized_keys()
                .into_iter()
                .enumerate()
                .map(|(i, k)| {
                    if array.is_valid(i) {
                        values.get(k).copied().flatten()
                    } else {
                        None
                    }
                })
                .collect()
        }
        DataType::Struct(_) => {
            let st = array.as_struct();
            let bytes = st
                .column_by_name("bytes")
                .ok_or_else(|| PipelineError::Schema("image struct has no `bytes` field".into()))?;
            binary_values(bytes)?
                .into_iter()
                .enumerate()
                .map(|(i, b)| if st.is_valid(i) { b } else { None })
                .collect()
        }
        DataType::List(f) if f.data_type() == &DataType::UInt8 => {
            list_bytes(array.as_list::<i32>())
        }
        DataType::LargeList(f) if f.data_type() == &DataType::UInt8 => {
            list_bytes(array.as_list::<i64>())
        }
        DataType::FixedSizeList(f, len) if f.data_type() == &DataType::UInt8 => {
            let a = array.as_fixed_size_list();
            let child = a.values().as_primitive::<UInt8Type>().values();
            let len = *len as usize;
            (0..n)
                .map(|i| {
                    a.is_valid(i).then(|| {
                        let start = a.value_offset(i) as usize;
                        &child[start..start + len]
                    })
                })
                .collect()
        }
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
                "image column has type {other}, expected binary or list<uint8>"
            )));
        }
    })
}

/// Each row's slice of a list<uint8> column's child values; `None` for nulls.
fn list_bytes<O: arrow::array::OffsetSizeTrait>(
    a: &arrow::array::GenericListArray<O>,
) -> Vec<Option<&[u8]>> {
    let child = a.values().as_primitive::<UInt8Type>().values();
    let off = a.value_offsets();
    (0..a.len())
        .map(|i| {
            a.is_valid(i)
                .then(|| &child[off[i].as_usize()..off[i + 1].as_usize()])
        })
        .collect()
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

/// The (id, encoded image) pairs of a batch with `id` (any type castable to text) and `image`
/// (any binary type) columns; rows with a null id or image are left out.
pub fn id_image_rows(batch: &RecordBatch) -> Result<Vec<(String, Vec<u8>)>> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| PipelineError::Schema(format!("no `{name}` column")))
    };
    let ids = arrow::compute::cast(col("id")?, &DataType::Utf8)?;
    let ids = ids.as_string::<i32>();
    let img = arrow::compute::cast(col("image")?, &DataType::Binary)
        .map_err(|e| PipelineError::Schema(format!("`image` must be binary: {e}")))?;
    let img = img.as_binary::<i32>();
    Ok((0..batch.num_rows())
        .filter(|&i| ids.is_valid(i) && img.is_valid(i))
        .map(|i| (ids.value(i).to_string(), img.value(i).to_vec()))
        .collect())
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

/// Decodes a batch of input records (the image columns and optionally `id_column`),
/// splitting it into decodable rows and dead-letter records with reason, detail, coordinates
/// and the original bytes.
pub fn decode_batch(
    origin: BatchOrigin,
    batch: &RecordBatch,
    image: &ImageColumns,
    id_column: &str,
    cfg: &GlowConfig,
    limits: &DecodeLimits,
    at: std::time::SystemTime,
) -> Result<DecodedBatch> {
    let values = image.values(batch)?;
    let decoded = decode_rows(&values, cfg, limits);
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
                d_img.push(values[i].bytes());
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
        assert_eq!(reason(&good[..good.len() / 2]), DecodeReason::Truncated);
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

    #[test]
    fn raw_pixels_match_the_decoded_png_and_bad_shapes_get_reasons() {
        let cfg = GlowConfig::small(1);
        let lim = DecodeLimits::default();
        let img = GrayImage::from_fn(28, 28, |x, y| Luma([((x * 9 + y) % 256) as u8]));
        let mut enc = Cursor::new(Vec::new());
        img.write_to(&mut enc, ImageFormat::Png).unwrap();
        let shape = |height, width, channels| RawShape {
            height,
            width,
            channels,
        };
        let from_png = decode_image(enc.get_ref(), &cfg, &lim).unwrap();
        assert_eq!(
            decode_raw(img.as_raw(), shape(28, 28, 1), &cfg, &lim).unwrap(),
            from_png
        );
        let reason = |b: &[u8], s| decode_raw(b, s, &cfg, &lim).unwrap_err().reason;
        assert_eq!(
            reason(img.as_raw(), shape(28, 27, 1)),
            DecodeReason::WrongSize
        );
        assert_eq!(
            reason(img.as_raw(), shape(28, 28, 5)),
            DecodeReason::WrongSize
        );
        assert_eq!(
            reason(img.as_raw(), shape(0, 28, 1)),
            DecodeReason::WrongSize
        );
        assert_eq!(
            reason(img.as_raw(), shape(-3, 28, 1)),
            DecodeReason::WrongSize
        );
        assert_eq!(
            reason(img.as_raw(), shape(50_000, 50_000, 1)),
            DecodeReason::TooLarge
        );
        assert_eq!(reason(&[], shape(28, 28, 1)), DecodeReason::Empty);
        let v = ImageValue::Raw(img.as_raw(), None);
        assert_eq!(
            decode_value(&v, &cfg, &lim).unwrap_err().reason,
            DecodeReason::Null
        );
    }

    #[test]
    fn list_of_uint8_columns_give_each_rows_bytes() {
        use arrow::array::{FixedSizeListArray, ListArray, UInt8Array};
        use arrow::datatypes::{Field, UInt8Type};
        let rows = vec![
            Some(vec![Some(1u8), Some(2), Some(3)]),
            None,
            Some(vec![Some(4), Some(5), Some(6)]),
        ];
        let list: ArrayRef = Arc::new(ListArray::from_iter_primitive::<UInt8Type, _, _>(
            rows.clone(),
        ));
        // A slice, so offsets into the child values are exercised.
        let sliced = list.slice(1, 2);
        let got = binary_values(&sliced).unwrap();
        assert_eq!(got, vec![None, Some(&[4u8, 5, 6][..])]);
        let fixed: ArrayRef = Arc::new(FixedSizeListArray::new(
            Arc::new(Field::new("item", DataType::UInt8, true)),
            3,
            Arc::new(UInt8Array::from(vec![1u8, 2, 3, 0, 0, 0, 4, 5, 6])),
            Some(vec![true, false, true].into()),
        ));
        let sliced = fixed.slice(1, 2);
        let got = binary_values(&sliced).unwrap();
        assert_eq!(got, vec![None, Some(&[4u8, 5, 6][..])]);
        assert!(is_byte_column(list.data_type()));
        assert!(!is_byte_column(&DataType::List(Arc::new(Field::new(
            "item",
            DataType::Int32,
            true
        )))));
    }
}
