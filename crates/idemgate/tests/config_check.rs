//! `serve --check-config` and the parsing of settings, through the real binary: the effective
//! configuration (which is itself a valid config file), exit 1 on a bad one with the setting
//! named and its valid forms listed, booleans from the environment, durations and sizes as plain
//! numbers in the file, refused path patterns, and host names in listen addresses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Http, Proxy, Upstream, bin, config_file, free_port};
use http::StatusCode;

/// `serve --check-config ARGS` with `env`: (exit code, stdout, stderr).
fn check(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["serve", "--check-config"])
        .args(args)
        .env_remove("IDEMGATE_CONFIG")
        .env_remove("IDEMGATE_UPSTREAM")
        .env_remove("IDEMGATE_STORE")
        .env_remove("IDEMGATE_NAMESPACE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The stderr of a `--check-config` that must fail with exit code 1, and print nothing on stdout.
fn invalid(args: &[&str], env: &[(&str, &str)]) -> String {
    let (code, out, err) = check(args, env);
    assert_eq!(code, 1, "{args:?} {env:?} was accepted:\n{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.starts_with("idemgate: the configuration is invalid: "),
        "{err}"
    );
    err
}

#[test]
fn check_config_prints_the_effective_configuration_as_a_config_file() {
    let (_dir, path) = config_file(
        r#"
upstream = "http://127.0.0.1:3000"
store = "memory://"
ttl = 30
lease_ttl = 5
max_request_body = 1048576
listen = "localhost:0"

[[route]]
name = "pay"
path = "/v1/pay/**"
methods = ["post"]
wait_timeout = 2
canonical_json = true
ignore_json_fields = ["/ts"]

[[route]]
name = "rest"
path = "/**"
"#,
    );
    let (code, out, err) = check(&["--config", &path], &[("IDEMGATE_WORKERS", "3")]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("the configuration is valid"), "{err}");
    let effective: toml::Table = toml::from_str(&out).unwrap();
    assert_eq!(effective["listen"].as_str(), Some("127.0.0.1:0"));
    assert_eq!(effective["lease_ttl"].as_str(), Some("5s"), "plain seconds");
    assert_eq!(
        effective["workers"].as_integer(),
        Some(3),
        "from the environment"
    );
    assert_eq!(effective["store"].as_str(), Some("memory://"));
    let routes = effective["route"].as_array().unwrap();
    assert_eq!(routes.len(), 2);
    let pay = routes[0].as_table().unwrap();
    assert_eq!(pay["name"].as_str(), Some("pay"));
    assert_eq!(
        pay["ttl"].as_str(),
        Some("30s"),
        "the global ttl, in plain seconds"
    );
    assert_eq!(pay["wait_timeout"].as_str(), Some("2s"));
    assert_eq!(
        pay["max_request_body"].as_str(),
        Some("1MiB"),
        "plain bytes"
    );
    assert_eq!(pay["canonical_json"].as_bool(), Some(true));
    assert_eq!(pay["methods"].as_array().unwrap().len(), 1);
    assert_eq!(
        routes[1]["recovery"].as_str(),
        Some("takeover"),
        "a default"
    );

    // It is a config file: checked again, it gives the same configuration.
    let (_dir2, again) = config_file(&out);
    let (code, out2, err) = check(&["--config", &again], &[("IDEMGATE_WORKERS", "3")]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out2, out);
}

#[test]
fn check_config_names_the_store_without_its_password_and_never_shows_the_token() {
    let (code, out, err) = check(
        &[
            "--upstream",
            "http://127.0.0.1:1",
            "--store",
            "postgres://app:hunter2@127.0.0.1/db?sslmode=disable&password=hunter3",
            "--namespace",
            "orders",
        ],
        &[("IDEMGATE_ADMIN_TOKEN", "check-config-token-0123456789")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        !out.contains("hunter2") && !err.contains("hunter2"),
        "{out}"
    );
    // libpq's `?password=` form too.
    assert!(
        !out.contains("hunter3") && !err.contains("hunter3") && out.contains("password=***"),
        "{out}"
    );
    assert!(!out.contains("check-config-token"), "{out}");
    assert!(
        out.contains("# admin token: set, from IDEMGATE_ADMIN_TOKEN (not shown)"),
        "{out}"
    );
}

#[test]
fn a_bad_configuration_exits_1_naming_the_setting_and_its_valid_forms() {
    fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let up = ["--upstream", "http://127.0.0.1:1", "--store", "memory://"];
        [&up[..], extra].concat()
    }
    // `**` inside a pattern: refused (it used to be taken as `*`).
    let (_dir, path) = config_file("[[route]]\nname = \"pay\"\npath = \"/a/**/b\"\n");
    let err = invalid(&with(&["--config", &path]), &[]);
    assert!(err.contains("path in route \"pay\": `**`"), "{err}");
    assert!(err.contains("(in \"/a/**/b\")"), "{err}");
    assert!(err.contains("only as the last segment"), "{err}");
    assert!(err.contains("e.g. /v1/payments/**"), "{err}");
    let (_dir, path) = config_file("[[route]]\nname = \"pay\"\npath = \"/v1/pay*\"\n");
    let err = invalid(&with(&["--config", &path]), &[]);
    assert!(err.contains("must be a whole segment"), "{err}");
    // Durations: neither fractions nor negative numbers; the key's line and the forms shown.
    for bad in ["ttl = 1.5", "ttl = -1", "ttl = true"] {
        let (_dir, path) = config_file(&format!("{bad}\n"));
        let err = invalid(&with(&["--config", &path]), &[]);
        assert!(err.contains(bad), "{bad}: {err}");
        assert!(
            err.contains("a whole number (seconds, or bytes)") && err.contains("\"30s\""),
            "{bad}: {err}"
        );
    }
    // An unknown key lists the known ones.
    let (_dir, path) = config_file("tll = \"1s\"\n");
    let err = invalid(&with(&["--config", &path]), &[]);
    assert!(err.contains("unknown field `tll`"), "{err}");
    assert!(err.contains("`unknown_ttl`"), "{err}");
    // Flags and variables, named both ways, with their forms.
    for (args, env, expected) in [
        (
            vec!["--listen", "8080"],
            vec![],
            "--listen (IDEMGATE_LISTEN) = \"8080\" has no port: use HOST:PORT, e.g. \
             127.0.0.1:8080, [::1]:8080, 0.0.0.0:8080 or localhost:8080",
        ),
        (
            vec!["--admin-listen", "localhost:http"],
            vec![],
            "--admin-listen (IDEMGATE_ADMIN_LISTEN) = \"localhost:http\": the port must be a \
             number from 0 to 65535",
        ),
        (
            vec!["--listen", "no-such-host.invalid:8080"],
            vec![],
            "--listen (IDEMGATE_LISTEN) = \"no-such-host.invalid:8080\": cannot resolve",
        ),
        (
            vec![],
            vec![("IDEMGATE_WORKERS", "many")],
            "--workers (IDEMGATE_WORKERS) = \"many\" is not a whole number: use one from 1 to \
             1024",
        ),
        (
            vec![],
            vec![("IDEMGATE_TRANSIENT_STATUSES", "503,abc")],
            "--transient-statuses (IDEMGATE_TRANSIENT_STATUSES): \"abc\" is not an HTTP status \
             (100 to 599)",
        ),
        (
            vec![],
            vec![("IDEMGATE_CANONICAL_JSON", "yes please")],
            "--canonical-json (IDEMGATE_CANONICAL_JSON) = \"yes please\" is not a boolean: use \
             true, false, 1 or 0",
        ),
        (
            vec!["--admin-allowed-hosts", "http://admin.internal"],
            vec![],
            "is not a host name: give names without scheme or port",
        ),
    ] {
        let err = invalid(&with(&args), &env);
        assert!(err.contains(expected), "{args:?} {env:?}: {err}");
    }
}

#[test]
fn environment_booleans_take_1_0_true_and_false() {
    let base = ["--upstream", "http://127.0.0.1:1", "--store", "memory://"];
    for (value, expected) in [("1", true), ("0", false), ("TRUE", true), ("false", false)] {
        let (code, out, err) = check(&base, &[("IDEMGATE_CANONICAL_JSON", value)]);
        assert_eq!(code, 0, "{value}: {err}");
        let effective: toml::Table = toml::from_str(&out).unwrap();
        let route = &effective["route"].as_array().unwrap()[0];
        assert_eq!(
            route["canonical_json"].as_bool(),
            Some(expected),
            "IDEMGATE_CANONICAL_JSON={value}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_key_from_the_environment_as_1_and_0() {
    let up = Upstream::start().await;
    let http = Http::default();
    let on = Proxy::start_with_env(
        &up.url(),
        "memory://",
        &[],
        &[("IDEMGATE_REQUIRE_KEY", "1")],
    );
    let res = http.post(&on.url("/pay"), None, b"{}").await;
    assert_eq!(res.status, StatusCode::BAD_REQUEST);
    drop(on);
    let off = Proxy::start_with_env(
        &up.url(),
        "memory://",
        &[],
        &[("IDEMGATE_REQUIRE_KEY", "0")],
    );
    let res = http.post(&off.url("/pay"), None, b"{}").await;
    assert_eq!(res.status, StatusCode::CREATED);
}

/// `idemgate serve ARGS` as a child, once it logs that it listens; killed on drop.
struct Serving(Child);

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str]) -> Serving {
    let mut child = Command::new(bin())
        .arg("serve")
        .args(args)
        .env("IDEMGATE_LOG", "info")
        .env_remove("IDEMGATE_LISTEN")
        .env_remove("IDEMGATE_ADMIN_LISTEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("[idemgate] {line}");
            if line.contains("idemgate listening")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(line);
            }
        }
    });
    let listening = rx.recv_timeout(Duration::from_secs(20));
    let serving = Serving(child);
    let line = listening.expect("idemgate did not start listening");
    assert!(line.contains("proxy=127.0.0.1:"), "{line}");
    serving
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_addresses_take_host_names() {
    let up = Upstream::start().await;
    let (port, admin) = (free_port(), free_port());
    let _serving = serve(&[
        "--upstream",
        &up.url(),
        "--store",
        "memory://",
        "--listen",
        &format!("localhost:{port}"),
        "--admin-listen",
        &format!("localhost:{admin}"),
    ]);
    let http = Http::default();
    let res = http
        .post(
            &format!("http://127.0.0.1:{port}/pay"),
            Some("by-name"),
            b"{}",
        )
        .await;
    assert_eq!(res.status, StatusCode::CREATED);
    let health = http.get(&format!("http://localhost:{admin}/healthz")).await;
    assert_eq!(health.status, StatusCode::OK);
}

#[test]
fn check_config_reads_the_store_urls_tls_files() {
    for store in [
        "postgres://app@127.0.0.1/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        "rediss://127.0.0.1:6380?ca_file=/nonexistent/ca.pem",
    ] {
        let err = invalid(
            &[
                "--upstream",
                "http://127.0.0.1:1",
                "--store",
                store,
                "--namespace",
                "t",
            ],
            &[],
        );
        assert!(
            err.contains("the store URL") && err.contains("/nonexistent/ca.pem"),
            "{store}: {err}"
        );
    }
    // A plain URL needs no file and nothing is connected to (nobody listens on port 1).
    let (code, _, err) = check(
        &[
            "--upstream",
            "http://127.0.0.1:1",
            "--store",
            "redis://127.0.0.1:1",
            "--namespace",
            "t",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
}
