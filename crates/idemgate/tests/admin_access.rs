//! Who may use the admin listener, through the real binary over real sockets: the bearer token
//! (file, variable, flag), `401` problem+json with `WWW-Authenticate`, mutating calls on loopback,
//! the refusal to start off loopback without a token, and the `Host` check against DNS rebinding.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

use common::{Http, Proxy, Upstream, bin};
use http::{HeaderValue, Method, StatusCode};
use serde_json::json;

const TOKEN: &str = "s3cr3t-admin-token-0123456789abcdef";

/// A token file holding `TOKEN` (with a trailing newline, as editors write it), mode 600.
fn token_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin-token");
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

fn bearer(token: &str) -> (&'static str, HeaderValue) {
    (
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    )
}

/// A store key of a completed record of `key` (anonymous principal), found with the token.
async fn completed_record(http: &Http, proxy: &Proxy, key: &str) -> String {
    let res = http.post(&proxy.url("/pay"), Some(key), b"{}").await;
    assert_eq!(res.status, StatusCode::CREATED);
    let found = http
        .send(
            Method::POST,
            &proxy.admin_url("/api/keys/lookup"),
            &[
                ("content-type", HeaderValue::from_static("application/json")),
                bearer(TOKEN),
            ],
            json!({ "key": key }).to_string(),
        )
        .await;
    assert_eq!(found.status, StatusCode::OK, "{found:?}");
    assert_eq!(found.json()["record"]["state"], "completed");
    found.json()["store_key"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_every_endpoint_but_health_and_the_page_needs_it() {
    let up = Upstream::start().await;
    let (_dir, file) = token_file();
    let proxy = Proxy::start(
        &up.url(),
        "memory://",
        &["--admin-token-file", file.as_str()],
    );
    let http = Http::default();
    for path in [
        "/api/keys",
        "/metrics",
        "/api/keys/nothex",
        "/api/activity",
        "/api/series",
        "/api/unknown",
        "/api/overview",
    ] {
        let missing = http.get(&proxy.admin_url(path)).await;
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(missing.problem_type(), "urn:idemgate:problem:admin-401");
        assert_eq!(
            missing.headers["www-authenticate"],
            "Bearer realm=\"idemgate-admin\""
        );
        assert_eq!(missing.headers["idemgate-admin"], "1");
        let wrong = http
            .send(
                Method::GET,
                &proxy.admin_url(path),
                &[bearer("not-the-token-0123456789")],
                b"",
            )
            .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            wrong.headers["www-authenticate"],
            "Bearer realm=\"idemgate-admin\", error=\"invalid_token\""
        );
        // A prefix of the token is wrong too.
        let prefix = http
            .send(
                Method::GET,
                &proxy.admin_url(path),
                &[bearer(&TOKEN[..TOKEN.len() - 1])],
                b"",
            )
            .await;
        assert_eq!(prefix.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    // The right token (the file's newline trimmed), in any case of the scheme.
    let ok = http
        .send(
            Method::GET,
            &proxy.admin_url("/api/keys"),
            &[bearer(TOKEN)],
            b"",
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(ok.json()["records"].is_array());
    let lower = http
        .send(
            Method::GET,
            &proxy.admin_url("/metrics"),
            &[(
                "authorization",
                HeaderValue::from_str(&format!("bearer {TOKEN}")).unwrap(),
            )],
            b"",
        )
        .await;
    assert_eq!(lower.status, StatusCode::OK);
    // A token in the query string is not a token.
    let query = http
        .get(&proxy.admin_url(&format!("/api/keys?access_token={TOKEN}")))
        .await;
    assert_eq!(query.status, StatusCode::UNAUTHORIZED);
    // Probes need nothing.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            http.get(&proxy.admin_url(path)).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    // The dashboard page is static; it asks for the token and sends it as a header.
    let page = http.get(&proxy.admin_url("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(html.contains("sessionStorage"), "no token prompt");
    assert!(html.contains("\"Authorization\", \"Bearer \""), "{html}");
    assert!(!html.contains(TOKEN));
    assert!(
        proxy
            .logs
            .lock()
            .unwrap()
            .iter()
            .all(|l| !l.contains(TOKEN)),
        "the token is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_calls_on_loopback_need_the_token_when_one_is_set() {
    let up = Upstream::start().await;
    let (_dir, file) = token_file();
    let proxy = Proxy::start(
        &up.url(),
        "memory://",
        &["--admin-token-file", file.as_str()],
    );
    let http = Http::default();
    let store_key = completed_record(&http, &proxy, "guarded-1").await;
    let url = proxy.admin_url(&format!("/api/keys/{store_key}"));
    let json_type = ("content-type", HeaderValue::from_static("application/json"));
    let delete = http.send(Method::DELETE, &url, &[], b"").await;
    assert_eq!(delete.status, StatusCode::UNAUTHORIZED);
    let resolve = http
        .send(
            Method::POST,
            &format!("{url}/resolve"),
            std::slice::from_ref(&json_type),
            json!({ "action": "retry" }).to_string(),
        )
        .await;
    assert_eq!(resolve.status, StatusCode::UNAUTHORIZED);
    let lookup = http
        .send(
            Method::POST,
            &proxy.admin_url("/api/keys/lookup"),
            std::slice::from_ref(&json_type),
            json!({ "key": "guarded-1" }).to_string(),
        )
        .await;
    assert_eq!(lookup.status, StatusCode::UNAUTHORIZED);
    // Nothing changed: the retry is still a replay.
    let replay = http
        .post(&proxy.url("/pay"), Some("guarded-1"), b"{}")
        .await;
    assert!(replay.replayed());
    // With the token the delete goes through, and the next retry runs again.
    let deleted = http.send(Method::DELETE, &url, &[bearer(TOKEN)], b"").await;
    assert_eq!(deleted.status, StatusCode::OK);
    assert_eq!(deleted.json()["deleted"], true);
    let again = http
        .post(&proxy.url("/pay"), Some("guarded-1"), b"{}")
        .await;
    assert!(!again.replayed());
    assert_eq!(up.state.executions_of("guarded-1"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_comes_from_the_variable_or_the_flag_and_the_flag_is_warned_about() {
    let up = Upstream::start().await;
    let http = Http::default();
    let from_env = Proxy::start_with_env(
        &up.url(),
        "memory://",
        &[],
        &[("IDEMGATE_ADMIN_TOKEN", TOKEN)],
    );
    let url = from_env.admin_url("/api/keys");
    assert_eq!(http.get(&url).await.status, StatusCode::UNAUTHORIZED);
    let ok = http.send(Method::GET, &url, &[bearer(TOKEN)], b"").await;
    assert_eq!(ok.status, StatusCode::OK);
    let warned = |p: &Proxy| p.logs.lock().unwrap().iter().any(|l| l.contains("`ps`"));
    assert!(!warned(&from_env), "the variable is not in `ps`");
    drop(from_env);

    let from_flag = Proxy::start(&up.url(), "memory://", &["--admin-token", TOKEN]);
    let url = from_flag.admin_url("/api/keys");
    assert_eq!(http.get(&url).await.status, StatusCode::UNAUTHORIZED);
    let ok = http.send(Method::GET, &url, &[bearer(TOKEN)], b"").await;
    assert_eq!(ok.status, StatusCode::OK);
    assert!(warned(&from_flag), "a token flag shows in `ps`: warned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_opened_to_scrapers_without_opening_the_api() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(
        &up.url(),
        "memory://",
        &["--admin-token", TOKEN, "--admin-public-metrics"],
    );
    let http = Http::default();
    let metrics = http.get(&proxy.admin_url("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&metrics.body).contains("idemgate_in_flight"));
    assert_eq!(
        http.get(&proxy.admin_url("/api/keys")).await.status,
        StatusCode::UNAUTHORIZED
    );
}

/// Runs `idemgate serve ARGS` (memory store, upstream on a closed port, proxy on a free port),
/// which must exit non-zero within 10 s; returns its stderr.
fn refused(args: &[&str]) -> String {
    let mut child = Command::new(bin())
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--store",
            "memory://",
        ])
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("IDEMGATE_ADMIN_TOKEN")
        .env_remove("IDEMGATE_ADMIN_TOKEN_FILE")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} started: idemgate still runs after 10 s\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `serve --check-config ARGS`: (exit code, stdout, stderr).
fn check_config(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--store",
            "memory://",
        ])
        .args(args)
        .arg("--check-config")
        .env_remove("IDEMGATE_ADMIN_TOKEN")
        .env_remove("IDEMGATE_ADMIN_TOKEN_FILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn off_loopback_without_a_token_it_refuses_to_start() {
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let err = refused(&["--admin-listen", addr]);
        assert!(err.contains("refusing to start"), "{err}");
        assert!(err.contains("not on loopback and has no token"), "{err}");
        for named in [
            "--admin-token-file",
            "--admin-insecure-no-auth",
            "--admin-listen",
        ] {
            assert!(err.contains(named), "{named}: {err}");
        }
    }
    // A token, or the explicit opt-out (with a warning), is accepted; loopback needs neither.
    let (_dir, file) = token_file();
    let (code, out, err) = check_config(&[
        "--admin-listen",
        "0.0.0.0:9999",
        "--admin-token-file",
        file.as_str(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("# admin token: set, from --admin-token-file"),
        "{out}"
    );
    assert!(!out.contains(TOKEN), "the token is never printed");
    let (code, _, err) =
        check_config(&["--admin-listen", "0.0.0.0:9999", "--admin-insecure-no-auth"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("off loopback without a token"), "{err}");
    let (code, _, err) = check_config(&["--admin-listen", "[::1]:9999"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn bad_tokens_stop_the_binary_naming_where_they_came_from() {
    let err = refused(&["--admin-token", "short"]);
    assert!(
        err.contains("--admin-token: the token is 5 characters; use 16 to 512"),
        "{err}"
    );
    let err = refused(&["--admin-token", "has a space in it, 0123456789"]);
    assert!(err.contains("A-Z a-z 0-9 - . _ ~ + /"), "{err}");
    let err = refused(&["--admin-token-file", "/nonexistent/idemgate-token"]);
    assert!(
        err.contains(
            "--admin-token-file (IDEMGATE_ADMIN_TOKEN_FILE): reading the token file /nonexistent"
        ),
        "{err}"
    );
    let (_dir, file) = token_file();
    let err = refused(&["--admin-token-file", file.as_str(), "--admin-token", TOKEN]);
    assert!(err.contains("give one"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let err = refused(&["--admin-token-file", empty.to_str().unwrap()]);
    assert!(err.contains("is empty"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_it_does_not_know_is_refused_against_dns_rebinding() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(
        &up.url(),
        "memory://",
        &["--admin-allowed-hosts", "admin.internal, *.corp.example"],
    );
    let http = Http::default();
    let port = proxy.admin.port();
    let with_host = |host: String| {
        let http = http.clone();
        let url = proxy.admin_url("/api/keys");
        async move {
            http.send(
                Method::GET,
                &url,
                &[("host", HeaderValue::from_str(&host).unwrap())],
                b"",
            )
            .await
        }
    };
    // A rebinding page's requests carry its own name: refused, whatever the port.
    for host in [
        format!("evil.example:{port}"),
        "evil.example".to_owned(),
        format!("127.0.0.1.nip.io:{port}"),
        format!("corp.example:{port}"),
        format!("localhost.evil.example:{port}"),
    ] {
        let res = with_host(host.clone()).await;
        assert_eq!(res.status, StatusCode::FORBIDDEN, "{host}");
        assert_eq!(res.problem_type(), "urn:idemgate:problem:admin-403");
        assert!(
            res.json()["detail"]
                .as_str()
                .unwrap()
                .contains("--admin-allowed-hosts")
        );
    }
    // Addresses, localhost and the names allowed are answered (ports are not compared: port
    // forwarding changes them).
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LOCALHOST".to_owned(),
        format!("[::1]:{port}"),
        "10.1.2.3:9090".to_owned(),
        "admin.internal:1".to_owned(),
        format!("ops.corp.example:{port}"),
    ] {
        let res = with_host(host.clone()).await;
        assert_eq!(res.status, StatusCode::OK, "{host}");
    }
    // Probes answer under any name.
    let probe = http
        .send(
            Method::GET,
            &proxy.admin_url("/healthz"),
            &[("host", HeaderValue::from_static("evil.example"))],
            b"",
        )
        .await;
    assert_eq!(probe.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_check_comes_before_the_token() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &["--admin-token", TOKEN]);
    let http = Http::default();
    let res = http
        .send(
            Method::GET,
            &proxy.admin_url("/api/keys"),
            &[
                ("host", HeaderValue::from_static("evil.example")),
                bearer(TOKEN),
            ],
            b"",
        )
        .await;
    assert_eq!(res.status, StatusCode::FORBIDDEN);
}

/// Every admin answer (a page, JSON, a refusal, a probe, a path that does not exist) forbids
/// framing and sniffing; the dashboard page has its fuller policy, its script allowed by hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_answer_forbids_framing_and_sniffing() {
    let up = Upstream::start().await;
    let (_dir, file) = token_file();
    let proxy = Proxy::start(
        &up.url(),
        "memory://",
        &["--admin-token-file", file.as_str()],
    );
    let http = Http::default();
    let evil = ("host", HeaderValue::from_static("evil.example"));
    type Case = (&'static str, Vec<(&'static str, HeaderValue)>, StatusCode);
    let cases: [Case; 7] = [
        ("/", vec![], StatusCode::OK),
        ("/api/overview", vec![bearer(TOKEN)], StatusCode::OK),
        ("/api/unknown", vec![bearer(TOKEN)], StatusCode::OK),
        ("/api/keys", vec![], StatusCode::UNAUTHORIZED),
        (
            "/api/keys",
            vec![bearer(TOKEN), evil],
            StatusCode::FORBIDDEN,
        ),
        ("/healthz", vec![], StatusCode::OK),
        ("/no-such-path", vec![bearer(TOKEN)], StatusCode::NOT_FOUND),
    ];
    for (path, headers, status) in cases {
        let res = http
            .send(Method::GET, &proxy.admin_url(path), &headers, b"")
            .await;
        assert_eq!(res.status, status, "{path}");
        assert_eq!(res.headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(res.headers["x-content-type-options"], "nosniff", "{path}");
        let csp = res.headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        assert_eq!(
            res.headers
                .get_all("content-security-policy")
                .iter()
                .count(),
            1
        );
        if path == "/" {
            assert!(csp.contains("default-src 'none'"), "{csp}");
            assert!(csp.contains("script-src 'sha256-"), "{csp}");
            assert!(!csp.contains("script-src 'unsafe-inline'"), "{csp}");
        } else {
            assert_eq!(csp, "frame-ancestors 'none'", "{path}");
        }
    }
}
