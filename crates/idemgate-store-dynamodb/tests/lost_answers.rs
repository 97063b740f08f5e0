//! A write whose answer is lost: the SDK resends the very same request, which now finds its own
//! effect in place (the condition is false). Each operation must recognise that effect (the
//! holder's token for claims and takeovers, the call's `wid` for the others) and report it as
//! applied — never as lost, nor as someone else's claim. moto never loses an answer, so an
//! interceptor turns the first successful answer into a `500` (which the SDK retries).
//! Needs `IDEMGATE_TEST_DYNAMODB_URL` (ignored without it, a failure under CI).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::config::interceptors::BeforeDeserializationInterceptorContextMut;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use bytes::Bytes;
use idemgate_core::Store;
use idemgate_core::clock::{ManualClock, wall_clock};
use idemgate_core::record::{Outcome, RecordState, StoredResponse};
use idemgate_core::store::{
    CasOutcome, ClaimOutcome, DeleteMode, DeleteOutcome, ResolveOutcome, TakeOverOutcome,
    UnknownMark,
};
use idemgate_core::testkit::{claim_request, fresh_key, take_over_request};
use idemgate_store_dynamodb::{DynamoStore, MOTO_MAX_PAYLOAD_BYTES};

/// Turns the next `armed` successful answers into `500 InternalServerError`.
#[derive(Clone, Debug, Default)]
struct LoseAnswers {
    armed: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
}

impl LoseAnswers {
    fn lose_next(&self, n: usize) -> usize {
        self.armed.store(n, Ordering::SeqCst);
        self.lost.load(Ordering::SeqCst)
    }

    fn lost_since(&self, before: usize) -> usize {
        self.lost.load(Ordering::SeqCst) - before
    }
}

impl Intercept for LoseAnswers {
    fn name(&self) -> &'static str {
        "lose-answers"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let response = context.response_mut();
        if response.status().as_u16() == 200
            && self
                .armed
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            *response.status_mut() = 500u16.try_into()?;
            *response.body_mut() = r#"{"__type":"com.amazonaws.dynamodb.v20120810#InternalServerError","message":"answer lost by the test"}"#.into();
            response.headers_mut().remove("x-amz-crc32");
            self.lost.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

async fn store() -> Option<(DynamoStore, ManualClock, LoseAnswers)> {
    let endpoint = common::endpoint()?;
    let table = common::table("lost-answers");
    common::ensure_table(&endpoint, &table).await;
    let clock = ManualClock::new(wall_clock().as_millis());
    let lose = LoseAnswers::default();
    let store = common::builder(&endpoint, &table)
        .clock(clock.clone())
        .max_payload_bytes(MOTO_MAX_PAYLOAD_BYTES)
        .interceptor(lose.clone())
        .connect()
        .await
        .expect("connect to IDEMGATE_TEST_DYNAMODB_URL");
    Some((store, clock, lose))
}

const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(3600);

fn outcome() -> Outcome {
    Outcome::Response(StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
        body: Bytes::from_static(b"charged once"),
    })
}

async fn acquire(
    store: &DynamoStore,
    key: &idemgate_core::StoreKey,
    ttl: Duration,
) -> idemgate_core::record::Fencing {
    match store
        .claim(key, &claim_request(LEASE, ttl, 1))
        .await
        .unwrap()
    {
        ClaimOutcome::Acquired { fencing } => fencing,
        other => panic!("a fresh key was not acquired: {other:?}"),
    }
}

