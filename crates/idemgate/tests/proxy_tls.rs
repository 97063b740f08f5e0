//! TLS on both sides of the proxy, with certificates the test makes (rcgen):
//! - `https://` upstreams: verified against `--upstream-ca-file`, with and without a client
//!   certificate; an unknown CA, a wrong host name or a missing client certificate fail closed
//!   (`502` upstream-unavailable, cause `tls-handshake`, key released, nothing sent in plain
//!   HTTP);
//! - the HTTPS listener (`--tls-cert`, `--tls-key`): h2 and http/1.1 by ALPN, and SIGHUP reloads
//!   (new connections see the new certificate, open ones keep theirs, a broken pair keeps the
//!   old one and the process serves on).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../../test-support/tls_certs.rs"]
mod tls_certs;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::{Http, Proxy, UpstreamState, metric, until};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tls_certs::{Ca, Leaf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

fn roots(ca_pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca_pem) {
        roots.add(cert).unwrap();
    }
    roots
}

/// An HTTPS upstream: the demo upstream behind a rustls server, counting what reaches it.
struct TlsUpstream {
    state: UpstreamState,
    addr: SocketAddr,
    /// Connections whose first byte was not a TLS handshake record (plain HTTP).
    plaintext: Arc<AtomicUsize>,
    /// TLS handshakes that failed on this side (e.g. no client certificate).
    failed_handshakes: Arc<AtomicUsize>,
    /// ALPN protocols the handshakes settled on.
    alpn: Arc<std::sync::Mutex<Vec<Option<Vec<u8>>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsUpstream {
    /// Serves `leaf`; with `client_ca`, every client must present a certificate it signed.
    async fn start(leaf: &Leaf, client_ca: Option<&Ca>) -> Self {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => builder.with_client_cert_verifier(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(&ca.cert_pem)),
                    provider(),
                )
                .build()
                .unwrap(),
            ),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(
                certs(&leaf.cert_pem),
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = UpstreamState::default();
        let plaintext = Arc::new(AtomicUsize::new(0));
        let failed_handshakes = Arc::new(AtomicUsize::new(0));
        let alpn = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (state, plaintext, failed, alpn) = (
                state.clone(),
                plaintext.clone(),
                failed_handshakes.clone(),
                alpn.clone(),
            );
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, state, plaintext, failed, alpn) = (
                        acceptor.clone(),
                        state.clone(),
                        plaintext.clone(),
                        failed.clone(),
                        alpn.clone(),
                    );
                    tokio::spawn(async move {
                        let mut first = [0u8; 1];
                        match stream.peek(&mut first).await {
                            Ok(1) if first[0] == 0x16 => {}
                            Ok(0) | Err(_) => return,
                            Ok(_) => {
                                plaintext.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                        match acceptor.accept(stream).await {
                            Ok(tls) => {
                                alpn.lock()
                                    .unwrap()
                                    .push(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec));
                                state.serve_connection(tls).await;
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    });
                }
            }
        });
        Self {
            state,
            addr,
            plaintext,
            failed_handshakes,
            alpn,
            task,
        }
    }

    fn url(&self, host: &str) -> String {
        format!("https://{host}:{}", self.addr.port())
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `502` upstream-unavailable answer caused by the TLS handshake (the key was released).
fn assert_tls_refused(res: &common::Answer) {
    assert_eq!(res.status, StatusCode::BAD_GATEWAY, "{res:?}");
    assert!(
        res.problem_type().ends_with("upstream-unavailable"),
        "{res:?}"
    );
    assert_eq!(res.json()["cause"], "tls-handshake", "{res:?}");
}

#[tokio::test]
async fn https_upstream_verified_with_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("idemgate test CA");
    let leaf = ca.server(&["localhost", "127.0.0.1"], "upstream", 11);
    let ca_file = tls_certs::write(dir.path(), "ca.pem", &ca.cert_pem);
    let up = TlsUpstream::start(&leaf, None).await;
    let http = Http::default();
    // By IP address (an IP SAN) and by DNS name (SNI and a DNS SAN).
    for host in ["127.0.0.1", "localhost"] {
        let proxy = Proxy::start(
            &up.url(host),
            "memory://",
            &["--upstream-ca-file", ca_file.to_str().unwrap()],
        );
        let key = format!("tls-{host}");
        let first = http.post(&proxy.url("/pay"), Some(&key), b"{}").await;
        assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
        assert_eq!(first.json()["executions"], 1);
        let again = http.post(&proxy.url("/pay"), Some(&key), b"{}").await;
        assert!(again.replayed(), "{again:?}");
        assert_eq!(again.body, first.body);
        assert_eq!(up.state.executions_of(&key), 1);
        let hello = http.get(&proxy.url("/")).await;
        assert_eq!(hello.status, StatusCode::OK);
        assert_eq!(&hello.body[..], b"hello\n");
    }
    assert_eq!(up.plaintext.load(Ordering::SeqCst), 0);
    // The pool speaks HTTP/1.1 and says so.
    let alpn = up.alpn.lock().unwrap().clone();
    assert!(!alpn.is_empty());
    assert!(
        alpn.iter().all(|p| p.as_deref() == Some(b"http/1.1")),
        "{alpn:?}"
    );
}

