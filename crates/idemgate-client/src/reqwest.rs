//! The `reqwest-middleware` middleware (feature `reqwest`).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use idemgate_client::{Policy, RetryInfo, reqwest::RetryMiddleware};
//!
//! let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
//!     .with(RetryMiddleware::new(Policy::new()))
//!     .build();
//! let res = client
//!     .post("http://127.0.0.1:8080/orders")
//!     .header("content-type", "application/json")
//!     .body(r#"{"sku":"tea","qty":1}"#)
//!     .send()
//!     .await;
//! match res {
//!     Ok(res) => {
//!         let info = res.extensions().get::<RetryInfo>().cloned();
//!         println!("{} after {:?}", res.status(), info.map(|i| i.attempts));
//!     }
//!     Err(e) => match idemgate_client::reqwest::client_error(&e) {
//!         Some(idemgate_client::Error::OutcomeUnknown { key, .. }) => {
//!             println!("reconcile order by key {key}");
//!         }
//!         _ => return Err(e.into()),
//!     },
//! }
//! # Ok(()) }
//! ```
//!
//! Errors of the operation are [`reqwest_middleware::Error::Middleware`] wrapping an
//! [`Error`]; [`client_error`] digs it out. The last attempt's `reqwest::Error`,
//! if any, is that error's `source()`.
//!
//! Transport failures are classified from [`reqwest::Error`]: `is_connect()` → not sent;
//! `is_timeout()` → timeout; `is_builder()`, `is_redirect()`, `is_decode()` → fatal (a resend
//! cannot fix them); anything else (a reset, a connection closed mid-answer) → interrupted. Errors
//! from middleware further down the chain are fatal: this middleware cannot know what they mean.

use bytes::Bytes;
use http::Extensions;
use reqwest::{Request, Response, ResponseBuilderExt};
use reqwest_middleware::{Middleware, Next};

use crate::Policy;
use crate::body::{self, Buffered};
use crate::classify::{self, Facts, TransportFailure};
use crate::error::{BoxError, Error};
use crate::key;
use crate::run::{self, Attempted, OpSpec, Transport};

/// Applies a [`Policy`] to every request of a `reqwest_middleware::ClientWithMiddleware`.
///
/// Put it first in the chain (outermost): middleware after it runs once per attempt.
#[derive(Clone, Debug)]
pub struct RetryMiddleware {
    policy: Policy,
}

impl RetryMiddleware {
    /// A middleware applying `policy` (clones share its per-host budgets and breakers).
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}

/// The client's [`Error`] inside a middleware error, if that is what it is.
pub fn client_error(error: &reqwest_middleware::Error) -> Option<&Error> {
    match error {
        reqwest_middleware::Error::Middleware(e) => e.downcast_ref::<Error>(),
        _ => None,
    }
}

/// How a `reqwest::Error` failed.
pub fn classify_error(error: &reqwest::Error) -> TransportFailure {
    if error.is_builder() || error.is_redirect() || error.is_decode() {
        TransportFailure::Fatal
    } else if error.is_connect() {
        TransportFailure::NotSent
    } else if error.is_timeout() {
        TransportFailure::Timeout
    } else {
        TransportFailure::Interrupted
    }
}

#[async_trait::async_trait]
impl Middleware for RetryMiddleware {
    async fn handle(
        &self,
        mut req: Request,
        extensions: &mut Extensions,
        next: Next<'_>,
    ) -> reqwest_middleware::Result<Response> {
        let cfg = &self.policy.inner.config;
        // The deadline counts from here: buffering the body is part of the operation.
        let start = self.policy.inner.clock.now();
        let method = req.method().clone();
        let key = key::resolve(
            req.headers_mut(),
            &cfg.key_header,
            &method,
            &cfg.key_methods,
            cfg.key_kind,
        );
        let host = host_of(req.url());
        let streaming = req.body().is_some_and(|b| b.as_bytes().is_none());
        let source = if streaming {
            let body = req.body_mut().take().unwrap_or_default();
            let read = body::buffer(body, cfg.body_limit);
            match run::read_body(&self.policy, &host, key.as_ref(), start, read).await {
                Ok(Buffered::Complete(bytes)) => {
                    *req.body_mut() = Some(bytes.into());
                    Source::Reusable(req)
                }
                Ok(Buffered::OverLimit(rest)) => {
                    *req.body_mut() = Some(reqwest::Body::wrap(rest));
                    Source::Once(Some(req))
                }
                Err(e) => return Err(reqwest_middleware::Error::middleware(e)),
            }
        } else {
            Source::Reusable(req)
        };
        let spec = OpSpec {
            host,
            key,
            idempotent_method: key::idempotent_method(&method),
            body_retryable: matches!(source, Source::Reusable(_)),
            start,
        };
        let mut transport = ReqwestTransport {
            next,
            extensions,
            source,
        };
        match run::run(&self.policy, spec, &mut transport).await {
            Ok((mut res, info)) => {
                res.extensions_mut().insert(info);
                Ok(res)
            }
            Err(e) => Err(reqwest_middleware::Error::middleware(e)),
        }
    }
}

