//! [`IdempotencyLayer`] and its builder.
//!
//! ```
//! use idemgate_core::{Engine, MemoryStore};
//! use idemgate_tower::{IdempotencyLayer, policy::Routes};
//!
//! let layer = IdempotencyLayer::builder(Engine::builder(MemoryStore::default()).build())
//!     .routes(Routes::catch_all(true))
//!     .namespace("payments")
//!     .max_concurrent_requests(1_000)
//!     .build();
//! # let _ = layer;
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use idemgate_core::{Engine, Store};
use tokio::sync::Semaphore;
use tower_layer::Layer;

use crate::body::BodyBudget;
use crate::metrics::Signals;
use crate::observe::Observer;
use crate::policy::Routes;
use crate::service::Idempotency;

/// Adds Idempotency-Key semantics (PRODUCT §3) to an HTTP service. `Clone` and cheap to clone.
pub struct IdempotencyLayer<S> {
    shared: Arc<Shared<S>>,
}

/// What every clone of the layer and its services share.
pub(crate) struct Shared<S> {
    pub(crate) engine: Engine<S>,
    pub(crate) routes: Routes,
    pub(crate) namespace: String,
    pub(crate) response_timeout: Option<Duration>,
    pub(crate) limits: Limits,
    pub(crate) signals: Signals,
    pub(crate) observer: Option<Arc<dyn Observer>>,
}

/// The layer's resource limits (none by default).
#[derive(Clone, Debug, Default)]
pub(crate) struct Limits {
    /// Protected requests in progress at once.
    pub(crate) concurrent: Option<Arc<Semaphore>>,
    /// Bytes of protected request bodies held in memory at once.
    pub(crate) body_budget: Option<BodyBudget>,
}

impl<S> Clone for IdempotencyLayer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S> fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("namespace", &self.shared.namespace)
            .field("routes", &self.shared.routes)
            .finish_non_exhaustive()
    }
}

impl<S: Store> IdempotencyLayer<S> {
    /// A layer over `engine` with the routes to protect.
    pub fn new(engine: Engine<S>, routes: Routes) -> Self {
        Self::builder(engine).routes(routes).build()
    }

    /// A builder.
    pub fn builder(engine: Engine<S>) -> IdempotencyLayerBuilder<S> {
        IdempotencyLayerBuilder {
            engine,
            routes: Routes::catch_all(false),
            namespace: "default".into(),
            response_timeout: None,
            limits: Limits::default(),
            observer: None,
        }
    }

    /// The engine (for stats and admin access).
    pub fn engine(&self) -> &Engine<S> {
        &self.shared.engine
    }
}

/// Builds an [`IdempotencyLayer`].
pub struct IdempotencyLayerBuilder<S> {
    engine: Engine<S>,
    routes: Routes,
    namespace: String,
    response_timeout: Option<Duration>,
    limits: Limits,
    observer: Option<Arc<dyn Observer>>,
}

impl<S: fmt::Debug> fmt::Debug for IdempotencyLayerBuilder<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayerBuilder")
            .field("engine", &self.engine)
            .field("routes", &self.routes)
            .field("namespace", &self.namespace)
            .field("response_timeout", &self.response_timeout)
            .field("limits", &self.limits)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl<S: Store> IdempotencyLayerBuilder<S> {
    /// The protected routes (default: POST and PATCH everywhere, key optional).
    pub fn routes(mut self, routes: Routes) -> Self {
        self.routes = routes;
        self
    }

    /// The namespace of every record (default `default`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Longest time from dispatch to the end of the inner service's response body; past it the
    /// outcome is unknown (default: none).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = Some(timeout);
        self
    }

    /// Most protected requests in progress at once (across every clone of the layer); beyond it a
    /// protected request gets `503` + `Retry-After` at once (default: no limit).
    pub fn max_concurrent_requests(mut self, max: usize) -> Self {
        self.limits.concurrent = Some(Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))));
        self
    }

    /// Caps the bytes of protected request bodies held in memory at once: a request that cannot
    /// reserve its declared length (or, without one, its buffer's next growth) gets `503` +
    /// `Retry-After` and nothing is claimed (default: no cap).
    pub fn body_budget(mut self, budget: BodyBudget) -> Self {
        self.limits.body_budget = Some(budget);
        self
    }

    /// Calls `observer` once per protected request when it is answered (see
    /// [`crate::observe`]; default: none).
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Builds the layer, registering its metrics (see [`metrics`](crate::metrics): install the
    /// recorder first).
    pub fn build(self) -> IdempotencyLayer<S> {
        IdempotencyLayer {
            shared: Arc::new(Shared {
                engine: self.engine,
                signals: Signals::register(&self.routes),
                routes: self.routes,
                namespace: self.namespace,
                response_timeout: self.response_timeout,
                limits: self.limits,
                observer: self.observer,
            }),
        }
    }
}

impl<S, I> Layer<I> for IdempotencyLayer<S> {
    type Service = Idempotency<I, S>;

    fn layer(&self, inner: I) -> Self::Service {
        Idempotency::new(inner, self.shared.clone())
    }
}
