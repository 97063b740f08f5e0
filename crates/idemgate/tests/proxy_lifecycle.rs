//! Concurrency, crashes, disconnects and shutdown, through the real binary over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{Http, Proxy, Upstream, until};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_duplicates_execute_once_and_get_identical_answers() {
    let up = Upstream::start().await;
    // Four worker threads: the 64 connections are handed round robin to all of them, so the
    // duplicates race from different threads and runtimes.
    let proxy = Proxy::start(&up.url(), "memory://", &["--workers", "4"]);
    let http = Http::default();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(64));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let http = http.clone();
            let url = proxy.url("/pay?delay_ms=300");
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                http.post(&url, Some("dup-64"), b"{\"amount\":1}").await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    assert_eq!(up.state.executions(), 1, "64 duplicates, one execution");
    let first = &answers[0].body;
    for a in &answers {
        assert_eq!(a.status, StatusCode::CREATED);
        assert_eq!(&a.body, first, "every duplicate gets the identical body");
    }
    assert_eq!(answers.iter().filter(|a| !a.replayed()).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_keys_survive_kill_dash_nine_on_the_file_store() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().join("data").display());
    let http = Http::default();
    let mut proxy = Proxy::start(&up.url(), &store, &[]);
    let mut firsts = Vec::new();
    for i in 0..20 {
        let key = format!("crash-{i}");
        let res = http.post(&proxy.url("/pay"), Some(&key), b"{}").await;
        assert_eq!(res.status, StatusCode::CREATED);
        firsts.push((key, res.body));
    }
    proxy.kill9();
    let proxy = Proxy::start(&up.url(), &store, &[]);
    for (key, body) in &firsts {
        let res = http.post(&proxy.url("/pay"), Some(key), b"{}").await;
        assert!(res.replayed(), "{key} was not kept across kill -9");
        assert_eq!(&res.body, body);
    }
    assert_eq!(up.state.executions(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_flight_does_not_lose_the_outcome() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    // A raw client that sends its request and hangs up while the upstream is still working.
    let mut sock = std::net::TcpStream::connect(proxy.addr).unwrap();
    let body = "{\"amount\":5}";
    write!(
        sock,
        "POST /pay?hold=1 HTTP/1.1\r\nhost: x\r\nidempotency-key: gone\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    until(10, "the request to reach the upstream", || {
        up.state.held() == 1
    })
    .await;
    drop(sock);
    up.state.release_held();
    until(10, "the upstream to finish", || up.state.executions() == 1).await;
    // The retry gets the outcome the vanished client never saw (waiting for it to be recorded).
    let http = Http::default();
    let res = http
        .post(&proxy.url("/pay?hold=1"), Some("gone"), b"{\"amount\":5}")
        .await;
    assert_eq!(res.status, StatusCode::CREATED);
    assert!(res.replayed());
    assert_eq!(res.json()["executions"], 1);
    assert_eq!(up.state.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_finishes_in_flight_work_and_exits_cleanly() {
    let up = Upstream::start().await;
    let mut proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    let in_flight = common::hold_first(&http, &up, proxy.url("/pay?hold=1"), "drain").await;
    proxy.sigterm();
    // New connections are refused once the listener is closed.
    let addr = proxy.addr;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "still accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "exited before draining"
    );
    up.state.release_held();
    let res = in_flight.await.unwrap();
    assert_eq!(
        res.status,
        StatusCode::CREATED,
        "the in-flight request completes"
    );
    let status = tokio::task::spawn_blocking(move || proxy.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn a_raw_http1_replay_is_byte_identical_on_the_wire() {
    // Read both answers byte by byte off the socket: the bodies must be equal.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(Upstream::start());
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let raw = |addr| {
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        write!(
            sock,
            "POST /pay HTTP/1.1\r\nhost: x\r\nconnection: close\r\nidempotency-key: wire\r\ncontent-length: 2\r\n\r\n{{}}"
        )
        .unwrap();
        let mut out = Vec::new();
        sock.read_to_end(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    };
    let (head1, body1) = raw(proxy.addr);
    let (head2, body2) = raw(proxy.addr);
    assert!(!head1.to_ascii_lowercase().contains("idempotent-replayed"));
    assert!(
        head2
            .to_ascii_lowercase()
            .contains("idempotent-replayed: true")
    );
    assert_eq!(body1, body2);
    drop(proxy);
    drop(up);
}

/// A drain that times out with a request still at the upstream: the request may have taken
/// effect, so its record becomes outcome-unknown (on the durable store, seen after a restart)
/// instead of staying in flight for a takeover to dispatch it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_timeout_marks_operations_still_running_outcome_unknown() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().join("data").display());
    let http = Http::default();
    let mut proxy = Proxy::start(
        &up.url(),
        &store,
        &["--drain-timeout", "1s", "--lease-ttl", "1s"],
    );
    let _first = common::hold_first(&http, &up, proxy.url("/pay?hold=1"), "abandoned").await;
    proxy.sigterm();
    let status = tokio::task::spawn_blocking(move || {
        let status = proxy.child.wait().unwrap();
        (status, proxy)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "exit status {status:?}");

    let proxy = Proxy::start(&up.url(), &store, &["--lease-ttl", "1s"]);
    // Before the fix the retry took the key over and was held upstream: bound the wait.
    let retry = tokio::time::timeout(
        Duration::from_secs(20),
        http.post(&proxy.url("/pay?hold=1"), Some("abandoned"), b"{}"),
    )
    .await
    .expect("the retry was dispatched again and held upstream");
    assert_eq!(retry.status, StatusCode::BAD_GATEWAY, "{retry:?}");
    assert_eq!(retry.problem_type(), "urn:idemgate:problem:outcome-unknown");
    assert_eq!(
        up.state.started(),
        1,
        "the abandoned request was not dispatched again"
    );
    up.state.release_held();
}
