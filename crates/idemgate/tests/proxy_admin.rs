//! The admin listener (health, readiness, metrics, JSON API, dashboard) and `idemgate keys`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::{Http, Proxy, Upstream, hold_first, metric, until};
use http::{HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

/// `idemgate keys --json ARGS` against `proxy`: success, and the JSON printed.
fn keys_cli(proxy: &Proxy, args: &[&str]) -> (bool, Value) {
    let out = Command::new(common::bin())
        .args([
            "keys",
            "--json",
            "--admin",
            &format!("http://{}", proxy.admin),
        ])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (out.status.success(), value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    assert_eq!(
        http.get(&proxy.admin_url("/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        http.get(&proxy.admin_url("/readyz")).await.status,
        StatusCode::OK
    );
    http.post(&proxy.url("/pay"), Some("m"), b"{}").await;
    http.post(&proxy.url("/pay"), Some("m"), b"{}").await;
    http.post(&proxy.url("/pay"), Some("m"), b"[]").await;
    http.get(&proxy.url("/")).await;
    let m = |labels: &'static str| metric(&http, &proxy, "idemgate_requests_total", labels);
    assert_eq!(m("outcome=\"executed\"").await, 1.0);
    assert_eq!(m("outcome=\"replayed\"").await, 1.0);
    assert_eq!(m("outcome=\"mismatch\"").await, 1.0);
    assert_eq!(m("outcome=\"passthrough\"").await, 1.0);
    let text =
        String::from_utf8(http.get(&proxy.admin_url("/metrics")).await.body.to_vec()).unwrap();
    for name in [
        "idemgate_store_operation_seconds_bucket{op=\"claim\"",
        "idemgate_in_flight",
        "idemgate_waiters",
        "idemgate_lease_renewals_total",
        "idemgate_takeovers_total",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_looks_up_lists_deletes_and_resolves() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    let auth = |t: &'static str| {
        vec![
            ("idempotency-key", HeaderValue::from_static("adm-1")),
            ("authorization", HeaderValue::from_static(t)),
        ]
    };
    http.send(
        Method::POST,
        &proxy.url("/pay"),
        &auth("Bearer carol"),
        b"{}",
    )
    .await;

    // Lookup needs the principal: another principal's view of the same key is empty.
    let look = |cred: &'static str| {
        json!({ "key": "adm-1", "credentials": { "authorization": cred } }).to_string()
    };
    let lookup = |body: String| {
        let http = http.clone();
        let url = proxy.admin_url("/api/keys/lookup");
        async move {
            http.send(
                Method::POST,
                &url,
                &[("content-type", HeaderValue::from_static("application/json"))],
                body,
            )
            .await
            .json()
        }
    };
    let carol = lookup(look("Bearer carol")).await;
    assert_eq!(carol["record"]["state"], "completed");
    assert_eq!(carol["record"]["status"], 201);
    assert_eq!(carol["record"]["key"], "adm-1");
    let store_key = carol["store_key"].as_str().unwrap().to_owned();
    let dave = lookup(look("Bearer dave")).await;
    assert!(dave["record"].is_null());
    assert_ne!(dave["store_key"], carol["store_key"]);

    // List and get.
    let list = http
        .get(&proxy.admin_url("/api/keys?limit=10"))
        .await
        .json();
    assert!(
        list["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["store_key"] == store_key)
    );
    let got = http
        .get(&proxy.admin_url(&format!("/api/keys/{store_key}")))
        .await;
    assert_eq!(got.json()["state"], "completed");
    let bad = http.get(&proxy.admin_url("/api/keys/nothex")).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    // The CLI sees the same, and deletes: the next retry runs again.
    let (ok, listed) = keys_cli(&proxy, &["list"]);
    assert!(ok);
    assert!(
        listed["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["store_key"] == store_key)
    );
    let (ok, got) = keys_cli(
        &proxy,
        &[
            "get",
            "--key",
            "adm-1",
            "--credential",
            "authorization=Bearer carol",
        ],
    );
    assert!(ok);
    assert_eq!(got["store_key"], store_key);
    let (ok, deleted) = keys_cli(&proxy, &["delete", &store_key]);
    assert!(ok);
    assert_eq!(deleted["deleted"], true);
    let again = http
        .send(
            Method::POST,
            &proxy.url("/pay"),
            &auth("Bearer carol"),
            b"{}",
        )
        .await;
    assert!(!again.replayed());
    assert_eq!(up.state.executions(), 2);

    // Resolve: an outcome-unknown record becomes runnable again; others are refused.
    let cut = http
        .post(&proxy.url("/pay?truncate=1"), Some("adm-cut"), b"{}")
        .await;
    assert_eq!(cut.status, StatusCode::BAD_GATEWAY);
    let cut_key = lookup(json!({ "key": "adm-cut" }).to_string()).await;
    assert_eq!(cut_key["record"]["state"], "unknown");
    let cut_store_key = cut_key["store_key"].as_str().unwrap().to_owned();
    let (ok, _) = keys_cli(&proxy, &["resolve", &store_key]);
    assert!(!ok, "a completed record is not resolvable");
    let (ok, resolved) = keys_cli(&proxy, &["resolve", &cut_store_key]);
    assert!(ok);
    assert_eq!(resolved["resolved"], "retry");
    let rerun = http.post(&proxy.url("/pay"), Some("adm-cut"), b"{}").await;
    // Same key, new request path: the record is gone, so this is a fresh execution.
    assert_eq!(rerun.status, StatusCode::CREATED);
    assert!(!rerun.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_served_with_no_external_assets() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    let page = http.get(&proxy.admin_url("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(html.contains("<title>idemgate</title>"));
    // The SVG namespace name is an identifier, not something fetched; any other URL would be.
    let rest = html.replace("\"http://www.w3.org/2000/svg\"", "");
    assert!(
        !rest.contains("http://") && !rest.contains("https://"),
        "no external assets"
    );
    assert!(html.contains("/metrics") && html.contains("/api/keys"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_one_span_per_request_with_its_outcome() {
    let up = Upstream::start().await;
    let proxy = common::Proxy::start_with_env(
        &up.url(),
        "memory://",
        &["--log-format", "json"],
        &[("IDEMGATE_LOG", "info,idemgate_tower=debug")],
    );
    let http = Http::default();
    http.post(&proxy.url("/pay"), Some("logged"), b"{}").await;
    http.post(&proxy.url("/pay"), Some("logged"), b"{}").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let outcomes: Vec<String> = proxy
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["span"]["idemgate.outcome"].as_str().map(str::to_owned))
            .collect();
        if outcomes == ["executed", "replayed"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "log outcomes: {outcomes:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// An admin delete never opens the same epoch twice: an in-flight key is refused (409) unless
/// forced, and a forced delete revokes the holder so that the next retry runs at epoch 2 while
/// the first (epoch 1) may still run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_in_flight_key_needs_force_and_opens_the_next_epoch() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    let first = hold_first(&http, &up, proxy.url("/pay?hold=1"), "adm-live").await;
    let found = http
        .send(
            Method::POST,
            &proxy.admin_url("/api/keys/lookup"),
            &[("content-type", HeaderValue::from_static("application/json"))],
            json!({ "key": "adm-live" }).to_string(),
        )
        .await
        .json();
    assert_eq!(found["record"]["state"], "in_flight");
    let store_key = found["store_key"].as_str().unwrap().to_owned();

    let refused = http
        .send(
            Method::DELETE,
            &proxy.admin_url(&format!("/api/keys/{store_key}")),
            &[],
            b"",
        )
        .await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    let (ok, _) = keys_cli(&proxy, &["delete", &store_key]);
    assert!(!ok, "the CLI reports the refusal");

    let (ok, forced) = keys_cli(&proxy, &["delete", "--force", &store_key]);
    assert!(ok);
    assert_eq!(forced["revoked_epoch"], 1);
    assert_eq!(forced["next_epoch"], 2);

    // The retry runs again, at epoch 2, while the first still runs.
    let retry = http.spawn_post(proxy.url("/pay?hold=1"), "adm-live");
    until(10, "the retry to reach the upstream", || {
        up.state.held() == 2
    })
    .await;
    up.state.release_held();
    let (first, retry) = (first.await.unwrap(), retry.await.unwrap());
    // The revoked holder's client is not handed epoch 1's answer, which no retry would ever see
    // (its record was given to epoch 2): it is told to retry, and its retry replays epoch 2.
    assert_eq!(first.status, StatusCode::CONFLICT, "{first:?}");
    assert_eq!(
        first.problem_type(),
        "urn:idemgate:problem:request-in-flight"
    );
    assert_eq!(retry.json()["idempotency_epoch"], "2");
    assert_eq!(up.state.executions_of("adm-live"), 2);
    // The revoked holder could not write its outcome over the new one.
    let again = http
        .post(&proxy.url("/pay?hold=1"), Some("adm-live"), b"{}")
        .await;
    assert!(again.replayed());
    assert_eq!(again.json()["idempotency_epoch"], "2");
}
