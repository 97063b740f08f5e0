//! Runs the example on 127.0.0.1:3001, on the store named by `IDEMGATE_STORE` (default
//! `memory://`; `redis://127.0.0.1:6379` or `postgres://…` to share keys between several
//! instances, with cross-instance wake-ups and the replay cache). Try:
//!
//! ```sh
//! curl -i -X POST localhost:3001/payments -H 'Idempotency-Key: 1' -H 'content-type: application/json' -d '{"amount":5}'
//! curl -i localhost:3001/accounts/a    # ETag: "0"
//! curl -i -X PUT localhost:3001/accounts/a -H 'Idempotency-Key: 2' -H 'If-Match: "0"' -H 'content-type: application/json' -d '{"balance":5}'
//! ```
//!
//! and check it: `idemgate check --target http://127.0.0.1:3001 --spec examples/axum-payments/idemgate-check.toml`.

use std::time::Duration;

use axum_payments::{Ledger, app_on};
use idemgate_stores::{StackOptions, connect};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("IDEMGATE_STORE").unwrap_or_else(|_| "memory://".into());
    let options = StackOptions {
        deadline: Duration::from_secs(3),
        replay_cache_entries: 100_000,
    };
    // Keep `store` alive while serving: it owns the follower of the completion feed.
    let store = connect(&url, &options, |b| b).await?;
    for w in &store.warnings {
        eprintln!("store warning: {w}");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    axum::serve(listener, app_on(Ledger::default(), store.engine.clone())).await?;
    Ok(())
}
