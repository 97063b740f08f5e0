//! The store's metrics: names, descriptions (`# HELP`) and the series registered at zero.
//!
//! | family | type | labels |
//! | --- | --- | --- |
//! | [`STORE_OPERATION_SECONDS`] | histogram | `op` |
//! | [`STORE_ERRORS`] | counter | `op`, `kind` |
//! | [`REPLAY_CACHE_HITS`] | counter | none |
//! | [`REPLAY_CACHE_MISSES`] | counter | none |
//! | [`DYNAMODB_CLOCK_SKEW`] | gauge | `table` |

/// `idemgate_store_operation_seconds{op}`: the latency of every store round trip.
pub const STORE_OPERATION_SECONDS: &str = "idemgate_store_operation_seconds";
/// `idemgate_store_errors_total{op, kind}`: store operations that failed (or missed their
/// deadline), by operation and [`ErrorKind`](idemgate_core::ErrorKind).
pub const STORE_ERRORS: &str = "idemgate_store_errors_total";
/// `idemgate_replay_cache_hits_total`: replays answered from the local replay cache.
pub const REPLAY_CACHE_HITS: &str = "idemgate_replay_cache_hits_total";
/// `idemgate_replay_cache_misses_total`: completed records the store had to send.
pub const REPLAY_CACHE_MISSES: &str = "idemgate_replay_cache_misses_total";
/// `idemgate_dynamodb_clock_skew_seconds{table}`: DynamoDB stores only.
pub const DYNAMODB_CLOCK_SKEW: &str = "idemgate_dynamodb_clock_skew_seconds";

/// Describes the store's families to the installed recorder (their `# HELP` lines).
pub fn describe() {
    metrics::describe_histogram!(
        STORE_OPERATION_SECONDS,
        metrics::Unit::Seconds,
        "Latency of store operations (real round trips: the replay cache sits above), by \
         operation"
    );
    metrics::describe_counter!(
        STORE_ERRORS,
        "Store operations that failed or missed their deadline, by operation and error kind \
         (unavailable, timeout, corrupt, capacity, config, internal)"
    );
    metrics::describe_counter!(
        REPLAY_CACHE_HITS,
        "Claims and reads of completed records answered from this instance's replay cache (no \
         store round trip); stays 0 without a cache (memory and file stores, or \
         replay_cache_entries = 0)"
    );
    metrics::describe_counter!(
        REPLAY_CACHE_MISSES,
        "Completed records the store sent because this instance's replay cache did not hold \
         them (a replay that cost a round trip); stays 0 without a cache"
    );
    metrics::describe_gauge!(
        DYNAMODB_CLOCK_SKEW,
        metrics::Unit::Seconds,
        "Estimated skew of DynamoDB's clock against this host's (DynamoDB stores only)"
    );
}
