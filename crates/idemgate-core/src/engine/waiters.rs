//! In-process waiters: retries of a running key wait on a [`Notify`] per key, woken on completion
//! without polling. Bounded by `max_waiters`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::EngineStats;
use crate::key::StoreKey;

/// In-process waiters per key, woken on completion without polling.
#[derive(Debug, Default)]
pub(super) struct Waiters {
    map: Mutex<HashMap<StoreKey, Arc<Notify>>>,
    count: AtomicUsize,
}

impl Waiters {
    pub(super) fn subscribe<'a>(
        &'a self,
        key: StoreKey,
        max: usize,
        stats: &'a EngineStats,
    ) -> Option<WaitGuard<'a>> {
        if self.count.fetch_add(1, Ordering::AcqRel) >= max {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        let notify = self.map.lock().entry(key).or_default().clone();
        Some(WaitGuard {
            waiters: self,
            stats,
            key,
            notify: Some(notify),
        })
    }

    pub(super) fn notify(&self, key: &StoreKey) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(n) = self.map.lock().get(key) {
            n.notify_waiters();
        }
    }
}

pub(super) struct WaitGuard<'a> {
    waiters: &'a Waiters,
    stats: &'a EngineStats,
    key: StoreKey,
    notify: Option<Arc<Notify>>,
}

impl WaitGuard<'_> {
    pub(super) fn notify(&self) -> Arc<Notify> {
        self.notify.clone().unwrap_or_default()
    }
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.map.lock();
        // Drop our handle under the lock so the last guard out reliably removes the entry.
        self.notify.take();
        if map
            .get(&self.key)
            .is_some_and(|n| Arc::strong_count(n) == 1)
        {
            map.remove(&self.key);
        }
        drop(map);
        self.waiters.count.fetch_sub(1, Ordering::AcqRel);
        self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiter_entries_are_removed_by_the_last_guard() {
        let waiters = Waiters::default();
        let stats = EngineStats::default();
        let k = StoreKey([1; 32]);
        let a = waiters.subscribe(k, 10, &stats).unwrap();
        let b = waiters.subscribe(k, 10, &stats).unwrap();
        assert_eq!(waiters.map.lock().len(), 1);
        drop(a);
        assert_eq!(waiters.map.lock().len(), 1);
        drop(b);
        assert!(waiters.map.lock().is_empty());
        assert_eq!(waiters.count.load(Ordering::Relaxed), 0);
        assert_eq!(stats.waiting.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn waiters_are_bounded() {
        let waiters = Waiters::default();
        let stats = EngineStats::default();
        let guards: Vec<_> = (0..3)
            .map(|i| waiters.subscribe(StoreKey([i; 32]), 3, &stats).unwrap())
            .collect();
        assert!(waiters.subscribe(StoreKey([9; 32]), 3, &stats).is_none());
        drop(guards);
        assert!(waiters.subscribe(StoreKey([9; 32]), 3, &stats).is_some());
    }
}
