//! How the inner service reports failures, so that the layer can classify them (PRODUCT G3) and
//! answer with a cause class that leaks no internals.

use std::fmt;

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

    /// A `NotSent` failure with its cause class.
    pub fn not_sent(cause: Cause, source: impl Into<BoxError>) -> Self {
        UpstreamError::NotSent(Box::new(Caused::new(cause, source)))
    }

    /// A `Sent` failure with its cause class.
    pub fn sent(cause: Cause, source: impl Into<BoxError>) -> Self {
        UpstreamError::Sent(Box::new(Caused::new(cause, source)))
    }

    /// Whether the upstream provably did nothing.
    pub fn is_not_sent(&self) -> bool {
        matches!(self, UpstreamError::NotSent(_))
    }

    /// The cause class: the first [`Caused`] in the error chain, else a guess from an I/O error
    /// in the chain, else [`Cause::Other`].
    pub fn cause(&self) -> Cause {
        let (UpstreamError::NotSent(e) | UpstreamError::Sent(e)) = self;
        Cause::of(e.as_ref())
    }
}

/// Why an upstream exchange failed: a stable class for answers, logs and metrics. The answer to
/// the client names only this class, never addresses or error chains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cause {
    /// The upstream's host name did not resolve.
    DnsFailure,
    /// The upstream refused the connection.
    ConnectionRefused,
    /// The connection could not be set up within the connect timeout.
    ConnectTimeout,
    /// The connection could not be set up for another reason (network unreachable, out of file
    /// descriptors, ...).
    ConnectFailed,
    /// The TLS handshake with an `https://` upstream failed (its certificate did not verify,
    /// it asked for a client certificate we do not have, no common protocol, ...): nothing was
    /// sent.
    TlsHandshake,
    /// The upstream closed the connection before answering completely.
    ConnectionClosed,
    /// The connection was reset.
    ConnectionReset,
    /// No complete answer within the response timeout.
    Timeout,
    /// The upstream's answer was not valid HTTP.
    InvalidResponse,
    /// Not sent: this instance's lease may have lapsed before the request could leave (the
    /// process was paused between claim and dispatch); another instance may own the key now.
    LeaseLapsed,
    /// Anything else.
    Other,
}

impl Cause {
    /// Every cause (for metrics registered before any failure).
    pub const ALL: [Cause; 11] = [
        Cause::DnsFailure,
        Cause::ConnectionRefused,
        Cause::ConnectTimeout,
        Cause::ConnectFailed,
        Cause::TlsHandshake,
        Cause::ConnectionClosed,
        Cause::ConnectionReset,
        Cause::Timeout,
        Cause::InvalidResponse,
        Cause::LeaseLapsed,
        Cause::Other,
    ];

    /// The stable slug (`connection-refused`, ...), used in problem bodies and metric labels.
    pub fn slug(self) -> &'static str {
        match self {
            Cause::DnsFailure => "dns-failure",
            Cause::ConnectionRefused => "connection-refused",
            Cause::ConnectTimeout => "connect-timeout",
            Cause::ConnectFailed => "connect-failed",
            Cause::TlsHandshake => "tls-handshake",
            Cause::ConnectionClosed => "connection-closed",
            Cause::ConnectionReset => "connection-reset",
            Cause::Timeout => "timeout",
            Cause::InvalidResponse => "invalid-response",
            Cause::LeaseLapsed => "lease-lapsed",
            Cause::Other => "other",
        }
    }

    /// A few words for a problem's `detail`.
    pub fn describe(self) -> &'static str {
        match self {
            Cause::DnsFailure => "DNS failure",
            Cause::ConnectionRefused => "connection refused",
            Cause::ConnectTimeout => "connect timeout",
            Cause::ConnectFailed => "connection failed",
            Cause::TlsHandshake => "TLS handshake failed",
            Cause::ConnectionClosed => "connection closed by the upstream",
            Cause::ConnectionReset => "connection reset",
            Cause::Timeout => "timeout",
            Cause::InvalidResponse => "invalid response",
            Cause::LeaseLapsed => "lease lapsed before the request was sent",
            Cause::Other => "upstream error",
        }
    }

    /// The cause class of any error: the first [`Caused`] in its chain, else a guess from an I/O
    /// error in the chain, else [`Cause::Other`].
    pub fn of(e: &(dyn std::error::Error + 'static)) -> Cause {
        let mut next = Some(e);
        let mut io_guess = None;
        while let Some(err) = next {
            if let Some(c) = err.downcast_ref::<Caused>() {
                return c.cause;
            }
            if io_guess.is_none()
                && let Some(io) = err.downcast_ref::<std::io::Error>()
            {
                io_guess = Some(Cause::of_io(io.kind()));
            }
            next = err.source();
        }
        io_guess.unwrap_or(Cause::Other)
    }

    /// The cause class of an I/O error kind met while talking to an established connection.
    pub fn of_io(kind: std::io::ErrorKind) -> Cause {
        use std::io::ErrorKind as K;
        match kind {
            K::ConnectionRefused => Cause::ConnectionRefused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Cause::ConnectionReset,
            K::UnexpectedEof | K::NotConnected => Cause::ConnectionClosed,
            K::TimedOut => Cause::Timeout,
            _ => Cause::Other,
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// An error with its [`Cause`] attached (what an inner service wraps its failures in).
#[derive(Debug)]
pub struct Caused {
    cause: Cause,
    source: BoxError,
}

impl Caused {
    /// Attaches `cause` to `source`.
    pub fn new(cause: Cause, source: impl Into<BoxError>) -> Self {
        Self {
            cause,
            source: source.into(),
        }
    }

    /// The cause class.
    pub fn cause(&self) -> Cause {
        self.cause
    }
}

impl fmt::Display for Caused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The source follows in the chain (`source()`), not here.
        f.write_str(self.cause.describe())
    }
}

impl std::error::Error for Caused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

/// Displays an error with its whole `source()` chain, `a: b: c` (for logs, never for answers).
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_is_found_in_the_chain() {
        let e = UpstreamError::not_sent(Cause::ConnectionRefused, "refused");
        assert_eq!(e.cause(), Cause::ConnectionRefused);
        assert!(e.is_not_sent());
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(
            UpstreamError::Sent(Box::new(io)).cause(),
            Cause::ConnectionReset
        );
        assert_eq!(UpstreamError::Sent("x".into()).cause(), Cause::Other);
    }

    #[test]
    fn every_cause_is_listed_once() {
        // A new variant must be listed in ALL: this match stops compiling without it.
        let listed = |c: Cause| match c {
            Cause::DnsFailure
            | Cause::ConnectionRefused
            | Cause::ConnectTimeout
            | Cause::ConnectFailed
            | Cause::TlsHandshake
            | Cause::ConnectionClosed
            | Cause::ConnectionReset
            | Cause::Timeout
            | Cause::InvalidResponse
            | Cause::LeaseLapsed
            | Cause::Other => Cause::ALL.contains(&c),
        };
        assert!(Cause::ALL.iter().all(|c| listed(*c)));
        let slugs: std::collections::BTreeSet<_> = Cause::ALL.iter().map(|c| c.slug()).collect();
        assert_eq!(slugs.len(), Cause::ALL.len());
    }
}
