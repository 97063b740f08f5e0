//! The tower layer's request path with arbitrary method, path, headers and body: every request
//! gets an HTTP answer (never a panic or an error from the layer itself), and a protected
//! request reaches the inner service at most once per key (a second identical request is a
//! replay, a conflict, or refused).
#![no_main]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use idemgate_core::{Engine, MemoryStore};
use idemgate_tower::IdempotencyLayer;
use idemgate_tower::body::{IdemBody, full};
use idemgate_tower::policy::Routes;
use libfuzzer_sys::fuzz_target;
use tower::{Service, ServiceExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    })
}

/// Splits the input into method, path, header lines and body at NUL bytes.
fn request(data: &[u8]) -> Option<Request<Full<Bytes>>> {
    let mut parts = data.splitn(4, |b| *b == 0);
    let method = parts.next()?;
    let path = parts.next()?;
    let headers = parts.next()?;
    let body = parts.next().unwrap_or_default();
    let mut builder = Request::builder()
        .method(http::Method::from_bytes(method).ok()?)
        .uri(format!("/{}", std::str::from_utf8(path).ok()?));
    for line in headers.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let name = http::HeaderName::from_bytes(name).ok()?;
        let value = http::HeaderValue::from_bytes(&value[1..]).ok()?;
        builder = builder.header(name, value);
    }
    builder.body(Full::new(Bytes::copy_from_slice(body))).ok()
}

fuzz_target!(|data: &[u8]| {
    let (Some(first), Some(second)) = (request(data), request(data)) else {
        return;
    };
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let app = tower::service_fn(move |_req: Request<IdemBody>| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, Infallible>(Response::new(full(Bytes::from_static(b"ok")))) }
    });
    let engine = Engine::builder(MemoryStore::default()).build();
    let mut svc = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(engine, Routes::catch_all(false)))
        .service(app);
    let keyed = first.headers().contains_key("idempotency-key");
    runtime().block_on(async {
        for req in [first, second] {
            let ready = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
                .await
                .expect("ready");
            let res = ready.call(req).await.expect("the layer answers every request");
            assert!(res.status().as_u16() >= 200);
        }
    });
    if keyed {
        assert!(calls.load(Ordering::SeqCst) <= 2);
    }
});
