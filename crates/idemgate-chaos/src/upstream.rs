//! The recording upstream: an HTTP/1.1 server (hyper, loopback) that logs every execution
//! **before** it answers, so the checker knows every effect that happened, including the ones
//! whose answer never reached a client.
//!
//! Each request's behaviour is chosen by its query string (or the same names as
//! `x-chaos-<name>` headers); a client repeats the same behaviour on every attempt of an
//! operation, because the query is part of the request idemgate fingerprints.
//!
//! | parameter | effect |
//! | --- | --- |
//! | `delay_ms=N` | the effect takes N ms (the handler runs in a task of its own: a client or proxy that goes away does not cancel it) |
//! | `status=N` | answer with status N (stored by idemgate unless transient) |
//! | `transient=N` | the first N arrivals of this `(scope, key)` are answered `503` and apply **no** effect (proof of non-processing, G3) |
//! | `transient_epoch=N` | an arrival at `Idempotency-Epoch` N is answered `503` with no effect |
//! | `fail=close` | apply the effect, then close the connection without answering |
//! | `fail=reset` | apply the effect, then reset the connection (RST) |
//! | `fail=truncate` | apply the effect, then send half of the body and break the connection |
//! | `idle_close_ms=N` | after answering, close this keep-alive connection once it has been idle N ms |
//! | `pad=N` | pad the body to N bytes |
//!
//! The scope is the `authorization` header; the key and epoch are idemgate's
//! `Idempotency-Key` and `Idempotency-Epoch`; `x-chaos-instance` and `x-chaos-attempt` (set by
//! the clients, forwarded by idemgate) say which instance and which client attempt led to the
//! execution.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// How the upstream breaks an exchange after applying the effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fail {
    /// Close the connection (FIN) without answering.
    Close,
    /// Reset the connection (RST) without answering.
    Reset,
    /// Send the head and half of the body, then break the connection.
    Truncate,
}

/// What the upstream does with one request. [`Behaviour::to_query`] and [`Behaviour::parse`]
/// round-trip.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Behaviour {
    /// How long the effect takes.
    pub delay_ms: u64,
    /// The status of the answer (`0`: `201`).
    pub status: u16,
    /// The first `transient` arrivals of the key get `503` and no effect.
    pub transient: u32,
    /// Arrivals at this epoch get `503` and no effect (`0`: none).
    pub transient_epoch: u64,
    /// A failure after the effect.
    pub fail: Option<Fail>,
    /// Close the keep-alive connection after this long idle (`0`: never).
    pub idle_close_ms: u64,
    /// Pad the body to this many bytes.
    pub pad: usize,
}

impl Behaviour {
    /// Reads the behaviour from a query string and `x-chaos-*` headers (headers win).
    pub fn parse(query: Option<&str>, headers: &HeaderMap) -> Self {
        let mut b = Behaviour::default();
        let mut set = |name: &str, value: &str| match name {
            "delay_ms" => b.delay_ms = value.parse().unwrap_or(0),
            "status" => b.status = value.parse().unwrap_or(0),
            "transient" => b.transient = value.parse().unwrap_or(0),
            "transient_epoch" => b.transient_epoch = value.parse().unwrap_or(0),
            "idle_close_ms" => b.idle_close_ms = value.parse().unwrap_or(0),
            "pad" => b.pad = value.parse().unwrap_or(0),
            "fail" => {
                b.fail = match value {
                    "close" => Some(Fail::Close),
                    "reset" => Some(Fail::Reset),
                    "truncate" => Some(Fail::Truncate),
                    _ => None,
                }
            }
            _ => {}
        };
        for pair in query.unwrap_or("").split('&') {
            if let Some((k, v)) = pair.split_once('=') {
                set(k, v);
            }
        }
        for name in [
            "delay_ms",
            "status",
            "transient",
            "transient_epoch",
            "idle_close_ms",
            "pad",
            "fail",
        ] {
            let header = format!("x-chaos-{}", name.replace('_', "-"));
            if let Some(v) = headers.get(header.as_str()).and_then(|v| v.to_str().ok()) {
                set(name, v);
            }
        }
        b
    }

