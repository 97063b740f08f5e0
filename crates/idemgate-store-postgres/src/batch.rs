//! Group commit of the hot compare-and-set operations (`claim`, `renew`, `complete`,
//! `mark_unknown`, `release`); see "Group commit" in the crate docs.
//!
//! A caller hands its operation to the store's batcher task over a bounded queue and waits for
//! the answer. The batcher takes what is queued (up to [`MAX_BATCH`]) and sends it on one pooled
//! connection as `BEGIN`, one statement per operation in store-key order, `COMMIT`, pipelined; it
//! answers each caller only once `COMMIT` succeeded. A batch of one is the plain autocommit
//! statement ([`run_alone`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::Poll;

use deadpool_postgres::Pool;
use idemgate_core::error::{ErrorKind, StoreError};
use idemgate_core::key::StoreKey;
use idemgate_core::protocol;
use idemgate_core::record::Fencing;
use idemgate_core::store::{CasOutcome, ClaimOutcome, ClaimRequest};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};

use crate::{COLUMNS, HELD, NOW, cas, corrupt, db_err, decode, ms, now_of, pool_err, req_u64};

/// Most operations in one batch (one transaction).
pub const MAX_BATCH: usize = 64;
/// Operations waiting for a batch; when it is full, a caller runs its statement on its own
/// (the unbatched path, with the pool's bounded wait), so the bound never refuses a request.
pub const BATCH_QUEUE: usize = 1024;
/// Most batches in flight at once (each on its own connection), for a pool of `pool_size`:
/// half the pool, between 1 and 8, so that the other operations keep connections.
///
/// There is no timed gathering window: a batch is what queued while every batch slot was busy,
/// so a lone caller never waits. (A 200 µs window, spent yielding as the redb store's writer
/// does, measured slower on two shared cores: the path is CPU-bound, and the spinning cost more
/// than the larger batches saved.)
pub(crate) fn max_in_flight(pool_size: usize) -> usize {
    (pool_size / 2).clamp(1, 8)
}

/// `lock_timeout` inside a batch's transaction. A statement waiting this long for a row lock
/// (held by a long transaction, an admin's, another batch's) rolls its batch back, and the
/// batch's operations run again one by one (without the timeout): one slow row never holds
/// the other rows of its batch locked, nor delays their renewals, for longer than this.
pub const BATCH_LOCK_TIMEOUT: &str = "250ms";

/// A batch's first statement: its transaction, with [`BATCH_LOCK_TIMEOUT`].
static BEGIN_SQL: LazyLock<String> =
    LazyLock::new(|| format!("BEGIN; SET LOCAL lock_timeout = '{BATCH_LOCK_TIMEOUT}'"));

/// Operations of a rolled-back batch run again one by one, at most this many at a time (so
/// that a rolled-back batch does not take the pool from every other operation).
const RETRY_CONCURRENCY: usize = 4;

/// Whether a job's caller still waits for it. A caller that gave up (its deadline passed, its
/// request was cancelled) must not have its operation sent later: a claim run after its caller
/// left would hold a lease nobody owns, a renewal run late is only load.
fn wanted(job: &Job) -> bool {
    !job.reply.is_closed()
}

/// Whether the database answered `e` with an ERROR (which aborts the transaction: nothing of it
/// commits), as opposed to FATAL or PANIC (the session ends; a PANIC may even follow a commit
/// record) or no answer at all.
fn rolled_back_by(e: &tokio_postgres::Error) -> bool {
    e.as_db_error()
        .is_some_and(|d| d.parsed_severity() == Some(tokio_postgres::error::Severity::Error))
}

const REVOKED_TOKEN: [u8; 16] = Fencing::REVOKED.to_be_bytes();
static REVOKED_TOKEN_SLICE: &[u8] = &REVOKED_TOKEN;

