//! The processes the harness drives from outside: `idemgate serve` instances and a private
//! `redis-server` or PostgreSQL cluster. Each is a child of the harness, signalled by its PID (`kill -STOP`,
//! `kill -CONT`, `kill -TERM`; SIGKILL through the child handle) and reaped; a child left over
//! when its handle is dropped is killed.

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// The `idemgate` binary: `$IDEMGATE_BIN`, else `idemgate` beside the running executable (or
/// one folder up, for a test binary in `target/<profile>/deps`), else
/// `target/release/idemgate` or `target/debug/idemgate` of this workspace.
pub fn idemgate_bin() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("IDEMGATE_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("idemgate");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    for profile in ["release", "debug"] {
        let candidate = target.join(profile).join("idemgate");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(
        "the idemgate binary was not found: build it (`cargo build -p idemgate`) or set \
         IDEMGATE_BIN"
            .to_owned(),
    )
}

/// A loopback port nobody listens on right now, chosen below Linux's ephemeral range
/// (32768–60999 by default): while an instance or the store is down, its port is free, and a
/// port the kernel hands out to any other process's `bind(0)` (a test server, a client socket)
/// could be taken meanwhile — the clients would then talk to a stranger.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Start at a place of this process's own, then walk.
    let seed = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = LOW + (seed + k) % SPAN;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Sends `signal` (e.g. `-STOP`) to `pid` with the `kill` command.
