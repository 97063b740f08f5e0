//! `idemgate serve` on the shared stores (real Redis and PostgreSQL from `IDEMGATE_TEST_REDIS_URL`
//! and `IDEMGATE_TEST_POSTGRES_URL`): the semantics hold, and two instances sharing a store
//! execute a key once. Without the variables these tests say they skip (and fail under CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Http, Proxy, Upstream};
use http::StatusCode;

fn store_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(u) => Some(u),
        Err(_) => {
            assert!(std::env::var_os("CI").is_none(), "{var} must be set in CI");
            eprintln!("SKIPPED: {var} is not set");
            None
        }
    }
}

async fn two_instances_share_the_work(store: &str) {
    let up = Upstream::start().await;
    let a = Proxy::start(&up.url(), store, &[]);
    let b = Proxy::start(&up.url(), store, &[]);
    let http = Http::default();
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    // Duplicates of each key go to both instances at once.
    let mut tasks = Vec::new();
    for i in 0..20 {
        for proxy in [&a, &b, &a, &b] {
            let http = http.clone();
            let url = proxy.url("/pay?delay_ms=50");
            let key = format!("shared-{run}-{i}");
            tasks.push(tokio::spawn(async move {
                (key.clone(), http.post(&url, Some(&key), b"{}").await)
            }));
        }
    }
    let mut bodies = std::collections::HashMap::new();
    for t in tasks {
        let (key, res) = t.await.unwrap();
        assert_eq!(res.status, StatusCode::CREATED, "{key}: {res:?}");
        let first = bodies.entry(key).or_insert_with(|| res.body.clone());
        assert_eq!(*first, res.body, "every duplicate gets the same body");
    }
    assert_eq!(
        up.state.executions(),
        20,
        "one execution per key across both instances"
    );
    // Mismatch and replay across instances.
    let key = format!("shared-{run}-0");
    let other = http
        .post(&b.url("/pay?delay_ms=50"), Some(&key), b"[]")
        .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    let again = http
        .post(&a.url("/pay?delay_ms=50"), Some(&key), b"{}")
        .await;
    assert!(again.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_redis_execute_each_key_once() {
    if let Some(url) = store_url("IDEMGATE_TEST_REDIS_URL") {
        two_instances_share_the_work(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres_execute_each_key_once() {
    if let Some(url) = store_url("IDEMGATE_TEST_POSTGRES_URL") {
        two_instances_share_the_work(&url).await;
    }
}
