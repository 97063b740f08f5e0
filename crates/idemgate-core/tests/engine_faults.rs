//! The engine against a store that fails or stalls on chosen operations (issue "hardening", G1):
//! recording keeps the lease until it lands, a slow renewal never stalls the operation, a caller
//! that leaves mid-claim leaves no orphan lease, and an abandoned operation is marked
//! outcome-unknown rather than left for a takeover to run again.
//!
//! Time is tokio's paused clock, shared by the store (`TokioClock`) and the engine's timers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::ptr_arg)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use idemgate_core::engine::{Disposition, Execution, Policy, Recorded};
use idemgate_core::record::{Outcome, RecordState, StoredResponse};
use idemgate_core::store::Store;
use idemgate_core::testkit::faults::Faulty;
use idemgate_core::{
    Engine, Fingerprint, FingerprintOptions, IdempotencyKey, MemoryStore, Scope, ScopedKey,
    TokioClock,
};
use tokio::sync::oneshot;

const LEASE: Duration = Duration::from_secs(3);

fn key(k: &str) -> ScopedKey {
    ScopedKey::new("faults", Scope::new("s"), IdempotencyKey::parse(k).unwrap())
}

fn fp() -> Fingerprint {
    FingerprintOptions::default().builder().body(b"x").finish()
}

fn store_it(v: &String) -> Disposition {
    Disposition::Store(Outcome::Response(StoredResponse::new(
        200,
        vec![],
        v.clone(),
    )))
}

/// Whether `k` is a free key (released: held by nobody, its lease over).
async fn is_free(store: &Faulty<MemoryStore>, k: &str) -> bool {
    matches!(
        store.get(&key(k).store_key()).await.unwrap().map(|r| r.state),
        Some(RecordState::InFlight { fencing, .. }) if fencing.is_revoked()
    )
}

fn faulty_engine() -> (Engine<Faulty<MemoryStore>>, Faulty<MemoryStore>) {
    let store = Faulty::new(MemoryStore::builder().clock(TokioClock::new()).build());
    let engine = Engine::builder(store.clone())
        .lease_ttl(LEASE)
        .poll_interval(Duration::from_millis(50), Duration::from_millis(200))
        .build();
    (engine, store)
}

fn strict() -> Policy {
    Policy {
        recovery: idemgate_core::engine::Recovery::Strict,
        ..Policy::default()
    }
}

/// Completions fail for 4 leases (strict recovery): the holder keeps its lease meanwhile (so a
/// waiting retry never takes over and runs the request again), the caller is answered after the
/// first attempts, and the outcome lands once the store takes writes again.
#[tokio::test(start_paused = true)]
async fn a_recording_outage_longer_than_the_lease_runs_nothing_twice() {
    let (engine, store) = faulty_engine();
    let runs = Arc::new(AtomicUsize::new(0));
    store.set_failing("complete", true);
    let first = engine
        .run(&key("rec"), fp(), &strict(), store_it, {
            let runs = runs.clone();
            move |_| async move {
                runs.fetch_add(1, Ordering::SeqCst);
                "charged".to_string()
            }
        })
        .await
        .unwrap();
    assert!(
        matches!(
            first,
            Execution::Executed {
                recorded: Recorded::Failed(_),
                ..
            }
        ),
        "the client is answered while recording goes on: {first:?}"
    );
    // A retry waits while the outcome cannot be written, past several leases.
    let retry = tokio::spawn({
        let engine = engine.clone();
        let runs = runs.clone();
        async move {
            engine
                .run(
                    &key("rec"),
                    fp(),
                    &strict(),
                    store_it,
                    move |_| async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        "charged again".to_string()
                    },
                )
                .await
        }
    });
    tokio::time::sleep(LEASE * 4).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "nothing ran twice during the outage"
    );
    store.set_failing("complete", false);
    let retry = retry.await.unwrap().unwrap();
    match retry {
        Execution::Replayed {
            outcome: Outcome::Response(r),
            ..
        } => assert_eq!(r.body, "charged"),
        other => panic!("the retry must replay the first outcome, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(engine.stats().renewals.load(Ordering::Relaxed) >= 4);
}

/// A store that is full when the outcome is recorded (Redis at `maxmemory`: a `Capacity` error
/// that is not about the value's size; strict recovery, so the caller is answered meanwhile) is
/// retried like an outage: once it takes writes again
/// the response itself is stored and replayed, not a not-replayable tombstone.
#[tokio::test(start_paused = true)]
async fn a_store_full_at_completion_keeps_the_response_once_it_has_room() {
    let (engine, store) = faulty_engine();
    store.set_failing_with("complete", idemgate_core::ErrorKind::Capacity);
    let first = engine
        .run(&key("full"), fp(), &strict(), store_it, |_| async {
            "charged".to_string()
        })
        .await
        .unwrap();
    assert!(
        matches!(
            first,
            Execution::Executed {
                recorded: Recorded::Failed(idemgate_core::ErrorKind::Capacity),
                ..
            }
        ),
        "answered while recording goes on: {first:?}"
    );
    tokio::time::sleep(LEASE).await;
    store.set_failing("complete", false);
    let retry = engine
        .run(&key("full"), fp(), &strict(), store_it, |_| async {
            "charged again".to_string()
        })
        .await
        .unwrap();
    match retry {
        Execution::Replayed {
            outcome: Outcome::Response(r),
            ..
        } => assert_eq!(r.body, "charged"),
        other => panic!("the retry must replay the stored response, got {other:?}"),
    }
}

/// Renewals that take longer than the renew interval: the operation still finishes (and is
/// recorded) as soon as it is done, not after the slow renewal answers.
#[tokio::test(start_paused = true)]
async fn a_slow_renewal_does_not_stall_the_operation() {
    let (engine, store) = faulty_engine();
    store.set_delay("renew", LEASE * 10);
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let started = tokio::time::Instant::now();
    let run = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .run(
                    &key("slow"),
                    fp(),
                    &Policy::default(),
                    store_it,
                    |_| async move {
                        let _ = finish_rx.await;
                        "done".to_string()
                    },
                )
                .await
        }
    });
    // The first renewal starts at LEASE / 3 and hangs; finish the operation while it does.
    tokio::time::sleep(LEASE / 2).await;
    finish_tx.send(()).unwrap();
    let out = run.await.unwrap().unwrap();
    assert!(
        matches!(
            out,
            Execution::Executed {
                recorded: Recorded::Stored,
                ..
            }
        ),
        "{out:?}"
    );
    assert!(
        started.elapsed() < LEASE,
        "answered after {:?}, i.e. after the hanging renewal",
        started.elapsed()
    );
}

