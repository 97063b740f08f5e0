//! The engine: idempotency policy over any [`Store`], independent of HTTP.
//!
//! [`Engine::run`] takes a scoped key, a fingerprint, a [`Policy`], a classifier and the operation,
//! and returns an [`Execution`]: executed, replayed, mismatch, in flight or unknown.
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_time().build().unwrap().block_on(async {
//! use idemgate_core::engine::{Disposition, Engine, Execution, Policy};
//! use idemgate_core::record::{Outcome, StoredResponse};
//! use idemgate_core::key::{IdempotencyKey, Scope, ScopedKey};
//! use idemgate_core::{FingerprintOptions, MemoryStore};
//!
//! let engine = Engine::builder(MemoryStore::default()).build();
//! let key = ScopedKey::new("docs", Scope::new("tenant-1"), IdempotencyKey::parse("order-42")?);
//! let fp = FingerprintOptions::default().builder().method("POST").body(b"{}").finish();
//! let store_all = |body: &String| Disposition::Store(Outcome::Response(
//!     StoredResponse::new(201, vec![], body.clone())));
//!
//! let first = engine.run(&key, fp, &Policy::default(), store_all, |_dispatch| async {
//!     "charged once".to_string()
//! }).await?;
//! assert!(matches!(first, Execution::Executed { epoch: 1, .. }));
//!
//! let retry = engine.run(&key, fp, &Policy::default(), store_all, |_dispatch| async {
//!     unreachable!("a retry never runs the operation again")
//! }).await?;
//! let Execution::Replayed { outcome: Outcome::Response(r), .. } = retry else { panic!() };
//! assert_eq!(r.body, "charged once");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Which guarantee each part provides (PRODUCT §4)
//!
//! - **G1 dispatch** — the operation runs only after [`Store::claim`] or [`Store::take_over`]
//!   granted a fencing; a takeover is attempted only when the store's clock says the lease expired,
//!   and the holder's heartbeat renews its lease every `renew_interval` while the operation runs,
//!   so a live operation is never taken over however long it runs (as long as the store answers
//!   renewals within the lease).
//! - **G2 response** — every call ends in exactly one [`Execution`] variant or a store error.
//! - **G3 failure classification** — the [`Classify`] policy decides store / release / unknown;
//!   release happens only when it says so.
//! - **G4 liveness and fencing** — completion, release and mark-unknown are compare-and-set on the
//!   fencing; a waiter that finds an expired lease takes the key over at once instead of sitting
//!   out its wait timeout.
//! - **Cancellation safety** — the operation and its recording run in a spawned task: if the caller
//!   stops waiting (client disconnect), the outcome is still recorded and waiters are woken.
//!
//! # Bounds
//!
//! At most `max_waiters` calls wait in this process at once; beyond that, a call that would wait is
//! answered [`Execution::InFlight`] at once. Waiters are woken by in-process notification on
//! completion; for holders in other processes they poll the store with exponential backoff between
//! `poll_min` and `poll_max`, and never sleep past the holder's lease expiry.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::error::{ErrorKind, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::{ScopedKey, StoreKey};
use crate::record::{Fencing, Outcome, Record, RecordState};
use crate::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, Store, TakeOverOutcome, TakeOverRequest,
};

/// What to do when a retry finds the first request still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concurrency {
    /// Hold the retry until the first completes (then replay), at most `timeout`; after that answer
    /// [`Execution::InFlight`].
    Wait {
        /// Longest wait.
        timeout: Duration,
    },
    /// Answer [`Execution::InFlight`] at once.
    Reject,
}

/// What to do when a holder's lease expired (the holder is presumed dead).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Run the operation again at epoch + 1 (default).
    Takeover,
    /// Never run it again: the record becomes outcome-unknown.
    Strict,
}

/// Per-call (per-route) settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// How long a completed record is kept (default 24 h).
    pub ttl: Duration,
    /// How long an outcome-unknown record is kept (default 24 h).
    pub unknown_ttl: Duration,
    /// Waiting or rejecting concurrent retries (default: wait 30 s).
    pub concurrency: Concurrency,
    /// Takeover or strict (default takeover).
    pub recovery: Recovery,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 3600),
            unknown_ttl: Duration::from_secs(24 * 3600),
            concurrency: Concurrency::Wait {
                timeout: Duration::from_secs(30),
            },
            recovery: Recovery::Takeover,
        }
    }
}

