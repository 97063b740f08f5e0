//! The client's errors: one variant per reason it gives up without a final answer.
//!
//! Every variant carries the [`RetryInfo`] of the operation (attempts, the key, the log), so a
//! caller can reconcile with the server by key: [`Error::key`]. An operation that stopped with an
//! answer in hand (a `503` after the last attempt, a `429` whose `Retry-After` is over the cap)
//! returns that answer, not an error; its [`RetryInfo::stop`] says why it stopped.

use std::time::Duration;

use crate::report::RetryInfo;

/// A boxed error (the transport's).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an operation ended without a final answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operation may or may not have taken effect, and the client will not resend it:
    /// reconcile by the key (look the effect up, or have an operator resolve the key).
    ///
    /// - `unprotected: false`: idemgate answered `502` outcome-unknown. An attempt with this key
    ///   may or may not have taken effect, and idemgate will not run it again (a resend with the
    ///   key gets outcome-unknown again, until an operator resolves the key).
    /// - `unprotected: true`: idemgate answered `502` upstream-failed to a non-idempotent request
    ///   (POST, PATCH): it forwarded the request *without* idempotency protection (the route is
    ///   not covered, or the store was unreachable under `fail_mode = "open"`) and got no
    ///   complete answer. The effect may have happened, and a resend — even with the same key —
    ///   would not be deduplicated: it could apply the effect twice. `key` is the key that was
    ///   sent (empty if the request had none).
    #[error(
        "outcome unknown for Idempotency-Key {key}: the operation may or may not have taken effect{}",
        if *unprotected { " (forwarded unprotected: a resend would not be deduplicated)" } else { "" }
    )]
    OutcomeUnknown {
        /// The key to reconcile with.
        key: String,
        /// The problem's `detail`, if the server sent one.
        detail: Option<String>,
        /// The request went through idemgate unprotected (`502` upstream-failed): a resend
        /// with this key would run again.
        unprotected: bool,
        /// The attempts.
        info: Box<RetryInfo>,
    },
    /// The host's circuit breaker is open: nothing was sent (for this attempt).
    #[error("circuit open for {host}: failing fast{}", retry_in.map(|d| format!(" (next probe in {d:?})")).unwrap_or_default())]
    CircuitOpen {
        /// The host (`scheme://host:port`).
        host: String,
        /// When a probe will be let through, if known.
        retry_in: Option<Duration>,
        /// The attempts made before the breaker refused (0 when it refused the first).
        info: Box<RetryInfo>,
        /// The last attempt's failure, if attempts were made.
        #[source]
        source: Option<BoxError>,
    },
    /// The host's retry budget is exhausted: the last failure is returned without retrying.
    #[error("retry budget exhausted for {host} after {} attempt(s)", info.attempts)]
    BudgetExhausted {
        /// The host.
        host: String,
        /// The attempts.
        info: Box<RetryInfo>,
        /// The last attempt's failure.
        #[source]
        source: BoxError,
    },
    /// Every allowed attempt failed in transport.
    #[error("gave up after {} attempt(s)", info.attempts)]
    AttemptsExhausted {
        /// The attempts.
        info: Box<RetryInfo>,
        /// The last attempt's failure.
        #[source]
        source: BoxError,
    },
    /// The overall deadline passed (while the request body was being read, during an attempt,
    /// or before the next one could start).
    #[error("deadline of {deadline:?} exceeded after {} attempt(s)", info.attempts)]
    DeadlineExceeded {
        /// The deadline.
        deadline: Duration,
        /// The attempts.
        info: Box<RetryInfo>,
        /// The last attempt's failure.
        #[source]
        source: BoxError,
    },
    /// The request body was a stream over the buffer cap: it was sent once, that attempt failed,
    /// and it cannot be resent.
    #[error("the request body (a stream over {limit} bytes) could not be resent after a failure")]
    BodyNotRetryable {
        /// The buffer cap.
        limit: usize,
        /// The attempt.
        info: Box<RetryInfo>,
        /// Its failure.
        #[source]
        source: BoxError,
    },
    /// The request has a non-idempotent method and no key its host honours (none, or a host
    /// outside [`key_hosts`](crate::PolicyBuilder::key_hosts)), and the failed attempt may have
    /// been sent: resending it could apply it twice.
    #[error(
        "not retried: a request without an Idempotency-Key its host honours may have been sent"
    )]
    NotSafeToRetry {
        /// The attempt.
        info: Box<RetryInfo>,
        /// Its failure.
        #[source]
        source: BoxError,
    },
    /// A failure no resend can fix (the request could not be built, a redirect loop, …).
    #[error("request failed")]
    Transport {
        /// The attempts.
        info: Box<RetryInfo>,
        /// The failure.
        #[source]
        source: BoxError,
    },
    /// The request body could not be read (to buffer it), before anything was sent.
    #[error("the request body could not be read")]
    RequestBody {
        /// The failure.
        #[source]
        source: BoxError,
    },
}

