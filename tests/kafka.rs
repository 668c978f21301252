//! The Kafka pipeline against a real broker (tansu, started per test; see
//! `tests/common/broker.rs`): 10,000 real images end to end with the expected flags and
//! offsets committed to the end; kill -9 mid-stream and restart without losing a record;
//! malformed messages and envelopes to the dead-letter topic with reasons and coordinates;
//! two instances in one group sharing the partitions and scoring every record once; drift
//! alarms to the alarm topic and the live dashboard's counts of a stream.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use common::broker::{Broker, Produce as Msg, TopicReader, free_port, header};
use glowwatch::device::DeviceSpec;
use glowwatch::pipeline::config::PipelineConfig;
use glowwatch::pipeline::decode::{DecodeLimits, decode_image};
use glowwatch::pipeline::score::ModelScorer;
use glowwatch::pipeline::stream::{StreamSummary, run_stream};
use glowwatch::score::ScoreKind;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;

/// The first `n` (id, PNG) rows of a shared dataset.
fn images(name: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    let f = std::fs::File::open(common::shared(name)).unwrap();
    let r = ParquetRecordBatchReaderBuilder::try_new(f)
        .unwrap()
        .with_limit(n)
        .build()
        .unwrap();
    let mut out = Vec::new();
    for b in r {
        let b = b.unwrap();
        let ids = arrow::compute::cast(
            b.column_by_name("id").unwrap(),
            &arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let ids = ids.as_string::<i32>();
        let img = b.column_by_name("image").unwrap().as_binary::<i32>();
        for i in 0..b.num_rows() {
            out.push((ids.value(i).to_string(), img.value(i).to_vec()));
        }
    }
    out
}

fn png_messages(rows: &[(String, Vec<u8>)]) -> Vec<Msg> {
    rows.iter()
        .map(|(id, png)| {
            (
                id.clone(),
                Some(png.clone()),
                vec![
                    ("content-type".into(), "image/png".into()),
                    ("source".into(), "fashion-mnist".into()),
                    ("capture-time".into(), "2026-11-29T03:00:00Z".into()),
                ],
            )
        })
        .collect()
}

struct Setup<'a> {
    dir: &'a Path,
    broker: &'a Broker,
    topic: &'a str,
    group: &'a str,
    model: &'a Path,
    threshold: f64,
    extra_source: &'a str,
    /// librdkafka consumer settings (TOML lines).
    options: &'a str,
    sinks: &'a str,
    metrics: Option<u16>,
}

fn pipeline_text(s: &Setup) -> String {
    let metrics = s
        .metrics
        .map(|p| format!("[metrics]\nlisten = \"127.0.0.1:{p}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
name = "kafka-test"
[source]
kind = "kafka"
[source.kafka]
brokers = "{brokers}"
group = "{group}"
topics = ["{topic}"]
max_batch_rows = 64
max_wait_ms = 50
commit_interval_ms = 200
{extra}
[source.kafka.options]
"statistics.interval.ms" = "500"
{options}
[models]
in = "{model}"
device = "cpu"
batch = 64
[flag]
score = "nll"
threshold = {threshold}
{sinks}
{metrics}
"#,
        brokers = s.broker.addr,
        group = s.group,
        topic = s.topic,
        extra = s.extra_source,
        options = s.options,
        model = s.model.display(),
        threshold = s.threshold,
        sinks = s.sinks,
    )
}

fn pipeline(s: &Setup) -> PipelineConfig {
    PipelineConfig::parse(&pipeline_text(s), s.dir).unwrap()
}

const KAFKA_SINKS: &str = r#"
[sinks.kafka]
scored_topic = "scored"
dead_letter_topic = "dead"
[sinks.scored]
path = "out/scored"
partition = "none"
max_file_age_s = 0.5
[sinks.dead_letter]
path = "out/dead"
partition = "none"
max_file_age_s = 0.5
"#;

/// Runs a pipeline on a thread until `until` returns true (checked every 100 ms), then stops
/// it and returns its summary.
fn run_until(
    cfg: &PipelineConfig,
    mut until: impl FnMut() -> bool,
    limit: Duration,
) -> StreamSummary {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| run_stream(cfg, &stop));
        let t0 = Instant::now();
        while !until() && t0.elapsed() < limit && !h.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap().unwrap()
    })
}

