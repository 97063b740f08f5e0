//! # idemgate-store-redb
//!
//! The durable single-node [`Store`] of idemgate (the default of `idemgate serve`): every record
//! lives in one [redb](https://docs.rs/redb) file, written with ACID transactions.
//!
//! ## Overview
//!
//! - **One writer, group commit.** Every mutating operation is sent to a writer thread over a
//!   bounded queue. The writer takes up to `max_batch` queued operations, applies each one (in
//!   arrival order, each through the shared state machine of [`idemgate_core::protocol`]) inside
//!   ONE write transaction, commits it with `Durability::Immediate` (one fsync), and only then
//!   answers every caller of the batch. Durability costs one fsync per batch, not per request.
//! - **Reads** (`get`, `list`, and `claim` of a key that already has a live record) use read
//!   transactions on the caller's thread and never wait for the writer.
//! - **Expiry** uses the injected [`Clock`] (by default the plain wall clock, [`WallClock`], so
//!   that persisted times mean the same after a restart; within a process the engine never takes
//!   over a lease its own process holds, so a wall-clock step cannot run a live request twice) and
//!   an expiry index
//!   `(expires_at, key)`; [`Store::purge_expired`] walks it in order, bounded by its `limit`; run it
//!   with [`idemgate_core::sweeper::spawn_sweeper`].
//! - **Exclusive.** The file is locked: a second process (or a second open in this process) gets an
//!   error of kind [`ErrorKind::Config`] saying the file is in use.
//!
//! ## Example
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use idemgate_core::{Engine, engine::{Disposition, Execution, Policy}};
//! use idemgate_core::record::{Outcome, StoredResponse};
//! use idemgate_core::{FingerprintOptions, IdempotencyKey, Scope, ScopedKey};
//! use idemgate_store_redb::RedbStore;
//!
//! let dir = std::env::temp_dir().join(format!("idemgate-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let store = RedbStore::builder(dir.join("records.redb")).open()?;
//! let engine = Engine::builder(store).build();
//! let key = ScopedKey::new("doc", Scope::new("t"), IdempotencyKey::parse("k")?);
//! let fp = FingerprintOptions::default().builder().body(b"x").finish();
//! let keep = |v: &u16| Disposition::Store(Outcome::Response(StoredResponse::new(*v, vec![], "")));
//! let first = engine.run(&key, fp, &Policy::default(), keep, |_| async { 201u16 }).await?;
//! assert!(matches!(first, Execution::Executed { .. }));
//! # drop(engine);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Guarantees
//!
//! Each operation is atomic (it runs alone inside the single write transaction, reading and writing
//! one record), and is acknowledged only after the transaction that contains it is durable on disk:
//! after a crash (even `kill -9`), every acknowledged operation is present and no record is
//! half-written (tested by `tests/crash_recovery.rs`). Fencing and expiry follow the
//! [`Store`] contract exactly (the conformance suite and the model-based property test run against
//! this store).
//!
//! ## Bounds
//!
//! The writer queue holds at most `queue_capacity` operations (default 8,192); when it is full,
//! callers wait (back-pressure) rather than growing memory. A list page holds at most 1,000 records.
//! The file grows with the records kept; expired records are removed by the sweeper.
//!
//! ## Errors
//!
//! redb I/O errors map to [`ErrorKind::Unavailable`], corruption (of the file or of a stored
//! record) to [`ErrorKind::Corrupt`], a locked file to [`ErrorKind::Config`], a stopped writer to
//! [`ErrorKind::Unavailable`].
//!
//! ## Performance
//!
//! Measured by `benches/redb.rs`; figures and the machine are in `docs/performance.md`.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idemgate_core::clock::{Clock, Timestamp, WallClock};
use idemgate_core::error::{ErrorKind, StoreError};
use idemgate_core::group_commit::{Committer, GroupCommitConfig, GroupWriter, WriterReply};
use idemgate_core::key::StoreKey;
use idemgate_core::protocol::{self, Answer, Mutation, Write};
use idemgate_core::record::{Fencing, Outcome, Record};
use idemgate_core::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ListPage, ListRequest,
    ResolveOutcome, Store, TakeOverOutcome, TakeOverRequest, UnknownMark,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const RECORDS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("records_v1");
const EXPIRY: TableDefinition<(u64, &[u8; 32]), ()> = TableDefinition::new("expiry_v1");

/// Largest page returned by `list`.
pub const MAX_LIST_PAGE: usize = 1_000;

