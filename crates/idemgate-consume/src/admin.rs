//! The admin listener of `consume`: `/metrics`, `/healthz`, `/readyz` (like `serve`'s).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use idemgate_core::SharedStore;
use idemgate_dedup::Deduplicator;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::{ConsumeError, Shared};

#[derive(Clone)]
struct AdminState {
    dedup: Deduplicator<SharedStore>,
    shared: Arc<Shared>,
}

/// The process's Prometheus recorder (store latency, `idemgate_messages_total`), installed once;
/// `None` when another recorder was installed first (an embedding program's).
fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .as_ref()
}

pub(crate) async fn spawn(
    addr: SocketAddr,
    dedup: Deduplicator<SharedStore>,
    shared: Arc<Shared>,
) -> Result<tokio::task::JoinHandle<()>, ConsumeError> {
    let _ = prometheus();
    let listener = TcpListener::bind(addr).await.map_err(ConsumeError::Admin)?;
    tracing::info!(admin = %addr, "admin listening");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { dedup, shared });
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin listener failed");
        }
    }))
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.shared.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not consuming\n")
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut out = String::from(
        "# HELP idemgate_consume_messages_total Deliveries handled by idemgate consume, by outcome.\n\
         # TYPE idemgate_consume_messages_total counter\n",
    );
    for (name, value) in state.dedup.stats().snapshot() {
        out.push_str(&format!(
            "idemgate_consume_messages_total{{outcome=\"{name}\"}} {value}\n"
        ));
    }
    let engine = state.dedup.engine().stats();
    out.push_str(&format!(
        "# TYPE idemgate_consume_in_flight gauge\nidemgate_consume_in_flight {}\n\
         # TYPE idemgate_consume_takeovers_total counter\nidemgate_consume_takeovers_total {}\n\
         # TYPE idemgate_consume_ready gauge\nidemgate_consume_ready {}\n\
         # HELP idemgate_consume_messages_held Messages taken from the broker, not yet acked or handed back.\n\
         # TYPE idemgate_consume_messages_held gauge\nidemgate_consume_messages_held {}\n\
         # TYPE idemgate_consume_acked_total counter\nidemgate_consume_acked_total {}\n",
        engine.in_flight.load(std::sync::atomic::Ordering::Relaxed),
        engine.takeovers.load(std::sync::atomic::Ordering::Relaxed),
        u8::from(state.shared.ready()),
        state.shared.held(),
        state.shared.acked_total(),
    ));
    if let Some(handle) = prometheus() {
        out.push_str(&handle.render());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
