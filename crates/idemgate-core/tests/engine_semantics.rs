//! The engine's policy on the memory store: replay, mismatch, waiting and rejecting, heartbeats,
//! takeover and strict recovery, cancellation safety, classification and bounds.
//!
//! Time-dependent tests run on tokio's paused clock with a [`TokioClock`] store, so leases and
//! timeouts play out on one controllable timeline without real sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::ptr_arg)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use idemgate_core::engine::{
    Concurrency, Disposition, Engine, EngineError, Execution, Policy, Recorded, Recovery,
};
use idemgate_core::record::{MAX_BODY_LEN, Outcome, RecordState, StoredResponse};
use idemgate_core::store::{ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, Store};
use idemgate_core::{
    Fingerprint, FingerprintOptions, IdempotencyKey, MemoryStore, Scope, ScopedKey, TokioClock,
};
use tokio::sync::oneshot;

fn key(k: &str) -> ScopedKey {
    ScopedKey::new(
        "test",
        Scope::new("tenant"),
        IdempotencyKey::parse(k).unwrap(),
    )
}

fn fp(body: &str) -> Fingerprint {
    FingerprintOptions::default()
        .builder()
        .method("POST")
        .path("/pay")
        .body(body.as_bytes())
        .finish()
}

fn store_it(v: &String) -> Disposition {
    Disposition::Store(Outcome::Response(StoredResponse::new(
        200,
        vec![],
        Bytes::from(v.clone()),
    )))
}

fn body_of<T: std::fmt::Debug>(e: Execution<T>) -> Bytes {
    match e {
        Execution::Replayed {
            outcome: Outcome::Response(r),
            ..
        } => r.body,
        other => panic!("expected a replay, got {other:?}"),
    }
}

fn paused_engine() -> Engine<MemoryStore> {
    let store = MemoryStore::builder().clock(TokioClock::new()).build();
    Engine::builder(store)
        .lease_ttl(Duration::from_secs(3))
        .build()
}

