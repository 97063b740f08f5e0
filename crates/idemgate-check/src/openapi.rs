//! OpenAPI 3 documents as specs.
//!
//! The operations are the document's `post`, `put` and `patch` operations, in document order:
//!
//! - **name**: `operationId`, else `METHOD /path`.
//! - **path**: the path with each `{parameter}` filled from the parameter's `example`,
//!   `examples` (first), `schema.example`, `schema.default` or `schema.enum` (first); required
//!   query parameters are appended the same way. An operation with a parameter left unfilled is
//!   reported skipped, with the reason.
//! - **body**: the request body's `example`, first of `examples`, or `schema.example`, for
//!   `application/json` (or any `+json` type, else the first media type); its media type becomes
//!   the operation's `content-type`. A required body without an example: skipped.
//! - **key**: a header parameter named like the key header (default `Idempotency-Key`) with
//!   `required: true` makes `key_required` true for that operation.
//! - Local `$ref`s (`#/components/...`) are followed.
//!
//! The `x-idempotency` extension carries the TOML spec's fields: on the document root, those of
//! `[defaults]`; on an operation, those of `[[operation]]` (they win over what is read from the
//! document), or `false` to leave the operation out.
//!
//! ```
//! let spec = idemgate_check::Spec::from_openapi_str(r#"{
//!   "openapi": "3.0.3",
//!   "x-idempotency": { "key_required": true },
//!   "paths": { "/orders": { "post": {
//!     "operationId": "createOrder",
//!     "requestBody": { "content": { "application/json": { "example": { "amount": 10 } } } },
//!     "x-idempotency": { "identity": "/id", "slow_path": "/orders?delay_ms=1500" }
//!   } } }
//! }"#)?;
//! let op = &spec.operations[0];
//! assert_eq!((op.name.as_str(), op.path.as_str()), ("createOrder", "/orders"));
//! assert_eq!(op.body.as_deref(), Some(r#"{"amount":10}"#));
//! assert_eq!(op.headers["content-type"], "application/json");
//! assert!(spec.defaults.key_required);
//! # Ok::<(), idemgate_check::Error>(())
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::Error;
use crate::spec::{Defaults, EffectProbe, Operation, Spec};

/// The `x-idempotency` extension of an operation: every field of `[[operation]]`, optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Extension {
    name: Option<String>,
    method: Option<String>,
    path: Option<String>,
    body: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    effect_probe: Option<EffectProbe>,
    identity: Option<String>,
    volatile: Option<Vec<String>>,
    slow_path: Option<String>,
    transient_path: Option<String>,
    mismatch_body: Option<String>,
    etag: Option<bool>,
    read_path: Option<String>,
    key_header: Option<String>,
    key_required: Option<bool>,
}

fn openapi_error(message: impl Into<String>) -> Error {
    Error::OpenApi {
        message: message.into(),
    }
}

/// Parses JSON (text starting with `{`), else YAML (with the `yaml` feature).
pub(crate) fn spec_from_text(text: &str) -> Result<Spec, Error> {
    let doc: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| openapi_error(format!("not JSON: {e}")))?
    } else {
        yaml(text)?
    };
    from_document(&doc)
}

#[cfg(feature = "yaml")]
fn yaml(text: &str) -> Result<Value, Error> {
    serde_norway::from_str(text).map_err(|e| openapi_error(format!("not YAML: {e}")))
}

#[cfg(not(feature = "yaml"))]
fn yaml(_text: &str) -> Result<Value, Error> {
    Err(openapi_error(
        "the document is not JSON, and YAML needs the `yaml` feature of idemgate-check",
    ))
}

/// Builds a spec from a parsed OpenAPI 3 document (not yet validated).
pub(crate) fn from_document(doc: &Value) -> Result<Spec, Error> {
    let version = doc.get("openapi").and_then(Value::as_str).unwrap_or("");
    if !version.starts_with('3') {
        return Err(openapi_error(format!(
            "only OpenAPI 3 documents are read (\"openapi\": {version:?})"
        )));
    }
    let defaults: Defaults = match doc.get("x-idempotency") {
        Some(v) => Defaults::deserialize(v)
            .map_err(|e| openapi_error(format!("x-idempotency on the document: {e}")))?,
        None => Defaults::default(),
    };
    let paths = doc
        .get("paths")
        .and_then(Value::as_object)
        .ok_or_else(|| openapi_error("the document has no paths"))?;
    let mut operations = Vec::new();
    for (path, item) in paths {
        let item = resolve(doc, item);
        for method in ["post", "put", "patch"] {
            let Some(op) = item.get(method) else { continue };
            let ext = match op.get("x-idempotency") {
                Some(Value::Bool(false)) => continue,
                Some(v) => Extension::deserialize(v).map_err(|e| {
                    openapi_error(format!(
                        "x-idempotency of {} {path}: {e}",
                        method.to_uppercase()
                    ))
                })?,
                None => Extension::default(),
            };
            operations.push(operation(doc, &defaults, path, item, method, op, ext));
        }
    }
    if operations.is_empty() {
        return Err(openapi_error(
            "the document has no POST, PUT or PATCH operation",
        ));
    }
    Ok(Spec {
        defaults,
        operations,
    })
}

