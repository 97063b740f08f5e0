//! An operator resolves an outcome-unknown record as "it did happen, and this was its answer":
//! through the admin API and `idemgate keys resolve --completed`, over real sockets. Retries then
//! replay that answer byte for byte; every refusal leaves the record as it was.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

use common::{Http, Proxy, Upstream, bin};
use http::{HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

/// A request the demo upstream answers with half a body, then a broken connection: its outcome
/// is unknown. Retries send the very same request (same fingerprint).
const CUT: &str = "/pay?truncate=1";

/// An outcome-unknown record of `key` (a truncated upstream answer), and its store key.
async fn unknown(http: &Http, proxy: &Proxy, key: &str) -> String {
    let cut = http.post(&proxy.url(CUT), Some(key), b"{}").await;
    assert_eq!(cut.status, StatusCode::BAD_GATEWAY);
    let found = http
        .send(
            Method::POST,
            &proxy.admin_url("/api/keys/lookup"),
            &[("content-type", HeaderValue::from_static("application/json"))],
            json!({ "key": key }).to_string(),
        )
        .await
        .json();
    assert_eq!(found["record"]["state"], "unknown");
    found["store_key"].as_str().unwrap().to_owned()
}

async fn resolve(http: &Http, proxy: &Proxy, store_key: &str, body: Value) -> common::Answer {
    http.send(
        Method::POST,
        &proxy.admin_url(&format!("/api/keys/{store_key}/resolve")),
        &[("content-type", HeaderValue::from_static("application/json"))],
        body.to_string(),
    )
    .await
}

async fn record(http: &Http, proxy: &Proxy, store_key: &str) -> Value {
    http.get(&proxy.admin_url(&format!("/api/keys/{store_key}")))
        .await
        .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_completes_an_outcome_unknown_record_and_retries_replay_it() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    let store_key = unknown(&http, &proxy, "happened-1").await;
    let before = up.state.executions_of("happened-1");
    // Until resolved, retries are told the outcome is unknown.
    let retry = http.post(&proxy.url(CUT), Some("happened-1"), b"{}").await;
    assert_eq!(retry.problem_type(), "urn:idemgate:problem:outcome-unknown");

    let epoch = record(&http, &proxy, &store_key).await["epoch"].to_string();
    let out = Command::new(bin())
        .args([
            "keys",
            "resolve",
            &store_key,
            "--completed",
            "--status",
            "201",
        ])
        .args(["--header", "content-type: application/json"])
        .args(["--header", "location: /orders/7"])
        .args(["--body", "{\"id\":7,\"ok\":true}", "--epoch", &epoch])
        .args(["--admin", &proxy.admin.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("resolved") && stdout.contains("status 201"),
        "{stdout}"
    );

    let replay = http.post(&proxy.url(CUT), Some("happened-1"), b"{}").await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed());
    assert_eq!(replay.body.as_ref(), b"{\"id\":7,\"ok\":true}");
    assert_eq!(replay.headers["location"], "/orders/7");
    assert_eq!(replay.headers["content-type"], "application/json");
    // Nothing ran again.
    assert_eq!(up.state.executions_of("happened-1"), before);
    let r = record(&http, &proxy, &store_key).await;
    assert_eq!(r["state"], "completed");
    assert_eq!(r["status"], 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_bodies_and_repeated_headers_round_trip() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    let store_key = unknown(&http, &proxy, "happened-bin").await;
    let res = resolve(
        &http,
        &proxy,
        &store_key,
        json!({
            "action": "complete", "status": 200,
            "headers": [["x-part", "a"], ["x-part", "b"]],
            "body_base64": "AAH/gA==", "ttl": "1h",
        }),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{res:?}");
    assert_eq!(res.json()["resolved"], "complete");
    let replay = http
        .post(&proxy.url(CUT), Some("happened-bin"), b"{}")
        .await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.body.as_ref(), [0x00, 0x01, 0xff, 0x80]);
    let parts: Vec<_> = replay.headers.get_all("x-part").iter().collect();
    assert_eq!(parts, ["a", "b"]);
    let r = record(&http, &proxy, &store_key).await;
    let ttl = r["expires_at_ms"].as_u64().unwrap() - r["completed_at_ms"].as_u64().unwrap();
    assert_eq!(ttl, 3_600_000, "the ttl given");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_leave_the_record_as_it_was() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    let store_key = unknown(&http, &proxy, "refused-1").await;
    let seen = record(&http, &proxy, &store_key).await;
    let epoch = seen["epoch"].as_u64().unwrap();
    let since = seen["unknown_since_ms"].as_u64().unwrap();
    for (body, status, why) in [
        (
            json!({ "action": "complete" }),
            StatusCode::BAD_REQUEST,
            "needs the status",
        ),
        (
            json!({ "action": "complete", "status": 101 }),
            StatusCode::BAD_REQUEST,
            "200 to 599",
        ),
        (
            json!({ "action": "complete", "status": 201, "headers": { "set-cookie": "s=1" } }),
            StatusCode::BAD_REQUEST,
            "never stored",
        ),
        (
            json!({ "action": "complete", "status": 201, "headers": { "transfer-encoding": "chunked" } }),
            StatusCode::BAD_REQUEST,
            "never stored",
        ),
        (
            json!({ "action": "complete", "status": 201, "headers": { "bad name": "x" } }),
            StatusCode::BAD_REQUEST,
            "not a valid header name",
        ),
        (
            json!({ "action": "complete", "status": 201, "body": "a", "body_base64": "YQ==" }),
            StatusCode::BAD_REQUEST,
            "not both",
        ),
        (
            json!({ "action": "complete", "status": 201, "body_base64": "%%%" }),
            StatusCode::BAD_REQUEST,
            "not base64",
        ),
        (
            json!({ "action": "complete", "status": 201, "ttl": "0s" }),
            StatusCode::BAD_REQUEST,
            "1s to 365d",
        ),
        (
            json!({ "action": "retry", "status": 201 }),
            StatusCode::BAD_REQUEST,
            "belong to \"complete\"",
        ),
        (
            json!({ "action": "maybe" }),
            StatusCode::BAD_REQUEST,
            "\"retry\"",
        ),
        // What the operator saw is not what is there: 409.
        (
            json!({ "action": "complete", "status": 201, "epoch": epoch + 1 }),
            StatusCode::CONFLICT,
            "changed since it was read",
        ),
        (
            json!({ "action": "complete", "status": 201, "unknown_since_ms": since + 1 }),
            StatusCode::CONFLICT,
            "changed since it was read",
        ),
        (
            json!({ "action": "retry", "epoch": epoch + 1 }),
            StatusCode::CONFLICT,
            "changed since it was read",
        ),
    ] {
        let res = resolve(&http, &proxy, &store_key, body.clone()).await;
        assert_eq!(res.status, status, "{body}: {res:?}");
        let detail = res.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(why), "{body}: {detail}");
        assert_eq!(record(&http, &proxy, &store_key).await, seen, "{body}");
    }
    // Absent and completed records.
    let absent = resolve(
        &http,
        &proxy,
        &"0".repeat(64),
        json!({ "action": "complete", "status": 201 }),
    )
    .await;
    assert_eq!(absent.status, StatusCode::NOT_FOUND);
    let ok = resolve(
        &http,
        &proxy,
        &store_key,
        json!({ "action": "complete", "status": 201, "epoch": epoch, "unknown_since_ms": since }),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{ok:?}");
    let done = record(&http, &proxy, &store_key).await;
    for body in [
        json!({ "action": "complete", "status": 500 }),
        json!({ "action": "retry" }),
    ] {
        let res = resolve(&http, &proxy, &store_key, body.clone()).await;
        assert_eq!(res.status, StatusCode::CONFLICT, "{body}");
        assert_eq!(record(&http, &proxy, &store_key).await, done);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_racing_operators_exactly_one_completes_the_record() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    let store_key = unknown(&http, &proxy, "race-1").await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let http = http.clone();
            let url = proxy.admin_url(&format!("/api/keys/{store_key}/resolve"));
            tokio::spawn(async move {
                let body = json!({ "action": "complete", "status": 200, "body": format!("{i}") });
                let res = http
                    .send(
                        Method::POST,
                        &url,
                        &[("content-type", HeaderValue::from_static("application/json"))],
                        body.to_string(),
                    )
                    .await;
                (i, res.status)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        let (i, status) = t.await.unwrap();
        match status {
            StatusCode::OK => winners.push(i),
            StatusCode::CONFLICT => {}
            other => panic!("operator {i}: {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let replay = http.post(&proxy.url(CUT), Some("race-1"), b"{}").await;
    assert_eq!(replay.body.as_ref(), winners[0].to_string().as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolving_needs_the_token_when_one_is_set() {
    let up = Upstream::start().await;
    let token = "resolve-token-0123456789abcdef";
    let proxy = Proxy::start(&up.url(), "memory://", &["--admin-token", token]);
    let http = Http::default();
    let cut = http.post(&proxy.url(CUT), Some("tok-unknown"), b"{}").await;
    assert_eq!(cut.status, StatusCode::BAD_GATEWAY);
    let auth = (
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    let json_type = ("content-type", HeaderValue::from_static("application/json"));
    let found = http
        .send(
            Method::POST,
            &proxy.admin_url("/api/keys/lookup"),
            &[json_type.clone(), auth.clone()],
            json!({ "key": "tok-unknown" }).to_string(),
        )
        .await
        .json();
    let url = proxy.admin_url(&format!(
        "/api/keys/{}/resolve",
        found["store_key"].as_str().unwrap()
    ));
    let body = json!({ "action": "complete", "status": 201 }).to_string();
    let refused = http
        .send(Method::POST, &url, std::slice::from_ref(&json_type), &body)
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let retry = http.post(&proxy.url(CUT), Some("tok-unknown"), b"{}").await;
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY, "still unknown");
    let ok = http
        .send(Method::POST, &url, &[json_type, auth], &body)
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    let replay = http.post(&proxy.url(CUT), Some("tok-unknown"), b"{}").await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.replayed());
}

/// On a shared store: one instance's operator completes the record, and another instance (with
/// its own replay cache) replays it.
async fn completes_across_instances_on(store: &str) {
    let up = Upstream::start().await;
    let a = Proxy::start(&up.url(), store, common::slow_store_args(store));
    let b = Proxy::start(&up.url(), store, common::slow_store_args(store));
    let http = Http::default();
    let key = common::unique("resolve-shared");
    let store_key = unknown(&http, &a, key).await;
    let on_b = http.post(&b.url(CUT), Some(key), b"{}").await;
    assert_eq!(on_b.problem_type(), "urn:idemgate:problem:outcome-unknown");
    let res = resolve(
        &http,
        &a,
        &store_key,
        json!({ "action": "complete", "status": 202, "body": "accepted" }),
    )
    .await;
    assert_eq!(res.status, StatusCode::OK, "{res:?}");
    for proxy in [&b, &a] {
        let replay = http.post(&proxy.url(CUT), Some(key), b"{}").await;
        assert_eq!(replay.status, StatusCode::ACCEPTED);
        assert!(replay.replayed());
        assert_eq!(replay.body.as_ref(), b"accepted");
    }
    assert_eq!(up.state.executions_of(key), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn completes_across_instances_on_redis() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_REDIS_URL") {
        completes_across_instances_on(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn completes_across_instances_on_postgres() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_POSTGRES_URL") {
        completes_across_instances_on(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn completes_across_instances_on_dynamodb() {
    if let Some(url) = common::dynamodb_store("resolve") {
        completes_across_instances_on(&url).await;
    }
}

/// `/api/unknown?fresh=1` of `proxy`: the census's list after a pass started after the call.
async fn unknown_list(http: &Http, proxy: &Proxy) -> Value {
    let res = http
        .get(&proxy.admin_url("/api/unknown?fresh=1&limit=200"))
        .await;
    assert_eq!(res.status, StatusCode::OK, "{res:?}");
    let v = res.json();
    assert_eq!(v["fresh"], true, "{v}");
    v
}

fn listed(list: &Value, store_key: &str) -> bool {
    list["records"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["store_key"] == store_key)
}

/// Two services share a store under two namespaces: each lists only its own outcome-unknown
/// records, and one may not complete the other's (`409`, the record left as it was).
async fn namespaces_stay_apart_on(store: &str) {
    let up = Upstream::start().await;
    let (ns_a, ns_b) = (common::unique("ns-a"), common::unique("ns-b"));
    let args = |ns| {
        let mut v = common::slow_store_args(store).to_vec();
        v.extend(["--namespace", ns, "--unknown-scan-rate", "1000000"]);
        v
    };
    let a = Proxy::start(&up.url(), store, &args(ns_a));
    let b = Proxy::start(&up.url(), store, &args(ns_b));
    let http = Http::default();
    let key = common::unique("ns-unknown");
    let store_key = unknown(&http, &a, key).await;
    let on_a = unknown_list(&http, &a).await;
    assert!(listed(&on_a, &store_key), "{on_a}");
    let found = on_a["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["store_key"] == store_key.as_str())
        .unwrap();
    assert_eq!(found["key"], key);
    assert_eq!(found["route"], "default");
    let on_b = unknown_list(&http, &b).await;
    assert!(!listed(&on_b, &store_key), "{on_b}");

    let refused = resolve(
        &http,
        &b,
        &store_key,
        json!({ "action": "complete", "status": 201, "body": "no" }),
    )
    .await;
    assert_eq!(refused.status, StatusCode::CONFLICT, "{refused:?}");
    assert_eq!(refused.problem_type(), "urn:idemgate:problem:admin-409");
    assert!(
        String::from_utf8_lossy(&refused.body).contains(ns_a),
        "{refused:?}"
    );
    assert_eq!(record(&http, &a, &store_key).await["state"], "unknown");
    // Its own service completes it, and it leaves that service's list at once.
    let done = resolve(
        &http,
        &a,
        &store_key,
        json!({ "action": "complete", "status": 201, "body": "yes" }),
    )
    .await;
    assert_eq!(done.status, StatusCode::OK, "{done:?}");
    let now = http.get(&a.admin_url("/api/unknown")).await.json();
    assert!(!listed(&now, &store_key), "{now}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn namespaces_stay_apart_on_redis() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_REDIS_URL") {
        namespaces_stay_apart_on(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn namespaces_stay_apart_on_postgres() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_POSTGRES_URL") {
        namespaces_stay_apart_on(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unknown_list_comes_from_the_census_and_says_when_it_is_off() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    let store_key = unknown(&http, &proxy, "census-listed").await;
    let list = unknown_list(&http, &proxy).await;
    assert_eq!(list["enabled"], true);
    assert_eq!(list["complete"], true);
    assert_eq!(list["unknown"], 1);
    assert_eq!(list["more"], false);
    let r = &list["records"][0];
    assert_eq!(r["store_key"], store_key.as_str());
    // The marking the dashboard's button sends back.
    let got = record(&http, &proxy, &store_key).await;
    assert_eq!(r["epoch"], got["epoch"]);
    assert_eq!(r["unknown_since_ms"], got["unknown_since_ms"]);
    // A stale marking is refused; the one listed resolves, and the record leaves the list.
    let stale = resolve(
        &http,
        &proxy,
        &store_key,
        json!({ "action": "retry", "epoch": r["epoch"], "unknown_since_ms": 1 }),
    )
    .await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{stale:?}");
    let ok = resolve(
        &http,
        &proxy,
        &store_key,
        json!({ "action": "retry", "epoch": r["epoch"], "unknown_since_ms": r["unknown_since_ms"] }),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{ok:?}");
    let after = http.get(&proxy.admin_url("/api/unknown")).await.json();
    assert_eq!(after["records"], json!([]), "{after}");
    assert_eq!(after["unknown"], 0);

    let off = Proxy::start(&up.url(), "memory://", &["--unknown-scan-rate", "0"]);
    unknown(&http, &off, "census-off").await;
    let res = http.get(&off.admin_url("/api/unknown?fresh=1")).await;
    assert_eq!(res.status, StatusCode::OK);
    let v = res.json();
    assert_eq!(v["enabled"], false, "{v}");
    assert_eq!(v["records"], json!([]));
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("unknown_scan_rate = 0")
    );
}
