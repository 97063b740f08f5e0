//! The layer's metrics, through the [`metrics`] facade: their names, descriptions (the `# HELP`
//! of a Prometheus exporter) and label values, and handles registered once, when the layer is
//! built, for every label set known then (every route × every [`Answer`]), so that each series
//! exists at zero before the first request.
//!
//! Install the metrics recorder before building the layer (handles registered before go
//! nowhere), then call [`describe`] once, and give the exporter [`DURATION_BUCKETS`] for the two
//! histograms (a Prometheus exporter otherwise renders them as summaries).
//!
//! ```
//! use idemgate_core::{Engine, MemoryStore};
//! use idemgate_tower::{IdempotencyLayer, metrics, policy::Routes};
//!
//! // metrics_exporter_prometheus::PrometheusBuilder::new()
//! //     .set_buckets_for_metric(Matcher::Prefix("idemgate_".into()), &metrics::DURATION_BUCKETS)?
//! //     .install_recorder()?;
//! metrics::describe();
//! let layer = IdempotencyLayer::new(Engine::builder(MemoryStore::default()).build(),
//!     Routes::catch_all(false));
//! # let _ = layer;
//! ```
//!
//! | family | type | labels |
//! | --- | --- | --- |
//! | [`REQUESTS`] | counter | `route`, `outcome` ([`Answer::as_str`]) |
//! | [`REQUEST_DURATION`] | histogram | `route`, `outcome` |
//! | [`UPSTREAM_DURATION`] | histogram | `route` |
//! | [`UNSCOPED_REQUESTS`] | counter | `route` |
//! | [`LIMIT_REJECTIONS`] | counter | `reason` ([`LIMIT_REASONS`]) |
//!
//! Requests no route covers are labelled `route="(none)"` ([`NO_ROUTE`]).

use std::collections::HashMap;
use std::time::Duration;

use metrics::{Counter, Histogram};

use crate::policy::Routes;
use crate::respond::Answer;

/// `idemgate_requests_total{route, outcome}`: requests by route and what became of them.
pub const REQUESTS: &str = "idemgate_requests_total";
/// `idemgate_request_duration_seconds{route, outcome}`: from the request's head reaching the
/// layer to the answer's head leaving it.
pub const REQUEST_DURATION: &str = "idemgate_request_duration_seconds";
/// `idemgate_upstream_duration_seconds{route}`: from a request being handed to the inner service
/// (the upstream) to its response head, or its failure.
pub const UPSTREAM_DURATION: &str = "idemgate_upstream_duration_seconds";
/// `idemgate_unscoped_requests_total{route}`: protected requests that carried none of their
/// route's scope headers.
pub const UNSCOPED_REQUESTS: &str = "idemgate_unscoped_requests_total";
/// `idemgate_limit_rejections_total{reason}`: requests refused at a limit.
pub const LIMIT_REJECTIONS: &str = "idemgate_limit_rejections_total";

/// The `route` label of requests that no route covers (passed through untouched). Parentheses
/// keep it apart from any route name a configuration is likely to use.
pub const NO_ROUTE: &str = "(none)";

/// The `reason` values of [`LIMIT_REJECTIONS`] the layer itself counts (the settings' names).
pub const LIMIT_REASONS: [&str; 2] = ["max_concurrent_requests", "max_buffered_body_bytes"];

/// Histogram buckets (seconds) for [`REQUEST_DURATION`] and [`UPSTREAM_DURATION`]: 0.5 ms (a
/// replay from a local cache) to 60 s (the default upstream response timeout).
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Describes the layer's families to the installed recorder (their `# HELP` lines).
pub fn describe() {
    metrics::describe_counter!(
        REQUESTS,
        "Requests by route and outcome (executed, replayed, conflict, mismatch, missing_key, \
         invalid_key, too_large, overloaded, store_error, store_full, unknown, passthrough); \
         route=\"(none)\" for requests no route covers"
    );
    metrics::describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time from a request's head reaching the idempotency layer to its answer's head, by \
         route and outcome"
    );
    metrics::describe_histogram!(
        UPSTREAM_DURATION,
        metrics::Unit::Seconds,
        "Time from a request being sent upstream to the upstream's response head (or its \
         failure), by route; replays and refusals send nothing upstream"
    );
    metrics::describe_counter!(
        UNSCOPED_REQUESTS,
        "Protected requests that carried none of their route's scope headers (they share one \
         anonymous scope)"
    );
    metrics::describe_counter!(
        LIMIT_REJECTIONS,
        "Requests or connections refused at a limit, by the setting's name"
    );
}

