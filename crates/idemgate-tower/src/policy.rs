//! Which requests are protected, and how: per-route policy and route matching.
//!
//! ```
//! use idemgate_tower::policy::{RoutePolicy, Routes};
//! use http::Method;
//!
//! let routes = Routes::new(vec![
//!     RoutePolicy::new("payments", "/v1/payments/**").required(true),
//!     RoutePolicy::new("refunds", "/v1/charges/*/refund"),
//! ]);
//! assert_eq!(routes.find(&Method::POST, "/v1/payments/abc/capture").unwrap().name, "payments");
//! assert_eq!(routes.find(&Method::POST, "/v1/charges/ch_1/refund").unwrap().name, "refunds");
//! assert!(routes.find(&Method::GET, "/v1/payments/abc").is_none()); // GET is not covered
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use idemgate_core::engine::{Concurrency, Policy, Recovery};
use idemgate_core::fingerprint::FingerprintOptions;

/// Statuses released (not stored) by default: the upstream said "try again".
pub const DEFAULT_TRANSIENT: [u16; 6] = [408, 425, 429, 502, 503, 504];

/// Default request and response body limit: 8 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 8 * 1024 * 1024;

/// What happens when the store cannot be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailMode {
    /// Answer `503` and forward nothing (default).
    Closed,
    /// Forward the request without protection.
    Open,
}

/// A path pattern: literal segments, `*` for exactly one segment, and a trailing `**` for any rest
/// (including nothing). `/**` matches every path.
///
/// `**` anywhere but last (`/a/**/b`) and a `*` inside a segment (`/v1/pay*`) are refused
/// ([`PathPattern::parse`]): neither is implemented, and taking them as something else would
/// cover other requests than the ones meant.
///
/// ```
/// use idemgate_tower::policy::PathPattern;
///
/// assert!(PathPattern::parse("/v1/charges/*/refund").is_ok());
/// let err = PathPattern::parse("/a/**/b").unwrap_err();
/// assert!(err.to_string().contains("only as the last segment"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    raw: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

