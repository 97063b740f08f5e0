//! [`SqlxInbox`]: the inbox on sqlx (feature `sqlx`).

use std::borrow::Cow;
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgExecutor, Postgres};
use sqlx::{Acquire, Transaction};

use super::InboxOutcome;
use super::shared::{self, Claim, ENTER, Failure, InboxTx, Sql};
use crate::MessageId;

/// Why [`SqlxInbox::process_once`] failed: nothing was committed — except, for `Sqlx`, when the
/// answer to `COMMIT` itself was lost (then it may have been: nack anyway; the redelivery finds
/// the row and is a duplicate).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqlxInboxError<E> {
    /// The handler failed: its writes and the dedup row were rolled back.
    #[error("the handler failed; its writes were rolled back")]
    Handler(#[source] E),
    /// PostgreSQL or the connection failed (connection lost, serialization failure, pool
    /// timeout, …): rolled back, or never committed. Nack and let the redelivery run it.
    #[error("inbox: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// The handler ended the inbox's transaction itself (`ROLLBACK`, or a rollback to the
    /// savepoint): the dedup row and whatever the handler wrote before are gone, and nothing
    /// was committed by the inbox. Nack; the redelivery runs the handler again. (A handler must
    /// not end the transaction it is given.)
    #[error("the handler ended the inbox's transaction itself; nothing was committed")]
    TransactionEnded,
    /// The table name is not a plain SQL identifier.
    #[error(
        "inbox table name {0:?} is not a plain identifier ([a-z_][a-z0-9_]*, at most 63 bytes)"
    )]
    BadTableName(String),
}

/// A PostgreSQL inbox table, used through sqlx: the same table, statements and outcomes as
/// [`PgInbox`](super::PgInbox) (the two can share one table). See the [module docs](super).
///
/// ```no_run
/// # async fn demo(pool: &sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use idemgate_dedup::MessageId;
/// use idemgate_dedup::inbox::{InboxOutcome, SqlxInbox};
///
/// let inbox = SqlxInbox::new("inbox")?;
/// inbox.migrate(pool).await?;
/// let id = MessageId::new("order-42").ok_or("no id")?;
/// // A pool, or the application's own connection (`&mut PgConnection`), or its transaction.
/// let outcome = inbox
///     .process_once(pool, "billing", &id, async |conn| {
///         sqlx::query("UPDATE accounts SET balance = balance - $1 WHERE id = $2")
///             .bind(10_i64)
///             .bind(7_i64)
///             .execute(&mut *conn)
///             .await?;
///         Ok::<_, sqlx::Error>(())
///     })
///     .await?;
/// match outcome {
///     InboxOutcome::Processed(()) => {}   // committed with its dedup row: ack
///     InboxOutcome::Duplicate => {}       // committed before: ack, nothing ran
///     InboxOutcome::InProgress => {}      // another consumer's transaction holds it: nack
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SqlxInbox {
    sql: Sql,
    lock_timeout: Duration,
}

impl SqlxInbox {
    /// An inbox in table `table` (a plain identifier, optionally `schema.table`).
    pub fn new(table: &str) -> Result<Self, SqlxInboxError<std::convert::Infallible>> {
        let sql = Sql::new(table).ok_or_else(|| SqlxInboxError::BadTableName(table.to_owned()))?;
        Ok(Self {
            sql,
            lock_timeout: Duration::from_secs(5),
        })
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.sql.table
    }

