//! The circuit breaker: one per host, shared by every request of a [`Policy`](crate::Policy).
//!
//! - **Closed** (normal): every call's outcome goes into a sliding window of the last
//!   `window` calls. The breaker opens when the window holds at least `min_calls` outcomes and
//!   at least `failure_rate` of them are failures, or when `consecutive_failures` calls in a
//!   row failed (a burst trips it without waiting for the window to fill).
//!
//!   Under a [`Policy`](crate::Policy), a call is an **operation**, not an attempt: the retry
//!   loop records an attempt's outcome only when the operation ends with it. An operation that
//!   fails twice and then succeeds is one success (its retries still cost budget tokens); one
//!   that fails every attempt is one failure. So failures that retries cure never open the
//!   breaker, and under a full outage it opens after `consecutive_failures` operations (with
//!   the defaults, 5 operations × 3 attempts = 15 requests).
//! - **Open**: attempts fail fast with [`Error::CircuitOpen`](crate::Error::CircuitOpen), no
//!   request is sent, for `open_for`.
//! - **Half-open**: after `open_for`, up to `half_open_probes` attempts go through as probes
//!   (others still fail fast). One probe failure opens the breaker again; `half_open_probes`
//!   successes close it with an empty window. A probe that has been out for the probe timeout
//!   (by default the longer of `open_for` and the attempt timeout) without an outcome (a server
//!   that accepts connections and never answers) counts as failed at that moment: the breaker reopens for `open_for` from then, so a
//!   hung probe cannot keep the breaker half-open (and every request failing fast) forever.
//!
//! Only transient failures count: transport failures and `500`, `502`, `503`, `504` (and
//! idemgate's outcome-unknown and upstream-failed `502`s). A `4xx` is the caller's problem, not the server's, and
//! counts as a success; `408`, `425`, `429` and an in-flight `409` are the server pacing the
//! client (their `Retry-After` handles that) and are not counted at all.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use idemgate_client::breaker::{Breaker, BreakerConfig, Call, State};
//!
//! let config = BreakerConfig::default().consecutive_failures(2).open_for(Duration::from_secs(5));
//! let mut b = Breaker::new(config);
//! let t0 = Instant::now();
//! for _ in 0..2 {
//!     let permit = b.admit(t0).unwrap();
//!     b.record(permit, Call::Failure, t0);
//! }
//! assert_eq!(b.state(), State::Open);
//! assert!(b.admit(t0 + Duration::from_secs(1)).is_err()); // fails fast
//! let probe = b.admit(t0 + Duration::from_secs(5)).unwrap(); // half-open
//! b.record(probe, Call::Success, t0 + Duration::from_secs(5));
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The breaker's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    window: u32,
    min_calls: u32,
    failure_rate: f64,
    consecutive_failures: u32,
    open_for: Duration,
    probe_timeout: Option<Duration>,
    half_open_probes: u32,
}

impl Default for BreakerConfig {
    /// A window of 20 calls, opened at 50 % failures over at least 10 calls or at 5 failures in
    /// a row; open for 10 s; 3 probes. See the crate's guide for why.
    fn default() -> Self {
        Self {
            window: 20,
            min_calls: 10,
            failure_rate: 0.5,
            consecutive_failures: 5,
            open_for: Duration::from_secs(10),
            probe_timeout: None,
            half_open_probes: 3,
        }
    }
}

impl BreakerConfig {
    /// Calls kept in the sliding window (1 to 10000).
    pub fn window(mut self, calls: u32) -> Self {
        self.window = calls;
        self
    }

    /// Outcomes the window must hold before its failure rate is judged (1 to `window`).
    pub fn min_calls(mut self, calls: u32) -> Self {
        self.min_calls = calls;
        self
    }

    /// Failure rate (over the window) that opens the breaker, in `(0, 1]`.
    pub fn failure_rate(mut self, rate: f64) -> Self {
        self.failure_rate = rate;
        self
    }

    /// Failures in a row that open the breaker (0 disables this trigger).
    pub fn consecutive_failures(mut self, n: u32) -> Self {
        self.consecutive_failures = n;
        self
    }

    /// How long the breaker stays open before probing (1 ms to 24 h, checked by
    /// [`PolicyBuilder::build`](crate::PolicyBuilder::build)).
    pub fn open_for(mut self, d: Duration) -> Self {
        self.open_for = d;
        self
    }

