//! The SDK client: configuration, an HTTP(S) client on rustls with *ring*, and an interceptor
//! that counts requests and measures the clock skew against DynamoDB's `Date` header.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::config::interceptors::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Credentials, Intercept, Region, RuntimeComponents};
use aws_smithy_http_client::tls;
use aws_smithy_types::config_bag::{Storable, StoreReplace};
use idemgate_core::error::{ErrorKind, StoreError};

/// How long connecting to DynamoDB may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a request may take in all, its retries included: a last resort for callers without
/// a deadline of their own. The proxy's deadline (`--store-timeout`) is shorter and ends an
/// operation first. There is no shorter per-attempt timeout: the SDK does not retry an attempt
/// that timed out, so one would only turn a slow answer into an error before the caller's
/// deadline.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per request (the SDK's standard retry mode: throttling and transient errors).
pub const MAX_ATTEMPTS: u32 = 3;
/// The first retry's backoff (full jitter, doubling): small, so that every attempt fits well
/// inside the proxy's store deadline (3 s by default) instead of the SDK's default of 1 s,
/// whose sleeps alone could outlast it.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(25);
/// The longest backoff between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Request counts and the measured clock skew, shared by the store and its interceptor.
#[derive(Debug)]
pub(crate) struct Counters {
    /// The table, as the label of the skew gauge.
    pub table: String,
    /// HTTP requests sent (every attempt, retries included).
    pub requests: AtomicU64,
    /// What the answers' `Date` headers prove about DynamoDB's clock minus ours.
    pub skew: Mutex<SkewWindow>,
}

impl Counters {
    pub(crate) fn new(table: &str) -> Self {
        Self {
            table: table.to_owned(),
            requests: AtomicU64::new(0),
            skew: Mutex::new(SkewWindow::default()),
        }
    }

    /// DynamoDB's clock minus ours, in ms, as an interval `(lo, hi)` the true skew lies in
    /// (`None`: nothing measured yet).
    pub(crate) fn skew_bounds(&self) -> Option<(i64, i64)> {
        self.skew.lock().ok().and_then(|w| w.bounds())
    }
}

/// How long one window of skew samples lasts: the bounds are intersected within a window and
/// start again in the next one (so a clock that is stepped is seen within two windows).
const SKEW_WINDOW: Duration = Duration::from_secs(60);
/// How often a skew past [`SKEW_WARNING`](crate::SKEW_WARNING) is logged, at most.
const SKEW_WARN_EVERY: Duration = Duration::from_secs(60);

/// The skew interval of the current and the previous window.
///
/// `Date` has a resolution of one second and was written somewhere between our sending the
/// request and our receiving the answer, so one answer proves only that the skew lies in
/// `(date − received, date + 1 s − sent)`; intersecting the intervals of many answers (whose
/// sub-second phases differ) narrows it to about a round trip.
#[derive(Debug, Default)]
pub(crate) struct SkewWindow {
    started: Option<Instant>,
    current: Option<(i64, i64)>,
    previous: Option<(i64, i64)>,
    last_warning: Option<Instant>,
}

impl SkewWindow {
    /// Adds one answer's interval; returns the proven skew (the bound nearest zero, 0 when the
    /// interval contains zero) when it is past the warning threshold and a warning is due.
    pub(crate) fn add(&mut self, lo: i64, hi: i64, now: Instant) -> Option<i64> {
        let stale = self
            .started
            .is_none_or(|started| now.saturating_duration_since(started) >= SKEW_WINDOW);
        let merged = match self.current {
            Some((a, b)) if !stale && lo.max(a) <= hi.min(b) => (lo.max(a), hi.min(b)),
            _ => {
                // A new window; or the clocks stepped (the intervals no longer meet), which
                // makes the previous window's interval stale too.
                self.previous = if stale { self.current } else { None };
                self.started = Some(now);
                (lo, hi)
            }
        };
        self.current = Some(merged);
        let proven = proven_skew(merged);
        let limit = i64::try_from(crate::SKEW_WARNING.as_millis()).unwrap_or(i64::MAX);
        let due = self
            .last_warning
            .is_none_or(|at| now.saturating_duration_since(at) >= SKEW_WARN_EVERY);
        if proven.unsigned_abs() > limit.unsigned_abs() && due {
            self.last_warning = Some(now);
            return Some(proven);
        }
        None
    }

    /// The narrower of the current and the previous window's intervals.
    pub(crate) fn bounds(&self) -> Option<(i64, i64)> {
        match (self.current, self.previous) {
            (Some(c), Some(p)) if p.1.saturating_sub(p.0) < c.1.saturating_sub(c.0) => Some(p),
            (Some(c), _) => Some(c),
            (None, p) => p,
        }
    }
}

/// The smallest skew an interval proves: its bound nearest zero, or 0 when it contains zero.
pub(crate) fn proven_skew((lo, hi): (i64, i64)) -> i64 {
    if lo > 0 {
        lo
    } else if hi < 0 {
        hi
    } else {
        0
    }
}

