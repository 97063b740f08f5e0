//! `idemgate consume` from RabbitMQ (the real binary, a real broker at `IDEMGATE_TEST_AMQP_URL`,
//! a real HTTP handler). Ignored without the variable; under CI a missing broker fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod consume_support;

use std::time::Duration;

use consume_support::{Consumer, Handler, proof_size, proof_stores, tally, unique};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

fn amqp_url() -> String {
    idemgate_core::testkit::server_url("IDEMGATE_TEST_AMQP_URL").expect("IDEMGATE_TEST_AMQP_URL")
}

/// The publisher's side: a connection, a confirming channel, and its durable queue declared
/// without arguments.
async fn publisher(queue: &str) -> (Connection, Channel) {
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    (conn, ch)
}

async fn publish(ch: &Channel, queue: &str, id: Option<&str>, body: &str) {
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    if let Some(id) = id {
        props = props.with_message_id(id.into());
    }
    let confirm = ch
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
}

/// Messages ready in `queue` (a passive declare: it changes nothing).
async fn ready(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

async fn cleanup(ch: &Channel, queues: &[&str]) {
    for q in queues {
        let _ = ch
            .queue_delete((*q).into(), QueueDeleteOptions::default())
            .await;
    }
}

fn args<'a>(
    url: &'a str,
    queue: &'a str,
    handler: &'a str,
    store: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec![
        "--source", url, "--queue", queue, "--target", handler, "--store", store,
    ];
    v.extend_from_slice(extra);
    // A dead-letter destination is required: tests that do not name one opt out.
    if !extra.contains(&"--dead-letter") {
        v.push("--no-dead-letter");
    }
    v
}

/// A fanout dead-letter exchange bound to a queue of its own: `(exchange, queue)`.
async fn dead_letter_exchange(ch: &lapin::Channel) -> (String, String) {
    let exchange = unique("dlx");
    let dlq = unique("dlq");
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        dlq.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        dlq.as_str().into(),
        exchange.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    (exchange, dlq)
}