#[tokio::test]
async fn upstream_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("idemgate test CA");
    let clients = Ca::new("idemgate client CA");
    let leaf = ca.server(&["127.0.0.1"], "upstream", 21);
    let client = clients.client("idemgate-proxy", 22);
    let ca_file = tls_certs::write(dir.path(), "ca.pem", &ca.cert_pem);
    let cert = tls_certs::write(dir.path(), "client.pem", &client.cert_pem);
    let key = tls_certs::write(dir.path(), "client.key", &client.key_pem);
    let up = TlsUpstream::start(&leaf, Some(&clients)).await;
    let http = Http::default();

    // Without a client certificate the upstream refuses the handshake: not sent, released.
    let bare = Proxy::start(
        &up.url("127.0.0.1"),
        "memory://",
        &["--upstream-ca-file", ca_file.to_str().unwrap()],
    );
    let refused = http.post(&bare.url("/pay"), Some("mtls-1"), b"{}").await;
    assert_tls_refused(&refused);
    // Released, not outcome-unknown: the retry is tried again (and refused again).
    let retried = http.post(&bare.url("/pay"), Some("mtls-1"), b"{}").await;
    assert_tls_refused(&retried);
    assert!(up.failed_handshakes.load(Ordering::SeqCst) >= 2);
    assert_eq!(up.state.started(), 0);

    // With one (flags here; the environment variables are the same settings).
    let proxy = Proxy::start_with_env(
        &up.url("127.0.0.1"),
        "memory://",
        &["--upstream-ca-file", ca_file.to_str().unwrap()],
        &[
            ("IDEMGATE_UPSTREAM_CLIENT_CERT", cert.to_str().unwrap()),
            ("IDEMGATE_UPSTREAM_CLIENT_KEY", key.to_str().unwrap()),
        ],
    );
    let ok = http.post(&proxy.url("/pay"), Some("mtls-1"), b"{}").await;
    assert_eq!(ok.status, StatusCode::CREATED, "{ok:?}");

    // A client certificate the upstream does not trust is refused like none at all.
    let stranger = Ca::new("unknown client CA").client("idemgate-proxy", 23);
    let cert = tls_certs::write(dir.path(), "stranger.pem", &stranger.cert_pem);
    let key = tls_certs::write(dir.path(), "stranger.key", &stranger.key_pem);
    let untrusted = Proxy::start(
        &up.url("127.0.0.1"),
        "memory://",
        &[
            "--upstream-ca-file",
            ca_file.to_str().unwrap(),
            "--upstream-client-cert",
            cert.to_str().unwrap(),
            "--upstream-client-key",
            key.to_str().unwrap(),
        ],
    );
    let refused = http
        .post(&untrusted.url("/pay"), Some("mtls-2"), b"{}")
        .await;
    assert_tls_refused(&refused);
    assert_eq!(up.state.executions_of("mtls-2"), 0);
    assert_eq!(up.state.executions_of("mtls-1"), 1);
    assert_eq!(up.plaintext.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn unverifiable_upstreams_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("idemgate test CA");
    let other = Ca::new("someone else's CA");
    let ca_file = tls_certs::write(dir.path(), "ca.pem", &ca.cert_pem);
    let other_file = tls_certs::write(dir.path(), "other.pem", &other.cert_pem);
    let good = TlsUpstream::start(&ca.server(&["127.0.0.1"], "upstream", 31), None).await;
    // Signed by the trusted CA, but for another name.
    let misnamed = TlsUpstream::start(&ca.server(&["other.example"], "other", 32), None).await;
    let http = Http::default();
    let cases = [
        // The system's roots do not know the test CA.
        ("system roots", good.url("127.0.0.1"), None),
        ("another CA", good.url("127.0.0.1"), Some(&other_file)),
        ("wrong name", misnamed.url("127.0.0.1"), Some(&ca_file)),
    ];
    for (case, url, ca) in cases {
        let args: Vec<&str> = match ca {
            Some(path) => vec!["--upstream-ca-file", path.to_str().unwrap()],
            None => Vec::new(),
        };
        let proxy = Proxy::start(&url, "memory://", &args);
        let key = format!("unverified-{}", case.replace(' ', "-"));
        let res = http.post(&proxy.url("/pay"), Some(&key), b"{}").await;
        assert_tls_refused(&res);
        // Passed-through requests are refused the same way.
        let get = http.get(&proxy.url("/")).await;
        assert_eq!(get.status, StatusCode::BAD_GATEWAY, "{case}: {get:?}");
        let logs = proxy.logs.clone();
        until(10, "the failure logged with its cause", || {
            logs.lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("upstream request failed") && l.contains("tls-handshake"))
        })
        .await;
    }
    for up in [&good, &misnamed] {
        assert_eq!(up.state.started(), 0);
        assert_eq!(
            up.plaintext.load(Ordering::SeqCst),
            0,
            "no plain-HTTP fallback"
        );
    }
}