fn operation(
    doc: &Value,
    defaults: &Defaults,
    path: &str,
    item: &Value,
    method: &str,
    op: &Value,
    ext: Extension,
) -> Operation {
    let upper = method.to_uppercase();
    let name = ext
        .name
        .or_else(|| {
            op.get("operationId")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("{upper} {path}"));
    // Why the operation cannot be sent as the document describes it: the path, the body.
    let mut path_skip: Option<String> = None;
    let mut body_skip: Option<String> = None;
    let key_header = ext
        .key_header
        .clone()
        .unwrap_or_else(|| defaults.key_header.clone());
    // Parameters of the path item, overridden by the operation's (same name and place).
    let mut params: Vec<Value> = Vec::new();
    for list in [item.get("parameters"), op.get("parameters")]
        .into_iter()
        .flatten()
    {
        for p in list.as_array().into_iter().flatten() {
            let p = resolve(doc, p).clone();
            params.retain(|q| !(q.get("name") == p.get("name") && q.get("in") == p.get("in")));
            params.push(p);
        }
    }
    let mut filled = path.to_owned();
    let mut query = Vec::new();
    let mut key_required = None;
    for p in &params {
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        let required = p.get("required").and_then(Value::as_bool).unwrap_or(false);
        match p.get("in").and_then(Value::as_str) {
            Some("path") => match example_text(doc, p) {
                Some(v) => filled = filled.replace(&format!("{{{name}}}"), &encode(&v)),
                None => {
                    path_skip.get_or_insert(format!("no example for the path parameter {name:?}"));
                }
            },
            Some("query") if required => match example_text(doc, p) {
                Some(v) => query.push(format!("{}={}", encode(name), encode(&v))),
                None => {
                    path_skip.get_or_insert(format!("no example for the query parameter {name:?}"));
                }
            },
            Some("header") if name.eq_ignore_ascii_case(&key_header) => {
                key_required = Some(required);
            }
            _ => {}
        }
    }
    if !query.is_empty() {
        filled.push(if filled.contains('?') { '&' } else { '?' });
        filled.push_str(&query.join("&"));
    }
    let mut headers = BTreeMap::new();
    let mut body = None;
    if let Some(rb) = op.get("requestBody") {
        let rb = resolve(doc, rb);
        let required = rb.get("required").and_then(Value::as_bool).unwrap_or(false);
        if let Some(content) = rb.get("content").and_then(Value::as_object) {
            let chosen = content
                .iter()
                .find(|(t, _)| t.as_str() == "application/json")
                .or_else(|| content.iter().find(|(t, _)| t.ends_with("+json")))
                .or_else(|| content.iter().next());
            if let Some((media_type, media)) = chosen {
                let media = resolve(doc, media);
                match media_example(doc, media) {
                    Some(Value::String(s)) if !media_type.contains("json") => body = Some(s),
                    Some(v) => body = Some(v.to_string()),
                    None if required => {
                        body_skip = Some("no example for the request body".to_owned());
                    }
                    None => {}
                }
                headers.insert("content-type".to_owned(), media_type.clone());
            }
        }
    }
    headers.extend(ext.headers);
    // The extension's own path or body makes up for what the document lacks.
    if ext.body.is_some() {
        body = ext.body;
        body_skip = None;
    }
    let path = match ext.path {
        Some(p) => {
            path_skip = None;
            p
        }
        None => {
            if filled.contains('{') {
                path_skip.get_or_insert("a path parameter has no example".to_owned());
            }
            filled
        }
    };
    let skip = path_skip.or(body_skip);
    Operation {
        name,
        method: ext.method.unwrap_or(upper),
        // A path left with `{param}` cannot be sent; it is skipped, so make it valid.
        path: if path.contains('{') {
            path.replace(['{', '}'], "_")
        } else {
            path
        },
        body,
        headers,
        effect_probe: ext.effect_probe,
        identity: ext.identity,
        volatile: ext.volatile.unwrap_or_default(),
        slow_path: ext.slow_path,
        transient_path: ext.transient_path,
        mismatch_body: ext.mismatch_body,
        etag: ext.etag.unwrap_or(false),
        read_path: ext.read_path,
        key_header: ext.key_header,
        key_required: ext.key_required.or(key_required.filter(|r| *r)),
        skip,
    }
}

/// Follows local `$ref`s (at most 16 hops); anything else is returned as is.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..16 {
        let Some(r) = v.get("$ref").and_then(Value::as_str) else {
            return v;
        };
        let Some(pointer) = r.strip_prefix('#') else {
            return v;
        };
        match doc.pointer(pointer) {
            Some(target) => v = target,
            None => return v,
        }
    }
    v
}

