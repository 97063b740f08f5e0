//! # idemgate-store-dynamodb
//!
//! A shared [`Store`] on Amazon DynamoDB, for several idemgate instances (and AWS users: Lambda
//! behind API Gateway, ECS, EKS), on the official AWS SDK for Rust.
//!
//! ## Overview
//!
//! - One item per record in one table (partition key `pk`, binary: the [`StoreKey`]); the
//!   layout is in [`item`].
//! - `claim` is ONE conditional `PutItem` (`attribute_not_exists(pk) OR ex <= :now`) with
//!   `ReturnValuesOnConditionCheckFailure = ALL_OLD`: an absent or expired record is replaced by
//!   the new in-flight one, and a failed condition hands back the existing item — replay, in
//!   flight or mismatch — with no second read. Only a *free key* (released, or revoked by an
//!   operator: in flight under the revoked token, its lease over) takes a second request, a
//!   conditional `UpdateItem` that claims it at the next epoch (a `PutItem` cannot read the old
//!   epoch to add one to it).
//! - `renew`, `complete`, `mark_unknown`, `release` and `take_over` are ONE conditional
//!   `UpdateItem` each, on (state, epoch, token) and the exact expiry: the fencing the Powertools
//!   DynamoDB layer lacks. `renew` and `take_over` take a second one only when the record
//!   would expire before the new lease ends (its expiry must grow to cover the lease, and an
//!   update expression has no `max`), which a TTL longer than the lease never meets.
//! - `delete` (administrators) is a conditional `DeleteItem`, or an `UpdateItem` that revokes an
//!   in-flight record; `complete_unknown` (administrators: "it did happen") is ONE conditional
//!   `UpdateItem` on (state, epoch, marking instant `at`) and the expiry; `get` is a strongly consistent `GetItem`; `list` a strongly consistent
//!   `Scan` page (the cursor is the last key scanned).
//! - Expiry: every record carries its exact expiry `ex` (ms), checked by every read and every
//!   condition, and a DynamoDB TTL attribute `ttl` (epoch seconds, rounded up) so that DynamoDB
//!   deletes expired items — days late, which nothing notices: an expired item is absent to
//!   every operation. [`Store::purge_expired`] does nothing (returns 0).
//! - The table is never created silently: [`DynamoStoreBuilder::connect`] refuses a missing
//!   table with a `Config` error that says how to create it, and
//!   [`DynamoStoreBuilder::create_table`] (`idemgate create-table`) creates it on demand
//!   (on-demand billing, TTL enabled on `ttl`).
//! - No completion feed: a waiting retry on another instance polls (50 ms doubling to 1 s by
//!   default), since DynamoDB has no pub/sub (DynamoDB Streams would need a reader per shard
//!   and deliver changes with a delay; not used).
//!
//! ## Example
//!
//! ```no_run
//! # async fn run() -> Result<(), idemgate_core::StoreError> {
//! use idemgate_core::Engine;
//! use idemgate_store_dynamodb::DynamoStore;
//!
//! // Credentials from the standard AWS chain (environment, profile, web identity, ECS, IMDS).
//! let builder = DynamoStore::builder("idemgate").region("eu-west-1");
//! builder.create_table().await?; // once, on demand: on-demand billing, TTL on `ttl`
//! let store = builder.connect().await?;
//! let engine = Engine::builder(store).build();
//! # Ok(()) }
//! ```
//!
//! Credentials: environment, shared profile (static keys or a role assumed through STS), web
//! identity, ECS task role, EC2 instance metadata; SSO profiles and `credential_process` are not
//! compiled in (`aws-config`'s `sso` and `credentials-process` features are off).
//!
//! Against DynamoDB Local, moto or another compatible server, add
//! `.endpoint("http://127.0.0.1:8000")` (and static credentials with
//! [`DynamoStoreBuilder::credentials`] if the environment has none).
//!
//! ## Guarantees
//!
//! Those of the [`Store`] contract, on one condition: **the clocks of the instances sharing a
//! table agree** to within the lease margin below. DynamoDB has no clock to ask (no `TIME`, no
//! `now()` in a condition expression), so "now" is the clock of the instance that sends the
//! request ([`WallClock`] by default, or the injected [`Clock`]); leases and expiry are
//! written and compared in its milliseconds. Writes are durable once acknowledged (DynamoDB
//! replicates them before answering), and every condition is evaluated atomically on the latest
//! version of the item.
//!
//! ### Clock skew
//!
//! A holder renews its lease every lease/3 and each renewal may take up to the store deadline
//! (`--store-timeout`). When every renewal succeeds, a live holder's lease has at least
//! `lease − lease/3 − store_timeout` left (3.7 s at the defaults: lease 10 s, deadline 3 s);
//! when one renewal fails (throttled, timed out) the next is sent lease/3 later, and the margin
//! is only `lease − 2·lease/3 − store_timeout` (**0.33 s** at the defaults). An instance whose
//! clock runs ahead of the holder's by less than the margin never sees a live lease as expired.
//! So keep the instances' clocks within a few tens of milliseconds of each other (NTP or
//! Amazon Time Sync do), or raise the lease: a 30 s lease with a 3 s deadline leaves 7 s.
//!
//! Skew is pairwise: an instance whose clock lags the others by δ writes leases that end δ
//! early *for everyone else*, so healthy instances may take over its live leases; one that runs
//! ahead by δ takes over the others' leases δ early. Either way, past the margin: a second
//! dispatch at epoch + 1 (G1 is lost for that key; the first holder is fenced off and cannot
//! overwrite the newer outcome, G4 still holds), and completed records judged expired δ early
//! or late (the G5 window shifts by δ). Every write is still a compare-and-set on (state,
//! epoch, token), so no record is ever corrupted.
//!
//! The instances must also agree with **AWS's** clock: DynamoDB's TTL deletes items by its own
//! clock (typically days late, but that is not a promise), so a fleet running δ behind AWS may
//! lose completed records up to δ before their end.
//!
//! Every answer's `Date` header is measured ([`DynamoStore::clock_skew_bounds`], the gauge
//! `idemgate_dynamodb_clock_skew_seconds`), and a skew proven past [`SKEW_WARNING`] (0.25 s) is
//! logged as a warning, at most once a minute, for as long as it lasts.
//!
//! ### Item size
//!
//! DynamoDB items are at most 400 KB (409,600 bytes, attribute names included). A response
//! whose body and headers exceed [`DEFAULT_MAX_PAYLOAD_BYTES`] (the limit less 16 KiB for the
//! other attributes and the encoding) is refused before sending with [`StoreError::value_too_large`], and so is one
//! that DynamoDB refuses as too large (long namespace, scope or key): the engine then records a
//! not-replayable tombstone instead (retries get `410`, the operation never runs again). A write
//! never fails for size after the upstream ran.
//!
//! ### Retries
//!
//! The SDK retries throttling and transient failures ([`client::MAX_ATTEMPTS`] attempts). A
//! retried write whose first attempt landed (its answer was lost) finds the condition false;
//! the item that comes back says who wrote it (the new holder's token for claims and takeovers;
//! the id of the store call, `wid`, for completions, outcome-unknown marks, releases,
//! revocations and operators' completions of outcome-unknown records), so each recognises its own effect and reports it as applied — only within the
//! same call: a second `complete` by the same holder is `Lost`, as the contract says. A retried
//! delete whose first attempt landed reports `Absent`.
//!
//! ## moto (the test server) and AWS
//!
//! The tests run against moto's server mode (`scripts/moto.sh`, moto 5.2.5). Differences found,
//! by checking moto's behaviour and source against the DynamoDB documentation:
//!
//! - **moto does not serialize requests**: its threaded server evaluates a condition and writes
//!   the item without a lock, so two concurrent conditional writes on one item can both
//!   succeed. DynamoDB evaluates each conditional write atomically. `scripts/moto.sh` therefore
//!   runs moto's WSGI app behind a lock (one request at a time). Against plain `moto_server`
//!   (`IDEMGATE_MOTO_PLAIN=1 scripts/moto.sh start DIR`), the test
//!   `concurrent_conditional_puts_on_one_item_have_one_winner` (300 items, 12 racing
//!   `attribute_not_exists` puts each) found one item with two winners in each of 3 runs.
//! - **item size**: moto counts a binary attribute by its base64 length (4/3 of its bytes) and
//!   refuses items over 405,000 such bytes; DynamoDB counts raw bytes and allows 409,600. The
//!   largest outcome moto takes is about 300 KB; the tests set
//!   [`DynamoStoreBuilder::max_payload_bytes`] to [`MOTO_MAX_PAYLOAD_BYTES`], and check the
//!   refusal path (moto's "Item size … exceeded" `ValidationException`, the same message as
//!   DynamoDB's) separately.
//! - **a refused update is partly applied by moto**: moto applies an `UpdateItem`'s actions one
//!   by one to the stored item, and when one makes the item too large it refuses the request but
//!   keeps the actions before it; DynamoDB applies none. The completing update therefore sets the
//!   outcome first (found by `items_over_the_size_limit_are_refused_and_become_tombstones`).
//! - **TTL**: moto records the TTL setting (`ENABLED` at once, where DynamoDB goes through
//!   `ENABLING`) but never deletes expired items; DynamoDB deletes them within days. Neither is
//!   relied on: expiry is checked exactly by every operation.
//! - **connections**: moto's server (werkzeug's) closes the connection after every answer, so
//!   every request opens a new one; DynamoDB keeps connections alive. Only speed differs.
//! - **Scan pages**: moto returns `LastEvaluatedKey` only when more items follow; DynamoDB may
//!   also return it on a full last page (an extra, empty page). Both end the listing correctly.
//! - `ConditionExpression` (comparisons of numbers, binaries, `attribute_not_exists`, `AND`,
//!   `OR`, `<>`) and `ReturnValuesOnConditionCheckFailure = ALL_OLD` on `PutItem`, `UpdateItem`
//!   and `DeleteItem` behave as documented (an absent item returns no `Item`).
//!
//! ## Feature flags
//!
//! - `testkit`: fault hooks for tests (`DynamoStore::corrupt_state`).
//!
//! ## Errors
//!
//! Connection failures map to [`ErrorKind::Unavailable`], timeouts to [`ErrorKind::Timeout`],
//! throttling (`ProvisionedThroughputExceededException`, `ThrottlingException`,
//! `RequestLimitExceeded`) to [`ErrorKind::Capacity`] (the store answered: never forwarded
//! past), outcomes over the item size to [`ErrorKind::Capacity`] with
//! [`StoreError::is_value_too_large`], a missing table, a wrong key schema, missing region or
//! refused credentials to [`ErrorKind::Config`], undecodable items to [`ErrorKind::Corrupt`],
//! DynamoDB's own 500s to [`ErrorKind::Unavailable`], anything else to [`ErrorKind::Internal`].
//!
//! [`WallClock`]: idemgate_core::clock::WallClock

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::operation::delete_item::DeleteItemError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use idemgate_core::clock::{Clock, Timestamp, WallClock};
use idemgate_core::error::{ErrorKind, StoreError};
use idemgate_core::key::StoreKey;
use idemgate_core::protocol;
use idemgate_core::record::{Fencing, MAX_BODY_LEN, Outcome, Record, RecordState};
use idemgate_core::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ListPage, ListRequest,
    ResolveOutcome, Store, TakeOverOutcome, TakeOverRequest, UnknownMark, revoked_cas,
};