static CLAIM_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH n AS (SELECT {NOW} AS now),
         ins AS (
           INSERT INTO idemgate_records AS r ({COLUMNS})
           SELECT $1, $2, $3, $4, $5, n.now, greatest(n.now + $8, n.now + $7), 1, 1, $6, $9,
                  n.now + $7, NULL, NULL, NULL
           FROM n
           ON CONFLICT (store_key) DO UPDATE SET
             namespace = EXCLUDED.namespace, scope = EXCLUDED.scope, idem_key = EXCLUDED.idem_key,
             fingerprint = EXCLUDED.fingerprint, created_at = EXCLUDED.created_at,
             expires_at = EXCLUDED.expires_at, state = 1,
             epoch = CASE WHEN r.expires_at <= EXCLUDED.created_at THEN 1 ELSE r.epoch + 1 END,
             token = EXCLUDED.token,
             owner = EXCLUDED.owner, lease_expires_at = EXCLUDED.lease_expires_at,
             completed_at = NULL, outcome = NULL, unknown_since = NULL
           WHERE r.expires_at <= EXCLUDED.created_at
              OR (r.state = 1 AND r.token = $10 AND r.lease_expires_at <= EXCLUDED.created_at)
           RETURNING r.*
         )
         SELECT true AS acquired, n.now, ins.* FROM ins, n
         UNION ALL
         SELECT false, n.now, r.* FROM idemgate_records r, n
         WHERE r.store_key = $1 AND r.expires_at > n.now AND NOT EXISTS (SELECT 1 FROM ins)
           AND NOT (r.state = 1 AND r.token = $10 AND r.lease_expires_at <= n.now)"
    )
});

static RENEW_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH n AS (SELECT {NOW} AS now)
         UPDATE idemgate_records r SET lease_expires_at = n.now + $4,
           expires_at = greatest(r.expires_at, n.now + $4)
         FROM n WHERE {HELD}"
    )
});

static COMPLETE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH n AS (SELECT {NOW} AS now),
         w AS (UPDATE idemgate_records r SET state = 2, completed_at = n.now, outcome = $4,
           expires_at = n.now + $5, token = NULL, owner = NULL, lease_expires_at = NULL
         FROM n WHERE {HELD} RETURNING r.store_key)
         SELECT 1 FROM w"
    )
});

static MARK_UNKNOWN_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH n AS (SELECT {NOW} AS now),
         w AS (UPDATE idemgate_records r SET state = 3, unknown_since = n.now,
           expires_at = n.now + $4, token = NULL, owner = NULL, lease_expires_at = NULL
         FROM n WHERE {HELD} RETURNING r.store_key)
         SELECT 1 FROM w"
    )
});

// The row becomes a free key with its epoch as the floor (see `protocol::release`).
static RELEASE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH n AS (SELECT {NOW} AS now),
         w AS (UPDATE idemgate_records r SET token = $4, owner = $5, lease_expires_at = n.now
               FROM n WHERE {HELD} RETURNING r.store_key)
         SELECT 1 FROM w"
    )
});

/// The fencing a compare-and-set names, as the statements take it.
pub(crate) struct Held {
    epoch: i64,
    token: [u8; 16],
}

impl Held {
    pub(crate) fn new(f: Fencing) -> Self {
        Self {
            epoch: f.epoch as i64,
            token: f.token.to_be_bytes(),
        }
    }
}

/// One operation, owning its statement's parameters.
pub(crate) enum Kind {
    Claim {
        namespace: String,
        scope: String,
        idem_key: String,
        fingerprint: Vec<u8>,
        token: u128,
        token_bytes: [u8; 16],
        lease_ttl: i64,
        ttl: i64,
        owner: String,
    },
    Renew {
        held: Held,
        lease_ttl: i64,
    },
    Complete {
        held: Held,
        outcome: Vec<u8>,
        ttl: i64,
    },
    MarkUnknown {
        held: Held,
        ttl: i64,
    },
    Release {
        held: Held,
    },
}

/// An operation on one key.
pub(crate) struct Op {
    key: StoreKey,
    kind: Kind,
}

/// An operation's answer.
pub(crate) enum Reply {
    Claim(Box<ClaimOutcome>),
    Cas(CasOutcome),
}