/// What to do with an operation's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Keep this outcome; retries replay it.
    Store(Outcome),
    /// Keep nothing: delete the record so a retry runs again (transient failures, or proof that
    /// nothing happened).
    Release,
    /// The operation may or may not have taken effect: retries are told so, never re-run.
    Unknown,
}

/// Decides the [`Disposition`] of an operation's result (the "is this storable" policy). Any
/// `Fn(&T) -> Disposition` is a classifier.
pub trait Classify<T>: Send + 'static {
    /// Classifies `value`.
    fn classify(&self, value: &T) -> Disposition;
}

impl<T, F> Classify<T> for F
where
    F: Fn(&T) -> Disposition + Send + 'static,
{
    fn classify(&self, value: &T) -> Disposition {
        self(value)
    }
}

/// Handed to the operation when it is dispatched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// The fencing epoch: 1 for the first dispatch, +1 per takeover. Forward it (as
    /// `Idempotency-Epoch`) so a deduplicating downstream can fence too.
    pub epoch: u64,
}

/// What became of the outcome of an executed operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Stored; retries replay it.
    Stored,
    /// Released; a retry will run again.
    Released,
    /// Marked outcome-unknown.
    MarkedUnknown,
    /// The fencing was lost (the key was deleted, or taken over after the lease ran out): nothing
    /// was written.
    LeaseLost,
    /// The store failed while recording; the record stays in flight until its lease expires.
    Failed(ErrorKind),
}

/// The result of [`Engine::run`].
#[derive(Debug)]
pub enum Execution<T> {
    /// This call ran the operation.
    Executed {
        /// The operation's result.
        value: T,
        /// The epoch it ran under.
        epoch: u64,
        /// What became of its outcome.
        recorded: Recorded,
    },
    /// A previous call completed; here is its stored outcome.
    Replayed {
        /// The stored outcome.
        outcome: Outcome,
        /// The record (times, epoch) for headers and logs.
        record: Box<Record>,
    },
    /// The key is in use with a different fingerprint.
    Mismatch {
        /// The existing record.
        record: Box<Record>,
    },
    /// Another call holds the key (reject mode, wait timeout, or too many waiters).
    InFlight {
        /// A hint for `Retry-After`: the holder's remaining lease, at least one second.
        retry_after: Duration,
    },
    /// The first call's outcome is unknown; the operation is not run again.
    Unknown {
        /// The record.
        record: Box<Record>,
    },
}

/// Why [`Engine::run`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The store could not be asked (nothing was dispatched) or failed mid-way.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operation panicked; its record was marked outcome-unknown.
    #[error("the operation panicked; its outcome is unknown")]
    OperationPanicked,
}

impl EngineError {
    /// The store error kind, or `Internal` for a panic.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Store(e) => e.kind(),
            EngineError::OperationPanicked => ErrorKind::Internal,
        }
    }
}

/// Counters of what the engine did, for metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Lease renewals that succeeded.
    pub renewals: AtomicU64,
    /// Lease renewals that failed with a store error.
    pub renewal_errors: AtomicU64,
    /// Holders that found their fencing lost.
    pub leases_lost: AtomicU64,
    /// Successful takeovers of expired leases.
    pub takeovers: AtomicU64,
    /// Calls waiting right now.
    pub waiting: AtomicUsize,
    /// Operations running right now.
    pub in_flight: AtomicUsize,
}

/// Engine-wide settings; see [`EngineBuilder`].
#[derive(Clone, Debug)]
struct Config {
    owner: String,
    lease_ttl: Duration,
    renew_interval: Duration,
    max_waiters: usize,
    poll_min: Duration,
    poll_max: Duration,
    record_retries: u32,
}

/// Builds an [`Engine`].
#[derive(Debug)]
pub struct EngineBuilder<S> {
    store: S,
    config: Config,
    token_seed: Option<u64>,
}