/// Why a path pattern was refused ([`PathPattern::parse`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{reason} (in {pattern:?}); a pattern is literal segments, `*` for exactly one segment \
         and a final `**` for the rest, e.g. /v1/payments/** or /v1/charges/*/refund"
)]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl PathPattern {
    /// Parses a pattern; `**` anywhere but last, and `*` mixed with other characters in a
    /// segment, are refused.
    pub fn parse(pattern: &str) -> Result<Self, PatternError> {
        let parts: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
        let last = parts.len() - 1;
        let refuse = |reason| PatternError {
            pattern: pattern.to_owned(),
            reason,
        };
        let segments = parts
            .iter()
            .enumerate()
            .map(|(i, p)| match *p {
                "**" if i == last => Ok(Segment::Rest),
                "**" => Err(refuse(
                    "`**` is allowed only as the last segment (it matches the rest of the path)",
                )),
                "*" => Ok(Segment::One),
                lit if lit.contains('*') => Err(refuse(
                    "`*` must be a whole segment (it matches exactly one segment; there is no \
                     prefix or suffix matching)",
                )),
                lit => Ok(Segment::Literal(lit.to_owned())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            raw: pattern.to_owned(),
            segments,
        })
    }

    /// Parses a pattern.
    ///
    /// # Panics
    ///
    /// On a pattern [`PathPattern::parse`] refuses (a configuration mistake, like an invalid
    /// header name in [`RoutePolicy`]): parse patterns from configuration files with `parse`.
    pub fn new(pattern: &str) -> Self {
        match Self::parse(pattern) {
            Ok(p) => p,
            Err(e) => panic!("invalid path pattern: {e}"),
        }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        let mut parts = path.trim_start_matches('/').split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// The settings of one protected route.
#[derive(Clone, Debug)]
pub struct RoutePolicy {
    /// The route's name: part of the scope, and a metrics label.
    pub name: String,
    /// Methods covered (default POST and PATCH).
    pub methods: BTreeSet<Method>,
    /// Which paths.
    pub path: PathPattern,
    /// A covered request without a key gets `400` (true) or passes through unprotected (false).
    pub required: bool,
    /// Record TTL, wait or reject, takeover or strict.
    pub engine: Policy,
    /// How requests are fingerprinted.
    pub fingerprint: FingerprintOptions,
    /// Request headers included in the fingerprint (lower case; default `content-type`).
    pub fingerprint_headers: Vec<String>,
    /// Headers whose values identify the principal (lower case; default `authorization`).
    pub scope_headers: Vec<String>,
    /// Upstream statuses that are released rather than stored.
    pub transient_statuses: BTreeSet<u16>,
    /// Larger request bodies get `413` before anything is claimed.
    pub max_request_body: usize,
    /// Larger response bodies are passed through once and recorded as "not replayable".
    pub max_response_body: usize,
    /// Response headers never stored or replayed, besides the hop-by-hop ones (lower case;
    /// default `set-cookie`).
    pub deny_response_headers: Vec<String>,
    /// If set, only these response headers are stored (lower case); the deny list and hop-by-hop
    /// headers are dropped even when listed here. Default: unset (every header not denied).
    pub allow_response_headers: Option<Vec<String>>,
    /// When the store fails.
    pub fail_mode: FailMode,
}

impl RoutePolicy {
    /// A route with the defaults of PRODUCT §3 and §6.
    ///
    /// # Panics
    ///
    /// On a path pattern [`PathPattern::parse`] refuses (e.g. `/a/**/b`).
    pub fn new(name: impl Into<String>, path: &str) -> Self {
        let name = name.into();
        Self {
            engine: Policy {
                name: name.as_str().into(),
                ..Policy::default()
            },
            name,
            methods: [Method::POST, Method::PATCH].into_iter().collect(),
            path: PathPattern::new(path),
            required: false,
            fingerprint: FingerprintOptions::default(),
            fingerprint_headers: vec!["content-type".into()],
            scope_headers: vec!["authorization".into()],
            transient_statuses: DEFAULT_TRANSIENT.into_iter().collect(),
            max_request_body: DEFAULT_BODY_LIMIT,
            max_response_body: DEFAULT_BODY_LIMIT,
            deny_response_headers: vec!["set-cookie".into()],
            allow_response_headers: None,
            fail_mode: FailMode::Closed,
        }
    }

    /// Sets the covered methods.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Whether the key is required.
    pub fn required(mut self, required: bool) -> Self {
        self.required = required;
        self
    }

    /// Record TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.engine.ttl = ttl;
        self
    }

    /// Wait (with a timeout) or reject.
    pub fn concurrency(mut self, c: Concurrency) -> Self {
        self.engine.concurrency = c;
        self
    }

    /// Takeover or strict recovery.
    pub fn recovery(mut self, r: Recovery) -> Self {
        self.engine.recovery = r;
        self
    }

    /// Fingerprint options.
    pub fn fingerprint(mut self, f: FingerprintOptions) -> Self {
        self.fingerprint = f;
        self
    }

    /// Body limits (request, response).
    pub fn body_limits(mut self, request: usize, response: usize) -> Self {
        self.max_request_body = request;
        self.max_response_body = response;
        self
    }

    /// Failure mode when the store is unreachable.
    pub fn fail_mode(mut self, mode: FailMode) -> Self {
        self.fail_mode = mode;
        self
    }

    /// Principal headers.
    pub fn scope_headers(mut self, headers: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.scope_headers = lower(headers);
        self
    }

    /// Request headers whose values enter the fingerprint (trimmed, lower-cased).
    pub fn fingerprint_headers(
        mut self,
        headers: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.fingerprint_headers = lower(headers);
        self
    }

    /// Transient statuses.
    pub fn transient_statuses(mut self, statuses: impl IntoIterator<Item = u16>) -> Self {
        self.transient_statuses = statuses.into_iter().collect();
        self
    }

    /// Response headers never stored.
    pub fn deny_response_headers(
        mut self,
        headers: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.deny_response_headers = lower(headers);
        self
    }

    /// Store only these response headers.
    pub fn allow_response_headers(
        mut self,
        headers: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.allow_response_headers = Some(lower(headers));
        self
    }

    /// Whether this route covers `method` on `path`.
    pub fn covers(&self, method: &Method, path: &str) -> bool {
        self.methods.contains(method) && self.path.matches(path)
    }
}

/// Header names as the request/response maps spell them: trimmed and lower-cased, so that
/// `"authorization, x-tenant-id"` split on commas still names `x-tenant-id` (a name that matches no
/// header would silently merge every tenant into one scope). Empty entries are dropped.
///
/// # Panics
///
/// If an entry is not a valid header name: a configuration mistake, which must stop the service
/// at start-up rather than weaken isolation. (`idemgate serve` validates its settings first and
/// reports such a mistake as an error.)
fn lower(items: impl IntoIterator<Item = impl Into<String>>) -> Vec<String> {
    items
        .into_iter()
        .map(|h| h.into().trim().to_ascii_lowercase())
        .filter(|h| !h.is_empty())
        .inspect(|h| {
            assert!(
                http::HeaderName::from_bytes(h.as_bytes()).is_ok(),
                "invalid header name {h:?} in a route's header list"
            );
        })
        .collect()
}

/// The routes, tried in order; the first that covers a request applies.
#[derive(Clone, Debug, Default)]
pub struct Routes(Vec<Arc<RoutePolicy>>);

impl Routes {
    /// Routes tried in the given order. Each route's engine policy is named after the route
    /// (the `route` of the engine's warnings), whatever it was named before.
    pub fn new(routes: Vec<RoutePolicy>) -> Self {
        Self(
            routes
                .into_iter()
                .map(|mut r| {
                    if *r.engine.name != *r.name {
                        r.engine.name = r.name.as_str().into();
                    }
                    Arc::new(r)
                })
                .collect(),
        )
    }

    /// The default of `idemgate serve` with no routes configured: POST and PATCH on every path,
    /// key optional (or `required`).
    pub fn catch_all(required: bool) -> Self {
        Self::new(vec![RoutePolicy::new("default", "/**").required(required)])
    }

    /// The first route covering the request.
    pub fn find(&self, method: &Method, path: &str) -> Option<&RoutePolicy> {
        self.find_shared(method, path).map(|r| &**r)
    }

    /// The first route covering the request, shared (a request holds it without copying it).
    pub(crate) fn find_shared(&self, method: &Method, path: &str) -> Option<&Arc<RoutePolicy>> {
        self.0.iter().find(|r| r.covers(method, path))
    }

    /// All routes.
    pub fn iter(&self) -> impl Iterator<Item = &RoutePolicy> {
        self.0.iter().map(|r| &**r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = PathPattern::new("/a/*/c");
        assert!(p.matches("/a/b/c"));
        assert!(!p.matches("/a/b/c/d"));
        assert!(!p.matches("/a/c"));
        let rest = PathPattern::new("/a/**");
        assert!(rest.matches("/a"));
        assert!(rest.matches("/a/b/c"));
        assert!(!rest.matches("/b"));
        assert!(PathPattern::new("/**").matches("/anything/at/all"));
        assert!(PathPattern::new("/exact").matches("/exact"));
        assert!(!PathPattern::new("/exact").matches("/exact/more"));
    }

    #[test]
    fn first_matching_route_wins() {
        let routes = Routes::new(vec![
            RoutePolicy::new("special", "/pay/special").required(true),
            RoutePolicy::new("pay", "/pay/**"),
        ]);
        assert_eq!(
            routes.find(&Method::POST, "/pay/special").unwrap().name,
            "special"
        );
        assert_eq!(routes.find(&Method::PATCH, "/pay/x").unwrap().name, "pay");
        assert!(routes.find(&Method::PUT, "/pay/x").is_none());
    }

    #[test]
    fn the_engine_policy_carries_the_route_name() {
        let mut renamed = RoutePolicy::new("old", "/**");
        renamed.name = "payments".into();
        let routes = Routes::new(vec![RoutePolicy::new("orders", "/o/**"), renamed]);
        let names: Vec<_> = routes.iter().map(|r| (&*r.engine.name, &*r.name)).collect();
        assert_eq!(names, [("orders", "orders"), ("payments", "payments")]);
    }

    #[test]
    fn header_lists_are_trimmed_and_lower_cased() {
        let p = RoutePolicy::new("r", "/**")
            .scope_headers(["Authorization", " X-Tenant-Id ", ""])
            .deny_response_headers(["Set-Cookie ", " x-secret"])
            .allow_response_headers([" Content-Type"]);
        assert_eq!(p.scope_headers, ["authorization", "x-tenant-id"]);
        assert_eq!(p.deny_response_headers, ["set-cookie", "x-secret"]);
        assert_eq!(
            p.allow_response_headers,
            Some(vec!["content-type".to_owned()])
        );
    }

    #[test]
    fn patterns_that_would_match_other_paths_than_meant_are_refused() {
        for bad in ["/a/**/b", "/**/x", "/v1/pay*", "/a/*b/c", "/a/***"] {
            let err = PathPattern::parse(bad).unwrap_err();
            assert_eq!(err.pattern, bad);
            assert!(err.to_string().contains("e.g. /v1/payments/**"), "{err}");
        }
        assert!(
            PathPattern::parse("/a/**/b")
                .unwrap_err()
                .reason
                .contains("only as the last segment")
        );
        for good in ["/**", "/a/**", "/a/*/b", "/exact", "/*"] {
            assert!(PathPattern::parse(good).is_ok(), "{good}");
        }
    }

    #[test]
    #[should_panic(expected = "invalid path pattern")]
    fn an_invalid_path_pattern_stops_the_configuration() {
        let _ = RoutePolicy::new("r", "/a/**/b");
    }

    #[test]
    #[should_panic(expected = "invalid header name")]
    fn an_invalid_header_name_stops_the_configuration() {
        let _ = RoutePolicy::new("r", "/**").scope_headers(["x tenant"]);
    }
}
