//! The store conformance suite and the model-based property test against [`RedbStore`].

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::ptr_arg)]

use std::time::Duration;

use idemgate_core::testkit::{Harness, model};
use idemgate_core::{ManualClock, StoreKey};
use idemgate_store_redb::RedbStore;

struct Redb {
    store: RedbStore,
    clock: ManualClock,
    _dir: tempfile::TempDir,
}

impl Harness for Redb {
    type Store = RedbStore;
    fn store(&self) -> &RedbStore {
        &self.store
    }
    fn controlled_clock(&self) -> bool {
        true
    }
    async fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
    async fn corrupt(&self, key: &StoreKey) -> bool {
        self.store
            .overwrite_raw(key, b"\x01garbage that is not a record".to_vec())
            .await
            .unwrap();
        true
    }
}

fn harness() -> Redb {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_700_000_000_000);
    let store = RedbStore::builder(dir.path().join("conformance.redb"))
        .clock(clock.clone())
        .open()
        .unwrap();
    Redb {
        store,
        clock,
        _dir: dir,
    }
}

idemgate_core::conformance_tests!(async { Some(harness()) });

#[test]
fn redb_store_agrees_with_the_reference_model() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    model::check_against_model(
        &rt,
        &harness(),
        256,
        "tests/proptest-regressions/model_redb.txt",
    );
}
