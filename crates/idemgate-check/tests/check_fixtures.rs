//! The checker against the fixture servers over real sockets: a correct server passes every
//! check; each deliberately broken one fails exactly the check(s) that its mistake breaks and
//! passes the others.

#![cfg(feature = "fixtures")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use idemgate_check::fixtures::{Defect, FixtureOptions, FixtureServer};
use idemgate_check::{CheckName, Checker, Config, Error, Outcome, Report, Spec};

use CheckName::*;

const ORDER: &str = "create order";
const ACCOUNT: &str = "update account";

/// Every check but expiry (tested on its own: a short TTL would make the others' retries race
/// it).
const ALL_BUT_EXPIRY: [CheckName; 9] = [
    Replay,
    Concurrent,
    Mismatch,
    MissingKey,
    LostResponse,
    InFlight,
    MalformedKey,
    Transient,
    Precondition,
];

fn spec(operations: &[&str]) -> Spec {
    let mut spec = FixtureServer::spec();
    spec.operations
        .retain(|o| operations.contains(&o.name.as_str()));
    spec
}

async fn check(
    options: FixtureOptions,
    spec: Spec,
    config: impl FnOnce(Config) -> Config,
) -> Report {
    let server = FixtureServer::start_with(options).await.unwrap();
    let config = config(Config::new(server.url()).seed(11));
    let report = Checker::new(spec, config).unwrap().run().await.unwrap();
    let mut text = Vec::new();
    report.write_human(&mut text, false).unwrap();
    eprintln!("{}", String::from_utf8_lossy(&text));
    report
}

fn with(outcome: Outcome, report: &Report) -> BTreeSet<CheckName> {
    report
        .cases
        .iter()
        .filter(|c| c.outcome == outcome)
        .map(|c| c.check)
        .collect()
}

