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
