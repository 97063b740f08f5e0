//! The retry loop shared by the reqwest middleware and the tower layer.
//!
//! An adapter implements [`Transport`] (send attempt `n` of the same request and say what came
//! back); [`run`] does everything else: the breaker's admission, per-attempt timeouts and the
//! deadline, classification, the budget, delays, the attempt log, spans and metrics.
//!
//! The breaker counts operations: an attempt's outcome is recorded only when the operation ends
//! with it (a half-open probe's at once). Budget tokens for a retry are taken when it is decided
//! and given back if the breaker then refuses it.
//!
//! A retryable answer is kept (body unread) while the client waits before the next attempt, so
//! that it can be returned if the breaker refuses that attempt; it is dropped as soon as the next
//! attempt is admitted. With reqwest that holds the answer's connection for the wait.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::backoff::jitter_above;
use crate::breaker::{Call, Permit, Transition};
use crate::classify::{self, Facts, TransportFailure, Verdict};
use crate::error::{BoxError, Error};
use crate::key::OperationKey;
use crate::policy::{HostState, Policy};
use crate::report::{AttemptRecord, RetryInfo, Stop};

/// What one attempt got.
pub(crate) enum Attempted<R> {
    /// An answer (its body possibly read, for problem+json classification).
    Answer { response: R, facts: Facts },
    /// No answer.
    Failed {
        error: BoxError,
        failure: TransportFailure,
    },
}

/// Sends the operation's request, once per call.
pub(crate) trait Transport: Send {
    type Response: Send;
    /// Sends attempt `attempt` (1-based).
    fn send(&mut self, attempt: u32) -> impl Future<Output = Attempted<Self::Response>> + Send;
}

/// The operation being retried.
pub(crate) struct OpSpec {
    /// `scheme://host:port`.
    pub(crate) host: String,
    pub(crate) key: Option<OperationKey>,
    /// RFC 9110 idempotent method.
    pub(crate) idempotent_method: bool,
    pub(crate) body_retryable: bool,
    /// When the operation began (before its body was buffered): the deadline counts from it.
    pub(crate) start: Instant,
}

/// An attempt that ran past its timeout or the deadline.
#[derive(Debug, thiserror::Error)]
#[error("attempt timed out after {after:?}{}", if *.deadline { " (the operation's deadline)" } else { "" })]
pub(crate) struct AttemptTimeout {
    after: Duration,
    deadline: bool,
}

enum Last<R> {
    Answer(R),
    Error(BoxError),
}

/// Gives a breaker permit back if the attempt is dropped before its outcome is recorded.
struct PermitGuard<'a> {
    host: &'a HostState,
    permit: Option<Permit>,
}

impl PermitGuard<'_> {
    fn record(&mut self, call: Call, now: Instant) -> Option<Transition> {
        let permit = self.permit.take()?;
        let breaker = self.host.breaker.as_ref()?;
        breaker.lock().record(permit, call, now)
    }
}

impl Drop for PermitGuard<'_> {
    fn drop(&mut self) {
        if let (Some(permit), Some(breaker)) = (self.permit.take(), self.host.breaker.as_ref()) {
            breaker.lock().abandon(permit);
        }
    }
}

fn note_transition(host: &str, t: Option<Transition>) {
    if let Some((from, to)) = t {
        metrics::counter!("idemgate_client_breaker_transitions_total",
            "host" => host.to_owned(), "from" => from.as_str(), "to" => to.as_str())
        .increment(1);
        if to == crate::breaker::State::Open {
            tracing::warn!(host, from = from.as_str(), "circuit breaker opened");
        } else {
            tracing::info!(
                host,
                from = from.as_str(),
                to = to.as_str(),
                "circuit breaker changed state"
            );
        }
    }
}

