//! The checker: reads the three logs of a run (the operations the clients ran, every attempt
//! and its answer, every execution the upstream logged) and the fault log, and checks every
//! scoped key against the invariants of RELIABILITY.md.
//!
//! **Violations** (a run with any fails):
//!
//! | kind | rule |
//! | --- | --- |
//! | `duplicate_effect` (I1) | more than one effectful execution of a `(scope, key)` at one epoch; in strict mode, more than one at all |
//! | `missing_epoch` (I1) | an execution without `Idempotency-Epoch` (a protected request must carry it) |
//! | `unknown_execution` (I1) | an execution of a `(scope, key)` no client ever sent |
//! | `no_such_execution` (I2) | an answer with the upstream's body whose execution was never logged (a `2xx` for a key with no execution) |
//! | `not_byte_identical` (I2) | an answer whose status or body differs from the execution it names |
//! | `replay_differs` (I2) | a replay that differs from the first stored-status answer delivered for the key |
//! | `cross_scope` (I6) | an answer carrying another scope's (or key's) execution |
//! | `secret_replayed` (G6) | a replay carrying `Set-Cookie` |
//! | `outside_g2` (I3) | an answer that is not one of the G2 answers for this workload (which never sends a bad key, a large body or a changed request: `400`, `413`, `422` count here), or a `409`/`503` without `Retry-After` |
//! | `reexecuted_after_answer` (I4) | an effectful execution that arrived after a client had already been given that key's stored outcome |
//! | `stuck` (I5) | the end-of-run probe, sent once every fault was healed and a lease had passed, got `409` |
//!
//! **Anomalies** are counted, not failed: two different fresh answers for one key (takeover mode:
//! a paused or partitioned holder delivered its own answer after another instance took over),
//! a `502` outcome-unknown after a success had been delivered, a replay after an
//! outcome-unknown, (takeover mode) a takeover that ran the key after a holder that had lost
//! its lease answered outcome-unknown for its own exchange, and (strict mode) the key's single
//! effect dispatched only after another instance had declared it outcome-unknown (its holder
//! was paused between claim and dispatch), and (takeover mode) an execution of an earlier epoch
//! than one the upstream had already received, arriving after the key's outcome was delivered:
//! a dispatch sent before the takeover and delivered late, which `Idempotency-Epoch` lets the
//! upstream refuse (`stale_epoch_arrived_late`; only where a kill, pause, drain or upstream link
//! fault of the sending instance explains the delay, else it is `reexecuted_after_answer`).

use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::client::{Attempt, Class, Op};
use crate::faults::{Action, FaultRecord, LinkFault};
use crate::upstream::Execution;

/// What the checker needs to know about the run's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckParams {
    /// `--recovery strict`: at most one execution per key.
    pub strict: bool,
    /// The lease.
    pub lease: Duration,
    /// The clients' largest backoff.
    pub client_backoff_cap: Duration,
}

/// One broken invariant, on one key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Violation {
    /// Which rule (see the module docs).
    pub kind: String,
    /// The operation.
    pub op: u64,
    /// Its scope.
    pub scope: String,
    /// Its key.
    pub key: String,
    /// What was seen.
    pub detail: String,
}

/// Latency figures of one class of answers.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    /// How many.
    pub count: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Largest, ms.
    pub max_ms: f64,
}

impl Latency {
    fn of(mut micros: Vec<u64>) -> Self {
        if micros.is_empty() {
            return Self::default();
        }
        micros.sort_unstable();
        let pick = |q: f64| {
            let i = ((micros.len() as f64 * q).ceil() as usize).clamp(1, micros.len()) - 1;
            micros[i] as f64 / 1000.0
        };
        Self {
            count: micros.len() as u64,
            p50_ms: pick(0.50),
            p99_ms: pick(0.99),
            max_ms: micros[micros.len() - 1] as f64 / 1000.0,
        }
    }
}

/// Orphaned keys: keys whose holder was SIGKILLed (or drained) mid-request, and how long until
/// another instance resolved them (took over, or said outcome-unknown).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Orphans {
    /// Keys with an attempt in flight on an instance when it was killed, resolved (a new
    /// execution, or an outcome-unknown answer) by an attempt that was already waiting when the
    /// lease could run out.
    pub resolved: u64,
    /// Time from the kill to that resolution.
    pub age: Latency,
    /// The goal they are compared with: lease + 1 s.
    pub bound_ms: f64,
    /// How many took longer than the bound.
    pub over_bound: u64,
    /// Orphans whose next attempt arrived only after the lease could have run out (free by
    /// then; not timed).
    pub resolved_on_arrival: u64,
    /// The timed orphans whose whole wait (kill to resolution) overlapped no other fault: no
    /// paused or draining instance, no store or upstream link fault, no store kill. Their age
    /// measures I5 itself; the others are bounded by the fault they overlapped as well.
    #[serde(default)]
    pub clean: Latency,
    /// How many clean orphans took longer than the bound.
    #[serde(default)]
    pub clean_over_bound: u64,
}

