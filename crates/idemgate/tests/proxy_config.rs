//! Settings precedence through the real binary: flag > IDEMGATE_* env > config file > default.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Http, Proxy, Upstream};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_beat_env_which_beats_the_file() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("idemgate.toml");
    std::fs::write(&file, "max_request_body = \"1MiB\"\nrequire_key = true\n").unwrap();
    let config = file.to_str().unwrap();
    let http = Http::default();
    static BODY: [u8; 4096] = [b'x'; 4096];

    // File only: 4 KiB fits in 1 MiB, and the file's require_key applies.
    let p = Proxy::start(&up.url(), "memory://", &["--config", config]);
    assert_eq!(
        http.post(&p.url("/a"), Some("f"), &BODY).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        http.post(&p.url("/a"), None, b"{}").await.status,
        StatusCode::BAD_REQUEST
    );
    drop(p);

    // Env beats the file.
    let env = [("IDEMGATE_MAX_REQUEST_BODY", "1KiB")];
    let p = Proxy::start_with_env(&up.url(), "memory://", &["--config", config], &env);
    let res = http.post(&p.url("/a"), Some("e"), &BODY).await;
    assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE);
    drop(p);

    // The flag beats the env.
    let p = Proxy::start_with_env(
        &up.url(),
        "memory://",
        &[
            "--config",
            config,
            "--max-request-body",
            "8KiB",
            "--require-key",
            "false",
        ],
        &env,
    );
    assert_eq!(
        http.post(&p.url("/a"), Some("g"), &BODY).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        http.post(&p.url("/a"), None, b"{}").await.status,
        StatusCode::CREATED
    );
}

/// Runs `idemgate serve --upstream http://127.0.0.1:1 ARGS` (memory store and port-0 listeners
/// unless ARGS say otherwise), which must exit non-zero within 10 s; returns its stderr. One that
/// starts instead is killed and the test fails.
fn refused(args: &[&str]) -> String {
    refused_with_env(args, &[])
}

/// Like [`refused`], with extra environment variables.
fn refused_with_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["serve", "--upstream", "http://127.0.0.1:1"])
        .args(args)
        // Defaults a flag in ARGS overrides: nothing is written to disk, no fixed port is taken.
        .env("IDEMGATE_STORE", "memory://")
        .env("IDEMGATE_LISTEN", "127.0.0.1:0")
        .env("IDEMGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env_remove("IDEMGATE_NAMESPACE")
        .env_remove("RUST_BACKTRACE")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{args:?} {env:?} was accepted: idemgate still runs after 10 s\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} {env:?} exited 0: {stderr}");
    stderr
}

#[test]
fn bad_settings_stop_the_binary_with_a_reason() {
    let err = refused(&["--ttl", "soon"]);
    assert!(err.contains("invalid duration"), "{err}");
    let err = refused(&["--store", "cassandra://x"]);
    assert!(err.contains("unsupported store URL"), "{err}");
    let err = refused(&["--store", "dynamodb://x"]);
    assert!(err.contains("dynamodb:// needs a table name"), "{err}");
    let err = refused(&["--workers", "0"]);
    assert!(err.contains("--workers (IDEMGATE_WORKERS) = 0"), "{err}");
}

/// Absurd durations used to be accepted (`--lease-ttl 0s`: every waiter takes over at once), to
/// overflow (`999999999999999d` days in seconds) or to wait for millennia; each now stops the
/// binary at start-up with the option and the value named.
#[test]
fn absurd_durations_stop_the_binary_naming_the_option() {
    for (flag, value, why) in [
        ("--lease-ttl", "0s", "is too short: the minimum is 1s"),
        ("--ttl", "999999999999d", "is too long: the maximum is 365d"),
        ("--ttl", "999999999999999d", "is too large"),
        (
            "--wait-timeout",
            "100000000000s",
            "is too long: the maximum is 1h",
        ),
        (
            "--connect-timeout",
            "0s",
            "is too short: the minimum is 1ms",
        ),
        ("--unknown-ttl", "0s", "is too short: the minimum is 1s"),
    ] {
        let err = refused(&[flag, value]);
        assert!(
            err.contains(&format!("{flag} (IDEMGATE_")),
            "{flag} {value}: {err}"
        );
        assert!(err.contains(&format!("{value:?}")), "{flag} {value}: {err}");
        assert!(err.contains(why), "{flag} {value}: {err}");
    }
    let err = refused_with_env(&[], &[("IDEMGATE_LEASE_TTL", "0s")]);
    assert!(
        err.contains("IDEMGATE_LEASE_TTL") && err.contains("too short"),
        "{err}"
    );
    let err = refused(&["--max-waiters", "0"]);
    assert!(
        err.contains("--max-waiters (IDEMGATE_MAX_WAITERS) = 0"),
        "{err}"
    );
    let err = refused(&["--waiter-poll-min", "5s", "--waiter-poll-max", "1s"]);
    assert!(
        err.contains("--waiter-poll-min") && err.contains("is above"),
        "{err}"
    );
}