/// Each message reaches the handler once with its key (message_id), epoch 1, content type and
/// routing key; re-published copies are acked without a second POST; the publisher's queue is
/// used as it is (a missing queue is refused without --create).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_amqp, ignore = "IDEMGATE_TEST_AMQP_URL is not set")]
async fn amqp_each_message_posted_once_with_headers() {
    let url = amqp_url();
    let handler = Handler::start().await;
    let queue = unique("q");
    let (_conn, ch) = publisher(&queue).await;
    for i in 0..40 {
        publish(
            &ch,
            &queue,
            Some(&format!("order-{i}")),
            &format!("{{\"n\":{i}}}"),
        )
        .await;
    }
    for i in 0..10 {
        publish(
            &ch,
            &queue,
            Some(&format!("order-{i}")),
            &format!("{{\"n\":{i}}}"),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().display());
    let handler_url = handler.url();
    let mut consumer = Consumer::start(&args(&url, &queue, &handler_url, &store, &[]));
    handler.until_distinct(40, 30).await;
    // Copies that arrive while their original runs are nacked "in progress" and come back.
    consumer
        .until_counters(&[("processed", 40), ("duplicates", 10)], 60)
        .await;
    let seen = handler.seen();
    assert_eq!(seen.len(), 40);
    for s in &seen {
        assert_eq!(s.epoch, 1);
        assert_eq!(s.content_type, "application/json");
        assert_eq!(
            s.subject, queue,
            "routing key (default exchange: the queue)"
        );
        let n: usize = s.key["order-".len()..].parse().unwrap();
        assert_eq!(s.body, format!("{{\"n\":{n}}}"));
    }
    assert!(consumer.sigterm_and_wait());
    assert_eq!(ready(&ch, &queue).await, 0);

    // A queue that does not exist is not created without --create.
    let missing = unique("missing");
    let bin = std::env::var("IDEMGATE_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_idemgate").to_owned());
    let out = std::process::Command::new(&bin)
        .arg("consume")
        .args(args(&url, &missing, &handler_url, &store, &[]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--create"));
    // No dead-letter destination named, and none refused: refused at start.
    let out = std::process::Command::new(bin)
        .arg("consume")
        .args([
            "--source",
            &url,
            "--queue",
            &queue,
            "--target",
            &handler_url,
            "--store",
            &store,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-dead-letter"));
    cleanup(&ch, &[&queue]).await;
}

/// Transient statuses are retried at the next epoch; after --max-deliver a message goes to the
/// --dead-letter exchange (confirmed), and an id-less one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_amqp, ignore = "IDEMGATE_TEST_AMQP_URL is not set")]
async fn amqp_transient_retries_then_dead_letter_exchange() {
    let url = amqp_url();
    let handler = Handler::start().await;
    let queue = unique("q");
    let (_conn, ch) = publisher(&queue).await;
    let (exchange, dlq) = dead_letter_exchange(&ch).await;
    publish(&ch, &queue, Some("once"), "status:503:1").await;
    publish(&ch, &queue, Some("never"), "status:503:99").await;
    publish(&ch, &queue, None, "no id").await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file:{}", dir.path().display());
    let handler_url = handler.url();
    let mut consumer = Consumer::start(&args(
        &url,
        &queue,
        &handler_url,
        &store,
        &["--max-deliver", "3", "--dead-letter", &exchange],
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ready(&ch, &dlq).await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no dead letters");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = handler.seen();
    let epochs = |key: &str| -> Vec<u64> {
        seen.iter()
            .filter(|s| s.key == key)
            .map(|s| s.epoch)
            .collect()
    };
    assert_eq!(epochs("once"), vec![1, 2]);
    assert_eq!(epochs("never"), vec![1, 2, 3]);
    assert_eq!(seen.len(), 5);
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let got = ch
            .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a dead letter");
        let reason = match got
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-idemgate-reason").cloned())
        {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => format!("{other:?}"),
        };
        reasons.push(reason);
    }
    assert!(
        reasons.iter().any(|r| r.contains("max-deliver")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("no-message-id")),
        "{reasons:?}"
    );
    assert_eq!(consumer.counter("dead_lettered").await, 2);
    assert!(consumer.sigterm_and_wait());
    assert_eq!(ready(&ch, &queue).await, 0);
    cleanup(&ch, &[&queue, &dlq]).await;
}

/// The proof on RabbitMQ (small in CI; see `nats_sigkill_proof`): re-published duplicates and
/// SIGKILLs (RabbitMQ requeues a dead consumer's unacked messages at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(no_amqp, ignore = "IDEMGATE_TEST_AMQP_URL is not set")]
async fn amqp_sigkill_proof() {
    let url = amqp_url();
    let (messages, kills) = proof_size(300, 3);
    let dir = tempfile::tempdir().unwrap();
    for store in proof_stores(dir.path()) {
        let handler = Handler::start().await;
        let queue = unique("proof");
        let (_conn, ch) = publisher(&queue).await;
        let handler_url = handler.url();
        // Dead letters are captured, and there must be none.
        let (exchange, dlq) = dead_letter_exchange(&ch).await;
        let a = args(
            &url,
            &queue,
            &handler_url,
            &store,
            &[
                "--lease-secs",
                "2",
                "--concurrency",
                "32",
                "--dead-letter",
                &exchange,
            ],
        );
        let started = std::time::Instant::now();
        let publisher = {
            let ch = ch.clone();
            let queue = queue.clone();
            tokio::spawn(async move {
                let mut published = 0;
                for i in 0..messages {
                    publish(
                        &ch,
                        &queue,
                        Some(&format!("m-{i}")),
                        &format!("{{\"n\":{i}}}"),
                    )
                    .await;
                    published += 1;
                    if i % 5 == 4 {
                        publish(&ch, &queue, Some(&format!("m-{}", i - 2)), "{\"dup\":true}").await;
                        published += 1;
                    }
                }
                published
            })
        };
        let mut consumer = Consumer::start(&a);
        for k in 0..kills {
            let at = messages * (k + 1) / (kills + 1);
            handler.until_distinct(at, 120).await;
            consumer.kill9();
            consumer = Consumer::start(&a);
        }
        let published = publisher.await.unwrap();
        handler.until_distinct(messages, 300).await;
        // Messages of the killed consumers come back (some only after their lease expired):
        // wait until the queue is empty and this consumer holds nothing, then a graceful stop.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while ready(&ch, &queue).await != 0 || consumer.held().await != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "messages left in the queue"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(consumer.sigterm_and_wait());
        assert_eq!(ready(&ch, &queue).await, 0, "nothing left after the drain");
        assert_eq!(ready(&ch, &dlq).await, 0, "nothing dead-lettered");
        let t = tally(&handler.seen());
        eprintln!(
            "PROOF amqp store={} messages={messages} published={published} kills={kills} \
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
        cleanup(&ch, &[&queue]).await;
    }
}
