//! Store URLs: parsing (no connecting) and redaction for logs.

use std::path::PathBuf;

use idemgate_core::{ErrorKind, StoreError};

/// A parsed store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreUrl {
    /// `memory://[?max_records=N&max_bytes=SIZE]` (defaults 1,000,000 records and 1GiB).
    Memory {
        /// `max_records`, if given.
        max_records: Option<usize>,
        /// `max_bytes`, if given.
        max_bytes: Option<usize>,
    },
    /// `file:DIR[?cache=SIZE&engine=fjall|redb]` or `file://DIR`: the embedded durable store in
    /// `DIR` (a `?` starts the options, so it cannot be part of the path). The engine is fjall
    /// (`DIR/fjall/`) unless `engine=redb` says otherwise or `DIR` already holds a redb file
    /// (`DIR/idemgate.redb`) from an earlier release.
    File {
        /// The directory.
        dir: PathBuf,
        /// `?cache=SIZE`: memory for the engine's block or page cache (default 64 MiB).
        cache: Option<usize>,
        /// `?engine=`: the engine asked for, if any.
        engine: Option<FileEngine>,
    },
    /// `redis://HOST:PORT[/DB]`, or `rediss://HOST:PORT[/DB][?ca_file=PATH&client_cert=PATH&client_key=PATH]`
    /// over TLS (the options are read by the Redis store).
    Redis {
        /// The URL as given.
        url: String,
    },
    /// `redis+cluster://H1:P1,H2:P2,…`, or `rediss+cluster://H1:P1,…[?TLS options]` over TLS (the
    /// options of `rediss://`, for every node).
    RedisCluster {
        /// One `redis://HOST:PORT` (or `rediss://HOST:PORT?OPTIONS`) URL per node given.
        nodes: Vec<String>,
    },
    /// `postgres://USER@HOST:PORT/DB` (also `postgresql://`).
    Postgres {
        /// The URL as given.
        url: String,
    },
    /// `dynamodb://TABLE[?region=REGION&endpoint=URL]`: credentials (and, without `region`, the
    /// region) from the standard AWS chain; `endpoint` for DynamoDB Local or another compatible
    /// server.
    DynamoDb {
        /// The table.
        table: String,
        /// `region`, if given.
        region: Option<String>,
        /// `endpoint`, if given (`http://` or `https://`).
        endpoint: Option<String>,
    },
}

/// The engine of a `file:` store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileEngine {
    /// fjall (an LSM tree with a journal) in `DIR/fjall/`: the default.
    Fjall,
    /// redb (a copy-on-write B-tree) in the file `DIR/idemgate.redb`: the engine before 0.2.
    Redb,
}

impl FileEngine {
    /// The option value: `fjall` or `redb`.
    pub fn as_str(self) -> &'static str {
        match self {
            FileEngine::Fjall => "fjall",
            FileEngine::Redb => "redb",
        }
    }
}

fn config(msg: String) -> StoreError {
    StoreError::new(ErrorKind::Config, msg)
}