    /// The query string that asks for this behaviour (empty for the default).
    pub fn to_query(&self) -> String {
        let mut parts = Vec::new();
        if self.delay_ms > 0 {
            parts.push(format!("delay_ms={}", self.delay_ms));
        }
        if self.status > 0 {
            parts.push(format!("status={}", self.status));
        }
        if self.transient > 0 {
            parts.push(format!("transient={}", self.transient));
        }
        if self.transient_epoch > 0 {
            parts.push(format!("transient_epoch={}", self.transient_epoch));
        }
        if let Some(f) = self.fail {
            let name = match f {
                Fail::Close => "close",
                Fail::Reset => "reset",
                Fail::Truncate => "truncate",
            };
            parts.push(format!("fail={name}"));
        }
        if self.idle_close_ms > 0 {
            parts.push(format!("idle_close_ms={}", self.idle_close_ms));
        }
        if self.pad > 0 {
            parts.push(format!("pad={}", self.pad));
        }
        parts.join("&")
    }

    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::CREATED)
    }
}

impl fmt::Display for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = self.to_query();
        f.write_str(if q.is_empty() { "normal" } else { &q })
    }
}

/// One execution: a complete request the upstream received and acted on (or, for a transient
/// answer, deliberately did not act on), logged before the answer was sent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Execution {
    /// Execution id, from 1, in log order.
    pub id: u64,
    /// The `authorization` header (the principal).
    pub scope: String,
    /// The `Idempotency-Key` idemgate forwarded.
    pub key: String,
    /// The `Idempotency-Epoch` idemgate forwarded (`0` if absent).
    pub epoch: u64,
    /// The instance the client sent the request to (`x-chaos-instance`).
    pub instance: Option<u32>,
    /// The client attempt (`x-chaos-attempt`).
    pub attempt: Option<u64>,
    /// SHA-256 of method, path and query, content type and body (hex).
    pub digest: String,
    /// The behaviour asked for.
    pub behaviour: Behaviour,
    /// Whether the effect was applied (`false` only for a transient answer).
    pub effect: bool,
    /// The status of the answer.
    pub status: u16,
    /// The body of the answer (the whole intended body, even if it was then cut off).
    #[serde(with = "text")]
    pub body: Bytes,
    /// Microseconds since the run's start when the request head arrived.
    pub received_us: u64,
    /// Microseconds since the run's start when the execution was logged (after its delay).
    pub logged_us: u64,
}

