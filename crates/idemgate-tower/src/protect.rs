//! A protected request: read its body (within the limits), derive the scoped key and the
//! fingerprint, run the upstream call through the engine, and answer with [`respond`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response};
use http_body::Body;
use idemgate_core::engine::{Disposition, EngineError, Execution};
use idemgate_core::record::{Outcome, RecordState, StoredResponse};
use idemgate_core::{IdempotencyKey, Scope, ScopedKey, Store, StoreKey};
use tower_service::Service;

use crate::body::{
    BoxError, Budgeted, Collected, IdemBody, Prefixed, boxed, collect_budgeted, collect_limited,
    drain, full,
};
use crate::headers::{IDEMPOTENCY_EPOCH, storable};
use crate::layer::Shared;
use crate::metrics::{Signals, limit_rejection};
use crate::observe::Observation;
use crate::policy::{FailMode, RoutePolicy};
use crate::problem::ProblemKind;
use crate::respond::{Answer, Responded, respond};
use crate::service::{record_outcome, too_large};
use crate::upstream::{Cause, UpstreamError};

/// What the dispatched operation hands back to the engine.
pub(crate) type UpstreamResult = Result<UpstreamResponse, UpstreamError>;

/// A response from the inner service, read into memory when it fits.
pub(crate) struct UpstreamResponse {
    pub(crate) parts: http::response::Parts,
    pub(crate) body: UpstreamBody,
}

pub(crate) enum UpstreamBody {
    Buffered(Bytes),
    /// Over the response limit: passed through once, not stored.
    Streaming(IdemBody),
}

fn classifier(route: Arc<RoutePolicy>) -> impl Fn(&UpstreamResult) -> Disposition + Send + 'static {
    move |result| match result {
        Err(e) if e.is_not_sent() => Disposition::Release,
        Err(_) => Disposition::Unknown,
        Ok(r) if route.transient_statuses.contains(&r.parts.status.as_u16()) => {
            Disposition::Release
        }
        Ok(r) => match &r.body {
            UpstreamBody::Buffered(body) => Disposition::Store(Outcome::Response(StoredResponse {
                status: r.parts.status.as_u16(),
                headers: storable(
                    &r.parts.headers,
                    route.allow_response_headers.as_deref(),
                    &route.deny_response_headers,
                ),
                body: body.clone(),
            })),
            UpstreamBody::Streaming(_) => Disposition::Store(Outcome::NotReplayable {
                status: r.parts.status.as_u16(),
                reason: format!(
                    "response body over the {}-byte limit",
                    route.max_response_body
                ),
            }),
        },
    }
}

/// Sends `req` to the inner service and reads its response (within `limit` and `timeout`).
/// The time to the response head (or the failure, or the timeout if no head came) is recorded
/// in `upstream`.
async fn forward<I, ResB>(
    mut inner: I,
    req: Request<IdemBody>,
    limit: usize,
    timeout: Option<Duration>,
    upstream: metrics::Histogram,
) -> UpstreamResult
where
    I: Service<Request<IdemBody>, Response = Response<ResB>> + Send + 'static,
    I::Future: Send + 'static,
    I::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let sent = Instant::now();
    let head_timed = AtomicBool::new(false);
    let exchange = async {
        let res = inner.call(req).await;
        head_timed.store(true, Ordering::Relaxed);
        upstream.record(sent.elapsed().as_secs_f64());
        let res = res.map_err(|e| UpstreamError::classify(e.into()))?;
        let (parts, body) = res.into_parts();
        match collect_limited(boxed(body), limit).await {
            Ok(Collected::Complete(bytes)) => Ok(UpstreamResponse {
                parts,
                body: UpstreamBody::Buffered(bytes),
            }),
            Ok(Collected::Oversized { prefix, rest }) => Ok(UpstreamResponse {
                parts,
                body: UpstreamBody::Streaming(boxed(Prefixed::new(prefix, rest))),
            }),
            // The answer started but broke off: the upstream may have acted.
            Err(e) => Err(UpstreamError::Sent(e)),
        }
    };
    match timeout {
        None => exchange.await,
        Some(t) => match tokio::time::timeout(t, exchange).await {
            Ok(r) => r,
            Err(_) => Err({
                if !head_timed.load(Ordering::Relaxed) {
                    upstream.record(sent.elapsed().as_secs_f64());
                }
                UpstreamError::sent(Cause::Timeout, format!("no complete response within {t:?}"))
            }),
        },
    }
}

