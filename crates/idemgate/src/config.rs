//! Settings: command-line flags > `IDEMGATE_*` environment variables > the TOML file > defaults.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::Method;
use idemgate_core::engine::{Concurrency, Recovery};
use idemgate_core::fingerprint::{FingerprintOptions, JsonMode};
use idemgate_tower::policy::{
    DEFAULT_BODY_LIMIT, DEFAULT_TRANSIENT, FailMode, RoutePolicy, Routes,
};
use serde::Deserialize;

/// Flags of `idemgate serve`. Every one can also be set by its `IDEMGATE_*` variable and in the
/// config file (same name, `_` instead of `-`).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// Upstream base URL, e.g. http://127.0.0.1:3000 (required unless in the config file).
    #[arg(long, env = "IDEMGATE_UPSTREAM")]
    pub upstream: Option<String>,
    /// Proxy listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "IDEMGATE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin listen address (metrics, health, admin API, dashboard) [default: 127.0.0.1:9090].
    #[arg(long, env = "IDEMGATE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Store URL: memory://, file:PATH [default: file:./idemgate-data].
    #[arg(long, env = "IDEMGATE_STORE")]
    pub store: Option<String>,
    /// TOML config file.
    #[arg(long, env = "IDEMGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// POST/PATCH without an Idempotency-Key get 400 (default route only).
    #[arg(long, env = "IDEMGATE_REQUIRE_KEY", num_args = 0..=1, default_missing_value = "true")]
    pub require_key: Option<bool>,
    /// Record namespace [default: default].
    #[arg(long, env = "IDEMGATE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Record TTL, e.g. 24h [default: 24h].
    #[arg(long, env = "IDEMGATE_TTL")]
    pub ttl: Option<String>,
    /// How long outcome-unknown records are kept [default: 24h].
    #[arg(long, env = "IDEMGATE_UNKNOWN_TTL")]
    pub unknown_ttl: Option<String>,
    /// Lease length, renewed while the upstream call runs [default: 10s].
    #[arg(long, env = "IDEMGATE_LEASE_TTL")]
    pub lease_ttl: Option<String>,
    /// wait or reject [default: wait].
    #[arg(long, env = "IDEMGATE_CONCURRENCY")]
    pub concurrency: Option<String>,
    /// Longest wait for an in-flight duplicate before 409 [default: 30s].
    #[arg(long, env = "IDEMGATE_WAIT_TIMEOUT")]
    pub wait_timeout: Option<String>,
    /// takeover or strict [default: takeover].
    #[arg(long, env = "IDEMGATE_RECOVERY")]
    pub recovery: Option<String>,
    /// closed (503 when the store is down) or open (forward unprotected) [default: closed].
    #[arg(long, env = "IDEMGATE_FAIL_MODE")]
    pub fail_mode: Option<String>,
    /// Request body limit, e.g. 8MiB [default: 8MiB].
    #[arg(long, env = "IDEMGATE_MAX_REQUEST_BODY")]
    pub max_request_body: Option<String>,
    /// Response body limit for storing, e.g. 8MiB [default: 8MiB].
    #[arg(long, env = "IDEMGATE_MAX_RESPONSE_BODY")]
    pub max_response_body: Option<String>,
    /// Upstream connect timeout [default: 5s].
    #[arg(long, env = "IDEMGATE_CONNECT_TIMEOUT")]
    pub connect_timeout: Option<String>,
    /// Upstream response timeout (whole response) [default: 60s].
    #[arg(long, env = "IDEMGATE_RESPONSE_TIMEOUT")]
    pub response_timeout: Option<String>,
    /// How long SIGTERM waits for in-flight requests [default: 30s].
    #[arg(long, env = "IDEMGATE_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, env = "IDEMGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Upstream statuses released instead of stored, comma-separated [default: 408,425,429,502,503,504].
    #[arg(long, env = "IDEMGATE_TRANSIENT_STATUSES", value_delimiter = ',')]
    pub transient_statuses: Option<Vec<u16>>,
    /// Headers identifying the principal, comma-separated [default: authorization].
    #[arg(long, env = "IDEMGATE_SCOPE_HEADERS", value_delimiter = ',')]
    pub scope_headers: Option<Vec<String>>,
    /// Request headers included in the fingerprint, comma-separated [default: content-type].
    #[arg(long, env = "IDEMGATE_FINGERPRINT_HEADERS", value_delimiter = ',')]
    pub fingerprint_headers: Option<Vec<String>>,
    /// Response headers never stored, comma-separated [default: set-cookie].
    #[arg(long, env = "IDEMGATE_DENY_RESPONSE_HEADERS", value_delimiter = ',')]
    pub deny_response_headers: Option<Vec<String>>,
    /// If set, only these response headers are stored, comma-separated [default: all not denied].
    #[arg(long, env = "IDEMGATE_ALLOW_RESPONSE_HEADERS", value_delimiter = ',')]
    pub allow_response_headers: Option<Vec<String>>,
    /// Fingerprint JSON bodies in RFC 8785 canonical form [default: false].
    #[arg(long, env = "IDEMGATE_CANONICAL_JSON", num_args = 0..=1, default_missing_value = "true")]
    pub canonical_json: Option<bool>,
    /// JSON pointers left out of the fingerprint, comma-separated (with --canonical-json).
    #[arg(long, env = "IDEMGATE_IGNORE_JSON_FIELDS", value_delimiter = ',')]
    pub ignore_json_fields: Option<Vec<String>>,
    /// Completed records cached per instance in front of Redis/PostgreSQL (0 disables; a delete
    /// made through another instance is seen within 30 s) [default: 100000].
    #[arg(long, env = "IDEMGATE_REPLAY_CACHE_ENTRIES")]
    pub replay_cache_entries: Option<usize>,
    /// First pause between a waiter's store polls (doubling up to --waiter-poll-max) [default: 50ms].
    #[arg(long, env = "IDEMGATE_WAITER_POLL_MIN")]
    pub waiter_poll_min: Option<String>,
    /// Longest pause between a waiter's store polls (the fallback when no completion notice
    /// arrives) [default: 1s].
    #[arg(long, env = "IDEMGATE_WAITER_POLL_MAX")]
    pub waiter_poll_max: Option<String>,
    /// Most requests waiting on in-flight duplicates at once [default: 10000].
    #[arg(long, env = "IDEMGATE_MAX_WAITERS")]
    pub max_waiters: Option<usize>,
    /// Proxy worker threads, each serving its share of the connections on its own
    /// single-threaded runtime [default: one per CPU].
    #[arg(long, env = "IDEMGATE_WORKERS")]
    pub workers: Option<usize>,
    /// Deadline of every store operation; past it a request gets 503 store-unavailable (nothing
    /// forwarded) and a renewal is retried [default: 3s; 10ms to 60s].
    #[arg(long, env = "IDEMGATE_STORE_TIMEOUT")]
    pub store_timeout: Option<String>,

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
    pub max_connections: Option<usize>,
    /// Most protected (keyed) requests in progress at once; beyond it 503 + Retry-After
    /// [default: 4096].
    #[arg(long, env = "IDEMGATE_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,
    /// Most bytes of protected request bodies buffered at once, over all requests; a request
    /// that cannot reserve its body gets 503 + Retry-After [default: 256MiB].
    #[arg(long, env = "IDEMGATE_MAX_BUFFERED_BODY_BYTES")]
    pub max_buffered_body_bytes: Option<String>,
}

