//! `idemgate consume` from NATS JetStream (the real binary, a real nats-server with JetStream at
//! `IDEMGATE_TEST_NATS_URL`, a real HTTP handler). Ignored without the variable; under CI a
//! missing server fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod consume_support;

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use consume_support::{Consumer, Handler, proof_size, proof_stores, tally, unique};

fn nats_url() -> String {
    idemgate_core::testkit::server_url("IDEMGATE_TEST_NATS_URL").expect("IDEMGATE_TEST_NATS_URL")
}

/// A stream made by "the publisher", with a short duplicate window of its own (so that a
/// re-publish after it is a real duplicate for the consumer).
async fn publisher_stream(name: &str, subject: &str) -> jetstream::Context {
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: name.to_owned(),
        subjects: vec![subject.to_owned()],
        duplicate_window: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    js
}

async fn publish(js: &jetstream::Context, subject: &str, id: &str, body: &str) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    headers.insert("Content-Type", "application/json");
    js.publish_with_headers(subject.to_owned(), headers, body.to_owned().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn pending(js: &jetstream::Context, stream: &str, durable: &str) -> (u64, usize) {
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream(stream)
        .await
        .unwrap()
        .get_consumer(durable)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    (info.num_pending, info.num_ack_pending)
}

fn args<'a>(
    handler: &'a str,
    stream: &'a str,
    subject: &'a str,
    durable: &'a str,
    store: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "--source",
        "NATS",
        "--stream",
        stream,
        "--subject",
        subject,
        "--durable",
        durable,
        "--target",
        handler,
        "--store",
        store,
    ];
    v.extend_from_slice(extra);
    // A dead-letter destination is required: tests that do not name one opt out.
    if !extra.contains(&"--dead-letter") {
        v.push("--no-dead-letter");
    }
    v
}

fn with_url<'a>(args: &mut [&'a str], url: &'a str) {
    for a in args.iter_mut() {
        if *a == "NATS" {
            *a = url;
        }
    }
}

