//! The `Store` contract: the narrow set of atomic operations every backend provides.
//!
//! # The contract, once for every method
//!
//! - **Atomicity.** Each method is one atomic step against the record filed under its
//!   [`StoreKey`]: it reads the current state and writes the new one with no other operation on that
//!   key in between (a transaction, a Lua script, a row lock, a mutex). Backends that can do it in
//!   one network round trip must.
//! - **Clock.** "Now" is the store's clock: the server's for Redis and PostgreSQL, the injected
//!   [`Clock`](crate::Clock) for memory and redb. Durations passed in (`lease_ttl`, `ttl`) are added
//!   to that clock. A record whose `expires_at` is at or before now is absent for every method.
//! - **Fencing.** [`claim`](Store::claim) grants epoch 1; [`take_over`](Store::take_over) grants
//!   epoch + 1, only once the holder's lease has expired. `renew`, `complete`, `mark_unknown` and
//!   `release` are compare-and-set on the whole [`Fencing`] (epoch *and* token) of an in-flight record:
//!   any mismatch (another epoch, another state, an absent record) returns
//!   [`CasOutcome::Lost`] and changes nothing. So a stale holder can never overwrite a newer outcome
//!   (PRODUCT G4), and a completed record never changes. The administrators' operations
//!   ([`delete`](Store::delete), [`complete_unknown`](Store::complete_unknown)) are
//!   compare-and-set on the record's state (and, for `complete_unknown`, on its [`UnknownMark`]).
//! - **Errors.** `Err` means the store could not answer; see [`ErrorKind`](crate::ErrorKind). For
//!   writes, `Unavailable`/`Timeout` mean "may or may not have applied": callers must not assume
//!   either. Outcomes such as "exists", "lost" or "refused" are `Ok` values.
//!
//! There are no default methods: a backend states how it makes each operation atomic.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::Timestamp;
use crate::error::StoreError;
use crate::fingerprint::Fingerprint;
use crate::key::StoreKey;
use crate::record::{Fencing, Outcome, Record};

/// Short-circuits a compare-and-set by a revoked fencing, which no record ever grants to a
/// holder (see [`Fencing::REVOKED`]).
pub fn revoked_cas(fencing: Fencing) -> Option<CasOutcome> {
    fencing.is_revoked().then_some(CasOutcome::Lost)
}

/// What a new in-flight record is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRequest {
    /// Namespace, kept for administrators.
    pub namespace: String,
    /// Scope label, kept for administrators.
    pub scope: String,
    /// The client's key, kept for administrators.
    pub idempotency_key: String,
    /// Fingerprint of this request.
    pub fingerprint: Fingerprint,
    /// The acquirer's unique token (becomes [`Fencing::token`]).
    pub token: u128,
    /// The acquirer's name, for administrators.
    pub owner: String,
    /// How long the lease lasts unless renewed.
    pub lease_ttl: Duration,
    /// How long the record may exist at most while in flight (renewals extend it to cover the lease).
    pub ttl: Duration,
}

impl ClaimRequest {
    /// A request for `key`, copying its namespace, scope label and raw key into the record.
    pub fn new(
        key: &crate::key::ScopedKey,
        fingerprint: Fingerprint,
        token: u128,
        owner: impl Into<String>,
        lease_ttl: Duration,
        ttl: Duration,
    ) -> Self {
        Self {
            namespace: key.namespace().to_owned(),
            scope: key.scope().label().to_owned(),
            idempotency_key: key.key().as_str().to_owned(),
            fingerprint,
            token,
            owner: owner.into(),
            lease_ttl,
            ttl,
        }
    }
}

/// What [`Store::take_over`] needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeOverRequest {
    /// The fencing of the holder whose lease is believed expired.
    pub expired: Fencing,
    /// The new holder's unique token.
    pub token: u128,
    /// The new holder's name.
    pub owner: String,
    /// The new lease.
    pub lease_ttl: Duration,
}

/// Result of [`Store::claim`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The key was absent: the caller now holds it at epoch 1.
    Acquired {
        /// The caller's proof of holding.
        fencing: Fencing,
    },
    /// The key exists (any state); nothing changed.
    Existing {
        /// The record as it is.
        record: Record,
        /// The store's clock at the time of the read, to judge lease expiry with.
        now: Timestamp,
    },
}