pub mod client;
mod error;
pub mod item;
mod table;

use client::{Connection, Counters};
use item::{
    Head, Item, LAYOUT_VERSION, PARTITION_KEY, ST_COMPLETED, ST_IN_FLIGHT, ST_UNKNOWN, b, decode,
    fingerprint_value, key_value, n, s, token_value, ttl_seconds,
};
pub use table::TableSetup;

/// DynamoDB's item size limit: 400 KB, counted as 409,600 bytes of attribute names and values.
pub const DYNAMODB_ITEM_LIMIT: usize = 409_600;
/// The largest payload (body plus header names and values, as
/// [`StoredResponse::payload_len`](idemgate_core::record::StoredResponse::payload_len) counts it)
/// stored by default: the item limit less 16 KiB for the other attributes (namespace, scope
/// and key up to a few KiB together) and the outcome's encoding (8 bytes a header). Larger
/// outcomes are refused with [`StoreError::value_too_large`] before anything is sent.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = DYNAMODB_ITEM_LIMIT - 16 * 1024;
/// The largest payload moto takes in an item (it counts binary attributes by their base64 length
/// against 405,000 bytes): for tests against moto.
pub const MOTO_MAX_PAYLOAD_BYTES: usize = 300_000;
/// Largest page returned by `list` (DynamoDB also ends a page at 1 MB).
pub const MAX_LIST_PAGE: usize = 1_000;
/// Clock skew against DynamoDB (proven by its `Date` headers) past which a warning is logged:
/// below the lease margin left when one renewal fails at the defaults (0.33 s; see the crate
/// docs on clock skew).
pub const SKEW_WARNING: Duration = Duration::from_millis(250);
/// How often an operation re-reads and retries after a concurrent change, at most.
const RACE_RETRIES: usize = 8;

