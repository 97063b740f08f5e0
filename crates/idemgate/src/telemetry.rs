//! `idemgate serve`'s metrics (docs/operations.md documents every family): the Prometheus
//! recorder and its histogram buckets, the description (`# HELP`) of every family, the series
//! registered at zero before the first request, `idemgate_build_info`, the engine's counters
//! copied at each scrape (the census of outcome-unknown records that sets three gauges is
//! [`crate::census`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use idemgate_core::{Engine, SharedStore};
use idemgate_stores::metrics::STORE_OPERATION_SECONDS;
use idemgate_tower::metrics::{DURATION_BUCKETS, REQUEST_DURATION, UPSTREAM_DURATION};
use idemgate_tower::upstream::Cause;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;

/// Buckets of `idemgate_store_operation_seconds` (100 µs to 1 s: a store round trip).
const STORE_LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// `idemgate_build_info{version}`: always 1.
pub const BUILD_INFO: &str = "idemgate_build_info";
/// `idemgate_in_flight`: operations this instance runs upstream right now.
pub const IN_FLIGHT: &str = "idemgate_in_flight";
/// `idemgate_waiters`: requests this instance holds while a duplicate runs.
pub const WAITERS: &str = "idemgate_waiters";
/// `idemgate_lease_renewals_total`.
pub const LEASE_RENEWALS: &str = "idemgate_lease_renewals_total";
/// `idemgate_lease_renewal_errors_total`.
pub const LEASE_RENEWAL_ERRORS: &str = "idemgate_lease_renewal_errors_total";
/// `idemgate_leases_lost_total`.
pub const LEASES_LOST: &str = "idemgate_leases_lost_total";
/// `idemgate_takeovers_total`.
pub const TAKEOVERS: &str = "idemgate_takeovers_total";
/// `idemgate_outcome_unknown_marked_total`.
pub const UNKNOWN_MARKED: &str = "idemgate_outcome_unknown_marked_total";
/// `idemgate_outcome_unknown_records`: from the census.
pub const UNKNOWN_RECORDS: &str = "idemgate_outcome_unknown_records";
/// `idemgate_outcome_unknown_scan_records`: records the census's last pass visited.
pub const UNKNOWN_SCAN_RECORDS: &str = "idemgate_outcome_unknown_scan_records";
/// `idemgate_outcome_unknown_scan_timestamp_seconds`: when the census's last pass ended.
pub const UNKNOWN_SCAN_TIMESTAMP: &str = "idemgate_outcome_unknown_scan_timestamp_seconds";
/// `idemgate_client_connections`.
pub const CLIENT_CONNECTIONS: &str = "idemgate_client_connections";
/// `idemgate_accept_errors_total{reason}`.
pub const ACCEPT_ERRORS: &str = "idemgate_accept_errors_total";
/// The `reason` values of [`ACCEPT_ERRORS`].
pub const ACCEPT_ERROR_REASONS: [&str; 3] = ["fd_exhausted", "memory", "other"];
/// `idemgate_upstream_errors_total{cause, sent}`.
pub const UPSTREAM_ERRORS: &str = "idemgate_upstream_errors_total";
/// `idemgate_upstream_retries_total{reason}`.
pub const UPSTREAM_RETRIES: &str = "idemgate_upstream_retries_total";
/// The `reason` values of `idemgate_limit_rejections_total` counted by the proxy's edge (the
/// layer counts its own: [`idemgate_tower::metrics::LIMIT_REASONS`]).
pub const EDGE_LIMIT_REASONS: [&str; 3] = [
    "max_connections",
    "header_read_timeout",
    "body_read_timeout",
];

/// Installs the Prometheus recorder, with buckets for every histogram (without them the exporter
/// renders summaries).
pub fn install() -> Result<PrometheusHandle> {
    let buckets = |b: PrometheusBuilder, name: &str, buckets: &[f64]| {
        b.set_buckets_for_metric(Matcher::Full(name.into()), buckets)
            .context("configuring metrics")
    };
    let builder = PrometheusBuilder::new();
    let builder = buckets(builder, STORE_OPERATION_SECONDS, &STORE_LATENCY_BUCKETS)?;
    let builder = buckets(builder, REQUEST_DURATION, &DURATION_BUCKETS)?;
    let builder = buckets(builder, UPSTREAM_DURATION, &DURATION_BUCKETS)?;
    builder
        .install_recorder()
        .context("installing the metrics recorder")
}

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds the histograms' recorded samples into their buckets every [`UPKEEP_INTERVAL`]: the
/// recorder keeps every sample until then (a scrape does it too), so without this an instance
/// nobody scrapes would hold 8 bytes per sample (several per request) for ever.
pub fn spawn_upkeep(prometheus: PrometheusHandle) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            prometheus.run_upkeep();
        }
    })
}

