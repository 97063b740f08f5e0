//! # idemgate-store-fjall
//!
//! The durable single-node [`Store`] of idemgate (the default engine of `idemgate serve`'s
//! `file:DIR`): records live in [fjall](https://docs.rs/fjall), an LSM tree whose writes go to a
//! write-ahead journal, in the directory `DIR`.
//!
//! ## Overview
//!
//! - **One writer, group commit.** Every mutating operation goes to one writer thread over a
//!   bounded queue ([`idemgate_core::group_commit`]). The writer applies each queued operation
//!   in arrival order through the shared state machine ([`idemgate_core::protocol::apply`]),
//!   each as one atomic fjall write batch (the record and its expiry-index entry together), then
//!   makes the whole group durable with ONE `fdatasync` of the journal, and only then answers
//!   every caller of the group. An append to one journal replaces redb's copy-on-write of ~100
//!   pages per commit, which is why this engine is the default (figures in
//!   `docs/performance.md`).
//! - **Reads see only durable writes.** fjall makes a write visible as soon as it is in the
//!   memtable, before the journal is synced. So the writer enters each key it changes, with its
//!   value as of the last sync, in an overlay before writing it, and clears the overlay after
//!   each sync; readers (`get`, `list`, and the `claim` fast path for a live record) read the
//!   latest value and then the overlay, which wins. No caller is ever shown a record that a
//!   crash could take back (a replay of a response whose completion is not yet on disk would
//!   let a crash run the request twice).
//! - **Expiry** uses the injected [`Clock`] (by default [`WallClock`], so that persisted times
//!   mean the same after a restart) and an expiry index in a second partition, keyed by
//!   `(expires_at, key)`; [`Store::purge_expired`] walks it in order, bounded by its `limit`; run
//!   it with [`idemgate_core::sweeper::spawn_sweeper`].
//! - **Exclusive.** The directory is locked ([`idemgate_core::dir_lock`]: `flock` on
//!   `DIR/LOCK`, taken before the journal is replayed): a second process, or a second open in
//!   this process, gets an error of kind [`ErrorKind::Config`] saying the directory is in use.
//!   The lock needs a local filesystem on a unix; elsewhere nothing is locked.
//!
//! ## Example
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
//! use idemgate_core::{Engine, engine::{Disposition, Execution, Policy}};
//! use idemgate_core::record::{Outcome, StoredResponse};
//! use idemgate_core::{FingerprintOptions, IdempotencyKey, Scope, ScopedKey};
//! use idemgate_store_fjall::FjallStore;
//!
//! let dir = std::env::temp_dir().join(format!("idemgate-fjall-doc-{}", std::process::id()));
//! let store = FjallStore::open(&dir)?;
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
//! Each operation is atomic (one fjall write batch, applied by the only writer, after reading the
//! record it changes), and is acknowledged only after the journal holding it is synced: after a
//! crash (even `kill -9`), every acknowledged operation is present and no record is
//! half-written, since journal replay drops a torn final batch (tested by
//! `tests/crash_recovery.rs`). Fencing and expiry follow the [`Store`] contract exactly (the
//! conformance suite and the model-based property test run against this store).
//!
//! **After a failed write or sync** the writer refuses every further operation with
//! [`ErrorKind::Unavailable`] until the store is reopened (the process restarts and recovers
//! from the journal): after a failed `fsync` the kernel may have dropped the dirty pages, so
//! "retry the sync" could report success for data that is gone, and the memtable may hold
//! writes that never became durable, which must not be answered from. Reads keep answering from
//! the last synced view. Operations refused this way may still be on disk after the restart
//! (fjall syncs its journal once more when it closes, and the kernel may have written the pages
//! anyway): the [`Store`] contract allows that for an `Unavailable` write.
//!
//! **Limits.** The crash test kills the process, not the machine: it checks that acknowledged
//! operations survive a crash with the page cache intact, not that the sync reaches the platter
//! (that rests on `fdatasync` of a preallocated journal, fjall's own design). If fjall's flush
//! or compaction thread fails (a full disk), fjall poisons the keyspace, but a writer already
//! stalled on a full write buffer waits inside fjall; its callers then fail at their deadline
//! (`store_timeout` in the proxy).
//!
//! ## Bounds
//!
//! The writer queue holds at most `queue_capacity` operations (default 8,192); when it is full,
//! callers wait (back-pressure) rather than growing memory. A list page holds at most 1,000
//! records. fjall keeps at most its write buffer (64 MiB by default) in memtables and stalls the
//! writer above it, and journals up to 512 MiB before forcing a flush; its block cache is
//! [`FjallStoreBuilder::cache_size`]. Expired records are removed by the sweeper, which resumes
//! the expiry index where its last pass stopped (the writer lowers that point when an entry
//! lands below it), so it does not walk the tombstones of what it already removed; the space of
//! removed records comes back when fjall compacts.
//!
//! ## Errors
//!
//! fjall I/O errors and a poisoned keyspace map to [`ErrorKind::Unavailable`], a journal or
//! version that does not recover and a stored record that does not decode to
//! [`ErrorKind::Corrupt`], a locked directory to [`ErrorKind::Config`], a stopped writer to
//! [`ErrorKind::Unavailable`].
//!
//! ## Performance
//!
//! Measured by `benches/fjall.rs` (and side by side with redb in
//! `idemgate-store-redb/benches/engines.rs`); figures and the machine are in
//! `docs/performance.md`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fjall::{Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use idemgate_core::clock::{Clock, Timestamp, WallClock};
use idemgate_core::dir_lock::DirLock;
use idemgate_core::error::{ErrorKind, StoreError};
use idemgate_core::group_commit::{Committer, GroupCommitConfig, GroupWriter, WriterReply};
use idemgate_core::key::StoreKey;
use idemgate_core::protocol::{self, Answer, Mutation, Write};
use idemgate_core::record::{Fencing, Outcome, Record};
use idemgate_core::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ListPage, ListRequest,
    ResolveOutcome, Store, TakeOverOutcome, TakeOverRequest, UnknownMark,
};
use parking_lot::RwLock;

