//! The shared stores over TLS, through [`idemgate_stores::open`] (what `idemgate serve` calls),
//! against the machine's own `redis-server` and PostgreSQL run by the test with TLS on private
//! ports, with certificates the test makes. Each server is stopped (by its PID) when its test
//! ends. Without the programs the tests are listed as ignored; under CI they fail instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../../test-support/tls_certs.rs"]
mod tls_certs;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use idemgate_core::record::{Outcome, RecordState, StoredResponse};
use idemgate_core::store::{CasOutcome, ClaimOutcome, Store};
use idemgate_core::testkit::{claim_request, fresh_key};
use idemgate_core::{ErrorKind, SharedStore};
use idemgate_stores::{Feed, open};
use tls_certs::{Ca, Leaf};

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server process of the test's own; killed and reaped when dropped.
struct Server {
    child: Child,
    port: u16,
    /// Its files (certificates, data); removed after it stopped.
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        // PostgreSQL: a fast shutdown (SIGINT) lets it remove its socket and lock files.
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `command` and waits until it writes a line containing `ready` (on stdout or stderr,
/// whichever `stream` says), for at most 30 s. `None` when the port was taken.
fn start_until(mut command: Command, ready: &str, stderr: bool, what: &str) -> Option<Child> {
    if stderr {
        command.stdout(Stdio::null()).stderr(Stdio::piped());
    } else {
        command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    }
    let mut child = command
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let out: Box<dyn std::io::Read + Send> = if stderr {
        Box::new(child.stderr.take().unwrap())
    } else {
        Box::new(child.stdout.take().unwrap())
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let ready = ready.to_owned();
    let name = what.to_owned();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{name}] {line}");
            if line.contains("Address already in use") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(false);
                }
            } else if line.contains(&ready)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(true);
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(true) => Some(child),
        Ok(false) => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not come up (see its output above)");
        }
    }
}

/// The CA, server and client certificates of one test, as files.
struct Pki {
    ca: Ca,
    ca_file: PathBuf,
    /// A CA nobody uses.
    other_ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("idemgate store test CA");
        let ca_file = tls_certs::write(dir.path(), "ca.pem", &ca.cert_pem);
        let other = Ca::new("someone else's CA");
        let other_ca_file = tls_certs::write(dir.path(), "other.pem", &other.cert_pem);
        Self {
            ca,
            ca_file,
            other_ca_file,
            _dir: dir,
        }
    }

    /// A client certificate with common name `cn`, as (certificate, key) files in `dir`.
    fn client_files(&self, dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
        let leaf = self.ca.client(cn, 7);
        (
            tls_certs::write(dir, &format!("{cn}.pem"), &leaf.cert_pem),
            tls_certs::write(dir, &format!("{cn}.key"), &leaf.key_pem),
        )
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `redis-server` with TLS only (no plain port) on a private port, serving `leaf`; clients must
/// show a certificate signed by `ca` when `auth_clients` is `yes`.
fn redis_tls(leaf: &Leaf, ca: &Ca, auth_clients: &str) -> Server {
    redis_tls_with(leaf, ca, auth_clients, |_| Vec::new())
}

/// [`redis_tls`] with more arguments, made from the server's directory.
fn redis_tls_with(
    leaf: &Leaf,
    ca: &Ca,
    auth_clients: &str,
    extra: impl Fn(&Path) -> Vec<String>,
) -> Server {
    let program =
        idemgate_build_support::on_path("redis-server").expect("redis-server is not installed");
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let cert = tls_certs::write(dir.path(), "server.pem", &leaf.cert_pem);
        let key = tls_certs::write(dir.path(), "server.key", &leaf.key_pem);
        let ca_file = tls_certs::write(dir.path(), "ca.pem", &ca.cert_pem);
        // A cluster node's bus listens on port + 10000.
        let port = std::iter::repeat_with(free_port)
            .find(|p| *p < 55_000)
            .expect("a free port");
        let mut command = Command::new(&program);
        command
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--dir", path(dir.path())])
            .args(["--tls-cert-file", path(&cert), "--tls-key-file", path(&key)])
            .args(["--tls-ca-cert-file", path(&ca_file)])
            .args(["--tls-auth-clients", auth_clients])
            .args(extra(dir.path()));
        if let Some(child) = start_until(command, "Ready to accept connections", false, "redis") {
            return Server { child, port, dir };
        }
    }
    panic!("redis-server could not bind a free port five times");
}

