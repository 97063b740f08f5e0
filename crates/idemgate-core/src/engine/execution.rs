//! Running one operation under its lease.
//!
//! - **G1** — the heartbeat is a future of its own beside the operation: a slow renewal never
//!   stops the upstream exchange from being polled, each renewal has the renew interval to
//!   answer, and renewals go on while the outcome is being recorded, so a live holder whose
//!   outcome is known never lets its lease lapse into a takeover.
//! - **G3** — the [`Classify`] policy decides store / release / unknown; recording is retried
//!   (capped backoff) until it is written or the fencing is lost, for at most the record's TTL.
//! - **G4** — every write is a compare-and-set on the fencing; a lost fencing writes nothing.
//! - **Cancellation** — the operation runs in a spawned task: a caller that goes away does not
//!   cancel it. A task cancelled by a runtime shutdown (a drain that timed out) leaves its entry
//!   in the running registry, and [`Engine::abandon_running`] marks it outcome-unknown.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use tracing::Instrument;

use super::notice::{Subject, UnknownReason};
use super::{Classify, Dispatch, Disposition, Engine, EngineError, Execution, Policy, Recorded};
use crate::key::{IdempotencyKey, StoreKey};
use crate::record::{Fencing, Outcome};
use crate::store::{CasOutcome, Store};

/// Spawns `task` in the caller's span (a request's, when tracing is on: the operation, its store
/// writes and its upstream call are then that request's children). Without one (the usual case)
/// the task is spawned as it is, no byte larger. (A function of its own, so that the span is not
/// kept in the caller's future.)
fn spawn_in_current_span<F>(task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let span = tracing::Span::current();
    if span.is_disabled() {
        tokio::spawn(task);
    } else {
        tokio::spawn(task.instrument(span));
    }
}

impl<S: Store> Engine<S> {
    /// Runs the operation under the lease `fencing`, acquired by a call sent at `sent` (the
    /// first renewal is due a renew interval after that, not after the reply).
    /// `client_key` only names the operation in warnings.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn execute<T, C, F, Fut>(
        &self,
        key: StoreKey,
        client_key: IdempotencyKey,
        fencing: Fencing,
        sent: tokio::time::Instant,
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
        // The lease runs at least `lease_ttl` from `sent` (the store started it on applying the
        // call); the first renewal is due a renew interval after `sent`. Starting later than
        // that leaves no margin for the renewal to land.
        let config = &self.inner.config;
        let start_by = sent + config.lease_ttl.saturating_sub(config.renew_interval);
        let fut = operation(Dispatch { epoch, start_by });
        let engine = self.clone();
        let (answer_tx, answer_rx) = tokio::sync::oneshot::channel();
        let task = async move {
            let stats = &engine.inner.stats;
            stats.in_flight.fetch_add(1, Ordering::Relaxed);
            let running = engine
                .inner
                .running
                .track(key, &client_key, fencing, &policy);
            let work = async {
                let classify = classify; // owned by this future, which is not shared
                let result = AssertUnwindSafe(fut).catch_unwind().await.map_err(|_| ());
                // A panicking classifier must not leave the key in flight: unknown.
                let (disposition, why) = match &result {
                    Ok(value) => {
                        match std::panic::catch_unwind(AssertUnwindSafe(|| {
                            classify.classify(value)
                        })) {
                            Ok(d) => (d, UnknownReason::Classified),
                            Err(_) => (Disposition::Unknown, UnknownReason::Panicked),
                        }
                    }
                    Err(()) => (Disposition::Unknown, UnknownReason::Panicked),
                };
                let mut answer = Some((answer_tx, result));
                let subject = Subject {
                    route: &policy.name,
                    client_key: &client_key,
                    store_key: &key,
                    epoch,
                };
                let recorded = engine
                    .record(&subject, fencing, disposition, why, &policy, &mut answer)
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
                () = engine.heartbeat(&key, fencing, sent) => {}
            }
            engine.inner.running.done(running);
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            engine.inner.waiters.notify(&key);
        };
        spawn_in_current_span(task);
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
    async fn heartbeat(&self, key: &StoreKey, fencing: Fencing, sent: tokio::time::Instant) {
        let every = self
            .inner
            .config
            .renew_interval
            .max(Duration::from_millis(1));
        tokio::time::sleep_until(sent + every).await;
        // Only operations that outlive a renew interval get here: the renewal loop's state lives
        // on the heap, so the task of every short operation stays small (cheaper to spawn).
        Box::pin(self.renew_every(key, fencing, every)).await;
    }

