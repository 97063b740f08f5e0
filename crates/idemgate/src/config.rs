//! Settings: command-line flags > `IDEMGATE_*` environment variables > the TOML file > defaults.
//!
//! Everything is checked here, before anything starts: header names are trimmed, lower-cased and
//! parsed; durations, sizes and counts must lie within the bounds below (the flag help and the
//! README's "Limits and timeouts" table give them); a shared store (Redis, PostgreSQL, DynamoDB) needs an
//! explicit namespace. A refusal names the option as it was given (`--lease-ttl
//! (IDEMGATE_LEASE_TTL)`, `lease_ttl in FILE`, `ttl in route "pay"`) and the refused value.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::{HeaderName, Method};
use idemgate_core::engine::{Concurrency, Recovery};
use idemgate_core::fingerprint::{FingerprintOptions, JsonMode};
use idemgate_tower::policy::{
    DEFAULT_BODY_LIMIT, DEFAULT_TRANSIENT, FailMode, PathPattern, RoutePolicy, Routes,
};
use serde::Deserialize;

/// Flags of `idemgate serve`. Every one can also be set by its `IDEMGATE_*` variable and in the
/// config file (same name, `_` instead of `-`).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// Upstream base URL, e.g. `http://127.0.0.1:3000` or `https://api.internal` (required unless in
    /// the config file).
    #[arg(long, env = "IDEMGATE_UPSTREAM")]
    pub upstream: Option<String>,
    /// Proxy listen address, HOST:PORT: 127.0.0.1:8080, `[::1]:8080`, 0.0.0.0:8080 or
    /// localhost:8080 (a host name is resolved once at start-up; its first IPv4 address is
    /// bound, else its first IPv6 one) [default: 127.0.0.1:8080].
    #[arg(long, env = "IDEMGATE_LISTEN")]
    pub listen: Option<String>,
    /// Admin listen address (metrics, health, admin API, dashboard), HOST:PORT as --listen. Off
    /// loopback it needs an admin token (or --admin-insecure-no-auth) [default: 127.0.0.1:9090].
    #[arg(long, env = "IDEMGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// File holding the admin API's bearer token (preferred; surrounding whitespace is trimmed;
    /// read once at start-up). With a token, every admin endpoint but /healthz and /readyz needs
    /// `Authorization: Bearer TOKEN` (see the README's "Admin listener"). A token is 16 to 512
    /// characters of A-Z a-z 0-9 - . _ ~ + / (and = at the end), e.g. `openssl rand -hex 32`.
    #[arg(long, env = "IDEMGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin API's bearer token itself. Prefer --admin-token-file or the variable: a flag's
    /// value shows in `ps` and in shell history (a warning says so at start-up).
    #[arg(long, env = "IDEMGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Host names the admin listener answers to besides IP addresses and `localhost` (against
    /// DNS rebinding: a browser's request under any other name gets 403), comma-separated,
    /// without ports; `*.example.com` covers its subdomains, `*` any name [default: none].
    #[arg(
        long,
        alias = "admin-allowed-host",
        env = "IDEMGATE_ADMIN_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    pub admin_allowed_hosts: Option<Vec<String>>,
    /// Serve the admin API off loopback without a token (anyone who reaches the port can read
    /// records, delete keys and resolve outcomes): true, false, 1 or 0 [default: false].
    #[arg(long, env = "IDEMGATE_ADMIN_INSECURE_NO_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub admin_insecure_no_auth: Option<String>,
    /// Serve /metrics without the admin token (for scrapers that cannot send one; Prometheus
    /// can: `authorization: { credentials_file: … }`): true, false, 1 or 0 [default: false].
    #[arg(long, env = "IDEMGATE_ADMIN_PUBLIC_METRICS", num_args = 0..=1, default_missing_value = "true")]
    pub admin_public_metrics: Option<String>,
    /// Validate the configuration, print it as it takes effect (a config file; secrets left
    /// out) and exit: 0 if valid, 1 if not. Opens no store and binds no port.
    #[arg(long)]
    pub check_config: bool,
    /// Whether --admin-token was given on the command line (set by `main`, not a flag).
    #[arg(skip)]
    pub admin_token_on_command_line: bool,
    /// Store URL: memory://, file:PATH, redis://HOST:PORT, redis+cluster://H1:P1,H2:P2,
    /// postgres://USER@HOST/DB, dynamodb://TABLE?region=REGION[&endpoint=URL]; TLS:
    /// rediss://HOST:PORT[?ca_file=PATH], rediss+cluster://…, postgres://…?sslmode=verify-full&
    /// sslrootcert=PATH (README "TLS") [default: file:./idemgate-data].
    #[arg(long, env = "IDEMGATE_STORE")]
    pub store: Option<String>,
    /// TOML config file.
    #[arg(long, env = "IDEMGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// POST/PATCH without an Idempotency-Key get 400 (default route only): true, false, 1 or 0
    /// [default: false].
    #[arg(long, env = "IDEMGATE_REQUIRE_KEY", num_args = 0..=1, default_missing_value = "true")]
    pub require_key: Option<String>,
    /// Record namespace: unique per service. Required with a Redis, PostgreSQL or DynamoDB store, which
    /// several services may share: with one namespace they would replay each other's responses.
    /// The embedded and memory stores belong to one process [default there: default].
    #[arg(long, env = "IDEMGATE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Record TTL, e.g. 24h; 1s to 365d [default: 24h].
    #[arg(long, env = "IDEMGATE_TTL")]
    pub ttl: Option<String>,
    /// How long outcome-unknown records are kept; 1s to 365d [default: 24h].
    #[arg(long, env = "IDEMGATE_UNKNOWN_TTL")]
    pub unknown_ttl: Option<String>,
    /// Lease length, renewed every lease/3 while the upstream call runs; 1s to 1h (shorter is
    /// lost to one slow store round trip, longer blocks a dead instance's keys) [default: 10s].
    #[arg(long, env = "IDEMGATE_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// wait or reject [default: wait].
    #[arg(long, env = "IDEMGATE_CONCURRENCY")]
    pub concurrency: Option<String>,
    /// Longest wait for an in-flight duplicate before 409; 0 (409 at once) to 1h [default: 30s].
    #[arg(long, env = "IDEMGATE_WAIT_TIMEOUT")]
    pub wait_timeout: Option<String>,
    /// takeover or strict [default: takeover].
    #[arg(long, env = "IDEMGATE_RECOVERY")]
    pub recovery: Option<String>,
    /// closed (503 when the store is down) or open (forward unprotected) [default: closed].
    #[arg(long, env = "IDEMGATE_FAIL_MODE")]
    pub fail_mode: Option<String>,
    /// Request body limit, e.g. 8MiB; at most 1GiB (bodies are held in memory) [default: 8MiB].
    #[arg(long, env = "IDEMGATE_MAX_REQUEST_BODY")]
    pub max_request_body: Option<String>,
    /// Response body limit for storing, e.g. 8MiB; at most 1GiB [default: 8MiB].
    #[arg(long, env = "IDEMGATE_MAX_RESPONSE_BODY")]
    pub max_response_body: Option<String>,
    /// Upstream connect timeout; 1ms to 1h [default: 5s].
    #[arg(long, env = "IDEMGATE_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<String>,
    /// Upstream response timeout (whole response); 1ms to 1h [default: 60s].
    #[arg(long, env = "IDEMGATE_RESPONSE_TIMEOUT")]
    pub response_timeout: Option<String>,
    /// How long SIGTERM waits for in-flight requests; 0 (stop at once: in-flight keys wait out
    /// their lease, like after a crash) to 1h [default: 30s].
    #[arg(long, env = "IDEMGATE_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "IDEMGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Upstream statuses released instead of stored, comma-separated, each 100 to 599
    /// [default: 408,425,429,502,503,504].
    #[arg(long, env = "IDEMGATE_TRANSIENT_STATUSES", value_delimiter = ',')]
    pub transient_statuses: Option<Vec<String>>,
    /// Headers identifying the principal, comma-separated (names are trimmed and lower-cased; an
    /// invalid one is refused; empty: every caller shares one scope, with a warning)
    /// [default: authorization].
    #[arg(long, env = "IDEMGATE_SCOPE_HEADERS", value_delimiter = ',')]
    pub scope_headers: Option<Vec<String>>,
    /// Request headers included in the fingerprint, comma-separated (trimmed, lower-cased, an
    /// invalid name is refused) [default: content-type].
    #[arg(long, env = "IDEMGATE_FINGERPRINT_HEADERS", value_delimiter = ',')]
    pub fingerprint_headers: Option<Vec<String>>,
    /// Response headers never stored, comma-separated (trimmed, lower-cased, an invalid name is
    /// refused) [default: set-cookie].
    #[arg(long, env = "IDEMGATE_DENY_RESPONSE_HEADERS", value_delimiter = ',')]
    pub deny_response_headers: Option<Vec<String>>,
    /// If set, only these response headers are stored, comma-separated (trimmed, lower-cased, an
    /// invalid name is refused) [default: all not denied].
    #[arg(long, env = "IDEMGATE_ALLOW_RESPONSE_HEADERS", value_delimiter = ',')]
    pub allow_response_headers: Option<Vec<String>>,
    /// Fingerprint JSON bodies in RFC 8785 canonical form: true, false, 1 or 0 [default: false].
    #[arg(long, env = "IDEMGATE_CANONICAL_JSON", num_args = 0..=1, default_missing_value = "true")]
    pub canonical_json: Option<String>,
    /// JSON pointers left out of the fingerprint, comma-separated, each starting with `/`
    /// (with --canonical-json).
    #[arg(long, env = "IDEMGATE_IGNORE_JSON_FIELDS", value_delimiter = ',')]
    pub ignore_json_fields: Option<Vec<String>>,
    /// Completed records cached per instance in front of a shared store (0 disables; a delete
    /// made through another instance is seen within 30 s); at most 10000000 [default: 100000].
    #[arg(long, env = "IDEMGATE_REPLAY_CACHE_ENTRIES")]
    pub replay_cache_entries: Option<String>,
    /// Records read per second by the scan that counts the store's outcome-unknown records (the
    /// idemgate_outcome_unknown_records gauge; see docs/operations.md); 0 turns it off; at most
    /// 1000000 [default: 1000].
    #[arg(long, env = "IDEMGATE_UNKNOWN_SCAN_RATE")]
    pub unknown_scan_rate: Option<String>,
    /// First pause between a waiter's store polls (doubling up to --waiter-poll-max); 1ms to 1h,
    /// not above --waiter-poll-max [default: 50ms].
    #[arg(long, env = "IDEMGATE_WAITER_POLL_MIN")]
    pub waiter_poll_min: Option<String>,
    /// Longest pause between a waiter's store polls (the fallback when no completion notice
    /// arrives); 1ms to 1h [default: 1s].
    #[arg(long, env = "IDEMGATE_WAITER_POLL_MAX")]
    pub waiter_poll_max: Option<String>,
    /// Most requests waiting on in-flight duplicates at once; 1 to 1000000 (use --concurrency
    /// reject for no waiting) [default: 10000].
    #[arg(long, env = "IDEMGATE_MAX_WAITERS")]
    pub max_waiters: Option<String>,
    /// Proxy worker threads, each serving its share of the connections on its own
    /// single-threaded runtime; 1 to 1024 [default: one per CPU].
    #[arg(long, env = "IDEMGATE_WORKERS")]
    pub workers: Option<String>,
    /// Deadline of every store operation; past it a request gets 503 store-unavailable (nothing
    /// forwarded) and a renewal is retried [default: 3s, or 3/10 of a shorter lease; 10ms to 60s,
    /// under lease_ttl/3].
    #[arg(long, env = "IDEMGATE_STORE_TIMEOUT")]
    pub store_timeout: Option<String>,
    /// OpenTelemetry traces (`--otel`).
    #[command(flatten)]
    pub otel: crate::traces::OtelArgs,

    // --- HTTP edge: limits and timeouts (README "Limits and timeouts") ---
    /// Longest time an idle upstream connection is kept for reuse; kept below the upstreams'
    /// own keep-alive timeouts (gunicorn 2s, Node/uvicorn/Apache 5s), and shortened further by a
    /// `Keep-Alive: timeout=N` response header [default: 500ms].
    #[arg(long, env = "IDEMGATE_UPSTREAM_IDLE_TIMEOUT")]
    pub upstream_idle_timeout: Option<String>,
    /// Longest time for a client's request head, from the connection's start or the previous
    /// response (so also the keep-alive idle timeout); the connection is then closed
    /// [default: 10s].
    #[arg(long, env = "IDEMGATE_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<String>,
    /// Longest time for a client's whole request body, from its head; then 408 [default: 30s].
    #[arg(long, env = "IDEMGATE_BODY_READ_TIMEOUT")]
    pub body_read_timeout: Option<String>,
    /// Most open client connections; a connection over it gets 503 + Retry-After and is closed
    /// [default: 10000].
    #[arg(long, env = "IDEMGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<String>,
    /// Most protected (keyed) requests in progress at once; beyond it 503 + Retry-After
    /// [default: 4096].
    #[arg(long, env = "IDEMGATE_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<String>,
    /// Most bytes of protected request bodies buffered at once, over all requests; a request
    /// that cannot reserve its body gets 503 + Retry-After [default: 256MiB].
    #[arg(long, env = "IDEMGATE_MAX_BUFFERED_BODY_BYTES")]
    pub max_buffered_body_bytes: Option<String>,

    // --- TLS (README "TLS") ---
    /// PEM file of the CA certificates an https:// upstream's certificate must chain to; it
    /// replaces the system's roots [default: the system's CA store].
    #[arg(long, env = "IDEMGATE_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to an https:// upstream that asks for one (with
    /// --upstream-client-key).
    #[arg(long, env = "IDEMGATE_UPSTREAM_CLIENT_CERT")]
    pub upstream_client_cert: Option<PathBuf>,
    /// PEM private key of --upstream-client-cert.
    #[arg(long, env = "IDEMGATE_UPSTREAM_CLIENT_KEY")]
    pub upstream_client_key: Option<PathBuf>,
    /// PEM certificate chain of the proxy listener: with --tls-key, the listener serves HTTPS
    /// (HTTP/2 and HTTP/1.1 by ALPN); both files are read again on SIGHUP.
    #[arg(long, env = "IDEMGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "IDEMGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// The `[[route]]` tables of the config file. Unset fields take the global settings. Durations