/// How to reach a table; [`connect`](DynamoStoreBuilder::connect) or
/// [`create_table`](DynamoStoreBuilder::create_table) it.
#[derive(Clone)]
pub struct DynamoStoreBuilder {
    table: String,
    conn: Connection,
    clock: Arc<dyn Clock>,
    max_payload_bytes: usize,
}

impl std::fmt::Debug for DynamoStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoStoreBuilder")
            .field("table", &self.table)
            .field("region", &self.conn.region)
            .field("endpoint", &self.conn.endpoint)
            .field("max_payload_bytes", &self.max_payload_bytes)
            .finish_non_exhaustive()
    }
}

impl DynamoStoreBuilder {
    /// The AWS region (otherwise from the standard chain: `AWS_REGION`, the profile, IMDS).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.conn.region = Some(region.into());
        self
    }

    /// Another endpoint than AWS's: DynamoDB Local, moto, a VPC endpoint (`http://` or `https://`).
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.conn.endpoint = Some(endpoint.into());
        self
    }

    /// An extra SDK interceptor (feature `testkit`): fault injection in tests, e.g. losing an
    /// answer so that the SDK resends a write that landed.
    #[cfg(feature = "testkit")]
    pub fn interceptor(
        mut self,
        interceptor: impl aws_sdk_dynamodb::config::Intercept + 'static,
    ) -> Self {
        self.conn
            .interceptors
            .push(aws_sdk_dynamodb::config::SharedInterceptor::new(
                interceptor,
            ));
        self
    }

    /// Static credentials instead of the standard chain (local servers, tests).
    pub fn credentials(mut self, access_key_id: &str, secret_access_key: &str) -> Self {
        self.conn.credentials = Some(aws_sdk_dynamodb::config::Credentials::new(
            access_key_id,
            secret_access_key,
            None,
            None,
            "idemgate-static",
        ));
        self
    }

    /// The clock leases and expiry are judged by (default: the wall clock, [`WallClock`]). Every
    /// instance sharing the table must agree on it (see the crate docs on clock skew); tests
    /// inject a [`ManualClock`](idemgate_core::clock::ManualClock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The largest payload to store (default [`DEFAULT_MAX_PAYLOAD_BYTES`]; against moto,
    /// [`MOTO_MAX_PAYLOAD_BYTES`]). Larger ones are refused with
    /// [`StoreError::value_too_large`] (and so is any item DynamoDB finds too large).
    pub fn max_payload_bytes(mut self, bytes: usize) -> Self {
        self.max_payload_bytes = bytes.min(MAX_BODY_LEN);
        self
    }

    /// Connects and checks the table: it must exist with the key schema idemgate writes (a
    /// missing table is a `Config` error that says how to create it — never created silently).
    /// Logs a warning when TTL is not enabled on `ttl`. Clock skew is measured from every answer
    /// (see [`DynamoStore::clock_skew_bounds`]): the table check's few answers prove only a skew
    /// of more than about a second, so a smaller one past [`SKEW_WARNING`] is warned about once
    /// traffic has narrowed the interval.
    pub async fn connect(self) -> Result<DynamoStore, StoreError> {
        validate_table_name(&self.table)?;
        let counters = Arc::new(Counters::new(&self.table));
        let client = client::client(&self.conn, counters.clone()).await?;
        let info = table::check(&client, &self.table).await?;
        for note in &info.notes {
            tracing::warn!(table = %self.table, "{note}");
        }
        let store = DynamoStore {
            inner: Arc::new(Inner {
                client,
                table: self.table,
                clock: self.clock,
                max_payload_bytes: self.max_payload_bytes,
                counters,
                calls: Calls::default(),
                write_ids: WriteIds::new(),
                warnings: info.durability_warnings,
            }),
        };
        // The answers so far (the table check) were measured by the interceptor, which logs a
        // skew proven past SKEW_WARNING.
        Ok(store)
    }

    /// Creates the table if it does not exist — on-demand billing (`PAY_PER_REQUEST`), partition
    /// key `pk` of type binary — waits until it is active, and enables TTL on `ttl` if needed.
    /// An existing table with another key schema, or with TTL on another attribute, is a `Config`
    /// error. Needs `dynamodb:CreateTable`, `DescribeTable`, `DescribeTimeToLive` and
    /// `UpdateTimeToLive`, which the running proxy does not.
    pub async fn create_table(&self) -> Result<TableSetup, StoreError> {
        validate_table_name(&self.table)?;
        let client = client::client(&self.conn, Arc::new(Counters::new(&self.table))).await?;
        table::create(&client, &self.table).await
    }
}

/// DynamoDB table names: 3 to 255 characters of `a-z A-Z 0-9 _ - .`.
fn validate_table_name(table: &str) -> Result<(), StoreError> {
    let ok = (3..=255).contains(&table.len())
        && table
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::new(
            ErrorKind::Config,
            format!(
                "invalid DynamoDB table name {table:?}: 3 to 255 characters of a-z, A-Z, 0-9, _, - and ."
            ),
        ))
    }
}

/// Requests made per DynamoDB API (calls by this store; SDK retries are counted in
/// [`RoundTrips::requests`] only).
#[derive(Debug, Default)]
struct Calls {
    put_item: AtomicU64,
    update_item: AtomicU64,
    delete_item: AtomicU64,
    get_item: AtomicU64,
    scan: AtomicU64,
}

/// A snapshot of the requests a store has sent (see [`DynamoStore::round_trips`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoundTrips {
    /// HTTP requests sent, every attempt and retry included (and the table check at connect).
    pub requests: u64,
    /// `PutItem` calls (claims).
    pub put_item: u64,
    /// `UpdateItem` calls (renewals, completions, releases, takeovers, marks, revocations, claims
    /// of free keys).
    pub update_item: u64,
    /// `DeleteItem` calls (administrators' deletes).
    pub delete_item: u64,
    /// `GetItem` calls (reads).
    pub get_item: u64,
    /// `Scan` calls (listings).
    pub scan: u64,
}

