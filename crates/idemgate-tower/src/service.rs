//! The [`Idempotency`] service: a short `call` over an [`admit`] step (route, key header,
//! required flag, declared length, concurrency slot) that answers, passes through, or hands the
//! request to [`protect`](crate::protect).

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{Request, Response};
use http_body::Body;
use idemgate_core::{IdempotencyKey, Store};
use tower_service::Service;

use crate::body::{BoxError, IdemBody, boxed};
use crate::future::{PassTiming, ResponseFuture};
use crate::headers::IDEMPOTENCY_KEY;
use crate::layer::Shared;
use crate::policy::RoutePolicy;
use crate::problem::ProblemKind;
use crate::protect::protect;
use crate::respond::Answer;

/// The service: protects covered requests, passes the others through.
pub struct Idempotency<I, S> {
    inner: I,
    shared: Arc<Shared<S>>,
    /// The inner service failed to become ready: the next request is answered `502` (nothing
    /// sent) without calling it.
    not_ready: bool,
}

impl<I, S> Idempotency<I, S> {
    pub(crate) fn new(inner: I, shared: Arc<Shared<S>>) -> Self {
        Self {
            inner,
            shared,
            not_ready: false,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &I {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut I {
        &mut self.inner
    }

    /// The inner service, unwrapped.
    pub fn into_inner(self) -> I {
        self.inner
    }
}

impl<I: Clone, S> Clone for Idempotency<I, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            not_ready: false,
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
    // Every failure is answered (problem+json), so that the layer goes straight onto
    // `axum::Router::layer` and `hyper` servers.
    type Error = Infallible;
    type Future = ResponseFuture<I::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // An inner service that cannot become ready is answered per request: the next `call`
        // answers `502` without calling it.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => {
                let e: BoxError = e.into();
                if let Some(suppressed) = not_ready_warning_due() {
                    tracing::warn!(
                        error = %e,
                        suppressed,
                        "the inner service failed to become ready (at most one such line per \
                         10 s; `suppressed` counts the lines left out before this one)"
                    );
                }
                self.not_ready = true;
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if std::mem::take(&mut self.not_ready) {
            let span = request_span(&req, "");
            return ResponseFuture::refuse(
                req,
                ProblemKind::UpstreamUnavailable
                    .response("the service behind idemgate is not ready; nothing was sent"),
                span,
            );
        }
        let started = Instant::now();
        // The clone that was polled ready serves this request; the fresh clone stays for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let signals = &self.shared.signals;
        match admit(&self.shared, &req) {
            Admission::Pass { route } => {
                let route = route.as_deref().map(|r| r.name.as_str());
                signals.count(route, Answer::Passthrough);
                let timing = PassTiming {
                    started,
                    request: signals.took_handle(route, Answer::Passthrough),
                    upstream: signals.upstream(route),
                };
                let span = request_span(&req, route.unwrap_or(""));
                record_outcome(&span, Answer::Passthrough);
                // Entered while the inner service is called: whatever it starts (the upstream
                // call) is this request's child.
                let future = span.in_scope(|| inner.call(req.map(boxed)));
                ResponseFuture::pass(future, timing, span)
            }
            Admission::Refuse {
                route,
                answer,
                response,
            } => {
                signals.count(Some(&route.name), answer);
                signals.took(Some(&route.name), answer, started.elapsed());
                let span = request_span(&req, &route.name);
                record_outcome(&span, answer);
                ResponseFuture::refuse(req, response, span)
            }
            Admission::Protect { route, key } => {
                let span = request_span(&req, &route.name);
                if !span.is_disabled() {
                    span.record("idemgate.key", tracing::field::display(&key));
                }
                let shared = self.shared.clone();
                let fut = protect(shared, route, inner, req, key, started);
                ResponseFuture::protected(Box::pin(fut), span)
            }
        }
    }
}

/// The span of one request: `idempotent_request`, at `debug` level so that it is disabled, and
/// costs one level comparison, unless a subscriber asks for it (`idemgate serve --otel`, or
/// `IDEMGATE_LOG=debug`): formatting its fields was ~8% of a replay's CPU. Its fields follow
/// the OpenTelemetry conventions where one exists (`otel.*` name the span for
/// `tracing-opentelemetry`); `idemgate.route` (the covering route's name, absent outside any
/// route), `idemgate.outcome`, `idemgate.epoch`, `idemgate.key` and `http.response.status_code`
/// are recorded as they become known. The Idempotency-Key is
/// recorded (it is not a secret); no other header is (the scope headers are credentials).
pub(crate) fn request_span<B>(req: &Request<B>, route: &str) -> tracing::Span {
    let span = tracing::debug_span!("idempotent_request",
        otel.name = %SpanName(req.method(), route),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        idemgate.route = tracing::field::Empty,
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        idemgate.key = tracing::field::Empty,
        idemgate.outcome = tracing::field::Empty,
        idemgate.epoch = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    if !route.is_empty() && !span.is_disabled() {
        span.record("idemgate.route", route);
    }
    span
}

/// Records the answer in the request's span (nothing when the span is disabled).
pub(crate) fn record_outcome(span: &tracing::Span, answer: Answer) {
    if !span.is_disabled() {
        span.record("idemgate.outcome", answer.as_str());
    }
}

/// `METHOD route` (the convention for HTTP server spans), or `METHOD` outside any route.
struct SpanName<'a>(&'a http::Method, &'a str);

impl fmt::Display for SpanName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.1.is_empty() {
            f.write_str(self.0.as_str())
        } else {
            write!(f, "{} {}", self.0, self.1)
        }
    }
}

