//! Group commit for embedded stores: one writer thread applies queued operations in batches and
//! makes each batch durable with ONE sync before answering any of its callers.
//!
//! The embedded stores (redb, fjall) share this loop; each provides a [`Committer`] that applies
//! a batch to its engine. The writer takes the first queued operation, then whatever else is
//! already queued (up to `max_batch`): what queued while the previous batch was syncing. With a
//! `gather_window` (none by default) and a previous batch that had company, it keeps gathering,
//! yielding its thread, for that long, so that the callers it just answered can join the next
//! sync; a lone caller never waits. The window is off by default: in the proxy on two shared
//! cores the spinning writer took CPU the request path needed (first executions on fjall +20% at
//! 64 connections and +25% at 16 without it; redb +5% and +20%; `docs/performance.md`).
//!
//! **Bounds.** At most `queue_capacity` operations wait for the writer; beyond it
//! [`GroupWriter::submit`] waits (back-pressure) instead of growing memory. Dropping the
//! [`GroupWriter`] closes the queue, lets the writer apply what is still queued and joins the
//! thread, so the engine (and its file lock) is released when the drop returns; the drop blocks
//! its thread meanwhile (at most one batch per queued group of operations).
//!
//! ```
//! use idemgate_core::group_commit::{Committer, GroupCommitConfig, GroupWriter};
//! use idemgate_core::{StoreError, StoreKey};
//!
//! /// Counts operations per key; "durable" once the batch is applied.
//! struct Counter(std::collections::HashMap<StoreKey, u64>);
//! impl Committer for Counter {
//!     type Op = u64;
//!     type Reply = u64;
//!     fn commit(&mut self, batch: &[(StoreKey, u64)]) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
//!         Ok(batch.iter().map(|(k, n)| { let c = self.0.entry(*k).or_default(); *c += n; Ok(*c) }).collect())
//!     }
//! }
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let writer = GroupWriter::spawn(Counter(Default::default()), GroupCommitConfig::default())?;
//! assert_eq!(writer.submit(StoreKey([1; 32]), 2).await?, 2);
//! assert_eq!(writer.submit(StoreKey([1; 32]), 3).await?, 5);
//! # Ok::<(), StoreError>(())
//! # }).unwrap();
//! ```

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::error::{ErrorKind, StoreError};
use crate::key::StoreKey;
use crate::protocol::Answer;

/// Applies batches of operations to an engine, durably.
pub trait Committer: Send + 'static {
    /// One queued operation.
    type Op: Send + 'static;
    /// Its answer.
    type Reply: Send + 'static;

    /// Applies every operation of `batch` in order (each atomically) and makes them durable
    /// together; returns one result per operation, in order. Callers are answered only after
    /// this returns. An `Err` means nothing of the batch may be assumed durable: every caller of
    /// the batch gets that error.
    #[allow(clippy::type_complexity)]
    fn commit(
        &mut self,
        batch: &[(StoreKey, Self::Op)],
    ) -> Result<Vec<Result<Self::Reply, StoreError>>, StoreError>;
}

/// What an embedded store's writer answers: a mutation's [`Answer`], or a count (records purged,
/// bytes overwritten by a test hook).
#[derive(Debug)]
// Sent once per operation over a oneshot; boxing the answer would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum WriterReply {
    /// For a [`Mutation`](crate::protocol::Mutation).
    Answer(Answer),
    /// For a purge (or another counting operation).
    Count(usize),
}

fn wrong_reply() -> StoreError {
    StoreError::new(
        ErrorKind::Internal,
        "the store's writer answered with the wrong reply type",
    )
}

impl WriterReply {
    /// The answer, or an internal error if this is a count.
    pub fn answer(self) -> Result<Answer, StoreError> {
        match self {
            WriterReply::Answer(a) => Ok(a),
            WriterReply::Count(_) => Err(wrong_reply()),
        }
    }

    /// The count, or an internal error if this is an answer.
    pub fn count(self) -> Result<usize, StoreError> {
        match self {
            WriterReply::Count(n) => Ok(n),
            WriterReply::Answer(_) => Err(wrong_reply()),
        }
    }
}

/// Sizes and timing of a [`GroupWriter`].
#[derive(Clone, Debug)]
pub struct GroupCommitConfig {
    /// Most operations committed together (default 256; taken between 1 and [`MAX_BATCH_LIMIT`]).
    pub max_batch: usize,
    /// Most operations queued for the writer (default 8,192; taken between 1 and
    /// [`MAX_QUEUE_LIMIT`]); beyond it callers wait.
    pub queue_capacity: usize,
    /// How long the writer keeps gathering once callers are concurrent (default zero: off).
    pub gather_window: Duration,
    /// The writer thread's name (default `idemgate-writer`).
    pub thread_name: String,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        Self {
            max_batch: 256,
            queue_capacity: 8_192,
            gather_window: Duration::ZERO,
            thread_name: "idemgate-writer".into(),
        }
    }
}

