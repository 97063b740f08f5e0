//! The checks, the run loop and what every check shares: building requests, recording what was
//! sent and seen, reading the effect probe, comparing answers.

mod concurrent;
mod expiry;
mod in_flight;
mod lost_response;
mod malformed_key;
mod mismatch;
mod missing_key;
mod precondition;
mod replay;
mod transient;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Method, StatusCode};
use serde::Serialize;

use crate::Error;
use crate::client::{Answer, Client, Req, SendError, Target};
use crate::report::{
    AnswerRecord, CaseResult, Exchange, Outcome, Report, RequestRecord, SHOWN_BODY,
};
use crate::spec::{Defaults, Operation, Spec};
use crate::template::{self, Group, Rng};

/// A check, by its command-line name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckName {
    /// The same request twice with one key: same status, byte-identical body (minus `volatile`),
    /// one effect; the replay marker is reported (required with `strict_marker`).
    Replay,
    /// `concurrency` identical requests at once: one effect, no `5xx`.
    Concurrent,
    /// Same key, different body: `422` (another `4xx` is a warning), no new effect.
    Mismatch,
    /// No key where `key_required`: `400`.
    MissingKey,
    /// The whole request sent, the connection closed before the answer; the retry succeeds, one
    /// effect.
    LostResponse,
    /// A duplicate while `slow_path` runs: `409` with `Retry-After`, or the same final answer; one
    /// effect.
    InFlight,
    /// A 256-byte key, a key with a space, a key with a control character: `400` each.
    MalformedKey,
    /// Optional: after a `5xx` (`transient_path`), the retry runs again.
    Transient,
    /// Optional, with a TTL: after it, the key is new.
    Expiry,
    /// `etag = true` operations: stale `If-Match` → `412` and no effect; current `ETag` → success;
    /// two concurrent updates with one `If-Match` → exactly one wins.
    Precondition,
}

impl CheckName {
    /// Every check, in the order a run takes them.
    pub const ALL: [CheckName; 10] = [
        CheckName::Replay,
        CheckName::Concurrent,
        CheckName::Mismatch,
        CheckName::MissingKey,
        CheckName::LostResponse,
        CheckName::InFlight,
        CheckName::MalformedKey,
        CheckName::Transient,
        CheckName::Expiry,
        CheckName::Precondition,
    ];

    /// The checks a run takes unless told otherwise (transient only when selected, expiry only
    /// with a TTL).
    pub const DEFAULT: [CheckName; 8] = [
        CheckName::Replay,
        CheckName::Concurrent,
        CheckName::Mismatch,
        CheckName::MissingKey,
        CheckName::LostResponse,
        CheckName::InFlight,
        CheckName::MalformedKey,
        CheckName::Precondition,
    ];

    /// The command-line name (`replay`, `missing-key`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            CheckName::Replay => "replay",
            CheckName::Concurrent => "concurrent",
            CheckName::Mismatch => "mismatch",
            CheckName::MissingKey => "missing-key",
            CheckName::LostResponse => "lost-response",
            CheckName::InFlight => "in-flight",
            CheckName::MalformedKey => "malformed-key",
            CheckName::Transient => "transient",
            CheckName::Expiry => "expiry",
            CheckName::Precondition => "precondition",
        }
    }
}

impl fmt::Display for CheckName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CheckName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        CheckName::ALL
            .into_iter()
            .find(|c| c.as_str() == s.trim())
            .ok_or_else(|| Error::Config {
                message: format!(
                    "unknown check {s:?} (known: {})",
                    CheckName::ALL.map(CheckName::as_str).join(", ")
                ),
            })
    }
}

/// How to run the checks: the target and the command line's options.
#[derive(Clone, Debug)]
pub struct Config {
    /// Base URL of the API under test (`http://host:port[/base]`).
    pub target: String,
    /// Requests sent at once by the concurrent check (default 16).
    pub concurrency: usize,
    /// Headers added to every request, probes included (e.g. `Authorization`).
    pub headers: Vec<(String, String)>,
    /// Only these checks (default: [`CheckName::DEFAULT`], plus expiry when `ttl` is set).
    pub only: Option<BTreeSet<CheckName>>,
    /// Seed of keys, UUIDs and bodies (default: from the clock; the report names it).
    pub seed: Option<u64>,
    /// A replay without `Idempotent-Replayed: true` is a violation (default: a warning).
    pub strict_marker: bool,
    /// The target's key TTL, for the expiry check.
    pub ttl: Option<Duration>,
    /// Deadline of one exchange (default 30 s; the in-flight check's slow request must fit).
    pub timeout: Duration,
    /// Longest answer body read (default 1 MiB); longer ones are cut, and a check that must
    /// compare a cut body ends in [`Outcome::Error`] (raise the cap), never in a violation.
    pub body_cap: usize,
    /// How long the lost-response check waits for the probe to show its lost request's effect
    /// before it retries anyway (default 5 s).
    pub settle: Duration,
}

