//! An axum payments API made safe to retry in-process with `idemgate-tower`.
//!
//! [`app`] builds the service: an axum `Router` with [`IdempotencyLayer`] put on it by
//! `Router::layer` (the layer answers its own failures, so `axum::serve` runs it as it is).
//! [`app_on`] takes the engine, e.g. one on a shared Redis or PostgreSQL store with the
//! cross-instance wake-ups and the replay cache (`idemgate_stores::connect`; see `main.rs`).
//!
//! Two resources:
//!
//! - `POST /payments` charges the [`Ledger`] (`Idempotency-Key` required).
//! - `/accounts/{id}`, a **versioned** resource (optimistic locking with idempotency keys):
//!   `GET` answers `{"id", "balance", "version"}` with `ETag: "<version>"` (every account exists
//!   at version 0 until written); `PUT {"balance": N}` needs an `Idempotency-Key` and an
//!   `If-Match` with the current `ETag`: `200` with the new `ETag`, `412` when the `ETag` is
//!   stale (someone else wrote first), `428` without `If-Match`. A retry of a `PUT` (same key)
//!   gets the stored answer, so a client whose answer was lost learns that its update won, even
//!   though its `If-Match` is stale by then; two updates racing with one `If-Match` cannot both
//!   win.
//!
//! `idemgate-check.toml` beside this crate is the spec `idemgate check` passes it with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{ETAG, IF_MATCH};
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use idemgate_core::{Engine, MemoryStore, Store};
use idemgate_tower::IdempotencyLayer;
use idemgate_tower::policy::{RoutePolicy, Routes};
use serde_json::{Value, json};

/// Counts charges, to show that retries do not charge twice.
#[derive(Clone, Default)]
pub struct Ledger(Arc<AtomicU64>);

impl Ledger {
    /// Charges made so far.
    pub fn charges(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

async fn charge(
    State(ledger): State<Ledger>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let n = ledger.0.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        Json(json!({ "charge": n, "amount": body["amount"] })),
    )
}

/// Versioned accounts: balance and version per id.
#[derive(Clone, Default)]
pub struct Accounts(Arc<Mutex<HashMap<String, Account>>>);

/// One account.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// The balance.
    pub balance: i64,
    /// Bumped by every update; the `ETag` is its decimal value, quoted.
    pub version: u64,
}

impl Accounts {
    /// The account `id` (version 0 if never written).
    pub fn get(&self, id: &str) -> Account {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
            .unwrap_or_default()
    }
}

fn etag(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

fn account_answer(status: StatusCode, id: &str, account: Account) -> Response<Body> {
    let body = json!({ "id": id, "balance": account.balance, "version": account.version });
    (status, [(ETAG, etag(account.version))], Json(body)).into_response()
}

async fn read_account(State(accounts): State<Accounts>, Path(id): Path<String>) -> Response<Body> {
    account_answer(StatusCode::OK, &id, accounts.get(&id))
}

/// `PUT /accounts/{id}`: a compare-and-set on the version named by `If-Match`.
async fn write_account(
    State(accounts): State<Accounts>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response<Body> {
    let Some(if_match) = headers.get(IF_MATCH) else {
        let problem = json!({ "title": "If-Match is required", "status": 428 });
        return (StatusCode::PRECONDITION_REQUIRED, Json(problem)).into_response();
    };
    let Some(balance) = body["balance"].as_i64() else {
        let problem = json!({ "title": "balance must be an integer", "status": 400 });
        return (StatusCode::BAD_REQUEST, Json(problem)).into_response();
    };
    let mut map = accounts.0.lock().unwrap_or_else(|e| e.into_inner());
    let account = map.entry(id.clone()).or_default();
    if *if_match != etag(account.version) && if_match != "*" {
        let current = *account;
        drop(map);
        let problem = json!({
            "title": "the account changed since this ETag",
            "status": 412,
            "current_version": current.version,
        });
        return (
            StatusCode::PRECONDITION_FAILED,
            [(ETAG, etag(current.version))],
            Json(problem),
        )
            .into_response();
    }
    account.balance = balance;
    account.version += 1;
    let updated = *account;
    drop(map);
    account_answer(StatusCode::OK, &id, updated)
}

/// The service: `POST /payments` and `PUT /accounts/{id}` require an `Idempotency-Key`.
///
/// The layer goes straight onto the router (`Router::layer`): it answers every failure itself
/// (problem+json), so no `HandleErrorLayer` is needed.
pub fn app(ledger: Ledger) -> axum::Router {
    let engine = Engine::builder(MemoryStore::default()).build();
    app_on(ledger, engine)
}

/// [`app`] on an engine of your choice: e.g. one from `idemgate_stores::connect` on Redis or
/// PostgreSQL, shared by every instance (see `main.rs`).
pub fn app_on<S: Store>(ledger: Ledger, engine: Engine<S>) -> axum::Router {
    let accounts = axum::Router::new()
        .route("/accounts/{id}", get(read_account).put(write_account))
        .with_state(Accounts::default());
    let routes = Routes::new(vec![
        RoutePolicy::new("payments", "/payments").required(true),
        RoutePolicy::new("accounts", "/accounts/*")
            .methods([Method::PUT])
            .required(true),
    ]);
    axum::Router::new()
        .route("/payments", post(charge))
        .with_state(ledger)
        .merge(accounts)
        .layer(IdempotencyLayer::new(engine, routes))
}
