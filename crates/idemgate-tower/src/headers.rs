//! Which response headers are stored and replayed, and how a replay is built.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use idemgate_core::record::StoredResponse;

use crate::body::{IdemBody, full};

/// `Idempotent-Replayed`, set to `true` on every replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");
/// `Idempotency-Key`, read from requests and forwarded upstream.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `Idempotency-Epoch`, forwarded upstream: 1 for the first dispatch, +1 per takeover.
pub const IDEMPOTENCY_EPOCH: HeaderName = HeaderName::from_static("idempotency-epoch");

/// Hop-by-hop headers (RFC 9110 §7.6.1), never stored, never replayed.
pub const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` is hop-by-hop, either by definition or because `Connection` lists it.
pub fn is_hop_by_hop(name: &HeaderName, headers: &HeaderMap) -> bool {
    HopByHop::of(headers).contains(name)
}

/// The hop-by-hop test for every header of one map: its `Connection` tokens are read once, not
/// once per header (no allocation when it has none).
struct HopByHop<'a> {
    listed: Vec<&'a str>,
}

impl<'a> HopByHop<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        let listed = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        Self { listed }
    }

    fn contains(&self, name: &HeaderName) -> bool {
        HOP_BY_HOP.contains(&name.as_str())
            || self
                .listed
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_str()))
    }
}

/// Removes hop-by-hop headers (for proxies).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let hop = HopByHop::of(headers);
    let listed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| hop.contains(n))
        .cloned()
        .collect();
    for name in listed {
        headers.remove(name);
    }
}

/// The headers worth storing: everything but hop-by-hop headers, `content-length` (recomputed on
/// replay) and the `deny` list (lower-case names; `set-cookie` by default); when `allow` is given,
/// only the headers it names.
pub fn storable(
    headers: &HeaderMap,
    allow: Option<&[String]>,
    deny: &[String],
) -> Vec<(String, Bytes)> {
    let hop = HopByHop::of(headers);
    headers
        .iter()
        .filter(|(name, _)| {
            !hop.contains(name)
                && *name != header::CONTENT_LENGTH
                && !deny.iter().any(|d| d == name.as_str())
                && allow.is_none_or(|a| a.iter().any(|h| h == name.as_str()))
        })
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

/// The replay of a stored response: its status, headers and byte-identical body, plus
/// `Idempotent-Replayed: true`.
pub fn replay(stored: &StoredResponse) -> Response<IdemBody> {
    let mut res = Response::new(full(stored.body.clone()));
    *res.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let headers = res.headers_mut();
    for (name, value) in &stored.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(n, v);
        }
    }
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_removes_every_connection_listed_header_across_lines_and_cases() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static(" X-Private , ,"));
        h.append("connection", HeaderValue::from_static("x-other"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("2"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("3"));
        assert!(is_hop_by_hop(&HeaderName::from_static("x-other"), &h));
        assert!(!is_hop_by_hop(&HeaderName::from_static("x-kept"), &h));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn storable_drops_hop_by_hop_cookies_and_connection_listed_headers() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("set-cookie", HeaderValue::from_static("session=secret"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("10"));
        h.append("x-multi", HeaderValue::from_static("a"));
        h.append("x-multi", HeaderValue::from_static("b"));
        let kept = storable(&h, None, &["set-cookie".into()]);
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-multi", "x-multi"]);
        let allow = ["x-multi".to_string(), "set-cookie".to_string()];
        let kept = storable(&h, Some(&allow), &["set-cookie".into()]);
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-multi", "x-multi"], "deny wins over allow");
    }
}