impl Config {
    /// The defaults, for `target`.
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            concurrency: 16,
            headers: Vec::new(),
            only: None,
            seed: None,
            strict_marker: false,
            ttl: None,
            timeout: Duration::from_secs(30),
            body_cap: 1024 * 1024,
            settle: Duration::from_secs(5),
        }
    }

    /// Sets `concurrency`.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Adds a header sent with every request.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Runs only these checks.
    pub fn only(mut self, checks: impl IntoIterator<Item = CheckName>) -> Self {
        self.only = Some(checks.into_iter().collect());
        self
    }

    /// Sets the seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Sets `strict_marker`.
    pub fn strict_marker(mut self, strict: bool) -> Self {
        self.strict_marker = strict;
        self
    }

    /// Sets the TTL (and so selects the expiry check by default).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the deadline of one exchange.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the longest answer body read (`body_cap`).
    pub fn body_cap(mut self, bytes: usize) -> Self {
        self.body_cap = bytes;
        self
    }

    /// The checks this configuration runs, in run order.
    pub fn checks(&self) -> Vec<CheckName> {
        match &self.only {
            Some(only) => CheckName::ALL
                .into_iter()
                .filter(|c| only.contains(c))
                .collect(),
            None => CheckName::ALL
                .into_iter()
                .filter(|c| {
                    CheckName::DEFAULT.contains(c)
                        || (*c == CheckName::Expiry && self.ttl.is_some())
                })
                .collect(),
        }
    }
}

/// What a run reports while it goes (for a progress line).
#[derive(Debug)]
pub enum Progress<'a> {
    /// A check of an operation starts.
    Started {
        /// 1-based position of the case.
        index: usize,
        /// Cases in the run.
        total: usize,
        /// The operation.
        operation: &'a str,
        /// The check.
        check: CheckName,
    },
    /// A case ended.
    Finished {
        /// 1-based position of the case.
        index: usize,
        /// Cases in the run.
        total: usize,
        /// Its result.
        case: &'a CaseResult,
    },
}

/// A validated spec and configuration, ready to run.
#[derive(Debug)]
pub struct Checker {
    spec: Spec,
    config: Config,
    client: Client,
    headers: Vec<(HeaderName, HeaderValue)>,
    checks: Vec<CheckName>,
}

impl Checker {
    /// Validates the spec and the configuration (target URL, headers, concurrency, checks).
    pub fn new(spec: Spec, config: Config) -> Result<Self, Error> {
        spec.validate()?;
        let usage = |m: String| Error::Config { message: m };
        let target = Target::parse(&config.target)?;
        if !(2..=1024).contains(&config.concurrency) {
            return Err(usage(format!(
                "--concurrency {} must be between 2 and 1024",
                config.concurrency
            )));
        }
        let mut headers = Vec::new();
        for (name, value) in &config.headers {
            let n = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| usage(format!("--header: {name:?} is not a header name")))?;
            let v = HeaderValue::from_str(value.trim())
                .map_err(|_| usage(format!("--header {name}: the value is not valid")))?;
            headers.push((n, v));
        }
        let checks = config.checks();
        if checks.is_empty() {
            return Err(usage("--only selects no check".into()));
        }
        if checks.contains(&CheckName::Expiry) && config.ttl.is_none() {
            return Err(usage(
                "the expiry check needs --ttl (the target's key TTL)".into(),
            ));
        }
        if config.timeout.is_zero() {
            return Err(usage("the timeout must be more than zero".into()));
        }
        if config.body_cap == 0 {
            return Err(usage("--body-cap must be more than zero".into()));
        }
        let client = Client {
            target,
            timeout: config.timeout,
            body_cap: config.body_cap,
        };
        Ok(Self {
            spec,
            config,
            client,
            headers,
            checks,
        })
    }

    /// The checks each operation gets, in run order.
    pub fn checks(&self) -> &[CheckName] {
        &self.checks
    }

    /// Runs every check of every operation. `Err` only when nothing could be checked (the
    /// target refuses connections); every other trouble is a case's [`Outcome::Error`].
    pub async fn run(&self) -> Result<Report, Error> {
        self.run_with(|_| {}).await
    }

    /// [`Checker::run`], calling `progress` before and after each case.
    pub async fn run_with(&self, mut progress: impl FnMut(Progress<'_>)) -> Result<Report, Error> {
        let started = Instant::now();
        self.client
            .reachable()
            .await
            .map_err(|e| Error::Unreachable {
                target: self.config.target.clone(),
                message: e.to_string(),
            })?;
        let seed = self.config.seed.unwrap_or_else(clock_seed);
        let mut rng = Rng::new(seed);
        let mut seq = 0;
        let total = self.spec.operations.len() * self.checks.len();
        let mut cases = Vec::with_capacity(total);
        for op in &self.spec.operations {
            for &check in &self.checks {
                let index = cases.len() + 1;
                progress(Progress::Started {
                    index,
                    total,
                    operation: &op.name,
                    check,
                });
                let mut cx = Cx {
                    client: &self.client,
                    defaults: &self.spec.defaults,
                    op,
                    config: &self.config,
                    headers: &self.headers,
                    rng: &mut rng,
                    seq: &mut seq,
                    failures: Vec::new(),
                    warnings: Vec::new(),
                    notes: Vec::new(),
                    exchanges: Vec::new(),
                    repro: Vec::new(),
                };
                let start = Instant::now();
                let result = match &op.skip {
                    Some(reason) => Err(Stop::Skip(reason.clone())),
                    None => run_check(check, &mut cx).await,
                };
                let case = cx.finish(check, result, start.elapsed());
                progress(Progress::Finished {
                    index,
                    total,
                    case: &case,
                });
                cases.push(case);
            }
        }
        Ok(Report {
            target: self.config.target.clone(),
            seed,
            cases,
            elapsed: started.elapsed(),
        })
    }
}

fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    // Fold in the process id so two runs started in the same nanosecond differ.
    let mut rng = Rng::new((nanos as u64) ^ (u64::from(std::process::id()) << 32));
    rng.next_u64() >> 11 // fits a double exactly: JSON readers keep it intact
}

async fn run_check(check: CheckName, cx: &mut Cx<'_>) -> Result<String, Stop> {
    match check {
        CheckName::Replay => replay::run(cx).await,
        CheckName::Concurrent => concurrent::run(cx).await,
        CheckName::Mismatch => mismatch::run(cx).await,
        CheckName::MissingKey => missing_key::run(cx).await,
        CheckName::LostResponse => lost_response::run(cx).await,
        CheckName::InFlight => in_flight::run(cx).await,
        CheckName::MalformedKey => malformed_key::run(cx).await,
        CheckName::Transient => transient::run(cx).await,
        CheckName::Expiry => expiry::run(cx).await,
        CheckName::Precondition => precondition::run(cx).await,
    }
}

/// missing-key and malformed-key first send the operation with a valid key (a group of its
/// own): it must succeed, or a refusal of what follows proves nothing (a server that answers
/// everything `400` or `404` is a setup error, not a pass).
async fn with_a_key_first(cx: &mut Cx<'_>) -> Result<(), Stop> {
    let g = cx.group();
    let req = cx.group_request(&g, Variant::Main, None).await?;
    let answer = cx.send_ok("first (with a valid key)", &req).await?;
    cx.expect_success("first (with a valid key)", &answer)
}

/// How long the total effect count may keep moving before a check gives up on it.
const SETTLE_PROBE_FOR: Duration = Duration::from_secs(5);
/// How far apart two reads of the total effect count must agree.
const SETTLE_PROBE_EVERY: Duration = Duration::from_millis(200);

/// Whether `answer` is a problem saying the request is still in flight (IETF draft, idemgate's
/// `request-in-flight`).
fn in_flight_problem(answer: &Answer) -> bool {
    answer
        .json()
        .and_then(|doc| {
            doc.get("type")
                .and_then(|t| t.as_str())
                .map(|t| t.ends_with("request-in-flight") || t.ends_with("in-flight"))
        })
        .unwrap_or(false)
}

/// Why a check ended without a verdict of its own.
#[derive(Debug)]
pub(crate) enum Stop {
    /// Not applicable, with the reason.
    Skip(String),
    /// Could not be carried out, with the reason.
    Error(String),
}

/// Which path of the operation a request takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Variant {
    Main,
    Slow,
    Transient,
}

/// What a check works with, and what it records.
pub(crate) struct Cx<'a> {
    pub client: &'a Client,
    pub defaults: &'a Defaults,
    pub op: &'a Operation,
    pub config: &'a Config,
    headers: &'a [(HeaderName, HeaderValue)],
    rng: &'a mut Rng,
    seq: &'a mut u64,
    failures: Vec<String>,
    warnings: Vec<String>,
    notes: Vec<String>,
    exchanges: Vec<Exchange>,
    repro: Vec<String>,
}

