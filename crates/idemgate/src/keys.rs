//! `idemgate keys`: a client of the admin API.
//!
//! Output is a readable table (or `field value` lines for one record); `--json` prints the API's
//! JSON instead, for scripts. Exit codes: 0 done, 1 refused or failed (including an unreachable
//! or wrong address, and a missing or wrong token), 2 usage error, 3 not found.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// Exit code: the record (or key) does not exist.
pub const EXIT_NOT_FOUND: i32 = 3;
/// Exit code: refused or failed.
pub const EXIT_FAILED: i32 = 1;

/// How long one admin API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// `idemgate keys`: where the admin API is, how to authenticate, and what to do. The options
/// may come before or after the command.
#[derive(clap::Args, Debug)]
pub struct KeysArgs {
    /// The admin listener: http://HOST:PORT or HOST:PORT (the address of `serve
    /// --admin-listen`, not the proxy's --listen).
    #[arg(
        long,
        global = true,
        env = "IDEMGATE_ADMIN_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    pub admin: String,
    /// File holding the admin token (trimmed), if the listener has one.
    #[arg(long, global = true, env = "IDEMGATE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin token itself (prefer --admin-token-file or the variable: a flag shows in `ps`).
    #[arg(
        long,
        global = true,
        env = "IDEMGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// What to do.
#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// List records (in store order; `--cursor` continues).
    List {
        /// Page size (1 to 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Cursor from a previous page's `next`.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one record, by store key or by (key, route, credentials). Exit 3 if there is none.
    Get {
        /// The 64-hex store key (from `list` or `get --key`).
        store_key: Option<String>,
        /// The client's Idempotency-Key (instead of a store key).
        #[arg(long)]
        key: Option<String>,
        /// Route name (with --key; default: the first route).
        #[arg(long)]
        route: Option<String>,
        /// Scope header value, as NAME=VALUE, e.g. "authorization=Bearer abc" (with --key).
        #[arg(long = "credential")]
        credentials: Vec<String>,
    },
    /// Delete a finished record (by store key): a retry of it will run again. An in-flight
    /// record is refused (409) unless --force. Exit 3 if there is none.
    Delete {
        /// The 64-hex store key.
        store_key: String,
        /// Revoke an in-flight record instead: its holder is fenced off and the next retry runs
        /// again at epoch + 1 (the first run may still be under way upstream). A record that
        /// finished meanwhile is then refused, never deleted.
        #[arg(long)]
        force: bool,
    },
    /// Resolve an outcome-unknown record: by default as "it did not take effect" (the record is
    /// removed; the next retry runs it); with --completed as "it did, and this was its answer"
    /// (retries replay --status, --header and --body).
    Resolve {
        /// The 64-hex store key.
        store_key: String,
        /// The request took effect: record this answer (needs --status).
        #[arg(long, requires = "status")]
        completed: bool,
        /// The status it was answered with (200 to 599).
        #[arg(long, requires = "completed")]
        status: Option<u16>,
        /// A header of that answer, as "NAME: VALUE" (repeatable).
        #[arg(long = "header", requires = "completed")]
        headers: Vec<String>,
        /// Its body, as text.
        #[arg(long, requires = "completed", conflicts_with = "body_file")]
        body: Option<String>,
        /// Its body, read from a file (any bytes).
        #[arg(long, requires = "completed")]
        body_file: Option<PathBuf>,
        /// How long the completed record is kept, e.g. 24h [default: the route's ttl].
        #[arg(long, requires = "completed")]
        ttl: Option<String>,
        /// Refuse (409) unless the record is still at this epoch (as `get` showed it).
        #[arg(long)]
        epoch: Option<u64>,
    },
}

/// A failure with its exit code.
struct Failure {
    code: i32,
    message: String,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self {
            code: EXIT_FAILED,
            message: format!("{e:#}"),
        }
    }
}

/// Runs one `keys` command; returns the process's exit code (messages are printed).
pub async fn run(args: KeysArgs) -> i32 {
    match execute(args).await {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("idemgate keys: {}", f.message);
            f.code
        }
    }
}

/// The admin API's base URL from `--admin` (`http://` added to a bare HOST:PORT).
fn base_url(admin: &str) -> Result<String> {
    let admin = admin.trim().trim_end_matches('/');
    let url = if admin.contains("://") {
        admin.to_owned()
    } else {
        format!("http://{admin}")
    };
    let uri: http::Uri = url.parse().with_context(|| {
        format!("--admin {admin:?} is not an address: use HOST:PORT or http://HOST:PORT")
    })?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        bail!(
            "--admin {admin:?}: the admin listener speaks plain http; use HOST:PORT or \
             http://HOST:PORT"
        );
    }
    Ok(url)
}

