//! `process_once` on the memory store and on the embedded (redb) store.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Doomed;
use idemgate_core::{MemoryStore, SharedStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redelivery_gets_the_recorded_result() {
    common::redelivery_gets_the_recorded_result(SharedStore::new(MemoryStore::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_run_once() {
    common::concurrent_deliveries_run_once(SharedStore::new(MemoryStore::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_releases_the_key() {
    common::retry_releases_the_key(SharedStore::new(MemoryStore::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_outcome_is_dead_lettered() {
    common::unknown_outcome_is_dead_lettered(SharedStore::new(MemoryStore::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_keep_a_slow_handler() {
    common::heartbeats_keep_a_slow_handler(SharedStore::new(MemoryStore::default())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_after_a_crash_is_fenced() {
    let store = SharedStore::new(MemoryStore::default());
    common::takeover_after_a_crash_is_fenced(store.clone(), Doomed::Same(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_store_all_cases() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file:{}", dir.path().display());
    let (store, _) =
        idemgate_stores::open(&url)
            .await
            .unwrap()
            .stack(&idemgate_stores::StackOptions {
                deadline: Duration::from_secs(5),
                replay_cache_entries: 0,
            });
    common::all(store.clone(), Doomed::Same(store)).await;
}
