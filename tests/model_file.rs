//! Model files: save -> load is bit-exact, and every broken file gives a clear error that names
//! the file and the problem (never a panic).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use glowwatch::glow::config::GlowConfig;
use glowwatch::glow::preprocess::{BIN_CENTRE, pixels_to_tensor};
use glowwatch::glow::{GlowModel, ModelCard};
use safetensors::SafeTensors;

fn config() -> GlowConfig {
    GlowConfig {
        image_size: 16,
        steps: 2,
        hidden: 8,
        scales: 2,
        ..GlowConfig::small(1)
    }
}

fn images(cfg: &GlowConfig, n: usize, seed: u8) -> Tensor {
    let px: Vec<u8> = (0..n * cfg.dims())
        .map(|i| ((i as u64 * 2654435761 + seed as u64 * 97) % 251) as u8)
        .collect();
    pixels_to_tensor(&px, cfg, BIN_CENTRE, &Device::Cpu).unwrap()
}

fn saved_model(dir: &Path) -> (GlowModel, std::path::PathBuf) {
    let cfg = config();
    let mut m = GlowModel::new_random(&cfg, 3, &Device::Cpu).unwrap();
    m.init_from_data(&images(&cfg, 16, 1)).unwrap();
    m.card = ModelCard {
        name: "unit".into(),
        trained_on: "synthetic".into(),
        final_bpd: Some(4.5),
        ..Default::default()
    };
    let path = dir.join("m.safetensors");
    m.save(&path).unwrap();
    (m, path)
}

fn load_err(path: &Path) -> String {
    match GlowModel::load(path, &Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", path.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites a saved file with edited metadata and/or tensors.
fn rewrite(
    src: &Path,
    dst: &Path,
    edit_meta: impl Fn(&mut HashMap<String, String>),
    edit_tensor: impl Fn(&str, Tensor) -> Option<Tensor>,
) {
    let bytes = std::fs::read(src).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    edit_meta(&mut meta);
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let mut kept: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter_map(|(k, t)| edit_tensor(&k, t).map(|t| (k, t)))
        .collect();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let out =
        safetensors::serialize(kept.iter().map(|(k, t)| (k.as_str(), t)), Some(meta)).unwrap();
    std::fs::write(dst, out).unwrap();
}

#[test]
fn save_load_roundtrip_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let (m, path) = saved_model(dir.path());
    let loaded = GlowModel::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), m.config());
    assert_eq!(loaded.card, m.card);
    assert_eq!(loaded.model_id().unwrap(), m.model_id().unwrap());
    let x = images(&config(), 8, 2);
    let a = m
        .scorer(&Device::Cpu, DType::F32)
        .unwrap()
        .score(&x)
        .unwrap();
    let b = loaded
        .scorer(&Device::Cpu, DType::F32)
        .unwrap()
        .score(&x)
        .unwrap();
    assert_eq!(
        a, b,
        "per-scale outputs must be identical after a round trip"
    );
    // Saving the loaded model again yields the same id and bit-identical tensors.
    let again = dir.path().join("again.safetensors");
    assert_eq!(loaded.save(&again).unwrap(), m.model_id().unwrap());
    let tensors = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let st = SafeTensors::deserialize(&b).unwrap();
        let mut v: Vec<(String, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(k, t)| (k, t.data().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert!(
        tensors(&again) == tensors(&path),
        "tensor bytes differ after a round trip"
    );
}

#[test]
fn model_id_changes_with_weights_and_config() {
    let cfg = config();
    let a = GlowModel::new_random(&cfg, 1, &Device::Cpu).unwrap();
    let b = GlowModel::new_random(&cfg, 2, &Device::Cpu).unwrap();
    let c = GlowModel::new_random(&GlowConfig { hidden: 9, ..cfg }, 1, &Device::Cpu).unwrap();
    let ids = [
        a.model_id().unwrap(),
        b.model_id().unwrap(),
        c.model_id().unwrap(),
    ];
    assert!(
        ids[0].starts_with("glow-") && ids[0].len() == 21,
        "{}",
        ids[0]
    );
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[0], ids[2]);
}

