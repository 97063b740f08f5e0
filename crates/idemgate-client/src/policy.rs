//! The policy: every setting, with its default, and the state shared by every request sent
//! under it (one retry budget and one circuit breaker per host).
//!
//! ```
//! use std::time::Duration;
//! use idemgate_client::{Policy, budget::BudgetConfig, breaker::BreakerConfig};
//!
//! let policy = Policy::builder()
//!     .max_attempts(4)
//!     .base_delay(Duration::from_millis(200))
//!     .deadline(Duration::from_secs(30))
//!     .budget(BudgetConfig::default().capacity(100.0))
//!     .breaker(BreakerConfig::default().open_for(Duration::from_secs(30)))
//!     .build()?;
//! assert_eq!(policy.max_attempts(), 4);
//! # Ok::<(), idemgate_client::ConfigError>(())
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};
use parking_lot::Mutex;

use crate::backoff::Backoff;
use crate::breaker::{Breaker, BreakerConfig, State};
use crate::budget::{BudgetConfig, TokenBucket};
use crate::classify::DEFAULT_RETRY_STATUSES;
use crate::clock::{Clock, TokioClock};
use crate::key::{IDEMPOTENCY_KEY, KeyKind};

/// The longest duration a setting takes (`deadline`, `attempt_timeout`, `max_delay`,
/// `retry_after_cap`, the breaker's `open_for`): 24 hours. Longer ones are refused by
/// [`PolicyBuilder::build`], so no instant computed from them can overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// A setting out of its range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid idemgate-client setting: {0}")]
pub struct ConfigError(String);

/// The retry policy and its shared state. Cheap to clone; clones share the per-host budgets and
/// breakers (so build one per client, not one per request).
#[derive(Clone)]
pub struct Policy {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("config", &self.inner.config)
            .field("hosts", &self.inner.hosts.lock().map.len())
            .finish()
    }
}

pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) clock: Arc<dyn Clock>,
    rng: Mutex<fastrand::Rng>,
    hosts: Mutex<Hosts>,
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) max_attempts: u32,
    pub(crate) max_in_flight_waits: u32,
    pub(crate) backoff: Backoff,
    pub(crate) deadline: Option<Duration>,
    pub(crate) attempt_timeout: Option<Duration>,
    pub(crate) retry_after_cap: Duration,
    pub(crate) retry_after_jitter: f64,
    pub(crate) retry_statuses: Vec<StatusCode>,
    pub(crate) key_kind: KeyKind,
    pub(crate) key_header: HeaderName,
    pub(crate) key_methods: Vec<Method>,
    /// Hosts known to honour the key (`None`: every host).
    pub(crate) key_hosts: Option<Vec<String>>,
    pub(crate) body_limit: usize,
    pub(crate) budget: Option<BudgetConfig>,
    pub(crate) breaker: Option<BreakerConfig>,
    pub(crate) max_hosts: usize,
}

/// Builds a [`Policy`]. Every default is justified in the [guide](crate::guide).
#[derive(Debug, Clone)]
#[must_use]
pub struct PolicyBuilder {
    config: Config,
    seed: Option<u64>,
    clock: Option<Arc<dyn Clock>>,
}

impl Default for PolicyBuilder {
    fn default() -> Self {
        Self {
            config: Config {
                max_attempts: 3,
                max_in_flight_waits: 10,
                backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(20)),
                deadline: None,
                attempt_timeout: None,
                retry_after_cap: Duration::from_secs(60),
                retry_after_jitter: 0.2,
                retry_statuses: DEFAULT_RETRY_STATUSES
                    .iter()
                    .filter_map(|s| StatusCode::from_u16(*s).ok())
                    .collect(),
                key_kind: KeyKind::V7,
                key_header: IDEMPOTENCY_KEY,
                key_methods: vec![Method::POST, Method::PATCH],
                key_hosts: None,
                body_limit: 8 << 20,
                budget: Some(BudgetConfig::default()),
                breaker: Some(BreakerConfig::default()),
                max_hosts: 1024,
            },
            seed: None,
            clock: None,
        }
    }
}

