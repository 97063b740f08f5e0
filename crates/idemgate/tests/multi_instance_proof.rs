//! The multi-instance proof: 3 `idemgate serve` processes share one store; 2,000 keys, each sent 4
//! times at once, round-robin across the instances, against a counting upstream. Upstream
//! executions must equal the number of keys, and every duplicate must get the identical response
//! (or `409` past the wait timeout). Runs on real Redis, Redis Cluster and PostgreSQL
//! (`IDEMGATE_TEST_REDIS_URL`, `IDEMGATE_TEST_REDIS_CLUSTER_URLS`, `IDEMGATE_TEST_POSTGRES_URL`)
//! and on a DynamoDB-compatible server (`IDEMGATE_TEST_DYNAMODB_URL`: moto in CI, with a table
//! made for the test by `idemgate create-table`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{Http, Proxy, Upstream};
use http::StatusCode;

const KEYS: usize = 2_000;
const DUPLICATES: usize = 4;
/// Keys in flight at once (each with its 4 duplicates).
const IN_FLIGHT: usize = 96;
/// Keys in flight at once on the DynamoDB test server: moto answers one request at a time from
/// Python (~5 ms of CPU each, so at most ~200 a second on these two cores, far fewer while the
/// other proofs of this file run beside it); at 96 keys its queue grew past the store deadline
/// and requests got `503` — moto's speed, not the store's.
const IN_FLIGHT_MOTO: usize = 8;

async fn prove(store: &str) {
    prove_with(store, IN_FLIGHT, &[]).await;
}

async fn prove_with(store: &str, in_flight: usize, args: &[&str]) {
    let up = Upstream::start().await;
    let proxies: Vec<Proxy> = (0..3)
        .map(|_| Proxy::start(&up.url(), store, args))
        .collect();
    let urls: Vec<String> = proxies.iter().map(|p| p.url("/pay?delay_ms=20")).collect();
    let http = Http::default();
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let gate = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let mut tasks = Vec::with_capacity(KEYS);
    for k in 0..KEYS {
        let key = format!("proof-{run}-{k}");
        let urls: Vec<String> = (0..DUPLICATES)
            .map(|d| urls[(k + d) % urls.len()].clone())
            .collect();
        let http = http.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let sends = urls.into_iter().map(|url| {
                let http = http.clone();
                let key = key.clone();
                async move { http.post(&url, Some(&key), b"{\"amount\":1}").await }
            });
            let answers = futures_util::future::join_all(sends).await;
            (key, answers)
        }));
    }
    let mut conflicts = 0;
    let mut bodies: HashMap<String, bytes::Bytes> = HashMap::new();
    for t in tasks {
        let (key, answers) = t.await.unwrap();
        for a in answers {
            match a.status {
                StatusCode::CREATED => {
                    let first = bodies.entry(key.clone()).or_insert_with(|| a.body.clone());
                    assert_eq!(*first, a.body, "{key}: duplicates got different bodies");
                }
                StatusCode::CONFLICT => conflicts += 1,
                other => panic!("{key}: unexpected {other}: {a:?}"),
            }
        }
    }
    assert_eq!(bodies.len(), KEYS, "every key got at least one 201");
    assert_eq!(up.state.executions(), KEYS, "upstream executions == keys");
    eprintln!(
        "{store}: {KEYS} keys x {DUPLICATES}: {} executions, {conflicts} conflicts",
        up.state.executions()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn three_instances_on_redis_execute_each_key_once() {
    if let Some(u) = common::server_url("IDEMGATE_TEST_REDIS_URL") {
        prove(&u).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn three_instances_on_postgres_execute_each_key_once() {
    if let Some(u) = common::server_url("IDEMGATE_TEST_POSTGRES_URL") {
        prove(&u).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn three_instances_on_dynamodb_execute_each_key_once() {
    if let Some(u) = common::dynamodb_store("proof") {
        // With a longer store deadline (see `common::slow_store_args`).
        prove_with(&u, IN_FLIGHT_MOTO, common::slow_store_args(&u)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    no_redis_cluster,
    ignore = "IDEMGATE_TEST_REDIS_CLUSTER_URLS is not set"
)]
async fn three_instances_on_redis_cluster_execute_each_key_once() {
    if let Some(u) = common::server_url("IDEMGATE_TEST_REDIS_CLUSTER_URLS") {
        let nodes: Vec<&str> = u
            .split(',')
            .map(|n| n.trim().trim_start_matches("redis://"))
            .collect();
        prove(&format!("redis+cluster://{}", nodes.join(","))).await;
    }
}
