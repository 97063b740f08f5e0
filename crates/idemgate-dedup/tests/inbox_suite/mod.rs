//! The behaviour both inbox drivers must give, as functions over a [`Driver`]; `inbox_postgres.rs`
//! (tokio-postgres) and `inbox_sqlx.rs` (sqlx) run every case against a real server
//! (`IDEMGATE_TEST_POSTGRES_URL`).

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

mod sqlx_driver;
mod tokio_pg_driver;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use idemgate_dedup::MessageId;
use idemgate_dedup::inbox::InboxOutcome;
use tokio::sync::{Barrier, mpsc, watch};

pub use sqlx_driver::Sqlx;
pub use tokio_pg_driver::TokioPg;

pub fn url() -> String {
    std::env::var("IDEMGATE_TEST_POSTGRES_URL").expect("IDEMGATE_TEST_POSTGRES_URL")
}

/// What the handler does on the inbox's transaction.
pub enum Handler {
    /// Inserts the message's effect row; `Ok(None)`.
    Effect,
    /// Inserts the effect, then fails with [`REFUSED`].
    EffectThenFail,
    /// Inserts the effect, runs a statement that fails (aborting the transaction) and ignores
    /// its error; `Ok(None)`.
    EffectThenSwallow,
    /// Inserts the effect, then ends the transaction itself with `ROLLBACK`; `Ok(None)`.
    EffectThenRollback,
    /// Inserts the effect when `effect`, says so on `reached`, then waits until `go` turns true
    /// (forever when `None`); `Ok(Some("held"))`.
    Hold {
        effect: bool,
        reached: mpsc::UnboundedSender<()>,
        go: Option<watch::Receiver<bool>>,
    },
    /// `Ok(Some(SHOW lock_timeout))` as the handler sees it.
    ShowLockTimeout,
    /// Panics: this delivery must not run the handler.
    MustNotRun,
}

/// The handler error of [`Handler::EffectThenFail`].
pub const REFUSED: &str = "payment provider said no";

/// Why a call failed, whatever the driver.
#[derive(Debug)]
pub enum Failed {
    Handler(String),
    /// The handler ended the inbox's transaction itself.
    Ended,
    Database {
        sqlstate: Option<String>,
        message: String,
    },
}

pub type Outcome = Result<InboxOutcome<Option<String>>, Failed>;

/// One inbox driver, over one inbox table; database errors outside the inbox panic.
pub trait Driver: Clone + Send + Sync + 'static {
    type Conn: Send + 'static;
    fn new(table: &str) -> Self;
    fn with_lock_timeout(self, timeout: Duration) -> Self;
    fn table(&self) -> &str;
    fn connect() -> impl Future<Output = Self::Conn> + Send;
    fn migrate(&self, conn: &mut Self::Conn) -> impl Future<Output = ()> + Send;
    /// Runs `sql` (one or more statements, no result).
    fn execute(conn: &mut Self::Conn, sql: &str) -> impl Future<Output = ()> + Send;
    fn int(conn: &mut Self::Conn, sql: &str) -> impl Future<Output = i64> + Send;
    fn text(conn: &mut Self::Conn, sql: &str) -> impl Future<Output = String> + Send;
    /// `process_once` on `conn`.
    fn process(
        &self,
        conn: &mut Self::Conn,
        consumer: &str,
        id: &MessageId,
        effects: &str,
        handler: Handler,
    ) -> impl Future<Output = Outcome> + Send;
    /// Opens a transaction on `conn`, runs `first` in it, then `process_in` on it.
    fn process_in(
        &self,
        conn: &mut Self::Conn,
        first: &str,
        consumer: &str,
        id: &MessageId,
        effects: &str,
        handler: Handler,
    ) -> impl Future<Output = Outcome> + Send;
    fn purge(&self, conn: &mut Self::Conn, age: Duration) -> impl Future<Output = u64> + Send;
}

/// The handler's statements, as SQL (both drivers run the same text).
pub fn effect_sql(effects: &str) -> String {
    format!("INSERT INTO {effects} (message_id) VALUES ($1)")
}
pub const FAILING_SQL: &str = "SELECT 1/0";

