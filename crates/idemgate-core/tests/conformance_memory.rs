//! The store conformance suite and the model-based property test against [`MemoryStore`].

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::ptr_arg)]

use std::time::Duration;

use idemgate_core::testkit::{Harness, model};
use idemgate_core::{ManualClock, MemoryStore, StoreKey};

struct Mem {
    store: MemoryStore,
    clock: ManualClock,
}

impl Harness for Mem {
    type Store = MemoryStore;
    fn store(&self) -> &MemoryStore {
        &self.store
    }
    fn controlled_clock(&self) -> bool {
        true
    }
    async fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
    async fn corrupt(&self, _key: &StoreKey) -> bool {
        false
    }
}

fn harness() -> Mem {
    let clock = ManualClock::new(1_700_000_000_000);
    Mem {
        store: MemoryStore::builder().clock(clock.clone()).build(),
        clock,
    }
}

idemgate_core::conformance_tests!(async { Some(harness()) });

#[test]
fn memory_store_agrees_with_the_reference_model() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    model::check_against_model(
        &rt,
        &harness(),
        512,
        "tests/proptest-regressions/model_memory.txt",
    );
}
