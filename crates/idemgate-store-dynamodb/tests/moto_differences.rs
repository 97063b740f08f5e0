//! The DynamoDB behaviours this store relies on, checked against the test server
//! (`IDEMGATE_TEST_DYNAMODB_URL`) with plain SDK calls, so that a compatible server that differs
//! from DynamoDB's documentation is caught here rather than as a flaky store test. The
//! differences found in moto are listed in the crate docs ("moto (the test server) and AWS").

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};

async fn raw_client(endpoint: &str, table: &str) -> Client {
    common::ensure_table(endpoint, table).await;
    let store = common::builder(endpoint, table).connect().await.unwrap();
    store.sdk_client().clone()
}

fn pk(k: u64) -> AttributeValue {
    let mut raw = [0u8; 32];
    raw[..8].copy_from_slice(&k.to_be_bytes());
    raw[8..16].copy_from_slice(&u64::from(std::process::id()).to_be_bytes());
    AttributeValue::B(Blob::new(raw.to_vec()))
}

/// DynamoDB evaluates a conditional write atomically: of concurrent `attribute_not_exists`
/// puts on one item, exactly one succeeds. (Plain `moto_server` breaks this under load; the
/// server `scripts/moto.sh` starts serializes requests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn concurrent_conditional_puts_on_one_item_have_one_winner() {
    let Some(endpoint) = common::endpoint() else {
        return;
    };
    let table = common::table("moto-differences");
    let client = Arc::new(raw_client(&endpoint, &table).await);
    let keys: u64 = 300;
    let racers = 12;
    let base = u64::from(std::process::id()) << 32 | 1 << 31;
    // A few keys at a time (the test server is small), every racer of a key at once.
    let gate = Arc::new(tokio::sync::Semaphore::new(6));
    let mut tasks = Vec::new();
    for k in 0..keys {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(racers));
        let racing: Vec<_> = (0..racers)
            .map(|r| {
                let client = client.clone();
                let table = table.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let won = client
                        .put_item()
                        .table_name(table)
                        .set_item(Some(HashMap::from([
                            ("pk".to_owned(), pk(base + k)),
                            ("who".to_owned(), AttributeValue::N(r.to_string())),
                        ])))
                        .condition_expression("attribute_not_exists(pk)")
                        .send()
                        .await;
                    match won {
                        Ok(_) => true,
                        Err(e) => {
                            assert!(
                                matches!(
                                    e.as_service_error(),
                                    Some(PutItemError::ConditionalCheckFailedException(_))
                                ),
                                "{e:?}"
                            );
                            false
                        }
                    }
                })
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            for t in racing {
                won += usize::from(t.await.unwrap());
            }
            drop(permit);
            (k, won)
        }));
    }
    let mut winners: HashMap<u64, usize> = HashMap::new();
    for t in tasks {
        let (k, won) = t.await.unwrap();
        winners.insert(k, won);
    }
    let doubled: Vec<_> = winners.iter().filter(|(_, w)| **w != 1).collect();
    assert!(
        doubled.is_empty(),
        "{} of {keys} items had other than one winner: {doubled:?}",
        doubled.len()
    );
}