/// Buffers the request body (the adapter's `read`) before the first attempt, within the
/// operation's deadline counted from `start`: the deadline covers the whole call.
pub(crate) async fn read_body<B>(
    policy: &Policy,
    host: &str,
    key: Option<&OperationKey>,
    start: Instant,
    read: impl Future<Output = Result<B, BoxError>>,
) -> Result<B, Error> {
    let cfg = &policy.inner.config;
    let clock = &policy.inner.clock;
    let result = match cfg.deadline {
        None => read.await,
        Some(deadline) => {
            let left = start
                .checked_add(deadline)
                .map_or(deadline, |at| at.saturating_duration_since(clock.now()));
            tokio::select! {
                biased;
                r = read => r,
                () = clock.sleep(left) => {
                    operation_metric(host, Stop::Deadline);
                    let info = RetryInfo {
                        attempts: 0,
                        key: key.map(|k| k.value.clone()),
                        key_generated: key.is_some_and(|k| k.generated),
                        replayed: false,
                        body_retryable: false,
                        stop: Stop::Deadline,
                        elapsed: clock.now().saturating_duration_since(start),
                        log: Vec::new(),
                    };
                    return Err(Error::DeadlineExceeded {
                        deadline,
                        info: Box::new(info),
                        source: "the request body was not read within the deadline".into(),
                    });
                }
            }
        }
    };
    result.map_err(|source| {
        metrics::counter!("idemgate_client_operations_total",
            "host" => host.to_owned(), "stop" => "request_body")
        .increment(1);
        Error::RequestBody { source }
    })
}