/// and sizes are strings with a unit (`"30s"`, `"8MiB"`) or plain numbers (seconds, bytes).
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    name: String,
    path: String,
    methods: Option<Vec<String>>,
    required: Option<bool>,
    #[serde(default, deserialize_with = "text_or_number")]
    ttl: Option<String>,
    concurrency: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    wait_timeout: Option<String>,
    recovery: Option<String>,
    fail_mode: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    max_request_body: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    max_response_body: Option<String>,
    transient_statuses: Option<Vec<u16>>,
    scope_headers: Option<Vec<String>>,
    fingerprint_headers: Option<Vec<String>>,
    deny_response_headers: Option<Vec<String>>,
    allow_response_headers: Option<Vec<String>>,
    canonical_json: Option<bool>,
    ignore_json_fields: Option<Vec<String>>,
}

/// The config file. Durations and sizes are strings with a unit (`"30s"`, `"8MiB"`) or plain
/// numbers (seconds, bytes).
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    upstream: Option<String>,
    listen: Option<String>,
    admin_listen: Option<String>,
    admin_token_file: Option<PathBuf>,
    admin_token: Option<String>,
    admin_allowed_hosts: Option<Vec<String>>,
    admin_insecure_no_auth: Option<bool>,
    admin_public_metrics: Option<bool>,
    store: Option<String>,
    require_key: Option<bool>,
    namespace: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    ttl: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    unknown_ttl: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    lease_ttl: Option<String>,
    concurrency: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    wait_timeout: Option<String>,
    recovery: Option<String>,
    fail_mode: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    max_request_body: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    max_response_body: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    connect_timeout: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    response_timeout: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    drain_timeout: Option<String>,
    log_format: Option<String>,
    transient_statuses: Option<Vec<u16>>,
    scope_headers: Option<Vec<String>>,
    fingerprint_headers: Option<Vec<String>>,
    deny_response_headers: Option<Vec<String>>,
    allow_response_headers: Option<Vec<String>>,
    canonical_json: Option<bool>,
    ignore_json_fields: Option<Vec<String>>,
    max_waiters: Option<usize>,
    replay_cache_entries: Option<usize>,
    unknown_scan_rate: Option<usize>,
    #[serde(default, deserialize_with = "text_or_number")]
    waiter_poll_max: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    waiter_poll_min: Option<String>,
    workers: Option<usize>,
    #[serde(default, deserialize_with = "text_or_number")]
    store_timeout: Option<String>,
    // HTTP edge: limits and timeouts.
    #[serde(default, deserialize_with = "text_or_number")]
    upstream_idle_timeout: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    header_read_timeout: Option<String>,
    #[serde(default, deserialize_with = "text_or_number")]
    body_read_timeout: Option<String>,
    max_connections: Option<usize>,
    max_concurrent_requests: Option<usize>,
    #[serde(default, deserialize_with = "text_or_number")]
    max_buffered_body_bytes: Option<String>,
    // TLS.
    upstream_ca_file: Option<PathBuf>,
    upstream_client_cert: Option<PathBuf>,
    upstream_client_key: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    route: Vec<RouteConfig>,
}

/// A certificate chain and its private key, as PEM file paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertKey {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Everything `serve` needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The upstream base URL (`http://` or `https://`, with a host).
    pub upstream: http::Uri,
    /// The proxy listener.
    pub listen: SocketAddr,
    /// The admin listener (metrics, health, admin API, dashboard).
    pub admin_listen: SocketAddr,
    /// Who may use the admin listener.
    pub admin_access: AdminAccess,
    /// Warnings to log once the logger is installed (see [`Settings::warn_at_start_up`]).
    pub start_up_warnings: Vec<String>,
    /// The store URL.
    pub store: String,
    /// The record namespace: explicit on a shared store, else `default` unless set.
    pub namespace: String,
    /// Lease length, within [`LEASE_TTL`].
    pub lease_ttl: Duration,
    /// Upstream connect timeout, within [`UPSTREAM_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Upstream response timeout, within [`UPSTREAM_TIMEOUT`].
    pub response_timeout: Duration,
    /// SIGTERM drain, within [`DRAIN_TIMEOUT`].
    pub drain_timeout: Duration,
    /// JSON logs rather than text.
    pub json_logs: bool,
    /// Most waiting requests at once, within [`MAX_WAITERS`].
    pub max_waiters: usize,
    /// Replay cache size in front of a shared store, within [`REPLAY_CACHE_ENTRIES`].
    pub replay_cache_entries: usize,
    /// Records read per second by the outcome-unknown census (0: off), within
    /// [`UNKNOWN_SCAN_RATE`].
    pub unknown_scan_rate: usize,
    /// First waiter poll pause, within [`WAITER_POLL`], at most `waiter_poll_max`.
    pub waiter_poll_min: Duration,
    /// Longest waiter poll pause, within [`WAITER_POLL`].
    pub waiter_poll_max: Duration,
    /// Proxy worker threads, within [`WORKERS`].
    pub workers: usize,
    /// The protected routes, tried in order.
    pub routes: Routes,
    pub store_timeout: Duration,
    // HTTP edge: limits and timeouts.
    /// Longest idle time of a pooled upstream connection.
    pub upstream_idle_timeout: Duration,
    /// Longest time for a client's request head (and keep-alive idle time).
    pub header_read_timeout: Duration,
    /// Longest time for a client's whole request body.
    pub body_read_timeout: Duration,
    /// Most open client connections.
    pub max_connections: usize,
    /// Most protected requests in progress at once.
    pub max_concurrent_requests: usize,
    /// Most bytes of protected request bodies buffered at once.
    pub max_buffered_body_bytes: usize,
    // TLS (files are read by `serve`, not here).
    /// CA certificates an `https://` upstream must chain to, instead of the system's.
    pub upstream_ca_file: Option<PathBuf>,
    /// The client certificate presented to an `https://` upstream.
    pub upstream_client_cert: Option<CertKey>,
    /// The proxy listener's certificate and key: HTTPS when set.
    pub tls: Option<CertKey>,
}

/// The warning about a route whose scope has no credential header (PRODUCT G6).
pub const SHARED_SCOPE_WARNING: &str = "scope_headers is empty: every caller of this route shares \
     one scope, so a key sent by one principal replays its response to another (PRODUCT G6); \
     list the credential headers (e.g. authorization) in scope_headers";

impl Settings {
    /// Logs what the configuration leaves unsafe: [`Settings::start_up_warnings`], and, once per
    /// route, a route whose scope has no credential header at all serves every caller from one
    /// scope (PRODUCT G6). Call once the logger is installed.
    pub fn warn_at_start_up(&self) {
        for warning in &self.start_up_warnings {
            tracing::warn!("{warning}");
        }
        for route in self.routes.iter().filter(|r| r.scope_headers.is_empty()) {
            tracing::warn!(route = %route.name, "{SHARED_SCOPE_WARNING}");
        }
    }

    /// The same warnings as text lines, for `--check-config`.
    pub fn warnings(&self) -> Vec<String> {
        let routes = self
            .routes
            .iter()
            .filter(|r| r.scope_headers.is_empty())
            .map(|r| format!("route {:?}: {SHARED_SCOPE_WARNING}", r.name));
        self.start_up_warnings
            .iter()
            .cloned()
            .chain(routes)
            .collect()
    }
}

impl Settings {
    /// The configuration as it takes effect, in the config file's format (every route spelled
    /// out, the defaults it took included), for `serve --check-config`. The store URL is shown
    /// without its password; the admin token never is (only where it comes from).
    pub fn effective_toml(&self) -> String {
        use toml::{Table, Value};
        let text = |s: &str| Value::String(s.to_owned());
        let dur = |d: Duration| Value::String(show(d));
        let count = |n: usize| Value::Integer(i64::try_from(n).unwrap_or(i64::MAX));
        let list = |items: &[String]| Value::Array(items.iter().map(|s| text(s)).collect());
        let mut top = Table::new();
        top.insert("upstream".into(), text(&self.upstream.to_string()));
        top.insert("listen".into(), text(&self.listen.to_string()));
        top.insert("admin_listen".into(), text(&self.admin_listen.to_string()));
        top.insert("store".into(), text(&idemgate_stores::redact(&self.store)));
        top.insert("namespace".into(), text(&self.namespace));
        if let Some(route) = self.routes.iter().next() {
            top.insert("unknown_ttl".into(), dur(route.engine.unknown_ttl));
        }
        top.insert("lease_ttl".into(), dur(self.lease_ttl));
        top.insert("store_timeout".into(), dur(self.store_timeout));
        top.insert("connect_timeout".into(), dur(self.connect_timeout));
        top.insert("response_timeout".into(), dur(self.response_timeout));
        top.insert("drain_timeout".into(), dur(self.drain_timeout));
        top.insert(
            "log_format".into(),
            text(if self.json_logs { "json" } else { "text" }),
        );
        top.insert("max_waiters".into(), count(self.max_waiters));
        top.insert(
            "replay_cache_entries".into(),
            count(self.replay_cache_entries),
        );
        top.insert("unknown_scan_rate".into(), count(self.unknown_scan_rate));
        top.insert("waiter_poll_min".into(), dur(self.waiter_poll_min));
        top.insert("waiter_poll_max".into(), dur(self.waiter_poll_max));
        top.insert("workers".into(), count(self.workers));
        top.insert(
            "upstream_idle_timeout".into(),
            dur(self.upstream_idle_timeout),
        );
        top.insert("header_read_timeout".into(), dur(self.header_read_timeout));
        top.insert("body_read_timeout".into(), dur(self.body_read_timeout));
        top.insert("max_connections".into(), count(self.max_connections));
        top.insert(
            "max_concurrent_requests".into(),
            count(self.max_concurrent_requests),
        );
        top.insert(
            "max_buffered_body_bytes".into(),
            text(&show_size(self.max_buffered_body_bytes)),
        );
        let admin = &self.admin_access;
        top.insert(
            "admin_allowed_hosts".into(),
            Value::Array(
                admin
                    .allowed_hosts
                    .iter()
                    .map(|h| text(&h.to_string()))
                    .collect(),
            ),
        );
        top.insert(
            "admin_public_metrics".into(),
            Value::Boolean(admin.public_metrics),
        );
        top.insert(
            "admin_insecure_no_auth".into(),
            Value::Boolean(admin.insecure_no_auth),
        );
        let path = |p: &Path| text(&p.display().to_string());
        if let Some(ca) = &self.upstream_ca_file {
            top.insert("upstream_ca_file".into(), path(ca));
        }
        if let Some(client) = &self.upstream_client_cert {
            top.insert("upstream_client_cert".into(), path(&client.cert));
            top.insert("upstream_client_key".into(), path(&client.key));
        }
        if let Some(tls) = &self.tls {
            top.insert("tls_cert".into(), path(&tls.cert));
            top.insert("tls_key".into(), path(&tls.key));
        }
        let routes = self
            .routes
            .iter()
            .map(|r| {
                let mut t = Table::new();
                t.insert("name".into(), text(&r.name));
                t.insert("path".into(), text(r.path.as_str()));
                t.insert(
                    "methods".into(),
                    Value::Array(r.methods.iter().map(|m| text(m.as_str())).collect()),
                );
                t.insert("required".into(), Value::Boolean(r.required));
                t.insert("ttl".into(), dur(r.engine.ttl));
                match r.engine.concurrency {
                    Concurrency::Wait { timeout } => {
                        t.insert("concurrency".into(), text("wait"));
                        t.insert("wait_timeout".into(), dur(timeout));
                    }
                    Concurrency::Reject => {
                        t.insert("concurrency".into(), text("reject"));
                    }
                }
                let recovery = match r.engine.recovery {
                    Recovery::Takeover => "takeover",
                    Recovery::Strict => "strict",
                };
                t.insert("recovery".into(), text(recovery));
                let fail_mode = match r.fail_mode {
                    FailMode::Closed => "closed",
                    FailMode::Open => "open",
                };
                t.insert("fail_mode".into(), text(fail_mode));
                t.insert(
                    "max_request_body".into(),
                    text(&show_size(r.max_request_body)),
                );
                t.insert(
                    "max_response_body".into(),
                    text(&show_size(r.max_response_body)),
                );
                t.insert(
                    "transient_statuses".into(),
                    Value::Array(
                        r.transient_statuses
                            .iter()
                            .map(|s| Value::Integer(i64::from(*s)))
                            .collect(),
                    ),
                );
                t.insert("scope_headers".into(), list(&r.scope_headers));
                t.insert("fingerprint_headers".into(), list(&r.fingerprint_headers));
                t.insert(
                    "deny_response_headers".into(),
                    list(&r.deny_response_headers),
                );
                if let Some(allow) = &r.allow_response_headers {
                    t.insert("allow_response_headers".into(), list(allow));
                }
                let ignore = match r.fingerprint.json_mode() {
                    JsonMode::Canonical { ignore } => Some(ignore.as_slice()),
                    _ => None,
                };
                t.insert("canonical_json".into(), Value::Boolean(ignore.is_some()));
                t.insert(
                    "ignore_json_fields".into(),
                    list(ignore.unwrap_or_default()),
                );
                Value::Table(t)
            })
            .collect();
        top.insert("route".into(), Value::Array(routes));
        let mut out = String::from(
            "# idemgate: the effective configuration (flags > IDEMGATE_* variables > config \
             file > defaults)\n",
        );
        match &admin.token_source {
            Some(source) => out.push_str(&format!(
                "# admin token: set, from {source} (not shown); every admin endpoint but \
                 /healthz and /readyz{} needs it\n",
                if admin.public_metrics {
                    " and /metrics"
                } else {
                    ""
                }
            )),
            None => out.push_str("# admin token: none (the admin API has no authentication)\n"),
        }
        out.push_str(&toml::to_string(&top).unwrap_or_else(|e| format!("# not shown: {e}\n")));
        out
    }
}