impl PolicyBuilder {
    /// Most requests per operation, the first included (default 3; 1 disables retries).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.config.max_attempts = n;
        self
    }

    /// Most waits on a `409` in flight per operation; they use no attempt and no budget, the
    /// deadline bounds them too (default 10).
    pub fn max_in_flight_waits(mut self, n: u32) -> Self {
        self.config.max_in_flight_waits = n;
        self
    }

    /// Ceiling of the first retry's delay; doubles per retry (default 500 ms).
    pub fn base_delay(mut self, d: Duration) -> Self {
        self.config.backoff = Backoff::new(d, self.config.backoff.cap());
        self
    }

    /// Cap of the backoff ceiling (default 20 s; at most 24 h).
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.config.backoff = Backoff::new(self.config.backoff.base(), d);
        self
    }

    /// Overall deadline of an operation, from the call (reading the request body to buffer it
    /// included), attempts and waits included (default none; 1 ms to 24 h).
    pub fn deadline(mut self, d: Duration) -> Self {
        self.config.deadline = Some(d);
        self
    }

    /// Timeout of each attempt, up to its response head (default none: the HTTP client's own;
    /// 1 ms to 24 h).
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.config.attempt_timeout = Some(d);
        self
    }

    /// Longest `Retry-After` honoured; a longer one stops the operation with the answer
    /// (default 60 s; at most 24 h).
    pub fn retry_after_cap(mut self, d: Duration) -> Self {
        self.config.retry_after_cap = d;
        self
    }

    /// Spread added above a `Retry-After`, as a fraction of it (at least the base delay)
    /// (default 0.2).
    pub fn retry_after_jitter(mut self, fraction: f64) -> Self {
        self.config.retry_after_jitter = fraction;
        self
    }

    /// Statuses retried (default 408, 425, 429, 500, 502, 503, 504). `409` (in flight) and
    /// idemgate's outcome-unknown `502` are decided by their problem type whatever this says.
    pub fn retry_statuses(mut self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        self.config.retry_statuses = statuses.into_iter().collect();
        self
    }

    /// How generated keys are made (default UUID v7).
    pub fn key_kind(mut self, kind: KeyKind) -> Self {
        self.config.key_kind = kind;
        self
    }

    /// The key header (default `Idempotency-Key`).
    pub fn key_header(mut self, name: HeaderName) -> Self {
        self.config.key_header = name;
        self
    }

    /// Methods that get a generated key when the caller sent none (default POST, PATCH).
    pub fn key_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.config.key_methods = methods.into_iter().collect();
        self
    }

    /// Hosts known to honour the key header (idemgate, or an API that implements
    /// `Idempotency-Key` itself): only for these does a key make it safe to resend a
    /// non-idempotent request (POST, PATCH) after a failure that may have reached the server
    /// (a timeout, a reset, a retryable status, a `409` in flight). To any other host such a
    /// request is resent only when it provably was not sent (the connection was refused); the
    /// key is still generated and sent.
    ///
    /// Each entry is a host name (`api.example.com`, `127.0.0.1`, `[::1]`: any scheme and
    /// port) or `scheme://host:port` (exactly that origin); compared without regard to case.
    ///
    /// Default: every host honours keys — the client is meant to sit in front of idemgate. A
    /// client that also calls APIs which ignore `Idempotency-Key` must list the hosts that
    /// honour it (an empty list: none).
    pub fn key_hosts<S: Into<String>>(mut self, hosts: impl IntoIterator<Item = S>) -> Self {
        self.config.key_hosts = Some(
            hosts
                .into_iter()
                .map(|h| h.into().trim().to_ascii_lowercase())
                .collect(),
        );
        self
    }

    /// Every host honours the key header (the default; undoes [`key_hosts`](Self::key_hosts)).
    pub fn key_hosts_all(mut self) -> Self {
        self.config.key_hosts = None;
        self
    }

    /// Most bytes of a streaming request body buffered so it can be resent (default 8 MiB).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.config.body_limit = bytes;
        self
    }

    /// The per-host retry budget (default AWS standard mode's).
    pub fn budget(mut self, budget: BudgetConfig) -> Self {
        self.config.budget = Some(budget);
        self
    }

    /// No retry budget.
    pub fn no_budget(mut self) -> Self {
        self.config.budget = None;
        self
    }

    /// The per-host circuit breaker (default [`BreakerConfig::default`]).
    pub fn breaker(mut self, breaker: BreakerConfig) -> Self {
        self.config.breaker = Some(breaker);
        self
    }

    /// No circuit breaker.
    pub fn no_breaker(mut self) -> Self {
        self.config.breaker = None;
        self
    }

    /// Most hosts whose budget and breaker are kept; the least recently used is forgotten past
    /// it (default 1024). A forgotten host's state is lost: when it comes back it starts with a
    /// full budget and a closed breaker (an open breaker for it closes early, a drained budget
    /// is refilled). Keep `max_hosts` above the number of hosts a client calls.
    pub fn max_hosts(mut self, n: usize) -> Self {
        self.config.max_hosts = n;
        self
    }

    /// Seeds the jitter's random generator (tests: reproducible delays).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The clock (default [`TokioClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Checks the settings and builds the policy.
    pub fn build(mut self) -> Result<Policy, ConfigError> {
        let c = &self.config;
        let err = |m: String| Err(ConfigError(m));
        if !(1..=100).contains(&c.max_attempts) {
            return err(format!(
                "max_attempts must be 1 to 100, not {}",
                c.max_attempts
            ));
        }
        if c.max_in_flight_waits > 1000 {
            return err(format!(
                "max_in_flight_waits must be at most 1000, not {}",
                c.max_in_flight_waits
            ));
        }
        if c.backoff.base() > c.backoff.cap() {
            return err(format!(
                "base_delay ({:?}) must not exceed max_delay ({:?})",
                c.backoff.base(),
                c.backoff.cap()
            ));
        }
        if !(c.retry_after_jitter.is_finite() && (0.0..=10.0).contains(&c.retry_after_jitter)) {
            return err(format!(
                "retry_after_jitter must be from 0 to 10, not {}",
                c.retry_after_jitter
            ));
        }
        let within = |name: &str, d: Duration, min: Duration| {
            if d < min || d > MAX_DURATION {
                Err(ConfigError(format!(
                    "{name} must be {min:?} to 24 h, not {d:?}"
                )))
            } else {
                Ok(())
            }
        };
        let ms = Duration::from_millis(1);
        if let Some(d) = c.deadline {
            within("deadline", d, ms)?;
        }
        if let Some(d) = c.attempt_timeout {
            within("attempt_timeout", d, ms)?;
        }
        within("max_delay", c.backoff.cap(), Duration::ZERO)?;
        within("retry_after_cap", c.retry_after_cap, Duration::ZERO)?;
        if let Some(hosts) = &c.key_hosts
            && let Some(bad) = hosts.iter().find(|h| h.is_empty())
        {
            return err(format!("key_hosts entries must not be empty: {bad:?}"));
        }
        if c.max_hosts == 0 {
            return err("max_hosts must be at least 1".into());
        }
        if let Some(b) = &c.budget {
            b.validate().map_err(ConfigError)?;
        }
        if let Some(b) = &c.breaker {
            b.validate().map_err(ConfigError)?;
        }
        let attempt = self.config.attempt_timeout;
        self.config.breaker = self.config.breaker.map(|b| b.with_attempt_timeout(attempt));
        Ok(self.build_unchecked())
    }
}

