//! `idemgate keys`: a client of the admin API.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// What to do.
#[derive(clap::Subcommand, Debug)]
pub enum KeysCommand {
    /// List records (in store order; `--cursor` continues).
    List {
        /// Page size.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Cursor from a previous page's `next`.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Show one record, by store key or by (key, route, credentials).
    Get {
        /// The 64-hex store key (from `list` or `lookup`).
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
    /// record is refused (409) unless --force.
    Delete {
        /// The 64-hex store key.
        store_key: String,
        /// Revoke an in-flight record instead: its holder is fenced off and the next retry runs
        /// again at epoch + 1 (the first run may still be under way upstream). A record that
        /// finished meanwhile is then refused, never deleted.
        #[arg(long)]
        force: bool,
    },
    /// Resolve an outcome-unknown record as "did not happen": the next retry runs it.
    Resolve {
        /// The 64-hex store key.
        store_key: String,
    },
}

async fn call(admin: &str, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri = format!("{}{}", admin.trim_end_matches('/'), path);
    let mut req = Request::builder().method(method).uri(&uri);
    let payload = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    let res = client
        .request(req.body(Full::new(payload))?)
        .await
        .with_context(|| format!("calling the admin API at {uri}"))?;
    let status = res.status();
    let bytes = res.into_body().collect().await?.to_bytes();
    let value: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    if !status.is_success() {
        bail!("admin API answered {status}: {value}");
    }
    Ok(value)
}

/// Runs one `keys` command and prints its JSON answer.
pub async fn run(admin: &str, cmd: KeysCommand) -> Result<()> {
    let out = match cmd {
        KeysCommand::List { limit, cursor } => {
            let mut path = format!("/api/keys?limit={limit}");
            if let Some(c) = cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            call(admin, Method::GET, &path, None).await?
        }
        KeysCommand::Get {
            store_key: Some(k), ..
        } => call(admin, Method::GET, &format!("/api/keys/{k}"), None).await?,
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
                    .with_context(|| format!("--credential must be NAME=VALUE, got {c:?}"))?;
                creds.insert(name.trim().to_ascii_lowercase(), value.into());
            }
            let body = json!({ "key": key, "route": route, "credentials": creds });
            call(admin, Method::POST, "/api/keys/lookup", Some(body)).await?
        }
        KeysCommand::Get { .. } => bail!("give a store key, or --key"),
        KeysCommand::Delete { store_key, force } => {
            let query = if force { "?force=true" } else { "" };
            call(
                admin,
                Method::DELETE,
                &format!("/api/keys/{store_key}{query}"),
                None,
            )
            .await?
        }
        KeysCommand::Resolve { store_key } => {
            call(
                admin,
                Method::POST,
                &format!("/api/keys/{store_key}/resolve"),
                Some(json!({ "action": "retry" })),
            )
            .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
