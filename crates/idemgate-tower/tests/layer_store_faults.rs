//! When the store cannot be reached: fail closed (`503`, nothing forwarded) or fail open (forwarded
//! unprotected), and recovery without a restart once it is back. The layer is served by hyper on a
//! loopback socket; the store is a real memory store behind a fault-injection switch.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use idemgate_core::testkit::faults::Faulty;
use idemgate_core::{Engine, MemoryStore};
use idemgate_tower::IdempotencyLayer;
use idemgate_tower::body::{IdemBody, full};
use idemgate_tower::policy::{FailMode, RoutePolicy, Routes};

async fn serve(fail_mode: FailMode) -> (SocketAddr, Faulty<MemoryStore>, Arc<AtomicUsize>) {
    serve_route(RoutePolicy::new("r", "/**").fail_mode(fail_mode)).await
}

async fn serve_route(route: RoutePolicy) -> (SocketAddr, Faulty<MemoryStore>, Arc<AtomicUsize>) {
    let store = Faulty::new(MemoryStore::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = tower::service_fn(move |_req: Request<IdemBody>| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        async move { Ok::<_, Infallible>(Response::new(full(Bytes::from(format!("call {n}"))))) }
    });
    let routes = Routes::new(vec![route]);
    let svc = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(
            Engine::builder(store.clone()).build(),
            routes,
        ))
        .service(app);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = TowerToHyperService::new(svc.clone());
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (addr, store, calls)
}

async fn post(addr: SocketAddr, key: &str) -> (StatusCode, Bytes) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{addr}/pay"))
        .header("idempotency-key", key)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let status = res.status();
    (status, res.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_503_forwards_nothing_and_recovers() {
    let (addr, store, calls) = serve(FailMode::Closed).await;
    store.set_down(true);
    for _ in 0..3 {
        let (status, body) = post(addr, "k").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(String::from_utf8_lossy(&body).contains("urn:idemgate:problem:store-unavailable"));
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "nothing may be forwarded without a claim"
    );
    store.set_down(false);
    assert_eq!(
        post(addr, "k").await,
        (StatusCode::OK, Bytes::from("call 1"))
    );
    assert_eq!(
        post(addr, "k").await,
        (StatusCode::OK, Bytes::from("call 1"))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_forwards_without_protection() {
    let (addr, store, calls) = serve(FailMode::Open).await;
    store.set_down(true);
    assert_eq!(post(addr, "k").await.0, StatusCode::OK);
    assert_eq!(post(addr, "k").await.0, StatusCode::OK);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "unprotected: each request runs"
    );
}

/// Fail-open forwards only when the store could not answer: a full store or a corrupt record
/// answered, and forwarding past it could run a request twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_never_forwards_past_a_full_store_or_a_corrupt_record() {
    let (addr, store, calls) = serve(FailMode::Open).await;
    store.set_failing_with("claim", idemgate_core::ErrorKind::Capacity);
    let (status, body) = post(addr, "k").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&body).contains("urn:idemgate:problem:store-full"));
    store.set_failing_with("claim", idemgate_core::ErrorKind::Corrupt);
    let (status, body) = post(addr, "k").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(body.contains("urn:idemgate:problem:store-unavailable"));
    assert!(
        !body.contains("injected fault"),
        "the store error's text stays in the logs: {body}"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "nothing forwarded unprotected"
    );
}

/// Under takeover recovery, an outcome the store has not confirmed is not handed out as final:
/// had the holder died after answering, its lapsed lease would let a retry run the request again
/// after its client had the outcome (found by the chaos soak). The client gets `409` in-flight
/// with `Retry-After`; its retry waits for the record and replays it. Under strict recovery the
/// answer goes out at once (nothing can run again there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_not_yet_recorded_is_409_under_takeover_and_answered_under_strict() {
    let (addr, store, calls) = serve(FailMode::Closed).await;
    store.set_failing("complete", true);
    let (status, body) = post(addr, "rec").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body:?}");
    assert!(String::from_utf8_lossy(&body).contains("urn:idemgate:problem:request-in-flight"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    store.set_failing("complete", false);
    assert_eq!(
        post(addr, "rec").await,
        (StatusCode::OK, Bytes::from("call 1")),
        "the retry gets the recorded outcome"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let (addr, store, calls) =
        serve_route(RoutePolicy::new("r", "/**").recovery(idemgate_core::engine::Recovery::Strict))
            .await;
    store.set_failing("complete", true);
    assert_eq!(
        post(addr, "rec").await,
        (StatusCode::OK, Bytes::from("call 1"))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A request forwarded unprotected (fail-open, store down) keeps its body's bytes reserved in
/// `max_buffered_body_bytes`'s budget while the upstream handles it: the budget counts what is
/// in memory and in flight on this path too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_holds_the_body_reservation_while_forwarding() {
    use idemgate_tower::body::BodyBudget;
    let store = Faulty::new(MemoryStore::default());
    let budget = BodyBudget::new(1 << 20);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (app_budget, app_seen) = (budget.clone(), seen.clone());
    let app = tower::service_fn(move |_req: Request<IdemBody>| {
        app_seen.lock().unwrap().push(app_budget.in_use());
        async move { Ok::<_, Infallible>(Response::new(full(Bytes::from_static(b"ok")))) }
    });
    let routes = Routes::new(vec![RoutePolicy::new("r", "/**").fail_mode(FailMode::Open)]);
    let svc = tower::ServiceBuilder::new()
        .layer(
            IdempotencyLayer::builder(Engine::builder(store.clone()).build())
                .routes(routes)
                .body_budget(budget.clone())
                .build(),
        )
        .service(app);
    store.set_down(true);
    let body = Bytes::from(vec![b'x'; 1000]);
    let req = Request::post("/pay")
        .header("idempotency-key", "k")
        .header("content-length", body.len())
        .body(full(body))
        .unwrap();
    let res = tower::ServiceExt::oneshot(svc, req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "forwarded once, unprotected");
    assert!(
        seen[0] >= 1000,
        "the body's 1000 bytes were not reserved while forwarding: {seen:?}"
    );
    drop(res);
    assert_eq!(budget.in_use(), 0, "released once answered");
}
