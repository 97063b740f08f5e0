//! The store conformance suite and the model-based property test against a real Redis server
//! (`IDEMGATE_TEST_REDIS_URL`). Without the variable the tests say they skip, except under CI,
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

fn url() -> Option<String> {
    idemgate_core::testkit::server_url("IDEMGATE_TEST_REDIS_URL")
}

async fn harness() -> Option<Redis> {
    let url = url()?;
    // A prefix of our own: parallel runs on one server never meet.
    let prefix = format!("idemgate-test-{}:", std::process::id());
    let store = RedisStore::connect_with_prefix(&url, &prefix)
        .await
        .expect("connect to IDEMGATE_TEST_REDIS_URL");
    Some(Redis { store })
}

idemgate_core::conformance_tests!(
    harness(),
    ignore_if = no_redis,
    "IDEMGATE_TEST_REDIS_URL is not set"
);

#[test]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
fn redis_store_agrees_with_the_reference_model() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let Some(h) = rt.block_on(harness()) else {
        return;
    };
    model::check_against_model(&rt, &h, 128, "tests/proptest-regressions/model_redis.txt");
}

#[tokio::test]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn an_unreachable_server_is_unavailable_not_a_panic() {
    if url().is_none() {
        return;
    }
    // Nothing listens on port 1.
    let err = RedisStore::connect("redis://127.0.0.1:1")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), idemgate_core::ErrorKind::Unavailable, "{err}");
}
