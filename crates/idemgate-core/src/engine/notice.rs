//! The engine's warnings to operators: a record became outcome-unknown, or a holder lost its
//! lease before its outcome was recorded. Each names the route (the policy's name), the client's
//! key (escaped and capped: [`ForLog`](crate::key::ForLog)), the store key, the epoch and the
//! command that resolves the record (see [`EngineBuilder::resolve_hint`](super::EngineBuilder::resolve_hint)),
//! so that the line alone is enough to act on.

use std::sync::atomic::Ordering;

use super::{Disposition, Engine};
use crate::key::{IdempotencyKey, StoreKey};
use crate::store::Store;

/// The operation a warning is about.
pub(super) struct Subject<'a> {
    pub(super) route: &'a str,
    pub(super) client_key: &'a IdempotencyKey,
    pub(super) store_key: &'a StoreKey,
    pub(super) epoch: u64,
}

/// Why a record became outcome-unknown (the `reason` field of the warning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum UnknownReason {
    /// The caller's classifier said so: the request was sent, and no complete answer came back.
    Classified,
    /// The operation (or its classifier) panicked.
    Panicked,
    /// Strict recovery: the holder's lease expired, and the key is never run again.
    StrictRecovery,
    /// A shutdown whose drain timed out cancelled the operation.
    Shutdown,
}

impl UnknownReason {
    fn as_str(self) -> &'static str {
        match self {
            UnknownReason::Classified => "no_complete_answer",
            UnknownReason::Panicked => "panicked",
            UnknownReason::StrictRecovery => "strict_recovery",
            UnknownReason::Shutdown => "shutdown",
        }
    }
}

/// What a holder that lost its lease could not write (the `not_written` field).
pub(super) fn disposition_name(d: &Disposition) -> &'static str {
    match d {
        Disposition::Store(_) => "outcome",
        Disposition::Release => "release",
        Disposition::Unknown => "outcome_unknown",
    }
}

impl<S: Store> Engine<S> {
    /// Counts and logs a record this engine marked outcome-unknown.
    pub(super) fn marked_unknown(&self, s: &Subject<'_>, reason: UnknownReason) {
        self.inner
            .stats
            .marked_unknown
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            route = s.route,
            key = %s.client_key.for_log(),
            store_key = %s.store_key,
            epoch = s.epoch,
            reason = reason.as_str(),
            hint = %self.resolve_hint(s.store_key),
            "outcome unknown: the request may or may not have taken effect; retries get 502 \
             outcome-unknown until an operator resolves the record (run the hint once the \
             request is known NOT to have taken effect) or its unknown_ttl passes"
        );
    }

    /// Counts and logs a holder whose compare-and-set found its lease gone.
    pub(super) fn lease_lost(&self, s: &Subject<'_>, not_written: &Disposition) {
        self.inner.stats.leases_lost.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            route = s.route,
            key = %s.client_key.for_log(),
            store_key = %s.store_key,
            epoch = s.epoch,
            not_written = disposition_name(not_written),
            hint = %self.resolve_hint(s.store_key),
            "lease lost before the outcome was recorded (the key was deleted by an operator, or \
             taken over after the lease ran out): nothing was written, and another run may \
             repeat the request; look at the record, and if it is outcome-unknown and the \
             request did not take effect, resolve it with the hint"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[test]
    fn the_hint_names_the_store_key() {
        let key = StoreKey([0xab; 32]);
        let engine = Engine::builder(MemoryStore::default())
            .resolve_hint("idemgate keys --admin http://127.0.0.1:9090 resolve {store_key}")
            .build();
        assert_eq!(
            engine.resolve_hint(&key),
            format!(
                "idemgate keys --admin http://127.0.0.1:9090 resolve {}",
                "ab".repeat(32)
            )
        );
        let plain = Engine::builder(MemoryStore::default()).build();
        assert!(plain.resolve_hint(&key).contains(&"ab".repeat(32)));
    }
}
