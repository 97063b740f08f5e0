//! Fault injection: a hook that makes a real store fail or answer late on demand, to test how
//! callers react to an unreachable or slow store (the store's own behaviour is tested by the
//! conformance suite).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::error::{ErrorKind, StoreError};
use crate::hook::{Hooked, Operation, StoreHook};
use crate::store::Store;

/// A store that answers `Unavailable` to every operation while it is "down", fails chosen
/// operations with chosen errors, and can answer chosen operations late (a slow link). Clones
/// share the switches.
pub type Faulty<S> = Hooked<S, Faults>;

/// The switches of a [`Faulty`] store.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    down: Arc<AtomicBool>,
    failing: Arc<Mutex<HashMap<Operation, ErrorKind>>>,
    delays: Arc<Mutex<HashMap<Operation, Duration>>>,
}

fn operation(name: &str) -> Operation {
    Operation::ALL
        .into_iter()
        .find(|op| op.as_str() == name)
        .unwrap_or_else(|| panic!("no store operation is called {name:?}"))
}

impl<S: Store> Hooked<S, Faults> {
    /// Wraps `inner`, up.
    pub fn new(inner: S) -> Self {
        Hooked::wrap(inner, Faults::default())
    }

    /// Takes the store down (`true`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.hook().down.store(down, Ordering::SeqCst);
    }

    /// Makes operation `op` (named as the [`Store`] method, e.g. `"complete"`) fail with
    /// `Unavailable` (`true`), or work again.
    pub fn set_failing(&self, op: &str, failing: bool) {
        let mut map = self.hook().failing.lock();
        if failing {
            map.insert(operation(op), ErrorKind::Unavailable);
        } else {
            map.remove(&operation(op));
        }
    }

    /// Makes operation `op` fail with an error of `kind` (a full store: `Capacity`; rotten
    /// bytes: `Corrupt`) until [`set_failing`](Self::set_failing)`(op, false)`.
    pub fn set_failing_with(&self, op: &str, kind: ErrorKind) {
        self.hook().failing.lock().insert(operation(op), kind);
    }

    /// Delays the answer of every call of operation `op` by `delay` (tokio's timer): the
    /// operation takes effect at once, and its caller hears of it `delay` later (a slow link).
    pub fn set_delay(&self, op: &str, delay: Duration) {
        self.hook().delays.lock().insert(operation(op), delay);
    }
}

impl StoreHook for Faults {
    async fn around<T, F>(&self, op: Operation, call: F) -> Result<T, StoreError>
    where
        T: Send,
        F: Future<Output = Result<T, StoreError>> + Send,
    {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::new(
                ErrorKind::Unavailable,
                "injected fault: the store is down",
            ));
        }
        let failing = self.failing.lock().get(&op).copied();
        if let Some(kind) = failing {
            return Err(StoreError::new(
                kind,
                format!("injected fault: {} fails", op.as_str()),
            ));
        }
        let out = call.await;
        let delay = self.delays.lock().get(&op).copied();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        out
    }
}
