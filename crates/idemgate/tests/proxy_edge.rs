//! The HTTP edge through the real binary over real sockets: every request gets an answer when the
//! upstream is unreachable; upstream keep-alive races; slow and silent clients; connection,
//! concurrency and buffered-bytes caps; file descriptor pressure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Http, Proxy, Upstream, free_port, metric, until};
use http::{HeaderValue, Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

fn memory() -> &'static str {
    "memory://"
}

/// A problem answer names the cause class and nothing internal.
fn assert_clean_problem(a: &common::Answer, port: u16) {
    let body = String::from_utf8_lossy(&a.body);
    for leak in [
        "127.0.0.1",
        &port.to_string(),
        "os error",
        "client error",
        "tcp connect",
        "hyper",
    ] {
        assert!(!body.contains(leak), "the answer leaks {leak:?}: {body}");
    }
}

fn warn_lines(proxy: &Proxy, needle: &str) -> Vec<String> {
    proxy
        .logs
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("WARN") && l.contains(needle))
        .cloned()
        .collect()
}

// ---- 1. Every request gets an answer ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_gets_every_request_a_502_naming_the_cause() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let proxy = Proxy::start(&url, memory(), &[]);
    let http = Http::default();
    let key = |k: &'static str| ("idempotency-key", HeaderValue::from_static(k));
    let answers = [
        // Passed through: no key, or a method not covered (PUT), or GET.
        http.get(&proxy.url("/anything")).await,
        http.post(&proxy.url("/pay"), None, b"{}").await,
        http.send(Method::PUT, &proxy.url("/pay"), &[key("put")], b"{}")
            .await,
        // Protected.
        http.post(&proxy.url("/pay"), Some("down"), b"{}").await,
    ];
    for a in &answers {
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{a:?}");
        assert_eq!(
            a.problem_type(),
            "urn:idemgate:problem:upstream-unavailable"
        );
        assert_eq!(a.json()["cause"], "connection-refused");
        assert!(
            a.json()["detail"]
                .as_str()
                .unwrap()
                .contains("connection refused")
        );
        assert_clean_problem(a, port);
    }
    // A WARN names the upstream and the error.
    let warns = warn_lines(&proxy, "upstream request failed");
    assert!(!warns.is_empty(), "no warning logged");
    assert!(warns[0].contains(&format!("127.0.0.1:{port}")), "{warns:?}");
    assert!(warns[0].contains("connection-refused"), "{warns:?}");
    // The protected request was not sent: its key was released, so the retry runs.
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
async fn dns_failures_and_connect_timeouts_are_named_too() {
    let http = Http::default();
    // `.invalid` never resolves (RFC 6761).
    let proxy = Proxy::start("http://idemgate-test.invalid:80", memory(), &[]);
    for key in [None, Some("dns")] {
        let a = http.post(&proxy.url("/pay"), key, b"{}").await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            a.problem_type(),
            "urn:idemgate:problem:upstream-unavailable"
        );
        assert_eq!(a.json()["cause"], "dns-failure");
    }
    drop(proxy);

    // A listener whose accept queue is full and that never accepts: connection attempts hang.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    let proxy = Proxy::start(
        &format!("http://{addr}"),
        memory(),
        &["--connect-timeout", "1s"],
    );
    for key in [None, Some("slow-connect")] {
        let a = http.post(&proxy.url("/pay"), key, b"{}").await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            a.problem_type(),
            "urn:idemgate:problem:upstream-unavailable"
        );
        assert_eq!(a.json()["cause"], "connect-timeout");
        assert_clean_problem(&a, addr.port());
    }
    drop(listener);
}

/// An upstream that reads each request and resets the connection instead of answering.
async fn resetting_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_the_request_was_sent_is_named_and_never_released() {
    let (addr, task) = resetting_upstream().await;
    let proxy = Proxy::start(&format!("http://{addr}"), memory(), &[]);
    let http = Http::default();
    let passed = http.post(&proxy.url("/pay"), None, b"{}").await;
    assert_eq!(passed.status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        passed.problem_type(),
        "urn:idemgate:problem:upstream-failed"
    );
    assert_eq!(passed.json()["cause"], "connection-reset");
    assert_clean_problem(&passed, addr.port());
    for _ in 0..2 {
        let keyed = http.post(&proxy.url("/pay"), Some("reset"), b"{}").await;
        assert_eq!(keyed.status, StatusCode::BAD_GATEWAY);
        assert_eq!(keyed.problem_type(), "urn:idemgate:problem:outcome-unknown");
        assert_clean_problem(&keyed, addr.port());
    }
    task.abort();
}

