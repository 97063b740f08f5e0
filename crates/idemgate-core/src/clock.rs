//! Injected time.
//!
//! Stores that have no clock of their own (memory, redb) take expiry decisions with a [`Clock`].
//! Tests use [`ManualClock`] and move time explicitly instead of sleeping.
//!
//! ```
//! use std::time::Duration;
//! use idemgate_core::clock::{Clock, ManualClock};
//!
//! let clock = ManualClock::new(1_000);
//! clock.advance(Duration::from_secs(2));
//! assert_eq!(clock.now().as_millis(), 3_000);
//! ```

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time: milliseconds since the Unix epoch, as told by a store's clock.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating.
    pub fn after(self, d: Duration) -> Self {
        Timestamp(
            self.0
                .saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, d: Duration) -> Timestamp {
        self.after(d)
    }
}

impl std::ops::Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}ms", self.0)
    }
}

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Now.
    fn now(&self) -> Timestamp;
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> Timestamp {
        (**self).now()
    }
}

/// Wall-clock time that never steps within a process: the operating system's wall clock read
/// once (at the first use), then advanced by the monotonic clock.
///
/// The memory store judges leases and expiry by this clock, so an NTP step or an operator's
/// `date -s` cannot expire a live lease early (or keep a dead one alive) inside a running process.
/// The price: over a long uptime it drifts from the wall clock by whatever the wall clock was
/// stepped (slewing adjusts both alike) — harmless for records that die with the process.
/// Stores that persist records across restarts (redb) use [`WallClock`] instead, so their
/// timestamps mean the same after a restart; the engine keeps their live leases safe from clock
/// steps another way (it never takes over a holder running in its own process).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

/// The wall clock read at the process's first use of [`SystemClock`], and the monotonic instant
/// of that reading.
fn anchor() -> &'static (Timestamp, std::time::Instant) {
    static ANCHOR: std::sync::OnceLock<(Timestamp, std::time::Instant)> =
        std::sync::OnceLock::new();
    ANCHOR.get_or_init(|| (wall_clock(), std::time::Instant::now()))
}

/// The operating system's wall clock, read now.
pub fn wall_clock() -> Timestamp {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    Timestamp(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// The operating system's wall clock, as is: what a store that persists records across restarts
/// must write (see [`SystemClock`] for the in-process alternative that never steps).
#[derive(Clone, Copy, Debug, Default)]
pub struct WallClock;

impl Clock for WallClock {
    fn now(&self) -> Timestamp {
        wall_clock()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let (wall, at) = anchor();
        wall.after(at.elapsed())
    }
}

/// A clock that only moves when told to. Cloning shares the same time.
#[derive(Clone, Debug, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock showing `start_ms` milliseconds since the epoch.
    pub fn new(start_ms: u64) -> Self {
        Self(Arc::new(AtomicU64::new(start_ms)))
    }

    /// Moves time forward.
    pub fn advance(&self, d: Duration) {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the time (may move backwards, to test skew).
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// Wall-clock time that follows tokio's clock, so `tokio::time::pause()` and `advance()` move it.
///
/// Anchored to the system clock when created. Useful to test the [`Engine`](crate::Engine) (which
/// sleeps with tokio timers) with store expiry and timers on one controllable timeline.
#[derive(Clone, Debug)]
pub struct TokioClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// Anchors a new clock at the current system time.
    pub fn new() -> Self {
        Self {
            base: SystemClock.now(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.base.after(self.start.elapsed())
    }
}
