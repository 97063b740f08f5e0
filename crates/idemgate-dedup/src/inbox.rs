//! The PostgreSQL inbox: the dedup row and the handler's own writes commit in ONE transaction of
//! the application's database (feature `postgres`, on tokio-postgres).
//!
//! ```no_run
//! # async fn demo(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
//! use idemgate_dedup::MessageId;
//! use idemgate_dedup::inbox::{InboxOutcome, PgInbox};
//!
//! let inbox = PgInbox::new("inbox")?;
//! inbox.migrate(&*client).await?;
//! let id = MessageId::new("order-42").ok_or("no id")?;
//! let outcome = inbox
//!     .process_once(client, "billing", &id, async |tx| {
//!         tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 7", &[])
//!             .await?;
//!         Ok::<_, tokio_postgres::Error>(())
//!     })
//!     .await?;
//! match outcome {
//!     InboxOutcome::Processed(()) => {}   // committed with its dedup row: ack
//!     InboxOutcome::Duplicate => {}       // committed before: ack, nothing ran
//!     InboxOutcome::InProgress => {}      // another consumer's transaction holds it: nack
//! }
//! # Ok(()) }
//! ```
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
//! lock for at most the inbox's `lock_timeout` (default 5 s), then gets
//! [`InboxOutcome::InProgress`] (nack it with a delay); if the first transaction rolls back
//! meanwhile, the second one runs.
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
//! [`PgInbox::purge_older_than`] deletes them; a redelivery after its row was purged runs again.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, GenericClient, Transaction};

use crate::MessageId;

/// What [`PgInbox::process_once`] did.
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

/// Why [`PgInbox::process_once`] failed; in every case nothing was committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError<E> {
    /// The handler failed: its writes and the dedup row were rolled back.
    #[error("the handler failed; its writes were rolled back")]
    Handler(#[source] E),
    /// PostgreSQL failed (connection lost, serialization failure, …): rolled back, or never
    /// committed. Nack and let the redelivery run it.
    #[error("inbox: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// The table name is not a plain SQL identifier.
    #[error(
        "inbox table name {0:?} is not a plain identifier ([a-z_][a-z0-9_]*, at most 63 bytes)"
    )]
    BadTableName(String),
}

/// A PostgreSQL inbox table. See the module docs.
#[derive(Clone, Debug)]
pub struct PgInbox {
    table: String,
    insert: String,
    create: String,
    purge: String,
    lock_timeout: Duration,
}

impl PgInbox {
    /// An inbox in table `table` (a plain identifier, optionally `schema.table`).
    pub fn new(table: &str) -> Result<Self, InboxError<std::convert::Infallible>> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().enumerate().all(|(i, b)| {
                    b == b'_' || b.is_ascii_lowercase() || (i > 0 && b.is_ascii_digit())
                })
        };
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| plain(p)) {
            return Err(InboxError::BadTableName(table.to_owned()));
        }
        Ok(Self {
            table: table.to_owned(),
            insert: format!(
                "INSERT INTO {table} (consumer, message_id) VALUES ($1, $2) \
                 ON CONFLICT (consumer, message_id) DO NOTHING"
            ),
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                   consumer text NOT NULL, \
                   message_id text NOT NULL, \
                   processed_at timestamptz NOT NULL DEFAULT now(), \
                   PRIMARY KEY (consumer, message_id))"
            ),
            purge: format!(
                "DELETE FROM {table} WHERE processed_at < now() - make_interval(secs => $1::float8)"
            ),
            lock_timeout: Duration::from_secs(5),
        })
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// How long a delivery waits for a concurrent delivery's open transaction on the same
    /// message before answering [`InboxOutcome::InProgress`] (default 5 s; at least 1 ms).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Creates the table if it does not exist.
    pub async fn migrate(&self, client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
        client.batch_execute(&self.create).await
    }

    /// Deletes rows older than `age`; returns how many. Redeliveries later than `age` then run
    /// again: keep `age` above the broker's redelivery horizon.
    pub async fn purge_older_than(
        &self,
        client: &impl GenericClient,
        age: Duration,
    ) -> Result<u64, tokio_postgres::Error> {
        client.execute(&self.purge, &[&age.as_secs_f64()]).await
    }

    /// Runs `handler` on the transaction that inserts the dedup row of `(consumer,
    /// message_id)`, and commits both — or, when the row exists, runs nothing. See the module
    /// docs.
    pub async fn process_once<T, E, F>(
        &self,
        client: &mut Client,
        consumer: &str,
        message_id: &MessageId,
        handler: F,
    ) -> Result<InboxOutcome<T>, InboxError<E>>
    where
        F: AsyncFnOnce(&Transaction<'_>) -> Result<T, E>,
    {
        let tx = client.transaction().await?;
        self.process_in(tx, consumer, message_id, handler).await
    }

    /// [`process_once`](Self::process_once) on a transaction the caller opened (isolation level,
    /// savepoints): it is committed here when the handler succeeds, rolled back otherwise.
    pub async fn process_in<T, E, F>(
        &self,
        tx: Transaction<'_>,
        consumer: &str,
        message_id: &MessageId,
        handler: F,
    ) -> Result<InboxOutcome<T>, InboxError<E>>
    where
        F: AsyncFnOnce(&Transaction<'_>) -> Result<T, E>,
    {
        // SET LOCAL takes no parameters; the value is a number formatted here.
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'",
            self.lock_timeout.as_millis()
        ))
        .await?;
        let inserted = match tx
            .execute(&self.insert, &[&consumer, &message_id.as_str()])
            .await
        {
            Ok(n) => n,
            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                tx.rollback().await?;
                return Ok(InboxOutcome::InProgress);
            }
            Err(e) => return Err(e.into()),
        };
        if inserted == 0 {
            tx.rollback().await?;
            return Ok(InboxOutcome::Duplicate);
        }
        // After the insert the lock on the row is ours until the end of the transaction; the
        // timeout no longer matters for the handler's own statements.
        tx.batch_execute("SET LOCAL lock_timeout = 0").await?;
        match handler(&tx).await {
            Ok(value) => {
                // A handler that swallowed a failed statement returns Ok on an aborted
                // transaction, whose COMMIT PostgreSQL answers with ROLLBACK (no error, and
                // tokio-postgres does not read the tag): nothing would be committed and the
                // caller would ack. A statement first fails in an aborted transaction (25P02).
                if let Err(e) = tx.batch_execute("SELECT 1").await {
                    let _ = tx.rollback().await;
                    return Err(e.into());
                }
                tx.commit().await?;
                Ok(InboxOutcome::Processed(value))
            }
            Err(e) => {
                // A failed rollback leaves nothing committed either (the server rolls back when
                // the connection goes).
                let _ = tx.rollback().await;
                Err(InboxError::Handler(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_must_be_plain_identifiers() {
        assert!(PgInbox::new("inbox").is_ok());
        assert!(PgInbox::new("app.inbox_2").is_ok());
        for bad in [
            "",
            "Inbox",
            "in box",
            "x;drop table y",
            "a.b.c",
            "1abc",
            "a-b",
        ] {
            assert!(
                matches!(PgInbox::new(bad), Err(InboxError::BadTableName(_))),
                "{bad:?} accepted"
            );
        }
    }
}
