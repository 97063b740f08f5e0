//! Purging walks the expiry index from where the last purge stopped (not over the tombstones of
//! everything already removed), and still finds an entry that lands below that point later (a
//! clock stepped back, a shorter TTL).

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::store::{ClaimOutcome, Store};
use idemgate_core::testkit::{claim_request, fresh_key};
use idemgate_core::{ManualClock, StoreKey, Timestamp};
use idemgate_store_fjall::FjallStore;

const T0: u64 = 1_700_000_000_000;

async fn completed(store: &FjallStore, ttl: Duration) -> StoreKey {
    let key = fresh_key("purge");
    let req = claim_request(Duration::from_secs(1), ttl, 1);
    let ClaimOutcome::Acquired { fencing } = store.claim(&key, &req).await.unwrap() else {
        panic!("fresh key existed");
    };
    let outcome = Outcome::Response(StoredResponse::new(200, vec![], "ok"));
    store.complete(&key, fencing, &outcome, ttl).await.unwrap();
    key
}

async fn purge_all(store: &FjallStore) -> usize {
    let mut total = 0;
    loop {
        let n = store.purge_expired(7).await.unwrap();
        total += n;
        if n == 0 {
            return total;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_resumes_and_finds_entries_below_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = FjallStore::builder(dir.path().join("store"))
        .clock(clock.clone())
        .open()
        .unwrap();
    let mut first = Vec::new();
    for _ in 0..50 {
        first.push(completed(&store, Duration::from_secs(10)).await);
    }
    let kept = completed(&store, Duration::from_secs(3600)).await;
    clock.set(Timestamp(T0 + 20_000));
    assert_eq!(purge_all(&store).await, 50);
    for key in &first {
        clock.set(Timestamp(T0));
        assert!(store.get(key).await.unwrap().is_none(), "not purged");
        clock.set(Timestamp(T0 + 20_000));
    }

    // Above where the last purge stopped: a record expiring at T0 + 21 s.
    let later = completed(&store, Duration::from_secs(1)).await;
    // Below it: the clock stepped back to T0, a record expiring at T0 + 1 s.
    clock.set(Timestamp(T0));
    let below = completed(&store, Duration::from_secs(1)).await;
    clock.set(Timestamp(T0 + 30_000));
    assert_eq!(purge_all(&store).await, 2);
    clock.set(Timestamp(T0));
    assert!(store.get(&later).await.unwrap().is_none());
    assert!(
        store.get(&below).await.unwrap().is_none(),
        "the entry below the cursor was missed"
    );
    assert!(store.get(&kept).await.unwrap().is_some());
}
