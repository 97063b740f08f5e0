//! Per-call settings and the caller's hooks: what a retry of a running request gets
//! ([`Concurrency`]), what a dead holder's key becomes ([`Recovery`]), and which outcomes are kept
//! ([`Classify`] → [`Disposition`]).

use std::sync::Arc;
use std::time::Duration;

use crate::record::Outcome;

/// What to do when a retry finds the first request still running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concurrency {
    /// Hold the retry until the first completes (then replay), at most `timeout`; after that answer
    /// [`Execution::InFlight`](super::Execution::InFlight).
    Wait {
        /// Longest wait.
        timeout: Duration,
    },
    /// Answer [`Execution::InFlight`](super::Execution::InFlight) at once.
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
    /// What the policy protects (idemgate's tower layer sets the route's name), named as `route`
    /// in the engine's warnings about outcome-unknown records and lost leases. Default: empty.
    pub name: Arc<str>,
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
            name: Arc::from(""),
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
    /// Do not start the operation's effect after this instant (tokio's clock): the lease may have
    /// lapsed by then (a process paused between claim and dispatch), and another instance may own
    /// the key. Check it right before the effect leaves (the proxy answers `502`, not sent).
    pub start_by: tokio::time::Instant,
}
