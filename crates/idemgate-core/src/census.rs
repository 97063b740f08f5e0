//! Counting the outcome-unknown records a store holds, through [`Store::list`]: the figure an
//! operator must bring to zero (each such record waits for a decision, or for its TTL).
//!
//! Why from the store, and not from what this process marked: instances sharing a store each
//! mark some records, an operator resolves them through any instance, and records expire on the
//! store's clock. Only the store knows which are open right now. The price is a scan: every
//! record is read (responses included, as [`Store::list`] returns them), a page of [`PAGE`] at a
//! time, so its cost grows with the store, not with the unknown records. `max_rate` bounds that
//! cost (records read per second); the count is then as old as the scan is long.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! use idemgate_core::census::count_unknown;
//! use idemgate_core::MemoryStore;
//!
//! let census = count_unknown(&MemoryStore::default(), Some("payments"), Some(1_000)).await?;
//! assert_eq!((census.unknown, census.scanned), (0, 0));
//! # Ok::<(), idemgate_core::StoreError>(())
//! # }).unwrap();
//! ```

use std::time::Duration;

use crate::error::StoreError;
use crate::record::RecordState;
use crate::store::{ListRequest, Store};

/// Records asked for per [`Store::list`] page: few, because a page holds whole records
/// (responses included) in memory at once.
pub const PAGE: usize = 100;

/// The result of [`count_unknown`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Census {
    /// Outcome-unknown records found (of the namespace asked for).
    pub unknown: u64,
    /// Records read, of every namespace.
    pub scanned: u64,
}

/// Counts the outcome-unknown records of `namespace` (of every namespace with `None`) in one
/// pass over the whole store, reading at most `max_rate` records a second (pausing between
/// pages; `None`: no pause). Records created or removed during the pass may or may not be
/// counted (the [`Store::list`] contract).
///
/// # Errors
///
/// The first store error ends the pass (a partial count would read as a fall in the figure: the
/// caller keeps its previous one).
pub async fn count_unknown<S: Store>(
    store: &S,
    namespace: Option<&str>,
    max_rate: Option<u32>,
) -> Result<Census, StoreError> {
    let started = tokio::time::Instant::now();
    let mut census = Census::default();
    let mut cursor = None;
    loop {
        let page = store
            .list(&ListRequest {
                cursor,
                limit: PAGE,
            })
            .await?;
        for (_, record) in &page.records {
            census.scanned += 1;
            if matches!(record.state, RecordState::Unknown { .. })
                && namespace.is_none_or(|ns| record.namespace == ns)
            {
                census.unknown += 1;
            }
        }
        let Some(next) = page.next else {
            return Ok(census);
        };
        cursor = Some(next);
        if let Some(rate) = max_rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(census.scanned as f64 / f64::from(rate));
            tokio::time::sleep_until(started + due).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::fingerprint::{Algorithm, Fingerprint};
    use crate::key::StoreKey;
    use crate::memory::MemoryStore;
    use crate::store::{ClaimOutcome, ClaimRequest};

    async fn record(store: &MemoryStore, i: u16, namespace: &str, unknown: bool) {
        let mut raw = [0u8; 32];
        raw[..2].copy_from_slice(&i.to_be_bytes());
        let key = StoreKey(raw);
        let req = ClaimRequest {
            namespace: namespace.into(),
            scope: "s".into(),
            idempotency_key: format!("k{i}"),
            fingerprint: Fingerprint::from_parts(Algorithm::Blake3, [0; 32]),
            token: u128::from(i) + 1, // 0 is no holder's token
            owner: "o".into(),
            lease_ttl: Duration::from_secs(60),
            ttl: Duration::from_secs(3600),
        };
        let Ok(ClaimOutcome::Acquired { fencing }) = store.claim(&key, &req).await else {
            panic!("claim {i}")
        };
        if unknown {
            let marked = store
                .mark_unknown(&key, fencing, Duration::from_secs(3600))
                .await;
            assert!(marked.is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn counts_the_unknown_records_of_one_namespace_across_pages_at_a_bounded_rate() {
        let store = MemoryStore::default();
        // 250 records over 3 pages: every 10th unknown, and some unknown ones of another service.
        for i in 0..250u16 {
            record(&store, i, "pay", i % 10 == 0).await;
        }
        for i in 250..260u16 {
            record(&store, i, "other", true).await;
        }
        let all = count_unknown(&store, Some("pay"), None).await.unwrap();
        assert_eq!(
            all,
            Census {
                unknown: 25,
                scanned: 260
            }
        );
        let every = count_unknown(&store, None, None).await.unwrap();
        assert_eq!(every.unknown, 35);
        // At 100 records a second, the first two pages (200 records) take 2 s of the clock.
        let start = tokio::time::Instant::now();
        let paced = count_unknown(&store, Some("pay"), Some(100)).await.unwrap();
        assert_eq!(paced, all);
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }
}
