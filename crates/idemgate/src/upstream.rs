//! The inner service of the proxy: forwards a request to the upstream over a pooled HTTP/1.1
//! connection (over TLS for an `https://` upstream), and says precisely whether a failed request
//! was sent (PRODUCT G3).
//!
//! The pool is our own, on `hyper::client::conn::http1`, so that:
//! - an idle connection is never reused past `idle_timeout`, nor past the upstream's own
//!   `Keep-Alive: timeout=N` (minus a margin): we close idle connections before the upstream does,
//!   which is what prevents the keep-alive race (the upstream closing a connection just as a request
//!   is written on it, a request that then counts as sent);
//! - a request hyper hands back unwritten (the pooled connection turned out closed before a byte of
//!   the request was written) is provably not sent: it is retried once on a fresh connection, and if
//!   that fails too, reported as not sent (the key is released);
//! - every failure carries a [`Cause`] class, so that answers name the class and nothing else;
//! - a TLS handshake that fails (certificate not verified, client certificate refused, ...) is a
//!   failure before anything was written: not sent, [`Cause::TlsHandshake`], never a retry in
//!   plain HTTP.
//!
//! Each proxy worker has its own [`Upstream`] (and pool); the pool's lock is only ever taken by
//! that worker's thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, HOST, HeaderValue};
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use idemgate_tower::body::{BoxError, IdemBody};
use idemgate_tower::headers::strip_hop_by_hop;
use idemgate_tower::upstream::{Cause, Caused, Chain, UpstreamError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::edge::ClientBodyError;
use crate::tls::UpstreamTls;

/// Idle connections kept per worker.
const MAX_IDLE: usize = 256;

/// How an [`Upstream`] connects and pools.
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The upstream base URL (`http://host:port[/base]` or `https://…`).
    pub base: Uri,
    /// TLS for an `https://` base (`None` for `http://`).
    pub tls: Option<UpstreamTls>,
    /// Longest time to resolve the host and set up a connection.
    pub connect_timeout: Duration,
    /// Longest time an idle connection is kept for reuse.
    pub idle_timeout: Duration,
    /// Longest wait for the response head.
    pub response_timeout: Duration,
}

/// Forwards to one upstream base URL. Cheap to clone (shares the connection pool).
#[derive(Clone, Debug)]
pub struct Upstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: UpstreamConfig,
    /// `host:port` as configured: named in logs (never in answers).
    name: String,
    host: String,
    port: u16,
    host_header: Option<HeaderValue>,
    /// Idle connections, most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// Rate limit of the failure warnings: the next millisecond (since `epoch`) one may be logged.
    next_warn_ms: AtomicU64,
    suppressed: AtomicU64,
    epoch: Instant,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<IdemBody>,
    expires: Instant,
}

impl Upstream {
    /// A pooled HTTP/1.1 client for `config.base`.
    pub fn new(config: UpstreamConfig) -> Self {
        let authority = config.base.authority();
        let name = authority.map_or_else(String::new, |a| a.as_str().to_owned());
        let host = config
            .base
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let default_port = if config.base.scheme_str() == Some("https") {
            443
        } else {
            80
        };
        let port = config.base.port_u16().unwrap_or(default_port);
        let host_header = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        Self {
            inner: Arc::new(Inner {
                config,
                name,
                host,
                port,
                host_header,
                idle: Mutex::new(Vec::new()),
                next_warn_ms: AtomicU64::new(0),
                suppressed: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    fn target(&self, uri: &Uri) -> Result<Uri, BoxError> {
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let base_path = self.inner.config.base.path().trim_end_matches('/');
        Ok(format!("{base_path}{path}").parse()?)
    }
}

impl Inner {
    /// The most recently used idle connection that is still open and within its idle time.
    fn checkout(&self) -> Option<SendRequest<IdemBody>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(c) = idle.pop() {
            if c.expires > now && !c.sender.is_closed() {
                return Some(c.sender);
            }
            // Dropping the sender closes the connection (our side first).
        }
        None
    }

    /// Puts a connection whose response was read completely back for reuse.
    fn checkin(&self, sender: SendRequest<IdemBody>, keep_for: Duration) {
        if keep_for.is_zero() || sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // The oldest are first: close the expired ones now rather than at the next checkout.
        let expired = idle.iter().take_while(|c| c.expires <= now).count();
        idle.drain(..expired);
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                expires: now + keep_for,
            });
        }
    }