/// `8MiB`, `1GiB`, `1000`: the largest binary unit that divides `n` exactly (else bytes).
fn show_size(n: usize) -> String {
    [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
        .iter()
        .find(|(per, _)| n > 0 && n.is_multiple_of(*per))
        .map_or_else(|| n.to_string(), |(per, unit)| format!("{}{unit}", n / per))
}

/// Inclusive bounds of a duration setting, and the reason for them (shown when refused).
#[derive(Debug, Clone, Copy)]
pub struct Within {
    /// The shortest accepted value.
    pub min: Duration,
    /// The longest accepted value.
    pub max: Duration,
    /// Why, in a few words.
    pub why: &'static str,
}

const MINUTE: u64 = 60;
const HOUR: Duration = Duration::from_secs(60 * MINUTE);
const DAY: u64 = 86_400;

/// `lease_ttl`: renewed every lease/3, so below 1 s one slow store round trip (a GC pause, a
/// failover) loses a live holder's lease and another instance runs the key again; above 1 h a
/// dead instance's keys stay blocked that long.
pub const LEASE_TTL: Within = Within {
    min: Duration::from_secs(1),
    max: HOUR,
    why: "renewed every lease/3: a shorter lease can be lost to one slow store round trip and \
          the key run twice; a longer one blocks a dead instance's keys that long",
};
/// `ttl` and `unknown_ttl` (global and per route): a record shorter-lived than a second protects
/// no retry; beyond a year is a typo (and grows the store without bound).
pub const RECORD_TTL: Within = Within {
    min: Duration::from_secs(1),
    max: Duration::from_secs(365 * DAY),
    why: "a record kept under a second protects no retry; over a year is surely a typo",
};
/// `wait_timeout` (global and per route): 0 answers `409` at once; a client holds its connection
/// (and a waiter slot) for at most this long.
pub const WAIT_TIMEOUT: Within = Within {
    min: Duration::ZERO,
    max: HOUR,
    why: "a waiting retry holds its connection and a waiter slot that long",
};
/// `connect_timeout` and `response_timeout`: 0 would fail every request.
pub const UPSTREAM_TIMEOUT: Within = Within {
    min: Duration::from_millis(1),
    max: HOUR,
    why: "0 fails every request; over an hour is surely a typo",
};
/// `drain_timeout`: 0 stops at once on SIGTERM (in-flight keys then wait out their lease, as
/// after a crash); orchestrators kill long before an hour.
pub const DRAIN_TIMEOUT: Within = Within {
    min: Duration::ZERO,
    max: HOUR,
    why: "SIGTERM waits that long for in-flight requests",
};
/// `waiter_poll_min` and `waiter_poll_max`: 0 would poll the store in a busy loop.
pub const WAITER_POLL: Within = Within {
    min: Duration::from_millis(1),
    max: HOUR,
    why: "0 polls the store in a busy loop",
};
/// `store_timeout`: the deadline of every store operation; below 10 ms a healthy store on
/// another host misses it, above a minute a partitioned store holds every request that long.
pub const STORE_TIMEOUT: Within = Within {
    min: Duration::from_millis(10),
    max: Duration::from_secs(60),
    why: "every store operation answers within it (503 after it); a minute of waiting helps nobody",
};
/// `upstream_idle_timeout`: kept under the upstreams' own keep-alive timeouts; 0 would never
/// reuse a connection.
pub const UPSTREAM_IDLE_TIMEOUT: Within = Within {
    min: Duration::from_millis(1),
    max: HOUR,
    why: "0 never reuses a connection; it must stay below the upstream's own keep-alive timeout",
};
/// `header_read_timeout`, `body_read_timeout`: 0 would refuse every request.
pub const CLIENT_READ_TIMEOUT: Within = Within {
    min: Duration::from_millis(1),
    max: HOUR,
    why: "0 refuses every request; a slow client holds a connection (and body memory) that long",
};
/// `max_connections`: each one holds a file descriptor and buffers.
pub const MAX_CONNECTIONS: std::ops::RangeInclusive<usize> = 1..=10_000_000;
/// `max_concurrent_requests`: protected requests in progress at once.
pub const MAX_CONCURRENT_REQUESTS: std::ops::RangeInclusive<usize> = 1..=10_000_000;
/// `max_request_body`, `max_response_body` (global and per route): bodies are held in memory.
pub const BODY_LIMIT_MAX: usize = 1 << 30;
/// `max_waiters`: 0 would turn every wait into `409` (that is `--concurrency reject`); past a
/// million the bound no longer protects memory.
pub const MAX_WAITERS: std::ops::RangeInclusive<usize> = 1..=1_000_000;
/// `replay_cache_entries`: 0 disables the cache; each entry holds a whole response.
pub const REPLAY_CACHE_ENTRIES: std::ops::RangeInclusive<usize> = 0..=10_000_000;
/// `unknown_scan_rate`: records read per second by the outcome-unknown census; 0 turns it off.
pub const UNKNOWN_SCAN_RATE: std::ops::RangeInclusive<usize> = 0..=1_000_000;
/// `workers`: one thread each.
pub const WORKERS: std::ops::RangeInclusive<usize> = 1..=1024;
/// `transient_statuses`: HTTP status codes.
const STATUSES: std::ops::RangeInclusive<u16> = 100..=599;
/// A namespace is part of every record; longer than this is surely a mistake.
const NAMESPACE_MAX_BYTES: usize = 255;

/// Parses `250ms`, `30s`, `10m`, `24h`, `7d`, or a number of seconds. Refuses values that do not
/// fit a [`Duration`] of whole seconds (`u64`) instead of wrapping.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = parse_number(num, "duration", s)?;
    let secs = |per: u64| {
        n.checked_mul(per)
            .map(Duration::from_secs)
            .with_context(|| format!("duration {s:?} is too large"))
    };
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => secs(MINUTE),
        "h" => secs(60 * MINUTE),
        "d" => secs(DAY),
        other => bail!("invalid duration unit {other:?} in {s:?} (use ms, s, m, h or d)"),
    }
}

/// Parses `1048576`, `512KiB`, `8MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
pub fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = parse_number(num, "size", s)?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => bail!("invalid size unit {other:?} in {s:?}"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

/// The digits of a duration or size: too many of them is "too large", none is "invalid".
fn parse_number<T: std::str::FromStr<Err = std::num::ParseIntError>>(
    digits: &str,
    what: &str,
    whole: &str,
) -> Result<T> {
    digits.parse().map_err(|e: std::num::ParseIntError| {
        if *e.kind() == std::num::IntErrorKind::PosOverflow {
            anyhow::anyhow!("{what} {whole:?} is too large")
        } else {
            anyhow::anyhow!("invalid {what} {whole:?}")
        }
    })
}

/// `1h`, `365d`, `250ms`: the largest unit that divides `d` exactly.
fn show(d: Duration) -> String {
    let ms = d.as_millis();
    let units = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1_000, "s"),
    ];
    units
        .iter()
        .find(|(per, _)| ms > 0 && ms.is_multiple_of(*per))
        .map_or_else(
            || format!("{ms}ms"),
            |(per, unit)| format!("{}{unit}", ms / per),
        )
}

/// Parses `text` as the duration setting `name` and checks it against `within`.
fn checked_duration(name: &str, text: &str, within: &Within) -> Result<Duration> {
    let d = parse_duration(text).with_context(|| format!("{name} = {text:?}"))?;
    if d < within.min {
        bail!(
            "{name} = {text:?} is too short: the minimum is {} ({})",
            show(within.min),
            within.why
        );
    }
    if d > within.max {
        bail!(
            "{name} = {text:?} is too long: the maximum is {} ({})",
            show(within.max),
            within.why
        );
    }
    Ok(d)
}

/// Parses `text` as the body limit `name` (at most [`BODY_LIMIT_MAX`]).
fn checked_body_limit(name: &str, text: &str) -> Result<usize> {
    let n = parse_size(text).with_context(|| format!("{name} = {text:?}"))?;
    if n > BODY_LIMIT_MAX {
        bail!("{name} = {text:?} is too large: the maximum is 1GiB (bodies are held in memory)");
    }
    Ok(n)
}

/// Checks the count setting `name` against `range`.
fn checked_count(name: &str, n: usize, range: &std::ops::RangeInclusive<usize>) -> Result<usize> {
    if !range.contains(&n) {
        bail!(
            "{name} = {n} is out of bounds: it must be between {} and {}",
            range.start(),
            range.end()
        );
    }
    Ok(n)
}

/// Trims and parses each header name of the list setting `name` (parsing lower-cases it); empty
/// entries are dropped (an empty value means none). An invalid name is refused, naming the option
/// and the value.
fn header_names(name: &str, list: &[String]) -> Result<Vec<String>> {
    list.iter()
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
        .map(|h| {
            HeaderName::from_bytes(h.as_bytes())
                .map(|n| n.as_str().to_owned())
                .map_err(|_| anyhow::anyhow!("{name}: {h:?} is not a valid HTTP header name"))
        })
        .collect()
}

/// Trims each JSON pointer of the list setting `name` and drops empty entries; a pointer must
/// start with `/` (the empty pointer would be the whole body).
fn json_pointers(name: &str, list: &[String]) -> Result<Vec<String>> {
    list.iter()
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.starts_with('/') {
                Ok(p.to_owned())
            } else {
                bail!("{name}: {p:?} is not a JSON pointer (one starts with `/`, e.g. /timestamp)")
            }
        })
        .collect()
}

/// Checks each status of the list setting `name`.
fn statuses(name: &str, list: &[u16]) -> Result<BTreeSet<u16>> {
    match list.iter().find(|s| !STATUSES.contains(s)) {
        Some(s) => bail!("{name}: {s} is not an HTTP status (100 to 599)"),
        None => Ok(list.iter().copied().collect()),
    }
}

fn parse_concurrency(name: &str, mode: &str, wait: Duration) -> Result<Concurrency> {
    match mode.trim() {
        "wait" => Ok(Concurrency::Wait { timeout: wait }),
        "reject" => Ok(Concurrency::Reject),
        other => bail!("{name} must be wait or reject, not {other:?}"),
    }
}

fn parse_recovery(name: &str, mode: &str) -> Result<Recovery> {
    match mode.trim() {
        "takeover" => Ok(Recovery::Takeover),
        "strict" => Ok(Recovery::Strict),
        other => bail!("{name} must be takeover or strict, not {other:?}"),
    }
}

fn parse_fail_mode(name: &str, mode: &str) -> Result<FailMode> {
    match mode.trim() {
        "closed" => Ok(FailMode::Closed),
        "open" => Ok(FailMode::Open),
        other => bail!("{name} must be closed or open, not {other:?}"),
    }
}

/// `true`, `false`, `1` or `0` (any case, trimmed), as the boolean setting `name`.
pub fn parse_bool(name: &str, text: &str) -> Result<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => bail!("{name} = {text:?} is not a boolean: use true, false, 1 or 0"),
    }
}

/// The valid forms of a listen address, for refusals.
const LISTEN_FORMS: &str =
    "use HOST:PORT, e.g. 127.0.0.1:8080, [::1]:8080, 0.0.0.0:8080 or localhost:8080";