const RECORDS: &str = "records_v1";
const EXPIRY: &str = "expiry_v1";

/// Largest page returned by `list`.
pub const MAX_LIST_PAGE: usize = 1_000;

/// The default of [`FjallStoreBuilder::cache_size`]: 64 MiB.
pub const DEFAULT_CACHE_SIZE: u64 = 64 << 20;

/// Configures and opens a [`FjallStore`].
#[derive(Debug)]
pub struct FjallStoreBuilder {
    dir: PathBuf,
    clock: Arc<dyn Clock>,
    group: GroupCommitConfig,
    cache_size: u64,
}

impl FjallStoreBuilder {
    /// Memory fjall may use for its block cache (default [`DEFAULT_CACHE_SIZE`], at least 1 MiB).
    pub fn cache_size(mut self, bytes: u64) -> Self {
        self.cache_size = bytes.max(1 << 20);
        self
    }

    /// The clock that decides expiry (default: [`WallClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Most operations made durable by one sync (default 256).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.group.max_batch = n.max(1);
        self
    }

    /// Most operations queued for the writer (default 8,192); beyond it callers wait.
    pub fn queue_capacity(mut self, n: usize) -> Self {
        self.group.queue_capacity = n.max(1);
        self
    }

    /// How long the writer keeps gathering a group once callers are concurrent (see
    /// [`GroupCommitConfig::gather_window`]; default none).
    pub fn gather_window(mut self, window: Duration) -> Self {
        self.group.gather_window = window;
        self
    }

    /// Creates the directory if needed, locks it, recovers the journal and starts the writer.
    pub fn open(self) -> Result<FjallStore, StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| {
            StoreError::new(
                ErrorKind::Unavailable,
                format!("creating store directory {}", self.dir.display()),
            )
            .with_source(e)
        })?;
        // The lock comes first: recovery must not replay a journal another process is writing.
        let lock = DirLock::acquire(&self.dir)?;
        let keyspace = fjall::Config::new(self.dir.join("keyspace"))
            .cache_size(self.cache_size)
            // Durability comes only from the writer's explicit sync, once per group.
            .manual_journal_persist(true)
            .fsync_ms(None)
            .open()
            .map_err(|e| map_err(e, "open the keyspace"))?;
        let records = keyspace
            .open_partition(RECORDS, PartitionCreateOptions::default())
            .map_err(|e| map_err(e, "open the records partition"))?;
        let expiry = keyspace
            .open_partition(EXPIRY, PartitionCreateOptions::default())
            .map_err(|e| map_err(e, "open the expiry partition"))?;
        // What recovery replayed may still sit only in the page cache: sync it before anyone
        // reads it as durable.
        keyspace
            .persist(PersistMode::SyncData)
            .map_err(|e| map_err(e, "sync the recovered journal"))?;
        let engine = Arc::new(Engine {
            unsynced: RwLock::new(HashMap::new()),
            records,
            expiry,
            keyspace,
            #[cfg(feature = "testkit")]
            sync_gate: std::sync::Mutex::new(()),
            #[cfg(feature = "testkit")]
            fail_syncs: std::sync::atomic::AtomicBool::new(false),
        });
        let writer = GroupWriter::spawn(
            FjallCommitter {
                engine: engine.clone(),
                clock: self.clock.clone(),
                failed: None,
                purge_from: Bound::Unbounded,
            },
            GroupCommitConfig {
                thread_name: "idemgate-fjall-writer".into(),
                ..self.group
            },
        )?;
        Ok(FjallStore {
            inner: Arc::new(Inner {
                writer,
                engine,
                clock: self.clock,
                dir: self.dir,
                _lock: lock,
            }),
        })
    }
}

