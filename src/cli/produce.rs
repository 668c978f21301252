//! `glowwatch produce`: publish images from a Parquet file (id, image columns) to a Kafka topic
//! (key = id, value = image bytes, headers content-type and source), optionally at a fixed rate.
//! For trying a Kafka pipeline and for offered load in `glowwatch bench-stream`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

/// Arguments of `glowwatch produce`.
#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic to publish to.
    #[arg(long)]
    pub topic: String,
    /// Parquet file with `id` and `image` (encoded bytes) columns.
    #[arg(long)]
    pub input: PathBuf,
    /// Messages to publish (the input is cycled, ids suffixed, when this exceeds its rows).
    #[arg(long)]
    pub count: Option<usize>,
    /// Messages per second (default: as fast as the broker takes them).
    #[arg(long)]
    pub rate: Option<f64>,
}

/// Reads up to `limit` (id, image bytes) rows of a Parquet file.
pub fn read_images(path: &Path, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
    let f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let r = ParquetRecordBatchReaderBuilder::try_new(f)?
        .with_limit(limit)
        .build()?;
    let mut out = Vec::new();
    for b in r {
        out.extend(crate::pipeline::decode::id_image_rows(&b?)?);
    }
    Ok(out)
}

/// What a publish did.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Messages acknowledged by the broker.
    pub messages: usize,
    /// Seconds from the first send to the last acknowledgement.
    pub seconds: f64,
}

/// Publishes `count` messages cycling through `images` (ids get a `-r<k>` suffix from the
/// second cycle on), at `rate` messages/s when given, and waits for every acknowledgement.
pub fn publish(
    brokers: &str,
    topic: &str,
    images: &[(String, Vec<u8>)],
    count: usize,
    rate: Option<f64>,
) -> Result<Published> {
    if images.is_empty() {
        return Err(anyhow!("no images to publish"));
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .context("creating the producer")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let t0 = Instant::now();
    let mut pending: Vec<DeliveryFuture> = Vec::new();
    let wait = |pending: &mut Vec<DeliveryFuture>| -> Result<()> {
        rt.block_on(async {
            for f in pending.drain(..) {
                f.await
                    .map_err(|_| anyhow!("delivery cancelled"))?
                    .map_err(|(e, _)| anyhow!("delivery to {topic}: {e}"))?;
            }
            Ok(())
        })
    };
    for i in 0..count {
        if let Some(r) = rate {
            let due = t0 + Duration::from_secs_f64(i as f64 / r);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let (id, png) = &images[i % images.len()];
        let id = match i / images.len() {
            0 => id.clone(),
            k => format!("{id}-r{k}"),
        };
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "content-type",
                value: Some("image/png"),
            })
            .insert(Header {
                key: "source",
                value: Some("glowwatch-produce"),
            });
        let mut record = FutureRecord::to(topic)
            .key(&id)
            .payload(png)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(anyhow!("producing to {topic}: {e}")),
            }
        }
        if pending.len() >= 2048 {
            wait(&mut pending)?;
        }
    }
    wait(&mut pending)?;
    producer.flush(Duration::from_secs(30))?;
    Ok(Published {
        messages: count,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Runs `glowwatch produce`.
pub fn run(a: ProduceArgs) -> Result<()> {
    let images = read_images(&a.input, usize::MAX)?;
    let count = a.count.unwrap_or(images.len());
    let p = publish(&a.brokers, &a.topic, &images, count, a.rate)?;
    println!(
        "published {} messages to {} in {:.1} s ({:.0} msg/s)",
        p.messages,
        a.topic,
        p.seconds,
        p.messages as f64 / p.seconds.max(1e-9)
    );
    Ok(())
}
