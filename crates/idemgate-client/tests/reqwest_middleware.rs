//! The reqwest middleware against a scripted HTTP server over loopback sockets: what goes on the
//! wire, how reqwest's errors are classified, how a problem+json answer read for classification
//! is handed back intact. Delays are 1 ms (real time, tiny): no assertion depends on timing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemgate_client::reqwest::{RetryMiddleware, client_error};
use idemgate_client::{Error, ErrorKind, Policy, PolicyBuilder, RetryInfo, Stop};
use reqwest_middleware::ClientWithMiddleware;

/// What the server does with request number n.
#[derive(Clone)]
enum Act {
    Answer(u16, Vec<(&'static str, &'static str)>, &'static str),
    /// Close the connection without answering (after reading the request).
    Drop,
    /// Answer 201 after a pause.
    Slow(Duration),
}

fn answer(status: u16) -> Act {
    Act::Answer(status, vec![], "")
}

#[derive(Clone, Debug)]
struct Seen {
    key: Option<String>,
    body: Bytes,
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(script: impl Fn(usize) -> Act + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script: Script = Arc::new(script);
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (script, log) = (script.clone(), log.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        handle(req, script.clone(), log.clone())
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, seen, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Script = Arc<dyn Fn(usize) -> Act + Send + Sync>;

async fn handle(
    req: Request<Incoming>,
    script: Script,
    log: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let key = req
        .headers()
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = req.into_body().collect().await?.to_bytes();
    let n = {
        let mut log = log.lock().unwrap();
        log.push(Seen { key, body });
        log.len() - 1
    };
    match script(n) {
        Act::Answer(status, headers, body) => {
            let mut res = Response::builder().status(status);
            for (k, v) in headers {
                res = res.header(k, v);
            }
            Ok(res.body(Full::new(Bytes::from_static(body.as_bytes())))?)
        }
        Act::Drop => Err(std::io::Error::other("dropped on purpose").into()),
        Act::Slow(d) => {
            tokio::time::sleep(d).await;
            Ok(Response::builder()
                .status(201)
                .body(Full::new(Bytes::new()))?)
        }
    }
}

fn fast() -> PolicyBuilder {
    Policy::builder()
        .base_delay(Duration::from_millis(1))
        .max_delay(Duration::from_millis(5))
        .seed(3)
}

fn client(policy: PolicyBuilder) -> ClientWithMiddleware {
    reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new(policy.build().unwrap()))
        .build()
}

fn info(res: &reqwest::Response) -> RetryInfo {
    res.extensions().get::<RetryInfo>().cloned().unwrap()
}

#[tokio::test]
async fn one_key_on_the_wire_for_every_attempt_and_the_extension() {
    let server = Server::start(|n| {
        if n < 2 {
            answer(503)
        } else {
            Act::Answer(
                201,
                vec![("content-type", "application/json")],
                r#"{"id":1}"#,
            )
        }
    })
    .await;
    let res = client(fast())
        .post(server.url("/orders"))
        .body(r#"{"sku":"tea"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let info = info(&res);
    assert_eq!(info.attempts, 3);
    assert_eq!(res.text().await.unwrap(), r#"{"id":1}"#);
    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    let key = seen[0].key.clone().unwrap();
    assert!(seen.iter().all(|s| s.key.as_deref() == Some(key.as_str())));
    assert!(seen.iter().all(|s| s.body == r#"{"sku":"tea"}"#));
    assert_eq!(info.key, Some(key));
}

#[tokio::test]
async fn the_callers_key_goes_out_untouched() {
    let server = Server::start(|n| answer(if n == 0 { 502 } else { 200 })).await;
    let res = client(fast())
        .post(server.url("/orders"))
        .header("Idempotency-Key", "caller-key-7")
        .send()
        .await
        .unwrap();
    assert!(!info(&res).key_generated);
    assert!(
        server
            .seen()
            .iter()
            .all(|s| s.key.as_deref() == Some("caller-key-7"))
    );
}

#[tokio::test]
async fn outcome_unknown_surfaces_as_a_typed_error_with_the_key() {
    let server = Server::start(|_| {
        Act::Answer(
            502,
            vec![("content-type", "application/problem+json")],
            r#"{"type":"urn:idemgate:problem:outcome-unknown","status":502}"#,
        )
    })
    .await;
    let err = client(fast())
        .post(server.url("/orders"))
        .send()
        .await
        .unwrap_err();
    let e = client_error(&err).expect("the client's error");
    assert_eq!(e.kind(), ErrorKind::OutcomeUnknown);
    let Error::OutcomeUnknown { key, info, .. } = e else {
        panic!("{e:?}")
    };
    assert_eq!(Some(key.as_str()), server.seen()[0].key.as_deref());
    assert_eq!(info.attempts, 1);
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn a_problem_answer_read_for_classification_is_returned_intact() {
    let body = r#"{"type":"urn:idemgate:problem:not-replayable","status":410}"#;
    let server = Server::start(move |_| {
        Act::Answer(
            410,
            vec![
                ("content-type", "application/problem+json"),
                ("x-trace", "abc"),
            ],
            body,
        )
    })
    .await;
    let url = server.url("/orders?x=1");
    let res = client(fast()).post(&url).send().await.unwrap();
    assert_eq!(res.status(), 410);
    assert_eq!(res.url().as_str(), url);
    assert_eq!(res.headers()["x-trace"], "abc");
    assert_eq!(info(&res).attempts, 1);
    assert_eq!(res.text().await.unwrap(), body);
}

#[tokio::test]
async fn in_flight_then_replay() {
    let server = Server::start(|n| {
        if n == 0 {
            Act::Answer(
                409,
                vec![
                    ("content-type", "application/problem+json"),
                    ("retry-after", "0"),
                ],
                r#"{"type":"urn:idemgate:problem:request-in-flight"}"#,
            )
        } else {
            Act::Answer(201, vec![("idempotent-replayed", "true")], "first answer")
        }
    })
    .await;
    let res = client(fast().max_attempts(1))
        .post(server.url("/orders"))
        .send()
        .await
        .unwrap();
    let info = info(&res);
    assert_eq!(
        (res.status().as_u16(), info.attempts, info.replayed),
        (201, 2, true)
    );
    assert_eq!(res.text().await.unwrap(), "first answer");
}

#[tokio::test]
async fn connection_refused_is_retried_then_reported_with_the_last_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = client(fast())
        .post(format!("http://127.0.0.1:{port}/orders"))
        .send()
        .await
        .unwrap_err();
    let e = client_error(&err).expect("the client's error");
    assert_eq!(e.kind(), ErrorKind::AttemptsExhausted);
    assert_eq!(e.attempts(), 3);
    let source = std::error::Error::source(e).unwrap();
    let reqwest_err = source.downcast_ref::<reqwest::Error>().unwrap();
    assert!(reqwest_err.is_connect());
    assert!(e.info().unwrap().log[0].outcome.starts_with("not_sent"));
}

#[tokio::test]
async fn a_connection_dropped_after_sending_is_retried_with_the_same_key() {
    let server = Server::start(|n| if n == 0 { Act::Drop } else { answer(201) }).await;
    let res = client(fast())
        .post(server.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!((res.status().as_u16(), info(&res).attempts), (201, 2));
    let seen = server.seen();
    assert_eq!(seen[0].key, seen[1].key);
    assert!(info(&res).log[0].outcome.starts_with("interrupted"));

    // Without a key, a POST that may have been received is not resent.
    let server = Server::start(|_| Act::Drop).await;
    let err = client(fast().key_methods([]))
        .post(server.url("/orders"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        client_error(&err).unwrap().kind(),
        ErrorKind::NotSafeToRetry
    );
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn a_slow_attempt_is_cut_and_resent() {
    let server = Server::start(|n| {
        if n == 0 {
            Act::Slow(Duration::from_secs(30))
        } else {
            answer(201)
        }
    })
    .await;
    let res = client(
        fast()
            .attempt_timeout(Duration::from_millis(200))
            .max_attempts(5),
    )
    .post(server.url("/orders"))
    .send()
    .await
    .unwrap();
    assert_eq!(res.status(), 201);
    let info = info(&res);
    assert!(info.log[0].outcome.starts_with("timeout"), "{:?}", info.log);
    let seen = server.seen();
    assert!(seen.iter().all(|s| s.key == seen[0].key));
}

fn streamed(chunks: &[&'static str]) -> reqwest::Body {
    let frames: Vec<Result<http_body::Frame<Bytes>, Infallible>> = chunks
        .iter()
        .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    reqwest::Body::wrap(StreamBody::new(futures_util::stream::iter(frames)))
}

#[tokio::test]
async fn streamed_bodies_are_buffered_to_the_cap_or_sent_once() {
    let server = Server::start(|n| answer(if n == 0 { 503 } else { 201 })).await;
    let res = client(fast().body_limit(64))
        .post(server.url("/upload"))
        .body(streamed(&["part one, ", "part two"]))
        .send()
        .await
        .unwrap();
    let i = info(&res);
    assert_eq!(
        (res.status().as_u16(), i.attempts, i.body_retryable),
        (201, 2, true)
    );
    assert!(server.seen().iter().all(|s| s.body == "part one, part two"));

    let server = Server::start(|_| answer(503)).await;
    let res = client(fast().body_limit(4))
        .post(server.url("/upload"))
        .body(streamed(&["part one, ", "part two"]))
        .send()
        .await
        .unwrap();
    let i = info(&res);
    assert_eq!(
        (i.attempts, i.stop, i.body_retryable),
        (1, Stop::BodyNotRetryable, false)
    );
    assert_eq!(server.seen()[0].body, "part one, part two");
}

#[tokio::test]
async fn upstream_failed_is_not_resent_and_names_the_key() {
    // Review S1.
    let server = Server::start(|n| {
        if n == 0 {
            Act::Answer(
                502,
                vec![("content-type", "application/problem+json")],
                r#"{"type":"urn:idemgate:problem:upstream-failed","cause":"timeout"}"#,
            )
        } else {
            answer(201)
        }
    })
    .await;
    let err = client(fast())
        .post(server.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap_err();
    let e = client_error(&err).expect("the client's error");
    let Error::OutcomeUnknown {
        key,
        unprotected: true,
        info,
        ..
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!(Some(key.as_str()), server.seen()[0].key.as_deref());
    assert_eq!(info.attempts, 1);
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn an_oversized_problem_answer_is_final_by_status_and_intact() {
    // Review m6: a problem+json body over 64 KiB, sent chunked (no Content-Length).
    let big: &'static str = Box::leak(
        format!(
            r#"{{"type":"urn:example:gone","detail":"{}"}}"#,
            "y".repeat(100 * 1024)
        )
        .into_boxed_str(),
    );
    let server = Server::start(move |n| {
        if n == 0 {
            Act::Answer(
                410,
                vec![
                    ("content-type", "application/problem+json"),
                    ("transfer-encoding", "chunked"),
                ],
                big,
            )
        } else {
            answer(201)
        }
    })
    .await;
    let res = client(fast())
        .post(server.url("/orders"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 410);
    assert!(res.headers().get("content-length").is_none(), "chunked");
    assert_eq!(info(&res).attempts, 1);
    assert_eq!(res.text().await.unwrap(), big);
    assert_eq!(server.seen().len(), 1);
}
