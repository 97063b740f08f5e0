//! The admin listener: `/healthz`, `/readyz`, `/metrics`, the JSON admin API and the dashboard.
//!
//! Access (see [`AdminAccess`] and the README's "Admin listener"):
//!
//! - With a token (`--admin-token-file`, `IDEMGATE_ADMIN_TOKEN`, `--admin-token`), every endpoint
//!   but `/healthz`, `/readyz` and the dashboard page itself (static HTML; the data it fetches is
//!   protected) needs `Authorization: Bearer TOKEN`, compared in constant time; `/metrics` too
//!   unless `--admin-public-metrics`. A missing or wrong token gets `401` problem+json with
//!   `WWW-Authenticate: Bearer`. Without a token the listener must be on loopback (or started
//!   with `--admin-insecure-no-auth`).
//! - Against DNS rebinding (a web page whose host name is made to resolve to this machine, so
//!   that a browser sends it requests it may read), a request whose `Host` is neither an IP
//!   address, `localhost`, nor one of `--admin-allowed-hosts` gets `403` problem+json. Ports are
//!   not compared (port forwarding changes them; a rebinding attack is by name).
//! - Every answer carries `Idemgate-Admin: 1`, by which `idemgate keys` knows it reached an admin
//!   listener (and not the proxy port), and is never to be framed or sniffed:
//!   `X-Frame-Options: DENY`, `Content-Security-Policy: frame-ancestors 'none'` (the dashboard
//!   page gets a fuller policy: [`DASHBOARD_CSP`]) and `X-Content-Type-Options: nosniff`.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use idemgate_core::error::StoreError;
use idemgate_core::record::{Outcome, Record, RecordState, StoredResponse};
use idemgate_core::store::{DeleteMode, DeleteOutcome, ListRequest, ResolveOutcome, UnknownMark};
use idemgate_core::{Engine, IdempotencyKey, Scope, ScopedKey, Store, StoreKey};
use idemgate_tower::policy::{RoutePolicy, Routes};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::AdminAccess;

/// The header on every admin answer (see the module docs).
pub const ADMIN_HEADER: HeaderName = HeaderName::from_static("idemgate-admin");

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    /// The engine (and through it the store).
    pub engine: Engine<idemgate_core::SharedStore>,
    /// The metrics recorder's handle.
    pub prometheus: PrometheusHandle,
    /// The record namespace of this instance.
    pub namespace: String,
    /// The protected routes (for lookups, and for the TTL and header rules of resolutions).
    pub routes: Routes,
    /// Who may use the listener.
    pub access: Arc<AdminAccess>,
    /// The census of outcome-unknown records (a resolved record leaves its list at once).
    pub census: crate::census::UnknownCensus,
}

/// The admin router, behind the access guard.
/// `extra` (the dashboard's JSON API) is merged in before the access guard, so that it is
/// guarded like every other route.
pub fn router(state: AdminState, extra: Router) -> Router {
    let access = state.access.clone();
    match (&access.token, access.public_metrics) {
        (Some(_), false) => tracing::info!(
            "admin API: a bearer token is required everywhere but /healthz and /readyz"
        ),
        (Some(_), true) => tracing::info!(
            "admin API: a bearer token is required everywhere but /healthz, /readyz and /metrics"
        ),
        (None, _) => tracing::info!("admin API: no token set, no authentication"),
    }
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
        .merge(extra)
        .layer(axum::middleware::from_fn_with_state(access, guard))
}

/// The policy of every admin answer but the dashboard page: no framing (clickjacking of the
/// resolve and delete buttons).
const FRAME_CSP: &str = "frame-ancestors 'none'";

/// The dashboard page's policy: its one inline script (by hash), its inline styles, requests to
/// this listener only, no framing, no forms posted anywhere, no `<base>`.
pub static DASHBOARD_CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use base64::Engine as _;
    use sha2::Digest as _;
    let page = include_str!("dashboard.html");
    let script = page
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map_or("", |(script, _)| script);
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
    format!(
        "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; \
         connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
});

/// The realm named in `WWW-Authenticate`.
const REALM: &str = "idemgate-admin";