/// Result of a compare-and-set on the holder's fencing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// The caller was the holder and the change is made.
    Applied,
    /// The caller is not (or no longer) the holder; nothing changed.
    Lost,
}

/// Result of [`Store::take_over`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TakeOverOutcome {
    /// The caller now holds the key at `expired.epoch + 1`.
    Acquired {
        /// The caller's proof of holding.
        fencing: Fencing,
    },
    /// The record is not an in-flight record with that fencing whose lease expired; nothing changed.
    Refused {
        /// The record as it is (`None`: absent).
        current: Option<Record>,
        /// The store's clock at the time of the read.
        now: Timestamp,
    },
}

/// Which records [`Store::delete`] may remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeleteMode {
    /// Only a finished record (completed or outcome-unknown); an in-flight record is refused,
    /// so a delete never lets a second dispatch start while the first runs (a revoked one, whose
    /// holder is fenced off already, is removed).
    Finished,
    /// Only an outcome-unknown record (an operator's "it did not take effect"): one
    /// compare-and-set, so a record that expired and was claimed again meanwhile is left alone.
    Unknown,
    /// Only an in-flight record, which is not removed but *revoked*: its token becomes
    /// [`Fencing::REVOKED`] and its lease ends now, so the holder loses every later
    /// compare-and-set and the next claimer takes over at epoch + 1 — never epoch 1 again. A
    /// record that finished meanwhile is refused (its outcome is kept for replays).
    ///
    /// In every mode, a record already revoked (no holder left) is removed.
    Force,
}

/// Result of [`Store::delete`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// A live record was removed.
    Deleted,
    /// An in-flight record was revoked ([`DeleteMode::Force`]); it was at this epoch.
    Revoked {
        /// The revoked holder's epoch; the next dispatch runs at `epoch + 1`.
        epoch: u64,
    },
    /// There was no live record (an expired one may have been removed).
    Absent,
    /// The mode does not allow removing the record as it is; nothing changed.
    Refused {
        /// The record as it is.
        current: Box<Record>,
    },
}

/// Which outcome-unknown record [`Store::complete_unknown`] may complete: its epoch and the
/// instant it was marked (both as read from the record, [`RecordState::Unknown`]). Together they
/// name one marking: a record that expired and was claimed and marked again meanwhile carries
/// another `since` (and usually another epoch), so an operator's decision about the first is
/// never applied to the second.
///
/// [`RecordState::Unknown`]: crate::record::RecordState::Unknown
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UnknownMark {
    /// The epoch that could not tell.
    pub epoch: u64,
    /// When it was marked outcome-unknown (store clock).
    pub since: Timestamp,
}

impl UnknownMark {
    /// The mark of `record`, if it is outcome-unknown.
    pub fn of(record: &Record) -> Option<Self> {
        match record.state {
            crate::record::RecordState::Unknown { epoch, since } => Some(Self { epoch, since }),
            _ => None,
        }
    }
}

/// Result of [`Store::complete_unknown`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveOutcome {
    /// The outcome-unknown record is completed now (at its epoch) with the given outcome.
    Completed,
    /// There was no live record (an expired one may have been removed).
    Absent,
    /// The record is not outcome-unknown with that mark (another state, another epoch or
    /// marking); nothing changed.
    Refused {
        /// The record as it is.
        current: Box<Record>,
    },
}

/// A page request for [`Store::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListRequest {
    /// Where to continue (from [`ListPage::next`]); `None` starts at the beginning.
    pub cursor: Option<String>,
    /// At most this many records (a backend may return fewer, or cap it).
    pub limit: usize,
    /// A hint: the caller wants only outcome-unknown records ([`crate::record::RecordState::Unknown`]). A
    /// store that can tell a record's state cheaply before reading it whole (Redis) leaves the
    /// others out and counts them in [`ListPage::passed_over`]; others return every record as
    /// usual. Callers filter either way.
    pub only_unknown: bool,
}

impl ListRequest {
    /// For stores whose cursor is the last [`StoreKey`] listed (hex): that key, if any.
    /// A cursor that is not 64 hex characters is an `Internal` error (callers pass back `next`).
    pub fn after_key(&self) -> Result<Option<StoreKey>, StoreError> {
        self.cursor
            .as_deref()
            .map(|c| {
                StoreKey::from_hex(c).ok_or_else(|| {
                    StoreError::new(
                        crate::error::ErrorKind::Internal,
                        format!("invalid list cursor {c:?}"),
                    )
                })
            })
            .transpose()
    }
}

