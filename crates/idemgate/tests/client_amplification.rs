//! The amplification figure through the real `idemgate serve`: an upstream that answers `503` to
//! every request (idemgate passes it through and releases the key, so every resend reaches the
//! upstream), 1000 logical POSTs from 10 concurrent tasks with idemgate-client's reqwest
//! middleware. Requests the upstream saw per logical request, with and without the retry budget
//! and the circuit breaker. (The deterministic version, on a paused clock, is
//! `crates/idemgate-client/tests/amplification.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Proxy, Upstream};
use idemgate_client::reqwest::RetryMiddleware;
use idemgate_client::{Policy, PolicyBuilder};

const TASKS: usize = 10;
const PER_TASK: usize = 100;
const LOGICAL: usize = TASKS * PER_TASK;

async fn amplification(up: &Upstream, proxy: &Proxy, policy: PolicyBuilder) -> f64 {
    // Short delays keep the run quick; the breaker's open period stays the default 10 s.
    let policy = policy
        .base_delay(Duration::from_millis(2))
        .max_delay(Duration::from_millis(20))
        .build()
        .unwrap();
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new(policy))
        .build();
    let before = up.state.started();
    let url = proxy.url("/orders?status=503");
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..PER_TASK {
                // A 503 after the last attempt, or a circuit-open error: one logical request.
                let _ = client.post(&url).body("{}").send().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (up.state.started() - before) as f64 / LOGICAL as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amplification_through_idemgate_under_a_full_outage() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let none = amplification(&up, &proxy, Policy::builder().no_budget().no_breaker()).await;
    let budget = amplification(&up, &proxy, Policy::builder().no_breaker()).await;
    let breaker = amplification(&up, &proxy, Policy::builder().no_budget()).await;
    let both = amplification(&up, &proxy, Policy::builder()).await;
    eprintln!(
        "upstream requests per logical request through idemgate (upstream 100 % 503, {LOGICAL} requests, {TASKS} tasks):"
    );
    eprintln!("  budget off, breaker off: {none:.3}");
    eprintln!("  budget on,  breaker off: {budget:.3}");
    eprintln!("  budget off, breaker on:  {breaker:.3}");
    eprintln!("  budget on,  breaker on:  {both:.3}");
    assert_eq!(none, 3.0);
    assert!(budget <= 1.1, "{budget}");
    assert!(both <= 1.1, "{both}");
}
