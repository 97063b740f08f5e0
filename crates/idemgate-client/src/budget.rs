//! The retry budget: a token bucket per host, shared by every request of a [`Policy`]
//! (AWS SDK standard retry mode).
//!
//! The bucket starts full (`capacity`). A retry must take `retry_cost` tokens (`timeout_cost`
//! when the attempt failed in transport: timeout, reset, refused — those are the failures most
//! likely to mean an overloaded or unreachable server); an empty bucket refuses it and the
//! operation stops with what it has. A first attempt never needs tokens. When an operation ends
//! successfully it puts back the cost of its last retry, or `success_refund` if it needed none.
//! Nothing refills with time: during a full outage nothing succeeds, so at most
//! `capacity / retry_cost` retries are made per host, however many requests there are — the
//! amplification of an outage is bounded by a constant, not a factor.
//!
//! **Fractional rates are exact.** Amounts are kept in thousandths of a token (gRPC's retry
//! throttling also takes its `tokenRatio` to three decimals), so a refund of 0.6 per success and
//! a cost of 1 per retry allow exactly 6 retries per 10 successes. tower's `TpsBudget` truncated
//! the reciprocal of a fractional percentage and allowed a full retry per deposit (tower#857).
//! Costs finer than a thousandth round up and refunds round down: the budget never allows more
//! than configured.
//!
//! ```
//! use idemgate_client::budget::{BudgetConfig, TokenBucket};
//!
//! let config = BudgetConfig::default().retry_cost(1.0).success_refund(0.6);
//! let mut bucket = TokenBucket::empty(&config);
//! for _ in 0..10 {
//!     bucket.refund(config.refund_units());
//! }
//! let allowed = (0..10).filter(|_| bucket.try_take(config.retry_units())).count();
//! assert_eq!(allowed, 6);
//! ```
//!
//! [`Policy`]: crate::Policy

/// Thousandths of a token per token.
pub const UNITS_PER_TOKEN: u64 = 1000;

/// The budget's settings. Defaults: AWS standard mode's (500, 5, 10, 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetConfig {
    capacity: f64,
    retry_cost: f64,
    timeout_cost: f64,
    success_refund: f64,
}

impl Default for BudgetConfig {
    /// AWS SDK standard retry mode: a bucket of 500 tokens, 5 per retry, 10 per retry after a
    /// timeout or connection failure, 1 back per success without retries.
    fn default() -> Self {
        Self {
            capacity: 500.0,
            retry_cost: 5.0,
            timeout_cost: 10.0,
            success_refund: 1.0,
        }
    }
}

impl BudgetConfig {
    /// Tokens in a full bucket (and at the start).
    pub fn capacity(mut self, tokens: f64) -> Self {
        self.capacity = tokens;
        self
    }

    /// Tokens a retry after an error status takes.
    pub fn retry_cost(mut self, tokens: f64) -> Self {
        self.retry_cost = tokens;
        self
    }

    /// Tokens a retry after a transport failure (timeout, reset, refused) takes.
    pub fn timeout_cost(mut self, tokens: f64) -> Self {
        self.timeout_cost = tokens;
        self
    }

    /// Tokens an operation that succeeded without retries puts back.
    pub fn success_refund(mut self, tokens: f64) -> Self {
        self.success_refund = tokens;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("capacity", self.capacity),
            ("retry_cost", self.retry_cost),
            ("timeout_cost", self.timeout_cost),
            ("success_refund", self.success_refund),
        ] {
            if !v.is_finite() || !(0.0..=1e12).contains(&v) {
                return Err(format!(
                    "budget {name} must be a finite number from 0 to 1e12, not {v}"
                ));
            }
        }
        Ok(())
    }

    /// Capacity in thousandths (rounded down).
    pub fn capacity_units(&self) -> u64 {
        down(self.capacity)
    }

    /// Cost of a retry after an error status, in thousandths (rounded up).
    pub fn retry_units(&self) -> u64 {
        up(self.retry_cost)
    }

    /// Cost of a retry after a transport failure, in thousandths (rounded up).
    pub fn timeout_units(&self) -> u64 {
        up(self.timeout_cost)
    }

    /// The refund of a success without retries, in thousandths (rounded down).
    pub fn refund_units(&self) -> u64 {
        down(self.success_refund)
    }
}