#[test]
fn broken_files_give_errors_naming_file_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = saved_model(dir.path());
    let p = |name: &str| dir.path().join(name);

    let missing = p("nope.safetensors");
    let e = load_err(&missing);
    assert!(
        e.contains("nope.safetensors") && e.contains("cannot read"),
        "{e}"
    );

    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(p("trunc.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&p("trunc.safetensors"));
    assert!(
        e.contains("trunc.safetensors") && e.contains("truncated or corrupt"),
        "{e}"
    );

    std::fs::write(p("empty.safetensors"), b"").unwrap();
    assert!(load_err(&p("empty.safetensors")).contains("truncated or corrupt"));

    let mut flipped = bytes.clone();
    let n = flipped.len();
    flipped[n - 3] ^= 0x40; // a weight byte; the header is intact
    std::fs::write(p("flip.safetensors"), &flipped).unwrap();
    let e = load_err(&p("flip.safetensors"));
    assert!(e.contains("does not match the stored model id"), "{e}");

    rewrite(
        &path,
        &p("v99.safetensors"),
        |m| {
            m.insert("format_version".into(), "99".into());
        },
        |_, t| Some(t),
    );
    let e = load_err(&p("v99.safetensors"));
    assert!(
        e.contains("v99.safetensors") && e.contains("unknown format version 99"),
        "{e}"
    );

    rewrite(
        &path,
        &p("nometa.safetensors"),
        |m| {
            m.remove("config");
        },
        |_, t| Some(t),
    );
    assert!(load_err(&p("nometa.safetensors")).contains("metadata key `config` is missing"));

    rewrite(
        &path,
        &p("f64.safetensors"),
        |_| {},
        |k, t| {
            Some(if k.ends_with("actnorm.loc") {
                t.to_dtype(DType::F64).unwrap()
            } else {
                t
            })
        },
    );
    let e = load_err(&p("f64.safetensors"));
    assert!(e.contains("dtype F64, expected F32"), "{e}");

    rewrite(
        &path,
        &p("shape.safetensors"),
        |m| {
            let mut cfg: GlowConfig = serde_json::from_str(&m["config"]).unwrap();
            cfg.hidden = 16;
            m.insert("config".into(), serde_json::to_string(&cfg).unwrap());
        },
        |_, t| Some(t),
    );
    let e = load_err(&p("shape.safetensors"));
    assert!(e.contains("shape") && e.contains("the config needs"), "{e}");

    rewrite(
        &path,
        &p("gone.safetensors"),
        |_| {},
        |k, t| (k != "scale1.exit.loc").then_some(t),
    );
    assert!(load_err(&p("gone.safetensors")).contains("tensor `scale1.exit.loc` is missing"));

    rewrite(&path, &p("extra.safetensors"), |_| {}, |_, t| Some(t));
    {
        let bytes = std::fs::read(p("extra.safetensors")).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap();
        let mut t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
        t.insert(
            "bogus".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let mut v: Vec<_> = t.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        std::fs::write(
            p("extra.safetensors"),
            safetensors::serialize(v.iter().map(|(k, t)| (k.as_str(), t)), Some(meta)).unwrap(),
        )
        .unwrap();
    }
    assert!(load_err(&p("extra.safetensors")).contains("unexpected tensor `bogus`"));

    rewrite(
        &path,
        &p("badcfg.safetensors"),
        |m| {
            m.insert("config".into(), "{\"in_channels\":5}".into());
        },
        |_, t| Some(t),
    );
    assert!(load_err(&p("badcfg.safetensors")).contains("badcfg.safetensors"));
}

/// 16-bit model files (for moving models within a file-size limit) load exactly what was
/// saved: the rounded weights, under the id of the rounded weights.
#[test]
fn sixteen_bit_files_load_exactly_what_was_saved() {
    use candle_core::DType;
    let dir = tempfile::tempdir().unwrap();
    let cfg = glowwatch::glow::GlowConfig::small(1);
    let m = GlowModel::new_random(&cfg, 3, &Device::Cpu).unwrap();
    m.perturb(4, 0.05).unwrap();
    let f32_path = dir.path().join("m.safetensors");
    let f32_id = m.save(&f32_path).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let p = dir.path().join(format!("m-{dtype:?}.safetensors"));
        let id = m.save_as(&p, dtype).unwrap();
        assert_ne!(id, f32_id, "{dtype:?}: rounded weights are other weights");
        let size = std::fs::metadata(&p).unwrap().len() as f64;
        let full = std::fs::metadata(&f32_path).unwrap().len() as f64;
        assert!(size < 0.55 * full, "{dtype:?}: {size} vs {full} bytes");
        let loaded = GlowModel::load(&p, &Device::Cpu).unwrap();
        assert_eq!(loaded.model_id().unwrap(), id);
        let original = m.varmap.data().lock().unwrap();
        for (name, var) in loaded.varmap.data().lock().unwrap().iter() {
            let want = original[name]
                .as_tensor()
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let got = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{dtype:?} {name}"
            );
        }
        // Saving the loaded model again in the same dtype changes nothing.
        let again = dir.path().join("again.safetensors");
        assert_eq!(loaded.save_as(&again, dtype).unwrap(), id);
    }
}
