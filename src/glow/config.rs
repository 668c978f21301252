//! Model configuration: the serde form stored in model files and pipeline configs, and the
//! validated runtime form ([`GlowShape`]) the layers are built from.

use serde::{Deserialize, Serialize};

use super::GlowError;

/// Architecture and preprocessing of a multi-scale Glow (`../shared/docs/method.md`).
///
/// Serialised as JSON inside model files and accepted as JSON or TOML from users.
/// Unknown keys are rejected so a typo never silently falls back to a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlowConfig {
    /// Image channels the model sees: 1 (grey) or 3 (RGB).
    pub in_channels: usize,
    /// Side of the square model input; a multiple of 2^scales.
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Number of scales L (>= 2); every scale but the last sends half its channels to an exit.
    pub scales: usize,
    /// Flow steps K per scale (ActNorm -> 1x1 conv -> affine coupling).
    pub steps: usize,
    /// Hidden channels of the coupling networks.
    pub hidden: usize,
    /// How raw images become model inputs.
    #[serde(default)]
    pub preprocess: PreprocessConfig,
    /// Distribution the exit latents are scored under. Omitted from the stored config while it
    /// is the default, so the ids of models written before this key existed do not change.
    #[serde(default, skip_serializing_if = "Prior::is_standard_normal")]
    pub prior: Prior,
}

/// The prior of the exit latents (after each exit ActNorm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prior {
    /// N(0, I): method.md's prior, and what glowwatch trains.
    #[default]
    StandardNormal,
    /// N(m, diag(exp(2 s))) with one fixed mean m_d and log-std s_d per exit dimension
    /// (`scale{k}.exit.prior_mean`, `scale{k}.exit.prior_logstd`, never trained): the
    /// `NClassIndependentDist` of the paper authors' code (one class), which their models carry
    /// and which `glowwatch model import-torch` maps.
    DiagonalGaussian,
}

impl Prior {
    /// Whether this is the default N(0, I).
    pub fn is_standard_normal(&self) -> bool {
        *self == Prior::StandardNormal
    }
}

fn default_image_size() -> usize {
    32
}

/// How decoded 8-bit images are mapped into the model's input space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreprocessConfig {
    /// How images whose size differs from `image_size` are brought to it.
    #[serde(default)]
    pub resize: ResizeMode,
    /// Dequantisation used when *scoring*; training always adds U[0, 1/256) noise.
    #[serde(default)]
    pub dequantization: Dequantization,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            resize: ResizeMode::Bilinear,
            dequantization: Dequantization::BinCentre,
        }
    }
}

/// Resize policy for inputs that are not `image_size` square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Bilinear resampling (28x28 -> 32x32 for MNIST-like data), rounded back to 8 bits so
    /// inputs stay on the 1/256 grid the likelihood is defined on.
    #[default]
    Bilinear,
    /// Zero-pad symmetrically (the paper authors' code for 28x28); larger inputs are an error.
    Pad,
    /// Inputs must already have the model's size.
    None,
}

/// Dequantisation offset applied at scoring time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dequantization {
    /// Add exactly 1/512 (the centre of each 1/256 bin): deterministic scores.
    #[default]
    BinCentre,
}

impl GlowConfig {
    /// The paper's configuration: L=3, K=32, 512 hidden channels, 32x32 input.
    pub fn paper(in_channels: usize) -> Self {
        Self {
            in_channels,
            image_size: 32,
            scales: 3,
            steps: 32,
            hidden: 512,
            preprocess: PreprocessConfig::default(),
            prior: Prior::StandardNormal,
        }
    }

    /// The small configuration used for CPU-trained models: L=3, K=8, 128 hidden channels.
    pub fn small(in_channels: usize) -> Self {
        Self {
            steps: 8,
            hidden: 128,
            ..Self::paper(in_channels)
        }
    }

