//! What the DynamoDB tests share: the test server from `IDEMGATE_TEST_DYNAMODB_URL` (an endpoint
//! such as moto's `http://127.0.0.1:7201`, started by `.ci/run` with `scripts/moto.sh`), fake
//! credentials, and a table of this process's own.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};

use idemgate_store_dynamodb::{DynamoStore, DynamoStoreBuilder};

/// Region and credentials the test server accepts (moto takes any).
pub const REGION: &str = "us-east-1";

/// The test server's endpoint, or `None` (and a SKIPPED line; a failure under CI).
pub fn endpoint() -> Option<String> {
    idemgate_core::testkit::server_url("IDEMGATE_TEST_DYNAMODB_URL")
}

/// A table of this process's own (runs sharing one server never meet).
pub fn table(purpose: &str) -> String {
    format!("idemgate-{purpose}-{}", std::process::id())
}

/// A builder for `table` on the test server, with fake static credentials (no credential chain,
/// so nothing ever asks an instance-metadata service).
pub fn builder(endpoint: &str, table: &str) -> DynamoStoreBuilder {
    DynamoStore::builder(table)
        .region(REGION)
        .endpoint(endpoint)
        .credentials("testing", "testing")
}

static CREATED: AtomicBool = AtomicBool::new(false);

/// Creates the table once per process (idempotent: a second creator finds it).
pub async fn ensure_table(endpoint: &str, table: &str) {
    if !CREATED.load(Ordering::SeqCst) {
        builder(endpoint, table)
            .create_table()
            .await
            .expect("create the test table");
        CREATED.store(true, Ordering::SeqCst);
    }
}