/// Configures and opens a [`RedbStore`].
#[derive(Debug)]
pub struct RedbStoreBuilder {
    path: PathBuf,
    clock: Arc<dyn Clock>,
    max_batch: usize,
    queue_capacity: usize,
    cache_size: usize,
}

/// The default of [`RedbStoreBuilder::cache_size`]: 64 MiB.
pub const DEFAULT_CACHE_SIZE: usize = 64 << 20;

impl RedbStoreBuilder {
    /// Memory redb may use to cache the file's pages (default [`DEFAULT_CACHE_SIZE`], at least
    /// 1 MiB). The process's memory grows with the file up to about this much (redb's own
    /// default, 1 GiB, let a soak's process reach 246 MB with a 214 MB file); the operating
    /// system's page cache still serves reads beyond it.
    pub fn cache_size(mut self, bytes: usize) -> Self {
        self.cache_size = bytes.max(1 << 20);
        self
    }

    /// The clock that decides expiry (default: [`WallClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Most operations committed together (default 256).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// Most operations queued for the writer (default 8,192); beyond it callers wait.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.queue_capacity = n.max(1);
        self
    }

    /// Opens (or creates) the file and starts the writer thread.
    pub fn open(self) -> Result<RedbStore, StoreError> {
        let db = Database::builder()
            .set_cache_size(self.cache_size)
            .create(&self.path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::new(
                    ErrorKind::Config,
                    format!(
                        "{} is in use by another idemgate process (or already open in this one)",
                        self.path.display()
                    ),
                ),
                other => map_err(other, "open the database file"),
            })?;
        // Create the tables up front so that readers never see them missing.
        let txn = db.begin_write().map_err(|e| map_err(e, "begin"))?;
        txn.open_table(RECORDS)
            .map_err(|e| map_err(e, "open table"))?;
        txn.open_table(EXPIRY)
            .map_err(|e| map_err(e, "open table"))?;
        txn.commit().map_err(|e| map_err(e, "commit"))?;

        let db = Arc::new(db);
        let writer = GroupWriter::spawn(
            RedbCommitter {
                db: db.clone(),
                clock: self.clock.clone(),
            },
            GroupCommitConfig {
                max_batch: self.max_batch,
                queue_capacity: self.queue_capacity,
                thread_name: "idemgate-redb-writer".into(),
                ..GroupCommitConfig::default()
            },
        )?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                db,
                writer,
                clock: self.clock,
                path: self.path,
            }),
        })
    }
}

/// The redb-backed durable store. Cloning shares the same file and writer.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    // Dropped first: the writer's thread is joined, so the file lock is released with the store.
    writer: GroupWriter<RedbCommitter>,
    db: Arc<Database>,
    clock: Arc<dyn Clock>,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn map_err(e: impl Into<redb::Error>, what: &str) -> StoreError {
    let e: redb::Error = e.into();
    let kind = match &e {
        redb::Error::Corrupted(_) => ErrorKind::Corrupt,
        redb::Error::Io(_) => ErrorKind::Unavailable,
        redb::Error::DatabaseAlreadyOpen => ErrorKind::Config,
        _ => ErrorKind::Internal,
    };
    StoreError::new(kind, format!("redb: {what}")).with_source(e)
}

fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    Record::decode(bytes).map_err(StoreError::from)
}

/// An operation for the writer.
enum Op {
    Mutate(Mutation),
    Purge(usize),
    #[cfg(feature = "testkit")]
    OverwriteRaw(Vec<u8>),
}

/// Applies each batch in ONE write transaction committed with an fsync.
struct RedbCommitter {
    db: Arc<Database>,
    clock: Arc<dyn Clock>,
}

impl Committer for RedbCommitter {
    type Op = Op;
    type Reply = WriterReply;

    fn commit(
        &mut self,
        batch: &[(StoreKey, Op)],
    ) -> Result<Vec<Result<WriterReply, StoreError>>, StoreError> {
        self.apply(batch)
    }
}

