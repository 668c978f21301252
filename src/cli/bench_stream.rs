//! `glowwatch bench-stream`: the Kafka pipeline end to end against a running broker, in one run:
//! pure scoring images/s of the model, pipeline images/s at saturation (a backlog), p50/p99
//! latency (produce -> scored record) at a fixed offered load, and the pipeline's memory under
//! a producer faster than the scorer. The pipeline runs as a child process (`glowwatch run`), so
//! its resident memory is its own.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};

use super::produce::{publish, read_images};
use crate::device::DeviceSpec;
use crate::glow::Precision;
use crate::pipeline::decode::{DecodeLimits, decode_image};
use crate::pipeline::score::ModelScorer;

/// Arguments of `glowwatch bench-stream`.
#[derive(Debug, Args)]
pub struct BenchStreamArgs {
    /// Kafka bootstrap servers of a running broker.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Parquet file with `id` and `image` columns.
    #[arg(long)]
    pub input: PathBuf,
    /// In-distribution model.
    #[arg(long)]
    pub model: PathBuf,
    /// General model.
    #[arg(long)]
    pub general: Option<PathBuf>,
    /// Images in the saturation backlog (and distinct images cycled by the other runs).
    #[arg(long, default_value_t = 4000)]
    pub images: usize,
    /// Offered load of the latency run, as a fraction of pure scoring images/s.
    #[arg(long, default_value_t = 0.5)]
    pub load: f64,
    /// Seconds of offered load in the latency run.
    #[arg(long, default_value_t = 20.0)]
    pub load_seconds: f64,
    /// Offered load of the overload run (a live producer), as a multiple of pure scoring
    /// images/s.
    #[arg(long, default_value_t = 10.0)]
    pub overload: f64,
    /// Seconds the overload producer runs.
    #[arg(long, default_value_t = 20.0)]
    pub overload_seconds: f64,
    /// Micro-batch rows and model batch.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Where pipeline files and logs go (default: a temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

struct Phase<'a> {
    a: &'a BenchStreamArgs,
    dir: PathBuf,
    name: String,
}

impl Phase<'_> {
    fn topic(&self) -> String {
        format!("{}-in", self.name)
    }
    fn out(&self) -> String {
        format!("{}-scored", self.name)
    }

    fn create_topics(&self) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.a.brokers)
            .create()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (input, output) = (self.topic(), self.out());
        let topics = [
            NewTopic::new(&input, 3, TopicReplication::Fixed(1)),
            NewTopic::new(&output, 3, TopicReplication::Fixed(1)),
            NewTopic::new("bench-dead-letter", 1, TopicReplication::Fixed(1)),
        ];
        for r in rt.block_on(admin.create_topics(&topics, &AdminOptions::new()))? {
            match r {
                Ok(_) => {}
                Err((t, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists))
                    if t == "bench-dead-letter" => {}
                Err((t, e)) => return Err(anyhow!("creating topic {t}: {e}")),
            }
        }
        Ok(())
    }

    /// Starts `glowwatch run` on this phase's topics.
    fn start(&self) -> Result<Child> {
        let a = self.a;
        let (score, general) = match &a.general {
            Some(g) => ("llr", format!("general = {:?}", g.canonicalize()?)),
            None => ("nll", String::new()),
        };
        let toml = format!(
            r#"name = "{name}"
[source]
kind = "kafka"
[source.kafka]
brokers = "{brokers}"
group = "{name}"
topics = ["{topic}"]
max_batch_rows = {batch}
max_wait_ms = 50
[models]
in = {model:?}
{general}
device = "{device}"
batch = {batch}
[flag]
score = "{score}"
threshold = 1e9
[sinks.kafka]
scored_topic = "{out}"
dead_letter_topic = "bench-dead-letter"
"#,
            name = self.name,
            brokers = a.brokers,
            topic = self.topic(),
            out = self.out(),
            batch = a.batch,
            model = a.model.canonicalize()?,
            device = a.device,
        );
        let path = self.dir.join(format!("{}.toml", self.name));
        std::fs::write(&path, toml)?;
        let log = std::fs::File::create(self.dir.join(format!("{}.log", self.name)))?;
        Ok(Command::new(std::env::current_exe()?)
            .args(["run", path.to_str().context("path")?])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?)
    }

    fn reader(&self) -> Result<BaseConsumer> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.a.brokers)
            .set("group.id", format!("{}-reader", self.name))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()?;
        c.subscribe(&[&self.out()])?;
        Ok(c)
    }
}

