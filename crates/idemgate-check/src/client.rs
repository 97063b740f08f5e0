//! The black-box HTTP/1.1 client: one fresh connection per request (no pool, so a server closing
//! an idle connection can never fail a request of ours), bounded bodies, a deadline on every
//! exchange, bursts over connections opened beforehand, and a raw send that closes before the
//! answer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::Error;

/// The API under test: `http://host[:port][/base]`.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// `host[:port]` as written (the `Host` header).
    pub authority: String,
    host: String,
    port: u16,
    /// Path prefix without a trailing `/` (empty for none).
    pub base: String,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let usage = |m: String| Error::Config { message: m };
        // Credentials in the URL would end up in the Host header and in every report: refused,
        // without echoing the URL. Any '@' is refused: a password holding '/' or '?' hides the
        // userinfo from a look at the authority (`http://user:pa/ss@host`), and a base URL has
        // no need of one.
        if url.contains('@') {
            return Err(usage(
                "--target must not contain '@' (credentials, user:password@, are never taken from the URL: send them with --header 'Authorization: …', which reports redact)".to_owned(),
            ));
        }
        // Not echoed: a URL that does not parse may hold credentials the check above could not
        // see (`http://user:pa/ss@host`).
        let uri: http::Uri = url.parse().map_err(|e| {
            usage(format!(
                "--target is not a URL ({e}; {} bytes), e.g. http://127.0.0.1:8080",
                url.len()
            ))
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(usage(format!(
                    "--target {url:?}: https is not supported; point the check at the service's plain-HTTP address"
                )));
            }
            _ => return Err(usage(format!("--target {url:?} must start with http://"))),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| usage(format!("--target {url:?} has no host")))?;
        if uri.query().is_some() {
            return Err(usage(format!("--target {url:?} must not have a query")));
        }
        Ok(Self {
            authority: authority.as_str().to_owned(),
            host: authority.host().trim_matches(['[', ']']).to_owned(),
            port: authority.port_u16().unwrap_or(80),
            base: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The full URL of `path` (for reports and reproducers).
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.authority, self.base, path)
    }

    /// The addresses the host resolves to.
    pub(crate) async fn addrs(&self) -> std::io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect())
    }
}

/// One request, as the checks build it.
#[derive(Clone, Debug)]
pub(crate) struct Req {
    pub method: Method,
    /// Path and query, below the target's base.
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

impl Req {
    /// Sets (or replaces) a header.
    pub(crate) fn set_header(&mut self, name: HeaderName, value: HeaderValue) {
        self.headers.retain(|(n, _)| n != name);
        self.headers.push((name, value));
    }

    /// Whether a `Host` header was given (by `--header` or the spec): it replaces the
    /// target's.
    pub(crate) fn has_host(&self) -> bool {
        self.headers.iter().any(|(n, _)| n == http::header::HOST)
    }

    /// Removes a header.
    pub(crate) fn remove_header(&mut self, name: &HeaderName) {
        self.headers.retain(|(n, _)| n != name);
    }
}

/// An answer, its body read up to the cap.
#[derive(Clone, Debug)]
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The body was longer than the cap and was cut there.
    pub truncated: bool,
    pub elapsed: Duration,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// `Idempotent-Replayed: true` (the IETF draft's and Stripe's marker).
    pub(crate) fn replayed(&self) -> bool {
        self.header("idempotent-replayed")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    }

    pub(crate) fn json(&self) -> Option<serde_json::Value> {
        if self.truncated {
            return None;
        }
        serde_json::from_slice(&self.body).ok()
    }
}

/// Why an exchange gave no answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SendError {
    /// No connection could be made.
    Connect(String),
    /// No complete answer within the deadline.
    Timeout(Duration),
    /// The connection broke (reset, closed, malformed answer).
    Broken(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "could not connect: {e}"),
            SendError::Timeout(d) => write!(f, "no complete answer within {d:?}"),
            SendError::Broken(e) => write!(f, "connection broke: {e}"),
        }
    }
}

/// The client of one run.
#[derive(Clone, Debug)]
pub(crate) struct Client {
    pub target: Target,
    /// Deadline of one exchange (connect, send, whole answer).
    pub timeout: Duration,
    /// Longest body read; the rest is cut off.
    pub body_cap: usize,
}

type Sender = http1::SendRequest<Full<Bytes>>;

