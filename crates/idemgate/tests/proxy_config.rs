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

/// Runs `idemgate serve --upstream http://127.0.0.1:1 ARGS`, which must fail; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["serve", "--upstream", "http://127.0.0.1:1"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_settings_stop_the_binary_with_a_reason() {
    let err = refused(&["--ttl", "soon"]);
    assert!(err.contains("invalid duration"), "{err}");
    let err = refused(&["--store", "dynamodb://x"]);
    assert!(err.contains("unsupported store URL"), "{err}");
    let err = refused(&["--workers", "0"]);
    assert!(err.contains("workers must be at least 1"), "{err}");
}
