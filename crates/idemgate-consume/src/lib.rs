//! # idemgate-consume
//!
//! `idemgate consume`: exactly-once delivery of queue messages to ANY HTTP handler. The messaging
//! twin of `idemgate serve`: it consumes from NATS JetStream or RabbitMQ and POSTs each message
//! to an HTTP endpoint through idemgate's engine ([`idemgate_dedup::Deduplicator`]), so that a
//! handler written in any language receives each message once per epoch, with
//! `Idempotency-Key` and `Idempotency-Epoch`. The binary only parses flags and calls [`run`].
//!
//! ## Overview
//!
//! - The key is the `Nats-Msg-Id` header or the AMQP `message_id` property. A message without
//!   one is keyed by a hash of its payload with [`Config::hash_when_missing`]; otherwise a
//!   JetStream message is keyed by its place in the stream (`jetstream:<publication time>:<stream
//!   sequence>`: redeliveries are deduplicated, a re-publish is a new message), and a RabbitMQ
//!   message, which has no such identity, is dead-lettered.
//! - Records are scoped by the consumer: `nats:<stream>:<durable>` or `amqp:<vhost>:<queue>`.
//!   Two durables (or queues) each get every message once; the same id in two streams is two
//!   messages.
//! - The POST body is the payload; `Content-Type` is the message's content type
//!   (`application/octet-stream` without one); the subject (NATS) or routing key (AMQP) is in
//!   `x-idemgate-subject`, the broker's delivery count in `x-idemgate-delivery`.
//! - Ack only after the outcome is recorded. Any status but a transient one (408, 425, 429,
//!   502, 503, 504 by default) is recorded and acked, and every redelivery is acked without a
//!   second POST. A transient status or an unreachable target releases the key and nacks with
//!   backoff (NATS `NAK` with a delay; RabbitMQ: held for the delay, then rejected with
//!   requeue). A message running in another consumer is nacked with the holder's remaining
//!   lease as delay. A request sent without a complete answer (timeout, reset) is
//!   outcome-unknown: never re-sent, dead-lettered.
//! - While a slow handler runs, JetStream gets "in progress" acks every third of `AckWait`, and
//!   the engine renews the lease every third of the lease.
//! - After [`Config::max_deliver`] attempts that did not succeed (a transient status, an
//!   unreachable target; a message nacked because another consumer runs it is not an attempt,
//!   nor is one whose outcome the store failed to record — as far as this process saw: the
//!   brokers' own delivery counts include hand-backs another process made, so a message may
//!   reach the limit sooner after a restart), the message is dead-lettered: NATS
//!   publishes it to `--dead-letter SUBJECT` (a stream must capture that subject) and
//!   terminates it; RabbitMQ publishes it to `--dead-letter EXCHANGE` with publisher confirms
//!   and acks it. A dead-letter destination is required: without one, `run` refuses to start
//!   unless [`Config::discard_dead_letters`] says that such messages may be terminated (NATS
//!   `TERM`) or rejected without requeue (RabbitMQ: the queue's own dead-letter exchange gets
//!   them if it has one, otherwise RabbitMQ drops them).
//! - The stream or queue may exist already: `consume` binds its own durable consumer
//!   (JetStream) or consumes from the queue after a *passive* declare (RabbitMQ: never
//!   redeclared with other arguments); with [`Config::create`] it creates what is missing. An
//!   existing durable is used only if it fits: explicit acks, the same filter subject, an
//!   unlimited JetStream `max_deliver` (JetStream counts every hand-back and would stop
//!   redelivering a message neither processed nor dead-lettered), not headers-only, and pull
//!   limits (`max_batch`, `max_bytes`, `max_expires`) that let `consume` pull; its own
//!   `AckWait` paces the progress acks.
//! - `--admin-listen`: `/metrics` (Prometheus), `/healthz`, `/readyz` (200 while consuming;
//!   for NATS, while the client is connected).
//! - Graceful shutdown: stop pulling, let in-flight messages finish within the drain timeout;
//!   messages still unfinished are not acked (the broker hands them out again, and their
//!   leases expire into a takeover). When the broker connection ends (the JetStream message
//!   stream closes, the RabbitMQ consumer is cancelled or fails), `run` drains the same way
//!   and then returns the error: `idemgate consume` exits non-zero for its supervisor to
//!   restart it. (The NATS client reconnects by itself after a network failure; `/readyz`
//!   answers 503 while it is disconnected.)
//! - The store must outlive the process: `memory://` is refused (a restart would forget every
//!   processed message, and redeliveries would run again), and strict recovery refuses a store
//!   that may lose acknowledged writes, as `idemgate serve` does.
//!
//! ## Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), idemgate_consume::ConsumeError> {
//! use idemgate_consume::{Config, NatsSource, Source};
//!
//! let mut config = Config::new(
//!     Source::Nats(NatsSource {
//!         url: "nats://127.0.0.1:4222".into(),
//!         stream: "ORDERS".into(),
//!         subject: "orders.>".into(),
//!         durable: "billing".into(),
//!         ack_wait: std::time::Duration::from_secs(30),
//!     }),
//!     "http://127.0.0.1:8000/orders".parse().expect("a URL"),
//! );
//! // A subject outside the consumed stream, captured by a stream of its own.
//! config.dead_letter = Some("dead.orders".into());
//! assert_eq!(config.consumer(), "nats:ORDERS:billing");
//! let (stop, stopped) = tokio::sync::watch::channel(false);
//! let report = idemgate_consume::run(config, stopped).await?;
//! drop(stop);
//! println!("{report:?}");
//! # Ok(()) }
//! ```
//!
//! ## Guarantees
//!
//! Those of [`idemgate_dedup::Deduplicator`] on the store given: per `(consumer, message id)`
//! within the record's TTL, at most one POST per epoch; a new epoch only after the previous
//! holder's lease expired (it was killed mid-request); every delivered message acked only once
//! its outcome is recorded. The scope is [`Config::consumer`]: stream and durable (NATS), or
//! virtual host and queue (AMQP).
//!
//! ## Bounds
//!
//! At most [`Config::concurrency`] messages are handled at once: the source pulls the next
//! message only when one of the permits is free (JetStream batches of at most that size, and
//! `max_ack_pending` twice that; RabbitMQ prefetch of that size). A message waiting for its
//! nack delay on RabbitMQ keeps its permit. Response bodies are kept up to
//! [`Config::max_response_body`] bytes (beyond that only the status is recorded).
//!
//! ## Errors
//!
//! [`ConsumeError`]: the store or the broker could not be opened, the admin address not bound,
//! or the broker's consumer ended.