// ---- 2. The keep-alive race (G3) -----------------------------------------------------------

/// A small HTTP/1.1 upstream that behaves like gunicorn/uvicorn/Node: it closes a connection
/// that stays idle for `idle`. Having decided to close, it reads nothing more and closes a few
/// milliseconds later (an event loop's latency): a request written in that window is never
/// processed, and the connection is reset under it. Counts executions per idempotency key.
struct IdleCloser {
    addr: std::net::SocketAddr,
    executions: Arc<Mutex<HashMap<String, usize>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl IdleCloser {
    async fn start(idle: Duration, keep_alive_header: Option<&'static str>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let executions = Arc::new(Mutex::new(HashMap::new()));
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (ex, conns) = (executions.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(Self::serve(s, idle, keep_alive_header, ex.clone()));
            }
        });
        Self {
            addr,
            executions,
            connections,
            task,
        }
    }

    async fn serve(
        mut s: TcpStream,
        idle: Duration,
        keep_alive_header: Option<&'static str>,
        executions: Arc<Mutex<HashMap<String, usize>>>,
    ) {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 65536];
        loop {
            let head_end = loop {
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break p + 4;
                }
                let read = if buf.is_empty() {
                    match timeout(idle, s.read(&mut chunk)).await {
                        Ok(r) => r,
                        Err(_) => {
                            // Idle: close, a little late.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            return;
                        }
                    }
                } else {
                    s.read(&mut chunk).await
                };
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let header = |name: &str| {
                head.lines().find_map(|l| {
                    l.strip_prefix(&format!("{name}:"))
                        .map(|v| v.trim().to_owned())
                })
            };
            let length: usize = header("content-length").map_or(0, |v| v.parse().unwrap());
            let key = header("idempotency-key").unwrap_or_default();
            while buf.len() < head_end + length {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..head_end + length);
            let n = {
                let mut ex = executions.lock().unwrap();
                let n = ex.entry(key.clone()).or_insert(0);
                *n += 1;
                *n
            };
            let body = format!("{{\"key\":\"{key}\",\"executions\":{n}}}");
            let extra = keep_alive_header.map_or(String::new(), |v| format!("keep-alive: {v}\r\n"));
            let res = format!(
                "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n{extra}content-length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(res.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for IdleCloser {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keyed requests spaced around the upstream's idle timeout: every one gets its 201, and every
/// one ran exactly once.
async fn no_request_is_lost_to_idle_closes(up: &IdleCloser, proxy: &Proxy) {
    let http = Http::default();
    let gaps = [1000, 200, 1000, 1000, 200, 1000, 200, 1000, 1000, 1000];
    for (i, gap) in gaps.iter().enumerate() {
        // Pacing, not synchronisation: the point is the upstream connection sitting idle.
        tokio::time::sleep(Duration::from_millis(*gap)).await;
        let key = format!("ka-{i}");
        let a = http.post(&proxy.url("/pay"), Some(&key), b"{}").await;
        assert_eq!(
            a.status,
            StatusCode::CREATED,
            "request {i} after {gap} ms idle: {a:?}"
        );
    }
    let ex = up.executions.lock().unwrap().clone();
    for i in 0..gaps.len() {
        assert_eq!(ex.get(&format!("ka-{i}")), Some(&1), "{ex:?}");
    }
    assert_eq!(ex.len(), gaps.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_idle_connections_after_a_second_loses_no_request() {
    let up = IdleCloser::start(Duration::from_secs(1), None).await;
    // Default settings.
    let proxy = Proxy::start(&up.url(), memory(), &["--workers", "1"]);
    no_request_is_lost_to_idle_closes(&up, &proxy).await;
    // The 200 ms gaps reused connections.
    let conns = up.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(conns < 10, "{conns} connections for 10 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_timeout_header_is_honoured() {
    let up = IdleCloser::start(Duration::from_secs(1), Some("timeout=1, max=100")).await;
    // Configured far longer than the upstream keeps connections: the header wins.
    let proxy = Proxy::start(
        &up.url(),
        memory(),
        &["--workers", "1", "--upstream-idle-timeout", "30s"],
    );
    no_request_is_lost_to_idle_closes(&up, &proxy).await;
}

// ---- 3. Slow and silent clients, caps ---------------------------------------------------------

/// Reads until the peer closes (`true`), or gives up at `deadline` (`false`).
async fn closed_by_peer(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_requests_and_idle_connections_are_closed() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &["--header-read-timeout", "1s"]);
    let mut socks = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        if i % 2 == 0 {
            // Half a request head, then nothing.
            s.write_all(b"POST /pay HTTP/1.1\r\nhost: x\r\ncontent-le")
                .await
                .unwrap();
        } else if i % 3 == 0 {
            // Half of the HTTP/2 preface.
            s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        } // else: nothing at all
        socks.push(s);
    }
    // A keep-alive connection that served a request and then stays idle.
    let mut idle = TcpStream::connect(proxy.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    socks.push(idle);
    let deadline = Instant::now() + Duration::from_secs(20);
    let closed =
        futures_util::future::join_all(socks.iter_mut().map(|s| closed_by_peer(s, deadline))).await;
    let open = closed.iter().filter(|c| !**c).count();
    assert_eq!(open, 0, "{open} connections still open");
    let timeouts = metric(
        &Http::default(),
        &proxy,
        "idemgate_limit_rejections_total",
        "reason=\"header_read_timeout\"",
    )
    .await;
    assert!(timeouts >= 300.0, "{timeouts}");
    // Service goes on.
    let ok = Http::default()
        .post(&proxy.url("/pay"), Some("after"), b"{}")
        .await;
    assert_eq!(ok.status, StatusCode::CREATED);
}

/// A raw request: head (with `extra` headers) and the first `sent` bytes of a body of `length`.
async fn partial_post(proxy: &Proxy, extra: &str, length: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /pay HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}content-length: {length}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    s.write_all(&vec![b' '; sent]).await.unwrap();
    s
}

async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_gets_408_and_claims_nothing() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &["--body-read-timeout", "1s"]);
    for extra in ["idempotency-key: slow-body\r\n", ""] {
        let mut s = partial_post(&proxy, extra, 100, 10).await;
        let out = read_all(&mut s).await;
        assert!(out.starts_with("HTTP/1.1 408"), "{out}");
        assert!(
            out.contains("urn:idemgate:problem:request-timeout"),
            "{out}"
        );
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{out}"
        );
    }
    // The keyed request claimed nothing: the same key with its whole body runs now.
    let http = Http::default();
    let ok = http
        .post(&proxy.url("/pay"), Some("slow-body"), vec![b' '; 100])
        .await;
    assert_eq!(ok.status, StatusCode::CREATED);
    assert!(!ok.replayed());
    assert_eq!(up.state.executions_of("slow-body"), 1);
    let timeouts = metric(
        &http,
        &proxy,
        "idemgate_limit_rejections_total",
        "reason=\"body_read_timeout\"",
    )
    .await;
    assert_eq!(timeouts, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_503_with_retry_after() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &["--max-connections", "3"]);
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        open.push(s);
    }
    let mut over = TcpStream::connect(proxy.addr).await.unwrap();
    over.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let out = read_all(&mut over).await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains("retry-after: 1"), "{out}");
    assert!(out.contains("urn:idemgate:problem:overloaded"), "{out}");
    assert!(out.contains("max_connections"), "{out}");
    // One closes: a new connection is served again (the slot frees when the proxy sees it).
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let out = read_all(&mut s).await;
        if out.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "never served again: {out}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let shed = metric(
        &Http::default(),
        &proxy,
        "idemgate_limit_rejections_total",
        "reason=\"max_connections\"",
    )
    .await;
    assert!(shed >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_requests_over_the_concurrency_cap_get_503_with_retry_after() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), memory(), &["--max-concurrent-requests", "2"]);
    let http = Http::default();
    let a = http.spawn_post(proxy.url("/pay?hold=1"), "c-1");
    let b = http.spawn_post(proxy.url("/pay?hold=1"), "c-2");
    until(10, "two requests held upstream", || up.state.held() == 2).await;
    let third = http.post(&proxy.url("/pay"), Some("c-3"), b"{}").await;
    assert_eq!(third.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(third.problem_type(), "urn:idemgate:problem:overloaded");
    assert_eq!(third.headers["retry-after"], "1");
    assert_eq!(third.json()["limit"], "max_concurrent_requests");
    // Unprotected requests are not counted.
    assert_eq!(http.get(&proxy.url("/")).await.status, StatusCode::OK);
    up.state.release_held();
    assert_eq!(a.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(b.await.unwrap().status, StatusCode::CREATED);
    let again = http.post(&proxy.url("/pay"), Some("c-3"), b"{}").await;
    assert_eq!(again.status, StatusCode::CREATED, "c-3 was never claimed");
    assert_eq!(up.state.executions_of("c-3"), 1);
    let shed = metric(
        &http,
        &proxy,
        "idemgate_limit_rejections_total",
        "reason=\"max_concurrent_requests\"",
    )
    .await;
    assert_eq!(shed, 1.0);
}

// ---- 5. Memory: buffered body bytes -----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_request_bodies_are_capped_with_503_and_retry_after() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(
        &up.url(),
        memory(),
        &["--max-buffered-body-bytes", "16MiB", "--workers", "2"],
    );
    let http = Http::default();
    let body = Arc::new(vec![b' '; 4 << 20]);
    // Eight 4 MiB uploads to an upstream that holds them: four fit in 16 MiB.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (http, url, body) = (http.clone(), proxy.url("/pay?hold=1"), body.clone());
            tokio::spawn(async move {
                http.post(&url, Some(&format!("big-{i}")), body.as_slice())
                    .await
            })
        })
        .collect();
    until(30, "four uploads held upstream", || up.state.held() == 4).await;
    // The others were refused at once (none waits for memory): their answers are all in.
    let deadline = Instant::now() + Duration::from_secs(30);
    while tasks.iter().filter(|t| t.is_finished()).count() < 4 {
        assert!(Instant::now() < deadline, "the refused uploads hang");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    up.state.release_held();
    let mut statuses = Vec::new();
    for t in tasks {
        let a = timeout(Duration::from_secs(30), t)
            .await
            .expect("an upload hangs")
            .unwrap();
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(a.problem_type(), "urn:idemgate:problem:overloaded");
            assert_eq!(a.headers["retry-after"], "1");
            assert_eq!(a.json()["limit"], "max_buffered_body_bytes");
        }
        statuses.push(a.status);
    }
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert_eq!((created, refused), (4, 4), "{statuses:?}");
    assert_eq!(up.state.executions(), 4);
    let shed = metric(
        &http,
        &proxy,
        "idemgate_limit_rejections_total",
        "reason=\"max_buffered_body_bytes\"",
    )
    .await;
    assert_eq!(shed, 4.0);
}

