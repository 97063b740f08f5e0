//! The table: checking it at connect time, and creating it when (and only when) asked.

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, MultiRegionConsistency,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification, TimeToLiveStatus,
};
use idemgate_core::error::{ErrorKind, StoreError};

use crate::error::sdk;
use crate::item::{PARTITION_KEY, TTL_ATTRIBUTE};

/// How long [`create`] waits for a new table to become active.
const ACTIVE_WAIT: Duration = Duration::from_secs(300);

/// What [`DynamoStoreBuilder::create_table`](crate::DynamoStoreBuilder::create_table) did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct TableSetup {
    /// The table was created now (otherwise it existed with the right key).
    pub created: bool,
    /// TTL was enabled on the `ttl` attribute now (otherwise it was enabled already).
    pub ttl_enabled_now: bool,
    /// Reasons the table may fail to coordinate acknowledged writes (a global table with
    /// eventually consistent replicas): print them.
    pub durability_warnings: Vec<String>,
}

/// What [`check`] found out about an existing table.
#[derive(Clone, Debug, Default)]
pub(crate) struct TableInfo {
    /// Reasons the table may lose or fail to coordinate acknowledged writes (G1).
    pub durability_warnings: Vec<String>,
    /// Other problems worth a start-up warning (TTL off: storage grows).
    pub notes: Vec<String>,
}

fn missing(table: &str) -> StoreError {
    StoreError::new(
        ErrorKind::Config,
        format!(
            "DynamoDB table {table:?} does not exist; create it with `idemgate create-table --store \
             dynamodb://{table}?region=…` (on-demand billing, TTL on `ttl`), or with your own \
             tooling: partition key `pk` of type binary (B), no sort key"
        ),
    )
}

/// Checks that `table` exists with the key idemgate needs, and reports what weakens it.
pub(crate) async fn check(client: &Client, table: &str) -> Result<TableInfo, StoreError> {
    let described = client.describe_table().table_name(table).send().await;
    let description = match described {
        Ok(out) => out.table,
        Err(e) if e.code() == Some("ResourceNotFoundException") => return Err(missing(table)),
        Err(e) => return Err(sdk("DescribeTable", e)),
    };
    let Some(description) = description else {
        return Err(missing(table));
    };
    let key_ok = description.key_schema().len() == 1
        && description
            .key_schema()
            .iter()
            .any(|k| k.attribute_name() == PARTITION_KEY && k.key_type() == &KeyType::Hash)
        && description.attribute_definitions().iter().any(|a| {
            a.attribute_name() == PARTITION_KEY && a.attribute_type() == &ScalarAttributeType::B
        });
    if !key_ok {
        return Err(StoreError::new(
            ErrorKind::Config,
            format!(
                "DynamoDB table {table:?} has another key schema: idemgate needs a partition key \
                 `pk` of type binary (B) and no sort key"
            ),
        ));
    }
    let mut info = TableInfo::default();
    let strong = description.multi_region_consistency() == Some(&MultiRegionConsistency::Strong);
    if !description.replicas().is_empty() && !strong {
        info.durability_warnings.push(format!(
            "DynamoDB table {table:?} is a global table with eventually consistent replicas: \
             conditional writes are coordinated within one region only, so instances writing \
             through different regions can both claim a key"
        ));
    }
    match client.describe_time_to_live().table_name(table).send().await {
        Ok(out) => {
            let d = out.time_to_live_description();
            let status = d.and_then(|d| d.time_to_live_status());
            let attr = d.and_then(|d| d.attribute_name());
            let on = matches!(
                status,
                Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)
            );
            if !on || attr != Some(TTL_ATTRIBUTE) {
                info.notes.push(format!(
                    "TTL of DynamoDB table {table:?} is not enabled on attribute `{TTL_ATTRIBUTE}`: \
                     expired records are never deleted (reads treat them as absent, but the table \
                     grows); `idemgate create-table` enables it"
                ));
            }
        }
        Err(e) => info.notes.push(format!(
            "could not read the TTL setting of DynamoDB table {table:?} ({}); expiry by TTL unchecked",
            e.code().unwrap_or("error")
        )),
    }
    Ok(info)
}

