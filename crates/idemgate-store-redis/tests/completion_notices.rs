//! When the Redis store announces a finished record on its pub/sub channel: only when a claim
//! found the record in flight before it finished (someone may be waiting on another instance).
//! A first execution nobody waited on publishes nothing. Against a real Redis server
//! (`IDEMGATE_TEST_REDIS_URL`); ignored without it, except under CI.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use futures_util::StreamExt;
use idemgate_core::StoreKey;
use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::store::{CasOutcome, ClaimOutcome, Store};
use idemgate_core::testkit::{claim_request, fresh_key};
use idemgate_store_redis::RedisStore;

async fn store() -> Option<RedisStore> {
    let url = idemgate_core::testkit::server_url("IDEMGATE_TEST_REDIS_URL")?;
    let prefix = format!("idemgate-notices-{}:", std::process::id());
    Some(
        RedisStore::connect_with_prefix(&url, &prefix)
            .await
            .expect("connect to IDEMGATE_TEST_REDIS_URL"),
    )
}

fn done() -> Outcome {
    Outcome::Response(StoredResponse::new(201, Vec::new(), "done"))
}

/// Claims `key` (fresh), lets a second claim find it in flight when `waited`, then ends it the
/// `i % 3`-th way: completed, marked outcome-unknown, released.
async fn claim_and_finish(store: &RedisStore, key: &StoreKey, i: usize, waited: bool) {
    let req = claim_request(Duration::from_secs(10), Duration::from_secs(60), 1);
    let ttl = Duration::from_secs(60);
    let ClaimOutcome::Acquired { fencing } = store.claim(key, &req).await.unwrap() else {
        panic!("a fresh key is acquired");
    };
    if waited {
        let ClaimOutcome::Existing { record, .. } = store.claim(key, &req).await.unwrap() else {
            panic!("the second claim finds the record");
        };
        // The mark is invisible in the record read back.
        assert_eq!(store.get(key).await.unwrap().as_ref(), Some(&record));
    }
    let applied = match i % 3 {
        0 => store.complete(key, fencing, &done(), ttl).await.unwrap(),
        1 => store.mark_unknown(key, fencing, ttl).await.unwrap(),
        _ => store.release(key, fencing).await.unwrap(),
    };
    assert_eq!(applied, CasOutcome::Applied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn a_finish_is_announced_exactly_when_a_claim_found_the_record_in_flight() {
    let Some(store) = store().await else {
        return;
    };
    let mut notices = Box::pin(store.completions().await.expect("subscribe"));
    // Nobody waited: completed, marked outcome-unknown, released: nothing published.
    let quiet: Vec<StoreKey> = (0..3).map(|i| fresh_key(&format!("quiet-{i}"))).collect();
    for (i, key) in quiet.iter().enumerate() {
        claim_and_finish(&store, key, i, false).await;
    }
    // A second claim found each of these in flight (a waiter): every end is published.
    let waited: Vec<StoreKey> = (0..3).map(|i| fresh_key(&format!("waited-{i}"))).collect();
    for (i, key) in waited.iter().enumerate() {
        claim_and_finish(&store, key, i, true).await;
    }

    // Pub/sub keeps order per publisher: the three waited-on keys arrive, and nothing of the
    // quiet ones before or between them.
    let mut heard = Vec::new();
    while heard.len() < waited.len() {
        let key = tokio::time::timeout(Duration::from_secs(10), notices.next())
            .await
            .expect("a notice within 10 s")
            .expect("the feed stays open");
        assert!(
            !quiet.contains(&key),
            "a finish nobody waited on was published"
        );
        heard.push(key);
    }
    assert_eq!(heard, waited);
}
