//! How the inner service reports failures, so that the layer can classify them (PRODUCT G3).

use crate::body::BoxError;

/// A failure of the inner service, as the layer needs to know it.
///
/// An inner service that forwards requests (the `idemgate serve` proxy) returns these. Any other
/// error from an inner service is treated like [`UpstreamError::Sent`]: the layer cannot prove the
/// operation did not happen, so the record becomes outcome-unknown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// Proven that the upstream never received the request (connection refused, connect timeout,
    /// a pooled connection that failed before a byte was written): the key is released.
    #[error("upstream never received the request: {0}")]
    NotSent(#[source] BoxError),
    /// The request was (or may have been) sent, but no complete answer came back (timeout, reset,
    /// truncated response): the outcome is unknown.
    #[error("upstream did not answer completely: {0}")]
    Sent(#[source] BoxError),
}

impl UpstreamError {
    /// Classifies any inner-service error: an `UpstreamError` keeps its class, anything else is
    /// `Sent`.
    pub fn classify(e: BoxError) -> Self {
        match e.downcast::<UpstreamError>() {
            Ok(u) => *u,
            Err(other) => UpstreamError::Sent(other),
        }
    }

    /// Whether the upstream provably did nothing.
    pub fn is_not_sent(&self) -> bool {
        matches!(self, UpstreamError::NotSent(_))
    }
}
