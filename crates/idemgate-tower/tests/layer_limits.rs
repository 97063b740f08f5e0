//! The layer's limits count what is really in flight: a client that goes away after sending its
//! request does not give its slot back while the upstream call it started still runs (that call
//! goes on in its own task, and holds its body in memory).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use idemgate_core::{Engine, MemoryStore};
use idemgate_tower::IdempotencyLayer;
use idemgate_tower::body::{IdemBody, full};
use idemgate_tower::policy::Routes;
use tokio::sync::Notify;
use tower::{Service, ServiceExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_keeps_its_slot_until_the_upstream_call_ends() {
    let started = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let app = tower::service_fn({
        let (started, release) = (started.clone(), release.clone());
        move |req: Request<IdemBody>| {
            let (started, release) = (started.clone(), release.clone());
            let held = req.headers()["idempotency-key"] == "first";
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                if held {
                    release.notified().await;
                }
                Ok::<_, Infallible>(Response::new(full(Bytes::from_static(b"done"))))
            }
        }
    });
    let layer = IdempotencyLayer::builder(Engine::builder(MemoryStore::default()).build())
        .routes(Routes::catch_all(false))
        .max_concurrent_requests(1)
        .build();
    let svc = tower::ServiceBuilder::new().layer(layer).service(app);
    let post = |key: &'static str| {
        Request::post("/pay")
            .header("idempotency-key", key)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    // The first client sends, the upstream starts, and the client goes away.
    let first = tokio::spawn({
        let mut svc = svc.clone();
        let req = post("first");
        async move {
            ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
                .await
                .unwrap()
                .call(req)
                .await
        }
    });
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while started.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream never started"
        );
        tokio::task::yield_now().await;
    }
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    // Its upstream call still runs: the one slot is still taken.
    let mut second = svc.clone();
    let res = ServiceExt::<Request<Full<Bytes>>>::ready(&mut second)
        .await
        .unwrap()
        .call(post("second"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        started.load(Ordering::SeqCst),
        1,
        "the second was not forwarded"
    );
    // Once the upstream call ends, the slot is free again.
    release.notify_waiters();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut third = svc.clone();
        let res = ServiceExt::<Request<Full<Bytes>>>::ready(&mut third)
            .await
            .unwrap()
            .call(post("third"))
            .await
            .unwrap();
        if res.status() == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::task::yield_now().await;
    }
}
