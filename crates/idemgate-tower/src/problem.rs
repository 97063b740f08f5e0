//! RFC 9457 `application/problem+json` responses, one stable `type` URI per case.
//!
//! ```
//! use idemgate_tower::problem::ProblemKind;
//!
//! let res = ProblemKind::Mismatch.response("the key was used with another request");
//! assert_eq!(res.status(), 422);
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! ```

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

use crate::body::{IdemBody, RequestBodyError, box_full};
use crate::upstream::{Chain, UpstreamError};

/// The cases idemgate answers itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// `400`: the route requires an `Idempotency-Key` and none was sent.
    MissingKey,
    /// `400`: the key is empty, too long, or not visible ASCII.
    MalformedKey,
    /// `422`: the key was used with a different request.
    Mismatch,
    /// `409`: the first request with this key is still running.
    InFlight,
    /// `413`: the request body is over the limit.
    TooLarge,
    /// `503`: the store cannot be reached; nothing was forwarded.
    StoreUnavailable,
    /// `502`: the request may or may not have taken effect upstream; it is never retried
    /// automatically.
    OutcomeUnknown,
    /// `410`: the first request completed but its response was too large to keep.
    NotReplayable,
    /// `502`: the upstream could not be reached; nothing ran, a retry may.
    UpstreamUnavailable,
    /// `503`: the store has no room for a new key (a bounded in-memory store at its capacity);
    /// nothing was forwarded.
    StoreFull,
    /// `502`: an unprotected (passed-through) request may have reached the upstream, but no
    /// complete answer came back.
    UpstreamFailed,
    /// `503` (with `Retry-After`): a limit of this instance is reached (connections, concurrent
    /// requests, buffered body bytes); nothing was forwarded.
    Overloaded,
    /// `408`: the request body did not arrive within the body read timeout; nothing was forwarded
    /// for a protected request.
    RequestTimeout,
    /// `400`: the request body could not be read (malformed framing, or the client went away).
    InvalidRequestBody,
}

impl ProblemKind {
    /// The stable slug used in the `type` URI and in metrics.
    pub fn slug(self) -> &'static str {
        match self {
            ProblemKind::MissingKey => "missing-key",
            ProblemKind::MalformedKey => "malformed-key",
            ProblemKind::Mismatch => "fingerprint-mismatch",
            ProblemKind::InFlight => "request-in-flight",
            ProblemKind::TooLarge => "body-too-large",
            ProblemKind::StoreUnavailable => "store-unavailable",
            ProblemKind::OutcomeUnknown => "outcome-unknown",
            ProblemKind::NotReplayable => "not-replayable",
            ProblemKind::UpstreamUnavailable => "upstream-unavailable",
            ProblemKind::StoreFull => "store-full",
            ProblemKind::UpstreamFailed => "upstream-failed",
            ProblemKind::Overloaded => "overloaded",
            ProblemKind::RequestTimeout => "request-timeout",
            ProblemKind::InvalidRequestBody => "invalid-request-body",
        }
    }

    /// The `type` member: `urn:idemgate:problem:<slug>`.
    pub fn type_uri(self) -> String {
        format!("urn:idemgate:problem:{}", self.slug())
    }

    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ProblemKind::MissingKey
            | ProblemKind::MalformedKey
            | ProblemKind::InvalidRequestBody => StatusCode::BAD_REQUEST,
            ProblemKind::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::InFlight => StatusCode::CONFLICT,
            ProblemKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::StoreUnavailable | ProblemKind::StoreFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProblemKind::OutcomeUnknown
            | ProblemKind::UpstreamUnavailable
            | ProblemKind::UpstreamFailed => StatusCode::BAD_GATEWAY,
            ProblemKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ProblemKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ProblemKind::NotReplayable => StatusCode::GONE,
        }
    }

    /// The `title` member: the same for every occurrence.
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::MissingKey => "Idempotency-Key header is required",
            ProblemKind::MalformedKey => "Idempotency-Key header is malformed",
            ProblemKind::Mismatch => "Idempotency-Key was used with a different request",
            ProblemKind::InFlight => "A request with this Idempotency-Key is in progress",
            ProblemKind::TooLarge => "Request body is too large",
            ProblemKind::StoreUnavailable => "Idempotency store is unavailable",
            ProblemKind::OutcomeUnknown => "Outcome of the original request is unknown",
            ProblemKind::NotReplayable => "Original response cannot be replayed",
            ProblemKind::UpstreamUnavailable => "Upstream could not be reached",
            ProblemKind::StoreFull => "Idempotency store is full",
            ProblemKind::UpstreamFailed => "Upstream did not answer completely",
            ProblemKind::Overloaded => "Too many requests in progress; retry later",
            ProblemKind::RequestTimeout => "Request body did not arrive in time",
            ProblemKind::InvalidRequestBody => "Request body could not be read",
        }
    }

    /// A problem response with `detail`.
    pub fn response(self, detail: impl Into<String>) -> Response<IdemBody> {
        self.response_with(detail, serde_json::Map::new())
    }

    /// A `503` [`ProblemKind::Overloaded`] answer with `Retry-After: 1`, naming the limit that was
    /// reached in a `limit` member.
    pub fn overloaded(limit: &'static str, detail: impl Into<String>) -> Response<IdemBody> {
        let mut extra = serde_json::Map::new();
        extra.insert("limit".into(), limit.into());
        let mut res = ProblemKind::Overloaded.response_with(detail, extra);
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        res
    }

    /// The answer to a failed upstream exchange: `502` [`ProblemKind::UpstreamUnavailable`] when
    /// nothing was sent, else `sent_kind` (outcome-unknown for a protected request,
    /// upstream-failed for a passed-through one). The `detail` and the `cause` member name only the
    /// cause class: no addresses, no error chain.
    pub fn upstream(e: &UpstreamError, sent_kind: ProblemKind) -> Response<IdemBody> {
        let cause = e.cause();
        let mut extra = serde_json::Map::new();
        extra.insert("cause".into(), cause.slug().into());
        if e.is_not_sent() {
            ProblemKind::UpstreamUnavailable.response_with(
                format!(
                    "the upstream could not be reached ({cause}); the request was not sent, a \
                     retry may run"
                ),
                extra,
            )
        } else if sent_kind == ProblemKind::OutcomeUnknown {
            ProblemKind::OutcomeUnknown.response_with(
                format!(
                    "the upstream did not answer completely ({cause}); the request may or may \
                     not have taken effect"
                ),
                extra,
            )
        } else {
            sent_kind.response_with(
                format!(
                    "the upstream did not answer completely ({cause}); the request may have \
                     reached it"
                ),
                extra,
            )
        }
    }

    /// A problem response with `detail` and extension members.
    pub fn response_with(
        self,
        detail: impl Into<String>,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Response<IdemBody> {
        let mut doc = serde_json::Map::new();
        doc.insert("type".into(), self.type_uri().into());
        doc.insert("title".into(), self.title().into());
        doc.insert("status".into(), self.status().as_u16().into());
        doc.insert("detail".into(), detail.into().into());
        doc.extend(extra);
        let body = serde_json::Value::Object(doc).to_string();
        let mut res = Response::new(box_full(
            Full::new(Bytes::from(body)).map_err(|e| match e {}),
        ));
        *res.status_mut() = self.status();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        res
    }
}

/// The answer to an error that reached the layer: a failed request body (`408` after a
/// [`RequestBodyError::Timeout`], else `400`, with `Connection: close`), an
/// [`UpstreamError`] of a passed-through request (`502`, naming only its cause class), or any
/// other inner-service error (`502`, logged at WARN). `body_failed` says that the error came
/// from reading the client's request body (any body type's error).
pub(crate) fn answer_error(
    e: &(dyn std::error::Error + 'static),
    body_failed: bool,
) -> Response<IdemBody> {
    let mut next = Some(e);
    let mut timeout = None;
    let mut upstream = None;
    while let Some(err) = next {
        if let Some(RequestBodyError::Timeout(t)) = err.downcast_ref::<RequestBodyError>() {
            timeout = Some(*t);
            break;
        }
        if err.is::<RequestBodyError>() {
            return body_error(None, e);
        }
        if upstream.is_none() {
            upstream = err.downcast_ref::<UpstreamError>();
        }
        next = err.source();
    }
    if timeout.is_some() || body_failed {
        return body_error(timeout, e);
    }
    if let Some(u) = upstream {
        return ProblemKind::upstream(u, ProblemKind::UpstreamFailed);
    }
    tracing::warn!(error = %Chain(e), "request failed");
    ProblemKind::UpstreamFailed.response("the request failed")
}

fn body_error(
    timeout: Option<std::time::Duration>,
    e: &(dyn std::error::Error + 'static),
) -> Response<IdemBody> {
    let mut res = match timeout {
        Some(t) => {
            crate::metrics::limit_rejection("body_read_timeout");
            ProblemKind::RequestTimeout.response(format!(
                "the request body did not arrive within {t:?}; nothing was forwarded for a \
                 protected request"
            ))
        }
        None => {
            tracing::debug!(error = %Chain(e), "reading a request body failed");
            ProblemKind::InvalidRequestBody
                .response("the request body could not be read completely")
        }
    };
    // The rest of the body was not read: the connection cannot be reused.
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}
