//! Creates orders through idemgate with the retrying client and prints each one's attempt log.
//!
//! Start the demo (the demo API behind idemgate on 127.0.0.1:8080) in one terminal:
//!
//! ```sh
//! ./scripts/run-demo.sh
//! ```
//!
//! then, in another:
//!
//! ```sh
//! cargo run -p idemgate-client --features reqwest --example create_orders -- \
//!     [BASE_URL (default http://127.0.0.1:8080)] [ORDERS (default 3)] [PATH (default /orders?fail_first=2)]
//! ```
//!
//! The default path asks the demo API to fail the first two attempts of every key with `503`:
//! each order takes three attempts, all with the same `Idempotency-Key`, and runs once. Try
//! `/orders?truncate=1` (the API breaks its connection after creating the order: idemgate says
//! outcome-unknown, the client does not retry and names the key to reconcile) or
//! `/orders?delay_ms=3000` (with `--concurrency reject` on idemgate, a slow API: the client's
//! attempt times out at 1 s, the retry gets `409` in flight, waits as told, and gets the replay).

use std::time::Duration;

use idemgate_client::reqwest::{RetryMiddleware, client_error};
use idemgate_client::{Error, Policy, RetryInfo};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let orders: u32 = args.next().map_or(Ok(3), |n| n.parse())?;
    let path = args.next().unwrap_or_else(|| "/orders?fail_first=2".into());
    let url = format!("{}{path}", base.trim_end_matches('/'));

    let policy = Policy::builder()
        .base_delay(Duration::from_millis(200))
        .attempt_timeout(Duration::from_secs(1))
        .max_attempts(4)
        .build()?;
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new(policy))
        .build();

    for n in 1..=orders {
        let body = format!(r#"{{"order":{n},"sku":"tea","qty":{n}}}"#);
        match client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
        {
            Ok(res) => {
                let status = res.status();
                let info = res.extensions().get::<RetryInfo>().cloned();
                let text = res.text().await.unwrap_or_default();
                println!("order {n}: {status}");
                if let Some(info) = info {
                    print_info(&info);
                }
                println!("  body: {}", text.trim_end());
            }
            Err(err) => match client_error(&err) {
                Some(Error::OutcomeUnknown { key, info, .. }) => {
                    println!("order {n}: outcome unknown — reconcile by Idempotency-Key {key}");
                    print_info(info);
                }
                Some(e) => {
                    println!("order {n}: {e} ({})", e.kind().as_str());
                    if let Some(info) = e.info() {
                        print_info(info);
                    }
                }
                None => println!("order {n}: {err}"),
            },
        }
    }
    Ok(())
}

fn print_info(info: &RetryInfo) {
    println!(
        "  {} attempt(s), key {} ({}), replay: {}, stopped: {}",
        info.attempts,
        info.key.as_deref().unwrap_or("-"),
        if info.key_generated {
            "generated"
        } else {
            "caller's"
        },
        info.replayed,
        info.stop.as_str(),
    );
    for attempt in &info.log {
        println!("    {attempt}");
    }
}