pub(crate) async fn protect<I, S, ReqB, ResB>(
    shared: Arc<Shared<S>>,
    route: Arc<RoutePolicy>,
    inner: I,
    req: Request<ReqB>,
    key: IdempotencyKey,
    started: Instant,
) -> Result<Response<IdemBody>, BoxError>
where
    I: Service<Request<IdemBody>, Response = Response<ResB>> + Clone + Send + 'static,
    I::Error: Into<BoxError>,
    I::Future: Send + 'static,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    S: Store,
{
    let signals = &shared.signals;
    // Copied only for an observer (zero cost unset): the key moves into the scoped key below.
    let seen = shared
        .observer
        .as_ref()
        .map(|_| (req.method().clone(), key.as_str().to_owned()));
    let observe = |answer: Answer, res: &Response<IdemBody>, store_key: Option<&StoreKey>| {
        if let (Some(observer), Some((method, key))) = (&shared.observer, &seen) {
            observer.observe(&Observation {
                route: &route.name,
                method,
                key,
                store_key,
                answer,
                status: res.status().as_u16(),
                elapsed: started.elapsed(),
            });
        }
    };
    let finish_keyed = |answer: Answer, res: Response<IdemBody>, store_key: Option<&StoreKey>| {
        observe(answer, &res, store_key);
        signals.count(Some(&route.name), answer);
        signals.took(Some(&route.name), answer, started.elapsed());
        if let Some(span) = request_span() {
            record_outcome(&span, answer);
        }
        tracing::debug!(status = res.status().as_u16(), "answered");
        Ok(res)
    };
    let finish = |answer: Answer, res: Response<IdemBody>| finish_keyed(answer, res, None);
    let (parts, body) = req.into_parts();
    // The reservation accounts for the body's memory for as long as a copy of the request may be
    // sent: this function holds it until it returns, the upstream call a clone (`held` below).
    let (body, reservation) = match &shared.limits.body_budget {
        None => match collect_limited(boxed(body), route.max_request_body)
            .await
            .map_err(BodyFailed)?
        {
            Collected::Complete(b) => (b, None),
            Collected::Oversized { rest, .. } => {
                drain(rest).await;
                return finish(Answer::TooLarge, too_large(route.max_request_body));
            }
        },
        Some(budget) => {
            match collect_budgeted(boxed(body), route.max_request_body, budget)
                .await
                .map_err(BodyFailed)?
            {
                Budgeted::Complete(b, r) => (b, Some(r)),
                Budgeted::Oversized(rest) => {
                    drain(rest).await;
                    return finish(Answer::TooLarge, too_large(route.max_request_body));
                }
                Budgeted::OverBudget(rest) => {
                    drain(rest).await;
                    limit_rejection("max_buffered_body_bytes");
                    return finish(
                        Answer::Overloaded,
                        ProblemKind::overloaded(
                            "max_buffered_body_bytes",
                            "too many request body bytes are buffered right now; nothing was \
                             forwarded, retry later",
                        ),
                    );
                }
            }
        }
    };
    let reservation = Arc::new(reservation);
    // A slot among the protected requests in progress, now that the body is here.
    let permit = match &shared.limits.concurrent {
        None => None,
        Some(slots) => match slots.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                limit_rejection("max_concurrent_requests");
                return finish(
                    Answer::Overloaded,
                    ProblemKind::overloaded(
                        "max_concurrent_requests",
                        "too many protected requests in progress; nothing was forwarded, retry \
                         later",
                    ),
                );
            }
        },
    };
    let credentials: Vec<&[u8]> = route
        .scope_headers
        .iter()
        .map(|h| parts.headers.get(h).map_or(&b""[..], |v| v.as_bytes()))
        .collect();
    if !route.scope_headers.is_empty() && credentials.iter().all(|c| c.is_empty()) {
        unscoped(&route, signals);
    }
    let scoped = ScopedKey::new(
        shared.namespace.clone(),
        Scope::for_principal(&route.name, &credentials),
        key,
    );
    let fingerprint = {
        let mut b = route
            .fingerprint
            .builder()
            .method(parts.method.as_str())
            .path(parts.uri.path())
            .query(parts.uri.query().unwrap_or(""));
        for name in &route.fingerprint_headers {
            for value in parts.headers.get_all(name) {
                b = b.header(name, value.as_bytes());
            }
        }
        b.body(&body).finish()
    };
    // A fail-open route keeps a copy of the request for forwarding it unprotected when the
    // store fails; the upstream call owns the original (no copy of the head on the usual path).
    // `reservation` itself stays here until this function returns, so the body stays accounted
    // for through a fallback's send too.
    let fallback = (route.fail_mode == FailMode::Open)
        .then(|| (inner.clone(), request_with(parts.clone(), body.clone())));
    let held = (permit, reservation.clone());
    let request_for = request_with(parts, body);
    let (limit, timeout) = (route.max_response_body, shared.response_timeout);
    let upstream_timer = signals.upstream(Some(&route.name));
    let result = shared
        .engine
        .run(
            &scoped,
            fingerprint,
            &route.engine,
            classifier(route.clone()),
            {
                // The slot among protected requests and the body's byte reservation go with the
                // upstream call, which runs on in its own task when the client goes away: the
                // limits count what is really in memory and in flight.
                move |dispatch| {
                    let req = request_for(dispatch.epoch);
                    async move {
                        let _held = held;
                        // Paused between claim and dispatch past the lease: do not send.
                        if tokio::time::Instant::now() >= dispatch.start_by {
                            return Err(UpstreamError::not_sent(
                                Cause::LeaseLapsed,
                                "the lease may have lapsed before the request was sent",
                            ));
                        }
                        forward(inner, req, limit, timeout, upstream_timer).await
                    }
                }
            },
        )
        .await;
    if let Ok(Execution::Unknown { record }) = &result
        && let RecordState::Unknown { epoch, .. } = record.state
    {
        // Not a warning: the record's owner warned when it was marked; this names the client
        // that is told about it, for the operator answering that client.
        let store_key = scoped.store_key();
        tracing::info!(route = %route.name, key = %scoped.key().for_log(), store_key = %store_key,
            epoch, hint = %shared.engine.resolve_hint(&store_key),
            "answered 502 outcome-unknown: an earlier request with this key may or may not have \
             taken effect");
    }
    let store_key = seen.as_ref().map(|_| scoped.store_key());
    match respond(record_epoch(result), &route, &scoped) {
        Responded::Answer(answer, response) => finish_keyed(answer, response, store_key.as_ref()),
        Responded::ForwardUnprotected => {
            let (mut inner, request_for) = fallback.ok_or("fail-open answer without a fallback")?;
            futures_util::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let sent = Instant::now();
            let res = inner.call(request_for(0)).await;
            signals
                .upstream(Some(&route.name))
                .record(sent.elapsed().as_secs_f64());
            finish_keyed(
                Answer::StoreError,
                res.map_err(Into::into)?.map(boxed),
                store_key.as_ref(),
            )
        }
    }
}