/// A caller dropped while its claim is on the wire (a client that disconnected): once the claim
/// lands, the key is given back, so a retry runs at once instead of waiting out a lease.
#[tokio::test(start_paused = true)]
async fn a_caller_that_leaves_mid_claim_leaves_no_orphan_lease() {
    let (engine, store) = faulty_engine();
    store.set_delay("claim", Duration::from_millis(500));
    let ran = Arc::new(AtomicUsize::new(0));
    let gone = tokio::spawn({
        let engine = engine.clone();
        let ran = ran.clone();
        async move {
            engine
                .run(
                    &key("orphan"),
                    fp(),
                    &Policy::default(),
                    store_it,
                    move |_| async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                        "never".to_string()
                    },
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gone.abort(); // the client went away while the claim was in flight
    assert!(gone.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_millis(600)).await; // the claim lands, then the release
    store.set_delay("claim", Duration::ZERO);
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    assert!(
        is_free(&store, "orphan").await,
        "the claim of a caller that left must be released"
    );
    let retry = engine
        .run(
            &key("orphan"),
            fp(),
            &Policy::default(),
            store_it,
            |d| async move { format!("epoch {}", d.epoch) },
        )
        .await
        .unwrap();
    // At the next epoch: a released epoch is never reused.
    assert!(
        matches!(&retry, Execution::Executed { epoch: 2, .. }),
        "{retry:?}"
    );
}

/// A runtime shut down under a running operation (a drain that timed out): the operation is
/// marked outcome-unknown, never left in flight for a takeover to dispatch again.
#[test]
fn an_abandoned_operation_is_marked_unknown() {
    let store = MemoryStore::default();
    let engine = Engine::builder(store.clone()).lease_ttl(LEASE).build();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let worker = std::thread::spawn({
        let engine = engine.clone();
        move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                tokio::spawn(async move {
                    engine
                        .run(
                            &key("abandoned"),
                            fp(),
                            &Policy::default(),
                            store_it,
                            move |_| async move {
                                started_tx.send(()).unwrap();
                                std::future::pending::<String>().await
                            },
                        )
                        .await
                });
                let _ = stop_rx.await;
            });
            // A drain that timed out: the runtime goes away with the operation still running.
            drop(runtime);
        }
    });
    started_rx.recv().unwrap();
    stop_tx.send(()).unwrap();
    worker.join().unwrap();
    let main = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    main.block_on(async {
        assert_eq!(engine.abandon_running().await, 1);
        assert_eq!(engine.stats().marked_unknown.load(Ordering::Relaxed), 1);
        let record = store
            .get(&key("abandoned").store_key())
            .await
            .unwrap()
            .expect("the record is kept");
        assert!(
            matches!(record.state, RecordState::Unknown { epoch: 1, .. }),
            "{:?}",
            record.state
        );
    });
}

