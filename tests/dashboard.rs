//! The dashboard in a real browser: Debian's Chromium, headless, driven through its
//! chromedriver (WebDriver) by fantoccini. `scripts/test.sh` (the README's test command)
//! installs both; without them these tests fail and say so.
//!
//! - `glowwatch dashboard --pipeline P` over a run's output shows that run's numbers, its
//!   thumbnails render, the page logs no console error, and a drift alarm appears without a
//!   reload when a second run with another kind of images lands in the same output.
//! - A running pipeline serves the same page (and `/metrics`) on its `[metrics] listen`, and
//!   the page follows it while it scores.
//!
//! `GLOWWATCH_SCREENSHOT=path.png` keeps a screenshot of the first test's page (the README's).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use arrow::array::{AsArray, RecordBatch};
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder};
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Kills a child process when dropped (a failing test leaves no server behind).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The browser's console messages (chromedriver's log endpoint; the W3C protocol has none).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}

/// A headless Chromium session, and its driver process.
async fn browser() -> (Client, Killed) {
    assert!(
        Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists(),
        "the dashboard tests need Debian's chromium and chromium-driver \
         (apt-get install chromium chromium-driver; scripts/test.sh installs them)"
    );
    let port = common::broker::free_port();
    let driver = Killed(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver"),
    );
    let caps = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1400,2200"]
        },
        "goog:loggingPrefs": {"browser": "ALL"}
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let t0 = Instant::now();
    loop {
        match ClientBuilder::new(connector.clone())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => return (c, driver),
            Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no WebDriver session: {e}"),
        }
    }
}

/// Console messages at level SEVERE (errors), and the page's own error list.
async fn page_errors(c: &Client) -> Vec<String> {
    let log = c.issue_cmd(BrowserLog).await.expect("browser log");
    let mut errors: Vec<String> = log
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["level"] == "SEVERE")
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect();
    let own = c
        .execute("return window.gwErrors || ['no error list']", vec![])
        .await
        .unwrap();
    errors.extend(own.as_array().into_iter().flatten().map(|v| v.to_string()));
    errors
}

async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![]).await.expect(script)
}

