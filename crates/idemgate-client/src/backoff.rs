//! Delays between attempts: exponential backoff with full jitter, and `Retry-After`.
//!
//! **Backoff.** Before retry `n` (`n = 1` for the second attempt) the client sleeps a uniformly
//! random time in `[0, min(max_delay, base_delay × 2^(n-1)))` — "full jitter", the AWS SDKs'
//! standard mode and the variant the AWS Architecture Blog's "Exponential Backoff and Jitter"
//! found to spread synchronized clients best.
//!
//! **`Retry-After`.** When the answer carries `Retry-After` (delta-seconds, or an HTTP date: read
//! against the answer's own `Date` header when it has one, so that the wait does not depend on
//! how far the client's clock is from the server's, else against
//! [`Clock::wall`](crate::clock::Clock::wall)), the server's wait is honoured and never
//! undercut: the client sleeps `retry_after + U[0, spread)` with
//! `spread = max(retry_after × retry_after_jitter, base_delay)`, so clients told the same whole
//! number of seconds do not all wake on the same tick. A `Retry-After` longer than the cap is not
//! shortened (that would undercut it): the client stops and returns the answer.
//!
//! ```
//! use std::time::Duration;
//! use idemgate_client::backoff::Backoff;
//!
//! let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
//! assert_eq!(b.ceiling(1), Duration::from_millis(100));
//! assert_eq!(b.ceiling(3), Duration::from_millis(400));
//! assert_eq!(b.ceiling(30), Duration::from_secs(1)); // capped
//! assert_eq!(b.full_jitter(3, 0.5), Duration::from_millis(200));
//! ```

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// Exponential backoff with a cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Backoff {
    /// Backoff starting at `base` and never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap }
    }

    /// The upper bound of the delay before retry `retry` (1-based): `min(cap, base × 2^(retry-1))`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(63);
        let factor = 1u64 << exp;
        let nanos = self.base.as_nanos().saturating_mul(u128::from(factor));
        let capped = nanos.min(self.cap.as_nanos());
        duration_from_nanos(capped)
    }

    /// The delay before retry `retry` given a uniform draw `unit` in `[0, 1)`: `ceiling × unit`.
    pub fn full_jitter(&self, retry: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(retry);
        scale(ceiling, clamp_unit(unit)).min(ceiling)
    }

    /// The first delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The cap.
    pub fn cap(&self) -> Duration {
        self.cap
    }
}

/// The delay for a `Retry-After` of `retry_after`, jittered above it: `retry_after + spread × unit`
/// with `spread = max(retry_after × fraction, min_spread)`.
pub fn jitter_above(
    retry_after: Duration,
    fraction: f64,
    min_spread: Duration,
    unit: f64,
) -> Duration {
    let fraction = if fraction.is_finite() {
        fraction.max(0.0)
    } else {
        0.0
    };
    let spread = scale(retry_after, fraction).max(min_spread);
    retry_after.saturating_add(scale(spread, clamp_unit(unit)).min(spread))
}

/// `d × factor` (`factor` finite, ≥ 0), saturating at [`Duration::MAX`] instead of panicking
/// as [`Duration::mul_f64`] does.
fn scale(d: Duration, factor: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * factor).unwrap_or(Duration::MAX)
}

fn clamp_unit(unit: f64) -> f64 {
    if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder is below 10^9.
    let sub = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    Duration::new(secs, sub)
}

/// A `Retry-After` header's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryAfter {
    /// `Retry-After: 120`.
    Seconds(u64),
    /// `Retry-After: Fri, 31 Dec 1999 23:59:59 GMT`.
    Date(SystemTime),
}

impl RetryAfter {
    /// Reads the first `Retry-After` header; `None` if absent or malformed (a malformed value is
    /// ignored, as RFC 9110 lets a recipient do).
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let raw = headers
            .get(http::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim();
        Self::parse(raw)
    }