    /// How long a half-open probe may be out without an outcome before it counts as failed
    /// (1 ms to 24 h). Default: the longer of `open_for` and the policy's `attempt_timeout`
    /// (`open_for` without one). Set it to at least your slowest legitimate request when that
    /// is longer and no attempt timeout is set: a probe declared hung reopens the breaker, so
    /// a shorter setting keeps it open while the host is healthy but slow.
    pub fn probe_timeout(mut self, d: Duration) -> Self {
        self.probe_timeout = Some(d);
        self
    }

    /// The probe timeout in force.
    pub(crate) fn probe_limit(&self) -> Duration {
        self.probe_timeout.unwrap_or(self.open_for)
    }

    /// Without an explicit probe timeout, a probe may be out as long as an attempt may last.
    pub(crate) fn with_attempt_timeout(mut self, attempt: Option<Duration>) -> Self {
        if self.probe_timeout.is_none()
            && let Some(t) = attempt
        {
            self.probe_timeout = Some(t.max(self.open_for));
        }
        self
    }

    /// Probes let through when half-open, and successes needed to close (at least 1).
    pub fn half_open_probes(mut self, n: u32) -> Self {
        self.half_open_probes = n;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(1..=10_000).contains(&self.window) {
            return Err(format!(
                "breaker window must be 1 to 10000 calls, not {}",
                self.window
            ));
        }
        if self.min_calls == 0 || self.min_calls > self.window {
            return Err(format!(
                "breaker min_calls must be 1 to window ({}), not {}",
                self.window, self.min_calls
            ));
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err(format!(
                "breaker failure_rate must be in (0, 1], not {}",
                self.failure_rate
            ));
        }
        if self.half_open_probes == 0 {
            return Err("breaker half_open_probes must be at least 1".into());
        }
        if self.open_for < Duration::from_millis(1) || self.open_for > crate::policy::MAX_DURATION {
            return Err(format!(
                "breaker open_for must be 1 ms to 24 h, not {:?}",
                self.open_for
            ));
        }
        if let Some(p) = self.probe_timeout
            && (p < Duration::from_millis(1) || p > crate::policy::MAX_DURATION)
        {
            return Err(format!(
                "breaker probe_timeout must be 1 ms to 24 h, not {p:?}"
            ));
        }
        Ok(())
    }
}

/// The breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Requests flow; outcomes are counted.
    Closed,
    /// Requests fail fast.
    Open,
    /// A few probes flow; the rest fail fast.
    HalfOpen,
}

impl State {
    /// `closed`, `open`, `half_open` (metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// How a call ended, for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// The server did its job (any answer that is not a transient failure).
    Success,
    /// A transient failure: transport, or `500`/`502`/`503`/`504`.
    Failure,
    /// Not counted (the server asked the client to wait: `408`, `425`, `429`, `409` in flight).
    Ignored,
}

/// Leave to send one attempt. Give it back with [`Breaker::record`] or [`Breaker::abandon`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a permit must be recorded or abandoned (a half-open probe slot is held)"]
pub struct Permit {
    generation: u64,
    /// The probe's number within its half-open period (`None`: not a probe).
    probe: Option<u32>,
}

impl Permit {
    /// Whether this attempt is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }
}

/// Why an attempt may not be sent now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// When the breaker will let a probe through, if it knows (`None`: half-open, its probes are
    /// all out).
    pub retry_in: Option<Duration>,
}

/// One host's breaker (a plain state machine; the policy keeps it under a lock).
#[derive(Clone, Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: Inner,
    /// Bumped on every state change: outcomes of calls admitted under an older state are stale.
    generation: u64,
}

#[derive(Clone, Debug)]
enum Inner {
    Closed {
        window: VecDeque<bool>,
        failures: u32,
        consecutive: u32,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        /// Probes out: their number and when each was admitted.
        out: Vec<(u32, Instant)>,
        /// Probes admitted so far in this half-open period (numbers them).
        admitted: u32,
        successes: u32,
    },
}