mod admin;
mod amqp;
mod bridge;
mod nats;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::Uri;
use idemgate_dedup::{Deduplicator, Recovery};
use tokio::task::JoinSet;

pub use amqp::AmqpSource;
pub use bridge::{DELIVERY_HEADER, SUBJECT_HEADER};
pub use nats::NatsSource;

/// Where messages come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// NATS JetStream.
    Nats(NatsSource),
    /// RabbitMQ.
    Amqp(AmqpSource),
}

/// Everything [`run`] needs; [`Config::new`] has the defaults.
#[derive(Clone)]
pub struct Config {
    /// The broker.
    pub source: Source,
    /// The HTTP handler every message is POSTed to (`http://` only).
    pub target: Uri,
    /// The store URL (`idemgate_stores::open`; default `file:./idemgate-consume-data`).
    pub store: String,
    /// Namespace of the records (default `messages`).
    pub namespace: String,
    /// Messages handled at once (default 16).
    pub concurrency: usize,
    /// Failed attempts after which a message is dead-lettered (default 5); see the crate docs
    /// for what counts as an attempt.
    pub max_deliver: u32,
    /// Dead-letter subject (NATS) or exchange (RabbitMQ). Required unless
    /// `discard_dead_letters`.
    pub dead_letter: Option<String>,
    /// Without `dead_letter`: terminate (NATS `TERM`) or reject without requeue (RabbitMQ: the
    /// queue's own dead-letter exchange, if any) the messages that cannot be processed. Default
    /// `false`: `run` refuses to start without a dead-letter destination, so that no message is
    /// dropped silently.
    pub discard_dead_letters: bool,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: Option<SocketAddr>,
    /// Create the stream or queue when missing (default: refuse to start).
    pub create: bool,
    /// Deduplicate messages without an id by a hash of their payload (default: dead-letter
    /// them).
    pub hash_when_missing: bool,
    /// Lease of a running message (default 10 s; renewed every third).
    pub lease_ttl: Duration,
    /// How long a processed message's record is kept (default 24 h).
    pub ttl: Duration,
    /// Takeover (default) or strict recovery of a dead consumer's messages.
    pub recovery: Recovery,
    /// Deadline of every store operation (default 5 s).
    pub store_timeout: Duration,
    /// Connecting to the target (default 5 s).
    pub connect_timeout: Duration,
    /// Waiting for the target's answer (default 30 s); past it the outcome is unknown.
    pub response_timeout: Duration,
    /// Statuses that release the key and nack (default 408, 425, 429, 502, 503, 504).
    pub transient_statuses: Vec<u16>,
    /// Bytes of a response body kept (default 1 MiB).
    pub max_response_body: usize,
    /// Largest message payload handled (default 16 MiB); a larger one is dead-lettered
    /// (`too-large`) without a POST. (NATS servers cap payloads at 1 MiB by default; RabbitMQ
    /// allows up to 128 MiB.) At most `concurrency` payloads are held at once.
    pub max_payload: usize,
    /// First retry delay (default 500 ms), doubled per delivery up to `retry_max` (30 s).
    pub retry_base: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Longest wait for in-flight messages at shutdown (default 30 s).
    pub drain_timeout: Duration,
    /// No dedup at all: every delivery is POSTed (at-least-once, like a plain consumer). Only
    /// for measuring what dedup costs; default `false`.
    pub no_dedup: bool,
}

