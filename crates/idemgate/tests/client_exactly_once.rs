//! The retrying client (`idemgate-client`'s reqwest middleware) through the real `idemgate serve`
//! in front of a real upstream, over loopback sockets, with several concurrent tasks: whatever
//! the upstream or the network does, every logical operation has exactly one effect.
//!
//! - the upstream fails the first attempts (`503`): every operation succeeds, executed once;
//! - the connection between the client and idemgate breaks after the effect was applied: the
//!   client resends with the same key and gets the replay;
//! - the upstream breaks its connection after applying the effect: idemgate answers
//!   outcome-unknown, which the client never retries and reports with the key; reconciling by
//!   the key finds exactly one effect, and a later resend never runs it again;
//! - the upstream is slow: the client's attempts time out and are resent; idemgate answers them
//!   `409` in flight (or holds them) until the first one completes, then replays it.
//!
//! Nothing here depends on timing: delays only change how many attempts an operation takes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Proxy, Upstream};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemgate_client::reqwest::{RetryMiddleware, client_error};
use idemgate_client::{Error, Policy, PolicyBuilder, RetryInfo};
use reqwest_middleware::ClientWithMiddleware;

const TASKS: usize = 6;
const OPS: usize = 5;

fn client(policy: PolicyBuilder) -> ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new(policy.build().unwrap()))
        .build()
}

/// One finished operation.
#[derive(Debug)]
struct Done {
    status: u16,
    info: RetryInfo,
    body: serde_json::Value,
}

