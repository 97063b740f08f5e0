//! Clients that retry like real ones: each principal runs logical operations one after the
//! other; an operation is the same key, target and body on every attempt, sent by one sender or
//! by several at once (duplicates, as a client that hedges or a message delivered twice);
//! a sender retries what may be retried (no answer, `409`, `503`, `502` upstream-unavailable,
//! a transient upstream status) with full-jitter exponential backoff, picks an instance per
//! attempt, and gives up after its horizon. Every attempt is logged with what came back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use crate::upstream::{Behaviour, Fail};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One logical operation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Op {
    /// Operation id, unique in a run.
    pub id: u64,
    /// The client (principal) that runs it.
    pub client: u32,
    /// The `authorization` header: the principal, so the scope.
    pub scope: String,
    /// The `Idempotency-Key`.
    pub key: String,
    /// Path and query (the query asks the upstream for a behaviour).
    pub target: String,
    /// The request body.
    #[serde(with = "crate::upstream::text")]
    pub body: Bytes,
    /// How many senders send it at once.
    pub senders: u32,
    /// The behaviour asked of the upstream.
    pub behaviour: Behaviour,
}

/// The workload's mix: probabilities per operation (the behaviours are exclusive; an idle close
/// is added independently).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Mix {
    /// Every operation sent by this many senders at once, with the normal behaviour only (a
    /// pure race, RELIABILITY #1); `0`: the mix below.
    pub race: u32,
    /// Operations whose key string is shared by every client (each under its own scope, with
    /// its own body): a replay across scopes would show (I6).
    pub shared_keys: f64,
    /// Operations sent by 2 senders at once.
    pub dup2: f64,
    /// Operations sent by 4 senders at once.
    pub dup4: f64,
    /// Normal operations take a delay uniform in this range (ms).
    pub normal_ms: (u64, u64),
    /// Slow operations.
    pub slow: f64,
    /// Their delay range (ms).
    pub slow_ms: (u64, u64),
    /// Very slow operations (longer than the lease: renewals must keep it).
    pub very_slow: f64,
    /// Their delay range (ms).
    pub very_slow_ms: (u64, u64),
    /// Effect applied, then the connection closed without an answer.
    pub fail_close: f64,
    /// Effect applied, then the connection reset.
    pub fail_reset: f64,
    /// Effect applied, then the answer cut off.
    pub fail_truncate: f64,
    /// First arrival answered `503` without effect.
    pub transient: f64,
    /// A stored non-2xx answer (`500` or `402`).
    pub stored_error: f64,
    /// The upstream closes the keep-alive connection after a short idle time (200–800 ms,
    /// around idemgate's 500 ms pool idle timeout).
    pub idle_close: f64,
}

impl Default for Mix {
    fn default() -> Self {
        Self {
            race: 0,
            shared_keys: 0.2,
            dup2: 0.10,
            dup4: 0.05,
            normal_ms: (0, 20),
            slow: 0.08,
            slow_ms: (200, 1500),
            very_slow: 0.01,
            very_slow_ms: (4000, 4500),
            fail_close: 0.01,
            fail_reset: 0.01,
            fail_truncate: 0.01,
            transient: 0.02,
            stored_error: 0.02,
            idle_close: 0.03,
        }
    }
}

