//! Runs the example on 127.0.0.1:3001. Try:
//!
//! ```sh
//! curl -i -X POST localhost:3001/payments -H 'Idempotency-Key: 1' -H 'content-type: application/json' -d '{"amount":5}'
//! curl -i localhost:3001/accounts/a    # ETag: "0"
//! curl -i -X PUT localhost:3001/accounts/a -H 'Idempotency-Key: 2' -H 'If-Match: "0"' -H 'content-type: application/json' -d '{"balance":5}'
//! ```
//!
//! and check it: `idemgate check --target http://127.0.0.1:3001 --spec examples/axum-payments/idemgate-check.toml`.

use axum_payments::{Ledger, app};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    let svc = app(Ledger::default());
    axum::serve(listener, tower::make::Shared::new(svc)).await
}