/// Each message reaches the handler once, with its key, epoch 1, content type and subject;
/// re-published copies (outside JetStream's own window) are acked without a second POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_nats, ignore = "IDEMGATE_TEST_NATS_URL is not set")]
async fn nats_each_message_posted_once_with_headers() {
    let url = nats_url();
    let handler = Handler::start().await;
    let (name, durable) = (unique("S"), unique("d"));
    let subject = format!("{name}.orders");
    let js = publisher_stream(&name, &format!("{name}.>")).await;
    for i in 0..40 {
        publish(
            &js,
            &subject,
            &format!("order-{i}"),
            &format!("{{\"n\":{i}}}"),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().display());
    let handler_url = handler.url();
    let filter = format!("{name}.>");
    let mut a = args(&handler_url, &name, &filter, &durable, &store, &[]);
    with_url(&mut a, &url);
    let mut consumer = Consumer::start(&a);
    handler.until_distinct(40, 30).await;
    // JetStream's window has passed: the same ids again are new messages to the stream.
    tokio::time::sleep(Duration::from_millis(150)).await;
    for i in 0..10 {
        publish(
            &js,
            &subject,
            &format!("order-{i}"),
            &format!("{{\"n\":{i}}}"),
        )
        .await;
    }
    // Copies that arrive while their original runs are nacked "in progress" and come back.
    consumer
        .until_counters(&[("processed", 40), ("duplicates", 10)], 60)
        .await;
    let seen = handler.seen();
    assert_eq!(seen.len(), 40, "one POST per distinct message");
    for s in &seen {
        assert!(s.key.starts_with("order-"));
        assert_eq!(s.epoch, 1);
        assert_eq!(s.content_type, "application/json");
        assert_eq!(s.subject, subject);
        assert_eq!(s.delivery, 1);
        let n: usize = s.key["order-".len()..].parse().unwrap();
        assert_eq!(s.body, format!("{{\"n\":{n}}}"));
    }
    assert!(consumer.get("/healthz").await.contains("ok"));
    assert!(consumer.get("/readyz").await.contains("ready"));
    assert!(consumer.sigterm_and_wait(), "graceful exit");
    assert_eq!(pending(&js, &name, &durable).await, (0, 0), "all acked");
}

/// A transient status releases the key and nacks with backoff: the next delivery POSTs again,
/// at the next epoch. A message that never succeeds is dead-lettered after --max-deliver.
/// A message without an id is keyed by its place in the stream and POSTed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_nats, ignore = "IDEMGATE_TEST_NATS_URL is not set")]
async fn nats_transient_retries_then_dead_letter() {
    let url = nats_url();
    let handler = Handler::start().await;
    let (name, durable) = (unique("S"), unique("d"));
    let js = publisher_stream(&name, &format!("{name}.in")).await;
    let dlq = format!("{name}_DLQ");
    js.create_stream(stream::Config {
        name: dlq.clone(),
        subjects: vec![format!("{name}.dead")],
        ..Default::default()
    })
    .await
    .unwrap();
    let subject = format!("{name}.in");
    publish(&js, &subject, "once", "status:503:1").await;
    publish(&js, &subject, "never", "status:503:99").await;
    js.publish(subject.clone(), "no id".into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish(&js, &subject, "big", &"x".repeat(100)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().display());
    let handler_url = handler.url();
    let dead = format!("{name}.dead");
    let mut a = args(
        &handler_url,
        &name,
        &subject,
        &durable,
        &store,
        &[
            "--max-deliver",
            "3",
            "--dead-letter",
            &dead,
            "--max-payload",
            "64",
        ],
    );
    with_url(&mut a, &url);
    let mut consumer = Consumer::start(&a);
    // The dead letters: "big" at once (over --max-payload), "never" after 3 deliveries.
    let mut dead_stream = js.get_stream(&dlq).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while dead_stream.info().await.unwrap().state.messages < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no dead letters");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer
        .until_counters(&[("processed", 2), ("dead_lettered", 2)], 30)
        .await;
    let seen = handler.seen();
    let epochs = |key: &str| -> Vec<u64> {
        seen.iter()
            .filter(|s| s.key == key)
            .map(|s| s.epoch)
            .collect()
    };
    assert_eq!(epochs("once"), vec![1, 2]);
    assert_eq!(epochs("never"), vec![1, 2, 3]);
    // The id-less message: its key is the stream's creation time and its sequence (3).
    let idless: Vec<_> = seen.iter().filter(|s| s.body == "no id").collect();
    assert_eq!(idless.len(), 1, "the id-less message is POSTed once");
    assert!(
        idless[0].key.starts_with("jetstream:") && idless[0].key.ends_with(":3"),
        "{}",
        idless[0].key
    );
    assert_eq!(seen.len(), 6);
    let mut dead_letters = Vec::new();
    for seq in [1, 2] {
        let m = dead_stream.get_raw_message(seq).await.unwrap();
        // By name, case-insensitively (the client keeps well-known names as constants).
        let h = |name: &str| {
            m.headers
                .iter()
                .find(|(n, _)| AsRef::<str>::as_ref(n).eq_ignore_ascii_case(name))
                .and_then(|(_, v)| v.first())
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        // Where it came from: the stream, the durable and the original's sequence.
        assert_eq!(h("Idemgate-Stream"), name);
        assert_eq!(h("Idemgate-Durable"), durable);
        assert_eq!(
            h("Content-Type"),
            "application/json",
            "original headers kept"
        );
        // dead:<stream>:<durable>:<published ns>:<sequence>
        let msg_id = h("Nats-Msg-Id");
        assert!(
            msg_id.starts_with(&format!("dead:{name}:{durable}:"))
                && msg_id.ends_with(&format!(":{}", h("Idemgate-Sequence"))),
            "{msg_id}"
        );
        dead_letters.push((
            h("Idemgate-Message-Id"),
            h("Idemgate-Reason"),
            h("Idemgate-Sequence"),
        ));
    }
    dead_letters.sort();
    assert_eq!(
        dead_letters,
        vec![
            ("big".to_owned(), "too-large".to_owned(), "4".to_owned()),
            ("never".to_owned(), "max-deliver".to_owned(), "2".to_owned()),
        ]
    );
    assert_eq!(dead_stream.info().await.unwrap().state.messages, 2);
    assert!(consumer.sigterm_and_wait());
    assert_eq!(pending(&js, &name, &durable).await, (0, 0));
}

/// Runs `idemgate consume ARGS` expecting a refusal at start; returns its stderr.
fn refused(args: &[&str]) -> String {
    let bin = std::env::var("IDEMGATE_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_idemgate").to_owned());
    let out = std::process::Command::new(bin)
        .arg("consume")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "expected a refusal: {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Records are scoped by stream and durable: the same message id in two streams, consumed by
/// durables of the same name into one store, is two messages. Settings that would drop
/// messages are refused at start: no dead-letter destination, a memory store, an existing
/// durable whose JetStream max_deliver stops redelivery first, or whose acks are not explicit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_nats, ignore = "IDEMGATE_TEST_NATS_URL is not set")]
async fn nats_scope_and_refused_settings() {
    let url = nats_url();
    let handler = Handler::start().await;
    let handler_url = handler.url();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().display());
    let durable = unique("d");
    for (round, name) in [unique("A"), unique("B")].iter().enumerate() {
        let subject = format!("{name}.in");
        let js = publisher_stream(name, &subject).await;
        publish(&js, &subject, "same-id", "{}").await;
        let mut a = args(&handler_url, name, &subject, &durable, &store, &[]);
        with_url(&mut a, &url);
        let mut consumer = Consumer::start(&a);
        consumer.until_counters(&[("processed", 1)], 30).await;
        assert!(consumer.sigterm_and_wait());
        assert_eq!(handler.seen().len(), round + 1, "one POST per stream");
    }

    let name = unique("R");
    let subject = format!("{name}.in");
    let js = publisher_stream(&name, &subject).await;
    let base = |durable: &'static str| -> Vec<String> {
        [
            "--source",
            url.as_str(),
            "--stream",
            name.as_str(),
            "--subject",
            subject.as_str(),
            "--durable",
            durable,
            "--target",
            handler_url.as_str(),
            "--store",
            store.as_str(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    };
    let with = |mut v: Vec<String>, extra: &[&str]| {
        v.extend(extra.iter().map(|s| (*s).to_owned()));
        v
    };
    let run = |v: Vec<String>| refused(&v.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run(base("fresh")).contains("--no-dead-letter"));
    let memory = with(base("fresh"), &["--no-dead-letter"])
        .into_iter()
        .map(|a| {
            if a == store {
                "memory://".to_owned()
            } else {
                a
            }
        })
        .collect();
    assert!(run(memory).contains("memory://"));
    let stream = js.get_stream(&name).await.unwrap();
    for (durable, policy, max_deliver, want) in [
        (
            "tight",
            jetstream::consumer::AckPolicy::Explicit,
            3,
            "max_deliver",
        ),
        (
            "acknone",
            jetstream::consumer::AckPolicy::None,
            -1,
            "ack policy",
        ),
    ] {
        stream
            .create_consumer(jetstream::consumer::pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subject: subject.clone(),
                ack_policy: policy,
                max_deliver,
                ..Default::default()
            })
            .await
            .unwrap();
        let err = run(with(
            base(durable),
            &["--no-dead-letter", "--max-deliver", "5"],
        ));
        assert!(err.contains(want), "{err}");
    }
    assert_eq!(handler.seen().len(), 2, "nothing POSTed by refused runs");
}

/// A handler slower than AckWait: "in progress" acks keep JetStream from redelivering (no
/// second delivery is ever seen), and SIGTERM during it waits for the handler, then acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_nats, ignore = "IDEMGATE_TEST_NATS_URL is not set")]
async fn nats_slow_handler_gets_progress_acks_and_sigterm_drains() {
    let url = nats_url();
    let handler = Handler::start().await;
    let (name, durable) = (unique("S"), unique("d"));
    let subject = format!("{name}.in");
    let js = publisher_stream(&name, &subject).await;
    publish(&js, &subject, "slow-1", "sleep:4000").await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().display());
    let handler_url = handler.url();
    let mut a = args(
        &handler_url,
        &name,
        &subject,
        &durable,
        &store,
        &["--ack-wait-secs", "1", "--lease-secs", "1"],
    );
    with_url(&mut a, &url);
    let mut consumer = Consumer::start(&a);
    handler.until_distinct(1, 30).await;
    // The handler runs 4 s against an AckWait of 1 s; stop the consumer while it runs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        consumer.counter("in_progress").await,
        0,
        "no redelivery while it runs"
    );
    assert!(
        consumer.sigterm_and_wait(),
        "graceful exit after the handler finished"
    );
    assert_eq!(
        pending(&js, &name, &durable).await,
        (0, 0),
        "acked before exiting"
    );
    let seen = handler.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].delivery, 1);
}

