//! Issue 14: embedded engines side by side, in one criterion run, on the claim + complete pair at
//! 1, 16 and 64 concurrent tasks, with the same durability for each.
//!
//! - `redb_raw`, `fjall_raw_syncdata`, `fjall_raw_syncall`: the same minimal emulation over each
//!   engine. A claim reads the key and, if absent, inserts a 150-byte in-flight record; a
//!   complete reads it back and replaces it with a 400-byte completed record. Every operation
//!   goes to ONE writer thread, the stores' own (`idemgate_core::group_commit`); it takes what is
//!   queued (up to 256, with the 100 µs gathering window these runs were measured with, which the
//!   stores no longer use by default), applies it, makes it
//!   durable with ONE sync (redb: a write transaction committed with `Durability::Immediate`,
//!   which is an fdatasync; fjall: `Keyspace::persist(PersistMode::SyncData)`, the same
//!   fdatasync, or `SyncAll`, an fsync), and only then answers every caller of the batch.
//! - `redb_store`: the real `RedbStore` through the shared driver, as the reference row.
//!
//! `nice -n 19 cargo bench -p idemgate-store-redb --bench engines`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemgate_core::group_commit::{Committer, GroupCommitConfig, GroupWriter};
use idemgate_core::testkit::bench::{bench_key, claim_complete_pairs};
use idemgate_core::{StoreError, StoreKey};
use idemgate_store_redb::RedbStore;
use redb::ReadableTable;

const TASKS: [usize; 3] = [1, 16, 64];
const MAX_BATCH: usize = 256;
const GATHER_WINDOW: Duration = Duration::from_micros(100);
const IN_FLIGHT_LEN: usize = 150;
const COMPLETED_LEN: usize = 400;

#[derive(Clone, Copy)]
enum Kind {
    Claim,
    Complete,
}

/// One engine under the emulation: apply a batch, make it durable with one sync, say per job
/// whether it succeeded (claim: the key was absent; complete: the in-flight record was there).
trait Engine: Send + 'static {
    fn apply_durably(&mut self, batch: &[(StoreKey, Kind)]) -> Vec<bool>;
}

fn in_flight() -> Vec<u8> {
    let mut v = vec![b'i'; IN_FLIGHT_LEN];
    v[0] = 1;
    v
}

fn completed(prev: &[u8]) -> Vec<u8> {
    // Read-modify-write: the completed record carries part of the in-flight one (its header).
    let mut v = vec![b'c'; COMPLETED_LEN];
    v[0] = 2;
    v[1..17].copy_from_slice(&prev[1..17]);
    v
}

struct Redb {
    db: redb::Database,
}

const RECORDS: redb::TableDefinition<&[u8; 32], &[u8]> = redb::TableDefinition::new("records");

impl Redb {
    fn open(path: &Path) -> Self {
        let db = redb::Database::builder()
            .set_cache_size(64 << 20)
            .create(path)
            .unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(RECORDS).unwrap();
        txn.commit().unwrap();
        Self { db }
    }
}

impl Engine for Redb {
    fn apply_durably(&mut self, batch: &[(StoreKey, Kind)]) -> Vec<bool> {
        let mut txn = self.db.begin_write().unwrap();
        txn.set_durability(redb::Durability::Immediate).unwrap();
        let mut out = Vec::with_capacity(batch.len());
        {
            let mut t = txn.open_table(RECORDS).unwrap();
            for (key, kind) in batch {
                let key = key.as_bytes();
                let prev = t.get(key).unwrap().map(|v| v.value().to_vec());
                let ok = match (kind, prev) {
                    (Kind::Claim, None) => {
                        t.insert(key, in_flight().as_slice()).unwrap();
                        true
                    }
                    (Kind::Complete, Some(prev)) if prev[0] == 1 => {
                        t.insert(key, completed(&prev).as_slice()).unwrap();
                        true
                    }
                    _ => false,
                };
                out.push(ok);
            }
        }
        txn.commit().unwrap();
        out
    }
}

struct Fjall {
    keyspace: fjall::Keyspace,
    records: fjall::PartitionHandle,
    mode: fjall::PersistMode,
}

impl Fjall {
    fn open(path: &Path, mode: fjall::PersistMode) -> Self {
        // No background fsync timer: durability comes only from the writer's persist.
        let keyspace = fjall::Config::new(path)
            .cache_size(64 << 20)
            .fsync_ms(None)
            .open()
            .unwrap();
        let records = keyspace
            .open_partition("records", fjall::PartitionCreateOptions::default())
            .unwrap();
        Self {
            keyspace,
            records,
            mode,
        }
    }
}

