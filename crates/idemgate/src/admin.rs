//! The admin listener: `/healthz`, `/readyz`, `/metrics`, the JSON admin API and the dashboard.
//!
//! It has no authentication: bind it to loopback or a private network (the default is
//! `127.0.0.1:9090`).

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use idemgate_core::error::StoreError;
use idemgate_core::record::{Outcome, Record, RecordState};
use idemgate_core::store::{DeleteMode, DeleteOutcome, ListRequest};
use idemgate_core::{Engine, IdempotencyKey, Scope, ScopedKey, Store, StoreKey};
use idemgate_tower::policy::Routes;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub engine: Engine<idemgate_core::SharedStore>,
    pub prometheus: PrometheusHandle,
    pub namespace: String,
    pub routes: Routes,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/keys", get(list))
        .route("/api/keys/lookup", post(lookup))
        .route("/api/keys/{store_key}", get(get_key).delete(delete_key))
        .route("/api/keys/{store_key}/resolve", post(resolve))
        .with_state(state)
}

fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    let body = json!({
        "type": format!("urn:idemgate:problem:admin-{}", status.as_u16()),
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail.into(),
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/problem+json")],
        body.to_string(),
    )
        .into_response()
}

/// A store failure as a `503`: the body names only the kind (a backend's message may carry
/// account ids, ARNs or host names); the detail goes to the log.
fn store_error(e: StoreError) -> Response {
    tracing::warn!(error = %e, "admin: store error");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "store error ({}); the instance's log has the detail",
            e.kind()
        ),
    )
}

/// A record as JSON (bodies are summarised by length; they may hold personal data).
pub fn record_json(key: &StoreKey, r: &Record) -> Value {
    let mut v = json!({
        "store_key": key.to_hex(),
        "namespace": r.namespace,
        "scope": r.scope,
        "key": r.idempotency_key,
        "fingerprint": r.fingerprint.to_string(),
        "state": r.state.name(),
        "created_at_ms": r.created_at.as_millis(),
        "expires_at_ms": r.expires_at.as_millis(),
    });
    let obj = v.as_object_mut();
    let Some(obj) = obj else { return v };
    match &r.state {
        RecordState::InFlight {
            fencing,
            owner,
            lease_expires_at,
        } => {
            obj.insert("epoch".into(), fencing.epoch.into());
            obj.insert("owner".into(), owner.clone().into());
            obj.insert(
                "lease_expires_at_ms".into(),
                lease_expires_at.as_millis().into(),
            );
        }
        RecordState::Completed {
            epoch,
            completed_at,
            outcome,
        } => {
            obj.insert("epoch".into(), (*epoch).into());
            obj.insert("completed_at_ms".into(), completed_at.as_millis().into());
            match outcome {
                Outcome::Response(resp) => {
                    obj.insert("status".into(), resp.status.into());
                    obj.insert("body_bytes".into(), resp.body.len().into());
                }
                Outcome::NotReplayable { status, reason } => {
                    obj.insert("status".into(), (*status).into());
                    obj.insert("not_replayable".into(), reason.clone().into());
                }
                _ => {}
            }
        }
        RecordState::Unknown { epoch, since } => {
            obj.insert("epoch".into(), (*epoch).into());
            obj.insert("unknown_since_ms".into(), since.as_millis().into());
        }
        _ => {}
    }
    v
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn readyz(State(s): State<AdminState>) -> Response {
    match s.engine.store().get(&StoreKey([0; 32])).await {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readyz: store not reachable");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("store not reachable ({})", e.kind()),
            )
        }
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::telemetry::render(&s.engine, &s.prometheus),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ListParams {
    cursor: Option<String>,
    limit: Option<usize>,
}

async fn list(State(s): State<AdminState>, Query(p): Query<ListParams>) -> Response {
    let req = ListRequest {
        cursor: p.cursor,
        limit: p.limit.unwrap_or(100).clamp(1, 1000),
    };
    match s.engine.store().list(&req).await {
        Ok(page) => Json(json!({
            "records": page.records.iter().map(|(k, r)| record_json(k, r)).collect::<Vec<_>>(),
            "next": page.next,
        }))
        .into_response(),
        Err(e) => store_error(e),
    }
}

fn bad_store_key() -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "the store key must be 64 hex characters (see /api/keys or /api/keys/lookup)",
    )
}

