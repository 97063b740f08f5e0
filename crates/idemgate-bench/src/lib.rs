//! Load-benchmark tools for idemgate (not published).
//!
//! `bench/run.sh` drives four binaries built from this crate:
//!
//! - `bench-upstream`: the small, fast HTTP API every target forwards to (a ~200-byte JSON answer,
//!   optionally after a fixed service time);
//! - `loadgen`: a closed-loop HTTP/1.1 load generator (one keep-alive connection per simulated
//!   client) sending unique keys, repeated keys or no key, reporting requests/s, latency
//!   percentiles and every wrong answer as one JSON line;
//! - `record-footprint`: resident memory per stored record in the memory store;
//! - `bench-report`: turns the JSON lines into the Markdown tables of `docs/performance.md`.
//!
//! The shared vocabulary lives here: [`RunResult`] is what `loadgen` writes and `bench-report`
//! reads.
//!
//! ```
//! use idemgate_bench::{Mode, median_min_max};
//!
//! assert_eq!(Mode::parse("replay"), Some(Mode::Replay));
//! assert_eq!(median_min_max(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
//! ```

use serde::{Deserialize, Serialize};

/// Which request path a run exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every request carries a fresh `Idempotency-Key`: the first-execution path.
    Unique,
    /// Requests cycle over a small set of keys executed once beforehand: the replay path.
    Replay,
    /// No `Idempotency-Key`: idemgate passes the request through.
    None,
}

impl Mode {
    /// Parses `unique`, `replay` or `none`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "unique" => Some(Self::Unique),
            "replay" => Some(Self::Replay),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Unique => "unique",
            Self::Replay => "replay",
            Self::None => "none",
        }
    }
}

/// One measured run of one target, as one JSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// What was measured: `upstream`, `nginx` or `idemgate`.
    pub target: String,
    /// idemgate's store (`memory`, `file`, `redis`, `postgres`), empty for other targets.
    pub store: String,
    /// The request path exercised.
    pub mode: Mode,
    /// Concurrent keep-alive connections (closed loop: one request outstanding per connection).
    pub connections: usize,
    /// The upstream's service time in milliseconds.
    pub delay_ms: u64,
    /// Repetition number, from 1.
    pub rep: u32,
    /// Requests answered inside the measured window.
    pub requests: u64,
    /// Length of the measured window in seconds.
    pub seconds: f64,
    /// `requests / seconds`.
    pub rps: f64,
    /// Latency percentiles in microseconds.
    pub p50_us: u64,
    /// 99th percentile, µs.
    pub p99_us: u64,
    /// 99.9th percentile, µs.
    pub p999_us: u64,
    /// Slowest request, µs.
    pub max_us: u64,
    /// Answers whose status was not 2xx (counted over warm-up and measurement).
    pub non_2xx: u64,
    /// Transport errors: refused or broken connections, unreadable answers.
    pub errors: u64,
    /// Answers carrying `Idempotent-Replayed: true`, inside the measured window.
    pub replayed: u64,
    /// Answers with an empty body, which no target should give.
    pub empty_bodies: u64,
}

impl RunResult {
    /// The row label used in reports: `idemgate (memory)`, `nginx`, ...
    pub fn label(&self) -> String {
        if self.store.is_empty() {
            self.target.clone()
        } else {
            format!("{} ({})", self.target, self.store)
        }
    }

    /// What is wrong with this run's answers, if anything: every answer 2xx with a body, no
    /// transport error, and replays marked exactly on the replay path of idemgate.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.requests == 0 {
            out.push("no request was answered".to_owned());
        }
        if self.non_2xx > 0 {
            out.push(format!("{} answers were not 2xx", self.non_2xx));
        }
        if self.errors > 0 {
            out.push(format!("{} transport errors", self.errors));
        }
        if self.empty_bodies > 0 {
            out.push(format!("{} answers had no body", self.empty_bodies));
        }
        let expected_replays = if self.target == "idemgate" && self.mode == Mode::Replay {
            self.requests
        } else {
            0
        };
        if self.replayed != expected_replays {
            out.push(format!(
                "{} answers marked as replays, expected {expected_replays}",
                self.replayed
            ));
        }
        out
    }
}

/// Median, minimum and maximum of `values` (the median of an even count is the mean of the two
/// middle values); `None` when empty.
pub fn median_min_max(values: &[f64]) -> Option<(f64, f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((median, v[0], v[n - 1]))
}

/// The ~200-byte JSON document the bench upstream answers with.
pub const RESPONSE_BODY: &[u8] = br#"{"id":"pay_0123456789abcdef","object":"payment","amount":1000,"currency":"eur","status":"succeeded","customer":"cus_0123456789","description":"benchmark payment, constant body of about two hundred bytes","livemode":false}"#;

/// The JSON document the load generator posts.
pub const REQUEST_BODY: &[u8] = br#"{"amount":1000,"currency":"eur","customer":"cus_0123456789"}"#;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn result(target: &str, mode: Mode, requests: u64, replayed: u64) -> RunResult {
        RunResult {
            target: target.into(),
            store: String::new(),
            mode,
            connections: 1,
            delay_ms: 0,
            rep: 1,
            requests,
            seconds: 1.0,
            rps: requests as f64,
            p50_us: 1,
            p99_us: 1,
            p999_us: 1,
            max_us: 1,
            non_2xx: 0,
            errors: 0,
            replayed,
            empty_bodies: 0,
        }
    }

    #[test]
    fn replays_are_expected_only_on_idemgate_replay_runs() {
        assert!(
            result("idemgate", Mode::Replay, 10, 10)
                .problems()
                .is_empty()
        );
        assert_eq!(result("idemgate", Mode::Replay, 10, 9).problems().len(), 1);
        assert_eq!(result("idemgate", Mode::Unique, 10, 1).problems().len(), 1);
        assert!(result("nginx", Mode::Replay, 10, 0).problems().is_empty());
        assert_eq!(result("nginx", Mode::Unique, 0, 0).problems().len(), 1);
    }

    #[test]
    fn median_of_even_count_is_the_mean_of_the_middle_pair() {
        assert_eq!(median_min_max(&[4.0, 1.0, 3.0, 2.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(median_min_max(&[]), None);
    }

    #[test]
    fn response_body_is_about_two_hundred_bytes_of_json() {
        assert!((180..=240).contains(&RESPONSE_BODY.len()));
        serde_json::from_slice::<serde_json::Value>(RESPONSE_BODY).unwrap();
        serde_json::from_slice::<serde_json::Value>(REQUEST_BODY).unwrap();
    }
}