/// A failed condition returns the item as it is with `ReturnValuesOnConditionCheckFailure =
/// ALL_OLD` (PutItem, UpdateItem, DeleteItem), nothing without it, and nothing for an absent
/// item; numbers compare as numbers (13-digit milliseconds) and binaries by their bytes.
#[tokio::test]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn failed_conditions_return_the_item_only_when_asked_and_present() {
    use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
    use aws_sdk_dynamodb::operation::update_item::UpdateItemError;

    let Some(endpoint) = common::endpoint() else {
        return;
    };
    let table = common::table("moto-differences");
    let client = raw_client(&endpoint, &table).await;
    let key = pk(u64::from(std::process::id()) << 32 | 7);
    let item = HashMap::from([
        ("pk".to_owned(), key.clone()),
        ("ex".to_owned(), AttributeValue::N("1700000000123".into())),
        (
            "tok".to_owned(),
            AttributeValue::B(Blob::new(vec![1, 2, 3])),
        ),
    ]);
    client
        .put_item()
        .table_name(&table)
        .set_item(Some(item.clone()))
        .send()
        .await
        .unwrap();
    let now = |ms: &str| HashMap::from([(":now".to_owned(), AttributeValue::N(ms.into()))]);
    // `ex <= :now` is false one millisecond before, true at the expiry.
    let put = |ms: &'static str, all_old: bool| {
        let mut req = client
            .put_item()
            .table_name(&table)
            .set_item(Some(item.clone()))
            .condition_expression("attribute_not_exists(pk) OR ex <= :now")
            .set_expression_attribute_values(Some(now(ms)));
        if all_old {
            req = req.return_values_on_condition_check_failure(
                ReturnValuesOnConditionCheckFailure::AllOld,
            );
        }
        req.send()
    };
    match put("1700000000122", true)
        .await
        .unwrap_err()
        .into_service_error()
    {
        PutItemError::ConditionalCheckFailedException(e) => {
            assert_eq!(e.item(), Some(&item), "ALL_OLD returns the item as it is")
        }
        other => panic!("{other:?}"),
    }
    match put("1700000000122", false)
        .await
        .unwrap_err()
        .into_service_error()
    {
        PutItemError::ConditionalCheckFailedException(e) => assert_eq!(e.item(), None),
        other => panic!("{other:?}"),
    }
    put("1700000000123", true).await.expect("expired at ex");
    // Binary equality, and an absent item: no item comes back.
    let update = |key: AttributeValue, tok: Vec<u8>| {
        client
            .update_item()
            .table_name(&table)
            .key("pk", key)
            .update_expression("SET st = :one")
            .condition_expression("tok = :tok")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":tok", AttributeValue::B(Blob::new(tok)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
    };
    update(key.clone(), vec![1, 2, 3])
        .await
        .expect("same bytes");
    match update(key.clone(), vec![1, 2, 4])
        .await
        .unwrap_err()
        .into_service_error()
    {
        UpdateItemError::ConditionalCheckFailedException(e) => {
            assert_eq!(
                e.item().and_then(|i| i.get("st")),
                Some(&AttributeValue::N("1".into()))
            )
        }
        other => panic!("{other:?}"),
    }
    let absent = pk(u64::from(std::process::id()) << 32 | 8);
    match update(absent.clone(), vec![1])
        .await
        .unwrap_err()
        .into_service_error()
    {
        UpdateItemError::ConditionalCheckFailedException(e) => assert_eq!(e.item(), None),
        other => panic!("{other:?}"),
    }
    let delete = |key: AttributeValue| {
        client
            .delete_item()
            .table_name(&table)
            .key("pk", key)
            .condition_expression("attribute_exists(pk) AND st = :two")
            .expression_attribute_values(":two", AttributeValue::N("2".into()))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
    };
    match delete(key.clone()).await.unwrap_err().into_service_error() {
        DeleteItemError::ConditionalCheckFailedException(e) => assert!(e.item().is_some()),
        other => panic!("{other:?}"),
    }
    match delete(absent).await.unwrap_err().into_service_error() {
        DeleteItemError::ConditionalCheckFailedException(e) => assert_eq!(e.item(), None),
        other => panic!("{other:?}"),
    }
}