/// Runs `redis-cli` over TLS (trusting `ca_file`) with `args`; its output, if it succeeded
/// within 30 s (it is killed after that, so that a cluster that never forms fails the test
/// rather than hanging it).
fn redis_cli(ca_file: &Path, args: &[&str]) -> Option<String> {
    let program = idemgate_build_support::on_path("redis-cli").expect("redis-cli is not installed");
    let mut child = Command::new(program)
        .args(["--tls", "--cacert", path(ca_file)])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run redis-cli");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        text
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("redis-cli {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = reader.join().unwrap();
    status.success().then_some(text)
}

/// A three-master Redis Cluster speaking TLS only (clients and the cluster bus), serving `leaf`
/// on every node; its `h:p,h:p,h:p` node list.
fn redis_tls_cluster(leaf: &Leaf, ca: &Ca, ca_file: &Path) -> (Vec<Server>, String) {
    let nodes: Vec<Server> = (0..3)
        .map(|_| {
            redis_tls_with(leaf, ca, "no", |dir| {
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    path(&dir.join("nodes.conf")),
                    "--tls-cluster",
                    "yes",
                ]
                .map(str::to_owned)
                .to_vec()
            })
        })
        .collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let mut create = vec!["--cluster", "create"];
    create.extend(addrs.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    assert!(
        redis_cli(ca_file, &create).is_some(),
        "redis-cli --cluster create failed"
    );
    // The nodes agree on the slots within moments; poll each until it says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        let port = node.port.to_string();
        while !redis_cli(
            ca_file,
            &["-h", "127.0.0.1", "-p", &port, "cluster", "info"],
        )
        .is_some_and(|info| info.contains("cluster_state:ok"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the TLS cluster did not become ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    (nodes, addrs.join(","))
}

/// A record claimed and completed through `store`, and read back: every kind of round trip.
async fn round_trip(store: &SharedStore) -> idemgate_core::StoreKey {
    let key = fresh_key("tls");
    let req = claim_request(Duration::from_secs(10), Duration::from_secs(60), 1);
    let ClaimOutcome::Acquired { fencing } = store.claim(&key, &req).await.unwrap() else {
        panic!("a fresh key is acquired");
    };
    // A second claim finds it in flight, as a waiter's would: Redis announces only finishes
    // someone may wait on.
    assert!(matches!(
        store.claim(&key, &req).await.unwrap(),
        ClaimOutcome::Existing { .. }
    ));
    let outcome = Outcome::Response(StoredResponse::new(201, Vec::new(), "over TLS"));
    let done = store
        .complete(&key, fencing, &outcome, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done, CasOutcome::Applied);
    let record = store.get(&key).await.unwrap().expect("stored");
    let RecordState::Completed {
        outcome: Outcome::Response(got),
        ..
    } = record.state
    else {
        panic!("completed with a response: {record:?}");
    };
    assert_eq!(&got.body[..], b"over TLS");
    key
}

/// Waits (10 s at most) until the completion feed `notices` announces `key`. Notices of earlier
/// completions on the same server may come first (PostgreSQL announces in batches after the
/// commit).
async fn hears(
    notices: &mut (impl futures_util::Stream<Item = idemgate_core::StoreKey> + Unpin),
    key: idemgate_core::StoreKey,
) {
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(k) = notices.next().await {
            if k == key {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        heard,
        Ok(true),
        "the completion notice of {key:?} within 10 s"
    );
}

/// Opens `url` expecting a refusal; returns its message and causes.
async fn refused(url: &str) -> (ErrorKind, String) {
    match tokio::time::timeout(Duration::from_secs(20), open(url)).await {
        Err(_) => panic!("{url}: no answer within 20 s"),
        Ok(Ok(_)) => panic!("{url} was accepted"),
        Ok(Err(e)) => {
            let mut text = e.to_string();
            let mut next = std::error::Error::source(&e);
            while let Some(cause) = next {
                text.push_str(&format!(": {cause}"));
                next = cause.source();
            }
            (e.kind(), text)
        }
    }
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (under CI this test fails instead)"
)]
async fn rediss_verifies_the_server_and_carries_the_store() {
    let pki = Pki::new();
    let leaf = pki
        .ca
        .server(&["127.0.0.1", "localhost"], "redis-tls", 0x2001);
    let server = redis_tls(&leaf, &pki.ca, "no");
    let port = server.port;

    for host in ["127.0.0.1", "localhost"] {
        let url = format!("rediss://{host}:{port}/?ca_file={}", path(&pki.ca_file));
        let opened = open(&url).await.expect("rediss:// with the CA");
        assert!(opened.shared);
        let Feed::Redis(redis) = opened.feed.clone() else {
            panic!("a Redis completion feed");
        };
        // The completion feed rides its own TLS connection.
        let mut notices = Box::pin(redis.completions().await.expect("subscribe over TLS"));
        let key = round_trip(&opened.store).await;
        hears(&mut notices, key).await;
    }

    // Fail closed: an unknown CA (the system's roots, or another CA), or plain text.
    let other = format!(
        "rediss://127.0.0.1:{port}?ca_file={}",
        path(&pki.other_ca_file)
    );
    for url in [format!("rediss://127.0.0.1:{port}"), other] {
        let (kind, why) = refused(&url).await;
        assert_eq!(kind, ErrorKind::Unavailable, "{why}");
        assert!(why.contains("UnknownIssuer"), "{url}: {why}");
    }
    let (_, why) = refused(&format!("redis://127.0.0.1:{port}")).await;
    assert!(!why.is_empty());
    // A name the certificate does not carry.
    let misnamed = pki.ca.server(&["redis.example"], "misnamed", 0x2002);
    let wrong = redis_tls(&misnamed, &pki.ca, "no");
    let (_, why) = refused(&format!(
        "rediss://127.0.0.1:{}?ca_file={}",
        wrong.port,
        path(&pki.ca_file)
    ))
    .await;
    assert!(why.contains("not valid for name"), "{why}");
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (under CI this test fails instead)"
)]
async fn rediss_client_certificates() {
    let pki = Pki::new();
    let leaf = pki.ca.server(&["127.0.0.1"], "redis-mtls", 0x2101);
    let server = redis_tls(&leaf, &pki.ca, "yes");
    let (cert, key) = pki.client_files(server.dir.path(), "idemgate");
    let base = format!(
        "rediss://127.0.0.1:{}?ca_file={}",
        server.port,
        path(&pki.ca_file)
    );
    refused(&base).await;
    let with_cert = format!(
        "{base}&client_cert={}&client_key={}",
        path(&cert),
        path(&key)
    );
    let opened = open(&with_cert).await.expect("with a client certificate");
    round_trip(&opened.store).await;
    // The same through the cluster URL form's option handling is a Config matter: a plain
    // redis+cluster:// URL with TLS files is refused before connecting.
    let (kind, why) = refused(&format!(
        "redis+cluster://127.0.0.1:{}?ca_file={}",
        server.port,
        path(&pki.ca_file)
    ))
    .await;
    assert_eq!(kind, ErrorKind::Config);
    assert!(why.contains("need a rediss:// URL"), "{why}");
}

#[tokio::test]
#[cfg_attr(
    no_redis_server,
    ignore = "redis-server is not installed (under CI this test fails instead)"
)]
async fn rediss_cluster() {
    let pki = Pki::new();
    // Nodes are clients of each other's cluster bus too.
    let leaf = pki.ca.node(&["127.0.0.1"], "redis-cluster-tls", 0x2201);
    let (_nodes, list) = redis_tls_cluster(&leaf, &pki.ca, &pki.ca_file);
    let url = format!("rediss+cluster://{list}?ca_file={}", path(&pki.ca_file));
    let opened = open(&url).await.expect("rediss+cluster:// with the CA");
    let Feed::Redis(redis) = opened.feed.clone() else {
        panic!("a Redis completion feed");
    };
    let mut notices = Box::pin(redis.completions().await.expect("subscribe over TLS"));
    // Keys spread over the slots, so over every node.
    let mut done = Vec::new();
    for _ in 0..12 {
        done.push(round_trip(&opened.store).await);
    }
    let mut heard = Vec::new();
    while heard.len() < done.len() {
        let key = tokio::time::timeout(Duration::from_secs(10), notices.next())
            .await
            .expect("a completion notice within 10 s")
            .expect("the feed stays open");
        heard.push(key);
    }
    heard.sort();
    done.sort();
    assert_eq!(heard, done);
    // Verification holds for the cluster too.
    let (kind, why) = refused(&format!(
        "rediss+cluster://{list}?ca_file={}",
        path(&pki.other_ca_file)
    ))
    .await;
    assert_eq!(kind, ErrorKind::Unavailable, "{why}");
    assert!(why.contains("UnknownIssuer"), "{why}");
}

