//! Fault injection: a wrapper that makes a real store fail on demand, to test how callers react
//! to an unreachable store (the store's own behaviour is tested by the conformance suite).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::error::{ErrorKind, StoreError};
use crate::key::StoreKey;
use crate::record::{Fencing, Outcome, Record};
use crate::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, ListPage, ListRequest, Store, TakeOverOutcome,
    TakeOverRequest,
};

/// A store that answers `Unavailable` to every operation while it is "down". Clones share the
/// switch.
#[derive(Clone, Debug)]
pub struct Faulty<S> {
    inner: S,
    down: Arc<AtomicBool>,
}

impl<S: Store> Faulty<S> {
    /// Wraps `inner`, up.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            down: Arc::new(AtomicBool::new(false)),
        }
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
        self.check()?;
        self.inner.claim(key, req).await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        f: Fencing,
        lease: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.check()?;
        self.inner.renew(key, f, lease).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        f: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.check()?;
        self.inner.complete(key, f, outcome, ttl).await
    }
    async fn mark_unknown(
        &self,
        key: &StoreKey,
        f: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.check()?;
        self.inner.mark_unknown(key, f, ttl).await
    }
    async fn release(&self, key: &StoreKey, f: Fencing) -> Result<CasOutcome, StoreError> {
        self.check()?;
        self.inner.release(key, f).await
    }
    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        self.check()?;
        self.inner.take_over(key, req).await
    }
    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn delete(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.delete(key).await
    }
    async fn list(&self, req: &ListRequest) -> Result<ListPage, StoreError> {
        self.check()?;
        self.inner.list(req).await
    }
    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.check()?;
        self.inner.purge_expired(limit).await
    }
}
