//! Inputs that image feeds contain every day and that glowwatch once handled wrongly
//! (`../shared/cases/`): one regression test per behaviour.

mod common;

use std::path::{Path, PathBuf};

use glowwatch::glow::config::GlowConfig;
use glowwatch::pipeline::decode::{DecodeLimits, decode_image, decode_upright};

fn case(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/cases")
        .join(path)
}

/// (id, image bytes) of a Parquet file (or a run's folder) with `id` and `image` columns.
fn id_images(path: &Path) -> Vec<(String, Vec<u8>)> {
    common::parquet_batches(path)
        .iter()
        .flat_map(|b| glowwatch::pipeline::decode::id_image_rows(b).unwrap())
        .collect()
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn exif_orientation_is_applied_as_viewers_show_the_picture() {
    let cfg = GlowConfig::small(3);
    let limits = DecodeLimits::default();
    let rows = id_images(&case("exif-orientation/input.parquet"));
    let px = |id: &str| {
        let (_, bytes) = rows.iter().find(|(i, _)| i == id).unwrap();
        decode_image(bytes, &cfg, &limits).unwrap()
    };
    for n in 0..4 {
        let upright = px(&format!("img{n}-upright"));
        let tagged = px(&format!("img{n}-exif6"));
        let stored = px(&format!("img{n}-stored-no-exif"));
        let (same, turned) = (
            mean_abs_diff(&tagged, &upright),
            mean_abs_diff(&tagged, &stored),
        );
        assert!(
            same < 2.0 && turned > 10.0,
            "img{n}: {same} vs upright, {turned} vs stored"
        );
    }
}

/// A JPEG APP1 segment holding only the EXIF Orientation tag (TIFF little-endian, one IFD).
fn exif_app1(orientation: u16) -> Vec<u8> {
    let mut tiff = b"II*\0".to_vec();
    tiff.extend(8u32.to_le_bytes()); // IFD0 offset
    tiff.extend(1u16.to_le_bytes()); // one entry
    tiff.extend(0x0112u16.to_le_bytes()); // Orientation
    tiff.extend(3u16.to_le_bytes()); // SHORT
    tiff.extend(1u32.to_le_bytes()); // count
    tiff.extend(orientation.to_le_bytes());
    tiff.extend([0, 0]);
    tiff.extend(0u32.to_le_bytes()); // no next IFD
    let mut seg = vec![0xFF, 0xE1];
    seg.extend(((tiff.len() + 8) as u16).to_be_bytes());
    seg.extend(b"Exif\0\0");
    seg.extend(tiff);
    seg
}

/// All eight EXIF orientations: a picture stored with the inverse of each transform and
/// tagged with it decodes to the upright picture.
#[test]
fn all_eight_exif_orientations_decode_upright() {
    use image::{DynamicImage, GrayImage, metadata::Orientation};
    // Asymmetric 12x8: a horizontal ramp plus a bright block in the top-left corner.
    let upright = GrayImage::from_fn(12, 8, |x, y| {
        image::Luma([if x < 3 && y < 2 { 255 } else { (x * 18) as u8 }])
    });
    let upright = DynamicImage::ImageLuma8(upright);
    let limits = DecodeLimits::default();
    for (tag, inverse) in [
        (1, Orientation::NoTransforms),
        (2, Orientation::FlipHorizontal),
        (3, Orientation::Rotate180),
        (4, Orientation::FlipVertical),
        (5, Orientation::Rotate90FlipH), // transpose is its own inverse
        (6, Orientation::Rotate270),     // stored turned left; tag 6 turns right
        (7, Orientation::Rotate270FlipH), // transverse is its own inverse
        (8, Orientation::Rotate90),
    ] {
        let mut stored = upright.clone();
        stored.apply_orientation(inverse);
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 100)
            .encode_image(&stored)
            .unwrap();
        let jpeg = jpeg.into_inner();
        // SOI, then the EXIF segment, then the rest.
        let mut tagged = jpeg[..2].to_vec();
        tagged.extend(exif_app1(tag));
        tagged.extend(&jpeg[2..]);
        let got = decode_upright(&tagged, &limits).unwrap().to_luma8();
        assert_eq!(got.dimensions(), (12, 8), "orientation {tag}");
        let diff = mean_abs_diff(got.as_raw(), upright.to_luma8().as_raw());
        assert!(diff < 4.0, "orientation {tag}: mean abs diff {diff}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

/// `.jfif`, `.jpe`, `.webp`, upper-case and extension-less images are recognised by content;
/// every file not imported is named with its reason.
#[test]
fn import_recognises_images_by_content_and_names_every_skipped_file() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    copy_dir(&case("import-extensions/images"), &images);
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    std::fs::copy(images.join("a.png"), images.join("no-extension")).unwrap();
    let mut cut = std::fs::read(images.join("b.jpg")).unwrap();
    cut.truncate(40);
    std::fs::write(images.join("cut.jpg"), cut).unwrap();
    let out = dir.path().join("x.parquet");
    let (ok, stdout, stderr) = common::glowwatch(
        &[
            "import",
            images.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        "",
    );
    assert!(ok, "{stderr}");
    let mut ids: Vec<String> = id_images(&out).into_iter().map(|(id, _)| id).collect();
    ids.sort();
    let want = [
        "a.png",
        "b.jpg",
        "d.jpe",
        "e.JPG",
        "f.webp",
        "g.PNG",
        "no-extension",
        "sub/c.jfif",
    ];
    assert_eq!(ids, want);
    assert!(
        stdout.contains("wrote 8 images") && stdout.contains("2 files skipped"),
        "{stdout}"
    );
    assert!(
        stderr.contains("skipped notes.txt: unknown_format"),
        "{stderr}"
    );
    assert!(stderr.contains("skipped cut.jpg: truncated"), "{stderr}");
}

/// Scored rows in a run's output folder (not its `_dead_letter`).
fn scored_rows(dir: &Path) -> usize {
    common::parquet_batches(dir)
        .iter()
        .map(|b| b.num_rows())
        .sum()
}

/// Scoring into a directory that holds a run must not silently add a second copy of every row.
#[test]
fn score_refuses_an_output_that_holds_a_run_unless_told_to_overwrite_or_append() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let input = case("exif-orientation/input.parquet");
    let score = |extra: &[&str]| score_dir(&input, &out, extra);
    assert!(score(&[]).0);
    assert_eq!(scored_rows(&out), 12);
    let (ok, err) = score(&[]);
    assert!(
        !ok && err.contains("--overwrite") && err.contains("--append"),
        "{err}"
    );
    assert_eq!(scored_rows(&out), 12);
    assert!(score(&["--append"]).0);
    assert_eq!(scored_rows(&out), 24);
    assert!(score(&["--overwrite"]).0);
    assert_eq!(scored_rows(&out), 12);
    // Never deletes what glowwatch did not write.
    std::fs::write(out.join("README.txt"), "mine").unwrap();
    let (ok, err) = score(&["--overwrite"]);
    assert!(!ok && err.contains("README.txt"), "{err}");
    assert!(out.join("README.txt").exists());
}

/// Rows of tests/data/jpeg/corpus.parquet (scripts/make_jpeg_corpus.py): the JPEG, and the
/// pixels Pillow (libjpeg-turbo) decodes from it.
struct CorpusRow {
    id: String,
    variant: String,
    image: Vec<u8>,
    reference: Option<(u32, u32, Vec<u8>)>,
    ref_mode: Option<String>,
}

fn jpeg_corpus() -> Vec<CorpusRow> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/jpeg/corpus.parquet");
    let mut rows = vec![];
    for b in common::parquet_batches(&path) {
        let col = |n: &str| b.column_by_name(n).unwrap().clone();
        let (id, variant, image, mode) = (col("id"), col("variant"), col("image"), col("ref_mode"));
        let (w, h, px) = (col("ref_width"), col("ref_height"), col("ref_pixels"));
        for i in 0..b.num_rows() {
            let reference = px.is_valid(i).then(|| {
                (
                    w.as_primitive::<Int64Type>().value(i) as u32,
                    h.as_primitive::<Int64Type>().value(i) as u32,
                    px.as_binary::<i32>().value(i).to_vec(),
                )
            });
            rows.push(CorpusRow {
                id: id.as_string::<i32>().value(i).to_string(),
                variant: variant.as_string::<i32>().value(i).to_string(),
                image: image.as_binary::<i32>().value(i).to_vec(),
                reference,
                ref_mode: mode
                    .is_valid(i)
                    .then(|| mode.as_string::<i32>().value(i).to_string()),
            });
        }
    }
    rows
}

/// The truncation policy: a JPEG that lacks only its end-of-image marker decodes to exactly the
/// full file's pixels (as libjpeg does); one cut inside its data is dead-lettered `truncated`,
/// never scored as if whole. Full files decode to the reference decoder's pixels within the
/// rounding of two IDCT/upsampling implementations.
#[test]
fn jpeg_truncation_policy_against_the_reference_decoder() {
    use glowwatch::pipeline::decode::DecodeReason;
    let limits = DecodeLimits::default();
    let rows = jpeg_corpus();
    let ours = |r: &CorpusRow| {
        let img = decode_upright(&r.image, &limits);
        img.map(|i| match r.ref_mode.as_deref() {
            Some("L") => i.to_luma8().into_raw(),
            _ => i.to_rgb8().into_raw(),
        })
    };
    let mut worst_mean = 0.0f64;
    for r in &rows {
        let base = r.id.split('/').next().unwrap();
        let full = rows
            .iter()
            .find(|f| f.id == format!("{base}/full"))
            .unwrap();
        match r.variant.as_str() {
            "full" | "no-eoi" => {
                let got = ours(r).unwrap_or_else(|e| panic!("{}: {e}", r.id));
                assert_eq!(
                    got,
                    ours(full).unwrap(),
                    "{}: differs from the full file",
                    r.id
                );
                let (_, _, reference) = r.reference.as_ref().unwrap();
                let mean = mean_abs_diff(&got, reference);
                worst_mean = worst_mean.max(mean);
                assert!(mean < 2.0, "{}: mean abs diff {mean} from libjpeg", r.id);
            }
            _ => {
                let e = ours(r)
                    .err()
                    .unwrap_or_else(|| panic!("{} was decoded", r.id));
                assert_eq!(e.reason, DecodeReason::Truncated, "{}: {e}", r.id);
            }
        }
    }
    println!("worst mean abs diff from libjpeg-turbo: {worst_mean:.3}");
    // The case a user reported: the same picture with and without its end marker.
    let pair = id_images(&case("jpeg-without-end-marker/no-eoi-pair.parquet"));
    let cfg = GlowConfig::small(1);
    let full = decode_image(&pair[0].1, &cfg, &limits).unwrap();
    let no_eoi = decode_image(&pair[1].1, &cfg, &limits).unwrap();
    assert_eq!((pair[0].0.as_str(), pair[1].0.as_str()), ("full", "no-eoi"));
    assert_eq!(full, no_eoi);
}

/// A valid arithmetic-coded JPEG (libjpeg-turbo decodes it) is not `corrupt`: it gets its own
/// reason, `unsupported`, and the detail names the coding.
#[test]
fn arithmetic_coded_jpeg_is_unsupported_not_corrupt() {
    use glowwatch::pipeline::decode::DecodeReason;
    for name in ["arithmetic.jpg", "arithmetic-progressive.jpg"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/jpeg")
            .join(name);
        let e = decode_upright(&std::fs::read(path).unwrap(), &DecodeLimits::default())
            .err()
            .unwrap();
        assert_eq!(e.reason, DecodeReason::Unsupported, "{name}: {e}");
        assert!(e.detail.contains("arithmetic-coded JPEG"), "{name}: {e}");
    }
}

/// `glowwatch score` of `input` into `out` with the shipped Fashion-MNIST model (nll, a fixed
/// threshold) and `extra` arguments: (success, stdout and stderr).
fn score_dir(input: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let model = common::repo("models/fashion-mnist.safetensors")
        .display()
        .to_string();
    let mut args = vec![
        "score",
        "--device",
        "cpu",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--model",
        &model,
        "--score",
        "nll",
        "--threshold",
        "1e9",
    ];
    args.extend(extra);
    let (ok, stdout, stderr) = common::glowwatch(&args, "");
    (ok, format!("{stdout}\n{stderr}"))
}

fn strings(b: &arrow::array::RecordBatch, name: &str) -> Vec<Option<String>> {
    let c = arrow::compute::cast(
        b.column_by_name(name).unwrap(),
        &arrow::datatypes::DataType::Utf8,
    )
    .unwrap();
    use arrow::array::{Array, AsArray};
    let s = c.as_string::<i32>();
    (0..s.len())
        .map(|i| s.is_valid(i).then(|| s.value(i).to_string()))
        .collect()
}

/// A directory of files from pyarrow (`string`, `binary`) and polars (`large_string`,
/// `large_binary`) is one dataset.
#[test]
fn files_from_different_writers_in_one_directory_are_one_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (ok, log) = score_dir(&case("mixed-writers/in"), &out, &[]);
    assert!(ok, "{log}");
    let mut ids: Vec<String> = common::parquet_batches(&out)
        .iter()
        .flat_map(|b| strings(b, "id"))
        .map(Option::unwrap)
        .collect();
    ids.sort();
    assert_eq!(ids.len(), 6, "{ids:?}");
    ids.dedup();
    assert_eq!(ids.len(), 6, "ids repeat: {ids:?}");
}

