//! [`ResponseFuture`]: an immediate answer (no allocation), a pass-through, or a protected call.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;

use crate::body::{BoxError, IdemBody, boxed, drain};
use crate::problem::{ProblemKind, answer_error};
use crate::protect::BodyFailed;

pub(crate) type BoxFuture =
    Pin<Box<dyn Future<Output = Result<Response<IdemBody>, BoxError>> + Send>>;

pin_project! {
    /// The future of [`Idempotency`]: an immediate answer (no allocation), a pass-through, or a
    /// protected call.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
        // The request's span (usually disabled): entered while polling, and given the status.
        span: tracing::Span,
    }
}

pin_project! {
    #[project = Proj]
    enum Kind<F> {
        Ready { response: Option<Response<IdemBody>> },
        PassThrough { #[pin] future: F, timing: PassTiming },
        Protected { future: BoxFuture },
    }
}

/// Where a pass-through request's time goes: once the inner service's response head (or
/// failure) is there, its time since the request reached the layer is recorded as both the
/// request's and the upstream's duration (nothing else happens in between).
pub(crate) struct PassTiming {
    pub(crate) started: Instant,
    pub(crate) request: metrics::Histogram,
    pub(crate) upstream: metrics::Histogram,
}

impl PassTiming {
    fn record(&self) {
        let secs = self.started.elapsed().as_secs_f64();
        self.request.record(secs);
        self.upstream.record(secs);
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn ready(response: Response<IdemBody>, span: tracing::Span) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
            span,
        }
    }
    /// An answer given before the request body was read: the body is drained first (unless it
    /// is empty, or the client waits for `100 Continue` and so will not send it).
    pub(crate) fn refuse<B>(
        req: Request<B>,
        response: Response<IdemBody>,
        span: tracing::Span,
    ) -> Self
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
            return Self::ready(response, span);
        }
        Self::protected(
            Box::pin(async move {
                drain(boxed(body)).await;
                Ok(response)
            }),
            span,
        )
    }

    pub(crate) fn pass(future: F, timing: PassTiming, span: tracing::Span) -> Self {
        Self {
            kind: Kind::PassThrough { future, timing },
            span,
        }
    }
    pub(crate) fn protected(future: BoxFuture, span: tracing::Span) -> Self {
        Self {
            kind: Kind::Protected { future },
            span,
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
    type Output = Result<Response<IdemBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every error is answered ([`answer_error`]): a failed request body 408/400, an upstream
        // failure of a passed-through request 502 naming only its cause class, any other
        // inner-service error 502.
        let this = self.project();
        let _entered = this.span.enter();
        let answered = match this.kind.project() {
            Proj::Ready { response } => Poll::Ready(Ok(response.take().unwrap_or_else(|| {
                tracing::error!("ResponseFuture polled after completion");
                ProblemKind::UpstreamFailed.response("the request failed")
            }))),
            Proj::PassThrough { future, timing } => future.poll(cx).map(|r| {
                timing.record();
                Ok(match r {
                    Ok(res) => res.map(boxed),
                    Err(e) => {
                        let e: BoxError = e.into();
                        answer_error(e.as_ref(), false)
                    }
                })
            }),
            Proj::Protected { future } => future.as_mut().poll(cx).map(|r| {
                Ok(r.unwrap_or_else(|e| {
                    let body = e.is::<BodyFailed>();
                    answer_error(e.as_ref(), body)
                }))
            }),
        };
        if let Poll::Ready(Ok(res)) = &answered
            && !this.span.is_disabled()
        {
            let status = res.status().as_u16();
            this.span.record("http.response.status_code", status);
            if status >= 500 {
                this.span.record("otel.status_code", "ERROR");
            }
        }
        answered
    }
}