/// A page of records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Records with the keys they are filed under.
    pub records: Vec<(StoreKey, Record)>,
    /// The cursor of the next page; `None` when the listing is done.
    pub next: Option<String>,
    /// Records this page visited but left out because of [`ListRequest::only_unknown`] (0 from
    /// stores that ignore the hint). `records.len() + passed_over` is the page's share of the
    /// store, for callers that pace a pass by records visited.
    pub passed_over: usize,
}

/// The operations of PRODUCT §2. Read the [module docs](self) for the contract every method shares.
pub trait Store: Send + Sync + 'static {
    /// If `key` is absent, creates an in-flight record at epoch 1 held by `req.token` with a lease of
    /// `req.lease_ttl` and returns [`ClaimOutcome::Acquired`]; otherwise returns the existing record
    /// unchanged, in the same atomic step. Exactly one of any number of concurrent claims on an
    /// absent key acquires it.
    fn claim(
        &self,
        key: &StoreKey,
        req: &ClaimRequest,
    ) -> impl Future<Output = Result<ClaimOutcome, StoreError>> + Send;

    /// Compare-and-set on `fencing`: extends the lease to now + `lease_ttl` (and the record's expiry
    /// so it covers the lease). A holder whose lease already ran out may still renew as long as no
    /// one took over.
    fn renew(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        lease_ttl: Duration,
    ) -> impl Future<Output = Result<CasOutcome, StoreError>> + Send;

    /// Compare-and-set on `fencing`: the record becomes completed with `outcome`, expiring at
    /// now + `ttl`. Bodies over [`MAX_BODY_LEN`](crate::record::MAX_BODY_LEN) are refused with
    /// `Capacity`.
    fn complete(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> impl Future<Output = Result<CasOutcome, StoreError>> + Send;

    /// Compare-and-set on `fencing`: the record becomes outcome-unknown, expiring at now + `ttl`.
    fn mark_unknown(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        ttl: Duration,
    ) -> impl Future<Output = Result<CasOutcome, StoreError>> + Send;

    /// Compare-and-set on `fencing`: deletes the record so that a retry may run (used only on proof
    /// that nothing happened, or on a transient outcome).
    fn release(
        &self,
        key: &StoreKey,
        fencing: Fencing,
    ) -> impl Future<Output = Result<CasOutcome, StoreError>> + Send;

    /// If the record is in flight with exactly `req.expired` and its lease has expired by the store's
    /// clock, hands it to `req.token` at epoch + 1 with a fresh lease. Of concurrent takeovers of one
    /// epoch, exactly one succeeds. Otherwise returns the current record unchanged.
    fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> impl Future<Output = Result<TakeOverOutcome, StoreError>> + Send;

    /// The unexpired record, if any.
    fn get(
        &self,
        key: &StoreKey,
    ) -> impl Future<Output = Result<Option<Record>, StoreError>> + Send;

    /// Administrators' delete, in one atomic step, as `mode` allows (see [`DeleteMode`]): removes
    /// a finished record, refuses or revokes an in-flight one. A revoked holder loses every later
    /// compare-and-set, and a later [`take_over`](Store::take_over) of `(epoch, REVOKED)` succeeds
    /// at once (its lease ended at the revocation). An expired record is absent (and may be
    /// removed).
    fn delete(
        &self,
        key: &StoreKey,
        mode: DeleteMode,
    ) -> impl Future<Output = Result<DeleteOutcome, StoreError>> + Send;

    /// Administrators' "it did happen, and this was its answer", in one atomic step: if the record
    /// is outcome-unknown with exactly `expected` (epoch and marking instant), it becomes
    /// completed at that epoch with `outcome`, completed now and expiring at now + `ttl`; its
    /// fingerprint and creation time are kept. Any other live record is left unchanged and
    /// returned ([`ResolveOutcome::Refused`]); no live record is [`ResolveOutcome::Absent`]. So a
    /// racing administrator, a takeover or a new claim after expiry is never overwritten, and
    /// only an outcome-unknown record ever becomes completed this way (a completed record still
    /// never changes). Bodies over [`MAX_BODY_LEN`](crate::record::MAX_BODY_LEN) are refused
    /// with `Capacity`.
    fn complete_unknown(
        &self,
        key: &StoreKey,
        expected: UnknownMark,
        outcome: &Outcome,
        ttl: Duration,
    ) -> impl Future<Output = Result<ResolveOutcome, StoreError>> + Send;

    /// One page of unexpired records, in an order the backend defines. Every record that exists for
    /// the whole listing appears in at least one page; records created or deleted meanwhile may or
    /// may not appear. With [`ListRequest::only_unknown`], that holds for the outcome-unknown
    /// records (unchanged for the whole listing); others may be left out.
    fn list(&self, req: &ListRequest) -> impl Future<Output = Result<ListPage, StoreError>> + Send;

    /// Removes up to `limit` expired records and returns how many it removed. Backends with native
    /// expiry may return 0 always. Removing an expired record is never visible to other methods, which
    /// treat it as absent already.
    fn purge_expired(&self, limit: usize)
    -> impl Future<Output = Result<usize, StoreError>> + Send;
}