/// A fresh inbox table and effects table for one test.
pub async fn tables<D: Driver>(label: &str) -> (D, String) {
    static N: AtomicU64 = AtomicU64::new(0);
    let suffix = format!(
        "{label}_{}_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let inbox = D::new(&format!("inbox_{suffix}"));
    let effects = format!("effects_{suffix}");
    let mut conn = D::connect().await;
    inbox.migrate(&mut conn).await;
    D::execute(
        &mut conn,
        &format!(
            "CREATE TABLE {effects} (message_id text NOT NULL, applied_at timestamptz DEFAULT now())"
        ),
    )
    .await;
    (inbox, effects)
}

/// Inbox rows and effect rows of `id`.
pub async fn rows<D: Driver>(conn: &mut D::Conn, inbox: &D, effects: &str, id: &str) -> (i64, i64) {
    // Ids in these tests are plain ASCII without quotes.
    let i = D::int(
        conn,
        &format!(
            "SELECT count(*) FROM {} WHERE message_id = '{id}'",
            inbox.table()
        ),
    )
    .await;
    let e = D::int(
        conn,
        &format!("SELECT count(*) FROM {effects} WHERE message_id = '{id}'"),
    )
    .await;
    (i, e)
}

async fn backend_pid<D: Driver>(conn: &mut D::Conn) -> i64 {
    D::int(conn, "SELECT pg_backend_pid()::int8").await
}

async fn terminate<D: Driver>(observer: &mut D::Conn, pid: i64) {
    let killed = D::text(
        observer,
        &format!("SELECT pg_terminate_backend({pid}::int4)::text"),
    )
    .await;
    assert_eq!(killed, "true");
}

fn id(s: &str) -> MessageId {
    MessageId::new(s).unwrap()
}

#[derive(Clone, Copy, Debug)]
pub enum CrashPoint {
    /// After the dedup row was inserted, before the handler wrote anything.
    BeforeEffect,
    /// After the handler's write, before COMMIT.
    AfterEffect,
}

/// The consumer's connection dies mid-handler: neither the dedup row nor the effect; the
/// redelivery runs on a clean slate; a death after COMMIT leaves both, and the next delivery is
/// a duplicate.
pub async fn crash_at<D: Driver>(point: CrashPoint) {
    let (inbox, effects) = tables::<D>("crash").await;
    let mut observer = D::connect().await;
    let mut victim = D::connect().await;
    let pid = backend_pid::<D>(&mut victim).await;
    let (reached_tx, mut reached_rx) = mpsc::unbounded_channel();
    let run = {
        let (inbox, effects) = (inbox.clone(), effects.clone());
        tokio::spawn(async move {
            let handler = Handler::Hold {
                effect: matches!(point, CrashPoint::AfterEffect),
                reached: reached_tx,
                go: None,
            };
            inbox
                .process(&mut victim, "c", &id("m-1"), &effects, handler)
                .await
        })
    };
    reached_rx.recv().await.unwrap();
    // The uncommitted rows exist for the victim's transaction only.
    assert_eq!(rows(&mut observer, &inbox, &effects, "m-1").await, (0, 0));
    // The crash: the server ends the victim's backend mid-transaction.
    terminate::<D>(&mut observer, pid).await;
    assert_eq!(
        rows(&mut observer, &inbox, &effects, "m-1").await,
        (0, 0),
        "{point:?}"
    );
    run.abort();
    // The redelivery runs the handler on a clean slate: both, once.
    let mut fresh = D::connect().await;
    let out = inbox
        .process(&mut fresh, "c", &id("m-1"), &effects, Handler::Effect)
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Processed(None));
    assert_eq!(rows(&mut observer, &inbox, &effects, "m-1").await, (1, 1));
    // A crash after COMMIT: both stay, and the next redelivery is a duplicate.
    let fresh_pid = backend_pid::<D>(&mut fresh).await;
    terminate::<D>(&mut observer, fresh_pid).await;
    let mut again = D::connect().await;
    let out = inbox
        .process(&mut again, "c", &id("m-1"), &effects, Handler::MustNotRun)
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Duplicate);
    assert_eq!(rows(&mut observer, &inbox, &effects, "m-1").await, (1, 1));
}

