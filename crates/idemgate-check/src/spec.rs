//! The spec: which operations to check, how to call them and how to see their effects.
//!
//! A spec is TOML ([`Spec::from_toml_str`]) or is read from an OpenAPI 3 document
//! ([`Spec::from_openapi_str`], in [`crate::openapi`]). Both give the same [`Spec`], validated:
//! every method, path, header and JSON pointer is checked when the spec is loaded, so a run never
//! stops half-way on a typo.
//!
//! ```
//! let spec = idemgate_check::Spec::from_toml_str(r#"
//!     [defaults]
//!     headers = { "content-type" = "application/json" }
//!     key_required = true
//!
//!     [[operation]]
//!     name = "create order"
//!     method = "POST"
//!     path = "/orders"
//!     body = '{"amount": 10, "ref": "{{uuid}}"}'
//!     effect_probe = { method = "GET", path = "/_count?key={{key}}", pointer = "/executions" }
//!     identity = "/id"
//! "#)?;
//! assert_eq!(spec.operations[0].name, "create order");
//! assert_eq!(spec.defaults.key_header, "Idempotency-Key");
//! # Ok::<(), idemgate_check::Error>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::template;

/// A whole spec: defaults and the operations to check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Settings shared by every operation.
    #[serde(default)]
    pub defaults: Defaults,
    /// The operations, checked in this order.
    #[serde(default, rename = "operation")]
    pub operations: Vec<Operation>,
}

/// Settings shared by every operation (`[defaults]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Headers sent with every request (an operation's own `headers` add to them).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The header that carries the key (default `Idempotency-Key`).
    #[serde(default = "default_key_header")]
    pub key_header: String,
    /// `true`: a request without a key must get `400` (the missing-key check).
    #[serde(default)]
    pub key_required: bool,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            headers: BTreeMap::new(),
            key_header: default_key_header(),
            key_required: false,
        }
    }
}

fn default_key_header() -> String {
    "Idempotency-Key".to_owned()
}

/// One operation to check (`[[operation]]`).
///
/// Text fields marked *templated* may hold `{{uuid}}`, `{{key}}` and `{{seq}}`, filled once per
/// attempt group (the requests that share one key): a fresh UUID, the group's key, and the
/// group's number in the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// A name for the report (unique in the spec).
    pub name: String,
    /// `POST`, `PUT`, `PATCH`, …
    pub method: String,
    /// Path and query, appended to the target URL (templated).
    pub path: String,
    /// Request body (templated; default empty).
    #[serde(default)]
    pub body: Option<String>,
    /// Headers of this operation, added to (and overriding) the defaults (values templated).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A request that reads how many times the operation took effect.
    #[serde(default)]
    pub effect_probe: Option<EffectProbe>,
    /// JSON pointer to the created resource's identity in the answer (e.g. `/id`; not
    /// templated: placeholders are refused).
    #[serde(default)]
    pub identity: Option<String>,
    /// JSON pointers that may differ between a first answer and its replay (not templated:
    /// placeholders are refused).
    #[serde(default)]
    pub volatile: Vec<String>,
    /// A variant of `path` that takes long (templated), for the in-flight check.
    #[serde(default)]
    pub slow_path: Option<String>,
    /// A variant of `path` whose first attempt per key is answered `5xx` without taking effect
    /// (templated), for the transient check: the retry is then expected to succeed, not marked
    /// replayed (see `docs/check.md`).
    #[serde(default)]
    pub transient_path: Option<String>,
    /// The body sent with the same key by the mismatch check (templated). Default: the body
    /// rendered again with a fresh `{{uuid}}` and `{{seq}}`, or, when that renders the same, the
    /// JSON object with one more member.
    #[serde(default)]
    pub mismatch_body: Option<String>,
    /// `true`: the resource has versions (`ETag`, `If-Match`): every request of this operation
    /// carries `If-Match` with the current `ETag`, and the precondition check runs.
    #[serde(default)]
    pub etag: bool,
    /// Where the resource's current `ETag` is read with `GET` (templated; default `path`).
    #[serde(default)]
    pub read_path: Option<String>,
    /// Overrides `defaults.key_header` for this operation.
    #[serde(default)]
    pub key_header: Option<String>,
    /// Overrides `defaults.key_required` for this operation.
    #[serde(default)]
    pub key_required: Option<bool>,
    /// Why this operation cannot be checked (set by the OpenAPI reader, e.g. no example body):
    /// every check of it is reported skipped with this reason.
    #[serde(default)]
    pub skip: Option<String>,
}