impl Engine for Fjall {
    fn apply_durably(&mut self, batch: &[(StoreKey, Kind)]) -> Vec<bool> {
        let mut out = Vec::with_capacity(batch.len());
        for (key, kind) in batch {
            let key = key.as_bytes();
            let prev = self.records.get(key).unwrap();
            let ok = match (kind, prev) {
                (Kind::Claim, None) => {
                    self.records.insert(key, in_flight()).unwrap();
                    true
                }
                (Kind::Complete, Some(prev)) if prev[0] == 1 => {
                    self.records.insert(key, completed(&prev)).unwrap();
                    true
                }
                _ => false,
            };
            out.push(ok);
        }
        self.keyspace.persist(self.mode).unwrap();
        out
    }
}

/// Any engine under the stores' own group-commit writer.
struct Emulated(Box<dyn Engine>);

impl Committer for Emulated {
    type Op = Kind;
    type Reply = bool;

    fn commit(
        &mut self,
        batch: &[(StoreKey, Kind)],
    ) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
        Ok(self.0.apply_durably(batch).into_iter().map(Ok).collect())
    }
}

type Writer = GroupWriter<Emulated>;

/// The group-commit writer of the real stores (`idemgate_core::group_commit`), with the gathering
/// window these runs were measured with.
fn spawn_writer(engine: impl Engine) -> Writer {
    let config = GroupCommitConfig {
        max_batch: MAX_BATCH,
        gather_window: GATHER_WINDOW,
        ..GroupCommitConfig::default()
    };
    GroupWriter::spawn(Emulated(Box::new(engine)), config).unwrap()
}

async fn call(writer: &Writer, kind: Kind, key: StoreKey) -> bool {
    writer.submit(key, kind).await.unwrap()
}

/// `pairs` claim + complete pairs on fresh keys over `tasks` concurrent tasks; the wall time.
async fn raw_pairs(writer: &Arc<Writer>, tasks: usize, pairs: u64) -> Duration {
    let tasks = tasks.max(1) as u64;
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let writer = writer.clone();
            let n = pairs / tasks + u64::from(t < pairs % tasks);
            tokio::spawn(async move {
                for _ in 0..n {
                    let key = bench_key();
                    assert!(call(&writer, Kind::Claim, key).await, "fresh key existed");
                    assert!(call(&writer, Kind::Complete, key).await, "claim lost");
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed()
}

fn engines(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("engines_claim_complete");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(5));

    type Opener = fn(&Path) -> Box<dyn FnOnce() -> Writer>;
    let raw: [(&str, Opener); 3] = [
        ("redb_raw", |p| {
            let e = Redb::open(&p.join("raw.redb"));
            Box::new(move || spawn_writer(e))
        }),
        ("fjall_raw_syncdata", |p| {
            let e = Fjall::open(&p.join("fjall"), fjall::PersistMode::SyncData);
            Box::new(move || spawn_writer(e))
        }),
        ("fjall_raw_syncall", |p| {
            let e = Fjall::open(&p.join("fjall"), fjall::PersistMode::SyncAll);
            Box::new(move || spawn_writer(e))
        }),
    ];
    for (name, open) in raw {
        for tasks in TASKS {
            let sub = dir.path().join(format!("{name}-{tasks}"));
            std::fs::create_dir_all(&sub).unwrap();
            let writer = Arc::new(open(&sub)());
            g.bench_with_input(BenchmarkId::new(name, tasks), &tasks, |b, &tasks| {
                b.iter_custom(|pairs| rt.block_on(raw_pairs(&writer, tasks, pairs)));
            });
            // Dropping the writer stops its thread, which drops (closes) the engine.
        }
    }
    for tasks in TASKS {
        let store = RedbStore::open(dir.path().join(format!("store-{tasks}.redb"))).unwrap();
        g.bench_with_input(
            BenchmarkId::new("redb_store", tasks),
            &tasks,
            |b, &tasks| {
                b.iter_custom(|pairs| rt.block_on(claim_complete_pairs(&store, tasks, pairs)));
            },
        );
    }
    g.finish();
}

criterion_group!(benches, engines);
criterion_main!(benches);