impl<S: Store> EngineBuilder<S> {
    /// This instance's name in records (default `hostname-less "idemgate:<pid>"`).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.config.owner = owner.into();
        self
    }

    /// Lease length (default 10 s). The renew interval defaults to a third of it.
    pub fn lease_ttl(mut self, lease: Duration) -> Self {
        self.config.lease_ttl = lease;
        self.config.renew_interval = lease / 3;
        self
    }

    /// How often a running operation renews its lease (default lease / 3). Must be below the lease.
    pub fn renew_interval(mut self, every: Duration) -> Self {
        self.config.renew_interval = every;
        self
    }

    /// Most calls waiting at once in this process (default 10,000).
    pub fn max_waiters(mut self, n: usize) -> Self {
        self.config.max_waiters = n;
        self
    }

    /// Fallback polling of the store by waiters: first and longest interval (default 50 ms, 1 s).
    pub fn poll_interval(mut self, min: Duration, max: Duration) -> Self {
        self.config.poll_min = min;
        self.config.poll_max = max.max(min);
        self
    }

    /// Seed of the fencing tokens this engine generates (default: random). Tokens are
    /// `seed << 64 | counter`, unique per engine as long as seeds differ.
    pub fn token_seed(mut self, seed: u64) -> Self {
        self.token_seed = Some(seed);
        self
    }

    /// Builds the engine.
    pub fn build(self) -> Engine<S> {
        let seed = self.token_seed.unwrap_or_else(random_seed);
        Engine {
            inner: Arc::new(Inner {
                store: self.store,
                config: self.config,
                seed,
                counter: AtomicU64::new(1),
                waiters: Waiters::default(),
                running: Running::default(),
                stats: EngineStats::default(),
            }),
        }
    }
}

fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// The idempotency engine. Cheap to clone (shares state).
#[derive(Debug)]
pub struct Engine<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<S> {
    store: S,
    config: Config,
    seed: u64,
    counter: AtomicU64,
    waiters: Waiters,
    running: Running,
    stats: EngineStats,
}

