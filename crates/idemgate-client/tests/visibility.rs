//! What an operator sees: one `tracing` span per attempt (attempt number, delay, reason), and
//! the `metrics` counters (attempts, retries, budget exhausted, breaker state changes,
//! operations). A capturing subscriber and recorder, on a paused current-thread runtime.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use idemgate_client::breaker::BreakerConfig;
use idemgate_client::budget::BudgetConfig;
use idemgate_client::tower::{RequestBody, RetryLayer};
use idemgate_client::{Policy, PolicyBuilder, RetryInfo};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use tower::{Layer, ServiceExt};
use tracing_subscriber::layer::{Context, SubscriberExt};

// ---------------------------------------------------------------- a capturing recorder

#[derive(Default, Clone)]
struct Counters(Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>);

struct Cell(Arc<AtomicU64>);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl Counters {
    /// The sum of the counters named `name` whose labels include every `k=v` of `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| {
                k.starts_with(&format!("{name}{{"))
                    && labels.iter().all(|(l, v)| k.contains(&format!("{l}={v},")))
            })
            .map(|(_, c)| c.load(Ordering::SeqCst))
            .sum()
    }
}

impl Recorder for Counters {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut id = format!("{}{{", key.name());
        for l in key.labels() {
            id.push_str(&format!("{}={},", l.key(), l.value()));
        }
        id.push('}');
        let cell = self.0.lock().unwrap().entry(id).or_default().clone();
        Counter::from_arc(Arc::new(Cell(cell)))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

// ---------------------------------------------------------------- a capturing tracing layer

/// A span's name and its fields.
type SpanRecord = (String, HashMap<String, String>);

#[derive(Default, Clone)]
struct Spans(Arc<Mutex<Vec<SpanRecord>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        _: Context<'_, S>,
    ) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_owned(), fields));
    }
}

// ---------------------------------------------------------------- the scenario

fn run<T>(f: impl std::future::Future<Output = T>) -> (T, Counters, Spans) {
    let counters = Counters::default();
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry()
        .with(spans.clone())
        .with(tracing_subscriber::filter::LevelFilter::DEBUG);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let out = tracing::subscriber::with_default(subscriber, || {
        metrics::with_local_recorder(&counters, || rt.block_on(f))
    });
    (out, counters, spans)
}

/// Sends one POST through `policy` to a server answering `statuses` in turn (the last repeats).
async fn op(policy: &Policy, statuses: &'static [u16]) -> Option<RetryInfo> {
    let n = Arc::new(AtomicUsize::new(0));
    let server = tower::service_fn(move |_req: Request<RequestBody>| {
        let i = n.fetch_add(1, Ordering::SeqCst).min(statuses.len() - 1);
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(statuses[i])
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        }
    });
    let req = Request::post("http://shop.test/orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let res = RetryLayer::new(policy.clone())
        .layer(server)
        .oneshot(req)
        .await
        .ok()?;
    res.extensions().get::<RetryInfo>().cloned()
}

fn policy(b: PolicyBuilder) -> Policy {
    b.seed(5).build().unwrap()
}

#[test]
fn a_span_per_attempt_with_number_delay_and_reason() {
    let (info, _, spans) =
        run(async { op(&policy(Policy::builder()), &[503, 201]).await.unwrap() });
    let spans = spans.0.lock().unwrap();
    let attempts: Vec<_> = spans
        .iter()
        .filter(|(n, _)| n == "idemgate_client.attempt")
        .collect();
    assert_eq!(attempts.len(), 2, "{spans:?}");
    let (_, first) = attempts[0];
    let (_, second) = attempts[1];
    assert_eq!(first["attempt"], "1");
    assert_eq!(first["reason"], "first");
    assert_eq!(first["delay_ms"], "0");
    assert_eq!(second["attempt"], "2");
    assert_eq!(second["reason"], "status 503");
    assert_eq!(
        second["delay_ms"],
        info.log[1].delay.as_millis().to_string()
    );
    assert_eq!(first["key"], info.key.clone().unwrap());
    assert_eq!(first["host"], "http://shop.test:80");
}