/// Describes every family and registers the series known at start at zero (after
/// [`install`]; the layer and the store register their own when they are built).
pub fn describe_and_register() {
    idemgate_tower::metrics::describe();
    idemgate_stores::metrics::describe();
    metrics::describe_gauge!(
        BUILD_INFO,
        "Always 1; the version of this idemgate binary is in the label"
    );
    metrics::describe_gauge!(
        IN_FLIGHT,
        "Protected requests this instance is running upstream right now (holding a lease)"
    );
    metrics::describe_gauge!(
        WAITERS,
        "Requests this instance holds right now while a request with the same key runs (wait mode)"
    );
    metrics::describe_counter!(
        LEASE_RENEWALS,
        "Lease renewals (heartbeats of requests running longer than lease_ttl/3) that succeeded"
    );
    metrics::describe_counter!(
        LEASE_RENEWAL_ERRORS,
        "Lease renewals that failed or did not answer in time (retried at the next tick)"
    );
    metrics::describe_counter!(
        LEASES_LOST,
        "Requests that ran but found their lease gone when recording the outcome (key deleted \
         by an operator, or taken over after the lease expired): nothing was recorded, and \
         another run may repeat the request; each one is logged at WARN"
    );
    metrics::describe_counter!(
        TAKEOVERS,
        "Keys this instance took over after their holder's lease expired (the holder died or \
         stalled): the request runs again at epoch + 1"
    );
    metrics::describe_counter!(
        UNKNOWN_MARKED,
        "Records this instance marked outcome-unknown (the request may or may not have taken \
         effect); each one is logged at WARN with the command that resolves it"
    );
    metrics::describe_gauge!(
        UNKNOWN_RECORDS,
        "Outcome-unknown records of this namespace in the store, counted by the last complete \
         census pass (every instance on a store reports the same figure: aggregate with max); \
         absent until the first pass ends, or when unknown_scan_rate = 0"
    );
    metrics::describe_gauge!(
        UNKNOWN_SCAN_RECORDS,
        "Records (of every namespace) the last complete census pass visited"
    );
    metrics::describe_gauge!(
        UNKNOWN_SCAN_TIMESTAMP,
        metrics::Unit::Seconds,
        "Unix time at which the last complete census pass ended (how old \
         idemgate_outcome_unknown_records is)"
    );
    metrics::describe_gauge!(CLIENT_CONNECTIONS, "Open client connections");
    metrics::describe_counter!(
        ACCEPT_ERRORS,
        "Failed accepts of client connections, by reason (fd_exhausted, memory, other)"
    );
    metrics::describe_counter!(
        UPSTREAM_ERRORS,
        "Failed upstream exchanges, by cause class and whether the request may have been sent"
    );
    metrics::describe_counter!(
        UPSTREAM_RETRIES,
        "Requests sent again on a new connection because a pooled one closed before a byte was \
         written (provably not sent)"
    );

    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Registered: each series exists at zero before the first event.
    let _ = metrics::gauge!(IN_FLIGHT);
    let _ = metrics::gauge!(WAITERS);
    let _ = metrics::gauge!(CLIENT_CONNECTIONS);
    for name in [
        LEASE_RENEWALS,
        LEASE_RENEWAL_ERRORS,
        LEASES_LOST,
        TAKEOVERS,
        UNKNOWN_MARKED,
    ] {
        let _ = metrics::counter!(name);
    }
    for reason in ACCEPT_ERROR_REASONS {
        let _ = metrics::counter!(ACCEPT_ERRORS, "reason" => reason);
    }
    for cause in Cause::ALL {
        for sent in ["false", "true"] {
            let _ = metrics::counter!(UPSTREAM_ERRORS, "cause" => cause.slug(), "sent" => sent);
        }
    }
    let _ = metrics::counter!(UPSTREAM_RETRIES, "reason" => "not_sent");
    for reason in EDGE_LIMIT_REASONS {
        let _ = metrics::counter!(idemgate_tower::metrics::LIMIT_REJECTIONS, "reason" => reason);
    }
}

/// The `/metrics` page: the engine's counters copied in, then everything rendered.
pub fn render(engine: &Engine<SharedStore>, prometheus: &PrometheusHandle) -> String {
    let st = engine.stats();
    metrics::gauge!(IN_FLIGHT).set(st.in_flight.load(Ordering::Relaxed) as f64);
    metrics::gauge!(WAITERS).set(st.waiting.load(Ordering::Relaxed) as f64);
    for (name, value) in [
        (LEASE_RENEWALS, &st.renewals),
        (LEASE_RENEWAL_ERRORS, &st.renewal_errors),
        (LEASES_LOST, &st.leases_lost),
        (TAKEOVERS, &st.takeovers),
        (UNKNOWN_MARKED, &st.marked_unknown),
    ] {
        metrics::counter!(name).absolute(value.load(Ordering::Relaxed));
    }
    prometheus.render()
}

/// The command an operator runs to resolve an outcome-unknown record through this instance's
/// admin listener, as the engine's warnings name it (`{store_key}` is filled in by the engine).
pub fn resolve_hint(admin: SocketAddr) -> String {
    // A listener on every address is reached on loopback from the same machine.
    let mut reach = admin;
    if reach.ip().is_unspecified() {
        reach.set_ip(match reach {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("idemgate keys --admin http://{reach} resolve {{store_key}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hint_reaches_the_admin_listener_from_this_machine() {
        let hint = |a: &str| resolve_hint(a.parse().unwrap_or_else(|e| panic!("{a}: {e}")));
        assert_eq!(
            hint("127.0.0.1:9090"),
            "idemgate keys --admin http://127.0.0.1:9090 resolve {store_key}"
        );
        assert_eq!(
            hint("0.0.0.0:9191"),
            "idemgate keys --admin http://127.0.0.1:9191 resolve {store_key}"
        );
        assert_eq!(
            hint("[::]:9090"),
            "idemgate keys --admin http://[::1]:9090 resolve {store_key}"
        );
        assert_eq!(
            hint("10.1.2.3:9090"),
            "idemgate keys --admin http://10.1.2.3:9090 resolve {store_key}"
        );
    }
}
