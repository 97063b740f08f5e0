//! An axum payments API made safe to retry in-process with `idemgate-tower`.
//!
//! [`app`] builds the service: an axum `Router` wrapped in [`IdempotencyLayer`] (the layer goes
//! around the whole router, so it sees every request before routing), with errors turned into
//! responses so that `axum::serve` can run it.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::{Request, Response, StatusCode};
use axum::routing::post;
use idemgate_core::{Engine, MemoryStore};
use idemgate_tower::IdempotencyLayer;
use idemgate_tower::body::{BoxError, IdemBody};
use idemgate_tower::policy::{RoutePolicy, Routes};
use serde_json::{Value, json};
use tower::ServiceExt;

/// Counts charges, to show that retries do not charge twice.
#[derive(Clone, Default)]
pub struct Ledger(Arc<AtomicU64>);

impl Ledger {
    /// Charges made so far.
    pub fn charges(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

async fn charge(
    State(ledger): State<Ledger>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let n = ledger.0.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        Json(json!({ "charge": n, "amount": body["amount"] })),
    )
}

/// The service: `POST /payments` requires an `Idempotency-Key`.
pub fn app(
    ledger: Ledger,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<Body>, Infallible>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    let router = axum::Router::new()
        .route("/payments", post(charge))
        .with_state(ledger);
    let engine = Engine::builder(MemoryStore::default()).build();
    let routes = Routes::new(vec![
        RoutePolicy::new("payments", "/payments").required(true),
    ]);
    tower::ServiceBuilder::new()
        // Only failures reading the client's request body become errors; answer them.
        .layer(HandleErrorLayer::new(|e: BoxError| async move {
            (StatusCode::BAD_REQUEST, e.to_string())
        }))
        .map_request(|req: Request<Body>| req.map(idemgate_tower::body::boxed))
        .layer(IdempotencyLayer::new(engine, routes))
        .service(router.map_request(|req: Request<IdemBody>| req.map(Body::new)))
}
