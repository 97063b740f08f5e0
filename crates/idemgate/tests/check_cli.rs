//! `idemgate check` through the binary: it passes the project's own `idemgate serve` in front of
//! the demo upstream (the CI run of the checker), fails a server without idempotency with exit 1
//! and reproducers, and exits 2 on usage errors, bad specs and unreachable targets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

use common::{Proxy, Upstream, free_port};
use idemgate_check::fixtures::{self, Defect, FixtureServer};

/// The spec for the demo upstream behind idemgate: every check applies. The demo counts
/// executions per key in `GET /_stats`; `delay_ms` and `status` shape its answers.
const DEMO_SPEC: &str = r#"
[defaults]
headers = { "content-type" = "application/json" }
key_required = true

[[operation]]
name = "create payment"
method = "POST"
path = "/payments"
body = '{"amount": 10, "ref": "{{uuid}}"}'
effect_probe = { path = "/_stats", pointer = "/per_key/{{key}}" }
slow_path = "/payments?delay_ms=1000"
transient_path = "/payments?status=503"
"#;

const DEMO_OPENAPI_YAML: &str = r#"
openapi: 3.0.3
info: { title: demo, version: "1" }
x-idempotency:
  key_required: true
paths:
  /payments:
    post:
      operationId: createPayment
      parameters:
        - { name: Idempotency-Key, in: header, required: true, schema: { type: string } }
      requestBody:
        required: true
        content:
          application/json:
            example: { amount: 10 }
      x-idempotency:
        effect_probe: { path: "/_stats", pointer: "/per_key/{{key}}" }
"#;

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// `idemgate check ARGS` in a blocking task (the servers of the test run on this runtime).
async fn check(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .arg("check")
            .args(&args)
            .output()
            .expect("run idemgate check")
    })
    .await
    .unwrap();
    eprintln!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_idemgate_serve_in_front_of_the_demo_upstream() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &["--require-key"]);
    let dir = tempfile::tempdir().unwrap();
    let spec = file(&dir, "demo.toml", DEMO_SPEC);
    let junit = dir.path().join("check.xml");
    let json = dir.path().join("check.json");
    let out = check(&[
        "--target",
        &proxy.url(""),
        "--spec",
        &spec,
        "--junit",
        junit.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
        "--only",
        "replay,concurrent,mismatch,missing-key,lost-response,in-flight,malformed-key,transient,precondition",
        "--strict-marker",
        "--seed",
        "5",
    ])
    .await;
    assert_eq!(code(&out), 0);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("summary: 8 passed, 0 failed, 1 skipped, 0 errors"),
        "{stdout}"
    );
    // Not a terminal: no colour; a progress line per case on stderr.
    assert!(!stdout.contains('\x1b'));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[9/9] create payment · precondition: SKIP")
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.starts_with(r#"<?xml version="1.0" encoding="UTF-8"?>"#),
        "{xml}"
    );
    assert!(
        xml.contains(r#"tests="9" failures="0" errors="0" skipped="1""#),
        "{xml}"
    );
    assert!(xml.contains(r#"<testcase name="lost-response" classname="create payment""#));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["seed"], 5);
    assert_eq!(report["cases"].as_array().unwrap().len(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_sees_idemgate_keys_expire_after_their_ttl() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &["--ttl", "1s"]);
    let dir = tempfile::tempdir().unwrap();
    let spec = file(&dir, "demo.toml", DEMO_SPEC);
    let out = check(&[
        "--target",
        &proxy.url(""),
        "--spec",
        &spec,
        "--only",
        "expiry",
        "--ttl",
        "1s",
    ])
    .await;
    assert_eq!(code(&out), 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("PASS  expiry"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reads_an_openapi_document_in_yaml() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &["--require-key"]);
    let dir = tempfile::tempdir().unwrap();
    let doc = file(&dir, "openapi.yaml", DEMO_OPENAPI_YAML);
    let out = check(&[
        "--target",
        &proxy.url(""),
        "--openapi",
        &doc,
        "--only",
        "replay,concurrent,mismatch,missing-key",
    ])
    .await;
    assert_eq!(code(&out), 0);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("createPayment"), "{stdout}");
    assert!(stdout.contains("summary: 4 passed, 0 failed"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_1_on_a_server_without_idempotency_with_reproducers() {
    let server = FixtureServer::start(Defect::NoIdempotency).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = file(&dir, "fixture.toml", fixtures::SPEC);
    let junit = dir.path().join("check.xml");
    let out = check(&[
        "--target",
        &server.url(),
        "--spec",
        &spec,
        "--only",
        "replay,concurrent",
        "--concurrency",
        "4",
        "--header",
        "Authorization: Bearer s3cret",
        "--junit",
        junit.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code(&out), 1);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("FAIL  replay"), "{stdout}");
    assert!(stdout.contains("4 effects for 4 duplicates"), "{stdout}");
    assert!(stdout.contains("reproduce:"), "{stdout}");
    assert!(
        stdout.contains("for i in $(seq 4); do curl -si -X POST"),
        "{stdout}"
    );
    assert!(stdout.contains("answers seen:"), "{stdout}");
    assert!(!stdout.contains("s3cret"));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains(r#"<failure message="#), "{xml}");
    assert!(!xml.contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_2_on_usage_errors_bad_specs_and_unreachable_targets() {
    let server = FixtureServer::start(Defect::None).await.unwrap();
    let target = server.url();
    let dir = tempfile::tempdir().unwrap();
    let good = file(&dir, "good.toml", fixtures::SPEC);
    let bad = file(
        &dir,
        "bad.toml",
        "[[operation]]\nname = 'x'\nmethod = 'POST'\n",
    );
    let failing = file(
        &dir,
        "failing.toml",
        "[[operation]]\nname = 'x'\nmethod = 'POST'\npath = '/nowhere'\n",
    );
    let missing = dir.path().join("absent.toml");
    let unreachable = format!("http://127.0.0.1:{}", free_port());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--spec", &good], "--target"),
        (vec!["--target", &target], "--spec"),
        (
            vec!["--target", &target, "--spec", &good, "--openapi", &good],
            "cannot be used with",
        ),
        (
            vec!["--target", &target, "--spec", missing.to_str().unwrap()],
            "cannot read",
        ),
        (vec!["--target", &target, "--spec", &bad], "invalid spec"),
        (
            vec!["--target", &target, "--spec", &good, "--only", "replays"],
            "unknown check",
        ),
        (
            vec!["--target", &target, "--spec", &good, "--only", "expiry"],
            "needs --ttl",
        ),
        (
            vec!["--target", &target, "--spec", &good, "--header", "no colon"],
            "Name: value",
        ),
        (vec!["--target", "https://x", "--spec", &good], "https"),
        (
            vec!["--target", &unreachable, "--spec", &good],
            "unreachable",
        ),
        // No violation, but a check could not be carried out (the operation answers 404).
        (
            vec!["--target", &target, "--spec", &failing, "--only", "replay"],
            "ERROR",
        ),
        // Nothing checked: every case skipped (no slow_path).
        (
            vec![
                "--target",
                &target,
                "--spec",
                &failing,
                "--only",
                "in-flight",
            ],
            "no check was carried out",
        ),
        // Credentials in the target URL are refused without being echoed.
        (
            vec!["--target", "http://user:pw@127.0.0.1:1", "--spec", &good],
            "must not contain '@'",
        ),
    ];
    for (args, expected) in cases {
        let out = check(&args).await;
        assert_eq!(code(&out), 2, "{args:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(expected), "{args:?}: {text}");
    }
}