/// The fjall-backed durable store. Cloning shares the same directory and writer.
#[derive(Clone)]
pub struct FjallStore {
    inner: Arc<Inner>,
}

// Fields drop in order: the writer's thread is joined, then the keyspace closes (joining fjall's
// own threads), and only then is the directory unlocked.
struct Inner {
    writer: GroupWriter<FjallCommitter>,
    engine: Arc<Engine>,
    clock: Arc<dyn Clock>,
    dir: PathBuf,
    _lock: DirLock,
}

/// The keyspace, its two partitions and the durable view.
struct Engine {
    /// The keys the writer has changed since its last sync, each with its value as of that
    /// sync (`None`: absent). Readers read the latest value first and then look here: a key
    /// found here is answered with its synced value. (Not fjall's snapshots at the synced
    /// sequence number: lsm-tree 2's flush and compaction may drop a version such a snapshot
    /// still needs once a newer one exists, fjall-rs/lsm-tree#321.)
    unsynced: RwLock<HashMap<[u8; 32], Option<fjall::Slice>>>,
    records: PartitionHandle,
    expiry: PartitionHandle,
    keyspace: Keyspace,
    /// Test hook: the writer holds this while it syncs, so a test can hold a group between its
    /// writes and its sync.
    #[cfg(feature = "testkit")]
    sync_gate: std::sync::Mutex<()>,
    /// Test hook: while set, every sync fails (as a failed `fdatasync` would).
    #[cfg(feature = "testkit")]
    fail_syncs: std::sync::atomic::AtomicBool,
}

impl Engine {
    /// The record under `key` as of the last sync.
    fn read_durable(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        // The latest value first, the overlay second: if the value read is not synced yet, its
        // key was entered in the overlay before it was written and stays there until the sync,
        // so the overlay has it now.
        let latest = self
            .records
            .get(key.as_bytes())
            .map_err(|e| map_err(e, "get"))?;
        let raw = match self.unsynced.read().get(key.as_bytes()) {
            Some(synced) => synced.clone(),
            None => latest,
        };
        raw.map(|v| decode(&v)).transpose()
    }

    /// Enters `key` in the overlay with `synced` (its value as of the last sync), unless it is
    /// there already. Called by the writer before each write of `key`.
    fn before_write(&self, key: &[u8; 32], synced: &Option<fjall::Slice>) {
        self.unsynced
            .write()
            .entry(*key)
            .or_insert_with(|| synced.clone());
    }
}

impl std::fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

fn map_err(e: impl Into<fjall::Error>, what: &str) -> StoreError {
    let e: fjall::Error = e.into();
    let (kind, detail) = match &e {
        fjall::Error::Poisoned => (
            ErrorKind::Unavailable,
            ": an earlier sync to disk failed, so the store refuses writes until idemgate \
             restarts and recovers from its journal",
        ),
        fjall::Error::Io(_) | fjall::Error::Storage(fjall::LsmError::Io(_)) => {
            (ErrorKind::Unavailable, "")
        }
        fjall::Error::JournalRecovery(_)
        | fjall::Error::InvalidVersion(_)
        | fjall::Error::Decode(_)
        | fjall::Error::Storage(_) => (ErrorKind::Corrupt, ""),
        _ => (ErrorKind::Internal, ""),
    };
    StoreError::new(kind, format!("fjall: {what}{detail}")).with_source(e)
}