/// The figures and findings of one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// The run's name.
    pub name: String,
    /// The store URL kind (`file`, `redis`, `postgres`).
    pub store: String,
    /// `takeover` or `strict`.
    pub recovery: String,
    /// Instances behind the clients.
    pub instances: u32,
    /// The seed.
    pub seed: u64,
    /// The binary that ran.
    pub binary: String,
    /// Logical operations.
    pub ops: u64,
    /// Keyed requests sent (attempts, probes included).
    pub requests: u64,
    /// Of which end-of-run probes.
    pub probes: u64,
    /// Seconds from the first request to the last answer of the workload (probes excluded).
    pub duration_s: f64,
    /// Requests per second over that time.
    pub throughput_rps: f64,
    /// Faults applied, by kind.
    pub faults: BTreeMap<String, u64>,
    /// Executions the upstream logged, effectful or not.
    pub executions: u64,
    /// Effectful executions.
    pub effects: u64,
    /// Effectful executions at an epoch above 1 (takeovers that ran the request again).
    pub redispatches: u64,
    /// Keys with more than one effectful execution (allowed in takeover mode at distinct
    /// epochs).
    pub keys_executed_twice_or_more: u64,
    /// Answers by class, with latency (all attempts, probes included).
    pub answers: BTreeMap<String, Latency>,
    /// How each operation ended for its client(s): `success`, `outcome_unknown`, `gave_up`, ...
    pub op_outcomes: BTreeMap<String, u64>,
    /// Operations whose fate a client could not learn: ended outcome-unknown or gave up.
    pub outcome_unknown_ops: u64,
    /// ... of which the upstream did apply the effect.
    pub outcome_unknown_ops_applied: u64,
    /// Operations asked to fail after their effect (close, reset, truncate), by how they ended
    /// for their clients (`success` here would be a post-write failure reported as success).
    pub post_write_failures: BTreeMap<String, u64>,
    /// Probe answers by class.
    pub probe_answers: BTreeMap<String, u64>,
    /// Keys still in flight (`409`) at the probe.
    pub stuck_keys: u64,
    /// Replays checked against the first delivered answer.
    pub replays_checked: u64,
    /// Fresh stored-status answers checked byte for byte.
    pub fresh_answers_checked: u64,
    /// Proxy overhead of fresh answers: client latency minus the upstream's own time.
    pub overhead_executed: Latency,
    /// Orphaned keys.
    pub orphans: Orphans,
    /// I7: instance RSS and descriptors, store bytes (filled by the run, not the checker).
    #[serde(default)]
    pub resources: crate::resources::Resources,
    /// Counted anomalies (see the module docs).
    pub anomalies: BTreeMap<String, u64>,
    /// The whole history of up to 3 keys of each anomaly.
    pub anomaly_histories: Vec<String>,
    /// Violations, by kind.
    pub violation_counts: BTreeMap<String, u64>,
    /// Every violation.
    pub violations: Vec<Violation>,
    /// The whole history of the first violating keys (at most 20).
    pub histories: Vec<String>,
}

