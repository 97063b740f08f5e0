//! The client's overhead per request on a healthy server (no retries happen): what the policy
//! costs on the path every request takes — key generation, the per-host state lookup, the
//! breaker's admission and record, the budget's refund, the attempt span, the extension.
//!
//! - `loopback/*`: a POST to a hyper server on loopback (answers `201` at once, its own runtime
//!   thread), with bare reqwest, with an empty reqwest-middleware chain, and with
//!   `RetryMiddleware` (default policy). The ratio of the last to the first is the overhead a
//!   user sees.
//! - `in_process/*`: the same POST through a tower `service_fn` answering at once, bare and behind
//!   `RetryLayer`: the client's own cost without any I/O.
//!
//! `cargo bench -p idemgate-client --features reqwest,tower --bench overhead`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemgate_client::Policy;
use idemgate_client::reqwest::RetryMiddleware;
use idemgate_client::tower::RetryLayer;
use tower::{Layer, Service, ServiceExt};

const BODY: &str = r#"{"sku":"tea","qty":1}"#;

/// A hyper server answering every request `201` with a small JSON body, on its own thread.
fn server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let _ = req.into_body().collect().await;
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(StatusCode::CREATED)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from_static(b"{\"id\":1}")))
                                    .unwrap(),
                            )
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

fn loopback(c: &mut Criterion) {
    let addr = server();
    let url = format!("http://{addr}/orders");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare = reqwest::Client::new();
    let empty = reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).build();
    let retrying = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new(Policy::new()))
        .build();
    let mut g = c.benchmark_group("loopback");
    g.measurement_time(Duration::from_secs(6));
    g.bench_function("bare_reqwest", |b| {
        b.to_async(&rt).iter(|| async {
            let res = bare.post(&url).body(BODY).send().await.unwrap();
            assert_eq!(res.status(), 201);
            res.bytes().await.unwrap()
        });
    });
    g.bench_function("reqwest_middleware_empty", |b| {
        b.to_async(&rt).iter(|| async {
            let res = empty.post(&url).body(BODY).send().await.unwrap();
            res.bytes().await.unwrap()
        });
    });
    g.bench_function("idemgate_client", |b| {
        b.to_async(&rt).iter(|| async {
            let res = retrying.post(&url).body(BODY).send().await.unwrap();
            assert_eq!(res.status(), 201);
            res.bytes().await.unwrap()
        });
    });
    g.finish();
}

fn in_process(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    async fn created<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(Response::builder()
            .status(StatusCode::CREATED)
            .body(Full::new(Bytes::from_static(b"{\"id\":1}")))
            .unwrap())
    }
    let request = || {
        Request::post("http://shop.test/orders")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(BODY.as_bytes())))
            .unwrap()
    };
    let mut g = c.benchmark_group("in_process");
    g.bench_function("bare_service", |b| {
        let mut svc = tower::service_fn(created::<Full<Bytes>>);
        b.to_async(&rt).iter(|| {
            let fut = svc.call(request());
            async move { fut.await.unwrap() }
        });
    });
    g.bench_function("retry_layer", |b| {
        let svc = RetryLayer::new(Policy::new()).layer(tower::service_fn(
            created::<idemgate_client::tower::RequestBody>,
        ));
        b.to_async(&rt).iter(|| {
            let svc = svc.clone();
            async move { svc.oneshot(request()).await.unwrap() }
        });
    });
    g.finish();
}

criterion_group!(benches, loopback, in_process);
criterion_main!(benches);