/// Runs the operation to its end.
pub(crate) async fn run<T: Transport>(
    policy: &Policy,
    spec: OpSpec,
    transport: &mut T,
) -> Result<(T::Response, RetryInfo), Error> {
    let cfg = &policy.inner.config;
    let clock = Arc::clone(&policy.inner.clock);
    let start = spec.start;
    // Bounded by `build` (24 h); an overflow would mean "no deadline in reach".
    let deadline_at = cfg.deadline.and_then(|d| start.checked_add(d));
    let host_state = policy.host_state(&spec.host);
    let host = spec.host.as_str();
    // A key makes a resend of a non-idempotent request safe only if the host honours it.
    let keyed = spec.key.is_some() && policy.honours_keys(host);
    let key_str = spec.key.as_ref().map(|k| k.value.clone());
    let mut info = RetryInfo {
        attempts: 0,
        key: key_str.clone(),
        key_generated: spec.key.as_ref().is_some_and(|k| k.generated),
        replayed: false,
        body_retryable: spec.body_retryable,
        stop: Stop::Answered,
        elapsed: Duration::ZERO,
        log: Vec::new(),
    };
    let mut delay = Duration::ZERO;
    let mut reason = String::from("first");
    let mut waits = 0u32;
    let mut last_retry_cost: Option<u64> = None;
    let mut last: Option<Last<T::Response>> = None;
    // Tokens taken for the next attempt: given back if the breaker refuses it (or the
    // operation is dropped before sending it).
    let mut pending: Option<Tokens<'_>> = None;

    loop {
        // The breaker decides whether this attempt may be sent at all.
        let permit = match &host_state.breaker {
            None => None,
            Some(breaker) => {
                let (admitted, transition) = breaker.lock().admit_traced(clock.now());
                note_transition(host, transition);
                match admitted {
                    Ok(p) => Some(p),
                    Err(rejected) => {
                        drop(pending.take());
                        info.stop = Stop::CircuitOpen;
                        info.elapsed = clock.now().saturating_duration_since(start);
                        metrics::counter!("idemgate_client_circuit_rejections_total",
                            "host" => host.to_owned())
                        .increment(1);
                        return finish_open(host, rejected.retry_in, info, last);
                    }
                }
            }
        };
        if let Some(tokens) = pending.take() {
            last_retry_cost = Some(tokens.commit());
        }
        // Admitted: the previous outcome (kept in case the breaker refused) is no longer needed,
        // and a response held here would hold its connection during this attempt.
        drop(last.take());
        let probe = permit.as_ref().is_some_and(Permit::is_probe);
        let mut guard = PermitGuard {
            host: &host_state,
            permit,
        };
        info.attempts += 1;
        let attempt = info.attempts;
        let span = tracing::debug_span!(
            "idemgate_client.attempt",
            attempt,
            host,
            key = key_str.as_deref().unwrap_or(""),
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            reason = reason.as_str(),
            probe,
            outcome = tracing::field::Empty,
        );
        metrics::counter!("idemgate_client_attempts_total", "host" => host.to_owned()).increment(1);
        let sent_at = clock.now();
        let remaining = deadline_at.map(|d| d.saturating_duration_since(sent_at));
        let (limit, by_deadline) = match (cfg.attempt_timeout, remaining) {
            (Some(t), Some(r)) if r <= t => (Some(r), true),
            (Some(t), _) => (Some(t), false),
            (None, Some(r)) => (Some(r), true),
            (None, None) => (None, false),
        };
        let send = transport.send(attempt).instrument(span.clone());
        let result = match limit {
            None => send.await,
            Some(limit) => {
                tokio::select! {
                    biased;
                    r = send => r,
                    () = clock.sleep(limit) => Attempted::Failed {
                        error: Box::new(AttemptTimeout { after: limit, deadline: by_deadline }),
                        failure: TransportFailure::Timeout,
                    },
                }
            }
        };
        let now = clock.now();
        let took = now.saturating_duration_since(sent_at);

        // Classify.
        let (call, outcome_text, decision) = match result {
            Attempted::Answer { response, facts } => {
                let verdict =
                    classify::verdict(&facts, &cfg.retry_statuses, spec.idempotent_method);
                let call = match verdict {
                    Verdict::Final { .. } => Call::Success,
                    Verdict::OutcomeUnknown { .. } => Call::Failure,
                    Verdict::InFlight => Call::Ignored,
                    Verdict::Retry if classify::pacing(facts.status) => Call::Ignored,
                    Verdict::Retry if classify::breaker_failure(facts.status) => Call::Failure,
                    Verdict::Retry => Call::Success,
                };
                let text = if facts.replayed {
                    format!("{} (replay)", facts.status.as_u16())
                } else if let Some(p) = facts.problem.as_deref() {
                    format!("{} {p}", facts.status.as_u16())
                } else {
                    facts.status.as_u16().to_string()
                };
                (call, text, Decision::Answer(response, facts, verdict))
            }
            Attempted::Failed { error, failure } => {
                let call = if failure == TransportFailure::Fatal {
                    Call::Ignored
                } else {
                    Call::Failure
                };
                let text = format!("{}: {error}", failure.as_str());
                (call, text, Decision::Failed(error, failure))
            }
        };
        // The breaker counts operations, not attempts: an attempt's outcome is recorded only
        // if the operation ends with it (below), so failures cured by a retry do not open it.
        // A half-open probe is the exception: its outcome is recorded at once (a failed probe
        // reopens the breaker, and the retry decided below then sees it open).
        if probe {
            note_transition(host, guard.record(call, now));
        }
        span.record("outcome", outcome_text.as_str());
        tracing::debug!(parent: &span, outcome = outcome_text.as_str(), took_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX), "attempt finished");
        info.log.push(AttemptRecord {
            attempt,
            delay,
            reason: std::mem::take(&mut reason),
            outcome: outcome_text,
            took,
        });

        // Decide: done (the operation ends with this attempt, so its outcome is the
        // operation's: recorded), or the next attempt's delay and reason.
        macro_rules! end {
            ($result:expr) => {{
                let result = $result;
                note_transition(host, guard.record(call, now));
                return result;
            }};
        }
        let next = match decision {
            Decision::Answer(response, facts, verdict) => match verdict {
                Verdict::Final { success, replayed } => {
                    if success {
                        refund(&host_state, cfg, last_retry_cost);
                    }
                    info.replayed = replayed;
                    if replayed {
                        metrics::counter!("idemgate_client_replays_total", "host" => host.to_owned())
                            .increment(1);
                    }
                    end!(Ok(done(
                        host,
                        info,
                        Stop::Answered,
                        start,
                        &*clock,
                        response
                    )))
                }
                Verdict::OutcomeUnknown { unprotected } => {
                    info.stop = Stop::OutcomeUnknown;
                    info.elapsed = clock.now().saturating_duration_since(start);
                    operation_metric(host, Stop::OutcomeUnknown);
                    tracing::warn!(
                        host,
                        key = key_str.as_deref().unwrap_or(""),
                        unprotected,
                        "outcome unknown: not retried; reconcile by the key"
                    );
                    end!(Err(Error::OutcomeUnknown {
                        key: key_str.clone().unwrap_or_default(),
                        detail: facts.detail,
                        unprotected,
                        info: Box::new(info),
                    }))
                }
                Verdict::InFlight => {
                    match in_flight_wait(policy, &spec, keyed, waits, deadline_at, now, &facts) {
                        Ok(wait) => {
                            waits += 1;
                            last = Some(Last::Answer(response));
                            Next {
                                delay: wait,
                                reason: "in flight (409)".into(),
                                label: "in_flight",
                            }
                        }
                        Err(stop) => end!(Ok(done(host, info, stop, start, &*clock, response))),
                    }
                }
                Verdict::Retry => {
                    let status = facts.status;
                    let step = RetryStep {
                        failure: None,
                        told: facts.retry_after_delay(clock.wall()),
                        attempts_counted: info.attempts - waits,
                    };
                    match decide(policy, &spec, keyed, &host_state, deadline_at, now, step) {
                        Ok((wait, tokens)) => {
                            pending = Some(tokens);
                            last = Some(Last::Answer(response));
                            Next {
                                delay: wait,
                                reason: format!("status {}", status.as_u16()),
                                label: "status",
                            }
                        }
                        Err(stop) => end!(Ok(done(host, info, stop, start, &*clock, response))),
                    }
                }
            },
            Decision::Failed(error, TransportFailure::Fatal) => {
                info.stop = Stop::Fatal;
                info.elapsed = clock.now().saturating_duration_since(start);
                operation_metric(host, Stop::Fatal);
                end!(Err(Error::Transport {
                    info: Box::new(info),
                    source: error,
                }))
            }
            Decision::Failed(error, failure) => {
                let step = RetryStep {
                    failure: Some(failure),
                    told: None,
                    attempts_counted: info.attempts - waits,
                };
                match decide(policy, &spec, keyed, &host_state, deadline_at, now, step) {
                    Ok((wait, tokens)) => {
                        pending = Some(tokens);
                        let label = failure.as_str();
                        last = Some(Last::Error(error));
                        Next {
                            delay: wait,
                            reason: label.to_owned(),
                            label,
                        }
                    }
                    Err(stop) => {
                        info.stop = stop;
                        info.elapsed = clock.now().saturating_duration_since(start);
                        operation_metric(host, stop);
                        let retry_in = host_state
                            .breaker
                            .as_ref()
                            .and_then(|b| b.lock().open_until())
                            .map(|u| u.saturating_duration_since(now));
                        end!(Err(error_for(stop, host, cfg, info, error, retry_in)))
                    }
                }
            }
        };
        // Retried: this attempt's outcome is not the operation's.
        note_transition(host, guard.record(Call::Ignored, now));
        drop(guard);
        metrics::counter!("idemgate_client_retries_total", "host" => host.to_owned(), "reason" => next.label)
            .increment(1);
        tracing::debug!(
            host,
            attempt,
            delay_ms = u64::try_from(next.delay.as_millis()).unwrap_or(u64::MAX),
            reason = next.reason.as_str(),
            "retrying"
        );
        delay = next.delay;
        reason = next.reason;
        if !delay.is_zero() {
            clock.sleep(delay).await;
        }
    }
}