impl Client {
    async fn stream(&self) -> Result<TcpStream, SendError> {
        let addrs = self
            .target
            .addrs()
            .await
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let mut last = SendError::Connect(format!("{} resolves to nothing", self.target.host));
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = SendError::Connect(format!("{addr}: {e}")),
            }
        }
        Err(last)
    }

    /// Opens a connection and its HTTP/1.1 handshake; the connection runs in a task of its own
    /// that ends when the sender is dropped.
    async fn open(&self) -> Result<Sender, SendError> {
        let stream = self.stream().await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Broken(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn request(&self, req: &Req) -> Result<Request<Full<Bytes>>, SendError> {
        let mut builder = Request::builder()
            .method(req.method.clone())
            .uri(format!("{}{}", self.target.base, req.path));
        if !req.has_host() {
            builder = builder.header(http::header::HOST, self.target.authority.as_str());
        }
        for (name, value) in &req.headers {
            builder = builder.header(name, value);
        }
        builder
            .body(Full::new(req.body.clone()))
            .map_err(|e| SendError::Broken(format!("invalid request: {e}")))
    }

    async fn exchange(&self, sender: &mut Sender, req: &Req) -> Result<Answer, SendError> {
        let start = Instant::now();
        let request = self.request(req)?;
        sender
            .ready()
            .await
            .map_err(|e| SendError::Broken(e.to_string()))?;
        let res = sender
            .send_request(request)
            .await
            .map_err(|e| SendError::Broken(e.to_string()))?;
        let (parts, mut body) = res.into_parts();
        let mut buf = BytesMut::new();
        let mut truncated = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| SendError::Broken(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                let room = self.body_cap.saturating_sub(buf.len());
                if data.len() > room {
                    buf.extend_from_slice(&data[..room]);
                    truncated = true;
                    break; // the connection is dropped with the rest unread
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: buf.freeze(),
            truncated,
            elapsed: start.elapsed(),
        })
    }

    /// One exchange on a fresh connection, within the deadline.
    pub(crate) async fn send(&self, req: &Req) -> Result<Answer, SendError> {
        let work = async {
            let mut sender = self.open().await?;
            self.exchange(&mut sender, req).await
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(SendError::Timeout(self.timeout)))
    }

    /// Every request on a connection of its own, all connections opened first and the requests
    /// then written back to back: they reach the server as nearly at once as a client can make
    /// them. Answers in the order of `reqs`.
    pub(crate) async fn burst(&self, reqs: &[Req]) -> Vec<Result<Answer, SendError>> {
        let opened = futures_util::future::join_all(reqs.iter().map(|_| async {
            tokio::time::timeout(self.timeout, self.open())
                .await
                .unwrap_or(Err(SendError::Timeout(self.timeout)))
        }))
        .await;
        let exchanges = opened
            .into_iter()
            .zip(reqs)
            .map(|(sender, req)| async move {
                let mut sender = sender?;
                tokio::time::timeout(self.timeout, self.exchange(&mut sender, req))
                    .await
                    .unwrap_or(Err(SendError::Timeout(self.timeout)))
            });
        futures_util::future::join_all(exchanges).await
    }

    /// Writes the whole request on a fresh connection, then closes it without reading anything:
    /// the answer is lost on the way back.
    pub(crate) async fn send_and_close(&self, req: &Req) -> Result<(), SendError> {
        let work = async {
            let mut stream = self.stream().await?;
            let bytes = self.raw(req);
            stream
                .write_all(&bytes)
                .await
                .map_err(|e| SendError::Broken(e.to_string()))?;
            stream
                .flush()
                .await
                .map_err(|e| SendError::Broken(e.to_string()))?;
            drop(stream); // close before reading a byte of the answer
            Ok(())
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(SendError::Timeout(self.timeout)))
    }

    /// The request as HTTP/1.1 bytes (`Connection: close`, `Content-Length`).
    pub(crate) fn raw(&self, req: &Req) -> Vec<u8> {
        let mut out = format!(
            "{} {}{} HTTP/1.1\r\n",
            req.method, self.target.base, req.path
        )
        .into_bytes();
        if !req.has_host() {
            out.extend_from_slice(format!("host: {}\r\n", self.target.authority).as_bytes());
        }
        for (name, value) in &req.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(
            format!(
                "content-length: {}\r\nconnection: close\r\n\r\n",
                req.body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&req.body);
        out
    }

    /// Whether the target accepts TCP connections (the run's first step).
    pub(crate) async fn reachable(&self) -> Result<(), SendError> {
        tokio::time::timeout(self.timeout.min(Duration::from_secs(10)), self.stream())
            .await
            .unwrap_or(Err(SendError::Timeout(self.timeout)))
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn targets_are_plain_http_with_an_optional_base_path() {
        let t = Target::parse("http://127.0.0.1:8080/api/").unwrap();
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert_eq!(t.base, "/api");
        assert_eq!(t.url("/orders"), "http://127.0.0.1:8080/api/orders");
        assert_eq!(Target::parse("http://localhost").unwrap().port, 80);
        for bad in ["https://x", "ftp://x", "localhost:80", "http://x/?q=1"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn raw_requests_carry_length_and_close() {
        let client = Client {
            target: Target::parse("http://h:1").unwrap(),
            timeout: Duration::from_secs(1),
            body_cap: 1,
        };
        let req = Req {
            method: Method::POST,
            path: "/o?x=1".into(),
            headers: vec![(
                HeaderName::from_static("idempotency-key"),
                HeaderValue::from_static("k"),
            )],
            body: Bytes::from_static(b"{}"),
        };
        let raw = String::from_utf8(client.raw(&req)).unwrap();
        assert_eq!(
            raw,
            "POST /o?x=1 HTTP/1.1\r\nhost: h:1\r\nidempotency-key: k\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
        );
    }
}
