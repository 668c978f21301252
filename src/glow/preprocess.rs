//! Pixel preprocessing shared by scoring and training: decoded 8-bit images -> the model's
//! channel count and size -> `x = k/256 - 0.5` plus dequantisation.

use candle_core::{Device, Tensor};
use image::{DynamicImage, imageops::FilterType};

use super::config::{GlowConfig, ResizeMode};
use super::{GlowError, Result};

/// Offset added to `k/256 - 0.5` when scoring: the centre of each 1/256 bin.
pub const BIN_CENTRE: f64 = 1.0 / 512.0;

/// Converts a decoded image to the model's channels (grey or RGB) and size, returning the
/// 8-bit pixels in channel-major (C, S, S) order.
///
/// Bilinear resizing happens in 8 bits (rounded), so inputs stay on the 1/256 grid that the
/// discrete likelihood and bits/dim are defined on.
pub fn image_to_pixels(img: &DynamicImage, cfg: &GlowConfig) -> Result<Vec<u8>> {
    let s = cfg.image_size as u32;
    let (w, h) = (img.width(), img.height());
    let planar = |buf: &[u8], c: usize| -> Vec<u8> {
        let n = buf.len() / c;
        (0..c)
            .flat_map(|ch| (0..n).map(move |i| (ch, i)))
            .map(|(ch, i)| buf[i * c + ch])
            .collect()
    };
    let c = cfg.in_channels;
    let raw: Vec<u8> = match cfg.preprocess.resize {
        _ if (w, h) == (s, s) => to_channels(img, c),
        ResizeMode::Bilinear => to_channels(&img.resize_exact(s, s, FilterType::Triangle), c),
        ResizeMode::Pad if w <= s && h <= s => {
            let src = to_channels(img, c);
            let mut out = vec![0u8; (s * s) as usize * c];
            let (ox, oy) = ((s - w) / 2, (s - h) / 2);
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..c {
                        let from = ((y * w + x) as usize) * c + ch;
                        let to = (((y + oy) * s + x + ox) as usize) * c + ch;
                        out[to] = src[from];
                    }
                }
            }
            out
        }
        mode => {
            return Err(GlowError::Input(format!(
                "image is {w}x{h}, the model takes {s}x{s} and resize mode {mode:?} cannot bring it there"
            )));
        }
    };
    Ok(planar(&raw, c))
}

fn to_channels(img: &DynamicImage, c: usize) -> Vec<u8> {
    if c == 1 {
        img.to_luma8().into_raw()
    } else {
        img.to_rgb8().into_raw()
    }
}

/// Stacks `n` images of 8-bit (C, S, S) pixels into an (N, C, S, S) f32 tensor at
/// `k/256 - 0.5 + offset` (offset [`BIN_CENTRE`] for scoring).
pub fn pixels_to_tensor(
    pixels: &[u8],
    cfg: &GlowConfig,
    offset: f64,
    device: &Device,
) -> Result<Tensor> {
    let per = cfg.dims();
    if per == 0 || !pixels.len().is_multiple_of(per) {
        return Err(GlowError::Input(format!(
            "{} bytes is not a whole number of {}x{}x{} images",
            pixels.len(),
            cfg.in_channels,
            cfg.image_size,
            cfg.image_size
        )));
    }
    let n = pixels.len() / per;
    let v: Vec<f32> = pixels
        .iter()
        .map(|&k| (k as f64 / 256.0 - 0.5 + offset) as f32)
        .collect();
    Ok(Tensor::from_vec(
        v,
        (n, cfg.in_channels, cfg.image_size, cfg.image_size),
        device,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    #[test]
    fn grey_28_is_resized_to_32_on_the_8bit_grid() {
        let cfg = GlowConfig::small(1);
        let img =
            DynamicImage::ImageLuma8(GrayImage::from_fn(28, 28, |x, _| Luma([(x * 9) as u8])));
        let px = image_to_pixels(&img, &cfg).unwrap();
        assert_eq!(px.len(), 32 * 32);
        // Bilinear keeps a horizontal ramp monotone and within the source range.
        assert!(px[..32].windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(px[0], 0);
        assert!(px[31] >= 230);
        let t = pixels_to_tensor(&px, &cfg, BIN_CENTRE, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 1, 32, 32]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - (-0.5 + 1.0 / 512.0)).abs() < 1e-7);
    }

    #[test]
    fn pad_mode_centres_and_refuses_larger_images() {
        let mut cfg = GlowConfig::small(1);
        cfg.preprocess.resize = ResizeMode::Pad;
        let img = DynamicImage::ImageLuma8(GrayImage::from_pixel(28, 28, Luma([200])));
        let px = image_to_pixels(&img, &cfg).unwrap();
        assert_eq!(px[0], 0);
        assert_eq!(px[2 * 32 + 2], 200);
        assert_eq!(px[29 * 32 + 29], 200);
        assert_eq!(px[30 * 32 + 30], 0);
        let big = DynamicImage::ImageLuma8(GrayImage::new(40, 40));
        assert!(image_to_pixels(&big, &cfg).is_err());
    }

    #[test]
    fn rgb_is_channel_major() {
        let cfg = GlowConfig::small(3);
        let img =
            DynamicImage::ImageRgb8(image::RgbImage::from_pixel(32, 32, image::Rgb([1, 2, 3])));
        let px = image_to_pixels(&img, &cfg).unwrap();
        assert_eq!((px[0], px[1024], px[2048]), (1, 2, 3));
    }
}