/// A state change, for logs and metrics.
pub type Transition = (State, State);

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: closed(),
            generation: 0,
        }
    }

    /// The state (an open breaker whose period has passed still says `Open` until the next
    /// [`admit`](Self::admit)).
    pub fn state(&self) -> State {
        match self.state {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { .. } => State::Open,
            Inner::HalfOpen { .. } => State::HalfOpen,
        }
    }

    /// When an open breaker will let a probe through (`None` unless open).
    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            Inner::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Asks to send an attempt at `now`.
    pub fn admit(&mut self, now: Instant) -> Result<Permit, Rejected> {
        self.admit_traced(now).0
    }

    /// [`admit`](Self::admit), also telling the state change it made (open → half-open, or
    /// half-open → open when a probe has been out for `open_for`).
    pub fn admit_traced(&mut self, now: Instant) -> (Result<Permit, Rejected>, Option<Transition>) {
        let open_for = self.config.open_for;
        let probe_limit = self.config.probe_limit();
        match &mut self.state {
            Inner::Closed { .. } => (Ok(self.permit(None)), None),
            Inner::Open { until } => {
                if now < *until {
                    return (
                        Err(Rejected {
                            retry_in: Some(*until - now),
                        }),
                        None,
                    );
                }
                self.half_open(now);
                (
                    Ok(self.permit(Some(0))),
                    Some((State::Open, State::HalfOpen)),
                )
            }
            Inner::HalfOpen {
                out,
                admitted,
                successes,
            } => {
                // A probe out for the probe timeout without an outcome failed when that period
                // ended: open again for `open_for` from then.
                let hung = out
                    .iter()
                    .map(|(_, at)| *at)
                    .min()
                    .and_then(|at| at.checked_add(probe_limit))
                    .filter(|expired| *expired <= now);
                if let Some(expired) = hung {
                    let until = later(expired, open_for);
                    if now < until {
                        self.set(Inner::Open { until });
                        return (
                            Err(Rejected {
                                retry_in: Some(until - now),
                            }),
                            Some((State::HalfOpen, State::Open)),
                        );
                    }
                    // That open period has passed too: a new half-open period, this its probe.
                    self.half_open(now);
                    return (Ok(self.permit(Some(0))), None);
                }
                let in_flight = u32::try_from(out.len()).unwrap_or(u32::MAX);
                if in_flight.saturating_add(*successes) < self.config.half_open_probes {
                    let n = *admitted;
                    *admitted += 1;
                    out.push((n, now));
                    (Ok(self.permit(Some(n))), None)
                } else {
                    (Err(Rejected { retry_in: None }), None)
                }
            }
        }
    }

    /// Records how the attempt sent under `permit` ended, at `now`; returns the state change it
    /// caused, if any.
    pub fn record(&mut self, permit: Permit, call: Call, now: Instant) -> Option<Transition> {
        if permit.generation != self.generation {
            return None; // admitted under an older state: stale
        }
        let config = self.config;
        match &mut self.state {
            Inner::Closed {
                window,
                failures,
                consecutive,
            } => {
                let failed = match call {
                    Call::Ignored => return None,
                    Call::Failure => true,
                    Call::Success => false,
                };
                window.push_back(failed);
                *failures += u32::from(failed);
                if window.len() > config.window as usize && window.pop_front() == Some(true) {
                    *failures -= 1;
                }
                *consecutive = if failed { *consecutive + 1 } else { 0 };
                let calls = u32::try_from(window.len()).unwrap_or(u32::MAX);
                let by_rate = calls >= config.min_calls
                    && f64::from(*failures) >= config.failure_rate * f64::from(calls);
                let by_run =
                    config.consecutive_failures > 0 && *consecutive >= config.consecutive_failures;
                if failed && (by_rate || by_run) {
                    self.set(Inner::Open {
                        until: later(now, config.open_for),
                    });
                    return Some((State::Closed, State::Open));
                }
                None
            }
            Inner::Open { .. } => None,
            Inner::HalfOpen { out, successes, .. } => {
                let Some(i) = out.iter().position(|(n, _)| Some(*n) == permit.probe) else {
                    return None; // not a probe of this period
                };
                out.swap_remove(i);
                match call {
                    Call::Ignored => None,
                    Call::Failure => {
                        self.set(Inner::Open {
                            until: later(now, config.open_for),
                        });
                        Some((State::HalfOpen, State::Open))
                    }
                    Call::Success => {
                        *successes += 1;
                        if *successes >= config.half_open_probes {
                            self.set(closed());
                            Some((State::HalfOpen, State::Closed))
                        } else {
                            None
                        }
                    }
                }
            }
        }
    }

    /// Gives a permit back unused (the attempt was cancelled): a probe's slot is freed.
    pub fn abandon(&mut self, permit: Permit) {
        if permit.generation != self.generation {
            return;
        }
        if let Inner::HalfOpen { out, .. } = &mut self.state {
            out.retain(|(n, _)| Some(*n) != permit.probe);
        }
    }

    fn half_open(&mut self, now: Instant) {
        self.set(Inner::HalfOpen {
            out: vec![(0, now)],
            admitted: 1,
            successes: 0,
        });
    }

    fn permit(&self, probe: Option<u32>) -> Permit {
        Permit {
            generation: self.generation,
            probe,
        }
    }

    fn set(&mut self, state: Inner) {
        self.state = state;
        self.generation += 1;
    }
}