async fn get_key(State(s): State<AdminState>, Path(hex): Path<String>) -> Response {
    let Some(key) = StoreKey::from_hex(&hex) else {
        return bad_store_key();
    };
    match s.engine.store().get(&key).await {
        Ok(Some(r)) => Json(record_json(&key, &r)).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no such record"),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct DeleteParams {
    /// Also revoke an in-flight record (see [`DeleteMode::Force`]).
    #[serde(default)]
    force: bool,
}

/// `DELETE /api/keys/{store_key}[?force=true]`: removes a finished record (or one already
/// revoked). An in-flight record is refused with 409 (deleting it would let a retry run while
/// the first request still runs, at the same epoch); `force=true` revokes an in-flight record
/// instead: the holder is fenced off and the next retry runs at epoch + 1 (the first may still be
/// running upstream). With `force=true` a record that finished meanwhile is refused (409), so a
/// late force never throws away an outcome retries should replay.
async fn delete_key(
    State(s): State<AdminState>,
    Path(hex): Path<String>,
    Query(p): Query<DeleteParams>,
) -> Response {
    let Some(key) = StoreKey::from_hex(&hex) else {
        return bad_store_key();
    };
    let mode = if p.force {
        DeleteMode::Force
    } else {
        DeleteMode::Finished
    };
    match s.engine.store().delete(&key, mode).await {
        Ok(DeleteOutcome::Deleted) => {
            Json(json!({ "store_key": hex, "deleted": true })).into_response()
        }
        Ok(DeleteOutcome::Absent) => {
            Json(json!({ "store_key": hex, "deleted": false })).into_response()
        }
        Ok(DeleteOutcome::Revoked { epoch }) => {
            s.engine.wake(&key);
            tracing::warn!(store_key = %hex, epoch,
                "admin: revoked an in-flight record; the next retry runs at epoch {}", epoch + 1);
            Json(json!({
                "store_key": hex, "deleted": true, "revoked_epoch": epoch,
                "next_epoch": epoch + 1,
            }))
            .into_response()
        }
        Ok(DeleteOutcome::Refused { current }) if p.force => problem(
            StatusCode::CONFLICT,
            format!(
                "the record is {} now, not in flight: ?force=true only revokes a running \
                 request, and this outcome is kept for replays (delete it without force to \
                 remove it)",
                current.state.name()
            ),
        ),
        Ok(DeleteOutcome::Refused { current }) => problem(
            StatusCode::CONFLICT,
            format!(
                "the record is {}: deleting it would let a retry run while the first request \
                 still runs; wait for it, or delete with ?force=true to revoke it (the next \
                 retry then runs at epoch + 1, while the first may still be running upstream)",
                current.state.name()
            ),
        ),
        Err(e) => store_error(e),
    }
}

/// `POST /api/keys/lookup`: find the record a principal's key maps to.
#[derive(Deserialize)]
struct Lookup {
    /// The client's Idempotency-Key.
    key: String,
    /// The route name (default: the first route).
    route: Option<String>,
    /// The values of the route's scope headers, by header name (e.g. `authorization`).
    #[serde(default)]
    credentials: std::collections::BTreeMap<String, String>,
}

async fn lookup(State(s): State<AdminState>, Json(l): Json<Lookup>) -> Response {
    let route = match &l.route {
        Some(name) => s.routes.iter().find(|r| &r.name == name),
        None => s.routes.iter().next(),
    };
    let Some(route) = route else {
        return problem(StatusCode::NOT_FOUND, "no such route");
    };
    let key = match IdempotencyKey::parse(&l.key) {
        Ok(k) => k,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let creds: Vec<&[u8]> = route
        .scope_headers
        .iter()
        .map(|h| {
            l.credentials
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(h))
                .map_or(&b""[..], |(_, v)| v.as_bytes())
        })
        .collect();
    let scoped = ScopedKey::new(
        s.namespace.clone(),
        Scope::for_principal(&route.name, &creds),
        key,
    );
    let store_key = scoped.store_key();
    match s.engine.store().get(&store_key).await {
        Ok(record) => Json(json!({
            "store_key": store_key.to_hex(),
            "record": record.map(|r| record_json(&store_key, &r)),
        }))
        .into_response(),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
struct Resolve {
    /// `retry`: the operator established that the request did NOT take effect; the record is
    /// removed and the next retry runs it.
    action: String,
}

async fn resolve(
    State(s): State<AdminState>,
    Path(hex): Path<String>,
    Json(r): Json<Resolve>,
) -> Response {
    let Some(key) = StoreKey::from_hex(&hex) else {
        return bad_store_key();
    };
    if r.action != "retry" {
        return problem(
            StatusCode::BAD_REQUEST,
            "the only resolution is {\"action\": \"retry\"} (the request did not take effect)",
        );
    }
    // One compare-and-set: only an outcome-unknown record goes, so a record that expired and
    // was claimed again meanwhile (in flight) is never deleted under its new holder.
    match s.engine.store().delete(&key, DeleteMode::Unknown).await {
        Ok(DeleteOutcome::Deleted) => {
            Json(json!({ "store_key": hex, "resolved": "retry" })).into_response()
        }
        Ok(DeleteOutcome::Refused { current }) => problem(
            StatusCode::CONFLICT,
            format!(
                "the record is {}, not outcome-unknown",
                current.state.name()
            ),
        ),
        Ok(DeleteOutcome::Absent) => problem(
            StatusCode::NOT_FOUND,
            "no such record (absent or expired; a store that retried the delete may have \
             removed it on its first attempt)",
        ),
        Ok(DeleteOutcome::Revoked { .. }) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the store revoked a record it was asked to resolve",
        ),
        Err(e) => store_error(e),
    }
}
