//! The conformance cases. Each takes a [`Harness`] and panics with a message on a violation.
//!
//! Timings: cases that do not depend on expiry use leases of a minute and TTLs of an hour; cases
//! that do use [`SHORT_LEASE`] and [`SHORT_TTL`] and move the clock with [`Harness::advance`].

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Harness, claim_request, fresh_key, fresh_token, take_over_request};
use crate::error::ErrorKind;
use crate::key::StoreKey;
use crate::record::{Fencing, MAX_BODY_LEN, Outcome, Record, RecordState, StoredResponse};
use crate::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ListRequest, ResolveOutcome,
    Store, TakeOverOutcome, UnknownMark,
};

/// Lease used by expiry cases.
pub const SHORT_LEASE: Duration = Duration::from_millis(300);
/// Record TTL used by expiry cases.
pub const SHORT_TTL: Duration = Duration::from_millis(900);
/// A margin added to waits so that real clocks are past the boundary.
pub const MARGIN: Duration = Duration::from_millis(150);

const LONG_LEASE: Duration = Duration::from_secs(60);
const LONG_TTL: Duration = Duration::from_secs(3600);

fn long_claim() -> ClaimRequest {
    claim_request(LONG_LEASE, LONG_TTL, 1)
}

fn response(body: &'static [u8]) -> Outcome {
    Outcome::Response(StoredResponse::new(
        201,
        vec![(
            "content-type".into(),
            Bytes::from_static(b"application/json"),
        )],
        Bytes::from_static(body),
    ))
}