fn decode(bytes: &[u8]) -> Result<Record, StoreError> {
    Record::decode(bytes).map_err(StoreError::from)
}

/// The expiry-index key: the big-endian expiry time, then the record key, so that keys sort by
/// time.
fn expiry_key(at: Timestamp, key: &StoreKey) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..8].copy_from_slice(&at.as_millis().to_be_bytes());
    k[8..].copy_from_slice(key.as_bytes());
    k
}

/// An operation for the writer.
enum Op {
    Mutate(Mutation),
    Purge(usize),
    #[cfg(feature = "testkit")]
    OverwriteRaw(Vec<u8>),
}

/// Applies each operation as one fjall write batch, then syncs the journal once per group.
struct FjallCommitter {
    engine: Arc<Engine>,
    clock: Arc<dyn Clock>,
    /// Set by the first failed write or sync: from then on every operation is refused, since
    /// the memtable may hold writes that never became durable and must not be answered from.
    failed: Option<String>,
    /// Every expiry-index entry below this bound has been removed by `purge` (the writer sees
    /// every insert and lowers it when one lands below), so the next purge starts here instead
    /// of walking the removed entries' tombstones again.
    purge_from: Bound<Vec<u8>>,
}

impl Committer for FjallCommitter {
    type Op = Op;
    type Reply = WriterReply;

    fn commit(
        &mut self,
        batch: &[(StoreKey, Op)],
    ) -> Result<Vec<Result<WriterReply, StoreError>>, StoreError> {
        if let Some(why) = &self.failed {
            return Err(StoreError::new(ErrorKind::Unavailable, why.clone()));
        }
        let result = self.commit_group(batch);
        // The group-commit loop logs the failure, and this refusal once.
        if let Err(e) = &result {
            self.failed = Some(format!(
                "an earlier write or sync to disk failed ({}); the store refuses writes until \
                 idemgate restarts and recovers from its journal",
                e.message()
            ));
        }
        result
    }
}