fn set(checks: &[CheckName]) -> BTreeSet<CheckName> {
    checks.iter().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_server_passes_every_check() {
    let report = check(
        FixtureOptions::new(Defect::None),
        spec(&[ORDER, ACCOUNT]),
        |c| c.only(ALL_BUT_EXPIRY).strict_marker(true),
    )
    .await;
    assert!(report.passed(), "{:?}", report.failed_checks());
    for case in &report.cases {
        let expected = match (case.operation.as_str(), case.check) {
            (ORDER, Precondition) | (ACCOUNT, Transient) => Outcome::Skipped,
            _ => Outcome::Passed,
        };
        assert_eq!(
            case.outcome, expected,
            "{} {}: {}",
            case.operation, case.check, case.message
        );
        assert!(case.warnings.is_empty(), "{:?}", case.warnings);
    }
    assert_eq!(report.cases.len(), 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_correct_server_that_rejects_duplicates_in_flight_with_409_passes() {
    let mut options = FixtureOptions::new(Defect::None);
    options.reject_in_flight = true;
    let report = check(options, spec(&[ORDER, ACCOUNT]), |c| {
        c.only([Replay, Concurrent, LostResponse, InFlight, Precondition])
    })
    .await;
    assert!(report.passed(), "{:?}", report.failed_checks());
    // The duplicate in flight got 409 + Retry-After, then the same final answer.
    let in_flight = report.case(ORDER, InFlight).unwrap();
    assert!(in_flight.message.contains("409"), "{}", in_flight.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_idempotency_fails_every_idempotency_check() {
    let report = check(
        FixtureOptions::new(Defect::NoIdempotency),
        spec(&[ORDER]),
        |c| c.only(ALL_BUT_EXPIRY),
    )
    .await;
    assert_eq!(
        with(Outcome::Failed, &report),
        set(&[
            Replay,
            Concurrent,
            Mismatch,
            MissingKey,
            LostResponse,
            InFlight,
            MalformedKey
        ])
    );
    // A server that never stores anything lets a retry after a 5xx run again: that is allowed.
    assert_eq!(with(Outcome::Passed, &report), set(&[Transient]));
    let concurrent = report.case(ORDER, Concurrent).unwrap();
    assert!(
        concurrent.message.contains("16 effects"),
        "{}",
        concurrent.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_the_payload_fails_mismatch_only() {
    let report = check(
        FixtureOptions::new(Defect::IgnoresPayload),
        spec(&[ORDER]),
        |c| c.only(ALL_BUT_EXPIRY),
    )
    .await;
    assert_eq!(with(Outcome::Failed, &report), set(&[Mismatch]));
    assert_eq!(
        with(Outcome::Passed, &report),
        set(&[
            Replay,
            Concurrent,
            MissingKey,
            LostResponse,
            InFlight,
            MalformedKey,
            Transient
        ])
    );
    let mismatch = report.case(ORDER, Mismatch).unwrap();
    assert!(
        mismatch.message.contains("answered 201, not 422"),
        "{}",
        mismatch.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_then_act_race_fails_concurrent() {
    let report = check(
        FixtureOptions::new(Defect::CheckThenAct),
        spec(&[ORDER, ACCOUNT]),
        |c| c.only(ALL_BUT_EXPIRY),
    )
    .await;
    let failed = with(Outcome::Failed, &report);
    assert!(failed.contains(&Concurrent), "{failed:?}");
    // The in-flight check sends its two requests at once too, so it may catch the race as well.
    assert!(
        failed.is_subset(&set(&[Concurrent, InFlight])),
        "{failed:?}"
    );
    for c in [
        Replay,
        Mismatch,
        MissingKey,
        LostResponse,
        MalformedKey,
        Precondition,
    ] {
        assert!(!failed.contains(&c), "{c} failed");
        assert!(
            report
                .cases
                .iter()
                .filter(|x| x.check == c)
                .all(|x| x.outcome != Outcome::Error)
        );
    }
    // Both operations: the orders run more than once; the account's duplicates are refused by
    // If-Match (one effect) but are answered 412 while another copy succeeded.
    let order = report.case(ORDER, Concurrent).unwrap();
    assert_eq!(order.outcome, Outcome::Failed, "{}", order.message);
    let account = report.case(ACCOUNT, Concurrent).unwrap();
    assert_eq!(account.outcome, Outcome::Failed, "{}", account.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stores_5xx_answers_fails_transient_only() {
    let report = check(
        FixtureOptions::new(Defect::StoresServerErrors),
        spec(&[ORDER]),
        |c| c.only(ALL_BUT_EXPIRY),
    )
    .await;
    assert_eq!(with(Outcome::Failed, &report), set(&[Transient]));
    assert_eq!(
        with(Outcome::Passed, &report),
        set(&[
            Replay,
            Concurrent,
            Mismatch,
            MissingKey,
            LostResponse,
            InFlight,
            MalformedKey
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_replays_another_body_fails_replay_only_unless_the_field_is_volatile() {
    let report = check(
        FixtureOptions::new(Defect::ReplaysDifferentBody),
        spec(&[ORDER]),
        |c| c.only(ALL_BUT_EXPIRY),
    )
    .await;
    assert_eq!(with(Outcome::Failed, &report), set(&[Replay]));
    assert_eq!(
        with(Outcome::Passed, &report),
        set(&[
            Concurrent,
            Mismatch,
            MissingKey,
            LostResponse,
            InFlight,
            MalformedKey,
            Transient
        ])
    );
    let replay = report.case(ORDER, Replay).unwrap();
    assert!(
        replay.message.contains("bodies differ"),
        "{}",
        replay.message
    );

    let mut tolerant = spec(&[ORDER]);
    tolerant.operations[0].volatile = vec!["/served".into()];
    let report = check(
        FixtureOptions::new(Defect::ReplaysDifferentBody),
        tolerant,
        |c| c.only([Replay]),
    )
    .await;
    assert!(report.passed(), "{:?}", report.failed_checks());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_ignores_if_match_fails_precondition_only() {
    let report = check(
        FixtureOptions::new(Defect::IgnoresIfMatch),
        spec(&[ACCOUNT]),
        |c| c.only(ALL_BUT_EXPIRY),
    )
    .await;
    assert_eq!(with(Outcome::Failed, &report), set(&[Precondition]));
    assert_eq!(
        with(Outcome::Passed, &report),
        set(&[
            Replay,
            Concurrent,
            Mismatch,
            MissingKey,
            LostResponse,
            InFlight,
            MalformedKey
        ])
    );
    let case = report.case(ACCOUNT, Precondition).unwrap();
    assert!(
        case.failures.iter().any(|f| f.contains("not 412")),
        "{:?}",
        case.failures
    );
    assert!(
        case.failures.iter().any(|f| f.contains("lost update")),
        "{:?}",
        case.failures
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_sees_a_new_key_after_the_ttl_and_fails_where_keys_never_expire() {
    let ttl = Duration::from_secs(1);
    let mut expiring = FixtureOptions::new(Defect::None);
    expiring.ttl = Some(ttl);
    let report = check(expiring, spec(&[ORDER]), |c| c.only([Expiry]).ttl(ttl)).await;
    assert!(report.passed(), "{:?}", report.failed_checks());

    let report = check(FixtureOptions::new(Defect::None), spec(&[ORDER]), |c| {
        c.only([Expiry]).ttl(ttl)
    })
    .await;
    assert_eq!(with(Outcome::Failed, &report), set(&[Expiry]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violations_carry_a_reproducer_and_the_answers_seen() {
    let report = check(
        FixtureOptions::new(Defect::NoIdempotency),
        spec(&[ORDER]),
        |c| {
            c.only([Replay, LostResponse])
                .header("Authorization", "Bearer s3cret")
        },
    )
    .await;
    let replay = report.case(ORDER, Replay).unwrap();
    let repro = replay.reproducer.as_deref().unwrap();
    assert_eq!(repro.lines().count(), 2, "{repro}");
    assert!(repro.contains("curl -si -X POST"), "{repro}");
    assert!(
        repro.contains("-H 'idempotency-key: idemgate-check-"),
        "{repro}"
    );
    assert!(repro.contains("authorization: <redacted>"), "{repro}");
    let answered: Vec<u16> = replay
        .exchanges
        .iter()
        .filter(|e| e.label != "probe")
        .map(|e| e.answer.as_ref().unwrap().status)
        .collect();
    assert_eq!(answered, [201, 201]);
    let lost = report.case(ORDER, LostResponse).unwrap();
    assert!(
        lost.reproducer
            .as_deref()
            .unwrap()
            .contains("/dev/tcp/127.0.0.1/")
    );
    let json = report.to_json().to_string();
    assert!(!json.contains("s3cret"));
    let mut junit = Vec::new();
    report.write_junit(&mut junit).unwrap();
    let junit = String::from_utf8(junit).unwrap();
    assert!(junit.contains("<failure message="), "{junit}");
    assert!(!junit.contains("s3cret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_sends_the_same_requests() {
    let bodies = |report: &Report| -> Vec<(String, String)> {
        report
            .cases
            .iter()
            .flat_map(|c| &c.exchanges)
            .map(|e| (e.request.url.clone(), e.request.body.clone()))
            // The servers' ports differ: compare paths.
            .map(|(url, body)| {
                let path = url.trim_start_matches("http://");
                (path[path.find('/').unwrap()..].to_owned(), body)
            })
            .collect()
    };
    let a = check(FixtureOptions::new(Defect::None), spec(&[ORDER]), |c| {
        c.only([Replay, Mismatch])
    })
    .await;
    let b = check(FixtureOptions::new(Defect::None), spec(&[ORDER]), |c| {
        c.only([Replay, Mismatch])
    })
    .await;
    assert_eq!(a.seed, 11);
    assert_eq!(bodies(&a), bodies(&b));
    let keys = |r: &Report| -> Vec<String> {
        r.cases
            .iter()
            .flat_map(|c| &c.exchanges)
            .flat_map(|e| &e.request.headers)
            .filter(|(n, _)| n == "idempotency-key")
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(keys(&a), keys(&b));
    assert!(!keys(&a).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_is_an_error_before_any_check() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = Config::new(format!("http://127.0.0.1:{port}"));
    let err = Checker::new(spec(&[ORDER]), config)
        .unwrap()
        .run()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_that_does_not_succeed_is_an_error_not_a_pass() {
    let mut spec = spec(&[ORDER]);
    spec.operations[0].path = "/nowhere".into();
    let report = check(FixtureOptions::new(Defect::None), spec, |c| {
        c.only([Replay, Concurrent])
    })
    .await;
    assert_eq!(report.count(Outcome::Error), 2, "{:?}", report.cases);
    assert!(!report.passed());
}
