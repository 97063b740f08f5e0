//! What an operator sees (issue 16): `/metrics` (every family described and typed, every series
//! there at zero before traffic, pass-through requests labelled, histograms, build info, the
//! census of outcome-unknown records, replay-cache hits and misses), the WARN lines for
//! outcome-unknown records and lost leases (route, client key, store key, and a resolve command
//! that works), and the operator files in `deploy/` naming only metrics a real scrape has.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use common::{Http, Proxy, Upstream, config_file, hold_first, metric, unique, until};
use http::StatusCode;
use serde_json::Value;

/// Every `outcome` label of `idemgate_requests_total`.
const OUTCOMES: [&str; 12] = [
    "executed",
    "replayed",
    "conflict",
    "mismatch",
    "missing_key",
    "invalid_key",
    "too_large",
    "overloaded",
    "store_error",
    "store_full",
    "unknown",
    "passthrough",
];

/// One `/metrics` page, parsed.
struct Scrape {
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    /// (sample name, labels without braces, value).
    samples: Vec<(String, String, f64)>,
    text: String,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let (mut help, mut types, mut samples) = (BTreeMap::new(), BTreeMap::new(), Vec::new());
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, doc) = rest.split_once(' ').unwrap_or((rest, ""));
                help.insert(name.to_owned(), doc.to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("a TYPE line has a type");
                types.insert(name.to_owned(), kind.to_owned());
            } else {
                assert!(!line.starts_with('#'), "unexpected comment: {line}");
                let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (name, labels.trim_end_matches('}')),
                    None => (series, ""),
                };
                let value: f64 = value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
                samples.push((name.to_owned(), labels.to_owned(), value));
            }
        }
        Self {
            help,
            types,
            samples,
            text,
        }
    }

    /// The family a sample belongs to (a histogram's `_bucket`, `_sum`, `_count` included).
    fn family_of<'a>(&self, sample: &'a str) -> Option<&'a str> {
        if self.types.contains_key(sample) {
            return Some(sample);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let family = sample.strip_suffix(suffix)?;
            (self.types.get(family)? == "histogram").then_some(family)
        })
    }

    /// The value of the sample `name{labels}` (labels exactly as rendered).
    fn value(&self, name: &str, labels: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && l == labels)
            .map(|(_, _, v)| *v)
    }

    fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|(n, _, _)| n.as_str()).collect()
    }
}

async fn scrape(http: &Http, proxy: &Proxy) -> Scrape {
    let res = http.get(&proxy.admin_url("/metrics")).await;
    assert_eq!(res.status, StatusCode::OK);
    Scrape::parse(String::from_utf8(res.body.to_vec()).unwrap())
}

/// Scrapes until the census has finished its first pass (the gauges appear then), at most 20 s.
async fn scrape_after_census(http: &Http, proxy: &Proxy) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let s = scrape(http, proxy).await;
        if s.names()
            .contains("idemgate_outcome_unknown_scan_timestamp_seconds")
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the census never finished a pass:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_is_described_and_every_series_is_there_at_zero_before_traffic() {
    let up = Upstream::start().await;
    let (_dir, config) = config_file(
        "[[route]]\nname = \"pay\"\npath = \"/pay/**\"\nrequired = true\n\n\
         [[route]]\nname = \"orders\"\npath = \"/orders/**\"\n",
    );
    let proxy = Proxy::start(&up.url(), "memory://", &["--config", &config]);
    let http = Http::default();

    let before = scrape(&http, &proxy).await;
    assert!(!before.samples.is_empty());
    for (name, labels, _) in &before.samples {
        let family = before
            .family_of(name)
            .unwrap_or_else(|| panic!("{name}{{{labels}}} has no # TYPE"));
        let help = before.help.get(family).map(String::as_str);
        assert!(help.is_some_and(|h| h.len() > 10), "{family} has no # HELP");
    }
    for family in before.types.keys() {
        assert!(before.help.contains_key(family), "{family} has no # HELP");
    }
    // No request yet: every counter is at zero, and there for every route and outcome.
    for (name, labels, value) in &before.samples {
        if before.types.get(name).is_some_and(|t| t == "counter") {
            assert_eq!(*value, 0.0, "{name}{{{labels}}}");
        }
    }
    for route in ["pay", "orders"] {
        for outcome in OUTCOMES {
            let labels = format!("route=\"{route}\",outcome=\"{outcome}\"");
            assert_eq!(
                before.value("idemgate_requests_total", &labels),
                Some(0.0),
                "idemgate_requests_total{{{labels}}}"
            );
            let bucket = format!("{labels},le=\"+Inf\"");
            assert_eq!(
                before.value("idemgate_request_duration_seconds_bucket", &bucket),
                Some(0.0),
                "{bucket}"
            );
        }
        let labels = format!("route=\"{route}\"");
        assert_eq!(
            before.value("idemgate_unscoped_requests_total", &labels),
            Some(0.0)
        );
        assert_eq!(
            before.value("idemgate_upstream_duration_seconds_count", &labels),
            Some(0.0)
        );
    }
    let passthrough = "route=\"(none)\",outcome=\"passthrough\"";
    assert_eq!(
        before.value("idemgate_requests_total", passthrough),
        Some(0.0)
    );
    for family in [
        "idemgate_request_duration_seconds",
        "idemgate_upstream_duration_seconds",
        "idemgate_store_operation_seconds",
    ] {
        assert_eq!(
            before.types.get(family).map(String::as_str),
            Some("histogram")
        );
    }
    for name in [
        "idemgate_store_errors_total",
        "idemgate_replay_cache_hits_total",
        "idemgate_replay_cache_misses_total",
        "idemgate_takeovers_total",
        "idemgate_leases_lost_total",
        "idemgate_outcome_unknown_marked_total",
        "idemgate_upstream_errors_total",
        "idemgate_limit_rejections_total",
        "idemgate_accept_errors_total",
    ] {
        assert_eq!(
            before.types.get(name).map(String::as_str),
            Some("counter"),
            "{name}"
        );
    }
    assert_eq!(
        before.value(
            "idemgate_build_info",
            &format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))
        ),
        Some(1.0)
    );

    // A request no route covers, and one a route covers without a key where none is required.
    assert_eq!(
        http.get(&proxy.url("/elsewhere")).await.status,
        StatusCode::OK
    );
    let open = http.post(&proxy.url("/orders/1"), None, b"{}").await;
    assert_eq!(open.status, StatusCode::CREATED);
    let after = scrape(&http, &proxy).await;
    assert_eq!(
        after.value("idemgate_requests_total", passthrough),
        Some(1.0)
    );
    assert_eq!(
        after.value(
            "idemgate_requests_total",
            "route=\"orders\",outcome=\"passthrough\""
        ),
        Some(1.0)
    );
    assert!(
        !after.text.contains("route=\"\""),
        "a request is labelled with an empty route:\n{}",
        after.text
    );
    assert_eq!(
        after.value(
            "idemgate_request_duration_seconds_count",
            "route=\"(none)\",outcome=\"passthrough\""
        ),
        Some(1.0)
    );
    assert_eq!(
        after.value(
            "idemgate_upstream_duration_seconds_count",
            "route=\"(none)\""
        ),
        Some(1.0)
    );
}

