//! # idemgate-client
//!
//! The client half of idempotency: retries that are safe **when the server honours
//! `Idempotency-Key`** — idemgate in front of the API, or an API that implements the key itself.
//! One `Idempotency-Key` per logical operation, identical on every attempt; exponential backoff with
//! full jitter, a cap, a maximum number of attempts and an overall deadline; `Retry-After`
//! honoured (never undercut, capped, jittered above); a retry budget and a circuit breaker per
//! host so that a failing server is not hammered; request bodies buffered so they can be resent.
//!
//! **The condition.** A key is what makes it safe to resend a POST or PATCH after a failure that
//! may have reached the server (a timeout, a reset, a `500`/`503`, a `409` in flight): the
//! server answers the resend from the first execution instead of running it again. A server
//! that ignores the header runs it again. By default the client takes every host to honour keys
//! (it is meant to sit in front of idemgate); a client that also calls APIs which ignore the
//! header must name the hosts that honour it with [`PolicyBuilder::key_hosts`]: to any other
//! host a non-idempotent request is resent only when it provably was not sent. And idemgate
//! itself protects only the routes it covers and only while its store answers: a request it
//! forwarded unprotected and lost (`502` upstream-failed) is never resent
//! ([`Error::OutcomeUnknown`] with `unprotected: true`).
//!
//! ## Overview
//!
//! - [`Policy`] (built with [`Policy::builder`]) holds every setting and the state shared by
//!   the requests sent under it: one [`budget::TokenBucket`] and one [`breaker::Breaker`] per
//!   host. Time and randomness are injected ([`clock::Clock`], [`PolicyBuilder::seed`]).
//! - `reqwest::RetryMiddleware` (feature `reqwest`) applies it to a `reqwest-middleware`
//!   client; `tower::RetryLayer` (feature `tower`) to any tower HTTP client service. Both run
//!   the same loop.
//! - [`classify`] says what is retried; [`backoff`] how long to wait; [`key`] how keys are made.
//! - Every response carries a [`RetryInfo`] extension: attempts, the key, whether it was a replay,
//!   and a log of the attempts. Every [`Error`] carries it too.
//! - [`guide`]: each default, and why, against AWS SDK standard retry mode, Stripe's SDKs, gRPC
//!   retry throttling, Envoy retry budgets and resilience4j; the measured amplification and
//!   overhead.
//!
//! ## Example
//!
//! A server (here a tower service) that fails twice with `503`, then answers; the client sends
//! three attempts with the same generated key and reports them. With the `reqwest` feature the
//! same policy goes into `reqwest_middleware::ClientBuilder::with(RetryMiddleware::new(policy))`.
//!
//! ```
//! # #[cfg(feature = "tower")]
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::convert::Infallible;
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use idemgate_client::{Policy, RetryInfo, tower::{RequestBody, RetryLayer}};
//! use tower::{Layer, ServiceExt};
//!
//! let keys = Arc::new(Mutex::new(Vec::new()));
//! let seen = keys.clone();
//! let flaky = tower::service_fn(move |req: Request<RequestBody>| {
//!     let mut seen = seen.lock().unwrap();
//!     seen.push(req.headers()["idempotency-key"].clone());
//!     let status = if seen.len() < 3 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::CREATED };
//!     async move { Ok::<_, Infallible>(Response::builder().status(status).body(Full::new(Bytes::new())).unwrap()) }
//! });
//!
//! let policy = Policy::builder().base_delay(Duration::from_millis(10)).seed(7).build()?;
//! let client = RetryLayer::new(policy).layer(flaky);
//! let res = client.oneshot(Request::post("http://shop.test/orders").body(Full::new(Bytes::from("{}")))?).await?;
//!
//! assert_eq!(res.status(), StatusCode::CREATED);
//! let info = res.extensions().get::<RetryInfo>().unwrap();
//! assert_eq!(info.attempts, 3);
//! let keys = keys.lock().unwrap();
//! assert!(keys.iter().all(|k| k == &keys[0])); // one key, every attempt
//! assert_eq!(info.key.as_deref(), keys[0].to_str().ok());
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! # }).unwrap();
//! ```
//!
//! ## Guarantees
//!
//! - **One key per operation.** A request without the key header gets one generated (UUID v7 by
//!   default) before its first attempt, sent unchanged on every attempt; a caller's key is never
//!   replaced. So behind idemgate (or any server honouring the key) every resend of a mutating
//!   request is answered from the first execution: one effect per logical operation.
//! - **Nothing unsafe is resent.** A request whose method is not idempotent (RFC 9110) and that
//!   has no key its host honours (no key, or a host outside [`PolicyBuilder::key_hosts`]) is
//!   resent only when it provably was not sent (no connection). A stream over the buffer cap is
//!   sent once.
//! - **idemgate's answers are respected.** A replay is final; an in-flight `409` is waited out
//!   as told; outcome-unknown, and upstream-failed for a non-idempotent request, are never
//!   retried and surface as [`Error::OutcomeUnknown`] with the key.
//! - **Bounded load.** At most `max_attempts` requests per operation (plus `409` waits); the
//!   budget bounds the retries a host gets during an outage to `capacity / retry_cost` (100 by
//!   default; tokens taken for a retry the breaker then refuses are given back); an open breaker
//!   sends nothing. The breaker counts operations, not attempts: an operation that succeeds
//!   after retries counts as one success, one that fails for good as one failure.
//! - **Bounded time.** The `deadline`, when set, covers the whole call: reading the request body
//!   to buffer it, every attempt and every wait. Durations are bounded (24 h) when the policy is
//!   built, so no deadline or wait can overflow.
//! - **Bounded memory.** Per-host state is kept for at most `max_hosts` hosts (least recently
//!   used forgotten — with its budget and breaker: a forgotten host starts again with a full
//!   budget and a closed breaker); bodies are buffered up to `body_limit` (a buffered body's
//!   trailers are dropped); problem bodies read for classification up to 64 KiB (a larger one
//!   is classified by its status alone and returned whole).
//!
//! ## Feature flags
//!
//! - `reqwest`: `reqwest::RetryMiddleware` for `reqwest-middleware` 0.5 / `reqwest` 0.13.
//!   reqwest comes without default features (no TLS, no HTTP/2): for HTTPS, enable reqwest's
//!   `rustls` (or `native-tls`) feature in your own manifest; Cargo unifies features, so the
//!   middleware's client gets it too. (No passthrough feature here: it would make
//!   `--all-features` builds compile a TLS stack the workspace does not otherwise need.)
//! - `tower`: `tower::RetryLayer`.
//!
//! No feature is on by default: the core (policy, budget, breaker, backoff, classification) has
//! no HTTP client dependency.
//!
//! ## Errors
//!
//! An operation that ends with an answer returns it, whatever its status (a `422`, or a `503`
//! after the last attempt); [`RetryInfo::stop`] says why the client stopped. An operation that
//! ends without one returns an [`Error`]: [`Error::OutcomeUnknown`], [`Error::CircuitOpen`],
//! [`Error::BudgetExhausted`], [`Error::AttemptsExhausted`], [`Error::DeadlineExceeded`],
//! [`Error::BodyNotRetryable`], [`Error::NotSafeToRetry`], [`Error::Transport`] or
//! [`Error::RequestBody`], each with a stable [`Error::kind`] and (but the last) the
//! [`RetryInfo`] and the key. Settings out of range are a [`ConfigError`] from
//! [`PolicyBuilder::build`].
//!
//! ## Visibility
//!
//! A `tracing` span `idemgate_client.attempt` per attempt (fields `attempt`, `host`, `key`,
//! `delay_ms`, `reason`, `probe`, `outcome`); `metrics` counters
//! `idemgate_client_attempts_total{host}`, `idemgate_client_retries_total{host,reason}`,
//! `idemgate_client_budget_exhausted_total{host}`,
//! `idemgate_client_breaker_transitions_total{host,from,to}`,
//! `idemgate_client_circuit_rejections_total{host}` (an attempt the breaker refused, and a retry
//! not attempted because the breaker was open), `idemgate_client_replays_total{host}` and
//! `idemgate_client_operations_total{host,stop}` (`stop`: [`Stop::as_str`], or `request_body`
//! for [`Error::RequestBody`]).

// The retry loop and its helpers are used by the adapters only: without either feature the
// crate is the policy core, and they are dead code by design.
#![cfg_attr(not(any(feature = "reqwest", feature = "tower")), allow(dead_code))]

pub mod backoff;
mod body;
pub mod breaker;
pub mod budget;
pub mod classify;
pub mod clock;
mod error;
pub mod guide;
pub mod key;
mod policy;
mod report;
#[cfg(feature = "reqwest")]
pub mod reqwest;
mod run;
#[cfg(feature = "tower")]
pub mod tower;

pub use error::{BoxError, Error, ErrorKind};
pub use policy::{ConfigError, HostSnapshot, Policy, PolicyBuilder};
pub use report::{AttemptRecord, RetryInfo, Stop};
