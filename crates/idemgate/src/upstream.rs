//! The inner service of the proxy: forwards a request to the upstream over a pooled connection.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HOST, HeaderValue};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idemgate_tower::body::{BoxError, IdemBody};
use idemgate_tower::headers::strip_hop_by_hop;
use idemgate_tower::upstream::UpstreamError;

/// Forwards to one upstream base URL. Cheap to clone (shares the connection pool).
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpConnector, IdemBody>,
    base: Uri,
}

impl Upstream {
    /// A pooled HTTP/1.1 client for `base` with a connect timeout.
    pub fn new(base: Uri, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self { client, base }
    }

    fn target(&self, uri: &Uri) -> Result<Uri, BoxError> {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let base_path = self.base.path().trim_end_matches('/');
        let mut parts = self.base.clone().into_parts();
        parts.path_and_query = Some(format!("{base_path}{path}").parse()?);
        Ok(Uri::from_parts(parts)?)
    }
}

impl tower::Service<Request<IdemBody>> for Upstream {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<IdemBody>) -> Self::Future {
        let target = self.target(req.uri());
        let client = self.client.clone();
        let authority = self.base.authority().map(|a| a.as_str().to_owned());
        Box::pin(async move {
            let target = target.map_err(UpstreamError::NotSent)?;
            *req.uri_mut() = target;
            *req.version_mut() = http::Version::HTTP_11;
            strip_hop_by_hop(req.headers_mut());
            if let Some(host) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
                req.headers_mut().insert(HOST, host);
            }
            let mut res = client.request(req).await.map_err(|e| -> BoxError {
                // Connect failures (refused, timed out, unresolvable) prove nothing was sent; a
                // request on a pooled connection that closed before it was written is retried by
                // the client itself. Anything else may have reached the upstream.
                if e.is_connect() {
                    Box::new(UpstreamError::NotSent(Box::new(e)))
                } else {
                    Box::new(UpstreamError::Sent(Box::new(e)))
                }
            })?;
            strip_hop_by_hop(res.headers_mut());
            Ok(res)
        })
    }
}