impl Mix {
    /// The `i`-th operation of `client` in run `run`.
    pub fn op(&self, run: &str, client: u32, i: u64, id: u64, rng: &mut Rng) -> Op {
        let senders = if self.race > 0 {
            self.race
        } else if rng.chance(self.dup4) {
            4
        } else if rng.chance(self.dup2) {
            2
        } else {
            1
        };
        let mut b = Behaviour {
            delay_ms: rng.range(self.normal_ms.0, self.normal_ms.1),
            ..Behaviour::default()
        };
        let roll = if self.race > 0 {
            1.0
        } else {
            rng.below(1_000_000) as f64 / 1_000_000.0
        };
        let mut edge = 0.0;
        let mut pick = |p: f64| {
            edge += p;
            roll < edge
        };
        if pick(self.slow) {
            b.delay_ms = rng.range(self.slow_ms.0, self.slow_ms.1);
        } else if pick(self.very_slow) {
            b.delay_ms = rng.range(self.very_slow_ms.0, self.very_slow_ms.1);
        } else if pick(self.fail_close) {
            b.fail = Some(Fail::Close);
        } else if pick(self.fail_reset) {
            b.fail = Some(Fail::Reset);
        } else if pick(self.fail_truncate) {
            b.fail = Some(Fail::Truncate);
        } else if pick(self.transient) {
            b.transient = 1;
        } else if pick(self.stored_error) {
            b.status = if rng.chance(0.5) { 500 } else { 402 };
        }
        if self.race == 0 && rng.chance(self.idle_close) {
            b.idle_close_ms = rng.range(200, 800);
        }
        let query = b.to_query();
        let target = if query.is_empty() {
            "/pay".to_owned()
        } else {
            format!("/pay?{query}")
        };
        Op {
            id,
            client,
            scope: format!("Bearer {run}-principal-{client}"),
            key: if self.race == 0 && rng.chance(self.shared_keys) {
                format!("{run}-shared-o{i}")
            } else {
                format!("{run}-c{client}-o{i}")
            },
            target,
            body: Bytes::from(format!(
                "{{\"client\":{client},\"op\":{i},\"amount\":{}}}",
                rng.range(1, 10_000)
            )),
            senders,
            behaviour: b,
        }
    }
}

/// What an answer was, as a client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// A fresh answer of the upstream (any status but a transient one), not a replay.
    Executed,
    /// `Idempotent-Replayed: true`.
    Replayed,
    /// A transient upstream status passed through (not stored, key released).
    Transient,
    /// `409` request-in-flight.
    Conflict,
    /// `422` fingerprint-mismatch.
    Mismatch,
    /// `400` missing or malformed key.
    BadKey,
    /// `413`.
    TooLarge,
    /// `503` store-unavailable.
    StoreUnavailable,
    /// `503` overloaded.
    Overloaded,
    /// `503` store-full.
    StoreFull,
    /// `502` outcome-unknown.
    OutcomeUnknown,
    /// `502` upstream-unavailable (provably not sent; key released).
    UpstreamUnavailable,
    /// `410` not-replayable.
    NotReplayable,
    /// `408` request-timeout.
    RequestTimeout,
    /// Any other problem+json answer.
    OtherProblem,
    /// No answer: connection refused, reset or closed, or the attempt timed out.
    Transport,
}

impl Class {
    /// The class of a problem `type` URN.
    pub fn of_problem(kind: &str) -> Class {
        match kind.strip_prefix("urn:idemgate:problem:").unwrap_or(kind) {
            "request-in-flight" => Class::Conflict,
            "fingerprint-mismatch" => Class::Mismatch,
            "missing-key" | "malformed-key" => Class::BadKey,
            "body-too-large" => Class::TooLarge,
            "store-unavailable" => Class::StoreUnavailable,
            "overloaded" => Class::Overloaded,
            "store-full" => Class::StoreFull,
            "outcome-unknown" => Class::OutcomeUnknown,
            "upstream-unavailable" => Class::UpstreamUnavailable,
            "not-replayable" => Class::NotReplayable,
            "request-timeout" => Class::RequestTimeout,
            _ => Class::OtherProblem,
        }
    }

    /// Whether a client stops on this answer (it is final for the operation).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Class::Executed
                | Class::Replayed
                | Class::Mismatch
                | Class::BadKey
                | Class::TooLarge
                | Class::OutcomeUnknown
                | Class::NotReplayable
        )
    }

    /// The name used in tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Executed => "executed",
            Class::Replayed => "replayed",
            Class::Transient => "transient",
            Class::Conflict => "conflict_409",
            Class::Mismatch => "mismatch_422",
            Class::BadKey => "bad_key_400",
            Class::TooLarge => "too_large_413",
            Class::StoreUnavailable => "store_unavailable_503",
            Class::Overloaded => "overloaded_503",
            Class::StoreFull => "store_full_503",
            Class::OutcomeUnknown => "outcome_unknown_502",
            Class::UpstreamUnavailable => "upstream_unavailable_502",
            Class::NotReplayable => "not_replayable_410",
            Class::RequestTimeout => "request_timeout_408",
            Class::OtherProblem => "other_problem",
            Class::Transport => "no_answer",
        }
    }
}

