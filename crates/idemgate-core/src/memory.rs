//! The in-memory store: sharded, capacity-bounded, with per-record expiry.
//!
//! For tests, single-process deployments and caches. Nothing survives a restart.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use idemgate_core::MemoryStore;
//! use idemgate_core::store::{ListRequest, Store};
//!
//! let store = MemoryStore::builder().max_records(1_000).build();
//! let page = store.list(&ListRequest { cursor: None, limit: 10, only_unknown: false }).await?;
//! assert!(page.records.is_empty());
//! # Ok::<(), idemgate_core::StoreError>(())
//! # }).unwrap();
//! ```
//!
//! # Bounds
//!
//! - At most `max_records` records (default 1,000,000) and roughly `max_bytes` of keys, labels and
//!   payloads (default 1 GiB). When either bound is reached, a claim of a new key first purges the
//!   expired records of the next shards in turn until one frees something (at most
//!   [`PURGE_SHARDS_PER_CLAIM`] = 4 of the 64, and at most [`SCAN_BUDGET`] entries of each,
//!   resuming where the last scan stopped: bounded work even for keys steered into one shard,
//!   never a sweep of the whole store on a request; so a store whose expired records sit in few
//!   shards may refuse a few claims while it recycles); if the store is still full, it fails with
//!   [`ErrorKind::Capacity`] (the proxy answers `503` problem `store-full` with `Retry-After`). In-flight and
//!   unexpired records are never evicted. `complete` is always accepted for a held key, so the
//!   byte bound can be overshot by the bodies of operations already in flight. There is no
//!   per-scope quota: one principal can fill the store for all (size it, or use a shared store).
//! - Expired records are invisible at once and removed by [`Store::purge_expired`] (see
//!   [`spawn_sweeper`](crate::sweeper::spawn_sweeper)), when their key is claimed again, or a
//!   shard at a time by claims that find the store full (after a whole round of shards that freed
//!   nothing, claims rest from purging for a second of store time and refuse at once).
//!
//! # Representation
//!
//! Each finished record (completed or outcome-unknown) is kept as ONE exact-size allocation, its
//! versioned encoding ([`Record::encode`]), filed in a per-shard `BTreeMap` under its 32-byte
//! key; operations decode it, apply the [`protocol`] step and re-encode. Records in flight stay
//! decoded (boxed): there are few of them, and completing one then needs no decode. The expiry
//! time sits beside each record in the map, so a purge scan reads only the map's nodes. There is no separate expiry index: purging scans
//! the shards (a sweep visits each map entry once: 1,000,000 records in tens of milliseconds, see
//! docs/performance.md). Measured with 1,000,000 completed records of a
//! 221-byte body (`record-footprint`, see docs/performance.md): 271 bytes per record beyond the
//! body, against 729 when `Record` values were kept in the map with a separate expiry index.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::{ErrorKind, StoreError};
use crate::key::StoreKey;
use crate::protocol::{self, Write};
use crate::record::{Fencing, Outcome, Record, RecordState};
use crate::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ListPage, ListRequest,
    ResolveOutcome, Store, TakeOverOutcome, TakeOverRequest, UnknownMark,
};

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;
/// Most shards a claim on a full store purges before it gives up (see the module docs).
pub const PURGE_SHARDS_PER_CLAIM: usize = 4;
/// Most entries of a shard one of those purges looks at (resuming where the last one stopped).
pub const SCAN_BUDGET: usize = 4_096;
/// Largest page [`MemoryStore`] returns from `list`.
pub const MAX_LIST_PAGE: usize = 1_000;

#[derive(Default)]
struct Shard {
    records: BTreeMap<StoreKey, Slot>,
    /// Where the next bounded scan of a full store resumes (`None`: from the start).
    scan_from: Option<StoreKey>,
}

