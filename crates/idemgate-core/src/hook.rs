//! One delegation point for store wrappers: [`Hooked`] forwards every [`Store`] method to an inner
//! store through a [`StoreHook`] that sees the [`Operation`], its future and its result. Fault
//! injection ([`testkit::faults`](crate::testkit)), the proxy's deadlines and metrics are hooks; a
//! new `Store` method lands here once, not in each wrapper.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use idemgate_core::hook::{Hooked, Operation, StoreHook};
//! use idemgate_core::store::{ListRequest, Store};
//! use idemgate_core::{MemoryStore, StoreError};
//!
//! /// Counts the calls.
//! #[derive(Default)]
//! struct Count(AtomicUsize);
//!
//! impl StoreHook for Count {
//!     async fn around<T, F>(&self, _op: Operation, call: F) -> Result<T, StoreError>
//!     where
//!         T: Send,
//!         F: Future<Output = Result<T, StoreError>> + Send,
//!     {
//!         self.0.fetch_add(1, Ordering::Relaxed);
//!         call.await
//!     }
//! }
//!
//! let store = Hooked::wrap(MemoryStore::default(), Count::default());
//! store.list(&ListRequest { cursor: None, limit: 10, only_unknown: false }).await?;
//! assert_eq!(store.hook().0.load(Ordering::Relaxed), 1);
//! # Ok::<(), StoreError>(())
//! # }).unwrap();
//! ```

use std::future::Future;
use std::time::Duration;

use crate::error::StoreError;
use crate::key::StoreKey;
use crate::record::{Fencing, Outcome, Record};
use crate::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ListPage, ListRequest,
    ResolveOutcome, Store, TakeOverOutcome, TakeOverRequest, UnknownMark,
};

/// The [`Store`] methods, by name: what a [`StoreHook`] is told, and a metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// [`Store::claim`].
    Claim,
    /// [`Store::renew`].
    Renew,
    /// [`Store::complete`].
    Complete,
    /// [`Store::mark_unknown`].
    MarkUnknown,
    /// [`Store::release`].
    Release,
    /// [`Store::take_over`].
    TakeOver,
    /// [`Store::get`].
    Get,
    /// [`Store::delete`].
    Delete,
    /// [`Store::complete_unknown`].
    CompleteUnknown,
    /// [`Store::list`].
    List,
    /// [`Store::purge_expired`].
    PurgeExpired,
}

impl Operation {
    /// Every operation, in declaration order (`op as usize` indexes it).
    pub const ALL: [Operation; 11] = [
        Operation::Claim,
        Operation::Renew,
        Operation::Complete,
        Operation::MarkUnknown,
        Operation::Release,
        Operation::TakeOver,
        Operation::Get,
        Operation::Delete,
        Operation::CompleteUnknown,
        Operation::List,
        Operation::PurgeExpired,
    ];

    /// The method's name, e.g. `"mark_unknown"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Claim => "claim",
            Operation::Renew => "renew",
            Operation::Complete => "complete",
            Operation::MarkUnknown => "mark_unknown",
            Operation::Release => "release",
            Operation::TakeOver => "take_over",
            Operation::Get => "get",
            Operation::Delete => "delete",
            Operation::CompleteUnknown => "complete_unknown",
            Operation::List => "list",
            Operation::PurgeExpired => "purge_expired",
        }
    }
}

/// Code around every operation of a [`Hooked`] store. It may run code before and after `call`,
/// bound it in time, replace its result (an error instead), or not poll it at all — but it must
/// not invent a success: it cannot, since it does not know `T`.
pub trait StoreHook: Send + Sync + 'static {
    /// Runs `call` (operation `op` of the inner store) and returns its result, or an error.
    fn around<T, F>(
        &self,
        op: Operation,
        call: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send
    where
        T: Send,
        F: Future<Output = Result<T, StoreError>> + Send;
}

/// A store whose every operation runs through `hook`. Same contract as the inner store, plus
/// whatever the hook adds (an error, a delay). Clones share what the inner store and the hook
/// share.
#[derive(Clone, Debug, Default)]
pub struct Hooked<S, H> {
    inner: S,
    hook: H,
}

impl<S: Store, H: StoreHook> Hooked<S, H> {
    /// Wraps `inner` with `hook`.
    pub fn wrap(inner: S, hook: H) -> Self {
        Self { inner, hook }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The hook.
    pub fn hook(&self) -> &H {
        &self.hook
    }
}

impl<S: Store, H: StoreHook> Store for Hooked<S, H> {
    async fn claim(&self, key: &StoreKey, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.hook
            .around(Operation::Claim, self.inner.claim(key, req))
            .await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        lease_ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.hook
            .around(Operation::Renew, self.inner.renew(key, fencing, lease_ttl))
            .await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.hook
            .around(
                Operation::Complete,
                self.inner.complete(key, fencing, outcome, ttl),
            )
            .await
    }
    async fn mark_unknown(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.hook
            .around(
                Operation::MarkUnknown,
                self.inner.mark_unknown(key, fencing, ttl),
            )
            .await
    }
    async fn release(&self, key: &StoreKey, fencing: Fencing) -> Result<CasOutcome, StoreError> {
        self.hook
            .around(Operation::Release, self.inner.release(key, fencing))
            .await
    }
    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        self.hook
            .around(Operation::TakeOver, self.inner.take_over(key, req))
            .await
    }
    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.hook.around(Operation::Get, self.inner.get(key)).await
    }
    async fn delete(&self, key: &StoreKey, mode: DeleteMode) -> Result<DeleteOutcome, StoreError> {
        self.hook
            .around(Operation::Delete, self.inner.delete(key, mode))
            .await
    }
    async fn complete_unknown(
        &self,
        key: &StoreKey,
        expected: UnknownMark,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        self.hook
            .around(
                Operation::CompleteUnknown,
                self.inner.complete_unknown(key, expected, outcome, ttl),
            )
            .await
    }
    async fn list(&self, req: &ListRequest) -> Result<ListPage, StoreError> {
        self.hook
            .around(Operation::List, self.inner.list(req))
            .await
    }
    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.hook
            .around(Operation::PurgeExpired, self.inner.purge_expired(limit))
            .await
    }
}