/// The proof (small in CI; `IDEMGATE_PROOF_MESSAGES=10000 IDEMGATE_PROOF_KILLS=10` for the full
/// run): distinct messages plus ~20 % re-published duplicates, the consumer SIGKILLed at
/// moments spread over the run and restarted; on the embedded store, Redis and PostgreSQL: per
/// message, POSTs per epoch ≤ 1, every message delivered, nothing left pending; re-executions
/// after takeover reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_nats, ignore = "IDEMGATE_TEST_NATS_URL is not set")]
async fn nats_sigkill_proof() {
    let url = nats_url();
    let (messages, kills) = proof_size(300, 3);
    let dir = tempfile::tempdir().unwrap();
    for store in proof_stores(dir.path()) {
        let handler = Handler::start().await;
        let (name, durable) = (unique("P"), unique("d"));
        let subject = format!("{name}.in");
        let js = publisher_stream(&name, &subject).await;
        // Dead letters are captured, and there must be none.
        let dead = format!("{name}.dead");
        js.create_stream(stream::Config {
            name: format!("{name}_DLQ"),
            subjects: vec![dead.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
        let handler_url = handler.url();
        let mut a = args(
            &handler_url,
            &name,
            &subject,
            &durable,
            &store,
            &[
                "--ack-wait-secs",
                "2",
                "--lease-secs",
                "2",
                "--concurrency",
                "32",
                "--dead-letter",
                &dead,
            ],
        );
        with_url(&mut a, &url);
        let started = std::time::Instant::now();
        // Publish in the background: distinct messages, and for every fifth one an earlier id
        // again once JetStream's duplicate window (100 ms) has passed for it.
        let publisher = {
            let js = js.clone();
            let subject = subject.clone();
            tokio::spawn(async move {
                let mut published = 0;
                let mut due = std::collections::VecDeque::new();
                for i in 0..messages {
                    publish(&js, &subject, &format!("m-{i}"), &format!("{{\"n\":{i}}}")).await;
                    published += 1;
                    if i % 5 == 4 {
                        let at = tokio::time::Instant::now() + Duration::from_millis(150);
                        due.push_back((at, i - 2));
                    }
                    while due
                        .front()
                        .is_some_and(|(at, _)| *at <= tokio::time::Instant::now())
                    {
                        let (_, id) = due.pop_front().unwrap();
                        publish(&js, &subject, &format!("m-{id}"), "{\"dup\":true}").await;
                        published += 1;
                    }
                }
                // The rest, each once JetStream's window for its original has passed.
                while let Some((at, id)) = due.pop_front() {
                    tokio::time::sleep_until(at).await;
                    publish(&js, &subject, &format!("m-{id}"), "{\"dup\":true}").await;
                    published += 1;
                }
                published
            })
        };
        let mut consumer = Consumer::start(&a);
        for k in 0..kills {
            // Kill at points spread over the run: after (k+1)/(kills+1) of the messages.
            let at = messages * (k + 1) / (kills + 1);
            handler.until_distinct(at, 120).await;
            consumer.kill9();
            consumer = Consumer::start(&a);
        }
        let published = publisher.await.unwrap();
        handler.until_distinct(messages, 300).await;
        // Everything acked: wait for the broker to say so, then a graceful stop.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while pending(&js, &name, &durable).await != (0, 0) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "messages left unacked"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(consumer.sigterm_and_wait());
        let dead_letters = js
            .get_stream(format!("{name}_DLQ"))
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages;
        assert_eq!(dead_letters, 0, "nothing dead-lettered");
        let t = tally(&handler.seen());
        eprintln!(
            "PROOF nats store={} messages={messages} published={published} kills={kills} \
             posts={} distinct={} same_epoch_twice={} reexecuted_keys={} secs={:.1}",
            idemgate_stores::redact(&store),
            t.posts,
            t.distinct,
            t.same_epoch_twice,
            t.reexecuted_keys,
            started.elapsed().as_secs_f64()
        );
        assert_eq!(t.distinct, messages, "every message delivered");
        assert_eq!(t.same_epoch_twice, 0, "at most one POST per epoch");
        assert!(
            t.posts <= messages + kills * 64,
            "re-executions bounded by in-flight at kills"
        );
    }
}