// ---- 4. File descriptors ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_fd_limit_is_raised_to_the_hard_limit() {
    let up = Upstream::start().await;
    let hard = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_owned();
    if hard == "unlimited" || hard.parse::<u64>().unwrap() <= 256 {
        eprintln!("hard limit {hard}: nothing to raise here");
        return;
    }
    let proxy = Proxy::start_in_shell(&up.url(), memory(), &[], "ulimit -Sn 256");
    let logs = proxy.logs.lock().unwrap().join("\n");
    assert!(
        logs.contains("raised the file descriptor limit")
            && logs.contains(&format!("fd_limit={hard}"))
            && logs.contains("was=256"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_proxy_backs_off_and_recovers() {
    let up = Upstream::start().await;
    let proxy = Proxy::start_in_shell(
        &up.url(),
        memory(),
        &["--header-read-timeout", "1s", "--workers", "1"],
        "ulimit -n 64",
    );
    let started = Instant::now();
    // More silent connections than 64 descriptors allow.
    let mut socks = Vec::new();
    for _ in 0..150 {
        socks.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // The accepted ones are closed by the header read timeout, which frees descriptors for the
    // ones waiting in the listen backlog, which are then closed in turn.
    let deadline = Instant::now() + Duration::from_secs(60);
    let closed =
        futures_util::future::join_all(socks.iter_mut().map(|s| closed_by_peer(s, deadline))).await;
    assert!(
        closed.iter().all(|c| *c),
        "some connections were never closed"
    );
    let ok = Http::default()
        .post(&proxy.url("/pay"), Some("fd"), b"{}")
        .await;
    assert_eq!(ok.status, StatusCode::CREATED);
    // It did run out, and said so without a flood: at most about one line a second.
    let elapsed = started.elapsed().as_secs_f64();
    let lines = warn_lines(&proxy, "accept failed").len() as f64;
    assert!(lines >= 1.0, "never ran out of descriptors?");
    assert!(lines <= elapsed + 2.0, "{lines} lines in {elapsed:.1} s");
}
