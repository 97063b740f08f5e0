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
//! # Layout
//!
//! - [`policy`](self) items ([`Policy`], [`Concurrency`], [`Recovery`], [`Classify`],
//!   [`Disposition`], [`Dispatch`]) live in `engine/policy.rs`;
//! - the pure decision on what a claim found (replay, mismatch, unknown, take over, wait) in
//!   `engine/decide.rs`, testable without a store or a runtime;
//! - running an operation under its lease (heartbeat, recording, abandonment on shutdown) in
//!   `engine/execution.rs`, with the G1 and G3 notes beside the code;
//! - in-process waiters in `engine/waiters.rs`;
//! - the run loop (claim, decide, take over or wait) here.
//!
//! # Bounds
//!
//! At most `max_waiters` calls wait in this process at once; beyond that, a call that would wait is
//! answered [`Execution::InFlight`] at once. Waiters are woken by in-process notification on
//! completion; for holders in other processes they poll the store with exponential backoff between
//! `poll_min` and `poll_max`, and never sleep past the holder's lease expiry.

mod decide;
mod execution;
mod notice;
mod outcome;
mod policy;
mod waiters;

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::{ErrorKind, StoreError};
use crate::fingerprint::Fingerprint;
use crate::key::{ScopedKey, StoreKey};
use crate::record::{Fencing, Record, RecordState};
use crate::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, Store, TakeOverOutcome, TakeOverRequest,
};

