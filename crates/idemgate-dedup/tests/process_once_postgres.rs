//! `process_once` on a real postgres server (`IDEMGATE_TEST_POSTGRES_URL`), through the same store
//! wiring as `idemgate serve` (deadline, metrics, replay cache). Ignored without the variable
//! (CI fails instead).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Doomed;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn postgres_all_cases() {
    let url = std::env::var("IDEMGATE_TEST_POSTGRES_URL").expect("IDEMGATE_TEST_POSTGRES_URL");
    let (store, _) =
        idemgate_stores::open(&url)
            .await
            .expect("connect")
            .stack(&idemgate_stores::StackOptions {
                deadline: Duration::from_secs(5),
                replay_cache_entries: 1_000,
            });
    common::all(store, Doomed::Url(url)).await;
}