/// What [`admit`] decided from a request's head alone, before its body is read.
pub(crate) enum Admission {
    /// Not covered, or covered with no key where none is required: forwarded untouched.
    Pass {
        /// The covering route, if any.
        route: Option<Arc<RoutePolicy>>,
    },
    /// Answered at once (missing or malformed key, declared body over the limit, overloaded).
    Refuse {
        route: Arc<RoutePolicy>,
        answer: Answer,
        response: Response<IdemBody>,
    },
    /// Protected: read the body, then run it through the engine.
    Protect {
        route: Arc<RoutePolicy>,
        key: IdempotencyKey,
    },
}

/// The admission step: route, key header (exactly one, well-formed), required flag, declared
/// length. (The slot among protected requests in progress is taken once the body has arrived,
/// so slow uploads cannot hold every slot.)
pub(crate) fn admit<S, B>(shared: &Shared<S>, req: &Request<B>) -> Admission {
    let Some(route) = shared
        .routes
        .find_shared(req.method(), req.uri().path())
        .cloned()
    else {
        return Admission::Pass { route: None };
    };
    let refuse = |route: Arc<RoutePolicy>, answer, response| Admission::Refuse {
        route,
        answer,
        response,
    };
    let mut keys = req.headers().get_all(IDEMPOTENCY_KEY).iter();
    let (raw, extra) = (keys.next(), keys.next().is_some());
    let key = match raw {
        None if route.required => {
            let res = ProblemKind::MissingKey.response(format!(
                "{} {} requires an Idempotency-Key header",
                req.method(),
                req.uri().path()
            ));
            return refuse(route, Answer::MissingKey, res);
        }
        None => return Admission::Pass { route: Some(route) },
        Some(_) if extra => {
            let res = ProblemKind::MalformedKey.response("more than one Idempotency-Key header");
            return refuse(route, Answer::InvalidKey, res);
        }
        Some(raw) => match IdempotencyKey::parse_bytes(raw.as_bytes()) {
            Ok(k) => k,
            Err(e) => {
                let res = ProblemKind::MalformedKey.response(e.to_string());
                return refuse(route, Answer::InvalidKey, res);
            }
        },
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.max_request_body as u64) {
        let res = too_large(route.max_request_body);
        return refuse(route, Answer::TooLarge, res);
    }
    Admission::Protect { route, key }
}

/// `413` for a body over `limit` bytes.
pub(crate) fn too_large(limit: usize) -> Response<IdemBody> {
    ProblemKind::TooLarge.response(format!("the request body is larger than {limit} bytes"))
}

/// Whether a "failed to become ready" WARN is due: at most one per 10 s in the process (a
/// permanently failing inner service would otherwise log on every request). `Some(n)`: due, with
/// the number of lines suppressed since the last one.
fn not_ready_warning_due() -> Option<u64> {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    static NEXT_DUE_MS: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now =
        u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX);
    let due = NEXT_DUE_MS.load(Ordering::Relaxed);
    if now >= due
        && NEXT_DUE_MS
            .compare_exchange(
                due,
                now.saturating_add(10_000),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    {
        Some(SUPPRESSED.swap(0, Ordering::Relaxed))
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_failing_inner_service_warns_at_most_once_per_window() {
        let due = (0..100)
            .filter(|_| super::not_ready_warning_due().is_some())
            .count();
        assert!(due <= 1, "{due} warnings in one window");
    }
}
