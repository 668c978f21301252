//! The anomaly scores: their definitions, what they are computed from, and their calibrated
//! thresholds. Below both [`crate::pipeline`] (which computes and flags them) and
//! [`crate::eval`] (which measures them); it imports neither.
//!
//! | score | formula (higher = more anomalous) | unit | needs | source |
//! |---|---|---|---|---|
//! | `nll` | `-log p_in(x)` | nats | in-distribution model | method.md |
//! | `scale_k` | `-lp_k,in(x)` | nats | " | method.md |
//! | `last_scale` | `-lp_{L-1},in(x)` | nats | " | method.md (second fix) |
//! | `llr` | `log p_gen(x) - log p_in(x)` | nats | + general model | method.md (first fix) |
//! | `llr_scale_k` | `lp_k,gen(x) - lp_k,in(x)` | nats | + general model | method.md |
//! | `complexity`, `complexity_<codec>` | `S = -log2 P_in(x) - L(x)`: `-log p_in(x)/ln 2 + 8D` minus the compressed size of the model-input pixels (zlib; zstd, lzma, png, webp) | bits | in-distribution model | Serra et al., ICLR 2020 |
//! | `complexity_cond` | `S(x) - mean S of the k = 20 reference inliers nearest in 8x8 layout` | bits | + complexity reference | [`reference`] |
//! | `combined` | `max((S_cond - m_1) / s_1, (llr - m_2) / s_2)`, medians m and 99th-percentile spreads s of the reference rows | - | + reference + general model | [`reference`] |
//!
//! Modules: [`kind`] (the score kinds and [`ImageScores`]), [`complexity`] (compressed sizes
//! and layouts), [`reference`] (the complexity reference), [`calibration`] (thresholds at a
//! target false-positive rate from in-distribution data only, and the file that holds them
//! with the reference).

pub mod calibration;
pub mod complexity;
pub mod drift;
pub mod kind;
pub mod reference;

pub use complexity::Compressor;
pub use kind::{ImageScores, ScoreKind};
pub use reference::ComplexityReference;