/// A scored record as read back: (scored message time ms, input message time ms).
fn read_scored(c: &BaseConsumer, want: usize, limit: Duration) -> Result<Vec<(i64, i64)>> {
    let t0 = Instant::now();
    let mut out = Vec::with_capacity(want.min(1 << 16));
    while out.len() < want && t0.elapsed() < limit {
        let Some(m) = c.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        let scored_ms = m.timestamp().to_millis().unwrap_or(0);
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
        let input_ms = v["kafka_timestamp"]
            .as_str()
            .and_then(parse_time_ms)
            .context("scored record without kafka_timestamp")?;
        out.push((scored_ms, input_ms));
    }
    Ok(out)
}

fn parse_time_ms(s: &str) -> Option<i64> {
    let s = s.replace("+00:00", "Z");
    let t = humantime::parse_rfc3339_weak(&s).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64)
}

fn rss_mib(pid: u32, key: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn stop(mut child: Child) -> Result<()> {
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait()?;
    if !st.success() {
        return Err(anyhow!("pipeline exited with {st}"));
    }
    Ok(())
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs `glowwatch bench-stream`.
pub fn run(a: BenchStreamArgs) -> Result<()> {
    let dir = match &a.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => std::env::temp_dir().join(format!("glowwatch-bench-stream-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let images = read_images(&a.input, a.images)?;
    let n = images.len();

    // Pure scoring of the same images by the same models.
    let scorer = ModelScorer::load(
        &a.model,
        a.general.as_deref(),
        a.device,
        Precision::F32,
        a.batch,
    )?;
    let cfg = scorer.config().clone();
    let mut px = Vec::new();
    for (_, png) in &images {
        px.extend(decode_image(png, &cfg, &DecodeLimits::default()).map_err(|e| anyhow!("{e}"))?);
    }
    scorer.score_pixels(&px[..cfg.dims() * a.batch.min(n)])?;
    let t = Instant::now();
    scorer.score_pixels(&px)?;
    let pure = n as f64 / t.elapsed().as_secs_f64();
    drop(scorer);
    let stamp = format!(
        "bench-{}-{}",
        std::process::id(),
        crate::pipeline::run::run_id().replace('-', "")
    );
    let phase = |p: &str| Phase {
        a: &a,
        dir: dir.clone(),
        name: format!("{stamp}-{p}"),
    };

    // Saturation: a backlog of n images, throughput from the scored records' timestamps.
    let sat = phase("saturation");
    sat.create_topics()?;
    publish(&a.brokers, &sat.topic(), &images, n, None)?;
    let reader = sat.reader()?;
    let child = sat.start()?;
    let got = read_scored(&reader, n, Duration::from_secs(3600))?;
    stop(child)?;
    if got.len() < n {
        return Err(anyhow!("saturation: {} of {n} scored", got.len()));
    }
    let first = got.iter().map(|g| g.0).min().unwrap_or(0);
    let last = got.iter().map(|g| g.0).max().unwrap_or(0);
    let saturated = (n - 1) as f64 / ((last - first).max(1) as f64 / 1e3);

    // Fixed offered load: latency from produce to scored record.
    let lat = phase("latency");
    lat.create_topics()?;
    let reader = lat.reader()?;
    let child = lat.start()?;
    publish(&a.brokers, &lat.topic(), &images[..1], 1, None)?;
    read_scored(&reader, 1, Duration::from_secs(120))?; // the group has joined
    let rate = a.load * pure;
    let count = (rate * a.load_seconds).round().max(1.0) as usize;
    let brokers = a.brokers.clone();
    let topic = lat.topic();
    let prod = std::thread::scope(|s| -> Result<(Vec<(i64, i64)>, f64)> {
        let h = s.spawn(|| publish(&brokers, &topic, &images, count, Some(rate)));
        let got = read_scored(
            &reader,
            count,
            Duration::from_secs_f64(a.load_seconds * 4.0 + 60.0),
        )?;
        h.join().map_err(|_| anyhow!("producer panicked"))??;
        let span = (got.iter().map(|g| g.0).max().unwrap_or(0)
            - got.iter().map(|g| g.0).min().unwrap_or(0)) as f64
            / 1e3;
        Ok((got, span))
    })?;
    stop(child)?;
    let (got, span) = prod;
    let mut lats: Vec<f64> = got.iter().map(|(s, i)| (s - i) as f64).collect();
    let (p50, p99) = (percentile(&mut lats, 0.5), percentile(&mut lats, 0.99));

    // Overload: a live producer offering `overload` times pure scoring images/s for
    // `overload_seconds` while the pipeline runs; the pipeline's memory is sampled all along.
    // What the producer achieved is reported beside what it offered: the broker may accept
    // less than offered (it also serves the consumer), and the ratio that matters is producer
    // rate to scorer rate.
    let ov = phase("overload");
    ov.create_topics()?;
    let reader = ov.reader()?;
    let child = ov.start()?;
    let pid = child.id();
    publish(&a.brokers, &ov.topic(), &images[..1], 1, None)?;
    read_scored(&reader, 1, Duration::from_secs(120))?; // the group has joined
    let rss_before = rss_mib(pid, "VmRSS:").unwrap_or(f64::NAN);
    let orate = a.overload * pure;
    let ocount = (orate * a.overload_seconds).round().max(1.0) as usize;
    let topic = ov.topic();
    let (brokers, images) = (a.brokers.as_str(), &images);
    let (produced, produce_s, scored, window_s, samples) = std::thread::scope(|s| -> Result<_> {
        let t = Instant::now();
        let h = s.spawn(move || {
            let p = publish(brokers, &topic, images, ocount, Some(orate));
            (p, t.elapsed().as_secs_f64())
        });
        let mut samples = Vec::new();
        let mut scored = 0usize;
        while !h.is_finished() {
            samples.push(rss_mib(pid, "VmRSS:").unwrap_or(f64::NAN));
            scored += read_scored(&reader, usize::MAX, Duration::from_millis(500))?.len();
        }
        let window_s = t.elapsed().as_secs_f64();
        let (p, produce_s) = h.join().map_err(|_| anyhow!("producer panicked"))?;
        Ok((p?.messages, produce_s, scored, window_s, samples))
    })?;
    let rss_last = rss_mib(pid, "VmRSS:").unwrap_or(f64::NAN);
    let peak = rss_mib(pid, "VmHWM:").unwrap_or(f64::NAN);
    // Flat memory: the maximum of each quarter of the window should not keep rising.
    let quarters: Vec<String> = (0..4)
        .map(|q| {
            let part = &samples[q * samples.len() / 4..(q + 1) * samples.len() / 4];
            format!("{:.0}", part.iter().copied().fold(f64::NAN, f64::max))
        })
        .collect();
    stop(child)?;
    let accepted = produced as f64 / produce_s.max(1e-9);
    let scored_rate = scored as f64 / window_s.max(1e-9);

    println!("{:<52} {:>12}", "measurement", "value");
    println!("{}", "-".repeat(65));
    let row = |k: &str, v: String| println!("{k:<52} {v:>12}");
    row("images (distinct)", n.to_string());
    row(
        "pure scoring images/s (decoded, same models)",
        format!("{pure:.0}"),
    );
    row(
        "pipeline images/s at saturation (backlog)",
        format!("{saturated:.0}"),
    );
    row(
        "  ratio to pure scoring",
        format!("{:.3}", saturated / pure),
    );
    row(
        &format!("offered load images/s ({:.0}% of pure)", a.load * 100.0),
        format!("{rate:.0}"),
    );
    row("  records scored", got.len().to_string());
    row(
        "  achieved images/s",
        format!("{:.0}", got.len() as f64 / span.max(1e-9)),
    );
    row(
        "  latency p50 ms (produce -> scored record)",
        format!("{p50:.0}"),
    );
    row("  latency p99 ms", format!("{p99:.0}"));
    row(
        &format!(
            "overload: producer offered images/s ({:.0}x pure, {:.0} s)",
            a.overload, a.overload_seconds
        ),
        format!("{orate:.0}"),
    );
    row(
        "  producer achieved images/s (broker-accepted)",
        format!("{accepted:.0}"),
    );
    row(
        "  pipeline scored images/s meanwhile",
        format!("{scored_rate:.0}"),
    );
    row(
        "  producer / pipeline",
        format!("{:.1}x", accepted / scored_rate.max(1e-9)),
    );
    row(
        "  pipeline RSS MiB before the producer started",
        format!("{rss_before:.0}"),
    );
    row(
        &format!(
            "  RSS max MiB per quarter of the window ({} samples)",
            samples.len()
        ),
        quarters.join(" / "),
    );
    row(
        "  RSS at end / peak (VmHWM)",
        format!("{rss_last:.0} / {peak:.0}"),
    );
    println!("(pipeline logs and configs in {})", dir.display());
    Ok(())
}
