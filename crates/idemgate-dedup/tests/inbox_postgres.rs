//! The PostgreSQL inbox against a real server (`IDEMGATE_TEST_POSTGRES_URL`): the dedup row and
//! the handler's writes commit together or not at all, whatever point the connection dies at;
//! concurrent consumers give effects == distinct messages. Ignored without the variable (CI
//! fails instead).

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idemgate_dedup::MessageId;
use idemgate_dedup::inbox::{InboxError, InboxOutcome, PgInbox};
use tokio::sync::oneshot;
use tokio_postgres::{Client, NoTls};

async fn connect() -> Client {
    let url = std::env::var("IDEMGATE_TEST_POSTGRES_URL").expect("IDEMGATE_TEST_POSTGRES_URL");
    let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A fresh inbox table and effects table for one test.
async fn tables(label: &str) -> (PgInbox, String) {
    static N: AtomicU64 = AtomicU64::new(0);
    let suffix = format!(
        "{label}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let inbox = PgInbox::new(&format!("inbox_{suffix}")).unwrap();
    let effects = format!("effects_{suffix}");
    let client = connect().await;
    inbox.migrate(&client).await.unwrap();
    client
        .batch_execute(&format!(
            "CREATE TABLE {effects} (message_id text NOT NULL, applied_at timestamptz DEFAULT now())"
        ))
        .await
        .unwrap();
    (inbox, effects)
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// The two counts for `id`: inbox rows and effect rows.
async fn rows(client: &Client, inbox: &str, effects: &str, id: &str) -> (i64, i64) {
    let i: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {inbox} WHERE message_id = $1"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    let e: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {effects} WHERE message_id = $1"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    (i, e)
}

#[derive(Clone, Copy, Debug)]
enum CrashPoint {
    /// After the dedup row was inserted, before the handler wrote anything.
    BeforeEffect,
    /// After the handler's write, before COMMIT.
    AfterEffect,
}

async fn crash_at(point: CrashPoint) {
    let (inbox, effects) = tables("crash").await;
    let table = inbox.table().to_owned();
    let observer = connect().await;
    let mut victim = connect().await;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let id = MessageId::new("m-1").unwrap();
    let (reached_tx, reached_rx) = oneshot::channel();
    let run = {
        let (inbox, effects, id) = (inbox.clone(), effects.clone(), id.clone());
        tokio::spawn(async move {
            inbox
                .process_once(&mut victim, "c", &id, async |tx| {
                    if let CrashPoint::AfterEffect = point {
                        tx.execute(
                            &format!("INSERT INTO {effects} (message_id) VALUES ($1)"),
                            &[&"m-1"],
                        )
                        .await?;
                    }
                    let _ = reached_tx.send(());
                    std::future::pending::<Result<(), tokio_postgres::Error>>().await
                })
                .await
        })
    };
    reached_rx.await.unwrap();
    // The uncommitted rows exist for the victim's transaction only.
    assert_eq!(rows(&observer, &table, &effects, "m-1").await, (0, 0));
    // The crash: the server ends the victim's backend mid-transaction.
    let killed: bool = observer
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    // Neither the dedup row nor the effect.
    assert_eq!(
        rows(&observer, &table, &effects, "m-1").await,
        (0, 0),
        "{point:?}"
    );
    run.abort();
    // The redelivery runs the handler on a clean slate: both, once.
    let mut fresh = connect().await;
    let out = inbox
        .process_once(&mut fresh, "c", &id, async |tx| {
            tx.execute(
                &format!("INSERT INTO {effects} (message_id) VALUES ($1)"),
                &[&"m-1"],
            )
            .await
            .map(|_| ())
        })
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Processed(()));
    assert_eq!(rows(&observer, &table, &effects, "m-1").await, (1, 1));
    // A crash after COMMIT: both stay, and the next redelivery is a duplicate.
    let fresh_pid: i32 = fresh
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    observer
        .query_one("SELECT pg_terminate_backend($1)", &[&fresh_pid])
        .await
        .unwrap();
    let mut again = connect().await;
    let out = inbox
        .process_once(&mut again, "c", &id, async |_tx| {
            panic!("a committed message ran again")
        })
        .await
        .map_err(|e: InboxError<tokio_postgres::Error>| e)
        .unwrap();
    assert_eq!(out, InboxOutcome::<()>::Duplicate);
    assert_eq!(rows(&observer, &table, &effects, "m-1").await, (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn connection_killed_before_the_effect_leaves_neither() {
    crash_at(CrashPoint::BeforeEffect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn connection_killed_after_the_effect_leaves_neither() {
    crash_at(CrashPoint::AfterEffect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn handler_error_rolls_back_the_dedup_row() {
    let (inbox, effects) = tables("error").await;
    let table = inbox.table().to_owned();
    let mut client = connect().await;
    let id = MessageId::new("m-err").unwrap();
    let out = inbox
        .process_once(&mut client, "c", &id, async |tx| {
            tx.execute(
                &format!("INSERT INTO {effects} (message_id) VALUES ($1)"),
                &[&"m-err"],
            )
            .await
            .unwrap();
            Err::<(), _>("payment provider said no")
        })
        .await;
    assert!(matches!(
        out,
        Err(InboxError::Handler("payment provider said no"))
    ));
    assert_eq!(rows(&client, &table, &effects, "m-err").await, (0, 0));
}

/// A handler that swallows a failed statement returns `Ok` on an aborted transaction, whose
/// COMMIT PostgreSQL answers with ROLLBACK: the inbox must report an error (the caller nacks),
/// never `Processed` with nothing committed (the caller would ack a lost message).
#[tokio::test]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn a_handler_that_swallows_a_failed_statement_is_not_processed() {
    let (inbox, effects) = tables("swallow").await;
    let table = inbox.table().to_owned();
    let mut client = connect().await;
    let id = MessageId::new("m-swallow").unwrap();
    let out = inbox
        .process_once(&mut client, "c", &id, async |tx| {
            tx.execute(
                &format!("INSERT INTO {effects} (message_id) VALUES ($1)"),
                &[&"m-swallow"],
            )
            .await
            .unwrap();
            // Fails, aborting the transaction; the handler ignores it.
            let _ = tx.execute("SELECT 1/0", &[]).await;
            Ok::<(), &str>(())
        })
        .await;
    assert!(
        out.is_err(),
        "an aborted transaction was reported as processed: {out:?}"
    );
    assert_eq!(rows(&client, &table, &effects, "m-swallow").await, (0, 0));
    // The redelivery runs it (nothing was recorded).
    let again = inbox
        .process_once(&mut client, "c", &id, async |tx| {
            tx.execute(
                &format!("INSERT INTO {effects} (message_id) VALUES ($1)"),
                &[&"m-swallow"],
            )
            .await
            .unwrap();
            Ok::<(), &str>(())
        })
        .await
        .unwrap();
    assert!(matches!(again, InboxOutcome::Processed(())), "{again:?}");
    assert_eq!(rows(&client, &table, &effects, "m-swallow").await, (1, 1));
}

/// Eight consumers, each on its own connection, receive every one of 200 messages (each
/// message delivered 8 times, concurrently): every effect happens exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn concurrent_consumers_apply_each_message_once() {
    let (inbox, effects) = tables("race").await;
    let table = inbox.table().to_owned();
    let mut tasks = Vec::new();
    for consumer in 0..8 {
        let (inbox, effects) = (inbox.clone(), effects.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = connect().await;
            let (mut processed, mut duplicates, mut in_progress) = (0, 0, 0);
            // Each consumer walks the messages from a different starting point.
            for i in 0..200 {
                let n = (i + consumer * 25) % 200;
                let id = MessageId::new(&format!("m-{n}")).unwrap();
                loop {
                    let out = inbox
                        .process_once(&mut client, "group", &id, async |tx| {
                            tx.execute(
                                &format!("INSERT INTO {effects} (message_id) VALUES ($1)"),
                                &[&id.as_str()],
                            )
                            .await
                            .map(|_| ())
                        })
                        .await
                        .unwrap();
                    match out {
                        InboxOutcome::Processed(()) => processed += 1,
                        InboxOutcome::Duplicate => duplicates += 1,
                        InboxOutcome::InProgress => {
                            in_progress += 1;
                            continue;
                        }
                    }
                    break;
                }
            }
            (processed, duplicates, in_progress)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (p, d, _) = t.await.unwrap();
        total = (total.0 + p, total.1 + d);
    }
    assert_eq!(total, (200, 1400));
    let client = connect().await;
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM {effects}")).await,
        200
    );
    assert_eq!(
        count(
            &client,
            &format!("SELECT count(DISTINCT message_id) FROM {effects}")
        )
        .await,
        200
    );
    assert_eq!(
        count(&client, &format!("SELECT count(*) FROM {table}")).await,
        200
    );
}

/// A delivery that meets another one's open transaction waits at most the lock timeout, then
/// is told "in progress" without running; once the first commits, it is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn open_transaction_elsewhere_is_in_progress() {
    let (inbox, _effects) = tables("busy").await;
    let inbox = inbox.lock_timeout(Duration::from_millis(200));
    let id = MessageId::new("m-busy").unwrap();
    let (held_tx, held_rx) = oneshot::channel();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let first = {
        let (inbox, id) = (inbox.clone(), id.clone());
        tokio::spawn(async move {
            let mut client = connect().await;
            inbox
                .process_once(&mut client, "c", &id, async |_tx| {
                    let _ = held_tx.send(());
                    let _ = go_rx.await;
                    Ok::<_, tokio_postgres::Error>("first")
                })
                .await
                .unwrap()
        })
    };
    held_rx.await.unwrap();
    let mut client = connect().await;
    let out = inbox
        .process_once(&mut client, "c", &id, async |_tx| {
            panic!("ran beside an open transaction")
        })
        .await
        .map_err(|e: InboxError<tokio_postgres::Error>| e)
        .unwrap();
    assert_eq!(out, InboxOutcome::<&str>::InProgress);
    go_tx.send(()).unwrap();
    assert_eq!(first.await.unwrap(), InboxOutcome::Processed("first"));
    let out = inbox
        .process_once(&mut client, "c", &id, async |_tx| {
            panic!("ran after the commit")
        })
        .await
        .map_err(|e: InboxError<tokio_postgres::Error>| e)
        .unwrap();
    assert_eq!(out, InboxOutcome::<&str>::Duplicate);
    // Purging old rows makes the message new again (documented window).
    assert_eq!(
        inbox
            .purge_older_than(&client, Duration::ZERO)
            .await
            .unwrap(),
        1
    );
}