fn json(m: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(m.payload().unwrap()).unwrap()
}

/// Ids of a Parquet sink directory's files.
fn parquet_ids(dir: &Path) -> Vec<String> {
    let mut ids = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "parquet"));
    for f in files {
        let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in r {
            let b = b.unwrap();
            let c = b.column_by_name("id").unwrap().as_string::<i32>();
            ids.extend(c.iter().map(|v| v.unwrap().to_string()));
        }
    }
    ids
}

/// nll of each image by the same model, scored directly (not through the pipeline).
fn direct_nll(model: &Path, rows: &[(String, Vec<u8>)]) -> BTreeMap<String, f64> {
    let scorer = ModelScorer::load(
        model,
        None,
        DeviceSpec::Cpu,
        glowwatch::glow::Precision::F32,
        256,
    )
    .unwrap();
    let cfg = scorer.config().clone();
    let mut px = Vec::new();
    for (_, png) in rows {
        px.extend(decode_image(png, &cfg, &DecodeLimits::default()).unwrap());
    }
    let scores = scorer.score_pixels(&px).unwrap();
    rows.iter()
        .zip(scores)
        .map(|((id, _), s)| (id.clone(), ScoreKind::Nll.value(&s)))
        .collect()
}

#[test]
fn ten_thousand_images_are_scored_flagged_and_committed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    broker.create_topic("images", 3);
    broker.create_topic("scored", 3);
    broker.create_topic("dead", 1);
    let model = common::tiny_model(dir.path(), 1);
    let rows = images("fashion_mnist_test.parquet", 10_000);
    let nll = direct_nll(&model, &rows);
    let mut sorted: Vec<f64> = nll.values().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let threshold = sorted[9_000];
    broker.produce("images", &png_messages(&rows));
    let cfg = pipeline(&Setup {
        dir: dir.path(),
        broker: &broker,
        topic: "images",
        group: "scorers",
        model: &model,
        threshold,
        extra_source: "",
        options: "",
        sinks: KAFKA_SINKS,
        metrics: None,
    });
    let mut reader = TopicReader::new(&broker, "scored");
    let summary = run_until(
        &cfg,
        || reader.poll_until(10_000, Duration::from_millis(100)),
        Duration::from_secs(300),
    );
    assert_eq!(summary.consumed, 10_000, "{summary:?}");
    assert_eq!((summary.scored, summary.dead_lettered), (10_000, 0));

    // Every id once in the scored topic, keyed by id, with coordinates and model id.
    let msgs = reader.messages();
    let mut seen = BTreeMap::new();
    for m in msgs {
        let v = json(m);
        let id = v["id"].as_str().unwrap().to_string();
        assert_eq!(m.key(), Some(id.as_bytes()));
        assert!(v["kafka_partition"].is_i64() && v["kafka_offset"].is_i64());
        assert_eq!(v["kafka_topic"], "images");
        assert!(v["model_id"].as_str().unwrap().starts_with("glow-"), "{v}");
        assert_eq!(v["source"], "fashion-mnist");
        assert!(
            v.get("image").is_none(),
            "images are left out of scored messages"
        );
        assert!(seen.insert(id, v).is_none(), "duplicate in a clean run");
    }
    assert_eq!(seen.len(), 10_000);
    // Flags are the ones the threshold gives on directly computed scores.
    let mut mismatched = 0;
    for (id, v) in &seen {
        let want = nll[id];
        let got = v["score"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-6 * want.abs(),
            "{id}: {got} vs {want}"
        );
        if (want - threshold).abs() > 1e-6 * want.abs() {
            mismatched += usize::from(v["is_ood"].as_bool().unwrap() != (want > threshold));
        }
    }
    assert_eq!(mismatched, 0);
    let flagged = seen.values().filter(|v| v["is_ood"] == true).count();
    assert!((900..=1100).contains(&flagged), "{flagged}");
    // The Parquet sink holds the same records.
    let mut pq = parquet_ids(&dir.path().join("out/scored"));
    pq.sort();
    assert_eq!(pq, seen.keys().cloned().collect::<Vec<_>>());
    // Committed offsets reached the end of every partition.
    assert_eq!(
        broker.committed("scorers", "images", 3),
        broker.end_offsets("images", 3)
    );
}