/// The token from --admin-token-file, IDEMGATE_ADMIN_TOKEN or --admin-token, trimmed.
fn token(args: &KeysArgs) -> Result<Option<String>> {
    match (&args.admin_token_file, &args.admin_token) {
        (Some(_), Some(_)) => bail!(
            "both --admin-token-file (IDEMGATE_ADMIN_TOKEN_FILE) and --admin-token \
             (IDEMGATE_ADMIN_TOKEN) are set: give one"
        ),
        (Some(path), None) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the admin token file {}", path.display()))?;
            Ok(Some(text.trim().to_owned()))
        }
        (None, Some(t)) => Ok(Some(t.trim().to_owned())),
        (None, None) => Ok(None),
    }
}

struct Api {
    base: String,
    token: Option<String>,
    /// Whether `base` answered `GET /healthz` as an admin listener.
    probed: std::sync::atomic::AtomicBool,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// A successful admin API answer: its JSON (or text) body.
struct Answer {
    body: Value,
}

impl Api {
    /// Sends one call, after making sure (once) that `--admin` is an admin listener: a token or
    /// a mutating call sent to the proxy's port by mistake would reach the upstream application.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer, Failure> {
        if !self.probed.load(std::sync::atomic::Ordering::Relaxed) {
            // `GET /healthz`, without the token: every admin listener answers it with the
            // Idemgate-Admin header, whatever its access settings; anything else stops here.
            self.send(Method::GET, "/healthz", None, false).await?;
            self.probed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.send(method, path, body, true).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        with_token: bool,
    ) -> Result<Answer, Failure> {
        let uri = format!("{}{}", self.base, path);
        let mut req = Request::builder().method(method).uri(&uri);
        if let Some(t) = self.token.as_ref().filter(|_| with_token) {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let payload = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(b.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .with_context(|| format!("building a request to {uri}"))?;
        let res = match tokio::time::timeout(CALL_TIMEOUT, self.client.request(req)).await {
            Err(_) => {
                return Err(anyhow::anyhow!(
                    "{uri}: no answer within {CALL_TIMEOUT:?}: is --admin the admin listener's \
                     address (serve --admin-listen, default 127.0.0.1:9090)?"
                )
                .into());
            }
            Ok(Err(e)) => return Err(unreachable(&self.base, &e).into()),
            Ok(Ok(res)) => res,
        };
        let status = res.status();
        let is_admin = res.headers().contains_key(crate::admin::ADMIN_HEADER);
        let bytes = res
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer of {uri}"))?
            .to_bytes();
        if !is_admin {
            return Err(anyhow::anyhow!(
                "{} answered {status}, but not as an idemgate admin listener (no Idemgate-Admin \
                 header): is --admin the admin address (serve --admin-listen, default \
                 127.0.0.1:9090) rather than the proxy's (--listen, default 127.0.0.1:8080)?",
                self.base
            )
            .into());
        }
        let body: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        let detail = || {
            body["detail"]
                .as_str()
                .map_or_else(|| body.to_string(), str::to_owned)
        };
        match status {
            s if s.is_success() => Ok(Answer { body }),
            StatusCode::NOT_FOUND => Err(Failure {
                code: EXIT_NOT_FOUND,
                message: format!("not found: {}", detail()),
            }),
            StatusCode::UNAUTHORIZED => Err(Failure {
                code: EXIT_FAILED,
                message: if self.token.is_some() {
                    format!("the admin API refused the token (401): {}", detail())
                } else {
                    "the admin API needs a token (401): give --admin-token-file PATH, \
                     IDEMGATE_ADMIN_TOKEN or --admin-token"
                        .to_owned()
                },
            }),
            _ => Err(Failure {
                code: EXIT_FAILED,
                message: format!("the admin API answered {status}: {}", detail()),
            }),
        }
    }
}

/// A connection failure, said in an operator's words.
fn unreachable(base: &str, e: &hyper_util::client::legacy::Error) -> anyhow::Error {
    let chain = {
        let mut parts = vec![e.to_string()];
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            parts.push(s.to_string());
            source = s.source();
        }
        parts.join(": ")
    };
    if e.is_connect() {
        anyhow::anyhow!(
            "cannot connect to {base} ({chain}): is idemgate serve running, with its admin \
             listener there (--admin-listen, default 127.0.0.1:9090)?"
        )
    } else {
        anyhow::anyhow!(
            "{base} did not answer as an HTTP admin listener ({chain}): is --admin the admin \
             listener's address (serve --admin-listen, default 127.0.0.1:9090)?"
        )
    }
}

async fn execute(args: KeysArgs) -> Result<(), Failure> {
    let api = Api {
        base: base_url(&args.admin)?,
        token: token(&args)?,
        probed: std::sync::atomic::AtomicBool::new(false),
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    let json = args.json;
    match args.command {
        KeysCommand::List { limit, cursor } => {
            let mut path = format!("/api/keys?limit={limit}");
            if let Some(c) = cursor {
                path.push_str(&format!("&cursor={}", encode_query(&c)));
            }
            let out = api.call(Method::GET, &path, None).await?;
            if json {
                print_json(&out.body);
            } else {
                print!("{}", list_table(&out.body));
            }
        }
        KeysCommand::Get {
            store_key: Some(k),
            key: None,
            ..
        } => {
            let out = api
                .call(
                    Method::GET,
                    &format!("/api/keys/{}", path_segment(&k)?),
                    None,
                )
                .await?;
            if json {
                print_json(&out.body);
            } else {
                print!("{}", record_lines(&out.body));
            }
        }
        KeysCommand::Get {
            store_key: None,
            key: Some(key),
            route,
            credentials,
        } => {
            let mut creds = serde_json::Map::new();
            for c in credentials {
                let (name, value) = c
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--credential must be NAME=VALUE, got {c:?}"))?;
                creds.insert(name.trim().to_ascii_lowercase(), value.into());
            }
            let body = json!({ "key": key, "route": route, "credentials": creds });
            let out = api
                .call(Method::POST, "/api/keys/lookup", Some(body))
                .await?;
            if json {
                print_json(&out.body);
            }
            if out.body["record"].is_null() {
                return Err(Failure {
                    code: EXIT_NOT_FOUND,
                    message: format!(
                        "no record for key {key:?} in this scope (store key {})",
                        out.body["store_key"].as_str().unwrap_or("?")
                    ),
                });
            }
            if !json {
                print!("{}", record_lines(&out.body["record"]));
            }
        }
        KeysCommand::Get { .. } => {
            return Err(
                anyhow::anyhow!("give a store key or --key, not both and not neither").into(),
            );
        }
        KeysCommand::Delete { store_key, force } => {
            let query = if force { "?force=true" } else { "" };
            let out = api
                .call(
                    Method::DELETE,
                    &format!("/api/keys/{}{query}", path_segment(&store_key)?),
                    None,
                )
                .await?;
            if json {
                print_json(&out.body);
            }
            let b = &out.body;
            match (&b["deleted"], &b["revoked_epoch"]) {
                (Value::Bool(false), _) => {
                    return Err(Failure {
                        code: EXIT_NOT_FOUND,
                        message: format!("no record {store_key} (absent or expired)"),
                    });
                }
                (_, Value::Number(epoch)) if !json => println!(
                    "revoked the in-flight record {store_key} at epoch {epoch}: the next retry \
                     runs at epoch {} (the first may still be running upstream)",
                    b["next_epoch"]
                ),
                _ if !json => println!("deleted {store_key}: a retry of it runs again"),
                _ => {}
            }
        }
        KeysCommand::Resolve {
            store_key,
            completed,
            status,
            headers,
            body,
            body_file,
            ttl,
            epoch,
        } => {
            let mut req = if completed {
                let mut pairs = Vec::new();
                for h in headers {
                    let (name, value) = h.split_once(':').ok_or_else(|| {
                        anyhow::anyhow!("--header must be \"NAME: VALUE\", got {h:?}")
                    })?;
                    pairs.push(json!([name.trim(), value.trim()]));
                }
                let mut req = json!({ "action": "complete", "status": status, "headers": pairs });
                if let Some(text) = body {
                    req["body"] = text.into();
                }
                if let Some(path) = body_file {
                    use base64::Engine as _;
                    let bytes = std::fs::read(&path)
                        .with_context(|| format!("reading --body-file {}", path.display()))?;
                    req["body_base64"] = base64::engine::general_purpose::STANDARD
                        .encode(bytes)
                        .into();
                }
                if let Some(ttl) = ttl {
                    req["ttl"] = ttl.into();
                }
                req
            } else {
                json!({ "action": "retry" })
            };
            if let Some(e) = epoch {
                req["epoch"] = e.into();
            }
            let out = api
                .call(
                    Method::POST,
                    &format!("/api/keys/{}/resolve", path_segment(&store_key)?),
                    Some(req),
                )
                .await?;
            if json {
                print_json(&out.body);
            } else if completed {
                println!(
                    "resolved {store_key} as completed (epoch {}, status {}): retries replay \
                     that answer",
                    out.body["epoch"], out.body["status"]
                );
            } else {
                println!("resolved {store_key} as not run: the next retry runs it");
            }
        }
    }
    Ok(())
}

/// A store key for a URL path: 64 hex characters (the API refuses anything else anyway; this
/// keeps `/` and `?` out of the path).
fn path_segment(store_key: &str) -> Result<String> {
    let k = store_key.trim();
    if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{store_key:?} is not a store key (64 hex characters, from `list` or `get --key`)");
    }
    Ok(k.to_ascii_lowercase())
}

/// Percent-encodes a query value.
fn encode_query(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// `2024-05-01T12:00:00.123Z` for milliseconds since the Unix epoch (UTC).
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// A cell: strings as they are, numbers as digits, absent as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// At most `n` characters, an ellipsis marking a cut.
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// The route part of a scope label (`ROUTE#hash`).
fn route_of(scope: &Value) -> String {
    scope
        .as_str()
        .map(|s| s.rsplit_once('#').map_or(s, |(r, _)| r).to_owned())
        .unwrap_or_else(|| "-".into())
}

fn time_cell(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".into(), utc)
}

/// The `list` answer as a table.
fn list_table(body: &Value) -> String {
    let records = body["records"].as_array().cloned().unwrap_or_default();
    let header = [
        "STATE",
        "EPOCH",
        "STATUS",
        "ROUTE",
        "KEY",
        "CREATED (UTC)",
        "EXPIRES (UTC)",
        "STORE KEY",
    ];
    let rows: Vec<[String; 8]> = records
        .iter()
        .map(|r| {
            [
                cell(&r["state"]),
                cell(&r["epoch"]),
                cell(&r["status"]),
                clip(&route_of(&r["scope"]), 24),
                clip(&cell(&r["key"]), 40),
                time_cell(&r["created_at_ms"]),
                time_cell(&r["expires_at_ms"]),
                cell(&r["store_key"]),
            ]
        })
        .collect();
    let mut out = table(&header, &rows);
    out.push_str(&format!(
        "{} record{}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    ));
    match body["next"].as_str() {
        Some(next) => out.push_str(&format!("; more: idemgate keys list --cursor {next}\n")),
        None => out.push('\n'),
    }
    out
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width: [usize; N] = header.map(|h| h.chars().count());
    for row in rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(width).enumerate() {
            if i + 1 == N {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// One record as `field  value` lines, times in UTC.
fn record_lines(r: &Value) -> String {
    let Some(obj) = r.as_object() else {
        return format!("{r}\n");
    };
    let order = [
        "store_key",
        "state",
        "epoch",
        "status",
        "not_replayable",
        "body_bytes",
        "key",
        "namespace",
        "scope",
        "fingerprint",
        "owner",
        "created_at_ms",
        "lease_expires_at_ms",
        "completed_at_ms",
        "unknown_since_ms",
        "expires_at_ms",
    ];
    let mut fields: Vec<(&str, String)> = Vec::new();
    for name in order.iter().copied().chain(
        obj.keys()
            .map(String::as_str)
            .filter(|k| !order.contains(k)),
    ) {
        let Some(v) = obj.get(name) else { continue };
        let shown = match (name.ends_with("_ms"), v.as_u64()) {
            (true, Some(ms)) => format!("{} ({ms} ms)", utc(ms)),
            _ => cell(v),
        };
        fields.push((name.strip_suffix("_ms").unwrap_or(name), shown));
    }
    let w = fields.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    fields
        .iter()
        .map(|(n, v)| format!("{n:<w$}  {v}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses_take_host_port_or_http_urls() {
        assert_eq!(base_url("127.0.0.1:9090").unwrap(), "http://127.0.0.1:9090");
        assert_eq!(
            base_url("http://localhost:9090/").unwrap(),
            "http://localhost:9090"
        );
        assert!(base_url("https://h:1").is_err());
        assert!(base_url("not an address").is_err());
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_714_564_800_000), "2024-05-01T12:00:00.000Z");
    }

    #[test]
    fn tables_align_columns_and_clip_long_keys() {
        let body = json!({
            "records": [{
                "store_key": "ab".repeat(32), "state": "completed", "epoch": 1, "status": 201,
                "scope": "pay#0123", "key": "k".repeat(60), "created_at_ms": 0,
                "expires_at_ms": 1000,
            }],
            "next": "cursor-1",
        });
        let t = list_table(&body);
        let lines: Vec<&str> = t.lines().collect();
        assert!(
            lines[0].starts_with("STATE      EPOCH  STATUS  ROUTE"),
            "{t}"
        );
        assert!(lines[1].starts_with("completed  1      201     pay"), "{t}");
        assert!(lines[1].contains(&format!("{}…", "k".repeat(39))), "{t}");
        assert!(lines[1].ends_with(&"ab".repeat(32)), "{t}");
        assert_eq!(
            lines[2],
            "1 record; more: idemgate keys list --cursor cursor-1"
        );
    }

    #[test]
    fn store_keys_must_be_hex() {
        assert!(path_segment(&"A".repeat(64)).is_ok());
        assert!(path_segment("../../metrics").is_err());
        assert!(path_segment(&"g".repeat(64)).is_err());
    }
}