/// One stored record, with its expiry time beside it so that purging scans only the map's own
/// nodes (reading it from each record's allocation instead took 427 ms per sweep of 1,000,000
/// records, a cache miss each).
struct Slot {
    expires_at: Timestamp,
    body: SlotBody,
}

/// Records in flight (few, short-lived, and changed again soon) stay decoded; finished ones are
/// packed into [`Record::encode`]'s bytes, one exact-size allocation.
enum SlotBody {
    Live(Box<Record>),
    Packed(Box<[u8]>),
}

impl Slot {
    fn new(record: Record) -> Self {
        let expires_at = record.expires_at;
        if matches!(record.state, RecordState::InFlight { .. }) {
            return Slot {
                expires_at,
                body: SlotBody::Live(Box::new(record)),
            };
        }
        // Allocated at the exact size: shrinking an estimated buffer in place leaves the
        // allocator's block (or a hole beside it) at the estimate (measured: 32 bytes per record).
        let mut bytes = Vec::with_capacity(record.encoded_len());
        record.encode_into(&mut bytes);
        Slot {
            expires_at,
            body: SlotBody::Packed(bytes.into_boxed_slice()),
        }
    }

    /// Whether the record is gone at `now`.
    fn is_expired(&self, now: Timestamp) -> bool {
        now >= self.expires_at
    }

    /// The record, borrowed when it is kept decoded.
    fn record(&self) -> Result<Cow<'_, Record>, StoreError> {
        match &self.body {
            SlotBody::Live(record) => Ok(Cow::Borrowed(record)),
            SlotBody::Packed(bytes) => Ok(Cow::Owned(Record::decode(bytes)?)),
        }
    }

    /// Approximate heap cost: what the byte budget counts (allocations plus the map entry).
    fn cost(&self) -> usize {
        match &self.body {
            SlotBody::Live(r) => {
                let owner = match &r.state {
                    RecordState::InFlight { owner, .. } => owner.len(),
                    _ => 0,
                };
                200 + r.namespace.len() + r.scope.len() + r.idempotency_key.len() + owner
            }
            SlotBody::Packed(bytes) => bytes.len() + 72,
        }
    }
}

/// Builds a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryStoreBuilder {
    max_records: usize,
    max_bytes: usize,
    clock: Arc<dyn Clock>,
}

impl MemoryStoreBuilder {
    /// Most records held at once (default 1,000,000).
    pub fn max_records(mut self, n: usize) -> Self {
        self.max_records = n;
        self
    }

    /// Approximate byte budget for keys, labels and stored payloads (default 1 GiB).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// The clock that decides expiry (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Builds the store.
    pub fn build(self) -> MemoryStore {
        MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
                records: AtomicUsize::new(0),
                bytes: AtomicUsize::new(0),
                max_records: self.max_records,
                max_bytes: self.max_bytes,
                clock: self.clock,
                rest_until: AtomicU64::new(0),
                fruitless: AtomicUsize::new(0),
                purge_cursor: AtomicUsize::new(0),
            }),
        }
    }
}