pub async fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args([signal, &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// How to run one instance.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    /// The binary.
    pub bin: PathBuf,
    /// Arguments after `serve --listen A --admin-listen B`.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Where its stderr is appended.
    pub log: PathBuf,
    /// The network namespace it runs in (`ip netns exec`), if not the harness's own.
    pub netns: Option<String>,
    /// The address it listens on (loopback unless in a namespace).
    pub ip: std::net::IpAddr,
}

impl InstanceSpec {
    /// A spec for the harness's own namespace, listening on loopback.
    pub fn local(bin: PathBuf, args: Vec<String>, log: PathBuf) -> Self {
        Self {
            bin,
            args,
            env: Vec::new(),
            log,
            netns: None,
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
        }
    }
}

/// `program` run in namespace `netns` (through `ip netns exec`, which execs it: the child's PID
/// is the program's), or as is.
fn command_in(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// One `idemgate serve` process (restartable).
#[derive(Debug)]
pub struct Instance {
    index: u32,
    spec: InstanceSpec,
    child: Option<Child>,
    pid: Option<u32>,
    addr: SocketAddr,
    admin: SocketAddr,
    paused: bool,
    terminating: bool,
    starts: u32,
    started_at: std::time::Instant,
    tail: Arc<Mutex<VecDeque<String>>>,
}

/// How long an instance may take to say it listens.
const START_BOUND: Duration = Duration::from_secs(30);
/// How long a private PostgreSQL may take to accept sessions after a crash: its WAL replay of
/// a soak's database takes long on a loaded machine, and killing it half-way only starts over.
const PG_START_BOUND: Duration = Duration::from_secs(180);

enum Started {
    Ready,
    PortBusy,
}

impl Instance {
    /// Starts instance `index` on fresh loopback ports and waits until it listens.
    pub async fn start(index: u32, spec: InstanceSpec) -> std::io::Result<Self> {
        let ip = spec.ip;
        let mut me = Self {
            index,
            spec,
            child: None,
            pid: None,
            addr: SocketAddr::new(ip, free_port()?),
            admin: SocketAddr::new(ip, free_port()?),
            paused: false,
            terminating: false,
            starts: 0,
            started_at: std::time::Instant::now(),
            tail: Arc::new(Mutex::new(VecDeque::new())),
        };
        me.spawn().await?;
        Ok(me)
    }

    /// How long its current process has been listening.
    pub fn uptime(&self) -> Duration {
        self.started_at.elapsed()
    }

    /// Its proxy address (it may change at a restart if the old port was taken meanwhile).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its admin address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// Its index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The PID of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Whether a process is running (paused or not).
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Whether it is stopped by SIGSTOP.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// How many times a process was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The last lines it wrote to stderr.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Starts the process on the current ports (fresh ones if those are taken), at most 5 tries.
    async fn spawn(&mut self) -> std::io::Result<()> {
        for _ in 0..5 {
            match self.spawn_once().await? {
                Started::Ready => return Ok(()),
                Started::PortBusy => {
                    self.addr = SocketAddr::new(self.spec.ip, free_port()?);
                    self.admin = SocketAddr::new(self.spec.ip, free_port()?);
                }
            }
        }
        Err(std::io::Error::other(format!(
            "instance {} could not bind a free port five times",
            self.index
        )))
    }

    async fn spawn_once(&mut self) -> std::io::Result<Started> {
        self.starts += 1;
        let mut child = command_in(self.spec.netns.as_deref(), &self.spec.bin)
            .arg("serve")
            .args(["--listen", &self.addr.to_string()])
            .args(["--admin-listen", &self.admin.to_string()])
            .args(&self.spec.args)
            .env("IDEMGATE_LOG", "info")
            // In a network namespace the admin listener is on the namespace's own address, off
            // loopback, where `serve` wants an admin token; these private test networks go
            // without (a variable, so that a build without the setting ignores it).
            .envs(
                (!self.admin.ip().is_loopback())
                    .then_some(("IDEMGATE_ADMIN_INSECURE_NO_AUTH", "true")),
            )
            .envs(self.spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| std::io::Error::other("no stderr"))?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.spec.log)?;
        let start_no = self.starts;
        let tail = self.tail.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(file, "[start {start_no}] {line}");
                {
                    let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                    if t.len() >= 50 {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                let event = if line.contains("idemgate listening") {
                    Some(Started::Ready)
                } else if line.contains("Address already in use") {
                    Some(Started::PortBusy)
                } else {
                    None
                };
                if let (Some(e), Some(_)) = (event, tx.as_ref())
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(e);
                }
            }
        });
        match tokio::time::timeout(START_BOUND, rx).await {
            Ok(Ok(Started::Ready)) => {
                self.pid = child.id();
                self.child = Some(child);
                self.started_at = std::time::Instant::now();
                self.paused = false;
                self.terminating = false;
                Ok(Started::Ready)
            }
            Ok(Ok(Started::PortBusy)) => {
                let _ = child.kill().await;
                Ok(Started::PortBusy)
            }
            other => {
                let _ = child.kill().await;
                let why = if other.is_err() {
                    "did not listen within 30 s"
                } else {
                    "exited before listening"
                };
                Err(std::io::Error::other(format!(
                    "instance {} {why}; last lines: {:?}",
                    self.index,
                    self.tail()
                )))
            }
        }
    }

    /// SIGKILL and reap. `false` if no process was running.
    pub async fn kill9(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        let _ = child.kill().await;
        self.pid = None;
        self.paused = false;
        self.terminating = false;
        true
    }

    /// SIGTERM (graceful drain), without waiting; [`Instance::restart`] waits for the exit.
    pub async fn sigterm(&mut self) -> bool {
        match self.pid {
            Some(pid) if !self.paused && !self.terminating => {
                self.terminating = signal(pid, "-TERM").await;
                self.terminating
            }
            _ => false,
        }
    }

    /// SIGTERM (graceful drain) and wait; SIGKILL if it has not exited within `within`.
    pub async fn terminate(&mut self, within: Duration) -> bool {
        let Some(pid) = self.pid else {
            return false;
        };
        if self.paused {
            signal(pid, "-CONT").await;
            self.paused = false;
        }
        if !self.terminating {
            signal(pid, "-TERM").await;
            self.terminating = true;
        }
        self.reap_terminated(within).await;
        true
    }

    /// Waits up to `within` for a terminating process to exit, then SIGKILLs it.
    async fn reap_terminated(&mut self, within: Duration) {
        if let Some(child) = self.child.as_mut()
            && tokio::time::timeout(within, child.wait()).await.is_ok()
        {
            self.child = None;
            self.pid = None;
            self.terminating = false;
            return;
        }
        self.kill9().await;
    }

    /// SIGSTOP. `false` if not running or already paused.
    pub async fn pause(&mut self) -> bool {
        match self.pid {
            Some(pid) if !self.paused => {
                self.paused = signal(pid, "-STOP").await;
                self.paused
            }
            _ => false,
        }
    }

    /// SIGCONT. `false` if not paused.
    pub async fn resume(&mut self) -> bool {
        match self.pid {
            Some(pid) if self.paused => {
                self.paused = false;
                signal(pid, "-CONT").await
            }
            _ => false,
        }
    }

    /// Starts a new process if none runs (same ports if they are free). A process draining
    /// after [`Instance::sigterm`] gets up to 5 s to exit first (then SIGKILL).
    pub async fn restart(&mut self) -> std::io::Result<bool> {
        if self.terminating {
            self.reap_terminated(Duration::from_secs(5)).await;
        }
        if self.child.is_some() {
            return Ok(false);
        }
        self.spawn().await?;
        Ok(true)
    }
}

