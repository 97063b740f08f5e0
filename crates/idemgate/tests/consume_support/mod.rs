//! Harness of the `idemgate consume` tests: a recording HTTP handler in this process, the real
//! binary as a child process, and the checks of the proof (executions per epoch ≤ 1, every
//! message delivered).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;

/// One POST the handler received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub key: String,
    pub epoch: u64,
    pub subject: String,
    pub content_type: String,
    pub delivery: u32,
    pub body: Bytes,
}

#[derive(Clone, Default)]
struct HandlerState {
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// The HTTP handler messages are POSTed to. What it does depends on the body:
/// `status:CODE:N` answers CODE to the first N POSTs of a key (then 201); `sleep:MS` answers
/// after MS milliseconds; anything else answers 201 at once. Every POST is logged before it
/// answers (the effect).
pub struct Handler {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

async fn receive(
    State(state): State<HandlerState>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let seen = Seen {
        key: h("idempotency-key"),
        epoch: h("idempotency-epoch").parse().unwrap_or(0),
        subject: h("x-idemgate-subject"),
        content_type: h("content-type"),
        delivery: h("x-idemgate-delivery").parse().unwrap_or(0),
        body: body.clone(),
    };
    let key = seen.key.clone();
    let before = {
        let mut log = state.seen.lock().unwrap();
        let before = log.iter().filter(|s| s.key == key).count();
        log.push(seen);
        before
    };
    let text = String::from_utf8_lossy(&body).into_owned();
    let mut parts = text.split(':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("status"), Some(code), Some(n)) if before < n.parse::<usize>().unwrap_or(0) => {
            let code = StatusCode::from_u16(code.parse().unwrap()).unwrap();
            (code, "not now".into())
        }
        (Some("sleep"), Some(ms), _) => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            (StatusCode::CREATED, format!("slept for {key}"))
        }
        _ => (StatusCode::CREATED, format!("done {key}")),
    }
}

impl Handler {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = HandlerState::default();
        let seen = state.seen.clone();
        let app = Router::new().route("/msg", post(receive)).with_state(state);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self { addr, seen, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/msg", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn distinct_keys(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.key.clone())
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Waits until `n` distinct keys were POSTed, at most `secs`.
    pub async fn until_distinct(&self, n: usize, secs: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while self.distinct_keys() < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out: {} of {n} messages reached the handler",
                self.distinct_keys()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the proof checks and reports.
#[derive(Debug, Default)]
pub struct Tally {
    /// POSTs received.
    pub posts: usize,
    /// Distinct keys POSTed.
    pub distinct: usize,
    /// `(key, epoch)` pairs POSTed more than once: must be 0.
    pub same_epoch_twice: usize,
    /// Keys POSTed at more than one epoch (re-executions after a takeover).
    pub reexecuted_keys: usize,
}

/// Tallies the handler's log.
pub fn tally(seen: &[Seen]) -> Tally {
    let mut per: HashMap<(String, u64), usize> = HashMap::new();
    let mut epochs: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for s in seen {
        *per.entry((s.key.clone(), s.epoch)).or_default() += 1;
        epochs.entry(s.key.clone()).or_default().insert(s.epoch);
    }
    Tally {
        posts: seen.len(),
        distinct: epochs.len(),
        same_epoch_twice: per.values().filter(|n| **n > 1).count(),
        reexecuted_keys: epochs.values().filter(|e| e.len() > 1).count(),
    }
}

/// `idemgate consume` as a child process.
pub struct Consumer {
    pub child: Child,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Consumer {
    /// Starts `idemgate consume ARGS --admin-listen …` and waits until it logs that it
    /// consumes.
    pub fn start(args: &[&str]) -> Self {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let bin = std::env::var("IDEMGATE_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_idemgate").to_owned());
        let mut child = Command::new(bin)
            .arg("consume")
            .args(args)
            .args(["--admin-listen", &admin.to_string()])
            .env("IDEMGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn idemgate consume");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[consume] {line}");
                sink.lock().unwrap().push(line.clone());
                if line.contains("consuming from")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("idemgate consume did not start: {:?}", logs.lock().unwrap());
        }
        Self { child, admin, logs }
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then waits for the exit; true when it exited with success.
    pub fn sigterm_and_wait(&mut self) -> bool {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap().success()
    }

    /// The value of `idemgate_consume_messages_total{outcome="NAME"}`.
    pub async fn counter(&self, outcome: &str) -> u64 {
        let text = get(&format!("http://{}/metrics", self.admin)).await;
        let needle = format!("idemgate_consume_messages_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no counter {outcome} in {text}"))
    }

    /// Waits until every `(outcome, value)` counter has its value, at most `secs`.
    pub async fn until_counters(&self, want: &[(&str, u64)], secs: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let mut got = Vec::new();
            for (name, _) in want {
                got.push(self.counter(name).await);
            }
            if want.iter().zip(&got).all(|((_, w), g)| w == g) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "counters {got:?}, waiting for {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Messages this consumer holds (taken, not yet acked or handed back).
    pub async fn held(&self) -> u64 {
        let text = get(&format!("http://{}/metrics", self.admin)).await;
        text.lines()
            .find_map(|l| l.strip_prefix("idemgate_consume_messages_held "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no held gauge in {text}"))
    }

    pub async fn get(&self, path: &str) -> String {
        get(&format!("http://{}{path}", self.admin)).await
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain GET over loopback; the body as text.
pub async fn get(url: &str) -> String {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// A name no other run uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// The proof's size: `IDEMGATE_PROOF_MESSAGES` distinct messages (default `small`) and
/// `IDEMGATE_PROOF_KILLS` SIGKILLs (default `kills`).
pub fn proof_size(small: usize, kills: usize) -> (usize, usize) {
    let var = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (
        var("IDEMGATE_PROOF_MESSAGES", small),
        var("IDEMGATE_PROOF_KILLS", kills),
    )
}

/// The store URLs the proof runs `consume` on: the embedded store always, Redis and PostgreSQL
/// when their variables are set (under CI they must be).
pub fn proof_stores(dir: &std::path::Path) -> Vec<String> {
    let mut stores = vec![format!("file:{}", dir.display())];
    for var in ["IDEMGATE_TEST_REDIS_URL", "IDEMGATE_TEST_POSTGRES_URL"] {
        if let Some(url) = idemgate_core::testkit::server_url(var) {
            stores.push(url);
        }
    }
    stores
}