#[tokio::test]
async fn executes_once_then_replays_and_refuses_other_payloads() {
    let engine = Engine::builder(MemoryStore::default()).build();
    let runs = Arc::new(AtomicUsize::new(0));
    let k = key("k1");
    for attempt in 0..3 {
        let runs = runs.clone();
        let out = engine
            .run(
                &k,
                fp("a"),
                &Policy::default(),
                store_it,
                move |d| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    format!("epoch {}", d.epoch)
                },
            )
            .await
            .unwrap();
        if attempt == 0 {
            assert!(
                matches!(out, Execution::Executed { ref value, epoch: 1, recorded: Recorded::Stored } if value == "epoch 1")
            );
        } else {
            assert_eq!(body_of(out), "epoch 1");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let other = engine
        .run(&k, fp("b"), &Policy::default(), store_it, |_| async {
            unreachable!("a mismatched retry must not run")
        })
        .await
        .unwrap();
    assert!(matches!(other, Execution::Mismatch { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_duplicates_run_once_and_agree() {
    let engine = Engine::builder(MemoryStore::default()).build();
    let runs = Arc::new(AtomicUsize::new(0));
    let (open_tx, open_rx) = oneshot::channel::<()>();
    let open_rx = Arc::new(tokio::sync::Mutex::new(Some(open_rx)));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let engine = engine.clone();
            let runs = runs.clone();
            let open_rx = open_rx.clone();
            tokio::spawn(async move {
                let out = engine
                    .run(
                        &key("dup"),
                        fp("x"),
                        &Policy::default(),
                        store_it,
                        move |_| async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            // Hold the key until every duplicate is waiting.
                            if let Some(rx) = open_rx.lock().await.take() {
                                let _ = rx.await;
                            }
                            "receipt".to_string()
                        },
                    )
                    .await
                    .unwrap();
                match out {
                    Execution::Executed { value, .. } => Bytes::from(value),
                    other => body_of(other),
                }
            })
        })
        .collect();
    // Signal: the 63 duplicates are registered as waiters.
    while engine.stats().waiting.load(Ordering::SeqCst) < 63 {
        tokio::task::yield_now().await;
    }
    open_tx.send(()).unwrap();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "receipt");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(engine.stats().waiting.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn reject_mode_answers_in_flight_at_once() {
    let engine = paused_engine();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let first = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .run(
                    &key("rej"),
                    fp("x"),
                    &Policy::default(),
                    store_it,
                    |_| async move {
                        started_tx.send(()).unwrap();
                        let _ = release_rx.await;
                        "done".to_string()
                    },
                )
                .await
        })
    };
    started_rx.await.unwrap();
    let policy = Policy {
        concurrency: Concurrency::Reject,
        ..Policy::default()
    };
    let before = tokio::time::Instant::now();
    let out = engine
        .run(&key("rej"), fp("x"), &policy, store_it, |_| async {
            unreachable!()
        })
        .await
        .unwrap();
    assert_eq!(before.elapsed(), Duration::ZERO, "reject must not wait");
    match out {
        Execution::InFlight { retry_after } => assert!(retry_after >= Duration::from_secs(1)),
        other => panic!("{other:?}"),
    }
    release_tx.send(()).unwrap();
    assert!(matches!(
        first.await.unwrap().unwrap(),
        Execution::Executed { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn wait_mode_gives_up_after_the_wait_timeout() {
    let engine = paused_engine();
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let holder = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .run(
                    &key("slow"),
                    fp("x"),
                    &Policy::default(),
                    store_it,
                    |_| async move {
                        started_tx.send(()).unwrap();
                        tokio::time::sleep(Duration::from_secs(600)).await;
                        "slow".to_string()
                    },
                )
                .await
        })
    };
    started_rx.await.unwrap();
    let policy = Policy {
        concurrency: Concurrency::Wait {
            timeout: Duration::from_secs(7),
        },
        ..Policy::default()
    };
    let before = tokio::time::Instant::now();
    let out = engine
        .run(&key("slow"), fp("x"), &policy, store_it, |_| async {
            unreachable!()
        })
        .await
        .unwrap();
    assert!(matches!(out, Execution::InFlight { .. }), "{out:?}");
    let waited = before.elapsed();
    assert!(
        waited >= Duration::from_secs(7) && waited < Duration::from_secs(9),
        "{waited:?}"
    );
    holder.abort();
}

#[tokio::test(start_paused = true)]
async fn a_live_operation_is_never_taken_over_however_long_it_runs() {
    let engine = paused_engine(); // lease 3 s, renewed every 1 s
    let runs = Arc::new(AtomicUsize::new(0));
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let holder = {
        let engine = engine.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            engine
                .run(
                    &key("long"),
                    fp("x"),
                    &Policy::default(),
                    store_it,
                    move |_| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        started_tx.send(()).unwrap();
                        tokio::time::sleep(Duration::from_secs(21)).await; // 7 leases
                        "long".to_string()
                    },
                )
                .await
        })
    };
    started_rx.await.unwrap();
    // A second engine (another "instance") on the same store waits the whole time.
    let other = Engine::builder(engine.store().clone())
        .lease_ttl(Duration::from_secs(3))
        .build();
    let runs2 = runs.clone();
    let out = other
        .run(
            &key("long"),
            fp("x"),
            &Policy::default(),
            store_it,
            move |_| async move {
                runs2.fetch_add(1, Ordering::SeqCst);
                "duplicate".to_string()
            },
        )
        .await
        .unwrap();
    assert_eq!(body_of(out), "long");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(engine.stats().renewals.load(Ordering::SeqCst) >= 18);
    assert_eq!(other.stats().takeovers.load(Ordering::SeqCst), 0);
    assert!(matches!(
        holder.await.unwrap().unwrap(),
        Execution::Executed { epoch: 1, .. }
    ));
}