/// The `[[route]]` tables of the config file. Unset fields take the global settings.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    name: String,
    path: String,
    methods: Option<Vec<String>>,
    required: Option<bool>,
    ttl: Option<String>,
    concurrency: Option<String>,
    wait_timeout: Option<String>,
    recovery: Option<String>,
    fail_mode: Option<String>,
    max_request_body: Option<String>,
    max_response_body: Option<String>,
    transient_statuses: Option<Vec<u16>>,
    scope_headers: Option<Vec<String>>,
    fingerprint_headers: Option<Vec<String>>,
    deny_response_headers: Option<Vec<String>>,
    allow_response_headers: Option<Vec<String>>,
    canonical_json: Option<bool>,
    ignore_json_fields: Option<Vec<String>>,
}

/// The config file.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    upstream: Option<String>,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    store: Option<String>,
    require_key: Option<bool>,
    namespace: Option<String>,
    ttl: Option<String>,
    unknown_ttl: Option<String>,
    lease_ttl: Option<String>,
    concurrency: Option<String>,
    wait_timeout: Option<String>,
    recovery: Option<String>,
    fail_mode: Option<String>,
    max_request_body: Option<String>,
    max_response_body: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
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
    waiter_poll_max: Option<String>,
    waiter_poll_min: Option<String>,
    workers: Option<usize>,
    store_timeout: Option<String>,
    // HTTP edge: limits and timeouts.
    upstream_idle_timeout: Option<String>,
    header_read_timeout: Option<String>,
    body_read_timeout: Option<String>,
    max_connections: Option<usize>,
    max_concurrent_requests: Option<usize>,
    max_buffered_body_bytes: Option<String>,
    #[serde(default)]
    route: Vec<RouteConfig>,
}