    async fn renew_every(&self, key: &StoreKey, fencing: Fencing, every: Duration) {
        let inner = &self.inner;
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await; // the first tick is now
            let renewal = inner.store.renew(key, fencing, inner.config.lease_ttl);
            match tokio::time::timeout(every, renewal).await {
                Ok(Ok(CasOutcome::Applied)) => {
                    inner.stats.renewals.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(CasOutcome::Lost)) => break,
                Ok(Err(e)) => {
                    inner.stats.renewal_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(store_key = %key, error = %e, "lease renewal failed; will retry");
                }
                Err(_) => {
                    inner.stats.renewal_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(store_key = %key, timeout = ?every,
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
    /// `why` is the reason logged if the disposition is outcome-unknown.
    async fn record<A>(
        &self,
        subject: &Subject<'_>,
        fencing: Fencing,
        disposition: Disposition,
        why: UnknownReason,
        policy: &Policy,
        answer: &mut Option<(tokio::sync::oneshot::Sender<(A, Recorded)>, A)>,
    ) -> Recorded {
        let key = subject.store_key;
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
                Ok((CasOutcome::Applied, recorded)) => {
                    if recorded == Recorded::MarkedUnknown {
                        self.marked_unknown(subject, why);
                    }
                    return recorded;
                }
                Ok((CasOutcome::Lost, _)) => {
                    self.lease_lost(subject, &disposition);
                    return Recorded::LeaseLost;
                }
                Err(e) => e,
            };
            // A value the store will never take: keep the fact that it ran, not the value. (A
            // store that is full right now is retried like an outage: it may take the value.)
            if e.is_value_too_large()
                && let Disposition::Store(Outcome::Response(r)) = &disposition
            {
                disposition = Disposition::Store(Outcome::NotReplayable {
                    status: r.status,
                    reason: e.message().to_owned(),
                });
                continue;
            }
            attempt += 1;
            // The caller is answered with `Failed` and decides what to tell its client: under
            // takeover that value is not (yet) the key's outcome (see `Recorded::Failed`).
            if attempt == self.inner.config.record_retries
                && let Some((tx, value)) = answer.take()
            {
                tracing::error!(store_key = %key, error = %e,
                    "could not record the outcome yet; answering the client and retrying in the background");
                let _ = tx.send((value, Recorded::Failed(e.kind())));
            }
            if tokio::time::Instant::now() >= give_up_at {
                tracing::error!(store_key = %key, error = %e,
                    "gave up recording the outcome: the record has expired by now");
                return Recorded::Failed(e.kind());
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_RECORD_BACKOFF);
        }
    }

    /// Marks every operation still registered as running outcome-unknown: for a shutdown whose drain timed out, so that no request that may have
    /// reached the upstream is left in flight for a takeover to run again. Returns how many
    /// records were written. Call it after the tasks running those operations have stopped.
    pub async fn abandon_running(&self) -> usize {
        let left = self.inner.running.take_all();
        let store = &self.inner.store;
        // Unknown even for an operation whose outcome was known but not yet written (its
        // recording was cancelled with it): the safe answer, and the registry stays cheap.
        let writes = left.into_iter().map(|op| async move {
            let result = store
                .mark_unknown(&op.key, op.fencing, op.unknown_ttl)
                .await;
            match result {
                Ok(CasOutcome::Applied) => {
                    let subject = Subject {
                        route: &op.route,
                        client_key: &op.client_key,
                        store_key: &op.key,
                        epoch: op.fencing.epoch,
                    };
                    self.marked_unknown(&subject, UnknownReason::Shutdown);
                    1
                }
                Ok(CasOutcome::Lost) => 0,
                Err(e) => {
                    tracing::error!(store_key = %op.key, error = %e,
                        "shutdown: could not record an abandoned operation; its lease will expire");
                    0
                }
            }
        });
        // All at once (each store call has its own deadline in the proxy), and never longer
        // than ABANDON_TIMEOUT in all: a store that is down must not hold the shutdown for hours.
        match tokio::time::timeout(ABANDON_TIMEOUT, futures_util::future::join_all(writes)).await {
            Ok(written) => written.into_iter().sum(),
            Err(_) => {
                tracing::error!(timeout = ?ABANDON_TIMEOUT,
                    "shutdown: recording abandoned operations took too long; the rest keep their leases until they expire");
                0
            }
        }
    }
}

/// Longest time [`Engine::abandon_running`] spends recording abandoned operations.
const ABANDON_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest pause between two attempts to record an outcome.
const MAX_RECORD_BACKOFF: Duration = Duration::from_secs(2);

/// An operation the engine is running (or recording), for [`Engine::abandon_running`].
#[derive(Debug)]
struct RunningOp {
    key: StoreKey,
    fencing: Fencing,
    unknown_ttl: Duration,
    /// For the warning if it is abandoned.
    route: std::sync::Arc<str>,
    client_key: IdempotencyKey,
}

/// Hashes a fencing token by its low 64 bits: tokens are this engine's own counter (never
/// attacker input), unique, and already evenly spread.
#[derive(Default)]
struct TokenHasher(u64);

impl std::hash::Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

type TokenMap = HashMap<u128, RunningOp, std::hash::BuildHasherDefault<TokenHasher>>;

/// Shards of the running registry: one lock per shard, so that workers starting and finishing
/// operations on different keys do not wait for one another.
const RUNNING_SHARDS: usize = 16;

/// The operations running in this process, by fencing token.
#[derive(Debug)]
pub(super) struct Running {
    shards: [Mutex<TokenMap>; RUNNING_SHARDS],
}

impl Default for Running {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

impl Running {
    fn shard(&self, token: u128) -> &Mutex<TokenMap> {
        // Tokens are `seed << 64 | counter`: the counter's low bits spread evenly.
        &self.shards[(token as usize) % RUNNING_SHARDS]
    }

    fn track(
        &self,
        key: StoreKey,
        client_key: &IdempotencyKey,
        fencing: Fencing,
        policy: &Policy,
    ) -> u128 {
        self.shard(fencing.token).lock().insert(
            fencing.token,
            RunningOp {
                key,
                fencing,
                unknown_ttl: policy.unknown_ttl,
                route: policy.name.clone(),
                client_key: client_key.clone(),
            },
        );
        fencing.token
    }

    /// Whether the holder with `token` runs in this process right now.
    pub(super) fn holds(&self, token: u128) -> bool {
        self.shard(token).lock().contains_key(&token)
    }

    /// Removed only here, when the task ends normally: a task cancelled by a runtime shutdown
    /// leaves its entry for [`Engine::abandon_running`].
    fn done(&self, token: u128) {
        self.shard(token).lock().remove(&token);
    }

    fn take_all(&self) -> Vec<RunningOp> {
        self.shards
            .iter()
            .flat_map(|shard| shard.lock().drain().map(|(_, op)| op).collect::<Vec<_>>())
            .collect()
    }
}
