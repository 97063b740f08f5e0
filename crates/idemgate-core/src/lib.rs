//! # idemgate-core
//!
//! The engine of idemgate: it makes an operation safe to retry by running it at most once per
//! idempotency key and replaying its stored outcome to every retry. No HTTP, no particular store.
//!
//! ## Overview
//!
//! - [`key`]: [`IdempotencyKey`] validation, [`Scope`] (principal + route) and the fixed-length
//!   [`StoreKey`] derived from (namespace, scope, key).
//! - [`fingerprint`]: what makes two requests "the same" (BLAKE3 or SHA-256; RFC 8785 canonical JSON
//!   with ignored fields).
//! - [`record`]: the record, its states (in-flight, completed, outcome-unknown) and its versioned
//!   binary encoding.
//! - [`store`]: the narrow [`Store`] contract; [`protocol`]: its state machine as pure functions.
//! - [`engine`]: [`Engine`], the policy (wait or reject, heartbeats, takeover or strict recovery,
//!   which outcomes to keep).
//! - [`hook`]: [`hook::Hooked`], the one delegation point for store wrappers (faults, deadlines,
//!   metrics are hooks).
//! - [`memory`]: [`MemoryStore`], a bounded sharded in-memory store; [`sweeper`] purges expiry;
//!   [`census`] counts the outcome-unknown records a store holds.
//! - `testkit` (feature): the conformance suite and the model-based property test every store runs.
//!
//! ## Example
//!
//! ```
//! # tokio::runtime::Builder::new_multi_thread().enable_time().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use idemgate_core::engine::{Disposition, Execution, Policy};
//! use idemgate_core::record::{Outcome, StoredResponse};
//! use idemgate_core::{Engine, FingerprintOptions, IdempotencyKey, MemoryStore, Scope, ScopedKey};
//!
//! let engine = Engine::builder(MemoryStore::default()).build();
//! let charges = Arc::new(AtomicUsize::new(0));
//! let key = ScopedKey::new("shop", Scope::new("customer-7"), IdempotencyKey::parse("pay-1")?);
//! let fp = FingerprintOptions::default().builder().method("POST").path("/pay").body(b"10").finish();
//!
//! for _attempt in 0..3 {
//!     let charges = charges.clone();
//!     let result = engine.run(&key, fp, &Policy::default(),
//!         |receipt: &String| Disposition::Store(Outcome::Response(
//!             StoredResponse::new(200, vec![], receipt.clone()))),
//!         move |_dispatch| async move {
//!             charges.fetch_add(1, Ordering::SeqCst);
//!             "receipt-1".to_string()
//!         }).await?;
//!     match result {
//!         Execution::Executed { value, .. } => assert_eq!(value, "receipt-1"),
//!         Execution::Replayed { outcome: Outcome::Response(r), .. } => assert_eq!(r.body, "receipt-1"),
//!         other => panic!("unexpected {other:?}"),
//!     }
//! }
//! assert_eq!(charges.load(Ordering::SeqCst), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! ## Guarantees
//!
//! For one scoped key within its TTL (PRODUCT §4): at most one dispatch per epoch, a new epoch only
//! after the holder's lease expired (G1); every call ends in exactly one [`engine::Execution`] (G2);
//! release only when the classifier says so (G3); every completion, release and takeover is a
//! compare-and-set on the fencing (G4); after the TTL the key is new (G5); the store key includes
//! the scope, so no replay crosses principals (G6). [`engine`] says which part provides which.
//! These hold for any store that passes the conformance suite; stores that can lose acknowledged
//! writes weaken G1.
//!
//! ## Feature flags
//!
//! - `testkit`: [`testkit`] — `conformance!` cases and the model-based property test for store
//!   authors. Off by default.
//!
//! ## Errors
//!
//! [`StoreError`] carries a stable [`ErrorKind`] (`unavailable`, `timeout`, `corrupt`, `capacity`,
//! `config`, `internal`). Key problems are [`key::KeyError`]; stored bytes that do not decode are
//! [`record::DecodeError`] (reported by stores as `corrupt`). "Exists", "in flight", "mismatch",
//! "lost the lease" are values, not errors.
//!
//! ## Performance
//!
//! See `docs/performance.md` in the repository for measured figures and the machine they come from.

pub mod cache;
pub mod census;
pub mod clock;
mod coalesce;
pub mod dir_lock;
pub mod engine;
pub mod error;
pub mod fingerprint;
pub mod group_commit;
pub mod hook;
pub mod key;
pub mod memory;
pub mod protocol;
pub mod record;
pub mod store;
pub mod sweeper;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use clock::{Clock, ManualClock, SystemClock, Timestamp, TokioClock, WallClock};
pub use engine::{Engine, EngineBuilder, EngineError};
pub use error::{ErrorKind, StoreError};
pub use fingerprint::{Fingerprint, FingerprintOptions};
pub use key::{IdempotencyKey, Scope, ScopedKey, StoreKey};
pub use memory::MemoryStore;
pub use store::{DynStore, SharedStore, Store};