/// Everything `serve` needs, resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub upstream: http::Uri,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub store: String,
    pub namespace: String,
    pub lease_ttl: Duration,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub drain_timeout: Duration,
    pub json_logs: bool,
    pub max_waiters: usize,
    pub replay_cache_entries: usize,
    pub waiter_poll_min: Duration,
    pub waiter_poll_max: Duration,
    pub workers: usize,
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
}

/// Parses `250ms`, `30s`, `10m`, `24h`, `7d`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("invalid duration {s:?}"))?;
    Ok(match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        other => bail!("invalid duration unit {other:?} in {s:?} (use ms, s, m, h or d)"),
    })
}

/// Parses `1048576`, `512KiB`, `8MiB`, `1GiB` (also KB/MB/GB as powers of 1000).
pub fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().with_context(|| format!("invalid size {s:?}"))?;
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

fn parse_concurrency(mode: &str, wait: Duration) -> Result<Concurrency> {
    match mode {
        "wait" => Ok(Concurrency::Wait { timeout: wait }),
        "reject" => Ok(Concurrency::Reject),
        other => bail!("concurrency must be wait or reject, not {other:?}"),
    }
}

fn parse_recovery(mode: &str) -> Result<Recovery> {
    match mode {
        "takeover" => Ok(Recovery::Takeover),
        "strict" => Ok(Recovery::Strict),
        other => bail!("recovery must be takeover or strict, not {other:?}"),
    }
}

fn parse_fail_mode(mode: &str) -> Result<FailMode> {
    match mode {
        "closed" => Ok(FailMode::Closed),
        "open" => Ok(FailMode::Open),
        other => bail!("fail_mode must be closed or open, not {other:?}"),
    }
}

/// A list setting: flag/env, else file, else a one-element default. An empty value means none.
fn list(flag: &Option<Vec<String>>, file: &Option<Vec<String>>, default: &str) -> Vec<String> {
    flag.clone()
        .or_else(|| file.clone())
        .unwrap_or_else(|| vec![default.to_owned()])
        .into_iter()
        .filter(|h| !h.trim().is_empty())
        .collect()
}

fn lower(v: &[String]) -> Vec<String> {
    v.iter().map(|h| h.to_ascii_lowercase()).collect()
}

/// The global route defaults, resolved from flags, env and file.
struct Defaults {
    ttl: Duration,
    unknown_ttl: Duration,
    concurrency: String,
    wait_timeout: Duration,
    recovery: String,
    fail_mode: String,
    max_request_body: usize,
    max_response_body: usize,
    transient: Vec<u16>,
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

    fn apply(&self, mut p: RoutePolicy, r: &RouteConfig) -> Result<RoutePolicy> {
        let dur = |v: &Option<String>, d: Duration| v.as_deref().map_or(Ok(d), parse_duration);
        let size = |v: &Option<String>, d: usize| v.as_deref().map_or(Ok(d), parse_size);
        p.engine.ttl = dur(&r.ttl, self.ttl)?;
        p.engine.unknown_ttl = self.unknown_ttl;
        let wait = dur(&r.wait_timeout, self.wait_timeout)?;
        p.engine.concurrency =
            parse_concurrency(r.concurrency.as_deref().unwrap_or(&self.concurrency), wait)?;
        p.engine.recovery = parse_recovery(r.recovery.as_deref().unwrap_or(&self.recovery))?;
        p.fail_mode = parse_fail_mode(r.fail_mode.as_deref().unwrap_or(&self.fail_mode))?;
        p.max_request_body = size(&r.max_request_body, self.max_request_body)?;
        p.max_response_body = size(&r.max_response_body, self.max_response_body)?;
        p.transient_statuses = r
            .transient_statuses
            .clone()
            .unwrap_or_else(|| self.transient.clone())
            .into_iter()
            .collect::<BTreeSet<u16>>();
        p.scope_headers = lower(r.scope_headers.as_ref().unwrap_or(&self.scope_headers));
        p.fingerprint_headers = lower(
            r.fingerprint_headers
                .as_ref()
                .unwrap_or(&self.fingerprint_headers),
        );
        p.deny_response_headers = lower(
            r.deny_response_headers
                .as_ref()
                .unwrap_or(&self.deny_response_headers),
        );
        p.allow_response_headers = r
            .allow_response_headers
            .as_ref()
            .or(self.allow_response_headers.as_ref())
            .map(|a| lower(a));
        let canonical = r.canonical_json.unwrap_or(self.canonical_json);
        let ignore = r
            .ignore_json_fields
            .clone()
            .unwrap_or_else(|| self.ignore_json_fields.clone());
        p.fingerprint = FingerprintOptions::default().json(if canonical {
            JsonMode::Canonical { ignore }
        } else {
            JsonMode::Raw
        });
        Ok(p)
    }
}