use decide::{Step, decide};
use execution::Running;
pub use outcome::{EngineError, EngineStats, Execution, Recorded};
pub use policy::{Classify, Concurrency, Dispatch, Disposition, Policy, Recovery};
use waiters::{WaitGuard, Waiters};

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
    resolve_hint: Option<String>,
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

    /// The command an operator runs to resolve an outcome-unknown record, named (as `hint`) in
    /// the engine's warnings about outcome-unknown records and lost leases; `{store_key}` in it
    /// is replaced by the record's store key (64 hex characters). `idemgate serve` sets
    /// `idemgate keys --admin URL resolve {store_key}`. Default: a description of the delete
    /// ([`DeleteMode::Unknown`](crate::store::DeleteMode::Unknown)) to make.
    pub fn resolve_hint(mut self, template: impl Into<String>) -> Self {
        self.config.resolve_hint = Some(template.into());
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
                resolve_hint: None,
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

    /// The command that resolves the outcome-unknown record under `key` (see
    /// [`EngineBuilder::resolve_hint`]), as the engine's warnings name it.
    pub fn resolve_hint(&self, key: &StoreKey) -> String {
        let template = self
            .inner
            .config
            .resolve_hint
            .as_deref()
            .unwrap_or(DEFAULT_RESOLVE_HINT);
        template.replace("{store_key}", &key.to_hex())
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
        Fut: std::future::Future<Output = T> + Send + 'static,
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
        let mut wait = Wait::new(policy, inner.config.poll_min);
        // Errors after the first read cannot be taken as "the store said nothing" (fail open).
        let mut found = false;
        let after_read = |found: bool| {
            move |e: StoreError| {
                if found {
                    EngineError::StoreAfterRead(e)
                } else {
                    EngineError::Store(e)
                }
            }
        };
        let mut refusals = 0u32;
        loop {
            // Armed before reading the store, so a completion in between is not missed.
            let notify = wait.guard.as_ref().map(WaitGuard::notify);
            let notified = notify.as_ref().map(|n| n.notified());
            let mut notified = std::pin::pin!(notified);
            if let Some(n) = notified.as_mut().as_pin_mut() {
                n.enable();
            }
            request.token = self.next_token();
            let sent = tokio::time::Instant::now();
            let claimed = self
                .claim_guarded(store_key, &request)
                .await
                .map_err(after_read(found))?;
            // A lease to dispatch under: this call's claim (epoch 1), or a takeover below.
            let (fencing, sent, recovery) = match claimed {
                ClaimOutcome::Acquired { fencing } => (fencing, sent, Recovery::Takeover),
                ClaimOutcome::Existing { record, now } => {
                    found = true;
                    match decide(record, now, fingerprint, policy) {
                        Step::Answer(found) => return Ok(found.into_execution()),
                        Step::Wait { lease_left } => {
                            match self
                                .wait_step(&store_key, &mut wait, lease_left, notified.as_mut())
                                .await
                            {
                                Some(answer) => return Ok(answer),
                                None => continue,
                            }
                        }
                        // A holder running in this very process is alive whatever a clock says
                        // (an NTP step on a store without a clock of its own): never take over.
                        Step::TakeOver { holder, .. } if inner.running.holds(holder.token) => {
                            let lease_left = inner.config.renew_interval;
                            match self
                                .wait_step(&store_key, &mut wait, lease_left, notified.as_mut())
                                .await
                            {
                                Some(answer) => return Ok(answer),
                                None => continue,
                            }
                        }
                        Step::TakeOver { holder, recovery } => {
                            let sent = tokio::time::Instant::now();
                            match self
                                .take_over(&store_key, holder)
                                .await
                                .map_err(after_read(true))?
                            {
                                Some(fencing) => (fencing, sent, recovery),
                                // Someone else moved it on: look again at once, a bounded number
                                // of times (a record whose fencing never matches must not spin).
                                None => {
                                    refusals += 1;
                                    if refusals > MAX_TAKEOVER_REFUSALS {
                                        return Ok(Execution::InFlight {
                                            retry_after: Duration::from_secs(1),
                                        });
                                    }
                                    continue;
                                }
                            }
                        }
                    }
                }
            };
            drop(wait);
            self.lease_left_for_dispatch(&store_key, fencing, sent)
                .await
                .map_err(after_read(found))?;
            match recovery {
                Recovery::Takeover => {
                    return self
                        .execute(
                            store_key,
                            key.key().clone(),
                            fencing,
                            sent,
                            policy.clone(),
                            classify,
                            operation,
                        )
                        .await;
                }
                Recovery::Strict => match self.give_up(&store_key, key, fencing, policy).await? {
                    Some(done) => return Ok(done),
                    // Moved on meanwhile (deleted, revoked): start over.
                    None => {
                        wait = Wait::new(policy, inner.config.poll_min);
                        continue;
                    }
                },
            }
        }
    }

    /// The wait step of [`run`](Self::run): the holder is alive, its lease runs `lease_left`
    /// longer. `Some` answers the call (in flight: reject mode, past the deadline, or too many
    /// waiters); `None` asks the caller to read the store again — at once when this call has
    /// just registered as a waiter (the next read is armed for a notification), else after
    /// sleeping until notified, the next poll, the lease's end, or the deadline.
    async fn wait_step<'w, T>(
        &'w self,
        key: &StoreKey,
        wait: &mut Wait<'w>,
        lease_left: Duration,
        notified: std::pin::Pin<&mut Option<tokio::sync::futures::Notified<'_>>>,
    ) -> Option<Execution<T>> {
        let inner = &self.inner;
        let retry_after = lease_left.max(Duration::from_secs(1));
        let Some(left) = wait.time_left() else {
            return Some(Execution::InFlight { retry_after });
        };
        if wait.guard.is_none() {
            return match inner
                .waiters
                .subscribe(*key, inner.config.max_waiters, &inner.stats)
            {
                Some(guard) => {
                    wait.guard = Some(guard);
                    None // read again with the notification armed
                }
                None => Some(Execution::InFlight { retry_after }),
            };
        }
        // A margin past the lease's end for clock granularity.
        let nap = wait
            .poll
            .min(left)
            .min(lease_left + Duration::from_millis(5));
        match notified.as_pin_mut() {
            Some(n) => {
                tokio::select! {
                    _ = n => {}
                    _ = tokio::time::sleep(nap) => {
                        wait.poll = (wait.poll * 2).min(inner.config.poll_max);
                    }
                }
            }
            None => tokio::time::sleep(nap).await,
        }
        None
    }

    /// One takeover attempt of `holder`'s expired lease: the new fencing, or `None` when the
    /// record moved on meanwhile. Of concurrent takers of one epoch, at most one wins (G1).
    async fn take_over(
        &self,
        key: &StoreKey,
        holder: Fencing,
    ) -> Result<Option<Fencing>, StoreError> {
        let inner = &self.inner;
        let take = TakeOverRequest {
            expired: holder,
            token: self.next_token(),
            owner: inner.config.owner.clone(),
            lease_ttl: inner.config.lease_ttl,
        };
        match inner.store.take_over(key, &take).await? {
            TakeOverOutcome::Acquired { fencing } => {
                inner.stats.takeovers.fetch_add(1, Ordering::Relaxed);
                Ok(Some(fencing))
            }
            TakeOverOutcome::Refused { .. } => Ok(None),
        }
    }

    /// Strict recovery: the key was taken over only to be marked outcome-unknown. `None` when the
    /// record moved on before the mark (deleted or revoked by an operator): the caller starts
    /// over.
    async fn give_up<T: Send + 'static>(
        &self,
        key: &StoreKey,
        scoped: &ScopedKey,
        fencing: Fencing,
        policy: &Policy,
    ) -> Result<Option<Execution<T>>, EngineError> {
        let store = &self.inner.store;
        let marked = store
            .mark_unknown(key, fencing, policy.unknown_ttl)
            .await
            .map_err(EngineError::StoreAfterRead)?;
        self.inner.waiters.notify(key);
        if marked == CasOutcome::Lost {
            return Ok(None);
        }
        self.marked_unknown(
            &notice::Subject {
                route: &policy.name,
                client_key: scoped.key(),
                store_key: key,
                epoch: fencing.epoch,
            },
            notice::UnknownReason::StrictRecovery,
        );
        match store.get(key).await.map_err(EngineError::StoreAfterRead)? {
            Some(record) => Ok(Some(Execution::Unknown {
                record: Box::new(record),
            })),
            None => Ok(None),
        }
    }

    /// Checks that a lease acquired by a call sent at `sent` still has a renewal interval to run
    /// (the store started it when it applied the call, at most `sent.elapsed()` ago): a reply
    /// that took so long that the lease could lapse before the first renewal gives the key back
    /// and fails with `Timeout` (the client gets `503`), rather than dispatch on a lease a waiter
    /// may take over (G1).
    async fn lease_left_for_dispatch(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        sent: tokio::time::Instant,
    ) -> Result<(), StoreError> {
        let config = &self.inner.config;
        let took = sent.elapsed();
        if took + config.renew_interval < config.lease_ttl {
            return Ok(());
        }
        tracing::warn!(store_key = %key, took = ?took, lease = ?config.lease_ttl,
            "the store answered the claim too late to dispatch safely; key given back");
        if let Err(e) = self.inner.store.release(key, fencing).await {
            tracing::warn!(store_key = %key, error = %e,
                "could not give the key back; its lease will expire");
        }
        self.inner.waiters.notify(key);
        Err(StoreError::new(
            ErrorKind::Timeout,
            format!(
                "the store took {took:?} to grant a lease of {:?}",
                config.lease_ttl
            ),
        ))
    }

    /// Claims `key`, so that a caller dropped mid-claim (a client that went away) leaves no
    /// orphan lease: a guard armed around the call gives the claim back if the call is dropped
    /// before its answer was taken (a compare-and-set on this call's unique token, so it can only
    /// release this call's own claim, at whatever epoch it was granted: a free key is claimed at
    /// its floor + 1). A claim that failed (a deadline: it may still have been
    /// applied) is given back the same way. Best effort where the store may reorder the two
    /// calls (a pooled PostgreSQL connection): a claim applied after its give-back stays an
    /// orphan until its lease ends. Memory and redb (one writer) and Redis (one connection)
    /// apply them in order.
    async fn claim_guarded(
        &self,
        key: StoreKey,
        request: &ClaimRequest,
    ) -> Result<ClaimOutcome, StoreError> {
        let mut guard = GiveBackOnDrop {
            engine: Some(self),
            key,
            token: request.token,
        };
        let out = self.inner.store.claim(&key, request).await;
        if out.is_ok() {
            guard.engine = None; // heard: the caller owns the answer now
        }
        out
    }

    /// Gives back the claim made with `token`, whose answer was lost (its epoch unknown here):
    /// reads the record and releases it if it is in flight under that token (the release is a
    /// compare-and-set on the fencing read, so a record that moved on meanwhile is left alone).
    async fn give_back_token(&self, key: StoreKey, token: u128) {
        match self.inner.store.get(&key).await {
            Ok(Some(Record {
                state: RecordState::InFlight { fencing, .. },
                ..
            })) if fencing.token == token => self.give_back(key, fencing).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(store_key = %key, error = %e,
                "could not give an unused claim back; its lease will expire"),
        }
    }

    /// Releases `fencing` (a compare-and-set: only this holder's own lease goes), best effort.
    async fn give_back(&self, key: StoreKey, fencing: Fencing) {
        match self.inner.store.release(&key, fencing).await {
            Ok(CasOutcome::Applied) => self.inner.waiters.notify(&key),
            Ok(CasOutcome::Lost) => {}
            Err(e) => tracing::warn!(store_key = %key, error = %e,
                "could not give an unused claim back; its lease will expire"),
        }
    }
}