/// `Bytes` as a (lossy) UTF-8 string in JSON: every body here is JSON text.
pub(crate) mod text {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes bytes as a string.
    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&String::from_utf8_lossy(b))
    }

    /// Deserializes a string into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        Ok(Bytes::from(String::deserialize(d)?))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Recorder {
    t0: Instant,
    log: Mutex<Vec<Execution>>,
    jsonl: Option<Mutex<BufWriter<File>>>,
    arrivals: Mutex<HashMap<(String, String), u32>>,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl Recorder {
    fn now_us(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Appends the execution to the log (and the JSONL file) and returns it.
    fn record(&self, r: Received) -> Execution {
        let transient = (r.behaviour.transient_epoch > 0 && r.epoch == r.behaviour.transient_epoch)
            || r.behaviour.transient > 0 && {
                let mut arrivals = lock(&self.arrivals);
                let n = arrivals
                    .entry((r.scope.clone(), r.key.clone()))
                    .or_insert(0);
                *n += 1;
                *n <= r.behaviour.transient
            };
        let status = if transient {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            r.behaviour.status_code()
        };
        let mut log = lock(&self.log);
        let id = log.len() as u64 + 1;
        let mut body = serde_json::json!({
            "exec": id,
            "scope": r.scope,
            "key": r.key,
            "epoch": r.epoch,
            "status": status.as_u16(),
            "digest": r.digest,
        })
        .to_string();
        while body.len() < r.behaviour.pad {
            body.push(' ');
        }
        let e = Execution {
            id,
            scope: r.scope,
            key: r.key,
            epoch: r.epoch,
            instance: r.instance,
            attempt: r.attempt,
            digest: r.digest,
            behaviour: r.behaviour,
            effect: !transient,
            status: status.as_u16(),
            body: Bytes::from(body),
            received_us: r.received_us,
            logged_us: self.now_us(),
        };
        if let Some(file) = &self.jsonl {
            let mut file = lock(file);
            if serde_json::to_writer(&mut *file, &e).is_ok() {
                let _ = file.write_all(b"\n");
                let _ = file.flush();
            }
        }
        log.push(e.clone());
        e
    }
}

/// A request as received, before its effect.
struct Received {
    scope: String,
    key: String,
    epoch: u64,
    instance: Option<u32>,
    attempt: Option<u64>,
    digest: String,
    behaviour: Behaviour,
    received_us: u64,
}

/// Counts a request between its arrival and its log entry.
struct InFlight(Arc<Recorder>);

impl InFlight {
    fn new(rec: Arc<Recorder>) -> Self {
        rec.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(rec)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A running recording upstream. Dropping it stops it.
pub struct RecordingUpstream {
    addr: SocketAddr,
    rec: Arc<Recorder>,
    task: tokio::task::JoinHandle<()>,
}

impl fmt::Debug for RecordingUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingUpstream")
            .field("addr", &self.addr)
            .field("executions", &lock(&self.rec.log).len())
            .finish()
    }
}

impl RecordingUpstream {
    /// Starts on a free loopback port. Times are measured from `t0`; with `jsonl`, every
    /// execution is also appended to that file (one JSON object a line, flushed before the
    /// answer).
    pub async fn start(t0: Instant, jsonl: Option<&Path>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let jsonl = match jsonl {
            Some(p) => Some(Mutex::new(BufWriter::new(File::create(p)?))),
            None => None,
        };
        let rec = Arc::new(Recorder {
            t0,
            log: Mutex::new(Vec::new()),
            jsonl,
            arrivals: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        });
        let task = tokio::spawn(accept_loop(listener, rec.clone()));
        Ok(Self { addr, rec, task })
    }

    /// The address to point idemgate (or a relay) at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of the log so far.
    pub fn executions(&self) -> Vec<Execution> {
        lock(&self.rec.log).clone()
    }

    /// Requests received whose execution is not logged yet.
    pub fn in_flight(&self) -> usize {
        self.rec.in_flight.load(Ordering::SeqCst)
    }

    /// Waits until no request is between arrival and log entry, for at most `within`; `false`
    /// if some still are.
    pub async fn wait_idle(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.rec.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.in_flight() == 0;
            }
        }
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, rec: Arc<Recorder>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(_) => {
                // Out of descriptors or similar: back off a little and go on.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(serve_connection(stream, rec.clone()));
    }
}

/// One connection's controls: a duplicate of its socket (to close or reset it from a handler,
/// while hyper owns the stream) and its activity counters (for idle closes).
struct Conn {
    fd: Mutex<Option<OwnedFd>>,
    started: AtomicU64,
    active: AtomicUsize,
}

impl Conn {
    /// Shuts the socket down both ways (the peer reads EOF).
    fn shutdown(&self) {
        if let Some(fd) = lock(&self.fd).as_ref() {
            let _ = socket2::SockRef::from(fd).shutdown(std::net::Shutdown::Both);
        }
    }

    /// Makes the socket's close send a RST.
    fn linger_zero(&self) {
        if let Some(fd) = lock(&self.fd).as_ref() {
            let _ = socket2::SockRef::from(fd).set_linger(Some(Duration::ZERO));
        }
    }
}

async fn serve_connection(stream: TcpStream, rec: Arc<Recorder>) {
    let _ = stream.set_nodelay(true);
    let fd = stream.as_fd().try_clone_to_owned().ok();
    let conn = Arc::new(Conn {
        fd: Mutex::new(fd),
        started: AtomicU64::new(0),
        active: AtomicUsize::new(0),
    });
    let c = conn.clone();
    let svc = service_fn(move |req| handle(rec.clone(), c.clone(), req));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await;
    // hyper has dropped its stream; closing the duplicate closes the socket (with a RST if a
    // handler asked for one).
    drop(lock(&conn.fd).take());
}

/// The handler failed the exchange on purpose.
#[derive(Debug)]
struct Broken;

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("exchange broken on purpose")
    }
}

impl std::error::Error for Broken {}

