//! What is retried: the classification of every attempt's outcome.
//!
//! | outcome | verdict |
//! | --- | --- |
//! | `Idempotent-Replayed: true` (any status) | final, reported as a replay |
//! | `1xx`–`3xx` | final, success |
//! | `409` with problem type `urn:idemgate:problem:request-in-flight`, or any `409` with `Retry-After` (IETF draft) | wait as told, then ask again (does not use an attempt or budget); a non-idempotent request without a key its host honours is not resent |
//! | `502` with problem type `urn:idemgate:problem:outcome-unknown` | never retried: [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown) carrying the key |
//! | `502` with problem type `urn:idemgate:problem:upstream-failed` (idemgate forwarded the request unprotected — an uncovered route, or a store outage with `fail_mode = "open"` — and got no complete answer), non-idempotent method | never retried (a resend would not be deduplicated): [`Error::OutcomeUnknown`](crate::Error::OutcomeUnknown) with `unprotected: true`, carrying the key |
//! | the same, idempotent method (RFC 9110: `GET`, `HEAD`, `OPTIONS`, `TRACE`, `PUT`, `DELETE`) | retried like any `502` |
//! | a status in the retry set (default `408`, `425`, `429`, `500`, `502`, `503`, `504`) | retried (a non-idempotent request only with a key its host honours: [`PolicyBuilder::key_hosts`](crate::PolicyBuilder::key_hosts)) |
//! | any other status (`400`, `409`, `410` not-replayable, `422`, …) | final, returned as is |
//! | connection not established (refused, DNS, connect timeout) | retried: the request was never sent |
//! | timeout or reset after sending, truncated answer | retried only with a key its host honours or an idempotent method (RFC 9110): the same key makes the resend safe |
//! | anything else that is not a transport failure (a request that cannot be built, a redirect loop) | final error |
//!
//! ```
//! use idemgate_client::classify::TransportFailure;
//!
//! assert!(TransportFailure::NotSent.retryable_unkeyed());
//! assert!(!TransportFailure::Timeout.retryable_unkeyed());
//! ```

use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::backoff::RetryAfter;

/// The problem type of idemgate's "still in flight" `409`.
pub const PROBLEM_IN_FLIGHT: &str = "urn:idemgate:problem:request-in-flight";
/// The problem type of idemgate's outcome-unknown `502`.
pub const PROBLEM_OUTCOME_UNKNOWN: &str = "urn:idemgate:problem:outcome-unknown";
/// The problem type of idemgate's `502` for a request it forwarded unprotected (an uncovered
/// route, or a store outage under `fail_mode = "open"`) that got no complete answer.
pub const PROBLEM_UPSTREAM_FAILED: &str = "urn:idemgate:problem:upstream-failed";
/// The header a replayed answer carries.
pub const IDEMPOTENT_REPLAYED: http::HeaderName =
    http::HeaderName::from_static("idempotent-replayed");

/// Problem bodies larger than this are not read for their `type`.
pub(crate) const PROBLEM_BODY_LIMIT: usize = 64 * 1024;

/// How an attempt that got no answer failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransportFailure {
    /// No connection was made (refused, DNS failure, connect timeout): nothing was sent.
    NotSent,
    /// The attempt timed out after the request may have been sent.
    Timeout,
    /// The connection broke after the request may have been sent (reset, closed, truncated).
    Interrupted,
    /// A failure that a resend cannot fix (the request could not be built, a redirect loop, a
    /// body that could not be read).
    Fatal,
}

impl TransportFailure {
    /// Whether a request without a key and with a non-idempotent method may be resent after
    /// this failure (only when it provably was not sent).
    pub fn retryable_unkeyed(self) -> bool {
        self == TransportFailure::NotSent
    }

    /// A short name (logs, metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            TransportFailure::NotSent => "not_sent",
            TransportFailure::Timeout => "timeout",
            TransportFailure::Interrupted => "interrupted",
            TransportFailure::Fatal => "fatal",
        }
    }

    /// The default classification of an error from a tower service or other transport: walks
    /// the source chain for an [`std::io::Error`] (refused / address unavailable: not sent;
    /// timed out: timeout; reset, aborted, broken pipe, unexpected EOF: interrupted) or a tokio
    /// `Elapsed` (timeout). Anything else is treated as interrupted (it may have been sent).
    pub fn of_error(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind as K;
                return match io.kind() {
                    K::ConnectionRefused | K::AddrNotAvailable | K::NotFound => {
                        TransportFailure::NotSent
                    }
                    K::TimedOut | K::WouldBlock => TransportFailure::Timeout,
                    K::InvalidInput => TransportFailure::Fatal,
                    _ => TransportFailure::Interrupted,
                };
            }
            if e.is::<tokio::time::error::Elapsed>() {
                return TransportFailure::Timeout;
            }
            cur = e.source();
        }
        TransportFailure::Interrupted
    }
}

