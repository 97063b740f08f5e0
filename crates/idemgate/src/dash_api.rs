//! The dashboard's JSON endpoints on the admin listener (merged into [`crate::admin::router`]'s
//! router by `serve`):
//!
//! - `GET /api/activity?route=&outcome=&limit=`: this instance's recent protected requests,
//!   newest first (at most `limit`, default 100, at most [`RING_CAPACITY`]).
//! - `GET /api/series`: per route, outcome counts and latency p50/p99 in 5-second buckets over
//!   the last 15 minutes (see [`Activity::series`]).
//! - `GET /api/unknown?limit=&fresh=`: the newest outcome-unknown records of this instance's
//!   namespace, from the census's last pass ([`crate::census`]): the endpoint never reads the
//!   store, whatever the number of open dashboards. A last pass older than
//!   [`crate::census::MIN_GAP`] asks the census for a new one (it runs at the configured
//!   `unknown_scan_rate`, one at a time); `fresh=1` waits (up to [`FRESH_WAIT`]) for a pass
//!   started after the request. With `unknown_scan_rate = 0` the census is off and the endpoint
//!   says so (`"enabled": false`).
//! - `GET /api/overview`: the store's kind, the namespace and the routes.

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use idemgate_tower::policy::Routes;
use serde::Deserialize;
use serde_json::json;

use crate::activity::{Activity, RING_CAPACITY};
use crate::census::{KEEP, UnknownCensus};

/// The longest `/api/unknown?fresh=1` waits for a new pass.
pub const FRESH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What the dashboard endpoints share.
#[derive(Clone)]
pub struct DashState {
    /// This instance's recent activity.
    pub activity: Activity,
    /// The census of outcome-unknown records (its last pass is listed).
    pub census: UnknownCensus,
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
    fresh: Option<String>,
}

/// The route of a scope label (`route#principal-hash`).
fn route_of(scope: &str) -> &str {
    scope.rsplit_once('#').map_or(scope, |(route, _)| route)
}

async fn unknown(State(s): State<DashState>, Query(p): Query<UnknownParams>) -> Response {
    let limit = p.limit.unwrap_or(50).clamp(1, KEEP);
    let Some(now) = s.census.snapshot() else {
        return Json(json!({
            "enabled": false,
            "records": [],
            "detail": "the census of outcome-unknown records is off (unknown_scan_rate = 0): \
                       nothing lists them; see idemgate_outcome_unknown_marked_total and the \
                       WARN lines",
        }))
        .into_response();
    };
    let fresh = matches!(p.fresh.as_deref(), Some("1" | "true"));
    let (snap, waited) = if fresh {
        match s.census.fresh(FRESH_WAIT).await {
            Some(snap) => (snap, true),
            None => (s.census.snapshot().unwrap_or(now), false),
        }
    } else {
        let age = crate::census::MIN_GAP.as_millis() as u64;
        let ended = now.survey_ended_ms;
        if !now.running() && crate::activity::now_ms().saturating_sub(ended) >= age {
            s.census.request();
        }
        (now, false)
    };
    let survey = snap.survey.as_deref();
    let records: Vec<_> = survey
        .map(|v| &v.newest[..v.newest.len().min(limit)])
        .unwrap_or_default()
        .iter()
        .map(|r| {
            json!({
                "store_key": r.store_key.to_hex(),
                "route": route_of(&r.scope),
                "scope": r.scope,
                "key": r.idempotency_key,
                "epoch": r.epoch,
                "unknown_since_ms": r.since.as_millis(),
            })
        })
        .collect();
    let unknown = survey.map_or(0, |v| v.census.unknown);
    Json(json!({
        "enabled": true,
        "records": records,
        "unknown": unknown,
        "more": unknown > records.len() as u64,
        "scanned": survey.map_or(0, |v| v.census.scanned),
        "complete": survey.is_some(),
        "scan_ended_ms": survey.map(|_| snap.survey_ended_ms),
        "scanning": snap.running(),
        "error": snap.error,
        "fresh": waited,
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
