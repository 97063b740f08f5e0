//! What the checker concludes where a black box leaves room for a wrong verdict: a check that
//! cannot see what happened is an error, never a pass; a limit of the client (connections,
//! the body cap) or of the setup (an operation that fails on its own) is an error, never a
//! violation; and what the checker sends and prints is what the spec and the command line say.

#![cfg(feature = "fixtures")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use idemgate_check::fixtures::{Defect, FixtureOptions, FixtureServer};
use idemgate_check::{CheckName, Checker, Config, EffectProbe, Error, Outcome, Report, Spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use CheckName::*;

const ORDER: &str = "create order";
const ACCOUNT: &str = "update account";

fn spec(operations: &[&str]) -> Spec {
    let mut spec = FixtureServer::spec();
    spec.operations
        .retain(|o| operations.contains(&o.name.as_str()));
    spec
}

async fn run(target: String, spec: Spec, config: impl FnOnce(Config) -> Config) -> Report {
    let config = config(Config::new(target).seed(7));
    let report = Checker::new(spec, config).unwrap().run().await.unwrap();
    let mut text = Vec::new();
    report.write_human(&mut text, false).unwrap();
    eprintln!("{}", String::from_utf8_lossy(&text));
    report
}

async fn check(
    options: FixtureOptions,
    spec: Spec,
    config: impl FnOnce(Config) -> Config,
) -> Report {
    let server = FixtureServer::start_with(options).await.unwrap();
    run(server.url(), spec, config).await
}

fn outcome(report: &Report, operation: &str, check: CheckName) -> Outcome {
    report.case(operation, check).unwrap().outcome
}

fn total_probe() -> EffectProbe {
    EffectProbe {
        method: "GET".into(),
        path: "/_count".into(),
        pointer: "/executions".into(),
    }
}

/// Reads a request (head and `content-length` body); its head, `None` when the client sent
/// nothing.
async fn read_request(s: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < end + length {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some(head)
}

// --- transient (M1) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_passes_when_the_retry_after_a_first_5xx_succeeds_unmarked() {
    let report = check(FixtureOptions::new(Defect::None), spec(&[ORDER]), |c| {
        c.only([Transient])
    })
    .await;
    let case = report.case(ORDER, Transient).unwrap();
    assert_eq!(case.outcome, Outcome::Passed, "{}", case.message);
    assert!(
        case.message.contains("first 503") && case.message.contains("retry 201"),
        "{}",
        case.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_a_5xx_that_does_nothing_seen_again_is_an_error_not_a_violation() {
    // A correct server whose transient path fails every time without an effect: the probe
    // cannot tell a replay from a new failure.
    let mut spec = spec(&[ORDER]);
    spec.operations[0].transient_path = Some("/orders?fail_first=100".into());
    let report = check(FixtureOptions::new(Defect::None), spec, |c| {
        c.only([Transient])
    })
    .await;
    let case = report.case(ORDER, Transient).unwrap();
    assert_eq!(case.outcome, Outcome::Error, "{}", case.message);
    assert!(case.message.contains("fail only the first attempt"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_a_stored_5xx_replayed_without_the_marker_never_passes() {
    let mut options = FixtureOptions::new(Defect::StoresServerErrors);
    options.replay_marker = false;
    // Without a probe or an identity: nothing but the answers to go by.
    let mut blind = spec(&[ORDER]);
    blind.operations[0].effect_probe = None;
    blind.operations[0].identity = None;
    let report = check(options, blind, |c| c.only([Transient])).await;
    assert_eq!(outcome(&report, ORDER, Transient), Outcome::Error);
    assert!(!report.passed());
    // With the probe: the same (a replay and a failure that does nothing look alike).
    let report = check(options, spec(&[ORDER]), |c| c.only([Transient])).await;
    assert_eq!(outcome(&report, ORDER, Transient), Outcome::Error);
    // With the marker, it is a violation.
    let report = check(
        FixtureOptions::new(Defect::StoresServerErrors),
        spec(&[ORDER]),
        |c| c.only([Transient]),
    )
    .await;
    assert_eq!(outcome(&report, ORDER, Transient), Outcome::Failed);
}

// --- expiry (M2) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_that_cannot_be_seen_is_an_error_not_a_pass() {
    // Keys never expire; replays are not marked; no probe, no identity.
    let mut options = FixtureOptions::new(Defect::None);
    options.replay_marker = false;
    let mut blind = spec(&[ORDER]);
    blind.operations[0].effect_probe = None;
    blind.operations[0].identity = None;
    let ttl = Duration::from_millis(200);
    let report = check(options, blind, |c| c.only([Expiry]).ttl(ttl)).await;
    let case = report.case(ORDER, Expiry).unwrap();
    assert_eq!(case.outcome, Outcome::Error, "{}", case.message);
    assert_eq!(report.exit_code(), 2);
}

// --- nothing checked (M3) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_in_which_every_case_was_skipped_has_not_passed() {
    let mut spec = spec(&[ORDER]);
    spec.operations[0].slow_path = None;
    let report = check(FixtureOptions::new(Defect::None), spec, |c| {
        c.only([InFlight])
    })
    .await;
    assert_eq!(report.count(Outcome::Skipped), 1);
    assert!(!report.passed());
    assert_eq!(report.exit_code(), 2);
    assert!(report.inconclusive().unwrap().contains("skipped"));
    assert_eq!(report.to_json()["passed"], false);
}

// --- missing-key, malformed-key (M4) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_checks_against_an_operation_that_fails_with_a_key_are_errors() {
    // Every request to /nowhere fails (404 with a key, 400 without one or with a bad one).
    let mut spec = spec(&[ORDER]);
    spec.operations[0].path = "/nowhere".into();
    let report = check(FixtureOptions::new(Defect::None), spec, |c| {
        c.only([MissingKey, MalformedKey])
    })
    .await;
    for c in [MissingKey, MalformedKey] {
        let case = report.case(ORDER, c).unwrap();
        assert_eq!(case.outcome, Outcome::Error, "{c}: {}", case.message);
        assert!(
            case.message.contains("with a valid key"),
            "{}",
            case.message
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_request_must_get_400_or_at_most_422() {
    for (status, expected, warned) in [
        (StatusCode::UNAUTHORIZED, Outcome::Failed, false),
        (StatusCode::NOT_FOUND, Outcome::Failed, false),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, Outcome::Failed, false),
        (StatusCode::UNPROCESSABLE_ENTITY, Outcome::Passed, true),
    ] {
        let mut options = FixtureOptions::new(Defect::None);
        options.refusal = status;
        let report = check(options, spec(&[ORDER]), |c| c.only([MissingKey])).await;
        let case = report.case(ORDER, MissingKey).unwrap();
        assert_eq!(case.outcome, expected, "{status}: {}", case.message);
        assert_eq!(!case.warnings.is_empty(), warned, "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_that_ran_are_caught_by_a_total_probe() {
    let mut total = spec(&[ORDER]);
    total.operations[0].effect_probe = Some(total_probe());
    let report = check(
        FixtureOptions::new(Defect::RunsUnkeyedRequests),
        total.clone(),
        |c| c.only([MissingKey, MalformedKey]),
    )
    .await;
    for c in [MissingKey, MalformedKey] {
        let case = report.case(ORDER, c).unwrap();
        assert_eq!(case.outcome, Outcome::Failed, "{c}: {}", case.message);
        assert!(
            case.failures.iter().any(|f| f.contains("probe counts")),
            "{:?}",
            case.failures
        );
    }
    // A correct server with the same probe passes.
    let report = check(FixtureOptions::new(Defect::None), total, |c| {
        c.only([MissingKey, MalformedKey])
    })
    .await;
    assert!(report.passed(), "{:?}", report.cases);
}

// --- concurrent: connections the client cannot make (M5) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_the_client_cannot_make_are_an_error_not_a_violation() {
    // Accepts the run's reachability probe and answers replay's two requests, then stops
    // listening before its last answer: every connection of the concurrent burst is refused.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (probe, _) = listener.accept().await.unwrap();
        drop(probe);
        let mut listener = Some(listener);
        for last in [false, true] {
            let (mut s, _) = listener.as_ref().unwrap().accept().await.unwrap();
            read_request(&mut s).await.unwrap();
            if last {
                listener = None;
            }
            s.write_all(
                b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
            )
            .await
            .unwrap();
        }
        assert!(listener.is_none());
    });
    let mut spec = spec(&[ORDER]);
    spec.operations[0].effect_probe = None;
    spec.operations[0].identity = None;
    let report = run(url, spec, |c| c.only([Replay, Concurrent]).concurrency(4)).await;
    server.await.unwrap();
    assert_eq!(outcome(&report, ORDER, Replay), Outcome::Passed);
    let case = report.case(ORDER, Concurrent).unwrap();
    assert_eq!(case.outcome, Outcome::Error, "{}", case.message);
    assert!(
        case.message.contains("could not be made"),
        "{}",
        case.message
    );
}

// --- a store that records after answering: 409 + Retry-After on retries (m4) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_retries_follow_409_with_retry_after() {
    let mut options = FixtureOptions::new(Defect::None);
    options.reject_in_flight = true;
    // Long enough that every retry lands in it, even on a loaded machine.
    options.record_lag = Some(Duration::from_secs(1));
    let report = check(options, spec(&[ORDER, ACCOUNT]), |c| {
        c.only([Replay, Mismatch, Precondition])
    })
    .await;
    assert!(report.passed(), "{:?}", report.failed_checks());
    for (op, c) in [(ORDER, Replay), (ORDER, Mismatch), (ACCOUNT, Precondition)] {
        let case = report.case(op, c).unwrap();
        assert_eq!(case.outcome, Outcome::Passed, "{op} {c}: {}", case.message);
        // The 409 was seen and followed.
        assert!(
            case.exchanges
                .iter()
                .any(|e| e.answer.as_ref().is_some_and(|a| a.status == 409)),
            "{op} {c}"
        );
    }
}

// --- bodies over the cap (m5) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_cap_are_an_error_not_a_violation() {
    let report = check(FixtureOptions::new(Defect::None), spec(&[ORDER]), |c| {
        c.only([Replay]).body_cap(16)
    })
    .await;
    let case = report.case(ORDER, Replay).unwrap();
    assert_eq!(case.outcome, Outcome::Error, "{}", case.message);
    assert!(case.message.contains("--body-cap"), "{}", case.message);
    let err = Checker::new(
        spec(&[ORDER]),
        Config::new("http://127.0.0.1:1").body_cap(0),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
}

// --- spec and target validation (m6, m2) ---

#[test]
fn identity_and_volatile_pointers_refuse_placeholders() {
    for field in ["identity = '/{{key}}'", "volatile = ['/a/{{seq}}']"] {
        let text = format!("[[operation]]\nname = 'a'\nmethod = 'POST'\npath = '/x'\n{field}\n");
        let err = Spec::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("not templated"), "{field}: {err}");
    }
    // The probe's pointer is templated.
    Spec::from_toml_str(
        "[[operation]]\nname = 'a'\nmethod = 'POST'\npath = '/x'\neffect_probe = { path = '/s', pointer = '/per_key/{{key}}' }\n",
    )
    .unwrap();
}

#[test]
fn credentials_in_the_target_url_are_refused_without_being_echoed() {
    for target in [
        "http://user:s3cret@127.0.0.1:8080",
        "http://s3cret@127.0.0.1:8080/base",
    ] {
        let err = Checker::new(spec(&[ORDER]), Config::new(target)).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("credentials"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
    // A password holding '/' or '?' hides the '@' from a look at the authority; the URL then
    // does not parse, and the error must not echo it either.
    for target in [
        "http://user:s3/cret@127.0.0.1:8080",
        "http://user:s3?cret@127.0.0.1:8080",
    ] {
        let err = Checker::new(spec(&[ORDER]), Config::new(target)).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{err}");
        assert!(!err.to_string().contains("cret"), "{err}");
    }
}

// --- what goes on the wire and into the report (m1, m3, m7) ---

/// A server that records every request head: `GET` gets `200 {"executions": 0}` with an
/// `ETag`, anything else `status` with `body`.
struct Capture {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
}

impl Capture {
    async fn start(status: &'static str, body: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let Some(head) = read_request(&mut s).await else {
                        return;
                    };
                    let get = head.starts_with("GET ");
                    seen.lock().unwrap().push(head);
                    let (status, extra, body): (&str, &str, &[u8]) = if get {
                        ("200 OK", "etag: \"v0\"\r\n", b"{\"executions\": 0}")
                    } else {
                        (status, "", body)
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(answer.as_bytes()).await;
                    let _ = s.write_all(body).await;
                });
            }
        });
        Self { url, heads }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

fn lines_named<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_header_given_replaces_the_targets() {
    let server = Capture::start("201 Created", b"{}").await;
    let mut spec = spec(&[ORDER]);
    spec.operations[0].effect_probe = None;
    spec.operations[0].identity = None;
    let report = run(server.url.clone(), spec, |c| {
        c.only([Replay, LostResponse]).header("Host", "api.example")
    })
    .await;
    assert_eq!(report.count(Outcome::Error), 0, "{:?}", report.cases);
    // Replay's two requests, lost-response's lost one (raw bytes) and its two retries (the
    // lost one is read by the server on its own time).
    let mut heads = server.heads();
    for _ in 0..100 {
        if heads.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        heads = server.heads();
    }
    assert_eq!(heads.len(), 5, "{heads:?}");
    for head in &heads {
        let hosts = lines_named(head, "host");
        assert_eq!(hosts.len(), 1, "{head}");
        assert!(hosts[0].ends_with("api.example"), "{head}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_of_server_bodies_do_not_reach_the_report() {
    let server = Capture::start("400 Bad Request", b"\x1b[2J\x1b]0;pwned\x07 no").await;
    let mut spec = spec(&[ORDER]);
    spec.operations[0].effect_probe = None;
    let report = run(server.url.clone(), spec, |c| c.only([Replay])).await;
    let case = report.case(ORDER, Replay).unwrap();
    assert_eq!(case.outcome, Outcome::Error);
    assert!(case.message.contains("pwned"), "{}", case.message);
    let mut text = Vec::new();
    report.write_human(&mut text, false).unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(!text.contains('\x1b') && !text.contains('\x07'), "{text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_and_etag_reads_carry_the_default_headers() {
    let server = Capture::start("400 Bad Request", b"{}").await;
    let mut spec = spec(&[ACCOUNT]);
    spec.defaults
        .headers
        .insert("x-tenant".into(), "acme-{{seq}}".into());
    let report = run(server.url.clone(), spec, |c| {
        c.only([Replay]).header("x-cli", "1")
    })
    .await;
    // The probe and the ETag read succeeded, the update itself was refused: an error.
    assert_eq!(outcome(&report, ACCOUNT, Replay), Outcome::Error);
    let heads = server.heads();
    let gets: Vec<&String> = heads.iter().filter(|h| h.starts_with("GET ")).collect();
    assert_eq!(gets.len(), 2, "{heads:?}"); // the probe and the ETag read
    for head in gets {
        assert_eq!(
            lines_named(head, "x-tenant"),
            ["x-tenant: acme-1"],
            "{head}"
        );
        assert_eq!(lines_named(head, "x-cli").len(), 1, "{head}");
        assert!(lines_named(head, "content-type").is_empty(), "{head}");
        assert!(lines_named(head, "idempotency-key").is_empty(), "{head}");
    }
}

// --- precondition: probe counts that overflow (m8) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_counts_that_overflow_are_an_error_not_a_panic() {
    // A "probe" that reads the balance, set to i64::MAX by every update: the per-key counts of
    // the check's four groups overflow a u64 when summed.
    let mut spec = spec(&[ACCOUNT]);
    let op = &mut spec.operations[0];
    op.body = Some(format!("{{\"balance\": {}}}", i64::MAX));
    op.effect_probe = Some(EffectProbe {
        method: "GET".into(),
        path: "/accounts/acct-1?for={{key}}".into(),
        pointer: "/balance".into(),
    });
    let report = check(FixtureOptions::new(Defect::None), spec, |c| {
        c.only([Precondition])
    })
    .await;
    let case = report.case(ACCOUNT, Precondition).unwrap();
    assert_eq!(case.outcome, Outcome::Error, "{}", case.message);
    assert!(case.message.contains("overflow"), "{}", case.message);
}

// --- OpenAPI examples in paths and queries (m10) ---

#[test]
fn openapi_example_values_are_percent_encoded() {
    let doc = r#"{
      "openapi": "3.0.3",
      "paths": {
        "/items/{id}": {
          "put": {
            "parameters": [
              { "name": "id", "in": "path", "required": true, "example": "a b/c?d" },
              { "name": "note", "in": "query", "required": true, "example": "x&y=z é" }
            ],
            "requestBody": { "content": { "application/json": { "example": { "n": 1 } } } }
          }
        }
      }
    }"#;
    let spec = Spec::from_openapi_str(doc).unwrap();
    assert_eq!(
        spec.operations[0].path,
        "/items/a%20b%2Fc%3Fd?note=x%26y%3Dz%20%C3%A9"
    );
}

// --- mismatch: a guessed other body is named (m10) ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guessed_mismatch_body_is_noted() {
    let mut spec = spec(&[ORDER]);
    spec.operations[0].body = Some(r#"{"amount": 10}"#.into());
    let report = check(FixtureOptions::new(Defect::None), spec, |c| {
        c.only([Mismatch])
    })
    .await;
    let case = report.case(ORDER, Mismatch).unwrap();
    assert_eq!(case.outcome, Outcome::Passed, "{}", case.message);
    assert!(
        case.notes.iter().any(|n| n.contains("is a guess")),
        "{:?}",
        case.notes
    );
}