/// The metric names a file mentions: every `idemgate_…` word.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("idemgate_") {
        let word: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + word.len()..];
        names.insert(word);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_the_alerts_use_exists_in_a_real_scrape() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let mut used = BTreeSet::new();
    for file in ["grafana/idemgate.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let names = metric_names(&text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        used.extend(names);
    }
    // The extraction finds what the files are about.
    for name in [
        "idemgate_outcome_unknown_records",
        "idemgate_store_errors_total",
        "idemgate_takeovers_total",
        "idemgate_leases_lost_total",
        "idemgate_requests_total",
        "idemgate_request_duration_seconds_bucket",
    ] {
        assert!(used.contains(name), "{name} not found in deploy/: {used:?}");
    }

    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    http.post(&proxy.url("/pay"), Some("dash-1"), b"{}").await;
    let replay = http.post(&proxy.url("/pay"), Some("dash-1"), b"{}").await;
    assert!(replay.replayed());
    http.get(&proxy.url("/")).await;
    let s = scrape_after_census(&http, &proxy).await;
    let names = s.names();
    let missing: Vec<_> = used
        .iter()
        .filter(|n| !names.contains(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/ uses metrics a scrape does not have: {missing:?}"
    );
}

/// The JSON log lines (of `--log-format json`) at WARN whose message starts with `message`.
fn warnings(proxy: &Proxy, message: &str) -> Vec<Value> {
    proxy
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["level"] == "WARN"
                && v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
        })
        .collect()
}

async fn wait_for_warning(proxy: &Proxy, message: &str) -> Value {
    until(10, message, || !warnings(proxy, message).is_empty()).await;
    let found = warnings(proxy, message);
    assert_eq!(found.len(), 1, "{found:?}");
    found[0]["fields"].clone()
}