impl<S: Store> Engine<S> {
    /// A builder over `store` with the defaults.
    pub fn builder(store: S) -> EngineBuilder<S> {
        EngineBuilder {
            store,
            config: Config {
                owner: format!("idemgate:{}", std::process::id()),
                lease_ttl: Duration::from_secs(10),
                renew_interval: Duration::from_secs(10) / 3,
                max_waiters: 10_000,
                poll_min: Duration::from_millis(50),
                poll_max: Duration::from_secs(1),
                record_retries: 5,
            },
            token_seed: None,
        }
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.inner.store
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &EngineStats {
        &self.inner.stats
    }

    /// Wakes this process's waiters on `key` at once (they re-read the store). Call it when a
    /// store reports that another instance finished the key (Redis pub/sub, PostgreSQL
    /// `LISTEN/NOTIFY`); without it, waiters still find out by polling.
    pub fn wake(&self, key: &StoreKey) {
        self.inner.waiters.notify(key);
    }

    fn next_token(&self) -> u128 {
        (u128::from(self.inner.seed) << 64)
            | u128::from(self.inner.counter.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs `operation` at most once per scoped key (per epoch; see the module docs), or returns
    /// what a previous run left.
    ///
    /// `fingerprint` identifies the request; `classify` decides what to keep of the result. The
    /// operation runs in a spawned task: dropping the returned future does not cancel it, and its
    /// outcome is recorded regardless.
    pub async fn run<T, C, F, Fut>(
        &self,
        key: &ScopedKey,
        fingerprint: Fingerprint,
        policy: &Policy,
        classify: C,
        operation: F,
    ) -> Result<Execution<T>, EngineError>
    where
        T: Send + 'static,
        C: Classify<T>,
        F: FnOnce(Dispatch) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let store_key = key.store_key();
        let inner = &self.inner;
        let mut request = ClaimRequest::new(
            key,
            fingerprint,
            0,
            inner.config.owner.clone(),
            inner.config.lease_ttl,
            policy.ttl,
        );
        let deadline = match policy.concurrency {
            Concurrency::Wait { timeout } => Some(tokio::time::Instant::now() + timeout),
            Concurrency::Reject => None,
        };
        let mut waiter: Option<WaitGuard<'_>> = None;
        let mut poll = inner.config.poll_min;
        loop {
            let notify = waiter.as_ref().map(WaitGuard::notify);
            let notified = notify.as_ref().map(|n| n.notified());
            let mut notified = std::pin::pin!(notified);
            if let Some(n) = notified.as_mut().as_pin_mut() {
                // Registered before reading the store, so a completion in between is not missed.
                n.enable();
            }
            request.token = self.next_token();
            let (record, now) = match self.claim_detached(store_key, &request).await? {
                ClaimOutcome::Acquired { fencing } => {
                    drop(waiter);
                    return self
                        .execute(store_key, fencing, policy.clone(), classify, operation)
                        .await;
                }
                ClaimOutcome::Existing { record, now } => (record, now),
            };
            if record.fingerprint != fingerprint {
                return Ok(Execution::Mismatch {
                    record: Box::new(record),
                });
            }
            let (holder, lease_expires_at) = match &record.state {
                RecordState::Completed { outcome, .. } => {
                    return Ok(Execution::Replayed {
                        outcome: outcome.clone(),
                        record: Box::new(record),
                    });
                }
                RecordState::Unknown { .. } => {
                    return Ok(Execution::Unknown {
                        record: Box::new(record),
                    });
                }
                RecordState::InFlight {
                    fencing,
                    lease_expires_at,
                    ..
                } => (*fencing, *lease_expires_at),
            };
            if now >= lease_expires_at {
                // The holder stopped renewing: presumed dead. At most one taker wins this epoch.
                let take = TakeOverRequest {
                    expired: holder,
                    token: self.next_token(),
                    owner: inner.config.owner.clone(),
                    lease_ttl: inner.config.lease_ttl,
                };
                match inner.store.take_over(&store_key, &take).await? {
                    TakeOverOutcome::Acquired { fencing } => {
                        inner.stats.takeovers.fetch_add(1, Ordering::Relaxed);
                        drop(waiter);
                        // A record an operator revoked (forced delete) asked for a new run.
                        let recovery = if holder.is_revoked() {
                            Recovery::Takeover
                        } else {
                            policy.recovery
                        };
                        return match recovery {
                            Recovery::Takeover => {
                                self.execute(
                                    store_key,
                                    fencing,
                                    policy.clone(),
                                    classify,
                                    operation,
                                )
                                .await
                            }
                            Recovery::Strict => self.give_up(&store_key, fencing, policy).await,
                        };
                    }
                    // Someone else moved it on: look again at once.
                    TakeOverOutcome::Refused { .. } => continue,
                }
            }
            let lease_left = lease_expires_at.since(now);
            let retry_after = lease_left.max(Duration::from_secs(1));
            let Some(deadline) = deadline else {
                return Ok(Execution::InFlight { retry_after });
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(Execution::InFlight { retry_after });
            }
            if waiter.is_none() {
                match inner
                    .waiters
                    .subscribe(store_key, inner.config.max_waiters, &inner.stats)
                {
                    Some(guard) => {
                        waiter = Some(guard);
                        continue; // read again with the notification armed
                    }
                    None => return Ok(Execution::InFlight { retry_after }),
                }
            }
            // Sleep until notified, the next poll, the lease expiry (+ a margin for clock
            // granularity), or the deadline, whichever is first.
            let nap = poll.min(left).min(lease_left + Duration::from_millis(5));
            match notified.as_mut().as_pin_mut() {
                Some(n) => {
                    tokio::select! {
                        _ = n => {}
                        _ = tokio::time::sleep(nap) => { poll = (poll * 2).min(inner.config.poll_max); }
                    }
                }
                None => tokio::time::sleep(nap).await,
            }
        }
    }

    /// Strict recovery: the key was taken over only to be marked outcome-unknown.
    async fn give_up<T: Send + 'static>(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        policy: &Policy,
    ) -> Result<Execution<T>, EngineError> {
        let store = &self.inner.store;
        store.mark_unknown(key, fencing, policy.unknown_ttl).await?;
        self.inner.waiters.notify(key);
        match store.get(key).await? {
            Some(record) => Ok(Execution::Unknown {
                record: Box::new(record),
            }),
            None => Ok(Execution::InFlight {
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Claims through a spawned task, so that a caller dropped mid-claim (a client that went
    /// away) cannot leave an orphan lease: if nobody is left to hear "acquired", the task releases
    /// the key at once (nothing was dispatched).
    async fn claim_detached(
        &self,
        key: StoreKey,
        request: &ClaimRequest,
    ) -> Result<ClaimOutcome, StoreError> {
        let engine = self.clone();
        let request = request.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let out = engine.inner.store.claim(&key, &request).await;
            if let Err(Ok(ClaimOutcome::Acquired { fencing })) = tx.send(out) {
                if let Err(e) = engine.inner.store.release(&key, fencing).await {
                    tracing::warn!(key = %key, error = %e,
                        "the caller left during its claim and the release failed; the lease will expire");
                }
                engine.inner.waiters.notify(&key);
            }
        });
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::new(
                ErrorKind::Internal,
                "the claim task did not finish (runtime shutting down)",
            ))
        })
    }

    async fn execute<T, C, F, Fut>(
        &self,
        key: StoreKey,
        fencing: Fencing,
        policy: Policy,
        classify: C,
        operation: F,
    ) -> Result<Execution<T>, EngineError>
    where
        T: Send + 'static,
        C: Classify<T>,
        F: FnOnce(Dispatch) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
    {
        let epoch = fencing.epoch;
        let fut = operation(Dispatch { epoch });
        let engine = self.clone();
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let stats = &engine.inner.stats;
            stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let running = engine.inner.running.track(key, fencing, &policy);
            let work = async {
                let classify = classify; // owned by this future, which is not shared
                let result = AssertUnwindSafe(fut).catch_unwind().await.map_err(|_| ());
                let disposition = match &result {
                    Ok(value) => classify.classify(value),
                    Err(()) => Disposition::Unknown,
                };
                engine.inner.running.finished(running, &disposition);
                let mut answer = Some((answer_tx, result));
                let recorded = engine
                    .record(&key, fencing, disposition, &policy, &mut answer)
                    .await;
                if let Some((tx, result)) = answer {
                    let _ = tx.send((result, recorded));
                }
            };
            // The heartbeat is a future of its own beside the work: a slow renewal never stops
            // the upstream exchange from being polled, and renewals go on while the outcome is
            // being recorded, so a lease is never left to lapse while its outcome is known.
            tokio::select! {
                biased;
                () = work => {}
                () = engine.heartbeat(&key, fencing) => {}
            }
            engine.inner.running.done(running);
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            engine.inner.waiters.notify(&key);
        });
        match answer_rx.await {
            Ok((Ok(value), recorded)) => Ok(Execution::Executed {
                value,
                epoch,
                recorded,
            }),
            Ok((Err(()), _)) => Err(EngineError::OperationPanicked),
            Err(_) => {
                // Only reachable if the runtime is shutting down and cancelled the task.
                tracing::error!("operation task did not finish");
                Err(EngineError::OperationPanicked)
            }
        }
    }

    /// Renews the lease every `renew_interval` until dropped; never completes. Each renewal has
    /// `renew_interval` to answer (so renewals never pile up); a failed one is retried at the
    /// next tick. Once the fencing is lost it stops renewing (the recording step reports it).
    async fn heartbeat(&self, key: &StoreKey, fencing: Fencing) {
        let inner = &self.inner;
        let every = inner.config.renew_interval.max(Duration::from_millis(1));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let renewal = inner.store.renew(key, fencing, inner.config.lease_ttl);
            match tokio::time::timeout(every, renewal).await {
                Ok(Ok(CasOutcome::Applied)) => {
                    inner.stats.renewals.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(CasOutcome::Lost)) => break,
                Ok(Err(e)) => {
                    inner.stats.renewal_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %key, error = %e, "lease renewal failed; will retry");
                }
                Err(_) => {
                    inner.stats.renewal_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %key, timeout = ?every,
                        "lease renewal timed out; will retry");
                }
            }
        }
        std::future::pending::<()>().await;
    }

    /// Writes the disposition, retrying store errors with capped exponential backoff until it is
    /// written or the fencing is lost (the heartbeat keeps the lease meanwhile), for at most the
    /// record's TTL. After `record_retries` failed attempts the caller is answered (with
    /// [`Recorded::Failed`]) through `answer`, and recording goes on in the background.
    async fn record<A>(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        disposition: Disposition,
        policy: &Policy,
        answer: &mut Option<(tokio::sync::oneshot::Sender<(A, Recorded)>, A)>,
    ) -> Recorded {
        let store = &self.inner.store;
        let mut disposition = disposition;
        let mut backoff = Duration::from_millis(20);
        let mut attempt = 0;
        let give_up_at = tokio::time::Instant::now() + policy.ttl.max(policy.unknown_ttl);
        loop {
            let result = match &disposition {
                Disposition::Store(outcome) => store
                    .complete(key, fencing, outcome, policy.ttl)
                    .await
                    .map(|o| (o, Recorded::Stored)),
                Disposition::Release => store
                    .release(key, fencing)
                    .await
                    .map(|o| (o, Recorded::Released)),
                Disposition::Unknown => store
                    .mark_unknown(key, fencing, policy.unknown_ttl)
                    .await
                    .map(|o| (o, Recorded::MarkedUnknown)),
            };
            let e = match result {
                Ok((CasOutcome::Applied, recorded)) => return recorded,
                Ok((CasOutcome::Lost, _)) => {
                    self.inner.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(key = %key, epoch = fencing.epoch,
                        "lease lost before the outcome was recorded (deleted by an operator, \
                         or taken over after the lease ran out); nothing was written");
                    return Recorded::LeaseLost;
                }
                Err(e) => e,
            };
            // A value the store will never take: keep the fact that it ran, not the value.
            if e.kind() == ErrorKind::Capacity
                && let Disposition::Store(Outcome::Response(r)) = &disposition
            {
                disposition = Disposition::Store(Outcome::NotReplayable {
                    status: r.status,
                    reason: e.message().to_owned(),
                });
                continue;
            }
            attempt += 1;
            if attempt == self.inner.config.record_retries
                && let Some((tx, value)) = answer.take()
            {
                tracing::error!(key = %key, error = %e,
                    "could not record the outcome yet; answering the client and retrying in the background");
                let _ = tx.send((value, Recorded::Failed(e.kind())));
            }
            if tokio::time::Instant::now() >= give_up_at {
                tracing::error!(key = %key, error = %e,
                    "gave up recording the outcome: the record has expired by now");
                return Recorded::Failed(e.kind());
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_RECORD_BACKOFF);
        }
    }

    /// Marks every operation still registered as running outcome-unknown (or records the outcome
    /// it already has): for a shutdown whose drain timed out, so that no request that may have
    /// reached the upstream is left in flight for a takeover to run again. Returns how many
    /// records were written. Call it after the tasks running those operations have stopped.
    pub async fn abandon_running(&self) -> usize {
        let left = self.inner.running.take_all();
        let mut written = 0;
        for op in left {
            let disposition = op.pending.unwrap_or(Disposition::Unknown);
            let store = &self.inner.store;
            let result = match &disposition {
                Disposition::Store(outcome) => {
                    store.complete(&op.key, op.fencing, outcome, op.ttl).await
                }
                Disposition::Release => store.release(&op.key, op.fencing).await,
                Disposition::Unknown => {
                    store
                        .mark_unknown(&op.key, op.fencing, op.unknown_ttl)
                        .await
                }
            };
            match result {
                Ok(CasOutcome::Applied) => written += 1,
                Ok(CasOutcome::Lost) => {}
                Err(e) => tracing::error!(key = %op.key, error = %e,
                    "shutdown: could not record an abandoned operation; its lease will expire"),
            }
        }
        written
    }
}

