//! # idemgate-stores
//!
//! The store wiring that `idemgate serve` uses, public so that a tower user gets the same: a
//! store from a URL, the feed of completions announced by other instances, a local replay cache
//! in front of shared stores, and a deadline plus metrics around every store operation.
//!
//! ## Overview
//!
//! - [`open`] parses a store URL ([`StoreUrl`]) and connects: `memory://[?max_records=N&max_bytes=SIZE]`,
//!   `file:DIR[?cache=SIZE&engine=fjall|redb]` (features `fjall`, `redb`), `redis://HOST:PORT[/DB]`, `redis+cluster://H1:P1,H2:P2,…`
//!   and their TLS forms `rediss://…?ca_file=…` and `rediss+cluster://…` (feature `redis`; the
//!   TLS parameters are in `idemgate-store-redis`'s docs), `postgres://USER@HOST:PORT/DB` with
//!   libpq's `sslmode`, `sslrootcert`, `sslcert`, `sslkey` (feature `postgres`),
//!   `dynamodb://TABLE?region=REGION&endpoint=URL` (feature `dynamodb`). The [`Opened`] store
//!   says whether it is shared between instances and why it may lose acknowledged writes.
//! - [`create_table`] creates a DynamoDB table on demand (never done by [`open`]).
//! - [`Opened::stack`] puts the [`Instrumentation`] hook (deadline, latency histogram, error
//!   counter) and, for a shared store, the replay cache in front of it: the store an
//!   [`Engine`](idemgate_core::Engine) should run on.
//! - [`follow`] wakes an engine's waiters when another instance finishes a key.
//! - [`connect`] does all of it in one call: an engine on a URL, with the follower running
//!   (what a tower or dedup user on Redis or PostgreSQL wants).
//! - [`metrics`]: the store's metric families and their descriptions.
//!
//! ## Example
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::time::Duration;
//! use idemgate_core::Engine;
//! use idemgate_stores::{StackOptions, follow, open};
//!
//! let opened = open("memory://?max_records=1000").await?;
//! assert!(!opened.shared && opened.warnings.is_empty());
//! let (store, feed) = opened.stack(&StackOptions {
//!     deadline: Duration::from_secs(3),
//!     replay_cache_entries: 100_000,
//! });
//! let engine = Engine::builder(store).build();
//! tokio::spawn(follow(feed, engine.clone())); // returns at once: nothing to follow in memory
//! # Ok::<(), idemgate_core::StoreError>(())
//! # }).unwrap();
//! ```
//!
//! ## Guarantees
//!
//! Those of the store opened (the [`Store`] contract), plus: every
//! operation through [`Opened::stack`] answers within its deadline (a `Timeout` error after it;
//! a write that timed out may still have been applied, which the contract already allows). The
//! replay cache holds completed records only, and a record deleted through another instance may
//! still be replayed here for at most 30 s.
//!
//! ## Feature flags
//!
//! - `fjall` (default): `file:` URLs on the fjall engine (the default engine).
//! - `redb` (default): `file:` URLs on the redb engine (`?engine=redb`, or a directory that
//!   already holds a redb file).
//! - `redis`: `redis://`, `rediss://`, `redis+cluster://` and `rediss+cluster://` URLs and their
//!   pub/sub completion feed.
//! - `postgres`: `postgres://` URLs and their `LISTEN/NOTIFY` completion feed.
//! - `dynamodb`: `dynamodb://` URLs (no completion feed: waiters poll) and [`create_table`].
//!
//! Without a backend's feature its URLs are refused with a `Config` error that names the
//! feature. `memory://` is always there.
//!
//! ## Errors
//!
//! [`open`] returns [`StoreError`]s: `Config` for a URL it cannot use (the message says why),
//! the backend's own kinds (`Unavailable`, `Timeout`, …) for a server it cannot reach.

mod instrument;
pub mod metrics;
mod url;

use std::time::Duration;

use idemgate_core::cache::{CachedStore, Lookup};
use idemgate_core::{ErrorKind, SharedStore, Store, StoreError};

pub use instrument::{Instrumentation, Instrumented, instrumented};
pub use url::{FileEngine, StoreUrl, redact};

