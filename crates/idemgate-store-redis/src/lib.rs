//! # idemgate-store-redis
//!
//! A shared [`Store`] on Redis, for several idemgate instances behind a load balancer.
//!
//! ## Overview
//!
//! - Every operation is ONE round trip: a Lua script that reads, decides and writes atomically
//!   (see [`scripts`] for the record layout). `claim` returns the existing record in
//!   the same trip; `renew`, `complete`, `mark_unknown`, `release` and `take_over` are
//!   compare-and-set on the epoch and token; `complete_unknown` (administrators: "it did
//!   happen") on the state, epoch and marking instant.
//! - The server's clock (`TIME`) decides leases and expiry, never the instance's; records carry a
//!   native expiry (`PEXPIREAT`), so [`Store::purge_expired`] has nothing to do.
//! - Keys are `<prefix>{<64 hex>}`: the hash tag keeps everything of one record in one slot.
//! - One multiplexed connection with automatic reconnection (`ConnectionManager`).
//!
//! - Standalone Redis ([`RedisStore::connect`]) and Redis Cluster
//!   ([`RedisStore::connect_cluster`]), over TLS with `rediss://` URLs (see "TLS" below);
//!   completions a claim found in flight (someone may wait) are announced on a pub/sub
//!   channel, which wakes waiters on other instances (see [`scripts`]); [`RedisStore::durability_warnings`] reports settings
//!   that can lose acknowledged writes. The local replay cache is `idemgate-stores`'s (it wraps
//!   any shared store).
//!
//! ## Example
//!
//! ```no_run
//! # async fn run() -> Result<(), idemgate_core::StoreError> {
//! use idemgate_core::Engine;
//! use idemgate_store_redis::RedisStore;
//!
//! let store = RedisStore::connect("redis://127.0.0.1:6379").await?;
//! let engine = Engine::builder(store).build();
//! # Ok(()) }
//! ```
//!
//! ## TLS
//!
//! `rediss://HOST:PORT[/DB]` connects over TLS (rustls) and verifies the server's certificate
//! against the system's CA store and the URL's host name or IP address; there is no way to turn
//! verification off. Query parameters (percent-encoded paths):
//!
//! - `ca_file=PATH`: PEM CA certificates that *replace* the system's roots;
//! - `client_cert=PATH&client_key=PATH`: a client certificate, for `tls-auth-clients yes`.
//!
//! The files are read when connecting (a later change needs a new connection of the store: a
//! restart). For a cluster, every node URL carries the same parameters, and the certificates the
//! nodes serve must be valid for the addresses the cluster announces (`CLUSTER SLOTS`), usually
//! IP addresses. rustls needs a process-wide crypto provider: this crate enables `ring`; a build
//! that also enables `aws-lc-rs` must install one (`CryptoProvider::install_default`).
//!
//! ```no_run
//! # async fn run() -> Result<(), idemgate_core::StoreError> {
//! let store = idemgate_store_redis::RedisStore::connect(
//!     "rediss://redis.internal:6380?ca_file=/etc/idemgate/redis-ca.pem",
//! )
//! .await?;
//! # Ok(()) }
//! ```
//!
//! ## Guarantees
//!
//! Those of the [`Store`] contract, as long as Redis keeps acknowledged writes: with asynchronous
//! replicas, without AOF `fsync`, or with an evicting `maxmemory-policy`, a failover, restart or
//! eviction can forget a record and weaken G1 (a duplicate dispatch becomes possible).
//!
//! ## Errors
//!
//! Connection failures map to [`ErrorKind::Unavailable`], timeouts to [`ErrorKind::Timeout`],
//! undecodable records to [`ErrorKind::Corrupt`], bodies over the limit and Redis's `OOM`
//! refusals (`maxmemory` reached under `noeviction`) to [`ErrorKind::Capacity`], anything else
//! to [`ErrorKind::Internal`].

use std::collections::HashMap;
use std::time::Duration;