/// Longest pause between two attempts to record an outcome.
const MAX_RECORD_BACKOFF: Duration = Duration::from_secs(2);

/// An operation the engine is running (or recording), for [`Engine::abandon_running`].
#[derive(Debug)]
struct RunningOp {
    key: StoreKey,
    fencing: Fencing,
    ttl: Duration,
    unknown_ttl: Duration,
    /// The disposition once the operation finished (recording may still be under way).
    pending: Option<Disposition>,
}

/// The operations running in this process, by fencing token.
#[derive(Debug, Default)]
struct Running {
    ops: Mutex<HashMap<u128, RunningOp>>,
}

impl Running {
    fn track(&self, key: StoreKey, fencing: Fencing, policy: &Policy) -> u128 {
        self.ops.lock().insert(
            fencing.token,
            RunningOp {
                key,
                fencing,
                ttl: policy.ttl,
                unknown_ttl: policy.unknown_ttl,
                pending: None,
            },
        );
        fencing.token
    }

    fn finished(&self, token: u128, disposition: &Disposition) {
        if let Some(op) = self.ops.lock().get_mut(&token) {
            op.pending = Some(disposition.clone());
        }
    }

    /// Removed only here, when the task ends normally: a task cancelled by a runtime shutdown
    /// leaves its entry for [`Engine::abandon_running`].
    fn done(&self, token: u128) {
        self.ops.lock().remove(&token);
    }