/// A stable name for each [`Error`] variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::OutcomeUnknown`].
    OutcomeUnknown,
    /// [`Error::CircuitOpen`].
    CircuitOpen,
    /// [`Error::BudgetExhausted`].
    BudgetExhausted,
    /// [`Error::AttemptsExhausted`].
    AttemptsExhausted,
    /// [`Error::DeadlineExceeded`].
    DeadlineExceeded,
    /// [`Error::BodyNotRetryable`].
    BodyNotRetryable,
    /// [`Error::NotSafeToRetry`].
    NotSafeToRetry,
    /// [`Error::Transport`].
    Transport,
    /// [`Error::RequestBody`].
    RequestBody,
}

impl ErrorKind {
    /// A short name (logs, metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::OutcomeUnknown => "outcome_unknown",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::BudgetExhausted => "budget_exhausted",
            ErrorKind::AttemptsExhausted => "attempts_exhausted",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::BodyNotRetryable => "body_not_retryable",
            ErrorKind::NotSafeToRetry => "not_safe_to_retry",
            ErrorKind::Transport => "transport",
            ErrorKind::RequestBody => "request_body",
        }
    }
}

impl Error {
    /// The variant's stable kind.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::OutcomeUnknown { .. } => ErrorKind::OutcomeUnknown,
            Error::CircuitOpen { .. } => ErrorKind::CircuitOpen,
            Error::BudgetExhausted { .. } => ErrorKind::BudgetExhausted,
            Error::AttemptsExhausted { .. } => ErrorKind::AttemptsExhausted,
            Error::DeadlineExceeded { .. } => ErrorKind::DeadlineExceeded,
            Error::BodyNotRetryable { .. } => ErrorKind::BodyNotRetryable,
            Error::NotSafeToRetry { .. } => ErrorKind::NotSafeToRetry,
            Error::Transport { .. } => ErrorKind::Transport,
            Error::RequestBody { .. } => ErrorKind::RequestBody,
        }
    }

    /// The attempts behind the error (`None` for [`Error::RequestBody`]: nothing was sent).
    pub fn info(&self) -> Option<&RetryInfo> {
        match self {
            Error::OutcomeUnknown { info, .. }
            | Error::CircuitOpen { info, .. }
            | Error::BudgetExhausted { info, .. }
            | Error::AttemptsExhausted { info, .. }
            | Error::DeadlineExceeded { info, .. }
            | Error::BodyNotRetryable { info, .. }
            | Error::NotSafeToRetry { info, .. }
            | Error::Transport { info, .. } => Some(info),
            Error::RequestBody { .. } => None,
        }
    }

    /// The `Idempotency-Key` the operation used: retry later with it, or reconcile by it.
    pub fn key(&self) -> Option<&str> {
        self.info()?.key.as_deref()
    }

    /// Requests sent.
    pub fn attempts(&self) -> u32 {
        self.info().map_or(0, |i| i.attempts)
    }
}
