//! The dashboard's JSON endpoints on the admin listener (merged into [`crate::admin::router`]'s
//! router by `serve`):
//!
//! - `GET /api/activity?route=&outcome=&limit=`: this instance's recent protected requests,
//!   newest first (at most `limit`, default 100, at most [`RING_CAPACITY`]).
//! - `GET /api/series`: per route, outcome counts and latency p50/p99 in 5-second buckets over
//!   the last 15 minutes (see [`Activity::series`]).
//! - `GET /api/unknown?limit=`: outcome-unknown records, found by listing the store (at most
//!   [`UNKNOWN_SCAN`] records are read; `complete` says whether the listing reached its end, and
//!   `more` whether more unknown records were found than listed).
//! - `GET /api/overview`: the store's kind, the namespace and the routes.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use idemgate_core::record::RecordState;
use idemgate_core::store::ListRequest;
use idemgate_core::{Engine, SharedStore, Store};
use idemgate_tower::policy::Routes;
use serde::Deserialize;
use serde_json::json;

use crate::activity::{Activity, RING_CAPACITY};

/// Most records `/api/unknown` reads from the store per call.
pub const UNKNOWN_SCAN: usize = 10_000;
/// Records per list page while scanning.
const SCAN_PAGE: usize = 1_000;

/// What the dashboard endpoints share.
#[derive(Clone)]
pub struct DashState {
    /// This instance's recent activity.
    pub activity: Activity,
    /// The engine (its store is listed for outcome-unknown records).
    pub engine: Engine<SharedStore>,
    /// The store's kind (the URL scheme: `memory`, `file`, `redis`, `postgres`, ...).
    pub store_kind: String,
    /// The records' namespace.
    pub namespace: String,
    /// The configured routes.
    pub routes: Routes,
}

/// The dashboard endpoints.
pub fn router(state: DashState) -> Router {
    Router::new()
        .route("/api/activity", get(activity))
        .route("/api/series", get(series))
        .route("/api/unknown", get(unknown))
        .route("/api/overview", get(overview))
        .with_state(state)
}

/// The kind of a store URL: its scheme, never its host or credentials.
pub fn store_kind(url: &str) -> String {
    url.split_once(':')
        .map_or("file", |(scheme, _)| scheme)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '+')
        .collect()
}

#[derive(Deserialize)]
struct ActivityParams {
    route: Option<String>,
    outcome: Option<String>,
    limit: Option<usize>,
}

async fn activity(State(s): State<DashState>, Query(p): Query<ActivityParams>) -> Response {
    let limit = p.limit.unwrap_or(100).clamp(1, RING_CAPACITY);
    let entries = s.activity.recent(
        p.route.as_deref().filter(|r| !r.is_empty()),
        p.outcome.as_deref().filter(|o| !o.is_empty()),
        limit,
    );
    Json(json!({ "entries": entries, "capacity": RING_CAPACITY })).into_response()
}

async fn series(State(s): State<DashState>) -> Response {
    Json(s.activity.series()).into_response()
}

async fn overview(State(s): State<DashState>) -> Response {
    let routes: Vec<&str> = s.routes.iter().map(|r| r.name.as_str()).collect();
    Json(json!({
        "store": s.store_kind,
        "namespace": s.namespace,
        "routes": routes,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct UnknownParams {
    limit: Option<usize>,
}

/// The route of a scope label (`route#principal-hash`).
fn route_of(scope: &str) -> &str {
    scope.rsplit_once('#').map_or(scope, |(route, _)| route)
}

async fn unknown(State(s): State<DashState>, Query(p): Query<UnknownParams>) -> Response {
    let limit = p.limit.unwrap_or(50).clamp(1, 500);
    let mut found = Vec::new();
    let (mut scanned, mut more, mut cursor) = (0usize, false, None);
    let complete = loop {
        let req = ListRequest {
            cursor: cursor.take(),
            limit: SCAN_PAGE,
        };
        let page = match s.engine.store().list(&req).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "admin: store error listing unknown records");
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({ "detail": format!("store error ({})", e.kind()) })),
                )
                    .into_response();
            }
        };
        scanned += page.records.len();
        for (k, r) in &page.records {
            if let RecordState::Unknown { epoch, since } = &r.state {
                if found.len() == limit {
                    more = true;
                    continue;
                }
                found.push(json!({
                    "store_key": k.to_hex(),
                    "route": route_of(&r.scope),
                    "scope": r.scope,
                    "key": r.idempotency_key,
                    "epoch": epoch,
                    "unknown_since_ms": since.as_millis(),
                }));
            }
        }
        match page.next {
            None => break true,
            Some(_) if scanned >= UNKNOWN_SCAN => break false,
            Some(next) => cursor = Some(next),
        }
    };
    found.sort_by_key(|v| std::cmp::Reverse(v["unknown_since_ms"].as_u64().unwrap_or(0)));
    Json(json!({
        "records": found,
        "more": more,
        "scanned": scanned,
        "complete": complete,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_kinds_name_only_the_scheme() {
        assert_eq!(store_kind("memory://"), "memory");
        assert_eq!(store_kind("redis+cluster://a:1,b:2"), "redis+cluster");
        assert_eq!(store_kind("postgres://u:secret@h/db"), "postgres");
        assert_eq!(store_kind("./data"), "file");
    }

    #[test]
    fn the_route_is_read_from_the_scope_label() {
        assert_eq!(route_of("pay#0011aa"), "pay");
        assert_eq!(route_of("plain"), "plain");
    }
}