/// Resolves flags > env (both via clap) > file > defaults.
pub fn resolve(args: &ServeArgs) -> Result<Settings> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let pick = |flag: &Option<String>, file: &Option<String>, default: &str| -> String {
        flag.clone()
            .or_else(|| file.clone())
            .unwrap_or_else(|| default.to_owned())
    };
    let upstream = args.upstream.clone().or(file.upstream.clone()).context(
        "--upstream (or IDEMGATE_UPSTREAM, or `upstream` in the config file) is required",
    )?;
    let upstream: http::Uri = upstream
        .parse()
        .with_context(|| format!("invalid upstream URL {upstream:?}"))?;
    if upstream.scheme_str() != Some("http") || upstream.authority().is_none() {
        bail!("the upstream must be an http:// URL with a host, got {upstream}");
    }
    let defaults = Defaults {
        ttl: parse_duration(&pick(&args.ttl, &file.ttl, "24h"))?,
        unknown_ttl: parse_duration(&pick(&args.unknown_ttl, &file.unknown_ttl, "24h"))?,
        concurrency: pick(&args.concurrency, &file.concurrency, "wait"),
        wait_timeout: parse_duration(&pick(&args.wait_timeout, &file.wait_timeout, "30s"))?,
        recovery: pick(&args.recovery, &file.recovery, "takeover"),
        fail_mode: pick(&args.fail_mode, &file.fail_mode, "closed"),
        max_request_body: match args
            .max_request_body
            .as_ref()
            .or(file.max_request_body.as_ref())
        {
            Some(s) => parse_size(s)?,
            None => DEFAULT_BODY_LIMIT,
        },
        max_response_body: match args
            .max_response_body
            .as_ref()
            .or(file.max_response_body.as_ref())
        {
            Some(s) => parse_size(s)?,
            None => DEFAULT_BODY_LIMIT,
        },
        transient: args
            .transient_statuses
            .clone()
            .or_else(|| file.transient_statuses.clone())
            .unwrap_or_else(|| DEFAULT_TRANSIENT.to_vec()),
        scope_headers: list(&args.scope_headers, &file.scope_headers, "authorization"),
        fingerprint_headers: list(
            &args.fingerprint_headers,
            &file.fingerprint_headers,
            "content-type",
        ),
        deny_response_headers: list(
            &args.deny_response_headers,
            &file.deny_response_headers,
            "set-cookie",
        ),
        allow_response_headers: args
            .allow_response_headers
            .clone()
            .or_else(|| file.allow_response_headers.clone()),
        canonical_json: args.canonical_json.or(file.canonical_json).unwrap_or(false),
        ignore_json_fields: args
            .ignore_json_fields
            .clone()
            .or_else(|| file.ignore_json_fields.clone())
            .unwrap_or_default(),
    };
    let require_key = args.require_key.or(file.require_key).unwrap_or(false);
    let routes = if file.route.is_empty() {
        Routes::new(vec![defaults.route("default", "/**", require_key)?])
    } else {
        let mut out = Vec::new();
        for r in &file.route {
            let mut p =
                RoutePolicy::new(&r.name, &r.path).required(r.required.unwrap_or(require_key));
            if let Some(methods) = &r.methods {
                let parsed: Result<Vec<Method>> = methods
                    .iter()
                    .map(|m| {
                        Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                            .with_context(|| format!("invalid method {m:?} in route {}", r.name))
                    })
                    .collect();
                p = p.methods(parsed?);
            }
            out.push(
                defaults
                    .apply(p, r)
                    .with_context(|| format!("in route {:?}", r.name))?,
            );
        }
        Routes::new(out)
    };
    let log_format = pick(&args.log_format, &file.log_format, "text");
    if log_format != "text" && log_format != "json" {
        bail!("log_format must be text or json, not {log_format:?}");
    }
    // HTTP edge: limits and timeouts.
    let positive = |name: &str, d: Duration| -> Result<Duration> {
        if d.is_zero() {
            bail!("{name} must be more than zero");
        }
        Ok(d)
    };
    let at_least_one = |name: &str, n: usize| -> Result<usize> {
        if n == 0 {
            bail!("{name} must be at least 1");
        }
        Ok(n)
    };
    let upstream_idle_timeout = parse_duration(&pick(
        &args.upstream_idle_timeout,
        &file.upstream_idle_timeout,
        "500ms",
    ))?;
    let header_read_timeout = positive(
        "header_read_timeout",
        parse_duration(&pick(
            &args.header_read_timeout,
            &file.header_read_timeout,
            "10s",
        ))?,
    )?;
    let body_read_timeout = positive(
        "body_read_timeout",
        parse_duration(&pick(
            &args.body_read_timeout,
            &file.body_read_timeout,
            "30s",
        ))?,
    )?;
    let max_connections = at_least_one(
        "max_connections",
        args.max_connections
            .or(file.max_connections)
            .unwrap_or(10_000),
    )?;
    let max_concurrent_requests = at_least_one(
        "max_concurrent_requests",
        args.max_concurrent_requests
            .or(file.max_concurrent_requests)
            .unwrap_or(4_096),
    )?;
    let max_buffered_body_bytes = parse_size(&pick(
        &args.max_buffered_body_bytes,
        &file.max_buffered_body_bytes,
        "256MiB",
    ))?;
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
    Ok(Settings {
        upstream_idle_timeout,
        header_read_timeout,
        body_read_timeout,
        max_connections,
        max_concurrent_requests,
        max_buffered_body_bytes,
        upstream,
        listen: args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
        admin_listen: args
            .admin_listen
            .or(file.admin_listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090))),
        store: pick(&args.store, &file.store, "file:./idemgate-data"),
        namespace: pick(&args.namespace, &file.namespace, "default"),
        lease_ttl: parse_duration(&pick(&args.lease_ttl, &file.lease_ttl, "10s"))?,
        connect_timeout: parse_duration(&pick(&args.connect_timeout, &file.connect_timeout, "5s"))?,
        response_timeout: parse_duration(&pick(
            &args.response_timeout,
            &file.response_timeout,
            "60s",
        ))?,
        drain_timeout: parse_duration(&pick(&args.drain_timeout, &file.drain_timeout, "30s"))?,
        json_logs: log_format == "json",
        max_waiters: args.max_waiters.or(file.max_waiters).unwrap_or(10_000),
        waiter_poll_min: parse_duration(&pick(
            &args.waiter_poll_min,
            &file.waiter_poll_min,
            "50ms",
        ))?,
        waiter_poll_max: parse_duration(&pick(&args.waiter_poll_max, &file.waiter_poll_max, "1s"))?,
        replay_cache_entries: args
            .replay_cache_entries
            .or(file.replay_cache_entries)
            .unwrap_or(100_000),
        workers: match args.workers.or(file.workers) {
            Some(0) => bail!("workers must be at least 1"),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        },
        routes,
        store_timeout: {
            let d = parse_duration(&pick(&args.store_timeout, &file.store_timeout, "3s"))?;
            if !(Duration::from_millis(10)..=Duration::from_secs(60)).contains(&d) {
                bail!("store_timeout must be between 10ms and 60s, got {d:?}");
            }
            d
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("3 weeks").is_err());
        assert_eq!(parse_size("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("8XB").is_err());
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
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
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            listen: Some("127.0.0.1:7001".parse().unwrap()),
            ..ServeArgs::default()
        };
        let s = resolve(&args).unwrap();
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
        let args = ServeArgs {
            upstream: Some("http://127.0.0.1:1".into()),
            concurrency: Some("maybe".into()),
            ..ServeArgs::default()
        };
        assert!(format!("{:#}", resolve(&args).unwrap_err()).contains("wait or reject"));
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
            max_connections: Some(0),
            ..base
        };
        assert!(format!("{:#}", resolve(&zero).unwrap_err()).contains("at least 1"));
    }
}