/// Spark-style INT96 timestamps outside 1677-2262 come out as they went in, with and without
/// an Arrow schema in the footer.
#[test]
fn int96_timestamps_pass_through_unwrapped() {
    for file in [
        "int96-no-arrow-schema.parquet",
        "int96-with-arrow-schema.parquet",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir_all(&input).unwrap();
        std::fs::copy(case("int96-timestamps").join(file), input.join(file)).unwrap();
        let out = dir.path().join("out");
        let (ok, log) = score_dir(&input, &out, &[]);
        assert!(ok, "{file}: {log}");
        let mut got: Vec<(String, Option<String>)> = vec![];
        let dead = common::parquet_batches(&out.join("_dead_letter"));
        let all: Vec<_> = common::parquet_batches(&out)
            .into_iter()
            .chain(dead)
            .collect();
        for b in &all {
            if b.column_by_name("capture_time").is_none() {
                continue;
            }
            got.extend(
                strings(b, "id")
                    .into_iter()
                    .map(Option::unwrap)
                    .zip(strings(b, "capture_time")),
            );
        }
        got.sort();
        let times: Vec<Option<String>> = got.into_iter().map(|(_, t)| t).collect();
        assert!(
            times.contains(&Some("1000-01-01T00:00:00".into())),
            "{file}: {times:?}"
        );
        assert!(
            times.contains(&Some("3000-01-01T00:00:00".into())),
            "{file}: {times:?}"
        );
        assert!(
            times.contains(&Some("2026-11-29T12:00:00".into())),
            "{file}: {times:?}"
        );
    }
}

