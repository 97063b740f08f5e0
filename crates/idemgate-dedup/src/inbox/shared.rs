//! What both drivers share: the SQL text, the table-name check, and the algorithm that decides
//! the outcome ([`claim`] the row, then, around the driver's call of the handler, [`finish`]:
//! aborted-transaction check, commit or rollback). A driver only says how to run each statement
//! on its transaction ([`InboxTx`]).

use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

use super::InboxOutcome;
use crate::MessageId;

/// SQLSTATE `lock_not_available`: the claim waited on another transaction's row past the
/// inbox's lock timeout.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// Reads the caller's `lock_timeout` and sets the inbox's for the rest of the transaction, in
/// one statement: the function in `FROM` is evaluated before the select list (the list is
/// computed from its row), so `prev` is the value from before `set_config`. `$1`: the inbox's
/// timeout (text, e.g. `5000ms`).
pub(crate) const ENTER: &str = "SELECT prev, set_config('lock_timeout', $1, true) FROM current_setting('lock_timeout') AS prev";

/// The statements of one inbox table (validated name).
#[derive(Clone, Debug)]
pub(crate) struct Sql {
    pub(crate) table: String,
    pub(crate) create: String,
    /// `$1` consumer, `$2` message id, `$3` the caller's lock timeout to restore. Returns one
    /// row when the dedup row is new (and only then restores the timeout: `RETURNING` runs per
    /// inserted row, after any wait on a concurrent insert of the same key); none when the row
    /// was there.
    pub(crate) claim: String,
    /// `$1`: the age in seconds (float8).
    pub(crate) purge: String,
    /// Run after the handler returned `Ok`, `$1` consumer, `$2` message id: whether the dedup
    /// row is still there. In a transaction aborted by a failed statement (that the handler
    /// swallowed) it fails with `25P02` — and `COMMIT` would silently become `ROLLBACK`; after a
    /// `ROLLBACK` (or `ROLLBACK TO SAVEPOINT`) the handler issued itself, the row is gone
    /// (false) — and `COMMIT` would commit nothing. Either way the caller must not ack.
    pub(crate) probe: String,
}

impl Sql {
    /// `None` when `table` is not a plain identifier (`[a-z_][a-z0-9_]*`, at most 63 bytes),
    /// optionally schema-qualified: it is spliced into SQL text.
    pub(crate) fn new(table: &str) -> Option<Self> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().enumerate().all(|(i, b)| {
                    b == b'_' || b.is_ascii_lowercase() || (i > 0 && b.is_ascii_digit())
                })
        };
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| plain(p)) {
            return None;
        }
        // Each part quoted: a valid name that is a reserved word (`user`, `order`) works too
        // (the parts are lower case, so quoting changes nothing else).
        let quoted: Vec<String> = parts.iter().map(|p| format!("\"{p}\"")).collect();
        let table_sql = quoted.join(".");
        let table = table_sql.as_str();
        Some(Self {
            table: parts.join("."),
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} (\
                   consumer text NOT NULL, \
                   message_id text NOT NULL, \
                   processed_at timestamptz NOT NULL DEFAULT now(), \
                   PRIMARY KEY (consumer, message_id))"
            ),
            claim: format!(
                "INSERT INTO {table} (consumer, message_id) VALUES ($1, $2) \
                 ON CONFLICT (consumer, message_id) DO NOTHING \
                 RETURNING set_config('lock_timeout', $3, true)"
            ),
            purge: format!(
                "DELETE FROM {table} WHERE processed_at < now() - make_interval(secs => $1::float8)"
            ),
            probe: format!(
                "SELECT EXISTS (SELECT 1 FROM {table} WHERE consumer = $1 AND message_id = $2)"
            ),
        })
    }
}

/// The inbox's lock timeout as a `lock_timeout` value (at least 1 ms: `0` would mean "wait
/// forever").
pub(crate) fn timeout_setting(timeout: Duration) -> String {
    // At most PostgreSQL's largest value (INT_MAX ms, ~24.8 days): a larger one would make
    // every claim fail.
    format!(
        "{}ms",
        timeout.as_millis().clamp(1, i32::MAX.unsigned_abs().into())
    )
}