/// Claims `k` directly in the store, as a holder that then dies without renewing.
async fn dead_holder(engine: &Engine<MemoryStore>, k: &ScopedKey, body: &str) {
    let req = ClaimRequest::new(
        k,
        fp(body),
        42,
        "doomed",
        Duration::from_secs(3),
        Duration::from_secs(3600),
    );
    assert!(matches!(
        engine.store().claim(&k.store_key(), &req).await.unwrap(),
        ClaimOutcome::Acquired { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn a_waiting_retry_takes_over_a_dead_holder_at_the_next_epoch() {
    let engine = paused_engine();
    let k = key("orphan");
    dead_holder(&engine, &k, "x").await;
    let before = tokio::time::Instant::now();
    let out = engine
        .run(&k, fp("x"), &Policy::default(), store_it, |d| async move {
            format!("epoch {}", d.epoch)
        })
        .await
        .unwrap();
    match out {
        Execution::Executed {
            value,
            epoch,
            recorded,
        } => {
            assert_eq!(
                (value.as_str(), epoch, recorded),
                ("epoch 2", 2, Recorded::Stored)
            );
        }
        other => panic!("{other:?}"),
    }
    // It took over when the 3 s lease ran out, not at the 30 s wait timeout.
    assert!(
        before.elapsed() < Duration::from_secs(5),
        "{:?}",
        before.elapsed()
    );
    assert_eq!(engine.stats().takeovers.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn strict_recovery_marks_a_dead_holders_key_unknown() {
    let engine = paused_engine();
    let k = key("strict");
    dead_holder(&engine, &k, "x").await;
    let policy = Policy {
        recovery: Recovery::Strict,
        ..Policy::default()
    };
    let out = engine
        .run(&k, fp("x"), &policy, store_it, |_| async {
            unreachable!("strict never re-runs")
        })
        .await
        .unwrap();
    assert!(matches!(out, Execution::Unknown { .. }), "{out:?}");
    let again = engine
        .run(&k, fp("x"), &Policy::default(), store_it, |_| async {
            unreachable!()
        })
        .await
        .unwrap();
    assert!(matches!(again, Execution::Unknown { .. }));
    assert_eq!(engine.stats().marked_unknown.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_caller_does_not_lose_the_outcome() {
    let engine = paused_engine();
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let caller = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .run(
                    &key("gone"),
                    fp("x"),
                    &Policy::default(),
                    store_it,
                    |_| async move {
                        started_tx.send(()).unwrap();
                        let _ = finish_rx.await;
                        let _ = done_tx.send(());
                        "kept".to_string()
                    },
                )
                .await
        })
    };
    started_rx.await.unwrap();
    caller.abort(); // the client disconnects
    assert!(caller.await.unwrap_err().is_cancelled());
    finish_tx.send(()).unwrap();
    done_rx.await.unwrap();
    // The outcome is recorded although nobody awaited it; a retry waits for it if needed.
    let out = engine
        .run(
            &key("gone"),
            fp("x"),
            &Policy::default(),
            store_it,
            |_| async { unreachable!() },
        )
        .await
        .unwrap();
    assert_eq!(body_of(out), "kept");
}

#[tokio::test]
async fn classification_decides_release_and_unknown() {
    let engine = Engine::builder(MemoryStore::default()).build();
    let runs = Arc::new(AtomicUsize::new(0));
    let classify = |v: &u16| match *v {
        503 => Disposition::Release,
        0 => Disposition::Unknown,
        s => Disposition::Store(Outcome::Response(StoredResponse::new(s, vec![], "ok"))),
    };
    // Transient: released, so the retry runs again.
    for expected_runs in 1..=2 {
        let counter = runs.clone();
        let out = engine
            .run(
                &key("transient"),
                fp("x"),
                &Policy::default(),
                classify,
                move |_| async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    503u16
                },
            )
            .await
            .unwrap();
        assert!(matches!(
            out,
            Execution::Executed {
                recorded: Recorded::Released,
                ..
            }
        ));
        assert_eq!(runs.load(Ordering::SeqCst), expected_runs);
    }
    // Unknown: never re-run.
    let out = engine
        .run(
            &key("unsure"),
            fp("x"),
            &Policy::default(),
            classify,
            |_| async { 0u16 },
        )
        .await
        .unwrap();
    assert!(matches!(
        out,
        Execution::Executed {
            recorded: Recorded::MarkedUnknown,
            ..
        }
    ));
    let out = engine
        .run(
            &key("unsure"),
            fp("x"),
            &Policy::default(),
            classify,
            |_| async { unreachable!() },
        )
        .await
        .unwrap();
    assert!(matches!(out, Execution::Unknown { .. }));
    // Counted once, when it was marked (a retry that finds it is not a new one).
    let marked = &engine.stats().marked_unknown;
    assert_eq!(marked.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_panicking_operation_leaves_an_unknown_record() {
    let engine = Engine::builder(MemoryStore::default()).build();
    let err = engine
        .run(
            &key("boom"),
            fp("x"),
            &Policy::default(),
            store_it,
            |_| async {
                if true {
                    panic!("operation failed hard");
                }
                String::new()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::OperationPanicked));
    let rec = engine
        .store()
        .get(&key("boom").store_key())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(rec.state, RecordState::Unknown { .. }));
}

#[tokio::test]
async fn an_unstorable_outcome_becomes_a_not_replayable_tombstone() {
    let engine = Engine::builder(MemoryStore::default()).build();
    let huge = |_: &()| {
        Disposition::Store(Outcome::Response(StoredResponse::new(
            201,
            vec![],
            vec![0u8; MAX_BODY_LEN + 1],
        )))
    };
    let out = engine
        .run(&key("huge"), fp("x"), &Policy::default(), huge, |_| async {
        })
        .await
        .unwrap();
    assert!(matches!(
        out,
        Execution::Executed {
            recorded: Recorded::Stored,
            ..
        }
    ));
    let retry = engine
        .run(&key("huge"), fp("x"), &Policy::default(), huge, |_| async {
            unreachable!()
        })
        .await
        .unwrap();
    assert!(matches!(
        retry,
        Execution::Replayed {
            outcome: Outcome::NotReplayable { status: 201, .. },
            ..
        }
    ));
}

#[tokio::test(start_paused = true)]
async fn deleting_a_running_key_fences_its_holder() {
    let engine = paused_engine();
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let holder = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .run(
                    &key("del"),
                    fp("x"),
                    &Policy::default(),
                    store_it,
                    |_| async move {
                        started_tx.send(()).unwrap();
                        let _ = go_rx.await;
                        "late".to_string()
                    },
                )
                .await
        })
    };
    started_rx.await.unwrap();
    let store_key = key("del").store_key();
    // A plain delete refuses while the first request runs: it would open epoch 1 twice.
    assert!(matches!(
        engine
            .store()
            .delete(&store_key, DeleteMode::Finished)
            .await
            .unwrap(),
        DeleteOutcome::Refused { .. }
    ));
    // A forced one revokes the holder...
    assert_eq!(
        engine
            .store()
            .delete(&store_key, DeleteMode::Force)
            .await
            .unwrap(),
        DeleteOutcome::Revoked { epoch: 1 }
    );
    go_tx.send(()).unwrap();
    let out = holder.await.unwrap().unwrap();
    assert!(
        matches!(
            out,
            Execution::Executed {
                recorded: Recorded::LeaseLost,
                ..
            }
        ),
        "{out:?}"
    );
    // ...and the next retry runs at epoch 2 at once, even under strict recovery (the operator
    // asked for a new run), never at epoch 1 again.
    let strict = Policy {
        recovery: Recovery::Strict,
        ..Policy::default()
    };
    let retry = engine
        .run(&key("del"), fp("x"), &strict, store_it, |d| async move {
            format!("epoch {}", d.epoch)
        })
        .await
        .unwrap();
    assert!(
        matches!(&retry, Execution::Executed { epoch: 2, value, .. } if value == "epoch 2"),
        "{retry:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_beyond_the_bound_are_answered_in_flight() {
    let store = MemoryStore::builder().clock(TokioClock::new()).build();
    let engine = Engine::builder(store).max_waiters(2).build();
    let (started_tx, started_rx) = oneshot::channel::<()>();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let holder = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .run(
                    &key("busy"),
                    fp("x"),
                    &Policy::default(),
                    store_it,
                    |_| async move {
                        started_tx.send(()).unwrap();
                        let _ = go_rx.await;
                        "v".to_string()
                    },
                )
                .await
        })
    };
    started_rx.await.unwrap();
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                engine
                    .run(
                        &key("busy"),
                        fp("x"),
                        &Policy::default(),
                        store_it,
                        |_| async { unreachable!() },
                    )
                    .await
            })
        })
        .collect();
    while engine.stats().waiting.load(Ordering::SeqCst) < 2 {
        tokio::task::yield_now().await;
    }
    let third = engine
        .run(
            &key("busy"),
            fp("x"),
            &Policy::default(),
            store_it,
            |_| async { unreachable!() },
        )
        .await
        .unwrap();
    assert!(matches!(third, Execution::InFlight { .. }), "{third:?}");
    go_tx.send(()).unwrap();
    for w in waiters {
        assert_eq!(body_of(w.await.unwrap().unwrap()), "v");
    }
    holder.await.unwrap().unwrap();
}