/// Parses the listen address `name`: an IP address and port, or a host name and port resolved
/// now (its first IPv4 address, else its first IPv6 one).
pub fn parse_listen(name: &str, text: &str) -> Result<SocketAddr> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        bail!("{name} = {text:?} has no port: {LISTEN_FORMS}");
    };
    let Ok(port) = port.parse::<u16>() else {
        bail!("{name} = {text:?}: the port must be a number from 0 to 65535; {LISTEN_FORMS}");
    };
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !valid_name {
        bail!("{name} = {text:?} is not an address or host name with a port; {LISTEN_FORMS}");
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .with_context(|| format!("{name} = {text:?}: cannot resolve {host:?}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .with_context(|| format!("{name} = {text:?}: {host:?} resolves to no address"))
}

/// A whole number `text` for the count setting `name`, checked against `range`.
fn parse_count(name: &str, text: &str, range: &std::ops::RangeInclusive<usize>) -> Result<usize> {
    let n = text.trim().parse::<usize>().map_err(|_| {
        anyhow::anyhow!(
            "{name} = {text:?} is not a whole number: use one from {} to {}",
            range.start(),
            range.end()
        )
    })?;
    checked_count(name, n, range)
}

/// A string with a unit or a non-negative whole number, from the config file (durations:
/// `"30s"` or `30`; sizes: `"8MiB"` or `8388608`); numbers are kept as their digits.
fn text_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(
                "a duration or size: a string with a unit (\"250ms\", \"30s\", \"10m\", \"24h\", \
                 \"7d\"; \"512KiB\", \"8MiB\") or a whole number (seconds, or bytes)",
            )
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            u64::try_from(v)
                .map(|v| v.to_string())
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))
        }
    }
    d.deserialize_any(Visitor).map(Some)
}

/// The smallest and largest admin token, in characters.
const ADMIN_TOKEN_LEN: std::ops::RangeInclusive<usize> = 16..=512;

/// The admin API's bearer token. Its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Checks `text` (trimmed) as a token for the setting `name`: RFC 6750's `b64token`
    /// characters, [`ADMIN_TOKEN_LEN`] long.
    pub fn parse(name: &str, text: &str) -> Result<Self> {
        let t = text.trim();
        if t.is_empty() {
            bail!(
                "{name} is empty: give a token of at least 16 characters, e.g. `openssl rand -hex 32`"
            );
        }
        let body = t.trim_end_matches('=');
        let valid = !body.is_empty()
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
        if !valid {
            bail!(
                "{name}: the token may hold only A-Z a-z 0-9 - . _ ~ + / (and = at the end), as \
                 an HTTP bearer token (RFC 6750); e.g. `openssl rand -hex 32`"
            );
        }
        if !ADMIN_TOKEN_LEN.contains(&t.len()) {
            bail!(
                "{name}: the token is {} characters; use {} to {} (e.g. `openssl rand -hex 32`)",
                t.len(),
                ADMIN_TOKEN_LEN.start(),
                ADMIN_TOKEN_LEN.end()
            );
        }
        Ok(Self(t.to_owned()))
    }

    /// The token's text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<hidden>)")
    }
}

/// A name the admin listener answers to (`--admin-allowed-hosts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedHost {
    /// Any name at all.
    Any,
    /// This name (lower case).
    Exact(String),
    /// Any subdomain of this name (`*.example.com`: `a.example.com`, not `example.com`).
    SubdomainOf(String),
}

impl AllowedHost {
    fn parse(name: &str, text: &str) -> Result<Self> {
        let t = text.trim().to_ascii_lowercase();
        if t == "*" {
            return Ok(Self::Any);
        }
        let (wild, host) = match t.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, t.as_str()),
        };
        let valid = !host.is_empty()
            && host.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            bail!(
                "{name}: {text:?} is not a host name: give names without scheme or port, e.g. \
                 admin.internal, *.example.com (its subdomains) or * (any name)"
            );
        }
        Ok(if wild {
            Self::SubdomainOf(host.to_owned())
        } else {
            Self::Exact(host.to_owned())
        })
    }

    /// Whether `host` (lower case, without port) is allowed.
    pub fn allows(&self, host: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(h) => h == host,
            Self::SubdomainOf(h) => host
                .strip_suffix(h.as_str())
                .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        }
    }
}

impl std::fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(h) => f.write_str(h),
            Self::SubdomainOf(h) => write!(f, "*.{h}"),
        }
    }
}

/// Who may use the admin listener: its token (if any), the host names it answers to, and
/// whether `/metrics` is open.
#[derive(Clone, Debug, Default)]
pub struct AdminAccess {
    /// The bearer token every admin endpoint but `/healthz` and `/readyz` needs; `None`: no
    /// authentication (only allowed on loopback, or with `insecure_no_auth`).
    pub token: Option<AdminToken>,
    /// Where the token came from (`--admin-token-file /run/secrets/t`, `IDEMGATE_ADMIN_TOKEN`,
    /// …), for the effective configuration; never the token itself.
    pub token_source: Option<String>,
    /// Names the admin listener answers to besides IP literals and `localhost`.
    pub allowed_hosts: Vec<AllowedHost>,
    /// `/metrics` without the token.
    pub public_metrics: bool,
    /// Off loopback without a token, by the operator's explicit choice.
    pub insecure_no_auth: bool,
}

/// Whether the store URL names a store several services can share (Redis, PostgreSQL, DynamoDB).
pub fn is_shared_store(url: &str) -> bool {
    idemgate_stores::StoreUrl::parse(url).is_ok_and(|u| u.is_shared())
}

/// Where a setting came from, to name it in a refusal.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// A flag or its `IDEMGATE_*` variable (or the default).
    Command,
    /// The config file.
    File(&'a Path),
    /// A `[[route]]` of the config file, by name.
    Route(&'a str),
}

impl Origin<'_> {
    /// `--lease-ttl (IDEMGATE_LEASE_TTL)`, `lease_ttl in FILE`, `ttl in route "pay"`.
    fn name(self, key: &str) -> String {
        match self {
            Origin::Command => format!(
                "--{} (IDEMGATE_{})",
                key.replace('_', "-"),
                key.to_ascii_uppercase()
            ),
            Origin::File(path) => format!("{key} in {}", path.display()),
            Origin::Route(route) => format!("{key} in route {route:?}"),
        }
    }
}

/// One global setting as given: its key (`lease_ttl`), its flag/env value, its file value.
type Given<'v, T> = (&'static str, Option<&'v T>, Option<&'v T>);

/// Like [`Given`], for settings whose flag/env value is text and whose file value is typed.
type Mixed<'v, F, T> = (&'static str, Option<&'v F>, Option<&'v T>);

/// The global settings' layers: flags and env (both via clap), then the config file.
struct Layers<'a> {
    file: &'a Path,
}

