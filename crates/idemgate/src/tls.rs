//! TLS for `idemgate serve`, on rustls with the `ring` provider.
//!
//! - [`upstream`]: the client side for an `https://` upstream. Its certificate must chain to the
//!   system's CA store, or, with `--upstream-ca-file`, to the CAs of that file *instead* (a
//!   private CA then vouches for nothing else), and be valid for the upstream's host name or IP
//!   address. `--upstream-client-cert`/`--upstream-client-key` are presented to an upstream that
//!   asks for a client certificate. ALPN offers `http/1.1` only: the upstream pool speaks
//!   HTTP/1.1. A failed handshake fails closed: the request is not sent (`502`, key released),
//!   and there is no fallback to plain HTTP.
//! - [`ListenerTls`]: the proxy listener's certificate (`--tls-cert`, `--tls-key`), offered with
//!   ALPN `h2` and `http/1.1`. [`ListenerTls::reload`] reads both files again (on SIGHUP, see
//!   [`reload_on_sighup`]): new connections get the new certificate, open ones keep theirs, and a
//!   new pair that cannot be used (unreadable, not PEM, a key that does not match the
//!   certificate) leaves the current one in place with an error in the log.
//!
//! Files are read at start-up, so that a missing or broken one stops `serve` with a message
//! naming it.

use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result, bail};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};

use crate::config::CertKey;

/// SIGHUP reloads of the listener's certificate, by result (`ok`, `error`).
pub const TLS_RELOADS: &str = "idemgate_tls_reloads_total";
/// TLS handshakes with clients of the listener that failed, by reason (`handshake`, `timeout`).
pub const TLS_HANDSHAKE_FAILURES: &str = "idemgate_tls_handshake_failures_total";

/// Describes the listener's TLS families and, when the listener serves HTTPS, registers their
/// series at zero (after the metrics recorder is installed).
pub fn describe_metrics(listener_tls: bool) {
    metrics::describe_counter!(
        TLS_RELOADS,
        "SIGHUP reloads of the proxy listener's certificate, by result (ok; error: the current \
         certificate was kept, the reason logged at ERROR)"
    );
    metrics::describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes with clients of the proxy listener that failed (handshake) or did not \
         finish within header_read_timeout (timeout)"
    );
    if listener_tls {
        for result in ["ok", "error"] {
            let _ = metrics::counter!(TLS_RELOADS, "result" => result);
        }
        for reason in ["handshake", "timeout"] {
            let _ = metrics::counter!(TLS_HANDSHAKE_FAILURES, "reason" => reason);
        }
    }
}

/// The crypto provider of every TLS configuration here.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (at least one).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading certificates from {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading a private key from {}", path.display()))
}

/// The SHA-256 fingerprint of a certificate, as operators compare it (`openssl x509
/// -fingerprint -sha256`): upper-case hex pairs joined by colons.
fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Reads every TLS file of `settings` as `serve` does at start-up (for `serve --check-config`).
pub fn check(settings: &crate::config::Settings) -> Result<()> {
    upstream(
        &settings.upstream,
        settings.upstream_ca_file.as_deref(),
        settings.upstream_client_cert.as_ref(),
    )
    .context("setting up TLS to the upstream")?;
    if let Some(files) = &settings.tls {
        ListenerTls::load(files).context("setting up TLS on the proxy listener")?;
    }
    Ok(())
}

