//! Hostile input at scale: property-based fuzzing (proptest, stable Rust) of the decode stage,
//! the model-file loader and the torch importer. Every input — arbitrary bytes, or a valid seed
//! file with bytes replaced, inserted or cut off — must give a result or a clear error, never a
//! panic. Cases per target: `GLOWWATCH_FUZZ_CASES` (default 2,000, what CI runs: a few seconds); a longer run is
//! `GLOWWATCH_FUZZ_CASES=20000 cargo test --release --test fuzz`. A failure is shrunk to a
//! minimal input and saved under `proptest-regressions/` (commit it: it is then replayed
//! first on every run), and becomes a named regression test.

mod common;

use std::sync::OnceLock;

use candle_core::Device;
use glowwatch::glow::GlowModel;
use glowwatch::glow::config::GlowConfig;
use glowwatch::pipeline::decode::{DecodeLimits, ImageValue, RawShape, decode_value};
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("GLOWWATCH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Valid images of every format and layout the decoder meets (built once per run).
fn image_seeds() -> &'static [Vec<u8>] {
    static SEEDS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SEEDS.get_or_init(build_image_seeds)
}

fn build_image_seeds() -> Vec<Vec<u8>> {
    let mut seeds = vec![];
    let grey = image::GrayImage::from_fn(20, 12, |x, y| image::Luma([(x * 12 + y * 3) as u8]));
    let rgba = image::RgbaImage::from_fn(9, 7, |x, y| {
        image::Rgba([x as u8 * 20, y as u8 * 30, 99, 200])
    });
    for (img, format) in [
        (
            image::DynamicImage::ImageLuma8(grey.clone()),
            image::ImageFormat::Png,
        ),
        (
            image::DynamicImage::ImageRgba8(rgba.clone()),
            image::ImageFormat::Png,
        ),
        (
            image::DynamicImage::ImageLuma8(grey),
            image::ImageFormat::Jpeg,
        ),
        (
            image::DynamicImage::ImageRgba8(rgba.clone())
                .to_rgb8()
                .into(),
            image::ImageFormat::Jpeg,
        ),
        (
            image::DynamicImage::ImageRgba8(rgba),
            image::ImageFormat::WebP,
        ),
    ] {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, format).unwrap();
        seeds.push(out.into_inner());
    }
    for f in ["arithmetic.jpg", "arithmetic-progressive.jpg"] {
        seeds.push(std::fs::read(common::repo("tests/data/jpeg").join(f)).unwrap());
    }
    seeds
}

/// A seed with some bytes replaced, a run inserted, and maybe cut short.
#[derive(Debug, Clone)]
struct Mutation {
    seed: usize,
    replace: Vec<(usize, u8)>,
    insert: Option<(usize, Vec<u8>)>,
    cut: Option<usize>,
}

fn mutation(seeds: usize) -> impl Strategy<Value = Mutation> {
    (
        0..seeds,
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        prop::option::of((any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))),
        prop::option::of(any::<usize>()),
    )
        .prop_map(|(seed, replace, insert, cut)| Mutation {
            seed,
            replace,
            insert,
            cut,
        })
}

fn apply(m: &Mutation, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for (pos, v) in &m.replace {
        if !b.is_empty() {
            let i = pos % b.len();
            b[i] = *v;
        }
    }
    if let Some((pos, run)) = &m.insert {
        let i = pos % (b.len() + 1);
        b.splice(i..i, run.iter().copied());
    }
    if let Some(cut) = m.cut {
        b.truncate(cut % (b.len() + 1));
    }
    b
}

fn limits() -> DecodeLimits {
    // Small limits, so hostile headers hit them quickly.
    DecodeLimits {
        max_bytes: 1 << 20,
        max_side: 4096,
        max_alloc: 64 << 20,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn decoding_mutated_images_never_panics(m in mutation(7)) {
        let seeds = image_seeds();
        let bytes = apply(&m, &seeds[m.seed]);
        for cfg in [GlowConfig::small(1), GlowConfig::small(3)] {
            if let Err(e) = decode_value(&ImageValue::Encoded(&bytes), &cfg, &limits()) {
                prop_assert!(!e.detail.is_empty());
            }
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_value(&ImageValue::Encoded(&bytes), &GlowConfig::small(1), &limits());
    }

    #[test]
    fn raw_pixels_with_arbitrary_shapes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        height in -3i64..5000,
        width in -3i64..5000,
        channels in -1i64..6,
    ) {
        let shape = RawShape { height, width, channels };
        let _ = decode_value(&ImageValue::Raw(&bytes, Some(shape)), &GlowConfig::small(3), &limits());
    }

    #[test]
    fn loading_mutated_model_files_never_panics(m in mutation(1)) {
        let bytes = apply(&m, tiny_model_file());
        let _ = GlowModel::from_bytes(&bytes, "fuzzed", &Device::Cpu);
    }

    #[test]
    fn importing_mutated_torch_checkpoints_never_panics(m in mutation(2)) {
        use glowwatch::glow::torch::{ImportOptions, import_bytes};
        let bytes = apply(&m, &torch_seeds()[m.seed]);
        let _ = import_bytes(&bytes, &ImportOptions::default());
    }
}

/// The torch fixture in both saved forms (read once per run).
fn torch_seeds() -> &'static [Vec<u8>; 2] {
    static SEEDS: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = common::repo("../shared/fixtures/torch-glow/grey-k2-w16");
        [
            std::fs::read(dir.join("model.th")).unwrap(),
            std::fs::read(dir.join("state_dict.pt")).unwrap(),
        ]
    })
}

/// A small valid model file (built once per run).
fn tiny_model_file() -> &'static [u8] {
    static FILE: OnceLock<Vec<u8>> = OnceLock::new();
    FILE.get_or_init(|| {
        let cfg = GlowConfig {
            image_size: 8,
            scales: 2,
            steps: 1,
            hidden: 4,
            ..GlowConfig::small(1)
        };
        let m = GlowModel::new_random(&cfg, 1, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        m.save(&p).unwrap();
        std::fs::read(p).unwrap()
    })
}
