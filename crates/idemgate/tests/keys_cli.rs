//! `idemgate keys` against a running instance: a table by default, `--json` for scripts, `--admin`
//! anywhere and as HOST:PORT, the token, exit codes (0 done, 1 refused or failed, 2 usage, 3 not
//! found) and clear errors when pointed at the wrong port.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};

use common::{Http, Proxy, Upstream, bin, free_port};
use http::{HeaderValue, Method, StatusCode};
use serde_json::{Value, json};

const TOKEN: &str = "keys-cli-token-0123456789abcdef";

/// A finished `idemgate keys ARGS` (environment: only `env` of the admin variables).
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn keys(args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = Command::new(bin())
        .arg("keys")
        .args(args)
        .env_remove("IDEMGATE_ADMIN_URL")
        .env_remove("IDEMGATE_ADMIN_TOKEN")
        .env_remove("IDEMGATE_ADMIN_TOKEN_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn store_key_of(http: &Http, proxy: &Proxy, key: &str) -> String {
    let found = http
        .send(
            Method::POST,
            &proxy.admin_url("/api/keys/lookup"),
            &[("content-type", HeaderValue::from_static("application/json"))],
            json!({ "key": key }).to_string(),
        )
        .await;
    found.json()["store_key"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_by_default_json_on_request_and_admin_anywhere() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    http.post(&proxy.url("/pay"), Some("table-1"), b"{}").await;
    let store_key = store_key_of(&http, &proxy, "table-1").await;
    let admin = proxy.admin.to_string(); // HOST:PORT, no scheme

    // --admin after the command, as HOST:PORT.
    let run = keys(&["list", "--admin", &admin], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[0].starts_with("STATE") && lines[0].contains("STORE KEY"),
        "{}",
        run.stdout
    );
    let row = lines
        .iter()
        .find(|l| l.ends_with(&store_key))
        .unwrap_or_else(|| panic!("no row for {store_key}:\n{}", run.stdout));
    assert!(row.starts_with("completed"), "{row}");
    assert!(row.contains("table-1") && row.contains(" 201 "), "{row}");
    assert!(run.stdout.contains("1 record"), "{}", run.stdout);

    // --admin before the command, as a URL; --json anywhere.
    let url = format!("http://{admin}");
    let run = keys(&["--admin", &url, "--json", "list"], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let listed: Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(
        listed["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["store_key"] == store_key)
    );

    // One record: `field value` lines; JSON on request; by key and principal too.
    let run = keys(&["get", &store_key, "--admin", &admin], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("state"), "{}", run.stdout);
    assert!(
        run.stdout
            .lines()
            .any(|l| l.starts_with("status") && l.ends_with("201")),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("created_at"), "{}", run.stdout);
    let run = keys(
        &["get", "--key", "table-1", "--json", "--admin", &admin],
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let got: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(got["store_key"], store_key);

    // The environment variable names the listener too.
    let run = keys(&["list"], &[("IDEMGATE_ADMIN_URL", admin.as_str())]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_say_not_found_refused_and_usage_apart() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    http.post(&proxy.url("/pay"), Some("codes-1"), b"{}").await;
    let store_key = store_key_of(&http, &proxy, "codes-1").await;
    let admin = proxy.admin.to_string();
    let absent = "0".repeat(64);

    let run = keys(&["get", &absent, "--admin", &admin], &[]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("not found"), "{}", run.stderr);
    let run = keys(&["get", "--key", "never-sent", "--admin", &admin], &[]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("no record for key"), "{}", run.stderr);
    let run = keys(&["delete", &absent, "--admin", &admin], &[]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    let run = keys(&["resolve", &absent, "--admin", &admin], &[]);
    assert_eq!(run.code, 3, "{}", run.stderr);
    // Refused: a completed record is not outcome-unknown (409).
    let run = keys(&["resolve", &store_key, "--admin", &admin], &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("409"), "{}", run.stderr);
    // Usage errors: clap's 2; a malformed store key is refused before any call.
    let run = keys(&["frobnicate", "--admin", &admin], &[]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let run = keys(&["resolve", &store_key, "--status", "201"], &[]);
    assert_eq!(run.code, 2, "--status needs --completed: {}", run.stderr);
    let run = keys(&["get", "../metrics", "--admin", &admin], &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("64 hex characters"), "{}", run.stderr);
    // Done: the delete succeeds, and a second one finds nothing.
    let run = keys(&["delete", &store_key, "--admin", &admin], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.starts_with("deleted "), "{}", run.stdout);
    let run = keys(&["delete", &store_key, "--admin", &admin], &[]);
    assert_eq!(run.code, 3, "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointed_at_the_wrong_port_it_says_so() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    // The proxy's port: the proxy forwards to the upstream, which is no admin listener.
    let run = keys(&["list", "--admin", &proxy.addr.to_string()], &[]);
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stderr.contains("not as an idemgate admin listener")
            && run.stderr.contains("--admin-listen"),
        "{}",
        run.stderr
    );
    // A port nobody listens on.
    let closed = format!("127.0.0.1:{}", free_port());
    let run = keys(&["list", "--admin", &closed], &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("cannot connect") && run.stderr.contains("is idemgate serve running"),
        "{}",
        run.stderr
    );
    // Not HTTP at all (a raw TCP server that closes at once).
    let raw = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let raw_addr = raw.local_addr().unwrap().to_string();
    let closer = std::thread::spawn(move || {
        if let Ok((conn, _)) = raw.accept() {
            drop(conn);
        }
    });
    let run = keys(&["list", "--admin", &raw_addr], &[]);
    closer.join().unwrap();
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("did not answer as an HTTP admin listener"),
        "{}",
        run.stderr
    );
    // An https:// address is refused before any call (the listener speaks plain http).
    let run = keys(&["list", "--admin", "https://127.0.0.1:9090"], &[]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("plain http"), "{}", run.stderr);
}

/// Pointed at something that is not an admin listener (the proxy's port, in real life), a
/// mutating call never leaves: the CLI first asks `GET /healthz` without the token, and stops
/// there. The server here records every request it is sent.
#[test]
fn neither_the_token_nor_a_mutating_call_reaches_a_non_admin_port() {
    use std::io::{Read, Write};
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let seen = std::thread::spawn(move || {
        let mut heads = Vec::new();
        // Every connection the CLI opens (it opens one); the CLI's exit closes it.
        if let Ok((mut conn, _)) = server.accept() {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n) = conn.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    heads.push(String::from_utf8_lossy(&buf).into_owned());
                    buf.clear();
                    let _ = conn.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    );
                    break;
                }
            }
        }
        heads
    });
    let hex = "ab".repeat(32);
    let run = keys(
        &["delete", &hex, "--admin", &addr, "--admin-token", TOKEN],
        &[],
    );
    let heads = seen.join().unwrap();
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("not as an idemgate admin listener"),
        "{}",
        run.stderr
    );
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(heads[0].starts_with("GET /healthz "), "{heads:?}");
    assert!(
        !heads[0].to_ascii_lowercase().contains("authorization") && !heads[0].contains(TOKEN),
        "{heads:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_sent_from_a_file_the_variable_or_the_flag() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &["--admin-token", TOKEN]);
    let admin = proxy.admin.to_string();
    let run = keys(&["list", "--admin", &admin], &[]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("needs a token") && run.stderr.contains("--admin-token-file"),
        "{}",
        run.stderr
    );
    let run = keys(
        &[
            "list",
            "--admin",
            &admin,
            "--admin-token",
            "wrong-token-0123456789",
        ],
        &[],
    );
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("refused the token"), "{}", run.stderr);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t");
    std::fs::write(&file, format!("  {TOKEN}\n")).unwrap();
    let run = keys(
        &[
            "list",
            "--admin",
            &admin,
            "--admin-token-file",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = keys(
        &["list", "--admin", &admin],
        &[("IDEMGATE_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let run = keys(&["--admin-token", TOKEN, "list", "--admin", &admin], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    // Mutating commands carry it too.
    let http = Http::default();
    http.post(&proxy.url("/pay"), Some("tok-1"), b"{}").await;
    let list = keys(
        &["list", "--json", "--admin", &admin],
        &[("IDEMGATE_ADMIN_TOKEN", TOKEN)],
    );
    let listed: Value = serde_json::from_str(&list.stdout).unwrap();
    let store_key = listed["records"][0]["store_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let run = keys(&["delete", &store_key, "--admin", &admin], &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let run = keys(
        &["delete", &store_key, "--admin", &admin],
        &[("IDEMGATE_ADMIN_TOKEN", TOKEN)],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let again = http.post(&proxy.url("/pay"), Some("tok-1"), b"{}").await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(!again.replayed());
}