impl std::ops::Sub for RoundTrips {
    type Output = RoundTrips;
    fn sub(self, o: RoundTrips) -> RoundTrips {
        RoundTrips {
            requests: self.requests - o.requests,
            put_item: self.put_item - o.put_item,
            update_item: self.update_item - o.update_item,
            delete_item: self.delete_item - o.delete_item,
            get_item: self.get_item - o.get_item,
            scan: self.scan - o.scan,
        }
    }
}

struct Inner {
    client: aws_sdk_dynamodb::Client,
    table: String,
    clock: Arc<dyn Clock>,
    max_payload_bytes: usize,
    counters: Arc<Counters>,
    calls: Calls,
    write_ids: WriteIds,
    warnings: Vec<String>,
}

/// Ids of store calls: a seed unique to the process and the moment (high bits: process id and
/// the wall clock in ns), and a counter in the low bits.
struct WriteIds {
    seed: u128,
    next: AtomicU64,
}

impl WriteIds {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Self {
            seed: (u128::from(std::process::id()) << 96) ^ (nanos << 64),
            next: AtomicU64::new(1),
        }
    }
}

/// The DynamoDB store. Cloning shares the client.
#[derive(Clone)]
pub struct DynamoStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DynamoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoStore")
            .field("table", &self.inner.table)
            .finish_non_exhaustive()
    }
}

/// What [`DynamoStore::grow_expiry`] checks: the record is held by `f` (its lease lapsed, if
/// `lapsed`) and expires at `old`; the new lease ends at `lease`.
struct Grow {
    f: Fencing,
    old: Timestamp,
    lease: Timestamp,
    now: Timestamp,
    lapsed: bool,
}

/// The outcome of a conditional write.
enum Cond {
    /// The condition held and the write is made; the old item if it was asked for.
    Applied(Option<Item>),
    /// The condition failed; the item as it is, if it exists.
    Failed(Option<Item>),
}