    /// A new connection: resolve, connect, TLS handshake for `https://` (all within the connect
    /// timeout), HTTP/1.1 handshake.
    async fn connect(&self) -> Result<SendRequest<IdemBody>, UpstreamError> {
        let timeout = self.config.connect_timeout;
        let deadline = Instant::now() + timeout;
        let addrs = match tokio::time::timeout_at(
            deadline,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await
        {
            Err(_) => {
                return Err(UpstreamError::not_sent(
                    Cause::DnsFailure,
                    format!("resolving {} took longer than {timeout:?}", self.host),
                ));
            }
            Ok(Err(e)) => return Err(UpstreamError::not_sent(Cause::DnsFailure, e)),
            Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
        };
        let mut failure = UpstreamError::not_sent(
            Cause::DnsFailure,
            format!("{} resolved to no address", self.host),
        );
        for addr in addrs {
            let stream =
                match tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr)).await
                {
                    Err(_) => {
                        return Err(UpstreamError::not_sent(
                            Cause::ConnectTimeout,
                            format!("connecting to {addr} took longer than {timeout:?}"),
                        ));
                    }
                    Ok(Err(e)) => {
                        let cause = if e.kind() == std::io::ErrorKind::ConnectionRefused {
                            Cause::ConnectionRefused
                        } else {
                            Cause::ConnectFailed
                        };
                        failure = UpstreamError::not_sent(cause, e);
                        continue;
                    }
                    Ok(Ok(stream)) => stream,
                };
            let _ = stream.set_nodelay(true);
            let Some(tls) = &self.config.tls else {
                return http1(stream).await;
            };
            // Fail closed: a failed handshake is the end of this attempt (not sent), never a
            // reason to try another address or plain HTTP.
            let handshake = tls.connector.connect(tls.server_name.clone(), stream);
            return match tokio::time::timeout_at(deadline, handshake).await {
                Err(_) => Err(UpstreamError::not_sent(
                    Cause::ConnectTimeout,
                    format!("the TLS handshake with {addr} took longer than {timeout:?}"),
                )),
                Ok(Err(e)) => Err(UpstreamError::not_sent(Cause::TlsHandshake, e)),
                Ok(Ok(stream)) => http1(stream).await,
            };
        }
        Err(failure)
    }

    /// Logs a failure at WARN, at most about once a second per worker (the others are counted in
    /// the next warning and always in `idemgate_upstream_errors_total`).
    fn warn(&self, e: &UpstreamError) {
        let cause = e.cause();
        let sent = if e.is_not_sent() { "false" } else { "true" };
        metrics::counter!("idemgate_upstream_errors_total", "cause" => cause.slug(), "sent" => sent)
            .increment(1);
        let now_ms = self.epoch.elapsed().as_millis() as u64;
        let next = self.next_warn_ms.load(Ordering::Relaxed);
        if now_ms < next
            || self
                .next_warn_ms
                .compare_exchange(next, now_ms + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        let source: &(dyn std::error::Error + 'static) = std::error::Error::source(e).unwrap_or(e);
        tracing::warn!(
            upstream = %self.name,
            cause = cause.slug(),
            sent = !e.is_not_sent(),
            error = %Chain(source),
            similar_failures_not_logged = suppressed,
            "upstream request failed"
        );
    }

    /// How long a connection may idle after a response with `headers`: the configured idle time,
    /// shortened to the upstream's `Keep-Alive: timeout=N` minus a margin (half of N, at most 1 s)
    /// for the time between its timer starting and ours. Zero: do not reuse.
    fn keep_for(&self, version: http::Version, headers: &HeaderMap) -> Duration {
        let close = headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"close"));
        if close || version != http::Version::HTTP_11 {
            return Duration::ZERO;
        }
        match keep_alive_timeout(headers) {
            Some(n) => {
                let margin = (n / 2).min(Duration::from_secs(1));
                (n - margin).min(self.config.idle_timeout)
            }
            None => self.config.idle_timeout,
        }
    }
}