enum Decision<R> {
    Answer(R, Facts, Verdict),
    Failed(BoxError, TransportFailure),
}

struct Next {
    delay: Duration,
    reason: String,
    label: &'static str,
}

struct RetryStep {
    /// `None`: a retryable status.
    failure: Option<TransportFailure>,
    /// The `Retry-After` delay, if the answer had one.
    told: Option<Duration>,
    /// Attempts that count against `max_attempts` (in-flight waits do not).
    attempts_counted: u32,
}

/// Budget tokens taken for a retry that is not sent yet: put back if it never is.
struct Tokens<'a> {
    host: &'a HostState,
    units: u64,
}

impl Tokens<'_> {
    /// The retry was sent: the tokens are spent.
    fn commit(mut self) -> u64 {
        std::mem::take(&mut self.units)
    }
}

impl Drop for Tokens<'_> {
    fn drop(&mut self) {
        if self.units > 0
            && let Some(bucket) = &self.host.budget
        {
            bucket.lock().refund(self.units);
        }
    }
}

/// `at + d` is at or past `deadline` (an overflow is past any deadline).
fn past(deadline: Instant, at: Instant, d: Duration) -> bool {
    at.checked_add(d).is_none_or(|t| t >= deadline)
}

/// How long to wait on a `409` in flight before asking again, or why not to.
fn in_flight_wait(
    policy: &Policy,
    spec: &OpSpec,
    keyed: bool,
    waits: u32,
    deadline_at: Option<Instant>,
    now: Instant,
    facts: &Facts,
) -> Result<Duration, Stop> {
    let cfg = &policy.inner.config;
    if !spec.body_retryable {
        return Err(Stop::BodyNotRetryable);
    }
    // Asking again is a resend: the same rule as for any possibly-sent failure.
    if !keyed && !spec.idempotent_method {
        return Err(Stop::NotSafeToRetry);
    }
    if waits >= cfg.max_in_flight_waits {
        return Err(Stop::AttemptsExhausted);
    }
    let wait = match facts.retry_after_delay(policy.inner.clock.wall()) {
        Some(ra) if ra > cfg.retry_after_cap => return Err(Stop::RetryAfterTooLong),
        Some(ra) => jitter_above(
            ra,
            cfg.retry_after_jitter,
            cfg.backoff.base(),
            policy.unit(),
        ),
        // A 409 in flight without Retry-After: one base delay, jittered.
        None => jitter_above(Duration::ZERO, 0.0, cfg.backoff.base(), policy.unit()),
    };
    if deadline_at.is_some_and(|d| past(d, now, wait)) {
        return Err(Stop::Deadline);
    }
    Ok(wait)
}

