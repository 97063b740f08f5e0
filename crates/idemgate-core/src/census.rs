//! Counting the outcome-unknown records a store holds, through [`Store::list`]: the figure an
//! operator must bring to zero (each such record waits for a decision, or for its TTL).
//!
//! Why from the store, and not from what this process marked: instances sharing a store each
//! mark some records, an operator resolves them through any instance, and records expire on the
//! store's clock. Only the store knows which are open right now. The price is a scan: every
//! record is visited, a page of [`PAGE`] at a time, so its cost grows with the store, not with
//! the unknown records. Stores that honour [`ListRequest::only_unknown`] (Redis) read only each
//! record's state and then the outcome-unknown records whole; the others return every record,
//! responses included. `max_rate` bounds that cost (records visited per second); the count is
//! then as old as the scan is long.
//!
//! [`survey_unknown`] also keeps the newest outcome-unknown records it met (a bounded number,
//! chosen by their marking instant), so that a dashboard can list them from the last pass
//! instead of scanning the store itself.
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

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::error::StoreError;
use crate::key::StoreKey;
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
    /// Records visited (read whole, or only their state), of every namespace.
    pub scanned: u64,
}

/// One outcome-unknown record met by [`survey_unknown`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownRecord {
    /// Its store key.
    pub store_key: StoreKey,
    /// Its scope label (`ROUTE#principal-hash` for the proxy).
    pub scope: String,
    /// The client's key.
    pub idempotency_key: String,
    /// The epoch that could not tell.
    pub epoch: u64,
    /// When it was marked (store clock).
    pub since: Timestamp,
}

/// The result of [`survey_unknown`]: the counts, and the newest outcome-unknown records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Survey {
    /// The counts (as [`count_unknown`] gives them).
    pub census: Census,
    /// The newest `keep` outcome-unknown records of the namespace (by `since`, newest first;
    /// ties by store key). `census.unknown` says how many there were in all.
    pub newest: Vec<UnknownRecord>,
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
    Ok(survey_unknown(store, namespace, max_rate, 0).await?.census)
}

/// A kept record in [`survey_unknown`]'s heap: (since, store key, scope, key, epoch), reversed.
type Kept = Reverse<(Timestamp, StoreKey, String, String, u64)>;

/// [`count_unknown`], also keeping the `keep` newest outcome-unknown records met (a bounded
/// heap: memory is `keep` records whatever the store holds).
///
/// # Errors
///
/// As [`count_unknown`].
pub async fn survey_unknown<S: Store>(
    store: &S,
    namespace: Option<&str>,
    max_rate: Option<u32>,
    keep: usize,
) -> Result<Survey, StoreError> {
    let started = tokio::time::Instant::now();
    let mut census = Census::default();
    // A min-heap on (since, store key): its top is the oldest kept, the one a newer one evicts.
    let mut newest: BinaryHeap<Kept> = BinaryHeap::with_capacity(keep.min(1024) + 1);
    let mut cursor = None;
    loop {
        let page = store
            .list(&ListRequest {
                cursor,
                limit: PAGE,
                only_unknown: true,
            })
            .await?;
        census.scanned += page.passed_over as u64;
        for (key, record) in page.records {
            census.scanned += 1;
            let RecordState::Unknown { epoch, since } = record.state else {
                continue;
            };
            if namespace.is_some_and(|ns| record.namespace != ns) {
                continue;
            }
            census.unknown += 1;
            if keep == 0 {
                continue;
            }
            let item = Reverse((since, key, record.scope, record.idempotency_key, epoch));
            if newest.len() < keep {
                newest.push(item);
            } else if newest.peek().is_some_and(|oldest| item < *oldest) {
                // `item < oldest` in reverse order: item is newer.
                newest.pop();
                newest.push(item);
            }
        }
        let Some(next) = page.next else {
            let mut newest: Vec<UnknownRecord> = newest
                .into_sorted_vec()
                .into_iter()
                .map(
                    |Reverse((since, store_key, scope, idempotency_key, epoch))| UnknownRecord {
                        store_key,
                        scope,
                        idempotency_key,
                        epoch,
                        since,
                    },
                )
                .collect();
            // `into_sorted_vec` of `Reverse` is newest first; keep it so.
            newest.truncate(keep);
            return Ok(Survey { census, newest });
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