#[test]
fn malformed_messages_and_envelopes_go_to_the_dead_letter_topic() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::with_topics("in", 2);
    let model = common::tiny_model(dir.path(), 2);
    let rows = images("fashion_mnist_test.parquet", 40);
    let mut msgs = png_messages(&rows);
    let png = rows[0].1.clone();
    let random: Vec<u8> = (0..500u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let bad: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        ("random", Some(random), "unknown_format"),
        (
            "truncated",
            Some(png[..png.len() / 2].to_vec()),
            "truncated",
        ),
        ("empty", Some(vec![]), "empty"),
        ("tombstone", None, "null"),
    ];
    for (id, v, _) in &bad {
        msgs.push((id.to_string(), v.clone(), vec![]));
    }
    broker.produce("in", &msgs);
    let cfg = pipeline(&Setup {
        dir: dir.path(),
        broker: &broker,
        topic: "in",
        group: "g",
        model: &model,
        threshold: 1e9,
        extra_source: "",
        options: "",
        sinks: KAFKA_SINKS,
        metrics: None,
    });
    let mut dead = TopicReader::new(&broker, "dead");
    let mut scored = TopicReader::new(&broker, "scored");
    let s = run_until(
        &cfg,
        || {
            dead.poll_until(4, Duration::from_millis(50))
                && scored.poll_until(40, Duration::from_millis(50))
        },
        Duration::from_secs(120),
    );
    assert_eq!((s.scored, s.dead_lettered), (40, 4), "{s:?}");
    // Where each input message was.
    let input: BTreeMap<String, (i32, i64)> = TopicReader::new(&broker, "in")
        .read(44)
        .iter()
        .map(|m| {
            (
                String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
                (m.partition(), m.offset()),
            )
        })
        .collect();
    let got: BTreeMap<String, &OwnedMessage> = dead
        .messages()
        .iter()
        .map(|m| (String::from_utf8(m.key().unwrap().to_vec()).unwrap(), m))
        .collect();
    assert_eq!(got.len(), 4);
    for (id, value, reason) in &bad {
        let m = got[*id];
        assert_eq!(
            header(m, "__connect.errors.exception.class.name").as_deref(),
            Some(*reason),
            "{id}"
        );
        assert!(header(m, "__connect.errors.exception.message").is_some_and(|d| !d.is_empty()));
        assert_eq!(header(m, "__connect.errors.topic").as_deref(), Some("in"));
        let (p, o) = input[*id];
        assert_eq!(
            header(m, "__connect.errors.partition"),
            Some(p.to_string()),
            "{id}"
        );
        assert_eq!(
            header(m, "__connect.errors.offset"),
            Some(o.to_string()),
            "{id}"
        );
        assert_eq!(
            m.payload().unwrap_or_default(),
            value.as_deref().unwrap_or_default(),
            "{id}: original bytes"
        );
    }
    // The Parquet dead-letter sink has them too, and nothing blocked the partitions.
    let mut pq = parquet_ids(&dir.path().join("out/dead"));
    pq.sort();
    assert_eq!(pq, ["empty", "random", "tombstone", "truncated"]);
    assert_eq!(broker.committed("g", "in", 2), broker.end_offsets("in", 2));

    // JSON envelopes: a good one is scored under its own id; bad ones are dead letters.
    broker.create_topic("env", 1);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
    let envelopes: Vec<Msg> = vec![
        (
            "k1".into(),
            Some(
                format!(r#"{{"id": "env-ok", "image_b64": "{b64}", "source": "cam-1"}}"#)
                    .into_bytes(),
            ),
            vec![],
        ),
        ("k2".into(), Some(b"{not json".to_vec()), vec![]),
        (
            "k3".into(),
            Some(br#"{"id": "x", "image_b64": "!!!"}"#.to_vec()),
            vec![],
        ),
    ];
    broker.produce("env", &envelopes);
    let cfg = pipeline(&Setup {
        dir: dir.path(),
        broker: &broker,
        topic: "env",
        group: "g-env",
        model: &model,
        threshold: 1e9,
        extra_source: "format = \"json_envelope\"",
        options: "",
        sinks: KAFKA_SINKS,
        metrics: None,
    });
    let s = run_until(
        &cfg,
        || {
            dead.poll_until(6, Duration::from_millis(50))
                && scored.poll_until(41, Duration::from_millis(50))
        },
        Duration::from_secs(120),
    );
    assert_eq!((s.scored, s.dead_lettered), (1, 2), "{s:?}");
    assert_eq!(s.dead_by_reason.get("bad_envelope"), Some(&2));
    let ok = scored
        .messages()
        .iter()
        .find(|m| m.key() == Some(b"env-ok"))
        .expect("envelope scored");
    assert_eq!(json(ok)["source"], "cam-1");
    for m in &dead.messages()[4..] {
        assert_eq!(
            header(m, "__connect.errors.exception.class.name").as_deref(),
            Some("bad_envelope")
        );
        let orig = envelopes
            .iter()
            .find(|e| e.1.as_deref() == m.payload())
            .expect("original value");
        assert_ne!(orig.0, "k1");
    }
}

/// HTTP GET of `path` on the metrics listener: the whole response, headers included.
fn get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn kill_nine_mid_stream_then_restart_loses_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    broker.create_topic("images", 3);
    broker.create_topic("scored", 3);
    broker.create_topic("dead", 1);
    // A real model, slow enough on CPU that the kill lands mid-stream.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fashion-mnist.safetensors");
    let rows = images("fashion_mnist_test.parquet", 3_000);
    broker.produce("images", &png_messages(&rows));
    let port = free_port();
    let text = pipeline_text(&Setup {
        dir: dir.path(),
        broker: &broker,
        topic: "images",
        group: "crashy",
        model: &model,
        threshold: 2900.0,
        extra_source: "",
        // A short session so the restarted process gets the dead one's partitions quickly.
        options: "\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"500\"",
        sinks: KAFKA_SINKS,
        metrics: Some(port),
    });
    let toml = dir.path().join("kafka.toml");
    std::fs::write(&toml, text).unwrap();
    let start = |n: u32| {
        std::process::Command::new(env!("CARGO_BIN_EXE_glowwatch"))
            .args(["run", toml.to_str().unwrap()])
            .stdout(std::fs::File::create(dir.path().join(format!("run{n}.out"))).unwrap())
            .stderr(std::fs::File::create(dir.path().join(format!("run{n}.err"))).unwrap())
            .spawn()
            .unwrap()
    };
    let mut reader = TopicReader::new(&broker, "scored");
    let mut first = start(1);
    let t0 = Instant::now();
    while !reader.poll_until(600, Duration::from_millis(50)) {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no progress before the kill"
        );
        assert!(first.try_wait().unwrap().is_none(), "pipeline exited early");
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let at_kill = broker.committed("crashy", "images", 3);
    let seen_at_kill = reader.messages().len();
    assert!(
        seen_at_kill < 3_000,
        "the kill came too late to test anything"
    );

    let mut second = start(2);
    let t0 = Instant::now();
    while reader.distinct_keys() < 3_000 {
        assert!(
            t0.elapsed() < Duration::from_secs(240),
            "restart did not finish"
        );
        reader.poll_until(usize::MAX, Duration::from_millis(200));
    }
    // Give the statistics callback a moment, then check the metrics endpoint.
    std::thread::sleep(Duration::from_millis(1500));
    let metrics = get(port, "/metrics");
    for name in [
        "glowwatch_records_consumed_total",
        "glowwatch_records_scored_total",
        "glowwatch_records_flagged_total{score=\"nll\"}",
        "glowwatch_batch_seconds_bucket",
        "glowwatch_end_to_end_seconds_bucket",
        "glowwatch_queue_depth{stage=\"decode\"}",
        "glowwatch_consumer_lag{",
        "glowwatch_commits_total",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    // SIGTERM: drain, commit, exit 0.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let status = second.wait().unwrap();
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(dir.path().join("run2.err")).unwrap()
    );

    // No id missing; every duplicate is from the uncommitted window at the kill.
    let mut by_coord: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    let mut ids = BTreeSet::new();
    for m in reader.messages() {
        let v = json(m);
        ids.insert(v["id"].as_str().unwrap().to_string());
        let c = (
            v["kafka_partition"].as_i64().unwrap() as i32,
            v["kafka_offset"].as_i64().unwrap(),
        );
        *by_coord.entry(c).or_default() += 1;
    }
    assert_eq!(ids.len(), 3_000);
    assert_eq!(by_coord.len(), 3_000);
    let dups: Vec<_> = by_coord.iter().filter(|(_, n)| **n > 1).collect();
    for ((p, o), _) in &dups {
        assert!(
            *o >= at_kill[p],
            "offset {o} of partition {p} was committed ({}) yet scored twice",
            at_kill[p]
        );
    }
    let window: i64 = (0..3)
        .map(|p| broker.end_offsets("images", 3)[&p] - at_kill[&p].max(0))
        .sum();
    assert!(dups.len() as i64 <= window);
    assert_eq!(
        broker.committed("crashy", "images", 3),
        broker.end_offsets("images", 3)
    );
    eprintln!(
        "kill -9 after {seen_at_kill} scored records; committed then {at_kill:?}; {} duplicates after restart",
        dups.len()
    );
}