/// Where completions by other instances are announced, if anywhere.
#[derive(Clone)]
#[non_exhaustive]
pub enum Feed {
    /// A single-process store: nothing to hear.
    None,
    /// Redis pub/sub.
    #[cfg(feature = "redis")]
    Redis(idemgate_store_redis::RedisStore),
    /// PostgreSQL `LISTEN/NOTIFY` (the URL for a dedicated connection).
    #[cfg(feature = "postgres")]
    Postgres(String),
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Feed::None => f.write_str("Feed::None"),
            #[cfg(feature = "redis")]
            Feed::Redis(_) => f.write_str("Feed::Redis"),
            #[cfg(feature = "postgres")]
            Feed::Postgres(_) => f.write_str("Feed::Postgres"),
        }
    }
}

/// An opened store, before [`stack`](Opened::stack).
#[derive(Debug)]
pub struct Opened {
    /// The store itself.
    pub store: SharedStore,
    /// Reasons it may lose acknowledged writes (which weakens G1); empty for memory and file.
    pub warnings: Vec<String>,
    /// Whether several instances share it (Redis, PostgreSQL, DynamoDB): a local replay cache then saves
    /// round trips, and a namespace must keep services apart.
    pub shared: bool,
    /// Its completion feed.
    pub feed: Feed,
}

/// How [`Opened::stack`] wraps a store.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// Deadline of every store operation.
    pub deadline: Duration,
    /// Completed records cached in front of a shared store (0: no cache). Ignored for stores
    /// that are not shared (a cache would only duplicate them).
    pub replay_cache_entries: usize,
}

impl Opened {
    fn new(store: impl Store, warnings: Vec<String>, shared: bool, feed: Feed) -> Self {
        Self {
            store: SharedStore::new(store),
            warnings,
            shared,
            feed,
        }
    }

    /// The store to run an engine on: the deadline and metrics hook, and for a shared store the
    /// replay cache in front of it (so the latency histograms count real round trips only).
    /// Also hands back the completion feed for [`follow`].
    ///
    /// Registers the store's metrics (see [`metrics`]): call it after the recorder is installed.
    pub fn stack(self, options: &StackOptions) -> (SharedStore, Feed) {
        let timed = instrumented(self.store, options.deadline);
        let hits = ::metrics::counter!(metrics::REPLAY_CACHE_HITS);
        let misses = ::metrics::counter!(metrics::REPLAY_CACHE_MISSES);
        let store = if self.shared && options.replay_cache_entries > 0 {
            SharedStore::new(
                CachedStore::builder(timed)
                    .capacity(options.replay_cache_entries)
                    .observe(move |lookup| match lookup {
                        Lookup::Hit => hits.increment(1),
                        _ => misses.increment(1),
                    })
                    .build(),
            )
        } else {
            SharedStore::new(timed)
        };
        (store, self.feed)
    }
}

/// Checks `url` without opening the store: its form and, for Redis and PostgreSQL, its TLS
/// parameters and the files they name (read, as opening would). Nothing is connected to or
/// created; a `file:` directory is not touched.
pub fn check(url: &str) -> Result<(), StoreError> {
    match StoreUrl::parse(url)? {
        #[cfg(feature = "redis")]
        StoreUrl::Redis { url } => idemgate_store_redis::RedisStore::check_url(&url),
        #[cfg(feature = "redis")]
        StoreUrl::RedisCluster { nodes } => nodes
            .iter()
            .try_for_each(|n| idemgate_store_redis::RedisStore::check_url(n)),
        #[cfg(feature = "postgres")]
        StoreUrl::Postgres { url } => idemgate_store_postgres::PostgresStore::check_url(&url),
        _ => Ok(()),
    }
}

/// Opens the store named by `url` (see the crate docs for the forms).
pub async fn open(url: &str) -> Result<Opened, StoreError> {
    match StoreUrl::parse(url)? {
        StoreUrl::Memory {
            max_records,
            max_bytes,
        } => {
            let mut builder = idemgate_core::MemoryStore::builder();
            if let Some(n) = max_records {
                builder = builder.max_records(n);
            }
            if let Some(n) = max_bytes {
                builder = builder.max_bytes(n);
            }
            Ok(Opened::new(builder.build(), Vec::new(), false, Feed::None))
        }
        StoreUrl::File { dir, cache, engine } => open_file(&dir, cache, engine),
        StoreUrl::Redis { url } => open_redis(&url, None).await,
        StoreUrl::RedisCluster { nodes } => open_redis(url, Some(&nodes)).await,
        StoreUrl::Postgres { url } => open_postgres(&url).await,
        StoreUrl::DynamoDb {
            table,
            region,
            endpoint,
        } => open_dynamodb(&table, region, endpoint).await,
    }
}