impl Config {
    /// The defaults for `source` and `target`.
    pub fn new(source: Source, target: Uri) -> Self {
        Self {
            source,
            target,
            store: "file:./idemgate-consume-data".into(),
            namespace: "messages".into(),
            concurrency: 16,
            max_deliver: 5,
            dead_letter: None,
            discard_dead_letters: false,
            admin_listen: None,
            create: false,
            hash_when_missing: false,
            lease_ttl: Duration::from_secs(10),
            ttl: Duration::from_secs(24 * 3600),
            recovery: Recovery::Takeover,
            store_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
            transient_statuses: vec![408, 425, 429, 502, 503, 504],
            max_response_body: 1 << 20,
            max_payload: 16 << 20,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            no_dedup: false,
        }
    }

    /// The dedup consumer name, the scope of the records: `nats:<stream>:<durable>` or
    /// `amqp:<vhost>:<queue>` (the virtual host percent-decoded, `/` when the URL names none).
    ///
    /// `%` and `:` inside a name are percent-encoded, so that two different pairs never give
    /// the same scope (vhost `a`, queue `b:c` is `amqp:a:b%3Ac`).
    pub fn consumer(&self) -> String {
        match &self.source {
            Source::Nats(n) => format!("nats:{}:{}", escape(&n.stream), escape(&n.durable)),
            Source::Amqp(a) => {
                format!("amqp:{}:{}", escape(&amqp::vhost(&a.url)), escape(&a.queue))
            }
        }
    }

    fn ack_wait(&self) -> Duration {
        match &self.source {
            Source::Nats(n) => n.ack_wait,
            Source::Amqp(_) => Duration::ZERO,
        }
    }

