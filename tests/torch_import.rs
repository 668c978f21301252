//! Importing checkpoints of the paper authors' PyTorch code (`glowwatch model import-torch`):
//! per-scale parity with the log-likelihoods their code computes on the fixture of
//! `../shared/fixtures/torch-glow/`, from both saved forms; bit-identical round trips; clear
//! refusals of variants and of corrupt files (built here as small modified zips and pickles).

mod common;

use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::pickle::Object;
use candle_core::{DType, Device, Tensor};
use glowwatch::glow::GlowModel;
use glowwatch::glow::config::GlowConfig;
use glowwatch::glow::preprocess::{BIN_CENTRE, pixels_to_tensor};
use glowwatch::glow::torch::checkpoint::{Checkpoint, StorageDtype, TensorRef};
use glowwatch::glow::torch::{ImportError, ImportOptions, import_bytes, import_file};
use glowwatch::pipeline::decode::{DecodeLimits, decode_image, id_image_rows};

const TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/torch-glow/grey-k2-w16")
        .join(name)
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

/// The fixture's 24 images as (ids, model inputs (24, 1, 32, 32) at k/256 - 0.5 + 1/512),
/// decoded as the pipeline decodes them.
fn images(model: &GlowModel) -> (Vec<String>, Tensor) {
    let rows: Vec<(String, Vec<u8>)> = common::parquet_batches(&fixture("images.parquet"))
        .iter()
        .flat_map(|b| id_image_rows(b).unwrap())
        .collect();
    let limits = DecodeLimits::default();
    let pixels: Vec<u8> = rows
        .iter()
        .flat_map(|(_, b)| decode_image(b, model.config(), &limits).unwrap())
        .collect();
    let x = pixels_to_tensor(&pixels, model.config(), BIN_CENTRE, &Device::Cpu).unwrap();
    (rows.into_iter().map(|r| r.0).collect(), x)
}

fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1.0)
}

/// Largest relative error of lp0, lp1, lp2 and their sum against the reference's float64
/// values, for (N, 3) per-scale log-likelihoods.
fn worst_error(ids: &[String], lp: &[Vec<f64>]) -> f64 {
    let exp = expected();
    let mut worst = 0.0f64;
    for (id, row) in ids.iter().zip(lp) {
        let want = &exp["results"][id]["f64"];
        for (k, key) in ["lp0", "lp1", "lp2"].iter().enumerate() {
            worst = worst.max(rel(row[k], want[key].as_f64().unwrap()));
        }
        let total: f64 = row.iter().sum();
        worst = worst.max(rel(total, want["lprob"].as_f64().unwrap()));
    }
    worst
}

#[test]
fn both_forms_reproduce_the_reference_per_scale_log_likelihoods() {
    let exp = expected();
    for file in ["model.th", "state_dict.pt"] {
        let imported = import_file(&fixture(file), &ImportOptions::default()).unwrap();
        let model = imported.model;
        let (ids, x) = images(&model);
        assert_eq!(ids.len(), 24);
        // The fused scorer (what score, eval, pipelines and SQL run), f32.
        let scorer = model.scorer(&Device::Cpu, DType::F32).unwrap();
        let lp = scorer.forward(&x).unwrap().to_vec2::<f64>().unwrap();
        let worst = worst_error(&ids, &lp);
        println!("{file}: fused scorer, worst relative error {worst:.2e}");
        assert!(worst < TOL, "{file}: {worst}");
        // The trainable reference path, term by term against the reference's parts.
        let out = model.glow.forward(&x).unwrap();
        let mut worst_part = 0.0f64;
        for (i, id) in ids.iter().enumerate() {
            let parts = &exp["results"][id]["parts"];
            for k in 0..3 {
                for (name, t) in [
                    ("flow_logdet", &out.flow_logdet[k]),
                    ("exit_actnorm_logdet", &out.exit_logdet[k]),
                    ("prior_logp", &out.prior[k]),
                ] {
                    let got = t.to_vec1::<f64>().unwrap()[i];
                    let want = parts[name][k].as_f64().unwrap();
                    worst_part = worst_part.max(rel(got, want));
                }
            }
        }
        println!("{file}: flow path, worst relative error of a term {worst_part:.2e}");
        assert!(worst_part < TOL, "{file}: {worst_part}");
        // The channels-last training path gives the same per-scale values.
        let train = model
            .glow
            .scale_log_p(&x)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        assert!(worst_error(&ids, &train) < TOL);
    }
}