async fn text(c: &Client, id: &str) -> String {
    js(
        c,
        &format!("return document.getElementById('{id}').textContent"),
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_string()
}

/// Waits until `script` returns true, or fails with `what` and the page's state.
async fn wait_until(c: &Client, script: &str, limit: Duration, what: &str) {
    let t0 = Instant::now();
    while js(c, script).await != Value::Bool(true) {
        if t0.elapsed() > limit {
            let state = js(c, "return document.body.innerText").await;
            panic!(
                "{what}: not within {limit:?}; page:\n{}",
                state.as_str().unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Loads the page at `url` and waits for its first refresh (state, charts) to finish.
async fn open(c: &Client, url: &str) {
    c.goto(url).await.unwrap();
    wait_until(
        c,
        "return Number(document.body.dataset.refreshes || 0) >= 1",
        Duration::from_secs(30),
        "first refresh",
    )
    .await;
}

/// A pipeline on the demo's models and calibration over `input`, writing under `out`.
fn pipeline(dir: &Path, name: &str, input: &Path, out: &Path, extra: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"
name = "{name}"
[source]
kind = "parquet"
paths = ["{input}"]
batch_rows = 64
{detector}
[sinks.scored]
path = "{out}/scored"
partition = "none"
[sinks.dead_letter]
path = "{out}/dead"
partition = "none"
{extra}
"#,
            input = input.display(),
            detector = common::demo_detector(),
            out = out.display(),
        ),
    )
    .unwrap();
    p
}

/// The demo sample's rows `from..to` (the first 300 are Fashion-MNIST, the rest MNIST).
fn sample_rows(from: usize, to: usize) -> RecordBatch {
    let b = arrow::compute::concat_batches(
        &common::parquet_batches(&common::repo("pipelines/demo/sample.parquet"))[0].schema(),
        &common::parquet_batches(&common::repo("pipelines/demo/sample.parquet")),
    )
    .unwrap();
    b.slice(from, to - from)
}

fn run(cfg: &Path) -> Value {
    let (ok, out, err) = common::glowwatch(&["run", cfg.to_str().unwrap(), "--json"], "");
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_a_run_with_thumbnails_and_raises_a_drift_alarm_when_the_feed_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    let fm = sample_rows(0, 300);
    let digits = sample_rows(300, 600);
    let truth = |b: &RecordBatch| {
        b.column_by_name("truth_ood")
            .unwrap()
            .as_boolean()
            .true_count()
    };
    assert_eq!(
        (truth(&fm), truth(&digits)),
        (0, 300),
        "the demo sample's order changed"
    );
    common::write_batch(&d.join("fm.parquet"), &fm);
    common::write_batch(&d.join("digits.parquet"), &digits);
    let first = pipeline(d, "feed", &d.join("fm.parquet"), &out, "");
    let second = pipeline(d, "feed-later", &d.join("digits.parquet"), &out, "");
    let s1 = run(&first);
    assert_eq!(s1["scored"], 300);
    assert_eq!(
        s1["drift_alarms"],
        json!({}),
        "the calibration's own kind raised an alarm"
    );

    let mut dash = Command::new(env!("CARGO_BIN_EXE_glowwatch"))
        .args(["dashboard", "--pipeline", first.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--poll-s", "0.5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = dash.stdout.take().unwrap();
    let _dash = Killed(dash);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();

    let (c, _driver) = browser().await;
    open(&c, &url).await;
    // The run's numbers.
    assert_eq!(text(&c, "scored").await, "300");
    assert_eq!(text(&c, "records").await, "300");
    let flagged = s1["flagged"].as_u64().unwrap();
    assert!(
        text(&c, "flagged")
            .await
            .starts_with(&format!("{flagged} (")),
        "{}",
        text(&c, "flagged").await
    );
    assert_eq!(text(&c, "dead").await, "0");
    assert_eq!(text(&c, "drift-state").await, "calm");
    assert_eq!(
        js(
            &c,
            "return document.querySelectorAll('#alarms .alarm-row').length"
        )
        .await,
        0
    );
    // Charts: the flag rate, and the flagged score's and each scale's histogram.
    assert_eq!(
        js(
            &c,
            "return document.querySelectorAll('#chart-flag-rate svg').length"
        )
        .await,
        1
    );
    assert_eq!(
        js(&c, "return document.querySelectorAll('.hist svg').length").await,
        4
    );
    // Thumbnails: the top anomalies, each image decoded by the browser at the model's 32x32.
    wait_until(
        &c,
        "return Array.from(document.querySelectorAll('#top img')).every(i => i.complete)",
        Duration::from_secs(10),
        "thumbnails loaded",
    )
    .await;
    let sizes = js(
        &c,
        "return Array.from(document.querySelectorAll('#top img')).map(i => i.naturalWidth)",
    )
    .await;
    assert_eq!(sizes, json!(vec![32; 12]), "thumbnails");
    let ids = js(
        &c,
        "return Array.from(document.querySelectorAll('#top .id')).map(e => e.textContent)",
    )
    .await;
    assert!(
        ids.as_array()
            .unwrap()
            .iter()
            .all(|i| i.as_str().unwrap().starts_with("fashion_mnist-")),
        "{ids}"
    );

    // The feed changes: a run over digits lands in the same output; the open page follows.
    js(&c, "window.gwSamePage = true; return true").await;
    let s2 = run(&second);
    assert_eq!(s2["scored"], 300);
    wait_until(
        &c,
        "return document.getElementById('scored').textContent === '600' && \
                document.querySelectorAll('#alarms .alarm-row').length > 0",
        Duration::from_secs(30),
        "drift alarm after the switch",
    )
    .await;
    assert_eq!(text(&c, "drift-state").await, "ALARM");
    assert_eq!(
        js(&c, "return window.gwSamePage === true").await,
        true,
        "the page was reloaded"
    );
    let alarm = js(
        &c,
        "return document.querySelector('#alarms .alarm-row').textContent",
    )
    .await;
    let record: u64 = js(&c, "return Number(document.querySelector('#alarms .alarm-row td:nth-child(3)').textContent.replace(/,/g, ''))")
        .await
        .as_u64()
        .unwrap();
    assert!(
        record > 300 && record <= 600,
        "alarm at record {record}: {alarm}"
    );
    // The top anomalies are digits now.
    wait_until(
        &c,
        "return Array.from(document.querySelectorAll('#top .id')).every(e => e.textContent.startsWith('mnist-'))",
        Duration::from_secs(10),
        "digits on top",
    )
    .await;
    if let Ok(path) = std::env::var("GLOWWATCH_SCREENSHOT") {
        std::fs::write(&path, c.screenshot().await.unwrap()).unwrap();
    }
    let errors = page_errors(&c).await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    c.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_pipeline_serves_the_live_page_and_metrics_on_its_listener() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Three rows that do not decode, then 3,000 images (the sample five times, ids made
    // unique): long enough for the page to watch the run.
    let rows = sample_rows(0, 600);
    let ids = rows.column_by_name("id").unwrap().as_string::<i32>();
    let images = rows.column_by_name("image").unwrap().as_binary::<i32>();
    let mut feed: Vec<(String, Option<Vec<u8>>)> = (0..3)
        .map(|k| (format!("broken-{k}"), Some(b"not an image".to_vec())))
        .collect();
    for r in 0..5 {
        for i in 0..rows.num_rows() {
            feed.push((
                format!("{}-{r}", ids.value(i)),
                Some(images.value(i).to_vec()),
            ));
        }
    }
    common::write_images(&d.join("feed.parquet"), &feed);
    let cfg = pipeline(
        d,
        "live",
        &d.join("feed.parquet"),
        &d.join("out"),
        "[metrics]\nlisten = \"127.0.0.1:0\"",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_glowwatch"))
        .args(["run", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _run = Killed(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(u) = l.split_whitespace().find(|w| w.starts_with("http://")) {
                let _ = tx.send(u.trim_end_matches('/').to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the dashboard's address in the log");

    let (c, _driver) = browser().await;
    open(&c, &format!("{url}/")).await;
    let header = js(&c, "return document.querySelector('header').textContent").await;
    assert!(
        header.as_str().unwrap().contains("live pipeline"),
        "{header}"
    );
    let scored = |t: String| t.replace(',', "").parse::<u64>().unwrap_or(0);
    let before = scored(text(&c, "scored").await);
    // The open page follows the run.
    let more = format!(
        "return Number(document.getElementById('scored').textContent.replace(/,/g, '')) > {before}"
    );
    wait_until(&c, &more, Duration::from_secs(60), "the live count grows").await;
    wait_until(
        &c,
        "return Array.from(document.querySelectorAll('#dead-reasons td')).some(t => t.textContent === 'unknown_format')",
        Duration::from_secs(60),
        "dead letters by reason",
    )
    .await;
    let thumbs = js(&c, "return document.querySelectorAll('#top img').length").await;
    assert!(thumbs.as_u64().unwrap() > 0, "no thumbnails");
    let errors = page_errors(&c).await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    // Prometheus text on the same listener.
    c.goto(&format!("{url}/metrics")).await.unwrap();
    let metrics = js(&c, "return document.body.innerText").await;
    let metrics = metrics.as_str().unwrap();
    for name in [
        "glowwatch_records_scored_total",
        "glowwatch_dead_letters_total{reason=\"unknown_format\"}",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    c.close().await.unwrap();
}
