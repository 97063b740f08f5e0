//! # idemgate-chaos
//!
//! A chaos harness for idemgate, after Jepsen: run the whole system under a schedule of faults,
//! log every effect and every answer, and check the histories against the invariants of
//! `RELIABILITY.md` (I1–I7) afterwards. It depends on nothing of the product's internals: it
//! drives the `idemgate` binary, real stores and real sockets from outside.
//!
//! ## Overview
//!
//! - [`upstream`] — the **recording upstream** (hyper, loopback): logs
//!   `(scope, key, epoch, execution id, request digest, response)` before it answers; each
//!   request can ask it to be slow, to fail after applying the effect (close, reset, truncated
//!   answer), to answer a transient status without effect, or to close idle keep-alives.
//! - [`client`] — **clients**: one principal each, logical operations (same key, target and
//!   body on every attempt, sometimes sent by several senders at once), full-jitter backoff,
//!   an instance picked per attempt, a horizon; every attempt and answer is logged.
//! - [`procs`] — `idemgate serve` instances and a private `redis-server` or PostgreSQL
//!   cluster, as child processes signalled by PID.
//! - [`faults`] — the **fault injector**: SIGKILL / SIGTERM / SIGSTOP+SIGCONT / restart of
//!   instances, SIGKILL of the private Redis or PostgreSQL, and delay / blackhole / reset on the TCP relays
//!   (`idemgate-relay`) between each instance and the store and the upstream.
//! - [`resources`] — I7 sampling: instance RSS and open descriptors, store bytes, once a
//!   second.
//! - [`checker`] — the **checker**: per scoped key, effects per epoch (strict: per key), byte
//!   identity of every stored-status answer with its logged execution and of every replay with
//!   the first delivered answer, the G2 list, scope crossing, re-execution after an answer,
//!   keys left stuck; figures: outcome counts, throughput, p50/p99 per answer class, proxy
//!   overhead, orphan age. A violation comes with the key's whole history.
//! - [`run`] — one run from a [`run::Scenario`] (store, recovery mode, instances, clients,
//!   workload, fault plan): [`run::Scenario::short`] is the CI schedule,
//!   [`run::Scenario::long`] the soak.
//!
//! The binary `idemgate-chaos` runs scenarios from the command line (`--help`), including the
//! soak (`--long`); the tests in `tests/schedules.rs` run the short schedule on every store in
//! both recovery modes and fail on any violation.
//!
//! ## Example
//!
//! The recording upstream and a client, without idemgate in between (the client talks to the
//! upstream directly): one operation, one logged execution.
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use std::time::Instant;
//! use idemgate_chaos::client::{ClientLog, Clients, Http, Mix, RetryPolicy, Targets};
//! use idemgate_chaos::rng::Rng;
//! use idemgate_chaos::upstream::RecordingUpstream;
//!
//! let t0 = Instant::now();
//! let upstream = RecordingUpstream::start(t0, None).await?;
//! let clients = Clients {
//!     http: Http::default(),
//!     targets: Arc::new(Targets::new(vec![upstream.addr()])),
//!     log: Arc::new(ClientLog::new(t0)),
//!     retry: RetryPolicy::default(),
//! };
//! let mut rng = Rng::new(7);
//! let mut op = Mix::default().op("doc", 0, 0, 1, &mut rng);
//! op.target = "/pay?delay_ms=5".into(); // a plain, successful operation
//! op.senders = 1;
//! clients.run_op(&op, &mut rng).await;
//! let log = upstream.executions();
//! assert_eq!(log.len(), 1);
//! assert_eq!(log[0].key, op.key);
//! assert_eq!(log[0].scope, op.scope);
//! let attempts = clients.log.take();
//! assert_eq!(attempts[0].answer.as_ref().unwrap().body, log[0].body);
//! # Ok::<(), std::io::Error>(())
//! # }).unwrap();
//! ```
//!
//! A whole run (needs the `idemgate` binary, see [`procs::idemgate_bin`]):
//!
//! ```no_run
//! # async fn go() -> anyhow::Result<()> {
//! use idemgate_chaos::run::{Recovery, Scenario, StoreKind, run};
//! let outcome = run(&Scenario::short(StoreKind::Redis, Recovery::Strict)).await?;
//! println!("{}", outcome.report);
//! assert!(outcome.report.passed());
//! # Ok(()) }
//! ```
//!
//! ## Guarantees and limits
//!
//! - Every effect is logged before its answer is sent, and an effect runs to its end even if
//!   the connection that asked for it is gone; the run waits for the upstream to be idle before
//!   checking, so the execution log is complete.
//! - Time is one clock (the harness's): the checker's "after" is causal (an execution received
//!   after a client had read an answer).
//! - What a run cannot see: effects are the upstream's log, not a downstream database; the
//!   store's own contents are not inspected (stuck keys are found by probing through
//!   idemgate); I7 (RSS, descriptors) is not measured here.
//!
//! ## Errors
//!
//! [`run::run`] fails (an `anyhow::Error`) when a run cannot be set up: no `idemgate` binary,
//! no `redis-server`, an instance that does not start. Invariant violations are not errors:
//! they are in [`checker::Report::violations`].

pub mod checker;
pub mod client;
pub mod faults;
pub mod netns;
pub mod procs;
pub mod resources;
pub mod rng;
pub mod run;
pub mod upstream;
