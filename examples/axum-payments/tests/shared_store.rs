//! Two instances of the example on one shared store (real Redis, real PostgreSQL), wired with
//! `idemgate_stores::connect` as a service author would: a retry that reaches the other instance
//! gets the first instance's stored answer, and only the first instance's ledger is charged.
//! Ignored without the store's variable; under CI a missing server fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum_payments::{Ledger, app_on};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use idemgate_stores::{Connected, StackOptions, connect};

async fn instance(url: &str, ledger: Ledger) -> (String, Connected) {
    let options = StackOptions {
        deadline: Duration::from_secs(3),
        replay_cache_entries: 1_000,
    };
    let store = connect(url, &options, |b| b).await.unwrap();
    assert!(store.shared, "{url} is a shared store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = app_on(ledger, store.engine.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), store)
}

async fn two_instances_share_keys(url: &str) {
    let (a_ledger, b_ledger) = (Ledger::default(), Ledger::default());
    let (a, _a_store) = instance(url, a_ledger.clone()).await;
    let (b, _b_store) = instance(url, b_ledger.clone()).await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let key = format!("shared-{}", uuid_like());
    let mut answers = Vec::new();
    for base in [&a, &b, &b, &a] {
        let req = Request::post(format!("{base}/payments"))
            .header("idempotency-key", key.as_str())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{\"amount\":5}")))
            .unwrap();
        let res = client.request(req).await.unwrap();
        let replayed = res.headers().get("idempotent-replayed").is_some();
        let status = res.status();
        answers.push((
            status,
            replayed,
            res.into_body().collect().await.unwrap().to_bytes(),
        ));
    }
    assert_eq!(a_ledger.charges(), 1, "charged once, at the first instance");
    assert_eq!(b_ledger.charges(), 0, "the other instance replays");
    assert_eq!(answers[0].0, 201);
    assert!(!answers[0].1);
    for (status, replayed, body) in &answers[1..] {
        assert_eq!(*status, 201);
        assert!(*replayed, "marked as a replay");
        assert_eq!(body, &answers[0].2, "byte-identical");
    }
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn two_instances_on_redis() {
    let url = idemgate_core::testkit::server_url("IDEMGATE_TEST_REDIS_URL").expect("Redis URL");
    two_instances_share_keys(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn two_instances_on_postgres() {
    let url =
        idemgate_core::testkit::server_url("IDEMGATE_TEST_POSTGRES_URL").expect("PostgreSQL URL");
    two_instances_share_keys(&url).await;
}