    /// The checks [`run`] makes before it opens anything.
    fn validate(&self) -> Result<(), ConsumeError> {
        if self.target.scheme_str() != Some("http") {
            // Not echoed: a URL may carry credentials.
            return Err(ConsumeError::Config(
                "--target must be an http:// URL".into(),
            ));
        }
        if self.concurrency == 0 || self.max_deliver == 0 {
            return Err(ConsumeError::Config(
                "--concurrency and --max-deliver must be at least 1".into(),
            ));
        }
        if self.concurrency > MAX_CONCURRENCY {
            return Err(ConsumeError::Config(format!(
                "--concurrency must be at most {MAX_CONCURRENCY}"
            )));
        }
        let day = Duration::from_secs(86_400);
        for (flag, value, max) in [
            ("--lease-secs", self.lease_ttl, Duration::from_secs(3_600)),
            ("--ttl-secs", self.ttl, 365 * day),
            ("--response-timeout-secs", self.response_timeout, day),
            ("--drain-timeout-secs", self.drain_timeout, day),
            ("--ack-wait-secs", self.ack_wait(), day),
        ] {
            if value > max {
                return Err(ConsumeError::Config(format!(
                    "{flag} must be at most {} s",
                    max.as_secs()
                )));
            }
        }
        if let Source::Amqp(a) = &self.source
            && a.url.contains('[')
        {
            // amq-protocol-uri reads an IPv6 literal as `localhost`: refused rather than
            // consuming from the wrong broker.
            return Err(ConsumeError::Config(
                "amqp:// URLs with an IPv6 address literal are not supported; use a host name"
                    .into(),
            ));
        }
        if self.dead_letter.is_none() && !self.discard_dead_letters {
            return Err(ConsumeError::Config(
                "a dead-letter destination is required: --dead-letter SUBJECT (NATS; a stream \
                 must capture it) or EXCHANGE (RabbitMQ); or --no-dead-letter to terminate \
                 (NATS) or reject without requeue (RabbitMQ: the queue's own dead-letter \
                 exchange, if any) the messages that cannot be processed"
                    .into(),
            ));
        }
        if self.dead_letter.is_some() && self.discard_dead_letters {
            return Err(ConsumeError::Config(
                "--dead-letter and --no-dead-letter exclude each other".into(),
            ));
        }
        let scheme = self.store.split(':').next().unwrap_or_default();
        if scheme == "memory" && !self.no_dedup {
            return Err(ConsumeError::Config(
                "--store memory:// forgets every processed message when the process stops, and \
                 their redeliveries would run again: use file:DIR (one consumer process) or a \
                 shared store (redis://, postgres://, dynamodb://)"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for Config {
    // URLs may carry credentials: the store URL is redacted (the sources redact theirs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("source", &self.source)
            .field("target", &idemgate_stores::redact(&self.target.to_string()))
            .field("store", &idemgate_stores::redact(&self.store))
            .field("namespace", &self.namespace)
            .field("concurrency", &self.concurrency)
            .field("max_deliver", &self.max_deliver)
            .field("dead_letter", &self.dead_letter)
            .field("discard_dead_letters", &self.discard_dead_letters)
            .field("recovery", &self.recovery)
            .finish_non_exhaustive()
    }
}

/// `name` with `%` and `:` percent-encoded (a component of [`Config::consumer`]).
pub(crate) fn escape(name: &str) -> String {
    name.replace('%', "%25").replace(':', "%3A")
}

/// Most messages handled at once (`--concurrency`).
pub const MAX_CONCURRENCY: usize = 10_000;

/// Why [`run`] stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumeError {
    /// The store could not be opened.
    #[error("opening the store: {0}")]
    Store(#[from] idemgate_core::StoreError),
    /// The broker failed.
    #[error("{what}: {source}")]
    Source {
        /// What was being done.
        what: &'static str,
        /// The broker client's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The configuration cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// The admin listener could not be bound.
    #[error("binding the admin listener: {0}")]
    Admin(#[source] std::io::Error),
}

impl ConsumeError {
    fn source(what: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ConsumeError::Source {
            what,
            source: Box::new(e),
        }
    }
}

/// What a run did (the counters of [`idemgate_dedup::DedupStats`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `(name, value)` pairs: processed, duplicates, in_progress, retries, reexecutions, …
    pub counters: Vec<(&'static str, u64)>,
}

/// State shared with the admin listener.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    ready: AtomicBool,
    /// Messages taken from the broker and not yet acked, nacked or dead-lettered.
    held: std::sync::atomic::AtomicUsize,
    /// Messages acked (processed or duplicate).
    acked: std::sync::atomic::AtomicU64,
}

/// Counts a message as held until dropped.
pub(crate) struct Held(Arc<Shared>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    fn acked(&self) {
        self.acked.fetch_add(1, Ordering::Relaxed);
    }
    fn acked_total(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }
    fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
    fn hold(self: &Arc<Self>) -> Held {
        self.held.fetch_add(1, Ordering::Relaxed);
        Held(self.clone())
    }
}

/// Consumes until `shutdown` turns `true` (or its sender is dropped), then drains.
pub async fn run(
    config: Config,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<Report, ConsumeError> {
    config.validate()?;
    let config = Arc::new(config);
    let owner = format!(
        "idemgate-consume:{}:{}",
        std::process::id(),
        config.consumer()
    );
    let lease_ttl = config.lease_ttl;
    let connected = idemgate_stores::connect(
        &config.store,
        &idemgate_stores::StackOptions {
            deadline: config.store_timeout,
            // No replay cache: a duplicate needs only the record's state, and cached bodies (up
            // to `max_response_body` each) would be memory for nothing.
            replay_cache_entries: 0,
        },
        |b| b.lease_ttl(lease_ttl).owner(owner),
    )
    .await?;
    for w in &connected.warnings {
        tracing::warn!(store = %idemgate_stores::redact(&config.store), "{w}; duplicates become possible (PRODUCT G1)");
    }
    if config.recovery == Recovery::Strict && !connected.warnings.is_empty() {
        return Err(ConsumeError::Config(format!(
            "refusing to start: --recovery strict needs a store that keeps acknowledged writes, \
             and this one may not: {}",
            connected.warnings.join("; ")
        )));
    }
    let engine = connected.engine.clone();
    let sweeper = idemgate_core::sweeper::spawn_sweeper(
        engine.store().clone(),
        Duration::from_secs(30),
        1_000,
    );
    let dedup = Deduplicator::with_engine(engine)
        .namespace(config.namespace.clone())
        .ttl(config.ttl)
        .recovery(config.recovery)
        .build();
    let shared = Arc::new(Shared::default());
    let admin = match config.admin_listen {
        Some(addr) => Some(admin::spawn(addr, dedup.clone(), shared.clone()).await?),
        None => None,
    };
    let bridge = bridge::Bridge::new(dedup.clone(), &config.consumer(), config.clone());
    // A dropped sender means "stop" too.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(async move {
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        let _ = stop_tx.send(true);
        // Keep the sender alive until the sources have seen it.
        std::future::pending::<()>().await
    });
    let result = match &config.source {
        Source::Nats(src) => nats::run(src, config.clone(), bridge, shared, stop_rx).await,
        Source::Amqp(src) => amqp::run(src, config.clone(), bridge, shared, stop_rx).await,
    };
    watcher.abort();
    drop(connected); // stops the completion feed's follower
    sweeper.abort();
    if let Some(admin) = admin {
        admin.abort();
    }
    let report = Report {
        counters: dedup.stats().snapshot().to_vec(),
    };
    tracing::info!(?report.counters, "consume stopped");
    result.map(|()| report)
}

/// Waits for the in-flight message tasks, at most `timeout`; the rest are dropped unacked.
async fn drain(tasks: &mut JoinSet<()>, timeout: Duration) {
    let n = tasks.len();
    if n > 0 {
        tracing::info!(in_flight = n, ?timeout, "draining in-flight messages");
    }
    if tokio::time::timeout(timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            left = tasks.len(),
            "drain timeout: unfinished messages are handed back unacked"
        );
        tasks.abort_all();
    }
}
