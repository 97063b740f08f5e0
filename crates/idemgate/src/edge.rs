//! The client side of the proxy: limits and timeouts for client connections and requests, and
//! an answer for every request.
//!
//! - [`Connections`]: the `--max-connections` cap (a connection over it gets a canned `503` +
//!   `Retry-After` and is closed).
//! - [`FirstBytes`]: a connection must show which protocol it speaks within the header read
//!   timeout (hyper's own header timer only starts once HTTP/1 is chosen, so a connection that
//!   sends nothing at all would otherwise stay open for ever).
//! - [`ClientBody`]: the whole request body must arrive within `--body-read-timeout` (`408`).
//! - [`Edge`]: the outermost service; any error below it becomes a problem+json answer, so that
//!   hyper never closes a connection without answering.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use idemgate_tower::body::IdemBody;
use idemgate_tower::problem::ProblemKind;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Counts a request or connection refused at a limit, by the name of the setting.
pub fn limit_rejection(reason: &'static str) {
    metrics::counter!("idemgate_limit_rejections_total", "reason" => reason).increment(1);
}

/// The open client connections, against `--max-connections`.
#[derive(Clone, Debug)]
pub struct Connections {
    open: Arc<AtomicUsize>,
    max: usize,
    /// Rejected connections still being answered (bounded, so that a flood cannot pile them up).
    rejecting: Arc<tokio::sync::Semaphore>,
}

/// One open client connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    open: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("idemgate_client_connections").decrement(1.0);
    }
}

/// Rejected connections answered at once at most; beyond that they are closed without a word.
const MAX_REJECTING: usize = 64;

impl Connections {
    /// At most `max` open client connections.
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::new(AtomicUsize::new(0)),
            max,
            rejecting: Arc::new(tokio::sync::Semaphore::new(MAX_REJECTING)),
        }
    }

    /// A slot for a new connection, or `None` at the cap.
    pub fn try_open(&self) -> Option<Slot> {
        let max = self.max;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        metrics::gauge!("idemgate_client_connections").increment(1.0);
        Some(Slot {
            open: self.open.clone(),
        })
    }

    /// Answers a connection over the cap with `503` + `Retry-After` and closes it. The answer is
    /// written at once; the request is read and dropped for at most a second (closing a socket
    /// with unread data would reset it and could destroy the answer before the client reads it).
    pub fn reject(&self, mut stream: tokio::net::TcpStream) {
        limit_rejection("max_connections");
        let Ok(permit) = self.rejecting.clone().try_acquire_owned() else {
            return; // dropped: closed
        };
        tokio::spawn(async move {
            let _permit = permit;
            let linger = async {
                stream.write_all(over_capacity_answer().as_bytes()).await?;
                stream.shutdown().await?;
                let mut sink = [0u8; 4096];
                let mut left = 64 * 1024usize;
                loop {
                    let n = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await?;
                    if n == 0 || n >= left {
                        return Ok::<_, io::Error>(());
                    }
                    left -= n;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
        });
    }
}

/// The canned answer to a connection over `--max-connections`.
fn over_capacity_answer() -> &'static str {
    static ANSWER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ANSWER.get_or_init(|| {
        let body = serde_json::json!({
            "type": ProblemKind::Overloaded.type_uri(),
            "title": ProblemKind::Overloaded.title(),
            "status": 503,
            "detail": "too many open connections; retry later",
            "limit": "max_connections",
        })
        .to_string();
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
             retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    })
}

/// The HTTP/2 connection preface: the bytes that tell the protocol apart.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client connection that must tell which protocol it speaks (the first byte that is not the
/// HTTP/2 preface, or the whole preface) within a deadline; afterwards a plain pass-through.
pub struct FirstBytes<T> {
    io: T,
    /// Until the protocol is known: the deadline, and how much of the preface matched.
    pending: Option<(Pin<Box<Sleep>>, usize)>,
}

impl<T> FirstBytes<T> {
    /// Wraps `io`; the protocol must show within `timeout`.
    pub fn new(io: T, timeout: Duration) -> Self {
        Self {
            io,
            pending: Some((Box::pin(tokio::time::sleep(timeout)), 0)),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstBytes<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Some((_, matched)) = &mut this.pending {
                    let new = &buf.filled()[before..];
                    let known = new.is_empty()
                        || new.iter().any(|&b| {
                            let is_preface = H2_PREFACE.get(*matched) == Some(&b);
                            *matched += 1;
                            !is_preface || *matched == H2_PREFACE.len()
                        });
                    if known {
                        this.pending = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Some((deadline, _)) = &mut this.pending {
                    ready!(deadline.as_mut().poll(cx));
                    limit_rejection("header_read_timeout");
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent no request within the header read timeout",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstBytes<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Whether a connection error is a header read timeout (hyper's, or [`FirstBytes`]').
pub fn is_header_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && h.is_timeout()
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Why a client's request body failed: the tower layer's type, which it answers (`408` for a
/// timeout, `400` otherwise).
pub use idemgate_tower::body::RequestBodyError as ClientBodyError;

/// A client's request body that must arrive whole before a deadline. The timer is only set up
/// when the body is not already complete and has to be waited for.
pub struct ClientBody {
    body: Incoming,
    timeout: Duration,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    failed: bool,
}

impl ClientBody {
    /// `body`, due within `timeout` from now.
    pub fn new(body: Incoming, timeout: Duration) -> Self {
        Self {
            body,
            timeout,
            deadline: Instant::now() + timeout,
            sleep: None,
            failed: false,
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.failed = true;
                Poll::Ready(Some(Err(ClientBodyError::Read(Box::new(e)))))
            }
            Poll::Ready(other) => {
                Poll::Ready(other.map(|f| f.map_err(|e| ClientBodyError::Read(Box::new(e)))))
            }
            Poll::Pending => {
                let deadline = this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                ready!(sleep.as_mut().poll(cx));
                this.failed = true;
                Poll::Ready(Some(Err(ClientBodyError::Timeout(this.timeout))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The outermost service: bounds the request body's arrival (the layer answers every error,
/// a late body included, with a problem+json response).
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    body_timeout: Duration,
}

impl<S> Edge<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, body_timeout: Duration) -> Self {
        Self {
            inner,
            body_timeout,
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for Edge<S>
where
    S: tower::Service<
            Request<ClientBody>,
            Response = Response<IdemBody>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + Unpin + 'static,
{
    type Response = Response<IdemBody>;
    type Error = std::convert::Infallible;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let timeout = self.body_timeout;
        let req = req.map(|b| ClientBody::new(b, timeout));
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        inner.call(req)
    }
}
