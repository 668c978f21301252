//! Input complexity: the lossless-compressed size L(x) of the image the model scores, and the
//! coarse layout of that image that conditional complexity is looked up by.
//!
//! Serra et al., "Input complexity and out-of-distribution detection with likelihood-based
//! generative models", ICLR 2020 (arXiv 1909.11480): a generic lossless compressor is a
//! universal model of images, so `S(x) = -log2 p(x) - L(x)` (bits) measures how much *worse*
//! the in-distribution model codes x than a model that knows nothing about the data set. Simple
//! images (digits, constant images) get high likelihood under every model and a small L(x);
//! the difference cancels that. The stronger the compressor the better the estimate (Serra); we
//! offer several well-kept codecs and measure them side by side (`glowwatch eval`).
//!
//! Every compressor runs on the model-input pixels (the 8-bit C x S x S image after resizing,
//! channel-major, exactly the grid the likelihood is defined on) with fixed settings, so a
//! given image always gets the same size and calibrated thresholds stay valid.

use std::io::Write;

use serde::{Deserialize, Serialize};

/// A lossless codec used as the complexity estimate L(x).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compressor {
    /// DEFLATE in a zlib stream, level 9, on the raw planar bytes (flate2). The default: the
    /// cheapest here and the best measured on our data (models/README.md).
    Zlib,
    /// Zstandard level 19 on the raw planar bytes (zstd, the reference C library).
    Zstd,
    /// LZMA (`.lzma` stream, preset 9 extreme, 4 KiB dictionary) on the raw planar bytes
    /// (liblzma). The dictionary never needs to exceed the image; a bigger one only costs
    /// set-up time.
    Lzma,
    /// PNG, best compression, adaptive filters (the `image` crate's encoder).
    Png,
    /// WebP lossless (the `image` crate's encoder, image-webp).
    Webp,
}

impl Compressor {
    /// Every compressor, in index order.
    pub const ALL: [Compressor; 5] = [
        Compressor::Zlib,
        Compressor::Zstd,
        Compressor::Lzma,
        Compressor::Png,
        Compressor::Webp,
    ];

    /// Number of compressors (the length of [`crate::score::ImageScores::input_bits`]).
    pub const COUNT: usize = 5;

    /// Position in [`Compressor::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case name (`zlib`, `zstd`, `lzma`, `png`, `webp`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Zlib => "zlib",
            Self::Zstd => "zstd",
            Self::Lzma => "lzma",
            Self::Png => "png",
            Self::Webp => "webp",
        }
    }

    /// The compressor of a name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == s)
    }

    /// L(x): the size in bits of `pixels` (one image, 8-bit, channel-major `channels x size x
    /// size`) compressed by this codec, container headers included (they are the same for
    /// every image of a size, so they shift S by a constant and never change a ranking).
    ///
    /// Errors: a pixel buffer of the wrong length, or a codec failure (named).
    pub fn compressed_bits(
        self,
        pixels: &[u8],
        channels: usize,
        size: usize,
    ) -> Result<f64, String> {
        if pixels.len() != channels * size * size || !matches!(channels, 1 | 3) {
            return Err(format!(
                "{}: {} bytes is not one {channels}x{size}x{size} image",
                self.name(),
                pixels.len()
            ));
        }
        let bytes = match self {
            Self::Zlib => {
                let mut e = flate2::write::ZlibEncoder::new(
                    Vec::with_capacity(pixels.len()),
                    flate2::Compression::best(),
                );
                e.write_all(pixels).map_err(|e| format!("zlib: {e}"))?;
                e.finish().map_err(|e| format!("zlib: {e}"))?.len()
            }
            Self::Zstd => zstd::bulk::compress(pixels, 19)
                .map_err(|e| format!("zstd: {e}"))?
                .len(),
            Self::Lzma => lzma_len(pixels)?,
            Self::Png | Self::Webp => self.image_codec_len(pixels, channels, size)?,
        };
        Ok(8.0 * bytes as f64)
    }

    fn image_codec_len(self, planar: &[u8], channels: usize, size: usize) -> Result<usize, String> {
        use image::ImageEncoder;
        let interleaved = interleave(planar, channels);
        let colour = if channels == 1 {
            image::ExtendedColorType::L8
        } else {
            image::ExtendedColorType::Rgb8
        };
        let mut out = Vec::new();
        let s = size as u32;
        let r = match self {
            Self::Png => image::codecs::png::PngEncoder::new_with_quality(
                &mut out,
                image::codecs::png::CompressionType::Best,
                image::codecs::png::FilterType::Adaptive,
            )
            .write_image(&interleaved, s, s, colour),
            _ => image::codecs::webp::WebPEncoder::new_lossless(&mut out).write_image(
                &interleaved,
                s,
                s,
                colour,
            ),
        };
        r.map_err(|e| format!("{}: {e}", self.name()))?;
        Ok(out.len())
    }
}