use idemgate_core::clock::Timestamp;
use idemgate_core::error::{ErrorKind, StoreError};
use idemgate_core::fingerprint::{Algorithm, Fingerprint};
use idemgate_core::key::StoreKey;
use idemgate_core::protocol;
use idemgate_core::record::{Fencing, Outcome, Record, RecordState};
use idemgate_core::store::{
    CasOutcome, ClaimOutcome, ClaimRequest, DeleteMode, DeleteOutcome, ListPage, ListRequest,
    ResolveOutcome, Store, TakeOverOutcome, TakeOverRequest, UnknownMark, revoked_cas,
};
use redis::aio::ConnectionManager;
use redis::{Script, Value};

pub mod scripts;
mod tls;

/// Largest page returned by `list`.
pub const MAX_LIST_PAGE: usize = 1_000;

/// The scripts, loaded once per store.
struct Scripts {
    claim: Script,
    renew: Script,
    complete: Script,
    mark_unknown: Script,
    release: Script,
    take_over: Script,
    get: Script,
    delete: Script,
    complete_unknown: Script,
}

/// A standalone connection (reconnecting) or a cluster connection (routing by slot).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The Redis store. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    /// Where completion notices are subscribed (the server, or one cluster node).
    pubsub: std::sync::Arc<redis::Client>,
    prefix: String,
    scripts: std::sync::Arc<Scripts>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn map_err(e: redis::RedisError) -> StoreError {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.code() == Some("OOM") {
        // `maxmemory` reached under `noeviction`: the store is full, not broken.
        ErrorKind::Capacity
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Internal
    };
    StoreError::new(kind, "redis").with_source(e)
}

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::new(ErrorKind::Corrupt, what)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn token_hex(t: u128) -> String {
    format!("{t:032x}")
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port[/db]`, or `rediss://…` with the TLS parameters of
    /// the crate docs) with the key prefix `idemgate:`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with_prefix(url, "idemgate:").await
    }

    /// Checks `url` as [`RedisStore::connect`] would, without connecting: its form, its TLS
    /// parameters, and that the certificate and key files they name can be read (for
    /// `idemgate serve --check-config`).
    pub fn check_url(url: &str) -> Result<(), StoreError> {
        tls::Target::parse(url)?.client().map(drop)
    }

    /// Connects with another key prefix (several deployments on one server, or tests).
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = tls::Target::parse(url)?.client()?;
        // Fail fast while the server is down (the proxy answers 503 rather than hanging), and
        // reconnect in the background so that service resumes without a restart.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(map_err)?;
        Ok(Self::with_conn(Conn::Single(conn), client, prefix))
    }

    /// Connects to a Redis Cluster through any of its nodes (`redis://h1:p1`, …, or
    /// `rediss://…` with the same TLS parameters on every node), with the key prefix
    /// `idemgate:`. Every record lives in one slot (hash tag), so every script runs on the node
    /// that owns it; `list` walks every master.
    pub async fn connect_cluster(nodes: &[String]) -> Result<Self, StoreError> {
        Self::connect_cluster_with_prefix(nodes, "idemgate:").await
    }

    /// [`RedisStore::connect_cluster`] with another key prefix.
    pub async fn connect_cluster_with_prefix(
        nodes: &[String],
        prefix: &str,
    ) -> Result<Self, StoreError> {
        let targets = nodes
            .iter()
            .map(|n| tls::Target::parse(n))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = targets.first() else {
            return Err(StoreError::new(
                ErrorKind::Config,
                "a Redis Cluster needs at least one node",
            ));
        };
        if targets.iter().any(|t| t.params != first.params) {
            return Err(StoreError::new(
                ErrorKind::Config,
                "every Redis Cluster node URL must carry the same TLS parameters",
            ));
        }
        let mut builder =
            redis::cluster::ClusterClient::builder(targets.iter().map(|t| t.url.as_str()))
                .connection_timeout(Duration::from_secs(1))
                .response_timeout(Duration::from_secs(2))
                .retries(1);
        if let Some(certs) = &first.certs {
            builder = builder.certs(certs.clone());
        }
        let client = builder.build().map_err(|e| {
            StoreError::new(ErrorKind::Config, "invalid Redis Cluster node list").with_source(e)
        })?;
        let conn = client.get_async_connection().await.map_err(map_err)?;
        // Cluster pub/sub is broadcast: any one node hears every completion.
        Ok(Self::with_conn(
            Conn::Cluster(conn),
            first.client()?,
            prefix,
        ))
    }

    fn with_conn(conn: Conn, pubsub: redis::Client, prefix: &str) -> Self {
        Self {
            conn,
            pubsub: std::sync::Arc::new(pubsub),
            prefix: prefix.to_owned(),
            scripts: std::sync::Arc::new(Scripts {
                claim: scripts::claim(),
                renew: scripts::renew(),
                complete: scripts::complete(),
                mark_unknown: scripts::mark_unknown(),
                release: scripts::release(),
                take_over: scripts::take_over(),
                get: scripts::get(),
                delete: scripts::delete(),
                complete_unknown: scripts::complete_unknown(),
            }),
        }
    }

    /// The pub/sub channel on which completions, releases and outcome-unknown marks of records
    /// that a claim found in flight (someone may wait on them) are announced: the announcing
    /// script publishes the record's Redis key. Finishes nobody could be waiting on are not
    /// announced (see [`scripts`]).
    pub fn channel(&self) -> String {
        format!("{}done", self.prefix)
    }

    /// A stream of the keys other instances (and this one) finish while a claim found them in
    /// flight (see [`RedisStore::channel`]), from a dedicated pub/sub connection: a hint for
    /// waking waiters, not an event log of every finish. It ends when that connection breaks:
    /// subscribe again (waiters fall back to polling meanwhile, so nothing is lost but latency).
    pub async fn completions(
        &self,
    ) -> Result<impl futures_util::Stream<Item = StoreKey> + Send + 'static, StoreError> {
        use futures_util::StreamExt;
        let mut pubsub = self.pubsub.get_async_pubsub().await.map_err(map_err)?;
        pubsub.subscribe(self.channel()).await.map_err(map_err)?;
        let this = self.clone();
        Ok(pubsub.into_on_message().filter_map(move |msg| {
            let key = msg
                .get_payload::<String>()
                .ok()
                .and_then(|k| this.store_key_of(&k));
            async move { key }
        }))
    }

    /// The Redis key of a record.
    pub fn redis_key(&self, key: &StoreKey) -> String {
        format!("{}{{{}}}", self.prefix, key.to_hex())
    }

    fn store_key_of(&self, redis_key: &str) -> Option<StoreKey> {
        let hex = redis_key
            .strip_prefix(&self.prefix)?
            .strip_prefix('{')?
            .strip_suffix('}')?;
        StoreKey::from_hex(hex)
    }

    async fn cas(
        &self,
        script: &Script,
        key: &StoreKey,
        args: &[Vec<u8>],
    ) -> Result<CasOutcome, StoreError> {
        let mut inv = script.key(self.redis_key(key));
        for a in args {
            inv.arg(a.as_slice());
        }
        let n: i64 = inv
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        Ok(if n == 1 {
            CasOutcome::Applied
        } else {
            CasOutcome::Lost
        })
    }

    /// Reasons this server may lose or evict acknowledged records (which weakens G1), for a
    /// start-up warning: an evicting `maxmemory-policy` (every record has a TTL, so `volatile-*`
    /// policies evict them too), no AOF, AOF without `appendfsync always`, replicas (Redis
    /// replication is asynchronous). A server that refuses `CONFIG GET` is reported as unchecked.
    pub async fn durability_warnings(&self) -> Result<Vec<String>, StoreError> {
        let mut warnings = Vec::new();
        // In a cluster these commands fan out to every node; `strings` flattens either reply.
        let query = |args: &'static [&'static str]| {
            let mut conn = self.conn.clone();
            async move {
                let mut cmd = redis::cmd(args[0]);
                for a in &args[1..] {
                    cmd.arg(*a);
                }
                cmd.query_async::<Value>(&mut conn)
                    .await
                    .map(|v| strings(&v))
            }
        };
        // CONFIG GET answers [name, value] (per node): every value that follows the name.
        let config = |name: &'static str, reply: Vec<String>| -> Vec<String> {
            reply
                .windows(2)
                .filter(|w| w[0] == name)
                .map(|w| w[1].clone())
                .collect()
        };
        match query(&["CONFIG", "GET", "maxmemory-policy"]).await {
            Ok(r) if !config("maxmemory-policy", r.clone()).is_empty() => {
                for p in config("maxmemory-policy", r) {
                    if p != "noeviction" {
                        warnings.push(format!(
                            "Redis maxmemory-policy = {p}: records can be evicted under memory pressure"
                        ));
                    }
                }
            }
            _ => warnings.push(
                "could not read the Redis configuration (CONFIG GET refused); durability unchecked"
                    .into(),
            ),
        }
        let appendonly = query(&["CONFIG", "GET", "appendonly"])
            .await
            .unwrap_or_default();
        let appendfsync = query(&["CONFIG", "GET", "appendfsync"])
            .await
            .unwrap_or_default();
        if config("appendonly", appendonly).iter().any(|v| v == "no") {
            warnings.push("Redis appendonly = no: a restart loses every record".into());
        } else if let Some(f) = config("appendfsync", appendfsync)
            .into_iter()
            .find(|f| f != "always")
        {
            warnings.push(format!(
                "Redis appendfsync = {f}: a crash can lose the last acknowledged writes"
            ));
        }
        let replicas: u32 = query(&["INFO", "replication"])
            .await
            .map_err(map_err)?
            .iter()
            .flat_map(|text| text.lines())
            .filter_map(|l| l.strip_prefix("connected_slaves:"))
            .filter_map(|n| n.trim().parse::<u32>().ok())
            .sum();
        if replicas > 0 {
            warnings.push(format!(
                "Redis has {replicas} asynchronous replica(s): a failover can lose acknowledged records"
            ));
        }
        Ok(warnings)
    }

    /// Overwrites one field of a stored record (fault injection for tests: what bit rot or a
    /// foreign writer would do).
    #[cfg(feature = "testkit")]
    pub async fn overwrite_field(
        &self,
        key: &StoreKey,
        field: &str,
        value: &[u8],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("HSET")
            .arg(self.redis_key(key))
            .arg(field)
            .arg(value)
            .query_async::<i64>(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

fn field<'a>(map: &'a HashMap<String, Vec<u8>>, name: &str) -> Result<&'a [u8], StoreError> {
    map.get(name)
        .map(Vec::as_slice)
        .ok_or_else(|| corrupt(format!("redis record lacks field {name:?}")))
}

