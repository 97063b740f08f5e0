//! A bounded background sweeper that purges expired records from any [`Store`].
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! use std::time::Duration;
//! use idemgate_core::{sweeper::spawn_sweeper, MemoryStore};
//!
//! let handle = spawn_sweeper(MemoryStore::default(), Duration::from_secs(30), 1_000);
//! handle.abort();
//! # });
//! ```

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::store::Store;

/// Every `interval`, removes expired records in batches of at most `batch`, stopping the round when
/// a batch comes back short. Errors are logged and retried at the next interval. Abort the handle
/// (or drop the runtime) to stop it.
pub fn spawn_sweeper<S: Store>(store: S, interval: Duration, batch: usize) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            loop {
                match store.purge_expired(batch).await {
                    Ok(n) if n >= batch => tokio::task::yield_now().await,
                    Ok(n) => {
                        if n > 0 {
                            tracing::debug!(removed = n, "purged expired records");
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "sweeper could not purge expired records");
                        break;
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;
    use crate::fingerprint::{Algorithm, Fingerprint};
    use crate::key::StoreKey;
    use crate::memory::MemoryStore;
    use crate::store::ClaimRequest;

    #[tokio::test(start_paused = true)]
    async fn the_sweeper_purges_expired_records_in_bounded_batches() {
        let store = MemoryStore::builder().clock(TokioClock::new()).build();
        for i in 0u8..50 {
            let req = ClaimRequest {
                namespace: "n".into(),
                scope: "s".into(),
                idempotency_key: format!("k{i}"),
                fingerprint: Fingerprint::from_parts(Algorithm::Blake3, [0; 32]),
                token: u128::from(i),
                owner: "o".into(),
                lease_ttl: Duration::from_secs(5),
                ttl: Duration::from_secs(60),
            };
            store.claim(&StoreKey([i; 32]), &req).await.unwrap();
        }
        let sweeper = spawn_sweeper(store.clone(), Duration::from_secs(30), 7);
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(store.len(), 50, "nothing has expired yet");
        // Past the TTL, then one more interval so that the round (8 batches of <= 7) has finished.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(store.len(), 0);
        sweeper.abort();
    }
}