/// What the adapters learned about an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Facts {
    pub(crate) status: StatusCode,
    pub(crate) replayed: bool,
    pub(crate) retry_after: Option<RetryAfter>,
    /// The problem+json `type`, when the body was read for it.
    pub(crate) problem: Option<String>,
    /// The problem+json `detail`, when the body was read for it.
    pub(crate) detail: Option<String>,
    /// The answer's `Date` header (what a `Retry-After` date is measured from).
    pub(crate) date: Option<std::time::SystemTime>,
}

impl Facts {
    pub(crate) fn new(
        status: StatusCode,
        headers: &HeaderMap,
        problem_body: Option<&[u8]>,
    ) -> Self {
        let replayed = headers
            .get(&IDEMPOTENT_REPLAYED)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let doc: Option<serde_json::Value> =
            problem_body.and_then(|b| serde_json::from_slice(b).ok());
        let member = |name: &str| {
            doc.as_ref()
                .and_then(|d| d.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_owned)
        };
        Self {
            status,
            replayed,
            retry_after: RetryAfter::from_headers(headers),
            problem: member("type"),
            detail: member("detail"),
            date: headers
                .get(http::header::DATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v.trim()).ok()),
        }
    }

    /// The wait the answer's `Retry-After` asks for (a date measured from the answer's `Date`,
    /// else from the local wall time `wall`).
    pub(crate) fn retry_after_delay(&self, wall: std::time::SystemTime) -> Option<Duration> {
        self.retry_after.map(|r| r.delay_from(self.date, wall))
    }
}

/// Whether the body of an answer must be read to classify it: a problem+json `409`, `410` or
/// `502` that is not a replay and not too large.
pub(crate) fn needs_problem_body(status: StatusCode, headers: &HeaderMap) -> bool {
    if !matches!(status.as_u16(), 409 | 410 | 502) {
        return false;
    }
    if headers.contains_key(&IDEMPOTENT_REPLAYED) {
        return false;
    }
    let problem = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/problem+json"))
        });
    let small = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_none_or(|n| n <= PROBLEM_BODY_LIMIT);
    problem && small
}

/// The verdict on one answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Done: the answer is final (`replayed`: it is a replay).
    Final { success: bool, replayed: bool },
    /// idemgate's outcome-unknown (`unprotected: false`), or its upstream-failed for a
    /// non-idempotent method (`unprotected: true`): never retried, surfaces as an error.
    OutcomeUnknown { unprotected: bool },
    /// Still in flight: wait `retry_after` (or the base delay) and ask again.
    InFlight,
    /// A transient answer: retry (after `Retry-After` if given).
    Retry,
}

/// The verdict on `facts`; `idempotent_method`: the request's method is idempotent (RFC 9110).
pub(crate) fn verdict(
    facts: &Facts,
    retry_statuses: &[StatusCode],
    idempotent_method: bool,
) -> Verdict {
    let s = facts.status;
    if facts.replayed {
        return Verdict::Final {
            success: true,
            replayed: true,
        };
    }
    if s.is_informational() || s.is_success() || s.is_redirection() {
        return Verdict::Final {
            success: true,
            replayed: false,
        };
    }
    let problem = facts.problem.as_deref();
    if s == StatusCode::CONFLICT {
        if problem == Some(PROBLEM_IN_FLIGHT) || facts.retry_after.is_some() {
            return Verdict::InFlight;
        }
        return Verdict::Final {
            success: false,
            replayed: false,
        };
    }
    if s == StatusCode::BAD_GATEWAY && problem == Some(PROBLEM_OUTCOME_UNKNOWN) {
        return Verdict::OutcomeUnknown { unprotected: false };
    }
    // Forwarded unprotected, sent, no complete answer: the effect may have happened, and a
    // resend under the same key is not deduplicated.
    if s == StatusCode::BAD_GATEWAY
        && problem == Some(PROBLEM_UPSTREAM_FAILED)
        && !idempotent_method
    {
        return Verdict::OutcomeUnknown { unprotected: true };
    }
    if retry_statuses.contains(&s) {
        return Verdict::Retry;
    }
    Verdict::Final {
        success: false,
        replayed: false,
    }
}

/// Whether a status counts against the breaker (a transient server failure).
pub(crate) fn breaker_failure(status: StatusCode) -> bool {
    matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// Whether a status is the server pacing the client (not counted by the breaker).
pub(crate) fn pacing(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 409 | 425 | 429)
}

