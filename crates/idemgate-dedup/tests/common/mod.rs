//! The behaviour every store must give `process_once`, as functions over any store; one test
//! file per store runs them (`process_once_memory.rs`, `process_once_redis.rs`, …).

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use idemgate_core::record::{Outcome, RecordState, StoredResponse};
use idemgate_core::store::CasOutcome;
use idemgate_core::{SharedStore, Store};
use idemgate_dedup::{Action, Deduplicator, Handled, MessageId, Processed, Recorded};
use tokio::sync::{Notify, mpsc, oneshot};

/// A message id unique to this process run (stores shared between runs never collide).
pub fn fresh_id(label: &str) -> MessageId {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    MessageId::new(&format!(
        "{label}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
    .unwrap()
}

fn dedup(store: &SharedStore, lease: Duration) -> Deduplicator<SharedStore> {
    Deduplicator::builder(store.clone())
        .namespace("dedup-tests")
        .lease_ttl(lease)
        .build()
}

/// First delivery runs and records; redeliveries get the recorded result without running.
pub async fn redelivery_gets_the_recorded_result(store: SharedStore) {
    let d = dedup(&store, Duration::from_secs(10));
    let id = fresh_id("redeliver");
    let runs = Arc::new(AtomicUsize::new(0));
    for delivery in 0..4 {
        let runs = runs.clone();
        let p = d
            .process_once("orders", &id, move |dispatch| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                assert_eq!(dispatch.epoch, 1);
                Handled::done(format!("receipt-{delivery}"))
            })
            .await
            .expect("store answers");
        assert_eq!(p.action(), Action::Ack);
        match (delivery, p) {
            (
                0,
                Processed::Ran {
                    epoch: 1,
                    recorded: Recorded::Stored,
                    ..
                },
            ) => {}
            (
                _,
                Processed::Duplicate {
                    outcome: Outcome::Response(r),
                    epoch: 1,
                },
            ) => assert_eq!(r.body, "receipt-0"),
            (n, other) => panic!("delivery {n}: {other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let snap = d.stats().snapshot();
    assert_eq!(snap[0], ("processed", 1));
    assert_eq!(snap[1], ("duplicates", 3));
    // Another consumer processes the same id on its own.
    let p = d
        .process_once("audit", &id, |_| async { Handled::done("audited") })
        .await
        .unwrap();
    assert!(matches!(p, Processed::Ran { epoch: 1, .. }), "{p:?}");
}

/// Concurrent deliveries of one id (real tasks on a multi-thread runtime): exactly one runs;
/// every other one, while it runs, is told "in progress" (nack with a delay); afterwards a
/// delivery gets the recorded result.
pub async fn concurrent_deliveries_run_once(store: SharedStore) {
    let d = dedup(&store, Duration::from_secs(10));
    for round in 0..5 {
        let id = fresh_id(&format!("concurrent-{round}"));
        let runs = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Notify::new());
        let (tx, mut rx) = mpsc::channel(16);
        for _ in 0..16 {
            let (d, id, runs, release, tx) = (
                d.clone(),
                id.clone(),
                runs.clone(),
                release.clone(),
                tx.clone(),
            );
            tokio::spawn(async move {
                let p = d
                    .process_once("orders", &id, move |_| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        // Hold the lease until every other delivery was answered.
                        release.notified().await;
                        Handled::done("once")
                    })
                    .await
                    .unwrap();
                tx.send(p).await.unwrap();
            });
        }
        drop(tx);
        // The runner cannot answer before `release`: the first 15 answers are the others.
        for _ in 0..15 {
            match rx.recv().await.unwrap() {
                Processed::InProgress { retry_after } => {
                    assert!(retry_after >= Duration::from_secs(1))
                }
                other => panic!("round {round}, while held: {other:?}"),
            }
        }
        release.notify_one();
        let last = rx.recv().await.unwrap();
        assert!(
            matches!(
                last,
                Processed::Ran {
                    epoch: 1,
                    recorded: Recorded::Stored,
                    ..
                }
            ),
            "{last:?}"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1, "round {round}");
        let again = d
            .process_once("orders", &id, |_| async { Handled::done("twice") })
            .await
            .unwrap();
        assert!(matches!(again, Processed::Duplicate { .. }), "{again:?}");
    }
    assert_eq!(d.stats().in_progress.load(Ordering::Relaxed), 75);
}

/// A handler that asks for a retry releases the key: the next delivery runs it again (at the
/// next epoch: a released epoch is never reused).
pub async fn retry_releases_the_key(store: SharedStore) {
    let d = dedup(&store, Duration::from_secs(10));
    let id = fresh_id("retry");
    let p = d
        .process_once("orders", &id, |_| async { Handled::Retry })
        .await
        .unwrap();
    assert_eq!(p.action(), Action::Nack { delay: None });
    assert_eq!(p.name(), "retry");
    let p = d
        .process_once("orders", &id, |dispatch| async move {
            Handled::done(format!("epoch {}", dispatch.epoch))
        })
        .await
        .unwrap();
    let Processed::Ran {
        handled: Handled::Done(r),
        recorded: Recorded::Stored,
        epoch,
    } = p
    else {
        panic!("{p:?}")
    };
    assert_eq!(epoch, 2);
    assert_eq!(r.body, "epoch 2");
}

/// An unknown outcome is never run again: the delivery and every redelivery are dead-lettered.
pub async fn unknown_outcome_is_dead_lettered(store: SharedStore) {
    let d = dedup(&store, Duration::from_secs(10));
    let id = fresh_id("unknown");
    let p = d
        .process_once("orders", &id, |_| async { Handled::Unknown })
        .await
        .unwrap();
    assert_eq!(p.action(), Action::DeadLetter);
    let p = d
        .process_once("orders", &id, |_| async {
            panic!("an unknown outcome must not run again")
        })
        .await
        .unwrap();
    assert!(matches!(p, Processed::Unknown { epoch: 1 }), "{p:?}");
    assert_eq!(p.action(), Action::DeadLetter);
    d.dead_lettered();
    assert_eq!(d.stats().dead_lettered.load(Ordering::Relaxed), 1);
}

/// A slow handler keeps its lease by heartbeats, far past the lease length: no other delivery
/// runs it meanwhile.
pub async fn heartbeats_keep_a_slow_handler(store: SharedStore) {
    let lease = Duration::from_millis(600);
    let d = dedup(&store, lease);
    let other = dedup(&store, lease); // another consumer instance (its own engine)
    let id = fresh_id("slow");
    let (started_tx, started_rx) = oneshot::channel();
    let release = Arc::new(Notify::new());
    let runner = {
        let (d, id, release) = (d.clone(), id.clone(), release.clone());
        tokio::spawn(async move {
            d.process_once("orders", &id, move |_| async move {
                let _ = started_tx.send(());
                release.notified().await;
                Handled::done("slow")
            })
            .await
            .unwrap()
        })
    };
    started_rx.await.unwrap();
    let since = std::time::Instant::now();
    // Redeliveries for four lease lengths: all in progress.
    let mut redeliveries = 0;
    while since.elapsed() < lease * 4 {
        let p = other
            .process_once("orders", &id, |_| async {
                panic!("ran while the holder heartbeats")
            })
            .await
            .unwrap();
        assert!(matches!(p, Processed::InProgress { .. }), "{p:?}");
        redeliveries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await; // a broker's redelivery delay
    }
    assert!(redeliveries >= 4);
    release.notify_one();
    let p = runner.await.unwrap();
    assert!(
        matches!(
            p,
            Processed::Ran {
                epoch: 1,
                recorded: Recorded::Stored,
                ..
            }
        ),
        "{p:?}"
    );
    assert!(d.engine().stats().renewals.load(Ordering::Relaxed) >= 3);
}

/// Where the doomed consumer of [`takeover_after_a_crash_is_fenced`] gets its store: the same
/// instance (memory, embedded), or its own connection opened on its own runtime (servers).
pub enum Doomed {
    /// Share this store.
    Same(SharedStore),
    /// Open this URL.
    Url(String),
}

/// A consumer that dies mid-handler (its runtime is dropped, like a SIGKILL: no heartbeat,
/// nothing recorded) leaves a lease; once it expires, a redelivery runs the handler at epoch
/// 2, and the dead holder's late write is fenced off.
pub async fn takeover_after_a_crash_is_fenced(store: SharedStore, doomed: Doomed) {
    let lease = Duration::from_millis(500);
    let id = fresh_id("crash");
    let d = dedup(&store, lease);
    let key = d.scoped_key("orders", &id).store_key();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let id2 = id.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let store = match doomed {
                Doomed::Same(s) => s,
                Doomed::Url(url) => {
                    let (s, _) = idemgate_stores::open(&url).await.unwrap().stack(
                        &idemgate_stores::StackOptions {
                            deadline: Duration::from_secs(5),
                            replay_cache_entries: 0,
                        },
                    );
                    s
                }
            };
            let dead = dedup(&store, lease);
            let (tx, rx) = oneshot::channel();
            tokio::spawn(async move {
                let _ = dead
                    .process_once("orders", &id2, move |_| async move {
                        let _ = tx.send(());
                        std::future::pending::<Handled>().await
                    })
                    .await;
            });
            rx.await.unwrap();
        });
        started_tx.send(()).unwrap();
        drop(rt); // the crash: every task of this consumer stops where it is
    });
    tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
    let stale = match store.get(&key).await.unwrap().map(|r| r.state) {
        Some(RecordState::InFlight { fencing, .. }) => fencing,
        other => panic!("{other:?}"),
    };
    assert_eq!(stale.epoch, 1);
    // Redeliveries (a broker's delay apart) until one takes over.
    let mut in_progress = 0;
    let processed = loop {
        let p = d
            .process_once("orders", &id, |dispatch| async move {
                Handled::done(format!("took over at {}", dispatch.epoch))
            })
            .await
            .unwrap();
        match p {
            Processed::InProgress { .. } => {
                in_progress += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    assert!(
        in_progress >= 1,
        "the dead holder's lease was honoured first"
    );
    assert!(
        matches!(
            processed,
            Processed::Ran {
                epoch: 2,
                recorded: Recorded::Stored,
                ..
            }
        ),
        "{processed:?}"
    );
    assert_eq!(d.stats().reexecutions.load(Ordering::Relaxed), 1);
    // The dead holder's late write (a paused process waking up) is refused.
    let late = Outcome::Response(StoredResponse::new(200, vec![], "stale"));
    let cas = store
        .complete(&key, stale, &late, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cas, CasOutcome::Lost);
    let p = d
        .process_once("orders", &id, |_| async { panic!("ran a third time") })
        .await
        .unwrap();
    match p {
        Processed::Duplicate {
            outcome: Outcome::Response(r),
            epoch: 2,
        } => assert_eq!(r.body, "took over at 2"),
        other => panic!("{other:?}"),
    }
}

/// Runs every case above on `store`.
pub async fn all(store: SharedStore, doomed: Doomed) {
    redelivery_gets_the_recorded_result(store.clone()).await;
    concurrent_deliveries_run_once(store.clone()).await;
    retry_releases_the_key(store.clone()).await;
    unknown_outcome_is_dead_lettered(store.clone()).await;
    heartbeats_keep_a_slow_handler(store.clone()).await;
    takeover_after_a_crash_is_fenced(store, doomed).await;
}
