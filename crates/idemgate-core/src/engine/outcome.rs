//! What [`Engine::run`](super::Engine::run)(super::Engine::run) returns: [`Execution`], [`Recorded`], the error type,
//! and the counters.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::Duration;

use crate::error::{ErrorKind, StoreError};
use crate::record::{Outcome, Record};

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
    ///
    /// Under [`Recovery::Takeover`](super::Recovery::Takeover) the value is then *not* the key's
    /// outcome: another run holds (or will hold) the key, and retries will get that run's
    /// answer. A caller that hands the value to a client as final gives it an answer no retry
    /// will ever see again (idemgate's tower layer answers `409` in-flight instead).
    LeaseLost,
    /// The store failed while recording; recording goes on in the background (the lease is kept
    /// renewed) until it is written, fenced off, or the record's TTL passed.
    ///
    /// Under [`Recovery::Takeover`](super::Recovery::Takeover) the value is not yet the key's
    /// outcome: if this process dies before the record is written, the lease lapses and a retry
    /// runs the operation again. Handing the value to a client as final would let a second run
    /// follow an answer (idemgate's tower layer answers `409` in-flight instead; the client's
    /// retry then gets the stored answer). Under strict recovery nothing runs again, and
    /// handing it out is safe (later retries may get outcome-unknown).
    Failed(ErrorKind),
}

/// The result of [`Engine::run`](super::Engine::run).
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

/// Why [`Engine::run`](super::Engine::run) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The store failed on the call's first claim: it said nothing about the key, and nothing
    /// was dispatched. (The only store error after which forwarding unprotected — fail open — is
    /// safe to consider.)
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store failed after it had already told this call the key exists (a later poll, a
    /// takeover, strict recovery's mark). Nothing was dispatched by this call, but another
    /// holder may be running it or may have run it: never forward unprotected after this.
    #[error("{0} (after the key was found in use)")]
    StoreAfterRead(StoreError),
    /// The operation panicked; its record was marked outcome-unknown.
    #[error("the operation panicked; its outcome is unknown")]
    OperationPanicked,
}

impl EngineError {
    /// The store error kind, or `Internal` for a panic.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Store(e) | EngineError::StoreAfterRead(e) => e.kind(),
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
    /// Records this engine marked outcome-unknown (each one also logged at WARN).
    pub marked_unknown: AtomicU64,
    /// Calls waiting right now.
    pub waiting: AtomicUsize,
    /// Operations running right now.
    pub in_flight: AtomicUsize,
}