impl Policy {
    /// A builder with the defaults.
    pub fn builder() -> PolicyBuilder {
        PolicyBuilder::default()
    }

    /// The defaults (see [`PolicyBuilder`]).
    pub fn new() -> Self {
        // The defaults are valid (`defaults_are_valid` checks it).
        PolicyBuilder::default().build_unchecked()
    }

    /// Most requests per operation.
    pub fn max_attempts(&self) -> u32 {
        self.inner.config.max_attempts
    }

    /// What the policy knows about `host` (`scheme://host:port`), if anything.
    pub fn host(&self, host: &str) -> Option<HostSnapshot> {
        let hosts = self.inner.hosts.lock();
        let state = hosts.map.get(host)?.clone();
        drop(hosts);
        Some(state.snapshot())
    }

    /// Hosts tracked now (at most `max_hosts`).
    pub fn hosts_tracked(&self) -> usize {
        self.inner.hosts.lock().map.len()
    }

    /// Whether `host` (`scheme://host:port`) honours the key header (see
    /// [`PolicyBuilder::key_hosts`]).
    pub fn honours_keys(&self, host: &str) -> bool {
        let Some(list) = &self.inner.config.key_hosts else {
            return true;
        };
        let host = host.to_ascii_lowercase();
        let name = host
            .split_once("://")
            .map_or(host.as_str(), |(_, rest)| rest)
            .rsplit_once(':')
            .map_or(host.as_str(), |(name, _)| name);
        list.iter().any(|h| *h == host || h == name)
    }

    /// A uniform draw in `[0, 1)` from the policy's generator.
    pub(crate) fn unit(&self) -> f64 {
        self.inner.rng.lock().f64()
    }

    /// The shared state of `host`, created (and the least recently used host forgotten past
    /// `max_hosts`) if needed.
    pub(crate) fn host_state(&self, host: &str) -> Arc<HostState> {
        let mut hosts = self.inner.hosts.lock();
        hosts.tick += 1;
        let tick = hosts.tick;
        if let Some(state) = hosts.map.get(host) {
            let state = state.clone();
            *state.last_used.lock() = tick;
            return state;
        }
        if hosts.map.len() >= self.inner.config.max_hosts {
            // O(hosts), only when a new host arrives at the cap.
            let oldest = hosts
                .map
                .iter()
                .min_by_key(|(_, s)| *s.last_used.lock())
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                hosts.map.remove(&oldest);
            }
        }
        let state = Arc::new(HostState {
            budget: self
                .inner
                .config
                .budget
                .as_ref()
                .map(|b| Mutex::new(TokenBucket::new(b))),
            breaker: self
                .inner
                .config
                .breaker
                .map(|b| Mutex::new(Breaker::new(b))),
            last_used: Mutex::new(tick),
        });
        hosts.map.insert(host.to_owned(), state.clone());
        state
    }
}

