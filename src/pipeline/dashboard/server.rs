//! The dashboard's HTTP server (axum on its own thread and tokio runtime), on the pipeline's
//! metrics listener:
//!
//! | path | what |
//! |---|---|
//! | `/` | the page (askama template `templates/dashboard.html`; refreshes itself every 2 s) |
//! | `/metrics` | Prometheus text (when the pipeline's recorder is installed) |
//! | `/api/state` | [`super::Snapshot`] as JSON |
//! | `/chart/flag-rate.svg` | flag rate per block of records |
//! | `/chart/hist/{score}.svg` | a followed score's recent histogram vs its calibration |
//! | `/thumb/{seq}.png` | a recent row's model-input pixels as PNG |
//!
//! Everything the page loads comes from here: it works offline.

use std::net::SocketAddr;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use super::board::Board;
use super::charts;
use crate::pipeline::{PipelineError, Result};
use crate::score::ScoreKind;

/// Milliseconds between the page's refreshes.
pub const REFRESH_MS: u64 = 2000;

#[derive(Clone)]
struct App {
    board: Arc<Board>,
    metrics: Option<PrometheusHandle>,
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Page {
    pipeline: String,
    live: bool,
    score: String,
    scales: Vec<String>,
    refresh_ms: u64,
}

fn svg(body: String) -> Response {
    ([(header::CONTENT_TYPE, "image/svg+xml")], body).into_response()
}

fn failed(e: impl std::fmt::Display) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
}

async fn page(State(app): State<App>) -> Response {
    let m = app.board.models();
    let p = Page {
        pipeline: app.board.pipeline().to_string(),
        live: app.board.is_live(),
        score: m.flagged.kind.to_string(),
        scales: m.scales.iter().map(|w| w.kind.to_string()).collect(),
        refresh_ms: REFRESH_MS,
    };
    match p.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => failed(e),
    }
}

async fn state(State(app): State<App>) -> Json<super::Snapshot> {
    Json(app.board.snapshot())
}

async fn prometheus(State(app): State<App>) -> Response {
    match &app.metrics {
        Some(h) => h.render().into_response(),
        None => (StatusCode::NOT_FOUND, "no metrics recorder").into_response(),
    }
}

async fn flag_rate(State(app): State<App>) -> Response {
    let m = app.board.models();
    let mut names = vec![m.flagged.kind.to_string()];
    names.extend(m.scales.iter().map(|w| w.kind.to_string()));
    match charts::flag_rate_svg(
        &app.board.flag_rates(),
        &names,
        m.target_fpr,
        &app.board.alarm_marks(),
    ) {
        Ok(s) => svg(s),
        Err(e) => failed(e),
    }
}

async fn histogram(State(app): State<App>, Path(file): Path<String>) -> Response {
    let kind = file
        .strip_suffix(".svg")
        .and_then(|s| s.parse::<ScoreKind>().ok());
    let Some((watch, values)) = kind.and_then(|k| app.board.recent_values(k)) else {
        return (StatusCode::NOT_FOUND, "not a followed score").into_response();
    };
    match charts::histogram_svg(&watch, &values) {
        Ok(s) => svg(s),
        Err(e) => failed(e),
    }
}

/// (C, S, S) 8-bit pixels as PNG (grey for C = 1, RGB for C = 3).
fn png(pixels: &[u8], (c, s): (usize, usize)) -> Option<Vec<u8>> {
    let mut hwc = vec![0u8; pixels.len()];
    for ch in 0..c {
        for p in 0..s * s {
            hwc[p * c + ch] = pixels[ch * s * s + p];
        }
    }
    let colour = match c {
        1 => image::ExtendedColorType::L8,
        3 => image::ExtendedColorType::Rgb8,
        _ => return None,
    };
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        &hwc,
        s as u32,
        s as u32,
        colour,
    )
    .ok()?;
    Some(out)
}

async fn thumbnail(State(app): State<App>, Path(file): Path<String>) -> Response {
    let seq = file
        .strip_suffix(".png")
        .and_then(|s| s.parse::<u64>().ok());
    match seq
        .and_then(|s| app.board.thumbnail(s))
        .and_then(|(p, shape)| png(&p, shape))
    {
        Some(bytes) => ([(header::CONTENT_TYPE, "image/png")], bytes).into_response(),
        None => (StatusCode::NOT_FOUND, "no longer kept").into_response(),
    }
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(prometheus))
        .route("/api/state", get(state))
        .route("/chart/flag-rate.svg", get(flag_rate))
        .route("/chart/hist/{file}", get(histogram))
        .route("/thumb/{file}", get(thumbnail))
        .with_state(app)
}

/// A running server; dropping it stops the server (requests in flight finish).
pub struct Server {
    /// The bound address.
    pub addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Serves the dashboard (and `/metrics` when `metrics` is given) on `listen` from a thread of
/// its own until the returned [`Server`] is dropped (`listen` may ask for port 0: the bound
/// address is in it).
///
/// Errors: the address cannot be bound (in use, not local).
pub fn spawn(
    listen: SocketAddr,
    board: Arc<Board>,
    metrics: Option<PrometheusHandle>,
) -> Result<Server> {
    let cfg_err =
        |e: std::io::Error| PipelineError::Config(format!("metrics.listen {listen}: {e}"));
    let std_listener = std::net::TcpListener::bind(listen).map_err(cfg_err)?;
    std_listener.set_nonblocking(true).map_err(cfg_err)?;
    let addr = std_listener.local_addr().map_err(cfg_err)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(cfg_err)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("dashboard".into())
        .spawn(move || {
            rt.block_on(async move {
                if let Some(h) = metrics.clone() {
                    // Histograms are drained by upkeep when the exporter runs no listener.
                    tokio::spawn(async move {
                        let mut t = tokio::time::interval(std::time::Duration::from_secs(5));
                        loop {
                            t.tick().await;
                            h.run_upkeep();
                        }
                    });
                }
                let listener = match tokio::net::TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!("dashboard on {addr}: {e}"),
                };
                let app = router(App { board, metrics });
                let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                    let _ = stopped.await;
                });
                if let Err(e) = serve.await {
                    tracing::error!("dashboard on {addr}: {e}");
                }
            })
        })
        .map_err(cfg_err)?;
    Ok(Server { addr, _stop: stop })
}