struct Active(Arc<Conn>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn handle(
    rec: Arc<Recorder>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Broken> {
    conn.started.fetch_add(1, Ordering::SeqCst);
    conn.active.fetch_add(1, Ordering::SeqCst);
    let _active = Active(conn.clone());
    let behaviour = Behaviour::parse(req.uri().query(), req.headers());
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let scope = header("authorization");
    let key = header("idempotency-key");
    let epoch = header("idempotency-epoch").parse().unwrap_or(0);
    let instance = header("x-chaos-instance").parse().ok();
    let attempt = header("x-chaos-attempt").parse().ok();
    let content_type = header("content-type");
    let method = req.method().to_string();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |pq| pq.as_str().to_owned());
    if req.method() == http::Method::GET {
        return Ok(respond(StatusCode::OK, Bytes::from_static(b"ok\n"), None));
    }
    let guard = InFlight::new(rec.clone());
    let received_us = rec.now_us();
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|_| Broken)?
        .to_bytes();
    let mut hasher = Sha256::new();
    for part in [
        method.as_bytes(),
        target.as_bytes(),
        content_type.as_bytes(),
        &body,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let received = Received {
        scope,
        key,
        epoch,
        instance,
        attempt,
        digest,
        behaviour: behaviour.clone(),
        received_us,
    };
    // The effect runs in a task of its own: if the connection goes away meanwhile, it still
    // happens and is logged, as in a real service.
    let effect = tokio::spawn({
        let rec = rec.clone();
        async move {
            let _in_flight = guard;
            if received.behaviour.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(received.behaviour.delay_ms)).await;
            }
            rec.record(received)
        }
    });
    let exec = effect.await.map_err(|_| Broken)?;
    let status = StatusCode::from_u16(exec.status).unwrap_or(StatusCode::CREATED);
    match behaviour.fail.filter(|_| exec.effect) {
        Some(Fail::Close) => {
            conn.shutdown();
            return Err(Broken);
        }
        Some(Fail::Reset) => {
            conn.linger_zero();
            return Err(Broken);
        }
        Some(Fail::Truncate) => {
            let half = exec.body.slice(..exec.body.len() / 2);
            let frames = futures_util::stream::iter(vec![
                Ok(Frame::data(half)),
                Err(std::io::Error::other("upstream broke off mid-response")),
            ]);
            let mut res = Response::new(StreamBody::new(frames).boxed_unsync());
            *res.status_mut() = status;
            res.headers_mut()
                .insert("content-length", HeaderValue::from(exec.body.len()));
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            return Ok(res);
        }
        None => {}
    }
    if behaviour.idle_close_ms > 0 {
        let seen = conn.started.load(Ordering::SeqCst);
        let weak = Arc::downgrade(&conn);
        tokio::spawn(close_when_idle(
            weak,
            seen,
            Duration::from_millis(behaviour.idle_close_ms),
        ));
    }
    Ok(respond(status, exec.body.clone(), Some(exec.id)))
}

/// Closes the connection if no request has started on it during `idle` (the keep-alive race:
/// a proxy may be writing its next request at that very moment).
async fn close_when_idle(conn: Weak<Conn>, seen: u64, idle: Duration) {
    tokio::time::sleep(idle).await;
    if let Some(conn) = conn.upgrade()
        && conn.started.load(Ordering::SeqCst) == seen
        && conn.active.load(Ordering::SeqCst) == 0
    {
        conn.shutdown();
    }
}

fn respond(status: StatusCode, body: Bytes, exec: Option<u64>) -> Response<Body> {
    let mut res = Response::new(Full::new(body).map_err(|e| match e {}).boxed_unsync());
    *res.status_mut() = status;
    let h = res.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if let Some(id) = exec {
        h.insert("x-chaos-exec", HeaderValue::from(id));
        // A secret idemgate must never store or replay (G6).
        if let Ok(v) = HeaderValue::from_str(&format!("chaos-session=secret-{id}; HttpOnly")) {
            h.insert("set-cookie", v);
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaviour_round_trips_through_the_query() {
        let b = Behaviour {
            delay_ms: 30,
            status: 500,
            transient: 1,
            transient_epoch: 2,
            fail: Some(Fail::Truncate),
            idle_close_ms: 300,
            pad: 64,
        };
        assert_eq!(Behaviour::parse(Some(&b.to_query()), &HeaderMap::new()), b);
        assert_eq!(Behaviour::default().to_string(), "normal");
        let mut h = HeaderMap::new();
        h.insert("x-chaos-fail", HeaderValue::from_static("reset"));
        assert_eq!(Behaviour::parse(None, &h).fail, Some(Fail::Reset));
    }
}
