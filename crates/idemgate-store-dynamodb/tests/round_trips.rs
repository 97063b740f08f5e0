//! Round trips per first execution and per replay, counted by the store itself: the engine runs
//! 100 first executions and then one replay of each, on a DynamoDB store with no cache in front.
//! A first execution is one `PutItem` (claim) and one `UpdateItem` (complete); a replay one
//! `PutItem` whose failed condition returns the completed record. A claim of a released key
//! costs a second request (the `UpdateItem` that takes its epoch floor).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use idemgate_core::engine::{Disposition, Engine, Execution, Policy};
use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::store::{CasOutcome, ClaimOutcome, Store};
use idemgate_core::testkit::{claim_request, fresh_key};
use idemgate_core::{Fingerprint, FingerprintOptions, IdempotencyKey, Scope, ScopedKey};

const N: u64 = 100;

fn fp() -> Fingerprint {
    FingerprintOptions::default()
        .builder()
        .method("POST")
        .path("/pay")
        .body(b"{}")
        .finish()
}

fn store_it(_: &()) -> Disposition {
    Disposition::Store(Outcome::Response(StoredResponse::new(
        201,
        vec![(
            "content-type".into(),
            Bytes::from_static(b"application/json"),
        )],
        Bytes::from_static(b"{\"id\":1}"),
    )))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn a_first_execution_is_two_requests_and_a_replay_one() {
    let Some(endpoint) = common::endpoint() else {
        return;
    };
    let table = common::table("round-trips");
    common::ensure_table(&endpoint, &table).await;
    let store = common::builder(&endpoint, &table).connect().await.unwrap();
    let engine = Engine::builder(store.clone()).build();
    let run = std::process::id();
    let keys: Vec<ScopedKey> = (0..N)
        .map(|i| {
            ScopedKey::new(
                "round-trips",
                Scope::new("tenant"),
                IdempotencyKey::parse(&format!("k-{run}-{i}")).unwrap(),
            )
        })
        .collect();
    let before = store.round_trips();
    for k in &keys {
        let out = engine
            .run(k, fp(), &Policy::default(), store_it, |_| async {})
            .await
            .unwrap();
        assert!(matches!(out, Execution::Executed { .. }), "{out:?}");
    }
    let first = store.round_trips() - before;
    for k in &keys {
        let out = engine
            .run(k, fp(), &Policy::default(), store_it, |_| async {
                unreachable!("a replay never runs")
            })
            .await
            .unwrap();
        assert!(matches!(out, Execution::Replayed { .. }), "{out:?}");
    }
    let replay = store.round_trips() - before - first;
    eprintln!(
        "per first execution: {:.2} requests ({} PutItem, {} UpdateItem); per replay: {:.2} requests",
        first.requests as f64 / N as f64,
        first.put_item,
        first.update_item,
        replay.requests as f64 / N as f64
    );
    // Store calls are exact; HTTP requests equal them unless the SDK retried a failure.
    assert_eq!((first.put_item, first.update_item), (N, N));
    assert_eq!(first.get_item + first.delete_item + first.scan, 0);
    assert_eq!((replay.put_item, replay.update_item), (N, 0));
    assert_eq!(replay.get_item + replay.delete_item + replay.scan, 0);
    assert!(first.requests >= 2 * N && replay.requests >= N);
}

#[tokio::test]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn a_released_key_is_claimed_in_two_requests() {
    let Some(endpoint) = common::endpoint() else {
        return;
    };
    let table = common::table("round-trips");
    common::ensure_table(&endpoint, &table).await;
    let store = common::builder(&endpoint, &table).connect().await.unwrap();
    let key = fresh_key("released");
    let req = claim_request(Duration::from_secs(60), Duration::from_secs(3600), 1);
    let ClaimOutcome::Acquired { fencing } = store.claim(&key, &req).await.unwrap() else {
        panic!("fresh key existed");
    };
    assert_eq!(
        store.release(&key, fencing).await.unwrap(),
        CasOutcome::Applied
    );
    let before = store.round_trips();
    let again = claim_request(Duration::from_secs(60), Duration::from_secs(3600), 2);
    let ClaimOutcome::Acquired { fencing: next } = store.claim(&key, &again).await.unwrap() else {
        panic!("a released key is free");
    };
    assert_eq!(next.epoch, fencing.epoch + 1);
    let cost = store.round_trips() - before;
    assert_eq!((cost.put_item, cost.update_item), (1, 1));
}