/// The `postgres` account's user and group ids, when this test runs as root (PostgreSQL refuses
/// to run as root); `None` when it runs as another user, who then runs PostgreSQL itself.
fn postgres_account() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self").unwrap().uid();
    if me != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("running as root needs a `postgres` account to run PostgreSQL as");
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
}

/// A private PostgreSQL instance (initdb in a temporary directory) serving TLS with `leaf` on a
/// private port; `cert` authentication (client certificates signed by `ca`) for the role
/// `certuser`, trust for everyone else.
fn postgres_tls(leaf: &Leaf, ca: &Ca) -> Server {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let bindir = idemgate_build_support::postgres_bindir()
        .expect("PostgreSQL's server programs are missing");
    let account = postgres_account();
    let as_postgres = |command: &mut Command| {
        if let Some((uid, gid)) = account {
            command.uid(uid).gid(gid);
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    if let Some((uid, gid)) = account {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    }
    let mut initdb = Command::new(bindir.join("initdb"));
    initdb
        .args([
            "-D",
            path(&data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        ])
        .args(["-E", "UTF8", "--locale=C"])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    as_postgres(&mut initdb);
    let out = initdb.output().expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut files = Vec::new();
    for (name, text) in [
        ("server.crt", &leaf.cert_pem),
        ("server.key", &leaf.key_pem),
        ("client-ca.crt", &ca.cert_pem),
    ] {
        let file = tls_certs::write(&data, name, text);
        // PostgreSQL refuses a key others can read.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = account {
            std::os::unix::fs::chown(&file, Some(uid), Some(gid)).unwrap();
        }
        files.push(file);
    }
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\n\
         hostssl all certuser 127.0.0.1/32 cert\n\
         host all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    for _ in 0..5 {
        let port = free_port();
        let mut postgres = Command::new(bindir.join("postgres"));
        postgres
            .args(["-D", path(&data), "-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args([
                "-c",
                &format!("unix_socket_directories={}", path(dir.path())),
            ])
            .args(["-c", "fsync=off", "-c", "ssl=on"])
            .args(["-c", &format!("ssl_cert_file={}", path(&files[0]))])
            .args(["-c", &format!("ssl_key_file={}", path(&files[1]))])
            .args(["-c", &format!("ssl_ca_file={}", path(&files[2]))]);
        as_postgres(&mut postgres);
        if let Some(child) = start_until(
            postgres,
            "database system is ready to accept connections",
            true,
            "postgres",
        ) {
            return Server { child, port, dir };
        }
    }
    panic!("PostgreSQL could not bind a free port five times");
}

/// A plain connection for checking on the server (over its Unix socket).
async fn admin(server: &Server, db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(server.dir.path())
        .port(server.port)
        .user("postgres")
        .dbname(db)
        .connect(tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(conn);
    client
}

/// How many of `application`'s connections use TLS, and how many do not.
async fn tls_connections(admin: &tokio_postgres::Client, application: &str) -> (i64, i64) {
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = $1",
            &[&application],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
#[cfg_attr(
    no_postgres_server,
    ignore = "PostgreSQL's server programs are not installed (under CI this test fails instead)"
)]
async fn postgres_sslmodes() {
    let pki = Pki::new();
    // An IP address only: `localhost` does not match it.
    let leaf = pki.ca.server(&["127.0.0.1"], "postgres-tls", 0x3001);
    let server = postgres_tls(&leaf, &pki.ca);
    let admin = admin(&server, "postgres").await;
    let port = server.port;
    let ca = path(&pki.ca_file);
    let url = |host: &str, app: &str, params: &str| {
        format!("postgres://postgres@{host}:{port}/postgres?application_name={app}&{params}")
    };

    // (application, URL parameters, uses TLS)
    let cases = [
        ("tls-default", String::new(), true),
        ("tls-disable", "sslmode=disable".to_owned(), false),
        ("tls-prefer", "sslmode=prefer".to_owned(), true),
        ("tls-require", "sslmode=require".to_owned(), true),
        (
            "tls-verify-full",
            format!("sslmode=verify-full&sslrootcert={ca}"),
            true,
        ),
        (
            "tls-require-ca",
            format!("sslmode=require&sslrootcert={ca}"),
            true,
        ),
    ];
    for (app, params, tls) in &cases {
        let url = url("127.0.0.1", app, params);
        let opened = open(&url).await.unwrap_or_else(|e| panic!("{url}: {e}"));
        round_trip(&opened.store).await;
        let (with, without) = tls_connections(&admin, app).await;
        assert!(with + without > 0, "{app}: no connection seen");
        if *tls {
            assert_eq!(without, 0, "{app}: every connection encrypted");
        } else {
            assert_eq!(with, 0, "{app}: no connection encrypted");
        }
    }

    // The completion feed's own connection follows the URL's settings.
    let feed_url = url(
        "127.0.0.1",
        "tls-feed",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let opened = open(&feed_url).await.unwrap();
    let Feed::Postgres(listen_url) = opened.feed.clone() else {
        panic!("a PostgreSQL completion feed");
    };
    let mut notices = Box::pin(
        idemgate_store_postgres::PostgresStore::completions(&listen_url)
            .await
            .expect("LISTEN over TLS"),
    );
    let key = round_trip(&opened.store).await;
    hears(&mut notices, key).await;
    assert_eq!(tls_connections(&admin, "tls-feed").await.1, 0);

    // verify-ca checks the chain only; verify-full the name too.
    let localhost_ca = url(
        "localhost",
        "tls-verify-ca",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    round_trip(
        &open(&localhost_ca)
            .await
            .expect("verify-ca ignores the name")
            .store,
    )
    .await;
    let (kind, why) = refused(&url(
        "localhost",
        "tls-misnamed",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert_eq!(kind, ErrorKind::Unavailable);
    assert!(why.contains("not valid for name"), "{why}");
    // Another CA fails closed, for verify-ca and verify-full alike.
    for mode in ["verify-ca", "verify-full", "require"] {
        let (_, why) = refused(&url(
            "127.0.0.1",
            "tls-other-ca",
            &format!("sslmode={mode}&sslrootcert={}", path(&pki.other_ca_file)),
        ))
        .await;
        assert!(why.contains("UnknownIssuer"), "{mode}: {why}");
    }
    assert_eq!(tls_connections(&admin, "tls-other-ca").await, (0, 0));
}

#[tokio::test]
#[cfg_attr(
    no_postgres_server,
    ignore = "PostgreSQL's server programs are not installed (under CI this test fails instead)"
)]
async fn postgres_client_certificates() {
    let pki = Pki::new();
    let leaf = pki.ca.server(&["127.0.0.1"], "postgres-mtls", 0x3101);
    let server = postgres_tls(&leaf, &pki.ca);
    let admin = admin(&server, "postgres").await;
    admin
        .batch_execute("CREATE ROLE certuser LOGIN")
        .await
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE certdb OWNER certuser")
        .await
        .unwrap();
    let (cert, key) = pki.client_files(server.dir.path(), "certuser");
    let (stranger_cert, stranger_key) = pki.client_files(server.dir.path(), "stranger");
    let base = format!(
        "postgres://certuser@127.0.0.1:{}/certdb?sslmode=verify-full&sslrootcert={}",
        server.port,
        path(&pki.ca_file)
    );
    // pg_hba.conf: certuser must show a certificate naming it.
    let (_, why) = refused(&base).await;
    assert!(why.contains("valid client certificate"), "{why}");
    let (_, why) = refused(&format!(
        "{base}&sslcert={}&sslkey={}",
        path(&stranger_cert),
        path(&stranger_key)
    ))
    .await;
    assert!(why.contains("certificate authentication failed"), "{why}");
    let url = format!("{base}&sslcert={}&sslkey={}", path(&cert), path(&key));
    let opened = open(&url).await.expect("with certuser's certificate");
    round_trip(&opened.store).await;
}