#[test]
fn two_instances_in_one_group_share_the_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start();
    broker.create_topic("images", 4);
    broker.create_topic("scored", 2);
    broker.create_topic("dead", 1);
    // The second instance joins while the first is mid-stream, so the first has to give
    // partitions up with work in flight.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fashion-mnist.safetensors");
    let rows = images("fashion_mnist_test.parquet", 2_000);
    let cfg = |n: u32| {
        pipeline(&Setup {
            dir: dir.path(),
            broker: &broker,
            topic: "images",
            group: "pair",
            model: &model,
            threshold: 1e9,
            extra_source: "",
            options: "",
            sinks: &KAFKA_SINKS.replace("out/", &format!("out{n}/")),
            metrics: None,
        })
    };
    let (a, b) = (cfg(1), cfg(2));
    let (stop_a, stop_b) = (AtomicBool::new(false), AtomicBool::new(false));
    let mut reader = TopicReader::new(&broker, "scored");
    let msgs = png_messages(&rows);
    let (sa, sb, b_joined_at) = std::thread::scope(|s| {
        // The records arrive over ~20 s, as from a live feed, so both instances are alive for
        // most of the stream and the rebalance happens with work in flight however fast the
        // scorer is. (Produced all at once, the first instance sometimes scored all 2,000 before
        // the group had rebalanced: "one instance did all the work: 2000 / 0".)
        s.spawn(|| {
            for chunk in msgs.chunks(100) {
                broker.produce("images", chunk);
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        let ha = s.spawn(|| run_stream(&a, &stop_a));
        let t0 = Instant::now();
        while !reader.poll_until(300, Duration::from_millis(100)) {
            assert!(t0.elapsed() < Duration::from_secs(120), "no progress");
        }
        let b_joined_at = reader.messages().len();
        let hb = s.spawn(|| run_stream(&b, &stop_b));
        let t0 = Instant::now();
        while reader.distinct_keys() < 2_000 {
            assert!(
                t0.elapsed() < Duration::from_secs(240),
                "not every record was scored"
            );
            reader.poll_until(usize::MAX, Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(500));
        stop_a.store(true, Ordering::SeqCst);
        stop_b.store(true, Ordering::SeqCst);
        (
            ha.join().unwrap().unwrap(),
            hb.join().unwrap().unwrap(),
            b_joined_at,
        )
    });
    eprintln!(
        "second instance started after {b_joined_at} records; scored {} + {}",
        sa.scored, sb.scored
    );
    reader.poll_until(usize::MAX, Duration::from_secs(1));
    assert!(
        sa.scored > 0 && sb.scored > 0,
        "one instance did all the work: {} / {}",
        sa.scored,
        sb.scored
    );
    assert_eq!(
        sa.scored + sb.scored,
        2_000,
        "every record scored exactly once, across the rebalance"
    );
    assert_eq!(reader.messages().len(), 2_000);
    assert_eq!(reader.distinct_keys(), 2_000);
    assert_eq!(
        broker.committed("pair", "images", 4),
        broker.end_offsets("images", 4)
    );
}

#[test]
fn scored_records_as_arrow_ipc_streams() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::with_topics("in", 1);
    let model = common::tiny_model(dir.path(), 4);
    let rows = images("mnist.parquet", 150);
    broker.produce("in", &png_messages(&rows));
    let sinks = r#"
[sinks.kafka]
scored_topic = "scored"
format = "arrow"
include_image = true
dead_letter_topic = "dead"
"#;
    let cfg = pipeline(&Setup {
        dir: dir.path(),
        broker: &broker,
        topic: "in",
        group: "arrow",
        model: &model,
        threshold: 1e9,
        extra_source: "",
        options: "",
        sinks,
        metrics: None,
    });
    let mut reader = TopicReader::new(&broker, "scored");
    let mut rows_read = 0;
    let mut ids = BTreeSet::new();
    let s = run_until(
        &cfg,
        || {
            reader.poll_until(usize::MAX, Duration::from_millis(50));
            rows_read = 0;
            for m in reader.messages() {
                let r =
                    arrow::ipc::reader::StreamReader::try_new(m.payload().unwrap(), None).unwrap();
                for b in r {
                    let b = b.unwrap();
                    rows_read += b.num_rows();
                    assert_eq!(b.schema().field(0).name(), "id");
                    assert!(
                        b.column_by_name("image").is_some(),
                        "include_image keeps the bytes"
                    );
                    assert!(b.column_by_name("lp_scale_2").is_some());
                    let c = b.column_by_name("id").unwrap().as_string::<i32>();
                    ids.extend(c.iter().map(|v| v.unwrap().to_string()));
                }
                assert_eq!(
                    header(m, "glowwatch.rows")
                        .unwrap()
                        .parse::<usize>()
                        .unwrap(),
                    arrow::ipc::reader::StreamReader::try_new(m.payload().unwrap(), None)
                        .unwrap()
                        .map(|b| b.unwrap().num_rows())
                        .sum::<usize>()
                );
            }
            rows_read >= 150
        },
        Duration::from_secs(120),
    );
    assert_eq!(s.scored, 150);
    assert_eq!(
        rows_read, 150,
        "one IPC stream per micro-batch, every record once"
    );
    assert_eq!(ids.len(), 150);
    assert!(
        reader.messages().len() < 150,
        "batched, not one message per record"
    );
}

#[test]
fn a_running_pipeline_switches_registry_versions_between_batches() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::with_topics("in", 2);
    let registry = glowwatch::registry::Registry::open(dir.path().join("registry/m")).unwrap();
    let v1 = registry
        .add_version(&common::tiny_model(dir.path(), 6), &[])
        .unwrap();
    let v2 = registry
        .add_version(&common::tiny_model(dir.path(), 7), &[])
        .unwrap();
    registry.promote(&v1.name).unwrap();
    let id_of = |v: &glowwatch::registry::Version| {
        glowwatch::glow::GlowModel::load(v.model(), &candle_core::Device::Cpu)
            .unwrap()
            .model_id()
            .unwrap()
    };
    let (id1, id2) = (id_of(&v1), id_of(&v2));
    let rows = images("fashion_mnist_test.parquet", 600);
    let text = pipeline_text(&Setup {
        dir: dir.path(),
        broker: &broker,
        topic: "in",
        group: "swap",
        model: Path::new("unused"),
        threshold: 1e9,
        extra_source: "",
        options: "",
        sinks: KAFKA_SINKS,
        metrics: None,
    })
    .replace(
        "in = \"unused\"",
        &format!("registry = \"{}\"", registry.dir().display()),
    );
    let cfg = PipelineConfig::parse(&text, dir.path()).unwrap();
    let mut reader = TopicReader::new(&broker, "scored");
    let s = run_until(
        &cfg,
        || {
            if reader.messages().is_empty() {
                broker.produce("in", &png_messages(&rows[..300]));
                assert!(reader.poll_until(300, Duration::from_secs(120)));
                // Every first-half record is scored: promote v2, then send the second half.
                registry.promote("v0002").unwrap();
                broker.produce("in", &png_messages(&rows[300..]));
            }
            reader.poll_until(600, Duration::from_millis(100))
        },
        Duration::from_secs(240),
    );
    assert_eq!(s.scored, 600);
    let mut by_id = BTreeMap::new();
    for m in reader.messages() {
        let v = json(m);
        let id = v["id"].as_str().unwrap().to_string();
        let ver = (
            v["model_version"].as_str().unwrap().to_string(),
            v["model_id"].as_str().unwrap().to_string(),
        );
        assert!(by_id.insert(id, ver).is_none(), "a record scored twice");
    }
    assert_eq!(by_id.len(), 600);
    for (i, (id, _)) in rows.iter().enumerate() {
        let want = if i < 300 {
            ("v0001".to_string(), id1.clone())
        } else {
            ("v0002".to_string(), id2.clone())
        };
        assert_eq!(by_id[id], want, "{id}");
    }
}

/// Messages that real feeds carry: no key, a key and header values that are not UTF-8, a value
/// above the decode size limit, a tombstone, and batches compressed with every codec librdkafka
/// supports. Each is scored or dead-lettered with a reason; no partition is blocked.
#[test]
fn edge_case_messages_are_scored_or_dead_lettered_and_never_block_a_partition() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::with_topics("edge", 2);
    let model = common::tiny_model(dir.path(), 2);
    let rows = images("fashion_mnist_test.parquet", 24);
    let png = rows[0].1.clone();
    let mut big = png.clone();
    big.resize(40_000, 7); // a PNG signature, then more bytes than max_bytes allows
    let odd: Vec<common::broker::RawProduce> = vec![
        (None, Some(png.clone()), vec![]),
        (
            Some(vec![0xff, 0x01]),
            Some(png.clone()),
            vec![
                ("source".into(), vec![0xff, 0xfe]),
                ("x-binary".into(), vec![0, 159, 146, 150]),
            ],
        ),
        (Some(b"too-big".to_vec()), Some(big), vec![]),
        (Some(b"tombstone".to_vec()), None, vec![]),
    ];
    broker.produce_with("edge", &odd, "none");
    // Snappy is left out: the test broker (tansu 0.6.0) stores snappy batches but cannot serve
    // them (measured with a plain rdkafka consumer and no glowwatch: every fetch of the
    // partition fails with `UnexpectedType("Snappy")` and the connection drops, so no client
    // reads past that batch), so snappy cannot be tested against it.
    let codecs = ["gzip", "lz4", "zstd"];
    for (c, chunk) in codecs.iter().zip(rows[4..].chunks(5)) {
        let msgs: Vec<common::broker::RawProduce> = chunk
            .iter()
            .map(|(id, img)| {
                (
                    Some(format!("{c}-{id}").into_bytes()),
                    Some(img.clone()),
                    vec![],
                )
            })
            .collect();
        broker.produce_with("edge", &msgs, c);
    }
    let sinks = format!("[decode]\nmax_bytes = 20000\n{KAFKA_SINKS}");
    let cfg = pipeline(&Setup {
        dir: dir.path(),
        broker: &broker,
        topic: "edge",
        group: "g-edge",
        model: &model,
        threshold: 1e9,
        extra_source: "",
        options: "",
        sinks: &sinks,
        metrics: None,
    });
    let mut dead = TopicReader::new(&broker, "dead");
    let mut scored = TopicReader::new(&broker, "scored");
    let s = run_until(
        &cfg,
        || {
            dead.poll_until(2, Duration::from_millis(50))
                && scored.poll_until(17, Duration::from_millis(50))
        },
        Duration::from_secs(120),
    );
    let keys: Vec<String> = scored
        .messages()
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap()).into_owned())
        .collect();
    assert_eq!((s.scored, s.dead_lettered), (17, 2), "{s:?} {keys:?}");
    let reasons: BTreeMap<String, String> = dead
        .messages()
        .iter()
        .map(|m| {
            (
                String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
                header(m, "__connect.errors.exception.class.name").unwrap(),
            )
        })
        .collect();
    assert_eq!(reasons["too-big"], "too_many_bytes");
    assert_eq!(reasons["tombstone"], "null");
    let by_id: BTreeMap<String, serde_json::Value> = scored
        .messages()
        .iter()
        .map(|m| {
            (
                String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
                json(m),
            )
        })
        .collect();
    assert_eq!(by_id["hex:ff01"]["source"], "\u{fffd}\u{fffd}");
    assert!(
        by_id.keys().any(|k| k.starts_with("edge-")),
        "{:?}",
        by_id.keys()
    );
    for c in codecs {
        assert_eq!(
            by_id
                .keys()
                .filter(|k| k.starts_with(&format!("{c}-")))
                .count(),
            5,
            "{c}"
        );
    }
    assert_eq!(
        broker.committed("g-edge", "edge", 2),
        broker.end_offsets("edge", 2)
    );
}

