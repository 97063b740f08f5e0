//! `file:DIR` picks its engine: fjall for a new directory, the engine a directory already holds
//! (so an upgrade never strands a redb store's records), the one `?engine=` names, and refuses a
//! directory holding both rather than guess.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::store::{ClaimOutcome, Store};
use idemgate_core::testkit::{claim_request, fresh_key};
use idemgate_core::{ErrorKind, StoreKey};
use idemgate_stores::open;

/// Stores one completed record under `key` through `url`, then drops the store.
async fn write_one(url: &str, key: &StoreKey) {
    let store = open(url).await.unwrap().store;
    let req = claim_request(Duration::from_secs(30), Duration::from_secs(3600), 1);
    let ClaimOutcome::Acquired { fencing } = store.claim(key, &req).await.unwrap() else {
        panic!("fresh key existed");
    };
    let outcome = Outcome::Response(StoredResponse::new(201, vec![], "kept"));
    store
        .complete(key, fencing, &outcome, Duration::from_secs(3600))
        .await
        .unwrap();
}

async fn has(url: &str, key: &StoreKey) -> bool {
    open(url)
        .await
        .unwrap()
        .store
        .get(key)
        .await
        .unwrap()
        .is_some()
}

/// The error of an open that must fail (`Opened` has no `Debug`, so no `expect_err`).
fn refused(
    opened: Result<idemgate_stores::Opened, idemgate_core::StoreError>,
    why: &str,
) -> idemgate_core::StoreError {
    match opened {
        Ok(_) => panic!("opened, but should be {why}"),
        Err(e) => e,
    }
}

fn url(dir: &Path, query: &str) -> String {
    format!("file:{}{query}", dir.display())
}

#[tokio::test]
async fn a_new_directory_gets_fjall() {
    let dir = tempfile::tempdir().unwrap();
    let key = fresh_key("engine-new");
    write_one(&url(dir.path(), ""), &key).await;
    assert!(dir.path().join("fjall").is_dir());
    assert!(!dir.path().join("idemgate.redb").exists());
    assert!(has(&url(dir.path(), ""), &key).await);
    assert!(has(&url(dir.path(), "?engine=fjall"), &key).await);
}

#[tokio::test]
async fn a_redb_directory_stays_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let key = fresh_key("engine-redb");
    write_one(&url(dir.path(), "?engine=redb"), &key).await;
    assert!(dir.path().join("idemgate.redb").is_file());
    // Opened without `?engine=`, as an upgraded `idemgate serve --store file:DIR` would.
    assert!(
        has(&url(dir.path(), ""), &key).await,
        "the redb records were stranded"
    );
    assert!(
        !dir.path().join("fjall").exists(),
        "a fjall store was created beside redb"
    );
}

#[tokio::test]
async fn a_directory_with_both_engines_is_refused_without_a_choice() {
    let dir = tempfile::tempdir().unwrap();
    let on_redb = fresh_key("engine-both-redb");
    let on_fjall = fresh_key("engine-both-fjall");
    write_one(&url(dir.path(), "?engine=redb"), &on_redb).await;
    write_one(&url(dir.path(), "?engine=fjall"), &on_fjall).await;
    let err = refused(open(&url(dir.path(), "")).await, "refused");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("engine="), "{err}");
    assert!(has(&url(dir.path(), "?engine=redb"), &on_redb).await);
    assert!(!has(&url(dir.path(), "?engine=redb"), &on_fjall).await);
    assert!(has(&url(dir.path(), "?engine=fjall"), &on_fjall).await);
}

#[tokio::test]
async fn a_directory_is_held_by_one_store_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let held = open(&url(dir.path(), "")).await.unwrap();
    let err = refused(open(&url(dir.path(), "")).await, "locked");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("in use"), "{err}");
    drop(held);
    open(&url(dir.path(), "")).await.unwrap();

    // Two engines in one directory never run side by side either: each would be a store of
    // its own, and a key could be claimed in both.
    let on_redb = open(&url(dir.path(), "?engine=redb")).await.unwrap();
    let err = refused(open(&url(dir.path(), "?engine=fjall")).await, "locked");
    assert!(err.to_string().contains("in use"), "{err}");
    drop(on_redb);
    open(&url(dir.path(), "?engine=fjall")).await.unwrap();
}