/// The expression attribute names used in `exprs` (`#name` stands for the attribute `name`):
/// every attribute goes through a name, so that none can clash with a reserved word (`ttl` is
/// one).
fn names(exprs: &[&str]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for expr in exprs {
        let mut rest = *expr;
        while let Some(at) = rest.find('#') {
            let tail = &rest[at + 1..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            out.insert(format!("#{}", &tail[..end]), tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    out
}

fn values(pairs: Vec<(&str, AttributeValue)>) -> HashMap<String, AttributeValue> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Live, in flight, this epoch and token (values `:one`, `:ep`, `:tok`, `:now`).
const HELD: &str = "#st = :one AND #ep = :ep AND #tok = :tok AND #ex > :now";

impl DynamoStore {
    /// A builder for `table`.
    pub fn builder(table: impl Into<String>) -> DynamoStoreBuilder {
        DynamoStoreBuilder {
            table: table.into(),
            conn: Connection::default(),
            clock: Arc::new(WallClock),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The SDK client this store sends its requests with (its retries, timeouts and request
    /// counter), for requests of the caller's own (tests, tooling).
    pub fn sdk_client(&self) -> &aws_sdk_dynamodb::Client {
        &self.inner.client
    }

    /// Reasons this table may fail to coordinate acknowledged writes (a global table with
    /// eventually consistent replicas), for a start-up warning (and a refusal in strict mode).
    pub fn durability_warnings(&self) -> Vec<String> {
        self.inner.warnings.clone()
    }

    /// DynamoDB's clock minus this instance's wall clock, in ms: the middle of
    /// [`clock_skew_bounds`](Self::clock_skew_bounds); `None` before any answer with a `Date`
    /// header.
    pub fn clock_skew(&self) -> Option<i64> {
        self.clock_skew_bounds()
            .map(|(lo, hi)| lo.saturating_add(hi) / 2)
    }

    /// The interval, in ms, DynamoDB's clock minus this instance's lies in, as the answers'
    /// `Date` headers prove it (one-second resolution: one answer gives an interval of a second
    /// plus a round trip; the intersection over a minute of answers narrows it to about a round
    /// trip). Every answer updates it, and the gauge `idemgate_dynamodb_clock_skew_seconds`
    /// (its middle); a skew proven past [`SKEW_WARNING`] is logged (at most once a minute).
    pub fn clock_skew_bounds(&self) -> Option<(i64, i64)> {
        self.inner.counters.skew_bounds()
    }

    /// The requests this store has sent so far (for measuring round trips per operation).
    pub fn round_trips(&self) -> RoundTrips {
        let c = &self.inner.calls;
        RoundTrips {
            requests: self.inner.counters.requests.load(Ordering::Relaxed),
            put_item: c.put_item.load(Ordering::Relaxed),
            update_item: c.update_item.load(Ordering::Relaxed),
            delete_item: c.delete_item.load(Ordering::Relaxed),
            get_item: c.get_item.load(Ordering::Relaxed),
            scan: c.scan.load(Ordering::Relaxed),
        }
    }

    fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// An id for one store call, unique across processes and calls (see [`item`]: `wid`).
    fn write_id(&self) -> u128 {
        self.inner.write_ids.seed
            ^ u128::from(self.inner.write_ids.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Fault injection for tests (feature `testkit`): sets a record's state to a value no build
    /// understands.
    #[cfg(feature = "testkit")]
    pub async fn corrupt_state(&self, key: &StoreKey) -> Result<(), StoreError> {
        self.inner
            .client
            .update_item()
            .table_name(&self.inner.table)
            .key(PARTITION_KEY, key_value(key))
            .update_expression("SET #st = :bad")
            .set_expression_attribute_names(Some(names(&["#st"])))
            .set_expression_attribute_values(Some(values(vec![(":bad", n(99))])))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| error::sdk("UpdateItem", e))
    }

    async fn put(
        &self,
        item: Item,
        condition: &str,
        vals: Vec<(&str, AttributeValue)>,
    ) -> Result<Cond, StoreError> {
        self.inner.calls.put_item.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .inner
            .client
            .put_item()
            .table_name(&self.inner.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[condition])))
            .set_expression_attribute_values(Some(values(vals)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match sent {
            Ok(_) => Ok(Cond::Applied(None)),
            Err(e) => match e.as_service_error() {
                Some(PutItemError::ConditionalCheckFailedException(c)) => {
                    Ok(Cond::Failed(c.item().cloned()))
                }
                _ => Err(error::sdk("PutItem", e)),
            },
        }
    }

    async fn update(
        &self,
        key: &StoreKey,
        update: &str,
        condition: &str,
        vals: Vec<(&str, AttributeValue)>,
    ) -> Result<Cond, StoreError> {
        self.inner.calls.update_item.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .inner
            .client
            .update_item()
            .table_name(&self.inner.table)
            .key(PARTITION_KEY, key_value(key))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[update, condition])))
            .set_expression_attribute_values(Some(values(vals)))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match sent {
            Ok(_) => Ok(Cond::Applied(None)),
            Err(e) => match e.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(c)) => {
                    Ok(Cond::Failed(c.item().cloned()))
                }
                _ => Err(error::sdk("UpdateItem", e)),
            },
        }
    }

    async fn delete_item(
        &self,
        key: &StoreKey,
        condition: &str,
        vals: Vec<(&str, AttributeValue)>,
    ) -> Result<Cond, StoreError> {
        self.inner.calls.delete_item.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .inner
            .client
            .delete_item()
            .table_name(&self.inner.table)
            .key(PARTITION_KEY, key_value(key))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[condition])))
            .set_expression_attribute_values(Some(values(vals)))
            .return_values(ReturnValue::AllOld)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match sent {
            Ok(out) => Ok(Cond::Applied(out.attributes)),
            Err(e) => match e.as_service_error() {
                Some(DeleteItemError::ConditionalCheckFailedException(c)) => {
                    Ok(Cond::Failed(c.item().cloned()))
                }
                _ => Err(error::sdk("DeleteItem", e)),
            },
        }
    }

    async fn get_item(&self, key: &StoreKey) -> Result<Option<Item>, StoreError> {
        self.inner.calls.get_item.fetch_add(1, Ordering::Relaxed);
        let out = self
            .inner
            .client
            .get_item()
            .table_name(&self.inner.table)
            .key(PARTITION_KEY, key_value(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| error::sdk("GetItem", e))?;
        Ok(out.item)
    }

    /// The conditional `UpdateItem` that claims a free key at `floor + 1` (see
    /// [`protocol::free_epoch`]): a fresh in-flight record, written over the free one only if it
    /// is still free at that floor.
    async fn claim_free(
        &self,
        key: &StoreKey,
        req: &ClaimRequest,
        floor: u64,
        now: Timestamp,
    ) -> Result<Cond, StoreError> {
        let lease = now.after(req.lease_ttl);
        let expires = now.after(req.ttl).max(lease);
        self.update(
            key,
            "SET #v = :v, #ns = :ns, #sc = :sc, #ik = :ik, #fp = :fp, #ca = :now, #ex = :ex, \
             #ttl = :ttl, #ep = :next, #tok = :tok, #own = :own, #le = :le \
             REMOVE #wid, #at, #out",
            "#st = :one AND #ep = :ep AND #tok = :revoked AND #ex > :now AND #le <= :now",
            vec![
                (":v", n(LAYOUT_VERSION)),
                (":ns", s(&req.namespace)),
                (":sc", s(&req.scope)),
                (":ik", s(&req.idempotency_key)),
                (":fp", fingerprint_value(&req.fingerprint)),
                (":now", n(now.as_millis())),
                (":ex", n(expires.as_millis())),
                (":ttl", n(ttl_seconds(expires))),
                (":next", n(floor + 1)),
                (":tok", token_value(req.token)),
                (":own", s(&req.owner)),
                (":le", n(lease.as_millis())),
                (":one", n(ST_IN_FLIGHT)),
                (":ep", n(floor)),
                (":revoked", token_value(Fencing::REVOKED)),
            ],
        )
        .await
    }

    /// A compare-and-set on `f` that moves the record to a finished state (`state`), expiring at
    /// now + `ttl`.
    async fn finish(
        &self,
        key: &StoreKey,
        f: Fencing,
        state: u64,
        outcome: Option<Vec<u8>>,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        let now = self.now();
        let expires = now.after(ttl);
        let wid = self.write_id();
        let mut vals = vec![
            (":wid", token_value(wid)),
            (":one", n(ST_IN_FLIGHT)),
            (":ep", n(f.epoch)),
            (":tok", token_value(f.token)),
            (":now", n(now.as_millis())),
            (":state", n(state)),
            (":ex", n(expires.as_millis())),
            (":ttl", n(ttl_seconds(expires))),
        ];
        let update = match outcome {
            Some(out) => {
                vals.push((":out", b(out)));
                // `out` first: moto applies the actions of an update one by one and keeps those
                // before an item-size refusal (see the crate docs); DynamoDB applies none.
                "SET #out = :out, #st = :state, #at = :now, #ex = :ex, #ttl = :ttl, #wid = :wid \
                 REMOVE #tok, #own, #le"
            }
            None => {
                "SET #st = :state, #at = :now, #ex = :ex, #ttl = :ttl, #wid = :wid \
                 REMOVE #tok, #own, #le, #out"
            }
        };
        Ok(match self.update(key, update, HELD, vals).await? {
            Cond::Applied(_) => CasOutcome::Applied,
            // Our own earlier attempt landed (the SDK retried after a lost answer).
            Cond::Failed(Some(item)) if Head::of(&item).written_by(wid) => CasOutcome::Applied,
            Cond::Failed(_) => CasOutcome::Lost,
        })
    }

    /// Extends an in-flight record's expiry to `g.lease` where it would end sooner, on the
    /// condition that the record is still as seen (held by `g.f`, expiring at `g.old`), in the
    /// same write as `update` (which must `SET #ex = :lease, #ttl = :ttl`).
    async fn grow_expiry(
        &self,
        key: &StoreKey,
        update: &str,
        g: Grow,
        mut extra: Vec<(&'static str, AttributeValue)>,
    ) -> Result<Cond, StoreError> {
        let Grow {
            f,
            old,
            lease,
            now,
            lapsed,
        } = g;
        let condition = if lapsed {
            "#st = :one AND #ep = :ep AND #tok = :tok AND #ex = :old AND #ex > :now AND #le <= :now"
        } else {
            "#st = :one AND #ep = :ep AND #tok = :tok AND #ex = :old AND #ex > :now"
        };
        extra.extend([
            (":one", n(ST_IN_FLIGHT)),
            (":ep", n(f.epoch)),
            (":tok", token_value(f.token)),
            (":old", n(old.as_millis())),
            (":now", n(now.as_millis())),
            (":lease", n(lease.as_millis())),
            (":ttl", n(ttl_seconds(lease))),
        ]);
        self.update(key, update, condition, extra).await
    }
}

impl Store for DynamoStore {
    async fn claim(&self, key: &StoreKey, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        for _ in 0..RACE_RETRIES {
            let now = self.now();
            let lease = now.after(req.lease_ttl);
            let expires = now.after(req.ttl).max(lease);
            let item: Item = HashMap::from([
                (PARTITION_KEY.to_owned(), key_value(key)),
                ("v".to_owned(), n(LAYOUT_VERSION)),
                ("ns".to_owned(), s(&req.namespace)),
                ("sc".to_owned(), s(&req.scope)),
                ("ik".to_owned(), s(&req.idempotency_key)),
                ("fp".to_owned(), fingerprint_value(&req.fingerprint)),
                ("ca".to_owned(), n(now.as_millis())),
                ("ex".to_owned(), n(expires.as_millis())),
                (item::TTL_ATTRIBUTE.to_owned(), n(ttl_seconds(expires))),
                ("st".to_owned(), n(ST_IN_FLIGHT)),
                ("ep".to_owned(), n(1)),
                ("tok".to_owned(), token_value(req.token)),
                ("own".to_owned(), s(&req.owner)),
                ("le".to_owned(), n(lease.as_millis())),
            ]);
            let put = self
                .put(
                    item,
                    "attribute_not_exists(#pk) OR #ex <= :now",
                    vec![(":now", n(now.as_millis()))],
                )
                .await?;
            let existing = match put {
                Cond::Applied(_) => {
                    return Ok(ClaimOutcome::Acquired {
                        fencing: Fencing {
                            epoch: 1,
                            token: req.token,
                        },
                    });
                }
                // Gone between the condition and the answer? Only a concurrent delete: try again.
                Cond::Failed(None) => continue,
                Cond::Failed(Some(item)) => item,
            };
            let record = decode(&existing)?;
            if let RecordState::InFlight { fencing, .. } = record.state {
                // Ours: an earlier attempt of this claim landed (a retried request, or the claim
                // of a free key below answered late).
                if fencing.token == req.token && !fencing.is_revoked() {
                    return Ok(ClaimOutcome::Acquired { fencing });
                }
            }
            match protocol::free_epoch(&record, now) {
                Some(floor) if !record.is_expired(now) => {
                    match self.claim_free(key, req, floor, now).await? {
                        Cond::Applied(_) => {
                            return Ok(ClaimOutcome::Acquired {
                                fencing: Fencing {
                                    epoch: floor + 1,
                                    token: req.token,
                                },
                            });
                        }
                        // Someone else claimed it, or it changed: look again.
                        Cond::Failed(_) => continue,
                    }
                }
                _ => return Ok(ClaimOutcome::Existing { record, now }),
            }
        }
        Err(StoreError::new(
            ErrorKind::Timeout,
            "claim kept racing with concurrent changes of the record",
        ))
    }

    async fn renew(
        &self,
        key: &StoreKey,
        f: Fencing,
        lease_ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        if let Some(lost) = revoked_cas(f) {
            return Ok(lost);
        }
        for _ in 0..RACE_RETRIES {
            let now = self.now();
            let lease = now.after(lease_ttl);
            let first = self
                .update(
                    key,
                    "SET #le = :lease",
                    "#st = :one AND #ep = :ep AND #tok = :tok AND #ex > :now AND #ex >= :lease",
                    vec![
                        (":one", n(ST_IN_FLIGHT)),
                        (":ep", n(f.epoch)),
                        (":tok", token_value(f.token)),
                        (":now", n(now.as_millis())),
                        (":lease", n(lease.as_millis())),
                    ],
                )
                .await?;
            let item = match first {
                Cond::Applied(_) => return Ok(CasOutcome::Applied),
                Cond::Failed(None) => return Ok(CasOutcome::Lost),
                Cond::Failed(Some(item)) => item,
            };
            let head = Head::of(&item);
            let Some(old) = head.expires_at.filter(|_| head.held_by(f, now)) else {
                return Ok(CasOutcome::Lost);
            };
            if old >= lease {
                // Not why the condition failed (the item is as it was then): look again.
                continue;
            }
            // Held, but the record would expire before the new lease ends: grow it too.
            let grown = self
                .grow_expiry(
                    key,
                    "SET #le = :lease, #ex = :lease, #ttl = :ttl",
                    Grow {
                        f,
                        old,
                        lease,
                        now,
                        lapsed: false,
                    },
                    Vec::new(),
                )
                .await?;
            if let Cond::Applied(_) = grown {
                return Ok(CasOutcome::Applied);
            }
        }
        Err(StoreError::new(
            ErrorKind::Timeout,
            "renew kept racing with concurrent changes of the record",
        ))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        f: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        if let Some(lost) = revoked_cas(f) {
            return Ok(lost);
        }
        protocol::check_outcome(outcome)?;
        if let Outcome::Response(r) = outcome
            && r.payload_len() > self.inner.max_payload_bytes
        {
            return Err(StoreError::value_too_large(format!(
                "a response of {} bytes exceeds what a DynamoDB item holds ({} bytes)",
                r.payload_len(),
                self.inner.max_payload_bytes
            )));
        }
        self.finish(key, f, ST_COMPLETED, Some(outcome.encode()), ttl)
            .await
    }

    async fn mark_unknown(
        &self,
        key: &StoreKey,
        f: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        if let Some(lost) = revoked_cas(f) {
            return Ok(lost);
        }
        self.finish(key, f, ST_UNKNOWN, None, ttl).await
    }

    async fn release(&self, key: &StoreKey, f: Fencing) -> Result<CasOutcome, StoreError> {
        if let Some(lost) = revoked_cas(f) {
            return Ok(lost);
        }
        // The record becomes a free key with its epoch as the floor (see `protocol::release`).
        let now = self.now();
        let wid = self.write_id();
        let out = self
            .update(
                key,
                "SET #tok = :revoked, #own = :own, #le = :now, #wid = :wid",
                HELD,
                vec![
                    (":wid", token_value(wid)),
                    (":one", n(ST_IN_FLIGHT)),
                    (":ep", n(f.epoch)),
                    (":tok", token_value(f.token)),
                    (":now", n(now.as_millis())),
                    (":revoked", token_value(Fencing::REVOKED)),
                    (":own", s(protocol::RELEASED_OWNER)),
                ],
            )
            .await?;
        Ok(match out {
            Cond::Applied(_) => CasOutcome::Applied,
            Cond::Failed(Some(item)) if Head::of(&item).written_by(wid) => CasOutcome::Applied,
            Cond::Failed(_) => CasOutcome::Lost,
        })
    }

    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        let f = req.expired;
        let acquired = TakeOverOutcome::Acquired {
            fencing: Fencing {
                epoch: f.epoch + 1,
                token: req.token,
            },
        };
        let update = "SET #ep = :next, #tok = :new, #own = :own, #le = :lease";
        let grow = "SET #ep = :next, #tok = :new, #own = :own, #le = :lease, #ex = :lease, \
                    #ttl = :ttl";
        for _ in 0..RACE_RETRIES {
            let now = self.now();
            let lease = now.after(req.lease_ttl);
            let first = self
                .update(
                    key,
                    update,
                    "#st = :one AND #ep = :ep AND #tok = :tok AND #ex > :now AND #le <= :now \
                     AND #ex >= :lease",
                    vec![
                        (":next", n(f.epoch + 1)),
                        (":new", token_value(req.token)),
                        (":own", s(&req.owner)),
                        (":lease", n(lease.as_millis())),
                        (":one", n(ST_IN_FLIGHT)),
                        (":ep", n(f.epoch)),
                        (":tok", token_value(f.token)),
                        (":now", n(now.as_millis())),
                    ],
                )
                .await?;
            let item = match first {
                Cond::Applied(_) => return Ok(acquired),
                Cond::Failed(None) => return Ok(TakeOverOutcome::Refused { current: None, now }),
                Cond::Failed(Some(item)) => item,
            };
            let record = decode(&item)?;
            match &record.state {
                // Ours: an earlier attempt landed.
                RecordState::InFlight { fencing, .. }
                    if fencing.epoch == f.epoch + 1 && fencing.token == req.token =>
                {
                    return Ok(acquired);
                }
                RecordState::InFlight {
                    fencing,
                    lease_expires_at,
                    ..
                } if *fencing == f
                    && !record.is_expired(now)
                    && *lease_expires_at <= now
                    && record.expires_at < lease =>
                {
                    let grown = self
                        .grow_expiry(
                            key,
                            grow,
                            Grow {
                                f,
                                old: record.expires_at,
                                lease,
                                now,
                                lapsed: true,
                            },
                            vec![
                                (":next", n(f.epoch + 1)),
                                (":new", token_value(req.token)),
                                (":own", s(&req.owner)),
                            ],
                        )
                        .await?;
                    if let Cond::Applied(_) = grown {
                        return Ok(acquired);
                    }
                }
                _ => {
                    return Ok(TakeOverOutcome::Refused {
                        current: protocol::live(Some(&record), now).cloned(),
                        now,
                    });
                }
            }
        }
        Err(StoreError::new(
            ErrorKind::Timeout,
            "take_over kept racing with concurrent changes of the record",
        ))
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let now = self.now();
        let Some(item) = self.get_item(key).await? else {
            return Ok(None);
        };
        // An expired item is absent without being decoded (TTL deletion is late).
        if !Head::of(&item).live(now) {
            return Ok(None);
        }
        let record = decode(&item)?;
        Ok(protocol::live(Some(&record), now).cloned())
    }

    async fn delete(&self, key: &StoreKey, mode: DeleteMode) -> Result<DeleteOutcome, StoreError> {
        // One conditional DeleteItem removes what the mode allows (and any expired item); a
        // failed condition returns the item, which a forced delete then revokes if it is in
        // flight. Items in a state no build knows go under `Finished` and `Unknown`, so that
        // administrators can always remove them.
        let condition = match mode {
            DeleteMode::Finished => {
                "attribute_exists(#pk) AND (#ex <= :now OR #st <> :one OR #tok = :revoked)"
            }
            DeleteMode::Unknown => {
                "attribute_exists(#pk) AND (#ex <= :now OR (#st <> :one AND #st <> :two))"
            }
            DeleteMode::Force => {
                "attribute_exists(#pk) AND (#ex <= :now OR (#st = :one AND #tok = :revoked))"
            }
        };
        for _ in 0..RACE_RETRIES {
            let now = self.now();
            let mut vals = vec![(":now", n(now.as_millis())), (":one", n(ST_IN_FLIGHT))];
            match mode {
                DeleteMode::Finished => vals.push((":revoked", token_value(Fencing::REVOKED))),
                DeleteMode::Unknown => vals.push((":two", n(ST_COMPLETED))),
                DeleteMode::Force => vals.push((":revoked", token_value(Fencing::REVOKED))),
            }
            let item = match self.delete_item(key, condition, vals).await? {
                Cond::Applied(old) => {
                    let live = old.is_some_and(|old| Head::of(&old).live(now));
                    return Ok(if live {
                        DeleteOutcome::Deleted
                    } else {
                        DeleteOutcome::Absent
                    });
                }
                Cond::Failed(None) => return Ok(DeleteOutcome::Absent),
                Cond::Failed(Some(item)) => item,
            };
            let record = decode(&item)?;
            let RecordState::InFlight { fencing, .. } = record.state else {
                return Ok(DeleteOutcome::Refused {
                    current: Box::new(record),
                });
            };
            if mode != DeleteMode::Force || fencing.is_revoked() {
                return Ok(DeleteOutcome::Refused {
                    current: Box::new(record),
                });
            }
            // Revoke: the record becomes a free key at its epoch (see `protocol::delete`).
            let wid = self.write_id();
            let revoked = self
                .update(
                    key,
                    "SET #tok = :revoked, #own = :own, #le = :now, #wid = :wid",
                    HELD,
                    vec![
                        (":wid", token_value(wid)),
                        (":one", n(ST_IN_FLIGHT)),
                        (":ep", n(fencing.epoch)),
                        (":tok", token_value(fencing.token)),
                        (":now", n(now.as_millis())),
                        (":revoked", token_value(Fencing::REVOKED)),
                        (":own", s(protocol::REVOKED_OWNER)),
                    ],
                )
                .await?;
            match revoked {
                Cond::Applied(_) => {
                    return Ok(DeleteOutcome::Revoked {
                        epoch: fencing.epoch,
                    });
                }
                // Our own earlier attempt landed.
                Cond::Failed(Some(item)) if Head::of(&item).written_by(wid) => {
                    return Ok(DeleteOutcome::Revoked {
                        epoch: fencing.epoch,
                    });
                }
                // It changed meanwhile (finished, released, taken over): look again.
                Cond::Failed(_) => continue,
            }
        }
        Err(StoreError::new(
            ErrorKind::Timeout,
            "delete kept racing with concurrent changes of the record",
        ))
    }

    async fn complete_unknown(
        &self,
        key: &StoreKey,
        expected: UnknownMark,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        protocol::check_outcome(outcome)?;
        if let Outcome::Response(r) = outcome
            && r.payload_len() > self.inner.max_payload_bytes
        {
            return Err(StoreError::value_too_large(format!(
                "a response of {} bytes exceeds what a DynamoDB item holds ({} bytes)",
                r.payload_len(),
                self.inner.max_payload_bytes
            )));
        }
        // One conditional UpdateItem: only a live outcome-unknown item with exactly this epoch
        // and marking instant (`at`) becomes completed; a failed condition returns the item.
        let now = self.now();
        let expires = now.after(ttl);
        let wid = self.write_id();
        let out = self
            .update(
                key,
                // `out` first, as in `finish`.
                "SET #out = :out, #st = :two, #at = :now, #ex = :ex, #ttl = :ttl, #wid = :wid",
                "#st = :three AND #ep = :ep AND #at = :since AND #ex > :now",
                vec![
                    (":out", b(outcome.encode())),
                    (":two", n(ST_COMPLETED)),
                    (":three", n(ST_UNKNOWN)),
                    (":ep", n(expected.epoch)),
                    (":since", n(expected.since.as_millis())),
                    (":now", n(now.as_millis())),
                    (":ex", n(expires.as_millis())),
                    (":ttl", n(ttl_seconds(expires))),
                    (":wid", token_value(wid)),
                ],
            )
            .await?;
        Ok(match out {
            Cond::Applied(_) => ResolveOutcome::Completed,
            // Our own earlier attempt landed (the SDK retried after a lost answer).
            Cond::Failed(Some(item)) if Head::of(&item).written_by(wid) => {
                ResolveOutcome::Completed
            }
            Cond::Failed(Some(item)) if Head::of(&item).live(now) => ResolveOutcome::Refused {
                current: Box::new(decode(&item)?),
            },
            Cond::Failed(_) => ResolveOutcome::Absent,
        })
    }

    async fn list(&self, req: &ListRequest) -> Result<ListPage, StoreError> {
        let limit = req.limit.clamp(1, MAX_LIST_PAGE);
        let now = self.now();
        // The cursor is the hex of the last scanned item's raw partition key (of any length:
        // a foreign item in the table must not end the listing).
        let start = match &req.cursor {
            Some(cursor) => Some(HashMap::from([(
                PARTITION_KEY.to_owned(),
                AttributeValue::B(Blob::new(cursor_bytes(cursor)?)),
            )])),
            None => None,
        };
        self.inner.calls.scan.fetch_add(1, Ordering::Relaxed);
        let filter = "#ex > :now";
        let out = self
            .inner
            .client
            .scan()
            .table_name(&self.inner.table)
            .consistent_read(true)
            .limit(i32::try_from(limit).unwrap_or(i32::MAX))
            .set_exclusive_start_key(start)
            .filter_expression(filter)
            .set_expression_attribute_names(Some(names(&[filter])))
            .set_expression_attribute_values(Some(values(vec![(":now", n(now.as_millis()))])))
            .send()
            .await
            .map_err(|e| error::sdk("Scan", e))?;
        let mut records = Vec::with_capacity(out.items().len());
        for item in out.items() {
            match item::store_key(item).and_then(|k| decode(item).map(|r| (k, r))) {
                Ok((k, r)) if !r.is_expired(now) => records.push((k, r)),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "skipping an undecodable record in list"),
            }
        }
        let next = match out.last_evaluated_key() {
            Some(last) => Some(cursor_of(last)?),
            None => None,
        };
        Ok(ListPage {
            records,
            next,
            passed_over: 0,
        })
    }

    async fn purge_expired(&self, _limit: usize) -> Result<usize, StoreError> {
        // DynamoDB's TTL deletes expired items (late); every operation treats them as absent.
        Ok(0)
    }
}

