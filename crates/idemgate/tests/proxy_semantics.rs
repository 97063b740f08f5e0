//! Every row of PRODUCT §3 through the real binary, over real sockets, with a counting upstream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Http, Proxy, Upstream, free_port, metric};
use http::{HeaderValue, Method, StatusCode};

fn memory() -> &'static str {
    "memory://"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_request_runs_and_retries_replay_byte_identical() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &[]);
    let http = Http::default();
    let first = http
        .post(&proxy.url("/pay"), Some("k-1"), b"{\"amount\":10}")
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    // The key and the epoch reached the upstream.
    assert_eq!(first.json()["idempotency_key"], "k-1");
    assert_eq!(first.json()["idempotency_epoch"], "1");
    for _ in 0..3 {
        let again = http
            .post(&proxy.url("/pay"), Some("k-1"), b"{\"amount\":10}")
            .await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert!(again.replayed(), "replay must say so");
        assert_eq!(again.body, first.body, "byte-identical body");
        assert_eq!(again.headers["x-upstream"], "demo");
        assert_eq!(again.headers["content-type"], "application/json");
    }
    assert_eq!(up.state.executions(), 1);
    // The bare and the sf-string spellings are the same key.
    let quoted = http
        .post(&proxy.url("/pay"), Some("\"k-1\""), b"{\"amount\":10}")
        .await;
    assert!(quoted.replayed());
    assert_eq!(up.state.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_reaches_the_first_client_but_is_never_replayed() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &[]);
    let http = Http::default();
    let first = http.post(&proxy.url("/pay"), Some("cookie"), b"{}").await;
    assert!(first.headers.contains_key("set-cookie"));
    let again = http.post(&proxy.url("/pay"), Some("cookie"), b"{}").await;
    assert!(again.replayed());
    assert!(!again.headers.contains_key("set-cookie"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_payload_with_the_same_key_is_refused_with_422() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &[]);
    let http = Http::default();
    http.post(&proxy.url("/pay"), Some("k"), b"{\"amount\":10}")
        .await;
    let other_body = http
        .post(&proxy.url("/pay"), Some("k"), b"{\"amount\":11}")
        .await;
    let other_path = http
        .post(&proxy.url("/other"), Some("k"), b"{\"amount\":10}")
        .await;
    let other_query = http
        .post(
            &proxy.url("/pay?currency=eur"),
            Some("k"),
            b"{\"amount\":10}",
        )
        .await;
    let other_method = http
        .send(
            http::Method::PATCH,
            &proxy.url("/pay"),
            &[
                (
                    "content-type",
                    http::HeaderValue::from_static("application/json"),
                ),
                ("idempotency-key", http::HeaderValue::from_static("k")),
            ],
            b"{\"amount\":10}",
        )
        .await;
    // Scenario 26 (misuse): body, path, query and method each count; none is dispatched.
    for res in [other_body, other_path, other_query, other_method] {
        assert_eq!(res.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            res.problem_type(),
            "urn:idemgate:problem:fingerprint-mismatch"
        );
        assert_eq!(res.json()["status"], 422);
    }
    assert_eq!(up.state.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_scoped_by_principal() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &[]);
    let http = Http::default();
    let as_user = |token: &'static str| {
        vec![
            ("idempotency-key", HeaderValue::from_static("shared-key")),
            ("authorization", HeaderValue::from_static(token)),
        ]
    };
    let alice = http
        .send(
            Method::POST,
            &proxy.url("/pay"),
            &as_user("Bearer alice"),
            b"{}",
        )
        .await;
    let bob = http
        .send(
            Method::POST,
            &proxy.url("/pay"),
            &as_user("Bearer bob"),
            b"{}",
        )
        .await;
    assert!(!bob.replayed(), "bob must not get alice's response");
    assert_eq!(up.state.executions(), 2);
    let alice_again = http
        .send(
            Method::POST,
            &proxy.url("/pay"),
            &as_user("Bearer alice"),
            b"{}",
        )
        .await;
    assert!(alice_again.replayed());
    assert_eq!(alice_again.body, alice.body);
    // Bob with a different body is not a mismatch against alice's record either.
    let bob_other = http
        .send(
            Method::POST,
            &proxy.url("/pay"),
            &as_user("Bearer bob"),
            b"[]",
        )
        .await;
    assert_eq!(bob_other.status, StatusCode::UNPROCESSABLE_ENTITY); // against bob's own record
    let anon = http
        .post(&proxy.url("/pay"), Some("shared-key"), b"{}")
        .await;
    assert!(!anon.replayed());
    assert_eq!(up.state.executions(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_malformed_keys_get_400_and_reach_nothing() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &["--require-key"]);
    let http = Http::default();
    let missing = http.post(&proxy.url("/pay"), None, b"{}").await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    assert_eq!(missing.problem_type(), "urn:idemgate:problem:missing-key");
    let long = "x".repeat(300);
    let bad: Vec<HeaderValue> = vec![
        HeaderValue::from_static(""),
        HeaderValue::from_str(&long).unwrap(),
        HeaderValue::from_static("tab\tinside"),
        HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
        HeaderValue::from_static("\"unterminated"),
        HeaderValue::from_static("has space"),
    ];
    for value in bad {
        let res = http
            .send(
                Method::POST,
                &proxy.url("/pay"),
                &[("idempotency-key", value.clone())],
                b"{}",
            )
            .await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST, "{value:?}");
        assert_eq!(res.problem_type(), "urn:idemgate:problem:malformed-key");
    }
    assert_eq!(up.state.started(), 0, "nothing may reach the upstream");
    // GET passes through untouched, key or not.
    let get = http.get(&proxy.url("/anything")).await;
    assert_eq!(get.status, StatusCode::OK);
    assert_eq!(
        metric(
            &http,
            &proxy,
            "idemgate_requests_total",
            "outcome=\"invalid_key\""
        )
        .await,
        6.0
    );
    assert_eq!(
        metric(
            &http,
            &proxy,
            "idemgate_requests_total",
            "outcome=\"missing_key\""
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_require_key_unkeyed_posts_pass_through_every_time() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &[]);
    let http = Http::default();
    for _ in 0..2 {
        let res = http.post(&proxy.url("/pay"), None, b"{}").await;
        assert_eq!(res.status, StatusCode::CREATED);
        assert!(!res.replayed());
    }
    // PUT is not covered by default: passes through even with a key.
    for _ in 0..2 {
        let res = http
            .send(
                Method::PUT,
                &proxy.url("/pay"),
                &[("idempotency-key", HeaderValue::from_static("p"))],
                b"{}",
            )
            .await;
        assert!(!res.replayed());
    }
    assert_eq!(up.state.executions(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_bodies_get_413_before_anything_is_claimed() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &["--max-request-body", "1KiB"]);
    let http = Http::default();
    static BIG: [u8; 4096] = [b'a'; 4096];
    let res = http.post(&proxy.url("/pay"), Some("big"), &BIG).await;
    assert_eq!(res.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(res.problem_type(), "urn:idemgate:problem:body-too-large");
    assert_eq!(up.state.started(), 0);
    // Nothing was claimed: the same key with a small body runs.
    let ok = http.post(&proxy.url("/pay"), Some("big"), b"{}").await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert!(!ok.replayed());
}

#[test]
fn a_chunked_request_body_over_the_limit_gets_413_while_reading() {
    use std::io::{Read, Write};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let up = rt.block_on(Upstream::start());
    let proxy = Proxy::start(&up.url(), memory(), &["--max-request-body", "1KiB"]);
    let mut sock = std::net::TcpStream::connect(proxy.addr).unwrap();
    write!(
        sock,
        "POST /pay HTTP/1.1\r\nhost: x\r\nconnection: close\r\nidempotency-key: chunky\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .unwrap();
    let chunk = "y".repeat(512);
    for _ in 0..4 {
        // The proxy may answer and close before the last chunks: ignore write errors.
        let _ = write!(sock, "200\r\n{chunk}\r\n");
    }
    let _ = write!(sock, "0\r\n\r\n");
    let mut out = String::new();
    let _ = sock.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("urn:idemgate:problem:body-too-large"));
    assert_eq!(up.state.started(), 0);
    drop(proxy);
    drop(up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_statuses_are_released_and_others_are_stored() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &[]);
    let http = Http::default();
    for _ in 0..2 {
        let res = http
            .post(&proxy.url("/pay?status=503"), Some("t"), b"{}")
            .await;
        assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!res.replayed());
    }
    assert_eq!(
        up.state.executions_of("t"),
        2,
        "a transient answer is not kept"
    );
    for _ in 0..2 {
        let res = http
            .post(&proxy.url("/pay?status=500"), Some("e"), b"{}")
            .await;
        assert_eq!(res.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
    assert_eq!(
        up.state.executions_of("e"),
        1,
        "a 500 is stored and replayed, like Stripe"
    );
    let res = http
        .post(&proxy.url("/pay?status=409"), Some("c"), b"{}")
        .await;
    let again = http
        .post(&proxy.url("/pay?status=409"), Some("c"), b"{}")
        .await;
    assert_eq!(again.status, res.status);
    assert!(again.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gives_502_and_releases_the_key() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let proxy = Proxy::start(&url, memory(), &[]);
    let http = Http::default();
    let res = http.post(&proxy.url("/pay"), Some("down"), b"{}").await;
    assert_eq!(res.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        res.problem_type(),
        "urn:idemgate:problem:upstream-unavailable"
    );
    // Bring the upstream up on that port: the retry runs (the key was released).
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let up = Upstream::on(listener);
    let res = http.post(&proxy.url("/pay"), Some("down"), b"{}").await;
    assert_eq!(res.status, StatusCode::CREATED);
    assert!(!res.replayed());
    assert_eq!(up.state.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_off_response_makes_the_outcome_unknown_and_it_is_never_rerun() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &[]);
    let http = Http::default();
    for _ in 0..3 {
        let res = http
            .post(&proxy.url("/pay?truncate=1"), Some("cut"), b"{}")
            .await;
        assert_eq!(res.status, StatusCode::BAD_GATEWAY);
        assert_eq!(res.problem_type(), "urn:idemgate:problem:outcome-unknown");
    }
    assert_eq!(up.state.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_mode_answers_409_with_retry_after_while_the_first_runs() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &["--concurrency", "reject"]);
    let http = Http::default();
    let first = common::hold_first(&http, &up, proxy.url("/pay?hold=1"), "busy").await;
    let dup = http
        .post(&proxy.url("/pay?hold=1"), Some("busy"), b"{}")
        .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert_eq!(dup.problem_type(), "urn:idemgate:problem:request-in-flight");
    let retry_after: u64 = dup.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    up.state.release_held();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let after = http
        .post(&proxy.url("/pay?hold=1"), Some("busy"), b"{}")
        .await;
    assert!(after.replayed());
    assert_eq!(up.state.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_holds_the_retry_until_the_first_completes_then_replays() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &[]);
    let http = Http::default();
    let first = common::hold_first(&http, &up, proxy.url("/pay?hold=1"), "w").await;
    let second = http.spawn_post(proxy.url("/pay?hold=1"), "w");
    // Signal: the proxy reports one waiter.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&http, &proxy, "idemgate_waiters", "").await < 1.0 {
        assert!(Instant::now() < deadline, "the retry never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    up.state.release_held();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(second.replayed());
    assert_eq!(second.body, first.body);
    assert_eq!(up.state.executions(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_gives_409_after_the_wait_timeout() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &["--wait-timeout", "1s"]);
    let http = Http::default();
    let first = common::hold_first(&http, &up, proxy.url("/pay?hold=1"), "slow").await;
    let dup = http
        .post(&proxy.url("/pay?hold=1"), Some("slow"), b"{}")
        .await;
    assert_eq!(dup.status, StatusCode::CONFLICT);
    assert!(dup.headers.contains_key("retry-after"));
    up.state.release_held();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_responses_pass_once_and_are_never_executed_again() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &["--max-response-body", "1KiB"]);
    let http = Http::default();
    let first = http
        .post(&proxy.url("/pay?size=5000"), Some("huge"), b"{}")
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(
        first.body.len(),
        5000,
        "the first client gets the whole response"
    );
    let again = http
        .post(&proxy.url("/pay?size=5000"), Some("huge"), b"{}")
        .await;
    assert_eq!(again.status, StatusCode::GONE);
    assert_eq!(again.problem_type(), "urn:idemgate:problem:not-replayable");
    assert_eq!(again.json()["original_status"], 201);
    assert_eq!(up.state.executions(), 1);
}

/// Scenario 19: a client that closes its connection right after sending the whole request.
/// Closed once the request was forwarded: it runs to its end, its outcome is stored, the retry
/// gets the replay. Closed at once (the proxy may not have forwarded it yet, and then drops it
/// and frees the key): the retry is answered `201` either way. In both cases the upstream ran
/// the request once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_right_after_sending_never_causes_a_second_run() {
    use tokio::io::AsyncWriteExt;
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &[]);
    let http = Http::default();
    let body = b"{\"amount\":7}";
    let send_and_leave = |key: &'static str| {
        let raw = format!(
            "POST /pay?delay_ms=300 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
             idempotency-key: {key}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let addr = proxy.addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(raw.as_bytes()).await.unwrap();
            s.write_all(body).await.unwrap();
            s.flush().await.unwrap();
            s
        }
    };
    // Closed after the upstream got it (its start is the signal).
    let s = send_and_leave("gone-late").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while up.state.started() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    drop(s);
    let retry = http
        .post(&proxy.url("/pay?delay_ms=300"), Some("gone-late"), body)
        .await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(retry.replayed(), "the retry is the replay: {retry:?}");
    assert_eq!(up.state.executions(), 1);
    // Closed at once.
    drop(send_and_leave("gone-early").await);
    let retry = http
        .post(&proxy.url("/pay?delay_ms=300"), Some("gone-early"), body)
        .await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    let again = http
        .post(&proxy.url("/pay?delay_ms=300"), Some("gone-early"), body)
        .await;
    assert!(again.replayed());
    assert_eq!(again.body, retry.body);
    assert_eq!(up.state.executions(), 2, "each key ran once");
}
