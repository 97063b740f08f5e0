//! Readers never see a write before the journal sync that makes it durable: while the writer is
//! held between a group's writes and its sync, `get`, `list` and the `claim` fast path answer
//! from the last synced state; once the sync completes, the claim is acknowledged and visible.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use idemgate_core::ErrorKind;
use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::store::{ClaimOutcome, DeleteMode, DeleteOutcome, ListRequest, Store};
use idemgate_core::testkit::{claim_request, fresh_key};
use idemgate_store_fjall::FjallStore;

/// How many records one list page shows.
async fn listed(store: &FjallStore) -> usize {
    let page = store
        .list(&ListRequest {
            cursor: None,
            limit: 10,
            only_unknown: false,
        })
        .await
        .unwrap();
    page.records.len()
}

// The held guard stops the writer's thread (a std thread), not this task: holding it across the
// awaits below is the point.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsynced_writes_are_invisible_to_readers() {
    let dir = tempfile::tempdir().unwrap();
    let store = FjallStore::open(dir.path().join("store")).unwrap();
    let key = fresh_key("durable-reads");
    let req = claim_request(Duration::from_secs(30), Duration::from_secs(3600), 1);

    let gate = store.hold_syncs();
    let claimer = {
        let store = store.clone();
        let req = req.clone();
        tokio::spawn(async move { store.claim(&key, &req).await })
    };
    // Wait (on the writer's own view, not on time) until the claim is written but not synced.
    while !store.written(&key).unwrap() {
        tokio::task::yield_now().await;
    }
    assert!(
        store.get(&key).await.unwrap().is_none(),
        "get showed a record that is not durable yet"
    );
    assert_eq!(listed(&store).await, 0, "list showed an unsynced record");
    assert!(
        !claimer.is_finished(),
        "the claim was acknowledged before its sync"
    );

    // A second claimer is not answered from the unsynced record either: it queues behind the
    // sync and then finds the first claim.
    let second = {
        let store = store.clone();
        let req = req.clone();
        tokio::spawn(async move { store.claim(&key, &req).await })
    };
    drop(gate);
    let first = claimer.await.unwrap().unwrap();
    assert!(matches!(first, ClaimOutcome::Acquired { .. }), "{first:?}");
    let second = second.await.unwrap().unwrap();
    assert!(
        matches!(second, ClaimOutcome::Existing { .. }),
        "{second:?}"
    );
    assert!(store.get(&key).await.unwrap().is_some());
}

/// After a failed sync the memtable may hold writes that never became durable: the writer must
/// not answer from them. Every later write is refused until the store is reopened, and readers
/// keep answering from what was synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failed_sync_every_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = FjallStore::open(&path).unwrap();
    let req = claim_request(Duration::from_secs(30), Duration::from_secs(3600), 1);
    let synced = fresh_key("synced");
    assert!(matches!(
        store.claim(&synced, &req).await.unwrap(),
        ClaimOutcome::Acquired { .. }
    ));

    store.fail_syncs();
    let phantom = fresh_key("phantom");
    let err = store.claim(&phantom, &req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    // The retry must not be told "Existing" from the claim whose sync failed.
    let err = store.claim(&phantom, &req).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.to_string().contains("restarts"), "{err}");
    let err = store.purge_expired(10).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(store.get(&phantom).await.unwrap().is_none());
    assert!(store.get(&synced).await.unwrap().is_some());

    drop(store);
    // Reopened (recovered from its journal), it works again. Whether the refused claim is there
    // depends on what reached the disk: the contract allows either for an `Unavailable` write.
    let store = FjallStore::open(&path).unwrap();
    assert!(store.get(&synced).await.unwrap().is_some());
    let fresh = fresh_key("after-restart");
    assert!(matches!(
        store.claim(&fresh, &req).await.unwrap(),
        ClaimOutcome::Acquired { .. }
    ));
}

/// An unsynced delete does not hide the synced record either: `get` and `list` still show it
/// until the delete is durable.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsynced_delete_hides_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = FjallStore::open(dir.path().join("store")).unwrap();
    let key = fresh_key("unsynced-delete");
    let req = claim_request(Duration::from_secs(30), Duration::from_secs(3600), 1);
    let ClaimOutcome::Acquired { fencing } = store.claim(&key, &req).await.unwrap() else {
        panic!("fresh key existed");
    };
    let outcome = Outcome::Response(StoredResponse::new(200, vec![], "done"));
    store
        .complete(&key, fencing, &outcome, Duration::from_secs(3600))
        .await
        .unwrap();

    let gate = store.hold_syncs();
    let deleter = {
        let store = store.clone();
        tokio::spawn(async move { store.delete(&key, DeleteMode::Finished).await })
    };
    while store.written(&key).unwrap() {
        tokio::task::yield_now().await;
    }
    assert!(
        store.get(&key).await.unwrap().is_some(),
        "get lost a synced record"
    );
    assert_eq!(listed(&store).await, 1, "list lost a synced record");
    drop(gate);
    assert_eq!(deleter.await.unwrap().unwrap(), DeleteOutcome::Deleted);
    assert!(store.get(&key).await.unwrap().is_none());
}
