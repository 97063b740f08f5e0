//! Runs the example on 127.0.0.1:3001. Try:
//!
//! ```sh
//! curl -i -X POST localhost:3001/payments -H 'Idempotency-Key: 1' -H 'content-type: application/json' -d '{"amount":5}'
//! ```

use axum_payments::{Ledger, app};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    let svc = app(Ledger::default());
    axum::serve(listener, tower::make::Shared::new(svc)).await
}
