//! [`IdempotencyLayer`] and the [`Idempotency`] service it produces.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HeaderValue, RETRY_AFTER};
use http::{Request, Response};
use http_body::Body;
use idemgate_core::engine::{Disposition, Engine, EngineError, Execution};
use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::{ErrorKind, IdempotencyKey, Scope, ScopedKey, Store};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::body::{
    BodyBudget, BoxError, Budgeted, Collected, IdemBody, Prefixed, boxed, collect_budgeted,
    collect_limited, drain, full,
};
use crate::headers::{IDEMPOTENCY_EPOCH, IDEMPOTENCY_KEY, replay, storable};
use crate::policy::{FailMode, RoutePolicy, Routes};
use crate::problem::ProblemKind;
use crate::upstream::{Cause, UpstreamError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `Retry-After` (seconds) on `503` answers about the store.
const STORE_RETRY_AFTER: &str = "1";

/// Adds Idempotency-Key semantics (PRODUCT §3) to an HTTP service. `Clone` and cheap to clone.
pub struct IdempotencyLayer<S> {
    shared: Arc<Shared<S>>,
}

struct Shared<S> {
    engine: Engine<S>,
    routes: Routes,
    namespace: String,
    response_timeout: Option<Duration>,
    limits: Limits,
}

/// The layer's resource limits (none by default).
#[derive(Clone, Debug, Default)]
struct Limits {
    /// Protected requests in progress at once.
    concurrent: Option<Arc<Semaphore>>,
    /// Bytes of protected request bodies held in memory at once.
    body_budget: Option<BodyBudget>,
}

impl<S> Clone for IdempotencyLayer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S> fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("namespace", &self.shared.namespace)
            .field("routes", &self.shared.routes)
            .finish_non_exhaustive()
    }
}

impl<S: Store> IdempotencyLayer<S> {
    /// A layer over `engine` with the routes to protect.
    pub fn new(engine: Engine<S>, routes: Routes) -> Self {
        Self::builder(engine).routes(routes).build()
    }

    /// A builder.
    pub fn builder(engine: Engine<S>) -> IdempotencyLayerBuilder<S> {
        IdempotencyLayerBuilder {
            engine,
            routes: Routes::catch_all(false),
            namespace: "default".into(),
            response_timeout: None,
            limits: Limits::default(),
        }
    }

    /// The engine (for stats and admin access).
    pub fn engine(&self) -> &Engine<S> {
        &self.shared.engine
    }
}

/// Builds an [`IdempotencyLayer`].
#[derive(Debug)]
pub struct IdempotencyLayerBuilder<S> {
    engine: Engine<S>,
    routes: Routes,
    namespace: String,
    response_timeout: Option<Duration>,
    limits: Limits,
}

impl<S: Store> IdempotencyLayerBuilder<S> {
    /// The protected routes (default: POST and PATCH everywhere, key optional).
    pub fn routes(mut self, routes: Routes) -> Self {
        self.routes = routes;
        self
    }

    /// The namespace of every record (default `default`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Longest time from dispatch to the end of the inner service's response body; past it the
    /// outcome is unknown (default: none).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = Some(timeout);
        self
    }

    /// Most protected requests in progress at once (across every clone of the layer); beyond it a
    /// protected request gets `503` + `Retry-After` at once (default: no limit).
    pub fn max_concurrent_requests(mut self, max: usize) -> Self {
        self.limits.concurrent = Some(Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))));
        self
    }

    /// Caps the bytes of protected request bodies held in memory at once: a request that cannot
    /// reserve its declared length (or, without one, its buffer's next growth) gets `503` +
    /// `Retry-After` and nothing is claimed (default: no cap).
    pub fn body_budget(mut self, budget: BodyBudget) -> Self {
        self.limits.body_budget = Some(budget);
        self
    }

    /// Builds the layer.
    pub fn build(self) -> IdempotencyLayer<S> {
        IdempotencyLayer {
            shared: Arc::new(Shared {
                engine: self.engine,
                routes: self.routes,
                namespace: self.namespace,
                response_timeout: self.response_timeout,
                limits: self.limits,
            }),
        }
    }
}