/// The resolve hint of an engine built without [`EngineBuilder::resolve_hint`].
const DEFAULT_RESOLVE_HINT: &str = "once the request is known not to have taken effect, delete the \
    outcome-unknown record {store_key} (Store::delete with DeleteMode::Unknown) so that a retry runs it";

/// Consecutive refused takeovers after which a call answers "in flight" instead of looking again.
const MAX_TAKEOVER_REFUSALS: u32 = 16;

/// Gives a claim back when dropped while armed: the call was cancelled before its answer was
/// taken, or it failed and may still have been applied.
struct GiveBackOnDrop<'a, S: Store> {
    engine: Option<&'a Engine<S>>,
    key: StoreKey,
    token: u128,
}

impl<S: Store> Drop for GiveBackOnDrop<'_, S> {
    fn drop(&mut self) {
        let Some(engine) = self.engine.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let engine = engine.clone();
            let (key, token) = (self.key, self.token);
            runtime.spawn(async move { engine.give_back_token(key, token).await });
        }
    }
}

/// A caller's waiting state in [`Engine::run`]: its deadline (wait mode), its registration as a
/// waiter (taken once it must wait), and its current polling interval.
struct Wait<'a> {
    deadline: Option<tokio::time::Instant>,
    guard: Option<WaitGuard<'a>>,
    poll: Duration,
}

impl Wait<'_> {
    fn new(policy: &Policy, poll: Duration) -> Self {
        let now = tokio::time::Instant::now();
        let deadline = match policy.concurrency {
            // A timeout too large for the clock waits as long as the clock allows.
            Concurrency::Wait { timeout } => Some(
                now.checked_add(timeout)
                    .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
                    .unwrap_or(now),
            ),
            Concurrency::Reject => None,
        };
        Self {
            deadline,
            guard: None,
            poll,
        }
    }

    /// Time left to wait; `None` in reject mode or once the deadline passed.
    fn time_left(&self) -> Option<Duration> {
        let left = self
            .deadline?
            .saturating_duration_since(tokio::time::Instant::now());
        (!left.is_zero()).then_some(left)
    }
}
