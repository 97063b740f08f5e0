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
