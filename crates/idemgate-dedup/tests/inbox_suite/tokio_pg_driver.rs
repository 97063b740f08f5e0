//! The suite's [`Driver`] on tokio-postgres: [`PgInbox`].

use std::time::Duration;

use idemgate_dedup::MessageId;
use idemgate_dedup::inbox::{InboxError, PgInbox};
use tokio_postgres::{Client, NoTls, Transaction};

use super::{Driver, FAILING_SQL, Failed, Handler, Outcome, REFUSED, effect_sql, url};

#[derive(Clone, Debug)]
pub struct TokioPg(PgInbox);

async fn handle(
    tx: &Transaction<'_>,
    effects: &str,
    id: &str,
    handler: Handler,
) -> Result<Option<String>, String> {
    let effect = async || {
        tx.execute(&effect_sql(effects), &[&id])
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    match handler {
        Handler::Effect => effect().await.map(|()| None),
        Handler::EffectThenFail => {
            effect().await?;
            Err(REFUSED.to_owned())
        }
        Handler::EffectThenSwallow => {
            effect().await?;
            let failed = tx.execute(FAILING_SQL, &[]).await;
            assert!(failed.is_err(), "{FAILING_SQL} must fail");
            Ok(None)
        }
        Handler::EffectThenRollback => {
            effect().await?;
            tx.batch_execute("ROLLBACK")
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
                effect().await?;
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
        Handler::ShowLockTimeout => tx
            .query_one("SHOW lock_timeout", &[])
            .await
            .map(|row| Some(row.get::<_, String>(0)))
            .map_err(|e| e.to_string()),
        Handler::MustNotRun => panic!("the handler ran for a delivery that must not run it"),
    }
}

fn failed(e: InboxError<String>) -> Failed {
    match e {
        InboxError::Handler(e) => Failed::Handler(e),
        InboxError::TransactionEnded => Failed::Ended,
        InboxError::Postgres(e) => Failed::Database {
            sqlstate: e.code().map(|c| c.code().to_owned()),
            message: e.to_string(),
        },
        other => panic!("{other:?}"),
    }
}

impl Driver for TokioPg {
    type Conn = Client;

    fn new(table: &str) -> Self {
        Self(PgInbox::new(table).unwrap())
    }

    fn with_lock_timeout(self, timeout: Duration) -> Self {
        Self(self.0.lock_timeout(timeout))
    }

    fn table(&self) -> &str {
        self.0.table()
    }

    async fn connect() -> Client {
        let (client, conn) = tokio_postgres::connect(&url(), NoTls)
            .await
            .expect("connect");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    async fn migrate(&self, conn: &mut Client) {
        self.0.migrate(&*conn).await.unwrap();
    }

    async fn execute(conn: &mut Client, sql: &str) {
        conn.batch_execute(sql).await.unwrap();
    }

    async fn int(conn: &mut Client, sql: &str) -> i64 {
        conn.query_one(sql, &[]).await.unwrap().get(0)
    }

    async fn text(conn: &mut Client, sql: &str) -> String {
        conn.query_one(sql, &[]).await.unwrap().get(0)
    }

    async fn process(
        &self,
        conn: &mut Client,
        consumer: &str,
        id: &MessageId,
        effects: &str,
        handler: Handler,
    ) -> Outcome {
        self.0
            .process_once(conn, consumer, id, async |tx| {
                handle(tx, effects, id.as_str(), handler).await
            })
            .await
            .map_err(failed)
    }

    async fn process_in(
        &self,
        conn: &mut Client,
        first: &str,
        consumer: &str,
        id: &MessageId,
        effects: &str,
        handler: Handler,
    ) -> Outcome {
        let tx = conn.transaction().await.unwrap();
        tx.batch_execute(first).await.unwrap();
        self.0
            .process_in(tx, consumer, id, async |tx| {
                handle(tx, effects, id.as_str(), handler).await
            })
            .await
            .map_err(failed)
    }

    async fn purge(&self, conn: &mut Client, age: Duration) -> u64 {
        self.0.purge_older_than(&*conn, age).await.unwrap()
    }
}