/// May the operation retry? `Ok((delay, budget tokens taken))` or why not.
fn decide<'a>(
    policy: &Policy,
    spec: &OpSpec,
    keyed: bool,
    host: &'a HostState,
    deadline_at: Option<Instant>,
    now: Instant,
    step: RetryStep,
) -> Result<(Duration, Tokens<'a>), Stop> {
    let cfg = &policy.inner.config;
    if !spec.body_retryable {
        return Err(Stop::BodyNotRetryable);
    }
    let provably_unsent = step.failure == Some(TransportFailure::NotSent);
    if !keyed && !spec.idempotent_method && !provably_unsent {
        return Err(Stop::NotSafeToRetry);
    }
    if deadline_at.is_some_and(|d| now >= d) {
        return Err(Stop::Deadline);
    }
    if step.attempts_counted >= cfg.max_attempts {
        return Err(Stop::AttemptsExhausted);
    }
    let delay = match step.told {
        Some(ra) if ra > cfg.retry_after_cap => return Err(Stop::RetryAfterTooLong),
        Some(ra) => jitter_above(
            ra,
            cfg.retry_after_jitter,
            cfg.backoff.base(),
            policy.unit(),
        ),
        None => cfg
            .backoff
            .full_jitter(step.attempts_counted, policy.unit()),
    };
    if deadline_at.is_some_and(|d| past(d, now, delay)) {
        return Err(Stop::Deadline);
    }
    // The breaker opened (a sibling's outcome, or this operation's failed probe): no token
    // for a retry it would refuse.
    if let Some(breaker) = &host.breaker
        && let Some(until) = breaker.lock().open_until()
        && !past(until, now, delay)
    {
        metrics::counter!("idemgate_client_circuit_rejections_total",
            "host" => spec.host.clone())
        .increment(1);
        return Err(Stop::CircuitOpen);
    }
    let units = match (&cfg.budget, &host.budget) {
        (Some(b), Some(bucket)) => {
            let cost = if step.failure.is_some() {
                b.timeout_units()
            } else {
                b.retry_units()
            };
            if !bucket.lock().try_take(cost) {
                metrics::counter!("idemgate_client_budget_exhausted_total",
                    "host" => spec.host.clone())
                .increment(1);
                return Err(Stop::BudgetExhausted);
            }
            cost
        }
        _ => 0,
    };
    Ok((delay, Tokens { host, units }))
}

