//! The local replay cache must not change the store's behaviour: the whole conformance suite and
//! the model test run against `CachedStore<MemoryStore>`. Plus its own staleness bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idemgate_core::cache::CachedStore;
use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::store::{ClaimOutcome, DeleteMode, DeleteOutcome, Store};
use idemgate_core::testkit::harness::ManualClockHarness;
use idemgate_core::testkit::{claim_request, fresh_key};
use idemgate_core::{ManualClock, MemoryStore};

async fn harness() -> Option<ManualClockHarness<CachedStore<MemoryStore>>> {
    let clock = ManualClock::new(1_700_000_000_000);
    let inner = MemoryStore::builder().clock(clock.clone()).build();
    let store = CachedStore::builder(inner)
        .capacity(64)
        .clock(clock.clone())
        .build();
    Some(ManualClockHarness::new(store, clock))
}

idemgate_core::store_suite! {
    harness: harness(),
    model_cases: 512,
    regressions: "tests/proptest-regressions/model_cached.txt",
}

#[tokio::test]
async fn replays_come_from_memory_and_staleness_is_bounded_by_max_age() {
    let clock = ManualClock::new(1_700_000_000_000);
    let shared = MemoryStore::builder().clock(clock.clone()).build();
    let cached = |age| {
        CachedStore::builder(shared.clone())
            .max_age(Duration::from_secs(age))
            .clock(clock.clone())
            .build()
    };
    let (a, b) = (cached(30), cached(30));
    let key = fresh_key("cache");
    let req = claim_request(Duration::from_secs(10), Duration::from_secs(3600), 1);
    let ClaimOutcome::Acquired { fencing } = a.claim(&key, &req).await.unwrap() else {
        panic!()
    };
    let done = Outcome::Response(StoredResponse::new(200, vec![], "ok"));
    a.complete(&key, fencing, &done, Duration::from_secs(3600))
        .await
        .unwrap();
    // B caches it on its first replay.
    assert!(matches!(
        b.claim(&key, &req).await.unwrap(),
        ClaimOutcome::Existing { .. }
    ));
    assert_eq!(b.len(), 1);
    // Deleted behind B's back (through A): B still answers from its copy for up to max_age...
    assert_eq!(
        a.delete(&key, DeleteMode::Finished).await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert!(shared.get(&key).await.unwrap().is_none());
    assert!(matches!(
        b.claim(&key, &req).await.unwrap(),
        ClaimOutcome::Existing { .. }
    ));
    // ...and no longer.
    clock.advance(Duration::from_secs(31));
    assert!(matches!(
        b.claim(&key, &req).await.unwrap(),
        ClaimOutcome::Acquired { .. }
    ));
}

#[tokio::test]
async fn the_cache_is_bounded() {
    let store = CachedStore::builder(MemoryStore::default())
        .capacity(32)
        .build();
    for _ in 0..500 {
        let key = fresh_key("bound");
        let req = claim_request(Duration::from_secs(10), Duration::from_secs(3600), 1);
        let ClaimOutcome::Acquired { fencing } = store.claim(&key, &req).await.unwrap() else {
            panic!()
        };
        let done = Outcome::Response(StoredResponse::new(200, vec![], "ok"));
        store
            .complete(&key, fencing, &done, Duration::from_secs(3600))
            .await
            .unwrap();
        store.get(&key).await.unwrap();
    }
    assert!(store.len() <= 32, "{}", store.len());
}

/// Bounded in bytes too: large bodies cannot make the cache hold `capacity` × the largest body,
/// and a record larger than a shard's share is never cached (its replays still answer).
#[tokio::test]
async fn the_cache_is_bounded_in_bytes() {
    const MAX: usize = 16 * 64 * 1024;
    let store = CachedStore::builder(MemoryStore::default())
        .max_bytes(MAX)
        .build();
    let complete = |body: Vec<u8>| {
        let store = store.clone();
        async move {
            let key = fresh_key("bytes");
            let req = claim_request(Duration::from_secs(10), Duration::from_secs(3600), 1);
            let ClaimOutcome::Acquired { fencing } = store.claim(&key, &req).await.unwrap() else {
                panic!()
            };
            let done = Outcome::Response(StoredResponse::new(200, vec![], body));
            store
                .complete(&key, fencing, &done, Duration::from_secs(3600))
                .await
                .unwrap();
            assert!(store.get(&key).await.unwrap().is_some());
            key
        }
    };
    for _ in 0..400 {
        complete(vec![b'x'; 10 * 1024]).await;
    }
    assert!(!store.is_empty());
    assert!(store.bytes() <= MAX, "{} bytes cached", store.bytes());
    let (len, bytes) = (store.len(), store.bytes());
    let big = complete(vec![b'y'; 100 * 1024]).await;
    // Too large for a shard (64 KiB): not cached, nothing evicted for it, still replayed.
    assert_eq!((store.len(), store.bytes()), (len, bytes));
    assert!(matches!(
        store.get(&big).await.unwrap().map(|r| r.state),
        Some(idemgate_core::record::RecordState::Completed { .. })
    ));
}

/// A read that started before a delete through the cache (its answer still on the wire) must
/// not put the deleted record back into the cache: the next claim reaches the store and runs.
#[tokio::test(start_paused = true)]
async fn a_read_overlapping_a_delete_does_not_resurrect_the_record() {
    use idemgate_core::testkit::faults::Faulty;
    let shared = Faulty::new(
        MemoryStore::builder()
            .clock(idemgate_core::TokioClock::new())
            .build(),
    );
    let cached = CachedStore::builder(shared.clone())
        .clock(idemgate_core::TokioClock::new())
        .build();
    let key = fresh_key("cache-race");
    let req = claim_request(Duration::from_secs(10), Duration::from_secs(3600), 1);
    let ClaimOutcome::Acquired { fencing } = cached.claim(&key, &req).await.unwrap() else {
        panic!()
    };
    let done = Outcome::Response(StoredResponse::new(200, vec![], "ok"));
    cached
        .complete(&key, fencing, &done, Duration::from_secs(3600))
        .await
        .unwrap();
    // A replay whose answer is slow: it reads the completed record now, answers in 100 ms.
    shared.set_delay("claim", Duration::from_millis(100));
    let replay = tokio::spawn({
        let cached = cached.clone();
        let req = req.clone();
        async move { cached.claim(&key, &req).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        cached.delete(&key, DeleteMode::Finished).await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert!(matches!(
        replay.await.unwrap().unwrap(),
        ClaimOutcome::Existing { .. }
    ));
    shared.set_delay("claim", Duration::ZERO);
    assert!(
        matches!(
            cached.claim(&key, &req).await.unwrap(),
            ClaimOutcome::Acquired { .. }
        ),
        "the deleted record came back from the cache"
    );
}

/// The observer hears a miss when a completed record came from the store and a hit when the
/// copy answered; a new key, or a record still in flight, is neither.
#[tokio::test]
async fn hits_and_misses_are_reported_for_completed_records_only() {
    use std::sync::{Arc, Mutex};

    use idemgate_core::cache::Lookup;

    let heard = Arc::new(Mutex::new(Vec::new()));
    let sink = heard.clone();
    let store = CachedStore::builder(MemoryStore::default())
        .observe(move |l| sink.lock().unwrap().push(l))
        .build();
    let key = fresh_key("observed");
    let req = claim_request(Duration::from_secs(10), Duration::from_secs(3600), 1);
    let ClaimOutcome::Acquired { fencing } = store.claim(&key, &req).await.unwrap() else {
        panic!()
    };
    // In flight: read from the store, not cacheable, not counted.
    assert!(matches!(
        store.claim(&key, &req).await.unwrap(),
        ClaimOutcome::Existing { .. }
    ));
    assert!(heard.lock().unwrap().is_empty());
    let done = Outcome::Response(StoredResponse::new(200, vec![], "ok"));
    store
        .complete(&key, fencing, &done, Duration::from_secs(3600))
        .await
        .unwrap();
    store.claim(&key, &req).await.unwrap(); // from the store: a miss, cached
    store.claim(&key, &req).await.unwrap(); // from the copy: a hit
    store.get(&key).await.unwrap(); // from the copy: a hit
    assert_eq!(
        *heard.lock().unwrap(),
        [Lookup::Miss, Lookup::Hit, Lookup::Hit]
    );
}