/// What a statement returned.
enum Answer {
    Rows(Vec<Row>),
    Count(u64),
}

type BoxedFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
type Sent<'a> = BoxedFuture<'a, Result<Answer, tokio_postgres::Error>>;

impl Op {
    pub(crate) fn new(key: &StoreKey, kind: Kind) -> Self {
        Self { key: *key, kind }
    }

    pub(crate) fn claim(key: &StoreKey, req: &ClaimRequest) -> Self {
        let mut fingerprint = Vec::with_capacity(33);
        fingerprint.push(req.fingerprint.algorithm.tag());
        fingerprint.extend_from_slice(&req.fingerprint.digest);
        Self::new(
            key,
            Kind::Claim {
                namespace: req.namespace.clone(),
                scope: req.scope.clone(),
                idem_key: req.idempotency_key.clone(),
                fingerprint,
                token: req.token,
                token_bytes: req.token.to_be_bytes(),
                lease_ttl: ms(req.lease_ttl),
                ttl: ms(req.ttl),
                owner: req.owner.clone(),
            },
        )
    }

    fn sql(&self) -> &'static str {
        match self.kind {
            Kind::Claim { .. } => CLAIM_SQL.as_str(),
            Kind::Renew { .. } => RENEW_SQL.as_str(),
            Kind::Complete { .. } => COMPLETE_SQL.as_str(),
            Kind::MarkUnknown { .. } => MARK_UNKNOWN_SQL.as_str(),
            Kind::Release { .. } => RELEASE_SQL.as_str(),
        }
    }

    /// Sends the statement (on the future's first poll: statements issued together on one
    /// client are pipelined in the order they are first polled) and reads its answer.
    fn send<'a>(&'a self, client: &'a Client, stmt: &'a Statement) -> Sent<'a> {
        Box::pin(async move {
            let key: &[u8] = self.key.as_bytes().as_slice();
            match &self.kind {
                Kind::Claim {
                    namespace,
                    scope,
                    idem_key,
                    fingerprint,
                    token_bytes,
                    lease_ttl,
                    ttl,
                    owner,
                    ..
                } => {
                    let token: &[u8] = token_bytes.as_slice();
                    let params: [&(dyn ToSql + Sync); 10] = [
                        &key,
                        namespace,
                        scope,
                        idem_key,
                        fingerprint,
                        &token,
                        lease_ttl,
                        ttl,
                        owner,
                        &REVOKED_TOKEN_SLICE,
                    ];
                    client.query(stmt, &params).await.map(Answer::Rows)
                }
                Kind::Renew { held, lease_ttl } => {
                    let token: &[u8] = held.token.as_slice();
                    let params: [&(dyn ToSql + Sync); 4] = [&key, &held.epoch, &token, lease_ttl];
                    client.execute(stmt, &params).await.map(Answer::Count)
                }
                Kind::Complete { held, outcome, ttl } => {
                    let token: &[u8] = held.token.as_slice();
                    let params: [&(dyn ToSql + Sync); 5] =
                        [&key, &held.epoch, &token, outcome, ttl];
                    client.execute(stmt, &params).await.map(Answer::Count)
                }
                Kind::MarkUnknown { held, ttl } => {
                    let token: &[u8] = held.token.as_slice();
                    let params: [&(dyn ToSql + Sync); 4] = [&key, &held.epoch, &token, ttl];
                    client.execute(stmt, &params).await.map(Answer::Count)
                }
                Kind::Release { held } => {
                    let token: &[u8] = held.token.as_slice();
                    let params: [&(dyn ToSql + Sync); 5] = [
                        &key,
                        &held.epoch,
                        &token,
                        &REVOKED_TOKEN_SLICE,
                        &protocol::RELEASED_OWNER,
                    ];
                    client.execute(stmt, &params).await.map(Answer::Count)
                }
            }
        })
    }

    /// The reply a committed answer gives; `None` when a claim must be asked again (a concurrent
    /// claim committed after the statement's snapshot was taken: its row is invisible to the
    /// SELECT branch, which sees the version before it — an expired row, or a free key, both left
    /// out; nothing was written).
    fn interpret(&self, answer: Answer) -> Result<Option<Reply>, StoreError> {
        match (&self.kind, answer) {
            (Kind::Claim { token, .. }, Answer::Rows(rows)) => {
                let Some(row) = rows.first() else {
                    return Ok(None);
                };
                let acquired: bool = row.try_get("acquired").map_err(|_| corrupt("acquired"))?;
                Ok(Some(Reply::Claim(Box::new(if acquired {
                    // Epoch 1, or the next epoch of a free key (released, or revoked).
                    ClaimOutcome::Acquired {
                        fencing: Fencing {
                            epoch: req_u64(row, "epoch")?,
                            token: *token,
                        },
                    }
                } else {
                    ClaimOutcome::Existing {
                        record: decode(row)?,
                        now: now_of(row)?,
                    }
                }))))
            }
            (_, Answer::Count(n)) => Ok(Some(Reply::Cas(cas(n)))),
            (_, Answer::Rows(_)) => Err(StoreError::new(
                ErrorKind::Internal,
                "postgres batch: unexpected answer",
            )),
        }
    }
}

