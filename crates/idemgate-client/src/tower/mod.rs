//! The tower layer (feature `tower`): the same policy in front of any
//! `Service<http::Request<RequestBody>>` — a hyper-util client, a tonic channel, a test service.
//!
//! [`RetryLayer`] wraps an inner HTTP client service. Each call resolves the key (the caller's,
//! or a generated one), buffers the body up to the policy's cap, and runs the attempts; the
//! response carries a [`RetryInfo`](crate::RetryInfo) extension. The inner service's errors are
//! classified by [`TransportFailure::of_error`](crate::classify::TransportFailure::of_error)
//! unless a classifier is given with [`RetryLayer::classify_errors`].
//!
//! The inner service receives `http::Request<`[`RequestBody`]`>`. A client with its own body
//! type (a tonic `Channel` takes `tonic::body::Body`) gets it through tower's `map_request`,
//! e.g. `ServiceBuilder::new().layer(retry).map_request(|r: Request<RequestBody>|
//! r.map(tonic::body::Body::new)).service(channel)`. Classification is by HTTP status and
//! transport error: a gRPC status carried in trailers is not looked at.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use std::convert::Infallible;
//! use std::sync::{Arc, atomic::{AtomicU32, Ordering}};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use idemgate_client::{Policy, RetryInfo, tower::{RequestBody, RetryLayer}};
//! use tower::{Layer, Service, ServiceExt};
//!
//! // A server that fails twice, then succeeds.
//! let calls = Arc::new(AtomicU32::new(0));
//! let seen = calls.clone();
//! let server = tower::service_fn(move |req: Request<RequestBody>| {
//!     let n = seen.fetch_add(1, Ordering::SeqCst);
//!     assert!(req.headers().contains_key("idempotency-key"));
//!     async move {
//!         let status = if n < 2 { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::CREATED };
//!         Ok::<_, Infallible>(Response::builder().status(status).body(Full::new(Bytes::new())).unwrap())
//!     }
//! });
//! let policy = Policy::builder().base_delay(std::time::Duration::from_millis(1)).build()?;
//! let client = RetryLayer::new(policy).layer(server);
//! let res = client.oneshot(Request::post("http://api.test/orders").body(Full::new(Bytes::from("{}")))?).await?;
//! assert_eq!(res.status(), StatusCode::CREATED);
//! let info = res.extensions().get::<RetryInfo>().unwrap();
//! assert_eq!(info.attempts, 3);
//! assert!(info.key.is_some());
//! # Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
//! # }).unwrap();
//! ```

mod body;
mod layer;
mod service;

pub use body::{RequestBody, ResponseBody};
pub use layer::RetryLayer;
pub use service::{ResponseFuture, Retry};