impl RedbCommitter {
    fn apply(
        &self,
        batch: &[(StoreKey, Op)],
    ) -> Result<Vec<Result<WriterReply, StoreError>>, StoreError> {
        let txn = self.db.begin_write().map_err(|e| map_err(e, "begin"))?;
        let mut dirty = false;
        let mut replies = Vec::with_capacity(batch.len());
        {
            let mut records = txn.open_table(RECORDS).map_err(|e| map_err(e, "open"))?;
            let mut expiry = txn.open_table(EXPIRY).map_err(|e| map_err(e, "open"))?;
            let now = self.clock.now();
            for (key, op) in batch {
                let key = key.as_bytes();
                let mutation = match op {
                    Op::Mutate(m) => m,
                    Op::Purge(limit) => {
                        let n = purge(&mut records, &mut expiry, now, *limit)?;
                        dirty |= n > 0;
                        replies.push(Ok(WriterReply::Count(n)));
                        continue;
                    }
                    #[cfg(feature = "testkit")]
                    Op::OverwriteRaw(bytes) => {
                        records
                            .insert(key, bytes.as_slice())
                            .map_err(|e| map_err(e, "insert"))?;
                        dirty = true;
                        replies.push(Ok(WriterReply::Count(1)));
                        continue;
                    }
                };
                let raw = records
                    .get(key)
                    .map_err(|e| map_err(e, "get"))?
                    .map(|g| g.value().to_vec());
                let (current, write, answer) =
                    match protocol::apply_stored(mutation, raw.as_deref(), now) {
                        Ok(applied) => applied,
                        Err(e) => {
                            replies.push(Err(e));
                            continue;
                        }
                    };
                let cur = current.as_ref();
                match write {
                    Write::Unchanged => {}
                    Write::Put(next) => {
                        if let Some(old) = cur {
                            expiry
                                .remove((old.expires_at.as_millis(), key))
                                .map_err(|e| map_err(e, "remove"))?;
                        }
                        records
                            .insert(key, next.encode().as_slice())
                            .map_err(|e| map_err(e, "insert"))?;
                        expiry
                            .insert((next.expires_at.as_millis(), key), ())
                            .map_err(|e| map_err(e, "insert"))?;
                        dirty = true;
                    }
                    Write::Delete => {
                        if let Some(old) = cur {
                            expiry
                                .remove((old.expires_at.as_millis(), key))
                                .map_err(|e| map_err(e, "remove"))?;
                        }
                        records.remove(key).map_err(|e| map_err(e, "remove"))?;
                        dirty = true;
                    }
                }
                replies.push(Ok(WriterReply::Answer(answer)));
            }
        }
        if dirty {
            txn.commit().map_err(|e| map_err(e, "commit"))?;
        } else {
            txn.abort().map_err(|e| map_err(e, "abort"))?;
        }
        Ok(replies)
    }
}