impl Report {
    /// Whether the run broke no invariant.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Reads the body's `exec` member (the upstream puts its execution id there).
fn exec_id(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()?
        .get("exec")?
        .as_u64()
}

/// Checks a run. `faults` are what the injector did; `probes` are marked in `attempts`.
pub fn check(
    params: &CheckParams,
    ops: &[Op],
    attempts: &[Attempt],
    executions: &[Execution],
    faults: &[FaultRecord],
) -> Report {
    let mut r = Report::default();
    let by_id: HashMap<u64, &Op> = ops.iter().map(|o| (o.id, o)).collect();
    let by_key: HashMap<(&str, &str), u64> = ops
        .iter()
        .map(|o| ((o.scope.as_str(), o.key.as_str()), o.id))
        .collect();
    let exec_by_id: HashMap<u64, &Execution> = executions.iter().map(|e| (e.id, e)).collect();
    let mut execs_of: HashMap<u64, Vec<&Execution>> = HashMap::new();
    let mut violations: Vec<Violation> = Vec::new();
    let mut flag = |kind: &str, op: &Op, detail: String| {
        violations.push(Violation {
            kind: kind.to_owned(),
            op: op.id,
            scope: op.scope.clone(),
            key: op.key.clone(),
            detail,
        });
    };
    let mut stray = Vec::new();
    for e in executions {
        match by_key.get(&(e.scope.as_str(), e.key.as_str())) {
            Some(id) => execs_of.entry(*id).or_default().push(e),
            None => stray.push(e),
        }
    }
    let mut attempts_of: HashMap<u64, Vec<&Attempt>> = HashMap::new();
    for a in attempts {
        attempts_of.entry(a.op).or_default().push(a);
    }
    let mut anomalies: BTreeMap<String, u64> = BTreeMap::new();
    let mut anomaly_ops: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut anomaly = |kind: &str, op: u64| {
        *anomalies.entry(kind.to_owned()).or_default() += 1;
        let ops = anomaly_ops.entry(kind.to_owned()).or_default();
        if ops.len() < 3 {
            ops.push(op);
        }
    };
    let mut overhead = Vec::new();
    let mut by_class: BTreeMap<String, Vec<u64>> = BTreeMap::new();

    for op in ops {
        let mut execs = execs_of.remove(&op.id).unwrap_or_default();
        execs.sort_by_key(|e| e.received_us);
        let mut tries = attempts_of.remove(&op.id).unwrap_or_default();
        tries.sort_by_key(|a| (a.start_us, a.id));

        // I1: effects per epoch (strict: per key).
        let effectful: Vec<&&Execution> = execs.iter().filter(|e| e.effect).collect();
        let mut per_epoch: BTreeMap<u64, u64> = BTreeMap::new();
        for e in &effectful {
            *per_epoch.entry(e.epoch).or_default() += 1;
            if e.epoch == 0 {
                flag(
                    "missing_epoch",
                    op,
                    format!("execution {} has no Idempotency-Epoch", e.id),
                );
            }
        }
        for (epoch, n) in &per_epoch {
            if *n > 1 {
                let at: Vec<&&&Execution> =
                    effectful.iter().filter(|e| e.epoch == *epoch).collect();
                let (lo, hi) = (at[0].received_us, at[at.len() - 1].received_us);
                // Was the key released in between (which starts the epochs again at 1)?
                let releases: Vec<String> = tries
                    .iter()
                    .filter(|a| {
                        matches!(a.class, Class::UpstreamUnavailable | Class::Transient)
                            && a.end_us > lo
                            && a.end_us < hi
                    })
                    .map(|a| format!("{} to attempt {}", a.class.as_str(), a.id))
                    .collect();
                flag(
                    "duplicate_effect",
                    op,
                    format!(
                        "{n} effectful executions at epoch {epoch} (executions {:?}){}",
                        at.iter().map(|e| e.id).collect::<Vec<_>>(),
                        if releases.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; the key was released in between ({})",
                                releases.join(", ")
                            )
                        }
                    ),
                );
            }
        }
        if params.strict && effectful.len() > 1 {
            flag(
                "duplicate_effect",
                op,
                format!(
                    "strict mode: {} effectful executions (epochs {:?})",
                    effectful.len(),
                    effectful.iter().map(|e| e.epoch).collect::<Vec<_>>()
                ),
            );
        }
        r.effects += effectful.len() as u64;
        r.redispatches += effectful.iter().filter(|e| e.epoch > 1).count() as u64;
        if effectful.len() > 1 {
            r.keys_executed_twice_or_more += 1;
        }

