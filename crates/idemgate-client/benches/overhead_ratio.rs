//! The overhead ratio, measured so that a loaded machine does not skew it: the variants run in
//! interleaved batches (each round runs one batch of each, in a rotating order), and the ratio
//! is taken per round (batches of the same round ran under about the same load), then the median
//! over rounds. Prints a table; `benches/overhead.rs` is the same comparison in criterion form.
//!
//! `cargo bench -p idemgate-client --features reqwest,tower --bench overhead_ratio [-- ROUNDS BATCH]`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use idemgate_client::Policy;
use idemgate_client::reqwest::RetryMiddleware;
use idemgate_client::tower::{RequestBody, RetryLayer};
use tower::{Layer, Service, ServiceExt};

const BODY: &str = r#"{"sku":"tea","qty":1}"#;

fn server() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: Request<hyper::body::Incoming>| async move {
                            let _ = req.into_body().collect().await;
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(StatusCode::CREATED)
                                    .body(Full::new(Bytes::from_static(b"{\"id\":1}")))
                                    .unwrap(),
                            )
                        },
                    );
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

async fn created<B>(_req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .status(StatusCode::CREATED)
        .body(Full::new(Bytes::from_static(b"{\"id\":1}")))
        .unwrap())
}

fn request() -> Request<Full<Bytes>> {
    Request::post("http://shop.test/orders")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn quartiles(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 4], v[v.len() * 3 / 4])
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(40);
    let batch: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200);
    let addr = server();
    let url = format!("http://{addr}/orders");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let bare = reqwest::Client::new();
    let empty = reqwest_middleware::ClientBuilder::new(reqwest::Client::new()).build();
    let retrying = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(RetryMiddleware::new(Policy::new()))
        .build();
    let mut plain_svc = tower::service_fn(created::<Full<Bytes>>);
    let layered = RetryLayer::new(Policy::new()).layer(tower::service_fn(created::<RequestBody>));

    // Per variant, the mean time per request of each batch:
    // [bare reqwest, client, bare service, layer, empty middleware chain].
    let mut per: [Vec<f64>; 5] = Default::default();
    let mut ratio_chain = Vec::new();
    let mut ratio_http = Vec::new();
    let mut ratio_inproc = Vec::new();
    rt.block_on(async {
        // Warm up connections and code paths.
        for _ in 0..batch {
            bare.post(&url)
                .body(BODY)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            empty
                .post(&url)
                .body(BODY)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            retrying
                .post(&url)
                .body(BODY)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        }
        for round in 0..rounds {
            let mut this = [0f64; 5];
            for k in 0..5 {
                let v = (k + round) % 5;
                let start = Instant::now();
                for _ in 0..batch {
                    match v {
                        0 => {
                            bare.post(&url)
                                .body(BODY)
                                .send()
                                .await
                                .unwrap()
                                .bytes()
                                .await
                                .unwrap();
                        }
                        1 => {
                            retrying
                                .post(&url)
                                .body(BODY)
                                .send()
                                .await
                                .unwrap()
                                .bytes()
                                .await
                                .unwrap();
                        }
                        2 => {
                            plain_svc.call(request()).await.unwrap();
                        }
                        4 => {
                            empty
                                .post(&url)
                                .body(BODY)
                                .send()
                                .await
                                .unwrap()
                                .bytes()
                                .await
                                .unwrap();
                        }
                        _ => {
                            layered.clone().oneshot(request()).await.unwrap();
                        }
                    }
                }
                this[v] = start.elapsed().as_secs_f64() / batch as f64;
            }
            for v in 0..5 {
                per[v].push(this[v]);
            }
            ratio_http.push(this[1] / this[0]);
            ratio_chain.push(this[4] / this[0]);
            ratio_inproc.push(this[3] - this[2]);
        }
    });
    let us = |s: f64| s * 1e6;
    let names = [
        "loopback POST, bare reqwest",
        "loopback POST, reqwest + RetryMiddleware",
        "in-process, bare tower service",
        "in-process, RetryLayer",
        "loopback POST, reqwest-middleware, empty chain",
    ];
    println!(
        "{rounds} rounds × {batch} requests per variant (interleaved); per-request time, median [p25, p75]:"
    );
    for (name, v) in names.iter().zip(per.iter_mut()) {
        let m = median(v);
        let (lo, hi) = quartiles(v);
        println!(
            "  {name:<42} {:>8.2} µs [{:.2}, {:.2}]",
            us(m),
            us(lo),
            us(hi)
        );
    }
    let r = median(&mut ratio_http);
    let (lo, hi) = quartiles(&mut ratio_http);
    println!("overhead ratio (client / bare reqwest, per round): median {r:.3} [{lo:.3}, {hi:.3}]");
    let r = median(&mut ratio_chain);
    let (lo, hi) = quartiles(&mut ratio_chain);
    println!(
        "  of which reqwest-middleware's own chain (empty chain / bare reqwest): median {r:.3} [{lo:.3}, {hi:.3}]"
    );
    let d = median(&mut ratio_inproc);
    let (lo, hi) = quartiles(&mut ratio_inproc);
    println!(
        "client cost without I/O (layer − bare service, per round): median {:.2} µs [{:.2}, {:.2}]",
        us(d),
        us(lo),
        us(hi)
    );
    let _ = Duration::ZERO;
}