/// The request to send upstream for a dispatch at `epoch` (the epoch in its
/// `Idempotency-Epoch` header), built from the request's head and body. The body's byte
/// reservation is held by the caller across the send (the engine's operation in `held`, the
/// fail-open fallback in `protect`'s own frame).
fn request_with(
    parts: http::request::Parts,
    body: Bytes,
) -> impl FnOnce(u64) -> Request<IdemBody> + Send + 'static {
    move |epoch: u64| {
        let mut req = Request::from_parts(parts, full(body));
        req.headers_mut()
            .insert(IDEMPOTENCY_EPOCH, HeaderValue::from(epoch));
        req
    }
}

/// The request's span (entered by the response future while it polls this one), when spans may
/// be on. Looked up where it is needed rather than held: this future is boxed per request, and
/// a larger box costs more than the lookup.
fn request_span() -> Option<tracing::Span> {
    if !tracing::level_enabled!(tracing::Level::DEBUG) {
        return None;
    }
    Some(tracing::Span::current()).filter(|s| !s.is_disabled())
}

/// Records the epoch of the engine's answer in the request's span (when spans may be on), and
/// hands the answer back. (A function of its own: borrowed in `protect`, the answer would be kept
/// in its future across the fail-open awaits.)
fn record_epoch<T>(result: Result<Execution<T>, EngineError>) -> Result<Execution<T>, EngineError> {
    if let Some(span) = request_span()
        && let Some(epoch) = epoch_of(&result)
    {
        span.record("idemgate.epoch", epoch);
    }
    result
}

/// The epoch the engine's answer is about: the one this request ran under, or the stored
/// record's (replays, mismatches, outcome-unknown answers); `None` when there is no record.
fn epoch_of<T>(result: &Result<Execution<T>, EngineError>) -> Option<u64> {
    let record = match result {
        Ok(Execution::Executed { epoch, .. }) => return Some(*epoch),
        Ok(
            Execution::Replayed { record, .. }
            | Execution::Mismatch { record }
            | Execution::Unknown { record },
        ) => record,
        Ok(Execution::InFlight { .. }) | Err(_) => return None,
    };
    Some(match &record.state {
        RecordState::InFlight { fencing, .. } => fencing.epoch,
        RecordState::Completed { epoch, .. } | RecordState::Unknown { epoch, .. } => *epoch,
        _ => return None,
    })
}

/// A protected request that carries none of its route's scope headers: it shares one anonymous
/// scope with every other such request (a key reused by two such callers replays one's answer to
/// the other). Counted in `idemgate_unscoped_requests_total{route}`, and warned about once per
/// process: an API that authenticates by another header should list it in `scope_headers`.
fn unscoped(route: &RoutePolicy, signals: &Signals) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    signals.unscoped(&route.name);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(route = %route.name, scope_headers = ?route.scope_headers,
            "a protected request carries none of the scope headers: such requests share one \
             scope (list the header your API authenticates by in scope_headers)");
    }
}

/// A failure reading the client's request body (whatever its body type), told apart from
/// inner-service errors when the layer answers it ([`crate::problem::answer_error`]).
#[derive(Debug)]
pub(crate) struct BodyFailed(pub(crate) BoxError);

impl std::fmt::Display for BodyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.0.as_ref())
    }
}
