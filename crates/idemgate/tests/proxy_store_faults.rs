//! The proxy against a store that is full, partitioned or slow (issue "hardening", G2): every
//! keyed request is answered within a bound (`--store-timeout`), nothing is forwarded without a
//! claim, and service resumes by itself once the store is reachable again.
//!
//! Partitions are real: the proxy talks to Redis / PostgreSQL through an in-tree TCP relay
//! (`idemgate-relay`) that is told to blackhole the traffic (nothing moves, nothing is lost, as
//! behind a partition that drops packets) and then to heal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Http, Proxy, Upstream};
use http::StatusCode;
use idemgate_relay::{Fault, Relay};

/// How long a keyed request may take to be answered while the store is partitioned, with
/// `--store-timeout 1s` (before the fix: 29.9 s for PostgreSQL).
const ANSWER_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_store_answers_503_store_full_with_retry_after() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://?max_records=2", &[]);
    let http = Http::default();
    for key in ["full-1", "full-2"] {
        let res = http.post(&proxy.url("/pay"), Some(key), b"{}").await;
        assert_eq!(res.status, StatusCode::CREATED);
    }
    let res = http.post(&proxy.url("/pay"), Some("full-3"), b"{}").await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.problem_type(), "urn:idemgate:problem:store-full");
    assert!(res.headers.contains_key("retry-after"));
    assert_eq!(
        up.state.executions(),
        2,
        "nothing forwarded without a record"
    );
    // Existing keys still replay.
    let again = http.post(&proxy.url("/pay"), Some("full-1"), b"{}").await;
    assert!(again.replayed());
    let full = common::metric(
        &http,
        &proxy,
        "idemgate_requests_total",
        "outcome=\"store_full\"",
    )
    .await;
    assert_eq!(full, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_memory_store_url_is_refused_at_start_up() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--store",
            "memory://?max_records=lots",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_records"));
}

/// A number that differs between runs.
fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// `host:port` of a server URL such as `postgres://user@127.0.0.1:5432/db`.
fn authority(url: &str) -> (String, SocketAddr) {
    let rest = url.split_once("://").unwrap().1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = rest.split('/').next().unwrap();
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
        .unwrap()
        .next()
        .unwrap();
    (hostport.to_owned(), addr)
}

