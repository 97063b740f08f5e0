//! TLS to PostgreSQL, with libpq's URL parameters: `sslmode`, `sslrootcert`, `sslcert`,
//! `sslkey` (rustls on the `ring` provider, through `tokio-postgres-rustls`).
//!
//! | `sslmode` | encrypted | server certificate |
//! | --- | --- | --- |
//! | `disable` | no | — |
//! | `prefer` (the default, as in libpq) | if the server offers TLS, else plain | not verified |
//! | `require` | yes, or the connection fails | not verified; with `sslrootcert`, as `verify-ca` (as libpq) |
//! | `verify-ca` | yes | chains to `sslrootcert` |
//! | `verify-full` | yes | chains to `sslrootcert`, and is valid for the host name or IP address connected to |
//!
//! - `sslrootcert=PATH`: PEM CA certificates (they replace the system's roots);
//!   `sslrootcert=system`: the system's CA store, with `verify-full` only (as libpq 16). There is
//!   no default file (libpq reads `~/.postgresql/root.crt`): `verify-ca` and `verify-full` need
//!   `sslrootcert`.
//! - `sslcert=PATH&sslkey=PATH`: a client certificate (for `cert` authentication in
//!   `pg_hba.conf`, or `clientcert=verify-full`); both or neither, no default files.
//! - `allow` is refused (plain first, TLS only if the server insists: never wanted here).
//! - Unlike libpq, `prefer` does not retry in plain text after a failed handshake: the server
//!   offered TLS, so a handshake that fails is reported.
//!
//! Handshakes without verification still check that the server holds the key of the
//! certificate it shows (a signature over the handshake), which SCRAM channel binding
//! (`channel_binding=prefer`, tokio-postgres's default) builds on.

use std::sync::Arc;

use idemgate_core::error::{ErrorKind, StoreError};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The URL parameters read here (the others pass on to tokio-postgres).
const PARAMS: [&str; 4] = ["sslmode", "sslrootcert", "sslcert", "sslkey"];

fn config_err(msg: impl Into<String>) -> StoreError {
    StoreError::new(ErrorKind::Config, msg)
}

/// libpq's `sslmode` values that this store supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// Where trusted CA certificates come from.
enum Roots {
    File(String),
    System,
}

/// Parses a PostgreSQL URL: the connection settings, and the TLS connector its `ssl*`
/// parameters ask for. A key-value connection string (`host=… user=…`) is passed to
/// tokio-postgres unchanged (its `sslmode` knows `disable`, `prefer`, `require`).
pub(crate) fn connect_config(
    url: &str,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), StoreError> {
    let invalid = |e| config_err("invalid PostgreSQL URL").with_source(e);
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let (base, query) = match url.split_once('?') {
        Some((base, query)) if is_url => (base, query),
        _ => {
            let config: tokio_postgres::Config = url.parse().map_err(invalid)?;
            return Ok((config, connector(Mode::Prefer, None, None)?));
        }
    };
    let mut rest = Vec::new();
    let mut given: Vec<(&str, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|v| v.into_owned())
        };
        let Ok(name_text) = decoded(name) else {
            rest.push(pair);
            continue;
        };
        match PARAMS.iter().find(|p| **p == name_text) {
            Some(known) => {
                if given.iter().any(|(n, _)| n == known) {
                    return Err(config_err(format!(
                        "PostgreSQL URL parameter {known} is given twice"
                    )));
                }
                let value = decoded(value).map_err(|_| {
                    config_err(format!("PostgreSQL URL parameter {known} is not UTF-8"))
                })?;
                given.push((known, value));
            }
            None => rest.push(pair),
        }
    }
    let get = |name: &str| {
        given
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    };
    let mode = match get("sslmode").unwrap_or("prefer") {
        "disable" => Mode::Disable,
        "prefer" => Mode::Prefer,
        "require" => Mode::Require,
        "verify-ca" => Mode::VerifyCa,
        "verify-full" => Mode::VerifyFull,
        "allow" => {
            return Err(config_err(
                "sslmode=allow is not supported (it tries plain text first); use prefer, \
                 require, verify-ca or verify-full",
            ));
        }
        other => {
            return Err(config_err(format!(
                "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            )));
        }
    };
    let roots = match get("sslrootcert") {
        None => None,
        Some("") => return Err(config_err("sslrootcert is empty")),
        Some("system") => Some(Roots::System),
        Some(path) => Some(Roots::File(path.to_owned())),
    };
    let mode = match (mode, &roots) {
        (Mode::VerifyCa | Mode::VerifyFull, None) => {
            return Err(config_err(
                "sslmode=verify-ca and verify-full need sslrootcert=PATH (a PEM file of the CA \
                 certificates to trust) or sslrootcert=system (the system's CA store)",
            ));
        }
        (Mode::Disable | Mode::Prefer | Mode::Require | Mode::VerifyCa, Some(Roots::System)) => {
            return Err(config_err(
                "sslrootcert=system needs sslmode=verify-full (a public CA vouches for many \
                 servers: the host name must be checked too)",
            ));
        }
        // As libpq: `require` with a root certificate verifies the chain.
        (Mode::Require, Some(_)) => Mode::VerifyCa,
        (mode, _) => mode,
    };
    let client = match (get("sslcert"), get("sslkey")) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => return Err(config_err("sslcert needs sslkey")),
        (None, Some(_)) => return Err(config_err("sslkey needs sslcert")),
    };
    let base = if rest.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut config: tokio_postgres::Config = base.parse().map_err(invalid)?;
    config.ssl_mode(match mode {
        Mode::Disable => SslMode::Disable,
        Mode::Prefer => SslMode::Prefer,
        Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
    });
    Ok((config, connector(mode, roots.as_ref(), client)?))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls connector for `mode`.
fn connector(
    mode: Mode,
    roots: Option<&Roots>,
    client: Option<(&str, &str)>,
) -> Result<MakeRustlsConnect, StoreError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (Mode::VerifyCa | Mode::VerifyFull, Some(roots)) => {
            let webpki = WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(roots)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| config_err("sslrootcert: no usable CA certificate").with_source(e))?;
            if mode == Mode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
        _ => Arc::new(Unverified(provider.clone())),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err("setting up TLS").with_source(e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| config_err(format!("sslcert: reading {cert}")).with_source(e))?;
            if chain.is_empty() {
                return Err(config_err(format!(
                    "sslcert: {cert} holds no PEM certificate"
                )));
            }
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| config_err(format!("sslkey: reading {key}")).with_source(e))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                config_err("sslcert and sslkey cannot be used together").with_source(e)
            })?
        }
        None => builder.with_no_client_auth(),
    };
    // PostgreSQL 17 checks it on direct TLS (`sslnegotiation=direct`); earlier servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(MakeRustlsConnect::new(config))
}