/// The handles of one route (or of requests no route covers).
struct RouteSignals {
    requests: [Counter; Answer::ALL.len()],
    duration: [Histogram; Answer::ALL.len()],
    upstream: Histogram,
    unscoped: Counter,
}

impl RouteSignals {
    fn register(route: &str) -> Self {
        let route = route.to_owned();
        Self {
            requests: Answer::ALL.map(|a| {
                metrics::counter!(REQUESTS, "route" => route.clone(), "outcome" => a.as_str())
            }),
            duration: Answer::ALL.map(|a| {
                metrics::histogram!(REQUEST_DURATION, "route" => route.clone(), "outcome" => a.as_str())
            }),
            upstream: metrics::histogram!(UPSTREAM_DURATION, "route" => route.clone()),
            unscoped: metrics::counter!(UNSCOPED_REQUESTS, "route" => route),
        }
    }
}

/// Every handle the layer records into, registered (at zero) when the layer is built, so that a
/// request looks its handles up by route name and never allocates labels.
pub(crate) struct Signals {
    routes: HashMap<String, RouteSignals>,
    /// Requests no route covers.
    none: RouteSignals,
}

impl Signals {
    pub(crate) fn register(routes: &Routes) -> Self {
        let mut by_name = HashMap::new();
        for r in routes.iter() {
            by_name
                .entry(r.name.clone())
                .or_insert_with(|| RouteSignals::register(&r.name));
        }
        // Under (none) only pass-through can happen: the other handles record nowhere.
        let passthrough = Answer::Passthrough as usize;
        let none = RouteSignals {
            requests: std::array::from_fn(|i| match i == passthrough {
                true => {
                    metrics::counter!(REQUESTS, "route" => NO_ROUTE, "outcome" => Answer::Passthrough.as_str())
                }
                false => Counter::noop(),
            }),
            duration: std::array::from_fn(|i| match i == passthrough {
                true => {
                    metrics::histogram!(REQUEST_DURATION, "route" => NO_ROUTE, "outcome" => Answer::Passthrough.as_str())
                }
                false => Histogram::noop(),
            }),
            upstream: metrics::histogram!(UPSTREAM_DURATION, "route" => NO_ROUTE),
            unscoped: Counter::noop(),
        };
        for reason in LIMIT_REASONS {
            // Registered: the series exists at zero.
            let _ = metrics::counter!(LIMIT_REJECTIONS, "reason" => reason);
        }
        Self {
            routes: by_name,
            none,
        }
    }

    fn route(&self, route: Option<&str>) -> &RouteSignals {
        route
            .and_then(|name| self.routes.get(name))
            .unwrap_or(&self.none)
    }

    /// Counts an answered request in [`REQUESTS`].
    pub(crate) fn count(&self, route: Option<&str>, answer: Answer) {
        self.route(route).requests[answer as usize].increment(1);
    }

    /// Records how long a request took to be answered in [`REQUEST_DURATION`].
    pub(crate) fn took(&self, route: Option<&str>, answer: Answer, elapsed: Duration) {
        self.route(route).duration[answer as usize].record(elapsed.as_secs_f64());
    }

    /// The [`REQUEST_DURATION`] histogram of `route` and `answer`.
    pub(crate) fn took_handle(&self, route: Option<&str>, answer: Answer) -> Histogram {
        self.route(route).duration[answer as usize].clone()
    }

    /// The [`UPSTREAM_DURATION`] histogram of `route`.
    pub(crate) fn upstream(&self, route: Option<&str>) -> Histogram {
        self.route(route).upstream.clone()
    }

    /// Counts a protected request without scope headers in [`UNSCOPED_REQUESTS`].
    pub(crate) fn unscoped(&self, route: &str) {
        self.route(Some(route)).unscoped.increment(1);
    }
}

/// Counts a request refused at a limit, by the setting's name, in [`LIMIT_REJECTIONS`].
pub(crate) fn limit_rejection(reason: &'static str) {
    metrics::counter!(LIMIT_REJECTIONS, "reason" => reason).increment(1);
}