/// One driver's transaction, as the algorithm needs it.
pub(crate) trait InboxTx: Sized + Send {
    /// The driver's error.
    type Error;
    /// Runs [`ENTER`] with `timeout`; returns the caller's previous `lock_timeout`.
    fn enter(&mut self, timeout: &str) -> impl Future<Output = Result<String, Self::Error>> + Send;
    /// Runs the claim statement; true when the dedup row is new.
    fn claim(
        &mut self,
        sql: &str,
        consumer: &str,
        message_id: &str,
        restore: &str,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// Runs [`Sql::probe`]; true when the dedup row is still there.
    fn probe(
        &mut self,
        sql: &str,
        consumer: &str,
        message_id: &str,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;
    /// Commits (a savepoint: releases it).
    fn commit(self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Rolls back (a savepoint: rolls back to it).
    fn rollback(self) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// The SQLSTATE of a server error.
    fn sqlstate(error: &Self::Error) -> Option<Cow<'_, str>>;
}

/// What [`claim`] found.
pub(crate) enum Claim<X, T> {
    /// The dedup row is new (and locked by `X` until it ends): run the handler on `X`, then
    /// [`finish`].
    New(X),
    /// The handler must not run: `X` was rolled back; answer this.
    Taken(InboxOutcome<T>),
}

/// Why [`finish`] failed; each driver maps it to its error type.
pub(crate) enum Failure<E, D> {
    Handler(E),
    Driver(D),
    /// The handler ended the transaction itself (a `ROLLBACK`, a rollback to the savepoint):
    /// the dedup row is gone.
    Ended,
}

/// The inbox's first half: set the inbox's lock timeout, insert the dedup row, restore the
/// caller's timeout. Then the driver runs the handler on the returned transaction (the call
/// stays in the driver's own code: a closure wrapping the handler here would tie its type to
/// the transaction's lifetime, and the caller's future would no longer prove `Send`).
///
/// On an error, dropping `tx` rolls it back (tokio-postgres sends the `ROLLBACK` on drop; sqlx
/// queues it for the connection's next use, which a pooled connection makes before it returns
/// to the pool; the server rolls back when the connection goes).
pub(crate) async fn claim<X: InboxTx, T>(
    sql: &Sql,
    timeout: &str,
    mut tx: X,
    consumer: &str,
    message_id: &MessageId,
) -> Result<Claim<X, T>, X::Error> {
    let restore = tx.enter(timeout).await?;
    match tx
        .claim(&sql.claim, consumer, message_id.as_str(), &restore)
        .await
    {
        // The row lock is ours until the end of the transaction, and the caller's lock_timeout
        // is back in force for the handler's statements.
        Ok(true) => Ok(Claim::New(tx)),
        Ok(false) => {
            tx.rollback().await?;
            Ok(Claim::Taken(InboxOutcome::Duplicate))
        }
        Err(e) if X::sqlstate(&e).as_deref() == Some(LOCK_NOT_AVAILABLE) => {
            tx.rollback().await?;
            Ok(Claim::Taken(InboxOutcome::InProgress))
        }
        Err(e) => Err(e),
    }
}

/// The inbox's second half, with the handler's result: commit on `Ok` (unless the transaction
/// was aborted meanwhile), roll back on `Err`. Nothing is committed unless the result is
/// [`InboxOutcome::Processed`].
pub(crate) async fn finish<X: InboxTx, T, E>(
    sql: &Sql,
    mut tx: X,
    consumer: &str,
    message_id: &MessageId,
    handled: Result<T, E>,
) -> Result<InboxOutcome<T>, Failure<E, X::Error>> {
    match handled {
        Ok(value) => {
            // A handler that swallowed a failed statement returns Ok on an aborted transaction,
            // whose COMMIT PostgreSQL answers with ROLLBACK (no error; neither driver reads the
            // tag), and one that rolled back itself leaves nothing to commit: in both cases the
            // caller would ack a message whose effects are gone.
            match tx.probe(&sql.probe, consumer, message_id.as_str()).await {
                Ok(true) => {}
                Ok(false) => {
                    let _ = tx.rollback().await;
                    return Err(Failure::Ended);
                }
                Err(e) => {
                    let _ = tx.rollback().await;
                    return Err(Failure::Driver(e));
                }
            }
            tx.commit().await.map_err(Failure::Driver)?;
            Ok(InboxOutcome::Processed(value))
        }
        Err(e) => {
            // A failed rollback leaves nothing committed either (the server rolls back when the
            // connection goes).
            let _ = tx.rollback().await;
            Err(Failure::Handler(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_must_be_plain_identifiers() {
        assert!(Sql::new("inbox").is_some());
        assert!(Sql::new("app.inbox_2").is_some());
        assert!(Sql::new(&"a".repeat(63)).is_some());
        for bad in [
            "",
            "Inbox",
            "in box",
            "x;drop table y",
            "a.b.c",
            "1abc",
            "a-b",
            ".inbox",
            "app.",
            &"a".repeat(64),
        ] {
            assert!(Sql::new(bad).is_none(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_timeout_is_never_zero() {
        assert_eq!(timeout_setting(Duration::from_secs(5)), "5000ms");
        assert_eq!(timeout_setting(Duration::ZERO), "1ms");
        assert_eq!(timeout_setting(Duration::from_micros(1500)), "1ms");
    }
}
