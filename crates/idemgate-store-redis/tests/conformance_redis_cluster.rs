//! The store conformance suite and the model-based property test against a real Redis Cluster
//! (`IDEMGATE_TEST_REDIS_CLUSTER_URLS`: comma-separated `host:port` of its nodes). Without the variable the tests say they skip, except under CI,
//! where a missing server is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idemgate_core::StoreKey;
use idemgate_core::testkit::{Harness, model};
use idemgate_store_redis::RedisStore;

struct Redis {
    store: RedisStore,
}

impl Harness for Redis {
    type Store = RedisStore;
    fn store(&self) -> &RedisStore {
        &self.store
    }
    fn controlled_clock(&self) -> bool {
        false
    }
    async fn advance(&self, d: Duration) {
        // The server's clock decides: real time has to pass.
        tokio::time::sleep(d).await;
    }
    async fn corrupt(&self, key: &StoreKey) -> bool {
        self.store.overwrite_field(key, "st", b"?").await.unwrap();
        true
    }
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

async fn harness() -> Option<Redis> {
    let url = url()?;
    // A prefix of our own: parallel runs on one server never meet.
    let prefix = format!("idemgate-test-{}:", std::process::id());
    let store = RedisStore::connect_cluster_with_prefix(&url, &prefix)
        .await
        .expect("connect to IDEMGATE_TEST_REDIS_CLUSTER_URLS");
    Some(Redis { store })
}

idemgate_core::conformance_tests!(
    harness(),
    ignore_if = no_redis_cluster,
    "IDEMGATE_TEST_REDIS_CLUSTER_URLS is not set"
);

#[test]
#[cfg_attr(
    no_redis_cluster,
    ignore = "IDEMGATE_TEST_REDIS_CLUSTER_URLS is not set"
)]
fn redis_cluster_store_agrees_with_the_reference_model() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(h) = rt.block_on(harness()) else {
        return;
    };
    model::check_against_model(
        &rt,
        &h,
        128,
        "tests/proptest-regressions/model_redis_cluster.txt",
    );
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
            h.store.claim(&key, &req).await.unwrap(),
            ClaimOutcome::Acquired { .. }
        ));
        mine.insert(key);
    }
    let mut seen = std::collections::HashSet::new();
    let mut cursor = None;
    loop {
        let page = h
            .store
            .list(&ListRequest { cursor, limit: 7 })
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