/// The HTTP/1.1 client side of a new connection; its connection task runs until it closes.
async fn http1<I>(io: I) -> Result<SendRequest<IdemBody>, UpstreamError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake::<_, IdemBody>(TokioIo::new(io))
        .await
        .map_err(|e| UpstreamError::not_sent(Cause::ConnectFailed, e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Whether a comma-separated header value holds `token` (ASCII case-insensitive).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The `timeout=N` parameter of a `Keep-Alive` response header, in seconds.
fn keep_alive_timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all("keep-alive")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|param| {
            let (name, value) = param.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("timeout")
                .then(|| value.trim().trim_matches('"').parse::<u64>().ok())
                .flatten()
        })
        .map(Duration::from_secs)
}

/// The class of a failure on an established connection, the request (maybe partly) written.
fn sent_cause(e: &hyper::Error) -> Cause {
    if e.is_incomplete_message() || e.is_canceled() {
        Cause::ConnectionClosed
    } else if e.is_timeout() {
        Cause::Timeout
    } else if e.is_parse() {
        Cause::InvalidResponse
    } else {
        match Cause::of(e) {
            Cause::Other => Cause::ConnectionClosed,
            c => c,
        }
    }
}

/// Whether `e` carries a fatal TLS alert that only a handshake sends: the upstream refused the
/// handshake, so it never read the request. A TLS 1.3 server checks the client's certificate
/// (or its absence) only after the client has finished its side of the handshake, so its refusal
/// arrives where the response head was expected, after the request was written. Only meaningful
/// on a connection's first request: one that already carried a request had its handshake
/// accepted. Only alerts about the handshake and the client's certificate count: not
/// `access_denied`, which a server or a middlebox may also send after reading the request (then
/// the outcome is unknown, never "not sent").
fn handshake_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    let mut next = Some(e);
    while let Some(err) = next {
        // `io::Error::source` skips the error it wraps: look inside it explicitly.
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::AlertReceived(alert)) =
            inner.or_else(|| err.downcast_ref::<rustls::Error>())
        {
            return matches!(
                alert,
                A::HandshakeFailure
                    | A::CertificateRequired
                    | A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
            );
        }
        next = err.source();
    }
    false
}

/// Whether the failure came from the client's request body (read error or body timeout): then it
/// is the client's problem, answered by the edge (`408`/`400`), not an upstream failure.
fn from_client_body(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<ClientBodyError>() {
            return true;
        }
        next = err.source();
    }
    false
}

impl tower::Service<Request<IdemBody>> for Upstream {
    type Response = Response<PooledBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<PooledBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<IdemBody>) -> Self::Future {
        let target = self.target(req.uri());
        let inner = self.inner.clone();
        Box::pin(async move {
            let target = target.map_err(|e| UpstreamError::not_sent(Cause::Other, e))?;
            *req.uri_mut() = target;
            *req.version_mut() = http::Version::HTTP_11;
            strip_hop_by_hop(req.headers_mut());
            if let Some(host) = &inner.host_header {
                req.headers_mut().insert(HOST, host.clone());
            }
            match exchange(&inner, req).await {
                Ok((mut res, sender)) => {
                    let keep_for = inner.keep_for(res.version(), res.headers());
                    strip_hop_by_hop(res.headers_mut());
                    let upstream = inner.clone();
                    Ok(res.map(|body| PooledBody {
                        body,
                        back: Some((sender, keep_for)),
                        upstream,
                    }))
                }
                Err(Failure::ClientBody(e)) => Err(e),
                Err(Failure::Upstream(e)) => {
                    inner.warn(&e);
                    Err(Box::new(e) as BoxError)
                }
            }
        })
    }
}

enum Failure {
    Upstream(UpstreamError),
    ClientBody(BoxError),
}

impl From<UpstreamError> for Failure {
    fn from(e: UpstreamError) -> Self {
        Failure::Upstream(e)
    }
}

