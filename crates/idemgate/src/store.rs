//! Store selection from a URL, and latency metrics around every store operation.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use idemgate_core::hook::{Hooked, Operation, StoreHook};
use idemgate_core::key::StoreKey;
use idemgate_core::{ErrorKind, MemoryStore, SharedStore, Store, StoreError};
use idemgate_store_redb::RedbStore;

/// Where completions by other instances are announced, if anywhere.
pub enum Feed {
    /// A single-process store: nothing to hear.
    None,
    /// Redis pub/sub.
    Redis(idemgate_store_redis::RedisStore),
    /// PostgreSQL `LISTEN/NOTIFY` (the URL for a dedicated connection).
    Postgres(String),
}

/// An opened store.
pub struct Opened {
    pub store: SharedStore,
    pub warnings: Vec<String>,
    pub feed: Feed,
}

impl Opened {
    fn new(store: impl Store, warnings: Vec<String>, feed: Feed) -> Self {
        Self {
            store: SharedStore::new(store),
            warnings,
            feed,
        }
    }
}

/// Wakes `engine`'s waiters whenever another instance finishes a key, reconnecting (after 1 s)
/// whenever the feed breaks. Waiters poll meanwhile, so a broken feed costs latency, not safety.
pub async fn follow(feed: Feed, engine: idemgate_core::Engine<SharedStore>) {
    use futures_util::StreamExt;
    loop {
        let stream: Result<futures_util::stream::BoxStream<'static, StoreKey>, StoreError> =
            match &feed {
                Feed::None => return,
                Feed::Redis(store) => store.completions().await.map(|s| s.boxed()),
                Feed::Postgres(url) => idemgate_store_postgres::PostgresStore::completions(url)
                    .await
                    .map(|s| s.boxed()),
            };
        match stream {
            Ok(mut keys) => {
                tracing::info!("following completions announced by other instances");
                while let Some(key) = keys.next().await {
                    engine.wake(&key);
                }
                tracing::warn!("completion feed ended; reconnecting");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow completions; waiters poll meanwhile")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Opens the store named by `url`: `memory://`, `file:PATH` (a directory; the database is
/// `PATH/idemgate.redb`), `redis://HOST:PORT[/DB]`, `redis+cluster://H1:P1,H2:P2,…` or
/// `postgres://USER@HOST:PORT/DB`.
///
/// Also returns the reasons the store may lose acknowledged writes (empty for memory and file).
pub async fn open(url: &str) -> Result<Opened> {
    if let Some(list) = url.strip_prefix("redis+cluster://") {
        let nodes: Vec<String> = list
            .split(',')
            .filter(|n| !n.trim().is_empty())
            .map(|n| format!("redis://{}", n.trim()))
            .collect();
        if nodes.is_empty() {
            bail!("redis+cluster:// needs at least one node, e.g. redis+cluster://h1:7000,h2:7001");
        }
        let store = idemgate_store_redis::RedisStore::connect_cluster(&nodes)
            .await
            .with_context(|| format!("connecting to the Redis Cluster {}", redact(url)))?;
        let warnings = store.durability_warnings().await?;
        return Ok(Opened::new(store.clone(), warnings, Feed::Redis(store)));
    }
    if url.starts_with("redis://") {
        let store = idemgate_store_redis::RedisStore::connect(url)
            .await
            .with_context(|| format!("connecting to {}", redact(url)))?;
        let warnings = store.durability_warnings().await?;
        return Ok(Opened::new(store.clone(), warnings, Feed::Redis(store)));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = idemgate_store_postgres::PostgresStore::connect(url)
            .await
            .with_context(|| format!("connecting to {}", redact(url)))?;
        let warnings = store.durability_warnings().await?;
        return Ok(Opened::new(store, warnings, Feed::Postgres(url.to_owned())));
    }
    if let Some(rest) = url
        .strip_prefix("memory://")
        .or_else(|| url.strip_prefix("memory:"))
    {
        return Ok(Opened::new(memory_store(rest)?, Vec::new(), Feed::None));
    }
    if let Some(path) = url.strip_prefix("file:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if path.is_empty() {
            bail!("file: store URL needs a path, e.g. file:./idemgate-data");
        }
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating store directory {path}"))?;
        let store = RedbStore::open(std::path::Path::new(path).join("idemgate.redb"))
            .with_context(|| format!("opening the file store in {path}"))?;
        return Ok(Opened::new(store, Vec::new(), Feed::None));
    }
    bail!(
        "unsupported store URL {url:?}: use memory:// or file:PATH (redis:// and postgres:// come later)"
    )
}

/// `memory://[?max_records=N&max_bytes=SIZE]`: the bounds of the in-memory store (defaults
/// 1,000,000 records and 1GiB; at a bound new keys get `503` store-full).
fn memory_store(rest: &str) -> Result<MemoryStore> {
    let mut builder = MemoryStore::builder();
    let query = match rest.strip_prefix('?') {
        Some(q) => q,
        None if rest.is_empty() => "",
        None => bail!("memory:// takes no path, only ?max_records=N&max_bytes=SIZE, got {rest:?}"),
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .with_context(|| format!("memory:// option {pair:?} needs a value"))?;
        match name {
            "max_records" => {
                let n: usize = value
                    .parse()
                    .with_context(|| format!("memory:// max_records {value:?} is not a number"))?;
                if n == 0 {
                    bail!("memory:// max_records must be at least 1");
                }
                builder = builder.max_records(n);
            }
            "max_bytes" => {
                let n = crate::config::parse_size(value)
                    .with_context(|| format!("memory:// max_bytes {value:?}"))?;
                if n < 1 << 20 {
                    bail!("memory:// max_bytes must be at least 1MiB, got {value:?}");
                }
                builder = builder.max_bytes(n);
            }
            other => bail!("unknown memory:// option {other:?} (use max_records or max_bytes)"),
        }
    }
    Ok(builder.build())
}

/// The store URL without its password, for logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}")
        }
        None => url.to_owned(),
    }
}