#[test]
fn unusable_tls_files_stop_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = tls_certs::write(dir.path(), "junk.pem", "not a certificate\n");
    let missing = dir.path().join("missing.pem");
    let ca = Ca::new("idemgate test CA");
    let a = ca.server(&["127.0.0.1"], "a", 41);
    let b = ca.server(&["127.0.0.1"], "b", 42);
    let a_cert = tls_certs::write(dir.path(), "a.pem", &a.cert_pem);
    let b_key = tls_certs::write(dir.path(), "b.key", &b.key_pem);
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let cases: [(Vec<String>, &str); 4] = [
        (
            vec![
                "--upstream".into(),
                "https://127.0.0.1:1".into(),
                "--upstream-ca-file".into(),
                path(&missing),
            ],
            "missing.pem",
        ),
        (
            vec![
                "--upstream".into(),
                "https://127.0.0.1:1".into(),
                "--upstream-ca-file".into(),
                path(&not_pem),
            ],
            "holds no PEM certificate",
        ),
        (
            vec![
                "--upstream".into(),
                "http://127.0.0.1:1".into(),
                "--tls-cert".into(),
                path(&a_cert),
                "--tls-key".into(),
                path(&b_key),
            ],
            "cannot be used together",
        ),
        (
            vec![
                "--upstream".into(),
                "http://127.0.0.1:1".into(),
                "--upstream-ca-file".into(),
                path(&a_cert),
            ],
            "is not https://",
        ),
    ];
    for (args, why) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .arg("serve")
            .args(&args)
            .args(["--store", "memory://", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
}

#[test]
fn check_config_reads_the_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("idemgate test CA");
    let a = ca.server(&["127.0.0.1"], "a", 51);
    let b = ca.server(&["127.0.0.1"], "b", 52);
    let cert = tls_certs::write(dir.path(), "a.pem", &a.cert_pem);
    let key = tls_certs::write(dir.path(), "a.key", &a.key_pem);
    let other_key = tls_certs::write(dir.path(), "b.key", &b.key_pem);
    let ca_file = tls_certs::write(dir.path(), "ca.pem", &ca.cert_pem);
    let check = |key: &Path| {
        Command::new(env!("CARGO_BIN_EXE_idemgate"))
            .args(["serve", "--check-config", "--store", "memory://"])
            .args(["--upstream", "https://127.0.0.1:8443"])
            .args(["--upstream-ca-file", ca_file.to_str().unwrap()])
            .args(["--tls-cert", cert.to_str().unwrap()])
            .args(["--tls-key", key.to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let good = check(&key);
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(
        stdout.contains(&format!("tls_cert = \"{}\"", cert.display())),
        "{stdout}"
    );
    assert!(stdout.contains("upstream_ca_file = "), "{stdout}");
    let bad = check(&other_key);
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot be used together"), "{stderr}");
}

/// A TLS connection to the proxy listener trusting `ca`, offering `alpn`.
async fn connect(addr: SocketAddr, ca: &Ca, alpn: &[u8]) -> TlsStream<TcpStream> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(&ca.cert_pem))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

/// The serial number (lower-case hex) and subject common name of the certificate `tls` was given.
fn peer(tls: &TlsStream<TcpStream>) -> (String, String) {
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    (format!("{:x}", cert.serial), cn)
}

/// An HTTP/1.1 connection over `tls`.
async fn http1(tls: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn post(key: &str) -> Request<Full<Bytes>> {
    Request::post("/pay")
        .header("host", "localhost")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

async fn body(res: hyper::Response<hyper::body::Incoming>) -> (StatusCode, bool, Bytes) {
    let status = res.status();
    let replayed = res
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    (
        status,
        replayed,
        res.into_body().collect().await.unwrap().to_bytes(),
    )
}

/// Sends SIGHUP to the proxy and waits until it logged the outcome (`reloaded` or not) for the
/// `nth` time.
async fn sighup(proxy: &Proxy, outcome: &str, nth: usize) {
    let status = Command::new("kill")
        .args(["-HUP", &proxy.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let logs = proxy.logs.clone();
    until(10, outcome, || {
        logs.lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(outcome))
            .count()
            >= nth
    })
    .await;
}

#[tokio::test]
async fn https_listener_reloads_its_certificate_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("idemgate test CA");
    let first = ca.server(&["localhost", "127.0.0.1"], "idemgate-listener-1", 0x1001);
    let second = ca.server(&["localhost", "127.0.0.1"], "idemgate-listener-2", 0x1002);
    let third = ca.server(&["localhost", "127.0.0.1"], "idemgate-listener-3", 0x1003);
    let cert = tls_certs::write(dir.path(), "tls.pem", &first.cert_pem);
    let key = tls_certs::write(dir.path(), "tls.key", &first.key_pem);
    let up = common::Upstream::start().await;
    let proxy = Proxy::start(
        &up.url(),
        "memory://",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );

    // HTTP/2 by ALPN.
    let h2 = connect(proxy.addr, &ca, b"h2").await;
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(peer(&h2), ("1001".into(), "idemgate-listener-1".into()));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(h2))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = post("sighup-1");
    *req.uri_mut() = "https://localhost/pay".parse().unwrap();
    let (status, replayed, first_body) = body(h2.send_request(req).await.unwrap()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(!replayed);

    // HTTP/1.1 by ALPN; this connection stays open across the reloads.
    let old = connect(proxy.addr, &ca, b"http/1.1").await;
    assert_eq!(old.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let old_peer = peer(&old);
    assert_eq!(old_peer.1, "idemgate-listener-1");
    let mut old = http1(old).await;
    let (status, replayed, again) = body(old.send_request(post("sighup-1")).await.unwrap()).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    assert_eq!(again, first_body);

    // Plain HTTP on the HTTPS port gets no HTTP answer.
    let mut plain = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut answer).await;
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");

    // A new pair: new connections get it, the open one keeps the old.
    tls_certs::replace(&key, &second.key_pem);
    tls_certs::replace(&cert, &second.cert_pem);
    sighup(&proxy, "TLS certificate reloaded", 1).await;
    let new = connect(proxy.addr, &ca, b"http/1.1").await;
    assert_eq!(peer(&new), ("1002".into(), "idemgate-listener-2".into()));
    let mut new = http1(new).await;
    let (status, replayed, _) = body(new.send_request(post("sighup-2")).await.unwrap()).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    let (status, replayed, _) = body(old.send_request(post("sighup-2")).await.unwrap()).await;
    assert_eq!(
        (status, replayed),
        (StatusCode::CREATED, true),
        "the open connection still serves"
    );

    // Broken replacements keep the current certificate, and the process serves on.
    tls_certs::replace(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n");
    sighup(&proxy, "TLS certificate not reloaded", 1).await;
    // A certificate with someone else's key.
    tls_certs::replace(&cert, &third.cert_pem);
    sighup(&proxy, "TLS certificate not reloaded", 2).await;
    let logs = proxy.logs.lock().unwrap().clone();
    assert!(
        logs.iter().any(|l| l.contains("cannot be used together")),
        "the key mismatch is named"
    );
    let still = connect(proxy.addr, &ca, b"http/1.1").await;
    assert_eq!(peer(&still), ("1002".into(), "idemgate-listener-2".into()));
    let mut still = http1(still).await;
    let (status, replayed, _) = body(still.send_request(post("sighup-2")).await.unwrap()).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, true));
    let mut proxy = proxy;
    assert!(proxy.child.try_wait().unwrap().is_none(), "still running");

    let http = Http::default();
    let ok = metric(&http, &proxy, "idemgate_tls_reloads_total", "result=\"ok\"").await;
    let failed = metric(
        &http,
        &proxy,
        "idemgate_tls_reloads_total",
        "result=\"error\"",
    )
    .await;
    assert_eq!((ok, failed), (1.0, 2.0));
    let page = http.get(&proxy.admin_url("/metrics")).await.body;
    let page = String::from_utf8_lossy(&page);
    for family in [
        "idemgate_tls_reloads_total",
        "idemgate_tls_handshake_failures_total",
    ] {
        assert!(
            page.contains(&format!("# HELP {family} ")),
            "{family} described"
        );
    }
    // The plain request above failed its handshake, and was counted.
    let failures = metric(
        &http,
        &proxy,
        "idemgate_tls_handshake_failures_total",
        "reason=\"handshake\"",
    )
    .await;
    assert!(failures >= 1.0, "{failures}");
    // Mending the pair and reloading again works.
    tls_certs::replace(&key, &third.key_pem);
    sighup(&proxy, "TLS certificate reloaded", 2).await;
    let last = connect(proxy.addr, &ca, b"http/1.1").await;
    assert_eq!(peer(&last), ("1003".into(), "idemgate-listener-3".into()));
}
