//! Ready-made [`Harness`]es: a store on a clock the test moves ([`ManualClockHarness`]: memory,
//! redb, any store built with a [`Clock`](crate::Clock)), and a store whose server's clock decides
//! ([`ServerClockHarness`]: Redis, PostgreSQL, where moving time means waiting). A store crate
//! then needs its constructor and, if it keeps bytes, a corruption hook — nothing more — and
//! [`store_suite!`](crate::store_suite) emits every test.

use std::time::Duration;

use super::Harness;
use crate::clock::ManualClock;
use crate::key::StoreKey;
use crate::record::MAX_BODY_LEN;
use crate::store::{BoxFuture, Store};

/// Overwrites the stored bytes of a key with something no build decodes (a store's own fault
/// hook, e.g. redb's `overwrite_raw`). Must panic if it cannot.
pub type CorruptFn<S> = for<'a> fn(&'a S, &'a StoreKey) -> BoxFuture<'a, ()>;

/// Runs the corruption hook, if any; `false` without one.
async fn corrupt_with<S>(hook: Option<CorruptFn<S>>, store: &S, key: &StoreKey) -> bool {
    match hook {
        Some(f) => {
            f(store, key).await;
            true
        }
        None => false,
    }
}

/// A store whose expiry is judged by a [`ManualClock`] the harness moves.
pub struct ManualClockHarness<S> {
    store: S,
    clock: ManualClock,
    corrupt: Option<CorruptFn<S>>,
    max_payload: usize,
    _keep: Option<Box<dyn Send + Sync>>,
}

impl<S: Store + Clone> ManualClockHarness<S> {
    /// `store` must judge time by `clock` (or a clone of it).
    pub fn new(store: S, clock: ManualClock) -> Self {
        Self {
            store,
            clock,
            corrupt: None,
            max_payload: MAX_BODY_LEN,
            _keep: None,
        }
    }

    /// The largest payload the store keeps, if less than [`MAX_BODY_LEN`] (see
    /// [`Harness::max_payload`]).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How to corrupt a record (stores that keep bytes); without it the corruption case is
    /// vacuous.
    pub fn corrupt_with(mut self, f: CorruptFn<S>) -> Self {
        self.corrupt = Some(f);
        self
    }

    /// Keeps `guard` (a temporary directory) alive as long as the harness.
    pub fn keep(mut self, guard: impl Send + Sync + 'static) -> Self {
        self._keep = Some(Box::new(guard));
        self
    }
}

impl<S: Store + Clone> Harness for ManualClockHarness<S> {
    type Store = S;
    fn store(&self) -> &S {
        &self.store
    }
    fn controlled_clock(&self) -> bool {
        true
    }
    async fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
    async fn corrupt(&self, key: &StoreKey) -> bool {
        corrupt_with(self.corrupt, &self.store, key).await
    }
    fn max_payload(&self) -> usize {
        self.max_payload
    }
}

/// A store whose server's clock decides expiry: moving time means waiting for it to pass.
pub struct ServerClockHarness<S> {
    store: S,
    corrupt: Option<CorruptFn<S>>,
    max_payload: usize,
}

impl<S: Store + Clone> ServerClockHarness<S> {
    /// Wraps a connected store.
    pub fn new(store: S) -> Self {
        Self {
            store,
            corrupt: None,
            max_payload: MAX_BODY_LEN,
        }
    }

    /// The largest payload the store keeps, if less than [`MAX_BODY_LEN`] (see
    /// [`Harness::max_payload`]).
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// How to corrupt a record.
    pub fn corrupt_with(mut self, f: CorruptFn<S>) -> Self {
        self.corrupt = Some(f);
        self
    }
}

impl<S: Store + Clone> Harness for ServerClockHarness<S> {
    type Store = S;
    fn store(&self) -> &S {
        &self.store
    }
    fn controlled_clock(&self) -> bool {
        false
    }
    async fn advance(&self, d: Duration) {
        // The server's clock decides: real time has to pass.
        tokio::time::sleep(d).await;
    }
    async fn corrupt(&self, key: &StoreKey) -> bool {
        corrupt_with(self.corrupt, &self.store, key).await
    }
    fn max_payload(&self) -> usize {
        self.max_payload
    }
}

/// Every test a store runs: the conformance cases, the model-based property test against the
/// reference model, and (for stores with a server) a check that an unreachable server is an
/// `Unavailable` error, not a panic or a hang.
///
/// ```no_run
/// use idemgate_core::testkit::harness::ManualClockHarness;
/// use idemgate_core::{ManualClock, MemoryStore};
///
/// async fn harness() -> Option<ManualClockHarness<MemoryStore>> {
///     let clock = ManualClock::new(1_700_000_000_000);
///     let store = MemoryStore::builder().clock(clock.clone()).build();
///     Some(ManualClockHarness::new(store, clock))
/// }
///
/// idemgate_core::store_suite! {
///     harness: harness(),             // async, Option<impl Harness>; None = no server
///     model_cases: 128,
///     regressions: "tests/proptest-regressions/model_memory.txt",
///     // For a store with a server, also:
///     //   unreachable: RedisStore::connect("redis://127.0.0.1:1"),
///     //   ignore_if: no_redis, "IDEMGATE_TEST_REDIS_URL is not set",
/// }
/// # fn main() {}
/// ```
///
/// With `ignore_if`, every test is `#[ignore]`d when the cfg is set (a build script sets it when
/// the server's variable is unset, never under CI), so the summary shows the skip.
#[macro_export]
macro_rules! store_suite {
    (
        harness: $make:expr,
        model_cases: $cases:expr,
        regressions: $file:literal
        $(, unreachable: $unreachable:expr)?
        $(, ignore_if: $cfg:ident, $why:literal)?
        $(,)?
    ) => {
        $crate::conformance_tests!(@all [$(#[cfg_attr($cfg, ignore = $why)])?] $make);

        #[test]
        $(#[cfg_attr($cfg, ignore = $why)])?
        fn store_agrees_with_the_reference_model() {
            let rt = ::tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            let Some(harness) = rt.block_on($make) else {
                return;
            };
            $crate::testkit::model::check_against_model(&rt, &harness, $cases, $file);
        }

        $crate::store_suite!(
            @unreachable [$(#[cfg_attr($cfg, ignore = $why)])?] $make; $($unreachable)?
        );
    };
    (@unreachable $attrs:tt $make:expr;) => {};
    (@unreachable [$($attr:tt)*] $make:expr; $unreachable:expr) => {
        #[::tokio::test]
        $($attr)*
        async fn an_unreachable_server_is_unavailable_not_a_panic() {
            if $make.await.is_none() {
                return;
            }
            match $unreachable.await {
                Ok(_) => panic!("connected to a server that is not there"),
                Err(err) => assert_eq!(err.kind(), $crate::ErrorKind::Unavailable, "{err}"),
            }
        }
    };
}
