//! Time, injected: the monotonic clock that drives backoff, deadlines and breaker periods, the
//! wall clock that `Retry-After` HTTP dates are read against, and sleeping.
//!
//! [`TokioClock`] (the default) reads tokio's clock, so tests run with a paused runtime
//! (`#[tokio::test(start_paused = true)]`) see every backoff and breaker period pass instantly
//! and deterministically. A test that needs a particular wall time (an HTTP-date `Retry-After`)
//! implements [`Clock`] itself:
//!
//! ```
//! use std::time::{Duration, Instant, SystemTime};
//! use idemgate_client::clock::{Clock, Sleep, TokioClock};
//!
//! #[derive(Debug)]
//! struct FixedWall(SystemTime);
//!
//! impl Clock for FixedWall {
//!     fn now(&self) -> Instant { TokioClock.now() }
//!     fn wall(&self) -> SystemTime { self.0 }
//!     fn sleep(&self, d: Duration) -> Sleep { TokioClock.sleep(d) }
//! }
//! let clock = FixedWall(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
//! assert_eq!(clock.wall(), SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

/// A sleeping future, as returned by [`Clock::sleep`].
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The client's source of time.
///
/// `now` must be monotonic (it orders attempts, deadlines and breaker periods); `wall` is only
/// used to turn a `Retry-After` HTTP date into a delay; `sleep` must complete once `now` has
/// advanced by at least the duration.
pub trait Clock: fmt::Debug + Send + Sync + 'static {
    /// The monotonic now.
    fn now(&self) -> Instant;
    /// The wall-clock now (for `Retry-After` dates).
    fn wall(&self) -> SystemTime;
    /// A future that completes after `duration`.
    fn sleep(&self, duration: Duration) -> Sleep;
}

/// tokio's clock (pausable in tests) and the system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        Box::pin(tokio::time::sleep(duration))
    }
}