/// The proxy behind a relay to the store at `url`: a keyed request works; blackholed, keyed
/// requests are answered `503` within the bound and nothing reaches the upstream; healed,
/// service resumes without a restart.
async fn partition_and_heal(url: &str, namespace: &str) {
    // Records outlive a test run on a shared server: a namespace of this run's own.
    let namespace = &format!("{namespace}-{}-{}", std::process::id(), unique());
    let (hostport, target) = authority(url);
    let relay = Relay::start(target).await.unwrap();
    let via_relay = url.replacen(&hostport, &relay.addr().to_string(), 1);
    let up = Upstream::start().await;
    let proxy = Proxy::start(
        &up.url(),
        &via_relay,
        &[
            "--store-timeout",
            "1s",
            "--namespace",
            namespace,
            "--replay-cache-entries",
            "0",
        ],
    );
    let http = Http::default();
    let res = http
        .post(
            &proxy.url("/pay"),
            Some(&format!("{namespace}-before")),
            b"{}",
        )
        .await;
    assert_eq!(res.status, StatusCode::CREATED);

    relay.set(Fault::Blackhole);
    for i in 0..3 {
        let res = tokio::time::timeout(
            ANSWER_BOUND,
            http.post(
                &proxy.url("/pay"),
                Some(&format!("{namespace}-cut-{i}")),
                b"{}",
            ),
        )
        .await
        .expect("a keyed request must be answered within the bound while the store is cut off");
        assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE, "{res:?}");
        assert_eq!(res.problem_type(), "urn:idemgate:problem:store-unavailable");
        assert!(res.headers.contains_key("retry-after"));
        let detail = res.json()["detail"].as_str().unwrap().to_owned();
        assert!(
            !detail.contains(&relay.addr().port().to_string()),
            "the answer must not leak store addresses: {detail}"
        );
    }
    assert_eq!(up.state.started(), 1, "nothing forwarded without a claim");

    relay.set(Fault::None);
    let after = format!("{namespace}-after");
    common::resumes_without_restart(&http, &proxy, &up, &after, 30, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn a_partitioned_postgres_is_answered_promptly_and_heals() {
    let Some(url) = common::server_url("IDEMGATE_TEST_POSTGRES_URL") else {
        return;
    };
    partition_and_heal(&url, "partition-pg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn a_partitioned_redis_is_answered_promptly_and_heals() {
    let Some(url) = common::server_url("IDEMGATE_TEST_REDIS_URL") else {
        return;
    };
    partition_and_heal(&url, "partition-redis").await;
}

/// A private `redis-server` on a free port, stopped (SIGKILL) when dropped.
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
}

impl PrivateRedis {
    fn start() -> Option<Self> {
        let port = common::free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Self { child, port })
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A paused Redis (SIGSTOP: connections stay open, nothing answers) is answered within the bound,
/// and service resumes after SIGCONT without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    no_redis,
    ignore = "IDEMGATE_TEST_REDIS_URL is not set (redis-server needed)"
)]
async fn a_paused_redis_is_answered_promptly_and_resumes() {
    if common::server_url("IDEMGATE_TEST_REDIS_URL").is_none() {
        return;
    }
    let redis = PrivateRedis::start().expect("redis-server is on this machine");
    let up = Upstream::start().await;
    let proxy = Proxy::start(
        &up.url(),
        &format!("redis://127.0.0.1:{}", redis.port),
        &["--store-timeout", "1s", "--namespace", "paused"],
    );
    let http = Http::default();
    assert_eq!(
        http.post(&proxy.url("/pay"), Some("p-before"), b"{}")
            .await
            .status,
        StatusCode::CREATED
    );
    redis.signal("-STOP");
    let res = tokio::time::timeout(
        ANSWER_BOUND,
        http.post(&proxy.url("/pay"), Some("p-cut"), b"{}"),
    )
    .await
    .expect("answered within the bound while Redis is paused");
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE, "{res:?}");
    assert_eq!(up.state.started(), 1);
    redis.signal("-CONT");
    common::resumes_without_restart(&http, &proxy, &up, "p-after", 30, 2).await;
}

impl PrivateRedis {
    /// `CONFIG SET name value` through `redis-cli`.
    fn config_set(&self, name: &str, value: &str) {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "config", "set", name, value])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("OK"),
            "config set {name} {value}: {out:?}"
        );
    }
}

/// Scenario 14: Redis at `maxmemory` under `noeviction` refuses every write (`OOM`). A new key
/// is answered `503 store-full` with `Retry-After` (not `store-unavailable`, and never forwarded
/// without a claim, whatever the fail mode), and service resumes by itself once Redis has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    no_redis,
    ignore = "IDEMGATE_TEST_REDIS_URL is not set (redis-server needed)"
)]
async fn a_redis_at_maxmemory_answers_503_store_full_and_forwards_nothing() {
    if common::server_url("IDEMGATE_TEST_REDIS_URL").is_none() {
        return;
    }
    let redis = PrivateRedis::start().expect("redis-server is on this machine");
    let up = Upstream::start().await;
    let proxy = Proxy::start(
        &up.url(),
        &format!("redis://127.0.0.1:{}", redis.port),
        &["--namespace", "full", "--fail-mode", "open"],
    );
    let http = Http::default();
    let before = http.post(&proxy.url("/pay"), Some("m-before"), b"{}").await;
    assert_eq!(before.status, StatusCode::CREATED);
    redis.config_set("maxmemory-policy", "noeviction");
    redis.config_set("maxmemory", "1");
    let res = http.post(&proxy.url("/pay"), Some("m-new"), b"{}").await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE, "{res:?}");
    assert_eq!(res.problem_type(), "urn:idemgate:problem:store-full");
    assert!(res.headers.contains_key("retry-after"));
    assert_eq!(up.state.started(), 1, "nothing forwarded without a claim");
    redis.config_set("maxmemory", "0");
    common::resumes_without_restart(&http, &proxy, &up, "m-after", 30, 2).await;
}
