//! `idemgate serve` on the shared stores (real Redis and PostgreSQL from `IDEMGATE_TEST_REDIS_URL`
//! and `IDEMGATE_TEST_POSTGRES_URL`, a DynamoDB-compatible server from
//! `IDEMGATE_TEST_DYNAMODB_URL`): the semantics hold, and two instances sharing a store
//! execute a key once. Without the variables these tests say they skip (and fail under CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Http, Proxy, Upstream, unique};
use http::StatusCode;

async fn two_instances_share_the_work(store: &str) {
    let up = Upstream::start().await;
    let args = common::slow_store_args(store);
    let a = Proxy::start(&up.url(), store, args);
    let b = Proxy::start(&up.url(), store, args);
    let http = Http::default();
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    // Duplicates of each key go to both instances at once.
    let mut tasks = Vec::new();
    for i in 0..20 {
        for proxy in [&a, &b, &a, &b] {
            let http = http.clone();
            let url = proxy.url("/pay?delay_ms=50");
            let key = format!("shared-{run}-{i}");
            tasks.push(tokio::spawn(async move {
                (key.clone(), http.post(&url, Some(&key), b"{}").await)
            }));
        }
    }
    let mut bodies = std::collections::HashMap::new();
    for t in tasks {
        let (key, res) = t.await.unwrap();
        assert_eq!(res.status, StatusCode::CREATED, "{key}: {res:?}");
        let first = bodies.entry(key).or_insert_with(|| res.body.clone());
        assert_eq!(*first, res.body, "every duplicate gets the same body");
    }
    assert_eq!(
        up.state.executions(),
        20,
        "one execution per key across both instances"
    );
    // Mismatch and replay across instances.
    let key = format!("shared-{run}-0");
    let other = http
        .post(&b.url("/pay?delay_ms=50"), Some(&key), b"[]")
        .await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    let again = http
        .post(&a.url("/pay?delay_ms=50"), Some(&key), b"{}")
        .await;
    assert!(again.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn two_instances_on_redis_execute_each_key_once() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_REDIS_URL") {
        two_instances_share_the_work(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn two_instances_on_postgres_execute_each_key_once() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_POSTGRES_URL") {
        two_instances_share_the_work(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn two_instances_on_dynamodb_execute_each_key_once() {
    if let Some(url) = common::dynamodb_store("shared") {
        two_instances_share_the_work(&url).await;
    }
}

/// The table is never created silently: `serve` on a missing table stops with an error that
/// says how to create it (and the table is still missing afterwards); `idemgate create-table`
/// creates it once and finds it the second time; then `serve` starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn dynamodb_tables_are_created_only_when_asked() {
    let Some(url) = common::dynamodb_url("asked") else {
        return;
    };
    let serve = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .args(["serve", "--upstream", "http://127.0.0.1:1", "--store", &url])
            .args(["--namespace", common::TEST_NAMESPACE])
            .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{}", common::free_port()),
            ])
            .envs(common::TEST_AWS_ENV)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    for _ in 0..2 {
        let out = serve();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("does not exist") && err.contains("idemgate create-table"),
            "{err}"
        );
    }
    let first = common::create_table(&url).unwrap();
    assert!(
        first.contains("created") && first.contains("enabled now"),
        "{first}"
    );
    let again = common::create_table(&url).unwrap();
    assert!(
        again.contains("exists") && again.contains("already enabled"),
        "{again}"
    );
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), &url, &[]);
    let http = Http::default();
    let key = unique("asked");
    assert_eq!(
        http.post(&proxy.url("/pay"), Some(key), b"{}").await.status,
        StatusCode::CREATED
    );
    assert!(
        http.post(&proxy.url("/pay"), Some(key), b"{}")
            .await
            .replayed()
    );
    // Other stores have nothing to create.
    let err = common::create_table("postgres://u@127.0.0.1:1/db").unwrap_err();
    assert!(err.contains("only dynamodb://"), "{err}");
}

/// A short lease, so that a dead holder's key comes free quickly: 1 s (its store deadline is
/// then 300 ms). On the DynamoDB test server 5 s, with a 1.5 s deadline: moto answers one
/// request at a time from Python on the same two cores, and its slowest answers under load
/// come near 300 ms.
fn short_lease(store: &str) -> Vec<&'static str> {
    if store.starts_with("dynamodb://") {
        vec!["--lease-ttl", "5s", "--store-timeout", "1500ms"]
    } else {
        vec!["--lease-ttl", "1s"]
    }
}