impl Layers<'_> {
    /// The value from flag/env, else from the file, with the name of where it came from.
    fn pick<'v, T>(&self, (key, flag, file): Given<'v, T>) -> Option<(&'v T, String)> {
        match (flag, file) {
            (Some(v), _) => Some((v, Origin::Command.name(key))),
            (None, Some(v)) => Some((v, Origin::File(self.file).name(key))),
            (None, None) => None,
        }
    }

    /// A text setting (`wait`, `closed`…), with its name.
    fn text<'v>(&self, given: Given<'v, String>, default: &'v str) -> (&'v str, String) {
        match self.pick(given) {
            Some((text, name)) => (text, name),
            None => (default, Origin::Command.name(given.0)),
        }
    }

    /// A duration setting checked against `within`, with its name.
    fn duration(
        &self,
        given: Given<'_, String>,
        default: &str,
        within: &Within,
    ) -> Result<(Duration, String)> {
        let (text, name) = self.text(given, default);
        Ok((checked_duration(&name, text, within)?, name))
    }

    /// A body limit (default [`DEFAULT_BODY_LIMIT`]).
    fn body_limit(&self, given: Given<'_, String>) -> Result<usize> {
        self.pick(given)
            .map_or(Ok(DEFAULT_BODY_LIMIT), |(text, name)| {
                checked_body_limit(&name, text)
            })
    }

    /// A count, if given (digits from flag/env, a number from the file), checked against
    /// `range`.
    fn count(
        &self,
        (key, flag, file): Mixed<'_, String, usize>,
        range: &std::ops::RangeInclusive<usize>,
    ) -> Result<Option<usize>> {
        match (flag, file) {
            (Some(text), _) => parse_count(&Origin::Command.name(key), text, range).map(Some),
            (None, Some(n)) => {
                checked_count(&Origin::File(self.file).name(key), *n, range).map(Some)
            }
            (None, None) => Ok(None),
        }
    }

    /// A boolean: `true`/`false`/`1`/`0` from flag/env, a TOML boolean from the file.
    fn boolean(&self, (key, flag, file): Mixed<'_, String, bool>, default: bool) -> Result<bool> {
        match (flag, file) {
            (Some(text), _) => parse_bool(&Origin::Command.name(key), text),
            (None, Some(b)) => Ok(*b),
            (None, None) => Ok(default),
        }
    }

    /// A listen address (see [`parse_listen`]).
    fn listen(&self, given: Given<'_, String>, default: SocketAddr) -> Result<SocketAddr> {
        match self.pick(given) {
            Some((text, name)) => parse_listen(&name, text),
            None => Ok(default),
        }
    }

    /// The transient statuses: numbers from flag/env, an array of numbers from the file.
    fn statuses(
        &self,
        (key, flag, file): Mixed<'_, Vec<String>, Vec<u16>>,
    ) -> Result<Option<BTreeSet<u16>>> {
        match (flag, file) {
            (Some(list), _) => {
                let name = Origin::Command.name(key);
                let parsed = list
                    .iter()
                    .map(|t| t.trim())
                    .filter(|t| !t.is_empty())
                    .map(|t| {
                        t.parse::<u16>().map_err(|_| {
                            anyhow::anyhow!("{name}: {t:?} is not an HTTP status (100 to 599)")
                        })
                    })
                    .collect::<Result<Vec<u16>>>()?;
                statuses(&name, &parsed).map(Some)
            }
            (None, Some(list)) => statuses(&Origin::File(self.file).name(key), list).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// A header list, if given, trimmed, lower-cased and parsed.
    fn headers(&self, given: Given<'_, Vec<String>>) -> Result<Option<Vec<String>>> {
        self.pick(given)
            .map(|(list, name)| header_names(&name, list))
            .transpose()
    }
}

/// The global route defaults, resolved from flags, env and file, and checked.
struct Defaults {
    ttl: Duration,
    unknown_ttl: Duration,
    concurrency: Concurrency,
    wait_timeout: Duration,
    recovery: Recovery,
    fail_mode: FailMode,
    max_request_body: usize,
    max_response_body: usize,
    transient: BTreeSet<u16>,
    scope_headers: Vec<String>,
    fingerprint_headers: Vec<String>,
    deny_response_headers: Vec<String>,
    allow_response_headers: Option<Vec<String>>,
    canonical_json: bool,
    ignore_json_fields: Vec<String>,
}

impl Defaults {
    fn route(&self, name: &str, path: &str, required: bool) -> Result<RoutePolicy> {
        self.apply(
            RoutePolicy::new(name, path).required(required),
            &RouteConfig::default(),
        )
    }

    /// The route `r` over these defaults; its own values get the same checks, named after it.
    fn apply(&self, mut p: RoutePolicy, r: &RouteConfig) -> Result<RoutePolicy> {
        let at = Origin::Route(&r.name);
        let dur = |key: &str, v: &Option<String>, default: Duration, within: &Within| {
            v.as_deref()
                .map_or(Ok(default), |t| checked_duration(&at.name(key), t, within))
        };
        let size = |key: &str, v: &Option<String>, default: usize| {
            v.as_deref()
                .map_or(Ok(default), |t| checked_body_limit(&at.name(key), t))
        };
        let headers = |key: &str, v: &Option<Vec<String>>| {
            v.as_deref()
                .map(|list| header_names(&at.name(key), list))
                .transpose()
        };
        p.engine.ttl = dur("ttl", &r.ttl, self.ttl, &RECORD_TTL)?;
        p.engine.unknown_ttl = self.unknown_ttl;
        let wait = dur(
            "wait_timeout",
            &r.wait_timeout,
            self.wait_timeout,
            &WAIT_TIMEOUT,
        )?;
        p.engine.concurrency = match r.concurrency.as_deref() {
            Some(mode) => parse_concurrency(&at.name("concurrency"), mode, wait)?,
            None => match self.concurrency {
                Concurrency::Wait { .. } => Concurrency::Wait { timeout: wait },
                Concurrency::Reject => Concurrency::Reject,
            },
        };
        p.engine.recovery = match r.recovery.as_deref() {
            Some(mode) => parse_recovery(&at.name("recovery"), mode)?,
            None => self.recovery,
        };
        p.fail_mode = match r.fail_mode.as_deref() {
            Some(mode) => parse_fail_mode(&at.name("fail_mode"), mode)?,
            None => self.fail_mode,
        };
        p.max_request_body = size(
            "max_request_body",
            &r.max_request_body,
            self.max_request_body,
        )?;
        p.max_response_body = size(
            "max_response_body",
            &r.max_response_body,
            self.max_response_body,
        )?;
        p.transient_statuses = match &r.transient_statuses {
            Some(list) => statuses(&at.name("transient_statuses"), list)?,
            None => self.transient.clone(),
        };
        p.scope_headers = headers("scope_headers", &r.scope_headers)?
            .unwrap_or_else(|| self.scope_headers.clone());
        p.fingerprint_headers = headers("fingerprint_headers", &r.fingerprint_headers)?
            .unwrap_or_else(|| self.fingerprint_headers.clone());
        p.deny_response_headers = headers("deny_response_headers", &r.deny_response_headers)?
            .unwrap_or_else(|| self.deny_response_headers.clone());
        p.allow_response_headers = headers("allow_response_headers", &r.allow_response_headers)?
            .or_else(|| self.allow_response_headers.clone());
        let canonical = r.canonical_json.unwrap_or(self.canonical_json);
        let ignore = match &r.ignore_json_fields {
            Some(list) => json_pointers(&at.name("ignore_json_fields"), list)?,
            None => self.ignore_json_fields.clone(),
        };
        p.fingerprint = FingerprintOptions::default().json(if canonical {
            JsonMode::Canonical { ignore }
        } else {
            JsonMode::Raw
        });
        Ok(p)
    }
}

/// Resolves flags > env (both via clap) > file > defaults, and checks every value.
pub fn resolve(args: &ServeArgs) -> Result<Settings> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    // The setting `$field` as given by flag/env and by the file.
    macro_rules! given {
        ($field:ident) => {
            (
                stringify!($field),
                args.$field.as_ref(),
                file.$field.as_ref(),
            )
        };
    }
    let layers = Layers {
        file: args
            .config
            .as_deref()
            .unwrap_or_else(|| Path::new("the config file")),
    };
    let dur = |given: Given<'_, String>, default: &str, within: &Within| {
        layers.duration(given, default, within).map(|(d, _)| d)
    };
    let upstream = args.upstream.clone().or(file.upstream.clone()).context(
        "--upstream (or IDEMGATE_UPSTREAM, or `upstream` in the config file) is required",
    )?;
    let shown = idemgate_stores::redact(&upstream);
    let upstream: http::Uri = upstream
        .parse()
        .with_context(|| format!("invalid upstream URL {shown:?}"))?;
    if !matches!(upstream.scheme_str(), Some("http" | "https")) || upstream.authority().is_none() {
        bail!("the upstream must be an http:// or https:// URL with a host, got {shown}");
    }
    // A `user:password@` part would be printed by --check-config and the start-up log, and is
    // never sent (the proxy forwards the client's own Authorization): refused, not kept.
    if upstream
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        bail!(
            "the upstream URL must not carry credentials (user:password@), got {shown}: idemgate \
             does not send them to the upstream; clients send their own Authorization header"
        );
    }
    let tls = tls_settings(&layers, args, &file, &upstream)?;
    let store = layers
        .text(given!(store), "file:./idemgate-data")
        .0
        .to_owned();
    let namespace = namespace(layers.pick(given!(namespace)), &store)?;
    let wait_timeout = dur(given!(wait_timeout), "30s", &WAIT_TIMEOUT)?;
    let (mode, name) = layers.text(given!(concurrency), "wait");
    let concurrency = parse_concurrency(&name, mode, wait_timeout)?;
    let (mode, name) = layers.text(given!(recovery), "takeover");
    let recovery = parse_recovery(&name, mode)?;
    let (mode, name) = layers.text(given!(fail_mode), "closed");
    let fail_mode = parse_fail_mode(&name, mode)?;
    let defaults = Defaults {
        ttl: dur(given!(ttl), "24h", &RECORD_TTL)?,
        unknown_ttl: dur(given!(unknown_ttl), "24h", &RECORD_TTL)?,
        concurrency,
        wait_timeout,
        recovery,
        fail_mode,
        max_request_body: layers.body_limit(given!(max_request_body))?,
        max_response_body: layers.body_limit(given!(max_response_body))?,
        transient: layers
            .statuses(given!(transient_statuses))?
            .unwrap_or_else(|| DEFAULT_TRANSIENT.into_iter().collect()),
        scope_headers: layers
            .headers(given!(scope_headers))?
            .unwrap_or_else(|| vec!["authorization".to_owned()]),
        fingerprint_headers: layers
            .headers(given!(fingerprint_headers))?
            .unwrap_or_else(|| vec!["content-type".to_owned()]),
        deny_response_headers: layers
            .headers(given!(deny_response_headers))?
            .unwrap_or_else(|| vec!["set-cookie".to_owned()]),
        allow_response_headers: layers.headers(given!(allow_response_headers))?,
        canonical_json: layers.boolean(given!(canonical_json), false)?,
        ignore_json_fields: match layers.pick(given!(ignore_json_fields)) {
            Some((list, name)) => json_pointers(&name, list)?,
            None => Vec::new(),
        },
    };
    let require_key = layers.boolean(given!(require_key), false)?;
    let routes = if file.route.is_empty() {
        Routes::new(vec![defaults.route("default", "/**", require_key)?])
    } else {
        let mut out = Vec::new();
        for r in &file.route {
            PathPattern::parse(&r.path)
                .map_err(|e| anyhow::anyhow!("path in route {:?}: {e}", r.name))?;
            let mut p =
                RoutePolicy::new(&r.name, &r.path).required(r.required.unwrap_or(require_key));
            if let Some(methods) = &r.methods {
                let parsed: Result<Vec<Method>> = methods
                    .iter()
                    .map(|m| {
                        Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                            .with_context(|| format!("invalid method {m:?} in route {:?}", r.name))
                    })
                    .collect();
                p = p.methods(parsed?);
            }
            out.push(defaults.apply(p, r)?);
        }
        Routes::new(out)
    };
    let (log_format, name) = layers.text(given!(log_format), "text");
    if log_format != "text" && log_format != "json" {
        bail!("{name} must be text or json, not {log_format:?}");
    }
    let (waiter_poll_min, min_name) =
        layers.duration(given!(waiter_poll_min), "50ms", &WAITER_POLL)?;
    let (waiter_poll_max, max_name) =
        layers.duration(given!(waiter_poll_max), "1s", &WAITER_POLL)?;
    if waiter_poll_min > waiter_poll_max {
        bail!(
            "{min_name} = {} is above {max_name} = {}: the first pause cannot be longer than \
             the longest",
            show(waiter_poll_min),
            show(waiter_poll_max)
        );
    }
    // HTTP edge: limits and timeouts.
    let upstream_idle_timeout = dur(
        given!(upstream_idle_timeout),
        "500ms",
        &UPSTREAM_IDLE_TIMEOUT,
    )?;
    let header_read_timeout = dur(given!(header_read_timeout), "10s", &CLIENT_READ_TIMEOUT)?;
    let body_read_timeout = dur(given!(body_read_timeout), "30s", &CLIENT_READ_TIMEOUT)?;
    let max_connections = layers
        .count(given!(max_connections), &MAX_CONNECTIONS)?
        .unwrap_or(10_000);
    let max_concurrent_requests = layers
        .count(given!(max_concurrent_requests), &MAX_CONCURRENT_REQUESTS)?
        .unwrap_or(4_096);
    let max_buffered_body_bytes = match layers.pick(given!(max_buffered_body_bytes)) {
        Some((text, name)) => parse_size(text).with_context(|| name.clone())?,
        None => 256 << 20,
    };
    if let Some(route) = routes
        .iter()
        .find(|r| r.max_request_body > max_buffered_body_bytes)
    {
        bail!(
            "max_buffered_body_bytes ({max_buffered_body_bytes}) is smaller than route {:?}'s \
             max_request_body ({}): such a request could never be buffered",
            route.name,
            route.max_request_body
        );
    }
    let listen = layers.listen(given!(listen), SocketAddr::from(([127, 0, 0, 1], 8080)))?;
    let admin_listen = layers.listen(
        given!(admin_listen),
        SocketAddr::from(([127, 0, 0, 1], 9090)),
    )?;
    let mut start_up_warnings = Vec::new();
    let admin_access = admin_access(args, &file, &layers, admin_listen, &mut start_up_warnings)?;
    let lease_ttl = dur(given!(lease_ttl), "10s", &LEASE_TTL)?;
    // A store answer slower than a renewal interval could let a lease lapse before its first
    // renewal (the engine gives such a key back rather than dispatch on it): keep the deadline
    // under lease/3; by default 3 s, or 3/10 of shorter leases.
    let store_timeout = match layers.pick(given!(store_timeout)) {
        None => Duration::from_secs(3).min(lease_ttl * 3 / 10),
        Some((text, name)) => {
            let d = checked_duration(&name, text, &STORE_TIMEOUT)?;
            if d >= lease_ttl / 3 {
                bail!(
                    "{name} = {} must be under a third of lease_ttl ({}): a store answer that \
                     slow could let a lease lapse before its first renewal",
                    show(d),
                    show(lease_ttl)
                );
            }
            d
        }
    };
    let response_timeout = dur(given!(response_timeout), "60s", &UPSTREAM_TIMEOUT)?;
    // Connecting counts against the response timeout: by default 5 s, or half of a shorter
    // response timeout.
    let connect_timeout = match layers.pick(given!(connect_timeout)) {
        None => Duration::from_secs(5).min(response_timeout / 2),
        Some((text, name)) => checked_duration(&name, text, &UPSTREAM_TIMEOUT)?,
    };
    if response_timeout <= connect_timeout {
        bail!(
            "response_timeout ({}) must be longer than connect_timeout ({}): connecting counts \
             against the response timeout, and a request that timed out while connecting would \
             be reported outcome-unknown although it never left",
            show(response_timeout),
            show(connect_timeout)
        );
    }
    Ok(Settings {
        upstream_idle_timeout,
        header_read_timeout,
        body_read_timeout,
        max_connections,
        max_concurrent_requests,
        max_buffered_body_bytes,
        upstream,
        listen,
        admin_listen,
        admin_access,
        start_up_warnings,
        store,
        namespace,
        lease_ttl,
        connect_timeout,
        response_timeout,
        drain_timeout: dur(given!(drain_timeout), "30s", &DRAIN_TIMEOUT)?,
        json_logs: log_format == "json",
        max_waiters: layers
            .count(given!(max_waiters), &MAX_WAITERS)?
            .unwrap_or(10_000),
        waiter_poll_min,
        waiter_poll_max,
        replay_cache_entries: layers
            .count(given!(replay_cache_entries), &REPLAY_CACHE_ENTRIES)?
            .unwrap_or(100_000),
        unknown_scan_rate: layers
            .count(given!(unknown_scan_rate), &UNKNOWN_SCAN_RATE)?
            .unwrap_or(1_000),
        workers: match layers.count(given!(workers), &WORKERS)? {
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        },
        routes,
        store_timeout,
        upstream_ca_file: tls.upstream_ca_file,
        upstream_client_cert: tls.upstream_client_cert,
        tls: tls.listener,
    })
}

/// The TLS settings, checked for consistency (the files are read by `serve`).
struct TlsSettings {
    upstream_ca_file: Option<PathBuf>,
    upstream_client_cert: Option<CertKey>,
    listener: Option<CertKey>,
}

/// Resolves the TLS settings: a certificate needs its key and the other way round, and the
/// upstream's settings need an `https://` upstream (on `http://` they would be ignored, and a
/// deployment that believes it verifies its upstream would not).
fn tls_settings(
    layers: &Layers<'_>,
    args: &ServeArgs,
    file: &FileConfig,
    upstream: &http::Uri,
) -> Result<TlsSettings> {
    macro_rules! given {
        ($field:ident) => {
            layers.pick((
                stringify!($field),
                args.$field.as_ref(),
                file.$field.as_ref(),
            ))
        };
    }
    let pair = |cert: Option<(&PathBuf, String)>, key: Option<(&PathBuf, String)>| match (cert, key)
    {
        (Some((cert, _)), Some((key, _))) => Ok(Some(CertKey {
            cert: cert.clone(),
            key: key.clone(),
        })),
        (Some((_, name)), None) => bail!("{name} is set without its private key"),
        (None, Some((_, name))) => bail!("{name} is set without its certificate"),
        (None, None) => Ok(None),
    };
    let ca_file = given!(upstream_ca_file);
    let client = pair(given!(upstream_client_cert), given!(upstream_client_key))?;
    if upstream.scheme_str() != Some("https") {
        if let Some((_, name)) = ca_file {
            bail!("{name} is set but the upstream {upstream} is not https://");
        }
        if client.is_some() {
            bail!(
                "an upstream client certificate is set but the upstream {upstream} is not https://"
            );
        }
    }
    Ok(TlsSettings {
        upstream_ca_file: ca_file.map(|(path, _)| path.clone()),
        upstream_client_cert: client,
        listener: pair(given!(tls_cert), given!(tls_key))?,
    })
}

