//! # idemgate-check
//!
//! A black-box checker of `Idempotency-Key` behaviour for **any** HTTP API — the engine of
//! `idemgate check`. It is an HTTP client only: it sends requests to a running API and judges
//! what comes back (and, when the spec has one, what an effect probe counts). It needs nothing of
//! the API's code and nothing of idemgate.
//!
//! ## Overview
//!
//! - [`Spec`]: the operations to check (method, path, body with `{{uuid}}`/`{{key}}`/`{{seq}}`
//!   placeholders) and how to see their side effects (an effect probe, an identity pointer),
//!   from TOML or an OpenAPI 3 document ([`openapi`]).
//! - [`Config`]: target URL, concurrency, extra headers, selected checks, seed, TTL.
//! - [`Checker`]: runs every selected [`CheckName`] against every operation.
//! - [`Report`]: one [`CaseResult`] per operation × check; human text, JUnit XML, JSON.
//! - `fixtures` (feature `fixtures`): small in-process servers, one correct and several
//!   deliberately broken, that the tests run the checker against.
//!
//! The checks: `replay`, `concurrent`, `mismatch`, `missing-key`, `lost-response`,
//! `in-flight`, `malformed-key`, `precondition` by default; `transient` when selected; `expiry`
//! with a TTL. `docs/check.md` describes each, what it proves and what it cannot.
//!
//! ## Example
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use idemgate_check::{CheckName, Checker, Config, Outcome, Spec};
//!
//! # let api = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let target = format!("http://{}", api.local_addr()?);
//! # tokio::spawn(async move {
//! #     // A server that refuses a request without a key, or with a malformed one (outside 1–255
//! #     // visible ASCII bytes), with `400`, and answers `201` to the others.
//! #     use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! #     loop {
//! #         let Ok((mut s, _)) = api.accept().await else { return };
//! #         tokio::spawn(async move {
//! #             let mut buf = vec![0u8; 8192];
//! #             let n = s.read(&mut buf).await.unwrap_or(0);
//! #             let head = String::from_utf8_lossy(&buf[..n]).into_owned();
//! #             let key = head.lines().find_map(|l| {
//! #                 let (name, value) = l.split_once(':')?;
//! #                 name.eq_ignore_ascii_case("idempotency-key").then(|| value.trim().to_owned())
//! #             });
//! #             let valid = key.is_some_and(|k| {
//! #                 (1..=255).contains(&k.len()) && k.bytes().all(|b| (0x21..=0x7e).contains(&b))
//! #             });
//! #             let answer: &[u8] = if valid {
//! #                 b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
//! #             } else {
//! #                 b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
//! #             };
//! #             let _ = s.write_all(answer).await;
//! #         });
//! #     }
//! # });
//! let spec = Spec::from_toml_str(r#"
//!     [defaults]
//!     key_required = true
//!     [[operation]]
//!     name = "create order"
//!     method = "POST"
//!     path = "/orders"
//!     body = '{"ref": "{{uuid}}"}'
//! "#)?;
//! let config = Config::new(target)
//!     .only([CheckName::MissingKey, CheckName::MalformedKey])
//!     .seed(42);
//! let report = Checker::new(spec, config)?.run().await?;
//! assert!(report.passed());
//! assert_eq!(report.case("create order", CheckName::MissingKey).unwrap().outcome, Outcome::Passed);
//!
//! let mut junit = Vec::new();
//! report.write_junit(&mut junit)?;
//! assert!(String::from_utf8_lossy(&junit).contains(r#"<testcase name="missing-key""#));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Guarantees
//!
//! - Every request is real HTTP/1.1 over its own TCP connection (no pooling: a server that closes
//!   idle connections cannot fail a request of the checker's); every exchange has a deadline
//!   ([`Config::timeout`]) and every answer body is read up to a cap ([`Config::body_cap`]).
//! - A run with the same `seed`, spec and target sends the same requests (keys, UUIDs, bodies).
//! - A check reports a violation only on what it saw; what it could not see is a warning (a
//!   replay without a marker, a `422` where the draft asks for `400`) or a note when the verdict
//!   does not hang on it. A check that could not be carried out (the operation fails on its own,
//!   even with a valid key; the probe cannot be read; a body over the cap; connections this
//!   client could not make) or whose outcome cannot be seen from outside (transient, expiry
//!   without a probe, marker or difference) is an [`Outcome::Error`], never a pass and never a
//!   violation. A run in which every case was skipped has not passed ([`Report::passed`],
//!   [`Report::exit_code`]).
//! - Credentials (`Authorization`, `Cookie`, headers named like tokens, secrets or API keys) are
//!   redacted from every report and reproducer.
//!
//! What a black box cannot prove — effects the probe does not count, races the run did not
//! provoke, durability across restarts — is listed per check in `docs/check.md`.
//!
//! ## Feature flags
//!
//! - `yaml`: OpenAPI documents in YAML (JSON needs no feature).
//! - `fixtures`: the test servers of the `fixtures` module.
//!
//! ## Errors
//!
//! [`Error`]: a spec or document that cannot be read or is invalid, a configuration that makes
//! no sense, or a target that refuses connections — before any check runs. Violations are not
//! errors: they are in the [`Report`].

mod checks;
mod client;
#[cfg(feature = "fixtures")]
pub mod fixtures;
pub mod openapi;
mod report;
pub mod spec;
mod template;

use std::path::PathBuf;

pub use checks::{CheckName, Checker, Config, Progress};
pub use report::{AnswerRecord, CaseResult, Exchange, Outcome, Report, RequestRecord, SHOWN_BODY};
pub use spec::{Defaults, EffectProbe, Operation, Spec};

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A spec or document file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML spec is not valid (syntax, a field, a value).
    #[error("invalid spec: {message}")]
    Spec {
        /// What is wrong, and where.
        message: String,
    },
    /// The OpenAPI document cannot be read as a spec.
    #[error("invalid OpenAPI document: {message}")]
    OpenApi {
        /// What is wrong.
        message: String,
    },
    /// The configuration (command-line options) makes no sense.
    #[error("{message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// The target refuses connections (or cannot be resolved).
    #[error("target {target} is unreachable: {message}")]
    Unreachable {
        /// The target URL.
        target: String,
        /// The connection error.
        message: String,
    },
}

/// The kind of an [`Error`], stable for callers that map them (the binary: all are exit 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A file could not be read, or a spec or document is invalid.
    Spec,
    /// The configuration is invalid.
    Usage,
    /// The target is unreachable.
    Unreachable,
}

impl Error {
    /// The kind of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Read { .. } | Error::Spec { .. } | Error::OpenApi { .. } => ErrorKind::Spec,
            Error::Config { .. } => ErrorKind::Usage,
            Error::Unreachable { .. } => ErrorKind::Unreachable,
        }
    }
}
