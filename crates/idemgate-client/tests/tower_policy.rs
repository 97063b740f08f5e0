//! The policy core through the tower layer, against in-process services, on tokio's paused
//! clock: every delay, `Retry-After`, deadline and breaker period is exact and instant, so none
//! of these tests depends on the machine's speed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use idemgate_client::backoff::Backoff;
use idemgate_client::breaker::{BreakerConfig, State};
use idemgate_client::budget::BudgetConfig;
use idemgate_client::clock::{Clock, Sleep, TokioClock};
use idemgate_client::tower::{RequestBody, RetryLayer};
use idemgate_client::{Error, ErrorKind, Policy, PolicyBuilder, RetryInfo, Stop};
use tower::{Layer, Service, ServiceExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the fake server saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    at: tokio::time::Instant,
    key: Option<String>,
    body: Bytes,
}

/// A scripted answer.
enum Reply {
    Status(u16),
    With(u16, Vec<(&'static str, String)>, &'static str),
    Fail(std::io::ErrorKind),
    Sleep(Duration, u16),
}

fn reply(s: u16) -> Reply {
    Reply::Status(s)
}

/// A fake server: answers from `script` (call n gets `script(n)`), records what it saw.
#[derive(Clone)]
struct Server {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<dyn Fn(usize) -> Reply + Send + Sync>,
}

impl Server {
    fn new(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        Self {
            seen: Arc::default(),
            script: Arc::new(script),
        }
    }

    fn calls(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Service<Request<RequestBody>> for Server {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let key = req
                .headers()
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_owned());
            let at = tokio::time::Instant::now();
            let body = req.into_body().collect().await?.to_bytes();
            let n = {
                let mut seen = this.seen.lock().unwrap();
                seen.push(Seen { at, key, body });
                seen.len() - 1
            };
            let reply = (this.script)(n);
            let (code, headers, body) = match reply {
                Reply::Status(s) => (s, vec![], ""),
                Reply::With(s, h, b) => (s, h, b),
                Reply::Fail(kind) => return Err(Box::new(std::io::Error::from(kind)) as BoxError),
                Reply::Sleep(d, s) => {
                    tokio::time::sleep(d).await;
                    (s, vec![], "")
                }
            };
            let mut res = Response::builder().status(code);
            for (k, v) in headers {
                res = res.header(k, v);
            }
            Ok(res
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .unwrap())
        })
    }
}

fn quick() -> PolicyBuilder {
    Policy::builder().seed(42)
}

