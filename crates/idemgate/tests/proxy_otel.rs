//! Traces: `idemgate serve --otel` against a real OTLP/HTTP receiver (in this process: an HTTP
//! server taking `POST /v1/traces` with `application/x-protobuf` bodies, decoded as OTLP's
//! `ExportTraceServiceRequest`), and an upstream that records the `traceparent` it receives.
//! Without `--otel`, nothing reaches the receiver even with `OTEL_EXPORTER_OTLP_ENDPOINT` set.

#![cfg(feature = "otel")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Http, Proxy};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use tokio::sync::Notify;

/// A credential the client sends in `Authorization` (the default scope header): it must appear
/// in no span.
const SECRET: &str = "Bearer s3cret-token-never-exported";

/// Serves `handle` on `listener`, one task per connection, until the test ends.
fn serve<F, Fut>(listener: tokio::net::TcpListener, handle: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handle = handle.clone();
                    async move { Ok::<_, Infallible>(handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

/// What the OTLP receiver got.
#[derive(Default)]
struct Received {
    /// Decoded export requests.
    exports: Vec<ExportTraceServiceRequest>,
    /// Requests that were not an OTLP/HTTP protobuf trace export (method, path, content type).
    malformed: Vec<String>,
    /// Connections accepted.
    connections: usize,
    /// The `x-otlp-token` header of each request (set by `OTEL_EXPORTER_OTLP_HEADERS`).
    tokens: Vec<Option<String>>,
}

/// An OTLP/HTTP trace receiver on loopback.
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    /// Signalled on every connection and every request.
    activity: Arc<Notify>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Received::default()));
        let activity = Arc::new(Notify::new());
        let (sink, signal) = (received.clone(), activity.clone());
        // Accepts itself (to count connections), then serves OTLP/HTTP.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<tokio::net::TcpStream>();
        tokio::spawn({
            let (sink, signal) = (sink.clone(), signal.clone());
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    sink.lock().unwrap().connections += 1;
                    signal.notify_waiters();
                    if tx.send(stream).is_err() {
                        return;
                    }
                }
            }
        });
        tokio::spawn(async move {
            let mut rx = rx;
            while let Some(stream) = rx.recv().await {
                let (sink, signal) = (sink.clone(), signal.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (sink, signal) = (sink.clone(), signal.clone());
                        async move { Ok::<_, Infallible>(otlp_export(req, &sink, &signal).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            received,
            activity,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received, with its resource's attributes.
    fn spans(&self) -> Vec<(Vec<KeyValue>, opentelemetry_proto::tonic::trace::v1::Span)> {
        let received = self.received.lock().unwrap();
        let mut spans = Vec::new();
        for export in &received.exports {
            for rs in &export.resource_spans {
                let resource = rs
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for span in &ss.spans {
                        spans.push((resource.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }
}

/// One OTLP/HTTP export: `POST /v1/traces`, `application/x-protobuf`, an
/// `ExportTraceServiceRequest`; answered with an empty `ExportTraceServiceResponse` (full
/// success), or `400` for anything else.
async fn otlp_export(
    req: Request<Incoming>,
    sink: &Mutex<Received>,
    signal: &Notify,
) -> Response<Full<Bytes>> {
    let content_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let what = format!("{} {} {content_type}", req.method(), req.uri().path());
    let token = req
        .headers()
        .get("x-otlp-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    sink.lock().unwrap().tokens.push(token);
    let ok_head = req.method() == Method::POST
        && req.uri().path() == "/v1/traces"
        && content_type == "application/x-protobuf";
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let decoded = match (ok_head, body) {
        (true, Ok(body)) => ExportTraceServiceRequest::decode(body).ok(),
        _ => None,
    };
    let res = {
        let mut received = sink.lock().unwrap();
        match decoded {
            Some(export) => {
                received.exports.push(export);
                Response::builder()
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Full::new(Bytes::from(
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )))
                    .unwrap()
            }
            None => {
                received.malformed.push(what);
                Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            }
        }
    };
    signal.notify_waiters();
    res
}

/// An upstream that answers `201 {"ok":true}` and records, per `Idempotency-Key` (or path,
/// without one), the `traceparent` it received.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<HashMap<String, Vec<Option<String>>>>>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(HashMap::<String, Vec<Option<String>>>::new()));
        let sink = seen.clone();
        serve(listener, move |req: Request<Incoming>| {
            let sink = sink.clone();
            async move {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let who = header("idempotency-key").unwrap_or_else(|| req.uri().path().to_owned());
                let traceparent = header("traceparent");
                sink.lock()
                    .unwrap()
                    .entry(who)
                    .or_default()
                    .push(traceparent);
                let _ = req.into_body().collect().await;
                Response::builder()
                    .status(StatusCode::CREATED)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(b"{\"ok\":true}")))
                    .unwrap()
            }
        });
        Self { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `traceparent`s received with `who` (a key, or a path).
    fn traceparents(&self, who: &str) -> Vec<Option<String>> {
        self.seen
            .lock()
            .unwrap()
            .get(who)
            .cloned()
            .unwrap_or_default()
    }
}

/// `(trace id, parent span id)` of a W3C `traceparent` value.
fn parse_traceparent(value: &str) -> (String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {value:?}");
    assert_eq!(parts[0], "00", "traceparent version in {value:?}");
    (parts[1].to_owned(), parts[2].to_owned())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The attribute `key` of a span or resource, as a string (ints formatted).
fn attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    let value = attrs.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Sends SIGTERM and waits (bounded) for a clean exit.
async fn stop(proxy: Proxy) -> Proxy {
    proxy.sigterm();
    let (status, proxy) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || {
            let mut proxy = proxy;
            let status = proxy.child.wait().unwrap();
            (status, proxy)
        }),
    )
    .await
    .expect("idemgate did not exit within 30 s of SIGTERM")
    .unwrap();
    assert!(status.success(), "exit status {status:?}");
    proxy
}

async fn post(http: &Http, url: &str, key: &str, traceparent: Option<&str>) -> common::Answer {
    let mut headers = vec![
        ("idempotency-key", HeaderValue::from_str(key).unwrap()),
        ("content-type", HeaderValue::from_static("application/json")),
        ("authorization", HeaderValue::from_static(SECRET)),
    ];
    if let Some(tp) = traceparent {
        headers.push(("traceparent", HeaderValue::from_str(tp).unwrap()));
    }
    http.send(Method::POST, url, &headers, b"{\"amount\":5}")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_exports_a_span_per_request_with_store_children_and_propagates_traceparent() {
    let receiver = Receiver::start().await;
    let up = Upstream::start().await;
    let proxy = Proxy::start_with_env(
        &up.url(),
        "memory://",
        &["--otel"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url().as_str()),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-otlp-token=t0ken"),
            // No scheduled export during the test: what arrives was flushed at shutdown.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ],
    );
    let http = Http::default();
    let (k1, k2) = ("otel-first", "otel-parented");
    let first = post(&http, &proxy.url("/pay"), k1, None).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let replay = post(&http, &proxy.url("/pay"), k1, None).await;
    assert!(replay.replayed(), "{replay:?}");
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let incoming = format!("00-{client_trace}-{client_span}-01");
    let parented = post(&http, &proxy.url("/pay"), k2, Some(&incoming)).await;
    assert_eq!(parented.status, StatusCode::CREATED, "{parented:?}");
    // A request outside the covered methods: passed through, with a span too.
    let passed = http
        .send(Method::GET, &proxy.url("/status"), &[], b"")
        .await;
    assert_eq!(passed.status, StatusCode::CREATED, "{passed:?}");
    assert!(
        receiver.received.lock().unwrap().exports.is_empty(),
        "spans are batched, not sent one by one"
    );

    // Graceful shutdown flushes the batch before the process exits.
    let proxy = stop(proxy).await;
    assert!(
        proxy
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("trace export stopped")),
        "the exporter was not stopped"
    );
    let (malformed, tokens) = {
        let received = receiver.received.lock().unwrap();
        (received.malformed.clone(), received.tokens.clone())
    };
    assert!(malformed.is_empty(), "non-OTLP requests: {malformed:?}");
    assert!(
        !tokens.is_empty() && tokens.iter().all(|t| t.as_deref() == Some("t0ken")),
        "OTEL_EXPORTER_OTLP_HEADERS not sent: {tokens:?}"
    );
    let spans = receiver.spans();
    assert!(!spans.is_empty(), "no span arrived");
    // Store spans belong to requests: the sweeper's purge (at start-up) makes no trace.
    assert!(
        spans
            .iter()
            .all(|(_, s)| !s.parent_span_id.is_empty() || s.kind == SpanKind::Server as i32),
        "a root span that is not a request's"
    );

    // The resource: the default service name, this build's version, OTEL_RESOURCE_ATTRIBUTES.
    let resource = &spans[0].0;
    assert_eq!(attr(resource, "service.name").as_deref(), Some("idemgate"));
    assert_eq!(
        attr(resource, "service.version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        attr(resource, "deployment.environment").as_deref(),
        Some("test")
    );

    // No credential anywhere.
    for (_, span) in &spans {
        for kv in &span.attributes {
            let value = attr(std::slice::from_ref(kv), &kv.key).unwrap_or_default();
            assert!(
                !value.contains("s3cret"),
                "span {} attribute {} holds the credential",
                span.name,
                kv.key
            );
        }
    }

    let request_spans: Vec<_> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    let by_key = |key: &str| -> Vec<&opentelemetry_proto::tonic::trace::v1::Span> {
        request_spans
            .iter()
            .copied()
            .filter(|s| attr(&s.attributes, "idemgate.key").as_deref() == Some(key))
            .collect()
    };
    let children = |parent: &opentelemetry_proto::tonic::trace::v1::Span| -> Vec<String> {
        let mut names: Vec<String> = spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.parent_span_id == parent.span_id && s.trace_id == parent.trace_id)
            .map(|s| s.name.clone())
            .collect();
        names.sort();
        names
    };

    // The first request: executed at epoch 1; claim and complete timed as children, and the
    // upstream call as a client child whose traceparent the upstream received.
    let k1_spans = by_key(k1);
    assert_eq!(k1_spans.len(), 2, "two requests with {k1}: {k1_spans:?}");
    let executed = k1_spans
        .iter()
        .find(|s| attr(&s.attributes, "idemgate.outcome").as_deref() == Some("executed"))
        .expect("an executed span");
    assert_eq!(executed.name, "POST default");
    for (key, want) in [
        ("idemgate.route", "default"),
        ("idemgate.epoch", "1"),
        ("http.request.method", "POST"),
        ("url.path", "/pay"),
        ("http.response.status_code", "201"),
    ] {
        assert_eq!(
            attr(&executed.attributes, key).as_deref(),
            Some(want),
            "{key} of {executed:?}"
        );
    }
    assert!(
        executed.parent_span_id.is_empty(),
        "a root span without traceparent"
    );
    assert_eq!(
        children(executed),
        ["POST upstream", "store claim", "store complete"],
        "children of the executed request"
    );
    for (_, child) in spans
        .iter()
        .filter(|(_, s)| s.parent_span_id == executed.span_id)
    {
        assert!(
            child.end_time_unix_nano >= child.start_time_unix_nano
                && child.start_time_unix_nano >= executed.start_time_unix_nano,
            "{} is timed within its request",
            child.name
        );
    }
    let upstream_span = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.parent_span_id == executed.span_id && s.name == "POST upstream")
        .unwrap();
    assert_eq!(upstream_span.kind, SpanKind::Client as i32);
    let seen = up.traceparents(k1);
    assert_eq!(seen.len(), 1, "one dispatch upstream: {seen:?}");
    let (trace, parent) = parse_traceparent(seen[0].as_deref().expect("a traceparent upstream"));
    assert_eq!(
        trace,
        hex(&executed.trace_id),
        "the request's trace goes upstream"
    );
    assert_eq!(
        parent,
        hex(&upstream_span.span_id),
        "its parent is the upstream span"
    );

    // The replay: says so, names the record's epoch, and has the claim that found the record.
    let replayed = k1_spans
        .iter()
        .find(|s| attr(&s.attributes, "idemgate.outcome").as_deref() == Some("replayed"))
        .expect("a replayed span");
    assert_eq!(
        attr(&replayed.attributes, "idemgate.epoch").as_deref(),
        Some("1")
    );
    assert_eq!(
        attr(&replayed.attributes, "http.response.status_code").as_deref(),
        Some("201")
    );
    assert_eq!(
        children(replayed),
        ["store claim"],
        "a replay calls no upstream"
    );

    // The client's traceparent is the parent of the request's span, and the upstream got the
    // same trace id with the proxy's upstream span as parent.
    let k2_spans = by_key(k2);
    assert_eq!(k2_spans.len(), 1, "{k2_spans:?}");
    let child = k2_spans[0];
    assert_eq!(hex(&child.trace_id), client_trace);
    assert_eq!(hex(&child.parent_span_id), client_span);
    let seen = up.traceparents(k2);
    let (trace, parent) = parse_traceparent(seen[0].as_deref().expect("a traceparent upstream"));
    assert_eq!(trace, client_trace);
    assert_ne!(
        parent, client_span,
        "the proxy's span, not the client's, is the parent"
    );
    let k2_upstream = spans
        .iter()
        .map(|(_, s)| s)
        .find(|s| s.parent_span_id == child.span_id && s.name == "POST upstream")
        .expect("an upstream span under the parented request");
    assert_eq!(parent, hex(&k2_upstream.span_id));

    // The passed-through request.
    let passthrough = request_spans
        .iter()
        .find(|s| attr(&s.attributes, "idemgate.outcome").as_deref() == Some("passthrough"))
        .expect("a pass-through span");
    assert_eq!(passthrough.name, "GET", "outside any route");
    assert_eq!(attr(&passthrough.attributes, "idemgate.route"), None);
    assert_eq!(
        attr(&passthrough.attributes, "http.response.status_code").as_deref(),
        Some("201")
    );
    assert_eq!(children(passthrough), ["GET upstream"]);
    let seen = up.traceparents("/status");
    let (trace, _) = parse_traceparent(seen[0].as_deref().expect("a traceparent upstream"));
    assert_eq!(trace, hex(&passthrough.trace_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_otel_nothing_is_exported_and_traceparent_passes_untouched() {
    let receiver = Receiver::start().await;
    let up = Upstream::start().await;
    // The endpoint alone does not switch traces on: only --otel / IDEMGATE_OTEL does.
    let proxy = Proxy::start_with_env(
        &up.url(),
        "memory://",
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url().as_str())],
    );
    let http = Http::default();
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let first = post(&http, &proxy.url("/pay"), "no-otel", Some(incoming)).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let replay = post(&http, &proxy.url("/pay"), "no-otel", None).await;
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(
        up.traceparents("no-otel"),
        [Some(incoming.to_owned())],
        "the client's traceparent is forwarded as it came"
    );
    let proxy = stop(proxy).await;
    assert!(
        !proxy
            .logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("exporting traces")),
        "traces reported on"
    );
    // The process has exited, so anything it sent has arrived: wait (bounded) for a signal of
    // activity that must not come.
    let activity = receiver.activity.notified();
    let quiet = tokio::time::timeout(Duration::from_secs(1), activity).await;
    let received = receiver.received.lock().unwrap();
    assert!(
        quiet.is_err() && received.connections == 0 && received.exports.is_empty(),
        "the receiver was contacted: {} connections, {} exports",
        received.connections,
        received.exports.len()
    );
}

#[test]
fn otel_refuses_a_protocol_it_cannot_speak() {
    // IDEMGATE_OTEL=1 (the variable, not the flag) switches traces on, and gRPC is refused at
    // start-up rather than sent to a collector that expects it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idemgate"))
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:1",
            "--store",
            "memory://",
        ])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("IDEMGATE_OTEL", "1")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "started with OTLP/gRPC asked");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc") && stderr.contains("http/protobuf"),
        "{stderr}"
    );
}