/// The default retry set.
pub(crate) const DEFAULT_RETRY_STATUSES: [u16; 7] = [408, 425, 429, 500, 502, 503, 504];

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn facts(status: u16, headers: &[(&'static str, &'static str)], body: Option<&str>) -> Facts {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_static(v));
        }
        Facts::new(
            StatusCode::from_u16(status).expect("status"),
            &h,
            body.map(str::as_bytes),
        )
    }

    fn set() -> Vec<StatusCode> {
        DEFAULT_RETRY_STATUSES
            .iter()
            .filter_map(|s| StatusCode::from_u16(*s).ok())
            .collect()
    }

    /// The verdict for a POST.
    fn v(f: &Facts) -> Verdict {
        verdict(f, &set(), false)
    }

    const FINAL_OK: Verdict = Verdict::Final {
        success: true,
        replayed: false,
    };
    const FINAL_ERR: Verdict = Verdict::Final {
        success: false,
        replayed: false,
    };

    #[test]
    fn the_table() {
        for s in [200, 201, 204, 301] {
            assert_eq!(v(&facts(s, &[], None)), FINAL_OK, "{s}");
        }
        for s in [408, 425, 429, 500, 502, 503, 504] {
            assert_eq!(v(&facts(s, &[], None)), Verdict::Retry, "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 413, 422, 501, 505] {
            assert_eq!(v(&facts(s, &[], None)), FINAL_ERR, "{s}");
        }
        let replay = facts(500, &[("idempotent-replayed", "true")], None);
        assert_eq!(
            v(&replay),
            Verdict::Final {
                success: true,
                replayed: true
            }
        );
        let in_flight = facts(
            409,
            &[],
            Some(r#"{"type":"urn:idemgate:problem:request-in-flight"}"#),
        );
        assert_eq!(v(&in_flight), Verdict::InFlight);
        assert_eq!(
            v(&facts(409, &[("retry-after", "3")], None)),
            Verdict::InFlight
        );
        let mismatch = facts(409, &[], Some(r#"{"type":"urn:example:conflict"}"#));
        assert_eq!(v(&mismatch), FINAL_ERR);
        let unknown = facts(
            502,
            &[],
            Some(r#"{"type":"urn:idemgate:problem:outcome-unknown"}"#),
        );
        assert_eq!(v(&unknown), Verdict::OutcomeUnknown { unprotected: false });
        assert_eq!(
            verdict(&unknown, &set(), true),
            Verdict::OutcomeUnknown { unprotected: false }
        );
        let failed = facts(
            502,
            &[],
            Some(r#"{"type":"urn:idemgate:problem:upstream-failed","cause":"reset"}"#),
        );
        assert_eq!(v(&failed), Verdict::OutcomeUnknown { unprotected: true });
        // An idempotent method (a PUT, a GET) may be resent: the resend is as safe as the first.
        assert_eq!(verdict(&failed, &set(), true), Verdict::Retry);
        let unavailable = facts(
            502,
            &[],
            Some(r#"{"type":"urn:idemgate:problem:upstream-unavailable"}"#),
        );
        assert_eq!(v(&unavailable), Verdict::Retry);
        let gone = facts(
            410,
            &[],
            Some(r#"{"type":"urn:idemgate:problem:not-replayable"}"#),
        );
        assert_eq!(v(&gone), FINAL_ERR);
        assert_eq!(v(&facts(502, &[], Some("<html>not json"))), Verdict::Retry);
    }

    #[test]
    fn problem_bodies_are_read_only_when_needed() {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            HeaderValue::from_static("application/problem+json; charset=utf-8"),
        );
        assert!(needs_problem_body(StatusCode::BAD_GATEWAY, &h));
        assert!(needs_problem_body(StatusCode::CONFLICT, &h));
        assert!(!needs_problem_body(StatusCode::SERVICE_UNAVAILABLE, &h));
        assert!(!needs_problem_body(StatusCode::CREATED, &h));
        h.insert("content-length", HeaderValue::from_static("70000"));
        assert!(!needs_problem_body(StatusCode::BAD_GATEWAY, &h));
        let mut j = HeaderMap::new();
        j.insert("content-type", HeaderValue::from_static("application/json"));
        assert!(!needs_problem_body(StatusCode::BAD_GATEWAY, &j));
        j.insert(
            "content-type",
            HeaderValue::from_static("application/problem+json"),
        );
        j.insert("idempotent-replayed", HeaderValue::from_static("true"));
        assert!(!needs_problem_body(StatusCode::BAD_GATEWAY, &j));
    }

    #[test]
    fn io_errors_in_the_chain() {
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        use std::io::{Error, ErrorKind};
        let of = |k: ErrorKind| TransportFailure::of_error(&Wrap(Error::from(k)));
        assert_eq!(of(ErrorKind::ConnectionRefused), TransportFailure::NotSent);
        assert_eq!(of(ErrorKind::TimedOut), TransportFailure::Timeout);
        assert_eq!(
            of(ErrorKind::ConnectionReset),
            TransportFailure::Interrupted
        );
        assert_eq!(of(ErrorKind::UnexpectedEof), TransportFailure::Interrupted);
        assert_eq!(
            TransportFailure::of_error(&std::fmt::Error),
            TransportFailure::Interrupted
        );
    }
}