fn root_store(roots: &Roots) -> Result<RootCertStore, StoreError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| config_err(format!("sslrootcert: reading {path}")).with_source(e))?;
            for cert in certs {
                store.add(cert).map_err(|e| {
                    config_err(format!(
                        "sslrootcert: {path} holds an unusable CA certificate"
                    ))
                    .with_source(e)
                })?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    if store.is_empty() {
        return Err(config_err("sslrootcert: no CA certificate found"));
    }
    Ok(store)
}

/// `verify-ca`: the chain is verified, the name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name last, once the chain is verified.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require` (libpq): encrypted, the certificate not verified; the handshake's
/// signatures still are (the server holds the certificate's key).
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(url: &str) -> String {
        match connect_config(url) {
            Ok(_) => panic!("{url} was accepted"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Config, "{url}: {e}");
                assert!(!e.message().contains("s3cret"), "{e}");
                e.message().to_owned()
            }
        }
    }

    #[test]
    fn sslmodes_map_to_tokio_postgres_and_bad_ones_say_why() {
        let mode = |url: &str| connect_config(url).map(|(c, _)| c.get_ssl_mode());
        assert_eq!(mode("postgres://u@h/db").ok(), Some(SslMode::Prefer));
        assert_eq!(
            mode("postgres://u@h/db?sslmode=disable").ok(),
            Some(SslMode::Disable)
        );
        assert_eq!(
            mode("postgres://u@h/db?connect_timeout=2&sslmode=require&application_name=x").ok(),
            Some(SslMode::Require)
        );
        let (config, _) = connect_config(
            "postgresql://u:s3cret@h:5433/db?sslmode=require&application_name=a%20b",
        )
        .expect("parses");
        assert_eq!(config.get_application_name(), Some("a b"));
        assert_eq!(config.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(
            mode("host=h user=u sslmode=require").ok(),
            Some(SslMode::Require)
        );

        assert!(refusal("postgres://u:s3cret@h/db?sslmode=allow").contains("not supported"));
        assert!(refusal("postgres://u:s3cret@h/db?sslmode=yes").contains("is not one of"));
        assert!(refusal("postgres://u@h/db?sslmode=verify-full").contains("need sslrootcert"));
        assert!(
            refusal("postgres://u@h/db?sslmode=require&sslrootcert=system")
                .contains("needs sslmode=verify-full")
        );
        assert!(
            refusal("postgres://u@h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
                .contains("sslrootcert: reading /nonexistent/ca.pem")
        );
        assert!(refusal("postgres://u@h/db?sslcert=/c.pem").contains("sslcert needs sslkey"));
        assert!(refusal("postgres://u@h/db?sslmode=require&sslmode=disable").contains("twice"));
        // The system's store, with verify-full.
        assert_eq!(
            mode("postgres://u@h/db?sslmode=verify-full&sslrootcert=system").ok(),
            Some(SslMode::Require)
        );
    }
}
