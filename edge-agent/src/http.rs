//! The local HTTP endpoint: `/healthz` (liveness: the log writer answers and no component was
//! given up after a crash loop), `/readyz` (readiness: started, and healthy), `/status` (the JSON
//! status report) and `/metrics` (Prometheus text format). Both probes answer 503 with the reason
//! when they fail; `/readyz` lists the components that are down or degraded either way.

use crate::state::DaemonState;
use anyhow::Context as _;
use axum::Router;
use axum::extract::State as AxState;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use edge_core::Shutdown;
use edge_core::log::Log;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Installs the global metrics recorder. Latency histograms get explicit buckets (seconds).
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let buckets = [
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        .context("histogram buckets")?
        .set_buckets_for_metric(
            Matcher::Full("edge_log_batch_records".into()),
            &[1.0, 10.0, 100.0, 1000.0, 5000.0, 20000.0],
        )
        .context("histogram buckets")?;
    match builder.install_recorder() {
        Ok(h) => Ok(h),
        // A second daemon in one process (tests): reuse a fresh recorder without installing it.
        Err(_) => Ok(PrometheusBuilder::new().build_recorder().handle()),
    }
}

#[derive(Clone)]
struct AppState {
    daemon: DaemonState,
    metrics: PrometheusHandle,
}

async fn healthz(AxState(s): AxState<AppState>) -> Response {
    if let Some(why) = s.daemon.unhealthy() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        )
            .into_response();
    }
    // The log writer answers (a maintenance round-trip would be too heavy; usage is in memory).
    match s.daemon.log.usage().await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn readyz(AxState(s): AxState<AppState>) -> Response {
    if !s.daemon.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
    }
    if let Some(why) = s.daemon.unhealthy() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        )
            .into_response();
    }
    let mut body = String::from("ready\n");
    for (name, c) in s.daemon.status.snapshot() {
        if matches!(c.state, edge_core::State::Down | edge_core::State::Degraded) {
            body.push_str(&format!("{name}: {}: {}\n", c.state.as_str(), c.detail));
        }
    }
    (StatusCode::OK, body).into_response()
}

async fn status(AxState(s): AxState<AppState>) -> Response {
    match s.daemon.report().await {
        Ok(r) => axum::Json(r).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn metrics(AxState(s): AxState<AppState>) -> Response {
    crate::scrape::refresh(&s.daemon).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

/// Binds `http.listen` and serves until shutdown. Binding errors are returned (a port in use is a
/// configuration problem the operator must see).
pub async fn serve(
    daemon: DaemonState,
    metrics: PrometheusHandle,
    shutdown: Shutdown,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let addr = daemon.config.http.listen;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let upkeep = metrics.clone();
    let state = AppState { daemon, metrics };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(self::metrics))
        .with_state(state);
    let stop = shutdown.all().clone();
    Ok(tokio::spawn(async move {
        let upkeep_task = tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_secs(5));
            loop {
                t.tick().await;
                upkeep.run_upkeep();
            }
        });
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "the HTTP endpoint stopped");
        }
        upkeep_task.abort();
    }))
}