/// Sends `req` on a pooled connection, or a new one. A request handed back unwritten is retried
/// once on a new connection.
async fn exchange(
    inner: &Inner,
    mut req: Request<IdemBody>,
) -> Result<(Response<Incoming>, SendRequest<IdemBody>), Failure> {
    let mut may_reuse = true;
    for attempt in 0..2 {
        let pooled = if may_reuse { inner.checkout() } else { None };
        let fresh = pooled.is_none();
        let mut sender = match pooled {
            Some(s) => s,
            None => inner.connect().await?,
        };
        let sent = async {
            // A live idle connection is ready at once; a closed one fails here, before anything
            // is written.
            if let Err(e) = sender.ready().await {
                return Err((e, Some(req)));
            }
            sender.try_send_request(req).await.map_err(|mut e| {
                let back = e.take_message();
                (e.into_error(), back)
            })
        };
        let timeout = inner.config.response_timeout;
        let result = match tokio::time::timeout(timeout, sent).await {
            Ok(r) => r,
            Err(_) => {
                return Err(UpstreamError::sent(
                    Cause::Timeout,
                    format!("no response head within {timeout:?}"),
                )
                .into());
            }
        };
        match result {
            Ok(res) => return Ok((res, sender)),
            Err((e, back)) => match back {
                // Never written: provably not sent.
                Some(back) if attempt == 0 => {
                    tracing::debug!(error = %e, "request not written on a closed connection; retrying on a new one");
                    metrics::counter!("idemgate_upstream_retries_total", "reason" => "not_sent")
                        .increment(1);
                    req = back;
                    may_reuse = false;
                }
                Some(_) => {
                    return Err(UpstreamError::not_sent(Cause::ConnectionClosed, e).into());
                }
                None => {
                    if from_client_body(&e) {
                        return Err(Failure::ClientBody(Box::new(e)));
                    }
                    if fresh && handshake_refused(&e) {
                        return Err(UpstreamError::not_sent(Cause::TlsHandshake, e).into());
                    }
                    return Err(UpstreamError::sent(sent_cause(&e), e).into());
                }
            },
        }
    }
    Err(UpstreamError::not_sent(
        Cause::ConnectionClosed,
        "no connection accepted the request",
    )
    .into())
}

/// The upstream's response body; puts its connection back in the pool once read to the end.
pub struct PooledBody {
    body: Incoming,
    back: Option<(SendRequest<IdemBody>, Duration)>,
    upstream: Arc<Inner>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((sender, keep_for)) = self.back.take() {
            self.upstream.checkin(sender, keep_for);
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body nobody polled (no content) is complete too; one dropped half-read is not, and
        // dropping its sender closes the connection.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(None) => {
                self.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if self.body.is_end_stream() {
                    self.release();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.back = None;
                let e = UpstreamError::sent(sent_cause(&e), e);
                self.upstream.warn(&e);
                // The layer sees the cause class through `Caused` in the chain.
                let cause = e.cause();
                Poll::Ready(Some(Err(Box::new(Caused::new(cause, e)))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_timeouts_are_honoured_with_a_margin() {
        let up = Upstream::new(UpstreamConfig {
            base: "http://127.0.0.1:1".parse().unwrap_or_default(),
            tls: None,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(30),
            response_timeout: Duration::from_secs(1),
        });
        let keep = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            up.inner.keep_for(http::Version::HTTP_11, &h)
        };
        assert_eq!(keep(&[]), Duration::from_secs(30));
        assert_eq!(
            keep(&[("keep-alive", "timeout=5, max=100")]),
            Duration::from_secs(4)
        );
        assert_eq!(
            keep(&[("keep-alive", "max=3, Timeout=1")]),
            Duration::from_millis(500)
        );
        assert_eq!(keep(&[("keep-alive", "timeout=0")]), Duration::ZERO);
        assert_eq!(
            keep(&[("keep-alive", "timeout=600")]),
            Duration::from_secs(30)
        );
        assert_eq!(keep(&[("connection", "keep-alive, Close")]), Duration::ZERO);
    }
}
