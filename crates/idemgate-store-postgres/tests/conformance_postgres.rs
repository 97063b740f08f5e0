//! The store conformance suite and the model-based property test against a real PostgreSQL server
//! (`IDEMGATE_TEST_POSTGRES_URL`). Without the variable the tests say they skip, except under CI,
//! where a missing server is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idemgate_core::StoreKey;
use idemgate_core::testkit::{Harness, model};
use idemgate_store_postgres::PostgresStore;

struct Pg {
    store: PostgresStore,
}

impl Harness for Pg {
    type Store = PostgresStore;
    fn store(&self) -> &PostgresStore {
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
        self.store.corrupt_state(key).await.unwrap();
        true
    }
}

fn url() -> Option<String> {
    idemgate_core::testkit::server_url("IDEMGATE_TEST_POSTGRES_URL")
}

async fn harness() -> Option<Pg> {
    let url = url()?;
    // Keys are fresh per run, so parallel runs on one database never meet.
    let store = PostgresStore::connect_with_pool_size(&url, 8)
        .await
        .expect("connect to IDEMGATE_TEST_POSTGRES_URL");
    Some(Pg { store })
}

idemgate_core::conformance_tests!(
    harness(),
    ignore_if = no_postgres,
    "IDEMGATE_TEST_POSTGRES_URL is not set"
);

#[test]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
fn postgres_store_agrees_with_the_reference_model() {
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
        "tests/proptest-regressions/model_postgres.txt",
    );
}

#[tokio::test]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn an_unreachable_server_is_unavailable_not_a_panic() {
    if url().is_none() {
        return;
    }
    // Nothing listens on port 1.
    let err = PostgresStore::connect("postgres://postgres@127.0.0.1:1/test")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), idemgate_core::ErrorKind::Unavailable, "{err}");
}
