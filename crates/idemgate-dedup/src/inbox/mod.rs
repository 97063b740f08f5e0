//! The PostgreSQL inbox: the dedup row and the handler's own writes commit in ONE transaction of
//! the application's database — on tokio-postgres ([`PgInbox`], feature `postgres`) or on sqlx
//! ([`SqlxInbox`], feature `sqlx`). Both run the same statements and the same decisions (one
//! shared implementation) and answer the same [`InboxOutcome`]; each struct's docs show an
//! example.
//!
//! # How it works, and what it guarantees
//!
//! `process_once` opens a transaction, inserts `(consumer, message_id)` into the inbox table
//! (`ON CONFLICT DO NOTHING`), and only when the row is new runs the handler on the same
//! transaction, then commits. The row and the handler's writes are one atomic unit: a crash, a
//! killed process, a dropped connection or a handler error at any point before `COMMIT` rolls
//! both back (the redelivery runs the handler again, on a clean slate); after `COMMIT` both are
//! there (the redelivery finds the row: [`InboxOutcome::Duplicate`]). Effects on this database
//! are **exactly once** per `(consumer, message id)` for as long as the row is kept — with no
//! lease, no epoch and no window in which a takeover can run a second copy.
//!
//! A second delivery that arrives while the first one's transaction is open waits on the row
//! lock for at most the inbox's lock timeout (default 5 s), then gets
//! [`InboxOutcome::InProgress`] (nack it with a delay); if the first transaction rolls back
//! meanwhile, the second one runs. The inbox's timeout applies to its own insert only: the
//! transaction's previous `lock_timeout` (the session's, or the caller's `SET LOCAL`) is
//! restored before the handler runs.
//!
//! A handler that returns `Ok` after one of its statements failed (the transaction is then
//! aborted, and PostgreSQL would answer `COMMIT` with a silent `ROLLBACK`) gets an error, never
//! [`InboxOutcome::Processed`]: nothing was committed, and the message must not be acked.
//!
//! Compare the store-based [`Deduplicator`](crate::Deduplicator): there the record lives in
//! another system than the effects, so a consumer that dies after its effect but before the
//! record is written leaves a lease that expires, and the redelivery runs the handler again at
//! the next epoch — **at most once per epoch**, with the epoch handed to the handler so that an
//! idempotent or fencing downstream can make it exactly once. Use the inbox whenever the
//! handler's effects are writes to the same PostgreSQL database.
//!
//! Effects outside the database (an e-mail, an HTTP call) are not covered by the transaction:
//! they may happen again after a crash before `COMMIT`. Rows are kept until
//! `purge_older_than` deletes them; a redelivery after its row was purged runs again.
//!
//! # Which outcome, which ack
//!
//! | result | meaning | tell the broker |
//! | --- | --- | --- |
//! | [`InboxOutcome::Processed`] | the handler ran; its writes and the dedup row committed | ack |
//! | [`InboxOutcome::Duplicate`] | committed before; nothing ran | ack |
//! | [`InboxOutcome::InProgress`] | another transaction holds the message | nack with a delay |
//! | an error | nothing committed (handler error, PostgreSQL, aborted transaction) | nack |

mod shared;
#[cfg(feature = "sqlx")]
mod sqlx_pg;
#[cfg(feature = "postgres")]
mod tokio_pg;

#[cfg(feature = "sqlx")]
pub use sqlx_pg::{SqlxInbox, SqlxInboxError};
#[cfg(feature = "postgres")]
pub use tokio_pg::{InboxError, PgInbox};

/// What `process_once` did ([`PgInbox`] and [`SqlxInbox`] alike).
#[derive(Debug, PartialEq, Eq)]
pub enum InboxOutcome<T> {
    /// The handler ran, and its writes committed together with the dedup row: ack.
    Processed(T),
    /// The dedup row was already committed: the handler did not run. Ack.
    Duplicate,
    /// Another transaction holds the dedup row (a concurrent delivery running the handler)
    /// past the lock timeout: nothing ran here. Nack with a delay.
    InProgress,
}
