//! Test harness: a counting upstream in this process, `idemgate serve` as a child process, and a
//! small HTTP client. Everything talks over real loopback sockets.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

#[allow(unused_imports)] // not every test file needs it
pub use idemgate_core::testkit::server_url;
pub use idemgate_demo_upstream::Upstream as UpstreamState;

/// The demo upstream, serving in this process.
pub struct Upstream {
    pub state: UpstreamState,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::on(listener)
    }

    pub fn on(listener: tokio::net::TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = UpstreamState::default();
        let task = tokio::spawn(state.clone().serve(listener));
        Self { state, addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `PREFIX-PID-NANOS`: a name no other run of the tests uses (keys and namespaces on a shared
/// store outlive a run).
pub fn unique(prefix: &str) -> &'static str {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    Box::leak(format!("{prefix}-{}-{nanos}", std::process::id()).into_boxed_str())
}

/// A config file holding `text`, and its path (the file lives as long as the directory).
pub fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("idemgate.toml");
    std::fs::write(&path, text).unwrap();
    let path = path.to_str().unwrap().to_owned();
    (dir, path)
}

/// The namespace the tests' instances use on Redis and PostgreSQL.
pub const TEST_NAMESPACE: &str = "idemgate-tests";

/// Whether `idemgate serve` counts `store` as shared (and so needs an explicit namespace).
pub fn shared_store(store: &str) -> bool {
    store.starts_with("redis") || store.starts_with("postgres") || store.starts_with("dynamodb")
}

/// Fake AWS credentials for the DynamoDB test server (moto takes any), given to every child
/// process on a `dynamodb://` store; instance metadata is switched off so that nothing ever
/// looks for credentials off this machine.
pub const TEST_AWS_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

fn aws_env(store: &str) -> &'static [(&'static str, &'static str)] {
    if store.starts_with("dynamodb://") {
        &TEST_AWS_ENV
    } else {
        &[]
    }
}

/// Extra `serve` flags for `store`: on the DynamoDB test server a 30 s lease and a 9 s store
/// deadline (under a third of the lease, as every deadline must be). moto answers one request at
/// a time from Python (~5 ms of CPU each on these two cores), so while other tests run beside it
/// its queue can hold a request past the default 3 s deadline — moto's speed, not the store's.
pub fn slow_store_args(store: &str) -> &'static [&'static str] {
    if store.starts_with("dynamodb://") {
        &["--lease-ttl", "30s", "--store-timeout", "9s"]
    } else {
        &[]
    }
}

/// `idemgate create-table --store STORE` with the test credentials; its output, or its error
/// output as `Err`.
pub fn create_table(store: &str) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args(["create-table", "--store", store])
        .envs(TEST_AWS_ENV)
        .stdin(Stdio::null())
        .output()
        .expect("run idemgate create-table");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A `dynamodb://` store URL on the test server (`IDEMGATE_TEST_DYNAMODB_URL`, an endpoint such
/// as moto's `http://127.0.0.1:7201`) with a table of this test's own, not created yet.
pub fn dynamodb_url(purpose: &str) -> Option<String> {
    let endpoint = server_url("IDEMGATE_TEST_DYNAMODB_URL")?;
    Some(format!(
        "dynamodb://{}?region=us-east-1&endpoint={endpoint}",
        unique(&format!("idemgate-{purpose}"))
    ))
}

/// Like [`dynamodb_url`], with the table created (through `idemgate create-table`).
pub fn dynamodb_store(purpose: &str) -> Option<String> {
    let url = dynamodb_url(purpose)?;
    let done = create_table(&url).expect("idemgate create-table");
    assert!(done.contains("created"), "{done}");
    Some(url)
}

/// `idemgate serve` as a child process.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Every line the process wrote to stderr so far.
    pub logs: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proxy {
    /// Starts the proxy with `args` after `serve`, on fresh ports, and waits until it logs that it
    /// listens. On a shared store (Redis, PostgreSQL), which refuses to start without a namespace,
    /// the namespace is [`TEST_NAMESPACE`] unless `args` or the environment set one.
    pub fn start(upstream: &str, store: &str, args: &[&str]) -> Self {
        Self::start_with_env(upstream, store, args, &[])
    }

    /// Like [`Proxy::start`], with extra environment variables.
    pub fn start_with_env(
        upstream: &str,
        store: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        // A port picked free can be taken by someone else before the child binds it: try again
        // with fresh ports when that is why it stopped.
        for _ in 0..5 {
            if let Some(proxy) = Self::try_start(upstream, store, args, env) {
                return proxy;
            }
        }
        panic!("idemgate could not bind free ports five times");
    }

    /// Like [`Proxy::start`], run by `sh -c "PREFIX; exec idemgate ..."` (e.g. `ulimit -n 64`).
    pub fn start_in_shell(upstream: &str, store: &str, args: &[&str], prefix: &str) -> Self {
        for _ in 0..5 {
            if let Some(proxy) = Self::try_start_in(upstream, store, args, &[], Some(prefix)) {
                return proxy;
            }
        }
        panic!("idemgate could not bind free ports five times");
    }

    fn try_start(upstream: &str, store: &str, args: &[&str], env: &[(&str, &str)]) -> Option<Self> {
        Self::try_start_in(upstream, store, args, env, None)
    }

    fn try_start_in(
        upstream: &str,
        store: &str,
        args: &[&str],
        env: &[(&str, &str)],
        shell_prefix: Option<&str>,
    ) -> Option<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        // IDEMGATE_TEST_BIN runs the tests against another build (e.g. to see a regression test
        // fail on the code before a fix).
        let bin = std::env::var("IDEMGATE_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_idemgate").to_owned());
        let mut command = match shell_prefix {
            None => Command::new(&bin),
            Some(prefix) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("{prefix}; exec \"$0\" \"$@\""))
                    .arg(&bin);
                c
            }
        };
        let mut child = command
            .arg("serve")
            .args(["--upstream", upstream, "--store", store])
            .args([
                "--listen",
                &addr.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .args(args)
            .env("IDEMGATE_LOG", "info")
            .envs(shared_store(store).then_some(("IDEMGATE_NAMESPACE", TEST_NAMESPACE)))
            .envs(aws_env(store).iter().copied())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn idemgate");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[idemgate] {line}");
                sink.lock().unwrap().push(line.clone());
                if line.contains("idemgate listening")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            let busy = logs
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("Address already in use"));
            assert!(busy, "idemgate did not start listening");
            return None;
        }
        Some(Self {
            child,
            addr,
            admin,
            logs,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM (graceful drain), sent with the `kill` command.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    /// The problem `type` of a problem+json answer.
    pub fn problem_type(&self) -> String {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "not a problem: {self:?}"
        );
        self.json()["type"].as_str().unwrap().to_owned()
    }
}