impl StoreUrl {
    /// Parses `url`; a `Config` error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Self, StoreError> {
        let cluster = url
            .strip_prefix("redis+cluster://")
            .map(|list| ("redis", list))
            .or_else(|| {
                url.strip_prefix("rediss+cluster://")
                    .map(|list| ("rediss", list))
            });
        if let Some((scheme, list)) = cluster {
            // The options (TLS files) apply to every node.
            let (list, query) = match list.split_once('?') {
                Some((list, query)) => (list, format!("?{query}")),
                None => (list, String::new()),
            };
            let nodes: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| format!("{scheme}://{n}{query}"))
                .collect();
            if nodes.is_empty() {
                return Err(config(format!(
                    "{scheme}+cluster:// needs at least one node, e.g. \
                     {scheme}+cluster://h1:7000,h2:7001"
                )));
            }
            return Ok(StoreUrl::RedisCluster { nodes });
        }
        if url.starts_with("redis://") || url.starts_with("rediss://") {
            return Ok(StoreUrl::Redis { url: url.into() });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres { url: url.into() });
        }
        if let Some(rest) = url.strip_prefix("dynamodb://") {
            return dynamodb(rest);
        }
        if let Some(rest) = url
            .strip_prefix("memory://")
            .or_else(|| url.strip_prefix("memory:"))
        {
            return memory(rest);
        }
        if let Some(path) = url.strip_prefix("file:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            let (path, query) = match path.split_once('?') {
                // A `?` starts the options; an empty option list is a mistake, not a path.
                Some((_, "")) => {
                    return Err(config(
                        "file: a `?` starts the options (cache=SIZE, engine=fjall|redb) and may \
                         not end the URL"
                            .into(),
                    ));
                }
                Some((p, q)) => (p, q),
                None => (path, ""),
            };
            if path.is_empty() {
                return Err(config(
                    "file: store URL needs a path, e.g. file:./idemgate-data".into(),
                ));
            }
            let mut cache = None;
            let mut engine = None;
            for pair in query.split('&').filter(|_| !query.is_empty()) {
                match pair.split_once('=') {
                    Some(("cache", value)) => {
                        let n = size(value).filter(|n| *n >= 1 << 20).ok_or_else(|| {
                            config(format!(
                                "file: cache {value:?} is not a size of at least 1MiB (e.g. 64MiB)"
                            ))
                        })?;
                        cache = Some(n);
                    }
                    Some(("engine", "fjall")) => engine = Some(FileEngine::Fjall),
                    Some(("engine", "redb")) => engine = Some(FileEngine::Redb),
                    Some(("engine", value)) => {
                        return Err(config(format!(
                            "file: engine {value:?} is not fjall or redb"
                        )));
                    }
                    _ => {
                        return Err(config(format!(
                            "unknown file: option {:?} (use cache=SIZE or engine=fjall|redb)",
                            redact(pair)
                        )));
                    }
                }
            }
            return Ok(StoreUrl::File {
                dir: path.into(),
                cache,
                engine,
            });
        }
        // Only the scheme is shown: a mistyped URL (`postgres:user:pw@db`) may hold a password
        // where no parser would look for one.
        let scheme: String = url
            .split(':')
            .next()
            .unwrap_or("")
            .chars()
            .take(32)
            .collect();
        Err(config(format!(
            "unsupported store URL (scheme {scheme:?}): use memory://, file:DIR, \
             redis://HOST:PORT, rediss://HOST:PORT, redis+cluster://H1:P1,H2:P2, \
             rediss+cluster://H1:P1,H2:P2, postgres://USER@HOST/DB or \
             dynamodb://TABLE?region=REGION"
        )))
    }

    /// Whether several instances can share this store (and so need distinct namespaces).
    pub fn is_shared(&self) -> bool {
        matches!(
            self,
            StoreUrl::Redis { .. }
                | StoreUrl::RedisCluster { .. }
                | StoreUrl::Postgres { .. }
                | StoreUrl::DynamoDb { .. }
        )
    }
}

/// An option name for an error: quoted if it is a plain word, else not echoed (a mistyped URL
/// may put credentials there).
fn option_name(name: &str) -> String {
    if !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        format!("{name:?}")
    } else {
        format!("of {} bytes (not echoed)", name.len())
    }
}

/// `TABLE[?region=REGION&endpoint=URL]` of a DynamoDB URL (values taken as written).
fn dynamodb(rest: &str) -> Result<StoreUrl, StoreError> {
    let (table, query) = rest.split_once('?').unwrap_or((rest, ""));
    let table = table.trim_end_matches('/');
    let valid = (3..=255).contains(&table.len())
        && table
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'));
    if !valid {
        // The value is not echoed: a mistyped URL may hold credentials where the table name
        // goes (`dynamodb://user:secret@table`); found by the `store_url` fuzz target.
        let hint = if table.contains('@') || table.contains(':') {
            " (credentials come from the AWS chain, never from the URL)"
        } else {
            ""
        };
        return Err(config(format!(
            "dynamodb:// needs a table name (3 to 255 of a-z A-Z 0-9 _ - .), e.g. \
             dynamodb://idemgate?region=eu-west-1; got {} bytes that are not one{hint}",
            table.len()
        )));
    }
    let (mut region, mut endpoint) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(config(format!(
                "dynamodb:// option {} needs a value",
                option_name(pair)
            )));
        };
        if value.is_empty() {
            return Err(config(format!(
                "dynamodb:// option {} is empty",
                option_name(name)
            )));
        }
        let repeated = match name {
            "region" => region.is_some(),
            "endpoint" => endpoint.is_some(),
            _ => false,
        };
        if repeated {
            return Err(config(format!(
                "dynamodb:// option {name} is given twice (give it once)"
            )));
        }
        match name {
            "region" => region = Some(value.to_owned()),
            "endpoint" => {
                if !(value.starts_with("http://") || value.starts_with("https://")) {
                    return Err(config(format!(
                        "dynamodb:// endpoint must be an http:// or https:// URL, got {:?}",
                        redact(value)
                    )));
                }
                endpoint = Some(value.to_owned());
            }
            other => {
                return Err(config(format!(
                    "unknown dynamodb:// option {} (use region or endpoint)",
                    option_name(other)
                )));
            }
        }
    }
    Ok(StoreUrl::DynamoDb {
        table: table.to_owned(),
        region,
        endpoint,
    })
}