fn text(map: &HashMap<String, Vec<u8>>, name: &str) -> Result<String, StoreError> {
    String::from_utf8(field(map, name)?.to_vec())
        .map_err(|_| corrupt(format!("redis record field {name:?} is not UTF-8")))
}

fn number(map: &HashMap<String, Vec<u8>>, name: &str) -> Result<u64, StoreError> {
    text(map, name)?
        .parse()
        .map_err(|_| corrupt(format!("redis record field {name:?} is not a number")))
}

/// Decodes an `HGETALL` reply (flat list of field, value); empty → `None`.
fn decode_hash(value: Value) -> Result<Option<Record>, StoreError> {
    let Value::Array(items) = value else {
        return Err(corrupt("unexpected reply shape for a record"));
    };
    if items.is_empty() {
        return Ok(None);
    }
    let mut map = HashMap::new();
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let (Value::BulkString(k), Value::BulkString(v)) = (k, v) else {
            return Err(corrupt("unexpected reply shape for a record field"));
        };
        map.insert(String::from_utf8_lossy(&k).into_owned(), v);
    }
    if field(&map, "v")? != b"1" {
        return Err(corrupt("unknown redis record layout version"));
    }
    let fp = field(&map, "fp")?;
    let (alg, digest) = fp
        .split_first()
        .ok_or_else(|| corrupt("empty fingerprint"))?;
    let algorithm =
        Algorithm::from_tag(*alg).ok_or_else(|| corrupt("unknown fingerprint algorithm"))?;
    let digest: [u8; 32] = digest
        .try_into()
        .map_err(|_| corrupt("fingerprint digest is not 32 bytes"))?;
    let epoch = number(&map, "ep")?;
    let state = match field(&map, "st")? {
        b"i" => RecordState::InFlight {
            fencing: Fencing {
                epoch,
                token: {
                    // Exactly as `token_hex` writes it, so that a compare-and-set with the token
                    // read back always matches the stored field.
                    let tk = text(&map, "tk")?;
                    if tk.len() != 32 || !tk.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
                    {
                        return Err(corrupt("token is not 32 lower-case hex digits"));
                    }
                    u128::from_str_radix(&tk, 16).map_err(|_| corrupt("token is not hex"))?
                },
            },
            owner: text(&map, "ow")?,
            lease_expires_at: Timestamp(number(&map, "le")?),
        },
        b"c" => RecordState::Completed {
            epoch,
            completed_at: Timestamp(number(&map, "ct")?),
            outcome: Outcome::decode(field(&map, "out")?).map_err(StoreError::from)?,
        },
        b"u" => RecordState::Unknown {
            epoch,
            since: Timestamp(number(&map, "us")?),
        },
        _ => return Err(corrupt("unknown record state")),
    };
    Ok(Some(Record {
        namespace: text(&map, "ns")?,
        scope: text(&map, "sc")?,
        idempotency_key: text(&map, "k")?,
        fingerprint: Fingerprint::from_parts(algorithm, digest),
        created_at: Timestamp(number(&map, "ca")?),
        expires_at: Timestamp(number(&map, "xa")?),
        state,
    }))
}

