//! Group commit (issue 14): concurrent compare-and-set operations share one transaction, and
//! each keeps its own semantics. Real concurrency: tasks start together behind a barrier, and
//! rounds repeat until the store's counters show that batches formed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use idemgate_core::record::{Fencing, Outcome, RecordState, StoredResponse};
use idemgate_core::store::{CasOutcome, ClaimOutcome, Store};
use idemgate_core::testkit::{claim_request, fresh_key, fresh_token};
use idemgate_store_postgres::PostgresStore;
use tokio::sync::Barrier;

fn url() -> Option<String> {
    idemgate_core::testkit::server_url("IDEMGATE_TEST_POSTGRES_URL")
}

fn outcome(v: u8) -> Outcome {
    Outcome::Response(StoredResponse::new(200, vec![], vec![v]))
}

const LONG: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn concurrent_claims_of_one_key_have_exactly_one_winner() {
    let Some(url) = url() else { return };
    let store = PostgresStore::connect_with_pool_size(&url, 16)
        .await
        .expect("connect");
    let before = store.batch_stats();
    for round in 0..40 {
        let key = fresh_key("group-commit-one-key");
        let tasks = 64;
        let barrier = Arc::new(Barrier::new(tasks));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..tasks {
            let (store, barrier) = (store.clone(), barrier.clone());
            set.spawn(async move {
                let req = claim_request(LONG, LONG, 7);
                barrier.wait().await;
                store.claim(&key, &req).await
            });
        }
        let (mut won, mut existing) = (0, 0);
        while let Some(r) = set.join_next().await {
            match r.expect("no panic").expect("claim") {
                ClaimOutcome::Acquired { fencing } => {
                    assert_eq!(fencing.epoch, 1);
                    won += 1;
                }
                ClaimOutcome::Existing { record, .. } => {
                    assert!(matches!(record.state, RecordState::InFlight { .. }));
                    existing += 1;
                }
            }
        }
        assert_eq!((won, existing), (1, tasks - 1), "round {round}");
        let now = store.batch_stats();
        if round >= 4 && now.batches > before.batches {
            break;
        }
    }
    let after = store.batch_stats();
    assert!(after.batches > before.batches, "no batch formed: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn a_batch_applies_each_compare_and_set_on_its_own() {
    let Some(url) = url() else { return };
    let store = PostgresStore::connect_with_pool_size(&url, 16)
        .await
        .expect("connect");
    let before = store.batch_stats();
    for round in 0..40 {
        // 16 keys, four of each kind:
        // 0: two completes with the right fencing (same key, likely one batch): exactly one wins;
        // 1: complete with a wrong token: lost, the record stays in flight;
        // 2: release with the right fencing: applied, the key is free (next claim: epoch 2);
        // 3: mark_unknown with a wrong epoch: lost.
        let mut held = Vec::new();
        for _ in 0..16 {
            let key = fresh_key("group-commit-cas");
            let ClaimOutcome::Acquired { fencing } = store
                .claim(&key, &claim_request(LONG, LONG, 3))
                .await
                .unwrap()
            else {
                panic!("fresh key existed");
            };
            held.push((key, fencing));
        }
        let ops = held.len() + held.len() / 4;
        let barrier = Arc::new(Barrier::new(ops));
        let mut set = tokio::task::JoinSet::new();
        for (i, &(key, f)) in held.iter().enumerate() {
            let copies = if i % 4 == 0 { 2 } else { 1 };
            for _ in 0..copies {
                let (store, barrier) = (store.clone(), barrier.clone());
                set.spawn(async move {
                    barrier.wait().await;
                    let wrong_token = Fencing {
                        epoch: f.epoch,
                        token: fresh_token(),
                    };
                    let wrong_epoch = Fencing {
                        epoch: f.epoch + 1,
                        token: f.token,
                    };
                    let r = match i % 4 {
                        0 => store.complete(&key, f, &outcome(1), LONG).await,
                        1 => store.complete(&key, wrong_token, &outcome(2), LONG).await,
                        2 => store.release(&key, f).await,
                        _ => store.mark_unknown(&key, wrong_epoch, LONG).await,
                    };
                    (i, r.expect("no store error"))
                });
            }
        }
        let mut applied = vec![0; held.len()];
        let mut lost = vec![0; held.len()];
        while let Some(r) = set.join_next().await {
            let (i, r) = r.expect("no panic");
            match r {
                CasOutcome::Applied => applied[i] += 1,
                CasOutcome::Lost => lost[i] += 1,
            }
        }
        for (i, (key, _)) in held.iter().enumerate() {
            let record = store.get(key).await.unwrap().expect("live record");
            match i % 4 {
                0 => {
                    assert_eq!((applied[i], lost[i]), (1, 1), "round {round} key {i}");
                    assert!(matches!(record.state, RecordState::Completed { .. }));
                }
                1 | 3 => {
                    assert_eq!((applied[i], lost[i]), (0, 1), "round {round} key {i}");
                    assert!(matches!(record.state, RecordState::InFlight { .. }));
                }
                _ => {
                    assert_eq!((applied[i], lost[i]), (1, 0), "round {round} key {i}");
                    let again = store
                        .claim(key, &claim_request(LONG, LONG, 3))
                        .await
                        .unwrap();
                    assert!(
                        matches!(again, ClaimOutcome::Acquired { fencing } if fencing.epoch == 2),
                        "a released key is free: {again:?}"
                    );
                }
            }
        }
        let now = store.batch_stats();
        if round >= 4 && now.batches > before.batches {
            break;
        }
    }
    let after = store.batch_stats();
    assert!(after.batches > before.batches, "no batch formed: {after:?}");
    assert_eq!(
        after.rolled_back, before.rolled_back,
        "a compare-and-set miss never rolls a batch back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn two_instances_on_overlapping_keys_never_deadlock() {
    let Some(url) = url() else { return };
    let a = PostgresStore::connect_with_pool_size(&url, 8)
        .await
        .expect("connect");
    let b = PostgresStore::connect_with_pool_size(&url, 8)
        .await
        .expect("connect");
    let (a0, b0) = (a.batch_stats(), b.batch_stats());
    const KEYS: usize = 8;
    const TASKS: usize = 24;
    const ROUNDS: usize = 40;
    let keys: Arc<Vec<_>> = Arc::new((0..KEYS).map(|_| fresh_key("group-commit-pair")).collect());
    let held: Arc<Vec<AtomicBool>> = Arc::new((0..KEYS).map(|_| AtomicBool::new(false)).collect());
    let barrier = Arc::new(Barrier::new(2 * TASKS));
    let mut set = tokio::task::JoinSet::new();
    for t in 0..2 * TASKS {
        let store = if t % 2 == 0 { a.clone() } else { b.clone() };
        let (keys, held, barrier) = (keys.clone(), held.clone(), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            let mut acquired = 0;
            for r in 0..ROUNDS {
                let k = (t * 5 + r * 3) % KEYS;
                let claim = store
                    .claim(&keys[k], &claim_request(LONG, LONG, 9))
                    .await
                    .expect("claim: no store error (a deadlock would be one)");
                if let ClaimOutcome::Acquired { fencing } = claim {
                    assert!(
                        !held[k].swap(true, Ordering::SeqCst),
                        "two holders of key {k} at once"
                    );
                    acquired += 1;
                    if r % 5 == 0 {
                        let renewed = store.renew(&keys[k], fencing, LONG).await.expect("renew");
                        assert_eq!(renewed, CasOutcome::Applied);
                    }
                    held[k].store(false, Ordering::SeqCst);
                    let released = store.release(&keys[k], fencing).await.expect("release");
                    assert_eq!(released, CasOutcome::Applied);
                }
            }
            acquired
        });
    }
    let mut acquired = 0;
    while let Some(r) = set.join_next().await {
        acquired += r.expect("no panic");
    }
    assert!(acquired > 0);
    let (a1, b1) = (a.batch_stats(), b.batch_stats());
    eprintln!("acquired {acquired}; instance a: {a1:?}; instance b: {b1:?}");
    assert!(
        a1.batches + b1.batches > a0.batches + b0.batches,
        "no batch formed"
    );
    assert_eq!(
        (a1.rolled_back, b1.rolled_back),
        (a0.rolled_back, b0.rolled_back),
        "no batch rolled back (a deadlock would)"
    );
}

/// A caller that gives up while its operation waits in the batch queue (its deadline passed)
/// must not have the operation run later: a claim run after its caller left would hold a lease
/// nobody owns. The only batch slot is kept busy by a renewal blocked on a row lock that this
/// test holds in a transaction of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn an_operation_whose_caller_left_while_queued_is_never_run() {
    let Some(url) = url() else { return };
    // A pool of 2: one batch slot.
    let store = PostgresStore::connect_with_pool_size(&url, 2)
        .await
        .expect("connect");
    let (blocker, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let held = fresh_key("group-commit-held");
    let req = claim_request(LONG, LONG, 7);
    let ClaimOutcome::Acquired { fencing } = store.claim(&held, &req).await.expect("claim") else {
        panic!("fresh key existed")
    };
    blocker.batch_execute("BEGIN").await.expect("begin");
    blocker
        .execute(
            "SELECT 1 FROM idemgate_records WHERE store_key = $1 FOR UPDATE",
            &[&held.as_bytes().as_slice()],
        )
        .await
        .expect("lock");
    let renewal = tokio::spawn({
        let store = store.clone();
        async move { store.renew(&held, fencing, LONG).await }
    });
    // Wait until the renewal waits for the row lock (it then holds the only batch slot).
    let mut blocked = false;
    for _ in 0..1000 {
        let waiting: i64 = blocker
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '%idemgate_records%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if waiting > 0 {
            blocked = true;
            break;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(blocked, "the renewal never waited for the lock");
    // A claim whose caller gives up while it is queued behind the busy slot.
    let abandoned = fresh_key("group-commit-abandoned");
    let gave_up = tokio::time::timeout(Duration::from_millis(200), store.claim(&abandoned, &req))
        .await
        .is_err();
    assert!(
        gave_up,
        "the claim was answered while the only slot was busy"
    );
    blocker.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(
        renewal.await.expect("no panic").expect("renew"),
        CasOutcome::Applied
    );
    // The queue is first in, first out: once a later claim is answered, the abandoned one was
    // taken off the queue.
    let later = fresh_key("group-commit-later");
    assert!(matches!(
        store.claim(&later, &req).await.expect("claim"),
        ClaimOutcome::Acquired { .. }
    ));
    assert!(
        store.get(&abandoned).await.expect("get").is_none(),
        "the abandoned claim ran after its caller left"
    );
}