async fn acquire<H: Harness>(h: &H, key: &StoreKey, req: &ClaimRequest) -> Fencing {
    match h.store().claim(key, req).await.expect("claim") {
        ClaimOutcome::Acquired { fencing } => fencing,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

async fn get<H: Harness>(h: &H, key: &StoreKey) -> Option<Record> {
    h.store().get(key).await.expect("get")
}

async fn completed<H: Harness>(h: &H, ttl: Duration) -> (StoreKey, Record) {
    let (key, record, _) = completed_by(h, ttl).await;
    (key, record)
}

/// A completed record, and the fencing that completed it.
async fn completed_by<H: Harness>(h: &H, ttl: Duration) -> (StoreKey, Record, Fencing) {
    let key = fresh_key("completed");
    let f = acquire(h, &key, &long_claim()).await;
    let out = h
        .store()
        .complete(&key, f, &response(b"{\"id\":1}"), ttl)
        .await
        .unwrap();
    assert_eq!(out, CasOutcome::Applied);
    (
        key,
        get(h, &key).await.expect("completed record present"),
        f,
    )
}

/// Every holder-only operation with `f` must be refused (`Lost`).
async fn assert_fenced_off<H: Harness>(h: &H, key: &StoreKey, f: Fencing) {
    let store = h.store();
    let stale = response(b"stale");
    assert_eq!(
        store.renew(key, f, LONG_LEASE).await.unwrap(),
        CasOutcome::Lost,
        "renew {f:?}"
    );
    assert_eq!(
        store.complete(key, f, &stale, LONG_TTL).await.unwrap(),
        CasOutcome::Lost,
        "complete {f:?}"
    );
    assert_eq!(
        store.mark_unknown(key, f, LONG_TTL).await.unwrap(),
        CasOutcome::Lost,
        "mark_unknown {f:?}"
    );
    assert_eq!(
        store.release(key, f).await.unwrap(),
        CasOutcome::Lost,
        "release {f:?}"
    );
}

pub async fn claim_absent_acquires_epoch_one<H: Harness>(h: &H) {
    let key = fresh_key("claim");
    let req = long_claim();
    let f = acquire(h, &key, &req).await;
    assert_eq!(
        f,
        Fencing {
            epoch: 1,
            token: req.token
        }
    );
    let r = get(h, &key).await.expect("record exists after claim");
    match r.state {
        RecordState::InFlight {
            fencing,
            ref owner,
            lease_expires_at,
        } => {
            assert_eq!(fencing, f);
            assert_eq!(owner, &req.owner);
            assert!(lease_expires_at > r.created_at);
        }
        ref s => panic!("expected in-flight, got {s:?}"),
    }
    assert_eq!(r.namespace, req.namespace);
    assert_eq!(r.scope, req.scope);
    assert_eq!(r.idempotency_key, req.idempotency_key);
    assert_eq!(r.fingerprint, req.fingerprint);
    assert!(r.expires_at >= r.created_at + LONG_TTL - Duration::from_secs(5));
}

pub async fn claim_existing_returns_record_unchanged<H: Harness>(h: &H) {
    let key = fresh_key("claim-existing");
    let first = long_claim();
    acquire(h, &key, &first).await;
    let before = get(h, &key).await.unwrap();
    let mut second = claim_request(LONG_LEASE, LONG_TTL, 2);
    second.owner = "someone-else".into();
    match h.store().claim(&key, &second).await.unwrap() {
        ClaimOutcome::Existing { record, now } => {
            assert_eq!(
                record, before,
                "claim of an existing key must not change it"
            );
            assert!(now >= record.created_at);
        }
        other => panic!("expected Existing, got {other:?}"),
    }
    assert_eq!(get(h, &key).await.unwrap(), before);
}

pub async fn concurrent_claims_have_exactly_one_winner<H: Harness>(h: &H) {
    let key = fresh_key("race");
    let store = h.store().clone();
    let barrier = Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            let barrier = barrier.clone();
            let req = long_claim();
            tokio::spawn(async move {
                barrier.wait().await;
                store.claim(&key, &req).await.unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    let mut tokens = HashSet::new();
    for t in tasks {
        match t.await.unwrap() {
            ClaimOutcome::Acquired { fencing } => {
                winners += 1;
                tokens.insert(fencing.token);
            }
            ClaimOutcome::Existing { record, .. } => {
                let RecordState::InFlight { fencing, .. } = record.state else {
                    panic!("loser saw {:?}", record.state)
                };
                tokens.insert(fencing.token);
            }
        }
    }
    assert_eq!(winners, 1, "exactly one of 64 racing claims must acquire");
    assert_eq!(tokens.len(), 1, "every loser must see the winner's record");
}

pub async fn concurrent_claims_on_distinct_keys_all_win<H: Harness>(h: &H) {
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = h.store().clone();
            tokio::spawn(async move {
                let key = fresh_key("distinct");
                matches!(
                    store.claim(&key, &long_claim()).await.unwrap(),
                    ClaimOutcome::Acquired { .. }
                )
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap());
    }
}

pub async fn renew_extends_the_lease<H: Harness>(h: &H) {
    let key = fresh_key("renew");
    let f = acquire(h, &key, &claim_request(SHORT_LEASE, LONG_TTL, 1)).await;
    h.advance(SHORT_LEASE * 2 / 3).await;
    assert_eq!(
        h.store().renew(&key, f, SHORT_LEASE).await.unwrap(),
        CasOutcome::Applied
    );
    // Past the original lease, within the renewed one.
    h.advance(SHORT_LEASE * 2 / 3).await;
    let out = h
        .store()
        .take_over(&key, &take_over_request(f, SHORT_LEASE))
        .await
        .unwrap();
    assert!(
        matches!(out, TakeOverOutcome::Refused { .. }),
        "renewed lease taken over: {out:?}"
    );
    match get(h, &key).await.unwrap().state {
        RecordState::InFlight { fencing, .. } => assert_eq!(fencing, f),
        s => panic!("{s:?}"),
    }
}

/// A record never expires under a live lease: a renewal or a takeover whose new lease outlasts
/// the record's TTL makes the record last as long as the lease (stores that cannot compute a
/// maximum in one write, DynamoDB, take a second step for it).
pub async fn renew_and_take_over_grow_a_record_that_would_expire_first<H: Harness>(h: &H) {
    let covers = |r: &Record| match r.state {
        RecordState::InFlight {
            lease_expires_at, ..
        } => r.expires_at >= lease_expires_at,
        _ => false,
    };
    // The record's TTL ends with its first lease; the renewed lease ends later.
    let key = fresh_key("grow-renew");
    let f = acquire(h, &key, &claim_request(SHORT_LEASE, SHORT_LEASE, 1)).await;
    h.advance(SHORT_LEASE / 3).await;
    assert_eq!(
        h.store().renew(&key, f, SHORT_LEASE).await.unwrap(),
        CasOutcome::Applied
    );
    let r = get(h, &key).await.expect("a renewed record is present");
    assert!(covers(&r), "the record must cover the renewed lease: {r:?}");
    if h.controlled_clock() {
        // Past the first expiry, within the renewed lease: still there, still held.
        h.advance(SHORT_LEASE * 2 / 3 + Duration::from_millis(20))
            .await;
        let r = get(h, &key)
            .await
            .expect("the record lasts as long as its lease");
        assert!(matches!(r.state, RecordState::InFlight { fencing, .. } if fencing == f));
    }
    // A takeover with a lease longer than what is left of the record.
    let key = fresh_key("grow-takeover");
    let old = acquire(h, &key, &claim_request(SHORT_LEASE, SHORT_TTL, 1)).await;
    h.advance(SHORT_LEASE + MARGIN).await;
    let TakeOverOutcome::Acquired { fencing: new } = h
        .store()
        .take_over(&key, &take_over_request(old, LONG_LEASE))
        .await
        .unwrap()
    else {
        panic!("the lease lapsed: the takeover must succeed")
    };
    let r = get(h, &key).await.expect("a taken-over record is present");
    assert!(covers(&r), "the record must cover the new lease: {r:?}");
    if h.controlled_clock() {
        h.advance(SHORT_TTL).await;
        let r = get(h, &key)
            .await
            .expect("the record lasts as long as its lease");
        assert!(matches!(r.state, RecordState::InFlight { fencing, .. } if fencing == new));
    }
}

pub async fn renew_with_stale_epoch_is_lost<H: Harness>(h: &H) {
    let key = fresh_key("renew-stale");
    let f = acquire(h, &key, &long_claim()).await;
    let stale = Fencing {
        epoch: f.epoch + 1,
        ..f
    };
    assert_eq!(
        h.store().renew(&key, stale, LONG_LEASE).await.unwrap(),
        CasOutcome::Lost
    );
    let absent = fresh_key("renew-absent");
    assert_eq!(
        h.store().renew(&absent, f, LONG_LEASE).await.unwrap(),
        CasOutcome::Lost
    );
    assert_eq!(
        get(h, &absent).await,
        None,
        "renew must not create a record"
    );
}

pub async fn renew_with_wrong_token_is_lost<H: Harness>(h: &H) {
    let key = fresh_key("renew-token");
    let f = acquire(h, &key, &long_claim()).await;
    let before = get(h, &key).await.unwrap();
    let other = Fencing {
        token: fresh_token(),
        ..f
    };
    assert_eq!(
        h.store().renew(&key, other, LONG_LEASE).await.unwrap(),
        CasOutcome::Lost
    );
    assert_eq!(get(h, &key).await.unwrap(), before);
}

pub async fn complete_stores_the_outcome<H: Harness>(h: &H) {
    let key = fresh_key("complete");
    let f = acquire(h, &key, &long_claim()).await;
    let outcome = response(b"{\"charged\":true}");
    assert_eq!(
        h.store()
            .complete(&key, f, &outcome, LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Applied
    );
    let r = get(h, &key).await.unwrap();
    match r.state {
        RecordState::Completed {
            epoch,
            outcome: ref got,
            completed_at,
        } => {
            assert_eq!(epoch, 1);
            assert_eq!(got, &outcome);
            assert!(completed_at >= r.created_at);
            assert!(r.expires_at >= completed_at + LONG_TTL - Duration::from_secs(5));
        }
        ref s => panic!("expected completed, got {s:?}"),
    }
}

pub async fn complete_with_stale_fencing_is_lost<H: Harness>(h: &H) {
    let key = fresh_key("complete-stale");
    let f = acquire(h, &key, &long_claim()).await;
    let before = get(h, &key).await.unwrap();
    for bad in [
        Fencing { epoch: 2, ..f },
        Fencing { epoch: 0, ..f },
        Fencing {
            token: fresh_token(),
            ..f
        },
    ] {
        assert_eq!(
            h.store()
                .complete(&key, bad, &response(b"x"), LONG_TTL)
                .await
                .unwrap(),
            CasOutcome::Lost
        );
    }
    assert_eq!(get(h, &key).await.unwrap(), before);
}

pub async fn complete_twice_keeps_the_first<H: Harness>(h: &H) {
    let key = fresh_key("complete-twice");
    let f = acquire(h, &key, &long_claim()).await;
    let first = response(b"first");
    assert_eq!(
        h.store().complete(&key, f, &first, LONG_TTL).await.unwrap(),
        CasOutcome::Applied
    );
    assert_eq!(
        h.store()
            .complete(&key, f, &response(b"second"), LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Lost
    );
    match get(h, &key).await.unwrap().state {
        RecordState::Completed { outcome, .. } => assert_eq!(outcome, first),
        s => panic!("{s:?}"),
    }
}

pub async fn completed_record_never_changes<H: Harness>(h: &H) {
    let (key, before, completer) = completed_by(h, LONG_TTL).await;
    match h.store().claim(&key, &long_claim()).await.unwrap() {
        ClaimOutcome::Existing { record, .. } => assert_eq!(record, before),
        other => panic!("{other:?}"),
    }
    // Not even the fencing that completed it, nor the next epoch, may change it.
    let next = Fencing {
        epoch: completer.epoch + 1,
        ..completer
    };
    for f in [completer, next] {
        assert_fenced_off(h, &key, f).await;
        assert!(matches!(
            h.store()
                .take_over(&key, &take_over_request(f, LONG_LEASE))
                .await
                .unwrap(),
            TakeOverOutcome::Refused { .. }
        ));
    }
    assert_eq!(get(h, &key).await.unwrap(), before);
}

pub async fn mark_unknown_by_holder<H: Harness>(h: &H) {
    let key = fresh_key("unknown");
    let f = acquire(h, &key, &long_claim()).await;
    assert_eq!(
        h.store().mark_unknown(&key, f, LONG_TTL).await.unwrap(),
        CasOutcome::Applied
    );
    match get(h, &key).await.unwrap().state {
        RecordState::Unknown { epoch, .. } => assert_eq!(epoch, 1),
        s => panic!("{s:?}"),
    }
    // Unknown is final for its holder too.
    assert_eq!(
        h.store()
            .complete(&key, f, &response(b"late"), LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Lost
    );
    assert_eq!(h.store().release(&key, f).await.unwrap(), CasOutcome::Lost);
}

pub async fn mark_unknown_with_stale_fencing_is_lost<H: Harness>(h: &H) {
    let key = fresh_key("unknown-stale");
    let f = acquire(h, &key, &long_claim()).await;
    let bad = Fencing {
        token: fresh_token(),
        ..f
    };
    assert_eq!(
        h.store().mark_unknown(&key, bad, LONG_TTL).await.unwrap(),
        CasOutcome::Lost
    );
    assert!(matches!(
        get(h, &key).await.unwrap().state,
        RecordState::InFlight { .. }
    ));
}

pub async fn release_frees_the_key_and_the_next_claim_opens_the_next_epoch<H: Harness>(h: &H) {
    let key = fresh_key("release");
    let f = acquire(h, &key, &long_claim()).await;
    assert_eq!(
        h.store().release(&key, f).await.unwrap(),
        CasOutcome::Applied
    );
    // A free key with its epoch as the floor: held by nobody, its lease over.
    let Some(record) = get(h, &key).await else {
        panic!("a released key keeps its epoch floor")
    };
    assert!(
        matches!(record.state, RecordState::InFlight { fencing, .. }
            if fencing == Fencing { epoch: f.epoch, token: Fencing::REVOKED }),
        "{:?}",
        record.state
    );
    // Claimed again (any fingerprint) at the next epoch, never the released one: the upstream
    // may have seen it (a transient answer).
    let again = claim_request(LONG_LEASE, LONG_TTL, 2);
    assert_eq!(
        acquire(h, &key, &again).await,
        Fencing {
            epoch: f.epoch + 1,
            token: again.token
        }
    );
}

pub async fn release_with_stale_fencing_is_lost<H: Harness>(h: &H) {
    let key = fresh_key("release-stale");
    let f = acquire(h, &key, &long_claim()).await;
    let bad = Fencing { epoch: 7, ..f };
    assert_eq!(
        h.store().release(&key, bad).await.unwrap(),
        CasOutcome::Lost
    );
    assert!(get(h, &key).await.is_some());
}

pub async fn reclaim_after_release_fences_the_old_holder<H: Harness>(h: &H) {
    let key = fresh_key("reclaim");
    let old = acquire(h, &key, &long_claim()).await;
    assert_eq!(
        h.store().release(&key, old).await.unwrap(),
        CasOutcome::Applied
    );
    let new = acquire(h, &key, &long_claim()).await;
    assert_eq!(
        new.epoch,
        old.epoch + 1,
        "an epoch is never reused after a release"
    );
    // The old holder must not touch the new record.
    assert_fenced_off(h, &key, old).await;
    match get(h, &key).await.unwrap().state {
        RecordState::InFlight { fencing, .. } => assert_eq!(fencing, new),
        s => panic!("{s:?}"),
    }
}

pub async fn take_over_refused_while_lease_is_live<H: Harness>(h: &H) {
    let key = fresh_key("takeover-live");
    let f = acquire(h, &key, &claim_request(SHORT_LEASE, LONG_TTL, 1)).await;
    match h
        .store()
        .take_over(&key, &take_over_request(f, SHORT_LEASE))
        .await
        .unwrap()
    {
        TakeOverOutcome::Refused {
            current: Some(r), ..
        } => {
            assert!(matches!(r.state, RecordState::InFlight { fencing, .. } if fencing == f));
        }
        other => panic!("take over of a live lease: {other:?}"),
    }
}

pub async fn take_over_after_expiry_grants_next_epoch<H: Harness>(h: &H) {
    let key = fresh_key("takeover");
    let f = acquire(h, &key, &claim_request(SHORT_LEASE, LONG_TTL, 1)).await;
    h.advance(SHORT_LEASE + MARGIN).await;
    let req = take_over_request(f, LONG_LEASE);
    match h.store().take_over(&key, &req).await.unwrap() {
        TakeOverOutcome::Acquired { fencing } => {
            assert_eq!(
                fencing,
                Fencing {
                    epoch: 2,
                    token: req.token
                }
            );
        }
        other => panic!("{other:?}"),
    }
    let r = get(h, &key).await.unwrap();
    match r.state {
        RecordState::InFlight {
            fencing, ref owner, ..
        } => {
            assert_eq!(fencing.epoch, 2);
            assert_eq!(owner, &req.owner);
        }
        ref s => panic!("{s:?}"),
    }
}

pub async fn take_over_happens_once_per_epoch<H: Harness>(h: &H) {
    let key = fresh_key("takeover-race");
    let f = acquire(h, &key, &claim_request(SHORT_LEASE, LONG_TTL, 1)).await;
    h.advance(SHORT_LEASE + MARGIN).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(16));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = h.store().clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .take_over(&key, &take_over_request(f, LONG_LEASE))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        if let TakeOverOutcome::Acquired { fencing } = t.await.unwrap() {
            assert_eq!(fencing.epoch, 2);
            winners += 1;
        }
    }
    assert_eq!(
        winners, 1,
        "exactly one of 16 racing takeovers of one epoch must win"
    );
}

pub async fn old_holder_loses_after_take_over<H: Harness>(h: &H) {
    let key = fresh_key("takeover-fence");
    let old = acquire(h, &key, &claim_request(SHORT_LEASE, LONG_TTL, 1)).await;
    h.advance(SHORT_LEASE + MARGIN).await;
    let TakeOverOutcome::Acquired { fencing: new } = h
        .store()
        .take_over(&key, &take_over_request(old, LONG_LEASE))
        .await
        .unwrap()
    else {
        panic!("take over failed")
    };
    assert_fenced_off(h, &key, old).await;
    let store = h.store();
    assert_eq!(
        store
            .complete(&key, new, &response(b"fresh"), LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Applied
    );
    match get(h, &key).await.unwrap().state {
        RecordState::Completed { epoch, outcome, .. } => {
            assert_eq!(epoch, 2);
            assert_eq!(outcome, response(b"fresh"));
        }
        s => panic!("{s:?}"),
    }
}

pub async fn take_over_with_wrong_fencing_is_refused<H: Harness>(h: &H) {
    let key = fresh_key("takeover-wrong");
    let f = acquire(h, &key, &claim_request(SHORT_LEASE, LONG_TTL, 1)).await;
    h.advance(SHORT_LEASE + MARGIN).await;
    for bad in [
        Fencing { epoch: 2, ..f },
        Fencing {
            token: fresh_token(),
            ..f
        },
    ] {
        assert!(matches!(
            h.store()
                .take_over(&key, &take_over_request(bad, LONG_LEASE))
                .await
                .unwrap(),
            TakeOverOutcome::Refused {
                current: Some(_),
                ..
            }
        ));
    }
    let absent = fresh_key("takeover-absent");
    assert!(matches!(
        h.store()
            .take_over(&absent, &take_over_request(f, LONG_LEASE))
            .await
            .unwrap(),
        TakeOverOutcome::Refused { current: None, .. }
    ));
    assert_eq!(get(h, &absent).await, None);
}

pub async fn completed_record_expires_after_ttl<H: Harness>(h: &H) {
    let (key, _) = completed(h, SHORT_TTL).await;
    h.advance(SHORT_TTL + MARGIN).await;
    assert_eq!(get(h, &key).await, None, "expired record must be absent");
    let req = long_claim();
    assert_eq!(
        acquire(h, &key, &req).await,
        Fencing {
            epoch: 1,
            token: req.token
        }
    );
}

pub async fn unknown_record_expires_after_its_ttl<H: Harness>(h: &H) {
    let key = fresh_key("unknown-ttl");
    let f = acquire(h, &key, &long_claim()).await;
    assert_eq!(
        h.store().mark_unknown(&key, f, SHORT_TTL).await.unwrap(),
        CasOutcome::Applied
    );
    assert!(get(h, &key).await.is_some());
    h.advance(SHORT_TTL + MARGIN).await;
    assert_eq!(get(h, &key).await, None);
}

pub async fn in_flight_record_expires_after_ttl<H: Harness>(h: &H) {
    let key = fresh_key("inflight-ttl");
    let f = acquire(h, &key, &claim_request(SHORT_LEASE, SHORT_TTL, 1)).await;
    h.advance(SHORT_TTL + MARGIN).await;
    assert_eq!(get(h, &key).await, None);
    // The expired holder is fenced off, and the key is new again.
    assert_eq!(
        h.store()
            .complete(&key, f, &response(b"late"), LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Lost
    );
    acquire(h, &key, &long_claim()).await;
}

async fn delete<H: Harness>(h: &H, key: &StoreKey, mode: DeleteMode) -> DeleteOutcome {
    h.store().delete(key, mode).await.expect("delete")
}

pub async fn delete_removes_finished_records_in_every_mode<H: Harness>(h: &H) {
    let (done, _) = completed(h, LONG_TTL).await;
    assert_eq!(
        delete(h, &done, DeleteMode::Finished).await,
        DeleteOutcome::Deleted
    );
    assert_eq!(get(h, &done).await, None);
    acquire(h, &done, &long_claim()).await;
    for mode in [DeleteMode::Finished, DeleteMode::Unknown] {
        let key = fresh_key("delete-unknown");
        let f = acquire(h, &key, &long_claim()).await;
        let marked = h.store().mark_unknown(&key, f, LONG_TTL).await.unwrap();
        assert_eq!(marked, CasOutcome::Applied);
        assert_eq!(delete(h, &key, mode).await, DeleteOutcome::Deleted);
        assert_eq!(get(h, &key).await, None);
    }
}

pub async fn delete_refuses_what_its_mode_does_not_cover<H: Harness>(h: &H) {
    let key = fresh_key("delete-in-flight");
    let f = acquire(h, &key, &long_claim()).await;
    for mode in [DeleteMode::Finished, DeleteMode::Unknown] {
        let DeleteOutcome::Refused { current } = delete(h, &key, mode).await else {
            panic!("{mode:?} must refuse an in-flight record");
        };
        assert!(matches!(current.state, RecordState::InFlight { fencing, .. } if fencing == f));
    }
    // Nothing changed: the holder still holds it, and no claim gets in.
    assert_eq!(
        h.store().renew(&key, f, LONG_LEASE).await.unwrap(),
        CasOutcome::Applied
    );
    assert!(matches!(
        h.store().claim(&key, &long_claim()).await.unwrap(),
        ClaimOutcome::Existing { .. }
    ));
    // Force only revokes: an outcome that landed meanwhile is kept; Unknown only removes
    // outcome-unknown records.
    let (done, _) = completed(h, LONG_TTL).await;
    for mode in [DeleteMode::Unknown, DeleteMode::Force] {
        assert!(
            matches!(delete(h, &done, mode).await, DeleteOutcome::Refused { .. }),
            "{mode:?} must keep a completed record"
        );
    }
    assert!(get(h, &done).await.is_some());
    let key = fresh_key("delete-force-unknown");
    let f = acquire(h, &key, &long_claim()).await;
    h.store().mark_unknown(&key, f, LONG_TTL).await.unwrap();
    assert!(matches!(
        delete(h, &key, DeleteMode::Force).await,
        DeleteOutcome::Refused { .. }
    ));
}

pub async fn a_revoked_record_can_be_removed<H: Harness>(h: &H) {
    for mode in [DeleteMode::Finished, DeleteMode::Force] {
        let key = fresh_key("delete-revoked");
        acquire(h, &key, &long_claim()).await;
        assert!(matches!(
            delete(h, &key, DeleteMode::Force).await,
            DeleteOutcome::Revoked { .. }
        ));
        assert!(matches!(
            delete(h, &key, DeleteMode::Unknown).await,
            DeleteOutcome::Refused { .. }
        ));
        assert_eq!(delete(h, &key, mode).await, DeleteOutcome::Deleted);
        assert_eq!(get(h, &key).await, None);
        acquire(h, &key, &long_claim()).await;
    }
}

pub async fn forced_delete_revokes_the_holder_and_opens_the_next_epoch<H: Harness>(h: &H) {
    let key = fresh_key("delete-force");
    let f = acquire(h, &key, &long_claim()).await;
    assert_eq!(
        delete(h, &key, DeleteMode::Force).await,
        DeleteOutcome::Revoked { epoch: f.epoch }
    );
    // The old holder is fenced off from every compare-and-set.
    let store = h.store();
    assert_eq!(
        store.renew(&key, f, LONG_LEASE).await.unwrap(),
        CasOutcome::Lost
    );
    assert_eq!(
        store
            .complete(&key, f, &response(b"late"), LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Lost
    );
    assert_eq!(
        store.mark_unknown(&key, f, LONG_TTL).await.unwrap(),
        CasOutcome::Lost
    );
    assert_eq!(store.release(&key, f).await.unwrap(), CasOutcome::Lost);
    // The revoked fencing is held by nobody either.
    let revoked = Fencing {
        epoch: f.epoch,
        token: Fencing::REVOKED,
    };
    assert_eq!(
        store.renew(&key, revoked, LONG_LEASE).await.unwrap(),
        CasOutcome::Lost
    );
    assert_eq!(
        store
            .complete(&key, revoked, &response(b"forged"), LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Lost
    );
    // The revoked record is a free key with its epoch as the floor: it is still there (never
    // epoch 1 again), and the next claim, of any fingerprint, acquires it at epoch + 1.
    let record = get(h, &key)
        .await
        .expect("a revoked record keeps its epoch floor");
    assert!(
        matches!(record.state, RecordState::InFlight { fencing, .. } if fencing == revoked),
        "{:?}",
        record.state
    );
    let next_claim = claim_request(LONG_LEASE, LONG_TTL, 2);
    let next = acquire(h, &key, &next_claim).await;
    assert_eq!(next.epoch, f.epoch + 1);
    assert_eq!(
        store
            .complete(&key, next, &response(b"second"), LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Applied
    );
    // Taking over from the revoked fencing is refused once someone holds the next epoch.
    assert!(matches!(
        store
            .take_over(&key, &take_over_request(revoked, LONG_LEASE))
            .await
            .unwrap(),
        TakeOverOutcome::Refused { .. }
    ));
}

pub async fn delete_of_absent_key_is_absent<H: Harness>(h: &H) {
    for mode in [DeleteMode::Finished, DeleteMode::Unknown, DeleteMode::Force] {
        assert_eq!(
            delete(h, &fresh_key("delete-absent"), mode).await,
            DeleteOutcome::Absent
        );
    }
}

/// An outcome-unknown record (claimed with `req`, marked with `ttl`), its mark, and the fencing
/// of the holder that could not tell.
async fn unknown_by<H: Harness>(
    h: &H,
    req: &ClaimRequest,
    ttl: Duration,
) -> (StoreKey, UnknownMark, Fencing) {
    let key = fresh_key("complete-unknown");
    let f = acquire(h, &key, req).await;
    assert_eq!(
        h.store().mark_unknown(&key, f, ttl).await.unwrap(),
        CasOutcome::Applied
    );
    let record = get(h, &key).await.expect("outcome-unknown record present");
    let mark = UnknownMark::of(&record).expect("outcome-unknown");
    assert_eq!(mark.epoch, f.epoch);
    (key, mark, f)
}

async fn complete_unknown<H: Harness>(
    h: &H,
    key: &StoreKey,
    mark: UnknownMark,
    outcome: &Outcome,
    ttl: Duration,
) -> ResolveOutcome {
    h.store()
        .complete_unknown(key, mark, outcome, ttl)
        .await
        .expect("complete_unknown")
}

pub async fn complete_unknown_records_the_operators_outcome<H: Harness>(h: &H) {
    let req = long_claim();
    let (key, mark, f) = unknown_by(h, &req, LONG_TTL).await;
    let before = get(h, &key).await.unwrap();
    let outcome = Outcome::Response(StoredResponse::new(
        201,
        vec![
            (
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            ),
            ("location".into(), Bytes::from_static(b"/orders/7")),
        ],
        Bytes::from_static(b"{\"id\":7}"),
    ));
    assert_eq!(
        complete_unknown(h, &key, mark, &outcome, LONG_TTL).await,
        ResolveOutcome::Completed
    );
    let after = get(h, &key).await.expect("the completed record");
    match &after.state {
        RecordState::Completed {
            epoch,
            outcome: stored,
            ..
        } => {
            assert_eq!(
                *epoch, mark.epoch,
                "completed at the epoch that could not tell"
            );
            assert_eq!(stored, &outcome, "byte-identical outcome");
        }
        s => panic!("expected completed, got {s:?}"),
    }
    assert_eq!(after.fingerprint, before.fingerprint);
    assert_eq!(after.created_at, before.created_at);
    assert_eq!(after.idempotency_key, before.idempotency_key);
    // Retries now find the outcome (a claim of any fingerprint gets the record unchanged).
    match h.store().claim(&key, &long_claim()).await.unwrap() {
        ClaimOutcome::Existing { record, .. } => assert_eq!(record, after),
        other => panic!("expected the completed record, got {other:?}"),
    }
    // Completed records never change: the same mark again, the old holder, another outcome.
    let ResolveOutcome::Refused { current } =
        complete_unknown(h, &key, mark, &response(b"second"), LONG_TTL).await
    else {
        panic!("a completed record must not be completed again");
    };
    assert_eq!(*current, after);
    assert_eq!(
        h.store()
            .complete(&key, f, &response(b"late"), LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Lost
    );
    assert_eq!(get(h, &key).await, Some(after));
}

pub async fn complete_unknown_refuses_other_states_and_marks<H: Harness>(h: &H) {
    let store = h.store();
    // Absent.
    let absent = fresh_key("complete-unknown-absent");
    let any = UnknownMark {
        epoch: 1,
        since: crate::clock::Timestamp(1),
    };
    assert_eq!(
        complete_unknown(h, &absent, any, &response(b"x"), LONG_TTL).await,
        ResolveOutcome::Absent
    );
    assert_eq!(get(h, &absent).await, None);
    // In flight: refused, and the holder still holds it.
    let key = fresh_key("complete-unknown-in-flight");
    let f = acquire(h, &key, &long_claim()).await;
    let ResolveOutcome::Refused { current } =
        complete_unknown(h, &key, any, &response(b"x"), LONG_TTL).await
    else {
        panic!("an in-flight record must be refused");
    };
    assert!(matches!(current.state, RecordState::InFlight { fencing, .. } if fencing == f));
    assert_eq!(
        store.renew(&key, f, LONG_LEASE).await.unwrap(),
        CasOutcome::Applied
    );
    // Completed by its holder: refused, unchanged.
    let (done, record) = completed(h, LONG_TTL).await;
    assert!(matches!(
        complete_unknown(h, &done, any, &response(b"x"), LONG_TTL).await,
        ResolveOutcome::Refused { .. }
    ));
    assert_eq!(get(h, &done).await, Some(record));
    // Outcome-unknown, but another epoch or another marking instant: refused, unchanged.
    let (key, mark, _) = unknown_by(h, &long_claim(), LONG_TTL).await;
    let unknown = get(h, &key).await.unwrap();
    for wrong in [
        UnknownMark {
            epoch: mark.epoch + 1,
            ..mark
        },
        UnknownMark {
            since: crate::clock::Timestamp(mark.since.0 + 1),
            ..mark
        },
        UnknownMark {
            since: crate::clock::Timestamp(mark.since.0.saturating_sub(1)),
            ..mark
        },
    ] {
        let ResolveOutcome::Refused { current } =
            complete_unknown(h, &key, wrong, &response(b"x"), LONG_TTL).await
        else {
            panic!("{wrong:?} is not the record's mark {mark:?}");
        };
        assert_eq!(*current, unknown);
    }
    assert_eq!(get(h, &key).await, Some(unknown));
    // Revoked by an operator (a free key with an epoch floor): refused.
    let key = fresh_key("complete-unknown-revoked");
    acquire(h, &key, &long_claim()).await;
    assert!(matches!(
        store.delete(&key, DeleteMode::Force).await.unwrap(),
        DeleteOutcome::Revoked { .. }
    ));
    assert!(matches!(
        complete_unknown(h, &key, any, &response(b"x"), LONG_TTL).await,
        ResolveOutcome::Refused { .. }
    ));
}

pub async fn complete_unknown_refuses_an_oversized_body<H: Harness>(h: &H) {
    let (key, mark, _) = unknown_by(h, &long_claim(), LONG_TTL).await;
    let limit = h.max_payload().min(MAX_BODY_LEN);
    let over = Outcome::Response(StoredResponse::new(200, vec![], vec![0u8; limit + 1]));
    let err = h
        .store()
        .complete_unknown(&key, mark, &over, LONG_TTL)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Capacity);
    assert!(err.is_value_too_large(), "{err}");
    // Still outcome-unknown, and still resolvable.
    assert_eq!(
        get(h, &key).await.as_ref().and_then(UnknownMark::of),
        Some(mark)
    );
    assert_eq!(
        complete_unknown(h, &key, mark, &response(b"fits"), LONG_TTL).await,
        ResolveOutcome::Completed
    );
}

pub async fn concurrent_complete_unknowns_have_exactly_one_winner<H: Harness>(h: &H) {
    let (key, mark, _) = unknown_by(h, &long_claim(), LONG_TTL).await;
    let tasks: Vec<_> = (0u8..8)
        .map(|i| {
            let store = h.store().clone();
            tokio::spawn(async move {
                let outcome = Outcome::Response(StoredResponse::new(200, vec![], vec![i]));
                let got = store
                    .complete_unknown(&key, mark, &outcome, LONG_TTL)
                    .await
                    .unwrap();
                (i, got)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        let (i, got) = t.await.unwrap();
        match got {
            ResolveOutcome::Completed => winners.push(i),
            ResolveOutcome::Refused { current } => assert!(
                matches!(current.state, RecordState::Completed { .. }),
                "a loser sees the winner's record: {current:?}"
            ),
            ResolveOutcome::Absent => panic!("the record was there"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one resolution applies: {winners:?}"
    );
    match get(h, &key).await.unwrap().state {
        RecordState::Completed {
            outcome: Outcome::Response(r),
            ..
        } => assert_eq!(r.body.as_ref(), [winners[0]]),
        s => panic!("{s:?}"),
    }
}

pub async fn complete_unknown_never_applies_to_a_later_marking<H: Harness>(h: &H) {
    // The first marking expires; the key is claimed and marked again (at epoch 1 again): the
    // operator's decision about the first marking must not complete the second.
    let req = claim_request(LONG_LEASE, LONG_TTL, 1);
    let key = fresh_key("complete-unknown-later");
    let f = acquire(h, &key, &req).await;
    assert_eq!(
        h.store().mark_unknown(&key, f, SHORT_TTL).await.unwrap(),
        CasOutcome::Applied
    );
    let first = UnknownMark::of(&get(h, &key).await.unwrap()).unwrap();
    h.advance(SHORT_TTL + MARGIN).await;
    assert_eq!(
        complete_unknown(h, &key, first, &response(b"x"), LONG_TTL).await,
        ResolveOutcome::Absent,
        "an expired record is absent"
    );
    let g = acquire(h, &key, &long_claim()).await;
    assert_eq!(
        h.store().mark_unknown(&key, g, LONG_TTL).await.unwrap(),
        CasOutcome::Applied
    );
    let second = get(h, &key).await.unwrap();
    let second_mark = UnknownMark::of(&second).unwrap();
    assert_ne!(second_mark, first);
    assert!(matches!(
        complete_unknown(h, &key, first, &response(b"x"), LONG_TTL).await,
        ResolveOutcome::Refused { .. }
    ));
    assert_eq!(get(h, &key).await, Some(second));
    // A resolved record expires after the TTL given.
    assert_eq!(
        complete_unknown(h, &key, second_mark, &response(b"y"), SHORT_TTL).await,
        ResolveOutcome::Completed
    );
    assert!(get(h, &key).await.is_some());
    h.advance(SHORT_TTL + MARGIN).await;
    assert_eq!(get(h, &key).await, None);
}

async fn list_all<H: Harness>(h: &H, page: usize) -> Vec<(StoreKey, Record)> {
    list_all_of(h, page, false).await.0
}

/// Every page of a listing: the records, and the sum of the pages' `passed_over`.
async fn list_all_of<H: Harness>(
    h: &H,
    page: usize,
    only_unknown: bool,
) -> (Vec<(StoreKey, Record)>, usize) {
    let mut out = Vec::new();
    let mut passed_over = 0;
    let mut cursor = None;
    for _ in 0..100_000 {
        let p = h
            .store()
            .list(&ListRequest {
                cursor: cursor.take(),
                limit: page,
                only_unknown,
            })
            .await
            .unwrap();
        assert!(p.records.len() <= page, "page larger than the limit");
        if !only_unknown {
            assert_eq!(p.passed_over, 0, "nothing is left out of a plain listing");
        }
        passed_over += p.passed_over;
        out.extend(p.records);
        match p.next {
            Some(c) => cursor = Some(c),
            None => return (out, passed_over),
        }
    }
    panic!("listing did not finish");
}

pub async fn list_of_unknown_records_finds_every_one<H: Harness>(h: &H) {
    let mut unknown = HashSet::new();
    let mut others = HashSet::new();
    for i in 0..24 {
        let key = fresh_key("list-unknown");
        let g = acquire(h, &key, &long_claim()).await;
        match i % 3 {
            0 => {
                assert_eq!(
                    h.store().mark_unknown(&key, g, LONG_TTL).await.unwrap(),
                    CasOutcome::Applied
                );
                unknown.insert(key);
            }
            1 => {
                assert_eq!(
                    h.store()
                        .complete(&key, g, &response(b"done"), LONG_TTL)
                        .await
                        .unwrap(),
                    CasOutcome::Applied
                );
                others.insert(key);
            }
            _ => {
                others.insert(key);
            }
        }
    }
    let (listed, passed_over) = list_all_of(h, 5, true).await;
    let listed_keys: HashSet<StoreKey> = listed.iter().map(|(k, _)| *k).collect();
    assert!(
        unknown.is_subset(&listed_keys),
        "every outcome-unknown record must be listed"
    );
    for (k, r) in &listed {
        if unknown.contains(k) {
            assert!(matches!(r.state, RecordState::Unknown { .. }));
            assert_eq!(get(h, k).await.as_ref(), Some(r));
        }
    }
    // A store either leaves the other records out (and counts them) or lists them.
    let left_out = others.iter().filter(|k| !listed_keys.contains(k)).count();
    assert!(
        passed_over >= left_out,
        "{left_out} records left out but only {passed_over} counted as passed over"
    );
}

pub async fn list_pages_cover_every_record<H: Harness>(h: &H) {
    let mut mine = HashSet::new();
    for _ in 0..25 {
        let key = fresh_key("list");
        acquire(h, &key, &long_claim()).await;
        mine.insert(key);
    }
    let listed = list_all(h, 7).await;
    let listed_keys: HashSet<StoreKey> = listed.iter().map(|(k, _)| *k).collect();
    assert!(mine.is_subset(&listed_keys), "every record must be listed");
    for (k, r) in &listed {
        if mine.contains(k) {
            assert_eq!(get(h, k).await.as_ref(), Some(r));
        }
    }
}

pub async fn list_skips_expired_records<H: Harness>(h: &H) {
    let (gone, _) = completed(h, SHORT_TTL).await;
    let (kept, _) = completed(h, LONG_TTL).await;
    h.advance(SHORT_TTL + MARGIN).await;
    let keys: HashSet<StoreKey> = list_all(h, 50).await.into_iter().map(|(k, _)| k).collect();
    assert!(keys.contains(&kept));
    assert!(!keys.contains(&gone), "expired records must not be listed");
}

pub async fn largest_body_round_trips_byte_identical<H: Harness>(h: &H) {
    let key = fresh_key("largest");
    let f = acquire(h, &key, &long_claim()).await;
    let header = ("x-large".to_string(), Bytes::from_static(b"1"));
    // Header name and value take 8 bytes: the payload is exactly the store's largest.
    let body: Vec<u8> = (0..h.max_payload() - 8)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    let outcome = Outcome::Response(StoredResponse::new(200, vec![header], body));
    assert_eq!(
        h.store()
            .complete(&key, f, &outcome, LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Applied
    );
    match get(h, &key).await.unwrap().state {
        RecordState::Completed { outcome: got, .. } => {
            assert!(got == outcome, "largest body differs")
        }
        s => panic!("{s:?}"),
    }
}

pub async fn oversized_body_is_refused_with_capacity<H: Harness>(h: &H) {
    let key = fresh_key("oversized");
    let f = acquire(h, &key, &long_claim()).await;
    let outcome = Outcome::Response(StoredResponse::new(
        200,
        vec![],
        vec![0u8; MAX_BODY_LEN + 1],
    ));
    let err = h
        .store()
        .complete(&key, f, &outcome, LONG_TTL)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Capacity);
    assert!(err.is_value_too_large(), "{err}");
    // A store that keeps less than MAX_BODY_LEN refuses just over its own limit the same way.
    if h.max_payload() < MAX_BODY_LEN {
        let over = Outcome::Response(StoredResponse::new(
            200,
            vec![],
            vec![0u8; h.max_payload() + 1],
        ));
        let err = h
            .store()
            .complete(&key, f, &over, LONG_TTL)
            .await
            .unwrap_err();
        assert!(err.is_value_too_large(), "{err}");
    }
    // The holder can still record something else.
    assert!(matches!(
        get(h, &key).await.unwrap().state,
        RecordState::InFlight { .. }
    ));
    assert_eq!(
        h.store().mark_unknown(&key, f, LONG_TTL).await.unwrap(),
        CasOutcome::Applied
    );
}

pub async fn headers_and_binary_body_round_trip<H: Harness>(h: &H) {
    let key = fresh_key("binary");
    let f = acquire(h, &key, &long_claim()).await;
    let outcome = Outcome::Response(StoredResponse::new(
        418,
        vec![
            ("x-dup".into(), Bytes::from_static(b"1")),
            ("x-empty".into(), Bytes::new()),
            ("x-dup".into(), Bytes::from_static(b"2")),
            ("x-latin1".into(), Bytes::from_static(b"caf\xe9")),
        ],
        Bytes::from_static(b"\x00\xff\xfe binary \r\n\x00"),
    ));
    assert_eq!(
        h.store()
            .complete(&key, f, &outcome, LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Applied
    );
    match get(h, &key).await.unwrap().state {
        RecordState::Completed { outcome: got, .. } => assert_eq!(got, outcome),
        s => panic!("{s:?}"),
    }
}

pub async fn not_replayable_outcome_round_trips<H: Harness>(h: &H) {
    let key = fresh_key("tombstone");
    let f = acquire(h, &key, &long_claim()).await;
    let outcome = Outcome::NotReplayable {
        status: 200,
        reason: "response over 8 MiB".into(),
    };
    assert_eq!(
        h.store()
            .complete(&key, f, &outcome, LONG_TTL)
            .await
            .unwrap(),
        CasOutcome::Applied
    );
    match get(h, &key).await.unwrap().state {
        RecordState::Completed { outcome: got, .. } => assert_eq!(got, outcome),
        s => panic!("{s:?}"),
    }
}

pub async fn purge_removes_only_expired_records<H: Harness>(h: &H) {
    let (gone, _) = completed(h, SHORT_TTL).await;
    let (kept, kept_record) = completed(h, LONG_TTL).await;
    h.advance(SHORT_TTL + MARGIN).await;
    let mut total = 0;
    loop {
        let n = h.store().purge_expired(100).await.unwrap();
        total += n;
        if n < 100 {
            break;
        }
    }
    let _ = total; // stores with native expiry may report 0
    assert_eq!(get(h, &gone).await, None);
    assert_eq!(get(h, &kept).await, Some(kept_record));
}

pub async fn corrupt_bytes_are_reported_as_corrupt<H: Harness>(h: &H) {
    let (key, _) = completed(h, LONG_TTL).await;
    if !h.corrupt(&key).await {
        return; // the store keeps no bytes (memory): nothing can rot
    }
    let err = h
        .store()
        .get(&key)
        .await
        .expect_err("garbage must not decode");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    let err = h
        .store()
        .claim(&key, &long_claim())
        .await
        .expect_err("claim on garbage");
    assert_eq!(err.kind(), ErrorKind::Corrupt);
    // An administrator can still remove it.
    h.store().delete(&key, DeleteMode::Finished).await.unwrap();
    assert_eq!(get(h, &key).await, None);
}