/// Every string in a reply, depth first (cluster fan-out replies are maps of node → reply).
fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::BulkString(b) => vec![String::from_utf8_lossy(b).into_owned()],
        Value::SimpleString(s) => vec![s.clone()],
        Value::VerbatimString { text, .. } => vec![text.clone()],
        Value::Array(items) | Value::Set(items) => items.iter().flat_map(strings).collect(),
        // Node-address keys are not part of the answer.
        Value::Map(pairs) => pairs.iter().flat_map(|(_, v)| strings(v)).collect(),
        _ => Vec::new(),
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn shape() -> StoreError {
    StoreError::new(ErrorKind::Internal, "unexpected reply shape from a script")
}

impl RedisStore {
    /// Where `SCAN` must run: the one server, or every cluster master (sorted, for stable cursors).
    async fn scan_nodes(&self) -> Result<Vec<Option<(String, u16)>>, StoreError> {
        let Conn::Cluster(conn) = &self.conn else {
            return Ok(vec![None]);
        };
        let mut conn = conn.clone();
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        let mut masters: Vec<(String, u16)> = text
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(2)
                    .is_some_and(|f| f.contains("master") && !f.contains("fail"))
            })
            .filter_map(|l| {
                let addr = l.split(' ').nth(1)?.split('@').next()?;
                let (host, port) = addr.rsplit_once(':')?;
                Some((host.to_owned(), port.parse().ok()?))
            })
            .collect();
        masters.sort();
        Ok(masters.into_iter().map(Some).collect())
    }

    /// The keys whose record's state field (`st`) is `state`; the others (and keys gone since
    /// the scan) are left out. One `HGET` each, sent concurrently on the multiplexed connection
    /// (routed by slot on a cluster).
    async fn keys_in_state(
        &self,
        keys: Vec<String>,
        state: &[u8],
    ) -> Result<Vec<String>, StoreError> {
        let states = futures_util::future::try_join_all(keys.iter().map(|k| {
            let mut conn = self.conn.clone();
            let mut cmd = redis::cmd("HGET");
            cmd.arg(k).arg("st");
            async move {
                cmd.query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
                    .map_err(map_err)
            }
        }))
        .await?;
        Ok(keys
            .into_iter()
            .zip(states)
            .filter(|(_, st)| st.as_deref() == Some(state))
            .map(|(k, _)| k)
            .collect())
    }

    async fn scan_once(
        &self,
        node: Option<&(String, u16)>,
        cursor: u64,
        pattern: &str,
        count: usize,
    ) -> Result<(u64, Vec<String>), StoreError> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        match (&self.conn, node) {
            (Conn::Cluster(conn), Some((host, port))) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                let value = conn
                    .clone()
                    .route_command(cmd, routing)
                    .await
                    .map_err(map_err)?;
                redis::from_redis_value(value).map_err(|e| {
                    StoreError::new(ErrorKind::Internal, format!("unexpected SCAN reply: {e}"))
                })
            }
            _ => cmd
                .query_async(&mut self.conn.clone())
                .await
                .map_err(map_err),
        }
    }
}