/// Creates the table of a `dynamodb://` store URL if it does not exist (on-demand billing, TTL
/// on `ttl`) and returns what was done, in words. Other stores need no creation (PostgreSQL
/// migrates its schema at start-up): a `Config` error says so.
pub async fn create_table(url: &str) -> Result<String, StoreError> {
    match StoreUrl::parse(url)? {
        StoreUrl::DynamoDb {
            table,
            region,
            endpoint,
        } => create_dynamodb_table(&table, region, endpoint).await,
        _ => Err(StoreError::new(
            ErrorKind::Config,
            "only dynamodb:// stores have a table to create (PostgreSQL creates and migrates its \
             schema at start-up; the other stores need nothing)",
        )),
    }
}

#[cfg(feature = "dynamodb")]
fn dynamodb_builder(
    table: &str,
    region: Option<String>,
    endpoint: Option<String>,
) -> idemgate_store_dynamodb::DynamoStoreBuilder {
    let mut builder = idemgate_store_dynamodb::DynamoStore::builder(table);
    if let Some(region) = region {
        builder = builder.region(region);
    }
    if let Some(endpoint) = endpoint {
        builder = builder.endpoint(endpoint);
    }
    builder
}

#[cfg(feature = "dynamodb")]
async fn open_dynamodb(
    table: &str,
    region: Option<String>,
    endpoint: Option<String>,
) -> Result<Opened, StoreError> {
    let store = dynamodb_builder(table, region, endpoint).connect().await?;
    let warnings = store.durability_warnings();
    Ok(Opened::new(store, warnings, true, Feed::None))
}

#[cfg(feature = "dynamodb")]
async fn create_dynamodb_table(
    table: &str,
    region: Option<String>,
    endpoint: Option<String>,
) -> Result<String, StoreError> {
    let setup = dynamodb_builder(table, region, endpoint)
        .create_table()
        .await?;
    let warnings: String = setup
        .durability_warnings
        .iter()
        .map(|w| format!("\nwarning: {w}"))
        .collect();
    Ok(format!(
        "DynamoDB table {table:?}: {}; TTL on `ttl` {}{warnings}",
        if setup.created {
            "created (on-demand billing, partition key pk: binary)"
        } else {
            "exists with the expected key"
        },
        if setup.ttl_enabled_now {
            "enabled now"
        } else {
            "already enabled"
        }
    ))
}

#[cfg(not(feature = "dynamodb"))]
async fn open_dynamodb(
    _table: &str,
    _region: Option<String>,
    _endpoint: Option<String>,
) -> Result<Opened, StoreError> {
    Err(missing_feature("dynamodb"))
}

#[cfg(not(feature = "dynamodb"))]
async fn create_dynamodb_table(
    _table: &str,
    _region: Option<String>,
    _endpoint: Option<String>,
) -> Result<String, StoreError> {
    Err(missing_feature("dynamodb"))
}

#[cfg(not(all(
    feature = "redb",
    feature = "fjall",
    feature = "redis",
    feature = "postgres",
    feature = "dynamodb"
)))]
fn missing_feature(feature: &str) -> StoreError {
    StoreError::new(
        ErrorKind::Config,
        format!("this build has no {feature} store (cargo feature `{feature}` of idemgate-stores)"),
    )
}

/// The redb file of a `file:` store, as releases before 0.2 created it.
const REDB_FILE: &str = "idemgate.redb";
/// The fjall directory of a `file:` store.
const FJALL_DIR: &str = "fjall";

/// Whether `path` exists: a dangling symlink counts (opening it then fails loudly, rather than
/// an empty store starting beside records on a volume not mounted yet); an error other than
/// "not found" is refused.
fn present(path: &std::path::Path) -> Result<bool, StoreError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(StoreError::new(
            ErrorKind::Config,
            format!("cannot tell whether {} exists", path.display()),
        )
        .with_source(e)),
    }
}