/// A parameter's example as text.
fn example_text(doc: &Value, param: &Value) -> Option<String> {
    let v = param
        .get("example")
        .cloned()
        .or_else(|| first_example(doc, param))
        .or_else(|| {
            let schema = resolve(doc, param.get("schema")?);
            schema
                .get("example")
                .or_else(|| schema.get("default"))
                .or_else(|| schema.get("enum")?.get(0))
                .cloned()
        })?;
    Some(match v {
        Value::String(s) => s,
        other => other.to_string(),
    })
}

/// Percent-encodes every byte but the unreserved ones (RFC 3986: letters, digits, `-._~`), so an
/// example value is one path segment or one query value, whatever it holds.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A media type's example: `example`, first of `examples`, or `schema.example`.
fn media_example(doc: &Value, media: &Value) -> Option<Value> {
    media
        .get("example")
        .cloned()
        .or_else(|| first_example(doc, media))
        .or_else(|| resolve(doc, media.get("schema")?).get("example").cloned())
}

fn first_example(doc: &Value, holder: &Value) -> Option<Value> {
    let (_, example) = holder.get("examples")?.as_object()?.iter().next()?;
    resolve(doc, example).get("value").cloned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DOC: &str = r##"{
      "openapi": "3.1.0",
      "x-idempotency": { "headers": { "accept": "application/json" } },
      "components": {
        "requestBodies": { "Account": { "required": true, "content": { "application/json": {
          "schema": { "$ref": "#/components/schemas/Account" } } } } },
        "schemas": { "Account": { "type": "object", "example": { "balance": 5 } } },
        "parameters": { "Key": { "name": "Idempotency-Key", "in": "header", "required": true } }
      },
      "paths": {
        "/accounts/{id}": {
          "parameters": [ { "name": "id", "in": "path", "required": true, "schema": { "example": "acct-1" } } ],
          "get": { "operationId": "getAccount" },
          "put": {
            "operationId": "putAccount",
            "parameters": [ { "$ref": "#/components/parameters/Key" } ],
            "requestBody": { "$ref": "#/components/requestBodies/Account" },
            "x-idempotency": { "etag": true }
          }
        },
        "/refunds": {
          "post": { "requestBody": { "required": true, "content": { "application/json": { "schema": {} } } } }
        },
        "/internal": { "post": { "x-idempotency": false } },
        "/search": { "post": {
          "parameters": [ { "name": "q", "in": "query", "required": true, "examples": { "one": { "value": "shoes" } } } ],
          "requestBody": { "content": { "text/plain": { "example": "plain text" } } }
        } }
      }
    }"##;

    #[test]
    fn operations_examples_refs_and_extensions_are_read() {
        let spec = Spec::from_openapi_str(DOC).unwrap();
        let names: Vec<_> = spec.operations.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["putAccount", "POST /refunds", "POST /search"]);
        let put = &spec.operations[0];
        assert_eq!(put.method, "PUT");
        assert_eq!(put.path, "/accounts/acct-1");
        assert_eq!(put.body.as_deref(), Some(r#"{"balance":5}"#));
        assert!(put.etag);
        assert_eq!(put.key_required, Some(true));
        assert_eq!(put.skip, None);
        let refunds = &spec.operations[1];
        assert_eq!(
            refunds.skip.as_deref(),
            Some("no example for the request body")
        );
        let search = &spec.operations[2];
        assert_eq!(search.path, "/search?q=shoes");
        assert_eq!(search.body.as_deref(), Some("plain text"));
        assert_eq!(search.headers["content-type"], "text/plain");
        assert_eq!(spec.defaults.headers["accept"], "application/json");
    }

    #[test]
    fn not_openapi_3_is_refused() {
        let err = Spec::from_openapi_str(r#"{"swagger": "2.0", "paths": {}}"#).unwrap_err();
        assert!(err.to_string().contains("OpenAPI 3"), "{err}");
        let err = Spec::from_openapi_str(r#"{"openapi": "3.0.0", "paths": {"/x": {"get": {}}}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("no POST, PUT or PATCH"), "{err}");
    }

    #[cfg(feature = "yaml")]
    #[test]
    fn yaml_documents_are_read() {
        let spec = Spec::from_openapi_str(
            "openapi: 3.0.3\npaths:\n  /orders:\n    post:\n      requestBody:\n        content:\n          application/json:\n            example: {amount: 10}\n",
        )
        .unwrap();
        assert_eq!(spec.operations[0].body.as_deref(), Some(r#"{"amount":10}"#));
    }
}
