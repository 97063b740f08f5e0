//! Small in-process HTTP servers to run the checker against: one that implements
//! `Idempotency-Key` correctly, and the same server with one deliberate mistake ([`Defect`]).
//!
//! Every server answers:
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /orders[?delay_ms=N][&status=N][&fail_first=N]` | a new order `{"id": "ord-N", "key", "amount"}`, `201` (or `status`), after `delay_ms`; with `fail_first=N`, the first `N` attempts of each key are answered `503` without running (a transient failure) |
//! | `PUT /accounts/{id}` + `If-Match` | sets `balance`, bumps `version`: `200` with the new `ETag`; `412` on a stale `If-Match`, `428` without one |
//! | `GET /accounts/{id}` | `{"id", "balance", "version"}` with `ETag: "v<version>"` (every account exists, at version 0 until written) |
//! | `GET /_count?key=K` | `{"executions": N}`: how many times requests with key `K` took effect |
//! | `GET /_count` | `{"executions": N}`: effects over all keys (and requests without one) |
//!
//! `POST` and `PUT` go through the server's idempotency layer (keys required, 1–255 visible ASCII
//! bytes; fingerprint = method, path, query, body; `5xx` answers released, everything else
//! stored and replayed with `Idempotent-Replayed: true`; a duplicate in flight waits, or gets
//! `409` + `Retry-After` with [`FixtureOptions::reject_in_flight`]; a request without a key or
//! with a malformed one gets [`FixtureOptions::refusal`], `400` by default). HTTP/1 half-close is on: a
//! client that closes its side after sending does not cancel its request (what the
//! lost-response check does).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use idemgate_check::fixtures::{Defect, FixtureServer};
//! use idemgate_check::{Checker, Config, CheckName};
//!
//! let server = FixtureServer::start(Defect::IgnoresPayload).await?;
//! let mut spec = FixtureServer::spec();
//! spec.operations.truncate(1); // "create order"
//! let config = Config::new(server.url()).only([CheckName::Mismatch]).seed(1);
//! let report = Checker::new(spec, config)?.run().await?;
//! assert_eq!(report.failed_checks(), [("create order", CheckName::Mismatch)]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::Spec;

/// The mistake a fixture server makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Defect {
    /// None: a correct implementation.
    None,
    /// No idempotency at all: every request runs; keys are not even read.
    NoIdempotency,
    /// Replays by key but ignores the payload: another body under a used key gets the first
    /// answer instead of `422`.
    IgnoresPayload,
    /// Check-then-act: reads "key not seen", then (after a window in which other requests for the
    /// key are let in) writes; concurrent duplicates all run.
    CheckThenAct,
    /// Stores `5xx` answers and replays them: a retry after a transient failure never runs.
    StoresServerErrors,
    /// Replays a different body than the first answer (a `served` counter rendered anew).
    ReplaysDifferentBody,
    /// `PUT /accounts/{id}` ignores `If-Match`: the last write wins.
    IgnoresIfMatch,
    /// Runs a request without a key, or with a malformed one, and only then refuses it (`400`):
    /// the refusal comes after the effect.
    RunsUnkeyedRequests,
}

/// How a fixture server behaves.
#[derive(Clone, Copy, Debug)]
pub struct FixtureOptions {
    /// The mistake it makes.
    pub defect: Defect,
    /// A duplicate in flight gets `409` + `Retry-After: 1` at once (default: it waits).
    pub reject_in_flight: bool,
    /// Records expire after this long (default: never).
    pub ttl: Option<Duration>,
    /// Replays carry `Idempotent-Replayed: true` (default `true`).
    pub replay_marker: bool,
    /// The status of a request without a key or with a malformed one (default `400`).
    pub refusal: StatusCode,
    /// A completed request's record is written this long after its answer (default: at once):
    /// until then its key counts as in flight (a store that records asynchronously).
    pub record_lag: Option<Duration>,
}

impl FixtureOptions {
    /// The defaults, with `defect`.
    pub fn new(defect: Defect) -> Self {
        Self {
            defect,
            reject_in_flight: false,
            ttl: None,
            replay_marker: true,
            refusal: StatusCode::BAD_REQUEST,
            record_lag: None,
        }
    }
}

/// How long the check-then-act server holds a request between its check and its write, unless
/// another request for the same key arrives first.
const RACE_WINDOW: Duration = Duration::from_secs(1);

/// Longest request body read.
const MAX_BODY: usize = 64 * 1024;

/// A running fixture server; dropping it stops it.
#[derive(Debug)]
pub struct FixtureServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FixtureServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The spec that fits every fixture server: "create order" (`POST /orders`, with probe,
/// identity, slow and transient variants) and "update account" (`PUT /accounts/acct-1`,
/// `etag = true`).
pub const SPEC: &str = r#"
[defaults]
headers = { "content-type" = "application/json" }
key_required = true

[[operation]]
name = "create order"
method = "POST"
path = "/orders"
body = '{"amount": 10, "ref": "{{uuid}}"}'
effect_probe = { path = "/_count?key={{key}}", pointer = "/executions" }
identity = "/id"
slow_path = "/orders?delay_ms=300"
transient_path = "/orders?fail_first=1"

[[operation]]
name = "update account"
method = "PUT"
path = "/accounts/acct-1"
body = '{"balance": {{seq}}}'
effect_probe = { path = "/_count?key={{key}}", pointer = "/executions" }
identity = "/version"
slow_path = "/accounts/acct-1?delay_ms=300"
etag = true
"#;

impl FixtureServer {
    /// Starts a server with `defect` on a free loopback port.
    pub async fn start(defect: Defect) -> std::io::Result<Self> {
        Self::start_with(FixtureOptions::new(defect)).await
    }

    /// Starts a server with `options` on a free loopback port.
    pub async fn start_with(options: FixtureOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            options,
            records: Mutex::new(HashMap::new()),
            arrivals: Mutex::new(HashMap::new()),
            effects: Mutex::new(HashMap::new()),
            accounts: Mutex::new(HashMap::new()),
            orders: AtomicU64::new(0),
            served: AtomicU64::new(0),
            attempts: Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(serve(listener, state.clone()));
        Ok(Self { addr, state, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Effects so far, over all keys.
    pub fn effects(&self) -> u64 {
        lock(&self.state.effects).values().sum()
    }

    /// [`SPEC`], parsed.
    pub fn spec() -> Spec {
        // SPEC is a constant the crate's tests load: it is valid.
        Spec::from_toml_str(SPEC).unwrap_or_default()
    }
}

#[derive(Debug)]
struct State {
    options: FixtureOptions,
    records: Mutex<HashMap<String, Record>>,
    /// Check-then-act: requests waiting in their window, per key.
    arrivals: Mutex<HashMap<String, Arc<Notify>>>,
    effects: Mutex<HashMap<String, u64>>,
    accounts: Mutex<HashMap<String, Account>>,
    orders: AtomicU64,
    served: AtomicU64,
    /// `fail_first`: attempts so far, per key.
    attempts: Mutex<HashMap<String, u64>>,
}

#[derive(Clone, Debug)]
enum Record {
    InFlight {
        fingerprint: Bytes,
        done: Arc<Notify>,
    },
    Done {
        fingerprint: Bytes,
        answer: Stored,
        at: Instant,
    },
}

#[derive(Clone, Debug)]
struct Stored {
    status: StatusCode,
    body: Bytes,
    etag: Option<String>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Account {
    balance: i64,
    version: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(state, req).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().half_close(true);
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn answer(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn stored_response(stored: &Stored, replayed: bool) -> Response<Full<Bytes>> {
    stored_response_marked(stored, replayed, true)
}

fn stored_response_marked(stored: &Stored, replayed: bool, marker: bool) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(stored.body.clone()));
    *res.status_mut() = stored.status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(etag) = stored
        .etag
        .as_deref()
        .and_then(|e| HeaderValue::from_str(e).ok())
    {
        res.headers_mut().insert(http::header::ETAG, etag);
    }
    if replayed && marker {
        res.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    res
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn valid_key(key: &[u8]) -> bool {
    (1..=255).contains(&key.len()) && key.iter().all(|b| (0x21..=0x7e).contains(b))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if req.method() == Method::GET {
        if path == "/_count" {
            let effects = lock(&state.effects);
            let n = match query(&req).remove("key") {
                Some(key) => effects.get(&key).copied().unwrap_or(0),
                None => effects.values().sum(),
            };
            return answer(StatusCode::OK, json!({ "executions": n }));
        }
        if let Some(id) = path.strip_prefix("/accounts/") {
            let account = lock(&state.accounts).get(id).copied().unwrap_or_default();
            let mut res = account_answer(id, account);
            *res.status_mut() = StatusCode::OK;
            return res;
        }
        return answer(StatusCode::NOT_FOUND, json!({ "error": "not found" }));
    }
    let method = req.method().clone();
    let query = query(&req);
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_owned());
    let key = req.headers().get("idempotency-key").cloned();
    let if_match = req
        .headers()
        .get(http::header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return answer(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "error": "too large" }),
            );
        }
    };
    let work = Work {
        method: method.clone(),
        path,
        query,
        if_match,
        body: body.clone(),
        key: key
            .as_ref()
            .map(|k| String::from_utf8_lossy(k.as_bytes()).into_owned())
            .unwrap_or_default(),
    };
    if !matches!(method, Method::POST | Method::PUT | Method::PATCH) {
        return answer(StatusCode::METHOD_NOT_ALLOWED, json!({ "error": "method" }));
    }
    if state.options.defect == Defect::NoIdempotency {
        return stored_response(&execute(&state, &work).await, false);
    }
    let refused = |what: &str| answer(state.options.refusal, json!({ "error": what }));
    if !key.as_ref().is_some_and(|k| valid_key(k.as_bytes())) {
        if state.options.defect == Defect::RunsUnkeyedRequests {
            execute(&state, &work).await;
        }
        return refused(if key.is_some() {
            "malformed Idempotency-Key"
        } else {
            "Idempotency-Key is required"
        });
    }
    let mut fingerprint = format!("{method} {path_and_query}\n").into_bytes();
    fingerprint.extend_from_slice(&body);
    let fingerprint = Bytes::from(fingerprint);
    idempotent(state, work, fingerprint).await
}

/// What a protected request asks for.
#[derive(Clone, Debug)]
struct Work {
    method: Method,
    path: String,
    query: HashMap<String, String>,
    if_match: Option<String>,
    body: Bytes,
    key: String,
}

async fn idempotent(state: Arc<State>, work: Work, fingerprint: Bytes) -> Response<Full<Bytes>> {
    let defect = state.options.defect;
    let same = |fp: &Bytes| defect == Defect::IgnoresPayload || *fp == fingerprint;
    if defect == Defect::CheckThenAct {
        // Check…
        let seen = lock(&state.records).get(&work.key).cloned();
        match seen {
            Some(Record::Done {
                fingerprint: fp,
                answer,
                ..
            }) => {
                return if same(&fp) {
                    stored_response_marked(&answer, true, state.options.replay_marker)
                } else {
                    mismatch()
                };
            }
            Some(Record::InFlight { .. }) => return in_flight(),
            None => {}
        }
        // …a window in which other requests for the key get in (another arrival ends it)…
        let arrivals = lock(&state.arrivals)
            .entry(work.key.clone())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone();
        arrivals.notify_waiters();
        let _ = tokio::time::timeout(RACE_WINDOW, arrivals.notified()).await;
        // …then act: write and run, whatever happened meanwhile.
        let done = Arc::new(Notify::new());
        lock(&state.records).insert(
            work.key.clone(),
            Record::InFlight {
                fingerprint: fingerprint.clone(),
                done: done.clone(),
            },
        );
        return run_and_record(&state, work, fingerprint, done).await;
    }
    loop {
        let step = {
            let mut records = lock(&state.records);
            let expired = |at: &Instant| state.options.ttl.is_some_and(|ttl| at.elapsed() >= ttl);
            match records.get(&work.key) {
                Some(Record::Done {
                    fingerprint: fp,
                    answer,
                    at,
                }) if !expired(at) => {
                    if !same(fp) {
                        return mismatch();
                    }
                    let mut answer = answer.clone();
                    if defect == Defect::ReplaysDifferentBody {
                        answer.body = rerender(&state, &answer.body);
                    }
                    return stored_response_marked(&answer, true, state.options.replay_marker);
                }
                Some(Record::InFlight {
                    fingerprint: fp,
                    done,
                }) => {
                    if !same(fp) {
                        return mismatch();
                    }
                    if state.options.reject_in_flight {
                        return in_flight();
                    }
                    // Registered before the lock is let go: the completion cannot be missed.
                    let mut wait = Box::pin(done.clone().notified_owned());
                    wait.as_mut().enable();
                    Step::Wait(wait)
                }
                _ => {
                    let done = Arc::new(Notify::new());
                    records.insert(
                        work.key.clone(),
                        Record::InFlight {
                            fingerprint: fingerprint.clone(),
                            done: done.clone(),
                        },
                    );
                    Step::Run(done)
                }
            }
        };
        match step {
            Step::Wait(w) => w.await,
            Step::Run(done) => return run_and_record(&state, work, fingerprint, done).await,
        }
    }
}

enum Step {
    Wait(std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>),
    Run(Arc<Notify>),
}

/// Runs the work in a task of its own (a departed client does not cancel it), records the
/// outcome, wakes the waiting duplicates.
async fn run_and_record(
    state: &Arc<State>,
    work: Work,
    fingerprint: Bytes,
    done: Arc<Notify>,
) -> Response<Full<Bytes>> {
    let st = state.clone();
    let task = tokio::spawn(async move {
        let key = work.key.clone();
        let stored = execute(&st, &work).await;
        let released =
            stored.status.is_server_error() && st.options.defect != Defect::StoresServerErrors;
        match st.options.record_lag {
            Some(lag) if !released => {
                let (st, stored) = (st.clone(), stored.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(lag).await;
                    record(&st, key, fingerprint, stored, done);
                });
            }
            _ => record(&st, key, fingerprint, stored.clone(), done),
        }
        stored
    });
    match task.await {
        Ok(stored) => stored_response(&stored, false),
        Err(_) => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({ "error": "panicked" }),
        ),
    }
}

/// Stores the outcome (or releases the key after a `5xx`) and wakes the waiting duplicates.
fn record(state: &State, key: String, fingerprint: Bytes, stored: Stored, done: Arc<Notify>) {
    {
        let mut records = lock(&state.records);
        if stored.status.is_server_error() && state.options.defect != Defect::StoresServerErrors {
            records.remove(&key); // transient: released, a retry runs again
        } else {
            records.insert(
                key,
                Record::Done {
                    fingerprint,
                    answer: stored,
                    at: Instant::now(),
                },
            );
        }
    }
    done.notify_waiters();
}

fn mismatch() -> Response<Full<Bytes>> {
    answer(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({ "error": "this Idempotency-Key was used with another request" }),
    )
}

fn in_flight() -> Response<Full<Bytes>> {
    let mut res = answer(
        StatusCode::CONFLICT,
        json!({ "error": "a request with this Idempotency-Key is in progress" }),
    );
    res.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

/// A replayed body with its `served` counter rendered anew.
fn rerender(state: &State, body: &Bytes) -> Bytes {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut map)) => {
            let n = state.served.fetch_add(1, Ordering::SeqCst) + 1;
            map.insert("served".into(), n.into());
            Bytes::from(Value::Object(map).to_string())
        }
        _ => body.clone(),
    }
}

fn account_answer(id: &str, account: Account) -> Response<Full<Bytes>> {
    let mut res = answer(
        StatusCode::OK,
        json!({ "id": id, "balance": account.balance, "version": account.version }),
    );
    if let Ok(etag) = HeaderValue::from_str(&format!("\"v{}\"", account.version)) {
        res.headers_mut().insert(http::header::ETAG, etag);
    }
    res
}

fn count_effect(state: &State, key: &str) {
    *lock(&state.effects).entry(key.to_owned()).or_default() += 1;
}

/// The operation itself.
async fn execute(state: &State, work: &Work) -> Stored {
    if let Some(ms) = work.query.get("delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(n) = work
        .query
        .get("fail_first")
        .and_then(|v| v.parse::<u64>().ok())
    {
        let mut attempts = lock(&state.attempts);
        let seen = attempts.entry(work.key.clone()).or_default();
        if *seen < n {
            *seen += 1;
            return Stored {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: Bytes::from(json!({ "error": "try again" }).to_string()),
                etag: None,
            };
        }
    }
    let status = work
        .query
        .get("status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok());
    let doc: Value = serde_json::from_slice(&work.body).unwrap_or(Value::Null);
    if work.method == Method::POST && work.path == "/orders" {
        count_effect(state, &work.key);
        let n = state.orders.fetch_add(1, Ordering::SeqCst) + 1;
        let mut order =
            json!({ "id": format!("ord-{n}"), "key": work.key, "amount": doc["amount"] });
        if state.options.defect == Defect::ReplaysDifferentBody {
            order["served"] = (state.served.fetch_add(1, Ordering::SeqCst) + 1).into();
        }
        return Stored {
            status: status.unwrap_or(StatusCode::CREATED),
            body: Bytes::from(order.to_string()),
            etag: None,
        };
    }
    if matches!(work.method, Method::PUT | Method::PATCH)
        && let Some(id) = work.path.strip_prefix("/accounts/")
    {
        let mut accounts = lock(&state.accounts);
        let account = accounts.entry(id.to_owned()).or_default();
        let current = format!("\"v{}\"", account.version);
        if state.options.defect != Defect::IgnoresIfMatch {
            match &work.if_match {
                None => {
                    return Stored {
                        status: StatusCode::PRECONDITION_REQUIRED,
                        body: Bytes::from(json!({ "error": "If-Match is required" }).to_string()),
                        etag: None,
                    };
                }
                Some(tag) if *tag != current && tag != "*" => {
                    return Stored {
                        status: StatusCode::PRECONDITION_FAILED,
                        body: Bytes::from(
                            json!({ "error": "stale If-Match", "current": current }).to_string(),
                        ),
                        etag: Some(current),
                    };
                }
                Some(_) => {}
            }
        }
        account.balance = doc["balance"].as_i64().unwrap_or(account.balance);
        account.version += 1;
        let account = *account;
        drop(accounts);
        count_effect(state, &work.key);
        return Stored {
            status: status.unwrap_or(StatusCode::OK),
            body: Bytes::from(
                json!({ "id": id, "balance": account.balance, "version": account.version })
                    .to_string(),
            ),
            etag: Some(format!("\"v{}\"", account.version)),
        };
    }
    Stored {
        status: StatusCode::NOT_FOUND,
        body: Bytes::from(json!({ "error": "not found" }).to_string()),
        etag: None,
    }
}