/// Runs `op` as its own autocommit statement (the unbatched path); a claim that raced with a
/// concurrent claim is asked again, a bounded number of times.
pub(crate) async fn run_alone(pool: &Pool, op: &Op) -> Result<Reply, StoreError> {
    for _ in 0..8 {
        let client = pool.get().await.map_err(pool_err)?;
        let stmt = client.prepare_cached(op.sql()).await.map_err(db_err)?;
        let answer = op.send(&client, &stmt).await.map_err(db_err)?;
        if let Some(reply) = op.interpret(answer)? {
            return Ok(reply);
        }
    }
    Err(StoreError::new(
        ErrorKind::Timeout,
        "claim kept racing with concurrent claims",
    ))
}

/// Counters of the batcher since the store was connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Transactions of two or more operations that committed.
    pub batches: u64,
    /// Operations answered from those transactions.
    pub operations: u64,
    /// Transactions of two or more operations that the database rolled back (a deadlock, a
    /// serialization failure, any statement's error): each of their operations was run again on
    /// its own.
    pub rolled_back: u64,
    /// Operations run on their own because the batch queue was full.
    pub overflowed: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    operations: AtomicU64,
    rolled_back: AtomicU64,
    overflowed: AtomicU64,
}

struct Job {
    op: Op,
    reply: oneshot::Sender<Result<Reply, StoreError>>,
}

/// The handle on a store's batcher task. The task ends when every handle is dropped.
pub(crate) struct Batcher {
    queue: mpsc::Sender<Job>,
    counters: Arc<Counters>,
}

impl Batcher {
    /// Starts the batcher of `pool` (of `pool_size` connections).
    pub(crate) fn spawn(pool: Pool, pool_size: usize) -> Self {
        let (queue, rx) = mpsc::channel(BATCH_QUEUE);
        let counters = Arc::new(Counters::default());
        tokio::spawn(gather(pool, rx, max_in_flight(pool_size), counters.clone()));
        Self { queue, counters }
    }

    /// Runs `op` in a batch (or on its own when the queue is full) and answers after its commit.
    pub(crate) async fn run(&self, pool: &Pool, op: Op) -> Result<Reply, StoreError> {
        let (reply, answer) = oneshot::channel();
        match self.queue.try_send(Job { op, reply }) {
            Ok(()) => answer.await.unwrap_or_else(|_| {
                // The batcher stopped (the runtime is shutting down) with the operation taken:
                // whether it committed is unknown.
                Err(StoreError::new(
                    ErrorKind::Unavailable,
                    "postgres batch stopped; the operation's outcome is unknown",
                ))
            }),
            Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) => {
                self.counters.overflowed.fetch_add(1, Ordering::Relaxed);
                run_alone(pool, &job.op).await
            }
        }
    }

    pub(crate) fn stats(&self) -> BatchStats {
        BatchStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            operations: self.counters.operations.load(Ordering::Relaxed),
            rolled_back: self.counters.rolled_back.load(Ordering::Relaxed),
            overflowed: self.counters.overflowed.load(Ordering::Relaxed),
        }
    }
}

