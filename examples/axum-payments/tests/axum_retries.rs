//! The example over a real socket: retries replay, the ledger charges once.

#![allow(clippy::unwrap_used)]

use axum_payments::{Ledger, app};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_through_axum_charge_once() {
    let ledger = Ledger::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = app(ledger.clone());
    tokio::spawn(async move { axum::serve(listener, tower::make::Shared::new(svc)).await });
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let req = Request::post(format!("http://{addr}/payments"))
            .header("idempotency-key", "order-7")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"amount\":5}")))
            .unwrap();
        let res = client.request(req).await.unwrap();
        assert_eq!(res.status(), 201);
        bodies.push(res.into_body().collect().await.unwrap().to_bytes());
    }
    assert_eq!(ledger.charges(), 1);
    assert!(bodies.iter().all(|b| b == &bodies[0]));
    let no_key = Request::post(format!("http://{addr}/payments"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(client.request(no_key).await.unwrap().status(), 400);
}