/// An answer, with the headers that matter.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// `Idempotent-Replayed: true`.
    pub replayed: bool,
    /// `Content-Type`.
    pub content_type: String,
    /// The problem `type`, for problem+json answers.
    pub problem: Option<String>,
    /// `Retry-After` was present.
    pub retry_after: bool,
    /// `Set-Cookie` was present.
    pub set_cookie: bool,
    /// The body.
    #[serde(with = "crate::upstream::text")]
    pub body: Bytes,
}

/// One attempt of a sender.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    /// Attempt id (sent as `x-chaos-attempt`).
    pub id: u64,
    /// The operation.
    pub op: u64,
    /// Which sender of the operation.
    pub sender: u32,
    /// The sender's attempt number, from 0.
    pub n: u32,
    /// The instance it went to.
    pub instance: u32,
    /// Sent by the end-of-run probe.
    pub probe: bool,
    /// Microseconds since the run's start.
    pub start_us: u64,
    /// Microseconds since the run's start.
    pub end_us: u64,
    /// Its class.
    pub class: Class,
    /// The answer, if one came.
    pub answer: Option<Answer>,
    /// Why no answer came.
    pub error: Option<String>,
}

/// How clients retry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Longest wait for one attempt's complete answer.
    pub attempt_timeout: Duration,
    /// A sender gives up once this long has passed since its first attempt.
    pub horizon: Duration,
    /// First backoff ceiling.
    pub base: Duration,
    /// Largest backoff ceiling.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempt_timeout: Duration::from_secs(10),
            horizon: Duration::from_secs(20),
            base: Duration::from_millis(20),
            cap: Duration::from_secs(1),
        }
    }
}

/// The instances' addresses, by index (an instance restarted on another port updates its slot).
#[derive(Debug, Default)]
pub struct Targets {
    addrs: RwLock<Vec<SocketAddr>>,
}

impl Targets {
    /// Targets at these addresses.
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        Self {
            addrs: RwLock::new(addrs),
        }
    }

    /// How many instances.
    pub fn len(&self) -> usize {
        self.addrs.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Instance `i`'s address.
    pub fn get(&self, i: usize) -> Option<SocketAddr> {
        self.addrs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(i)
            .copied()
    }

    /// Sets instance `i`'s address.
    pub fn set(&self, i: usize, addr: SocketAddr) {
        let mut a = self.addrs.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = a.get_mut(i) {
            *slot = addr;
        }
    }
}

/// The attempt log, shared by all senders.
#[derive(Debug)]
pub struct ClientLog {
    t0: Instant,
    next: AtomicU64,
    attempts: Mutex<Vec<Attempt>>,
}

impl ClientLog {
    /// An empty log, timing from `t0`.
    pub fn new(t0: Instant) -> Self {
        Self {
            t0,
            next: AtomicU64::new(1),
            attempts: Mutex::new(Vec::new()),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Attempts logged so far.
    pub fn count(&self) -> u64 {
        self.next.load(Ordering::Relaxed) - 1
    }

    /// The operations that got at least one answer of one of `classes`.
    pub fn ops_answered(&self, classes: &[Class]) -> std::collections::HashSet<u64> {
        lock(&self.attempts)
            .iter()
            .filter(|a| classes.contains(&a.class))
            .map(|a| a.op)
            .collect()
    }

    /// Takes the log.
    pub fn take(&self) -> Vec<Attempt> {
        std::mem::take(&mut *lock(&self.attempts))
    }
}

/// An HTTP/1.1 client with a connection pool (shared by all senders).
#[derive(Clone, Debug)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Self {
            client: Client::builder(TokioExecutor::new())
                // Below idemgate's keep-alive bound (header_read_timeout, 10 s).
                .pool_idle_timeout(Duration::from_secs(5))
                .build(connector),
        }
    }
}

/// The context senders share.
#[derive(Clone, Debug)]
pub struct Clients {
    /// HTTP client.
    pub http: Http,
    /// Where the instances are.
    pub targets: Arc<Targets>,
    /// Where attempts go.
    pub log: Arc<ClientLog>,
    /// How to retry.
    pub retry: RetryPolicy,
}