#[test]
fn counters_for_attempts_retries_budget_and_breaker() {
    let ((), counters, _) = run(async {
        let p = policy(Policy::builder());
        op(&p, &[503, 503, 201]).await.unwrap();
        // An empty budget: the retry is refused.
        let dry = policy(Policy::builder().budget(BudgetConfig::default().capacity(0.0)));
        op(&dry, &[503]).await.unwrap();
        // Two failures in a row open the breaker; the next operation is refused.
        let fragile = policy(
            Policy::builder()
                .max_attempts(1)
                .breaker(BreakerConfig::default().consecutive_failures(2)),
        );
        for _ in 0..3 {
            op(&fragile, &[503]).await;
        }
    });
    let host = ("host", "http://shop.test:80");
    assert_eq!(
        counters.get("idemgate_client_attempts_total", &[host]),
        3 + 1 + 2
    );
    assert_eq!(
        counters.get("idemgate_client_retries_total", &[("reason", "status")]),
        2
    );
    assert_eq!(
        counters.get("idemgate_client_budget_exhausted_total", &[host]),
        1
    );
    assert_eq!(
        counters.get(
            "idemgate_client_breaker_transitions_total",
            &[("from", "closed"), ("to", "open")]
        ),
        1
    );
    assert_eq!(
        counters.get("idemgate_client_circuit_rejections_total", &[host]),
        1
    );
    assert_eq!(
        counters.get("idemgate_client_operations_total", &[("stop", "answered")]),
        1
    );
    assert_eq!(
        counters.get(
            "idemgate_client_operations_total",
            &[("stop", "budget_exhausted")]
        ),
        1
    );
    assert_eq!(
        counters.get(
            "idemgate_client_operations_total",
            &[("stop", "circuit_open")]
        ),
        1
    );
}

#[test]
fn rejections_by_an_open_breaker_between_attempts_and_body_errors_are_counted() {
    // Review m8.
    let ((), counters, _) = run(async {
        let fragile = policy(
            Policy::builder().no_budget().breaker(
                BreakerConfig::default()
                    .consecutive_failures(1)
                    .open_for(std::time::Duration::from_secs(10)),
            ),
        );
        // Three attempts, then the failed operation opens the breaker.
        op(&fragile, &[503]).await.unwrap();
        tokio::time::advance(std::time::Duration::from_secs(10)).await;
        // The probe fails and reopens it: its retry is refused by the breaker.
        let info = op(&fragile, &[503]).await.unwrap();
        assert_eq!(
            (info.attempts, info.stop),
            (1, idemgate_client::Stop::CircuitOpen)
        );
        // A request body that cannot be read: the operation ends before any attempt.
        let broken = http_body_util::StreamBody::new(futures_util::stream::iter([Err::<
            http_body::Frame<Bytes>,
            std::io::Error,
        >(
            std::io::Error::other("the caller's body broke"),
        )]));
        let svc = tower::service_fn(|_req: Request<RequestBody>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        });
        let err = RetryLayer::new(fragile.clone())
            .layer(svc)
            .oneshot(
                Request::post("http://shop.test/orders")
                    .body(broken)
                    .unwrap(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.kind(), idemgate_client::ErrorKind::RequestBody);
    });
    let host = ("host", "http://shop.test:80");
    assert_eq!(
        counters.get("idemgate_client_circuit_rejections_total", &[host]),
        1
    );
    assert_eq!(
        counters.get(
            "idemgate_client_operations_total",
            &[host, ("stop", "circuit_open")]
        ),
        1
    );
    assert_eq!(
        counters.get(
            "idemgate_client_operations_total",
            &[host, ("stop", "request_body")]
        ),
        1
    );
}