/// A handler error rolls back its writes and the dedup row; the redelivery runs it.
pub async fn handler_error_rolls_back_the_dedup_row<D: Driver>() {
    let (inbox, effects) = tables::<D>("error").await;
    let mut conn = D::connect().await;
    let out = inbox
        .process(
            &mut conn,
            "c",
            &id("m-err"),
            &effects,
            Handler::EffectThenFail,
        )
        .await;
    assert!(
        matches!(&out, Err(Failed::Handler(e)) if e == REFUSED),
        "{out:?}"
    );
    assert_eq!(rows(&mut conn, &inbox, &effects, "m-err").await, (0, 0));
    let again = inbox
        .process(&mut conn, "c", &id("m-err"), &effects, Handler::Effect)
        .await
        .unwrap();
    assert_eq!(again, InboxOutcome::Processed(None));
    assert_eq!(rows(&mut conn, &inbox, &effects, "m-err").await, (1, 1));
}

/// A handler that swallows a failed statement returns `Ok` on an aborted transaction, whose
/// COMMIT PostgreSQL answers with ROLLBACK: the inbox must report an error (the caller nacks),
/// never `Processed` with nothing committed (the caller would ack a lost message).
pub async fn a_handler_that_swallows_a_failed_statement_is_not_processed<D: Driver>() {
    let (inbox, effects) = tables::<D>("swallow").await;
    let mut conn = D::connect().await;
    let out = inbox
        .process(
            &mut conn,
            "c",
            &id("m-swallow"),
            &effects,
            Handler::EffectThenSwallow,
        )
        .await;
    assert!(
        matches!(&out, Err(Failed::Database { sqlstate: Some(s), .. }) if s == "25P02"),
        "an aborted transaction must be an error (in_failed_sql_transaction): {out:?}"
    );
    assert_eq!(rows(&mut conn, &inbox, &effects, "m-swallow").await, (0, 0));
    // The connection is usable, and the redelivery runs it (nothing was recorded).
    let again = inbox
        .process(&mut conn, "c", &id("m-swallow"), &effects, Handler::Effect)
        .await
        .unwrap();
    assert_eq!(again, InboxOutcome::Processed(None));
    assert_eq!(rows(&mut conn, &inbox, &effects, "m-swallow").await, (1, 1));
}

/// A handler that ends the inbox's transaction itself (`ROLLBACK`) and returns `Ok`: the dedup
/// row and its effect are gone, so the inbox must report an error (the caller nacks), never
/// `Processed` (the caller would ack a lost message).
pub async fn a_handler_that_rolls_back_itself_is_not_processed<D: Driver>() {
    let (inbox, effects) = tables::<D>("rollback").await;
    let mut conn = D::connect().await;
    let out = inbox
        .process(
            &mut conn,
            "c",
            &id("m-rollback"),
            &effects,
            Handler::EffectThenRollback,
        )
        .await;
    assert!(matches!(out, Err(Failed::Ended)), "{out:?}");
    assert_eq!(
        rows(&mut conn, &inbox, &effects, "m-rollback").await,
        (0, 0)
    );
    let again = inbox
        .process(&mut conn, "c", &id("m-rollback"), &effects, Handler::Effect)
        .await
        .unwrap();
    assert_eq!(again, InboxOutcome::Processed(None));
    assert_eq!(
        rows(&mut conn, &inbox, &effects, "m-rollback").await,
        (1, 1)
    );
}