/// While the broker is unreachable the pipeline keeps running and logs the outage once, then
/// a summary per interval — not one librdkafka error and one warning per poll (~40 lines a
/// second before).
#[test]
fn an_unreachable_broker_is_logged_once_then_counted() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::tiny_model(dir.path(), 2);
    let port = free_port(); // nothing listens there
    let toml = format!(
        r#"
name = "unreachable"
[source]
kind = "kafka"
[source.kafka]
brokers = "127.0.0.1:{port}"
group = "g"
topics = ["in"]
[source.kafka.options]
"reconnect.backoff.ms" = "10"
"reconnect.backoff.max.ms" = "50"
[models]
in = "{model}"
device = "cpu"
[flag]
score = "nll"
threshold = 1e9
[sinks.scored]
path = "out/scored"
[sinks.dead_letter]
path = "out/dead"
"#,
        model = model.display()
    );
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, toml).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_glowwatch"))
        .args(["run", cfg.to_str().unwrap()])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(6));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = log.lines().count();
    assert!(out.status.success(), "{log}");
    assert!(log.contains("repeats are counted"), "{log}");
    assert!(lines < 25, "{lines} lines in 6 s:\n{log}");
}

/// A streaming pipeline's drift alarms reach the alarm topic as JSON records, and its live
/// dashboard (`/api/state` on the metrics listener) counts the stream: a feed of Fashion-MNIST
/// test images that switches to MNIST digits, scored by the demo's detector.
#[test]
fn drift_alarms_reach_the_alarm_topic_and_the_live_board_counts_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::with_topics("images", 1);
    broker.create_topic("alarms", 1);
    let mut rows = images("fashion_mnist_test.parquet", 400);
    rows.extend(images("mnist.parquet", 300));
    broker.produce("images", &png_messages(&rows));
    let port = free_port();
    let text = format!(
        r#"
name = "drifting"
[source]
kind = "kafka"
[source.kafka]
brokers = "{brokers}"
group = "drift"
topics = ["images"]
max_batch_rows = 64
max_wait_ms = 50
[source.kafka.options]
"statistics.interval.ms" = "500"
{detector}
[sinks.kafka]
scored_topic = "scored"
alarm_topic = "alarms"
[sinks.dead_letter]
path = "out/dead"
partition = "none"
[metrics]
listen = "127.0.0.1:{port}"
"#,
        brokers = broker.addr,
        detector = common::demo_detector(),
    );
    let cfg = PipelineConfig::parse(&text, dir.path()).unwrap();
    let mut alarms = TopicReader::new(&broker, "alarms");
    let mut scored = TopicReader::new(&broker, "scored");
    let mut state = serde_json::Value::Null;
    let summary = run_until(
        &cfg,
        || {
            scored.poll_until(700, Duration::from_millis(20));
            alarms.poll_until(1, Duration::from_millis(20));
            if scored.messages().len() >= 700 && !alarms.messages().is_empty() {
                let body = get(port, "/api/state");
                state = serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap_or("null"))
                    .unwrap_or(serde_json::Value::Null);
                return state["scored"] == 700
                    && !state["lag"].as_object().is_none_or(|l| l.is_empty());
            }
            false
        },
        Duration::from_secs(240),
    );
    assert_eq!(summary.scored, 700);
    assert!(!summary.drift_alarms.is_empty(), "no alarm: {summary:?}");
    let a = json(&alarms.messages()[0]);
    assert_eq!(a["pipeline"], "drifting");
    assert_eq!(a["event"], "started");
    let record = a["record"].as_u64().unwrap();
    assert!(record > 400 && record <= 700, "alarm at record {record}");
    assert_eq!(
        alarms.messages()[0].key(),
        Some(a["score"].as_str().unwrap().as_bytes())
    );
    // The live board: the stream's counts, the alarm, the consumer lag.
    assert_eq!(state["scored"], 700, "{state}");
    assert_eq!(state["records"], 700);
    let listed = state["alarms"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|l| l["score"] == a["score"] && l["record"] == a["record"]),
        "{state}"
    );
    assert!(state["lag"]["images/0"].is_i64(), "{state}");
}
