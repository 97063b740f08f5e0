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
use std::thread::JoinHandle;
use std::time::Duration;

use idemgate_core::clock::{Clock, Timestamp, WallClock};
use idemgate_core::error::{ErrorKind, StoreError};
use idemgate_core::key::StoreKey;
use idemgate_core::protocol::{self, Write};
use idemgate_core::record::{Fencing, Outcome, Record};
use idemgate_core::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ListPage, ListRequest,
    ResolveOutcome, Store, TakeOverOutcome, TakeOverRequest, UnknownMark,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

const RECORDS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("records_v1");
const EXPIRY: TableDefinition<(u64, &[u8; 32]), ()> = TableDefinition::new("expiry_v1");

/// How long the writer keeps gathering a batch once it knows callers are concurrent.
const GATHER_WINDOW: Duration = Duration::from_micros(100);

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
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        let writer = Writer {
            db: db.clone(),
            clock: self.clock.clone(),
            max_batch: self.max_batch,
        };
        let thread = std::thread::Builder::new()
            .name("idemgate-redb-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| {
                StoreError::new(ErrorKind::Internal, "could not start the writer thread")
                    .with_source(e)
            })?;
        Ok(RedbStore {
            inner: Arc::new(Inner {
                db,
                tx: Some(tx),
                thread: Some(thread),
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
    db: Arc<Database>,
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    clock: Arc<dyn Clock>,
    path: PathBuf,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue stops the writer after its current batch; joining it releases the file
        // lock before the store is gone, so the file can be reopened at once.
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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

/// A mutating operation for the writer.
enum Op {
    Claim(ClaimRequest),
    Renew(Fencing, Duration),
    Complete(Fencing, Outcome, Duration),
    MarkUnknown(Fencing, Duration),
    Release(Fencing),
    TakeOver(TakeOverRequest),
    Delete(DeleteMode),
    CompleteUnknown(UnknownMark, Outcome, Duration),
    Purge(usize),
    #[cfg(feature = "testkit")]
    OverwriteRaw(Vec<u8>),
}

enum Reply {
    Claim(ClaimOutcome),
    Cas(CasOutcome),
    TakeOver(TakeOverOutcome),
    Count(usize),
    Delete(DeleteOutcome),
    Resolve(ResolveOutcome),
}

struct Job {
    key: StoreKey,
    op: Op,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

struct Writer {
    db: Arc<Database>,
    clock: Arc<dyn Clock>,
    max_batch: usize,
}

impl Writer {
    fn run(self, mut rx: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut last_len = 0;
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            // Under concurrency (the last batch had company), give the callers just answered a
            // moment to send their next operation, so that one fsync covers them all. A lone
            // caller never waits.
            let gather_until = (last_len > 1).then(|| std::time::Instant::now() + GATHER_WINDOW);
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => match gather_until {
                        Some(t) if std::time::Instant::now() < t => std::thread::yield_now(),
                        _ => break,
                    },
                }
            }
            last_len = batch.len();
            self.commit_batch(&mut batch);
        }
    }

    /// Applies every job of the batch in one transaction; answers only after the commit.
    fn commit_batch(&self, batch: &mut Vec<Job>) {
        let result = self.apply(batch);
        match result {
            Ok(replies) => {
                for (job, reply) in batch.drain(..).zip(replies) {
                    let _ = job.reply.send(reply);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "redb batch failed; every operation in it is refused");
                for job in batch.drain(..) {
                    let _ = job
                        .reply
                        .send(Err(StoreError::new(e.kind(), e.message().to_owned())));
                }
            }
        }
    }

    fn apply(&self, batch: &[Job]) -> Result<Vec<Result<Reply, StoreError>>, StoreError> {
        let txn = self.db.begin_write().map_err(|e| map_err(e, "begin"))?;
        let mut dirty = false;
        let mut replies = Vec::with_capacity(batch.len());
        {
            let mut records = txn.open_table(RECORDS).map_err(|e| map_err(e, "open"))?;
            let mut expiry = txn.open_table(EXPIRY).map_err(|e| map_err(e, "open"))?;
            let now = self.clock.now();
            for job in batch {
                let key = job.key.as_bytes();
                if let Op::Purge(limit) = job.op {
                    let n = purge(&mut records, &mut expiry, now, limit)?;
                    dirty |= n > 0;
                    replies.push(Ok(Reply::Count(n)));
                    continue;
                }
                #[cfg(feature = "testkit")]
                if let Op::OverwriteRaw(bytes) = &job.op {
                    records
                        .insert(key, bytes.as_slice())
                        .map_err(|e| map_err(e, "insert"))?;
                    dirty = true;
                    replies.push(Ok(Reply::Count(1)));
                    continue;
                }
                let raw = records
                    .get(key)
                    .map_err(|e| map_err(e, "get"))?
                    .map(|g| g.value().to_vec());
                if let (Op::Delete(_), Some(Err(_))) = (&job.op, raw.as_deref().map(decode)) {
                    // Undecodable bytes: administrators can always remove them, in any mode.
                    records.remove(key).map_err(|e| map_err(e, "remove"))?;
                    dirty = true;
                    replies.push(Ok(Reply::Delete(DeleteOutcome::Deleted)));
                    continue;
                }
                let current = match raw.as_deref().map(decode).transpose() {
                    Ok(c) => c,
                    Err(e) => {
                        replies.push(Err(e));
                        continue;
                    }
                };
                let cur = current.as_ref();
                let (write, reply) = match &job.op {
                    Op::Claim(req) => {
                        let (w, o) = protocol::claim(cur, now, req);
                        (w, Reply::Claim(o))
                    }
                    Op::Renew(f, lease) => {
                        let (w, o) = protocol::renew(cur, now, *f, *lease);
                        (w, Reply::Cas(o))
                    }
                    Op::Complete(f, outcome, ttl) => {
                        let (w, o) = protocol::complete(cur, now, *f, outcome, *ttl);
                        (w, Reply::Cas(o))
                    }
                    Op::MarkUnknown(f, ttl) => {
                        let (w, o) = protocol::mark_unknown(cur, now, *f, *ttl);
                        (w, Reply::Cas(o))
                    }
                    Op::Release(f) => {
                        let (w, o) = protocol::release(cur, now, *f);
                        (w, Reply::Cas(o))
                    }
                    Op::TakeOver(req) => {
                        let (w, o) = protocol::take_over(cur, now, req);
                        (w, Reply::TakeOver(o))
                    }
                    Op::Delete(mode) => {
                        let (w, o) = protocol::delete(cur, now, *mode);
                        (w, Reply::Delete(o))
                    }
                    Op::CompleteUnknown(mark, outcome, ttl) => {
                        let (w, o) = protocol::complete_unknown(cur, now, *mark, outcome, *ttl);
                        (w, Reply::Resolve(o))
                    }
                    // Answered above, before the record was decoded.
                    Op::Purge(_) => (Write::Unchanged, Reply::Count(0)),
                    #[cfg(feature = "testkit")]
                    Op::OverwriteRaw(_) => (Write::Unchanged, Reply::Count(0)),
                };
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
                replies.push(Ok(reply));
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

    async fn submit(&self, key: StoreKey, op: Op) -> Result<Reply, StoreError> {
        let stopped = || StoreError::new(ErrorKind::Unavailable, "the redb writer has stopped");
        let tx = self.inner.tx.as_ref().ok_or_else(stopped)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Job { key, op, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
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
        self.submit(*key, Op::OverwriteRaw(bytes)).await.map(|_| ())
    }
}

fn unexpected() -> StoreError {
    StoreError::new(
        ErrorKind::Internal,
        "redb writer answered with the wrong reply type",
    )
}

fn cas(reply: Reply) -> Result<CasOutcome, StoreError> {
    match reply {
        Reply::Cas(o) => Ok(o),
        _ => Err(unexpected()),
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
        match self.submit(*key, Op::Claim(req.clone())).await? {
            Reply::Claim(o) => Ok(o),
            _ => Err(unexpected()),
        }
    }

    async fn renew(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        lease_ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        cas(self.submit(*key, Op::Renew(fencing, lease_ttl)).await?)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        protocol::check_outcome(outcome)?;
        cas(self
            .submit(*key, Op::Complete(fencing, outcome.clone(), ttl))
            .await?)
    }

    async fn mark_unknown(
        &self,
        key: &StoreKey,
        fencing: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        cas(self.submit(*key, Op::MarkUnknown(fencing, ttl)).await?)
    }

    async fn release(&self, key: &StoreKey, fencing: Fencing) -> Result<CasOutcome, StoreError> {
        cas(self.submit(*key, Op::Release(fencing)).await?)
    }

    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        match self.submit(*key, Op::TakeOver(req.clone())).await? {
            Reply::TakeOver(o) => Ok(o),
            _ => Err(unexpected()),
        }
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let now = self.inner.clock.now();
        Ok(self.read(key)?.filter(|r| !r.is_expired(now)))
    }

    async fn delete(&self, key: &StoreKey, mode: DeleteMode) -> Result<DeleteOutcome, StoreError> {
        match self.submit(*key, Op::Delete(mode)).await? {
            Reply::Delete(o) => Ok(o),
            _ => Err(unexpected()),
        }
    }

    async fn complete_unknown(
        &self,
        key: &StoreKey,
        expected: UnknownMark,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        protocol::check_outcome(outcome)?;
        match self
            .submit(*key, Op::CompleteUnknown(expected, outcome.clone(), ttl))
            .await?
        {
            Reply::Resolve(o) => Ok(o),
            _ => Err(unexpected()),
        }
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
        match self.submit(StoreKey([0; 32]), Op::Purge(limit)).await? {
            Reply::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }
}
