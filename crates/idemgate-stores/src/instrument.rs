//! A deadline and metrics around every store operation, as a [`StoreHook`].

use std::future::Future;
use std::time::{Duration, Instant};

use futures_util::future::Either;
use idemgate_core::hook::{Hooked, Operation, StoreHook};
use idemgate_core::{ErrorKind, SharedStore, StoreError};
use tracing::Instrument;

use crate::metrics::{STORE_ERRORS, STORE_OPERATION_SECONDS};

/// A store with every operation bounded by a deadline (so a slow or partitioned store is an
/// error within it, never a hang: `503` for a request, a retry for a renewal) and timed into
/// `idemgate_store_operation_seconds{op}`, with errors counted in
/// `idemgate_store_errors_total{op,kind}`.
///
/// A write that misses its deadline may still have been applied: as the
/// [`Store`](idemgate_core::Store) contract says for `Timeout`, callers assume neither (a claim
/// that landed unheard is an orphan lease that expires after the lease; a completion is retried
/// under the lease).
pub type Instrumented = Hooked<SharedStore, Instrumentation>;

/// The hook of [`Instrumented`].
pub struct Instrumentation {
    deadline: Duration,
    /// One histogram handle per operation, registered once (a lookup by name and labels on
    /// every call showed in profiles).
    latency: [metrics::Histogram; Operation::ALL.len()],
}

impl std::fmt::Debug for Instrumentation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instrumentation")
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// Wraps `store` with a deadline per operation. Call it after the metrics recorder is installed
/// (handles registered before go nowhere).
pub fn instrumented(store: SharedStore, deadline: Duration) -> Instrumented {
    let latency =
        Operation::ALL.map(|op| metrics::histogram!(STORE_OPERATION_SECONDS, "op" => op.as_str()));
    // Every error series exists at zero from the start.
    for op in Operation::ALL {
        for kind in ErrorKind::ALL {
            let _ = metrics::counter!(STORE_ERRORS, "op" => op.as_str(), "kind" => kind.as_str());
        }
    }
    Hooked::wrap(store, Instrumentation { deadline, latency })
}

impl StoreHook for Instrumentation {
    fn around<T, F>(
        &self,
        op: Operation,
        call: F,
    ) -> impl Future<Output = Result<T, StoreError>> + Send
    where
        T: Send,
        F: Future<Output = Result<T, StoreError>> + Send,
    {
        // A child of the request's span, timing this round trip, when tracing asks for it
        // (`idemgate serve --otel`). Disabled (the default), it costs a level comparison, and
        // the operation's future is the untraced one: no byte larger (the store's futures are
        // boxed per call, and a larger box costs more than the span).
        let span = tracing::debug_span!("store",
            otel.name = %format_args!("store {}", op.as_str()),
            idemgate.store.operation = op.as_str(),
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let timed = self.timed(op, call);
        if span.is_disabled() {
            Either::Left(timed)
        } else {
            Either::Right(Box::pin(traced(timed, span)))
        }
    }
}

impl Instrumentation {
    /// `call` within the deadline, timed and counted.
    async fn timed<T, F>(&self, op: Operation, call: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>>,
    {
        let start = Instant::now();
        let out = match tokio::time::timeout(self.deadline, call).await {
            Ok(out) => out,
            Err(_) => Err(StoreError::new(
                ErrorKind::Timeout,
                format!(
                    "store operation {} did not answer within {:?}",
                    op.as_str(),
                    self.deadline
                ),
            )),
        };
        self.latency[op as usize].record(start.elapsed().as_secs_f64());
        if let Err(e) = &out {
            metrics::counter!(
                STORE_ERRORS,
                "op" => op.as_str(),
                "kind" => e.kind().as_str()
            )
            .increment(1);
        }
        out
    }
}

/// `timed` in `span`, which records a failure's kind.
async fn traced<T>(
    timed: impl Future<Output = Result<T, StoreError>>,
    span: tracing::Span,
) -> Result<T, StoreError> {
    let out = timed.instrument(span.clone()).await;
    if let Err(e) = &out {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", e.kind().as_str());
    }
    out
}
