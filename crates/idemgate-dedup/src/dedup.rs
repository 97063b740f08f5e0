//! [`Deduplicator`]: `process_once` over any [`Store`], and what a delivery became.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use idemgate_core::engine::{
    Concurrency, Dispatch, Disposition, Engine, EngineError, Execution, Policy, Recorded, Recovery,
};
use idemgate_core::record::{Outcome, RecordState, StoredResponse};
use idemgate_core::{ErrorKind, Fingerprint, FingerprintOptions, Scope, ScopedKey, Store};

use crate::MessageId;

/// What the handler made of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Processed: this result is recorded, and every redelivery gets it without running the
    /// handler. A permanent failure ("invalid order") is a result too: record it with a code.
    Done(StoredResponse),
    /// Nothing took effect (a transient failure the handler is sure left no trace): the key is
    /// released, and the next delivery runs the handler again (the caller nacks with backoff).
    Retry,
    /// The effect may or may not have happened (a timeout after sending): never run again;
    /// redeliveries get [`Processed::Unknown`] and the caller dead-letters the message for an
    /// operator.
    Unknown,
}

impl Handled {
    /// `Done` with code 200 and `body`.
    pub fn done(body: impl Into<Bytes>) -> Self {
        Handled::Done(StoredResponse::new(200, Vec::new(), body))
    }
}

/// What became of one delivery.
#[derive(Debug)]
#[non_exhaustive]
pub enum Processed {
    /// This delivery ran the handler.
    Ran {
        /// The handler's result.
        handled: Handled,
        /// The epoch it ran under: 1 for the first run; more after a takeover (the holder of
        /// the previous epoch died, or stopped renewing, mid-handler).
        epoch: u64,
        /// What became of its outcome: ack only on [`Recorded::Stored`].
        recorded: Recorded,
    },
    /// A previous delivery ran the handler: its recorded outcome. Not run again.
    Duplicate {
        /// The recorded outcome.
        outcome: Outcome,
        /// The epoch that recorded it.
        epoch: u64,
    },
    /// Another consumer is running the handler right now (it holds the lease): nack and let the
    /// broker redeliver after `retry_after`.
    InProgress {
        /// The holder's remaining lease, at least one second.
        retry_after: Duration,
    },
    /// An earlier run's outcome is unknown (it returned [`Handled::Unknown`], panicked, or died
    /// under [`Recovery::Strict`]): not run again.
    Unknown {
        /// The epoch that could not tell.
        epoch: u64,
    },
    /// The key holds a record that is not a message's (another writer in this namespace and
    /// scope): nothing ran.
    Conflict,
}

/// What the caller should tell the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The outcome is recorded: acknowledge.
    Ack,
    /// Not done here: negative-acknowledge so that the message comes back, after `delay` (the
    /// caller's own backoff when `None`).
    Nack {
        /// The delay the deduplicator suggests.
        delay: Option<Duration>,
    },
    /// Never to be processed automatically: send to the dead-letter destination.
    DeadLetter,
}

impl Processed {
    /// The broker action for this outcome: ack only once the outcome is recorded.
    pub fn action(&self) -> Action {
        match self {
            Processed::Ran {
                handled, recorded, ..
            } => match (handled, recorded) {
                (Handled::Done(_), Recorded::Stored) => Action::Ack,
                (Handled::Unknown, Recorded::MarkedUnknown) => Action::DeadLetter,
                // Released (a retry), or the recording failed or was fenced off: the message must
                // come back; its redelivery gets the recorded outcome or runs again.
                _ => Action::Nack { delay: None },
            },
            Processed::Duplicate { .. } => Action::Ack,
            Processed::InProgress { retry_after } => Action::Nack {
                delay: Some(*retry_after),
            },
            Processed::Unknown { .. } | Processed::Conflict => Action::DeadLetter,
        }
    }

    /// A stable name for logs and metrics: `processed`, `retry`, `unrecorded`, `duplicate`,
    /// `in_progress`, `unknown`, `conflict`.
    pub fn name(&self) -> &'static str {
        match self {
            Processed::Ran {
                handled, recorded, ..
            } => match (handled, recorded) {
                (_, Recorded::Stored) => "processed",
                (_, Recorded::Released) => "retry",
                (_, Recorded::MarkedUnknown) => "unknown",
                (_, Recorded::LeaseLost | Recorded::Failed(_)) => "unrecorded",
            },
            Processed::Duplicate { .. } => "duplicate",
            Processed::InProgress { .. } => "in_progress",
            Processed::Unknown { .. } => "unknown",
            Processed::Conflict => "conflict",
        }
    }
}