/// `idemgate keys ARGS` against the proxy's admin API: its JSON answer.
fn keys_cli(proxy: &Proxy, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args([
            "keys",
            "--json",
            "--admin",
            &format!("http://{}", proxy.admin),
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_unknown_request_warns_with_a_resolve_command_that_works() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &["--log-format", "json"]);
    let http = Http::default();
    // A long key: logged capped, with how much was left out.
    let key = format!("unknown-{}", "x".repeat(200));
    let res = http
        .post(&proxy.url("/pay?truncate=1"), Some(&key), b"{}")
        .await;
    assert_eq!(res.status, StatusCode::BAD_GATEWAY);
    assert_eq!(res.problem_type(), "urn:idemgate:problem:outcome-unknown");

    let warned = wait_for_warning(&proxy, "outcome unknown").await;
    let store_key = keys_cli(&proxy, &["get", "--key", &key])["store_key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(warned["route"], "default");
    assert_eq!(warned["key"], format!("{}…(+80B)", &key[..128]));
    assert_eq!(warned["store_key"], store_key.as_str());
    assert_eq!(warned["epoch"], 1);
    assert_eq!(warned["reason"], "no_complete_answer");
    let hint = warned["hint"].as_str().unwrap();
    assert_eq!(
        hint,
        format!(
            "idemgate keys --admin http://{} resolve {store_key}",
            proxy.admin
        )
    );
    assert_eq!(
        metric(&http, &proxy, "idemgate_outcome_unknown_marked_total", "").await,
        1.0
    );

    // A retry is told 502 outcome-unknown, and nothing runs again...
    let retry = http
        .post(&proxy.url("/pay?truncate=1"), Some(&key), b"{}")
        .await;
    assert_eq!(retry.problem_type(), "urn:idemgate:problem:outcome-unknown");
    assert_eq!(up.state.executions_of(&key), 1);
    // ...until the operator runs the hint, word for word.
    let mut words = hint.split_whitespace();
    assert_eq!(words.next(), Some("idemgate"));
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(words)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    http.post(&proxy.url("/pay?truncate=1"), Some(&key), b"{}")
        .await;
    assert_eq!(up.state.executions_of(&key), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_warns_with_route_key_store_key_and_the_resolve_command() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &["--log-format", "json"]);
    let http = Http::default();
    let first = hold_first(&http, &up, proxy.url("/pay?hold=1"), "lost-lease").await;
    let store_key = keys_cli(&proxy, &["get", "--key", "lost-lease"])["store_key"]
        .as_str()
        .unwrap()
        .to_owned();
    // An operator revokes the running request: its lease is gone when it finishes.
    let forced = keys_cli(&proxy, &["delete", "--force", &store_key]);
    assert_eq!(forced["revoked_epoch"], 1);
    up.state.release_held();
    assert_eq!(first.await.unwrap().status, StatusCode::CONFLICT);

    let warned = wait_for_warning(&proxy, "lease lost").await;
    assert_eq!(warned["route"], "default");
    assert_eq!(warned["key"], "lost-lease");
    assert_eq!(warned["store_key"], store_key.as_str());
    assert_eq!(warned["epoch"], 1);
    assert_eq!(warned["not_written"], "outcome");
    assert_eq!(
        warned["hint"],
        format!(
            "idemgate keys --admin http://{} resolve {store_key}",
            proxy.admin
        )
    );
    assert_eq!(
        metric(&http, &proxy, "idemgate_leases_lost_total", "").await,
        1.0
    );
}

/// The census counts what is in the store, not what this process did: an instance that starts
/// on a store holding an outcome-unknown record reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_census_counts_the_outcome_unknown_records_in_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().join("data").display());
    let up = Upstream::start().await;
    let http = Http::default();
    {
        let mut first = Proxy::start(&up.url(), &store, &[]);
        let s = scrape_after_census(&http, &first).await;
        assert_eq!(s.value("idemgate_outcome_unknown_records", ""), Some(0.0));
        let res = http
            .post(&first.url("/pay?truncate=1"), Some("census"), b"{}")
            .await;
        assert_eq!(res.status, StatusCode::BAD_GATEWAY);
        first.sigterm();
        assert!(first.child.wait().unwrap().success());
    }
    let second = Proxy::start(&up.url(), &store, &[]);
    let s = scrape_after_census(&http, &second).await;
    assert_eq!(s.value("idemgate_outcome_unknown_records", ""), Some(1.0));
    assert_eq!(
        s.value("idemgate_outcome_unknown_scan_records", ""),
        Some(1.0)
    );
    // This instance marked nothing itself.
    assert_eq!(
        s.value("idemgate_outcome_unknown_marked_total", ""),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn replays_from_the_local_cache_are_counted_as_hits_and_store_reads_as_misses() {
    let Some(redis) = common::server_url("IDEMGATE_TEST_REDIS_URL") else {
        return;
    };
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), &redis, &["--namespace", unique("signals-cache")]);
    let http = Http::default();
    let first = http.post(&proxy.url("/pay"), Some("cached"), b"{}").await;
    assert_eq!(first.status, StatusCode::CREATED);
    // The first replay reads the completed record from Redis (a miss) and caches it; the next
    // one is answered from the cache (a hit).
    for _ in 0..2 {
        assert!(
            http.post(&proxy.url("/pay"), Some("cached"), b"{}")
                .await
                .replayed()
        );
    }
    let m = |name: &'static str| metric(&http, &proxy, name, "");
    assert_eq!(m("idemgate_replay_cache_misses_total").await, 1.0);
    assert_eq!(m("idemgate_replay_cache_hits_total").await, 1.0);
}

#[test]
fn an_unknown_scan_rate_out_of_bounds_stops_the_binary() {
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:9",
            "--store",
            "memory://",
        ])
        .args(["--unknown-scan-rate", "1000001"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--unknown-scan-rate (IDEMGATE_UNKNOWN_SCAN_RATE) = 1000001 is out of bounds"),
        "{err}"
    );
}
