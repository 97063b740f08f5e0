//! The SDK client: configuration, an HTTP(S) client on rustls with *ring*, and an interceptor
//! that counts requests and measures the clock skew against DynamoDB's `Date` header.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_dynamodb::config::interceptors::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Credentials, Intercept, Region, RuntimeComponents};
use aws_smithy_http_client::tls;
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

/// Request counts and the last measured clock skew, shared by the store and its interceptor.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// HTTP requests sent (every attempt, retries included).
    pub requests: AtomicU64,
    /// DynamoDB's clock minus ours, in ms, from the last answer's `Date` header
    /// (`i64::MIN`: not measured yet).
    pub skew_ms: AtomicI64,
}

impl Counters {
    pub(crate) fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            skew_ms: AtomicI64::new(i64::MIN),
        }
    }
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
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let date = context.response().headers().get("date");
        if let Some(server) = date.and_then(|d| {
            aws_sdk_dynamodb::primitives::DateTime::from_str(
                d,
                aws_sdk_dynamodb::primitives::DateTimeFormat::HttpDate,
            )
            .ok()
        }) {
            // `Date` has a resolution of one second: the server's time lies in [date, date + 1s).
            let server_ms = server.to_millis().unwrap_or(0).saturating_add(500);
            let ours =
                i64::try_from(idemgate_core::clock::wall_clock().as_millis()).unwrap_or(i64::MAX);
            self.0
                .skew_ms
                .store(server_ms.saturating_sub(ours), Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Where and as whom to connect.
#[derive(Clone, Debug, Default)]
pub(crate) struct Connection {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub credentials: Option<Credentials>,
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
                .with_max_attempts(MAX_ATTEMPTS),
        )
        .timeout_config(
            aws_sdk_dynamodb::config::timeout::TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        )
        .interceptor(Observe(counters));
    if let Some(endpoint) = &conn.endpoint {
        config = config.endpoint_url(endpoint.clone());
    }
    Ok(aws_sdk_dynamodb::Client::from_conf(config.build()))
}