/// Why [`Deduplicator::process_once`] failed: the store failed. Nothing was recorded by this
/// call; the caller nacks (with backoff) and the redelivery decides again.
#[derive(Debug, thiserror::Error)]
#[error("message dedup: {0}")]
pub struct DedupError(#[from] EngineError);

impl DedupError {
    /// The stable kind (`unavailable`, `timeout`, …).
    pub fn kind(&self) -> ErrorKind {
        self.0.kind()
    }
}

/// Counters of what a [`Deduplicator`] did (also exported through the `metrics` facade as
/// `idemgate_messages_total{outcome=…}`).
#[derive(Debug, Default)]
pub struct DedupStats {
    /// Handler runs whose outcome was recorded.
    pub processed: AtomicU64,
    /// Deliveries answered with a recorded outcome (not run).
    pub duplicates: AtomicU64,
    /// Deliveries found running elsewhere.
    pub in_progress: AtomicU64,
    /// Handler runs that asked for a retry (key released).
    pub retries: AtomicU64,
    /// Handler runs at an epoch above 1: re-executions after a takeover.
    pub reexecutions: AtomicU64,
    /// Deliveries that found (or left) an outcome-unknown record.
    pub unknown: AtomicU64,
    /// Handler runs whose outcome could not be recorded (store failure, lease lost).
    pub unrecorded: AtomicU64,
    /// Messages the caller dead-lettered ([`Deduplicator::dead_lettered`]).
    pub dead_lettered: AtomicU64,
    /// Calls that failed on the store.
    pub store_errors: AtomicU64,
}

impl DedupStats {
    /// The counters as `(name, value)` pairs, in a fixed order.
    pub fn snapshot(&self) -> [(&'static str, u64); 9] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("processed", get(&self.processed)),
            ("duplicates", get(&self.duplicates)),
            ("in_progress", get(&self.in_progress)),
            ("retries", get(&self.retries)),
            ("reexecutions", get(&self.reexecutions)),
            ("unknown", get(&self.unknown)),
            ("unrecorded", get(&self.unrecorded)),
            ("dead_lettered", get(&self.dead_lettered)),
            ("store_errors", get(&self.store_errors)),
        ]
    }
}

/// Builds a [`Deduplicator`].
#[derive(Debug)]
pub struct DeduplicatorBuilder<S> {
    engine: EngineSource<S>,
    namespace: String,
    policy: Policy,
}

#[derive(Debug)]
enum EngineSource<S> {
    Store {
        store: S,
        lease_ttl: Duration,
        owner: Option<String>,
    },
    Engine(Engine<S>),
}

impl<S: Store> DeduplicatorBuilder<S> {
    /// Namespace of the records (default `messages`): keeps message keys apart from HTTP keys
    /// and from other services on a shared store.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long a processed message's record is kept (default 24 h): a redelivery later than
    /// this runs the handler again (G5). Pick it above the broker's redelivery horizon.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.policy.ttl = ttl;
        self
    }

    /// How long an outcome-unknown record is kept (default 24 h).
    pub fn unknown_ttl(mut self, ttl: Duration) -> Self {
        self.policy.unknown_ttl = ttl;
        self
    }

    /// What a dead consumer's message becomes once its lease expired: run again at epoch + 1
    /// ([`Recovery::Takeover`], default) or never ([`Recovery::Strict`]: outcome-unknown).
    pub fn recovery(mut self, recovery: Recovery) -> Self {
        self.policy.recovery = recovery;
        self
    }

    /// Lease length (default 10 s; renewed every third of it while the handler runs). Ignored
    /// when built [`with_engine`](Deduplicator::with_engine) (the engine has its own).
    pub fn lease_ttl(mut self, lease: Duration) -> Self {
        if let EngineSource::Store { lease_ttl, .. } = &mut self.engine {
            *lease_ttl = lease;
        }
        self
    }

    /// This consumer's name in records, for operators. Ignored with an engine.
    pub fn owner(mut self, name: impl Into<String>) -> Self {
        if let EngineSource::Store { owner, .. } = &mut self.engine {
            *owner = Some(name.into());
        }
        self
    }

    /// Builds it.
    pub fn build(self) -> Deduplicator<S> {
        let engine = match self.engine {
            EngineSource::Engine(engine) => engine,
            EngineSource::Store {
                store,
                lease_ttl,
                owner,
            } => {
                let mut builder = Engine::builder(store).lease_ttl(lease_ttl);
                if let Some(owner) = owner {
                    builder = builder.owner(owner);
                }
                builder.build()
            }
        };
        Deduplicator {
            engine,
            namespace: Arc::from(self.namespace),
            policy: self.policy,
            stats: Arc::new(DedupStats::default()),
        }
    }
}

/// Runs a message handler at most once per message id and consumer (per epoch), and gives
/// redeliveries the recorded outcome. Cheap to clone (shares state).
#[derive(Debug)]
pub struct Deduplicator<S> {
    engine: Engine<S>,
    namespace: Arc<str>,
    policy: Policy,
    stats: Arc<DedupStats>,
}

impl<S> Clone for Deduplicator<S> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            namespace: self.namespace.clone(),
            policy: self.policy.clone(),
            stats: self.stats.clone(),
        }
    }
}

/// The fingerprint of every message record: the id alone decides (a payload republished under
/// the same id is the same message, as in JetStream's duplicate window).
fn message_fingerprint() -> Fingerprint {
    FingerprintOptions::default()
        .builder()
        .method("MESSAGE")
        .finish()
}

fn default_policy() -> Policy {
    Policy {
        // A delivery never waits for another consumer: it is handed back to the broker.
        concurrency: Concurrency::Reject,
        ..Policy::default()
    }
}