/// An item over the size limit is refused with the `ValidationException` messages DynamoDB
/// documents, and the store turns them into `value_too_large` (the engine's tombstone) even
/// when its own limit did not stop the outcome first; the record stays in flight.
#[tokio::test]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn items_over_the_size_limit_are_refused_and_become_tombstones() {
    use idemgate_core::record::{MAX_BODY_LEN, Outcome, RecordState, StoredResponse};
    use idemgate_core::store::{CasOutcome, ClaimOutcome, Store};
    use idemgate_core::testkit::{claim_request, fresh_key};

    let Some(endpoint) = common::endpoint() else {
        return;
    };
    let table = common::table("moto-differences");
    let client = raw_client(&endpoint, &table).await;
    // 500,000 bytes: over DynamoDB's 409,600 as raw bytes and moto's 405,000 as base64.
    let big = AttributeValue::B(Blob::new(vec![7u8; 500_000]));
    let key = pk(u64::from(std::process::id()) << 32 | 9);
    let err = client
        .put_item()
        .table_name(&table)
        .set_item(Some(HashMap::from([
            ("pk".to_owned(), key.clone()),
            ("out".to_owned(), big.clone()),
        ])))
        .send()
        .await
        .unwrap_err();
    let meta = aws_sdk_dynamodb::error::ProvideErrorMetadata::message(&err)
        .unwrap_or("")
        .to_owned();
    assert!(
        meta.contains("Item size has exceeded the maximum allowed size"),
        "{err:?}"
    );
    client
        .put_item()
        .table_name(&table)
        .set_item(Some(HashMap::from([("pk".to_owned(), key.clone())])))
        .send()
        .await
        .unwrap();
    let err = client
        .update_item()
        .table_name(&table)
        .key("pk", key)
        .update_expression("SET #out = :big")
        .expression_attribute_names("#out", "out")
        .expression_attribute_values(":big", big)
        .send()
        .await
        .unwrap_err();
    let meta = aws_sdk_dynamodb::error::ProvideErrorMetadata::message(&err)
        .unwrap_or("")
        .to_owned();
    assert!(
        meta.contains("Item size to update has exceeded the maximum allowed size"),
        "{err:?}"
    );

    // Through the store, with its own limit out of the way: DynamoDB's refusal is the tombstone
    // signal, and nothing changed.
    let store = common::builder(&endpoint, &table)
        .max_payload_bytes(MAX_BODY_LEN)
        .connect()
        .await
        .unwrap();
    let key = fresh_key("too-large");
    let req = claim_request(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_secs(3600),
        1,
    );
    let ClaimOutcome::Acquired { fencing } = store.claim(&key, &req).await.unwrap() else {
        panic!("fresh key existed");
    };
    let outcome = Outcome::Response(StoredResponse::new(200, vec![], vec![1u8; 500_000]));
    let err = store
        .complete(
            &key,
            fencing,
            &outcome,
            std::time::Duration::from_secs(3600),
        )
        .await
        .unwrap_err();
    assert!(err.is_value_too_large(), "{err}");
    assert!(matches!(
        store.get(&key).await.unwrap().unwrap().state,
        RecordState::InFlight { .. }
    ));
    let tombstone = Outcome::NotReplayable {
        status: 200,
        reason: err.message().to_owned(),
    };
    assert_eq!(
        store
            .complete(
                &key,
                fencing,
                &tombstone,
                std::time::Duration::from_secs(3600)
            )
            .await
            .unwrap(),
        CasOutcome::Applied
    );
}

/// `create_table` makes an on-demand table with TTL on `ttl`, finds it the second time, and
/// `connect` never creates one: a missing table is a `Config` error, and stays missing.
#[tokio::test]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn tables_are_created_on_demand_with_ttl_and_never_silently() {
    use aws_sdk_dynamodb::types::{BillingMode, TimeToLiveStatus};

    let Some(endpoint) = common::endpoint() else {
        return;
    };
    let table = common::table("created-on-demand");
    let err = common::builder(&endpoint, &table)
        .connect()
        .await
        .unwrap_err();
    assert_eq!(err.kind(), idemgate_core::ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("idemgate create-table"), "{err}");
    let first = common::builder(&endpoint, &table)
        .create_table()
        .await
        .unwrap();
    assert!(first.created && first.ttl_enabled_now, "{first:?}");
    let again = common::builder(&endpoint, &table)
        .create_table()
        .await
        .unwrap();
    assert!(!again.created && !again.ttl_enabled_now, "{again:?}");
    let store = common::builder(&endpoint, &table).connect().await.unwrap();
    let client = store.sdk_client();
    let described = client
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let t = described.table().unwrap();
    assert_eq!(
        t.billing_mode_summary().and_then(|b| b.billing_mode()),
        Some(&BillingMode::PayPerRequest)
    );
    let ttl = client
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let d = ttl.time_to_live_description().unwrap();
    // moto reports ENABLED at once; DynamoDB goes through ENABLING first.
    assert!(matches!(
        d.time_to_live_status(),
        Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
    ));
    assert_eq!(d.attribute_name(), Some("ttl"));
    // A table with another key schema is refused, not used.
    let other = common::table("other-key");
    client
        .create_table()
        .table_name(&other)
        .attribute_definitions(
            aws_sdk_dynamodb::types::AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(aws_sdk_dynamodb::types::ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            aws_sdk_dynamodb::types::KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(aws_sdk_dynamodb::types::KeyType::Hash)
                .build()
                .unwrap(),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .unwrap();
    let err = common::builder(&endpoint, &other)
        .connect()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another key schema"), "{err}");
}
