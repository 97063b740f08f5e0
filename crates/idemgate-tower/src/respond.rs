//! The answer to a protected request, from what the engine returned: a pure function of the
//! [`Execution`] (or engine error) and the route, so every row of PRODUCT §3 can be checked by a
//! unit test without a store, a socket or a runtime.

use http::Response;
use http::header::{HeaderValue, RETRY_AFTER};
use idemgate_core::engine::{EngineError, Execution, Recorded, Recovery};
use idemgate_core::record::Outcome;
use idemgate_core::{ErrorKind, ScopedKey};

use crate::body::{IdemBody, full};
use crate::headers::replay;
use crate::policy::{FailMode, RoutePolicy};
use crate::problem::ProblemKind;
use crate::protect::{UpstreamBody, UpstreamResponse, UpstreamResult};

/// `Retry-After` (seconds) on `503` answers about the store.
const STORE_RETRY_AFTER: &str = "1";

/// What became of a request, as counted in `idemgate_requests_total{outcome}` and recorded in
/// the request's span. An enum, so a mistyped label cannot compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Answer {
    /// This request ran upstream (or provably did not reach it: `502` upstream-unavailable).
    Executed,
    /// A stored outcome was replayed (or a not-replayable tombstone answered `410`).
    Replayed,
    /// `409`: the first request with the key is still running.
    Conflict,
    /// `422`: the key was used with another request.
    Mismatch,
    /// `400`: a required key was missing.
    MissingKey,
    /// `400`: the key was malformed (or sent twice).
    InvalidKey,
    /// `413`.
    TooLarge,
    /// `503`: a limit of this instance was reached.
    Overloaded,
    /// `503` store-unavailable (fail closed), or forwarded unprotected (fail open).
    StoreError,
    /// `503` store-full.
    StoreFull,
    /// `502` outcome-unknown.
    Unknown,
    /// Not covered, or no key where none is required: forwarded untouched.
    Passthrough,
}

impl Answer {
    /// Every answer, in declaration order (`Answer::ALL[a as usize] == a`).
    pub const ALL: [Answer; 12] = [
        Answer::Executed,
        Answer::Replayed,
        Answer::Conflict,
        Answer::Mismatch,
        Answer::MissingKey,
        Answer::InvalidKey,
        Answer::TooLarge,
        Answer::Overloaded,
        Answer::StoreError,
        Answer::StoreFull,
        Answer::Unknown,
        Answer::Passthrough,
    ];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Answer::Executed => "executed",
            Answer::Replayed => "replayed",
            Answer::Conflict => "conflict",
            Answer::Mismatch => "mismatch",
            Answer::MissingKey => "missing_key",
            Answer::InvalidKey => "invalid_key",
            Answer::TooLarge => "too_large",
            Answer::Overloaded => "overloaded",
            Answer::StoreError => "store_error",
            Answer::StoreFull => "store_full",
            Answer::Unknown => "unknown",
            Answer::Passthrough => "passthrough",
        }
    }
}

/// What to do with a protected request once the engine has spoken.
#[derive(Debug)]
pub(crate) enum Responded {
    /// Answer with this.
    Answer(Answer, Response<IdemBody>),
    /// The store could not answer and the route fails open: forward without protection.
    ForwardUnprotected,
}

/// `res` with a `Retry-After` header.
fn with_retry_after(mut res: Response<IdemBody>, value: HeaderValue) -> Response<IdemBody> {
    res.headers_mut().insert(RETRY_AFTER, value);
    res
}

