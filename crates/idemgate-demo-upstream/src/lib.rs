//! A small counting HTTP API to put idemgate in front of, for demos and tests.
//!
//! Every `POST`, `PUT`, `PATCH` or `DELETE` is an "execution": it is counted per
//! `(path, Idempotency-Key)` and answered `201` with a JSON body saying how many times that key ran.
//! Query parameters shape the answer:
//!
//! | parameter | effect |
//! | --- | --- |
//! | `status=N` | answer with status N |
//! | `delay_ms=N` | wait N ms before answering |
//! | `hold=1` | wait until [`Upstream::release_held`] is called (tests) |
//! | `size=N` | pad the body to N bytes |
//! | `truncate=1` | send half of the body, then break the connection |
//! | `fail_first=N` | answer the first N requests of each `(path, Idempotency-Key)` with `503` + `Retry-After: 0`, without executing (a flaky API, for retrying clients) |
//!
//! `GET /_stats` returns the counters; any other `GET` answers `200 hello`.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! let upstream = idemgate_demo_upstream::Upstream::default();
//! upstream.serve(listener).await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The API's state. Cloning shares it.
#[derive(Clone, Default)]
pub struct Upstream {
    inner: Arc<State>,
}

#[derive(Default)]
struct State {
    total: AtomicUsize,
    started: AtomicUsize,
    per_key: parking::Mutex<HashMap<String, usize>>,
    /// Requests seen per `(path, key)` by `fail_first`.
    tries: parking::Mutex<HashMap<(String, String), usize>>,
    failed: AtomicUsize,
    release: Notify,
    held: AtomicUsize,
}

mod parking {
    /// A std mutex that ignores poisoning (a panicking handler must not wedge the counters).
    #[derive(Default)]
    pub struct Mutex<T>(std::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub fn lock(&self) -> std::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}

impl Upstream {
    /// Executions finished (answered or broken off) so far, over all keys.
    pub fn executions(&self) -> usize {
        self.inner.total.load(Ordering::SeqCst)
    }

    /// Executions that have started (including ones still running or held).
    pub fn started(&self) -> usize {
        self.inner.started.load(Ordering::SeqCst)
    }

    /// Executions for one key (any path).
    pub fn executions_of(&self, key: &str) -> usize {
        self.inner.per_key.lock().get(key).copied().unwrap_or(0)
    }

    /// Requests refused by `fail_first` so far.
    pub fn failed(&self) -> usize {
        self.inner.failed.load(Ordering::SeqCst)
    }

    /// Requests waiting on `hold=1` right now.
    pub fn held(&self) -> usize {
        self.inner.held.load(Ordering::SeqCst)
    }

    /// Lets every held request answer.
    pub fn release_held(&self) {
        self.inner.release.notify_waiters();
    }

    /// Serves on `listener` until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(self.clone().serve_connection(stream));
        }
    }

    /// Serves one connection on `io`, whatever carries it (e.g. a TLS stream), until it closes.
    pub async fn serve_connection<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let svc = service_fn(move |req| {
            let this = self.clone();
            async move { Ok::<_, Infallible>(this.handle(req).await) }
        });
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), svc)
            .await;
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let path = req.uri().path().to_owned();
        if req.method() == http::Method::GET {
            if path == "/_stats" {
                let per_key = self.inner.per_key.lock().clone();
                return json_response(
                    StatusCode::OK,
                    json!({ "executions": self.executions(), "per_key": per_key }).to_string(),
                );
            }
            return text(StatusCode::OK, "hello\n");
        }
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let key = header("idempotency-key").unwrap_or_default();
        let epoch = header("idempotency-epoch").unwrap_or_default();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if let Some(n) = query
            .get("fail_first")
            .and_then(|v| v.parse::<usize>().ok())
        {
            let tries = {
                let mut tries = self.inner.tries.lock();
                let t = tries.entry((path.clone(), key.clone())).or_insert(0);
                *t += 1;
                *t
            };
            if tries <= n {
                self.inner.failed.fetch_add(1, Ordering::SeqCst);
                let mut res = json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": "temporarily unavailable", "try": tries }).to_string(),
                );
                res.headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("0"));
                return res;
            }
        }
        self.inner.started.fetch_add(1, Ordering::SeqCst);
        if query.get("hold").is_some_and(|v| v == "1") {
            let released = self.inner.release.notified();
            self.inner.held.fetch_add(1, Ordering::SeqCst);
            released.await;
            self.inner.held.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(ms) = query.get("delay_ms").and_then(|v| v.parse().ok()) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let n = {
            let mut per_key = self.inner.per_key.lock();
            let n = per_key.entry(key.clone()).or_insert(0);
            *n += 1;
            *n
        };
        self.inner.total.fetch_add(1, Ordering::SeqCst);
        let status = query
            .get("status")
            .and_then(|v| v.parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::CREATED);
        let mut doc = json!({
            "executions": n,
            "path": path,
            "idempotency_key": key,
            "idempotency_epoch": epoch,
            "request_bytes": body.len(),
        })
        .to_string();
        if let Some(size) = query.get("size").and_then(|v| v.parse::<usize>().ok()) {
            while doc.len() < size {
                doc.push(' ');
            }
        }
        if query.get("truncate").is_some_and(|v| v == "1") {
            let half = Bytes::from(doc[..doc.len() / 2].to_owned());
            let frames = futures_util::stream::iter(vec![
                Ok(Frame::data(half)),
                Err(std::io::Error::other("upstream broke off mid-response")),
            ]);
            let mut res = Response::new(StreamBody::new(frames).boxed_unsync());
            *res.status_mut() = status;
            res.headers_mut()
                .insert("content-length", http::HeaderValue::from(doc.len()));
            return res;
        }
        let mut res = json_response(status, doc);
        res.headers_mut()
            .insert("x-upstream", http::HeaderValue::from_static("demo"));
        res.headers_mut().insert(
            "set-cookie",
            http::HeaderValue::from_static("session=upstream-secret; HttpOnly"),
        );
        res
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    res
}

fn json_response(status: StatusCode, body: String) -> Response<Body> {
    let mut res = Response::new(full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    res
}