/// Strict mode: instance A dies (SIGKILL) holding a key; the retry sent to instance B waits for
/// A's lease to run out and gets outcome-unknown instead of a second dispatch.
async fn strict_recovery_marks_the_key_unknown(store: &str) {
    let up = Upstream::start().await;
    let mut args = short_lease(store);
    args.extend(["--recovery", "strict"]);
    let mut a = Proxy::start(&up.url(), store, &args);
    let b = Proxy::start(&up.url(), store, &args);
    let http = Http::default();
    let key = unique("strict");
    let first = http.spawn_doomed_post(a.url("/pay?hold=1"), key);
    common::until(10, "A's request to reach the upstream", || {
        up.state.held() == 1
    })
    .await;
    a.kill9();
    assert_eq!(
        first.await.unwrap(),
        None,
        "A's client sees the connection drop"
    );
    let retry = http.post(&b.url("/pay?hold=1"), Some(key), b"{}").await;
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY, "{retry:?}");
    assert_eq!(retry.problem_type(), "urn:idemgate:problem:outcome-unknown");
    assert_eq!(up.state.started(), 1, "strict mode never dispatches twice");
    up.state.release_held();
}

async fn takeover_runs_the_next_epoch(store: &str) {
    let up = Upstream::start().await;
    let args = short_lease(store);
    let mut a = Proxy::start(&up.url(), store, &args);
    let b = Proxy::start(&up.url(), store, &args);
    let http = Http::default();
    let key = unique("takeover");
    // A dispatches with a 5 s upstream delay and dies at once: nothing renews its lease.
    let first = http.spawn_doomed_post(a.url("/pay?delay_ms=5000"), key);
    common::until(10, "A's request to reach the upstream", || {
        up.state.started() == 1
    })
    .await;
    a.kill9();
    assert_eq!(first.await.unwrap(), None);
    let started = std::time::Instant::now();
    let retry = http
        .post(&b.url("/pay?delay_ms=5000"), Some(key), b"{}")
        .await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert_eq!(
        retry.json()["idempotency_epoch"],
        "2",
        "the takeover runs at epoch 2"
    );
    // A short lease (+ renew interval): B took over long before its 30 s wait timeout.
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    let again = http
        .post(&b.url("/pay?delay_ms=5000"), Some(key), b"{}")
        .await;
    assert!(again.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn redis_takeover_and_strict_recovery_after_sigkill() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_REDIS_URL") {
        takeover_runs_the_next_epoch(&url).await;
        // Strict mode refuses a Redis that may lose writes: give it one with AOF fsync always.
        let dir = tempfile::tempdir().unwrap();
        let port = common::free_port();
        let _durable = PrivateRedis::start_with(
            port,
            &[
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                dir.path().to_str().unwrap(),
            ],
        );
        strict_recovery_marks_the_key_unknown(&format!("redis://127.0.0.1:{port}")).await;
    }
}

