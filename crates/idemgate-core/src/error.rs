//! Store errors with a stable [`ErrorKind`].
//!
//! "Key exists", "in flight", "fingerprint mismatch" and "lost the lease" are outcomes (values of the
//! operation's result type), never errors. Errors mean the store could not answer.

use std::error::Error as StdError;
use std::fmt;

use crate::record::DecodeError;

/// What kind of failure a [`StoreError`] is. Stable: HTTP mapping and retry decisions use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The store cannot be reached or refused service. Nothing was changed, or the change is unknown
    /// for a write that may have been sent (callers treat writes as possibly applied).
    Unavailable,
    /// The store did not answer in time. As with `Unavailable`, a write may or may not have applied.
    Timeout,
    /// Stored bytes could not be decoded (bit rot, a foreign writer, a newer encoding version).
    Corrupt,
    /// The store is full (memory store at its bound, Redis at `maxmemory`, PostgreSQL out of
    /// disk) or the value is too large ([`StoreError::is_value_too_large`]). Nothing was
    /// changed.
    Capacity,
    /// The store is misconfigured or held by someone else (e.g. a database file locked by another
    /// process).
    Config,
    /// A bug or an unexpected answer from the backend.
    Internal,
}

impl ErrorKind {
    /// Every kind (for metrics registered before any error).
    pub const ALL: [ErrorKind; 6] = [
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::Corrupt,
        ErrorKind::Capacity,
        ErrorKind::Config,
        ErrorKind::Internal,
    ];

    /// A stable snake-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Capacity => "capacity",
            ErrorKind::Config => "config",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A store failure: a kind, a message and the backend's error as the source.
#[derive(Debug)]
pub struct StoreError {
    kind: ErrorKind,
    message: String,
    too_large: bool,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl StoreError {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            too_large: false,
            source: None,
        }
    }

    /// A [`ErrorKind::Capacity`] error about the value itself: the store will never take it
    /// (over a size limit), as opposed to a store that is full right now (at its bound, Redis
    /// `maxmemory`), which may take it later. The engine keeps the fact that an operation ran
    /// (a not-replayable record) only for the first kind.
    pub fn value_too_large(message: impl Into<String>) -> Self {
        Self {
            too_large: true,
            ..Self::new(ErrorKind::Capacity, message)
        }
    }

    /// Whether the value can never be stored (see [`StoreError::value_too_large`]).
    pub fn is_value_too_large(&self) -> bool {
        self.too_large
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The stable kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message (without the source).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store {}: {}", self.kind, self.message)?;
        if let Some(src) = &self.source {
            write!(f, ": {src}")?;
        }
        Ok(())
    }
}

impl StdError for StoreError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl From<DecodeError> for StoreError {
    fn from(e: DecodeError) -> Self {
        StoreError::new(ErrorKind::Corrupt, "stored record does not decode").with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_once_with_its_own_name() {
        // A new variant must be listed in ALL: this match stops compiling without it.
        let position = |k: ErrorKind| match k {
            ErrorKind::Unavailable => 0,
            ErrorKind::Timeout => 1,
            ErrorKind::Corrupt => 2,
            ErrorKind::Capacity => 3,
            ErrorKind::Config => 4,
            ErrorKind::Internal => 5,
        };
        for (i, k) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(position(*k), i, "{k:?}");
        }
        let names: std::collections::BTreeSet<_> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }
}