impl FjallCommitter {
    fn commit_group(
        &mut self,
        batch: &[(StoreKey, Op)],
    ) -> Result<Vec<Result<WriterReply, StoreError>>, StoreError> {
        let now = self.clock.now();
        let mut dirty = false;
        let mut replies = Vec::with_capacity(batch.len());
        for (key, op) in batch {
            replies.push(self.apply(key, op, now, &mut dirty)?);
        }
        if dirty {
            let engine = &self.engine;
            #[cfg(feature = "testkit")]
            {
                let _gate = engine
                    .sync_gate
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if engine.fail_syncs.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(StoreError::new(
                        ErrorKind::Unavailable,
                        "fjall: sync the journal: injected failure (testkit)",
                    ));
                }
            }
            engine
                .keyspace
                .persist(PersistMode::SyncData)
                .map_err(|e| map_err(e, "sync the journal"))?;
            engine.unsynced.write().clear();
        }
        Ok(replies)
    }

    /// One operation. The outer error (a failed write) fails the whole group: nothing of it is
    /// acknowledged. The inner error (a record that does not decode, a failed read) is this
    /// operation's own answer.
    fn apply(
        &mut self,
        key: &StoreKey,
        op: &Op,
        now: Timestamp,
        dirty: &mut bool,
    ) -> Result<Result<WriterReply, StoreError>, StoreError> {
        let mutation = match op {
            Op::Mutate(m) => m,
            Op::Purge(limit) => {
                return Ok(self.purge(now, *limit, dirty)?.map(WriterReply::Count));
            }
            #[cfg(feature = "testkit")]
            Op::OverwriteRaw(bytes) => {
                let engine = &self.engine;
                let synced = engine
                    .records
                    .get(key.as_bytes())
                    .map_err(|e| map_err(e, "get"))?;
                engine.before_write(key.as_bytes(), &synced);
                engine
                    .records
                    .insert(key.as_bytes(), bytes.as_slice())
                    .map_err(|e| map_err(e, "insert"))?;
                *dirty = true;
                return Ok(Ok(WriterReply::Count(1)));
            }
        };
        let engine = &self.engine;
        // The writer's own view: the latest value, synced or not (an earlier operation of this
        // group may have written it).
        let raw = match engine.records.get(key.as_bytes()) {
            Ok(raw) => raw,
            Err(e) => return Ok(Err(map_err(e, "get"))),
        };
        let (current, write, answer) = match protocol::apply_stored(mutation, raw.as_deref(), now) {
            Ok(applied) => applied,
            Err(e) => return Ok(Err(e)),
        };
        let mut batch = engine.keyspace.batch();
        match write {
            Write::Unchanged => return Ok(Ok(WriterReply::Answer(answer))),
            Write::Put(next) => {
                if let Some(old) = &current
                    && old.expires_at != next.expires_at
                {
                    batch.remove(&engine.expiry, expiry_key(old.expires_at, key));
                }
                let entry = expiry_key(next.expires_at, key);
                let below = match &self.purge_from {
                    Bound::Unbounded => false,
                    Bound::Included(from) => entry.as_slice() < from.as_slice(),
                    Bound::Excluded(after) => entry.as_slice() <= after.as_slice(),
                };
                if below {
                    self.purge_from = Bound::Included(entry.to_vec());
                }
                batch.insert(&engine.records, key.as_bytes(), next.encode());
                batch.insert(&engine.expiry, entry, []);
            }
            Write::Delete => {
                if let Some(old) = &current {
                    batch.remove(&engine.expiry, expiry_key(old.expires_at, key));
                }
                batch.remove(&engine.records, key.as_bytes());
            }
        }
        engine.before_write(key.as_bytes(), &raw);
        batch.commit().map_err(|e| map_err(e, "write"))?;
        *dirty = true;
        Ok(Ok(WriterReply::Answer(answer)))
    }

    /// Removes up to `limit` records whose expiry-index entry is due, in one write batch. A
    /// failed read is purge's own answer (nothing was written); a failed write fails the group.
    fn purge(
        &mut self,
        now: Timestamp,
        limit: usize,
        dirty: &mut bool,
    ) -> Result<Result<usize, StoreError>, StoreError> {
        let engine = &self.engine;
        let upper = expiry_key(now, &StoreKey([0xff; 32]));
        let lower = match &self.purge_from {
            Bound::Included(k) => Bound::Included(k.as_slice()),
            Bound::Excluded(k) => Bound::Excluded(k.as_slice()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut due = Vec::new();
        for entry in engine
            .expiry
            .range::<&[u8], _>((lower, Bound::Included(upper.as_slice())))
            .take(limit)
        {
            match entry {
                Ok((k, _)) => due.push(k),
                Err(e) => return Ok(Err(map_err(e, "range"))),
            }
        }
        let Some(last) = due.last().map(|k| k.to_vec()) else {
            return Ok(Ok(0));
        };
        // Read everything first: a failed read is purge's own answer, with nothing written.
        let mut records = Vec::with_capacity(due.len());
        for k in &due {
            // A malformed entry (not time + key) is removed like any other.
            let parsed = k.split_first_chunk::<8>().and_then(|(at, key)| {
                Some((u64::from_be_bytes(*at), <[u8; 32]>::try_from(key).ok()?))
            });
            match parsed {
                Some((at, key)) => match engine.records.get(key) {
                    Ok(stored) => records.push(Some((at, key, stored))),
                    Err(e) => return Ok(Err(map_err(e, "get"))),
                },
                None => records.push(None),
            }
        }
        let mut batch = engine.keyspace.batch();
        let mut removed = 0;
        for (k, record) in due.into_iter().zip(records) {
            batch.remove(&engine.expiry, k);
            let Some((at, key, stored)) = record else {
                continue;
            };
            // Remove the record only if this index entry is its current expiry (and it decodes).
            if let Some(Ok(record)) = stored.as_deref().map(Record::decode)
                && record.expires_at.as_millis() == at
                && record.is_expired(now)
            {
                engine.before_write(&key, &stored);
                batch.remove(&engine.records, key);
                removed += 1;
            }
        }
        batch.commit().map_err(|e| map_err(e, "write"))?;
        *dirty = true;
        // Every entry up to `last` is removed now; the next purge starts after it.
        self.purge_from = Bound::Excluded(last);
        Ok(Ok(removed))
    }
}

impl FjallStore {
    /// A builder for the store in directory `dir` (created if missing).
    pub fn builder(dir: impl AsRef<Path>) -> FjallStoreBuilder {
        FjallStoreBuilder {
            dir: dir.as_ref().to_path_buf(),
            clock: Arc::new(WallClock),
            group: GroupCommitConfig::default(),
            cache_size: DEFAULT_CACHE_SIZE,
        }
    }

    /// Opens the store in directory `dir` with the defaults.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::builder(dir).open()
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Bytes on disk: journals plus the partitions' segments (what fjall accounts, not `du`).
    pub fn disk_space(&self) -> u64 {
        self.inner.engine.keyspace.disk_space()
    }

    async fn mutate(&self, key: &StoreKey, mutation: Mutation) -> Result<Answer, StoreError> {
        self.inner
            .writer
            .submit(*key, Op::Mutate(mutation))
            .await?
            .answer()
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

    /// Test hook (feature `testkit`): while the returned guard lives, the writer stops before its
    /// next sync, with that group's writes applied but not yet durable.
    #[cfg(feature = "testkit")]
    pub fn hold_syncs(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .engine
            .sync_gate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Test hook (feature `testkit`): every later sync fails, as a failed `fdatasync` would.
    #[cfg(feature = "testkit")]
    pub fn fail_syncs(&self) {
        self.inner
            .engine
            .fail_syncs
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Test hook (feature `testkit`): whether the writer's latest view (synced or not) has a
    /// record under `key`.
    #[cfg(feature = "testkit")]
    pub fn written(&self, key: &StoreKey) -> Result<bool, StoreError> {
        self.inner
            .engine
            .records
            .contains_key(key.as_bytes())
            .map_err(|e| map_err(e, "get"))
    }
}

impl Store for FjallStore {
    async fn claim(&self, key: &StoreKey, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        // Fast path: a live durable record answers without queueing for the writer. It existed
        // at the snapshot, so "Existing" is a correct atomic answer, unless it is a free key
        // (released or revoked), which the writer claims at the next epoch.
        let now = self.inner.clock.now();
        if let Some(record) = self.inner.engine.read_durable(key)?
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
        Ok(self
            .inner
            .engine
            .read_durable(key)?
            .filter(|r| !r.is_expired(now)))
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
        let engine = &self.inner.engine;
        let lower = match &after {
            Some(k) => Bound::Excluded(k.as_bytes().as_slice()),
            None => Bound::Unbounded,
        };
        let live = |v: &[u8], key: &[u8; 32]| match decode(v) {
            Ok(r) => (!r.is_expired(now)).then_some(r),
            Err(e) => {
                // One rotten record must not hide the others from administrators.
                let key = StoreKey(*key);
                tracing::warn!(key = %key, error = %e, "skipping an undecodable record in list");
                None
            }
        };
        // The latest values first (up to a page of live records), then the overlay of what is
        // not synced yet, as in `read_durable`.
        let mut page: BTreeMap<[u8; 32], Record> = BTreeMap::new();
        let mut end = None;
        for entry in engine.records.range::<&[u8], _>((lower, Bound::Unbounded)) {
            let (k, v) = entry.map_err(|e| map_err(e, "range"))?;
            let Ok(key) = <[u8; 32]>::try_from(&*k) else {
                tracing::warn!(
                    len = k.len(),
                    "skipping a record key of the wrong length in list"
                );
                continue;
            };
            if let Some(record) = live(&v, &key) {
                page.insert(key, record);
                if page.len() == limit {
                    end = Some(key);
                    break;
                }
            }
        }
        let overlay: Vec<([u8; 32], Option<fjall::Slice>)> = engine
            .unsynced
            .read()
            .iter()
            .filter(|(k, _)| after.is_none_or(|a| **k > a.0) && end.is_none_or(|e| **k <= e))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (key, synced) in overlay {
            match synced.as_deref().and_then(|v| live(v, &key)) {
                Some(record) => page.insert(key, record),
                None => page.remove(&key),
            };
        }
        let mut records: Vec<(StoreKey, Record)> =
            page.into_iter().map(|(k, r)| (StoreKey(k), r)).collect();
        let next = if records.len() > limit {
            records.truncate(limit);
            records.last().map(|(k, _)| k.to_hex())
        } else {
            end.map(|k| StoreKey(k).to_hex())
        };
        Ok(ListPage {
            records,
            next,
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
