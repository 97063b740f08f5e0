//! A local cache of completed records in front of a shared store, so that a replay can cost zero
//! store round trips.
//!
//! Completed records never change (the [`Store`] contract), so a cached copy stays right until the
//! record expires — or until an administrator deletes it. A delete through *this* wrapper removes
//! the local copy at once; a delete made through another instance is not seen here, so every
//! cached copy is also dropped `max_age` after it was cached. **Staleness bound:** after an admin
//! delete elsewhere, this instance may go on replaying the deleted record for at most `max_age`
//! (default 30 s).
//!
//! **Deletes racing reads.** A read that started before a delete through this wrapper may return
//! the record as it was before the delete; it must not put that copy back into the cache. Each
//! shard counts deletes (a generation), bumped before and after the store's delete; a copy read
//! by an operation that saw another generation at its start is not cached.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use idemgate_core::cache::CachedStore;
//! use idemgate_core::{Engine, MemoryStore};
//!
//! let engine = Engine::builder(CachedStore::builder(MemoryStore::default()).capacity(10_000).build()).build();
//! # let _ = engine;
//! # });
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error::StoreError;
use crate::key::StoreKey;
use crate::record::{Fencing, Outcome, Record, RecordState};
use crate::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ListPage, ListRequest,
    ResolveOutcome, Store, TakeOverOutcome, TakeOverRequest, UnknownMark,
};

const SHARDS: usize = 16;

/// What a [`CachedStore`] tells the function given to [`CachedStoreBuilder::observe`], once per
/// `claim` or `get` that met a completed record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lookup {
    /// Answered from the local copy: no store round trip.
    Hit,
    /// The store answered with a completed record the cache did not hold (a replay that cost a
    /// round trip; the record is usually cached from then on). Reads that found no record, or
    /// one still in flight or outcome-unknown, are neither hits nor misses: the cache only ever
    /// holds completed records.
    Miss,
}

/// The function told about lookups.
#[derive(Clone)]
struct Observer(Arc<dyn Fn(Lookup) + Send + Sync>);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// Builds a [`CachedStore`].
#[derive(Debug)]
pub struct CachedStoreBuilder<S> {
    inner: S,
    capacity: usize,
    max_bytes: usize,
    max_age: Duration,
    clock: Arc<dyn Clock>,
    observer: Option<Observer>,
}

impl<S: Store> CachedStoreBuilder<S> {
    /// Most cached records (default 100,000); at the bound an arbitrary entry of the same shard
    /// is dropped. 0 disables the cache.
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n;
        self
    }

    /// Most bytes of cached records (their encoded size: body, headers and fields; default
    /// 64 MiB), so that large responses cannot make the cache hold `capacity` × the largest
    /// body. At the bound arbitrary entries of the same shard are dropped; a record larger than
    /// a shard's share (`max_bytes` / 16) is never cached (its replays go to the store).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }

    /// Longest time a copy is trusted (default 30 s): the staleness bound for deletes made
    /// through other instances.
    pub fn max_age(mut self, d: Duration) -> Self {
        self.max_age = d;
        self
    }

    /// The clock used for the age and expiry of copies (default: the system clock). Expiry is
    /// judged by this clock, so it should track the store's (skew shortens or lengthens the copy's
    /// life by the skew, never past `max_age`).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Calls `observe` on every hit and miss (see [`Lookup`]), e.g. to count them in metrics.
    /// It runs on the request path, outside the cache's locks: keep it cheap.
    pub fn observe(mut self, observe: impl Fn(Lookup) + Send + Sync + 'static) -> Self {
        self.observer = Some(Observer(Arc::new(observe)));
        self
    }

    /// Builds the wrapper.
    pub fn build(self) -> CachedStore<S> {
        CachedStore {
            inner: self.inner,
            shared: Arc::new(Shared {
                shards: (0..SHARDS).map(|_| Mutex::new(Slots::default())).collect(),
                per_shard: self.capacity.div_ceil(SHARDS),
                bytes_per_shard: self.max_bytes / SHARDS,
                max_age: self.max_age,
                clock: self.clock,
                observer: self.observer,
            }),
        }
    }
}

/// A store wrapper that answers `claim` and `get` of completed records from memory.
#[derive(Clone)]
pub struct CachedStore<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// One shard: the cached copies and its delete generation.
#[derive(Default)]
struct Slots {
    /// Each copy, when it was cached, and its size as counted in `bytes`.
    copies: HashMap<StoreKey, (Record, Timestamp, usize)>,
    /// The sizes of the copies, summed.
    bytes: usize,
    generation: u64,
}

impl Slots {
    fn remove(&mut self, key: &StoreKey) {
        if let Some((_, _, size)) = self.copies.remove(key) {
            self.bytes -= size;
        }
    }
}

struct Shared {
    shards: Vec<Mutex<Slots>>,
    per_shard: usize,
    bytes_per_shard: usize,
    max_age: Duration,
    clock: Arc<dyn Clock>,
    observer: Option<Observer>,
}

impl Shared {
    fn shard(&self, key: &StoreKey) -> &Mutex<Slots> {
        &self.shards[key.0[1] as usize % SHARDS]
    }

    fn forget(&self, key: &StoreKey) {
        let mut shard = self.shard(key).lock();
        shard.remove(key);
        shard.generation = shard.generation.wrapping_add(1);
    }
}

/// What a cached copy costs in memory, roughly: its encoding (body, header bytes, fields), the
/// map entry, and per header the two allocations and the vector slot a decoded record holds
/// (a record of many tiny headers costs far more decoded than encoded).
fn footprint(record: &Record) -> usize {
    let headers = match &record.state {
        RecordState::Completed {
            outcome: Outcome::Response(r),
            ..
        } => r.headers.len(),
        _ => 0,
    };
    record.encoded_len() + 96 + 64 * headers
}