/// Creates `table` if it does not exist (on-demand billing, key `pk` binary), waits until it is
/// active, and enables TTL on `ttl` if it is not enabled.
pub(crate) async fn create(client: &Client, table: &str) -> Result<TableSetup, StoreError> {
    let (exists, creating) = match client.describe_table().table_name(table).send().await {
        Ok(out) => (
            true,
            out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Creating),
        ),
        Err(e) if e.code() == Some("ResourceNotFoundException") => (false, false),
        Err(e) => return Err(sdk("DescribeTable", e)),
    };
    let mut created = false;
    if !exists {
        let attribute = AttributeDefinition::builder()
            .attribute_name(PARTITION_KEY)
            .attribute_type(ScalarAttributeType::B)
            .build()
            .map_err(|e| StoreError::new(ErrorKind::Internal, "table definition").with_source(e))?;
        let key = KeySchemaElement::builder()
            .attribute_name(PARTITION_KEY)
            .key_type(KeyType::Hash)
            .build()
            .map_err(|e| StoreError::new(ErrorKind::Internal, "table definition").with_source(e))?;
        match client
            .create_table()
            .table_name(table)
            .attribute_definitions(attribute)
            .key_schema(key)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
        {
            Ok(_) => created = true,
            // Another process is creating it right now.
            Err(e) if e.code() == Some("ResourceInUseException") => {}
            Err(e) => return Err(sdk("CreateTable", e)),
        }
    }
    // Created now, by us or by another process moments ago (still CREATING): its TTL can only
    // be set once it is active. An existing table that is UPDATING (a replica or an index being
    // added, for hours) is not waited for.
    if !exists || creating {
        wait_active(client, table).await?;
    }
    // The key schema must be ours (an existing table of someone else's is refused).
    let info = check(client, table).await?;
    let ttl = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(|e| sdk("DescribeTimeToLive", e))?;
    let d = ttl.time_to_live_description();
    let status = d.and_then(|d| d.time_to_live_status());
    let attr = d.and_then(|d| d.attribute_name());
    let ttl_enabled_now = match (status, attr) {
        (Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling), Some(TTL_ATTRIBUTE)) => {
            false
        }
        (Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling), Some(other)) => {
            return Err(StoreError::new(
                ErrorKind::Config,
                format!(
                    "TTL of DynamoDB table {table:?} is enabled on attribute `{other}`; idemgate \
                     writes `{TTL_ATTRIBUTE}` (a table has one TTL attribute: use another table)"
                ),
            ));
        }
        (Some(TimeToLiveStatus::Disabling), _) => {
            return Err(StoreError::new(
                ErrorKind::Config,
                format!(
                    "TTL of DynamoDB table {table:?} is being disabled (DynamoDB takes up to an \
                     hour); run `idemgate create-table` again once that is done"
                ),
            ));
        }
        _ => {
            let spec = TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name(TTL_ATTRIBUTE)
                .build()
                .map_err(|e| StoreError::new(ErrorKind::Internal, "TTL setting").with_source(e))?;
            client
                .update_time_to_live()
                .table_name(table)
                .time_to_live_specification(spec)
                .send()
                .await
                .map_err(|e| sdk("UpdateTimeToLive", e))?;
            true
        }
    };
    Ok(TableSetup {
        created,
        ttl_enabled_now,
        durability_warnings: info.durability_warnings,
    })
}

async fn wait_active(client: &Client, table: &str) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + ACTIVE_WAIT;
    loop {
        let out = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| sdk("DescribeTable", e))?;
        if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::new(
                ErrorKind::Timeout,
                format!("DynamoDB table {table:?} did not become active within {ACTIVE_WAIT:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