impl Store for RedisStore {
    async fn claim(&self, key: &StoreKey, req: &ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let mut fp = Vec::with_capacity(33);
        fp.push(req.fingerprint.algorithm.tag());
        fp.extend_from_slice(&req.fingerprint.digest);
        let reply: Vec<Value> = self
            .scripts
            .claim
            .key(self.redis_key(key))
            .arg(&req.namespace)
            .arg(&req.scope)
            .arg(&req.idempotency_key)
            .arg(fp)
            .arg(token_hex(req.token))
            .arg(&req.owner)
            .arg(ms(req.lease_ttl))
            .arg(ms(req.ttl))
            .arg(token_hex(Fencing::REVOKED))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        let mut it = reply.into_iter();
        let (Some(flag), Some(now)) = (it.next(), it.next()) else {
            return Err(shape());
        };
        let now = Timestamp(int(&now).ok_or_else(shape)? as u64);
        if int(&flag) == Some(1) {
            let epoch = it.next().as_ref().and_then(int).ok_or_else(shape)?;
            return Ok(ClaimOutcome::Acquired {
                fencing: Fencing {
                    epoch: u64::try_from(epoch).map_err(|_| shape())?,
                    token: req.token,
                },
            });
        }
        let record = decode_hash(it.next().ok_or_else(shape)?)?.ok_or_else(shape)?;
        Ok(ClaimOutcome::Existing { record, now })
    }

