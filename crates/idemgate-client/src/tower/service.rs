use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tower_service::Service;

use crate::Policy;
use crate::body::{self, Buffered, Prefixed};
use crate::classify::{self, Facts, TransportFailure};
use crate::error::{BoxError, Error};
use crate::key;
use crate::run::{self, Attempted, OpSpec, Transport};

use super::body::{RequestBody, ResponseBody};
use super::layer::Classifier;

/// The service [`RetryLayer`](super::RetryLayer) makes.
///
/// Its `poll_ready` is always ready: the inner service's readiness is awaited inside the
/// response future, before each attempt, on a clone of the inner service.
#[derive(Clone)]
pub struct Retry<S> {
    pub(crate) inner: S,
    pub(crate) policy: Policy,
    pub(crate) classify: Classifier,
}

impl<S: fmt::Debug> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

type Operation<B> = Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, Error>> + Send>>;

/// The future of [`Retry`]: the whole operation (attempts, waits), boxed once per call.
pub struct ResponseFuture<B> {
    inner: Operation<B>,
}

impl<B> fmt::Debug for ResponseFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<B> Future for ResponseFuture<B> {
    type Output = Result<Response<ResponseBody<B>>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Retry<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    ReqB: Body + Send + 'static,
    ReqB::Data: Into<Bytes>,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = Error;
    type Future = ResponseFuture<ResB>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ReqB>) -> ResponseFuture<ResB> {
        // `poll_ready` was never called on `self.inner`, so a plain clone is the right one.
        let svc = self.inner.clone();
        let policy = self.policy.clone();
        let classify = self.classify.clone();
        ResponseFuture {
            inner: Box::pin(call(policy, classify, svc, req)),
        }
    }
}

async fn call<S, ReqB, ResB>(
    policy: Policy,
    classify: Classifier,
    svc: S,
    req: Request<ReqB>,
) -> Result<Response<ResponseBody<ResB>>, Error>
where
    S: Service<Request<RequestBody>, Response = Response<ResB>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
    ReqB: Body + Send + 'static,
    ReqB::Data: Into<Bytes>,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send,
    ResB::Error: Into<BoxError>,
{
    let cfg = &policy.inner.config;
    // The deadline counts from here: buffering the body is part of the operation.
    let start = policy.inner.clock.now();
    let (mut parts, body) = req.into_parts();
    let key = key::resolve(
        &mut parts.headers,
        &cfg.key_header,
        &parts.method,
        &cfg.key_methods,
        cfg.key_kind,
    );
    let host = host_of(&parts.uri, &parts.headers);
    let idempotent_method = key::idempotent_method(&parts.method);
    let boxed: UnsyncBoxBody<Bytes, BoxError> = body
        .map_frame(|f| f.map_data(Into::into))
        .map_err(Into::into)
        .boxed_unsync();
    let read = body::buffer(boxed, cfg.body_limit);
    let source = match run::read_body(&policy, &host, key.as_ref(), start, read).await? {
        Buffered::Complete(bytes) => Source::Reusable(bytes),
        Buffered::OverLimit(rest) => Source::Once(Some(rest)),
    };
    let spec = OpSpec {
        host,
        key,
        idempotent_method,
        body_retryable: matches!(source, Source::Reusable(_)),
        start,
    };
    let mut transport = TowerTransport {
        svc,
        parts,
        source,
        classify,
    };
    let (mut res, info) = run::run(&policy, spec, &mut transport).await?;
    res.extensions_mut().insert(info);
    Ok(res)
}

enum Source {
    Reusable(Bytes),
    Once(Option<Prefixed<UnsyncBoxBody<Bytes, BoxError>>>),
}

struct TowerTransport<S> {
    svc: S,
    parts: http::request::Parts,
    source: Source,
    classify: Classifier,
}

impl<S, ResB> Transport for TowerTransport<S>
where
    S: Service<Request<RequestBody>, Response = Response<ResB>> + Send,
    S::Error: Into<BoxError>,
    S::Future: Send,
    ResB: Body<Data = Bytes> + Send,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;

    async fn send(&mut self, _attempt: u32) -> Attempted<Self::Response> {
        let body = match &mut self.source {
            Source::Reusable(bytes) => RequestBody::full(bytes.clone()),
            Source::Once(rest) => match rest.take() {
                Some(rest) => RequestBody::streaming(rest),
                None => return fatal("a streamed request body cannot be sent twice"),
            },
        };
        let req = Request::from_parts(self.parts.clone(), body);
        if let Err(e) = poll_fn(|cx| self.svc.poll_ready(cx)).await {
            return self.failed(e.into());
        }
        let res = match self.svc.call(req).await {
            Ok(res) => res,
            Err(e) => return self.failed(e.into()),
        };
        let (parts, body) = res.into_parts();
        if !classify::needs_problem_body(parts.status, &parts.headers) {
            let facts = Facts::new(parts.status, &parts.headers, None);
            return Attempted::Answer {
                response: Response::from_parts(parts, ResponseBody::inner(body)),
                facts,
            };
        }
        match body::buffer(Box::pin(body), classify::PROBLEM_BODY_LIMIT).await {
            Ok(Buffered::Complete(bytes)) => {
                let facts = Facts::new(parts.status, &parts.headers, Some(&bytes));
                Attempted::Answer {
                    response: Response::from_parts(parts, ResponseBody::buffered(bytes)),
                    facts,
                }
            }
            // Over the limit: classified by its status alone, the answer kept whole (what was
            // read, then the rest of the stream).
            Ok(Buffered::OverLimit(rest)) => {
                let facts = Facts::new(parts.status, &parts.headers, None);
                Attempted::Answer {
                    response: Response::from_parts(parts, ResponseBody::prefixed(rest)),
                    facts,
                }
            }
            // The answer broke off: no complete answer.
            Err(error) => Attempted::Failed {
                error,
                failure: TransportFailure::Interrupted,
            },
        }
    }
}

impl<S> TowerTransport<S> {
    fn failed<R>(&self, error: BoxError) -> Attempted<R> {
        let failure = (self.classify)(&*error);
        Attempted::Failed { error, failure }
    }
}

fn fatal<R>(message: &'static str) -> Attempted<R> {
    Attempted::Failed {
        error: message.into(),
        failure: TransportFailure::Fatal,
    }
}

/// `scheme://host:port` of a request (the `Host` header when the URI has no authority).
pub(crate) fn host_of(uri: &http::Uri, headers: &http::HeaderMap) -> String {
    let scheme = uri.scheme_str().unwrap_or("http");
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
        .to_ascii_lowercase();
    let authority = authority.rsplit('@').next().unwrap_or_default();
    let has_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']');
    if has_port {
        format!("{scheme}://{authority}")
    } else {
        let port = if scheme == "https" { 443 } else { 80 };
        format!("{scheme}://{authority}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ids() {
        let h = http::HeaderMap::new();
        let id = |u: &str| host_of(&u.parse().expect("uri"), &h);
        assert_eq!(id("http://API.test/x"), "http://api.test:80");
        assert_eq!(id("https://api.test/x"), "https://api.test:443");
        assert_eq!(id("http://u:p@api.test:8080/x"), "http://api.test:8080");
        assert_eq!(id("http://[::1]/x"), "http://[::1]:80");
        assert_eq!(id("http://[::1]:9/x"), "http://[::1]:9");
        let mut with_host = http::HeaderMap::new();
        with_host.insert(
            http::header::HOST,
            http::HeaderValue::from_static("api.test:81"),
        );
        assert_eq!(
            host_of(&"/x".parse().expect("uri"), &with_host),
            "http://api.test:81"
        );
    }
}