/// `?max_records=N&max_bytes=SIZE` of a memory URL.
fn memory(rest: &str) -> Result<StoreUrl, StoreError> {
    let query = match rest.strip_prefix('?') {
        Some(q) => q,
        None if rest.is_empty() => "",
        None => {
            return Err(config(format!(
                "memory:// takes no path, only ?max_records=N&max_bytes=SIZE, got {:?}",
                redact(rest)
            )));
        }
    };
    let (mut max_records, mut max_bytes) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let Some((name, value)) = pair.split_once('=') else {
            return Err(config(format!("memory:// option {pair:?} needs a value")));
        };
        match name {
            "max_records" => {
                let n: usize = value.parse().map_err(|_| {
                    config(format!("memory:// max_records {value:?} is not a number"))
                })?;
                if n == 0 {
                    return Err(config("memory:// max_records must be at least 1".into()));
                }
                max_records = Some(n);
            }
            "max_bytes" => {
                let n = size(value).ok_or_else(|| {
                    config(format!(
                        "memory:// max_bytes {value:?} is not a size (e.g. 512MiB)"
                    ))
                })?;
                if n < 1 << 20 {
                    return Err(config(format!(
                        "memory:// max_bytes must be at least 1MiB, got {value:?}"
                    )));
                }
                max_bytes = Some(n);
            }
            other => {
                return Err(config(format!(
                    "unknown memory:// option {other:?} (use max_records or max_bytes)"
                )));
            }
        }
    }
    Ok(StoreUrl::Memory {
        max_records,
        max_bytes,
    })
}

/// `1048576`, `512KiB`, `8MiB`, `1GiB` (and KB/MB/GB as powers of 1000).
fn size(s: &str) -> Option<usize> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().ok()?;
    let mult = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// The URL without its password, for logs and messages: the password of the `user:password@`
/// part, and the value of every query parameter whose (percent-decoded) name contains `pass`
/// (PostgreSQL also takes `?password=…`, `sslpassword=…`), are shown as `***`. When the URL is
/// ambiguous it hides more, never less.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_query(url);
    };
    match userinfo_end(rest) {
        Some(end) => {
            let userinfo = &rest[..end];
            let user = userinfo.split(':').next().unwrap_or("");
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!(
                "{scheme}://{user}{hidden}@{}",
                redact_query(&rest[end + 1..])
            )
        }
        None => format!("{scheme}://{}", redact_query(rest)),
    }
}

/// Where the `user[:password]` part of `rest` (the URL after `scheme://`) ends: its `@`.
/// - An `@` before the query: the last one there (the `url` crate's reading, which allows `@`
///   and `/` in a password); an `@` in the query is a query value's.
/// - Else an `@` whose prefix has no `/`: tokio-postgres reads credentials up to the first `@`,
///   so a password may hold a raw `?` or `#`.
fn userinfo_end(rest: &str) -> Option<usize> {
    let before_query = rest.find(['?', '#']).map_or(rest, |i| &rest[..i]);
    if let Some(at) = before_query.rfind('@') {
        return Some(at);
    }
    rest.find('@').filter(|&at| !rest[..at].contains('/'))
}

/// Whether a query parameter's name, percent-decoded, names a password.
fn names_a_password(name: &str) -> bool {
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(name).collect();
    decoded
        .to_ascii_lowercase()
        .windows(4)
        .any(|w| w == b"pass")
}