/// Which engine a `file:DIR` store opens: the one asked for, else the one `DIR` already holds,
/// else fjall. A directory holding both is refused rather than guessed: picking the wrong one
/// would silently forget every record in the other.
fn choose_engine(
    dir: &std::path::Path,
    asked: Option<FileEngine>,
) -> Result<FileEngine, StoreError> {
    let has_redb = present(&dir.join(REDB_FILE))?;
    let has_fjall = present(&dir.join(FJALL_DIR))?;
    match (asked, has_redb, has_fjall) {
        (Some(engine), ..) => {
            let (other, other_there, this_there) = match engine {
                FileEngine::Fjall => ("redb", has_redb, has_fjall),
                FileEngine::Redb => ("fjall", has_fjall, has_redb),
            };
            if other_there && !this_there {
                tracing::warn!(
                    dir = %dir.display(),
                    "engine={} starts an empty store: the records of the {other} store in this \
                     directory are not used (retries of their requests would run again)",
                    engine.as_str()
                );
            }
            Ok(engine)
        }
        (None, true, true) => Err(StoreError::new(
            ErrorKind::Config,
            format!(
                "{} holds both a redb store ({REDB_FILE}) and a fjall store ({FJALL_DIR}/): say \
                 which one to use with ?engine=redb or ?engine=fjall",
                dir.display()
            ),
        )),
        (None, true, false) => {
            tracing::warn!(
                dir = %dir.display(),
                "this directory holds a redb store from an earlier release, so it stays on redb; \
                 fjall (the default engine since 0.2) is faster: see the README's \"Embedded \
                 engine\" section to switch"
            );
            Ok(FileEngine::Redb)
        }
        (None, false, _) => Ok(FileEngine::Fjall),
    }
}

/// Keeps a `file:` directory's lock for as long as its store (any clone of it) lives (the
/// field is only held, never read).
#[derive(Clone)]
struct HoldsDirLock(#[allow(dead_code)] std::sync::Arc<idemgate_core::dir_lock::DirLock>);

impl idemgate_core::hook::StoreHook for HoldsDirLock {
    async fn around<T, F>(
        &self,
        _op: idemgate_core::hook::Operation,
        call: F,
    ) -> Result<T, StoreError>
    where
        T: Send,
        F: std::future::Future<Output = Result<T, StoreError>> + Send,
    {
        call.await
    }
}

fn open_file(
    dir: &std::path::Path,
    cache: Option<usize>,
    engine: Option<FileEngine>,
) -> Result<Opened, StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        StoreError::new(
            ErrorKind::Config,
            format!("creating store directory {}", dir.display()),
        )
        .with_source(e)
    })?;
    // Taken before the engine is chosen and held with the store: two processes on one
    // directory, whatever engine each would pick, never both run (each engine also locks its
    // own files, but a redb and a fjall store in one directory would not see each other).
    let lock = HoldsDirLock(std::sync::Arc::new(
        idemgate_core::dir_lock::DirLock::acquire(dir)?,
    ));
    match choose_engine(dir, engine)? {
        FileEngine::Fjall => open_fjall(&dir.join(FJALL_DIR), cache, lock),
        FileEngine::Redb => open_redb(&dir.join(REDB_FILE), cache, lock),
    }
}

/// An embedded store, holding its directory's lock.
#[cfg(any(feature = "fjall", feature = "redb"))]
fn embedded(store: impl Store, lock: HoldsDirLock) -> Opened {
    let store = idemgate_core::hook::Hooked::wrap(store, lock);
    Opened::new(store, Vec::new(), false, Feed::None)
}

#[cfg(feature = "fjall")]
fn open_fjall(
    dir: &std::path::Path,
    cache: Option<usize>,
    lock: HoldsDirLock,
) -> Result<Opened, StoreError> {
    let mut builder = idemgate_store_fjall::FjallStore::builder(dir);
    if let Some(bytes) = cache {
        builder = builder.cache_size(bytes as u64);
    }
    Ok(embedded(builder.open()?, lock))
}

#[cfg(not(feature = "fjall"))]
fn open_fjall(
    _dir: &std::path::Path,
    _cache: Option<usize>,
    _lock: HoldsDirLock,
) -> Result<Opened, StoreError> {
    Err(missing_feature("fjall"))
}

#[cfg(feature = "redb")]
fn open_redb(
    file: &std::path::Path,
    cache: Option<usize>,
    lock: HoldsDirLock,
) -> Result<Opened, StoreError> {
    let mut builder = idemgate_store_redb::RedbStore::builder(file);
    if let Some(bytes) = cache {
        builder = builder.cache_size(bytes);
    }
    Ok(embedded(builder.open()?, lock))
}

#[cfg(not(feature = "redb"))]
fn open_redb(
    _file: &std::path::Path,
    _cache: Option<usize>,
    _lock: HoldsDirLock,
) -> Result<Opened, StoreError> {
    Err(missing_feature("redb"))
}

#[cfg(feature = "redis")]
async fn open_redis(url: &str, cluster: Option<&[String]>) -> Result<Opened, StoreError> {
    let store = match cluster {
        Some(nodes) => idemgate_store_redis::RedisStore::connect_cluster(nodes).await?,
        None => idemgate_store_redis::RedisStore::connect(url).await?,
    };
    let warnings = store.durability_warnings().await?;
    Ok(Opened::new(
        store.clone(),
        warnings,
        true,
        Feed::Redis(store),
    ))
}