/// The batcher: takes what is queued into a batch once a batch slot is free, and runs the batch
/// on a task of its own.
async fn gather(
    pool: Pool,
    mut rx: mpsc::Receiver<Job>,
    in_flight: usize,
    counters: Arc<Counters>,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        // While every slot is busy, callers queue up: the next batch takes them all.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        batch.extend(Some(first).filter(wanted));
        // What else is queued now joins it; nobody waits for company. Jobs whose callers gave
        // up while queued are dropped unsent.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.extend(Some(job).filter(wanted)),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let pool = pool.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            run_batch(&pool, batch, &counters).await;
            drop(slot);
        });
    }
}

/// How a batch's transaction ended.
enum Ended {
    /// `COMMIT` succeeded: one answer per operation, in the batch's order.
    Committed(Vec<Answer>),
    /// Nothing was sent, or the database rolled the transaction back: nothing of it was written.
    NothingWritten(StoreError),
    /// Nothing was sent, and running the operations alone would fail the same way (the pool).
    NotRun(StoreError),
    /// The connection failed before `COMMIT`'s answer: whether it committed is unknown.
    Unknown(StoreError),
}

fn copy_err(e: &StoreError) -> StoreError {
    StoreError::new(e.kind(), e.message().to_owned())
}

async fn run_batch(pool: &Pool, mut batch: Vec<Job>, counters: &Counters) {
    // Callers may have left while the batch waited for its slot's task to start.
    batch.retain(wanted);
    if batch.len() <= 1 {
        for job in batch {
            let reply = run_alone(pool, &job.op).await;
            let _ = job.reply.send(reply);
        }
        return;
    }
    // Store-key order: every batch locks its rows in the same order, so two batches (of this
    // store or of another instance) never wait for each other in a cycle. The sort is stable:
    // operations on one key keep their arrival order, which is their serial order.
    batch.sort_by(|a, b| a.op.key.as_bytes().cmp(b.op.key.as_bytes()));
    match commit_together(pool, &batch).await {
        Ended::Committed(answers) => {
            counters.batches.fetch_add(1, Ordering::Relaxed);
            counters
                .operations
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let mut again = Vec::new();
            for (job, answer) in batch.into_iter().zip(answers) {
                match job.op.interpret(answer) {
                    Ok(Some(reply)) => {
                        let _ = job.reply.send(Ok(reply));
                    }
                    // A claim that raced: nothing was written; ask again on its own.
                    Ok(None) => again.push(job),
                    Err(e) => {
                        let _ = job.reply.send(Err(e));
                    }
                }
            }
            run_each_alone(pool, again).await;
        }
        Ended::NothingWritten(e) => {
            counters.rolled_back.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, operations = batch.len(),
                "postgres batch rolled back; running its operations one by one");
            run_each_alone(pool, batch).await;
        }
        Ended::NotRun(e) => {
            for job in batch {
                let _ = job.reply.send(Err(copy_err(&e)));
            }
        }
        Ended::Unknown(e) => {
            tracing::warn!(error = %e, operations = batch.len(),
                "postgres batch: connection lost before COMMIT's answer; outcome unknown");
            for job in batch {
                let _ = job.reply.send(Err(copy_err(&e)));
            }
        }
    }
}