impl PolicyBuilder {
    fn build_unchecked(self) -> Policy {
        let rng = match self.seed {
            Some(seed) => fastrand::Rng::with_seed(seed),
            None => fastrand::Rng::new(),
        };
        Policy {
            inner: Arc::new(Inner {
                config: self.config,
                clock: self.clock.unwrap_or_else(|| Arc::new(TokioClock)),
                rng: Mutex::new(rng),
                hosts: Mutex::new(Hosts::default()),
            }),
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Default)]
struct Hosts {
    map: HashMap<String, Arc<HostState>>,
    tick: u64,
}

/// One host's shared state.
pub(crate) struct HostState {
    pub(crate) budget: Option<Mutex<TokenBucket>>,
    pub(crate) breaker: Option<Mutex<Breaker>>,
    last_used: Mutex<u64>,
}

impl HostState {
    fn snapshot(&self) -> HostSnapshot {
        HostSnapshot {
            budget_tokens: self.budget.as_ref().map(|b| b.lock().tokens()),
            breaker: self.breaker.as_ref().map(|b| b.lock().state()),
        }
    }
}

/// A host's budget and breaker, as seen now.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct HostSnapshot {
    /// Tokens left in the retry budget (`None`: no budget).
    pub budget_tokens: Option<f64>,
    /// The breaker's state (`None`: no breaker).
    pub breaker: Option<State>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(Policy::builder().build().is_ok());
        assert_eq!(Policy::new().max_attempts(), 3);
    }

    #[test]
    fn bad_settings_are_refused() {
        for b in [
            Policy::builder().max_attempts(0),
            Policy::builder().max_attempts(101),
            Policy::builder().base_delay(Duration::from_secs(30)),
            Policy::builder().retry_after_jitter(f64::NAN),
            Policy::builder().max_hosts(0),
            Policy::builder().budget(BudgetConfig::default().retry_cost(-1.0)),
            Policy::builder().breaker(BreakerConfig::default().window(0)),
            Policy::builder().deadline(Duration::MAX),
            Policy::builder().deadline(Duration::ZERO),
            Policy::builder().attempt_timeout(Duration::from_secs(u64::MAX)),
            Policy::builder().max_delay(Duration::MAX),
            Policy::builder().retry_after_cap(Duration::MAX),
            Policy::builder().retry_after_cap(MAX_DURATION + Duration::from_nanos(1)),
            Policy::builder().breaker(BreakerConfig::default().open_for(Duration::MAX)),
            Policy::builder().breaker(BreakerConfig::default().open_for(Duration::ZERO)),
            Policy::builder().key_hosts([""]),
        ] {
            assert!(b.build().is_err());
        }
    }

    #[test]
    fn the_longest_settings_are_accepted() {
        let p = Policy::builder()
            .deadline(MAX_DURATION)
            .attempt_timeout(MAX_DURATION)
            .max_delay(MAX_DURATION)
            .retry_after_cap(MAX_DURATION)
            .breaker(BreakerConfig::default().open_for(MAX_DURATION))
            .build();
        assert!(p.is_ok(), "{p:?}");
    }

    #[test]
    fn key_hosts_match_by_name_or_origin() {
        let all = Policy::new();
        assert!(all.honours_keys("http://anything.test:80"));
        let p = Policy::builder()
            .key_hosts(["IDEMGATE.test", "https://api.test:8443", "[::1]"])
            .build()
            .expect("valid");
        assert!(p.honours_keys("http://idemgate.test:80"));
        assert!(p.honours_keys("https://idemgate.test:443"));
        assert!(p.honours_keys("https://api.test:8443"));
        assert!(!p.honours_keys("http://api.test:80"));
        assert!(p.honours_keys("http://[::1]:8080"));
        assert!(!p.honours_keys("http://shop.test:80"));
        let none = Policy::builder()
            .key_hosts(Vec::<String>::new())
            .build()
            .expect("valid");
        assert!(!none.honours_keys("http://idemgate.test:80"));
    }

    #[test]
    fn host_states_are_bounded_and_shared() {
        let p = Policy::builder().max_hosts(8).build().expect("valid");
        let a = p.host_state("http://a:80");
        for i in 0..10_000 {
            p.host_state(&format!("http://h{i}:80"));
            assert!(p.hosts_tracked() <= 8);
        }
        // "a" was the least recently used: forgotten; a fresh state now.
        let again = p.host_state("http://a:80");
        assert!(!Arc::ptr_eq(&a, &again));
        let same = p.host_state("http://a:80");
        assert!(Arc::ptr_eq(&again, &same));
        assert_eq!(p.hosts_tracked(), 8);
    }
}