    /// How long a delivery waits for a concurrent delivery's open transaction on the same
    /// message before answering [`InboxOutcome::InProgress`] (default 5 s; at least 1 ms). It
    /// governs the inbox's own insert only: the transaction's `lock_timeout` is restored for the
    /// handler.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Creates the table if it does not exist (on a pool, a connection or `&mut *transaction`).
    pub async fn migrate<'c>(&self, executor: impl PgExecutor<'c>) -> Result<(), sqlx::Error> {
        sqlx::query(&self.sql.create)
            .persistent(false)
            .execute(executor)
            .await?;
        Ok(())
    }

    /// Deletes rows older than `age`; returns how many. Redeliveries later than `age` then run
    /// again: keep `age` above the broker's redelivery horizon.
    pub async fn purge_older_than<'c>(
        &self,
        executor: impl PgExecutor<'c>,
        age: Duration,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(&self.sql.purge)
            .bind(age.as_secs_f64())
            .execute(executor)
            .await?;
        Ok(done.rows_affected())
    }

    /// Opens a transaction on `conn` (`&PgPool`, `&mut PgConnection`, `&mut PoolConnection`,
    /// or `&mut Transaction` for a savepoint), inserts the dedup row of `(consumer,
    /// message_id)`, runs `handler` on that same transaction and commits both — or, when the
    /// row exists, runs nothing. The handler gets the transaction's connection: run its
    /// queries with `.execute(&mut *conn)`. See the [module docs](super).
    ///
    /// **Given a `&mut Transaction`**, the inbox works in a savepoint of it, and
    /// [`InboxOutcome::Processed`] only means the savepoint was released into that outer
    /// transaction: nothing is durable until the caller commits it — ack only after that
    /// commit.
    ///
    /// **Cancellation.** A call dropped mid-way (a timeout around it) rolls back: on a pooled
    /// connection before it returns to the pool; on a bare `&mut PgConnection` only when that
    /// connection is next used (sqlx queues the `ROLLBACK`), and until then the dedup row stays
    /// locked (other deliveries of the message answer [`InboxOutcome::InProgress`]). Prefer a
    /// pool, or use the connection again at once.
    pub async fn process_once<'c, A, T, E, F>(
        &self,
        conn: A,
        consumer: &str,
        message_id: &MessageId,
        handler: F,
    ) -> Result<InboxOutcome<T>, SqlxInboxError<E>>
    where
        A: Acquire<'c, Database = Postgres>,
        F: AsyncFnOnce(&mut PgConnection) -> Result<T, E>,
    {
        let tx = conn.begin().await?;
        self.process_in(tx, consumer, message_id, handler).await
    }

    /// [`process_once`](Self::process_once) on a transaction the caller opened (its own
    /// statements first, an isolation level): it is committed here when the handler succeeds,
    /// rolled back otherwise. On a nested transaction (a savepoint), "committed" means released
    /// into the enclosing transaction, which the caller commits: only then is the message
    /// processed.
    pub async fn process_in<T, E, F>(
        &self,
        tx: Transaction<'_, Postgres>,
        consumer: &str,
        message_id: &MessageId,
        handler: F,
    ) -> Result<InboxOutcome<T>, SqlxInboxError<E>>
    where
        F: AsyncFnOnce(&mut PgConnection) -> Result<T, E>,
    {
        let timeout = shared::timeout_setting(self.lock_timeout);
        let mut tx = match shared::claim(&self.sql, &timeout, tx, consumer, message_id).await? {
            Claim::New(tx) => tx,
            Claim::Taken(outcome) => return Ok(outcome),
        };
        let handled = handler(&mut *tx).await;
        shared::finish(&self.sql, tx, consumer, message_id, handled)
            .await
            .map_err(|e| match e {
                Failure::Handler(e) => SqlxInboxError::Handler(e),
                Failure::Driver(e) => SqlxInboxError::Sqlx(e),
                Failure::Ended => SqlxInboxError::TransactionEnded,
            })
    }
}

impl InboxTx for Transaction<'_, Postgres> {
    type Error = sqlx::Error;

    async fn enter(&mut self, timeout: &str) -> Result<String, Self::Error> {
        sqlx::query_scalar(ENTER)
            .bind(timeout)
            .fetch_one(&mut **self)
            .await
    }

    async fn claim(
        &mut self,
        sql: &str,
        consumer: &str,
        message_id: &str,
        restore: &str,
    ) -> Result<bool, Self::Error> {
        let row = sqlx::query(sql)
            .bind(consumer)
            .bind(message_id)
            .bind(restore)
            .fetch_optional(&mut **self)
            .await?;
        Ok(row.is_some())
    }

    async fn probe(
        &mut self,
        sql: &str,
        consumer: &str,
        message_id: &str,
    ) -> Result<bool, Self::Error> {
        sqlx::query_scalar(sql)
            .bind(consumer)
            .bind(message_id)
            .fetch_one(&mut **self)
            .await
    }

    async fn commit(self) -> Result<(), Self::Error> {
        Transaction::commit(self).await
    }

    async fn rollback(self) -> Result<(), Self::Error> {
        Transaction::rollback(self).await
    }

    fn sqlstate(error: &Self::Error) -> Option<Cow<'_, str>> {
        error.as_database_error().and_then(|e| e.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_must_be_plain_identifiers() {
        assert!(SqlxInbox::new("app.inbox_2").is_ok());
        assert!(matches!(
            SqlxInbox::new("x;drop table y"),
            Err(SqlxInboxError::BadTableName(name)) if name == "x;drop table y"
        ));
    }
}
