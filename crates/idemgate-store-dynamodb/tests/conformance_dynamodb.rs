//! The store conformance suite and the model-based property test against a DynamoDB-compatible
//! server (`IDEMGATE_TEST_DYNAMODB_URL`; moto in CI). DynamoDB has no clock of its own: the store
//! judges leases and expiry by the instance's clock, here a [`ManualClock`] the harness moves —
//! so the expiry cases take no real time and the model test jumps the clock too. Without the
//! variable the tests are ignored (the summary says so), except under CI, where a missing
//! server is a failure.

#![allow(clippy::expect_used)]

mod common;

use idemgate_core::StoreKey;
use idemgate_core::clock::{ManualClock, wall_clock};
use idemgate_core::store::BoxFuture;
use idemgate_core::testkit::harness::ManualClockHarness;
use idemgate_store_dynamodb::{DynamoStore, MOTO_MAX_PAYLOAD_BYTES};

fn corrupt<'a>(store: &'a DynamoStore, key: &'a StoreKey) -> BoxFuture<'a, ()> {
    Box::pin(async move { store.corrupt_state(key).await.expect("corrupt") })
}

async fn harness() -> Option<ManualClockHarness<DynamoStore>> {
    let endpoint = common::endpoint()?;
    let table = common::table("conformance");
    common::ensure_table(&endpoint, &table).await;
    // Near the real time, so that DynamoDB's own TTL (on AWS) would not delete live records.
    let clock = ManualClock::new(wall_clock().as_millis());
    let store = common::builder(&endpoint, &table)
        .clock(clock.clone())
        // moto counts binary attributes by their base64 length (see the crate docs).
        .max_payload_bytes(MOTO_MAX_PAYLOAD_BYTES)
        .connect()
        .await
        .expect("connect to IDEMGATE_TEST_DYNAMODB_URL");
    Some(
        ManualClockHarness::new(store, clock)
            .corrupt_with(corrupt)
            .max_payload(MOTO_MAX_PAYLOAD_BYTES),
    )
}

idemgate_core::store_suite! {
    harness: harness(),
    model_cases: 128,
    regressions: "tests/proptest-regressions/model_dynamodb.txt",
    // Nothing listens on port 1.
    unreachable: common::builder("http://127.0.0.1:1", "idemgate-unreachable").connect(),
    ignore_if: no_dynamodb, "IDEMGATE_TEST_DYNAMODB_URL is not set",
}