/// A claim answered so late that the lease could lapse before its first renewal is given back
/// and the call fails with `Timeout`: never a dispatch on a lease a waiter may take over (G1).
#[tokio::test(start_paused = true)]
async fn a_lease_answered_too_late_is_given_back_not_dispatched_on() {
    let (engine, store) = faulty_engine();
    // The claim lands at once; its answer arrives after lease - renew interval.
    store.set_delay("claim", LEASE - LEASE / 3);
    let ran = Arc::new(AtomicUsize::new(0));
    let err = engine
        .run(&key("late"), fp(), &Policy::default(), store_it, {
            let ran = ran.clone();
            move |_| async move {
                ran.fetch_add(1, Ordering::SeqCst);
                "ran".to_string()
            }
        })
        .await
        .expect_err("a lease that may lapse before its first renewal is not used");
    assert_eq!(err.kind(), idemgate_core::ErrorKind::Timeout);
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    store.set_delay("claim", Duration::ZERO);
    assert!(
        is_free(&store, "late").await,
        "the late lease was given back"
    );
}

/// A store error after the key was found in use is not "the store said nothing": the engine
/// reports it as such, so that fail-open never forwards past a holder.
#[tokio::test(start_paused = true)]
async fn an_error_after_the_key_was_found_is_told_apart() {
    let (engine, store) = faulty_engine();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let holder = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .run(
                    &key("held"),
                    fp(),
                    &Policy::default(),
                    store_it,
                    |_| async move {
                        let _ = release_rx.await;
                        "first".to_string()
                    },
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiter = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .run(
                    &key("held"),
                    fp(),
                    &Policy::default(),
                    store_it,
                    |_| async move { "second".to_string() },
                )
                .await
        }
    });
    // The waiter has read the record (in flight); now its polls fail.
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.set_failing("claim", true);
    let err = waiter.await.unwrap().expect_err("the poll failed");
    assert!(
        matches!(err, idemgate_core::EngineError::StoreAfterRead(_)),
        "{err:?}"
    );
    store.set_failing("claim", false);
    release_tx.send(()).unwrap();
    assert!(matches!(
        holder.await.unwrap().unwrap(),
        Execution::Executed { .. }
    ));
}

/// A classifier that panics leaves no key in flight: the outcome becomes unknown.
#[tokio::test(start_paused = true)]
async fn a_panicking_classifier_marks_the_outcome_unknown() {
    let (engine, store) = faulty_engine();
    let out = engine
        .run(
            &key("panicky"),
            fp(),
            &Policy::default(),
            |_: &String| -> Disposition { panic!("classifier bug") },
            |_| async move { "ran".to_string() },
        )
        .await
        .unwrap();
    assert!(
        matches!(
            out,
            Execution::Executed {
                recorded: Recorded::MarkedUnknown,
                ..
            }
        ),
        "{out:?}"
    );
    let record = store
        .get(&key("panicky").store_key())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(record.state, RecordState::Unknown { .. }));
    assert_eq!(engine.stats().in_flight.load(Ordering::Relaxed), 0);
    assert_eq!(engine.stats().marked_unknown.load(Ordering::Relaxed), 1);
}

/// The give-back of a claim whose caller left works at any epoch: a free key is claimed at its
/// floor + 1, and that claim is given back too (the key stays free, at the new floor).
#[tokio::test(start_paused = true)]
async fn a_caller_that_leaves_mid_claim_of_a_free_key_gives_it_back() {
    let (engine, store) = faulty_engine();
    let k = key("free-orphan").store_key();
    let claim = idemgate_core::testkit::claim_request(LEASE, Duration::from_secs(3600), 1);
    let idemgate_core::store::ClaimOutcome::Acquired { fencing } =
        store.claim(&k, &claim).await.unwrap()
    else {
        panic!("fresh key")
    };
    store.release(&k, fencing).await.unwrap();
    store.set_delay("claim", Duration::from_millis(500));
    let gone = tokio::spawn({
        let engine = engine.clone();
        async move {
            engine
                .run(
                    &key("free-orphan"),
                    fp(),
                    &Policy::default(),
                    store_it,
                    |_| async { "never".to_string() },
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_millis(600)).await;
    store.set_delay("claim", Duration::ZERO);
    let state = store.get(&k).await.unwrap().map(|r| r.state);
    assert!(
        matches!(state, Some(RecordState::InFlight { fencing, .. }) if fencing.is_revoked() && fencing.epoch == 2),
        "the epoch-2 claim of the caller that left must be given back: {state:?}"
    );
}
