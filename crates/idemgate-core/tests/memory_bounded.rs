//! The memory store stays bounded under a flood of distinct keys: by record count, by its byte
//! budget, and in the process's resident memory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::ptr_arg)]

use std::time::Duration;

use idemgate_core::error::ErrorKind;
use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::store::{ClaimOutcome, Store};
use idemgate_core::testkit::{claim_request, fresh_key};
use idemgate_core::{ManualClock, MemoryStore};

fn rss_bytes() -> Option<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

async fn flood(store: &MemoryStore, n: usize) -> (usize, usize) {
    let mut stored = 0;
    let mut refused = 0;
    for _ in 0..n {
        let key = fresh_key("flood");
        let req = claim_request(Duration::from_secs(1), Duration::from_secs(10), 1);
        match store.claim(&key, &req).await {
            Ok(ClaimOutcome::Acquired { fencing }) => {
                let body = Outcome::Response(StoredResponse::new(200, vec![], vec![7u8; 200]));
                store
                    .complete(&key, fencing, &body, Duration::from_secs(10))
                    .await
                    .unwrap();
                stored += 1;
            }
            Ok(other) => panic!("fresh key existed: {other:?}"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Capacity);
                refused += 1;
            }
        }
    }
    (stored, refused)
}

#[tokio::test]
async fn a_flood_of_distinct_keys_stays_within_the_bounds() {
    const MAX: usize = 20_000;
    let clock = ManualClock::new(1_000_000);
    let store = MemoryStore::builder()
        .max_records(MAX)
        .max_bytes(64 << 20)
        .clock(clock.clone())
        .build();

    // Fill to the bound: the excess is refused, nothing live is evicted.
    let (stored, refused) = flood(&store, MAX + 5_000).await;
    assert_eq!(stored, MAX);
    assert_eq!(refused, 5_000);
    assert!(store.len() <= MAX);
    let rss_full = rss_bytes();

    // Ten more generations of keys, each expiring before the next: the store recycles space.
    for _ in 0..10 {
        clock.advance(Duration::from_secs(11));
        let (stored, refused) = flood(&store, MAX).await;
        assert_eq!((stored, refused), (MAX, 0));
        assert!(store.len() <= MAX, "len {}", store.len());
        assert!(store.bytes() <= 64 << 20);
    }
    if let (Some(before), Some(after)) = (rss_full, rss_bytes()) {
        // 200,000 more records passed through; had they been kept they would need > 80 MB.
        let growth = after.saturating_sub(before);
        assert!(growth < 24 << 20, "RSS grew by {growth} bytes");
    }
}
