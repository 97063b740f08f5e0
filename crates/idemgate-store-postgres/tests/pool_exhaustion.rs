//! Scenario 18 of RELIABILITY.md: a pool of 2 connections and 500 operations at once. The queue
//! for a connection is bounded in time (`POOL_TIMEOUT`): every operation either runs (claimed
//! first) or fails with a store error (the proxy's `503` + `Retry-After`) before anything ran,
//! and nothing runs without its claim.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use idemgate_core::engine::{Disposition, Execution, Policy};
use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::{
    Engine, EngineError, ErrorKind, FingerprintOptions, IdempotencyKey, Scope, ScopedKey,
};
use idemgate_store_postgres::PostgresStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn five_hundred_operations_on_a_pool_of_two_run_claimed_or_fail_cleanly() {
    let Some(url) = idemgate_core::testkit::server_url("IDEMGATE_TEST_POSTGRES_URL") else {
        return;
    };
    let store = PostgresStore::connect_with_pool_size(&url, 2)
        .await
        .expect("connect");
    let engine = Engine::builder(store).build();
    let ran = Arc::new(AtomicUsize::new(0));
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..500 {
        let engine = engine.clone();
        let ran = ran.clone();
        tasks.spawn(async move {
            let key = ScopedKey::new(
                format!("pool-{run_id}"),
                Scope::new("s"),
                IdempotencyKey::parse(&format!("k{i}")).unwrap(),
            );
            let fp = FingerprintOptions::default().builder().body(b"x").finish();
            engine
                .run(
                    &key,
                    fp,
                    &Policy::default(),
                    |v: &u8| {
                        Disposition::Store(Outcome::Response(StoredResponse::new(
                            201,
                            vec![],
                            vec![*v],
                        )))
                    },
                    move |_| async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                        1u8
                    },
                )
                .await
        });
    }
    let (mut executed, mut refused) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        match done.expect("no panic") {
            Ok(Execution::Executed { .. }) => executed += 1,
            Ok(other) => panic!("a fresh key is executed, got {other:?}"),
            // Refused before anything ran: the pool's bounded wait.
            Err(EngineError::Store(e)) => {
                assert!(
                    matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
                    "{e}"
                );
                refused += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(executed + refused, 500);
    assert_eq!(
        ran.load(Ordering::SeqCst),
        executed,
        "every run had its claim, no run without one"
    );
    assert!(executed > 0, "the pool served some");
    eprintln!(
        "pool of 2, 500 at once: {executed} executed, {refused} refused by the pool's bounded wait"
    );
}