enum Source {
    Reusable(Request),
    Once(Option<Request>),
}

struct ReqwestTransport<'a> {
    next: Next<'a>,
    extensions: &'a mut Extensions,
    source: Source,
}

impl Transport for ReqwestTransport<'_> {
    type Response = Response;

    async fn send(&mut self, _attempt: u32) -> Attempted<Response> {
        let req = match &mut self.source {
            Source::Reusable(req) => req.try_clone(),
            Source::Once(req) => req.take(),
        };
        let Some(req) = req else {
            return Attempted::Failed {
                error: "the request cannot be sent again".into(),
                failure: TransportFailure::Fatal,
            };
        };
        let res = match self.next.clone().run(req, self.extensions).await {
            Ok(res) => res,
            Err(reqwest_middleware::Error::Reqwest(e)) => {
                let failure = classify_error(&e);
                return Attempted::Failed {
                    error: Box::new(e),
                    failure,
                };
            }
            Err(e) => {
                return Attempted::Failed {
                    error: Box::new(e),
                    failure: TransportFailure::Fatal,
                };
            }
        };
        if !classify::needs_problem_body(res.status(), res.headers()) {
            let facts = Facts::new(res.status(), res.headers(), None);
            return Attempted::Answer {
                response: res,
                facts,
            };
        }
        match read_problem(res).await {
            Ok((response, Some(bytes))) => {
                let facts = Facts::new(response.status(), response.headers(), Some(&bytes));
                Attempted::Answer { response, facts }
            }
            // Over the limit: classified by its status alone, the answer kept whole.
            Ok((response, None)) => {
                let facts = Facts::new(response.status(), response.headers(), None);
                Attempted::Answer { response, facts }
            }
            // The answer broke off: no complete answer.
            Err(error) => Attempted::Failed {
                error,
                failure: TransportFailure::Interrupted,
            },
        }
    }
}

/// Reads a problem+json body (up to the problem body limit) and rebuilds the response around
/// it, keeping its URL, version, headers and extensions. A body over the limit is not parsed
/// (`None`): the response is rebuilt with what was read followed by the rest of the stream.
async fn read_problem(res: Response) -> Result<(Response, Option<Bytes>), BoxError> {
    let url = res.url().clone();
    let http_res: http::Response<reqwest::Body> = res.into();
    let (parts, body) = http_res.into_parts();
    let (body, bytes) = match body::buffer(body, classify::PROBLEM_BODY_LIMIT).await? {
        Buffered::Complete(bytes) => (reqwest::Body::from(bytes.clone()), Some(bytes)),
        Buffered::OverLimit(rest) => (reqwest::Body::wrap(rest), None),
    };
    let mut rebuilt = http::Response::builder().url(url).body(body)?;
    *rebuilt.status_mut() = parts.status;
    *rebuilt.version_mut() = parts.version;
    *rebuilt.headers_mut() = parts.headers;
    rebuilt.extensions_mut().extend(parts.extensions);
    Ok((Response::from(rebuilt), bytes))
}

/// `scheme://host:port`.
fn host_of(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    let port = url.port_or_known_default().unwrap_or(0);
    if host.contains(':') && !host.starts_with('[') {
        format!("{}://[{host}]:{port}", url.scheme())
    } else {
        format!("{}://{host}:{port}", url.scheme())
    }
}