/// AWS standard mode: a success puts back its last retry's cost, or the success refund.
fn refund(host: &HostState, cfg: &crate::policy::Config, last_retry_cost: Option<u64>) {
    if let (Some(b), Some(bucket)) = (&cfg.budget, &host.budget) {
        bucket
            .lock()
            .refund(last_retry_cost.unwrap_or_else(|| b.refund_units()));
    }
}

fn operation_metric(host: &str, stop: Stop) {
    metrics::counter!("idemgate_client_operations_total", "host" => host.to_owned(), "stop" => stop.as_str())
        .increment(1);
}

fn done<R>(
    host: &str,
    mut info: RetryInfo,
    stop: Stop,
    start: Instant,
    clock: &dyn crate::clock::Clock,
    response: R,
) -> (R, RetryInfo) {
    info.stop = stop;
    info.elapsed = clock.now().saturating_duration_since(start);
    operation_metric(host, stop);
    (response, info)
}

fn error_for(
    stop: Stop,
    host: &str,
    cfg: &crate::policy::Config,
    info: RetryInfo,
    source: BoxError,
    retry_in: Option<Duration>,
) -> Error {
    let info = Box::new(info);
    match stop {
        Stop::CircuitOpen => Error::CircuitOpen {
            host: host.to_owned(),
            retry_in,
            info,
            source: Some(source),
        },
        Stop::BodyNotRetryable => Error::BodyNotRetryable {
            limit: cfg.body_limit,
            info,
            source,
        },
        Stop::NotSafeToRetry => Error::NotSafeToRetry { info, source },
        Stop::Deadline => Error::DeadlineExceeded {
            deadline: cfg.deadline.unwrap_or_default(),
            info,
            source,
        },
        Stop::BudgetExhausted => Error::BudgetExhausted {
            host: host.to_owned(),
            info,
            source,
        },
        _ => Error::AttemptsExhausted { info, source },
    }
}

fn finish_open<R>(
    host: &str,
    retry_in: Option<Duration>,
    info: RetryInfo,
    last: Option<Last<R>>,
) -> Result<(R, RetryInfo), Error> {
    operation_metric(host, Stop::CircuitOpen);
    match last {
        Some(Last::Answer(response)) => Ok((response, info)),
        Some(Last::Error(source)) => Err(Error::CircuitOpen {
            host: host.to_owned(),
            retry_in,
            info: Box::new(info),
            source: Some(source),
        }),
        None => Err(Error::CircuitOpen {
            host: host.to_owned(),
            retry_in,
            info: Box::new(info),
            source: None,
        }),
    }
}