/// How the proxy reaches an `https://` upstream.
#[derive(Clone)]
pub struct UpstreamTls {
    /// The client configuration (roots, client certificate, ALPN).
    pub connector: tokio_rustls::TlsConnector,
    /// The name the certificate must be valid for (and the SNI sent, for a DNS name).
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The TLS client for the upstream `base`, or `None` for an `http://` upstream.
pub fn upstream(
    base: &http::Uri,
    ca_file: Option<&Path>,
    client_cert: Option<&CertKey>,
) -> Result<Option<UpstreamTls>> {
    if base.scheme_str() != Some("https") {
        return Ok(None);
    }
    let host = base
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name = ServerName::try_from(host.clone())
        .with_context(|| format!("the upstream host {host:?} is not a valid TLS server name"))?;
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certs(path)? {
                roots.add(cert).with_context(|| {
                    format!("{}: a certificate is not a usable CA", path.display())
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's CA certificates");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "the system has no CA certificates to verify the https:// upstream with \
                     (install ca-certificates, or give --upstream-ca-file)"
                );
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("setting up TLS")?
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some(files) => builder
            .with_client_auth_cert(read_certs(&files.cert)?, read_key(&files.key)?)
            .with_context(|| {
                format!(
                    "the upstream client certificate {} and key {} cannot be used together",
                    files.cert.display(),
                    files.key.display()
                )
            })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(UpstreamTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name,
    }))
}

/// The proxy listener's certificate, replaceable while serving.
pub struct ListenerTls {
    resolver: Arc<Current>,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTls")
            .field("files", &self.resolver.files)
            .finish_non_exhaustive()
    }
}

/// The certificate handed to every new handshake.
#[derive(Debug)]
struct Current {
    files: CertKey,
    key: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

/// Reads a certificate chain and its key, and checks that they belong together.
fn certified_key(files: &CertKey, provider: &CryptoProvider) -> Result<CertifiedKey> {
    let chain = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    CertifiedKey::from_der(chain, key, provider).with_context(|| {
        format!(
            "the certificate {} and the key {} cannot be used together",
            files.cert.display(),
            files.key.display()
        )
    })
}

impl ListenerTls {
    /// Reads `files` and sets up the listener's TLS (ALPN `h2`, `http/1.1`).
    pub fn load(files: &CertKey) -> Result<Self> {
        let provider = provider();
        let key = certified_key(files, &provider)?;
        let resolver = Arc::new(Current {
            files: files.clone(),
            key: RwLock::new(Arc::new(key)),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("setting up TLS")?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The acceptor for new connections (it asks for the current certificate at each handshake).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        self.acceptor.clone()
    }

    /// The files it was read from (and is read again from on [`ListenerTls::reload`]).
    pub fn files(&self) -> &CertKey {
        &self.resolver.files
    }

    /// The SHA-256 fingerprint of the certificate in use.
    pub fn fingerprint(&self) -> String {
        let key = self.resolver.resolve_current();
        key.cert.first().map_or_else(String::new, fingerprint)
    }

    /// Reads the files again and, if they hold a usable certificate and key, uses them for new
    /// connections; otherwise keeps the current ones and says why. Returns the new certificate's
    /// fingerprint.
    pub fn reload(&self) -> Result<String> {
        let key = certified_key(
            &self.resolver.files,
            self.acceptor.config().crypto_provider(),
        )?;
        let print = key.cert.first().map_or_else(String::new, fingerprint);
        *self.resolver.key.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        Ok(print)
    }
}

impl Current {
    fn resolve_current(&self) -> Arc<CertifiedKey> {
        self.key.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Reloads the listener's certificate at every SIGHUP (`idemgate_tls_reloads_total{result}`
/// counts the attempts). Never returns; a failed reload is logged at ERROR and the current
/// certificate stays.
#[cfg(unix)]
pub async fn reload_on_sighup(tls: Arc<ListenerTls>, mut hangups: tokio::signal::unix::Signal) {
    while hangups.recv().await.is_some() {
        match tls.reload() {
            Ok(print) => {
                metrics::counter!(TLS_RELOADS, "result" => "ok").increment(1);
                tracing::info!(
                    cert = %tls.resolver.files.cert.display(),
                    sha256 = %print,
                    "SIGHUP: TLS certificate reloaded; new connections use it"
                );
            }
            Err(e) => {
                metrics::counter!(TLS_RELOADS, "result" => "error").increment(1);
                tracing::error!(
                    error = format!("{e:#}"),
                    sha256 = %tls.fingerprint(),
                    "SIGHUP: TLS certificate not reloaded; keeping the current one"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_read_like_openssl() {
        let cert = CertificateDer::from(vec![0u8; 3]);
        let print = fingerprint(&cert);
        assert_eq!(print.len(), 32 * 3 - 1);
        assert!(print.starts_with("70:9E:80:C8:"), "{print}");
    }
}