/// The largest `max_batch` honoured (a larger one is lowered to it).
pub const MAX_BATCH_LIMIT: usize = 65_536;
/// The largest `queue_capacity` honoured (a larger one is lowered to it).
pub const MAX_QUEUE_LIMIT: usize = 1 << 20;

type ReplyTx<R> = oneshot::Sender<Result<R, StoreError>>;

struct Job<O, R> {
    key: StoreKey,
    op: O,
    reply: ReplyTx<R>,
}

/// The queue to one writer thread running a [`Committer`].
pub struct GroupWriter<C: Committer> {
    tx: Option<mpsc::Sender<Job<C::Op, C::Reply>>>,
    thread: Option<JoinHandle<()>>,
}

impl<C: Committer> std::fmt::Debug for GroupWriter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupWriter")
            .field("running", &self.tx.is_some())
            .finish_non_exhaustive()
    }
}

impl<C: Committer> GroupWriter<C> {
    /// Starts the writer thread, which owns `committer` until the writer is dropped.
    pub fn spawn(committer: C, config: GroupCommitConfig) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::channel(config.queue_capacity.clamp(1, MAX_QUEUE_LIMIT));
        let thread = std::thread::Builder::new()
            .name(config.thread_name.clone())
            .spawn(move || run(committer, rx, &config))
            .map_err(|e| {
                StoreError::new(ErrorKind::Internal, "could not start the writer thread")
                    .with_source(e)
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues `op` for `key` and waits for its answer, which comes only once its batch is
    /// durable. A stopped writer is [`ErrorKind::Unavailable`].
    pub async fn submit(&self, key: StoreKey, op: C::Op) -> Result<C::Reply, StoreError> {
        let stopped = || StoreError::new(ErrorKind::Unavailable, "the store's writer has stopped");
        let tx = self.tx.as_ref().ok_or_else(stopped)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Job { key, op, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

impl<C: Committer> Drop for GroupWriter<C> {
    fn drop(&mut self) {
        // Closing the queue stops the writer after its current batch; joining it drops the
        // committer (and releases its engine) before this returns.
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run<C: Committer>(
    mut committer: C,
    mut rx: mpsc::Receiver<Job<C::Op, C::Reply>>,
    config: &GroupCommitConfig,
) {
    let max_batch = config.max_batch.clamp(1, MAX_BATCH_LIMIT);
    let mut ops = Vec::with_capacity(max_batch);
    let mut replies: Vec<ReplyTx<C::Reply>> = Vec::with_capacity(max_batch);
    let mut last_len = 0;
    let mut last_error: Option<String> = None;
    while let Some(first) = rx.blocking_recv() {
        ops.push((first.key, first.op));
        replies.push(first.reply);
        // Under concurrency (the last batch had company), give the callers just answered a
        // moment to send their next operation, so that one sync covers them all.
        let gather_until = (last_len > 1 && !config.gather_window.is_zero())
            .then(|| Instant::now() + config.gather_window);
        while ops.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => {
                    ops.push((job.key, job.op));
                    replies.push(job.reply);
                }
                Err(_) => match gather_until {
                    Some(t) if Instant::now() < t => std::thread::yield_now(),
                    _ => break,
                },
            }
        }
        last_len = ops.len();
        match committer.commit(&ops) {
            Ok(results) if results.len() == replies.len() => {
                for (reply, result) in replies.drain(..).zip(results) {
                    let _ = reply.send(result);
                }
            }
            outcome => {
                let e = match outcome {
                    Err(e) => e,
                    Ok(_) => StoreError::new(
                        ErrorKind::Internal,
                        "the store's writer answered the wrong number of operations",
                    ),
                };
                // Once per distinct error: a store that refuses every batch after a failure would
                // otherwise log at request rate.
                if last_error.as_deref() != Some(e.message()) {
                    tracing::error!(error = %e, "a store batch failed; every operation in it is refused");
                    last_error = Some(e.message().to_owned());
                } else {
                    tracing::debug!(error = %e, "a store batch failed; every operation in it is refused");
                }
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(StoreError::new(e.kind(), e.message().to_owned())));
                }
            }
        }
        ops.clear();
    }
}