/// The sharded in-memory store. Cloning shares the same data.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Vec<Mutex<Shard>>,
    records: AtomicUsize,
    bytes: AtomicUsize,
    max_records: usize,
    max_bytes: usize,
    clock: Arc<dyn Clock>,
    /// Store time (ms) before which a full store does not look for expired records (see
    /// `make_room`).
    rest_until: AtomicU64,
    /// Shards purged in a row that freed nothing.
    fruitless: AtomicUsize,
    /// Shard where the next purge starts, so that limited purges visit every shard in turn.
    purge_cursor: AtomicUsize,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("records", &self.len())
            .field("max_records", &self.inner.max_records)
            .field("bytes", &self.inner.bytes.load(Ordering::Relaxed))
            .field("max_bytes", &self.inner.max_bytes)
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl MemoryStore {
    /// A builder with the defaults.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_records: 1_000_000,
            max_bytes: 1 << 30,
            clock: Arc::new(SystemClock),
        }
    }

    /// Records held, including expired ones not yet purged.
    pub fn len(&self) -> usize {
        self.inner.records.load(Ordering::Relaxed)
    }

    /// Whether no record is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate bytes counted against the byte budget.
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    fn shard_of(key: &StoreKey) -> usize {
        (key.0[0] >> (8 - SHARD_BITS)) as usize
    }

    /// Runs one protocol step on `key` under its shard lock and applies the write.
    fn step<T>(
        &self,
        key: &StoreKey,
        f: impl FnOnce(Option<&Record>, Timestamp) -> Result<(Write, T), StoreError>,
    ) -> Result<T, StoreError> {
        let inner = &self.inner;
        let mut shard = inner.shards[Self::shard_of(key)].lock();
        let now = inner.clock.now();
        let current = match shard.records.get(key) {
            Some(slot) => Some(slot.record()?),
            None => None,
        };
        let (write, out) = f(current.as_deref(), now)?;
        drop(current);
        match write {
            Write::Unchanged => {}
            Write::Put(record) => {
                let slot = Slot::new(record);
                let added = slot.cost();
                match shard.records.insert(*key, slot) {
                    Some(old) => {
                        inner.bytes.fetch_sub(old.cost(), Ordering::Relaxed);
                    }
                    None => {
                        inner.records.fetch_add(1, Ordering::Relaxed);
                    }
                }
                inner.bytes.fetch_add(added, Ordering::Relaxed);
            }
            Write::Delete => {
                if let Some(old) = shard.records.remove(key) {
                    inner.records.fetch_sub(1, Ordering::Relaxed);
                    inner.bytes.fetch_sub(old.cost(), Ordering::Relaxed);
                }
            }
        }
        Ok(out)
    }

    /// Removes expired records of one shard, at most `limit` (one scan of the shard).
    fn purge_shard(&self, index: usize, now: Timestamp, limit: usize) -> usize {
        let inner = &self.inner;
        let mut shard = inner.shards[index].lock();
        let expired: Vec<StoreKey> = shard
            .records
            .iter()
            .filter(|(_, slot)| slot.is_expired(now))
            .map(|(key, _)| *key)
            .take(limit)
            .collect();
        self.remove_from(&mut shard, &expired)
    }

    /// Removes `keys` from a locked shard, keeping the counters right; returns how many.
    fn remove_from(&self, shard: &mut Shard, keys: &[StoreKey]) -> usize {
        for key in keys {
            if let Some(old) = shard.records.remove(key) {
                self.inner.records.fetch_sub(1, Ordering::Relaxed);
                self.inner.bytes.fetch_sub(old.cost(), Ordering::Relaxed);
            }
        }
        keys.len()
    }

    /// Removes the expired records among the next [`SCAN_BUDGET`] entries of one shard, resuming
    /// where the previous call stopped: bounded work even when a client steers all its keys into
    /// one shard.
    fn purge_some(&self, index: usize, now: Timestamp) -> usize {
        let inner = &self.inner;
        let mut shard = inner.shards[index].lock();
        let lower = match shard.scan_from {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        let mut seen = 0;
        let mut last = None;
        let mut expired = Vec::new();
        for (key, slot) in shard
            .records
            .range((lower, Bound::Unbounded))
            .take(SCAN_BUDGET)
        {
            seen += 1;
            last = Some(*key);
            if slot.is_expired(now) {
                expired.push(*key);
            }
        }
        shard.scan_from = if seen < SCAN_BUDGET { None } else { last };
        self.remove_from(&mut shard, &expired)
    }

    fn full(&self) -> bool {
        self.len() >= self.inner.max_records || self.bytes() >= self.inner.max_bytes
    }

    /// Removes up to `limit` expired records, visiting shards from a rotating start.
    fn purge_all(&self, limit: usize) -> usize {
        let now = self.inner.clock.now();
        let start = self.inner.purge_cursor.fetch_add(1, Ordering::Relaxed);
        let mut removed = 0;
        for i in 0..SHARDS {
            if removed >= limit {
                break;
            }
            removed += self.purge_shard((start + i) % SHARDS, now, limit - removed);
        }
        removed
    }

    /// When full: purges the expired records of the next shards in turn until one frees
    /// something, at most [`PURGE_SHARDS_PER_CLAIM`] of them, so the work a request does is
    /// bounded (4/64 of the store), never a sweep of the whole store. After a whole round of
    /// shards that freed nothing, claims rest from purging for a second of store time (a store
    /// full of live records then refuses at once).
    fn make_room(&self) {
        let inner = &self.inner;
        let now = inner.clock.now();
        for _ in 0..PURGE_SHARDS_PER_CLAIM {
            if now.0 < inner.rest_until.load(Ordering::Relaxed) {
                return;
            }
            let index = inner.purge_cursor.fetch_add(1, Ordering::Relaxed) % SHARDS;
            if self.purge_some(index, now) > 0 {
                inner.fruitless.store(0, Ordering::Relaxed);
                return;
            }
            if inner.fruitless.fetch_add(1, Ordering::Relaxed) + 1 >= SHARDS {
                inner.fruitless.store(0, Ordering::Relaxed);
                inner
                    .rest_until
                    .store(now.0.saturating_add(1_000), Ordering::Relaxed);
            }
        }
    }
}