fn lzma_len(pixels: &[u8]) -> Result<usize, String> {
    use liblzma::stream::{Action, LzmaOptions, PRESET_EXTREME, Status, Stream};
    let mut opts = LzmaOptions::new_preset(9 | PRESET_EXTREME).map_err(|e| format!("lzma: {e}"))?;
    opts.dict_size(4096);
    let mut s = Stream::new_lzma_encoder(&opts).map_err(|e| format!("lzma: {e}"))?;
    let mut out = Vec::with_capacity(pixels.len() + 1024);
    loop {
        let done = s.total_in() as usize;
        match s
            .process_vec(&pixels[done..], &mut out, Action::Finish)
            .map_err(|e| format!("lzma: {e}"))?
        {
            Status::StreamEnd => return Ok(out.len()),
            _ => out.reserve(out.capacity().max(4096)),
        }
    }
}

/// Channel-major (C, S, S) -> pixel-interleaved (S, S, C).
fn interleave(planar: &[u8], channels: usize) -> Vec<u8> {
    if channels == 1 {
        return planar.to_vec();
    }
    let n = planar.len() / channels;
    (0..n)
        .flat_map(|i| (0..channels).map(move |c| planar[c * n + i]))
        .collect()
}

impl std::fmt::Display for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Coarse layout of one image: each channel averaged over `grid x grid` equal blocks
/// (rounded to 8 bits), channel-major, `channels * grid * grid` values. For the 32x32 inputs
/// of the shipped models and `grid = 8` these are 4x4-pixel blocks: where the ink is, not what
/// its strokes look like.
///
/// Errors: `size` not a multiple of `grid`, or a buffer of the wrong length.
pub fn layout(pixels: &[u8], channels: usize, size: usize, grid: usize) -> Result<Vec<u8>, String> {
    if grid == 0 || !size.is_multiple_of(grid) {
        return Err(format!(
            "layout: a {size}x{size} image cannot be split into {grid}x{grid} blocks"
        ));
    }
    if pixels.len() != channels * size * size {
        return Err(format!(
            "layout: {} bytes is not one {channels}x{size}x{size} image",
            pixels.len()
        ));
    }
    let b = size / grid;
    let mut out = Vec::with_capacity(channels * grid * grid);
    for c in 0..channels {
        let plane = &pixels[c * size * size..(c + 1) * size * size];
        for gy in 0..grid {
            for gx in 0..grid {
                let mut sum = 0u32;
                for y in gy * b..(gy + 1) * b {
                    sum += plane[y * size + gx * b..y * size + (gx + 1) * b]
                        .iter()
                        .map(|&v| v as u32)
                        .sum::<u32>();
                }
                let n = (b * b) as u32;
                out.push(((sum + n / 2) / n) as u8);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images_compress_far_below_noise_with_every_codec() {
        let flat = vec![17u8; 32 * 32];
        let mut state = 12345u32;
        let noise: Vec<u8> = (0..32 * 32)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (state >> 16) as u8
            })
            .collect();
        for c in Compressor::ALL {
            let a = c.compressed_bits(&flat, 1, 32).unwrap();
            let b = c.compressed_bits(&noise, 1, 32).unwrap();
            // Noise cannot go below 8 bits per pixel minus a little; a constant image takes
            // a few dozen bytes at most.
            assert!(a < 100.0 * 8.0, "{c}: constant image {a} bits");
            assert!(b > 7.5 * 1024.0, "{c}: noise {b} bits");
            // Deterministic: the same image always gets the same size.
            assert_eq!(c.compressed_bits(&noise, 1, 32).unwrap(), b);
            assert_eq!(Compressor::from_name(c.name()), Some(c));
        }
        let rgb = vec![200u8; 3 * 16 * 16];
        for c in Compressor::ALL {
            assert!(c.compressed_bits(&rgb, 3, 16).unwrap() > 0.0);
        }
        assert!(Compressor::Zlib.compressed_bits(&flat, 1, 31).is_err());
    }

    #[test]
    fn zlib_size_of_a_tiny_input_is_exact() {
        // A zlib stream of an empty input at level 9: 2-byte header, one empty final fixed
        // block (2 bytes: 0x03 0x00), 4-byte Adler-32 = 8 bytes (RFC 1950/1951).
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&[]).unwrap();
        assert_eq!(e.finish().unwrap().len(), 8);
        // One 1x1 grey pixel: header 2 + fixed-Huffman block with one literal and the end code
        // (3 + 8 + 7 bits = 18 bits -> 3 bytes) + Adler-32 4 = 9 bytes.
        assert_eq!(Compressor::Zlib.compressed_bits(&[0], 1, 1).unwrap(), 72.0);
    }

    #[test]
    fn layout_averages_blocks_per_channel() {
        // 4x4 image, grid 2: blocks of 2x2.
        #[rustfmt::skip]
        let px = [
            0, 2, 10, 10,
            4, 6, 10, 10,
            255, 255, 0, 0,
            255, 254, 0, 1,
        ];
        assert_eq!(layout(&px, 1, 4, 2).unwrap(), vec![3, 10, 255, 0]);
        let rgb: Vec<u8> = [1u8; 16]
            .iter()
            .chain(&[2u8; 16])
            .chain(&[3u8; 16])
            .copied()
            .collect();
        assert_eq!(
            layout(&rgb, 3, 4, 2).unwrap(),
            vec![1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
        );
        assert!(layout(&px, 1, 4, 3).is_err());
    }
}