#[test]
fn both_forms_import_to_the_same_model_and_the_card_names_its_source() {
    let exp = expected();
    let a = import_file(&fixture("model.th"), &ImportOptions::default()).unwrap();
    let b = import_file(&fixture("state_dict.pt"), &ImportOptions::default()).unwrap();
    assert_eq!(a.model.model_id().unwrap(), b.model.model_id().unwrap());
    for (m, file) in [(&a.model, "model.th"), (&b.model, "state_dict.pt")] {
        let from = m.card.imported_from.as_ref().unwrap();
        assert_eq!(from.file, file);
        assert_eq!(from.sha256, exp["files"][file]["sha256"].as_str().unwrap());
        let cfg = m.config();
        assert_eq!(
            (
                cfg.in_channels,
                cfg.scales,
                cfg.steps,
                cfg.hidden,
                cfg.image_size
            ),
            (1, 3, 2, 16, 32)
        );
    }
    assert!(
        a.model
            .card
            .imported_from
            .as_ref()
            .unwrap()
            .form
            .contains("whole module")
    );
    assert!(
        b.model
            .card
            .imported_from
            .as_ref()
            .unwrap()
            .form
            .contains("state dict")
    );
}

#[test]
fn imported_saved_loaded_scores_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let imported = import_file(&fixture("model.th"), &ImportOptions::default()).unwrap();
    let path = dir.path().join("m.safetensors");
    let id = imported.model.save(&path).unwrap();
    let loaded = GlowModel::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.model_id().unwrap(), id);
    assert_eq!(loaded.card, imported.model.card);
    let (_, x) = images(&loaded);
    let score = |m: &GlowModel| {
        m.scorer(&Device::Cpu, DType::F32)
            .unwrap()
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (before, after) = (score(&imported.model), score(&loaded));
    assert!(
        before
            .iter()
            .zip(&after)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

// ---- small modified checkpoints ------------------------------------------------------------

/// Every member of a zip archive, in order.
fn members(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    (0..zip.len())
        .map(|i| {
            let mut f = zip.by_index(i).unwrap();
            let mut data = vec![];
            f.read_to_end(&mut data).unwrap();
            (f.name().unwrap().to_string(), data)
        })
        .collect()
}

/// A stored (uncompressed) zip archive, as torch writes.
fn write_zip(members: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, data) in members {
        out.start_file(name.as_str(), opts).unwrap();
        out.write_all(data).unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// The fixture's member `<prefix>/data.pkl` edited by `edit`; the other members unchanged.
fn with_pickle(file: &str, edit: impl Fn(Vec<u8>) -> Vec<u8>) -> Vec<u8> {
    let m = members(&std::fs::read(fixture(file)).unwrap())
        .into_iter()
        .map(|(n, d)| {
            let d = if n.ends_with("/data.pkl") { edit(d) } else { d };
            (n, d)
        })
        .collect::<Vec<_>>();
    write_zip(&m)
}

fn replace_bytes(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    let mut n = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
            n += 1;
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    assert!(n > 0, "pattern not found");
    out
}

/// A BINUNICODE string of a pickle: `X`, u32 length, UTF-8.
fn unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

/// Minimal protocol-2 pickle writer for state dicts (`OrderedDict` of `_rebuild_tensor_v2`).
fn state_dict_pickle(entries: &[(String, TensorRef)]) -> Vec<u8> {
    let int = |v: usize| {
        let mut b = vec![b'J'];
        b.extend((v as i32).to_le_bytes());
        b
    };
    let mut p = vec![0x80, 0x02];
    p.extend(b"ccollections\nOrderedDict\n)R(");
    for (key, t) in entries {
        p.extend(unicode(key));
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        p.extend(unicode("storage"));
        let class = match t.dtype {
            StorageDtype::I64 => "LongStorage",
            _ => "FloatStorage",
        };
        p.extend(format!("ctorch\n{class}\n").as_bytes());
        p.extend(unicode(&t.storage));
        p.extend(unicode("cpu"));
        p.extend(int(t.numel()));
        p.extend(b"tQ");
        p.extend(int(t.offset));
        p.push(b'(');
        t.shape.iter().for_each(|&d| p.extend(int(d)));
        p.extend(b"t(");
        t.stride.iter().for_each(|&d| p.extend(int(d)));
        p.extend(b"t\x89ccollections\nOrderedDict\n)RtR");
    }
    p.extend(b"u.");
    p
}

/// The fixture state dict's entries, in order.
fn state_dict_entries() -> Vec<(String, TensorRef)> {
    let ck = Checkpoint::from_bytes(&std::fs::read(fixture("state_dict.pt")).unwrap()).unwrap();
    let Object::Dict(entries) = &ck.object else {
        panic!("not a dict")
    };
    entries
        .iter()
        .filter_map(|(k, v)| match (k, TensorRef::from_object(v).unwrap()) {
            (Object::Unicode(k), Some(t)) => Some((k.clone(), t)),
            _ => None,
        })
        .collect()
}

/// A state-dict checkpoint saved through a file object (prefix `archive/`) from `entries`,
/// with the fixture's storages plus `extra` ones.
fn state_dict_file(entries: &[(String, TensorRef)], extra: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut m = vec![("archive/data.pkl".to_string(), state_dict_pickle(entries))];
    for (name, data) in members(&std::fs::read(fixture("state_dict.pt")).unwrap()) {
        if let Some(key) = name.split_once("/data/").map(|x| x.1) {
            m.push((format!("archive/data/{key}"), data));
        }
    }
    for (key, data) in extra {
        m.push((format!("archive/data/{key}"), data.clone()));
    }
    m.push(("archive/version".into(), b"3\n".to_vec()));
    write_zip(&m)
}

fn import_err(bytes: &[u8]) -> ImportError {
    match import_bytes(bytes, &ImportOptions::default()) {
        Ok(_) => panic!("imported"),
        Err(e) => e,
    }
}

fn contiguous(shape: &[usize]) -> Vec<usize> {
    let mut stride = vec![1; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * shape[d + 1];
    }
    stride
}

#[test]
fn a_state_dict_written_through_a_file_object_imports_like_the_original() {
    let ours = import_bytes(
        &state_dict_file(&state_dict_entries(), &[]),
        &ImportOptions::default(),
    )
    .unwrap();
    let original = import_file(&fixture("state_dict.pt"), &ImportOptions::default()).unwrap();
    assert_eq!(
        ours.model.model_id().unwrap(),
        original.model.model_id().unwrap()
    );
}

#[test]
fn additive_coupling_is_refused_by_name() {
    // State dict: the coupling networks output C/2 channels.
    let entries: Vec<_> = state_dict_entries()
        .into_iter()
        .map(|(k, mut t)| {
            if k.contains("coef_extractor.module.4.") {
                t.shape[0] /= 2;
                t.stride = contiguous(&t.shape);
            }
            (k, t)
        })
        .collect();
    let e = import_err(&state_dict_file(&entries, &[])).to_string();
    assert!(e.contains("additive coupling"), "{e}");
    // Whole module: the coupling's class.
    let bytes = with_pickle("model.th", |p| {
        replace_bytes(&p, b"\nAffineCoefs\n", b"\nAdditiveCoefs\n")
    });
    let e = import_err(&bytes).to_string();
    assert!(e.contains("additive coupling (AdditiveCoefs)"), "{e}");
}

#[test]
fn shuffle_permutations_are_refused_by_name() {
    let mut entries: Vec<_> = state_dict_entries()
        .into_iter()
        .filter(|(k, _)| !k.contains(".sequential.1.sequential.1."))
        .collect();
    let step = "prev.0.prev.0.prev.0.prev.0.prev.0.module.sequential.1.sequential.1.";
    let indices = TensorRef {
        storage: "9000".into(),
        dtype: StorageDtype::I64,
        offset: 0,
        shape: vec![4],
        stride: vec![1],
    };
    entries.push((format!("{step}indices"), indices));
    let data: Vec<u8> = [2i64, 0, 3, 1]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let e = import_err(&state_dict_file(&entries, &[("9000", data)])).to_string();
    assert!(e.contains("shuffle permutation"), "{e}");
    // No permutation at all (flow_permutation='identity').
    let entries: Vec<_> = state_dict_entries()
        .into_iter()
        .filter(|(k, _)| !k.contains(".sequential.1.sequential.1."))
        .collect();
    let e = import_err(&state_dict_file(&entries, &[])).to_string();
    assert!(e.contains("identity permutation"), "{e}");
    // Whole module: the exp-scaled coupling of another configuration.
    let bytes = with_pickle("model.th", |p| {
        replace_bytes(&p, &unicode("sigmoid"), &unicode("exp"))
    });
    let e = import_err(&bytes).to_string();
    assert!(e.contains("scale Some(\"exp\")"), "{e}");
}

#[test]
fn class_conditional_priors_are_refused_by_name() {
    let d = 512;
    let entries: Vec<_> = state_dict_entries()
        .into_iter()
        .map(|(k, mut t)| {
            if k.starts_with("prev.0.module.dist.") {
                t = TensorRef {
                    storage: "9001".into(),
                    dtype: StorageDtype::F32,
                    offset: 0,
                    shape: vec![10, d],
                    stride: vec![d, 1],
                };
            }
            (k, t)
        })
        .collect();
    let zeros = vec![0u8; 10 * d * 4];
    let e = import_err(&state_dict_file(&entries, &[("9001", zeros)])).to_string();
    assert!(e.contains("class-conditional prior with 10 classes"), "{e}");
}

#[test]
fn missing_parameters_and_storages_are_named() {
    let entries: Vec<_> = state_dict_entries()
        .into_iter()
        .filter(|(k, _)| !k.ends_with("module.4.conv.bias"))
        .collect();
    let e = import_err(&state_dict_file(&entries, &[])).to_string();
    assert!(
        e.contains("module.4.conv.bias") && e.contains("missing"),
        "{e}"
    );
    // A storage member gone from the archive.
    let bytes = std::fs::read(fixture("state_dict.pt")).unwrap();
    let m: Vec<_> = members(&bytes)
        .into_iter()
        .filter(|(n, _)| !n.ends_with("/data/0"))
        .collect();
    let e = import_err(&write_zip(&m)).to_string();
    assert!(
        e.contains("data/0") && e.contains("missing from the archive"),
        "{e}"
    );
    // Another model's state dict.
    let other = vec![(
        "encoder.conv.weight".to_string(),
        state_dict_entries()[0].1.clone(),
    )];
    let e = import_err(&state_dict_file(&other, &[])).to_string();
    assert!(e.contains("encoder.conv.weight"), "{e}");
}

#[test]
fn truncated_and_corrupt_files_are_errors_never_panics() {
    for file in ["model.th", "state_dict.pt"] {
        let bytes = std::fs::read(fixture(file)).unwrap();
        let len = bytes.len();
        for cut in [0, 3, 4, 100, 1000, len / 3, len / 2, len - 100, len - 1] {
            let e = import_err(&bytes[..cut]);
            assert!(
                matches!(e, ImportError::Corrupt(_)),
                "{file} cut at {cut}: {e}"
            );
        }
        // Flipped bytes in the middle of the archive.
        let mut flipped = bytes.clone();
        for b in &mut flipped[len / 2..len / 2 + 64] {
            *b ^= 0x5a;
        }
        let _ = import_bytes(&flipped, &ImportOptions::default());
        // A pickle cut short inside an intact archive.
        let cut_pickle = with_pickle(file, |p| p[..p.len() / 2].to_vec());
        let e = import_err(&cut_pickle).to_string();
        assert!(e.contains("malformed pickle"), "{file}: {e}");
    }
    let mut legacy = vec![0x80, 0x02, 0x8a, 0x0a];
    legacy.extend([0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]);
    let e = import_err(&legacy).to_string();
    assert!(e.contains("legacy checkpoint format"), "{e}");
}

// ---- the command line ---------------------------------------------------------------------

/// Runs glowwatch, which must succeed; its stdout.
fn glowwatch(args: &[&str]) -> String {
    let (ok, stdout, stderr) = common::glowwatch(args, "");
    assert!(ok, "{args:?}: {stderr}");
    stdout
}

/// `model import-torch`, then `score` and `sql` on the imported model give the reference's
/// per-scale values; unsupported checkpoints fail with the importer's message.
#[test]
fn command_line_import_then_score_and_sql() {
    use arrow::array::{Array, Float64Array, StringArray};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("imported.safetensors");
    let m = model.to_str().unwrap();
    let images = fixture("images.parquet");
    let images = images.to_str().unwrap();
    let ck = fixture("model.th");
    let out = glowwatch(&["model", "import-torch", ck.to_str().unwrap(), "--out", m]);
    assert!(out.contains("K = 2, width 16"), "{out}");
    let scored = dir.path().join("scored");
    glowwatch(&[
        "score",
        "--device",
        "cpu",
        "--input",
        images,
        "--output",
        scored.to_str().unwrap(),
        "--model",
        m,
        "--score",
        "nll",
        "--threshold",
        "1e9",
    ]);
    let (mut ids, mut lp) = (vec![], vec![]);
    for batch in common::parquet_batches(&scored) {
        let col = |n: &str| {
            batch
                .column_by_name(n)
                .unwrap()
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap()
                .clone()
        };
        let id = batch.column_by_name("id").unwrap();
        let id = id.as_any().downcast_ref::<StringArray>().unwrap();
        let (a, b, c) = (col("lp_scale_0"), col("lp_scale_1"), col("lp_scale_2"));
        for i in 0..batch.num_rows() {
            ids.push(id.value(i).to_string());
            lp.push(vec![a.value(i), b.value(i), c.value(i)]);
        }
    }
    assert_eq!(ids.len(), 24);
    assert!(worst_error(&ids, &lp) < TOL);

    let table = format!("d={images}");
    let csv = glowwatch(&[
        "sql",
        "--device",
        "cpu",
        "--format",
        "csv",
        "--table",
        &table,
        "--model",
        m,
        "SELECT id, ood_log_p(image) AS lp FROM d ORDER BY id",
    ]);
    let exp = expected();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 24);
    for row in rows {
        let (id, v) = row.split_once(',').unwrap();
        let want = exp["results"][id]["f64"]["lprob"].as_f64().unwrap();
        assert!(rel(v.parse().unwrap(), want) < TOL, "{id}: {v} vs {want}");
    }

    let bad = dir.path().join("additive.th");
    std::fs::write(
        &bad,
        with_pickle("model.th", |p| {
            replace_bytes(&p, b"\nAffineCoefs\n", b"\nAdditiveCoefs\n")
        }),
    )
    .unwrap();
    let (ok, _, err) = common::glowwatch(
        &["model", "import-torch", bad.to_str().unwrap(), "--out", m],
        "",
    );
    assert!(!ok);
    assert!(err.contains("additive coupling"), "{err}");
}

/// Writes `model` as the authors' code would save its state dict (L = 3): canonical keys and
/// their aliases, torch's shapes, `l_mask` as a transposed view of `u_mask`'s storage.
fn export_state_dict(model: &GlowModel) -> Vec<u8> {
    use std::collections::BTreeMap;
    let vars: BTreeMap<String, Vec<f32>> = model
        .varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    let (mut entries, mut storages, mut views) = (vec![], vec![], vec![]);
    let mut add = |keys: &[String], values: Vec<f32>, shape: Vec<usize>| -> TensorRef {
        let t = TensorRef {
            storage: format!("{}", storages.len()),
            dtype: StorageDtype::F32,
            offset: 0,
            stride: contiguous(&shape),
            shape,
        };
        storages.push(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        for k in keys {
            entries.push((k.clone(), t.clone()));
        }
        t
    };
    let hops = |root: usize, n: usize| format!("prev.{root}.{}module.", "prev.0.".repeat(n));
    let flow_prefixes = [
        vec![hops(0, 4), hops(1, 7), hops(2, 8)],
        vec![hops(1, 4), hops(2, 5)],
        vec![hops(2, 2)],
    ];
    let cfg = model.config().clone();
    let h = cfg.hidden;
    for (k, sh) in cfg.shape().scales.iter().enumerate() {
        let c = sh.channels;
        for j in 0..cfg.steps {
            let ours = |n: &str| vars[&format!("scale{k}.step{j}.{n}")].clone();
            let keys = |n: &str| -> Vec<String> {
                flow_prefixes[k]
                    .iter()
                    .map(|p| format!("{p}sequential.{}.sequential.{n}", j + 1))
                    .collect()
            };
            let cm = "2.coef_extractor.module.";
            add(&keys("0.loc"), ours("actnorm.loc"), vec![1, c, 1, 1]);
            add(&keys("0.log_scale"), ours("actnorm.logs"), vec![1, c, 1, 1]);
            add(&keys("1.w_p"), ours("invconv.perm"), vec![c, c]);
            add(&keys("1.w_l"), ours("invconv.lower"), vec![c, c]);
            add(&keys("1.w_u"), ours("invconv.upper"), vec![c, c]);
            add(&keys("1.w_s"), ours("invconv.logw"), vec![c]);
            add(&keys("1.s_sign"), ours("invconv.sign"), vec![c]);
            let upper = (0..c * c).map(|i| f32::from(i % c > i / c)).collect();
            let u = add(&keys("1.u_mask"), upper, vec![c, c]);
            for key in keys("1.l_mask") {
                views.push((
                    key,
                    TensorRef {
                        stride: vec![1, c],
                        ..u.clone()
                    },
                ));
            }
            let eye = (0..c * c).map(|i| f32::from(i % c == i / c)).collect();
            add(&keys("1.l_eye"), eye, vec![c, c]);
            let n = |s: &str| format!("{cm}{s}");
            add(
                &keys(&n("0.conv.weight")),
                ours("coupling.conv1.weight"),
                vec![h, c / 2, 3, 3],
            );
            add(
                &keys(&n("0.actnorm.loc")),
                ours("coupling.norm1.loc"),
                vec![1, h, 1, 1],
            );
            add(
                &keys(&n("0.actnorm.log_scale")),
                ours("coupling.norm1.logs"),
                vec![1, h, 1, 1],
            );
            add(
                &keys(&n("2.conv.weight")),
                ours("coupling.conv2.weight"),
                vec![h, h, 1, 1],
            );
            add(
                &keys(&n("2.actnorm.loc")),
                ours("coupling.norm2.loc"),
                vec![1, h, 1, 1],
            );
            add(
                &keys(&n("2.actnorm.log_scale")),
                ours("coupling.norm2.logs"),
                vec![1, h, 1, 1],
            );
            add(
                &keys(&n("4.conv.weight")),
                ours("coupling.conv3.weight"),
                vec![c, h, 3, 3],
            );
            add(
                &keys(&n("4.conv.bias")),
                ours("coupling.conv3.bias"),
                vec![c],
            );
            add(
                &keys(&n("4.logs")),
                ours("coupling.conv3.logs"),
                vec![c, 1, 1],
            );
        }
        let d = sh.exit_dims();
        let exit = |n: &str| vars[&format!("scale{k}.exit.{n}")].clone();
        let act = format!("prev.{k}.prev.0.module.sequential.1.");
        add(&[format!("{act}loc")], exit("loc"), vec![1, d, 1, 1]);
        add(&[format!("{act}log_scale")], exit("logs"), vec![1, d, 1, 1]);
        let dist = format!("prev.{k}.module.dist.");
        add(
            &[format!("{dist}class_means")],
            exit("prior_mean"),
            vec![1, d],
        );
        add(
            &[format!("{dist}class_log_stds")],
            exit("prior_logstd"),
            vec![1, d],
        );
    }
    entries.extend(views);
    let mut m = vec![("sd/data.pkl".to_string(), state_dict_pickle(&entries))];
    for (i, s) in storages.into_iter().enumerate() {
        m.push((format!("sd/data/{i}"), s));
    }
    write_zip(&m)
}

/// The fixture covers one size; 3 channels and other K and widths map the same way: a model
/// written in the authors' state-dict layout imports to exactly the same weights (same id).
#[test]
fn rgb_and_other_sizes_import_to_exactly_the_weights_they_were_written_from() {
    use glowwatch::glow::Prior;
    use glowwatch::glow::config::ResizeMode;
    for (channels, steps, hidden) in [(3, 3, 24), (1, 4, 32)] {
        let mut cfg = GlowConfig {
            steps,
            hidden,
            prior: Prior::DiagonalGaussian,
            ..GlowConfig::small(channels)
        };
        cfg.preprocess.resize = ResizeMode::Pad;
        let model = GlowModel::new_random(&cfg, 5, &Device::Cpu).unwrap();
        model.perturb(6, 0.05).unwrap();
        for (name, var) in model.varmap.data().lock().unwrap().iter() {
            if name.contains(".prior_") {
                let noise = (Tensor::randn(0f32, 0.1, var.shape(), &Device::Cpu)).unwrap();
                var.set(&noise).unwrap();
            }
        }
        let imported = import_bytes(&export_state_dict(&model), &ImportOptions::default()).unwrap();
        assert_eq!(imported.model.config(), &cfg);
        assert_eq!(
            imported.model.model_id().unwrap(),
            model.model_id().unwrap(),
            "C = {channels}, K = {steps}, width {hidden}"
        );
    }
}