/// Eight consumers, each on its own connection, receive every one of 200 messages (each
/// message delivered 8 times, concurrently): every effect happens exactly once.
pub async fn concurrent_consumers_apply_each_message_once<D: Driver>() {
    let (inbox, effects) = tables::<D>("race").await;
    let mut tasks = Vec::new();
    for consumer in 0..8 {
        let (inbox, effects) = (inbox.clone(), effects.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = D::connect().await;
            let (mut processed, mut duplicates) = (0, 0);
            // Each consumer walks the messages from a different starting point.
            for i in 0..200 {
                let n = (i + consumer * 25) % 200;
                let id = id(&format!("m-{n}"));
                loop {
                    match inbox
                        .process(&mut conn, "group", &id, &effects, Handler::Effect)
                        .await
                        .unwrap()
                    {
                        InboxOutcome::Processed(None) => processed += 1,
                        InboxOutcome::Duplicate => duplicates += 1,
                        InboxOutcome::InProgress => continue,
                        other => panic!("{other:?}"),
                    }
                    break;
                }
            }
            (processed, duplicates)
        }));
    }
    let mut total = (0, 0);
    for t in tasks {
        let (p, d) = t.await.unwrap();
        total = (total.0 + p, total.1 + d);
    }
    assert_eq!(total, (200, 1400));
    let mut conn = D::connect().await;
    assert_eq!(
        D::int(&mut conn, &format!("SELECT count(*) FROM {effects}")).await,
        200
    );
    assert_eq!(
        D::int(
            &mut conn,
            &format!("SELECT count(DISTINCT message_id) FROM {effects}")
        )
        .await,
        200
    );
    assert_eq!(
        D::int(
            &mut conn,
            &format!("SELECT count(*) FROM {}", inbox.table())
        )
        .await,
        200
    );
}

/// Sixteen deliveries of ONE message, each on its own connection, released together: one runs
/// the handler, and the fifteen others are seen waiting on its uncommitted dedup row before it
/// commits (a real race, not one after the other); then every one of them is a duplicate.
/// Exactly one effect.
pub async fn racing_deliveries_of_one_message_run_once<D: Driver>() {
    const N: usize = 16;
    let (inbox, effects) = tables::<D>("one").await;
    // Long enough that no waiter gives up on a loaded machine: each must see the commit.
    let inbox = inbox.with_lock_timeout(Duration::from_secs(60));
    let (reached_tx, mut reached_rx) = mpsc::unbounded_channel();
    let (go_tx, go_rx) = watch::channel(false);
    let start = Arc::new(Barrier::new(N));
    let mut tasks = Vec::new();
    for _ in 0..N {
        let (inbox, effects, start) = (inbox.clone(), effects.clone(), start.clone());
        let handler = Handler::Hold {
            effect: true,
            reached: reached_tx.clone(),
            go: Some(go_rx.clone()),
        };
        tasks.push(tokio::spawn(async move {
            let mut conn = D::connect().await;
            start.wait().await;
            inbox
                .process(&mut conn, "c", &id("m-race"), &effects, handler)
                .await
                .unwrap()
        }));
    }
    drop(reached_tx);
    // One delivery holds the row, uncommitted, in its handler.
    reached_rx.recv().await.unwrap();
    let mut observer = D::connect().await;
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
         AND query LIKE 'INSERT INTO %{}%'",
        inbox.table()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = D::int(&mut observer, &waiting).await;
        if n == (N - 1) as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} of {} deliveries waiting on the row",
            N - 1
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    go_tx.send(true).unwrap();
    let (mut processed, mut duplicates) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            InboxOutcome::Processed(Some(v)) if v == "held" => processed += 1,
            InboxOutcome::Duplicate => duplicates += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((processed, duplicates), (1, N - 1));
    // Every sender is gone: no second handler ever started.
    assert!(reached_rx.recv().await.is_none());
    assert_eq!(
        rows(&mut observer, &inbox, &effects, "m-race").await,
        (1, 1)
    );
}

