use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use crate::Policy;
use crate::classify::TransportFailure;

use super::service::Retry;

/// How the inner service's errors are classified.
pub(crate) type Classifier =
    Arc<dyn Fn(&(dyn std::error::Error + 'static)) -> TransportFailure + Send + Sync>;

/// Applies a [`Policy`] to an inner HTTP client service. See the [module docs](super).
#[derive(Clone)]
pub struct RetryLayer {
    pub(crate) policy: Policy,
    pub(crate) classify: Classifier,
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl RetryLayer {
    /// A layer applying `policy` (clones of the layer and its services share the policy's
    /// per-host budgets and breakers).
    pub fn new(policy: Policy) -> Self {
        Self {
            policy,
            classify: Arc::new(TransportFailure::of_error),
        }
    }

    /// Classifies the inner service's errors with `f` (default
    /// [`TransportFailure::of_error`]).
    pub fn classify_errors(
        mut self,
        f: impl Fn(&(dyn std::error::Error + 'static)) -> TransportFailure + Send + Sync + 'static,
    ) -> Self {
        self.classify = Arc::new(f);
        self
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: self.policy.clone(),
            classify: self.classify.clone(),
        }
    }
}