        // Answers: G2 list, bytes, scope.
        let mut first_stored: Option<&Attempt> = None;
        let mut first_success_end: Option<u64> = None;
        let mut first_unknown_end: Option<u64> = None;
        let mut fresh_bodies: Vec<&[u8]> = Vec::new();
        for a in &tries {
            by_class
                .entry(a.class.as_str().to_owned())
                .or_default()
                .push(a.end_us.saturating_sub(a.start_us));
            let Some(ans) = &a.answer else { continue };
            match a.class {
                Class::Executed | Class::Replayed | Class::Transient => {
                    let named = exec_id(&ans.body).and_then(|id| exec_by_id.get(&id));
                    let Some(e) = named else {
                        flag(
                            "no_such_execution",
                            op,
                            format!(
                                "attempt {}: {} {} names no logged execution",
                                a.id,
                                ans.status,
                                String::from_utf8_lossy(&ans.body)
                            ),
                        );
                        continue;
                    };
                    if e.scope != op.scope || e.key != op.key {
                        flag(
                            "cross_scope",
                            op,
                            format!(
                                "attempt {} got execution {} of scope {:?} key {:?}",
                                a.id, e.id, e.scope, e.key
                            ),
                        );
                        continue;
                    }
                    if e.status != ans.status || e.body != ans.body {
                        flag(
                            "not_byte_identical",
                            op,
                            format!(
                                "attempt {}: got {} {:?}, execution {} was {} {:?}",
                                a.id,
                                ans.status,
                                String::from_utf8_lossy(&ans.body),
                                e.id,
                                e.status,
                                String::from_utf8_lossy(&e.body)
                            ),
                        );
                        continue;
                    }
                    if a.class == Class::Transient {
                        continue;
                    }
                    if !e.effect {
                        flag(
                            "not_byte_identical",
                            op,
                            format!(
                                "attempt {}: a transient answer (execution {}) came back as {}",
                                a.id,
                                e.id,
                                a.class.as_str()
                            ),
                        );
                    }
                    if first_stored.is_none_or(|f| a.end_us < f.end_us) {
                        first_stored = Some(a);
                    }
                    first_success_end =
                        Some(first_success_end.map_or(a.end_us, |t| t.min(a.end_us)));
                    if a.class == Class::Executed {
                        r.fresh_answers_checked += 1;
                        if !fresh_bodies.contains(&&ans.body[..]) {
                            fresh_bodies.push(&ans.body);
                        }
                        let upstream_us = e.logged_us.saturating_sub(e.received_us);
                        overhead.push(
                            a.end_us
                                .saturating_sub(a.start_us)
                                .saturating_sub(upstream_us),
                        );
                    } else if ans.set_cookie {
                        flag(
                            "secret_replayed",
                            op,
                            format!("attempt {}: a replay carried Set-Cookie", a.id),
                        );
                    }
                }
                Class::Conflict
                | Class::StoreUnavailable
                | Class::Overloaded
                | Class::StoreFull => {
                    let (want, status) = match a.class {
                        Class::Conflict => (409, true),
                        _ => (503, true),
                    };
                    if ans.status != want || (status && !ans.retry_after) {
                        flag(
                            "outside_g2",
                            op,
                            format!(
                                "attempt {}: {} {:?} (retry-after: {})",
                                a.id, ans.status, ans.problem, ans.retry_after
                            ),
                        );
                    }
                }
                Class::OutcomeUnknown | Class::UpstreamUnavailable => {
                    if ans.status != 502 {
                        flag(
                            "outside_g2",
                            op,
                            format!("attempt {}: {} {:?}", a.id, ans.status, ans.problem),
                        );
                    }
                    if a.class == Class::OutcomeUnknown {
                        first_unknown_end =
                            Some(first_unknown_end.map_or(a.end_us, |t| t.min(a.end_us)));
                        if first_success_end.is_some_and(|t| a.start_us > t) {
                            anomaly("outcome_unknown_after_success", op.id);
                        }
                    }
                }
                Class::Mismatch
                | Class::BadKey
                | Class::TooLarge
                | Class::NotReplayable
                | Class::RequestTimeout
                | Class::OtherProblem => {
                    flag(
                        "outside_g2",
                        op,
                        format!(
                            "attempt {}: {} {:?} {}",
                            a.id,
                            ans.status,
                            ans.problem,
                            String::from_utf8_lossy(&ans.body)
                        ),
                    );
                }
                Class::Transport => {}
            }
        }
        if fresh_bodies.len() > 1 {
            anomaly("different_fresh_answers_for_one_key", op.id);
        }
        // I2: replays equal the first delivered stored answer.
        if let Some(first) = first_stored.and_then(|a| a.answer.as_ref()) {
            for a in tries.iter().filter(|a| a.class == Class::Replayed) {
                r.replays_checked += 1;
                if let Some(ans) = &a.answer
                    && (ans.status != first.status || ans.body != first.body)
                {
                    flag(
                        "replay_differs",
                        op,
                        format!(
                            "attempt {} replayed {} {:?}; first delivered was {} {:?}",
                            a.id,
                            ans.status,
                            String::from_utf8_lossy(&ans.body),
                            first.status,
                            String::from_utf8_lossy(&first.body)
                        ),
                    );
                }
            }
        }
        if let Some(t) = first_unknown_end
            && tries
                .iter()
                .any(|a| a.class == Class::Replayed && a.start_us > t)
        {
            anomaly("replay_after_outcome_unknown", op.id);
        }
        // I4: nothing runs again once a stored outcome was delivered. G2: nor once
        // outcome-unknown was (strict mode; in takeover mode a holder that lost its lease, e.g.
        // paused past it, answers outcome-unknown for its own exchange while the key has moved
        // on to a takeover: counted as an anomaly).
        let reruns = |t: u64| effectful.iter().filter(move |e| e.received_us > t);
        if let Some(t) = first_success_end {
            for e in reruns(t) {
                // An earlier epoch than one the upstream had already received: a dispatch of a
                // holder that lost its lease, sent before the takeover and delivered late (a
                // partitioned link that heals, a dead process's socket still flushing). Nothing
                // ran again after the answer; an upstream that fences on `Idempotency-Epoch`
                // refuses it. Counted as an anomaly.
                // Only where a fault explains the delay: the sending instance was killed,
                // paused or drained, or its upstream link faulted, around that time. Otherwise a
                // holder sent after its lease was lost (the `start_by` check failed): flagged.
                let lease_us = u64::try_from(params.lease.as_micros()).unwrap_or(u64::MAX);
                let newer = effectful
                    .iter()
                    .filter(|x| x.received_us < e.received_us && x.epoch > e.epoch)
                    .map(|x| x.received_us)
                    .min();
                let explained = newer.is_some_and(|from| {
                    faults.iter().filter(|f| f.applied).any(|f| {
                        let near = f.at_us + 2 * lease_us >= from && f.at_us <= e.received_us;
                        near && match &f.action {
                            Action::Kill { instance }
                            | Action::Pause { instance }
                            | Action::Terminate { instance } => e.instance == Some(*instance),
                            Action::UpstreamLink { instance, fault } => {
                                *fault != LinkFault::None
                                    && instance.is_none_or(|i| e.instance == Some(i))
                            }
                            _ => false,
                        }
                    })
                });
                if explained {
                    anomaly("stale_epoch_arrived_late", op.id);
                    continue;
                }
                flag(
                    "reexecuted_after_answer",
                    op,
                    format!(
                        "execution {} (epoch {}) arrived {:.1} ms after a client was given the \
                         key's outcome",
                        e.id,
                        e.epoch,
                        (e.received_us - t) as f64 / 1000.0
                    ),
                );
            }
        }
        if let Some(t) = first_unknown_end {
            let after_unknown = reruns(t)
                .filter(|e| first_success_end.is_none_or(|s| e.received_us <= s))
                .count();
            if after_unknown > 0 {
                // Strict mode: a single effect (a second is a duplicate_effect), dispatched by a
                // holder that had lost its lease (paused between claim and dispatch) after
                // another instance had declared the key outcome-unknown. Takeover mode: a
                // takeover after a stale holder answered outcome-unknown for its own exchange.
                let kind = if params.strict {
                    "dispatch_after_outcome_unknown"
                } else {
                    "takeover_after_outcome_unknown"
                };
                anomaly(kind, op.id);
            }
        }
        // The operation's end for its clients (probes aside).
        let workload: Vec<&&Attempt> = tries.iter().filter(|a| !a.probe).collect();
        let outcome = if workload
            .iter()
            .any(|a| matches!(a.class, Class::Executed | Class::Replayed))
        {
            "success"
        } else if workload.iter().any(|a| a.class == Class::OutcomeUnknown) {
            "outcome_unknown"
        } else if workload.iter().any(|a| a.class.is_final()) {
            "other_final"
        } else {
            "gave_up"
        };
        *r.op_outcomes.entry(outcome.into()).or_default() += 1;
        if op.behaviour.fail.is_some() {
            *r.post_write_failures.entry(outcome.into()).or_default() += 1;
        }
        if outcome == "outcome_unknown" || outcome == "gave_up" {
            r.outcome_unknown_ops += 1;
            if !effectful.is_empty() {
                r.outcome_unknown_ops_applied += 1;
            }
        }
        for p in tries.iter().filter(|a| a.probe) {
            *r.probe_answers
                .entry(p.class.as_str().to_owned())
                .or_default() += 1;
            if p.class == Class::Conflict {
                r.stuck_keys += 1;
                flag(
                    "stuck",
                    op,
                    format!(
                        "probe {} got 409 after every fault was healed and a lease had passed",
                        p.id
                    ),
                );
            }
        }
    }
    for e in stray {
        violations.push(Violation {
            kind: "unknown_execution".into(),
            op: 0,
            scope: e.scope.clone(),
            key: e.key.clone(),
            detail: format!("execution {} of a key no client sent", e.id),
        });
    }

    // Orphans: keys in flight on an instance when it was killed, resolved by another attempt
    // that was already waiting when the lease could run out (its resolution time is then the
    // moment the key became free, give or take a waiter's poll); keys whose next attempt came
    // later were free before it arrived and are counted apart.
    let bound = params.lease + Duration::from_secs(1);
    let disturbed = disturbances(faults);
    let mut ages = Vec::new();
    let mut clean_ages = Vec::new();
    let mut over = 0;
    let mut clean_over = 0;
    let mut late = 0;
    let kills: Vec<(u64, u32)> = faults
        .iter()
        .filter(|f| f.applied)
        .filter_map(|f| match f.action {
            Action::Kill { instance } => Some((f.at_us, instance)),
            _ => None,
        })
        .collect();
    if !kills.is_empty() {
        let attempt_by_id: HashMap<u64, &Attempt> = attempts.iter().map(|a| (a.id, a)).collect();
        let mut execs_by_op: HashMap<u64, Vec<&Execution>> = HashMap::new();
        for e in executions {
            if let Some(id) = by_key.get(&(e.scope.as_str(), e.key.as_str())) {
                execs_by_op.entry(*id).or_default().push(e);
            }
        }
        let mut attempts_by_op: HashMap<u64, Vec<&Attempt>> = HashMap::new();
        for a in attempts {
            attempts_by_op.entry(a.op).or_default().push(a);
        }
        let lease_us = u64::try_from(params.lease.as_micros()).unwrap_or(u64::MAX);
        for (op, tries) in &attempts_by_op {
            for &(tk, inst) in &kills {
                let hit = tries
                    .iter()
                    .find(|a| a.instance == inst && a.start_us < tk && a.end_us >= tk);
                let Some(hit) = hit else { continue };
                // (resolution time, start of the attempt that resolved it)
                let by_exec = execs_by_op.get(op).and_then(|es| {
                    es.iter()
                        .filter(|e| e.received_us > tk && e.attempt != Some(hit.id))
                        .filter_map(|e| {
                            let a = attempt_by_id.get(&e.attempt?)?;
                            Some((e.received_us, a.start_us))
                        })
                        .min()
                });
                let by_unknown = tries
                    .iter()
                    .filter(|a| a.class == Class::OutcomeUnknown && a.end_us > tk && a.id != hit.id)
                    .map(|a| (a.end_us, a.start_us))
                    .min();
                let resolved = match (by_exec, by_unknown) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let Some((t, started)) = resolved else {
                    continue;
                };
                if started > tk + lease_us {
                    late += 1;
                    continue;
                }
                let age = t - tk;
                let late_by_bound = Duration::from_micros(age) > bound;
                if late_by_bound {
                    over += 1;
                }
                ages.push(age);
                if !disturbed.iter().any(|&(from, to)| from <= t && to >= tk) {
                    clean_over += u64::from(late_by_bound);
                    clean_ages.push(age);
                }
            }
        }
    }
    r.orphans = Orphans {
        resolved: ages.len() as u64,
        age: Latency::of(ages),
        bound_ms: bound.as_secs_f64() * 1000.0,
        over_bound: over,
        resolved_on_arrival: late,
        clean: Latency::of(clean_ages),
        clean_over_bound: clean_over,
    };

    // Figures.
    r.ops = ops.len() as u64;
    r.requests = attempts.len() as u64;
    r.probes = attempts.iter().filter(|a| a.probe).count() as u64;
    let workload = attempts.iter().filter(|a| !a.probe);
    let first = workload.clone().map(|a| a.start_us).min().unwrap_or(0);
    let last = workload.clone().map(|a| a.end_us).max().unwrap_or(0);
    r.duration_s = last.saturating_sub(first) as f64 / 1e6;
    if r.duration_s > 0.0 {
        r.throughput_rps = (r.requests - r.probes) as f64 / r.duration_s;
    }
    for f in faults.iter().filter(|f| f.applied) {
        *r.faults.entry(f.action.name().to_owned()).or_default() += 1;
    }
    r.executions = executions.len() as u64;
    r.answers = by_class
        .into_iter()
        .map(|(k, v)| (k, Latency::of(v)))
        .collect();
    r.overhead_executed = Latency::of(overhead);
    r.anomalies = anomalies;
    r.anomaly_histories = anomaly_ops
        .iter()
        .flat_map(|(kind, ops)| {
            ops.iter()
                .filter_map(|id| by_id.get(id))
                .map(move |op| format!("[{kind}] {}", history(op, attempts, executions, faults)))
        })
        .collect();
    for v in &violations {
        *r.violation_counts.entry(v.kind.clone()).or_default() += 1;
    }
    let mut shown = Vec::new();
    for v in &violations {
        if shown.len() >= 20 {
            break;
        }
        if v.op != 0 && !shown.contains(&v.op) {
            shown.push(v.op);
        }
    }
    r.histories = shown
        .iter()
        .filter_map(|id| by_id.get(id))
        .map(|op| history(op, attempts, executions, faults))
        .collect();
    r.violations = violations;
    r
}

