//! Header-list settings through the real binary (PRODUCT G6). A header name given with a space
//! around it (`--scope-headers "authorization, x-tenant-id"`) used to be kept as `" x-tenant-id"`,
//! which matches no header: every tenant then shared one scope, and tenant B was replayed tenant
//! A's response. Names are now trimmed and lower-cased wherever they are given (flag, env, file,
//! route), for all four lists.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Answer, Http, Proxy, Upstream};
use http::{HeaderValue, Method, StatusCode};

/// `POST /pay` with `key`, the shared `Authorization` and `tenant` as `X-Tenant-Id`.
async fn pay(http: &Http, proxy: &Proxy, key: &str, tenant: &'static str) -> Answer {
    let headers = [
        (
            "authorization",
            HeaderValue::from_static("Bearer shared-gateway-token"),
        ),
        ("x-tenant-id", HeaderValue::from_static(tenant)),
        ("content-type", HeaderValue::from_static("application/json")),
        ("idempotency-key", HeaderValue::from_str(key).unwrap()),
    ];
    http.send(
        Method::POST,
        &proxy.url("/pay"),
        &headers,
        b"{\"amount\":100}",
    )
    .await
}

/// Tenants A and B share the `Authorization` value and differ by `X-Tenant-Id`; both send the
/// same key and body. B's request must run (not get A's response); A's retry still replays A's.
async fn tenants_stay_apart(up: &Upstream, proxy: &Proxy, key: &str) {
    let http = Http::default();
    let a = pay(&http, proxy, key, "tenant-a").await;
    assert_eq!(a.status, StatusCode::CREATED, "{a:?}");
    let b = pay(&http, proxy, key, "tenant-b").await;
    assert_eq!(b.status, StatusCode::CREATED, "{b:?}");
    assert!(!b.replayed(), "tenant B was replayed tenant A's response");
    assert_eq!(
        up.state.executions_of(key),
        2,
        "the upstream runs once per tenant"
    );
    let again = pay(&http, proxy, key, "tenant-a").await;
    assert!(again.replayed());
    assert_eq!(again.body, a.body);
    let again = pay(&http, proxy, key, "tenant-b").await;
    assert!(again.replayed());
    assert_eq!(again.body, b.body);
    assert_eq!(up.state.executions_of(key), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_headers_with_spaces_keep_tenants_apart_from_flags_and_env() {
    let up = Upstream::start().await;
    for (i, list) in [
        "authorization, x-tenant-id",
        "authorization,x-tenant-id ",
        " Authorization , X-Tenant-Id",
    ]
    .into_iter()
    .enumerate()
    {
        let proxy = Proxy::start(&up.url(), "memory://", &["--scope-headers", list]);
        tenants_stay_apart(&up, &proxy, &format!("flag-{i}")).await;
    }
    let env = [("IDEMGATE_SCOPE_HEADERS", "authorization, x-tenant-id")];
    let proxy = Proxy::start_with_env(&up.url(), "memory://", &[], &env);
    tenants_stay_apart(&up, &proxy, "env").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_headers_with_spaces_keep_tenants_apart_from_the_config_file() {
    let up = Upstream::start().await;
    let global = "scope_headers = [\"authorization\", \" x-tenant-id\"]\n";
    let route = "[[route]]\nname = \"pay\"\npath = \"/pay\"\n\
                 scope_headers = [\"authorization\", \"x-tenant-id \"]\n";
    for (i, text) in [global, route].into_iter().enumerate() {
        let (_dir, path) = common::config_file(text);
        let proxy = Proxy::start(&up.url(), "memory://", &["--config", &path]);
        tenants_stay_apart(&up, &proxy, &format!("file-{i}")).await;
    }
}

/// `--fingerprint-headers "content-type, x-amount"`: a retry with another `X-Amount` is a
/// different request (`422`), not a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_headers_with_spaces_are_fingerprinted() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(
        &up.url(),
        "memory://",
        &["--fingerprint-headers", "content-type, x-amount"],
    );
    let http = Http::default();
    let send = |amount: &'static str| {
        let headers = [
            ("content-type", HeaderValue::from_static("application/json")),
            ("x-amount", HeaderValue::from_static(amount)),
            ("idempotency-key", HeaderValue::from_static("fp")),
        ];
        let http = http.clone();
        let url = proxy.url("/pay");
        async move { http.send(Method::POST, &url, &headers, b"{}").await }
    };
    assert_eq!(send("100").await.status, StatusCode::CREATED);
    let other = send("999").await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY, "{other:?}");
    assert!(send("100").await.replayed());
    assert_eq!(up.state.executions(), 1);
}

/// `--deny-response-headers "set-cookie, x-upstream"` keeps `x-upstream` out of the replay;
/// `--allow-response-headers "content-type, x-upstream"` keeps it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_header_lists_with_spaces_apply() {
    let up = Upstream::start().await;
    let http = Http::default();
    let deny = Proxy::start(
        &up.url(),
        "memory://",
        &["--deny-response-headers", "set-cookie, x-upstream"],
    );
    http.post(&deny.url("/pay"), Some("deny"), b"{}").await;
    let replay = http.post(&deny.url("/pay"), Some("deny"), b"{}").await;
    assert!(replay.replayed());
    assert!(!replay.headers.contains_key("x-upstream"), "{replay:?}");
    assert!(!replay.headers.contains_key("set-cookie"), "{replay:?}");

    let allow = Proxy::start(
        &up.url(),
        "memory://",
        &["--allow-response-headers", "content-type, x-upstream "],
    );
    http.post(&allow.url("/pay"), Some("allow"), b"{}").await;
    let replay = http.post(&allow.url("/pay"), Some("allow"), b"{}").await;
    assert!(replay.replayed());
    assert_eq!(replay.headers["x-upstream"], "demo", "{replay:?}");
    assert_eq!(replay.headers["content-type"], "application/json");
    assert!(!replay.headers.contains_key("set-cookie"), "{replay:?}");
}

/// A route whose scope has no credential header serves every caller from one scope: idemgate
/// says so at start-up, once per such route, and not for routes that have one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_without_credential_headers_is_warned_about_once_per_route() {
    let up = Upstream::start().await;
    let warnings = |proxy: &Proxy, route: &str| {
        proxy
            .logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("WARN") && l.contains("scope_headers is empty"))
            .filter(|l| l.contains(&format!("route={route}")))
            .count()
    };
    let proxy = Proxy::start(&up.url(), "memory://", &["--scope-headers", ""]);
    assert_eq!(warnings(&proxy, "default"), 1);
    drop(proxy);
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    assert_eq!(warnings(&proxy, "default"), 0);
    drop(proxy);
    let (_dir, path) = common::config_file(
        "[[route]]\nname = \"open\"\npath = \"/open/**\"\nscope_headers = []\n\
         [[route]]\nname = \"pay\"\npath = \"/pay/**\"\n",
    );
    let proxy = Proxy::start(&up.url(), "memory://", &["--config", &path]);
    assert_eq!(warnings(&proxy, "open"), 1);
    assert_eq!(warnings(&proxy, "pay"), 0);
}