impl Store for MemoryStore {
    async fn claim(&self, key: &StoreKey, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        if self.full() {
            // Make room from expired records before refusing (never evicts live ones).
            self.make_room();
        }
        self.step(key, |current, now| {
            // Re-checked under the shard lock; concurrent claims on other shards can overshoot
            // `max_records` by at most the number of claims running at the same instant.
            if current.is_none() && self.full() {
                return Err(StoreError::new(
                    ErrorKind::Capacity,
                    format!(
                        "memory store is full ({} records, about {} bytes)",
                        self.len(),
                        self.bytes()
                    ),
                ));
            }
            Ok(protocol::claim(current, now, req))
        })
    }

    async fn renew(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        lease_ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.step(key, |c, now| {
            Ok(protocol::renew(c, now, fencing, lease_ttl))
        })
    }

    async fn complete(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        protocol::check_outcome(outcome)?;
        self.step(key, |c, now| {
            Ok(protocol::complete(c, now, fencing, outcome, ttl))
        })
    }

    async fn mark_unknown(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.step(key, |c, now| {
            Ok(protocol::mark_unknown(c, now, fencing, ttl))
        })
    }

    async fn release(&self, key: &StoreKey, fencing: Fencing) -> Result<CasOutcome, StoreError> {
        self.step(key, |c, now| Ok(protocol::release(c, now, fencing)))
    }

    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        self.step(key, |c, now| Ok(protocol::take_over(c, now, req)))
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let record = {
            let shard = self.inner.shards[Self::shard_of(key)].lock();
            match shard.records.get(key) {
                Some(slot) => Some(slot.record()?.into_owned()),
                None => None,
            }
        };
        let now = self.inner.clock.now();
        Ok(record.filter(|r| !r.is_expired(now)))
    }

    async fn delete(&self, key: &StoreKey, mode: DeleteMode) -> Result<DeleteOutcome, StoreError> {
        self.step(key, |c, now| Ok(protocol::delete(c, now, mode)))
    }

    async fn complete_unknown(
        &self,
        key: &StoreKey,
        expected: UnknownMark,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        protocol::check_outcome(outcome)?;
        self.step(key, |c, now| {
            Ok(protocol::complete_unknown(c, now, expected, outcome, ttl))
        })
    }

    async fn list(&self, req: &ListRequest) -> Result<ListPage, StoreError> {
        let limit = req.limit.clamp(1, MAX_LIST_PAGE);
        let after = req.after_key()?;
        let now = self.inner.clock.now();
        let first = after.as_ref().map_or(0, Self::shard_of);
        let mut records = Vec::with_capacity(limit);
        // Shards partition the key space by the top bits, so shard order is key order.
        for index in first..SHARDS {
            let shard = self.inner.shards[index].lock();
            let lower = match after {
                Some(k) if index == first => Bound::Excluded(k),
                _ => Bound::Unbounded,
            };
            for (k, slot) in shard.records.range((lower, Bound::Unbounded)) {
                if slot.is_expired(now) {
                    continue;
                }
                records.push((*k, slot.record()?.into_owned()));
                if records.len() == limit {
                    let next = Some(k.to_hex());
                    return Ok(ListPage {
                        records,
                        next,
                        passed_over: 0,
                    });
                }
            }
        }
        Ok(ListPage {
            records,
            next: None,
            passed_over: 0,
        })
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        Ok(self.purge_all(limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::fingerprint::{Algorithm, Fingerprint};

    fn req(token: u128) -> ClaimRequest {
        ClaimRequest {
            namespace: "ns".into(),
            scope: "scope".into(),
            idempotency_key: format!("key-{token}"),
            fingerprint: Fingerprint::from_parts(Algorithm::Blake3, [1; 32]),
            token,
            owner: "test".into(),
            lease_ttl: Duration::from_secs(5),
            ttl: Duration::from_secs(60),
        }
    }

    fn key(i: u64) -> StoreKey {
        StoreKey(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    #[tokio::test]
    async fn full_store_refuses_new_keys_but_keeps_serving_existing_ones() {
        let clock = ManualClock::new(0);
        let store = MemoryStore::builder()
            .max_records(10)
            .clock(clock.clone())
            .build();
        for i in 0..10 {
            assert!(matches!(
                store.claim(&key(i), &req(i as u128)).await.unwrap(),
                ClaimOutcome::Acquired { .. }
            ));
        }
        let err = store.claim(&key(99), &req(99)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Capacity);
        // Existing keys still answer, and in-flight records were not evicted.
        assert!(matches!(
            store.claim(&key(3), &req(1000)).await.unwrap(),
            ClaimOutcome::Existing { .. }
        ));
        assert_eq!(store.len(), 10);
        // Once they expire, claims make room without an explicit purge, a few shards each: a
        // round of the 64 shards takes at most 16 claims.
        clock.advance(Duration::from_secs(61));
        let mut refused = 0;
        while store.claim(&key(99), &req(99)).await.is_err() {
            refused += 1;
            assert!(refused < SHARDS / PURGE_SHARDS_PER_CLAIM, "no room made");
        }
        assert!(store.len() <= 10);
    }

    #[tokio::test]
    async fn byte_budget_is_enforced_on_claim() {
        let store = MemoryStore::builder().max_bytes(1_000).build();
        let mut acquired = 0;
        let mut refused = 0;
        for i in 0..20 {
            match store.claim(&key(i), &req(i as u128)).await {
                Ok(_) => acquired += 1,
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Capacity);
                    refused += 1;
                }
            }
        }
        assert!(acquired >= 1 && refused >= 1, "{acquired} {refused}");
        assert!(store.bytes() < 1_000 + 300);
    }

    #[tokio::test]
    async fn purge_removes_only_expired_records_and_accounting_returns_to_zero() {
        let clock = ManualClock::new(0);
        let store = MemoryStore::builder().clock(clock.clone()).build();
        for i in 0..100 {
            store.claim(&key(i), &req(i as u128)).await.unwrap();
        }
        assert!(store.bytes() > 0);
        assert_eq!(store.purge_expired(usize::MAX).await.unwrap(), 0);
        clock.advance(Duration::from_secs(60));
        assert_eq!(store.purge_expired(40).await.unwrap(), 40);
        assert_eq!(store.purge_expired(usize::MAX).await.unwrap(), 60);
        assert_eq!(store.len(), 0);
        assert_eq!(store.bytes(), 0);
    }
}
