// Certificates for the TLS tests, made by the tests themselves (rcgen, ECDSA P-256): a CA, and
// server and client certificates it signs, as PEM text and files. Not a crate: a test includes
// it with `#[path = "…/test-support/tls_certs.rs"] mod tls_certs;` (its crate needs `rcgen` as
// a dev-dependency).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};

/// A certificate authority of the test's own.
pub struct Ca {
    /// Its self-signed certificate.
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate signed by a [`Ca`], with its private key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
}

impl Ca {
    /// A new CA named `name` (its subject's common name).
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (DNS names, or IP addresses such as `127.0.0.1`), with
    /// the common name `cn` and the serial number `serial`.
    pub fn server(&self, names: &[&str], cn: &str, serial: u64) -> Leaf {
        self.leaf(names, cn, serial, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A certificate for both ends of a TLS connection (`serverAuth` and `clientAuth`), as a
    /// Redis Cluster node needs: nodes connect to each other's cluster bus with their own
    /// certificate.
    pub fn node(&self, names: &[&str], cn: &str, serial: u64) -> Leaf {
        self.leaf_for(
            names,
            cn,
            serial,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    /// A client certificate with the common name `cn` (PostgreSQL's `cert` authentication takes
    /// the user name from it).
    pub fn client(&self, cn: &str, serial: u64) -> Leaf {
        self.leaf(&[], cn, serial, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, names: &[&str], cn: &str, serial: u64, usage: ExtendedKeyUsagePurpose) -> Leaf {
        self.leaf_for(names, cn, serial, vec![usage])
    }

    fn leaf_for(
        &self,
        names: &[&str],
        cn: &str,
        serial: u64,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Replaces `path`'s content with `text` the way a certificate manager does: a new file renamed
/// over the old one (a reader sees the old file or the new one, never half of it).
pub fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