    /// Parses a JSON or TOML config (TOML when the text does not start with `{`).
    pub fn parse(text: &str) -> Result<Self, GlowError> {
        let cfg: Self = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| GlowError::Config(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| GlowError::Config(e.to_string()))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants the layers rely on.
    pub fn validate(&self) -> Result<(), GlowError> {
        let bad = |m: String| Err(GlowError::Config(m));
        if self.in_channels != 1 && self.in_channels != 3 {
            return bad(format!(
                "in_channels must be 1 or 3, got {}",
                self.in_channels
            ));
        }
        if self.scales < 2 {
            return bad(format!("scales must be >= 2, got {}", self.scales));
        }
        if self.scales > 8 {
            return bad(format!("scales must be <= 8, got {}", self.scales));
        }
        if self.steps == 0 {
            return bad("steps must be >= 1".into());
        }
        if self.hidden == 0 {
            return bad("hidden must be >= 1".into());
        }
        let m = 1usize << self.scales;
        if self.image_size == 0 || !self.image_size.is_multiple_of(m) {
            return bad(format!(
                "image_size must be a positive multiple of 2^scales = {m}, got {}",
                self.image_size
            ));
        }
        Ok(())
    }

    /// Input dimensionality D = C*H*W.
    pub fn dims(&self) -> usize {
        self.in_channels * self.image_size * self.image_size
    }

    /// The runtime shapes of every scale.
    pub fn shape(&self) -> GlowShape {
        let mut scales = Vec::with_capacity(self.scales);
        let (mut c, mut s) = (self.in_channels, self.image_size);
        for k in 0..self.scales {
            c *= 4;
            s /= 2;
            let last = k + 1 == self.scales;
            let exit_channels = if last { c } else { c / 2 };
            scales.push(ScaleShape {
                channels: c,
                size: s,
                exit_channels,
            });
            c -= if last { 0 } else { exit_channels };
        }
        GlowShape { scales }
    }

    /// Multiply-add FLOPs (2 per MAC) of one forward pass of one image, convolutions and 1x1
    /// mixing only (the elementwise work is below 1%).
    pub fn flops_per_image(&self) -> f64 {
        let h = self.hidden as f64;
        self.shape()
            .scales
            .iter()
            .map(|sc| {
                let c = sc.channels as f64;
                let hw = (sc.size * sc.size) as f64;
                let per_step = 2.0 * c * c * hw            // invertible 1x1 conv
                    + 2.0 * 9.0 * (c / 2.0) * h * hw       // conv3x3 C/2 -> hidden
                    + 2.0 * h * h * hw                     // conv1x1 hidden -> hidden
                    + 2.0 * 9.0 * h * c * hw; // conv3x3 hidden -> C
                per_step * self.steps as f64
            })
            .sum()
    }
}

/// Shape of one scale after its squeeze.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleShape {
    /// Channels flowing through the steps of this scale.
    pub channels: usize,
    /// Spatial side at this scale.
    pub size: usize,
    /// Channels leaving at this scale's exit (half, or all at the last scale).
    pub exit_channels: usize,
}

impl ScaleShape {
    /// Number of latent dimensions D_k leaving at this scale's exit.
    pub fn exit_dims(&self) -> usize {
        self.exit_channels * self.size * self.size
    }
}

/// Runtime shapes of all scales, derived from a validated [`GlowConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlowShape {
    /// One entry per scale, first (finest) to last.
    pub scales: Vec<ScaleShape>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_config_has_the_published_size() {
        let cfg = GlowConfig::paper(3);
        let sh = cfg.shape();
        assert_eq!(sh.scales[0].channels, 12);
        assert_eq!(sh.scales[1].channels, 24);
        assert_eq!(sh.scales[2].channels, 48);
        let d: usize = sh.scales.iter().map(|s| s.exit_dims()).sum();
        assert_eq!(d, cfg.dims());
        // method.md: 8.0 GFLOP per 3x32x32 forward pass (8.04 with elementwise work).
        let g = cfg.flops_per_image() / 1e9;
        assert!((7.95..8.05).contains(&g), "{g}");
        assert!((6.3..6.5).contains(&(GlowConfig::paper(1).flops_per_image() / 1e9)));
    }

    #[test]
    fn parse_rejects_unknown_keys_and_bad_values() {
        let ok = r#"{"in_channels":1,"scales":3,"steps":2,"hidden":8}"#;
        assert_eq!(GlowConfig::parse(ok).unwrap().image_size, 32);
        let toml = "in_channels = 1\nscales = 2\nsteps = 2\nhidden = 8\nimage_size = 8\n[preprocess]\nresize = \"pad\"\n";
        assert_eq!(
            GlowConfig::parse(toml).unwrap().preprocess.resize,
            ResizeMode::Pad
        );
        let e = GlowConfig::parse(r#"{"in_channels":1,"scales":3,"steps":2,"hidden":8,"widht":3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("widht"), "{e}");
        let e = GlowConfig::parse(r#"{"in_channels":2,"scales":3,"steps":2,"hidden":8}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("in_channels"), "{e}");
        let e = GlowConfig::parse(
            r#"{"in_channels":1,"scales":3,"steps":2,"hidden":8,"image_size":20}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("multiple of 2^scales"), "{e}");
    }
}
