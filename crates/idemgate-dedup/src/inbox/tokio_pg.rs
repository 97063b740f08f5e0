//! [`PgInbox`]: the inbox on tokio-postgres (feature `postgres`).

use std::borrow::Cow;
use std::time::Duration;

use tokio_postgres::types::Type;
use tokio_postgres::{Client, GenericClient, Transaction};

use super::InboxOutcome;
use super::shared::{self, Claim, ENTER, Failure, InboxTx, Sql};
use crate::MessageId;

/// Why [`PgInbox::process_once`] failed: nothing was committed — except, for `Postgres`, when
/// the answer to `COMMIT` itself was lost (then it may have been: nack anyway; the redelivery
/// finds the row and is a duplicate).
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

/// A PostgreSQL inbox table, used through tokio-postgres. See the [module docs](super).
///
/// ```no_run
/// # async fn demo(client: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use idemgate_dedup::MessageId;
/// use idemgate_dedup::inbox::{InboxOutcome, PgInbox};
///
/// let inbox = PgInbox::new("inbox")?;
/// inbox.migrate(&*client).await?;
/// let id = MessageId::new("order-42").ok_or("no id")?;
/// let outcome = inbox
///     .process_once(client, "billing", &id, async |tx| {
///         tx.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 7", &[])
///             .await?;
///         Ok::<_, tokio_postgres::Error>(())
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
pub struct PgInbox {
    sql: Sql,
    lock_timeout: Duration,
}

impl PgInbox {
    /// An inbox in table `table` (a plain identifier, optionally `schema.table`).
    pub fn new(table: &str) -> Result<Self, InboxError<std::convert::Infallible>> {
        let sql = Sql::new(table).ok_or_else(|| InboxError::BadTableName(table.to_owned()))?;
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

    /// Creates the table if it does not exist.
    pub async fn migrate(&self, client: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
        client.batch_execute(&self.sql.create).await
    }

    /// Deletes rows older than `age`; returns how many. Redeliveries later than `age` then run
    /// again: keep `age` above the broker's redelivery horizon.
    pub async fn purge_older_than(
        &self,
        client: &impl GenericClient,
        age: Duration,
    ) -> Result<u64, tokio_postgres::Error> {
        client.execute(&self.sql.purge, &[&age.as_secs_f64()]).await
    }

    /// Runs `handler` on the transaction that inserts the dedup row of `(consumer,
    /// message_id)`, and commits both — or, when the row exists, runs nothing. See the
    /// [module docs](super).
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
    /// its own statements first, or a savepoint): it is committed here when the handler
    /// succeeds, rolled back otherwise. On a savepoint ([`Transaction::transaction`]),
    /// "committed" means released into the enclosing transaction, which the caller commits:
    /// only then is the message processed.
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
        let timeout = shared::timeout_setting(self.lock_timeout);
        let tx = match shared::claim(&self.sql, &timeout, tx, consumer, message_id).await? {
            Claim::New(tx) => tx,
            Claim::Taken(outcome) => return Ok(outcome),
        };
        let handled = handler(&tx).await;
        shared::finish(&self.sql, tx, consumer, message_id, handled)
            .await
            .map_err(|e| match e {
                Failure::Handler(e) => InboxError::Handler(e),
                Failure::Driver(e) => InboxError::Postgres(e),
                Failure::Ended => InboxError::TransactionEnded,
            })
    }
}

impl InboxTx for Transaction<'_> {
    type Error = tokio_postgres::Error;

    // The typed queries are one round trip each (no separate prepare).
    async fn enter(&mut self, timeout: &str) -> Result<String, Self::Error> {
        self.query_typed_one(ENTER, &[(&timeout, Type::TEXT)])
            .await?
            .try_get(0)
    }

    async fn claim(
        &mut self,
        sql: &str,
        consumer: &str,
        message_id: &str,
        restore: &str,
    ) -> Result<bool, Self::Error> {
        let row = self
            .query_typed_opt(
                sql,
                &[
                    (&consumer, Type::TEXT),
                    (&message_id, Type::TEXT),
                    (&restore, Type::TEXT),
                ],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn probe(
        &mut self,
        sql: &str,
        consumer: &str,
        message_id: &str,
    ) -> Result<bool, Self::Error> {
        self.query_typed_one(sql, &[(&consumer, Type::TEXT), (&message_id, Type::TEXT)])
            .await?
            .try_get(0)
    }

    async fn commit(self) -> Result<(), Self::Error> {
        Transaction::commit(self).await
    }

    async fn rollback(self) -> Result<(), Self::Error> {
        Transaction::rollback(self).await
    }

    fn sqlstate(error: &Self::Error) -> Option<Cow<'_, str>> {
        error.code().map(|c| Cow::Borrowed(c.code()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_must_be_plain_identifiers() {
        assert!(PgInbox::new("app.inbox_2").is_ok());
        assert!(matches!(
            PgInbox::new("x;drop table y"),
            Err(InboxError::BadTableName(name)) if name == "x;drop table y"
        ));
    }
}
