//! The store conformance suite and the model-based property test against a real PostgreSQL server
//! (`IDEMGATE_TEST_POSTGRES_URL`). Without the variable the tests are ignored (the summary says
//! so), except under CI, where a missing server is a failure.

#![allow(clippy::expect_used)]

use idemgate_core::StoreKey;
use idemgate_core::store::BoxFuture;
use idemgate_core::testkit::harness::ServerClockHarness;
use idemgate_store_postgres::PostgresStore;

fn corrupt<'a>(store: &'a PostgresStore, key: &'a StoreKey) -> BoxFuture<'a, ()> {
    Box::pin(async move { store.corrupt_state(key).await.expect("corrupt") })
}

async fn harness() -> Option<ServerClockHarness<PostgresStore>> {
    let url = idemgate_core::testkit::server_url("IDEMGATE_TEST_POSTGRES_URL")?;
    // Keys are fresh per run, so parallel runs on one database never meet.
    let store = PostgresStore::connect_with_pool_size(&url, 8)
        .await
        .expect("connect to IDEMGATE_TEST_POSTGRES_URL");
    Some(ServerClockHarness::new(store).corrupt_with(corrupt))
}

idemgate_core::store_suite! {
    harness: harness(),
    model_cases: 128,
    regressions: "tests/proptest-regressions/model_postgres.txt",
    // Nothing listens on port 1.
    unreachable: PostgresStore::connect("postgres://postgres@127.0.0.1:1/test"),
    ignore_if: no_postgres, "IDEMGATE_TEST_POSTGRES_URL is not set",
}