fn purge(
    records: &mut redb::Table<'_, &'static [u8; 32], &'static [u8]>,
    expiry: &mut redb::Table<'_, (u64, &'static [u8; 32]), ()>,
    now: Timestamp,
    limit: usize,
) -> Result<usize, StoreError> {
    let mut due = Vec::new();
    {
        let upper = (now.as_millis(), &[0xffu8; 32]);
        let range = expiry
            .range::<(u64, &[u8; 32])>(..=upper)
            .map_err(|e| map_err(e, "range"))?;
        for entry in range.take(limit) {
            let (k, _) = entry.map_err(|e| map_err(e, "range"))?;
            let (at, key) = k.value();
            due.push((at, *key));
        }
    }
    let mut removed = 0;
    for (at, key) in due {
        expiry
            .remove((at, &key))
            .map_err(|e| map_err(e, "remove"))?;
        let stored = records
            .get(&key)
            .map_err(|e| map_err(e, "get"))?
            .map(|g| g.value().to_vec());
        // Remove the record only if this index entry is its current expiry (and it decodes).
        if let Some(Ok(record)) = stored.as_deref().map(Record::decode)
            && record.expires_at.as_millis() == at
            && record.is_expired(now)
        {
            records.remove(&key).map_err(|e| map_err(e, "remove"))?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl RedbStore {
    /// A builder for the file at `path` (created if missing).
    pub fn builder(path: impl AsRef<Path>) -> RedbStoreBuilder {
        RedbStoreBuilder {
            path: path.as_ref().to_path_buf(),
            clock: Arc::new(WallClock),
            max_batch: 256,
            queue_capacity: 8_192,
            cache_size: DEFAULT_CACHE_SIZE,
        }
    }

    /// Opens the file at `path` with the defaults.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::builder(path).open()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn mutate(&self, key: &StoreKey, mutation: Mutation) -> Result<Answer, StoreError> {
        self.inner
            .writer
            .submit(*key, Op::Mutate(mutation))
            .await?
            .answer()
    }

    fn read(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let txn = self
            .inner
            .db
            .begin_read()
            .map_err(|e| map_err(e, "begin read"))?;
        let table = txn.open_table(RECORDS).map_err(|e| map_err(e, "open"))?;
        let raw = table.get(key.as_bytes()).map_err(|e| map_err(e, "get"))?;
        raw.map(|g| decode(g.value())).transpose()
    }

    /// Fault injection for tests (feature `testkit`): overwrites the bytes stored under `key`
    /// without any check, as bit rot or a foreign writer would.
    #[cfg(feature = "testkit")]
    pub async fn overwrite_raw(&self, key: &StoreKey, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.inner
            .writer
            .submit(*key, Op::OverwriteRaw(bytes))
            .await
            .map(|_| ())
    }
}

impl Store for RedbStore {
    async fn claim(&self, key: &StoreKey, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        // Fast path: a live record answers from a read snapshot without queueing for the writer.
        // The record existed at the snapshot, so "Existing" is a correct atomic answer — unless
        // it is a free key (released or revoked), which the writer claims at the next epoch.
        let now = self.inner.clock.now();
        if let Some(record) = self.read(key)?
            && !record.is_expired(now)
            && protocol::free_epoch(&record, now).is_none()
        {
            return Ok(ClaimOutcome::Existing { record, now });
        }
        self.mutate(key, Mutation::Claim(req.clone()))
            .await?
            .claim()
    }

    async fn renew(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        lease_ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.mutate(key, Mutation::Renew(fencing, lease_ttl))
            .await?
            .cas()
    }

    async fn complete(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        protocol::check_outcome(outcome)?;
        self.mutate(key, Mutation::Complete(fencing, outcome.clone(), ttl))
            .await?
            .cas()
    }

    async fn mark_unknown(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        self.mutate(key, Mutation::MarkUnknown(fencing, ttl))
            .await?
            .cas()
    }

    async fn release(&self, key: &StoreKey, fencing: Fencing) -> Result<CasOutcome, StoreError> {
        self.mutate(key, Mutation::Release(fencing)).await?.cas()
    }

    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        self.mutate(key, Mutation::TakeOver(req.clone()))
            .await?
            .take_over()
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let now = self.inner.clock.now();
        Ok(self.read(key)?.filter(|r| !r.is_expired(now)))
    }

    async fn delete(&self, key: &StoreKey, mode: DeleteMode) -> Result<DeleteOutcome, StoreError> {
        self.mutate(key, Mutation::Delete(mode)).await?.delete()
    }

    async fn complete_unknown(
        &self,
        key: &StoreKey,
        expected: UnknownMark,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        protocol::check_outcome(outcome)?;
        self.mutate(
            key,
            Mutation::CompleteUnknown(expected, outcome.clone(), ttl),
        )
        .await?
        .resolve()
    }

    async fn list(&self, req: &ListRequest) -> Result<ListPage, StoreError> {
        let limit = req.limit.clamp(1, MAX_LIST_PAGE);
        let after = req.after_key()?;
        let now = self.inner.clock.now();
        let txn = self
            .inner
            .db
            .begin_read()
            .map_err(|e| map_err(e, "begin read"))?;
        let table = txn.open_table(RECORDS).map_err(|e| map_err(e, "open"))?;
        let lower = match &after {
            Some(k) => Bound::Excluded(k.as_bytes()),
            None => Bound::Unbounded,
        };
        let range = table
            .range::<&[u8; 32]>((lower, Bound::Unbounded))
            .map_err(|e| map_err(e, "range"))?;
        let mut records = Vec::with_capacity(limit);
        for entry in range {
            let (k, v) = entry.map_err(|e| map_err(e, "range"))?;
            let key = StoreKey(*k.value());
            let record = match decode(v.value()) {
                Ok(r) => r,
                Err(e) => {
                    // One rotten record must not hide the others from administrators.
                    tracing::warn!(key = %key, error = %e, "skipping an undecodable record in list");
                    continue;
                }
            };
            if record.is_expired(now) {
                continue;
            }
            records.push((key, record));
            if records.len() == limit {
                return Ok(ListPage {
                    records,
                    next: Some(key.to_hex()),
                    passed_over: 0,
                });
            }
        }
        Ok(ListPage {
            records,
            next: None,
            passed_over: 0,
        })
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, StoreError> {
        self.inner
            .writer
            .submit(StoreKey([0; 32]), Op::Purge(limit))
            .await?
            .count()
    }
}
