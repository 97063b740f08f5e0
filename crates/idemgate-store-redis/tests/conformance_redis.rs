//! The store conformance suite and the model-based property test against a real Redis server
//! (`IDEMGATE_TEST_REDIS_URL`). Without the variable the tests are ignored (the summary says
//! so), except under CI, where a missing server is a failure.

#![allow(clippy::expect_used)]

use idemgate_core::StoreKey;
use idemgate_core::store::BoxFuture;
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

async fn harness() -> Option<ServerClockHarness<RedisStore>> {
    let url = idemgate_core::testkit::server_url("IDEMGATE_TEST_REDIS_URL")?;
    // A prefix of our own: parallel runs on one server never meet.
    let prefix = format!("idemgate-test-{}:", std::process::id());
    let store = RedisStore::connect_with_prefix(&url, &prefix)
        .await
        .expect("connect to IDEMGATE_TEST_REDIS_URL");
    Some(ServerClockHarness::new(store).corrupt_with(corrupt))
}

idemgate_core::store_suite! {
    harness: harness(),
    model_cases: 128,
    regressions: "tests/proptest-regressions/model_redis.txt",
    // Nothing listens on port 1.
    unreachable: RedisStore::connect("redis://127.0.0.1:1"),
    ignore_if: no_redis, "IDEMGATE_TEST_REDIS_URL is not set",
}