/// A `[[route]]` value gets the global bounds, and the refusal names the route.
#[test]
fn absurd_route_values_stop_the_binary_naming_the_route() {
    for (field, value, why) in [
        (
            "ttl",
            "\"0s\"",
            "ttl in route \"pay\" = \"0s\" is too short",
        ),
        (
            "wait_timeout",
            "\"100000000000s\"",
            "wait_timeout in route \"pay\" = \"100000000000s\" is too long",
        ),
        (
            "scope_headers",
            "[\"authorization\", \"x tenant\"]",
            "scope_headers in route \"pay\": \"x tenant\" is not a valid HTTP header name",
        ),
    ] {
        let (_dir, path) = common::config_file(&format!(
            "[[route]]\nname = \"pay\"\npath = \"/pay/**\"\n{field} = {value}\n"
        ));
        let err = refused(&["--config", &path]);
        assert!(err.contains(why), "{field}: {err}");
    }
}

#[test]
fn an_invalid_header_name_stops_the_binary_naming_the_option() {
    for flag in [
        "--scope-headers",
        "--fingerprint-headers",
        "--deny-response-headers",
        "--allow-response-headers",
    ] {
        let err = refused(&[flag, "authorization, x tenant"]);
        assert!(err.contains(&format!("{flag} (IDEMGATE_")), "{flag}: {err}");
        assert!(
            err.contains("\"x tenant\" is not a valid HTTP header name"),
            "{flag}: {err}"
        );
    }
    let (_dir, path) =
        common::config_file("fingerprint_headers = [\"content-type\", \"x:amount\"]\n");
    let err = refused(&["--config", &path]);
    assert!(
        err.contains(&format!("fingerprint_headers in {path}: \"x:amount\"")),
        "{err}"
    );
}

/// Redis and PostgreSQL can be shared by several services; with the one default namespace they
/// would replay each other's responses. Without an explicit namespace idemgate refuses to start,
/// before it connects (so an unreachable store gets the same answer).
#[test]
fn a_shared_store_without_a_namespace_refuses_to_start() {
    let mut stores = vec![
        "redis://127.0.0.1:1".to_owned(),
        "redis+cluster://127.0.0.1:1,127.0.0.1:2".to_owned(),
        "postgres://idemgate@127.0.0.1:1/none".to_owned(),
    ];
    stores.extend(common::server_url("IDEMGATE_TEST_REDIS_URL"));
    stores.extend(common::server_url("IDEMGATE_TEST_POSTGRES_URL"));
    for store in &stores {
        let err = refused(&["--store", store]);
        assert!(err.contains("refusing to start"), "{store}: {err}");
        assert!(err.contains("no namespace is set"), "{store}: {err}");
        assert!(
            err.contains("--namespace (IDEMGATE_NAMESPACE"),
            "{store}: {err}"
        );
        // Said explicitly but empty is refused too.
        let err = refused_with_env(&["--store", store], &[("IDEMGATE_NAMESPACE", " ")]);
        assert!(
            err.contains("IDEMGATE_NAMESPACE) is empty"),
            "{store}: {err}"
        );
    }
}

/// With a namespace each, two services on one shared store keep their records apart: the same
/// key and credentials run once per service. (The embedded and memory stores keep `default`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_with_their_own_namespaces_share_a_store_without_sharing_records() {
    let stores = [
        common::server_url("IDEMGATE_TEST_REDIS_URL"),
        common::server_url("IDEMGATE_TEST_POSTGRES_URL"),
    ];
    for store in stores.into_iter().flatten() {
        let up = Upstream::start().await;
        let (ns_a, ns_b) = (common::unique("orders"), common::unique("billing"));
        let a = Proxy::start(&up.url(), &store, &["--namespace", ns_a]);
        let b = Proxy::start_with_env(&up.url(), &store, &[], &[("IDEMGATE_NAMESPACE", ns_b)]);
        let http = Http::default();
        let key = common::unique("ns");
        let first = http.post(&a.url("/pay"), Some(key), b"{}").await;
        let other = http.post(&b.url("/pay"), Some(key), b"{}").await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert_eq!(other.status, StatusCode::CREATED);
        assert!(
            !other.replayed(),
            "{store}: service B got service A's response"
        );
        assert_eq!(up.state.executions_of(key), 2, "{store}");
        assert!(http.post(&a.url("/pay"), Some(key), b"{}").await.replayed());
    }
}

/// A store of the process's own (memory, embedded) starts without a namespace and uses `default`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_its_own_keeps_the_default_namespace() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file_store = format!("file:{}", dir.path().display());
    for store in ["memory://", file_store.as_str()] {
        let p = Proxy::start(&up.url(), store, &[]);
        let http = Http::default();
        let key = format!("own-{}", store.len());
        assert_eq!(
            http.post(&p.url("/a"), Some(&key), b"{}").await.status,
            StatusCode::CREATED
        );
        let list = http.get(&p.admin_url("/api/keys?limit=10")).await.json();
        assert_eq!(
            list["records"][0]["namespace"], "default",
            "{store}: {list}"
        );
    }
}