/// The largest partition key DynamoDB takes (2,048 bytes), as a cursor bound.
const MAX_PARTITION_KEY: usize = 2_048;

/// A list cursor for the last scanned item: the hex of its raw partition key.
fn cursor_of(last: &HashMap<String, AttributeValue>) -> Result<String, StoreError> {
    match last.get(PARTITION_KEY) {
        Some(AttributeValue::B(raw)) => {
            Ok(raw.as_ref().iter().map(|b| format!("{b:02x}")).collect())
        }
        _ => Err(StoreError::new(
            ErrorKind::Internal,
            "dynamodb Scan: the last evaluated key has no binary pk",
        )),
    }
}

/// The raw partition key of a list cursor made by [`cursor_of`].
fn cursor_bytes(cursor: &str) -> Result<Vec<u8>, StoreError> {
    let invalid = || StoreError::new(ErrorKind::Internal, "invalid list cursor");
    if cursor.is_empty() || !cursor.len().is_multiple_of(2) || cursor.len() > 2 * MAX_PARTITION_KEY
    {
        return Err(invalid());
    }
    (0..cursor.len())
        .step_by(2)
        .map(|i| {
            cursor
                .get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(invalid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn list_cursors_carry_any_partition_key() {
        for raw in [vec![0u8; 32], vec![0xab; 3], vec![1, 2, 255]] {
            let last = HashMap::from([(
                PARTITION_KEY.to_owned(),
                AttributeValue::B(Blob::new(raw.clone())),
            )]);
            assert_eq!(cursor_bytes(&cursor_of(&last).unwrap()).unwrap(), raw);
        }
        for bad in ["", "abc", "zz", "é1"] {
            assert!(cursor_bytes(bad).is_err(), "{bad:?}");
        }
        assert!(cursor_bytes(&"00".repeat(MAX_PARTITION_KEY + 1)).is_err());
    }

    #[test]
    fn every_attribute_goes_through_a_name() {
        let got = names(&["#st = :one AND #ep = :ep", "SET #ttl = :ttl REMOVE #wid"]);
        let mut keys: Vec<_> = got.iter().map(|(k, v)| format!("{k}={v}")).collect();
        keys.sort();
        assert_eq!(keys, ["#ep=ep", "#st=st", "#ttl=ttl", "#wid=wid"]);
        assert_eq!(
            names(&["attribute_not_exists(#pk) OR #ex <= :now"]).len(),
            2
        );
    }

    #[test]
    fn table_names_are_checked() {
        for ok in ["idemgate", "a.b-c_d", &"x".repeat(255)] {
            assert!(validate_table_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "ab", "has space", "ünï", &"x".repeat(256)] {
            let err = validate_table_name(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
        }
    }
}