impl<S, I> Layer<I> for IdempotencyLayer<S> {
    type Service = Idempotency<I, S>;

    fn layer(&self, inner: I) -> Self::Service {
        Idempotency {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service: protects covered requests, passes the others through.
pub struct Idempotency<I, S> {
    inner: I,
    shared: Arc<Shared<S>>,
}

impl<I: Clone, S> Clone for Idempotency<I, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<I: fmt::Debug, S> fmt::Debug for Idempotency<I, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

fn count(outcome: &'static str, route: &str) {
    metrics::counter!("idemgate_requests_total", "outcome" => outcome, "route" => route.to_owned())
        .increment(1);
}

/// Counts a request or connection refused at a limit, by the name of the setting.
pub(crate) fn limit_rejection(reason: &'static str) {
    metrics::counter!("idemgate_limit_rejections_total", "reason" => reason).increment(1);
}

impl<I, S, ReqB, ResB> Service<Request<ReqB>> for Idempotency<I, S>
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
    type Response = Response<IdemBody>;
    type Error = BoxError;
    type Future = ResponseFuture<I::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        // The clone that was polled ready serves this request; the fresh clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        let Some(route) = shared
            .routes
            .find_shared(req.method(), req.uri().path())
            .cloned()
        else {
            count("passthrough", "");
            return ResponseFuture::pass(inner.call(req.map(boxed)));
        };
        let mut keys = req.headers().get_all(IDEMPOTENCY_KEY).iter();
        let (raw, extra) = (keys.next().cloned(), keys.next().is_some());
        let key = match raw {
            None if route.required => {
                count("missing_key", &route.name);
                let res = ProblemKind::MissingKey.response(format!(
                    "{} {} requires an Idempotency-Key header",
                    req.method(),
                    req.uri().path()
                ));
                return ResponseFuture::refuse(req, res);
            }
            None => {
                count("passthrough", &route.name);
                return ResponseFuture::pass(inner.call(req.map(boxed)));
            }
            Some(_) if extra => {
                count("invalid_key", &route.name);
                return ResponseFuture::refuse(
                    req,
                    ProblemKind::MalformedKey.response("more than one Idempotency-Key header"),
                );
            }
            Some(raw) => match IdempotencyKey::parse_bytes(raw.as_bytes()) {
                Ok(k) => k,
                Err(e) => {
                    count("invalid_key", &route.name);
                    return ResponseFuture::refuse(
                        req,
                        ProblemKind::MalformedKey.response(e.to_string()),
                    );
                }
            },
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > route.max_request_body as u64) {
            count("too_large", &route.name);
            return ResponseFuture::refuse(req, too_large(route.max_request_body));
        }
        let permit = match &shared.limits.concurrent {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    count("overloaded", &route.name);
                    limit_rejection("max_concurrent_requests");
                    return ResponseFuture::refuse(
                        req,
                        ProblemKind::overloaded(
                            "max_concurrent_requests",
                            "too many protected requests in progress; nothing was forwarded, retry later",
                        ),
                    );
                }
            },
        };
        // Debug level: at the default `info` the span is disabled and costs nothing per request
        // (formatting its fields was ~8% of a replay's CPU); warnings carry route and key.
        let span = tracing::debug_span!("idempotent_request",
            route = %route.name, method = %req.method(), path = %req.uri().path(),
            key = %key, outcome = tracing::field::Empty);
        let fut = protect(shared, route, inner, req, key, permit).instrument(span);
        ResponseFuture::protected(Box::pin(fut))
    }
}

fn too_large(limit: usize) -> Response<IdemBody> {
    ProblemKind::TooLarge.response(format!("the request body is larger than {limit} bytes"))
}

/// What the dispatched operation hands back to the engine.
type UpstreamResult = Result<UpstreamResponse, UpstreamError>;

/// A response from the inner service, read into memory when it fits.
struct UpstreamResponse {
    parts: http::response::Parts,
    body: UpstreamBody,
}