/// Forgets a key when dropped: the second half of a delete, run even if the delete is cancelled.
struct ForgetOnDrop<'a> {
    shared: &'a Shared,
    key: StoreKey,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.shared.forget(&self.key);
    }
}

impl<S> std::fmt::Debug for CachedStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStore")
            .field("capacity", &(self.shared.per_shard * SHARDS))
            .field("max_bytes", &(self.shared.bytes_per_shard * SHARDS))
            .field("max_age", &self.shared.max_age)
            .finish_non_exhaustive()
    }
}

impl<S: Store> CachedStore<S> {
    /// A builder over `inner`.
    pub fn builder(inner: S) -> CachedStoreBuilder<S> {
        CachedStoreBuilder {
            inner,
            capacity: 100_000,
            max_bytes: 64 << 20,
            max_age: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
            observer: None,
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn shard(&self, key: &StoreKey) -> &Mutex<Slots> {
        self.shared.shard(key)
    }

    /// A trusted copy (completed, unexpired, younger than `max_age`), or the shard's delete
    /// generation to hand to [`remember`](Self::remember) after asking the store.
    fn lookup(&self, key: &StoreKey) -> Result<(Record, Timestamp), u64> {
        if self.shared.per_shard == 0 {
            return Err(0);
        }
        let now = self.shared.clock.now();
        let mut shard = self.shard(key).lock();
        match shard.copies.get(key) {
            Some((r, at, _)) if !r.is_expired(now) && now.since(*at) < self.shared.max_age => {
                Ok((r.clone(), now))
            }
            Some(_) => {
                shard.remove(key);
                Err(shard.generation)
            }
            None => Err(shard.generation),
        }
    }

    fn tell(&self, lookup: Lookup) {
        if let Some(Observer(observe)) = &self.shared.observer {
            observe(lookup);
        }
    }

    /// Caches `record` if it is completed and no delete ran in its shard since `generation`
    /// (and counts a completed record read from the store as a miss).
    fn remember(&self, key: &StoreKey, record: &Record, generation: u64) {
        if !matches!(record.state, RecordState::Completed { .. }) {
            return;
        }
        self.tell(Lookup::Miss);
        if self.shared.per_shard == 0 {
            return;
        }
        let size = footprint(record);
        if size > self.shared.bytes_per_shard {
            return;
        }
        let now = self.shared.clock.now();
        let mut shard = self.shard(key).lock();
        if shard.generation != generation {
            return;
        }
        shard.remove(key);
        while shard.copies.len() >= self.shared.per_shard
            || shard.bytes + size > self.shared.bytes_per_shard
        {
            let Some(victim) = shard.copies.keys().next().copied() else {
                break;
            };
            shard.remove(&victim);
        }
        shard.bytes += size;
        shard.copies.insert(*key, (record.clone(), now, size));
    }

    /// Drops the copy of `key` and makes every read already under way in its shard uncacheable.
    fn forget(&self, key: &StoreKey) {
        self.shared.forget(key);
    }

    /// Records cached right now.
    pub fn len(&self) -> usize {
        self.shared
            .shards
            .iter()
            .map(|s| s.lock().copies.len())
            .sum()
    }

    /// Bytes of cached records right now, as counted against
    /// [`max_bytes`](CachedStoreBuilder::max_bytes).
    pub fn bytes(&self) -> usize {
        self.shared.shards.iter().map(|s| s.lock().bytes).sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S: Store> Store for CachedStore<S> {
    async fn claim(&self, key: &StoreKey, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let generation = match self.lookup(key) {
            Ok((record, now)) => {
                self.tell(Lookup::Hit);
                return Ok(ClaimOutcome::Existing { record, now });
            }
            Err(generation) => generation,
        };
        let out = self.inner.claim(key, req).await?;
        if let ClaimOutcome::Existing { record, .. } = &out {
            self.remember(key, record, generation);
        }
        Ok(out)
    }

    async fn renew(
        &self,
        key: &StoreKey,
        f: Fencing,
        lease: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.inner.renew(key, f, lease).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        f: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.inner.complete(key, f, outcome, ttl).await
    }

    async fn mark_unknown(
        &self,
        key: &StoreKey,
        f: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.inner.mark_unknown(key, f, ttl).await
    }

    async fn release(&self, key: &StoreKey, f: Fencing) -> Result<CasOutcome, StoreError> {
        self.inner.release(key, f).await
    }

    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        self.inner.take_over(key, req).await
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let generation = match self.lookup(key) {
            Ok((record, _)) => {
                self.tell(Lookup::Hit);
                return Ok(Some(record));
            }
            Err(generation) => generation,
        };
        let out = self.inner.get(key).await?;
        if let Some(record) = &out {
            self.remember(key, record, generation);
        }
        Ok(out)
    }

    async fn delete(&self, key: &StoreKey, mode: DeleteMode) -> Result<DeleteOutcome, StoreError> {
        // Before: no copy answers from now on. After (also when this call is cancelled midway,
        // through the guard): no read that overlapped the delete caches what it saw before it.
        self.forget(key);
        let _after = ForgetOnDrop {
            shared: &self.shared,
            key: *key,
        };
        self.inner.delete(key, mode).await
    }

    async fn complete_unknown(
        &self,
        key: &StoreKey,
        expected: UnknownMark,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        // Only completed records are cached, and this one was outcome-unknown: no copy can be
        // stale. The completed record is cached by the next read, like any other.
        self.inner
            .complete_unknown(key, expected, outcome, ttl)
            .await
    }

    async fn list(&self, req: &ListRequest) -> Result<ListPage, StoreError> {
        self.inner.list(req).await
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.inner.purge_expired(limit).await
    }
}
