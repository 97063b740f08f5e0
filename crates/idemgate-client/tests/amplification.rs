//! The amplification figure: with the server failing 100 % of requests, how many requests does
//! the server see per logical request, with and without the retry budget and the circuit
//! breaker? Deterministic: tokio's paused clock and a fixed seed, an in-process server.
//!
//! Scenario: 1000 logical POSTs, one every 50 ms (a 50 s outage at 20 requests/s, each request
//! its own task, so operations overlap during their backoff and the breaker's 10 s open period
//! passes five times), the default policy otherwise (3 attempts, 500 ms full-jitter backoff,
//! AWS standard budget, default breaker).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use idemgate_client::tower::{RequestBody, RetryLayer};
use idemgate_client::{Policy, PolicyBuilder};
use tower::{Layer, ServiceExt};

const LOGICAL: usize = 1000;
const INTERVAL: Duration = Duration::from_millis(50);

async fn amplification(policy: PolicyBuilder) -> f64 {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let server = tower::service_fn(move |_req: Request<RequestBody>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
        }
    });
    let client = RetryLayer::new(policy.seed(1).build().unwrap()).layer(server);
    let mut tasks = Vec::with_capacity(LOGICAL);
    for _ in 0..LOGICAL {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::post("http://orders.test/orders")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            // An answer (503) or an error (circuit open): either way one logical request.
            let _ = client.oneshot(req).await;
        }));
        tokio::time::sleep(INTERVAL).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    seen.load(Ordering::SeqCst) as f64 / LOGICAL as f64
}

#[tokio::test(start_paused = true)]
async fn amplification_under_a_full_outage() {
    let none = amplification(Policy::builder().no_budget().no_breaker()).await;
    let budget = amplification(Policy::builder().no_breaker()).await;
    let breaker = amplification(Policy::builder().no_budget()).await;
    let both = amplification(Policy::builder()).await;
    eprintln!("server requests per logical request, server failing 100 %, {LOGICAL} requests:");
    eprintln!("  budget off, breaker off: {none:.3}");
    eprintln!("  budget on,  breaker off: {budget:.3}");
    eprintln!("  budget off, breaker on:  {breaker:.3}");
    eprintln!("  budget on,  breaker on:  {both:.3}");
    // Without either: every operation makes its 3 attempts.
    assert_eq!(none, 3.0);
    // The budget alone: 500 tokens / 5 per retry = exactly 100 retries, then none.
    assert_eq!(budget, (LOGICAL + 100) as f64 / LOGICAL as f64);
    // Both: the goal of issue 12 is at most 1.1.
    assert!(both <= 1.1, "{both}");
    assert!(breaker <= 1.1, "{breaker}");
}