/// A boxed future, as returned by [`DynStore`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe form of [`Store`], so a store can be chosen at run time (from a URL).
///
/// Every [`Store`] is a `DynStore`; `Arc<dyn DynStore>` is a [`Store`] again. Same contract; each
/// call costs one allocation for the boxed future.
#[allow(missing_docs)] // Each method is documented on `Store`.
pub trait DynStore: Send + Sync + 'static {
    fn dyn_claim<'a>(
        &'a self,
        key: &'a StoreKey,
        req: &'a ClaimRequest,
    ) -> BoxFuture<'a, Result<ClaimOutcome, StoreError>>;
    fn dyn_renew<'a>(
        &'a self,
        key: &'a StoreKey,
        fencing: Fencing,
        lease_ttl: Duration,
    ) -> BoxFuture<'a, Result<CasOutcome, StoreError>>;
    fn dyn_complete<'a>(
        &'a self,
        key: &'a StoreKey,
        fencing: Fencing,
        outcome: &'a Outcome,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<CasOutcome, StoreError>>;
    fn dyn_mark_unknown<'a>(
        &'a self,
        key: &'a StoreKey,
        fencing: Fencing,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<CasOutcome, StoreError>>;
    fn dyn_release<'a>(
        &'a self,
        key: &'a StoreKey,
        fencing: Fencing,
    ) -> BoxFuture<'a, Result<CasOutcome, StoreError>>;
    fn dyn_take_over<'a>(
        &'a self,
        key: &'a StoreKey,
        req: &'a TakeOverRequest,
    ) -> BoxFuture<'a, Result<TakeOverOutcome, StoreError>>;
    fn dyn_get<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<Record>, StoreError>>;
    fn dyn_delete<'a>(
        &'a self,
        key: &'a StoreKey,
        mode: DeleteMode,
    ) -> BoxFuture<'a, Result<DeleteOutcome, StoreError>>;
    fn dyn_complete_unknown<'a>(
        &'a self,
        key: &'a StoreKey,
        expected: UnknownMark,
        outcome: &'a Outcome,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<ResolveOutcome, StoreError>>;
    fn dyn_list<'a>(&'a self, req: &'a ListRequest) -> BoxFuture<'a, Result<ListPage, StoreError>>;
    fn dyn_purge_expired(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>>;
}

