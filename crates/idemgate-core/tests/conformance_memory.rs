//! The store conformance suite and the model-based property test against [`MemoryStore`].

use idemgate_core::testkit::harness::ManualClockHarness;
use idemgate_core::{ManualClock, MemoryStore};

async fn harness() -> Option<ManualClockHarness<MemoryStore>> {
    let clock = ManualClock::new(1_700_000_000_000);
    let store = MemoryStore::builder().clock(clock.clone()).build();
    Some(ManualClockHarness::new(store, clock))
}

idemgate_core::store_suite! {
    harness: harness(),
    model_cases: 512,
    regressions: "tests/proptest-regressions/model_memory.txt",
}
