//! The store conformance suite and the model-based property test against a real Redis Cluster
//! (`IDEMGATE_TEST_REDIS_CLUSTER_URLS`: comma-separated `host:port` of its nodes). Without the variable the tests say they skip, except under CI,
//! where a missing server is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idemgate_core::StoreKey;
use idemgate_core::store::BoxFuture;
use idemgate_core::testkit::Harness;
use idemgate_core::testkit::harness::ServerClockHarness;
use idemgate_store_redis::RedisStore;

fn corrupt<'a>(store: &'a RedisStore, key: &'a StoreKey) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        store
            .overwrite_field(key, "st", b"?")
            .await
            .expect("overwrite");
    })
}

fn url() -> Option<Vec<String>> {
    let list = idemgate_core::testkit::server_url("IDEMGATE_TEST_REDIS_CLUSTER_URLS")?;
    Some(
        list.split(',')
            .map(|n| {
                let n = n.trim();
                if n.contains("://") {
                    n.to_owned()
                } else {
                    format!("redis://{n}")
                }
            })
            .collect(),
    )
}

async fn harness() -> Option<ServerClockHarness<RedisStore>> {
    let url = url()?;
    // A prefix of our own: parallel runs on one server never meet.
    let prefix = format!("idemgate-test-{}:", std::process::id());
    let store = RedisStore::connect_cluster_with_prefix(&url, &prefix)
        .await
        .expect("connect to IDEMGATE_TEST_REDIS_CLUSTER_URLS");
    Some(ServerClockHarness::new(store).corrupt_with(corrupt))
}

idemgate_core::store_suite! {
    harness: harness(),
    model_cases: 128,
    regressions: "tests/proptest-regressions/model_redis_cluster.txt",
    ignore_if: no_redis_cluster, "IDEMGATE_TEST_REDIS_CLUSTER_URLS is not set",
}

#[tokio::test]
#[cfg_attr(
    no_redis_cluster,
    ignore = "IDEMGATE_TEST_REDIS_CLUSTER_URLS is not set"
)]
async fn records_spread_over_every_master_and_list_finds_them_all() {
    let Some(h) = harness().await else {
        return;
    };
    use idemgate_core::store::{ClaimOutcome, ListRequest, Store};
    use idemgate_core::testkit::{claim_request, fresh_key};
    let mut mine = std::collections::HashSet::new();
    for _ in 0..60 {
        let key = fresh_key("cluster-list");
        let req = claim_request(Duration::from_secs(60), Duration::from_secs(600), 1);
        assert!(matches!(
            h.store().claim(&key, &req).await.unwrap(),
            ClaimOutcome::Acquired { .. }
        ));
        mine.insert(key);
    }
    let mut seen = std::collections::HashSet::new();
    let mut cursor = None;
    loop {
        let page = h
            .store()
            .list(&ListRequest {
                cursor,
                limit: 7,
                only_unknown: false,
            })
            .await
            .unwrap();
        assert!(page.records.len() <= 7);
        seen.extend(page.records.into_iter().map(|(k, _)| k));
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert!(
        mine.is_subset(&seen),
        "list missed {} records",
        mine.difference(&seen).count()
    );
}