impl Cx<'_> {
    pub(crate) fn fail(&mut self, message: impl Into<String>) {
        self.failures.push(message.into());
    }

    pub(crate) fn warn(&mut self, message: impl Into<String>) {
        self.warnings.push(message.into());
    }

    pub(crate) fn note(&mut self, message: impl Into<String>) {
        self.notes.push(message.into());
    }

    pub(crate) fn failed(&self) -> bool {
        !self.failures.is_empty()
    }

    /// A fresh attempt group (a new key).
    pub(crate) fn group(&mut self) -> Group {
        *self.seq += 1;
        Group::new(self.rng, *self.seq)
    }

    /// Another rendering under the same key.
    pub(crate) fn sibling(&mut self, g: &Group) -> Group {
        *self.seq += 1;
        g.sibling(self.rng, *self.seq)
    }

    /// The random bits of the run (for keys the checks make up).
    pub(crate) fn random(&mut self) -> u64 {
        self.rng.next_u64()
    }

    pub(crate) fn key_header(&self) -> Result<HeaderName, Stop> {
        HeaderName::from_bytes(self.op.key_header(self.defaults).as_bytes())
            .map_err(|_| Stop::Error("invalid key header".into()))
    }

    fn method(&self) -> Result<Method, Stop> {
        Method::from_bytes(self.op.method.as_bytes())
            .map_err(|_| Stop::Error(format!("invalid method {:?}", self.op.method)))
    }

    /// The operation's request for group `g` (path `variant`, body `body` or the operation's),
    /// with defaults, operation and command-line headers and the key; no `If-Match` yet.
    pub(crate) fn request(
        &self,
        g: &Group,
        variant: Variant,
        body: Option<&str>,
    ) -> Result<Req, Stop> {
        let path = match variant {
            Variant::Main => &self.op.path,
            Variant::Slow => self.op.slow_path.as_ref().unwrap_or(&self.op.path),
            Variant::Transient => self.op.transient_path.as_ref().unwrap_or(&self.op.path),
        };
        let body = body.or(self.op.body.as_deref()).unwrap_or("");
        let mut req = Req {
            method: self.method()?,
            path: template::render(path, g),
            headers: Vec::new(),
            body: Bytes::from(template::render(body, g)),
        };
        for (name, value) in self.defaults.headers.iter().chain(&self.op.headers) {
            let (n, v) = header(name, &template::render(value, g))?;
            req.set_header(n, v);
        }
        for (n, v) in self.headers {
            req.set_header(n.clone(), v.clone());
        }
        let key = HeaderValue::from_str(&g.key)
            .map_err(|_| Stop::Error(format!("key {:?} is not a header value", g.key)))?;
        req.set_header(self.key_header()?, key);
        Ok(req)
    }

    /// [`Cx::request`] plus, for an `etag` operation, `If-Match` with the resource's current
    /// `ETag` (read now): the group's requests all carry the same one.
    pub(crate) async fn group_request(
        &mut self,
        g: &Group,
        variant: Variant,
        body: Option<&str>,
    ) -> Result<Req, Stop> {
        let mut req = self.request(g, variant, body)?;
        if self.op.etag {
            let (etag, _) = self.read_etag(g).await?;
            req.set_header(http::header::IF_MATCH, etag);
        }
        Ok(req)
    }

    /// A bodiless request of group `g` that reads (the effect probe, the `ETag`): the
    /// `[defaults]` headers but `content-type` (values rendered for `g`), then the command
    /// line's; no key.
    fn read_request(&self, method: Method, path: &str, g: &Group) -> Result<Req, Stop> {
        let mut req = Req {
            method,
            path: template::render(path, g),
            headers: Vec::new(),
            body: Bytes::new(),
        };
        for (name, value) in &self.defaults.headers {
            let (n, v) = header(name, &template::render(value, g))?;
            if n != http::header::CONTENT_TYPE {
                req.set_header(n, v);
            }
        }
        for (n, v) in self.headers {
            req.set_header(n.clone(), v.clone());
        }
        Ok(req)
    }

    /// `GET read_path`: the resource's current `ETag` and the answer.
    pub(crate) async fn read_etag(&mut self, g: &Group) -> Result<(HeaderValue, Answer), Stop> {
        let path = self.op.read_path.as_ref().unwrap_or(&self.op.path);
        let req = self.read_request(Method::GET, path, g)?;
        let answer = self.send_quiet("read ETag", &req).await?;
        if !answer.status.is_success() {
            return Err(Stop::Error(format!(
                "GET {} (the resource's ETag) was answered {}",
                req.path, answer.status
            )));
        }
        let etag = answer
            .headers
            .get(http::header::ETAG)
            .cloned()
            .ok_or_else(|| {
                Stop::Error(format!(
                    "GET {} has no ETag header (etag = true needs one)",
                    req.path
                ))
            })?;
        Ok((etag, answer))
    }

    fn record(
        &self,
        label: &str,
        req: &Req,
        answer: Option<&Answer>,
        error: Option<&SendError>,
    ) -> Exchange {
        Exchange {
            label: label.to_owned(),
            request: RequestRecord {
                method: req.method.to_string(),
                url: self.client.target.url(&req.path),
                headers: req
                    .headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), shown_header(n, v)))
                    .collect(),
                body: shown_body(&req.body),
            },
            answer: answer.map(|a| AnswerRecord {
                status: a.status.as_u16(),
                headers: a
                    .headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), shown_header(n, v)))
                    .collect(),
                body: shown_body(&a.body),
                body_bytes: a.body.len(),
                truncated: a.truncated,
                elapsed_ms: u64::try_from(a.elapsed.as_millis()).unwrap_or(u64::MAX),
            }),
            error: error.map(ToString::to_string),
        }
    }

    /// Sends `req`, records it and its answer, and adds it to the reproducer.
    pub(crate) async fn send(&mut self, label: &str, req: &Req) -> Result<Answer, SendError> {
        self.repro.push(curl(self.client, req));
        self.exchange(label, req).await
    }

    async fn exchange(&mut self, label: &str, req: &Req) -> Result<Answer, SendError> {
        let result = self.client.send(req).await;
        let exchange = self.record(label, req, result.as_ref().ok(), result.as_ref().err());
        self.exchanges.push(exchange);
        result
    }

    /// Sends and records, without a reproducer line (probes, ETag reads); a transport error
    /// stops the check.
    async fn send_quiet(&mut self, label: &str, req: &Req) -> Result<Answer, Stop> {
        self.exchange(label, req)
            .await
            .map_err(|e| Stop::Error(format!("{label}: {e}")))
    }

    /// [`Cx::send`]; a transport error stops the check (nothing can be concluded).
    pub(crate) async fn send_ok(&mut self, label: &str, req: &Req) -> Result<Answer, Stop> {
        self.send(label, req)
            .await
            .map_err(|e| Stop::Error(format!("{label}: {e}")))
    }

    /// The first answer of a group must be a success, or the check has nothing to work on.
    pub(crate) fn expect_success(&self, label: &str, answer: &Answer) -> Result<(), Stop> {
        if answer.status.is_success() {
            return Ok(());
        }
        Err(Stop::Error(format!(
            "the {label} request was answered {}, not 2xx: the check needs an operation that succeeds (check its path, body and headers) {}",
            answer.status,
            preview(&answer.body)
        )))
    }

    /// Every request on its own connection, written back to back.
    pub(crate) async fn burst(
        &mut self,
        label: &str,
        reqs: &[Req],
    ) -> Vec<Result<Answer, SendError>> {
        let first = reqs.first().map(|r| curl(self.client, r));
        let alike = reqs.windows(2).all(|w| same_request(&w[0], &w[1]));
        match first {
            Some(line) if alike => self.repro.push(format!(
                "for i in $(seq {}); do {line} >/dev/null & done; wait",
                reqs.len()
            )),
            _ => {
                for r in reqs {
                    let line = curl(self.client, r);
                    self.repro.push(format!("{line} &"));
                }
                self.repro.push("wait".into());
            }
        }
        let answers = self.client.burst(reqs).await;
        for (i, (req, a)) in reqs.iter().zip(&answers).enumerate() {
            let exchange = self.record(
                &format!("{label} {}/{}", i + 1, reqs.len()),
                req,
                a.as_ref().ok(),
                a.as_ref().err(),
            );
            self.exchanges.push(exchange);
        }
        answers
    }

    /// Writes the whole request and closes the connection before reading anything.
    pub(crate) async fn send_and_close(&mut self, label: &str, req: &Req) -> Result<(), Stop> {
        self.repro.push(lost(self.client, req));
        let result = self.client.send_and_close(req).await;
        let exchange = self.record(label, req, None, result.as_ref().err());
        self.exchanges.push(exchange);
        result.map_err(|e| Stop::Error(format!("{label}: {e}")))
    }

    /// Retries `req` while the answer is `409` (honouring `Retry-After`, at most 1 s a wait),
    /// within the exchange deadline; the last answer.
    pub(crate) async fn settle(
        &mut self,
        label: &str,
        req: &Req,
        mut answer: Answer,
    ) -> Result<Answer, Stop> {
        let deadline = Instant::now() + self.config.timeout;
        // Only a 409 that says "in progress, come back" is waited out (`Retry-After`, or the
        // problem type of a request in flight); any other 409 is the answer.
        while answer.status == StatusCode::CONFLICT
            && (retry_after(&answer).is_some() || in_flight_problem(&answer))
            && Instant::now() < deadline
        {
            let wait = retry_after(&answer)
                .unwrap_or(Duration::from_millis(100))
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            tokio::time::sleep(wait).await;
            answer = self.send_ok(label, req).await?;
        }
        Ok(answer)
    }

    /// The effect count of group `g` from the probe, or `None` without a probe.
    pub(crate) async fn count(&mut self, g: &Group) -> Result<Option<u64>, Stop> {
        let Some(probe) = &self.op.effect_probe else {
            return Ok(None);
        };
        let method = Method::from_bytes(probe.method.as_bytes())
            .map_err(|_| Stop::Error("invalid probe method".into()))?;
        let pointer = template::render(&probe.pointer, g);
        let req = self.read_request(method, &probe.path, g)?;
        let answer = self.send_quiet("probe", &req).await?;
        if !answer.status.is_success() {
            return Err(Stop::Error(format!(
                "the effect probe {} {} was answered {}",
                req.method, req.path, answer.status
            )));
        }
        let doc = answer.json().ok_or_else(|| {
            Stop::Error(format!(
                "the effect probe {} answered no JSON: {}",
                req.path,
                preview(&answer.body)
            ))
        })?;
        match doc.pointer(&pointer) {
            None | Some(serde_json::Value::Null) => Ok(Some(0)),
            Some(v) => v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .map(Some)
                .ok_or_else(|| {
                    Stop::Error(format!("the effect probe's {pointer} is {v}, not a count"))
                }),
        }
    }

    /// Whether the probe counts per key (`{{key}}` in its path or pointer).
    pub(crate) fn probe_per_key(&self) -> bool {
        self.op
            .effect_probe
            .as_ref()
            .is_some_and(|p| p.path.contains("{{key}}") || p.pointer.contains("{{key}}"))
    }

    /// The probe's count when it counts in total (no `{{key}}`): the only count a request
    /// without a valid key can move. `None` without a probe, or with a per-key one (noted).
    pub(crate) async fn total_count(&mut self, g: &Group) -> Result<Option<u64>, Stop> {
        if self.probe_per_key() {
            self.note("the effect probe counts per key: it cannot see whether a request without a valid key ran");
            return Ok(None);
        }
        // An earlier request's effect (the valid-key request sent just before, or a check's
        // abandoned one) may show late on an API that applies effects asynchronously: wait
        // until two reads agree, so that it is not blamed on the requests that follow.
        let deadline = Instant::now() + SETTLE_PROBE_FOR;
        let mut last = self.count(g).await?;
        if last.is_none() {
            return Ok(None);
        }
        loop {
            tokio::time::sleep(SETTLE_PROBE_EVERY).await;
            let now = self.count(g).await?;
            if now == last {
                return Ok(now);
            }
            if Instant::now() >= deadline {
                return Err(Stop::Error(format!(
                    "the effect probe's total count kept moving for {SETTLE_PROBE_FOR:?} \
                     (other traffic on the target?): a refused request's effect cannot be told"
                )));
            }
            last = now;
        }
    }

    /// Effects of group `g` since `before` (`None` without a probe).
    pub(crate) async fn effects_since(
        &mut self,
        g: &Group,
        before: Option<u64>,
    ) -> Result<Option<u64>, Stop> {
        let (Some(before), Some(after)) = (before, self.count(g).await?) else {
            return Ok(None);
        };
        if after < before {
            return Err(Stop::Error(format!(
                "the effect probe went down ({before} -> {after}): it does not count effects"
            )));
        }
        Ok(Some(after - before))
    }

    /// The answer's identity (the `identity` pointer), if the spec has one.
    pub(crate) fn identity(&self, answer: &Answer) -> Option<serde_json::Value> {
        let pointer = self.op.identity.as_ref()?;
        answer.json()?.pointer(pointer).cloned()
    }

    /// A body cut at the cap cannot be compared: the check stops (an error, not a violation).
    fn comparable(&self, a: &Answer, b: &Answer) -> Result<(), Stop> {
        if a.truncated || b.truncated {
            return Err(Stop::Error(format!(
                "an answer body is longer than the cap of {} bytes and cannot be compared (raise --body-cap)",
                self.config.body_cap
            )));
        }
        Ok(())
    }

    /// `Ok(Ok)` when `a` and `b` have the same body, byte for byte or (with `volatile`
    /// pointers) once those are removed from both JSON documents; `Ok(Err)` with what differs;
    /// `Err` when a body was cut at the cap.
    pub(crate) fn same_body(&self, a: &Answer, b: &Answer) -> Result<Result<(), String>, Stop> {
        self.comparable(a, b)?;
        Ok(self.body_diff(a, b))
    }

    fn body_diff(&self, a: &Answer, b: &Answer) -> Result<(), String> {
        if a.body == b.body {
            return Ok(());
        }
        if !self.op.volatile.is_empty()
            && let (Some(mut x), Some(mut y)) = (a.json(), b.json())
        {
            for p in &self.op.volatile {
                remove_pointer(&mut x, p);
                remove_pointer(&mut y, p);
            }
            if x == y {
                return Ok(());
            }
        }
        Err(format!(
            "bodies differ: {} vs {}",
            preview(&a.body),
            preview(&b.body)
        ))
    }

    /// Whether `b` shows the same outcome as `a` for the non-replay checks: same status and the
    /// same identity (with an `identity` pointer), or the same body (without one). `Err` when
    /// a body that must be read was cut at the cap.
    pub(crate) fn same_outcome(&self, a: &Answer, b: &Answer) -> Result<Result<(), String>, Stop> {
        if a.status != b.status {
            return Ok(Err(format!("status {} vs {}", a.status, b.status)));
        }
        self.comparable(a, b)?;
        if self.op.identity.is_some() {
            let (x, y) = (self.identity(a), self.identity(b));
            return Ok(if x.is_some() && x == y {
                Ok(())
            } else {
                Err(format!("identity {} vs {}", show(&x), show(&y)))
            });
        }
        Ok(self.body_diff(a, b))
    }

    /// Whether the retry `b` of `a` ran again (expiry): from `delta`, the effects
    /// the probe counted across the retry alone, when there is a probe; else the replay marker,
    /// the identity, the body.
    pub(crate) fn ran_again(&self, delta: Option<u64>, a: &Answer, b: &Answer) -> Ran {
        if let Some(d) = delta {
            return if d >= 1 { Ran::Yes } else { Ran::No };
        }
        if b.replayed() {
            return Ran::No;
        }
        if self.op.identity.is_some() {
            let (x, y) = (self.identity(a), self.identity(b));
            if x.is_some() && y.is_some() {
                return if x == y { Ran::No } else { Ran::Yes };
            }
        }
        if a.body != b.body {
            return Ran::Yes;
        }
        Ran::Unknown
    }

    fn finish(
        self,
        check: CheckName,
        result: Result<String, Stop>,
        elapsed: Duration,
    ) -> CaseResult {
        let (outcome, message) = match result {
            _ if !self.failures.is_empty() => (Outcome::Failed, self.failures[0].clone()),
            Ok(message) => (Outcome::Passed, message),
            Err(Stop::Skip(reason)) => (Outcome::Skipped, reason),
            Err(Stop::Error(reason)) => (Outcome::Error, reason),
        };
        let reproducer = (!self.repro.is_empty()).then(|| self.repro.join("\n"));
        CaseResult {
            operation: self.op.name.clone(),
            check,
            outcome,
            message,
            failures: self.failures,
            warnings: self.warnings,
            notes: self.notes,
            reproducer,
            exchanges: self.exchanges,
            elapsed,
        }
    }
}

