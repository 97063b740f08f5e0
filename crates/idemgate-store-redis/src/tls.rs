//! TLS options of `rediss://` URLs: `ca_file`, `client_cert` and `client_key` in the query.
//!
//! - `rediss://HOST:PORT[/DB]`: TLS, the server's certificate verified against the system's CA
//!   store and the host name (or IP address) of the URL.
//! - `?ca_file=PATH`: a PEM file of CA certificates that *replaces* the system's roots.
//! - `?client_cert=PATH&client_key=PATH`: a PEM certificate chain and its key, for a server that
//!   asks for client certificates (`tls-auth-clients yes`).
//! - `#insecure` (redis-rs's "no verification") is refused: this store never connects without
//!   verifying the server.
//!
//! Values are percent-decoded; other query parameters (`protocol=resp3`, …) pass on to redis-rs.

use idemgate_core::error::{ErrorKind, StoreError};
use redis::{ClientTlsConfig, TlsCertificates};

/// The TLS query parameters this store reads.
const PARAMS: [&str; 3] = ["ca_file", "client_cert", "client_key"];

fn config(msg: impl Into<String>) -> StoreError {
    StoreError::new(ErrorKind::Config, msg)
}

/// A query parameter, decoded.
type Param = (String, String);

/// A Redis URL without this store's TLS parameters, and the certificates they name.
#[derive(Clone)]
pub(crate) struct Target {
    /// The URL for redis-rs.
    pub url: String,
    /// The certificates, when the URL gave any.
    pub certs: Option<TlsCertificates>,
    /// The TLS parameters as written (to check that cluster nodes agree).
    pub params: Vec<Param>,
}

impl Target {
    /// Parses `url` and reads the files its TLS parameters name. The URL is never echoed in an
    /// error (it may hold a password).
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let mut parsed = url::Url::parse(url).map_err(|e| {
            config("invalid Redis URL (redis://HOST:PORT[/DB] or rediss://…)").with_source(e)
        })?;
        let tls = matches!(parsed.scheme(), "rediss" | "valkeys");
        if tls && parsed.fragment().is_some() {
            return Err(config(
                "a rediss:// URL fragment (#insecure) is not supported: the server's certificate \
                 is always verified (give its CA with ?ca_file=PATH)",
            ));
        }
        let (params, rest): (Vec<Param>, Vec<Param>) = parsed
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .partition(|(k, _)| PARAMS.contains(&k.as_str()));
        if params.is_empty() {
            return Ok(Self {
                url: url.to_owned(),
                certs: None,
                params,
            });
        }
        if !tls {
            return Err(config(
                "ca_file, client_cert and client_key need a rediss:// URL (TLS)",
            ));
        }
        let get = |name: &str| -> Result<Option<&str>, StoreError> {
            let mut values = params.iter().filter(|(k, _)| k == name);
            let first = values.next().map(|(_, v)| v.as_str());
            if values.next().is_some() {
                return Err(config(format!("Redis URL option {name} is given twice")));
            }
            if first.is_some_and(str::is_empty) {
                return Err(config(format!("Redis URL option {name} is empty")));
            }
            Ok(first)
        };
        let root_cert = get("ca_file")?.map(read).transpose()?;
        let client_tls = match (get("client_cert")?, get("client_key")?) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read(cert)?,
                client_key: read(key)?,
            }),
            (None, None) => None,
            (Some(_), None) => return Err(config("Redis URL option client_cert needs client_key")),
            (None, Some(_)) => return Err(config("Redis URL option client_key needs client_cert")),
        };
        parsed.set_query(None);
        if !rest.is_empty() {
            parsed.query_pairs_mut().extend_pairs(rest);
        }
        Ok(Self {
            url: parsed.into(),
            certs: Some(TlsCertificates {
                client_tls,
                root_cert,
            }),
            params,
        })
    }

    /// A redis-rs client for this target.
    pub fn client(&self) -> Result<redis::Client, StoreError> {
        let client = match &self.certs {
            Some(certs) => redis::Client::build_with_tls(self.url.as_str(), certs.clone()),
            None => redis::Client::open(self.url.as_str()),
        };
        client.map_err(|e| config("invalid Redis URL or TLS files").with_source(e))
    }
}

/// The bytes of a PEM file named in a URL.
fn read(path: &str) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| config(format!("reading {path}")).with_source(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_and_checked() {
        let dir = std::env::temp_dir().join(format!("idemgate-redis-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "not checked here").expect("write");
        let ca = ca.to_str().expect("utf-8 path");

        let plain = Target::parse("redis://:pw@127.0.0.1:6379/2").expect("plain");
        assert!(plain.certs.is_none());
        assert_eq!(plain.url, "redis://:pw@127.0.0.1:6379/2");

        let url = format!("rediss://u:pw@h:6380/1?protocol=resp3&ca_file={ca}");
        let tls = Target::parse(&url).expect("tls");
        assert_eq!(tls.url, "rediss://u:pw@h:6380/1?protocol=resp3");
        let certs = tls.certs.expect("certs");
        assert_eq!(certs.root_cert.as_deref(), Some(&b"not checked here"[..]));
        assert!(certs.client_tls.is_none());

        for (bad, why) in [
            (format!("redis://h?ca_file={ca}"), "need a rediss:// URL"),
            (format!("rediss://h?client_cert={ca}"), "needs client_key"),
            (format!("rediss://h?client_key={ca}"), "needs client_cert"),
            (
                format!("rediss://h?ca_file={ca}&ca_file={ca}"),
                "given twice",
            ),
            ("rediss://h?ca_file=".to_owned(), "is empty"),
            (
                "rediss://h?ca_file=/nonexistent/ca.pem".to_owned(),
                "reading /nonexistent/ca.pem",
            ),
            ("rediss://:s3cret@h#insecure".to_owned(), "always verified"),
            ("redis//:s3cret@h".to_owned(), "invalid Redis URL"),
        ] {
            let Err(e) = Target::parse(&bad) else {
                panic!("{bad} was accepted");
            };
            assert_eq!(e.kind(), ErrorKind::Config);
            assert!(e.message().contains(why), "{bad}: {e}");
            assert!(!e.message().contains("s3cret"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
