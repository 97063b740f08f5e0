//! The suite's [`Driver`] on sqlx: [`SqlxInbox`].

use std::time::Duration;

use idemgate_dedup::MessageId;
use idemgate_dedup::inbox::{SqlxInbox, SqlxInboxError};
use sqlx::{Connection, Executor, PgConnection};

use super::{Driver, FAILING_SQL, Failed, Handler, Outcome, REFUSED, effect_sql, url};

#[derive(Clone, Debug)]
pub struct Sqlx(SqlxInbox);

async fn effect(conn: &mut PgConnection, effects: &str, id: &str) -> Result<(), String> {
    sqlx::query(&effect_sql(effects))
        .bind(id)
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn handle(
    conn: &mut PgConnection,
    effects: &str,
    id: &str,
    handler: Handler,
) -> Result<Option<String>, String> {
    match handler {
        Handler::Effect => effect(conn, effects, id).await.map(|()| None),
        Handler::EffectThenFail => {
            effect(conn, effects, id).await?;
            Err(REFUSED.to_owned())
        }
        Handler::EffectThenSwallow => {
            effect(conn, effects, id).await?;
            let failed = sqlx::query(FAILING_SQL).execute(&mut *conn).await;
            assert!(failed.is_err(), "{FAILING_SQL} must fail");
            Ok(None)
        }
        Handler::EffectThenRollback => {
            effect(conn, effects, id).await?;
            sqlx::query("ROLLBACK")
                .execute(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok(None)
        }
        Handler::Hold {
            effect: write,
            reached,
            go,
        } => {
            if write {
                effect(conn, effects, id).await?;
            }
            let _ = reached.send(());
            match go {
                Some(mut go) => {
                    let _ = go.wait_for(|go| *go).await;
                }
                None => std::future::pending::<()>().await,
            }
            Ok(Some("held".to_owned()))
        }
        Handler::ShowLockTimeout => sqlx::query_scalar::<_, String>("SHOW lock_timeout")
            .fetch_one(&mut *conn)
            .await
            .map(Some)
            .map_err(|e| e.to_string()),
        Handler::MustNotRun => panic!("the handler ran for a delivery that must not run it"),
    }
}

fn failed(e: SqlxInboxError<String>) -> Failed {
    match e {
        SqlxInboxError::Handler(e) => Failed::Handler(e),
        SqlxInboxError::TransactionEnded => Failed::Ended,
        SqlxInboxError::Sqlx(e) => Failed::Database {
            sqlstate: e
                .as_database_error()
                .and_then(|d| d.code())
                .map(|c| c.into_owned()),
            message: e.to_string(),
        },
        other => panic!("{other:?}"),
    }
}

impl Driver for Sqlx {
    type Conn = PgConnection;

    fn new(table: &str) -> Self {
        Self(SqlxInbox::new(table).unwrap())
    }

    fn with_lock_timeout(self, timeout: Duration) -> Self {
        Self(self.0.lock_timeout(timeout))
    }

    fn table(&self) -> &str {
        self.0.table()
    }

    async fn connect() -> PgConnection {
        PgConnection::connect(&url()).await.expect("connect")
    }

    async fn migrate(&self, conn: &mut PgConnection) {
        self.0.migrate(&mut *conn).await.unwrap();
    }

    async fn execute(conn: &mut PgConnection, sql: &str) {
        // No parameters: the simple protocol, several statements allowed.
        conn.execute(sql).await.unwrap();
    }

    async fn int(conn: &mut PgConnection, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&mut *conn).await.unwrap()
    }

    async fn text(conn: &mut PgConnection, sql: &str) -> String {
        sqlx::query_scalar(sql).fetch_one(&mut *conn).await.unwrap()
    }

    async fn process(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        id: &MessageId,
        effects: &str,
        handler: Handler,
    ) -> Outcome {
        self.0
            .process_once(&mut *conn, consumer, id, async |conn| {
                handle(conn, effects, id.as_str(), handler).await
            })
            .await
            .map_err(failed)
    }

    async fn process_in(
        &self,
        conn: &mut PgConnection,
        first: &str,
        consumer: &str,
        id: &MessageId,
        effects: &str,
        handler: Handler,
    ) -> Outcome {
        let mut tx = conn.begin().await.unwrap();
        tx.execute(first).await.unwrap();
        self.0
            .process_in(tx, consumer, id, async |conn| {
                handle(conn, effects, id.as_str(), handler).await
            })
            .await
            .map_err(failed)
    }

    async fn purge(&self, conn: &mut PgConnection, age: Duration) -> u64 {
        self.0.purge_older_than(&mut *conn, age).await.unwrap()
    }
}