impl<S: Store> Deduplicator<S> {
    /// A builder over `store` (an [`Engine`] is made for it).
    pub fn builder(store: S) -> DeduplicatorBuilder<S> {
        DeduplicatorBuilder {
            engine: EngineSource::Store {
                store,
                lease_ttl: Duration::from_secs(10),
                owner: None,
            },
            namespace: "messages".into(),
            policy: default_policy(),
        }
    }

    /// A builder over an existing engine (to share its store stack, e.g. the one
    /// `idemgate_stores::Opened::stack` gives, with its completion feed).
    pub fn with_engine(engine: Engine<S>) -> DeduplicatorBuilder<S> {
        DeduplicatorBuilder {
            engine: EngineSource::Engine(engine),
            namespace: "messages".into(),
            policy: default_policy(),
        }
    }

    /// The engine (for `idemgate_stores::follow`, `abandon_running` at shutdown, its stats).
    pub fn engine(&self) -> &Engine<S> {
        &self.engine
    }

    /// The counters.
    pub fn stats(&self) -> &DedupStats {
        &self.stats
    }

    /// Counts a message the caller sent to its dead-letter destination.
    pub fn dead_lettered(&self) {
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("idemgate_messages_total", "outcome" => "dead_lettered").increment(1);
    }

    /// The scoped key of `message_id` for `consumer` (for admin look-ups).
    pub fn scoped_key(&self, consumer: &str, message_id: &MessageId) -> ScopedKey {
        ScopedKey::new(
            self.namespace.to_string(),
            Scope::new(consumer),
            message_id.key().clone(),
        )
    }

    /// Processes one delivery of `message_id` for `consumer` (a consumer group, a durable
    /// consumer, a queue: the deliveries that must share one run).
    ///
    /// The first delivery claims the key and runs `handler` under a lease that is renewed
    /// while it runs; its [`Handled`] result is recorded. A later delivery gets the recorded
    /// outcome ([`Processed::Duplicate`]) without running; a delivery while another holds the
    /// lease gets [`Processed::InProgress`]. A holder that died mid-handler loses its lease
    /// when it expires, and the next delivery runs the handler again at epoch + 1
    /// ([`Recovery::Takeover`]); the dead holder's late writes are fenced off. The handler
    /// gets the [`Dispatch`] (its epoch, and the instant after which it must not start its
    /// effect). It runs in a spawned task: dropping this future does not stop it, and its
    /// outcome is still recorded.
    ///
    /// Then do what [`Processed::action`] says.
    pub async fn process_once<F, Fut>(
        &self,
        consumer: &str,
        message_id: &MessageId,
        handler: F,
    ) -> Result<Processed, DedupError>
    where
        F: FnOnce(Dispatch) -> Fut,
        Fut: Future<Output = Handled> + Send + 'static,
    {
        let key = self.scoped_key(consumer, message_id);
        let classify = |handled: &Handled| match handled {
            Handled::Done(response) => Disposition::Store(Outcome::Response(response.clone())),
            Handled::Retry => Disposition::Release,
            Handled::Unknown => Disposition::Unknown,
        };
        let run = self
            .engine
            .run(&key, message_fingerprint(), &self.policy, classify, handler)
            .await;
        let processed = match run {
            Ok(Execution::Executed {
                value,
                epoch,
                recorded,
            }) => Processed::Ran {
                handled: value,
                epoch,
                recorded,
            },
            Ok(Execution::Replayed { outcome, record }) => Processed::Duplicate {
                outcome,
                epoch: match record.state {
                    RecordState::Completed { epoch, .. } => epoch,
                    _ => 0,
                },
            },
            Ok(Execution::InFlight { retry_after }) => Processed::InProgress { retry_after },
            Ok(Execution::Unknown { record }) => Processed::Unknown {
                epoch: match record.state {
                    RecordState::Unknown { epoch, .. } => epoch,
                    _ => 0,
                },
            },
            Ok(Execution::Mismatch { .. }) => Processed::Conflict,
            Err(EngineError::OperationPanicked) => Processed::Unknown { epoch: 0 },
            Err(e) => {
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("idemgate_messages_total", "outcome" => "store_error")
                    .increment(1);
                return Err(DedupError(e));
            }
        };
        self.count(&processed);
        Ok(processed)
    }

    fn count(&self, processed: &Processed) {
        let s = &self.stats;
        let counter = match processed {
            Processed::Ran {
                epoch, recorded, ..
            } => {
                if *epoch > 1 {
                    s.reexecutions.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("idemgate_messages_reexecutions_total").increment(1);
                }
                match recorded {
                    Recorded::Stored => &s.processed,
                    Recorded::Released => &s.retries,
                    Recorded::MarkedUnknown => &s.unknown,
                    Recorded::LeaseLost | Recorded::Failed(_) => &s.unrecorded,
                }
            }
            Processed::Duplicate { .. } => &s.duplicates,
            Processed::InProgress { .. } => &s.in_progress,
            Processed::Unknown { .. } | Processed::Conflict => &s.unknown,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("idemgate_messages_total", "outcome" => processed.name()).increment(1);
    }
}