/// The proxy's view of its store: every operation bounded by a deadline (so a slow or
/// partitioned store is an error within `deadline`, never a hang: `503` for a request, a retry
/// for a renewal) and timed into `idemgate_store_operation_seconds{op}`, with errors counted in
/// `idemgate_store_errors_total{op,kind}`.
///
/// A write that misses its deadline may still have been applied: as the [`Store`] contract says
/// for `Timeout`, callers assume neither (a claim that landed unheard is an orphan lease that
/// expires after the lease; a completion is retried under the lease).
pub type Instrumented = Hooked<SharedStore, Instrumentation>;

/// The hook of [`Instrumented`]: a deadline and metrics per operation.
pub struct Instrumentation {
    deadline: Duration,
    /// One histogram handle per operation, registered once (a lookup by name and labels on
    /// every call showed in profiles).
    latency: [metrics::Histogram; 10],
}

/// Wraps `store` with a deadline per operation; call after the metrics recorder is installed.
pub fn instrumented(store: SharedStore, deadline: Duration) -> Instrumented {
    let latency = Operation::ALL
        .map(|op| metrics::histogram!("idemgate_store_operation_seconds", "op" => op.as_str()));
    Hooked::wrap(store, Instrumentation { deadline, latency })
}

impl StoreHook for Instrumentation {
    async fn around<T, F>(&self, op: Operation, call: F) -> Result<T, StoreError>
    where
        T: Send,
        F: Future<Output = Result<T, StoreError>> + Send,
    {
        let start = Instant::now();
        let out = match tokio::time::timeout(self.deadline, call).await {
            Ok(out) => out,
            Err(_) => Err(StoreError::new(
                ErrorKind::Timeout,
                format!(
                    "store operation {} did not answer within {:?}",
                    op.as_str(),
                    self.deadline
                ),
            )),
        };
        self.latency[op as usize].record(start.elapsed().as_secs_f64());
        if let Err(e) = &out {
            metrics::counter!("idemgate_store_errors_total", "op" => op.as_str(), "kind" => e.kind().as_str())
                .increment(1);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_the_logs() {
        assert_eq!(
            redact("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redact("redis://:pw@127.0.0.1:6379"),
            "redis://:***@127.0.0.1:6379"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact("file:./data"), "file:./data");
    }
}