/// A request that reads how many times an operation took effect: a number at a JSON pointer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EffectProbe {
    /// Default `GET`.
    #[serde(default = "default_probe_method")]
    pub method: String,
    /// Path and query (templated: `{{key}}` is the key of the group being counted).
    pub path: String,
    /// JSON pointer to the count in the answer (templated). A pointer that names nothing counts
    /// as `0` (counters often leave out keys they never saw).
    pub pointer: String,
}

fn default_probe_method() -> String {
    "GET".to_owned()
}

impl Operation {
    /// The key header of this operation (its own, or the default).
    pub fn key_header<'a>(&'a self, defaults: &'a Defaults) -> &'a str {
        self.key_header.as_deref().unwrap_or(&defaults.key_header)
    }

    /// Whether this operation requires a key (its own setting, or the default).
    pub fn key_required(&self, defaults: &Defaults) -> bool {
        self.key_required.unwrap_or(defaults.key_required)
    }
}

impl Spec {
    /// Parses and validates a TOML spec.
    pub fn from_toml_str(text: &str) -> Result<Self, Error> {
        let spec: Spec = toml::from_str(text).map_err(|e| Error::Spec {
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Reads, parses and validates a TOML spec file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let text = read(path.as_ref())?;
        Self::from_toml_str(&text)
    }

    /// Reads an OpenAPI 3 document (JSON; YAML with the `yaml` feature): see [`crate::openapi`].
    pub fn from_openapi_str(text: &str) -> Result<Self, Error> {
        let spec = crate::openapi::spec_from_text(text)?;
        spec.validate()?;
        Ok(spec)
    }

    /// Reads an OpenAPI 3 document from a file.
    pub fn from_openapi_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let text = read(path.as_ref())?;
        Self::from_openapi_str(&text)
    }

    /// Checks every field: methods, paths, header names and values, JSON pointers, templates,
    /// unique names. [`Spec::from_toml_str`] and [`Spec::from_openapi_str`] call it; call it
    /// yourself on a spec built in code.
    pub fn validate(&self) -> Result<(), Error> {
        if self.operations.is_empty() {
            return Err(spec_error("the spec has no [[operation]]"));
        }
        header_name(&self.defaults.key_header, "defaults.key_header")?;
        for (name, value) in &self.defaults.headers {
            header(name, value, "defaults.headers")?;
        }
        let mut names = BTreeSet::new();
        for op in &self.operations {
            let at = format!("operation {:?}", op.name);
            if op.name.trim().is_empty() {
                return Err(spec_error("an operation has an empty name"));
            }
            if !names.insert(op.name.as_str()) {
                return Err(spec_error(format!(
                    "two operations are named {:?}",
                    op.name
                )));
            }
            method(&op.method, &at)?;
            path(&op.path, &format!("{at}: path"))?;
            for p in [&op.slow_path, &op.transient_path, &op.read_path]
                .into_iter()
                .flatten()
            {
                path(p, &at)?;
            }
            for t in [&op.body, &op.mismatch_body].into_iter().flatten() {
                template::validate(t).map_err(|m| spec_error(format!("{at}: {m}")))?;
            }
            for (name, value) in &op.headers {
                header(name, value, &at)?;
            }
            if let Some(k) = &op.key_header {
                header_name(k, &format!("{at}: key_header"))?;
            }
            if let Some(probe) = &op.effect_probe {
                method(&probe.method, &format!("{at}: effect_probe"))?;
                path(&probe.path, &format!("{at}: effect_probe.path"))?;
                pointer(&probe.pointer, &format!("{at}: effect_probe.pointer"))?;
            }
            // identity and volatile name places in every answer of the operation: they are
            // not templates (a placeholder there would never be filled).
            if let Some(id) = &op.identity {
                plain_pointer(id, &format!("{at}: identity"))?;
            }
            for v in &op.volatile {
                plain_pointer(v, &format!("{at}: volatile"))?;
            }
            if op.etag && !matches!(op.method.as_str(), "PUT" | "PATCH") {
                return Err(spec_error(format!(
                    "{at}: etag = true needs method PUT or PATCH (an update of a versioned resource), not {}",
                    op.method
                )));
            }
        }
        Ok(())
    }
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn spec_error(message: impl Into<String>) -> Error {
    Error::Spec {
        message: message.into(),
    }
}

fn method(m: &str, at: &str) -> Result<(), Error> {
    http::Method::from_bytes(m.as_bytes())
        .ok()
        .filter(|_| m.bytes().all(|b| b.is_ascii_uppercase()))
        .map(|_| ())
        .ok_or_else(|| spec_error(format!("{at}: {m:?} is not an HTTP method (upper case)")))
}

fn path(p: &str, at: &str) -> Result<(), Error> {
    if !p.starts_with('/') {
        return Err(spec_error(format!("{at}: {p:?} must start with '/'")));
    }
    template::validate(p).map_err(|m| spec_error(format!("{at}: {m}")))?;
    // A rendered path must be a valid URI path: check it with every placeholder filled.
    let sample = template::render(p, &template::Group::sample());
    sample
        .parse::<http::uri::PathAndQuery>()
        .map_err(|e| spec_error(format!("{at}: {p:?} is not a valid path and query ({e})")))?;
    Ok(())
}

fn pointer(p: &str, at: &str) -> Result<(), Error> {
    if !p.is_empty() && !p.starts_with('/') {
        return Err(spec_error(format!(
            "{at}: {p:?} is not a JSON pointer (it starts with '/', e.g. \"/id\")"
        )));
    }
    template::validate(p).map_err(|m| spec_error(format!("{at}: {m}")))
}

/// A JSON pointer without placeholders.
fn plain_pointer(p: &str, at: &str) -> Result<(), Error> {
    pointer(p, at)?;
    if p.contains("{{") {
        return Err(spec_error(format!(
            "{at}: {p:?} holds a placeholder; identity and volatile pointers are not templated"
        )));
    }
    Ok(())
}

fn header_name(name: &str, at: &str) -> Result<(), Error> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|_| ())
        .map_err(|_| spec_error(format!("{at}: {name:?} is not a header name")))
}