/// Maps the engine's result to the answer (PRODUCT §3). `key` only names the request in logs.
pub(crate) fn respond(
    result: Result<Execution<UpstreamResult>, EngineError>,
    route: &RoutePolicy,
    key: &ScopedKey,
) -> Responded {
    let answer = |a, res| Responded::Answer(a, res);
    match result {
        // Takeover recovery, an outcome to keep, and the store has not confirmed it (still being
        // written, or the key was taken over meanwhile): the answer is not the key's outcome
        // yet, and a second run may follow it. The client is told to retry; its retry waits for
        // the record and replays it (or gets the run that took the key over).
        Ok(Execution::Executed {
            value: Ok(ref r),
            recorded: Recorded::Failed(_) | Recorded::LeaseLost,
            ..
        }) if route.engine.recovery == Recovery::Takeover
            && !route.transient_statuses.contains(&r.parts.status.as_u16()) =>
        {
            tracing::warn!(route = %route.name, key = %key.key().for_log(), store_key = %key.store_key(),
                "the outcome is not recorded yet (or the key was taken over): answering 409 \
                 instead of an answer no retry would see");
            let res = ProblemKind::InFlight.response(
                "the request ran, but its outcome is not recorded yet; retry with the same \
                 Idempotency-Key to get it",
            );
            answer(
                Answer::Conflict,
                with_retry_after(res, HeaderValue::from_static(STORE_RETRY_AFTER)),
            )
        }
        Ok(Execution::Executed { value, .. }) => match value {
            Ok(UpstreamResponse { parts, body }) => {
                let body = match body {
                    UpstreamBody::Buffered(b) => full(b),
                    UpstreamBody::Streaming(s) => s,
                };
                answer(Answer::Executed, Response::from_parts(parts, body))
            }
            Err(e) => answer(
                if e.is_not_sent() {
                    Answer::Executed
                } else {
                    Answer::Unknown
                },
                ProblemKind::upstream(&e, ProblemKind::OutcomeUnknown),
            ),
        },
        Ok(Execution::Replayed { outcome, .. }) => match outcome {
            Outcome::Response(stored) => answer(Answer::Replayed, replay(&stored)),
            Outcome::NotReplayable { status, reason } => {
                let mut extra = serde_json::Map::new();
                extra.insert("original_status".into(), status.into());
                answer(
                    Answer::Replayed,
                    ProblemKind::NotReplayable.response_with(
                        format!(
                            "the original request completed with status {status}, but {reason}"
                        ),
                        extra,
                    ),
                )
            }
            other => answer(
                Answer::Replayed,
                ProblemKind::NotReplayable.response(format!("unsupported outcome {other:?}")),
            ),
        },
        Ok(Execution::Mismatch { .. }) => answer(
            Answer::Mismatch,
            ProblemKind::Mismatch.response(
                "this Idempotency-Key was already used with a different request (method, path, \
                 query, fingerprinted headers or body)",
            ),
        ),
        Ok(Execution::InFlight { retry_after }) => {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            let res = ProblemKind::InFlight.response(
                "a request with this Idempotency-Key is still being processed; retry later",
            );
            answer(
                Answer::Conflict,
                with_retry_after(res, HeaderValue::from(secs.max(1))),
            )
        }
        Ok(Execution::Unknown { .. }) | Err(EngineError::OperationPanicked) => answer(
            Answer::Unknown,
            ProblemKind::OutcomeUnknown.response(
                "an earlier request with this Idempotency-Key may or may not have taken effect; \
                 it is not retried automatically (an operator can resolve it)",
            ),
        ),
        // Fail open only when the store could not answer (down, slow): a corrupt record or a
        // full store answered, and forwarding past it could run a request twice.
        Err(e) if e.kind() == ErrorKind::Capacity => {
            tracing::warn!(route = %route.name, key = %key.key().for_log(), store_key = %key.store_key(), error = %e,
                "store full; refusing new keys");
            let res = ProblemKind::StoreFull.response(
                "the idempotency store has no room for a new key right now; nothing was \
                 forwarded, retry later",
            );
            answer(
                Answer::StoreFull,
                with_retry_after(res, HeaderValue::from_static(STORE_RETRY_AFTER)),
            )
        }
        // Only an error of the first claim (the store said nothing about the key): after it had
        // said the key is in use, forwarding could run the request beside its holder.
        Err(EngineError::Store(e))
            if route.fail_mode == FailMode::Open
                && matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout) =>
        {
            tracing::warn!(route = %route.name, key = %key.key().for_log(), store_key = %key.store_key(), error = %e,
                "store unavailable; forwarding without protection (fail open)");
            Responded::ForwardUnprotected
        }
        Err(e) => {
            tracing::warn!(route = %route.name, key = %key.key().for_log(), store_key = %key.store_key(), error = %e,
                "store unavailable; refusing (fail closed)");
            // The error's text (hosts, paths) stays in the log, not in the answer.
            let res = ProblemKind::StoreUnavailable.response(format!(
                "the idempotency store could not be used ({}); nothing was forwarded, retry later",
                e.kind().as_str()
            ));
            answer(
                Answer::StoreError,
                with_retry_after(res, HeaderValue::from_static(STORE_RETRY_AFTER)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use idemgate_core::record::{Record, RecordState, StoredResponse};
    use idemgate_core::{IdempotencyKey, Scope, StoreError, Timestamp};

    use super::*;
    use crate::upstream::Cause;
    use crate::upstream::UpstreamError;

    fn key() -> ScopedKey {
        ScopedKey::new("t", Scope::new("s"), IdempotencyKey::parse("k").unwrap())
    }

    fn record() -> Box<Record> {
        Box::new(Record {
            namespace: "t".into(),
            scope: "s".into(),
            idempotency_key: "k".into(),
            fingerprint: idemgate_core::Fingerprint::from_parts(
                idemgate_core::fingerprint::Algorithm::Blake3,
                [0; 32],
            ),
            created_at: Timestamp(0),
            expires_at: Timestamp(1),
            state: RecordState::Unknown {
                epoch: 1,
                since: Timestamp(0),
            },
        })
    }

    fn status_of(r: Responded) -> (Answer, u16, Option<String>) {
        match r {
            Responded::Answer(a, res) => (
                a,
                res.status().as_u16(),
                res.headers()
                    .get(RETRY_AFTER)
                    .map(|v| v.to_str().unwrap().to_owned()),
            ),
            Responded::ForwardUnprotected => panic!("forwarded"),
        }
    }

    #[test]
    fn answers_are_listed_in_declaration_order_with_distinct_labels() {
        // A new variant must be listed in ALL: this match stops compiling without it.
        let position = |a: Answer| match a {
            Answer::Executed => 0,
            Answer::Replayed => 1,
            Answer::Conflict => 2,
            Answer::Mismatch => 3,
            Answer::MissingKey => 4,
            Answer::InvalidKey => 5,
            Answer::TooLarge => 6,
            Answer::Overloaded => 7,
            Answer::StoreError => 8,
            Answer::StoreFull => 9,
            Answer::Unknown => 10,
            Answer::Passthrough => 11,
        };
        for (i, a) in Answer::ALL.iter().enumerate() {
            assert_eq!((*a as usize, position(*a)), (i, i), "{a:?}");
        }
        let labels: std::collections::BTreeSet<_> =
            Answer::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(labels.len(), Answer::ALL.len());
    }

    #[test]
    fn every_execution_maps_to_its_answer() {
        let route = RoutePolicy::new("r", "/**");
        let replay = Execution::Replayed {
            outcome: Outcome::Response(StoredResponse::new(201, vec![], "x")),
            record: record(),
        };
        assert_eq!(
            status_of(respond(Ok(replay), &route, &key())),
            (Answer::Replayed, 201, None)
        );
        let gone = Execution::Replayed {
            outcome: Outcome::NotReplayable {
                status: 200,
                reason: "too big".into(),
            },
            record: record(),
        };
        assert_eq!(status_of(respond(Ok(gone), &route, &key())).1, 410);
        let busy = Execution::InFlight {
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(
            status_of(respond(Ok(busy), &route, &key())),
            (Answer::Conflict, 409, Some("2".into()))
        );
        let mismatch = Execution::Mismatch { record: record() };
        assert_eq!(status_of(respond(Ok(mismatch), &route, &key())).1, 422);
        let unknown = Execution::Unknown { record: record() };
        assert_eq!(
            status_of(respond(Ok(unknown), &route, &key())),
            (Answer::Unknown, 502, None)
        );
        let not_sent = Execution::Executed {
            value: Err(UpstreamError::not_sent(Cause::ConnectionRefused, "refused")),
            epoch: 1,
            recorded: idemgate_core::engine::Recorded::Released,
        };
        assert_eq!(
            status_of(respond(Ok(not_sent), &route, &key())).0,
            Answer::Executed
        );
        let sent = Execution::Executed {
            value: Err(UpstreamError::sent(Cause::ConnectionReset, "reset")),
            epoch: 1,
            recorded: idemgate_core::engine::Recorded::MarkedUnknown,
        };
        assert_eq!(
            status_of(respond(Ok(sent), &route, &key())),
            (Answer::Unknown, 502, None)
        );
    }

    #[test]
    fn store_errors_fail_open_only_when_the_store_did_not_answer() {
        let closed = RoutePolicy::new("r", "/**");
        let open = RoutePolicy::new("r", "/**").fail_mode(FailMode::Open);
        let err = |kind| {
            Err(EngineError::Store(StoreError::new(
                kind,
                "secret host db-7:5432",
            )))
        };
        for kind in [ErrorKind::Unavailable, ErrorKind::Timeout] {
            assert!(matches!(
                respond(err(kind), &open, &key()),
                Responded::ForwardUnprotected
            ));
            let Responded::Answer(a, res) = respond(err(kind), &closed, &key()) else {
                panic!("fail closed forwards nothing")
            };
            assert_eq!((a, res.status().as_u16()), (Answer::StoreError, 503));
            assert_eq!(res.headers()[RETRY_AFTER], "1");
        }
        assert_eq!(
            status_of(respond(err(ErrorKind::Capacity), &open, &key())),
            (Answer::StoreFull, 503, Some("1".into()))
        );
        // After the key was found in use, a store error never fails open: a holder exists.
        let after = Err(EngineError::StoreAfterRead(StoreError::new(
            ErrorKind::Unavailable,
            "poll failed",
        )));
        assert_eq!(
            status_of(respond(after, &open, &key())),
            (Answer::StoreError, 503, Some("1".into()))
        );
        for kind in [ErrorKind::Corrupt, ErrorKind::Internal] {
            assert_eq!(
                status_of(respond(err(kind), &open, &key())).0,
                Answer::StoreError
            );
        }
    }
}
