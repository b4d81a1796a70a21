//! The HTTP listener for operations: `/metrics` (Prometheus), `/healthz` (the process is
//! alive) and `/readyz` (every pipeline has its database and its consumer-group membership).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::health::Health;

#[derive(Clone)]
struct Endpoints {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// Binds `addr` now, so that a port in use fails the start, and serves until `shutdown`.
/// Returns the address bound (port 0 picks a free one) and the serving task.
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(Endpoints { metrics, health });
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await
    });
    Ok((bound, task))
}

async fn render_metrics(State(e): State<Endpoints>) -> String {
    e.metrics.run_upkeep();
    e.metrics.render()
}

async fn readiness(State(e): State<Endpoints>) -> (StatusCode, String) {
    match e.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(problems) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", problems.join("\n")),
        ),
    }
}