fn header(name: &str, value: &str, at: &str) -> Result<(), Error> {
    header_name(name, at)?;
    template::validate(value).map_err(|m| spec_error(format!("{at}: header {name}: {m}")))?;
    http::HeaderValue::from_str(value)
        .map(|_| ())
        .map_err(|_| spec_error(format!("{at}: the value of header {name:?} is not valid")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
[defaults]
headers = { "content-type" = "application/json" }
key_header = "Idempotency-Key"          # default
key_required = false                    # true: the missing-key check expects 400

[[operation]]
name = "create order"
method = "POST"
path = "/orders"
body = '{"amount": 10, "ref": "{{uuid}}"}'   # {{uuid}}, {{key}}, {{seq}} are filled per attempt group
effect_probe = { method = "GET", path = "/_count?key={{key}}", pointer = "/executions" }  # a number
identity = "/id"                        # JSON pointer of the created resource in the answer
volatile = ["/created_at"]              # pointers that may differ between replays
slow_path = "/orders?delay_ms=1500"      # optional: a variant that takes long, for the in-flight check
"#;

    #[test]
    fn the_issue_example_loads() {
        let spec = Spec::from_toml_str(ISSUE_EXAMPLE).unwrap();
        let op = &spec.operations[0];
        assert_eq!(op.method, "POST");
        assert_eq!(op.identity.as_deref(), Some("/id"));
        assert_eq!(op.volatile, vec!["/created_at"]);
        assert_eq!(op.slow_path.as_deref(), Some("/orders?delay_ms=1500"));
        let probe = op.effect_probe.as_ref().unwrap();
        assert_eq!(probe.pointer, "/executions");
        assert!(!op.key_required(&spec.defaults));
        assert_eq!(op.key_header(&spec.defaults), "Idempotency-Key");
    }

    #[test]
    fn mistakes_are_refused_with_their_place() {
        let cases = [
            (
                "[[operation]]\nname='a'\nmethod='post'\npath='/x'",
                "HTTP method",
            ),
            (
                "[[operation]]\nname='a'\nmethod='POST'\npath='x'",
                "must start with '/'",
            ),
            (
                "[[operation]]\nname='a'\nmethod='POST'\npath='/x'\nidentity='id'",
                "JSON pointer",
            ),
            (
                "[[operation]]\nname='a'\nmethod='POST'\npath='/x'\nbody='{{uid}}'",
                "{{uid}}",
            ),
            (
                "[[operation]]\nname='a'\nmethod='POST'\npath='/x'\netag=true",
                "PUT or PATCH",
            ),
            (
                "[[operation]]\nname='a'\nmethod='POST'\npath='/x'\nefect_probe=1",
                "efect_probe",
            ),
            (
                "[[operation]]\nname='a'\nmethod='POST'\npath='/x'\n[[operation]]\nname='a'\nmethod='POST'\npath='/y'",
                "two operations",
            ),
            ("[defaults]\nkey_required = true", "no [[operation]]"),
            (
                "[defaults]\nheaders={'bad name'='x'}\n[[operation]]\nname='a'\nmethod='POST'\npath='/x'",
                "header name",
            ),
        ];
        for (text, expected) in cases {
            let err = Spec::from_toml_str(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }
}
