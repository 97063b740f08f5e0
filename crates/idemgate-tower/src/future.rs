//! [`ResponseFuture`]: an immediate answer (no allocation), a pass-through, or a protected call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;

use crate::body::{BoxError, IdemBody, boxed, drain};
use crate::problem::ProblemKind;
use crate::upstream::UpstreamError;

pub(crate) type BoxFuture =
    Pin<Box<dyn Future<Output = Result<Response<IdemBody>, BoxError>> + Send>>;

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
    pub(crate) fn ready(response: Response<IdemBody>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }
    /// An answer given before the request body was read: the body is drained first (unless it
    /// is empty, or the client waits for `100 Continue` and so will not send it).
    pub(crate) fn refuse<B>(req: Request<B>, response: Response<IdemBody>) -> Self
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

    pub(crate) fn pass(future: F, timing: PassTiming) -> Self {
        Self {
            kind: Kind::PassThrough { future, timing },
        }
    }
    pub(crate) fn protected(future: BoxFuture) -> Self {
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
            Proj::PassThrough { future, timing } => future.poll(cx).map(|r| {
                timing.record();
                match r {
                    Ok(res) => Ok(res.map(boxed)),
                    Err(e) => match e.into().downcast::<UpstreamError>() {
                        Ok(u) => Ok(ProblemKind::upstream(&u, ProblemKind::UpstreamFailed)),
                        Err(other) => Err(other),
                    },
                }
            }),
            Proj::Protected { future } => future.as_mut().poll(cx),
        }
    }
}
