//! The example over a real socket against `idemgate check`'s engine: versions, `ETag`,
//! `If-Match` and `412` working together with idempotency keys, and every check passing with the
//! spec shipped beside the example.

#![allow(clippy::unwrap_used)]

use axum_payments::{Ledger, app};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioExecutor;
use idemgate_check::{CheckName, Checker, Config, Outcome, Spec};

async fn serve() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = app(Ledger::default());
    tokio::spawn(async move { axum::serve(listener, tower::make::Shared::new(svc)).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idemgate_check_passes_the_example() {
    let url = serve().await;
    let spec =
        Spec::from_toml_file(concat!(env!("CARGO_MANIFEST_DIR"), "/idemgate-check.toml")).unwrap();
    let report = Checker::new(spec, Config::new(url).seed(3).strict_marker(true))
        .unwrap()
        .run()
        .await
        .unwrap();
    let mut text = Vec::new();
    report.write_human(&mut text, false).unwrap();
    eprintln!("{}", String::from_utf8_lossy(&text));
    assert!(report.passed(), "{:?}", report.failed_checks());
    let precondition = report.case("set balance", CheckName::Precondition).unwrap();
    assert_eq!(precondition.outcome, Outcome::Passed);
    // No slow variant in this example; everything else ran.
    assert_eq!(
        report.count(Outcome::Skipped),
        3,
        "in-flight ×2, precondition of charge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_etags_and_if_match_work_with_idempotency_keys() {
    let url = serve().await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let send = |method: &str, key: Option<&str>, if_match: Option<&str>, body: &'static str| {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{url}/accounts/a"))
            .header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        if let Some(m) = if_match {
            req = req.header("if-match", m);
        }
        let req = req
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let client = client.clone();
        async move {
            let res = client.request(req).await.unwrap();
            let status = res.status();
            let etag = res
                .headers()
                .get("etag")
                .map(|v| v.to_str().unwrap().to_owned());
            let replayed = res.headers().contains_key("idempotent-replayed");
            (status, etag, replayed)
        }
    };
    let (status, etag, _) = send("GET", None, None, "").await;
    assert_eq!((status, etag.as_deref()), (StatusCode::OK, Some("\"0\"")));
    let (status, _, _) = send("PUT", Some("k1"), None, r#"{"balance":5}"#).await;
    assert_eq!(status, StatusCode::PRECONDITION_REQUIRED);
    let (status, etag, _) = send("PUT", Some("k2"), Some("\"0\""), r#"{"balance":5}"#).await;
    assert_eq!((status, etag.as_deref()), (StatusCode::OK, Some("\"1\"")));
    // The retry (same key, If-Match now stale) replays the success instead of 412.
    let (status, etag, replayed) = send("PUT", Some("k2"), Some("\"0\""), r#"{"balance":5}"#).await;
    assert_eq!(
        (status, etag.as_deref(), replayed),
        (StatusCode::OK, Some("\"1\""), true)
    );
    // Another update with that stale ETag: 412, and the current one in ETag.
    let (status, etag, _) = send("PUT", Some("k3"), Some("\"0\""), r#"{"balance":9}"#).await;
    assert_eq!(
        (status, etag.as_deref()),
        (StatusCode::PRECONDITION_FAILED, Some("\"1\""))
    );
    let (_, etag, _) = send("GET", None, None, "").await;
    assert_eq!(etag.as_deref(), Some("\"1\""));
    // Without a key: 400 from the idempotency layer, before the handler.
    let (status, _, _) = send("PUT", None, Some("\"1\""), r#"{"balance":9}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