/// `rest` with the value of every `…pass…=value` query parameter replaced by `***`.
fn redact_query(rest: &str) -> String {
    let Some((before, query)) = rest.split_once('?') else {
        return rest.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if names_a_password(name) => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    let mut out = format!("{before}?{}", pairs.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            redact("postgres://app@db/x?sslmode=require&password=s3cret&sslpassword=k3y"),
            "postgres://app@db/x?sslmode=require&password=***&sslpassword=***"
        );
        assert_eq!(
            redact("postgres://db/x?PASSWORD=s3cret#frag"),
            "postgres://db/x?PASSWORD=***#frag"
        );
        assert_eq!(
            redact("postgres://u:pw@db/x?password=s3cret"),
            "postgres://u:***@db/x?password=***"
        );
        // An `@` in the query is not the userinfo's; a password may hold `@`, `/`, `?`.
        assert_eq!(
            redact("postgres://app@db/x?password=s3cret&application_name=me@host"),
            "postgres://app@db/x?password=***&application_name=me@host"
        );
        assert_eq!(
            redact("postgres://app@db/x?password=p@ss"),
            "postgres://app@db/x?password=***"
        );
        assert_eq!(redact("redis://:p@s/s@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact("postgres://u:p?ss@db/x"), "postgres://u:***@db/x");
        assert_eq!(redact("redis://h:6379/0?x=a@b"), "redis://h:6379/0?x=a@b");
        // Names are percent-decoded, as the drivers do.
        assert_eq!(
            redact("postgres://db/x?p%61ssword=s3cret"),
            "postgres://db/x?p%61ssword=***"
        );
    }

    #[test]
    fn urls_parse_and_bad_ones_say_why() {
        assert_eq!(
            StoreUrl::parse("memory://?max_records=5&max_bytes=2MiB").ok(),
            Some(StoreUrl::Memory {
                max_records: Some(5),
                max_bytes: Some(2 << 20)
            })
        );
        assert_eq!(
            StoreUrl::parse("redis+cluster://a:1, b:2").ok(),
            Some(StoreUrl::RedisCluster {
                nodes: vec!["redis://a:1".into(), "redis://b:2".into()]
            })
        );
        assert_eq!(
            StoreUrl::parse("rediss+cluster://a:1,b:2?ca_file=/etc/ca.pem").ok(),
            Some(StoreUrl::RedisCluster {
                nodes: vec![
                    "rediss://a:1?ca_file=/etc/ca.pem".into(),
                    "rediss://b:2?ca_file=/etc/ca.pem".into()
                ]
            })
        );
        assert!(StoreUrl::parse("rediss://h:6380?ca_file=x").is_ok_and(|u| u.is_shared()));
        assert!(StoreUrl::parse("postgres://u@h/db").is_ok_and(|u| u.is_shared()));
        assert!(StoreUrl::parse("file:x").is_ok_and(|u| !u.is_shared()));
        assert_eq!(
            StoreUrl::parse(
                "dynamodb://idem.gate-1?region=eu-west-1&endpoint=http://127.0.0.1:8000"
            )
            .ok(),
            Some(StoreUrl::DynamoDb {
                table: "idem.gate-1".into(),
                region: Some("eu-west-1".into()),
                endpoint: Some("http://127.0.0.1:8000".into()),
            })
        );
        assert!(StoreUrl::parse("dynamodb://idemgate").is_ok_and(|u| u.is_shared()));
        assert_eq!(
            StoreUrl::parse("file:./d?cache=16MiB").ok(),
            Some(StoreUrl::File {
                dir: "./d".into(),
                cache: Some(16 << 20),
                engine: None,
            })
        );
        assert_eq!(
            StoreUrl::parse("file:./d?engine=redb&cache=2MiB").ok(),
            Some(StoreUrl::File {
                dir: "./d".into(),
                cache: Some(2 << 20),
                engine: Some(FileEngine::Redb),
            })
        );
        assert!(matches!(
            StoreUrl::parse("file:./d?engine=fjall"),
            Ok(StoreUrl::File {
                engine: Some(FileEngine::Fjall),
                ..
            })
        ));
        for (bad, why) in [
            ("file:./d?cache=1KiB", "at least 1MiB"),
            ("file:./d?colour=blue", "unknown file: option"),
            ("file:./d?", "may not end"),
            ("file:./d?engine=rocksdb", "not fjall or redb"),
            ("file:./d?cache=8MiB&", "unknown file: option"),
            ("memory://?max_records=lots", "max_records"),
            ("memory://?max_bytes=1KiB", "at least 1MiB"),
            ("memory://?colour=blue", "unknown memory:// option"),
            ("file:", "needs a path"),
            ("redis+cluster://", "at least one node"),
            (
                "rediss+cluster://?ca_file=x",
                "rediss+cluster:// needs at least one node",
            ),
            ("mysql://u:pw@h/db", "unsupported"),
            ("postgres:u:s3cret@h/db", "unsupported"),
            ("dynamodb://", "needs a table name"),
            ("dynamodb://x", "needs a table name"),
            ("dynamodb://t t?region=x", "needs a table name"),
            (
                "dynamodb://u:s3cret@t?region=x",
                "credentials come from the AWS chain",
            ),
            (
                "dynamodb://idemgate?colour=blue",
                "unknown dynamodb:// option",
            ),
            ("dynamodb://idemgate?region", "needs a value"),
            (
                "dynamodb://idemgate?region=eu-west-1&region=us-east-1",
                "given twice",
            ),
            ("dynamodb://idemgate?region=", "is empty"),
            (
                "dynamodb://idemgate?endpoint=127.0.0.1:8000",
                "http:// or https://",
            ),
        ] {
            let err = StoreUrl::parse(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.message().contains(why), "{bad}: {err}");
            assert!(!err.message().contains("pw@"), "{err}");
            assert!(!err.message().contains("s3cret"), "{err}");
        }
    }
}