/// A `redis-server` of the harness's own on a free loopback port, with
/// `appendonly yes, appendfsync always` (no acknowledged write is lost on a crash), its files in
/// a temporary folder. Killed when dropped.
#[derive(Debug)]
pub struct PrivateRedis {
    child: Option<Child>,
    port: u16,
    ip: std::net::Ipv4Addr,
    netns: Option<String>,
    dir: tempfile::TempDir,
}

impl PrivateRedis {
    /// Starts it and waits until it answers `PING`. Fails if `redis-server` is not on the
    /// `PATH`.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_in(None, std::net::Ipv4Addr::LOCALHOST).await
    }

    /// Like [`PrivateRedis::start`], in network namespace `netns` on address `ip`.
    pub async fn start_in(netns: Option<String>, ip: std::net::Ipv4Addr) -> std::io::Result<Self> {
        let mut me = Self {
            child: None,
            port: free_port()?,
            ip,
            netns,
            dir: tempfile::tempdir()?,
        };
        me.spawn().await?;
        Ok(me)
    }

    async fn spawn(&mut self) -> std::io::Result<()> {
        let child = command_in(self.netns.as_deref(), Path::new("redis-server"))
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                &self.ip.to_string(),
            ])
            // Reached from other namespaces, not from loopback: no protected mode.
            .args(["--protected-mode", "no"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + START_BOUND;
        loop {
            if ping(self.addr()).await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(std::io::Error::other("redis-server did not answer PING"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    /// Its PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGKILL and reap.
    pub async fn kill9(&mut self) -> bool {
        match self.child.take() {
            Some(mut c) => {
                let _ = c.kill().await;
                true
            }
            None => false,
        }
    }

    /// Starts it again on the same port and folder (it replays its append-only file).
    pub async fn restart(&mut self) -> std::io::Result<bool> {
        if self.child.is_some() {
            return Ok(false);
        }
        self.spawn().await?;
        Ok(true)
    }
}

/// A private PostgreSQL cluster (`initdb` into a temporary folder, run as the `postgres` user,
/// `fsync` and `synchronous_commit` on), for the faults the machine's shared server must not
/// suffer: SIGKILL of the postmaster and all its children at once (a process crash: the
/// kernel's page cache survives, so this does not test `fsync`), then a restart that replays the
/// WAL. Killed when dropped.
#[derive(Debug)]
pub struct PrivatePostgres {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    uid: u32,
    gid: u32,
    dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// Creates the cluster and starts it. Fails without PostgreSQL's server binaries
    /// (`/usr/lib/postgresql/*/bin`) or a `postgres` user.
    pub async fn start() -> std::io::Result<Self> {
        let bin = postgres_bindir()
            .ok_or_else(|| std::io::Error::other("no /usr/lib/postgresql/*/bin/postgres"))?;
        let (uid, gid) = user_ids("postgres")
            .ok_or_else(|| std::io::Error::other("no postgres user in /etc/passwd"))?;
        let dir = tempfile::Builder::new()
            .prefix("idemgate-chaos-pg-")
            .tempdir()?;
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        let out = Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .output()
            .await?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let mut me = Self {
            child: None,
            port: free_port()?,
            bin,
            uid,
            gid,
            dir,
        };
        me.spawn().await?;
        Ok(me)
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn spawn(&mut self) -> std::io::Result<()> {
        let mut child = Command::new(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!(
                "unix_socket_directories={}",
                self.dir.path().display()
            ))
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
            .args(["-c", "max_connections=200"])
            .uid(self.uid)
            .gid(self.gid)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let deadline = tokio::time::Instant::now() + PG_START_BOUND;
        loop {
            // Accepting connections, not just listening: after a crash, the server listens
            // while it replays its WAL and refuses sessions ("the database system is starting
            // up") until it is done.
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdin(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            if ready {
                self.child = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                // After a SIGKILL, the old backends may still hold the shared memory for a
                // moment: the caller retries.
                return Err(std::io::Error::other(format!("postgres exited: {status}")));
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.kill().await;
                return Err(std::io::Error::other("postgres did not listen"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// The postmaster's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Its data folder.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// SIGKILL of the postmaster and all its children (backends, checkpointer, WAL writer: each
    /// is its own process group, so they are found by parent PID), at once, then reap.
    pub async fn kill9(&mut self) -> bool {
        match self.child.take() {
            Some(mut c) => {
                if let Some(pid) = c.id() {
                    kill_with_children(pid);
                }
                let _ = c.kill().await;
                true
            }
            None => false,
        }
    }

    /// Starts it again on the same port and folder (crash recovery replays the WAL).
    pub async fn restart(&mut self) -> std::io::Result<bool> {
        if self.child.is_some() {
            return Ok(false);
        }
        self.spawn().await?;
        Ok(true)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            kill_with_children(pid);
        }
    }
}

/// SIGKILL of `pid` and of every process whose parent it is, in one `kill` call.
fn kill_with_children(pid: u32) {
    let mut pids = vec![pid.to_string()];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.filter_map(Result::ok) {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            // `/proc/PID/stat`: "pid (comm) state ppid ..."; comm may hold spaces.
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(child.to_string());
            }
        }
    }
    let _ = std::process::Command::new("kill")
        .arg("-KILL")
        .args(&pids)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The newest `/usr/lib/postgresql/<version>/bin` that holds a `postgres` binary.
fn postgres_bindir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// The user and group ids of `name`, from `/etc/passwd`.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next()? == name).then_some(())?;
        let _password = f.next()?;
        Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
    })
}

/// A store process the harness owns and may kill: a private Redis or PostgreSQL.
#[derive(Debug)]
pub enum PrivateStore {
    /// `redis-server`, AOF `always`.
    Redis(PrivateRedis),
    /// A PostgreSQL cluster.
    Postgres(PrivatePostgres),
}

impl PrivateStore {
    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        match self {
            PrivateStore::Redis(r) => r.addr(),
            PrivateStore::Postgres(p) => p.addr(),
        }
    }

    /// The PID of its (main) process.
    pub fn pid(&self) -> Option<u32> {
        match self {
            PrivateStore::Redis(r) => r.pid(),
            PrivateStore::Postgres(p) => p.pid(),
        }
    }

    /// SIGKILL (PostgreSQL: with every backend).
    pub async fn kill9(&mut self) -> bool {
        match self {
            PrivateStore::Redis(r) => r.kill9().await,
            PrivateStore::Postgres(p) => p.kill9().await,
        }
    }

    /// Starts it again from its files.
    pub async fn restart(&mut self) -> std::io::Result<bool> {
        match self {
            PrivateStore::Redis(r) => r.restart().await,
            PrivateStore::Postgres(p) => p.restart().await,
        }
    }

    /// How many bytes it holds: Redis's `used_memory`, PostgreSQL's data folder on disk.
    pub async fn bytes(&self) -> Option<u64> {
        match self {
            PrivateStore::Redis(r) => redis_used_memory(r.addr()).await,
            PrivateStore::Postgres(p) => Some(dir_bytes(&p.data_dir())),
        }
    }
}

/// The bytes of every file under `dir` (0 for what cannot be read).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// `used_memory` of the Redis server at `addr` (`INFO memory`), within a second.
async fn redis_used_memory(addr: SocketAddr) -> Option<u64> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"INFO memory\r\n").await.ok()?;
        let mut r = BufReader::new(s);
        let mut head = String::new();
        r.read_line(&mut head).await.ok()?;
        let len: usize = head.trim().strip_prefix('$')?.parse().ok()?;
        let mut body = vec![0u8; len.min(1 << 20)];
        r.read_exact(&mut body).await.ok()?;
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
}

/// Resident memory (kB, `VmRSS`) and open descriptors of process `pid`, from `/proc`.
pub fn process_usage(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find_map(|l| {
        l.strip_prefix("VmRSS:")?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}

/// Whether a Redis server at `addr` answers `PING` with `+PONG` within a second.
pub async fn ping(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"+PONG\r\n")
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// `host:port` of a server URL such as `postgres://user@127.0.0.1:5432/db`, resolved.
pub fn authority(url: &str) -> Option<(String, SocketAddr)> {
    let rest = url.split_once("://")?.1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = rest.split(['/', '?']).next()?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport)
        .ok()?
        .next()?;
    Some((hostport.to_owned(), addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_of_urls() {
        let (hp, addr) =
            authority("postgres://postgres@127.0.0.1:5432/test").unwrap_or_else(|| {
                panic!("parsed");
            });
        assert_eq!(hp, "127.0.0.1:5432");
        assert_eq!(addr.port(), 5432);
        assert!(authority("redis://127.0.0.1:6379").is_some());
        assert!(authority("nonsense").is_none());
    }
}
