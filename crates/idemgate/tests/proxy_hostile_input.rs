//! Hostile input through the real binary over raw sockets (RELIABILITY.md scenarios 33 and 34):
//! keys built to break a store or a header, and the request-smuggling corpus. Requests reaching
//! the upstream must equal requests the proxy accepted; nothing smuggled may reach it; no store
//! error may follow.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{Http, Proxy, Upstream, metric};
use http::{HeaderValue, Method, StatusCode};

/// Sends `raw` on a fresh connection and reads until the proxy closes it (bounded); returns the
/// status codes of every answer on the wire, in order.
fn exchange(proxy: &Proxy, raw: &[u8]) -> Vec<u16> {
    // `connection: close` on the outer request: the proxy closes after its answer (a half-close
    // from this side would read as a client gone away).
    let text =
        String::from_utf8_lossy(raw).replacen("host: x\r\n", "host: x\r\nconnection: close\r\n", 1);
    let mut sock = std::net::TcpStream::connect(proxy.addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The proxy may answer and close before reading all of it: ignore write errors.
    let _ = sock.write_all(text.as_bytes());
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// Keys that are hostile to stores or logs but well-formed are ordinary keys (the store key is a
/// hash, so `{}` cannot pick a Redis Cluster slot and `*` cannot widen a SCAN); malformed ones
/// are `400` before any store access. No store error either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_are_refused_or_hashed_and_never_reach_the_store_raw() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    let mut executed = 0;
    for key in [
        "{}",
        "*",
        "{slot}x",
        "a*b?c[d]",
        "%00",
        "\\\"quoted\\\"",
        "${jndi:x}",
    ] {
        let res = http.post(&proxy.url("/pay"), Some(key), b"{}").await;
        assert_eq!(res.status, StatusCode::CREATED, "{key}");
        executed += 1;
        let again = http.post(&proxy.url("/pay"), Some(key), b"{}").await;
        assert!(again.replayed(), "{key}");
    }
    let long = "k".repeat(10 * 1024);
    let refused: Vec<HeaderValue> = vec![
        HeaderValue::from_str(&long).unwrap(),
        HeaderValue::from_bytes(b"nul\x00inside").unwrap_or(HeaderValue::from_static("x x")),
        HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        HeaderValue::from_static("\"\""),
        HeaderValue::from_static("\"a\\b\""),
        HeaderValue::from_static("a b"),
    ];
    for value in refused {
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
        let detail = res.json()["detail"].as_str().unwrap().to_owned();
        assert!(detail.len() < 512, "the key is not echoed back: {detail}");
    }
    // Raw bytes a client library would refuse to send: CR inside a value, a NUL.
    for raw in [
        &b"POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: a\rb\r\ncontent-length: 2\r\n\r\n{}"[..],
        b"POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: a\x00b\r\ncontent-length: 2\r\n\r\n{}",
    ] {
        let statuses = exchange(&proxy, raw);
        assert!(
            statuses.iter().all(|s| *s == 400),
            "{:?}: {statuses:?}",
            String::from_utf8_lossy(raw)
        );
    }
    // A bare LF ends a header line (RFC 9112 lets a recipient accept it): this is key `lf` and
    // a separate header, one ordinary request — nothing is injected into the key.
    let statuses = exchange(
        &proxy,
        b"POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: lf\nx-evil: 1\r\ncontent-length: 2\r\n\r\n{}",
    );
    assert_eq!(statuses, [201]);
    executed += 1;
    assert_eq!(up.state.executions_of("lf"), 1);
    assert_eq!(
        up.state.started(),
        executed,
        "only well-formed keys ran, once each"
    );
    let errors = metric(&http, &proxy, "idemgate_store_errors_total", "").await;
    assert_eq!(errors, 0.0, "no store error");
}

/// The smuggling corpus: every ambiguous framing is refused, or read as exactly one request;
/// the request hidden inside never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smuggling_corpus_never_desyncs_the_upstream() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    // Each payload hides a second request keyed "smuggled" in what the proxy should read as
    // body (or refuse outright).
    let hidden =
        "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: smuggled\r\ncontent-length: 2\r\n\r\n{}";
    let corpus: Vec<(&str, String)> = vec![
        (
            "CL.TE",
            format!(
                "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: cl-te\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"
            ),
        ),
        (
            "TE.CL",
            format!(
                "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: te-cl\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n",
                hidden.len()
            ),
        ),
        (
            "duplicate CL",
            format!(
                "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: dup-cl\r\ncontent-length: 2\r\ncontent-length: {}\r\n\r\n{{}}{hidden}",
                2 + hidden.len()
            ),
        ),
        (
            "CL: +N",
            format!(
                "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: plus-cl\r\ncontent-length: +{}\r\n\r\n{{}}{hidden}",
                2 + hidden.len()
            ),
        ),
        (
            "TE: chunked, chunked",
            format!(
                "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: te-te\r\ntransfer-encoding: chunked, chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n{hidden}"
            ),
        ),
        (
            "chunk-size overflow",
            format!(
                "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: overflow\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffffff2\r\n{{}}\r\n0\r\n\r\n{hidden}"
            ),
        ),
        (
            "obs-fold",
            format!(
                "POST /pay HTTP/1.1\r\nhost: x\r\nidempotency-key: folded\r\ntransfer-encoding:\r\n chunked\r\ncontent-length: 2\r\n\r\n{{}}{hidden}"
            ),
        ),
    ];
    let mut accepted = 0;
    for (name, raw) in &corpus {
        let before = up.state.started();
        let statuses = exchange(&proxy, raw.as_bytes());
        let ran = up.state.started() - before;
        let forwarded = statuses.iter().filter(|s| **s < 400).count();
        accepted += forwarded;
        assert_eq!(
            ran, forwarded,
            "{name}: the upstream ran {ran} requests for {statuses:?}"
        );
        assert!(forwarded <= 1, "{name}: read as two requests: {statuses:?}");
        assert_eq!(
            up.state.executions_of("smuggled"),
            0,
            "{name}: the hidden request reached the upstream"
        );
    }
    assert_eq!(up.state.started(), accepted);
}