/// Runs each job whose caller still waits as its own statement, [`RETRY_CONCURRENCY`] at a
/// time, and answers it.
async fn run_each_alone(pool: &Pool, jobs: Vec<Job>) {
    use futures_util::StreamExt as _;
    futures_util::stream::iter(jobs.into_iter().filter(wanted))
        .map(|job| async move {
            let reply = run_alone(pool, &job.op).await;
            let _ = job.reply.send(reply);
        })
        .buffer_unordered(RETRY_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

/// `BEGIN`, the batch's statements in order, `COMMIT`, pipelined on one connection.
async fn commit_together(pool: &Pool, batch: &[Job]) -> Ended {
    let client = match pool.get().await {
        Ok(c) => c,
        Err(e) => return Ended::NotRun(pool_err(e)),
    };
    let mut stmts = Vec::with_capacity(batch.len());
    for job in batch {
        match client.prepare_cached(job.op.sql()).await {
            Ok(s) => stmts.push(s),
            Err(e) => return Ended::NothingWritten(db_err(e)),
        }
    }
    let client: &Client = &client;
    let begin: Sent<'_> = Box::pin(async {
        client
            .batch_execute(&BEGIN_SQL)
            .await
            .map(|()| Answer::Count(0))
    });
    let commit: Sent<'_> = Box::pin(async {
        client
            .batch_execute("COMMIT")
            .await
            .map(|()| Answer::Count(0))
    });
    let mut futures: Vec<Sent<'_>> = Vec::with_capacity(batch.len() + 2);
    futures.push(begin);
    futures.extend(
        batch
            .iter()
            .zip(&stmts)
            .map(|(job, stmt)| job.op.send(client, stmt)),
    );
    futures.push(commit);
    let mut results = in_order(futures).await;
    // Outcomes: [BEGIN, statements…, COMMIT].
    let commit = results.pop();
    let begin = if results.is_empty() {
        None
    } else {
        Some(results.remove(0))
    };
    // Without its BEGIN the statements ran on their own (autocommit): whatever they did is
    // committed, so nothing may be run again. Never seen; handled as unknown.
    if let Some(Err(e)) = begin {
        return Ended::Unknown(db_err(e));
    }
    let statement_failed_in_database = results
        .iter()
        .any(|r| matches!(r, Err(e) if rolled_back_by(e)));
    if statement_failed_in_database {
        // An error inside the transaction aborted it: its COMMIT rolled back (whatever became
        // of the connection afterwards).
        let first = results
            .into_iter()
            .find_map(|r| r.err().filter(rolled_back_by));
        return Ended::NothingWritten(first.map_or_else(
            || StoreError::new(ErrorKind::Internal, "postgres batch"),
            db_err,
        ));
    }
    let mut answers = Vec::with_capacity(batch.len());
    let mut lost = None;
    for r in begin.into_iter().chain(results) {
        match r {
            Ok(a) => answers.push(a),
            Err(e) => {
                lost.get_or_insert(e);
            }
        }
    }
    match commit {
        Some(Ok(_)) if lost.is_none() => {
            // Drop BEGIN's answer.
            answers.remove(0);
            Ended::Committed(answers)
        }
        // The server answered COMMIT with an ERROR: rolled back. (FATAL or PANIC: unknown.)
        Some(Err(e)) if lost.is_none() && rolled_back_by(&e) => Ended::NothingWritten(db_err(e)),
        Some(Err(e)) => Ended::Unknown(db_err(lost.unwrap_or(e))),
        _ => Ended::Unknown(lost.map_or_else(
            || StoreError::new(ErrorKind::Unavailable, "postgres batch: no COMMIT answer"),
            db_err,
        )),
    }
}

/// Polls every future, in the order given, until all are done; returns their outputs in that
/// order. The first poll of each happens in order (so pipelined requests go out in order).
async fn in_order<T>(futures: Vec<BoxedFuture<'_, T>>) -> Vec<T> {
    let mut slots: Vec<(BoxedFuture<'_, T>, Option<T>)> =
        futures.into_iter().map(|f| (f, None)).collect();
    std::future::poll_fn(move |cx| {
        let mut pending = false;
        for (fut, out) in slots.iter_mut() {
            if out.is_none() {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            return Poll::Pending;
        }
        Poll::Ready(slots.iter_mut().filter_map(|(_, out)| out.take()).collect())
    })
    .await
}