/// The admin listener's access rules, checked: one token at most (file, variable, flag or config
/// file), and none only on loopback unless `admin_insecure_no_auth`.
fn admin_access(
    args: &ServeArgs,
    file: &FileConfig,
    layers: &Layers<'_>,
    admin_listen: SocketAddr,
    warnings: &mut Vec<String>,
) -> Result<AdminAccess> {
    // The token: flag/env layer first (a file and a token there at once is ambiguous), then the
    // config file's keys.
    let from_path = |name: &str, path: &Path, warnings: &mut Vec<String>| -> Result<AdminToken> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{name}: reading the token file {}", path.display()))?;
        warn_if_others_can_read(path, warnings);
        AdminToken::parse(&format!("{name} ({})", path.display()), &text)
    };
    let (token, token_source) = match (
        &args.admin_token_file,
        &args.admin_token,
        &file.admin_token_file,
        &file.admin_token,
    ) {
        (Some(_), Some(_), _, _) => bail!(
            "both --admin-token-file (IDEMGATE_ADMIN_TOKEN_FILE) and --admin-token \
             (IDEMGATE_ADMIN_TOKEN) are set: give one (a file is preferred)"
        ),
        (Some(path), None, _, _) => {
            let name = Origin::Command.name("admin_token_file");
            (
                Some(from_path(&name, path, warnings)?),
                Some(format!("{name} {}", path.display())),
            )
        }
        (None, Some(text), _, _) => {
            let source = if args.admin_token_on_command_line {
                warnings.push(
                    "--admin-token is given on the command line, where `ps` and shell history \
                     show it to other users: prefer --admin-token-file or IDEMGATE_ADMIN_TOKEN"
                        .to_owned(),
                );
                "--admin-token"
            } else {
                "IDEMGATE_ADMIN_TOKEN"
            };
            (
                Some(AdminToken::parse(source, text)?),
                Some(source.to_owned()),
            )
        }
        (None, None, Some(_), Some(_)) => bail!(
            "both admin_token_file and admin_token are set in {}: give one (a file is preferred)",
            layers.file.display()
        ),
        (None, None, Some(path), None) => {
            let name = Origin::File(layers.file).name("admin_token_file");
            (
                Some(from_path(&name, path, warnings)?),
                Some(format!("{name}: {}", path.display())),
            )
        }
        (None, None, None, Some(text)) => {
            let name = Origin::File(layers.file).name("admin_token");
            (Some(AdminToken::parse(&name, text)?), Some(name))
        }
        (None, None, None, None) => (None, None),
    };
    // The setting `$field` as given by flag/env and by the file.
    macro_rules! given {
        ($field:ident) => {
            (
                stringify!($field),
                args.$field.as_ref(),
                file.$field.as_ref(),
            )
        };
    }
    let allowed_hosts = match layers.pick(given!(admin_allowed_hosts)) {
        Some((list, name)) => list
            .iter()
            .filter(|h| !h.trim().is_empty())
            .map(|h| AllowedHost::parse(&name, h))
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    let insecure_no_auth = layers.boolean(given!(admin_insecure_no_auth), false)?;
    let public_metrics = layers.boolean(given!(admin_public_metrics), false)?;
    if token.is_none() && !admin_listen.ip().is_loopback() {
        if !insecure_no_auth {
            bail!(
                "refusing to start: the admin listener {admin_listen} is not on loopback and has \
                 no token, so anyone who reaches it could read records, delete keys and resolve \
                 outcomes. Set a token with --admin-token-file PATH (IDEMGATE_ADMIN_TOKEN_FILE, \
                 or admin_token_file in the config file) or IDEMGATE_ADMIN_TOKEN; or keep \
                 --admin-listen (IDEMGATE_ADMIN_LISTEN) on 127.0.0.1 or [::1]; or, on a network \
                 you trust, accept that with --admin-insecure-no-auth"
            );
        }
        warnings.push(format!(
            "the admin listener {admin_listen} is off loopback without a token \
             (--admin-insecure-no-auth): anyone who reaches it can read records, delete keys \
             and resolve outcomes"
        ));
    }
    if allowed_hosts.contains(&AllowedHost::Any) && token.is_none() {
        warnings.push(
            "--admin-allowed-hosts '*' without an admin token: a web page a browser on this \
             network opens can reach the admin API under any name (DNS rebinding)"
                .to_owned(),
        );
    }
    Ok(AdminAccess {
        token,
        token_source,
        allowed_hosts,
        public_metrics,
        insecure_no_auth,
    })
}