/// Whether a retry ran again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ran {
    Yes,
    No,
    Unknown,
}

fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), Stop> {
    let n = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| Stop::Error(format!("invalid header name {name:?}")))?;
    let v = HeaderValue::from_str(value)
        .map_err(|_| Stop::Error(format!("invalid value of header {name}")))?;
    Ok((n, v))
}

fn same_request(a: &Req, b: &Req) -> bool {
    a.method == b.method && a.path == b.path && a.headers == b.headers && a.body == b.body
}

pub(crate) fn retry_after(answer: &Answer) -> Option<Duration> {
    answer
        .header("retry-after")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// The start of a body for a message, on one line: control characters (a terminal's escape
/// sequences among them) become spaces, as in the report's own previews.
pub(crate) fn preview(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut s: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > 200 {
        s.push('…');
    }
    format!("`{s}`")
}

pub(crate) fn show(v: &Option<serde_json::Value>) -> String {
    v.as_ref()
        .map_or_else(|| "(none)".to_owned(), ToString::to_string)
}

fn remove_pointer(doc: &mut serde_json::Value, pointer: &str) {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    match doc.pointer_mut(parent) {
        Some(serde_json::Value::Object(map)) => {
            map.remove(&last);
        }
        Some(serde_json::Value::Array(items)) => {
            if let Ok(i) = last.parse::<usize>()
                && i < items.len()
            {
                items[i] = serde_json::Value::Null;
            }
        }
        _ => {}
    }
}

/// Header names whose values never appear in reports (credentials).
fn secret(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie"
    ) || n.contains("api-key")
        || n.contains("apikey")
        || n.contains("token")
        || n.contains("secret")
}