// Amounts are validated finite and within 0..=1e12, so the products fit u64 (≤ 1e15).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn up(tokens: f64) -> u64 {
    // Thousandths written with three decimals (0.6, 0.333) are not exact in binary: round to
    // the nearest millionth first so 0.6 × 1000 = 600 and not 601.
    let thousandths = ((tokens * 1e6).round() / 1e3).ceil();
    thousandths.max(0.0) as u64
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn down(tokens: f64) -> u64 {
    let thousandths = ((tokens * 1e6).round() / 1e3).floor();
    thousandths.max(0.0) as u64
}

/// One host's bucket, in thousandths of a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    units: u64,
    capacity: u64,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(config: &BudgetConfig) -> Self {
        let capacity = config.capacity_units();
        Self {
            units: capacity,
            capacity,
        }
    }

    /// An empty bucket (of the same capacity): tests, and a start after an outage.
    pub fn empty(config: &BudgetConfig) -> Self {
        Self {
            units: 0,
            capacity: config.capacity_units(),
        }
    }

    /// Takes `units` if there are that many; `false` (and nothing taken) otherwise.
    pub fn try_take(&mut self, units: u64) -> bool {
        match self.units.checked_sub(units) {
            Some(left) => {
                self.units = left;
                true
            }
            None => false,
        }
    }

    /// Puts `units` back, up to the capacity.
    pub fn refund(&mut self, units: u64) {
        self.units = self.units.saturating_add(units).min(self.capacity);
    }

    /// Tokens left (thousandths).
    pub fn units(&self) -> u64 {
        self.units
    }

    /// Tokens left.
    pub fn tokens(&self) -> f64 {
        // Exact for any amount under 2^53 thousandths.
        #[allow(clippy::cast_precision_loss)]
        let t = self.units as f64 / UNITS_PER_TOKEN as f64;
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn aws_defaults_allow_a_hundred_status_retries_from_full() {
        let c = BudgetConfig::default();
        let mut b = TokenBucket::new(&c);
        let n = std::iter::from_fn(|| b.try_take(c.retry_units()).then_some(())).count();
        assert_eq!(n, 100);
        let mut b = TokenBucket::new(&c);
        let n = std::iter::from_fn(|| b.try_take(c.timeout_units()).then_some(())).count();
        assert_eq!(n, 50);
    }

    #[test]
    fn refunds_never_overfill() {
        let c = BudgetConfig::default().capacity(2.0);
        let mut b = TokenBucket::new(&c);
        b.refund(5_000);
        assert_eq!(b.units(), 2_000);
        assert!(b.try_take(2_000));
        assert!(!b.try_take(1));
        assert_eq!(b.units(), 0);
    }

    #[test]
    fn tower_857_fractional_percentages_are_not_truncated() {
        // tower#857: retry_percent 0.6 let 10 deposits authorize 10 retries.
        for (refund, per_ten) in [(0.6, 6), (0.1, 1), (0.25, 2), (0.999, 9), (0.333, 3)] {
            let c = BudgetConfig::default()
                .retry_cost(1.0)
                .success_refund(refund);
            let mut b = TokenBucket::empty(&c);
            (0..10).for_each(|_| b.refund(c.refund_units()));
            let allowed = (0..10).filter(|_| b.try_take(c.retry_units())).count();
            assert_eq!(allowed, per_ten, "refund {refund}");
        }
    }

    #[test]
    fn odd_fractions_round_against_the_retrier() {
        let c = BudgetConfig::default()
            .retry_cost(1.0 / 3.0)
            .success_refund(1.0 / 3.0);
        assert_eq!(c.retry_units(), 334);
        assert_eq!(c.refund_units(), 333);
    }

    proptest! {
        /// With costs and refunds of at most three decimals, n successes allow exactly
        /// floor(n × refund / cost) retries from an empty bucket (+ what the capacity holds).
        #[test]
        fn successes_buy_exactly_their_share(
            refund in 0u64..5_000, cost in 1u64..10_000, successes in 0u64..500, cap in 0u64..1_000_000
        ) {
            let c = BudgetConfig::default()
                .capacity(1e9)
                .retry_cost(cost as f64 / 1000.0)
                .success_refund(refund as f64 / 1000.0);
            prop_assert_eq!(c.retry_units(), cost);
            prop_assert_eq!(c.refund_units(), refund);
            let mut b = TokenBucket { units: 0, capacity: cap.max(refund * successes) };
            (0..successes).for_each(|_| b.refund(c.refund_units()));
            let mut allowed = 0u64;
            while b.try_take(c.retry_units()) { allowed += 1; }
            prop_assert_eq!(allowed, refund * successes / cost);
        }
    }
}