    async fn renew(
        &self,
        key: &StoreKey,
        f: Fencing,
        lease_ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        if let Some(lost) = revoked_cas(f) {
            return Ok(lost);
        }
        let args = [
            f.epoch.to_string().into_bytes(),
            token_hex(f.token).into_bytes(),
            ms(lease_ttl).to_string().into_bytes(),
        ];
        self.cas(&self.scripts.renew, key, &args).await
    }

    async fn complete(
        &self,
        key: &StoreKey,
        f: Fencing,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        if let Some(lost) = revoked_cas(f) {
            return Ok(lost);
        }
        protocol::check_outcome(outcome)?;
        let args = [
            f.epoch.to_string().into_bytes(),
            token_hex(f.token).into_bytes(),
            ms(ttl).to_string().into_bytes(),
            outcome.encode(),
            self.channel().into_bytes(),
        ];
        self.cas(&self.scripts.complete, key, &args).await
    }

    async fn mark_unknown(
        &self,
        key: &StoreKey,
        f: Fencing,
        ttl: Duration,
    ) -> Result<CasOutcome, StoreError> {
        if let Some(lost) = revoked_cas(f) {
            return Ok(lost);
        }
        let args = [
            f.epoch.to_string().into_bytes(),
            token_hex(f.token).into_bytes(),
            ms(ttl).to_string().into_bytes(),
            self.channel().into_bytes(),
        ];
        self.cas(&self.scripts.mark_unknown, key, &args).await
    }

