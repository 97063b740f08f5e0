//! An optional observer of protected requests: called once per protected request with its
//! route, method, key, store key, answer, status and duration (the `idemgate` binary keeps a
//! recent-activity ring with it). Unset, it costs one `Option` check per protected request.
//!
//! ```
//! use std::sync::Arc;
//! use idemgate_core::{Engine, MemoryStore};
//! use idemgate_tower::IdempotencyLayer;
//! use idemgate_tower::observe::{Observation, Observer};
//!
//! struct Log;
//! impl Observer for Log {
//!     fn observe(&self, o: &Observation<'_>) {
//!         println!("{} {} -> {} ({})", o.method, o.route, o.answer.as_str(), o.status);
//!     }
//! }
//! let layer = IdempotencyLayer::builder(Engine::builder(MemoryStore::default()).build())
//!     .observer(Arc::new(Log))
//!     .build();
//! # let _ = layer;
//! ```

use std::time::Duration;

use idemgate_core::StoreKey;

use crate::respond::Answer;

/// One protected request, as answered.
#[derive(Debug)]
#[non_exhaustive]
pub struct Observation<'a> {
    /// The route's name.
    pub route: &'a str,
    /// The request method.
    pub method: &'a http::Method,
    /// The client's Idempotency-Key (well-formed: it passed admission).
    pub key: &'a str,
    /// The record's store key, once derived (absent when the request was answered before, e.g.
    /// too large or overloaded).
    pub store_key: Option<&'a StoreKey>,
    /// What became of it.
    pub answer: Answer,
    /// The status answered to the client.
    pub status: u16,
    /// From the layer receiving the request to the answer's head.
    pub elapsed: Duration,
}

/// Told about every protected request once it is answered. Called on the request's task: keep it
/// short and non-blocking (a brief mutex is fine).
pub trait Observer: Send + Sync + 'static {
    /// One protected request was answered.
    fn observe(&self, observation: &Observation<'_>);
}