fn shown_header(name: &HeaderName, value: &HeaderValue) -> String {
    if secret(name) {
        return "<redacted>".to_owned();
    }
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

fn shown_body(body: &[u8]) -> String {
    let cut = &body[..body.len().min(SHOWN_BODY)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Single-quotes `s` for a POSIX shell.
fn sh(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The request as a curl command line (credential headers redacted).
fn curl(client: &Client, req: &Req) -> String {
    let mut line = format!(
        "curl -si -X {} {}",
        req.method,
        sh(&client.target.url(&req.path))
    );
    for (n, v) in &req.headers {
        line.push_str(&format!(
            " -H {}",
            sh(&format!("{n}: {}", shown_header(n, v)))
        ));
    }
    if !req.body.is_empty() {
        line.push_str(&format!(
            " --data-binary {}",
            sh(&String::from_utf8_lossy(&req.body))
        ));
    }
    line
}

/// The request sent with bash's `/dev/tcp`, the connection closed before the answer.
fn lost(client: &Client, req: &Req) -> String {
    let raw = client.raw(req);
    let head_end = raw.len() - req.body.len();
    let escape = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .replace('\\', r"\\")
            .replace('%', "%%")
            .replace('\r', r"\r")
            .replace('\n', r"\n")
    };
    let mut head = escape(&raw[..head_end]);
    for (n, v) in &req.headers {
        if secret(n) {
            head = head.replace(&escape(v.as_bytes()), "<redacted>");
        }
    }
    let host = client
        .target
        .authority
        .rsplit_once(':')
        .map_or((client.target.authority.as_str(), "80"), |(h, p)| (h, p));
    format!(
        "# the whole request is written, then the connection is closed before the answer:\nbash -c 'exec 3<>/dev/tcp/{}/{}; printf \"$0\" \"$1\" >&3; exec 3>&-' {} {}",
        host.0.trim_matches(['[', ']']),
        host.1,
        sh(&format!("{head}%s")),
        sh(&String::from_utf8_lossy(&req.body))
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn check_names_round_trip() {
        for c in CheckName::ALL {
            assert_eq!(c.as_str().parse::<CheckName>().unwrap(), c);
        }
        assert!("replays".parse::<CheckName>().is_err());
    }

    #[test]
    fn default_selection_adds_expiry_only_with_a_ttl() {
        let c = Config::new("http://x");
        assert_eq!(c.checks(), CheckName::DEFAULT.to_vec());
        let with_ttl = c.clone().ttl(Duration::from_secs(1)).checks();
        assert!(with_ttl.contains(&CheckName::Expiry));
        assert!(!with_ttl.contains(&CheckName::Transient));
        assert_eq!(
            c.only([CheckName::Transient, CheckName::Replay]).checks(),
            vec![CheckName::Replay, CheckName::Transient]
        );
    }

    #[test]
    fn volatile_pointers_are_removed() {
        let mut doc = serde_json::json!({"a": 1, "b": {"c/d": 2}, "l": [1, 2]});
        remove_pointer(&mut doc, "/b/c~1d");
        remove_pointer(&mut doc, "/l/1");
        remove_pointer(&mut doc, "/missing/x");
        assert_eq!(doc, serde_json::json!({"a": 1, "b": {}, "l": [1, null]}));
    }

    #[test]
    fn reproducers_quote_and_redact() {
        let client = Client {
            target: Target::parse("http://127.0.0.1:8080").unwrap(),
            timeout: Duration::from_secs(1),
            body_cap: 10,
        };
        let req = Req {
            method: Method::POST,
            path: "/o".into(),
            headers: vec![
                (
                    HeaderName::from_static("authorization"),
                    HeaderValue::from_static("Bearer s3cret"),
                ),
                (
                    HeaderName::from_static("idempotency-key"),
                    HeaderValue::from_static("k"),
                ),
            ],
            body: Bytes::from_static(b"{\"a\":\"it's\"}"),
        };
        let line = curl(&client, &req);
        assert_eq!(
            line,
            r#"curl -si -X POST 'http://127.0.0.1:8080/o' -H 'authorization: <redacted>' -H 'idempotency-key: k' --data-binary '{"a":"it'\''s"}'"#
        );
        let script = lost(&client, &req);
        assert!(script.contains("/dev/tcp/127.0.0.1/8080"));
        assert!(!script.contains("s3cret"));
        assert!(script.contains(r"connection: close\r\n\r\n%s"));
    }
}