/// `at + d`, or as late as an `Instant` can be when that overflows (only with an unvalidated
/// `open_for`: [`PolicyBuilder::build`](crate::PolicyBuilder::build) bounds it to 24 h).
fn later(at: Instant, d: Duration) -> Instant {
    let mut d = d;
    loop {
        if let Some(t) = at.checked_add(d) {
            return t;
        }
        d /= 2;
    }
}

fn closed() -> Inner {
    Inner::Closed {
        window: VecDeque::new(),
        failures: 0,
        consecutive: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Instant {
        // A fixed origin: these tests never read the real clock's progress.
        thread_local!(static ORIGIN: Instant = Instant::now());
        ORIGIN.with(|o| *o + Duration::from_millis(ms))
    }

    fn run(b: &mut Breaker, calls: &[Call], at: Instant) -> Vec<Option<Transition>> {
        calls
            .iter()
            .map(|c| {
                let p = b.admit(at).expect("admitted");
                b.record(p, *c, at)
            })
            .collect()
    }

    #[test]
    fn opens_on_rate_only_after_min_calls() {
        let cfg = BreakerConfig::default()
            .window(10)
            .min_calls(4)
            .failure_rate(0.5)
            .consecutive_failures(0);
        let mut b = Breaker::new(cfg);
        use Call::*;
        // 1 failure of 3: under min_calls, and under the rate anyway.
        run(&mut b, &[Failure, Success, Success], t(0));
        assert_eq!(b.state(), State::Closed);
        // 2 of 4 = 50 %: opens on the failure that reaches it.
        let tr = run(&mut b, &[Failure], t(0));
        assert_eq!(tr, [Some((State::Closed, State::Open))]);
    }

    #[test]
    fn sliding_window_forgets_old_failures() {
        let cfg = BreakerConfig::default()
            .window(4)
            .min_calls(4)
            .failure_rate(0.75)
            .consecutive_failures(0);
        let mut b = Breaker::new(cfg);
        use Call::*;
        run(
            &mut b,
            &[Failure, Failure, Success, Success, Success, Success],
            t(0),
        );
        // window is now [S, S, S, S]; two failures make 2/4 < 75 %.
        run(&mut b, &[Failure, Failure], t(0));
        assert_eq!(b.state(), State::Closed);
        run(&mut b, &[Failure], t(0)); // [S, F, F, F] = 75 %
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn successes_and_ignored_calls_break_or_skip_a_run() {
        let cfg = BreakerConfig::default()
            .consecutive_failures(3)
            .min_calls(20);
        let mut b = Breaker::new(cfg);
        use Call::*;
        run(&mut b, &[Failure, Failure, Success, Failure, Failure], t(0));
        assert_eq!(b.state(), State::Closed);
        run(&mut b, &[Ignored, Failure], t(0)); // ignored does not reset the run
        assert_eq!(b.state(), State::Open);
    }

    #[test]
    fn open_then_half_open_probes_then_closed() {
        let cfg = BreakerConfig::default()
            .consecutive_failures(1)
            .open_for(Duration::from_secs(10))
            .half_open_probes(2);
        let mut b = Breaker::new(cfg);
        run(&mut b, &[Call::Failure], t(0));
        assert_eq!(
            b.admit(t(9_999)),
            Err(Rejected {
                retry_in: Some(Duration::from_millis(1))
            })
        );
        let (p1, tr) = b.admit_traced(t(10_000));
        assert_eq!(tr, Some((State::Open, State::HalfOpen)));
        let p1 = p1.expect("probe 1");
        assert!(p1.is_probe());
        let p2 = b.admit(t(10_000)).expect("probe 2");
        assert_eq!(b.admit(t(10_000)), Err(Rejected { retry_in: None }));
        assert_eq!(b.record(p1, Call::Success, t(10_001)), None);
        assert_eq!(b.admit(t(10_001)), Err(Rejected { retry_in: None }));
        assert_eq!(
            b.record(p2, Call::Success, t(10_002)),
            Some((State::HalfOpen, State::Closed))
        );
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_failed_probe_reopens_for_a_full_period() {
        let cfg = BreakerConfig::default()
            .consecutive_failures(1)
            .open_for(Duration::from_secs(10));
        let mut b = Breaker::new(cfg);
        run(&mut b, &[Call::Failure], t(0));
        let p = b.admit(t(10_000)).expect("probe");
        assert_eq!(
            b.record(p, Call::Failure, t(10_500)),
            Some((State::HalfOpen, State::Open))
        );
        assert!(b.admit(t(20_499)).is_err());
        assert!(b.admit(t(20_500)).is_ok());
    }

    #[test]
    fn a_slow_probe_within_the_probe_timeout_is_not_hung() {
        let cfg = BreakerConfig::default()
            .consecutive_failures(1)
            .open_for(Duration::from_secs(10))
            .half_open_probes(1)
            .probe_timeout(Duration::from_secs(30));
        let mut b = Breaker::new(cfg);
        run(&mut b, &[Call::Failure], t(0));
        let slow = b.admit(t(10_000)).expect("probe");
        // 12 s later (past open_for, within the probe timeout): still half-open, not reopened.
        assert_eq!(b.admit(t(22_000)), Err(Rejected { retry_in: None }));
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(
            b.record(slow, Call::Success, t(22_500)),
            Some((State::HalfOpen, State::Closed))
        );
        // An attempt timeout longer than open_for becomes the probe timeout by default.
        let from_attempt = BreakerConfig::default()
            .open_for(Duration::from_secs(10))
            .with_attempt_timeout(Some(Duration::from_secs(60)));
        assert_eq!(from_attempt.probe_limit(), Duration::from_secs(60));
        let shorter = BreakerConfig::default()
            .open_for(Duration::from_secs(10))
            .with_attempt_timeout(Some(Duration::from_secs(2)));
        assert_eq!(shorter.probe_limit(), Duration::from_secs(10));
    }

    #[test]
    fn a_hung_probe_counts_as_failed_after_open_for() {
        let cfg = BreakerConfig::default()
            .consecutive_failures(1)
            .open_for(Duration::from_secs(10))
            .half_open_probes(1);
        let mut b = Breaker::new(cfg);
        run(&mut b, &[Call::Failure], t(0));
        let hung = b.admit(t(10_000)).expect("probe"); // never recorded
        assert_eq!(b.admit(t(19_999)), Err(Rejected { retry_in: None }));
        // Out for open_for: failed at t = 20 s; open until 30 s.
        assert_eq!(
            b.admit_traced(t(20_000)),
            (
                Err(Rejected {
                    retry_in: Some(Duration::from_secs(10))
                }),
                Some((State::HalfOpen, State::Open))
            )
        );
        assert_eq!(b.state(), State::Open);
        let probe = b.admit(t(30_000)).expect("a new probe");
        // The hung one's late outcome is stale.
        assert_eq!(b.record(hung, Call::Success, t(30_001)), None);
        assert_eq!(
            b.record(probe, Call::Success, t(30_002)),
            Some((State::HalfOpen, State::Closed))
        );
        // Noticed only after its open period passed too: a new probe at once.
        let mut b = Breaker::new(cfg);
        run(&mut b, &[Call::Failure], t(0));
        let _hung = b.admit(t(10_000)).expect("probe");
        let again = b.admit(t(40_000)).expect("a new probe");
        assert!(again.is_probe());
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[test]
    fn an_unvalidated_open_for_does_not_overflow() {
        let cfg = BreakerConfig::default()
            .consecutive_failures(1)
            .open_for(Duration::MAX);
        assert!(cfg.validate().is_err());
        let mut b = Breaker::new(cfg);
        run(&mut b, &[Call::Failure], t(0));
        assert_eq!(b.state(), State::Open);
        assert!(b.admit(t(1)).is_err());
    }

    #[test]
    fn stale_and_abandoned_permits() {
        let cfg = BreakerConfig::default()
            .consecutive_failures(1)
            .half_open_probes(1);
        let mut b = Breaker::new(cfg);
        let old = b.admit(t(0)).expect("closed");
        run(&mut b, &[Call::Failure], t(0));
        // A call admitted before the breaker opened cannot close or reopen it.
        assert_eq!(b.record(old, Call::Success, t(1)), None);
        assert_eq!(b.state(), State::Open);
        let probe = b.admit(t(10_000)).expect("probe");
        assert!(b.admit(t(10_000)).is_err());
        b.abandon(probe); // cancelled: its slot comes back
        assert!(b.admit(t(10_000)).is_ok());
    }

    #[test]
    fn validation() {
        assert!(BreakerConfig::default().validate().is_ok());
        assert!(BreakerConfig::default().window(0).validate().is_err());
        assert!(BreakerConfig::default().min_calls(21).validate().is_err());
        assert!(
            BreakerConfig::default()
                .failure_rate(0.0)
                .validate()
                .is_err()
        );
        assert!(
            BreakerConfig::default()
                .failure_rate(f64::NAN)
                .validate()
                .is_err()
        );
        assert!(
            BreakerConfig::default()
                .half_open_probes(0)
                .validate()
                .is_err()
        );
    }
}