enum UpstreamBody {
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

async fn forward<I, ResB>(
    mut inner: I,
    req: Request<IdemBody>,
    limit: usize,
    timeout: Option<Duration>,
) -> UpstreamResult
where
    I: Service<Request<IdemBody>, Response = Response<ResB>> + Send + 'static,
    I::Future: Send + 'static,
    I::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let exchange = async {
        let res = inner
            .call(req)
            .await
            .map_err(|e| UpstreamError::classify(e.into()))?;
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
            Err(_) => Err(UpstreamError::sent(
                Cause::Timeout,
                format!("no complete response within {t:?}"),
            )),
        },
    }
}

async fn protect<I, S, ReqB, ResB>(
    shared: Arc<Shared<S>>,
    route: Arc<RoutePolicy>,
    inner: I,
    req: Request<ReqB>,
    key: IdempotencyKey,
    _permit: Option<OwnedSemaphorePermit>,
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
    let finish = |outcome: &'static str, res: Response<IdemBody>| {
        count(outcome, &route.name);
        tracing::Span::current().record("outcome", outcome);
        tracing::debug!(status = res.status().as_u16(), "answered");
        Ok(res)
    };
    let (parts, body) = req.into_parts();
    // The reservation accounts for the body's memory for as long as a copy of the request may be
    // sent (it moves into `request_for` below).
    let (body, reservation) = match &shared.limits.body_budget {
        None => match collect_limited(boxed(body), route.max_request_body).await? {
            Collected::Complete(b) => (b, None),
            Collected::Oversized { rest, .. } => {
                drain(rest).await;
                return finish("too_large", too_large(route.max_request_body));
            }
        },
        Some(budget) => {
            match collect_budgeted(boxed(body), route.max_request_body, budget).await? {
                Budgeted::Complete(b, r) => (b, Some(r)),
                Budgeted::Oversized(rest) => {
                    drain(rest).await;
                    return finish("too_large", too_large(route.max_request_body));
                }
                Budgeted::OverBudget(rest) => {
                    drain(rest).await;
                    limit_rejection("max_buffered_body_bytes");
                    return finish(
                        "overloaded",
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
    let credentials: Vec<&[u8]> = route
        .scope_headers
        .iter()
        .map(|h| parts.headers.get(h).map_or(&b""[..], |v| v.as_bytes()))
        .collect();
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
    let fallback = (route.fail_mode == FailMode::Open).then(|| inner.clone());
    let request_for = {
        let parts = parts.clone();
        let body = body.clone();
        move |epoch: u64| {
            let _accounted = &reservation;
            let mut req = Request::from_parts(parts, full(body));
            req.headers_mut()
                .insert(IDEMPOTENCY_EPOCH, HeaderValue::from(epoch));
            req
        }
    };
    let (limit, timeout) = (route.max_response_body, shared.response_timeout);
    let result = shared
        .engine
        .run(
            &scoped,
            fingerprint,
            &route.engine,
            classifier(route.clone()),
            {
                let request_for = request_for.clone();
                move |dispatch| forward(inner, request_for(dispatch.epoch), limit, timeout)
            },
        )
        .await;
    match result {
        Ok(Execution::Executed { value, .. }) => match value {
            Ok(UpstreamResponse { parts, body }) => {
                let body = match body {
                    UpstreamBody::Buffered(b) => full(b),
                    UpstreamBody::Streaming(s) => s,
                };
                finish("executed", Response::from_parts(parts, body))
            }
            Err(e) => finish(
                if e.is_not_sent() {
                    "executed"
                } else {
                    "unknown"
                },
                ProblemKind::upstream(&e, ProblemKind::OutcomeUnknown),
            ),
        },
        Ok(Execution::Replayed { outcome, .. }) => match outcome {
            Outcome::Response(stored) => finish("replayed", replay(&stored)),
            Outcome::NotReplayable { status, reason } => {
                let mut extra = serde_json::Map::new();
                extra.insert("original_status".into(), status.into());
                finish(
                    "replayed",
                    ProblemKind::NotReplayable.response_with(
                        format!(
                            "the original request completed with status {status}, but {reason}"
                        ),
                        extra,
                    ),
                )
            }
            other => finish(
                "replayed",
                ProblemKind::NotReplayable.response(format!("unsupported outcome {other:?}")),
            ),
        },
        Ok(Execution::Mismatch { .. }) => finish(
            "mismatch",
            ProblemKind::Mismatch.response(
                "this Idempotency-Key was already used with a different request (method, path, \
                 query, fingerprinted headers or body)",
            ),
        ),
        Ok(Execution::InFlight { retry_after }) => {
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            let mut res = ProblemKind::InFlight.response(
                "a request with this Idempotency-Key is still being processed; retry later",
            );
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
            finish("conflict", res)
        }
        Ok(Execution::Unknown { .. }) | Err(EngineError::OperationPanicked) => finish(
            "unknown",
            ProblemKind::OutcomeUnknown.response(
                "an earlier request with this Idempotency-Key may or may not have taken effect; \
                 it is not retried automatically (an operator can resolve it)",
            ),
        ),
        // Fail open only when the store could not answer (down, slow): a corrupt record or a
        // full store answered, and forwarding past it could run a request twice.
        Err(e) if e.kind() == ErrorKind::Capacity => {
            tracing::warn!(route = %route.name, key = %scoped.key(), error = %e,
                "store full; refusing new keys");
            let mut res = ProblemKind::StoreFull.response(
                "the idempotency store has no room for a new key right now; nothing was \
                 forwarded, retry later",
            );
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(STORE_RETRY_AFTER));
            finish("store_full", res)
        }
        Err(e) => match fallback
            .filter(|_| matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout))
        {
            Some(mut inner) => {
                tracing::warn!(route = %route.name, key = %scoped.key(), error = %e,
                    "store unavailable; forwarding without protection (fail open)");
                futures_util::future::poll_fn(|cx| inner.poll_ready(cx))
                    .await
                    .map_err(Into::into)?;
                let res = inner.call(request_for(0)).await.map_err(Into::into)?;
                finish("store_error", res.map(boxed))
            }
            None => {
                tracing::warn!(route = %route.name, key = %scoped.key(), error = %e,
                    "store unavailable; refusing (fail closed)");
                // The error's text (hosts, paths) stays in the log, not in the answer.
                let mut res = ProblemKind::StoreUnavailable.response(format!(
                    "the idempotency store could not be used ({}); nothing was forwarded, \
                     retry later",
                    e.kind().as_str()
                ));
                res.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static(STORE_RETRY_AFTER));
                finish("store_error", res)
            }
        },
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<IdemBody>, BoxError>> + Send>>;

pin_project! {
    /// The future of [`Idempotency`]: an immediate answer (no allocation), a pass-through, or a
    /// protected call.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = Proj]
    enum Kind<F> {
        Ready { response: Option<Response<IdemBody>> },
        PassThrough { #[pin] future: F },
        Protected { future: BoxFuture },
    }
}

impl<F> ResponseFuture<F> {
    fn ready(response: Response<IdemBody>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }
    /// An answer given before the request body was read: the body is drained first (unless it
    /// is empty, or the client waits for `100 Continue` and so will not send it).
    fn refuse<B>(req: Request<B>, response: Response<IdemBody>) -> Self
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let expects = req
            .headers()
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let body = req.into_body();
        if expects || body.is_end_stream() {
            return Self::ready(response);
        }
        Self::protected(Box::pin(async move {
            drain(boxed(body)).await;
            Ok(response)
        }))
    }

    fn pass(future: F) -> Self {
        Self {
            kind: Kind::PassThrough { future },
        }
    }
    fn protected(future: BoxFuture) -> Self {
        Self {
            kind: Kind::Protected { future },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    type Output = Result<Response<IdemBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            Proj::Ready { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => Poll::Ready(Err("ResponseFuture polled after completion".into())),
            },
            // An upstream failure of a passed-through request is answered too (502, naming only
            // the cause class); other inner-service errors stay errors.
            Proj::PassThrough { future } => future.poll(cx).map(|r| match r {
                Ok(res) => Ok(res.map(boxed)),
                Err(e) => match e.into().downcast::<UpstreamError>() {
                    Ok(u) => Ok(ProblemKind::upstream(&u, ProblemKind::UpstreamFailed)),
                    Err(other) => Err(other),
                },
            }),
            Proj::Protected { future } => future.as_mut().poll(cx),
        }
    }
}