impl<S: Store> DynStore for S {
    fn dyn_claim<'a>(
        &'a self,
        key: &'a StoreKey,
        req: &'a ClaimRequest,
    ) -> BoxFuture<'a, Result<ClaimOutcome, StoreError>> {
        Box::pin(self.claim(key, req))
    }
    fn dyn_renew<'a>(
        &'a self,
        key: &'a StoreKey,
        fencing: Fencing,
        lease_ttl: Duration,
    ) -> BoxFuture<'a, Result<CasOutcome, StoreError>> {
        Box::pin(self.renew(key, fencing, lease_ttl))
    }
    fn dyn_complete<'a>(
        &'a self,
        key: &'a StoreKey,
        fencing: Fencing,
        outcome: &'a Outcome,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<CasOutcome, StoreError>> {
        Box::pin(self.complete(key, fencing, outcome, ttl))
    }
    fn dyn_mark_unknown<'a>(
        &'a self,
        key: &'a StoreKey,
        fencing: Fencing,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<CasOutcome, StoreError>> {
        Box::pin(self.mark_unknown(key, fencing, ttl))
    }
    fn dyn_release<'a>(
        &'a self,
        key: &'a StoreKey,
        fencing: Fencing,
    ) -> BoxFuture<'a, Result<CasOutcome, StoreError>> {
        Box::pin(self.release(key, fencing))
    }
    fn dyn_take_over<'a>(
        &'a self,
        key: &'a StoreKey,
        req: &'a TakeOverRequest,
    ) -> BoxFuture<'a, Result<TakeOverOutcome, StoreError>> {
        Box::pin(self.take_over(key, req))
    }
    fn dyn_get<'a>(
        &'a self,
        key: &'a StoreKey,
    ) -> BoxFuture<'a, Result<Option<Record>, StoreError>> {
        Box::pin(self.get(key))
    }
    fn dyn_delete<'a>(
        &'a self,
        key: &'a StoreKey,
        mode: DeleteMode,
    ) -> BoxFuture<'a, Result<DeleteOutcome, StoreError>> {
        Box::pin(self.delete(key, mode))
    }
    fn dyn_complete_unknown<'a>(
        &'a self,
        key: &'a StoreKey,
        expected: UnknownMark,
        outcome: &'a Outcome,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<ResolveOutcome, StoreError>> {
        Box::pin(self.complete_unknown(key, expected, outcome, ttl))
    }
    fn dyn_list<'a>(&'a self, req: &'a ListRequest) -> BoxFuture<'a, Result<ListPage, StoreError>> {
        Box::pin(self.list(req))
    }
    fn dyn_purge_expired(&self, limit: usize) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(self.purge_expired(limit))
    }
}

/// A store picked at run time (from a URL): any [`Store`] behind one pointer. Cheap to clone.
///
/// A named type rather than `Arc<dyn DynStore>`, so that futures holding it carry no trait-object
/// lifetime for the compiler to infer (which would defeat its `Send` and `Store` checks).
#[derive(Clone)]
pub struct SharedStore(Arc<dyn DynStore>);

impl SharedStore {
    /// Wraps `store`.
    pub fn new(store: impl Store) -> Self {
        Self(Arc::new(store))
    }
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedStore")
    }
}

impl Store for SharedStore {
    async fn claim(&self, key: &StoreKey, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.0.dyn_claim(key, req).await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        lease_ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.0.dyn_renew(key, fencing, lease_ttl).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.0.dyn_complete(key, fencing, outcome, ttl).await
    }
    async fn mark_unknown(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.0.dyn_mark_unknown(key, fencing, ttl).await
    }
    async fn release(&self, key: &StoreKey, fencing: Fencing) -> Result<CasOutcome, StoreError> {
        self.0.dyn_release(key, fencing).await
    }
    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        self.0.dyn_take_over(key, req).await
    }
    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        self.0.dyn_get(key).await
    }
    async fn delete(&self, key: &StoreKey, mode: DeleteMode) -> Result<DeleteOutcome, StoreError> {
        self.0.dyn_delete(key, mode).await
    }
    async fn complete_unknown(
        &self,
        key: &StoreKey,
        expected: UnknownMark,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        self.0
            .dyn_complete_unknown(key, expected, outcome, ttl)
            .await
    }
    async fn list(&self, req: &ListRequest) -> Result<ListPage, StoreError> {
        self.0.dyn_list(req).await
    }
    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.0.dyn_purge_expired(limit).await
    }
}

impl<S: Store> Store for Arc<S> {
    async fn claim(&self, key: &StoreKey, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        (**self).claim(key, req).await
    }
    async fn renew(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        lease_ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        (**self).renew(key, fencing, lease_ttl).await
    }
    async fn complete(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        (**self).complete(key, fencing, outcome, ttl).await
    }
    async fn mark_unknown(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        (**self).mark_unknown(key, fencing, ttl).await
    }
    async fn release(&self, key: &StoreKey, fencing: Fencing) -> Result<CasOutcome, StoreError> {
        (**self).release(key, fencing).await
    }
    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        (**self).take_over(key, req).await
    }
    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        (**self).get(key).await
    }
    async fn delete(&self, key: &StoreKey, mode: DeleteMode) -> Result<DeleteOutcome, StoreError> {
        (**self).delete(key, mode).await
    }
    async fn complete_unknown(
        &self,
        key: &StoreKey,
        expected: UnknownMark,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        (**self).complete_unknown(key, expected, outcome, ttl).await
    }
    async fn list(&self, req: &ListRequest) -> Result<ListPage, StoreError> {
        (**self).list(req).await
    }
    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        (**self).purge_expired(limit).await
    }
}