impl Clients {
    /// Runs one operation to its end: every sender retries until a final answer or its horizon.
    pub async fn run_op(&self, op: &Op, rng: &mut Rng) {
        let senders: Vec<_> = (0..op.senders)
            .map(|s| {
                let this = self.clone();
                let op = op.clone();
                let mut rng = rng.fork(u64::from(s) + 1);
                tokio::spawn(async move { this.sender(&op, s, &mut rng).await })
            })
            .collect();
        rng.next_u64();
        for s in senders {
            let _ = s.await;
        }
    }

    async fn sender(&self, op: &Op, sender: u32, rng: &mut Rng) {
        let started = tokio::time::Instant::now();
        let deadline = started + self.retry.horizon;
        for n in 0u32.. {
            let instance = rng.below(self.targets.len() as u64) as u32;
            let a = self.attempt(op, sender, n, instance, false).await;
            if a.is_final() || tokio::time::Instant::now() >= deadline {
                return;
            }
            let ceiling = self
                .retry
                .base
                .saturating_mul(1u32 << n.min(16))
                .min(self.retry.cap);
            let pause = rng.jitter(ceiling);
            let wake = (tokio::time::Instant::now() + pause).min(deadline);
            tokio::time::sleep_until(wake).await;
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
    }

    /// One attempt of `op` on `instance`, logged; returns its class.
    pub async fn attempt(&self, op: &Op, sender: u32, n: u32, instance: u32, probe: bool) -> Class {
        let id = self.log.next.fetch_add(1, Ordering::Relaxed);
        let start_us = self.log.now_us();
        let result = match self.targets.get(instance as usize) {
            Some(addr) => self.exchange(op, id, instance, addr).await,
            None => Err("no such instance".to_owned()),
        };
        let end_us = self.log.now_us();
        let (class, answer, error) = match result {
            Ok(a) => (classify(&a), Some(a), None),
            Err(e) => (Class::Transport, None, Some(e)),
        };
        lock(&self.log.attempts).push(Attempt {
            id,
            op: op.id,
            sender,
            n,
            instance,
            probe,
            start_us,
            end_us,
            class,
            answer,
            error,
        });
        class
    }

    async fn exchange(
        &self,
        op: &Op,
        id: u64,
        instance: u32,
        addr: SocketAddr,
    ) -> Result<Answer, String> {
        let req = Request::post(format!("http://{addr}{}", op.target))
            .header("authorization", &op.scope)
            .header("idempotency-key", &op.key)
            .header("content-type", "application/json")
            .header("x-chaos-instance", instance.to_string())
            .header("x-chaos-attempt", id.to_string())
            .body(Full::new(op.body.clone()))
            .map_err(|e| format!("request: {e}"))?;
        let exchange = async {
            let res = self.http.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    format!("connect: {}", root(&e))
                } else {
                    format!("sent, no answer: {}", root(&e))
                }
            })?;
            let (parts, body) = res.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| format!("answer cut off: {}", root(&e)))?
                .to_bytes();
            Ok::<_, String>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(self.retry.attempt_timeout, exchange)
            .await
            .map_err(|_| "attempt timed out".to_owned())??;
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header("content-type").unwrap_or_default();
        let problem = (content_type == "application/problem+json").then(|| {
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["type"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "(problem without a type)".to_owned())
        });
        Ok(Answer {
            status: parts.status.as_u16(),
            replayed: header("idempotent-replayed").as_deref() == Some("true"),
            content_type,
            problem,
            retry_after: parts.headers.contains_key("retry-after"),
            set_cookie: parts.headers.contains_key("set-cookie"),
            body,
        })
    }
}

/// The innermost cause of an error, as text.
fn root(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Statuses idemgate passes through without storing (its default transient list).
pub const TRANSIENT_STATUSES: [u16; 6] = [408, 425, 429, 502, 503, 504];

/// The class of an answer.
pub fn classify(a: &Answer) -> Class {
    if let Some(p) = &a.problem {
        return Class::of_problem(p);
    }
    if a.replayed {
        Class::Replayed
    } else if TRANSIENT_STATUSES.contains(&a.status) {
        Class::Transient
    } else {
        Class::Executed
    }
}
