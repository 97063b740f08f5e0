//! The sweeper against claims of expired keys (issue "hardening", G1): a purge that found a row
//! expired must not delete it once a concurrent claim has revived it (a new in-flight record),
//! or a retry would claim epoch 1 a second time while the first holder runs.
//!
//! The interleaving is forced, not hoped for: a transaction revives the expired row and holds
//! its lock; the purge starts (it sees the row expired in its snapshot); the revival commits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use idemgate_core::store::{ClaimOutcome, Store};
use idemgate_core::testkit::{claim_request, fresh_key};
use idemgate_store_postgres::PostgresStore;
use tokio_postgres::NoTls;

fn url() -> Option<String> {
    idemgate_core::testkit::server_url("IDEMGATE_TEST_POSTGRES_URL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn a_purge_never_deletes_a_row_a_claim_revived() {
    let Some(url) = url() else { return };
    let store = PostgresStore::connect_with_pool_size(&url, 4)
        .await
        .expect("connect");
    let key = fresh_key("sweeper-race");
    let short = claim_request(Duration::from_millis(1), Duration::from_millis(1), 1);
    assert!(matches!(
        store.claim(&key, &short).await.unwrap(),
        ClaimOutcome::Acquired { .. }
    ));
    // Expired by the database's clock.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.get(&key).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the record never expired"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // A claim's revival of the expired row (what `ON CONFLICT DO UPDATE … WHERE expired`
    // writes), held open.
    let (reviver, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let (watcher, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(conn);
    reviver.batch_execute("BEGIN").await.unwrap();
    let revived = reviver
        .execute(
            "UPDATE idemgate_records SET expires_at = expires_at + 3600000,
               lease_expires_at = lease_expires_at + 3600000
             WHERE store_key = $1",
            &[&key.as_bytes().as_slice()],
        )
        .await
        .unwrap();
    assert_eq!(revived, 1);

    let purge = tokio::spawn({
        let store = store.clone();
        async move { store.purge_expired(10_000).await }
    });
    // Wait until the purge either waits on the row's lock (it saw the row expired) or is done.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if purge.is_finished() {
            break;
        }
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE wait_event_type = 'Lock' AND query LIKE 'DELETE FROM idemgate_records%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the purge neither waited nor ended"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reviver.batch_execute("COMMIT").await.unwrap();
    purge.await.unwrap().unwrap();
    assert!(
        store.get(&key).await.unwrap().is_some(),
        "the purge deleted a record revived under it"
    );
}