/// Everything that happened to one key, in time order: the operation, its executions, its
/// attempts and their answers, and the faults applied meanwhile.
pub fn history(
    op: &Op,
    attempts: &[Attempt],
    executions: &[Execution],
    faults: &[FaultRecord],
) -> String {
    let mut lines: Vec<(u64, String)> = Vec::new();
    let ms = |us: u64| us as f64 / 1000.0;
    for a in attempts.iter().filter(|a| a.op == op.id) {
        lines.push((
            a.start_us,
            format!(
                "{:>10.1} ms  attempt {} (sender {}, try {}{}) -> instance {}",
                ms(a.start_us),
                a.id,
                a.sender,
                a.n,
                if a.probe { ", probe" } else { "" },
                a.instance
            ),
        ));
        let what = match &a.answer {
            Some(ans) => format!(
                "{} {}{}{} {}",
                ans.status,
                a.class.as_str(),
                if ans.replayed { " (replayed)" } else { "" },
                ans.problem
                    .as_deref()
                    .map(|p| format!(" [{p}]"))
                    .unwrap_or_default(),
                String::from_utf8_lossy(&ans.body)
            ),
            None => format!(
                "no answer: {}",
                a.error.as_deref().unwrap_or("(no error text)")
            ),
        };
        lines.push((
            a.end_us,
            format!(
                "{:>10.1} ms  attempt {} answered: {what}",
                ms(a.end_us),
                a.id
            ),
        ));
    }
    let mut lo = u64::MAX;
    let mut hi = 0;
    for (t, _) in &lines {
        lo = lo.min(*t);
        hi = hi.max(*t);
    }
    for e in executions
        .iter()
        .filter(|e| e.scope == op.scope && e.key == op.key)
    {
        lo = lo.min(e.received_us);
        hi = hi.max(e.logged_us);
        lines.push((
            e.received_us,
            format!(
                "{:>10.1} ms  upstream received execution {} epoch {} via instance {:?} attempt {:?}",
                ms(e.received_us),
                e.id,
                e.epoch,
                e.instance,
                e.attempt
            ),
        ));
        lines.push((
            e.logged_us,
            format!(
                "{:>10.1} ms  upstream logged execution {} (effect: {}, status {}, {})",
                ms(e.logged_us),
                e.id,
                e.effect,
                e.status,
                e.behaviour
            ),
        ));
    }
    let margin = 3_000_000;
    for f in faults
        .iter()
        .filter(|f| f.at_us + margin >= lo && f.at_us <= hi + margin)
    {
        lines.push((
            f.at_us,
            format!(
                "{:>10.1} ms  FAULT {:?}{}{}",
                ms(f.at_us),
                f.action,
                if f.applied { "" } else { " (no effect)" },
                if f.note.is_empty() {
                    String::new()
                } else {
                    format!(" {}", f.note)
                }
            ),
        ));
    }
    lines.sort_by_key(|(t, _)| *t);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "history of op {} scope {:?} key {:?}: POST {} body {} ({} sender(s), behaviour {})",
        op.id,
        op.scope,
        op.key,
        op.target,
        String::from_utf8_lossy(&op.body),
        op.senders,
        op.behaviour
    );
    for (_, l) in lines {
        let _ = writeln!(out, "  {l}");
    }
    out
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "== {}: store {}, recovery {}, {} instance(s), seed {}",
            self.name, self.store, self.recovery, self.instances, self.seed
        )?;
        writeln!(
            f,
            "   {} ops, {} keyed requests ({} probes) in {:.1} s = {:.0} req/s; faults: {}",
            self.ops,
            self.requests,
            self.probes,
            self.duration_s,
            self.throughput_rps,
            self.faults
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "   executions {} (effectful {}, re-dispatched at epoch > 1: {}, keys run more than once: {})",
            self.executions, self.effects, self.redispatches, self.keys_executed_twice_or_more
        )?;
        writeln!(
            f,
            "   op outcomes: {}; outcome unknown to the client: {} (effect applied in {})",
            self.op_outcomes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.outcome_unknown_ops,
            self.outcome_unknown_ops_applied
        )?;
        writeln!(
            f,
            "   post-write failures injected, by outcome: {}",
            self.post_write_failures
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "   {:<26} {:>8} {:>10} {:>10} {:>10}",
            "answer class", "count", "p50 ms", "p99 ms", "max ms"
        )?;
        for (k, l) in &self.answers {
            writeln!(
                f,
                "   {:<26} {:>8} {:>10.1} {:>10.1} {:>10.1}",
                k, l.count, l.p50_ms, l.p99_ms, l.max_ms
            )?;
        }
        let o = &self.overhead_executed;
        writeln!(
            f,
            "   {:<26} {:>8} {:>10.2} {:>10.2} {:>10.1}",
            "overhead (executed)", o.count, o.p50_ms, o.p99_ms, o.max_ms
        )?;
        writeln!(
            f,
            "   orphans timed {} (age p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; goal {:.0} ms, over {}); free on arrival {}",
            self.orphans.resolved,
            self.orphans.age.p50_ms,
            self.orphans.age.p99_ms,
            self.orphans.age.max_ms,
            self.orphans.bound_ms,
            self.orphans.over_bound,
            self.orphans.resolved_on_arrival
        )?;
        let res = &self.resources;
        writeln!(
            f,
            "   resources ({} samples): instance RSS max {} kB (first quarter {}, last quarter {}), descriptors max {}, store bytes last {:?} max {:?}",
            res.samples,
            res.rss_kb_max,
            res.rss_kb_max_first_quarter,
            res.rss_kb_max_last_quarter,
            res.fds_max,
            res.store_bytes_last,
            res.store_bytes_max
        )?;
        writeln!(
            f,
            "   orphans with no other fault during their wait {} (age p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; over the goal {})",
            self.orphans.clean.count,
            self.orphans.clean.p50_ms,
            self.orphans.clean.p99_ms,
            self.orphans.clean.max_ms,
            self.orphans.clean_over_bound
        )?;
        writeln!(
            f,
            "   probes: {}; stuck keys {}; replays checked {}; fresh answers checked {}",
            self.probe_answers
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.stuck_keys,
            self.replays_checked,
            self.fresh_answers_checked
        )?;
        writeln!(
            f,
            "   anomalies: {}",
            if self.anomalies.is_empty() {
                "none".to_owned()
            } else {
                self.anomalies
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )?;
        if self.violations.is_empty() {
            writeln!(f, "   VIOLATIONS: none")?;
        } else {
            writeln!(
                f,
                "   VIOLATIONS: {} ({})",
                self.violations.len(),
                self.violation_counts
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
            for v in self.violations.iter().take(20) {
                writeln!(f, "   - {} op {} key {}: {}", v.kind, v.op, v.key, v.detail)?;
            }
            for h in self.histories.iter().take(5) {
                writeln!(f, "{h}")?;
            }
        }
        Ok(())
    }
}