fn png(shade: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(28, 28, image::Luma([shade]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// Dead-letter (id, reason) pairs of a scoring run.
fn dead_letters(out: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = common::parquet_batches(&out.join("_dead_letter"))
        .iter()
        .flat_map(|b| {
            strings(b, "id")
                .into_iter()
                .zip(strings(b, "reason"))
                .map(|(i, r)| (i.unwrap(), r.unwrap()))
                .collect::<Vec<_>>()
        })
        .collect();
    v.sort();
    v
}

/// Image columns as common writers store them: dictionary-encoded binary, and the Hugging Face
/// `datasets` image struct `{bytes, path}`; null images (and structs holding only a path) are
/// dead-lettered with reason `null`, the rest scored.
#[test]
fn dictionary_and_hugging_face_image_columns_are_read_and_nulls_dead_lettered() {
    use arrow::array::{
        BinaryArray, DictionaryArray, Int32Array, RecordBatch, StringArray, StructArray,
    };
    use arrow::datatypes::{DataType, Field, Fields};
    use std::sync::Arc;
    let ids = Arc::new(StringArray::from(vec!["a", "b", "c", "d"]));
    // Dictionary: rows a and c share one image; row d is null.
    let values = Arc::new(BinaryArray::from_iter_values([png(10), png(200)]));
    let keys = Int32Array::from(vec![Some(0), Some(1), Some(0), None]);
    let dict = DictionaryArray::try_new(keys, values).unwrap();
    let dict_batch = RecordBatch::try_from_iter(vec![
        ("id", ids.clone() as _),
        ("image", Arc::new(dict) as _),
    ])
    .unwrap();
    // Hugging Face: d holds only a path (no bytes), c is a null struct.
    let fields = Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        Field::new("path", DataType::Utf8, true),
    ]);
    let bytes = BinaryArray::from(vec![Some(&png(10)[..]), Some(&png(90)[..]), None, None]);
    let paths = StringArray::from(vec![Some("a.png"), None, None, Some("d.png")]);
    let hf = StructArray::try_new(
        fields,
        vec![Arc::new(bytes), Arc::new(paths)],
        Some(vec![true, true, false, true].into()),
    )
    .unwrap();
    let hf_batch =
        RecordBatch::try_from_iter(vec![("id", ids as _), ("image", Arc::new(hf) as _)]).unwrap();
    for (name, batch, scored, dead) in [
        ("dictionary", dict_batch, 3, vec!["d"]),
        ("hugging-face", hf_batch, 2, vec!["c", "d"]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.parquet");
        common::write_batch(&input, &batch);
        let out = dir.path().join("out");
        let (ok, log) = score_dir(&input, &out, &[]);
        assert!(ok, "{name}: {log}");
        let n: usize = common::parquet_batches(&out)
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(n, scored, "{name}");
        let want: Vec<(String, String)> = dead
            .iter()
            .map(|i| (i.to_string(), "null".to_string()))
            .collect();
        assert_eq!(dead_letters(&out), want, "{name}");
    }
}

/// The truncation policy holds for PNG and WebP too: a PNG missing only its IEND chunk decodes
/// to the full file's pixels; PNG or WebP data cut short is `truncated`, not `corrupt`.
#[test]
fn png_and_webp_cut_short_are_truncated_and_a_missing_png_end_chunk_is_not() {
    use glowwatch::pipeline::decode::DecodeReason;
    let img = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(48, 40, |x, y| {
        image::Luma([((x * 31 + y * 17) % 251) as u8])
    }));
    let encode = |f: image::ImageFormat| {
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, f).unwrap();
        out.into_inner()
    };
    let limits = DecodeLimits::default();
    let png = encode(image::ImageFormat::Png);
    let full = decode_upright(&png, &limits).unwrap().to_luma8();
    let no_iend = decode_upright(&png[..png.len() - 12], &limits)
        .unwrap()
        .to_luma8();
    assert_eq!(full, no_iend);
    for (name, bytes) in [("png", png), ("webp", encode(image::ImageFormat::WebP))] {
        for pct in [30, 60, 90] {
            let cut = &bytes[..bytes.len() * pct / 100];
            let e = decode_upright(cut, &limits).err().unwrap();
            assert_eq!(
                e.reason,
                DecodeReason::Truncated,
                "{name} cut at {pct} %: {e}"
            );
        }
    }
}