/// When this attempt was sent (our wall clock, ms), kept in the request's config bag.
#[derive(Clone, Copy, Debug)]
struct SentAt(i64);

impl Storable for SentAt {
    type Storer = StoreReplace<Self>;
}

fn wall_ms() -> i64 {
    i64::try_from(idemgate_core::clock::wall_clock().as_millis()).unwrap_or(i64::MAX)
}

#[derive(Debug)]
struct Observe(Arc<Counters>);

impl Intercept for Observe {
    fn name(&self) -> &'static str {
        "idemgate-observe"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        cfg.interceptor_state().store_put(SentAt(wall_ms()));
        Ok(())
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let received = wall_ms();
        let sent = cfg.load::<SentAt>().map_or(received, |s| s.0.min(received));
        let date = context.response().headers().get("date");
        if let Some(server) = date.and_then(|d| {
            aws_sdk_dynamodb::primitives::DateTime::from_str(
                d,
                aws_sdk_dynamodb::primitives::DateTimeFormat::HttpDate,
            )
            .ok()
        }) && let Ok(server_ms) = server.to_millis()
        {
            // The server's time was in [date, date + 1 s) at a moment between `sent` and
            // `received` of ours.
            let lo = server_ms.saturating_sub(received);
            let hi = server_ms.saturating_add(1_000).saturating_sub(sent);
            let warning = match self.0.skew.lock() {
                Ok(mut window) => {
                    let warning = window.add(lo, hi, Instant::now());
                    if let Some((lo, hi)) = window.bounds() {
                        metrics::gauge!("idemgate_dynamodb_clock_skew_seconds", "table" => self.0.table.clone())
                            .set(lo.saturating_add(hi) as f64 / 2_000.0);
                    }
                    warning
                }
                Err(_) => None,
            };
            if let Some(skew) = warning {
                tracing::warn!(table = %self.0.table, skew_ms = skew,
                    "this instance's clock differs from DynamoDB's by at least {skew} ms: leases \
                     and expiry are judged by the instances' clocks, which must agree within \
                     the lease margin (lease − 2·lease/3 − store timeout; see \
                     idemgate-store-dynamodb's docs on clock skew); check NTP");
            }
        }
        Ok(())
    }
}

/// Whether `endpoint` is `http://` to a host other than loopback.
pub(crate) fn cleartext_to_another_host(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !loopback
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleartext_endpoints_to_other_hosts_are_told_apart() {
        for local in [
            "http://127.0.0.1:8000",
            "http://localhost:8000/",
            "http://[::1]:8000",
            "https://dynamodb.example.com",
        ] {
            assert!(!cleartext_to_another_host(local), "{local}");
        }
        for remote in ["http://10.0.0.5:8000", "http://dynamodb.internal/x"] {
            assert!(cleartext_to_another_host(remote), "{remote}");
        }
    }
}

/// Where and as whom to connect.
#[derive(Clone, Debug, Default)]
pub(crate) struct Connection {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub credentials: Option<Credentials>,
    /// Extra interceptors (fault injection in tests).
    pub interceptors: Vec<aws_sdk_dynamodb::config::SharedInterceptor>,
}

/// A DynamoDB client for `conn`, counting into `counters`.
pub(crate) async fn client(
    conn: &Connection,
    counters: Arc<Counters>,
) -> Result<aws_sdk_dynamodb::Client, StoreError> {
    // rustls with *ring* (no C toolchain needed beyond ring's own), HTTP and HTTPS, HTTP/1.1
    // and HTTP/2; trust roots from the operating system.
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(region) = &conn.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(credentials) = &conn.credentials {
        loader = loader.credentials_provider(credentials.clone());
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        return Err(StoreError::new(
            ErrorKind::Config,
            "no AWS region: give one in the store URL (?region=eu-west-1) or set AWS_REGION",
        ));
    }
    let mut config = aws_sdk_dynamodb::config::Builder::from(&sdk)
        .retry_config(
            aws_sdk_dynamodb::config::retry::RetryConfig::standard()
                .with_max_attempts(MAX_ATTEMPTS)
                .with_initial_backoff(INITIAL_BACKOFF)
                .with_max_backoff(MAX_BACKOFF),
        )
        .timeout_config(
            aws_sdk_dynamodb::config::timeout::TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        )
        .interceptor(Observe(counters));
    for extra in &conn.interceptors {
        config.push_interceptor(extra.clone());
    }
    if let Some(endpoint) = &conn.endpoint {
        if cleartext_to_another_host(endpoint) {
            tracing::warn!(
                "the DynamoDB endpoint is plain http:// to a host that is not this machine: \
                 request signatures, session tokens and stored responses cross the network \
                 unencrypted (use https://)"
            );
        }
        config = config.endpoint_url(endpoint.clone());
    }
    Ok(aws_sdk_dynamodb::Client::from_conf(config.build()))
}
