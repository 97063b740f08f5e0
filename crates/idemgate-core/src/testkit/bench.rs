//! Load drivers shared by the stores' criterion benches.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::key::StoreKey;
use crate::record::{Outcome, StoredResponse};
use crate::store::{ClaimOutcome, Store};

use super::claim_request;

static NEXT: AtomicU64 = AtomicU64::new(1);

/// A well-spread key from a counter (splitmix64), cheaper than a cryptographic hash.
pub fn bench_key() -> StoreKey {
    let mut z = NEXT
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut out = [0u8; 32];
    for chunk in out.chunks_exact_mut(8) {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes());
    }
    StoreKey(out)
}

/// Runs `pairs` claim + complete pairs on fresh keys spread over `tasks` concurrent tasks, each
/// completing with a ~200-byte JSON body, and returns the wall time taken.
pub async fn claim_complete_pairs<S: Store + Clone>(
    store: &S,
    tasks: usize,
    pairs: u64,
) -> Duration {
    let tasks = tasks.max(1) as u64;
    let outcome = Arc::new(Outcome::Response(StoredResponse::new(
        201,
        vec![(
            "content-type".into(),
            bytes::Bytes::from_static(b"application/json"),
        )],
        bytes::Bytes::from(format!(
            "{{\"id\":\"pay_1\",\"amount\":1000,\"pad\":\"{}\"}}",
            "x".repeat(150)
        )),
    )));
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let store = store.clone();
            let outcome = outcome.clone();
            let n = pairs / tasks + u64::from(t < pairs % tasks);
            tokio::spawn(async move {
                let req = claim_request(Duration::from_secs(10), Duration::from_secs(3600), 1);
                for _ in 0..n {
                    let key = bench_key();
                    let ClaimOutcome::Acquired { fencing } = store.claim(&key, &req).await.unwrap()
                    else {
                        panic!("fresh key existed");
                    };
                    store
                        .complete(&key, fencing, &outcome, Duration::from_secs(3600))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed()
}