fn post(body: &'static str) -> Request<Full<Bytes>> {
    Request::post("http://shop.test/orders")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

async fn send(
    policy: &Policy,
    server: &Server,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, RetryInfo, Bytes), Error> {
    let res = RetryLayer::new(policy.clone())
        .layer(server.clone())
        .oneshot(req)
        .await?;
    let status = res.status();
    let info = res.extensions().get::<RetryInfo>().cloned().unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Ok((status, info, body))
}

fn gaps(seen: &[Seen]) -> Vec<Duration> {
    seen.windows(2).map(|w| w[1].at - w[0].at).collect()
}

// ---------------------------------------------------------------- keys

#[tokio::test(start_paused = true)]
async fn one_generated_key_is_sent_on_every_attempt() {
    let server = Server::new(|n| reply(if n < 2 { 503 } else { 201 }));
    let policy = quick().build().unwrap();
    let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(info.attempts, 3);
    assert!(info.key_generated);
    let keys: Vec<_> = server.seen().into_iter().map(|s| s.key.unwrap()).collect();
    assert_eq!(keys.len(), 3);
    assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
    assert_eq!(info.key.as_deref(), Some(keys[0].as_str()));
    // UUID v7 by default.
    assert_eq!(&keys[0][14..15], "7");
    // Every attempt resent the same body.
    assert!(server.seen().iter().all(|s| s.body == "{}"));
    assert_eq!(info.stop, Stop::Answered);
}

#[tokio::test(start_paused = true)]
async fn a_callers_key_is_never_overwritten() {
    let server = Server::new(|n| reply(if n < 1 { 503 } else { 201 }));
    let policy = quick().build().unwrap();
    let mut req = post("{}");
    req.headers_mut()
        .insert("idempotency-key", HeaderValue::from_static("\"order 42\""));
    let (_, info, _) = send(&policy, &server, req).await.unwrap();
    assert_eq!(info.key.as_deref(), Some("\"order 42\""));
    assert!(!info.key_generated);
    assert!(
        server
            .seen()
            .iter()
            .all(|s| s.key.as_deref() == Some("\"order 42\""))
    );
}

#[tokio::test(start_paused = true)]
async fn distinct_operations_get_distinct_keys_and_gets_get_none() {
    let server = Server::new(|_| reply(200));
    let policy = quick().build().unwrap();
    send(&policy, &server, post("{}")).await.unwrap();
    send(&policy, &server, post("{}")).await.unwrap();
    let get = Request::get("http://shop.test/orders/1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (_, info, _) = send(&policy, &server, get).await.unwrap();
    let seen = server.seen();
    assert_ne!(seen[0].key, seen[1].key);
    assert_eq!(seen[2].key, None);
    assert_eq!(info.key, None);
}

// ---------------------------------------------------------------- what is retried

#[tokio::test(start_paused = true)]
async fn final_answers_are_returned_at_once() {
    let problem = |t: &str| {
        vec![
            ("content-type", "application/problem+json".to_owned()),
            ("x-type", t.to_owned()),
        ]
    };
    let cases: Vec<(Reply, &str)> = vec![
        (reply(400), "400"),
        (reply(422), "422"),
        (reply(404), "404"),
        (
            Reply::With(
                410,
                problem("gone"),
                r#"{"type":"urn:idemgate:problem:not-replayable"}"#,
            ),
            "410",
        ),
        // A 409 that is not idemgate's in-flight and has no Retry-After: a real conflict.
        (
            Reply::With(409, problem("c"), r#"{"type":"urn:example:conflict"}"#),
            "409",
        ),
        (reply(501), "501"),
    ];
    for (first, want) in cases {
        let first = Arc::new(Mutex::new(Some(first)));
        let server = Server::new(move |_| first.lock().unwrap().take().unwrap_or(reply(599)));
        let policy = quick().build().unwrap();
        let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
        assert_eq!(status.as_str(), want);
        assert_eq!(info.attempts, 1, "{want}");
        assert_eq!(server.calls(), 1, "{want}");
        assert_eq!(info.stop, Stop::Answered);
    }
}

#[tokio::test(start_paused = true)]
async fn a_replay_is_final_and_reported_even_as_a_5xx() {
    let server =
        Server::new(|_| Reply::With(500, vec![("idempotent-replayed", "true".into())], "stored"));
    let policy = quick().build().unwrap();
    let (status, info, body) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(status, 500);
    assert_eq!(body, "stored");
    assert!(info.replayed);
    assert_eq!(info.attempts, 1);
}

#[tokio::test(start_paused = true)]
async fn every_transient_status_is_retried() {
    for s in [408, 425, 429, 500, 502, 503, 504] {
        let server = Server::new(move |n| reply(if n == 0 { s } else { 201 }));
        let policy = quick().build().unwrap();
        let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
        assert_eq!(status, 201, "{s}");
        assert_eq!(info.attempts, 2, "{s}");
        assert_eq!(info.log[1].reason, format!("status {s}"));
    }
}

#[tokio::test(start_paused = true)]
async fn outcome_unknown_is_never_retried_and_carries_the_key() {
    let server = Server::new(|_| {
        Reply::With(
            502,
            vec![("content-type", "application/problem+json".into())],
            r#"{"type":"urn:idemgate:problem:outcome-unknown","detail":"may or may not"}"#,
        )
    });
    let policy = quick().build().unwrap();
    let err = send(&policy, &server, post("{}")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutcomeUnknown);
    let Error::OutcomeUnknown {
        key,
        detail,
        unprotected,
        info,
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(!unprotected);
    assert_eq!(Some(key.as_str()), server.seen()[0].key.as_deref());
    assert_eq!(detail.as_deref(), Some("may or may not"));
    assert_eq!(info.attempts, 1);
    assert_eq!(server.calls(), 1);
    assert_eq!(err.key(), Some(key.as_str()));
}

#[tokio::test(start_paused = true)]
async fn upstream_unavailable_502_is_retried() {
    let server = Server::new(|n| {
        if n == 0 {
            Reply::With(
                502,
                vec![("content-type", "application/problem+json".into())],
                r#"{"type":"urn:idemgate:problem:upstream-unavailable"}"#,
            )
        } else {
            reply(201)
        }
    });
    let (status, info, _) = send(&quick().build().unwrap(), &server, post("{}"))
        .await
        .unwrap();
    assert_eq!(status, 201);
    assert_eq!(info.attempts, 2);
    assert!(info.log[0].outcome.contains("upstream-unavailable"));
}

#[tokio::test(start_paused = true)]
async fn transport_failures_and_the_unkeyed_rule() {
    use std::io::ErrorKind as K;
    // Keyed POST: refused, reset and timed out are all retried (the key makes it safe).
    for kind in [K::ConnectionRefused, K::ConnectionReset, K::TimedOut] {
        let server = Server::new(move |n| {
            if n == 0 {
                Reply::Fail(kind)
            } else {
                reply(201)
            }
        });
        let (status, info, _) = send(&quick().build().unwrap(), &server, post("{}"))
            .await
            .unwrap();
        assert_eq!((status.as_u16(), info.attempts), (201, 2), "{kind:?}");
    }
    // Unkeyed POST: only a refused connection (provably not sent) is retried.
    let unkeyed = quick().key_methods([]).build().unwrap();
    let server = Server::new(|n| {
        if n == 0 {
            Reply::Fail(K::ConnectionRefused)
        } else {
            reply(201)
        }
    });
    let (_, info, _) = send(&unkeyed, &server, post("{}")).await.unwrap();
    assert_eq!((info.attempts, info.key.clone()), (2, None));
    let server = Server::new(|_| Reply::Fail(K::ConnectionReset));
    let err = send(&unkeyed, &server, post("{}")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotSafeToRetry);
    assert_eq!(server.calls(), 1);
    // An unkeyed POST answered 503 may have run: returned, not resent.
    let server = Server::new(|_| reply(503));
    let (status, info, _) = send(&unkeyed, &server, post("{}")).await.unwrap();
    assert_eq!(
        (status.as_u16(), info.attempts, info.stop),
        (503, 1, Stop::NotSafeToRetry)
    );
    // An unkeyed PUT is idempotent (RFC 9110): resent.
    let server = Server::new(|n| {
        if n == 0 {
            Reply::Fail(K::ConnectionReset)
        } else {
            reply(200)
        }
    });
    let put = Request::put("http://shop.test/orders/1")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (_, info, _) = send(&unkeyed, &server, put).await.unwrap();
    assert_eq!(info.attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn exhausted_attempts_return_the_last_answer_or_a_typed_error() {
    let server = Server::new(|_| reply(503));
    let (status, info, _) = send(&quick().build().unwrap(), &server, post("{}"))
        .await
        .unwrap();
    assert_eq!(
        (status.as_u16(), info.attempts, info.stop),
        (503, 3, Stop::AttemptsExhausted)
    );
    let server = Server::new(|_| Reply::Fail(std::io::ErrorKind::ConnectionReset));
    let err = send(&quick().build().unwrap(), &server, post("{}"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AttemptsExhausted);
    assert_eq!(err.attempts(), 3);
    assert!(err.key().is_some());
    assert!(std::error::Error::source(&err).is_some());
}

// ---------------------------------------------------------------- backoff and Retry-After

#[tokio::test(start_paused = true)]
async fn backoff_is_full_jitter_under_the_doubling_ceiling_and_reproducible() {
    let server = Server::new(|_| reply(503));
    let policy = quick()
        .max_attempts(6)
        .no_budget()
        .no_breaker()
        .seed(7)
        .build()
        .unwrap();
    let (_, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(info.attempts, 6);
    // The same seed draws the same delays: ceiling(n) × U[0,1) from fastrand(7).
    let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(20));
    let mut rng = fastrand_like(7);
    for (i, gap) in gaps(&server.seen()).into_iter().enumerate() {
        let retry = u32::try_from(i + 1).unwrap();
        let expected = backoff.full_jitter(retry, rng());
        assert_eq!(info.log[i + 1].delay, expected, "retry {retry}");
        assert!(expected < backoff.ceiling(retry));
        // tokio's timer has millisecond granularity: a sleep ends within 1 ms after its time.
        assert!(
            gap >= expected && gap <= expected + Duration::from_millis(1),
            "{gap:?} vs {expected:?}"
        );
    }
}

/// The policy's generator: fastrand seeded the same way.
fn fastrand_like(seed: u64) -> impl FnMut() -> f64 {
    let mut rng = fastrand::Rng::with_seed(seed);
    move || rng.f64()
}

#[tokio::test(start_paused = true)]
async fn jitter_is_uniform_statistically() {
    // 4000 operations that fail once: the delay before their second attempt should be
    // uniform on [0, 500 ms). Deterministic seed, so the statistics are fixed numbers; the
    // thresholds are the 0.1 % critical values.
    let server = Server::new(|n| reply(if n % 2 == 0 { 503 } else { 201 }));
    let policy = quick().no_budget().no_breaker().seed(2024).build().unwrap();
    let n = 4000usize;
    let mut units = Vec::with_capacity(n);
    for _ in 0..n {
        let (_, info, _) = send(&policy, &server, post("{}")).await.unwrap();
        units.push(info.log[1].delay.as_secs_f64() / 0.5);
    }
    assert_uniform(&units);
}

/// Chi-square over 20 bins (df 19, p = 0.001 → 43.82), Kolmogorov–Smirnov (p = 0.001 →
/// 1.95/√n), and the mean within 3 % of ½.
fn assert_uniform(units: &[f64]) {
    let n = units.len() as f64;
    assert!(units.iter().all(|u| (0.0..1.0).contains(u)), "out of [0,1)");
    let mut bins = [0f64; 20];
    for u in units {
        bins[(u * 20.0) as usize] += 1.0;
    }
    let expected = n / 20.0;
    let chi2: f64 = bins.iter().map(|o| (o - expected).powi(2) / expected).sum();
    assert!(chi2 < 43.82, "chi-square {chi2:.2} over 20 bins: {bins:?}");
    let mut sorted = units.to_vec();
    sorted.sort_by(f64::total_cmp);
    let d = sorted
        .iter()
        .enumerate()
        .map(|(i, u)| {
            ((i as f64 + 1.0) / n - u)
                .abs()
                .max((u - i as f64 / n).abs())
        })
        .fold(0.0, f64::max);
    assert!(d < 1.95 / n.sqrt(), "KS statistic {d:.4}");
    let mean = units.iter().sum::<f64>() / n;
    assert!((mean - 0.5).abs() < 0.015, "mean {mean:.4}");
}

#[tokio::test(start_paused = true)]
async fn retry_after_seconds_is_honoured_never_undercut_and_jittered_above() {
    let server = Server::new(|n| {
        if n % 2 == 0 {
            Reply::With(429, vec![("retry-after", "3".into())], "")
        } else {
            reply(201)
        }
    });
    let policy = quick().no_budget().no_breaker().seed(99).build().unwrap();
    let mut above = Vec::new();
    for _ in 0..2000 {
        let (_, info, _) = send(&policy, &server, post("{}")).await.unwrap();
        let d = info.log[1].delay;
        assert!(d >= Duration::from_secs(3), "undercut: {d:?}");
        // spread = max(3 s × 20 %, 500 ms) = 600 ms
        assert!(d < Duration::from_millis(3600), "{d:?}");
        above.push((d - Duration::from_secs(3)).as_secs_f64() / 0.6);
    }
    // Clients told the same number of seconds wake spread out, uniformly.
    assert_uniform(&above);
    // The server saw each second attempt at least 3 s after the first.
    for g in gaps(&server.seen()).iter().step_by(2) {
        assert!(*g >= Duration::from_secs(3));
    }
}

/// A clock whose wall time starts at a fixed date and advances with tokio's (paused) clock.
#[derive(Debug)]
struct PausedWall {
    origin: SystemTime,
    start: Instant,
}

impl Clock for PausedWall {
    fn now(&self) -> Instant {
        TokioClock.now()
    }
    fn wall(&self) -> SystemTime {
        self.origin + (TokioClock.now() - self.start)
    }
    fn sleep(&self, d: Duration) -> Sleep {
        TokioClock.sleep(d)
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_http_date_is_read_against_the_wall_clock() {
    let origin = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let clock = Arc::new(PausedWall {
        origin,
        start: TokioClock.now(),
    });
    let at = httpdate::fmt_http_date(origin + Duration::from_secs(7));
    let server = Server::new(move |n| {
        if n == 0 {
            Reply::With(503, vec![("retry-after", at.clone())], "")
        } else {
            reply(201)
        }
    });
    let policy = quick().clock(clock).build().unwrap();
    let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(status, 201);
    let d = info.log[1].delay;
    // 7 s from the wall time of the answer (the answer came at wall origin + 0).
    assert!(
        d >= Duration::from_secs(7) && d < Duration::from_millis(8400),
        "{d:?}"
    );
    assert!(gaps(&server.seen())[0] >= Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn retry_after_over_the_cap_stops_with_the_answer() {
    let server = Server::new(|_| Reply::With(503, vec![("retry-after", "120".into())], ""));
    let policy = quick()
        .retry_after_cap(Duration::from_secs(60))
        .build()
        .unwrap();
    let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(
        (status.as_u16(), info.attempts, info.stop),
        (503, 1, Stop::RetryAfterTooLong)
    );
}

#[tokio::test(start_paused = true)]
async fn in_flight_409_is_waited_out_as_told_without_using_attempts_or_budget() {
    let in_flight = || {
        Reply::With(
            409,
            vec![
                ("content-type", "application/problem+json".into()),
                ("retry-after", "2".into()),
            ],
            r#"{"type":"urn:idemgate:problem:request-in-flight"}"#,
        )
    };
    let server = Server::new(move |n| {
        if n < 4 {
            in_flight()
        } else {
            Reply::With(201, vec![("idempotent-replayed", "true".into())], "done")
        }
    });
    let policy = quick().max_attempts(2).build().unwrap();
    let (status, info, body) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!((status.as_u16(), body.as_ref()), (201, b"done".as_ref()));
    assert_eq!(
        info.attempts, 5,
        "4 waits do not count against max_attempts = 2"
    );
    assert!(info.replayed);
    for g in gaps(&server.seen()) {
        assert!(g >= Duration::from_secs(2), "{g:?}");
    }
    assert!(info.log[1..].iter().all(|a| a.reason == "in flight (409)"));
    let host = policy.host("http://shop.test:80").unwrap();
    assert_eq!(host.budget_tokens, Some(500.0), "waits take no tokens");
    assert_eq!(host.breaker, Some(State::Closed));

    // An IETF-style 409 with Retry-After (no idemgate problem type) is waited out too.
    let server = Server::new(|n| {
        if n == 0 {
            Reply::With(409, vec![("retry-after", "1".into())], "")
        } else {
            reply(201)
        }
    });
    let (_, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(info.attempts, 2);
}

// ---------------------------------------------------------------- deadline and timeouts

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_waits_and_attempts() {
    // Always 503, long backoff: the next delay would pass the deadline, so the client stops
    // with the answer it has.
    let server = Server::new(|_| reply(503));
    let policy = quick()
        .max_attempts(50)
        .base_delay(Duration::from_secs(1))
        .deadline(Duration::from_secs(5))
        .no_budget()
        .no_breaker()
        .build()
        .unwrap();
    let start = tokio::time::Instant::now();
    let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!((status.as_u16(), info.stop), (503, Stop::Deadline));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(info.attempts > 1);

    // A server slower than the deadline: the attempt is cut at the deadline.
    let server = Server::new(|_| Reply::Sleep(Duration::from_secs(60), 201));
    let start = tokio::time::Instant::now();
    let err = send(&policy, &server, post("{}")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(err.attempts(), 1);
    // tokio's timer has millisecond granularity.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took <= Duration::from_millis(5001),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_attempt_times_out_and_is_resent_with_the_same_key() {
    let server = Server::new(|n| {
        if n == 0 {
            Reply::Sleep(Duration::from_secs(30), 201)
        } else {
            reply(201)
        }
    });
    let policy = quick()
        .attempt_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!((status.as_u16(), info.attempts), (201, 2));
    assert!(
        info.log[0].outcome.starts_with("timeout"),
        "{:?}",
        info.log[0]
    );
    let took = info.log[0].took;
    assert!(
        took >= Duration::from_secs(2) && took <= Duration::from_millis(2001),
        "{took:?}"
    );
    let seen = server.seen();
    assert_eq!(seen[0].key, seen[1].key);
    // A timeout costs the budget's timeout price (10); the success gives it back.
    let host = policy.host("http://shop.test:80").unwrap();
    assert_eq!(host.budget_tokens, Some(500.0));
}

// ---------------------------------------------------------------- bodies

type Chunks = StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<http_body::Frame<Bytes>, std::io::Error>>>,
>;

fn stream_body(chunks: &[&'static str]) -> Chunks {
    let frames: Vec<_> = chunks
        .iter()
        .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

#[tokio::test(start_paused = true)]
async fn streamed_bodies_within_the_cap_are_resent_whole() {
    let server = Server::new(|n| reply(if n == 0 { 503 } else { 201 }));
    let policy = quick().body_limit(16).build().unwrap();
    let req = Request::post("http://shop.test/upload")
        .body(stream_body(&["hello ", "world"]))
        .unwrap();
    let res = RetryLayer::new(policy)
        .layer(server.clone())
        .oneshot(req)
        .await
        .unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert!(info.body_retryable);
    assert_eq!(info.attempts, 2);
    assert!(server.seen().iter().all(|s| s.body == "hello world"));
}

#[tokio::test(start_paused = true)]
async fn a_stream_over_the_cap_is_sent_once_and_the_caller_told() {
    let server = Server::new(|_| reply(503));
    let policy = quick().body_limit(4).build().unwrap();
    let req = Request::post("http://shop.test/upload")
        .body(stream_body(&["hello ", "world"]))
        .unwrap();
    let res = RetryLayer::new(policy.clone())
        .layer(server.clone())
        .oneshot(req)
        .await
        .unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(
        (info.attempts, info.stop, info.body_retryable),
        (1, Stop::BodyNotRetryable, false)
    );
    assert_eq!(server.seen()[0].body, "hello world", "the whole body, once");

    let failing = Server::new(|_| Reply::Fail(std::io::ErrorKind::ConnectionReset));
    let req = Request::post("http://shop.test/upload")
        .body(stream_body(&["hello ", "world"]))
        .unwrap();
    let err = RetryLayer::new(policy)
        .layer(failing.clone())
        .oneshot(req)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BodyNotRetryable);
    assert_eq!(failing.calls(), 1);

    // Not even a 409 in flight is waited out: the body cannot be sent again.
    let in_flight = Server::new(|_| Reply::With(409, vec![("retry-after", "1".into())], ""));
    let req = Request::post("http://shop.test/upload")
        .body(stream_body(&["hello ", "world"]))
        .unwrap();
    let res = RetryLayer::new(quick().body_limit(4).build().unwrap())
        .layer(in_flight.clone())
        .oneshot(req)
        .await
        .unwrap();
    let info = res.extensions().get::<RetryInfo>().unwrap();
    assert_eq!(
        (res.status().as_u16(), info.attempts, info.stop),
        (409, 1, Stop::BodyNotRetryable)
    );
    assert_eq!(in_flight.calls(), 1);
}

// ---------------------------------------------------------------- budget

#[tokio::test(start_paused = true)]
async fn the_budget_runs_dry_in_an_outage_and_successes_refill_it() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = failing.clone();
    let server = Server::new(move |_| {
        reply(if f.load(std::sync::atomic::Ordering::SeqCst) {
            503
        } else {
            201
        })
    });
    let policy = quick()
        .budget(BudgetConfig::default().capacity(12.0))
        .no_breaker()
        .build()
        .unwrap();
    let host = "http://shop.test:80";
    // 12 tokens: two retries (5 each) for the first operation, none for the second.
    let (_, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(info.attempts, 3);
    assert_eq!(policy.host(host).unwrap().budget_tokens, Some(2.0));
    let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(
        (status.as_u16(), info.attempts, info.stop),
        (503, 1, Stop::BudgetExhausted)
    );
    // Transport failures with an empty budget: a typed error naming the host.
    let resets = Server::new(|_| Reply::Fail(std::io::ErrorKind::ConnectionReset));
    let err = send(&policy, &resets, post("{}")).await.unwrap_err();
    let Error::BudgetExhausted { host: h, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(h, host);
    // Service is back: each success puts a token back.
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..3 {
        send(&policy, &server, post("{}")).await.unwrap();
    }
    assert_eq!(policy.host(host).unwrap().budget_tokens, Some(5.0));
}

// ---------------------------------------------------------------- breaker

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_fails_fast_then_probes_and_closes() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = failing.clone();
    let server = Server::new(move |_| {
        reply(if f.load(std::sync::atomic::Ordering::SeqCst) {
            503
        } else {
            201
        })
    });
    let policy = quick()
        .max_attempts(1)
        .breaker(
            BreakerConfig::default()
                .consecutive_failures(3)
                .open_for(Duration::from_secs(10))
                .half_open_probes(2),
        )
        .build()
        .unwrap();
    let host = "http://shop.test:80";
    for _ in 0..3 {
        send(&policy, &server, post("{}")).await.unwrap();
    }
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::Open));
    // Open: fails fast, nothing sent.
    let err = send(&policy, &server, post("{}")).await.unwrap_err();
    let Error::CircuitOpen { retry_in, info, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*retry_in, Some(Duration::from_secs(10)));
    assert_eq!(info.attempts, 0);
    assert!(info.key.is_some(), "the key is reported for a later retry");
    assert_eq!(server.calls(), 3);
    // Another host is not affected.
    let other = Request::post("http://other.test/orders")
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(&policy, &server, other).await.unwrap();
    assert_eq!(server.calls(), 4);
    // After the open period: probes; a failed probe reopens for a full period.
    tokio::time::advance(Duration::from_secs(10)).await;
    send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::Open));
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(send(&policy, &server, post("{}")).await.is_err());
    tokio::time::advance(Duration::from_secs(1)).await;
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::HalfOpen));
    send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::Closed));
}

#[tokio::test(start_paused = true)]
async fn a_breaker_opening_between_attempts_returns_what_the_operation_has_and_refunds_the_retry() {
    // Operation A is told to wait 5 s; meanwhile operation B ends in failure and opens the
    // breaker. A's retry is refused: A returns its 503, and the tokens it took for the retry
    // it never sent go back (review m7).
    let server = Server::new(|n| {
        if n == 0 {
            Reply::With(503, vec![("retry-after", "5".into())], "")
        } else {
            Reply::With(503, vec![("retry-after", "100".into())], "")
        }
    });
    let policy = quick()
        .retry_after_cap(Duration::from_secs(60))
        .breaker(BreakerConfig::default().consecutive_failures(1))
        .build()
        .unwrap();
    let host = "http://shop.test:80";
    let a = tokio::spawn({
        let (policy, server) = (policy.clone(), server.clone());
        async move { send(&policy, &server, post("{}")).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(policy.host(host).unwrap().budget_tokens, Some(495.0));
    let (_, b, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(b.stop, Stop::RetryAfterTooLong);
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::Open));
    let (status, info, _) = a.await.unwrap().unwrap();
    assert_eq!(
        (status.as_u16(), info.attempts, info.stop),
        (503, 1, Stop::CircuitOpen)
    );
    assert_eq!(server.calls(), 2);
    assert_eq!(policy.host(host).unwrap().budget_tokens, Some(500.0));
}

#[tokio::test(start_paused = true)]
async fn the_breaker_counts_operations_not_attempts() {
    // Review M2: every operation fails twice, then succeeds (fail_first=2 behind idemgate).
    // With the default breaker and policy, none is refused: failures cured by a retry do not
    // count.
    let server = Server::new(|n| reply(if n % 3 < 2 { 503 } else { 201 }));
    let policy = quick().build().unwrap();
    let host = "http://shop.test:80";
    for _ in 0..30 {
        let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
        assert_eq!((status.as_u16(), info.attempts), (201, 3));
    }
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::Closed));
    assert_eq!(server.calls(), 90);
    // Operations that fail for good do count, one outcome each: 5 in a row open it.
    let down = Server::new(|_| reply(503));
    for _ in 0..4 {
        let (_, info, _) = send(&policy, &down, post("{}")).await.unwrap();
        assert_eq!((info.attempts, info.stop), (3, Stop::AttemptsExhausted));
    }
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::Closed));
    send(&policy, &down, post("{}")).await.unwrap();
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::Open));
    assert_eq!(down.calls(), 15);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_at_once_and_its_retry_is_refused() {
    let server = Server::new(|_| reply(503));
    let policy = quick()
        .breaker(
            BreakerConfig::default()
                .consecutive_failures(1)
                .open_for(Duration::from_secs(10)),
        )
        .no_budget()
        .build()
        .unwrap();
    send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(server.calls(), 3);
    tokio::time::advance(Duration::from_secs(10)).await;
    let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(
        (status.as_u16(), info.attempts, info.stop),
        (503, 1, Stop::CircuitOpen)
    );
    assert_eq!(server.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_hung_probe_does_not_keep_the_breaker_half_open_forever() {
    // Review M1: the probe's server accepts and never answers (no attempt timeout is set).
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = hang.clone();
    let server = Server::new(move |_| {
        if h.load(std::sync::atomic::Ordering::SeqCst) {
            Reply::Sleep(Duration::from_secs(1_000_000), 201)
        } else {
            reply(201)
        }
    });
    let failing = Server::new(|_| reply(503));
    let policy = quick()
        .max_attempts(1)
        .breaker(
            BreakerConfig::default()
                .consecutive_failures(1)
                .half_open_probes(1)
                .open_for(Duration::from_secs(10)),
        )
        .build()
        .unwrap();
    let host = "http://shop.test:80";
    send(&policy, &failing, post("{}")).await.unwrap();
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::Open));
    tokio::time::advance(Duration::from_secs(10)).await;
    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let probe = tokio::spawn({
        let (policy, server) = (policy.clone(), server.clone());
        async move { send(&policy, &server, post("{}")).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(server.calls(), 1);
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::HalfOpen));
    // While the probe is out (less than open_for): others fail fast.
    let err = send(&policy, &server, post("{}")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    // Out for open_for: counted as failed, the breaker reopens for open_for.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let err = send(&policy, &server, post("{}")).await.unwrap_err();
    let Error::CircuitOpen { retry_in, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*retry_in, Some(Duration::from_secs(10)));
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::Open));
    // Then a new probe goes, and (the server answering again) closes it.
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!((status.as_u16(), info.attempts), (201, 1));
    assert_eq!(policy.host(host).unwrap().breaker, Some(State::Closed));
    assert_eq!(server.calls(), 2);
    probe.abort();
}

#[tokio::test(start_paused = true)]
async fn only_transient_failures_count_against_the_breaker() {
    for s in [400, 404, 409, 422, 429] {
        let server = Server::new(move |_| reply(s));
        let policy = quick()
            .max_attempts(1)
            .breaker(
                BreakerConfig::default()
                    .consecutive_failures(2)
                    .min_calls(2),
            )
            .build()
            .unwrap();
        for _ in 0..20 {
            send(&policy, &server, post("{}")).await.unwrap();
        }
        let state = policy.host("http://shop.test:80").unwrap().breaker;
        assert_eq!(state, Some(State::Closed), "{s}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_response_extension_and_attempt_log() {
    let server = Server::new(|n| reply(if n == 0 { 503 } else { 201 }));
    let (_, info, _) = send(&quick().build().unwrap(), &server, post("{}"))
        .await
        .unwrap();
    assert_eq!(info.log.len(), 2);
    assert_eq!(info.log[0].attempt, 1);
    assert_eq!(info.log[0].reason, "first");
    assert_eq!(info.log[0].outcome, "503");
    assert_eq!(info.log[1].reason, "status 503");
    assert_eq!(info.log[1].outcome, "201");
    let line = info.log[1].to_string();
    assert!(line.starts_with("attempt 2 after "), "{line}");
    let (elapsed, delay) = (info.elapsed, info.log[1].delay);
    assert!(
        elapsed >= delay && elapsed <= delay + Duration::from_millis(1),
        "{elapsed:?} {delay:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn infallible_inner_services_and_errors_of_the_inner_service_classified_by_hand() {
    // A service whose error type is not io: classified by the caller's function.
    #[derive(Debug)]
    struct Refused;
    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("refused")
        }
    }
    impl std::error::Error for Refused {}
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let svc = tower::service_fn(move |_req: Request<RequestBody>| {
        let n = c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(Refused)
            } else {
                Ok::<_, Refused>(Response::new(Full::new(Bytes::new())))
            }
        }
    });
    let layer = RetryLayer::new(quick().key_methods([]).build().unwrap()).classify_errors(|e| {
        if e.is::<Refused>() {
            idemgate_client::classify::TransportFailure::NotSent
        } else {
            idemgate_client::classify::TransportFailure::Fatal
        }
    });
    let res = layer.layer(svc).oneshot(post("{}")).await.unwrap();
    assert_eq!(res.extensions().get::<RetryInfo>().unwrap().attempts, 2);
    let _: Result<(), Infallible> = Ok(());
}

// ---------------------------------------------------------------- review of issue 12

fn problem(status: u16, kind: &'static str) -> Reply {
    let body: &'static str = match kind {
        "upstream-failed" => {
            r#"{"type":"urn:idemgate:problem:upstream-failed","cause":"connection-reset"}"#
        }
        _ => r#"{"type":"urn:idemgate:problem:request-in-flight"}"#,
    };
    Reply::With(
        status,
        vec![("content-type", "application/problem+json".into())],
        body,
    )
}

#[tokio::test(start_paused = true)]
async fn upstream_failed_is_never_resent_for_a_post_and_carries_the_key() {
    // Review S1: idemgate forwarded the request unprotected and got no complete answer.
    let server = Server::new(|n| {
        if n == 0 {
            problem(502, "upstream-failed")
        } else {
            reply(201)
        }
    });
    let err = send(&quick().build().unwrap(), &server, post("{}"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutcomeUnknown);
    let Error::OutcomeUnknown {
        key,
        unprotected,
        info,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(unprotected);
    assert_eq!(Some(key.as_str()), server.seen()[0].key.as_deref());
    assert_eq!((info.attempts, info.stop), (1, Stop::OutcomeUnknown));
    assert_eq!(server.calls(), 1);
    assert!(err.to_string().contains("unprotected"), "{err}");
    // An idempotent method may be resent.
    let server = Server::new(|n| {
        if n == 0 {
            problem(502, "upstream-failed")
        } else {
            reply(200)
        }
    });
    let put = Request::put("http://shop.test/orders/1")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (status, info, _) = send(&quick().build().unwrap(), &server, put).await.unwrap();
    assert_eq!((status.as_u16(), info.attempts), (200, 2));
}

#[tokio::test(start_paused = true)]
async fn a_key_makes_resends_safe_only_to_hosts_that_honour_it() {
    // Review M3. Default: every host is taken to honour the key (the client sits in front
    // of idemgate): a reset keyed POST is resent.
    let resets_once = || {
        Server::new(|n| {
            if n == 0 {
                Reply::Fail(std::io::ErrorKind::ConnectionReset)
            } else {
                reply(201)
            }
        })
    };
    let server = resets_once();
    let (_, info, _) = send(&quick().build().unwrap(), &server, post("{}"))
        .await
        .unwrap();
    assert_eq!(info.attempts, 2);
    // Only idemgate.test is known to honour keys: to shop.test, a POST that may have been
    // sent is not resent, even though it carries a (generated) key.
    let policy = quick().key_hosts(["idemgate.test"]).build().unwrap();
    let server = resets_once();
    let err = send(&policy, &server, post("{}")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotSafeToRetry);
    assert_eq!(server.calls(), 1);
    assert!(server.seen()[0].key.is_some(), "the key is still sent");
    let server = Server::new(|_| reply(503));
    let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(
        (status.as_u16(), info.attempts, info.stop),
        (503, 1, Stop::NotSafeToRetry)
    );
    // A refused connection (provably not sent) is still retried.
    let server = Server::new(|n| {
        if n == 0 {
            Reply::Fail(std::io::ErrorKind::ConnectionRefused)
        } else {
            reply(201)
        }
    });
    let (_, info, _) = send(&policy, &server, post("{}")).await.unwrap();
    assert_eq!(info.attempts, 2);
    // To the listed host: resent.
    let server = resets_once();
    let req = Request::post("http://idemgate.test/orders")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let (_, info, _) = send(&policy, &server, req).await.unwrap();
    assert_eq!(info.attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn an_unkeyed_post_is_not_resent_on_a_409_in_flight() {
    // Review m1: asking again after a 409 is a resend.
    let server = Server::new(|n| {
        if n == 0 {
            Reply::With(409, vec![("retry-after", "1".into())], "")
        } else {
            reply(201)
        }
    });
    let unkeyed = quick().key_methods([]).build().unwrap();
    let (status, info, _) = send(&unkeyed, &server, post("{}")).await.unwrap();
    assert_eq!(
        (status.as_u16(), info.attempts, info.stop),
        (409, 1, Stop::NotSafeToRetry)
    );
    // The same to a host outside key_hosts.
    let server = Server::new(|n| {
        if n == 0 {
            problem(409, "request-in-flight")
        } else {
            reply(201)
        }
    });
    let elsewhere = quick().key_hosts(["idemgate.test"]).build().unwrap();
    let (status, info, _) = send(&elsewhere, &server, post("{}")).await.unwrap();
    assert_eq!((status.as_u16(), info.stop), (409, Stop::NotSafeToRetry));
    assert_eq!(server.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn absurd_retry_after_values_and_durations_do_not_panic() {
    // Review m2: durations past 24 h are refused up front...
    for b in [
        quick().retry_after_cap(Duration::MAX),
        quick().deadline(Duration::MAX),
        quick().max_delay(Duration::MAX),
        quick().breaker(BreakerConfig::default().open_for(Duration::MAX)),
    ] {
        assert!(b.build().is_err());
    }
    // ...and the largest accepted cap meets the largest Retry-After: the answer is returned.
    let day = Duration::from_secs(24 * 3600);
    let policy = quick()
        .retry_after_cap(day)
        .deadline(day)
        .max_delay(day)
        .build()
        .unwrap();
    for (status, value) in [
        (503, "18446744073709551615"),
        (429, "99999999999999999999999999"),
        (503, "Fri, 31 Dec 9999 23:59:59 GMT"),
        (409, "18446744073709551615"),
    ] {
        let server =
            Server::new(move |_| Reply::With(status, vec![("retry-after", value.into())], ""));
        let (got, info, _) = send(&policy, &server, post("{}")).await.unwrap();
        assert_eq!(
            (got.as_u16(), info.attempts, info.stop),
            (status, 1, Stop::RetryAfterTooLong),
            "{value}"
        );
    }
}

/// A wall clock an hour ahead of the server's.
#[derive(Debug)]
struct SkewedWall(SystemTime);

impl Clock for SkewedWall {
    fn now(&self) -> Instant {
        TokioClock.now()
    }
    fn wall(&self) -> SystemTime {
        self.0
    }
    fn sleep(&self, d: Duration) -> Sleep {
        TokioClock.sleep(d)
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_date_is_measured_from_the_answers_date_header() {
    // Review m3: the server says Date: T, Retry-After: T + 7 s; the client's clock is an hour
    // ahead (it would wait 0) — or behind (it would wait an hour and stop over the cap).
    let server_now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for skew in [3600i64, -3600] {
        let local = if skew > 0 {
            server_now + Duration::from_secs(3600)
        } else {
            server_now - Duration::from_secs(3600)
        };
        let date = httpdate::fmt_http_date(server_now);
        let at = httpdate::fmt_http_date(server_now + Duration::from_secs(7));
        let server = Server::new(move |n| {
            if n == 0 {
                Reply::With(
                    503,
                    vec![("date", date.clone()), ("retry-after", at.clone())],
                    "",
                )
            } else {
                reply(201)
            }
        });
        let policy = quick().clock(Arc::new(SkewedWall(local))).build().unwrap();
        let (status, info, _) = send(&policy, &server, post("{}")).await.unwrap();
        assert_eq!(status, 201, "{skew}");
        let d = info.log[1].delay;
        assert!(
            d >= Duration::from_secs(7) && d < Duration::from_millis(8400),
            "{skew}: {d:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_deadline_covers_reading_the_request_body() {
    // Review m5: a request body that never ends.
    let server = Server::new(|_| reply(201));
    let policy = quick().deadline(Duration::from_secs(2)).build().unwrap();
    let stalled = futures_util::StreamExt::chain(
        futures_util::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(
            Bytes::from_static(b"{"),
        ))]),
        futures_util::stream::pending(),
    );
    let req = Request::post("http://shop.test/orders")
        .body(StreamBody::new(stalled))
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let call = RetryLayer::new(policy.clone())
        .layer(server.clone())
        .oneshot(req);
    let err = tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .expect("the deadline ends the call")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(err.attempts(), 0);
    assert!(err.key().is_some());
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(server.calls(), 0);
    // A body that takes 1.5 s leaves the attempt 0.5 s of the 2 s.
    let slow = Server::new(|_| Reply::Sleep(Duration::from_secs(1), 201));
    let late = futures_util::stream::once(async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from_static(b"{}")))
    });
    let req = Request::post("http://shop.test/orders")
        .body(StreamBody::new(late))
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let err = RetryLayer::new(policy)
        .layer(slow.clone())
        .oneshot(req)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(t0.elapsed(), Duration::from_secs(2));
    assert_eq!(slow.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_oversized_problem_body_is_classified_by_status_and_returned_whole() {
    // Review m6: a problem+json answer over the 64 KiB read for classification.
    let big: &'static str = Box::leak(
        format!(
            r#"{{"type":"urn:example:gone","detail":"{}"}}"#,
            "x".repeat(70 * 1024)
        )
        .into_boxed_str(),
    );
    let server = Server::new(move |n| {
        if n == 0 {
            Reply::With(
                410,
                vec![("content-type", "application/problem+json".into())],
                big,
            )
        } else {
            reply(201)
        }
    });
    let (status, info, body) = send(&quick().build().unwrap(), &server, post("{}"))
        .await
        .unwrap();
    assert_eq!((status.as_u16(), info.attempts), (410, 1));
    assert_eq!(body, big.as_bytes());
    assert_eq!(server.calls(), 1);
}