    /// Parses delta-seconds or an HTTP date (IMF-fixdate, RFC 850, asctime).
    pub fn parse(raw: &str) -> Option<Self> {
        if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
            // An absurd number of seconds saturates (and is then over any cap).
            return Some(RetryAfter::Seconds(raw.parse().unwrap_or(u64::MAX)));
        }
        httpdate::parse_http_date(raw).ok().map(RetryAfter::Date)
    }

    /// The wait it asks for, at wall time `now` (a date in the past asks for none).
    pub fn delay(&self, now: SystemTime) -> Duration {
        match *self {
            RetryAfter::Seconds(s) => Duration::from_secs(s),
            RetryAfter::Date(at) => at.duration_since(now).unwrap_or(Duration::ZERO),
        }
    }

    /// The wait it asks for in an answer whose `Date` header said `date`: a date is measured
    /// from the server's `Date` (both from the server's clock, so the client's clock skew does
    /// not matter), or from the local wall time `now` when the answer had no `Date`.
    pub fn delay_from(&self, date: Option<SystemTime>, now: SystemTime) -> Duration {
        self.delay(date.unwrap_or(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_seconds_and_dates() {
        assert_eq!(RetryAfter::parse("0"), Some(RetryAfter::Seconds(0)));
        assert_eq!(RetryAfter::parse("120"), Some(RetryAfter::Seconds(120)));
        assert_eq!(
            RetryAfter::parse("99999999999999999999999"),
            Some(RetryAfter::Seconds(u64::MAX))
        );
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            RetryAfter::parse("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(RetryAfter::Date(at))
        );
        assert_eq!(
            RetryAfter::parse("Sunday, 06-Nov-94 08:49:37 GMT"),
            Some(RetryAfter::Date(at))
        );
        assert_eq!(
            RetryAfter::parse("Sun Nov  6 08:49:37 1994"),
            Some(RetryAfter::Date(at))
        );
        for bad in ["", "-1", "1.5", "soon", " 5x"] {
            assert_eq!(RetryAfter::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn date_delay_is_measured_against_the_wall_clock() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let ra = RetryAfter::Date(at);
        assert_eq!(
            ra.delay(at - Duration::from_secs(7)),
            Duration::from_secs(7)
        );
        assert_eq!(ra.delay(at + Duration::from_secs(7)), Duration::ZERO);
    }

    #[test]
    fn date_delay_is_measured_from_the_answers_date_header() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let ra = RetryAfter::Date(at);
        let server_date = at - Duration::from_secs(5);
        // The client's clock is an hour ahead (or behind): the wait is still 5 s.
        for skew in [3600, 0] {
            let local = server_date + Duration::from_secs(skew);
            assert_eq!(
                ra.delay_from(Some(server_date), local),
                Duration::from_secs(5)
            );
        }
        let behind = server_date - Duration::from_secs(3600);
        assert_eq!(
            ra.delay_from(Some(server_date), behind),
            Duration::from_secs(5)
        );
        assert_eq!(ra.delay_from(None, behind), Duration::from_secs(3605));
        assert_eq!(
            RetryAfter::Seconds(7).delay_from(Some(server_date), behind),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn huge_durations_saturate_instead_of_panicking() {
        let huge = Duration::from_secs(u64::MAX);
        assert_eq!(jitter_above(huge, 0.2, Duration::ZERO, 0.9), Duration::MAX);
        assert_eq!(jitter_above(huge, 10.0, Duration::ZERO, 0.5), Duration::MAX);
        assert_eq!(
            jitter_above(Duration::from_secs(1), f64::INFINITY, Duration::ZERO, 0.5),
            Duration::from_secs(1)
        );
        let b = Backoff::new(Duration::MAX, Duration::MAX);
        assert!(b.full_jitter(40, 0.999_999) <= Duration::MAX);
        assert_eq!(b.full_jitter(1, 1.0), Duration::MAX);
    }

    #[test]
    fn ceiling_doubles_then_caps_without_overflow() {
        let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(20));
        let got: Vec<_> = (1..=8).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(got, [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(20));
        assert_eq!(b.ceiling(0), Duration::from_millis(500));
    }

    #[test]
    fn jitter_above_never_undercuts() {
        let ra = Duration::from_secs(2);
        let min = Duration::from_millis(500);
        assert_eq!(jitter_above(ra, 0.2, min, 0.0), ra);
        assert_eq!(jitter_above(ra, 0.2, min, 0.5), Duration::from_millis(2250));
        assert_eq!(
            jitter_above(Duration::from_secs(10), 0.2, min, 0.5),
            Duration::from_secs(11)
        );
        assert_eq!(
            jitter_above(Duration::ZERO, 0.2, min, 0.5),
            Duration::from_millis(250)
        );
        assert_eq!(jitter_above(ra, 0.2, min, f64::NAN), ra);
    }
}