/// The intervals (µs since the start, inclusive) during which a fault other than an instance
/// SIGKILL was in force: a paused or draining instance (until it resumed or listened again), a
/// store or upstream link fault (until that link was healed), a dead store (until it was
/// restarted). A fault never ended is in force until the end of the run.
fn disturbances(faults: &[FaultRecord]) -> Vec<(u64, u64)> {
    let mut open: HashMap<String, u64> = HashMap::new();
    let mut out = Vec::new();
    let mut close = |open: &mut HashMap<String, u64>, name: String, at: u64| {
        if let Some(from) = open.remove(&name) {
            out.push((from, at));
        }
    };
    for f in faults.iter().filter(|f| f.applied) {
        match &f.action {
            Action::Pause { instance } => {
                open.entry(format!("pause {instance}")).or_insert(f.at_us);
            }
            Action::Resume { instance } => close(&mut open, format!("pause {instance}"), f.at_us),
            Action::Terminate { instance } => {
                open.entry(format!("drain {instance}")).or_insert(f.at_us);
            }
            Action::Restart { instance } => close(&mut open, format!("drain {instance}"), f.at_us),
            Action::StoreLink { instance, fault } | Action::UpstreamLink { instance, fault } => {
                let side = if matches!(f.action, Action::StoreLink { .. }) {
                    "store"
                } else {
                    "upstream"
                };
                let name = format!("{side} {instance:?}");
                // A heal (or a new fault) on a link ends what was in force there; a heal of
                // every link ends each instance's own fault as well.
                let ended: Vec<String> = open
                    .keys()
                    .filter(|k| {
                        **k == name || (instance.is_none() && k.starts_with(&format!("{side} ")))
                    })
                    .cloned()
                    .collect();
                for k in ended {
                    close(&mut open, k, f.at_us);
                }
                if *fault != LinkFault::None {
                    open.insert(name, f.at_us);
                }
            }
            Action::StoreKill => {
                open.entry("store dead".to_owned()).or_insert(f.at_us);
            }
            Action::StoreRestart => close(&mut open, "store dead".to_owned(), f.at_us),
            Action::Kill { .. } => {}
        }
    }
    out.extend(open.into_values().map(|from| (from, u64::MAX)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at_us: u64, action: Action) -> FaultRecord {
        FaultRecord {
            at_us,
            action,
            applied: true,
            note: String::new(),
        }
    }

    #[test]
    fn disturbances_pair_faults_with_what_ended_them() {
        let faults = vec![
            rec(10, Action::Kill { instance: 0 }),
            rec(20, Action::Pause { instance: 1 }),
            rec(30, Action::Resume { instance: 1 }),
            rec(
                40,
                Action::StoreLink {
                    instance: Some(2),
                    fault: LinkFault::Blackhole,
                },
            ),
            // A heal of every store link ends instance 2's fault.
            rec(
                50,
                Action::StoreLink {
                    instance: None,
                    fault: LinkFault::None,
                },
            ),
            rec(60, Action::StoreKill),
            rec(70, Action::StoreRestart),
            rec(
                80,
                Action::UpstreamLink {
                    instance: None,
                    fault: LinkFault::Reset,
                },
            ),
        ];
        let mut d = disturbances(&faults);
        d.sort_unstable();
        assert_eq!(d, vec![(20, 30), (40, 50), (60, 70), (80, u64::MAX)]);
    }
}