#[cfg(not(feature = "redis"))]
async fn open_redis(_url: &str, _cluster: Option<&[String]>) -> Result<Opened, StoreError> {
    Err(missing_feature("redis"))
}

#[cfg(feature = "postgres")]
async fn open_postgres(url: &str) -> Result<Opened, StoreError> {
    let store = idemgate_store_postgres::PostgresStore::connect(url).await?;
    let warnings = store.durability_warnings().await?;
    Ok(Opened::new(
        store,
        warnings,
        true,
        Feed::Postgres(url.to_owned()),
    ))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(_url: &str) -> Result<Opened, StoreError> {
    Err(missing_feature("postgres"))
}

/// An [`Engine`](idemgate_core::Engine) on a store URL, wired as `idemgate serve` wires its
/// own ([`connect`]): deadline and metrics on every store operation, the replay cache in front
/// of a shared store, and the follower of its completion feed (cross-instance wake-ups), which
/// stops when this value is dropped.
#[derive(Debug)]
pub struct Connected {
    /// The engine: give it to `IdempotencyLayer::new` (idemgate-tower) or a `Deduplicator`
    /// (idemgate-dedup). Clones share it.
    pub engine: idemgate_core::Engine<SharedStore>,
    /// Whether instances share the store (Redis, PostgreSQL, DynamoDB).
    pub shared: bool,
    /// Reasons the store may lose acknowledged writes (log them; see [`Opened::warnings`]).
    pub warnings: Vec<String>,
    follower: tokio::task::JoinHandle<()>,
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// Opens the store at `url` ([`open`]), stacks it ([`Opened::stack`]), builds an engine on it
/// (`configure` sets its lease, waiters, owner…; pass `|b| b` for the defaults) and spawns the
/// follower of its completion feed ([`follow`]) on the current tokio runtime.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use std::time::Duration;
/// use idemgate_stores::{StackOptions, connect};
///
/// // "redis://127.0.0.1:6379" or "postgres://app@db/app" in production.
/// let options = StackOptions { deadline: Duration::from_secs(3), replay_cache_entries: 100_000 };
/// let connected = connect("memory://", &options, |b| b.lease_ttl(Duration::from_secs(30))).await?;
/// for w in &connected.warnings {
///     eprintln!("store warning: {w}");
/// }
/// let engine = connected.engine.clone(); // keep `connected` alive: it owns the follower
/// # let _ = engine;
/// # Ok::<(), idemgate_core::StoreError>(())
/// # }).unwrap();
/// ```
///
/// # Errors
///
/// Those of [`open`].
pub async fn connect(
    url: &str,
    options: &StackOptions,
    configure: impl FnOnce(
        idemgate_core::engine::EngineBuilder<SharedStore>,
    ) -> idemgate_core::engine::EngineBuilder<SharedStore>,
) -> Result<Connected, StoreError> {
    let opened = open(url).await?;
    let (shared, warnings) = (opened.shared, opened.warnings.clone());
    let (store, feed) = opened.stack(options);
    let engine = configure(idemgate_core::Engine::builder(store)).build();
    let follower = tokio::spawn(follow(feed, engine.clone()));
    Ok(Connected {
        engine,
        shared,
        warnings,
        follower,
    })
}

/// Wakes `engine`'s waiters whenever another instance finishes a key they wait on (Redis
/// announces only finishes a claim found in flight; PostgreSQL every one), reconnecting (after 1 s)
/// whenever the feed breaks. Waiters poll meanwhile, so a broken feed costs latency, not safety.
/// Returns at once for [`Feed::None`].
pub async fn follow<S: Store>(feed: Feed, engine: idemgate_core::Engine<S>) {
    #[cfg(any(feature = "redis", feature = "postgres"))]
    loop {
        use futures_util::StreamExt;
        use idemgate_core::StoreKey;
        let stream: Result<futures_util::stream::BoxStream<'static, StoreKey>, StoreError> =
            match &feed {
                Feed::None => return,
                #[cfg(feature = "redis")]
                Feed::Redis(store) => store.completions().await.map(|s| s.boxed()),
                #[cfg(feature = "postgres")]
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
    #[cfg(not(any(feature = "redis", feature = "postgres")))]
    {
        let _ = (feed, engine);
    }
}
