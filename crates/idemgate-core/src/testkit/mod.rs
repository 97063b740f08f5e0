//! The store test kit: one conformance suite and one model-based property test for every store.
//!
//! A store crate implements [`Harness`] for its store and invokes [`conformance_tests!`](crate::conformance_tests)
//! (one `#[tokio::test]` per case) and [`model::check_against_model`] in its tests:
//!
//! ```
//! use std::time::Duration;
//! use idemgate_core::testkit::Harness;
//! use idemgate_core::{ManualClock, MemoryStore, StoreKey};
//!
//! struct Mem { store: MemoryStore, clock: ManualClock }
//!
//! impl Harness for Mem {
//!     type Store = MemoryStore;
//!     fn store(&self) -> &MemoryStore { &self.store }
//!     fn controlled_clock(&self) -> bool { true }
//!     async fn advance(&self, d: Duration) { self.clock.advance(d) }
//!     async fn corrupt(&self, _key: &StoreKey) -> bool { false } // no bytes to corrupt
//! }
//!
//! async fn make() -> Option<Mem> {
//!     let clock = ManualClock::new(1_000_000);
//!     Some(Mem { store: MemoryStore::builder().clock(clock.clone()).build(), clock })
//! }
//!
//! // In a test file: idemgate_core::conformance_tests!(make());
//! ```
//!
//! Stores whose clock cannot be moved (Redis, PostgreSQL: the server's clock) return `false` from
//! [`Harness::controlled_clock`]; their `advance` really waits, and the cases keep such waits to a
//! few hundred milliseconds.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::fingerprint::{Algorithm, Fingerprint};
use crate::key::StoreKey;
use crate::store::{ClaimRequest, Store, TakeOverRequest};

pub mod bench;
pub mod cases;
pub mod crash;
pub mod faults;
pub mod harness;
pub mod model;

/// What the suite needs besides the store itself.
pub trait Harness: Send + Sync + 'static {
    /// The store under test.
    type Store: Store + Clone;

    /// The store under test.
    fn store(&self) -> &Self::Store;

    /// Whether [`advance`](Harness::advance) moves an injected clock (instant) rather than waiting
    /// for real time to pass.
    fn controlled_clock(&self) -> bool;

    /// Moves the store's clock forward by at least `d`.
    fn advance(&self, d: Duration) -> impl Future<Output = ()> + Send;

    /// Overwrites the stored bytes of `key` with garbage. Returns `false` when the store keeps no
    /// bytes (the memory store), which makes the corruption case vacuous for it.
    fn corrupt(&self, key: &StoreKey) -> impl Future<Output = bool> + Send;

    /// The largest payload (body plus header names and values, one header) the store keeps:
    /// [`MAX_BODY_LEN`](crate::record::MAX_BODY_LEN) unless the backend holds less (DynamoDB's
    /// items), in which case larger outcomes must be refused with
    /// [`StoreError::value_too_large`](crate::StoreError::value_too_large).
    fn max_payload(&self) -> usize {
        crate::record::MAX_BODY_LEN
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(1);

/// The URL of a test server from the environment variable `var`. Without it, `None` and a line on
/// stderr saying the caller skips — except under CI (`CI` set), where a missing server is a
/// failure, never a skip.
pub fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            assert!(std::env::var_os("CI").is_none(), "{var} must be set in CI");
            eprintln!("SKIPPED: {var} is not set");
            None
        }
    }
}

