//! Fault injection: a wrapper that makes a real store fail on demand, to test how callers react
//! to an unreachable store (the store's own behaviour is tested by the conformance suite).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{ErrorKind, StoreError};
use crate::key::StoreKey;
use crate::record::{Fencing, Outcome, Record};
use crate::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ListPage, ListRequest,
    Store, TakeOverOutcome, TakeOverRequest,
};

/// A store that answers `Unavailable` to every operation while it is "down", or to chosen
/// operations only, and that can delay chosen operations (a slow store). Clones share the
/// switches. Operations are named as the [`Store`] methods are (`"claim"`, `"renew"`, …).
#[derive(Clone, Debug)]
pub struct Faulty<S> {
    inner: S,
    down: Arc<AtomicBool>,
    failing: Arc<parking_lot::Mutex<std::collections::HashMap<&'static str, ErrorKind>>>,
    delays: Arc<parking_lot::Mutex<std::collections::HashMap<&'static str, Duration>>>,
}

impl<S: Store> Faulty<S> {
    /// Wraps `inner`, up.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            down: Arc::new(AtomicBool::new(false)),
            failing: Arc::default(),
            delays: Arc::default(),
        }
    }

    /// Makes operation `op` fail with `Unavailable` (`true`) or work again.
    pub fn set_failing(&self, op: &'static str, failing: bool) {
        let mut set = self.failing.lock();
        if failing {
            set.insert(op, ErrorKind::Unavailable);
        } else {
            set.remove(op);
        }
    }

    /// Makes operation `op` fail with an error of `kind` (a full store: `Capacity`; rotten
    /// bytes: `Corrupt`) until [`set_failing`](Self::set_failing)`(op, false)`.
    pub fn set_failing_with(&self, op: &'static str, kind: ErrorKind) {
        self.failing.lock().insert(op, kind);
    }

    /// Delays the answer of every call of operation `op` by `delay` (tokio's timer): the
    /// operation takes effect at once, and its caller hears of it `delay` later (a slow link).
    pub fn set_delay(&self, op: &'static str, delay: Duration) {
        self.delays.lock().insert(op, delay);
    }

    async fn answer_late<T>(&self, op: &'static str, out: T) -> T {
        let delay = self.delays.lock().get(op).copied();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        out
    }

    async fn enter(&self, op: &'static str) -> Result<(), StoreError> {
        let failing = self.failing.lock().get(op).copied();
        if let Some(kind) = failing {
            return Err(StoreError::new(kind, format!("injected fault: {op} fails")));
        }
        self.check()
    }

    /// Takes the store down (`true`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::new(
                ErrorKind::Unavailable,
                "injected fault: the store is down",
            ))
        } else {
            Ok(())
        }
    }
}

impl<S: Store> Store for Faulty<S> {
    async fn claim(&self, key: &StoreKey, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.enter("claim").await?;
        let out = self.inner.claim(key, req).await;
        self.answer_late("claim", out).await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        f: Fencing,
        lease: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.enter("renew").await?;
        let out = self.inner.renew(key, f, lease).await;
        self.answer_late("renew", out).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        f: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.enter("complete").await?;
        let out = self.inner.complete(key, f, outcome, ttl).await;
        self.answer_late("complete", out).await
    }
    async fn mark_unknown(
        &self,
        key: &StoreKey,
        f: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.enter("mark_unknown").await?;
        let out = self.inner.mark_unknown(key, f, ttl).await;
        self.answer_late("mark_unknown", out).await
    }
    async fn release(&self, key: &StoreKey, f: Fencing) -> Result<CasOutcome, StoreError> {
        self.enter("release").await?;
        let out = self.inner.release(key, f).await;
        self.answer_late("release", out).await
    }
    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        self.enter("take_over").await?;
        let out = self.inner.take_over(key, req).await;
        self.answer_late("take_over", out).await
    }
    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.enter("get").await?;
        let out = self.inner.get(key).await;
        self.answer_late("get", out).await
    }
    async fn delete(&self, key: &StoreKey, mode: DeleteMode) -> Result<DeleteOutcome, StoreError> {
        self.enter("delete").await?;
        let out = self.inner.delete(key, mode).await;
        self.answer_late("delete", out).await
    }
    async fn list(&self, req: &ListRequest) -> Result<ListPage, StoreError> {
        self.enter("list").await?;
        let out = self.inner.list(req).await;
        self.answer_late("list", out).await
    }
    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.enter("purge_expired").await?;
        let out = self.inner.purge_expired(limit).await;
        self.answer_late("purge_expired", out).await
    }
}
