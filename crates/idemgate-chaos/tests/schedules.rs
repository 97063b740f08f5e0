//! The short chaos schedule on every store, in takeover and in strict mode: ~20 s of keyed load
//! through real `idemgate serve` processes, a SIGKILL of a random instance every ~2 s, a pause,
//! upstream link faults and (Redis, PostgreSQL) a 3 s store blackhole; the checker must find no
//! violation. The runs are serialised: each uses both cores of the machine.
//!
//! They need the `idemgate` binary (`cargo build -p idemgate`, or `IDEMGATE_BIN`); the Redis
//! runs need `redis-server` (a private one is started), the PostgreSQL runs a server
//! (`IDEMGATE_TEST_POSTGRES_URL`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;

use idemgate_chaos::run::{Recovery, Scenario, StoreKind, run};

/// One schedule at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn server_url(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.trim().is_empty())
}

/// Runs the short schedule and asserts it passed; returns (store kills applied, resource samples).
fn schedule(store: StoreKind, recovery: Recovery) -> (u64, u64) {
    schedule_with(Scenario::short(store, recovery))
}

/// Runs `scenario` (one at a time) and asserts it passed; returns (store kills applied,
/// resource samples).
fn schedule_with(scenario: Scenario) -> (u64, u64) {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome = rt
        .block_on(run(&scenario))
        .unwrap_or_else(|e| panic!("{} could not run: {e:#}", scenario.name));
    let report = &outcome.report;
    eprintln!("{report}");
    assert!(
        report.requests >= 500,
        "too little load to mean anything: {} requests",
        report.requests
    );
    assert!(
        report.faults.get("sigkill").copied().unwrap_or(0) >= 5,
        "the schedule must have killed instances: {:?}",
        report.faults
    );
    assert!(
        report.passed(),
        "{}: {} violation(s); histories:\n{}",
        scenario.name,
        report.violations.len(),
        report.histories.join("\n")
    );
    if scenario.netns {
        assert!(
            report.faults.get("store_blackhole").copied().unwrap_or(0) >= 1,
            "the partitions must have been applied: {:?}",
            report.faults
        );
    }
    (
        report.faults.get("store_sigkill").copied().unwrap_or(0),
        report.resources.samples,
    )
}

#[test]
fn short_schedule_on_the_embedded_store_takeover() {
    let _ = schedule(StoreKind::File, Recovery::Takeover);
}

#[test]
fn short_schedule_on_the_embedded_store_strict() {
    let _ = schedule(StoreKind::File, Recovery::Strict);
}

#[test]
#[cfg_attr(
    no_redis,
    ignore = "IDEMGATE_TEST_REDIS_URL is not set (redis-server needed)"
)]
fn short_schedule_on_redis_takeover() {
    let _ = schedule(StoreKind::Redis, Recovery::Takeover);
}

#[test]
#[cfg_attr(
    no_redis,
    ignore = "IDEMGATE_TEST_REDIS_URL is not set (redis-server needed)"
)]
fn short_schedule_on_redis_strict() {
    let _ = schedule(StoreKind::Redis, Recovery::Strict);
}

#[test]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
fn short_schedule_on_postgres_takeover() {
    let Some(url) = server_url("IDEMGATE_TEST_POSTGRES_URL") else {
        return;
    };
    let _ = schedule(StoreKind::Postgres(url), Recovery::Takeover);
}

#[test]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
fn short_schedule_on_postgres_strict() {
    let Some(url) = server_url("IDEMGATE_TEST_POSTGRES_URL") else {
        return;
    };
    let _ = schedule(StoreKind::Postgres(url), Recovery::Strict);
}

/// Scenario 16: the PostgreSQL server itself dies (SIGKILL of the postmaster and every backend,
/// all at once, a process crash) and restarts from its WAL, under load, with instance kills as well.
#[test]
#[cfg_attr(
    no_postgres,
    ignore = "IDEMGATE_TEST_POSTGRES_URL is not set (PostgreSQL's server binaries needed)"
)]
fn short_schedule_on_a_private_postgres_that_is_killed_strict() {
    let (store_kills, samples) = schedule(StoreKind::PostgresPrivate, Recovery::Strict);
    assert!(store_kills >= 1, "the schedule must have killed PostgreSQL");
    assert!(samples >= 5, "the resources were sampled: {samples}");
}

/// Scenario 22 with real partitions: instances and Redis in network namespaces, an instance
/// (or every instance) cut from the store by blackhole routes while it holds keys; takeover
/// mode, where a partitioned holder's late completion must be fenced out.
#[test]
#[cfg_attr(
    no_redis,
    ignore = "IDEMGATE_TEST_REDIS_URL is not set (redis-server, root and iproute2 needed)"
)]
fn partitions_through_network_namespaces_takeover() {
    let scenario = Scenario::partitions(Recovery::Takeover);
    let (_, samples) = schedule_with(scenario);
    assert!(samples >= 5, "the resources were sampled: {samples}");
}