/// The access guard: the `Host` check, then the token, then the handler; every answer gets
/// [`ADMIN_HEADER`].
async fn guard(State(access): State<Arc<AdminAccess>>, req: Request, next: Next) -> Response {
    let mut res = match check(&access, &req) {
        Some(refusal) => refusal,
        None => next.run(req).await,
    };
    let headers = res.headers_mut();
    headers.insert(ADMIN_HEADER, HeaderValue::from_static("1"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The dashboard page brings its own (fuller) policy.
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(HeaderValue::from_static(FRAME_CSP));
    res
}

/// The refusal of `req`, if it is refused.
fn check(access: &AdminAccess, req: &Request) -> Option<Response> {
    let path = req.uri().path();
    // Probes of orchestrators and load balancers: no token, any name.
    if path == "/healthz" || path == "/readyz" {
        return None;
    }
    let host = req
        .headers()
        .get(header::HOST)
        // A value that is not text names no host this listener answers to.
        .map(|h| h.to_str().unwrap_or("(not text)").to_owned())
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
    if let Some(host) = host
        && !host_allowed(access, &host)
    {
        let shown: String = host.chars().take(100).collect();
        return Some(problem(
            StatusCode::FORBIDDEN,
            format!(
                "the admin listener does not answer to the host name in `Host: {shown}` (a \
                 defence against DNS rebinding): use an IP address or localhost, or add the name \
                 with --admin-allowed-hosts"
            ),
        ));
    }
    let Some(token) = &access.token else {
        return None;
    };
    // The dashboard page is static HTML (the data it fetches is protected); it asks the
    // operator for the token.
    if path == "/" || (path == "/metrics" && access.public_metrics) {
        return None;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| rest.trim().to_owned())
        });
    let (detail, challenge) = match given {
        Some(given) if same_token(given.as_bytes(), token.expose().as_bytes()) => return None,
        Some(_) => (
            "the admin token is wrong",
            format!("Bearer realm=\"{REALM}\", error=\"invalid_token\""),
        ),
        None => (
            "the admin API needs its token: send `Authorization: Bearer TOKEN` (idemgate keys: \
             --admin-token-file, IDEMGATE_ADMIN_TOKEN or --admin-token)",
            format!("Bearer realm=\"{REALM}\""),
        ),
    };
    let mut res = problem(StatusCode::UNAUTHORIZED, detail);
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    Some(res)
}