/// A delivery that meets another one's open transaction waits at most the inbox's lock
/// timeout — even on a connection whose own `lock_timeout` is 0 (wait forever) — then is told
/// "in progress" without running; once the first commits, it is a duplicate.
pub async fn open_transaction_elsewhere_is_in_progress<D: Driver>() {
    let (inbox, effects) = tables::<D>("busy").await;
    let inbox = inbox.with_lock_timeout(Duration::from_millis(200));
    let (reached_tx, mut reached_rx) = mpsc::unbounded_channel();
    let (go_tx, go_rx) = watch::channel(false);
    let first = {
        let (inbox, effects) = (inbox.clone(), effects.clone());
        tokio::spawn(async move {
            let mut conn = D::connect().await;
            let handler = Handler::Hold {
                effect: true,
                reached: reached_tx,
                go: Some(go_rx),
            };
            inbox
                .process(&mut conn, "c", &id("m-busy"), &effects, handler)
                .await
                .unwrap()
        })
    };
    reached_rx.recv().await.unwrap();
    let mut conn = D::connect().await;
    D::execute(&mut conn, "SET lock_timeout = 0").await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        inbox.process(&mut conn, "c", &id("m-busy"), &effects, Handler::MustNotRun),
    )
    .await
    .expect("the inbox's lock timeout governs its insert")
    .unwrap();
    assert_eq!(out, InboxOutcome::InProgress);
    go_tx.send(true).unwrap();
    assert_eq!(
        first.await.unwrap(),
        InboxOutcome::Processed(Some("held".into()))
    );
    let out = inbox
        .process(&mut conn, "c", &id("m-busy"), &effects, Handler::MustNotRun)
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Duplicate);
    assert_eq!(rows(&mut conn, &inbox, &effects, "m-busy").await, (1, 1));
    // Purging old rows makes the message new again (documented window).
    assert_eq!(inbox.purge(&mut conn, Duration::ZERO).await, 1);
    let out = inbox
        .process(&mut conn, "c", &id("m-busy"), &effects, Handler::Effect)
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Processed(None));
}

/// The inbox's own lock timeout is for its insert only: the handler runs under the
/// application's `lock_timeout` — the session's, or one the application set with `SET LOCAL`
/// in the transaction it handed over — and the session keeps its value afterwards.
pub async fn the_applications_lock_timeout_is_intact_in_the_handler<D: Driver>() {
    let (inbox, effects) = tables::<D>("timeout").await;
    // Distinct from every value below, so that a leak would show.
    let inbox = inbox.with_lock_timeout(Duration::from_millis(250));
    let mut conn = D::connect().await;
    D::execute(&mut conn, "SET lock_timeout = '777ms'").await;
    let out = inbox
        .process(
            &mut conn,
            "c",
            &id("m-session"),
            &effects,
            Handler::ShowLockTimeout,
        )
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Processed(Some("777ms".into())));
    assert_eq!(D::text(&mut conn, "SHOW lock_timeout").await, "777ms");

    let out = inbox
        .process_in(
            &mut conn,
            "SET LOCAL lock_timeout = '1234ms'",
            "c",
            &id("m-local"),
            &effects,
            Handler::ShowLockTimeout,
        )
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Processed(Some("1234ms".into())));
    assert_eq!(D::text(&mut conn, "SHOW lock_timeout").await, "777ms");

    // 0 ("no timeout") is a value like any other.
    D::execute(&mut conn, "SET lock_timeout = 0").await;
    let out = inbox
        .process(
            &mut conn,
            "c",
            &id("m-zero"),
            &effects,
            Handler::ShowLockTimeout,
        )
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Processed(Some("0".into())));
    assert_eq!(
        D::int(
            &mut conn,
            &format!("SELECT count(*) FROM {}", inbox.table())
        )
        .await,
        3
    );
}

/// Both drivers run the same statements on the same table: a message processed through one is
/// a duplicate through the other.
pub async fn the_two_drivers_share_one_table() {
    let (pg, effects) = tables::<TokioPg>("shared").await;
    let sqlx = Sqlx::new(pg.table());
    let (mut pg_conn, mut sqlx_conn) = (TokioPg::connect().await, Sqlx::connect().await);
    let out = pg
        .process(&mut pg_conn, "c", &id("m-a"), &effects, Handler::Effect)
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Processed(None));
    let out = sqlx
        .process(
            &mut sqlx_conn,
            "c",
            &id("m-a"),
            &effects,
            Handler::MustNotRun,
        )
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Duplicate);
    let out = sqlx
        .process(&mut sqlx_conn, "c", &id("m-b"), &effects, Handler::Effect)
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Processed(None));
    let out = pg
        .process(&mut pg_conn, "c", &id("m-b"), &effects, Handler::MustNotRun)
        .await
        .unwrap();
    assert_eq!(out, InboxOutcome::Duplicate);
    assert_eq!(rows(&mut pg_conn, &pg, &effects, "m-a").await, (1, 1));
    assert_eq!(rows(&mut pg_conn, &pg, &effects, "m-b").await, (1, 1));
}