#[test]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
fn strict_mode_refuses_a_redis_that_may_lose_writes() {
    if common::server_url("IDEMGATE_TEST_REDIS_URL").is_none() {
        return;
    }
    // A private server without AOF: every restart would forget every record.
    let port = common::free_port();
    let _redis = PrivateRedis::start(port);
    let url = format!("redis://127.0.0.1:{port}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--store",
            &url,
            "--recovery",
            "strict",
            "--namespace",
            common::TEST_NAMESPACE,
        ])
        .args(["--listen", &format!("127.0.0.1:{}", common::free_port())])
        .args([
            "--admin-listen",
            &format!("127.0.0.1:{}", common::free_port()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to start") && err.contains("appendonly = no"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn postgres_takeover_and_strict_recovery_after_sigkill() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_POSTGRES_URL") {
        takeover_runs_the_next_epoch(&url).await;
        strict_recovery_marks_the_key_unknown(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn dynamodb_takeover_and_strict_recovery_after_sigkill() {
    if let Some(url) = common::dynamodb_store("takeover") {
        takeover_runs_the_next_epoch(&url).await;
        strict_recovery_marks_the_key_unknown(&url).await;
    }
}

/// A Redis server of this test's own on a free port (so stopping it disturbs nobody else).
struct PrivateRedis {
    child: std::process::Child,
    port: u16,
}

impl PrivateRedis {
    fn start(port: u16) -> Self {
        Self::start_with(port, &["--appendonly", "no"])
    }

    fn start_with(port: u16, extra: &[&str]) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server must be installed (it is on this machine kind)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Self { child, port }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn redis_down_means_503_and_nothing_forwarded_then_service_resumes() {
    if common::server_url("IDEMGATE_TEST_REDIS_URL").is_none() {
        return;
    }
    let port = common::free_port();
    let mut redis = PrivateRedis::start(port);
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), &format!("redis://127.0.0.1:{}", redis.port), &[]);
    let http = Http::default();
    assert_eq!(
        http.post(&proxy.url("/pay"), Some("before"), b"{}")
            .await
            .status,
        StatusCode::CREATED
    );
    redis.stop();
    refused_while_down(&http, &proxy, &up).await;
    let _redis = PrivateRedis::start(port);
    common::resumes_without_restart(&http, &proxy, &up, "after", 20, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn cached_replays_cost_no_store_round_trip() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_REDIS_URL") {
        cached_replays_reach_no_store(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_dynamodb, ignore = "IDEMGATE_TEST_DYNAMODB_URL is not set")]
async fn dynamodb_cached_replays_cost_no_store_round_trip() {
    if let Some(url) = common::dynamodb_store("cached") {
        cached_replays_reach_no_store(&url).await;
    }
}

/// The first replay of a key on an instance asks the store (one claim); later ones are served
/// from the instance's cache of completed records and reach no store.
async fn cached_replays_reach_no_store(url: &str) {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), url, common::slow_store_args(url));
    let http = Http::default();
    let key = unique("cached");
    http.post(&proxy.url("/pay"), Some(key), b"{}").await;
    assert!(
        http.post(&proxy.url("/pay"), Some(key), b"{}")
            .await
            .replayed()
    );
    let claims = || {
        common::metric(
            &http,
            &proxy,
            "idemgate_store_operation_seconds_count",
            "op=\"claim\"",
        )
    };
    let before = claims().await;
    for _ in 0..5 {
        assert!(
            http.post(&proxy.url("/pay"), Some(key), b"{}")
                .await
                .replayed()
        );
    }
    assert_eq!(
        claims().await,
        before,
        "replays from the local cache reach no store"
    );
    assert_eq!(up.state.executions(), 1);
}

/// A retry waiting on instance B for a key that instance A is executing is woken by A's
/// completion notice (Redis pub/sub, PostgreSQL NOTIFY). Polling is slowed to one per minute, so
/// without the notice B would only look again when A's 10 s lease comes due (it is renewed), at
/// least several seconds after the release; with it, B answers at once. The 2 s bound below is that
/// mechanism's witness, not a speed claim.
async fn waiters_on_other_instances_are_woken_by_notices(store: &str) {
    let up = Upstream::start().await;
    let args = [
        "--waiter-poll-min",
        "60s",
        "--waiter-poll-max",
        "60s",
        "--wait-timeout",
        "5s",
    ];
    let a = Proxy::start(&up.url(), store, &args);
    let b = Proxy::start(&up.url(), store, &args);
    let http = Http::default();
    let key = unique("notice");
    let first = common::hold_first(&http, &up, a.url("/pay?hold=1"), key).await;
    let second = http.spawn_post(b.url("/pay?hold=1"), key);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::metric(&http, &b, "idemgate_waiters", "").await < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "B's retry never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Let B settle into its long sleep (its lease-bound nap) before A finishes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    up.state.release_held();
    let released = std::time::Instant::now();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(
        released.elapsed() < std::time::Duration::from_secs(2),
        "B was not woken by the notice: {:?}",
        released.elapsed()
    );
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(second.status, StatusCode::CREATED, "{second:?}");
    assert!(second.replayed());
    assert_eq!(second.body, first.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_redis, ignore = "IDEMGATE_TEST_REDIS_URL is not set")]
async fn redis_waiters_on_other_instances_are_woken_by_pubsub() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_REDIS_URL") {
        waiters_on_other_instances_are_woken_by_notices(&url).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn postgres_waiters_on_other_instances_are_woken_by_notify() {
    if let Some(url) = common::server_url("IDEMGATE_TEST_POSTGRES_URL") {
        waiters_on_other_instances_are_woken_by_notices(&url).await;
    }
}

/// PostgreSQL becomes unreachable (its database refuses connections and ours are terminated):
/// `503`, nothing forwarded; once it accepts connections again, service resumes without a
/// restart. A database of the test's own, so nobody else is disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_postgres, ignore = "IDEMGATE_TEST_POSTGRES_URL is not set")]
async fn postgres_down_means_503_and_nothing_forwarded_then_service_resumes() {
    let Some(admin_url) = common::server_url("IDEMGATE_TEST_POSTGRES_URL") else {
        return;
    };
    let db = format!("idemgate_outage_{}", std::process::id());
    let psql = |sql: String| {
        let out = std::process::Command::new("psql")
            .args([&admin_url, "-v", "ON_ERROR_STOP=1", "-Atc", &sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    psql(format!("DROP DATABASE IF EXISTS {db}"));
    psql(format!("CREATE DATABASE {db}"));
    let base = admin_url.rsplit_once('/').unwrap().0;
    let store = format!("{base}/{db}");
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), &store, &[]);
    let http = Http::default();
    assert_eq!(
        http.post(&proxy.url("/pay"), Some("before"), b"{}")
            .await
            .status,
        StatusCode::CREATED
    );

    psql(format!("ALTER DATABASE {db} ALLOW_CONNECTIONS false"));
    psql(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND pid <> pg_backend_pid()"
    ));
    refused_while_down(&http, &proxy, &up).await;

    psql(format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"));
    common::resumes_without_restart(&http, &proxy, &up, "after", 20, 2).await;
    drop(proxy);
    psql(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
}

/// While the store is down: `503` store-unavailable for new keys, and nothing reaches the upstream
/// (which had served exactly one request before the outage).
async fn refused_while_down(http: &Http, proxy: &Proxy, up: &Upstream) {
    for i in 0..20 {
        let res = http
            .post(&proxy.url("/pay"), Some(&format!("down-{i}")), b"{}")
            .await;
        assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE, "{res:?}");
        assert_eq!(res.problem_type(), "urn:idemgate:problem:store-unavailable");
    }
    assert_eq!(
        up.state.started(),
        1,
        "nothing is forwarded without a claim"
    );
}