/// A store key unique to this process run (stores shared between test runs never collide).
pub fn fresh_key(label: &str) -> StoreKey {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = blake3::Hasher::new();
    h.update(label.as_bytes());
    h.update(&n.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(
        &std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .to_le_bytes(),
    );
    StoreKey(*h.finalize().as_bytes())
}

/// A token unique to this process run.
pub fn fresh_token() -> u128 {
    u128::from(COUNTER.fetch_add(1, Ordering::Relaxed)) | (u128::from(std::process::id()) << 64)
}

/// A claim request with the given timings and fingerprint byte.
pub fn claim_request(lease_ttl: Duration, ttl: Duration, fingerprint: u8) -> ClaimRequest {
    ClaimRequest {
        namespace: "testkit".into(),
        scope: "scope#conformance".into(),
        idempotency_key: format!("key-{}", COUNTER.fetch_add(1, Ordering::Relaxed)),
        fingerprint: Fingerprint::from_parts(Algorithm::Blake3, [fingerprint; 32]),
        token: fresh_token(),
        owner: "testkit-owner".into(),
        lease_ttl,
        ttl,
    }
}

/// A takeover request for `expired`.
pub fn take_over_request(expired: crate::record::Fencing, lease_ttl: Duration) -> TakeOverRequest {
    TakeOverRequest {
        expired,
        token: fresh_token(),
        owner: "testkit-taker".into(),
        lease_ttl,
    }
}

/// Generates one `#[tokio::test]` per conformance case.
///
/// The argument is an expression evaluating to a future of `Option<H>` where `H: Harness`, built
/// afresh for every case. `None` skips the case with a message on stderr (a laptop without the
/// server); CI sets the servers' variables and the harness must then fail rather than return `None`.
///
/// `conformance_tests!(make, ignore_if = CFG, "why")` also marks every case `#[ignore = "why"]`
/// when the cfg `CFG` is set, so that a run without the server says so in its summary
/// (`N ignored`); the store crates set such a cfg from a build script when the server's variable
/// is unset (`build-support/service_cfgs.rs`).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr, ignore_if = $cfg:ident, $why:literal) => {
        $crate::conformance_tests!(@all [#[cfg_attr($cfg, ignore = $why)]] $make);
    };
    ($make:expr) => {
        $crate::conformance_tests!(@all [] $make);
    };
    (@all [$($attr:tt)*] $make:expr) => {
        $crate::conformance_tests!(@cases [$($attr)*] $make;
            claim_absent_acquires_epoch_one,
            claim_existing_returns_record_unchanged,
            concurrent_claims_have_exactly_one_winner,
            concurrent_claims_on_distinct_keys_all_win,
            renew_extends_the_lease,
            renew_and_take_over_grow_a_record_that_would_expire_first,
            renew_with_stale_epoch_is_lost,
            renew_with_wrong_token_is_lost,
            complete_stores_the_outcome,
            complete_with_stale_fencing_is_lost,
            complete_twice_keeps_the_first,
            completed_record_never_changes,
            mark_unknown_by_holder,
            mark_unknown_with_stale_fencing_is_lost,
            release_frees_the_key_and_the_next_claim_opens_the_next_epoch,
            release_with_stale_fencing_is_lost,
            reclaim_after_release_fences_the_old_holder,
            take_over_refused_while_lease_is_live,
            take_over_after_expiry_grants_next_epoch,
            take_over_happens_once_per_epoch,
            old_holder_loses_after_take_over,
            take_over_with_wrong_fencing_is_refused,
            completed_record_expires_after_ttl,
            unknown_record_expires_after_its_ttl,
            in_flight_record_expires_after_ttl,
            delete_removes_finished_records_in_every_mode,
            delete_refuses_what_its_mode_does_not_cover,
            forced_delete_revokes_the_holder_and_opens_the_next_epoch,
            delete_of_absent_key_is_absent,
            a_revoked_record_can_be_removed,
            complete_unknown_records_the_operators_outcome,
            complete_unknown_refuses_other_states_and_marks,
            complete_unknown_refuses_an_oversized_body,
            concurrent_complete_unknowns_have_exactly_one_winner,
            complete_unknown_never_applies_to_a_later_marking,
            list_pages_cover_every_record,
            list_of_unknown_records_finds_every_one,
            list_skips_expired_records,
            largest_body_round_trips_byte_identical,
            oversized_body_is_refused_with_capacity,
            headers_and_binary_body_round_trip,
            not_replayable_outcome_round_trips,
            purge_removes_only_expired_records,
            corrupt_bytes_are_reported_as_corrupt,
        );
    };
    (@cases $attrs:tt $make:expr; $($case:ident),+ $(,)?) => {
        $( $crate::conformance_tests!(@one $attrs $make; $case); )+
    };
    (@one [$($attr:tt)*] $make:expr; $case:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        $($attr)*
        async fn $case() {
            match $make.await {
                Some(harness) => $crate::testkit::cases::$case(&harness).await,
                None => eprintln!(
                    "SKIPPED {}: the store's server is not configured",
                    stringify!($case)
                ),
            }
        }
    };
}