#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl Http {
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, HeaderValue)],
        body: impl AsRef<[u8]>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            req = req.header(*name, value.clone());
        }
        let res = self
            .client
            .request(
                req.body(Full::new(Bytes::copy_from_slice(body.as_ref())))
                    .unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("request to {url} failed: {e}"));
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// `POST url` with an `Idempotency-Key` (if given) and a JSON body.
    pub async fn post(&self, url: &str, key: Option<&str>, body: impl AsRef<[u8]>) -> Answer {
        let mut headers = vec![("content-type", HeaderValue::from_static("application/json"))];
        if let Some(k) = key {
            headers.push(("idempotency-key", HeaderValue::from_str(k).unwrap()));
        }
        self.send(Method::POST, url, &headers, body).await
    }

    /// A request whose connection is expected to break (its proxy gets killed): `None` then.
    pub fn spawn_doomed_post(
        &self,
        url: String,
        key: &'static str,
    ) -> tokio::task::JoinHandle<Option<StatusCode>> {
        let client = self.client.clone();
        tokio::spawn(async move {
            let req = Request::post(url)
                .header("idempotency-key", key)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            client.request(req).await.ok().map(|r| r.status())
        })
    }

    /// `post` in a task of its own (for a request that will be held upstream).
    pub fn spawn_post(&self, url: String, key: &'static str) -> tokio::task::JoinHandle<Answer> {
        let http = self.clone();
        tokio::spawn(async move { http.post(&url, Some(key), b"{}").await })
    }

    pub async fn get(&self, url: &str) -> Answer {
        self.send(Method::GET, url, &[], b"").await
    }
}

/// Sends `key` to `url` (a `hold=1` request) in a task of its own and returns once the upstream
/// is holding it: the key is then in flight.
pub async fn hold_first(
    http: &Http,
    up: &Upstream,
    url: String,
    key: &'static str,
) -> tokio::task::JoinHandle<Answer> {
    let first = http.spawn_post(url, key);
    until(10, "the first request to reach the upstream", || {
        up.state.held() == 1
    })
    .await;
    first
}

/// Waits until `cond` holds, checking every few milliseconds, for at most `secs` seconds.
pub async fn until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The value of a metric line (summing label sets that contain `labels`), from `/metrics`.
pub async fn metric(http: &Http, proxy: &Proxy, name: &str, labels: &str) -> f64 {
    let text = http.get(&proxy.admin_url("/metrics")).await.body;
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let rest = &l[name.len()..];
            (rest.starts_with('{') || rest.starts_with(' ')) && rest.contains(labels)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Once the store is back, the same idemgate process serves again (it reconnects on its own):
/// `key` is answered `503` until it is `201`, within `secs`; the upstream has then run exactly
/// `started` requests.
pub async fn resumes_without_restart(
    http: &Http,
    proxy: &Proxy,
    up: &Upstream,
    key: &str,
    secs: u64,
    started: usize,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let res = http.post(&proxy.url("/pay"), Some(key), b"{}").await;
        if res.status == StatusCode::CREATED {
            break;
        }
        assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE, "{res:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "service did not resume"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.state.started(), started);
}

/// The `idemgate` binary under test: `IDEMGATE_TEST_BIN` if set (another build), else cargo's.
pub fn bin() -> String {
    std::env::var("IDEMGATE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_idemgate").to_owned())
}
