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
use tracing::Instrument;

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
                tracing::warn!(error = %e, "the inner service failed to become ready");
                self.not_ready = true;
                Poll::Ready(Ok(()))
            }
        }
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if std::mem::take(&mut self.not_ready) {
            return ResponseFuture::refuse(
                req,
                ProblemKind::UpstreamUnavailable
                    .response("the service behind idemgate is not ready; nothing was sent"),
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
                ResponseFuture::pass(inner.call(req.map(boxed)), timing)
            }
            Admission::Refuse {
                route,
                answer,
                response,
            } => {
                signals.count(Some(&route.name), answer);
                signals.took(Some(&route.name), answer, started.elapsed());
                ResponseFuture::refuse(req, response)
            }
            Admission::Protect { route, key } => {
                // Debug level: at the default `info` the span is disabled and costs nothing per
                // request (formatting its fields was ~8% of a replay's CPU); warnings carry route
                // and key.
                let span = tracing::debug_span!("idempotent_request",
                    route = %route.name, method = %req.method(), path = %req.uri().path(),
                    key = %key, outcome = tracing::field::Empty);
                let shared = self.shared.clone();
                let fut = protect(shared, route, inner, req, key, started).instrument(span);
                ResponseFuture::protected(Box::pin(fut))
            }
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