/// Adds a warning when `path` is readable by other users (Unix permissions).
fn warn_if_others_can_read(path: &Path, warnings: &mut Vec<String>) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o004 != 0
        {
            warnings.push(format!(
                "the admin token file {} is readable by every user: chmod 600 it",
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (path, warnings);
}

/// The namespace: as given (trimmed, non-empty); if not given, `default` on a store of this
/// process's own, and a refusal on a shared one.
fn namespace(given: Option<(&String, String)>, store: &str) -> Result<String> {
    match given {
        Some((given, name)) => {
            let ns = given.trim();
            if ns.is_empty() {
                bail!("{name} is empty: name this service, e.g. payments-api");
            }
            if ns.len() > NAMESPACE_MAX_BYTES || ns.chars().any(char::is_control) {
                bail!(
                    "{name} = {given:?}: a namespace is at most {NAMESPACE_MAX_BYTES} bytes \
                     without control characters"
                );
            }
            Ok(ns.to_owned())
        }
        None if is_shared_store(store) => bail!(
            "refusing to start: the store {} can be shared by several services, and no \
             namespace is set. Services sharing a store and a namespace replay each other's \
             responses for equal keys. Set --namespace (IDEMGATE_NAMESPACE, or `namespace` in \
             the config file) to a name unique to this service, e.g. --namespace payments-api. \
             A deployment that already ran on this store keeps its records with --namespace \
             default (under a new name, retries of earlier requests would run again)",
            idemgate_stores::redact(store)
        ),
        None => Ok("default".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `idemgate serve`'s flags alone, parsed as the binary parses them.
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// The arguments of `serve --upstream http://127.0.0.1:1 FLAGS`.
    fn flags(flags: &[&str]) -> ServeArgs {
        let argv = ["idemgate", "--upstream", "http://127.0.0.1:1"];
        Cli::try_parse_from(argv.iter().chain(flags)).unwrap().serve
    }

    fn settings(f: &[&str]) -> Settings {
        resolve(&flags(f)).unwrap()
    }

    /// The whole refusal (with its causes) of these flags.
    fn refusal(f: &[&str]) -> String {
        format!("{:#}", resolve(&flags(f)).unwrap_err())
    }

    /// A config file holding `text`, and the file's path.
    fn file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.to_str().unwrap().to_owned();
        (dir, path)
    }

    /// A config file with one route `pay` on every path, with `fields`.
    fn route_file(fields: &str) -> (tempfile::TempDir, String) {
        file(&format!(
            "[[route]]\nname = \"pay\"\npath = \"/**\"\n{fields}\n"
        ))
    }

    fn default_route(s: &Settings) -> &RoutePolicy {
        s.routes.find(&Method::POST, "/x").unwrap()
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(
            parse_duration(" 7d ").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        for bad in ["3 weeks", "-1s", "1.5s", "", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_size("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("8XB").is_err());
    }

    #[test]
    fn durations_and_sizes_that_do_not_fit_are_refused_not_wrapped() {
        let too_large = |r: Result<Duration>| r.unwrap_err().to_string().contains("too large");
        assert!(too_large(parse_duration(&format!(
            "{}d",
            u64::MAX / 86_400 + 1
        ))));
        assert!(too_large(parse_duration(&format!(
            "{}h",
            u64::MAX / 3_600 + 1
        ))));
        assert!(too_large(parse_duration(&format!(
            "{}m",
            u64::MAX / 60 + 1
        ))));
        assert!(too_large(parse_duration("99999999999999999999999s")));
        assert_eq!(
            parse_duration(&format!("{}d", u64::MAX / 86_400)).unwrap(),
            Duration::from_secs(u64::MAX / 86_400 * 86_400)
        );
        for big in [
            "99999999999999999999999".to_owned(),
            format!("{}GiB", usize::MAX),
        ] {
            assert!(
                parse_size(&big)
                    .unwrap_err()
                    .to_string()
                    .contains("too large")
            );
        }
    }

    #[test]
    fn upstream_credentials_are_refused_and_never_echoed() {
        let argv = ["idemgate", "--upstream", "http://app:s3cret@127.0.0.1:3000"];
        let args = Cli::try_parse_from(argv).unwrap().serve;
        let e = format!("{:#}", resolve(&args).unwrap_err());
        assert!(e.contains("must not carry credentials"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn durations_show_in_their_largest_exact_unit() {
        assert_eq!(show(Duration::from_secs(3600)), "1h");
        assert_eq!(show(Duration::from_secs(365 * 86_400)), "365d");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(90)), "90s");
        assert_eq!(show(Duration::ZERO), "0ms");
    }

    #[test]
    fn header_lists_are_trimmed_lower_cased_and_parsed() {
        let s = settings(&[
            "--scope-headers",
            "authorization, X-Tenant-Id ",
            "--fingerprint-headers",
            "content-type ,x-amount",
            "--deny-response-headers",
            " set-cookie,X-Secret, ",
            "--allow-response-headers",
            "\tcontent-type, x-upstream",
        ]);
        let route = default_route(&s);
        assert_eq!(route.scope_headers, ["authorization", "x-tenant-id"]);
        assert_eq!(route.fingerprint_headers, ["content-type", "x-amount"]);
        assert_eq!(route.deny_response_headers, ["set-cookie", "x-secret"]);
        let allowed = route.allow_response_headers.clone().unwrap();
        assert_eq!(allowed, ["content-type", "x-upstream"]);
        // Empty means none, as before.
        assert!(
            default_route(&settings(&["--scope-headers", ""]))
                .scope_headers
                .is_empty()
        );
    }

    #[test]
    fn header_lists_from_the_file_and_routes_are_trimmed_too() {
        let (_dir, path) = file(
            r#"
scope_headers = ["authorization", " x-tenant-id"]
fingerprint_headers = ["Content-Type "]

[[route]]
name = "pay"
path = "/pay/**"
scope_headers = ["authorization ", "  X-Org"]
deny_response_headers = ["set-cookie", " x-secret "]

[[route]]
name = "rest"
path = "/**"
"#,
        );
        let s = settings(&["--config", &path]);
        let pay = s.routes.find(&Method::POST, "/pay/1").unwrap();
        assert_eq!(pay.scope_headers, ["authorization", "x-org"]);
        assert_eq!(pay.deny_response_headers, ["set-cookie", "x-secret"]);
        assert_eq!(pay.fingerprint_headers, ["content-type"]);
        let rest = s.routes.find(&Method::POST, "/other").unwrap();
        assert_eq!(rest.scope_headers, ["authorization", "x-tenant-id"]);
        assert_eq!(rest.deny_response_headers, ["set-cookie"]);
    }

    #[test]
    fn an_invalid_header_name_is_refused_naming_the_option_and_value() {
        for (flag, value, bad) in [
            ("--scope-headers", "authorization, x tenant", "\"x tenant\""),
            ("--fingerprint-headers", "x:y", "\"x:y\""),
            ("--deny-response-headers", "set-cookie,é", "\"é\""),
            ("--allow-response-headers", "a(b)", "\"a(b)\""),
        ] {
            let err = refusal(&[flag, value]);
            let env = flag[2..].replace('-', "_").to_ascii_uppercase();
            assert!(
                err.contains(&format!("{flag} (IDEMGATE_{env}): {bad}")),
                "{err}"
            );
            assert!(err.contains("is not a valid HTTP header name"), "{err}");
        }
        let (_dir, path) = route_file("scope_headers = [\"x\\ty\"]");
        let err = refusal(&["--config", &path]);
        assert!(
            err.contains("scope_headers in route \"pay\": \"x\\ty\""),
            "{err}"
        );
        let (_dir, path) = file("allow_response_headers = [\"ok\", \"not ok\"]\n");
        let err = refusal(&["--config", &path]);
        assert!(
            err.contains(&format!("allow_response_headers in {path}: \"not ok\"")),
            "{err}"
        );
    }

    #[test]
    fn json_pointers_are_trimmed_and_must_start_with_a_slash() {
        let s = settings(&["--canonical-json", "--ignore-json-fields", "/ts, /id ,"]);
        let expected = FingerprintOptions::default().json(JsonMode::Canonical {
            ignore: vec!["/ts".into(), "/id".into()],
        });
        let route = default_route(&s);
        assert_eq!(format!("{:?}", route.fingerprint), format!("{expected:?}"));
        let err = refusal(&["--ignore-json-fields", "ts"]);
        assert!(
            err.contains("--ignore-json-fields (IDEMGATE_IGNORE_JSON_FIELDS): \"ts\""),
            "{err}"
        );
    }

    #[test]
    fn durations_outside_their_bounds_are_refused_naming_the_option() {
        for (flag, value, why) in [
            ("--lease-ttl", "0s", "too short: the minimum is 1s"),
            ("--lease-ttl", "999ms", "too short: the minimum is 1s"),
            ("--lease-ttl", "61m", "too long: the maximum is 1h"),
            ("--ttl", "999999999999d", "too long: the maximum is 365d"),
            ("--ttl", "0", "too short: the minimum is 1s"),
            ("--ttl", "99999999999999999d", "too large"),
            ("--unknown-ttl", "366d", "too long: the maximum is 365d"),
            ("--unknown-ttl", "500ms", "too short: the minimum is 1s"),
            (
                "--wait-timeout",
                "100000000000s",
                "too long: the maximum is 1h",
            ),
            ("--connect-timeout", "0ms", "too short: the minimum is 1ms"),
            ("--connect-timeout", "2h", "too long: the maximum is 1h"),
            ("--response-timeout", "0", "too short: the minimum is 1ms"),
            ("--response-timeout", "2h", "too long: the maximum is 1h"),
            ("--drain-timeout", "3601s", "too long: the maximum is 1h"),
            ("--waiter-poll-min", "0s", "too short: the minimum is 1ms"),
            ("--waiter-poll-max", "2h", "too long: the maximum is 1h"),
            ("--lease-ttl", "soon", "invalid duration"),
        ] {
            let err = refusal(&[flag, value]);
            assert!(
                err.contains(&format!("{flag} (IDEMGATE_")),
                "{flag} {value}: {err}"
            );
            assert!(
                err.contains(&format!("= {value:?}")),
                "{flag} {value}: {err}"
            );
            assert!(err.contains(why), "{flag} {value}: {err}");
        }
    }

    #[test]
    fn durations_at_their_bounds_are_accepted() {
        let s = settings(&[
            "--lease-ttl",
            "1s",
            "--ttl",
            "365d",
            "--unknown-ttl",
            "1s",
            "--wait-timeout",
            "0s",
            "--connect-timeout",
            "1ms",
            "--response-timeout",
            "1h",
            "--drain-timeout",
            "0",
            "--waiter-poll-min",
            "1h",
            "--waiter-poll-max",
            "60m",
        ]);
        assert_eq!(s.lease_ttl, Duration::from_secs(1));
        let hour = settings(&["--lease-ttl", "1h"]).lease_ttl;
        assert_eq!(hour, Duration::from_secs(3600));
        assert_eq!(s.drain_timeout, Duration::ZERO);
        assert_eq!(s.connect_timeout, Duration::from_millis(1));
        let route = default_route(&s);
        assert_eq!(route.engine.ttl, Duration::from_secs(365 * 86_400));
        assert_eq!(route.engine.unknown_ttl, Duration::from_secs(1));
        let zero = Concurrency::Wait {
            timeout: Duration::ZERO,
        };
        assert_eq!(route.engine.concurrency, zero);
    }

    #[test]
    fn route_values_get_the_same_bounds_named_after_the_route() {
        for (field, value, why) in [
            ("ttl", "0s", "too short: the minimum is 1s"),
            ("ttl", "400d", "too long: the maximum is 365d"),
            (
                "wait_timeout",
                "100000000000s",
                "too long: the maximum is 1h",
            ),
            ("max_request_body", "2GiB", "too large: the maximum is 1GiB"),
            ("max_response_body", "99999999999999999999", "too large"),
        ] {
            let (_dir, path) = route_file(&format!("{field} = \"{value}\""));
            let err = refusal(&["--config", &path]);
            let named = format!("{field} in route \"pay\" = {value:?}");
            assert!(err.contains(&named) && err.contains(why), "{err}");
        }
        let (_dir, path) = route_file("transient_statuses = [429, 0]");
        let err = refusal(&["--config", &path]);
        assert!(
            err.contains("transient_statuses in route \"pay\": 0 is not"),
            "{err}"
        );
        let (_dir, path) = route_file("recovery = \"lax\"");
        let err = refusal(&["--config", &path]);
        assert!(
            err.contains("recovery in route \"pay\" must be takeover or strict"),
            "{err}"
        );
        // A route's wait_timeout applies to the global wait mode.
        let (_dir, path) = route_file("wait_timeout = \"5s\"");
        let s = settings(&["--config", &path]);
        let five = Concurrency::Wait {
            timeout: Duration::from_secs(5),
        };
        assert_eq!(default_route(&s).engine.concurrency, five);
    }

    #[test]
    fn file_values_are_named_after_the_file() {
        let (_dir, path) = file("lease_ttl = \"0s\"\n");
        let err = refusal(&["--config", &path]);
        assert!(
            err.contains(&format!("lease_ttl in {path} = \"0s\" is too short")),
            "{err}"
        );
    }

    #[test]
    fn counts_sizes_and_statuses_outside_their_bounds_are_refused() {
        for (f, expected) in [
            (
                ["--max-waiters", "0"],
                "--max-waiters (IDEMGATE_MAX_WAITERS) = 0 is out of bounds",
            ),
            (["--max-waiters", "1000001"], "between 1 and 1000000"),
            (
                ["--workers", "0"],
                "--workers (IDEMGATE_WORKERS) = 0 is out of bounds",
            ),
            (["--workers", "1025"], "between 1 and 1024"),
            (
                ["--replay-cache-entries", "10000001"],
                "between 0 and 10000000",
            ),
            (
                ["--max-request-body", "2GiB"],
                "--max-request-body (IDEMGATE_MAX_REQUEST_BODY) = \"2GiB\" is too large",
            ),
            (
                ["--max-response-body", "1025MiB"],
                "--max-response-body (IDEMGATE_MAX_RESPONSE_BODY) = \"1025MiB\"",
            ),
            (
                ["--transient-statuses", "503,1000"],
                "--transient-statuses (IDEMGATE_TRANSIENT_STATUSES): 1000 is not",
            ),
            (
                ["--waiter-poll-min", "2s"],
                "--waiter-poll-min (IDEMGATE_WAITER_POLL_MIN) = 2s is above --waiter-poll-max (IDEMGATE_WAITER_POLL_MAX) = 1s",
            ),
        ] {
            let err = refusal(&f);
            assert!(err.contains(expected), "{expected}: {err}");
        }
        let s = settings(&[
            "--max-waiters",
            "1",
            "--replay-cache-entries",
            "0",
            "--max-request-body",
            "1GiB",
            "--max-buffered-body-bytes",
            "1GiB",
            "--max-response-body",
            "0",
            "--workers",
            "1024",
        ]);
        assert_eq!(
            (s.max_waiters, s.replay_cache_entries, s.workers),
            (1, 0, 1024)
        );
        assert_eq!(default_route(&s).max_request_body, 1 << 30);
    }

    #[test]
    fn booleans_take_true_false_1_and_0_from_flags_and_the_environment() {
        for (text, expected) in [
            ("1", true),
            ("0", false),
            ("true", true),
            ("FALSE", false),
            (" True ", true),
        ] {
            assert_eq!(parse_bool("--x", text).unwrap(), expected, "{text:?}");
        }
        for bad in ["yes", "", "2", "on"] {
            let err = parse_bool("--x (IDEMGATE_X)", bad).unwrap_err().to_string();
            assert!(err.contains("use true, false, 1 or 0"), "{err}");
        }
        let s = settings(&["--require-key", "1", "--canonical-json", "0"]);
        assert!(default_route(&s).required);
        // A bare flag means true.
        assert!(default_route(&settings(&["--require-key"])).required);
        let err = refusal(&["--require-key", "maybe"]);
        assert!(
            err.contains("--require-key (IDEMGATE_REQUIRE_KEY) = \"maybe\" is not a boolean"),
            "{err}"
        );
    }

    #[test]
    fn listen_addresses_take_ip_addresses_and_host_names() {
        assert_eq!(
            parse_listen("--listen", "127.0.0.1:8080").unwrap(),
            SocketAddr::from(([127, 0, 0, 1], 8080))
        );
        assert_eq!(
            parse_listen("--listen", "[::1]:9").unwrap(),
            "[::1]:9".parse::<SocketAddr>().unwrap()
        );
        let local = parse_listen("--listen", "localhost:8080").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 8080, "{local}");
        assert!(local.is_ipv4(), "IPv4 first: {local}");
        for (bad, why) in [
            ("8080", "has no port"),
            ("localhost", "has no port"),
            ("localhost:99999", "the port must be a number"),
            ("http://x:1", "not an address or host name"),
            ("a b:1", "not an address or host name"),
            (":8080", "not an address or host name"),
        ] {
            let err = format!(
                "{:#}",
                parse_listen("--listen (IDEMGATE_LISTEN)", bad).unwrap_err()
            );
            assert!(err.contains(why), "{bad}: {err}");
            assert!(
                err.contains("localhost:8080") || why.contains("port must"),
                "{err}"
            );
        }
        let s = settings(&[
            "--listen",
            "localhost:7000",
            "--admin-listen",
            "localhost:7001",
        ]);
        assert_eq!(s.listen, SocketAddr::from(([127, 0, 0, 1], 7000)));
        assert_eq!(s.admin_listen.port(), 7001);
        let (_dir, path) = file("listen = \"localhost:7002\"\n");
        assert_eq!(settings(&["--config", &path]).listen.port(), 7002);
    }

    #[test]
    fn durations_and_sizes_in_the_file_may_be_plain_numbers() {
        let (_dir, path) = file(
            "ttl = 90\nlease_ttl = 5\nmax_request_body = 2048\nwait_timeout = 0\n\
             [[route]]\nname = \"pay\"\npath = \"/**\"\nmax_response_body = 4096\n",
        );
        let s = settings(&["--config", &path]);
        let route = default_route(&s);
        assert_eq!(route.engine.ttl, Duration::from_secs(90));
        assert_eq!(s.lease_ttl, Duration::from_secs(5));
        assert_eq!(route.max_request_body, 2048);
        assert_eq!(route.max_response_body, 4096);
        assert_eq!(
            route.engine.concurrency,
            Concurrency::Wait {
                timeout: Duration::ZERO
            }
        );
        for bad in ["ttl = -5", "ttl = 2.5", "lease_ttl = [1]"] {
            let (_dir, path) = file(&format!("{bad}\n"));
            let err = refusal(&["--config", &path]);
            assert!(
                err.contains("a whole number (seconds, or bytes)"),
                "{bad}: {err}"
            );
        }
        // Bounds still apply, named after the file.
        let (_dir, path) = file("lease_ttl = 0\n");
        let err = refusal(&["--config", &path]);
        assert!(
            err.contains("lease_ttl in ") && err.contains("too short"),
            "{err}"
        );
    }

    #[test]
    fn counts_and_statuses_from_flags_name_the_option_and_the_forms() {
        let err = refusal(&["--workers", "two"]);
        assert!(
            err.contains("--workers (IDEMGATE_WORKERS) = \"two\" is not a whole number: use one from 1 to 1024"),
            "{err}"
        );
        let err = refusal(&["--transient-statuses", "503, x"]);
        assert!(
            err.contains(
                "--transient-statuses (IDEMGATE_TRANSIENT_STATUSES): \"x\" is not an HTTP status"
            ),
            "{err}"
        );
        let s = settings(&["--transient-statuses", " 503 ,429"]);
        let expected: BTreeSet<u16> = [429, 503].into_iter().collect();
        assert_eq!(default_route(&s).transient_statuses, expected);
        let (_dir, path) = file("workers = 0\n");
        let err = refusal(&["--config", &path]);
        assert!(
            err.contains("workers in ") && err.contains("between 1 and 1024"),
            "{err}"
        );
    }

    #[test]
    fn path_patterns_that_would_cover_other_paths_are_refused() {
        let (_dir, path) = file("[[route]]\nname = \"pay\"\npath = \"/a/**/b\"\n");
        let err = refusal(&["--config", &path]);
        assert!(
            err.contains("path in route \"pay\": `**` is allowed only as the last segment"),
            "{err}"
        );
        let (_dir, path) = file("[[route]]\nname = \"pay\"\npath = \"/v1/**\"\n");
        assert!(
            settings(&["--config", &path])
                .routes
                .find(&Method::POST, "/v1/a/b")
                .is_some()
        );
    }

    #[test]
    fn admin_tokens_are_checked_and_never_shown() {
        let token = AdminToken::parse("--admin-token", "  abcdefghijklmnop0123==\n").unwrap();
        assert_eq!(token.expose(), "abcdefghijklmnop0123==");
        assert_eq!(format!("{token:?}"), "AdminToken(<hidden>)");
        for (bad, why) in [
            ("", "is empty"),
            ("short", "the token is 5 characters"),
            (&"a".repeat(513), "the token is 513 characters"),
            ("has spaces in it 0123456789", "may hold only"),
            ("=abcdefghijklmnopqrstu", "may hold only"),
            ("abcdefgh=ijklmnopqrstu", "may hold only"),
        ] {
            let err = AdminToken::parse("--admin-token", bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let s = settings(&["--admin-token", "abcdefghijklmnop0123"]);
        assert!(
            !format!("{s:?}").contains("abcdefghijklmnop0123"),
            "Debug of Settings"
        );
        assert!(!s.effective_toml().contains("abcdefghijklmnop0123"));
    }

    #[test]
    fn the_admin_token_comes_from_one_place() {
        let dir = tempfile::tempdir().unwrap();
        let token_path = dir.path().join("token");
        std::fs::write(&token_path, "from-the-file-0123456789\n").unwrap();
        let token_path = token_path.to_str().unwrap().to_owned();
        let s = settings(&["--admin-token-file", &token_path]);
        let access = &s.admin_access;
        assert_eq!(
            access.token.as_ref().map(AdminToken::expose),
            Some("from-the-file-0123456789")
        );
        assert!(
            access
                .token_source
                .as_deref()
                .unwrap()
                .contains(&token_path)
        );
        let err = refusal(&[
            "--admin-token-file",
            &token_path,
            "--admin-token",
            "x".repeat(20).as_str(),
        ]);
        assert!(err.contains("give one"), "{err}");
        // The config file's keys, below flags and variables.
        let (_dir, path) = file(&format!("admin_token_file = {token_path:?}\n"));
        let s = settings(&["--config", &path]);
        assert!(s.admin_access.token.is_some());
        let s = settings(&[
            "--config",
            &path,
            "--admin-token",
            "from-the-flag-0123456789",
        ]);
        assert_eq!(
            s.admin_access.token.as_ref().map(AdminToken::expose),
            Some("from-the-flag-0123456789")
        );
        let (_dir, path) =
            file("admin_token = \"in-the-file-0123456789\"\nadmin_token_file = \"/x\"\n");
        let err = refusal(&["--config", &path]);
        assert!(
            err.contains("both admin_token_file and admin_token"),
            "{err}"
        );
        // A world-readable token file is warned about.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let s = settings(&["--admin-token-file", &token_path]);
            assert!(
                s.warnings().iter().any(|w| w.contains("chmod 600")),
                "{:?}",
                s.warnings()
            );
            std::fs::set_permissions(&token_path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let s = settings(&["--admin-token-file", &token_path]);
            assert!(s.warnings().is_empty(), "{:?}", s.warnings());
        }
    }

    #[test]
    fn off_loopback_the_admin_listener_needs_a_token_or_an_explicit_opt_out() {
        let err = refusal(&["--admin-listen", "0.0.0.0:9090"]);
        assert!(
            err.contains("refusing to start") && err.contains("--admin-token-file"),
            "{err}"
        );
        let err = refusal(&["--admin-listen", "192.0.2.1:9090"]);
        assert!(err.contains("not on loopback"), "{err}");
        let s = settings(&[
            "--admin-listen",
            "0.0.0.0:9090",
            "--admin-token",
            "t0123456789abcdef",
        ]);
        assert!(s.warnings().is_empty(), "{:?}", s.warnings());
        let s = settings(&["--admin-listen", "0.0.0.0:9090", "--admin-insecure-no-auth"]);
        assert!(s.admin_access.insecure_no_auth);
        assert!(
            s.warnings()
                .iter()
                .any(|w| w.contains("off loopback without a token"))
        );
        let s = settings(&["--admin-listen", "[::1]:9090"]);
        assert!(s.admin_access.token.is_none() && s.warnings().is_empty());
    }

    #[test]
    fn allowed_admin_hosts_are_names_subdomains_or_any() {
        let s = settings(&["--admin-allowed-hosts", "Admin.Internal, *.corp.example,"]);
        let hosts = &s.admin_access.allowed_hosts;
        assert_eq!(
            hosts,
            &[
                AllowedHost::Exact("admin.internal".into()),
                AllowedHost::SubdomainOf("corp.example".into())
            ]
        );
        assert!(hosts[0].allows("admin.internal"));
        assert!(!hosts[0].allows("x.admin.internal"));
        assert!(hosts[1].allows("a.corp.example") && hosts[1].allows("a.b.corp.example"));
        assert!(!hosts[1].allows("corp.example") && !hosts[1].allows("evilcorp.example"));
        assert!(AllowedHost::Any.allows("anything"));
        for bad in ["admin.internal:9090", "http://x", "a b", "*"] {
            let r = resolve(&flags(&["--admin-allowed-hosts", bad]));
            if bad == "*" {
                // Allowed, with a warning when there is no token.
                assert!(
                    r.unwrap()
                        .warnings()
                        .iter()
                        .any(|w| w.contains("DNS rebinding"))
                );
            } else {
                let err = format!("{:#}", r.unwrap_err());
                assert!(
                    err.contains("--admin-allowed-hosts (IDEMGATE_ADMIN_ALLOWED_HOSTS)"),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn the_effective_configuration_shows_what_takes_effect() {
        let (_dir, path) = file(
            "ttl = \"2h\"\nconcurrency = \"reject\"\n[[route]]\nname = \"pay\"\npath = \"/pay/**\"\n\
             methods = [\"post\"]\nallow_response_headers = [\"content-type\"]\n",
        );
        let text = settings(&[
            "--config",
            &path,
            "--store",
            "redis://:pw@127.0.0.1:6379",
            "--namespace",
            "n",
        ])
        .effective_toml();
        let parsed: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(
            parsed["store"].as_str(),
            Some("redis://:***@127.0.0.1:6379"),
            "{text}"
        );
        let route = parsed["route"].as_array().unwrap()[0].as_table().unwrap();
        assert_eq!(route["ttl"].as_str(), Some("2h"));
        assert_eq!(route["concurrency"].as_str(), Some("reject"));
        assert!(
            !route.contains_key("wait_timeout"),
            "no wait in reject mode"
        );
        assert_eq!(route["allow_response_headers"].as_array().unwrap().len(), 1);
        assert!(text.starts_with("# idemgate: the effective configuration"));
        assert!(text.contains("# admin token: none"));
    }

    #[test]
    fn a_shared_store_needs_an_explicit_namespace() {
        for store in [
            "redis://127.0.0.1:6379",
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
            "postgres://app:secret@127.0.0.1/db",
            "postgresql://127.0.0.1/db",
        ] {
            let err = refusal(&["--store", store]);
            assert!(
                err.contains("refusing to start") && err.contains("no namespace"),
                "{err}"
            );
            assert!(err.contains("--namespace (IDEMGATE_NAMESPACE"), "{err}");
            assert!(
                err.contains("keeps its records with --namespace default"),
                "{err}"
            );
            assert!(!err.contains("secret"), "the password stays out: {err}");
            let s = settings(&["--store", store, "--namespace", " billing "]);
            assert_eq!(s.namespace, "billing");
            // `default`, said explicitly, is a decision: accepted.
            assert_eq!(
                settings(&["--store", store, "--namespace", "default"]).namespace,
                "default"
            );
        }
        let (_dir, path) = file("store = \"redis://127.0.0.1:6379\"\nnamespace = \"orders\"\n");
        assert_eq!(settings(&["--config", &path]).namespace, "orders");
        // A store of this process's own keeps the default.
        for store in ["memory://", "file:./somewhere"] {
            assert_eq!(settings(&["--store", store]).namespace, "default");
        }
        let err = refusal(&["--namespace", "  "]);
        assert!(
            err.contains("--namespace (IDEMGATE_NAMESPACE) is empty"),
            "{err}"
        );
        let err = refusal(&["--namespace", &"x".repeat(256)]);
        assert!(err.contains("at most 255 bytes"), "{err}");
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let (_dir, path) = file(
            r#"
upstream = "http://127.0.0.1:1"
listen = "127.0.0.1:7000"
ttl = "1h"
concurrency = "reject"

[[route]]
name = "pay"
path = "/pay/**"
methods = ["post"]
required = true
canonical_json = true
ignore_json_fields = ["/ts"]
"#,
        );
        let s = settings(&["--config", &path, "--listen", "127.0.0.1:7001"]);
        assert_eq!(s.listen.port(), 7001); // flag wins
        assert_eq!(s.admin_listen.port(), 9090); // default
        let route = s.routes.find(&Method::POST, "/pay/1").unwrap();
        assert!(route.required);
        assert_eq!(route.engine.ttl, Duration::from_secs(3600)); // file
        assert_eq!(route.engine.concurrency, Concurrency::Reject);
        assert!(s.routes.find(&Method::PATCH, "/pay/1").is_none());
        assert!(s.routes.find(&Method::POST, "/other").is_none());
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        let args = ServeArgs {
            upstream: Some("ftp://x".into()),
            ..ServeArgs::default()
        };
        assert!(resolve(&args).unwrap_err().to_string().contains("http://"));
        let err = refusal(&["--concurrency", "maybe"]);
        assert!(
            err.contains("--concurrency (IDEMGATE_CONCURRENCY) must be wait or reject"),
            "{err}"
        );
        let err = refusal(&["--log-format", "xml"]);
        assert!(
            err.contains("--log-format (IDEMGATE_LOG_FORMAT) must be text or json"),
            "{err}"
        );
    }

    #[test]
    fn edge_limits_have_defaults_and_are_checked() {
        let base = ServeArgs {
            upstream: Some("http://127.0.0.1:1".into()),
            ..ServeArgs::default()
        };
        let s = resolve(&base).unwrap();
        assert_eq!(s.upstream_idle_timeout, Duration::from_millis(500));
        assert_eq!(s.header_read_timeout, Duration::from_secs(10));
        assert_eq!(s.body_read_timeout, Duration::from_secs(30));
        assert_eq!(s.max_connections, 10_000);
        assert_eq!(s.max_concurrent_requests, 4_096);
        assert_eq!(s.max_buffered_body_bytes, 256 << 20);
        let small = ServeArgs {
            max_buffered_body_bytes: Some("1MiB".into()),
            ..base.clone()
        };
        let e = format!("{:#}", resolve(&small).unwrap_err());
        assert!(e.contains("could never be buffered"), "{e}");
        let zero = ServeArgs {
            max_connections: Some("0".into()),
            ..base
        };
        let e = format!("{:#}", resolve(&zero).unwrap_err());
        assert!(
            e.contains("max-connections") && e.contains("between 1 and"),
            "{e}"
        );
    }

    #[test]
    fn deadlines_are_checked_against_each_other() {
        let s = settings(&["--lease-ttl", "1s"]);
        assert_eq!(
            s.store_timeout,
            Duration::from_millis(300),
            "3/10 of the lease by default"
        );
        assert_eq!(settings(&[]).store_timeout, Duration::from_secs(3));
        let e = refusal(&["--lease-ttl", "3s", "--store-timeout", "1s"]);
        assert!(e.contains("under a third of lease_ttl"), "{e}");
        let e = refusal(&["--connect-timeout", "5s", "--response-timeout", "3s"]);
        assert!(e.contains("must be longer than connect_timeout"), "{e}");
        let s = settings(&["--response-timeout", "4s"]);
        assert_eq!(s.connect_timeout, Duration::from_secs(2), "half by default");
    }

    #[test]
    fn tls_settings_come_in_pairs_and_need_an_https_upstream() {
        let https = |extra: &[&str]| {
            let argv = ["idemgate", "--upstream", "https://api.internal:8443/v1"];
            resolve(&Cli::try_parse_from(argv.iter().chain(extra)).unwrap().serve)
        };
        let s = https(&[
            "--upstream-ca-file",
            "ca.pem",
            "--upstream-client-cert",
            "c.pem",
            "--upstream-client-key",
            "c.key",
        ])
        .unwrap();
        assert_eq!(s.upstream.scheme_str(), Some("https"));
        assert_eq!(s.upstream_ca_file, Some(PathBuf::from("ca.pem")));
        assert_eq!(
            s.upstream_client_cert,
            Some(CertKey {
                cert: "c.pem".into(),
                key: "c.key".into()
            })
        );
        assert_eq!(s.tls, None);
        let e = format!(
            "{:#}",
            https(&["--upstream-client-cert", "c.pem"]).unwrap_err()
        );
        assert!(
            e.contains("--upstream-client-cert (IDEMGATE_UPSTREAM_CLIENT_CERT) is set without its private key"),
            "{e}"
        );
        let e = refusal(&["--upstream-ca-file", "ca.pem"]);
        assert!(e.contains("is not https://"), "{e}");
        let e = refusal(&[
            "--upstream-client-cert",
            "c.pem",
            "--upstream-client-key",
            "c.key",
        ]);
        assert!(e.contains("is not https://"), "{e}");
        let e = refusal(&["--tls-key", "k.pem"]);
        assert!(
            e.contains("--tls-key (IDEMGATE_TLS_KEY) is set without its certificate"),
            "{e}"
        );
        // The listener's pair works with any upstream, from flags or the file.
        let s = settings(&["--tls-cert", "t.pem", "--tls-key", "t.key"]);
        assert_eq!(
            s.tls,
            Some(CertKey {
                cert: "t.pem".into(),
                key: "t.key".into()
            })
        );
        let (_dir, path) = file("tls_cert = \"f.pem\"\ntls_key = \"f.key\"\n");
        let s = settings(&["--config", &path, "--tls-key", "flag.key"]);
        assert_eq!(
            s.tls,
            Some(CertKey {
                cert: "f.pem".into(),
                key: "flag.key".into()
            }),
            "a flag overrides the file's key"
        );
        let (_dir, path) = file("upstream_ca_file = \"ca.pem\"\n");
        let e = refusal(&["--config", &path]);
        assert!(
            e.contains("upstream_ca_file in") && e.contains("is not https://"),
            "{e}"
        );
    }
}