/// Compares a presented token with the configured one without an early exit on the first
/// differing byte (only the length can show in the timing).
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    let diff = given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// Whether the admin listener answers to `host` (a `Host` header value, port optional): an IP
/// address, `localhost`, or an allowed name.
fn host_allowed(access: &AdminAccess, host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest
            .split_once(']')
            .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name == "localhost"
        || access.allowed_hosts.iter().any(|h| h.allows(&name))
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

/// The dashboard page. It asks for the admin token itself when the API answers `401`, keeps it
/// in the tab's `sessionStorage` and sends it as `Authorization: Bearer` (never in a URL).
async fn dashboard() -> Response {
    let csp = HeaderValue::from_str(&DASHBOARD_CSP).unwrap_or(HeaderValue::from_static(FRAME_CSP));
    (
        [(header::CONTENT_SECURITY_POLICY, csp)],
        Html(include_str!("dashboard.html")),
    )
        .into_response()
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
        only_unknown: false,
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

/// `POST /api/keys/{store_key}/resolve`: an operator's verdict on an outcome-unknown record.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resolve {
    /// `retry`: the request did NOT take effect; the record is removed and the next retry runs
    /// it. `complete`: it DID take effect, and this was its answer (`status`, `headers`,
    /// `body`): the record becomes completed and retries replay that answer.
    action: String,
    /// `complete`: the status to replay (200 to 599).
    status: Option<u16>,
    /// `complete`: the headers to replay, as `{"name": "value"}` or `[["name", "value"], …]`
    /// (for repeated names).
    headers: Option<ResolveHeaders>,
    /// `complete`: the body to replay, as UTF-8 text.
    body: Option<String>,
    /// `complete`: the body to replay, base64 (standard alphabet, padded), for bytes that are
    /// not text.
    body_base64: Option<String>,
    /// `complete`: how long the completed record is kept (e.g. `24h`; default: the route's
    /// `ttl`).
    ttl: Option<String>,
    /// The epoch the operator saw (`get`): refused with 409 if the record is at another.
    epoch: Option<u64>,
    /// The marking instant the operator saw (`unknown_since_ms` of `get`): refused with 409 if
    /// the record was marked at another (it expired, and the key ran and was marked again).
    unknown_since_ms: Option<u64>,
}

/// Headers given to a `complete` resolution.
#[derive(Deserialize)]
#[serde(untagged)]
enum ResolveHeaders {
    Map(std::collections::BTreeMap<String, String>),
    Pairs(Vec<(String, String)>),
}

async fn resolve(
    State(s): State<AdminState>,
    Path(hex): Path<String>,
    Json(r): Json<Resolve>,
) -> Response {
    let Some(key) = StoreKey::from_hex(&hex) else {
        return bad_store_key();
    };
    match r.action.as_str() {
        "retry" => resolve_retry(&s, &key, &hex, &r).await,
        "complete" => resolve_complete(&s, &key, &hex, r).await,
        _ => problem(
            StatusCode::BAD_REQUEST,
            "action must be \"retry\" (the request did not take effect: the next retry runs it) \
             or \"complete\" with status, headers and body (it did: retries replay that answer)",
        ),
    }
}

/// The outcome-unknown record and its mark, checked against what the operator saw; or the
/// refusal.
async fn unknown_mark(
    s: &AdminState,
    key: &StoreKey,
    r: &Resolve,
) -> Result<(UnknownMark, Record), Response> {
    let record = match s.engine.store().get(key).await {
        Ok(Some(record)) => record,
        Ok(None) => {
            return Err(problem(
                StatusCode::NOT_FOUND,
                "no such record (absent or expired)",
            ));
        }
        Err(e) => return Err(store_error(e)),
    };
    let Some(mark) = UnknownMark::of(&record) else {
        return Err(problem(
            StatusCode::CONFLICT,
            format!("the record is {}, not outcome-unknown", record.state.name()),
        ));
    };
    if r.epoch.is_some_and(|e| e != mark.epoch)
        || r.unknown_since_ms
            .is_some_and(|t| t != mark.since.as_millis())
    {
        return Err(problem(
            StatusCode::CONFLICT,
            format!(
                "the record is outcome-unknown at epoch {} since {} ms, not the one given: it \
                 changed since it was read (look it up again)",
                mark.epoch,
                mark.since.as_millis()
            ),
        ));
    }
    Ok((mark, record))
}

async fn resolve_retry(s: &AdminState, key: &StoreKey, hex: &str, r: &Resolve) -> Response {
    if r.status.is_some()
        || r.headers.is_some()
        || r.body.is_some()
        || r.body_base64.is_some()
        || r.ttl.is_some()
    {
        return problem(
            StatusCode::BAD_REQUEST,
            "status, headers, body and ttl belong to \"complete\", not \"retry\"",
        );
    }
    if (r.epoch.is_some() || r.unknown_since_ms.is_some())
        && let Err(refusal) = unknown_mark(s, key, r).await
    {
        return refusal;
    }
    // One compare-and-set: only an outcome-unknown record goes, so a record that expired and
    // was claimed again meanwhile (in flight) is never deleted under its new holder.
    match s.engine.store().delete(key, DeleteMode::Unknown).await {
        Ok(DeleteOutcome::Deleted) => {
            s.census.forget(key);
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

/// The response a `complete` resolution records, checked against the route's header rules.
fn operator_response(route: &RoutePolicy, r: Resolve) -> Result<StoredResponse, String> {
    let status = r
        .status
        .ok_or("\"complete\" needs the status the request was answered with")?;
    if !(200..=599).contains(&status) {
        return Err(format!(
            "status {status} is not a final status to replay (200 to 599)"
        ));
    }
    let pairs = match r.headers {
        None => Vec::new(),
        Some(ResolveHeaders::Map(m)) => m.into_iter().collect(),
        Some(ResolveHeaders::Pairs(p)) => p,
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &pairs {
        let n = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("{name:?} is not a valid header name"))?;
        let v = HeaderValue::from_str(value)
            .map_err(|_| format!("the value of {name:?} is not a valid header value"))?;
        headers.append(n, v);
    }
    let kept = idemgate_tower::headers::storable(
        &headers,
        route.allow_response_headers.as_deref(),
        &route.deny_response_headers,
    );
    if kept.len() != headers.len() {
        let dropped: Vec<&str> = headers
            .keys()
            .map(HeaderName::as_str)
            .filter(|n| !kept.iter().any(|(k, _)| k == n))
            .collect();
        return Err(format!(
            "these headers are never stored on route {:?} (hop-by-hop, content-length, or by \
             its deny_response_headers / allow_response_headers): {}",
            route.name,
            dropped.join(", ")
        ));
    }
    let body = match (r.body, r.body_base64) {
        (Some(_), Some(_)) => return Err("give body or body_base64, not both".into()),
        (Some(text), None) => Bytes::from(text),
        (None, Some(b64)) => {
            use base64::Engine as _;
            Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| format!("body_base64 is not base64: {e}"))?,
            )
        }
        (None, None) => Bytes::new(),
    };
    if body.len() > route.max_response_body {
        return Err(format!(
            "the body is {} bytes, over route {:?}'s max_response_body ({})",
            body.len(),
            route.name,
            route.max_response_body
        ));
    }
    Ok(StoredResponse::new(status, kept, body))
}

async fn resolve_complete(s: &AdminState, key: &StoreKey, hex: &str, r: Resolve) -> Response {
    let (mark, record) = match unknown_mark(s, key, &r).await {
        Ok(found) => found,
        Err(refusal) => return refusal,
    };
    // Another service's record (a store shared between namespaces): its routes, TTLs and header
    // rules are not this instance's to apply.
    if record.namespace != s.namespace {
        return problem(
            StatusCode::CONFLICT,
            format!(
                "the record belongs to namespace {:?}, not this instance's ({:?}): complete it \
                 through an instance of that namespace",
                record.namespace, s.namespace
            ),
        );
    }
    // The record's route (its scope label is `ROUTE#…`) gives the TTL and the header rules; a
    // route no longer configured gets the defaults.
    let record_route = record
        .scope
        .rsplit_once('#')
        .map(|(route, _)| route.to_owned());
    let fallback;
    let route = match s
        .routes
        .iter()
        .find(|p| Some(&p.name) == record_route.as_ref())
    {
        Some(route) => route,
        None => {
            fallback = RoutePolicy::new(record_route.unwrap_or_default(), "/**");
            &fallback
        }
    };
    let ttl = match r.ttl.as_deref() {
        None => route.engine.ttl,
        Some(text) => match crate::config::parse_duration(text) {
            Ok(d)
                if (crate::config::RECORD_TTL.min..=crate::config::RECORD_TTL.max).contains(&d) =>
            {
                d
            }
            _ => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    format!("ttl {text:?} must be a duration from 1s to 365d, e.g. 24h"),
                );
            }
        },
    };
    let response = match operator_response(route, r) {
        Ok(response) => response,
        Err(detail) => return problem(StatusCode::BAD_REQUEST, detail),
    };
    let status = response.status;
    let outcome = Outcome::Response(response);
    match s
        .engine
        .store()
        .complete_unknown(key, mark, &outcome, ttl)
        .await
    {
        Ok(ResolveOutcome::Completed) => {
            s.census.forget(key);
            tracing::warn!(store_key = %hex, epoch = mark.epoch, status,
                "admin: an outcome-unknown record was completed by an operator");
            Json(json!({
                "store_key": hex, "resolved": "complete", "epoch": mark.epoch, "status": status,
            }))
            .into_response()
        }
        Ok(ResolveOutcome::Refused { current }) => problem(
            StatusCode::CONFLICT,
            format!(
                "the record changed meanwhile (it is {} now, not the outcome-unknown record \
                 read): nothing was changed",
                current.state.name()
            ),
        ),
        Ok(ResolveOutcome::Absent) => problem(
            StatusCode::NOT_FOUND,
            "no such record (it expired meanwhile)",
        ),
        Err(e) if e.is_value_too_large() => problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the response is too large for the store: {e}"),
        ),
        Err(e) => store_error(e),
    }
}
