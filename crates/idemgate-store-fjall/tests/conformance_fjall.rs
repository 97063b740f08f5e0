//! The store conformance suite and the model-based property test against [`FjallStore`].

#![allow(clippy::expect_used)]

use idemgate_core::testkit::harness::ManualClockHarness;
use idemgate_core::{ManualClock, StoreKey};
use idemgate_store_fjall::FjallStore;

fn corrupt<'a>(
    store: &'a FjallStore,
    key: &'a StoreKey,
) -> idemgate_core::store::BoxFuture<'a, ()> {
    Box::pin(async move {
        store
            .overwrite_raw(key, b"\x01garbage that is not a record".to_vec())
            .await
            .expect("overwrite");
    })
}

async fn harness() -> Option<ManualClockHarness<FjallStore>> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let clock = ManualClock::new(1_700_000_000_000);
    let store = FjallStore::builder(dir.path().join("conformance"))
        .clock(clock.clone())
        .open()
        .expect("open");
    Some(
        ManualClockHarness::new(store, clock)
            .corrupt_with(corrupt)
            .keep(dir),
    )
}

idemgate_core::store_suite! {
    harness: harness(),
    model_cases: 256,
    regressions: "tests/proptest-regressions/model_fjall.txt",
}