    fn take_all(&self) -> Vec<RunningOp> {
        self.ops.lock().drain().map(|(_, op)| op).collect()
    }
}

/// In-process waiters per key, woken on completion without polling.
#[derive(Debug, Default)]
struct Waiters {
    map: Mutex<HashMap<StoreKey, Arc<Notify>>>,
    count: AtomicUsize,
}

impl Waiters {
    fn subscribe<'a>(
        &'a self,
        key: StoreKey,
        max: usize,
        stats: &'a EngineStats,
    ) -> Option<WaitGuard<'a>> {
        if self.count.fetch_add(1, Ordering::AcqRel) >= max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        let notify = self.map.lock().entry(key).or_default().clone();
        Some(WaitGuard {
            waiters: self,
            stats,
            key,
            notify: Some(notify),
        })
    }

    fn notify(&self, key: &StoreKey) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(n) = self.map.lock().get(key) {
            n.notify_waiters();
        }
    }
}

struct WaitGuard<'a> {
    waiters: &'a Waiters,
    stats: &'a EngineStats,
    key: StoreKey,
    notify: Option<Arc<Notify>>,
}

impl WaitGuard<'_> {
    fn notify(&self) -> Arc<Notify> {
        self.notify.clone().unwrap_or_default()
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.map.lock();
        // Drop our handle under the lock so the last guard out reliably removes the entry.
        self.notify.take();
        if map
            .get(&self.key)
            .is_some_and(|n| Arc::strong_count(n) == 1)
        {
            map.remove(&self.key);
        }
        drop(map);
        self.waiters.count.fetch_sub(1, Ordering::AcqRel);
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiter_entries_are_removed_by_the_last_guard() {
        let waiters = Waiters::default();
        let stats = EngineStats::default();
        let k = StoreKey([1; 32]);
        let a = waiters.subscribe(k, 10, &stats).unwrap();
        let b = waiters.subscribe(k, 10, &stats).unwrap();
        assert_eq!(waiters.map.lock().len(), 1);
        drop(a);
        assert_eq!(waiters.map.lock().len(), 1);
        drop(b);
        assert!(waiters.map.lock().is_empty());
        assert_eq!(waiters.count.load(Ordering::Relaxed), 0);
        assert_eq!(stats.waiting.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn waiters_are_bounded() {
        let waiters = Waiters::default();
        let stats = EngineStats::default();
        let guards: Vec<_> = (0..3)
            .map(|i| waiters.subscribe(StoreKey([i; 32]), 3, &stats).unwrap())
            .collect();
        assert!(waiters.subscribe(StoreKey([9; 32]), 3, &stats).is_none());
        drop(guards);
        assert!(waiters.subscribe(StoreKey([9; 32]), 3, &stats).is_some());
    }
}