/// Runs TASKS × `ops` operations (`POST url`, a distinct JSON body each) concurrently.
async fn run_all(
    client: &ClientWithMiddleware,
    url: &str,
    ops: usize,
) -> Vec<Result<Done, reqwest_middleware::Error>> {
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (client, url) = (client.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for op in 0..ops {
                let res = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"task":{t},"op":{op}}}"#))
                    .send()
                    .await;
                out.push(match res {
                    Ok(res) => {
                        let status = res.status().as_u16();
                        let info = res.extensions().get::<RetryInfo>().cloned().unwrap();
                        let bytes = res.bytes().await.unwrap_or_default();
                        let body =
                            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
                        Ok(Done { status, info, body })
                    }
                    Err(e) => Err(e),
                });
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn print_log(what: &str, done: &Done) {
    eprintln!(
        "{what}: {} in {} attempt(s), key {:?}, replay {}",
        done.status, done.info.attempts, done.info.key, done.info.replayed
    );
    for a in &done.info.log {
        eprintln!("    {a}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operation_succeeds_once_when_the_upstream_fails_its_first_attempts() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    // The default breaker stays on: it counts operations, not attempts, so two failed attempts
    // cured by the third (two thirds of all attempts fail here) never open it.
    let client = client(
        Policy::builder()
            .base_delay(Duration::from_millis(5))
            .max_attempts(4),
    );
    let results = run_all(&client, &proxy.url("/orders?fail_first=2"), OPS).await;
    let mut keys = HashSet::new();
    for r in &results {
        let done = r.as_ref().unwrap();
        assert_eq!(done.status, 201, "{done:?}");
        assert_eq!(done.info.attempts, 3, "{done:?}");
        assert!(!done.info.replayed);
        let key = done.info.key.clone().unwrap();
        assert_eq!(done.body["idempotency_key"], key.as_str());
        assert_eq!(done.body["executions"], 1);
        // Two released epochs (the upstream's 503s), then the third dispatch ran.
        assert_eq!(done.body["idempotency_epoch"], "3");
        assert_eq!(up.state.executions_of(&key), 1);
        assert!(keys.insert(key), "one key per logical operation");
    }
    print_log("first of them", results[0].as_ref().unwrap());
    assert_eq!(up.state.executions(), TASKS * OPS);
    assert_eq!(up.state.failed(), 2 * TASKS * OPS);
}

/// A front between the client and idemgate that forwards each request, reads idemgate's whole
/// answer, and — the first time it sees a key — closes the client's connection instead of
/// answering: the effect is applied and stored, the client sees a broken connection.
struct BreakingFront {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BreakingFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BreakingFront {
    async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<HashSet<String>>> = Arc::default();
        let upstream: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, upstream) = (seen.clone(), upstream.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        forward(req, target, seen.clone(), upstream.clone())
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn forward(
    req: Request<Incoming>,
    target: SocketAddr,
    seen: Arc<Mutex<HashSet<String>>>,
    upstream: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let key = parts
        .headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let uri = format!(
        "http://{target}{}",
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut out = Request::builder().method(parts.method).uri(uri);
    for (name, value) in &parts.headers {
        if name != http::header::HOST {
            out = out.header(name, value);
        }
    }
    let res = upstream.request(out.body(Full::new(body))?).await?;
    let (parts, body) = res.into_parts();
    let body = body.collect().await?.to_bytes();
    let first = seen.lock().unwrap().insert(key);
    if first {
        return Err(
            std::io::Error::other("the front breaks the connection after the effect").into(),
        );
    }
    let mut back = Response::builder().status(parts.status);
    for (name, value) in &parts.headers {
        if name != http::header::TRANSFER_ENCODING && name != http::header::CONNECTION {
            back = back.header(name, value);
        }
    }
    Ok(back.body(Full::new(body))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_broken_after_the_effect_is_resent_and_replayed() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let front = BreakingFront::start(proxy.addr).await;
    // Default breaker: every first attempt fails here, but every operation succeeds.
    let client = client(Policy::builder().base_delay(Duration::from_millis(5)));
    let results = run_all(&client, &front.url("/orders"), OPS).await;
    for r in &results {
        let done = r.as_ref().unwrap();
        assert_eq!(done.status, 201, "{done:?}");
        assert_eq!(done.info.attempts, 2, "{done:?}");
        assert!(
            done.info.replayed,
            "the second attempt is answered from the first"
        );
        assert!(
            done.info.log[0].outcome.starts_with("interrupted"),
            "{:?}",
            done.info.log
        );
        let key = done.info.key.clone().unwrap();
        assert_eq!(done.body["executions"], 1);
        assert_eq!(up.state.executions_of(&key), 1);
    }
    print_log("first of them", results[0].as_ref().unwrap());
    assert_eq!(up.state.executions(), TASKS * OPS);
    let _: Option<Infallible> = None;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_breaks_after_the_effect_gives_outcome_unknown_with_the_key() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    // Breaker off, on purpose: every operation here ends outcome-unknown, a server-side failure
    // (100 % of operations), so the default breaker would rightly open after 5 of them and fail
    // the rest fast with CircuitOpen — this test is about each one's key and effect.
    let client = client(
        Policy::builder()
            .base_delay(Duration::from_millis(5))
            .no_breaker(),
    );
    let url = proxy.url("/orders?truncate=1");
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (client, url) = (client.clone(), url.clone());
        let state = up.state.clone();
        tasks.push(tokio::spawn(async move {
            for op in 0..OPS {
                let body = format!(r#"{{"task":{t},"op":{op}}}"#);
                let err = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap_err();
                let e = client_error(&err).expect("the client's error");
                let Error::OutcomeUnknown { key, info, .. } = e else {
                    panic!("{e:?}")
                };
                // Never retried by the client...
                assert_eq!(info.attempts, 1);
                // ...and the caller reconciles by the key: the effect happened, exactly once.
                assert_eq!(state.executions_of(key), 1);
                // A later resend of the same request with the same key is answered
                // outcome-unknown again by idemgate: never run twice.
                let again = client
                    .post(&url)
                    .header("idempotency-key", key.as_str())
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap_err();
                assert!(
                    matches!(client_error(&again), Some(Error::OutcomeUnknown { .. })),
                    "{again:?}"
                );
                assert_eq!(state.executions_of(key), 1);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(up.state.started(), TASKS * OPS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_is_waited_out_and_replayed() {
    let up = Upstream::start().await;
    // Reject mode: a resend while the first runs gets 409 + Retry-After (the lease left, ≥ 1 s).
    let proxy = Proxy::start(
        &up.url(),
        "memory://",
        &["--concurrency", "reject", "--lease-ttl", "2s"],
    );
    let client = client(
        Policy::builder()
            .base_delay(Duration::from_millis(50))
            .attempt_timeout(Duration::from_millis(300))
            // Default breaker: every first attempt times out here, but every operation ends
            // with the replay (a success).
            .max_attempts(10),
    );
    let results = run_all(&client, &proxy.url("/orders?delay_ms=1000"), 2).await;
    let mut waited = 0;
    for r in &results {
        let done = r.as_ref().unwrap();
        assert_eq!(done.status, 201, "{done:?}");
        // The first attempt was abandoned at 300 ms (the upstream takes 1 s); the answer that
        // came back is its replay.
        assert!(done.info.replayed, "{done:?}");
        assert!(done.info.attempts >= 2);
        let key = done.info.key.clone().unwrap();
        assert_eq!(done.body["executions"], 1);
        assert_eq!(up.state.executions_of(&key), 1);
        waited += usize::from(done.info.log.iter().any(|a| a.reason == "in flight (409)"));
    }
    print_log("first of them", results[0].as_ref().unwrap());
    eprintln!(
        "{waited} of {} operations waited on a 409 in flight",
        results.len()
    );
    assert_eq!(up.state.started(), results.len());
}