    async fn release(&self, key: &StoreKey, f: Fencing) -> Result<CasOutcome, StoreError> {
        if let Some(lost) = revoked_cas(f) {
            return Ok(lost);
        }
        let args = [
            f.epoch.to_string().into_bytes(),
            token_hex(f.token).into_bytes(),
            self.channel().into_bytes(),
            token_hex(Fencing::REVOKED).into_bytes(),
            protocol::RELEASED_OWNER.as_bytes().to_vec(),
        ];
        self.cas(&self.scripts.release, key, &args).await
    }

    async fn take_over(
        &self,
        key: &StoreKey,
        req: &TakeOverRequest,
    ) -> Result<TakeOverOutcome, StoreError> {
        let reply: Vec<Value> = self
            .scripts
            .take_over
            .key(self.redis_key(key))
            .arg(req.expired.epoch.to_string())
            .arg(token_hex(req.expired.token))
            .arg(token_hex(req.token))
            .arg(&req.owner)
            .arg(ms(req.lease_ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        let mut it = reply.into_iter();
        let (Some(flag), Some(now), Some(rest)) = (it.next(), it.next(), it.next()) else {
            return Err(shape());
        };
        let now = Timestamp(int(&now).ok_or_else(shape)? as u64);
        if int(&flag) == Some(1) {
            let epoch = int(&rest).ok_or_else(shape)? as u64;
            return Ok(TakeOverOutcome::Acquired {
                fencing: Fencing {
                    epoch,
                    token: req.token,
                },
            });
        }
        Ok(TakeOverOutcome::Refused {
            current: decode_hash(rest)?,
            now,
        })
    }

    async fn get(&self, key: &StoreKey) -> Result<Option<Record>, StoreError> {
        let reply: Vec<Value> = self
            .scripts
            .get
            .key(self.redis_key(key))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        decode_hash(reply.into_iter().nth(1).ok_or_else(shape)?)
    }

    async fn delete(&self, key: &StoreKey, mode: DeleteMode) -> Result<DeleteOutcome, StoreError> {
        let mode = match mode {
            DeleteMode::Finished => "f",
            DeleteMode::Unknown => "u",
            DeleteMode::Force => "x",
        };
        let reply: Vec<Value> = self
            .scripts
            .delete
            .key(self.redis_key(key))
            .arg(mode)
            .arg(token_hex(Fencing::REVOKED))
            .arg(protocol::REVOKED_OWNER)
            .arg(self.channel())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        let mut it = reply.into_iter();
        let (Some(flag), Some(_now)) = (it.next(), it.next()) else {
            return Err(shape());
        };
        match int(&flag) {
            Some(0) => Ok(DeleteOutcome::Absent),
            Some(1) => Ok(DeleteOutcome::Deleted),
            Some(2) => {
                let epoch = it.next().as_ref().and_then(int).ok_or_else(shape)?;
                Ok(DeleteOutcome::Revoked {
                    epoch: u64::try_from(epoch).map_err(|_| shape())?,
                })
            }
            Some(3) => match decode_hash(it.next().ok_or_else(shape)?)? {
                Some(current) => Ok(DeleteOutcome::Refused {
                    current: Box::new(current),
                }),
                None => Ok(DeleteOutcome::Absent),
            },
            _ => Err(shape()),
        }
    }

    async fn complete_unknown(
        &self,
        key: &StoreKey,
        expected: UnknownMark,
        outcome: &Outcome,
        ttl: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        protocol::check_outcome(outcome)?;
        let reply: Vec<Value> = self
            .scripts
            .complete_unknown
            .key(self.redis_key(key))
            .arg(expected.epoch.to_string())
            .arg(expected.since.as_millis().to_string())
            .arg(ms(ttl))
            .arg(outcome.encode())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(map_err)?;
        let mut it = reply.into_iter();
        let (Some(flag), Some(_now)) = (it.next(), it.next()) else {
            return Err(shape());
        };
        match int(&flag) {
            Some(0) => Ok(ResolveOutcome::Absent),
            Some(1) => Ok(ResolveOutcome::Completed),
            Some(2) => match decode_hash(it.next().ok_or_else(shape)?)? {
                Some(current) => Ok(ResolveOutcome::Refused {
                    current: Box::new(current),
                }),
                None => Ok(ResolveOutcome::Absent),
            },
            _ => Err(shape()),
        }
    }

    /// `SCAN` over the prefix, on every master of a cluster in turn. The cursor is
    /// `<node>:<scan cursor>:<keys of that batch already returned>`, so a page never exceeds the
    /// limit; as with `SCAN`, a record may appear twice.
    async fn list(&self, req: &ListRequest) -> Result<ListPage, StoreError> {
        let limit = req.limit.clamp(1, MAX_LIST_PAGE);
        let (mut node, mut scan, mut skip) = match req.cursor.as_deref() {
            None => (0usize, 0u64, 0usize),
            Some(c) => {
                let bad =
                    || StoreError::new(ErrorKind::Internal, format!("invalid list cursor {c:?}"));
                let mut parts = c.split(':');
                let mut next = || parts.next().ok_or_else(bad);
                let (n, sc, sk) = (next()?, next()?, next()?);
                (
                    n.parse().map_err(|_| bad())?,
                    sc.parse().map_err(|_| bad())?,
                    sk.parse().map_err(|_| bad())?,
                )
            }
        };
        let nodes = self.scan_nodes().await?;
        let pattern = format!("{}{{*}}", self.prefix);
        let mut keys = Vec::with_capacity(limit);
        let next = loop {
            let Some(target) = nodes.get(node) else {
                break None;
            };
            let (next_scan, batch) = self
                .scan_once(target.as_ref(), scan, &pattern, limit.max(100))
                .await?;
            let mut taken = skip;
            let mut full = false;
            for k in batch.iter().skip(skip) {
                if keys.len() == limit {
                    full = true;
                    break;
                }
                keys.push(k.clone());
                taken += 1;
            }
            if full {
                break Some(format!("{node}:{scan}:{taken}"));
            }
            skip = 0;
            scan = next_scan;
            if scan == 0 {
                node += 1;
                if node == nodes.len() {
                    break None;
                }
            }
            if keys.len() == limit {
                break Some(format!("{node}:{scan}:0"));
            }
        };
        // With `only_unknown`, one plain `HGET st` per key (no script; the multiplexed
        // connection sends them together) and only outcome-unknown records are read whole.
        let visited = keys.len();
        if req.only_unknown {
            keys = self.keys_in_state(keys, b"u").await?;
        }
        let mut records = Vec::with_capacity(keys.len());
        for k in keys {
            let Some(store_key) = self.store_key_of(&k) else {
                continue;
            };
            match self.get(&store_key).await {
                Ok(Some(r)) => records.push((store_key, r)),
                Ok(None) => {}
                Err(e) if e.kind() == ErrorKind::Corrupt => {
                    tracing::warn!(key = %store_key, error = %e, "skipping an undecodable record in list");
                }
                Err(e) => return Err(e),
            }
        }
        // Whatever was visited and not returned (other states; gone or undecodable since).
        let passed_over = visited.saturating_sub(records.len());
        Ok(ListPage {
            records,
            next,
            passed_over,
        })
    }

    /// Redis expires records natively: nothing to do.
    async fn purge_expired(&self, _limit: usize) -> Result<usize, StoreError> {
        Ok(0)
    }
}