#[tokio::test]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn every_write_whose_answer_was_lost_is_recognised_as_applied() {
    let Some((store, clock, lose)) = store().await else {
        return;
    };

    // A claim of an absent key.
    let key = fresh_key("lost-claim");
    let before = lose.lose_next(1);
    let f = acquire(&store, &key, TTL).await;
    assert_eq!(
        lose.lost_since(before),
        1,
        "the claim's answer was not lost"
    );
    assert_eq!(f.epoch, 1);

    // A renewal, then the completion.
    let before = lose.lose_next(1);
    assert_eq!(
        store.renew(&key, f, LEASE).await.unwrap(),
        CasOutcome::Applied
    );
    assert_eq!(lose.lost_since(before), 1);
    let before = lose.lose_next(1);
    assert_eq!(
        store.complete(&key, f, &outcome(), TTL).await.unwrap(),
        CasOutcome::Applied,
        "a completion that landed was reported lost"
    );
    assert_eq!(lose.lost_since(before), 1);
    let record = store
        .get(&key)
        .await
        .unwrap()
        .expect("the completed record");
    assert!(
        matches!(&record.state, RecordState::Completed { outcome: o, .. } if *o == outcome()),
        "{:?}",
        record.state
    );

    // Outcome-unknown.
    let key = fresh_key("lost-unknown");
    let f = acquire(&store, &key, TTL).await;
    let before = lose.lose_next(1);
    assert_eq!(
        store.mark_unknown(&key, f, TTL).await.unwrap(),
        CasOutcome::Applied
    );
    assert_eq!(lose.lost_since(before), 1);

    // An operator completes it ("it did happen"): the conditional `UpdateItem` lands, its answer
    // is lost, and the resent request finds the call's own `wid`.
    let mark = UnknownMark::of(&store.get(&key).await.unwrap().unwrap()).unwrap();
    let before = lose.lose_next(1);
    assert_eq!(
        store
            .complete_unknown(&key, mark, &outcome(), TTL)
            .await
            .unwrap(),
        ResolveOutcome::Completed,
        "an operator's completion that landed was reported refused"
    );
    assert_eq!(lose.lost_since(before), 1);
    assert!(matches!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::Completed { epoch: 1, .. }
    ));

    // A release, then the claim of the released (free) key at the next epoch: its `PutItem`
    // fails on the condition (not a 200, so not lost); the `UpdateItem` that takes the free key
    // is.
    let key = fresh_key("lost-release");
    let f = acquire(&store, &key, TTL).await;
    let before = lose.lose_next(1);
    assert_eq!(store.release(&key, f).await.unwrap(), CasOutcome::Applied);
    assert_eq!(lose.lost_since(before), 1);
    let before = lose.lose_next(1);
    let again = acquire(&store, &key, TTL).await;
    assert_eq!(lose.lost_since(before), 1);
    assert_eq!(
        again.epoch,
        f.epoch + 1,
        "the free key is claimed at the next epoch"
    );

    // A takeover of an expired lease: its one `UpdateItem` lands, the answer is lost.
    let key = fresh_key("lost-takeover");
    let f = acquire(&store, &key, TTL).await;
    clock.advance(LEASE + Duration::from_secs(1));
    let before = lose.lose_next(1);
    let taken = match store
        .take_over(&key, &take_over_request(f, LEASE))
        .await
        .unwrap()
    {
        TakeOverOutcome::Acquired { fencing } => fencing,
        other => panic!("a takeover that landed was refused: {other:?}"),
    };
    assert_eq!(
        lose.lost_since(before),
        1,
        "the takeover's answer was not lost"
    );
    assert_eq!(taken.epoch, f.epoch + 1);
    assert_eq!(
        store.renew(&key, taken, LEASE).await.unwrap(),
        CasOutcome::Applied
    );

    // A takeover whose new lease outlasts the record: the first `UpdateItem` is refused (the
    // expiry is too short), the step that grows the expiry and takes the key lands and its
    // answer is lost; the resent step is refused, and the next look finds the key ours.
    let key = fresh_key("lost-takeover-grow");
    let f = acquire(&store, &key, Duration::from_secs(12)).await;
    clock.advance(LEASE + Duration::from_secs(1));
    let before = lose.lose_next(1);
    let taken = match store
        .take_over(&key, &take_over_request(f, LEASE))
        .await
        .unwrap()
    {
        TakeOverOutcome::Acquired { fencing } => fencing,
        other => panic!("a takeover that landed was refused: {other:?}"),
    };
    assert_eq!(
        lose.lost_since(before),
        1,
        "the growing step's answer was not lost"
    );
    assert_eq!(taken.epoch, f.epoch + 1);
    assert_eq!(
        store.renew(&key, taken, LEASE).await.unwrap(),
        CasOutcome::Applied
    );

    // An operator's revocation of an in-flight record.
    let key = fresh_key("lost-revoke");
    let f = acquire(&store, &key, TTL).await;
    let before = lose.lose_next(1);
    assert_eq!(
        store.delete(&key, DeleteMode::Force).await.unwrap(),
        DeleteOutcome::Revoked { epoch: f.epoch }
    );
    assert_eq!(lose.lost_since(before), 1);
    assert_eq!(store.renew(&key, f, LEASE).await.unwrap(), CasOutcome::Lost);

    // A delete of a finished record whose first attempt landed reports `Absent` (documented:
    // the item is gone either way).
    let key = fresh_key("lost-delete");
    let f = acquire(&store, &key, TTL).await;
    assert_eq!(
        store.complete(&key, f, &outcome(), TTL).await.unwrap(),
        CasOutcome::Applied
    );
    let before = lose.lose_next(1);
    assert_eq!(
        store.delete(&key, DeleteMode::Finished).await.unwrap(),
        DeleteOutcome::Absent
    );
    assert_eq!(lose.lost_since(before), 1);
    assert!(store.get(&key).await.unwrap().is_none());
}
