//! # idemgate-tower
//!
//! A [tower](https://docs.rs/tower) layer that gives any HTTP service `Idempotency-Key`
//! semantics: the first request with a key runs and its response is stored; every retry gets the
//! byte-identical stored response with `Idempotent-Replayed: true`; a retry while the first is
//! running waits (or gets `409`); the same key with another request gets `422`.
//!
//! ## Overview
//!
//! - [`IdempotencyLayer`] wraps an inner service whose requests carry an [`IdemBody`] (any
//!   `http_body::Body` works through [`body::boxed`]); it needs an [`idemgate_core::Engine`] over
//!   any [`idemgate_core::Store`].
//! - [`policy`]: which methods and paths are covered and how (key required, TTL, wait or reject,
//!   fingerprint options, transient statuses, scope headers, body limits, fail open or closed).
//! - [`problem`]: the RFC 9457 answers, one stable `type` per case.
//! - [`upstream::UpstreamError`]: how an inner service says "never sent" (release the key) or
//!   "sent, no complete answer" (outcome unknown).
//! - [`metrics`]: the counters and latency histograms the layer records (through the `metrics`
//!   facade), registered at zero when the layer is built.
//!
//! ## Example
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use idemgate_core::{Engine, MemoryStore};
//! use idemgate_tower::{IdempotencyLayer, body::{IdemBody, full}, policy::Routes};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! let charges = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
//! let counter = charges.clone();
//! let app = tower::service_fn(move |_req: Request<IdemBody>| {
//!     let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
//!     async move { Ok::<_, Infallible>(Response::new(full(Bytes::from(format!("charge #{n}"))))) }
//! });
//! let engine = Engine::builder(MemoryStore::default()).build();
//! let mut svc = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(engine, Routes::catch_all(true)))
//!     .service(app);
//!
//! for _ in 0..2 {
//!     let req = Request::post("/pay").header("idempotency-key", "k-1")
//!         .body(Full::new(Bytes::from_static(b"{}")))?;
//!     let res = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc).await?.call(req).await?;
//!     assert_eq!(res.into_body().collect().await?.to_bytes(), "charge #1");
//! }
//! assert_eq!(charges.load(std::sync::atomic::Ordering::SeqCst), 1);
//!
//! // Without a key, on a route that requires one: 400 problem+json.
//! let req = Request::post("/pay").body(Full::new(Bytes::new()))?;
//! let res = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc).await?.call(req).await?;
//! assert_eq!(res.status(), 400);
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! # }).unwrap();
//! ```
//!
//! ## With axum
//!
//! Put the layer on the router; no `HandleErrorLayer` is needed:
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use axum::{Router, routing::post};
//! use idemgate_core::{Engine, MemoryStore};
//! use idemgate_tower::{IdempotencyLayer, policy::{RoutePolicy, Routes}};
//! use tower::ServiceExt;
//!
//! let engine = Engine::builder(MemoryStore::default()).build();
//! let routes = Routes::new(vec![RoutePolicy::new("payments", "/payments").required(true)]);
//! let app = Router::new()
//!     .route("/payments", post(|| async { "charged" }))
//!     .layer(IdempotencyLayer::new(engine, routes));
//!
//! let req = || http::Request::post("/payments").header("idempotency-key", "k-1")
//!     .body(axum::body::Body::empty()).unwrap();
//! let first = app.clone().oneshot(req()).await?;
//! let retry = app.clone().oneshot(req()).await?;
//! assert_eq!(first.status(), 200);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! // `axum::serve(listener, app)` serves it.
//! # Ok::<(), std::convert::Infallible>(())
//! # }).unwrap();
//! ```
//!
//! ## On Redis, PostgreSQL or DynamoDB
//!
//! Several instances of a service share keys through a shared store. Build the engine with
//! `idemgate_stores::connect` (crate `idemgate-stores`, features `redis`, `postgres`,
//! `dynamodb`): it is wired as `idemgate serve` wires its own — a deadline and metrics on every
//! store operation, a local replay cache of completed records (replays cost no round trip), and
//! the follower of the store's completion feed, which wakes a request waiting here as soon as
//! another instance finishes its key:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use idemgate_stores::{StackOptions, connect};
//! use idemgate_tower::{IdempotencyLayer, policy::Routes};
//!
//! let options = StackOptions { deadline: Duration::from_secs(3), replay_cache_entries: 100_000 };
//! // Keep `store` alive as long as the service runs: it owns the follower.
//! let store = connect("redis://127.0.0.1:6379", &options, |b| b).await?;
//! let layer = IdempotencyLayer::new(store.engine.clone(), Routes::catch_all(true));
//! # let _ = layer;
//! # Ok(()) }
//! ```
//!
//! `examples/axum-payments` does both (its `main.rs` reads the store URL from `IDEMGATE_STORE`),
//! and its `tests/shared_store.rs` runs two instances on real Redis and PostgreSQL.
//!
//! ## Guarantees
//!
//! Those of the engine (PRODUCT §4), plus: covered requests whose body is over the limit get `413`
//! before anything is claimed (G2); replays never cross scopes — the scope is the route name and a
//! hash of the configured principal headers (G6); hop-by-hop headers, `content-length` and (by
//! default) `Set-Cookie` are never stored (G6); inner-service failures are released only when they
//! are [`upstream::UpstreamError::NotSent`] or the status is declared transient (G3).
//!
//! ## Feature flags
//!
//! None.
//!
//! ## Errors
//!
//! None: the service's error type is [`Infallible`](std::convert::Infallible), so the layer goes
//! straight onto `axum::Router::layer` or a hyper server. Everything is answered, with RFC 9457
//! problem+json (see [`problem::ProblemKind`]): what idemgate decides itself; a client's request
//! body that fails (`408` for a [`body::RequestBodyError::Timeout`], `400` otherwise); an
//! inner-service error on a passed-through request (`502`, naming only its
//! [`upstream::Cause`] for an [`upstream::UpstreamError`], logged at WARN otherwise); and an
//! inner service that fails to become ready (`502`, nothing sent, for the next request).
//!
//! ## Limits
//!
//! [`IdempotencyLayerBuilder::max_concurrent_requests`] caps protected requests in progress and
//! [`IdempotencyLayerBuilder::body_budget`] the bytes of their bodies held in memory; over either,
//! `503` + `Retry-After` at once (no queue). Requests refused before their body was read have it
//! drained first (up to [`body::DRAIN_LIMIT`]), so the client can read the answer.

pub mod body;
mod future;
pub mod headers;
mod layer;
pub mod metrics;
pub mod observe;
pub mod policy;
pub mod problem;
mod protect;
mod respond;
mod service;
pub mod upstream;

pub use body::IdemBody;
pub use future::ResponseFuture;
pub use layer::{IdempotencyLayer, IdempotencyLayerBuilder};
pub use respond::Answer;
pub use service::Idempotency;
