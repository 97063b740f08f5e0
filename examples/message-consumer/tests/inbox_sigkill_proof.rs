//! The inbox proof, on both brokers: messages with ~20 % re-published duplicates (every fifth
//! message re-publishes an earlier id) consumed by `message-consumer --mode inbox`, SIGKILLed at
//! moments spread over the run (its unacked messages are redelivered) and restarted at once: at
//! the end, effects == distinct messages, each exactly once, nothing left pending and nothing
//! dead-lettered or dropped.
//!
//! - NATS JetStream: the duplicates are re-published after the stream's duplicate window, so
//!   that the stream keeps them; redeliveries come after `AckWait` (1 s).
//! - RabbitMQ: a durable queue whose dead-letter exchange routes to a queue of the test's own
//!   (a rejected-without-requeue message would land there); redeliveries come when the killed
//!   consumer's connection goes. The last consumer is stopped by SIGTERM (it acks what it holds,
//!   then exits), after which the queue must be empty: an unacked message would be back in it.
//!
//! Each consumer prints the duplicates it answers: those beyond the re-published copies are
//! redeliveries that arrived after the message's effect had committed — after a kill between
//! `COMMIT` and the ack (the crash window the inbox closes), or on NATS after `AckWait` expired
//! while the message waited in the consumer's buffer — and are reported as
//! `redelivered_after_commit`.
//!
//! Small by default (1,000 messages, 3 kills each); `IDEMGATE_PROOF_MESSAGES=10000
//! IDEMGATE_PROOF_KILLS=10` for the full run. Needs `IDEMGATE_TEST_POSTGRES_URL` and the
//! broker's variable (`IDEMGATE_TEST_NATS_URL`, `IDEMGATE_TEST_AMQP_URL`); ignored without
//! them, and under CI they must be set.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} must be set"))
}

fn size(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Names unique to this run.
fn tag() -> String {
    format!(
        "{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    )
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_message-consumer"))
}

/// The consumer under test: the running process, restarted with the same arguments, and the
/// `duplicate ID` lines every process printed (read by one thread per process).
struct Consumer {
    args: Vec<String>,
    child: Child,
    duplicates: Arc<AtomicUsize>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Consumer {
    fn start(args: Vec<String>) -> Self {
        let mut consumer = Self {
            child: Self::spawn(&args),
            args,
            duplicates: Arc::default(),
            readers: Vec::new(),
        };
        consumer.read_output();
        consumer
    }

    /// Starts a process and waits until it says it is bound.
    fn spawn(args: &[String]) -> Child {
        bin()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    fn read_output(&mut self) {
        let mut lines = BufReader::new(self.child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        assert_eq!(first, "consuming");
        let duplicates = self.duplicates.clone();
        self.readers.push(std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.starts_with("duplicate ") {
                    duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    fn restart(&mut self) {
        self.child = Self::spawn(&self.args);
        self.read_output();
    }

    /// SIGKILL, and the wait for the exit.
    fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM; true when the consumer then exited with success.
    fn sigterm_and_wait(&mut self) -> bool {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap().success()
    }

    /// Once the last process exited: every line of every process read, the duplicates counted.
    fn duplicates(self) -> usize {
        for reader in self.readers {
            reader.join().unwrap();
        }
        self.duplicates.load(Ordering::Relaxed)
    }
}

/// Runs the publisher; returns how many messages it published.
fn publish(args: &[&str]) -> usize {
    let out = bin().arg("publish").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{}", stdout.trim());
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("published="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {stdout:?}"))
}

/// The inbox's database, where the proof counts effects.
struct Effects {
    client: tokio_postgres::Client,
    inbox: String,
    effects: String,
}

impl Effects {
    async fn new(pg: &str, tag: &str) -> Self {
        let (client, conn) = tokio_postgres::connect(pg, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        Self {
            client,
            inbox: format!("inbox_{tag}"),
            effects: format!("effects_{tag}"),
        }
    }

    /// The consumer's arguments for its inbox and effects tables.
    fn args(&self, pg: &str) -> Vec<String> {
        [
            "--mode",
            "inbox",
            "--print-duplicates",
            "1",
            "--postgres",
            pg,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--inbox".into(),
            self.inbox.clone(),
            "--effects".into(),
            self.effects.clone(),
        ])
        .collect()
    }

    async fn count(&self, sql: String) -> usize {
        match self.client.query_one(&sql, &[]).await {
            Ok(row) => row.get::<_, i64>(0) as usize,
            Err(_) => 0, // the table is not there yet
        }
    }

    async fn total(&self) -> usize {
        self.count(format!("SELECT count(*) FROM {}", self.effects))
            .await
    }

    /// Effect rows, distinct messages among them, inbox rows.
    async fn tally(&self) -> (usize, usize, usize) {
        (
            self.total().await,
            self.count(format!(
                "SELECT count(DISTINCT message_id) FROM {}",
                self.effects
            ))
            .await,
            self.count(format!("SELECT count(*) FROM {}", self.inbox))
                .await,
        )
    }

    /// Waits until `n` effects were committed.
    async fn until(&self, n: usize, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        while self.total().await < n {
            assert!(tokio::time::Instant::now() < deadline, "stalled {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Starts the consumer, SIGKILLs it after `kills` evenly spread fractions of `messages` took
/// effect and restarts it each time.
async fn run_with_kills(
    args: Vec<String>,
    effects: &Effects,
    messages: usize,
    kills: usize,
) -> Consumer {
    let mut consumer = Consumer::start(args);
    for k in 0..kills {
        effects
            .until(
                messages * (k + 1) / (kills + 1),
                &format!("before kill {k}"),
            )
            .await;
        consumer.kill9(); // mid-stream: its unacked messages are redelivered
        consumer.restart();
    }
    consumer
}

/// Every stored copy was acked at least once, and every ack but one per message answered a
/// duplicate (printed before its ack): at least `published - messages` duplicates. Those beyond
/// are redeliveries that arrived after the message's effect had committed (see the file's
/// docs). Returns that excess.
fn redelivered_after_commit(duplicates: usize, published: usize, messages: usize) -> usize {
    assert!(
        duplicates >= published - messages,
        "{duplicates} duplicates answered for {} re-published copies",
        published - messages
    );
    duplicates - (published - messages)
}

fn assert_exactly_once(messages: usize, (effects, distinct, inbox_rows): (usize, usize, usize)) {
    assert_eq!(distinct, messages, "every message took effect");
    assert_eq!(
        effects, messages,
        "effects == distinct messages: none twice"
    );
    assert_eq!(inbox_rows, messages, "one dedup row per message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    any(no_nats, no_postgres),
    ignore = "IDEMGATE_TEST_NATS_URL or IDEMGATE_TEST_POSTGRES_URL is not set"
)]
async fn inbox_effects_equal_distinct_messages_across_sigkills() {
    let (nats, pg) = (
        var("IDEMGATE_TEST_NATS_URL"),
        var("IDEMGATE_TEST_POSTGRES_URL"),
    );
    let messages = size("IDEMGATE_PROOF_MESSAGES", 1_000);
    let kills = size("IDEMGATE_PROOF_KILLS", 3);
    let tag = tag();
    let (name, durable) = (format!("INBOX_{tag}"), format!("inbox_{tag}"));
    let subject = format!("{name}.in");
    let client = async_nats::connect(&nats).await.unwrap();
    let js = jetstream::new(client.clone());
    // The publisher's stream, with the shortest duplicate window JetStream takes (100 ms); the
    // publisher re-publishes ids 300 ms later: real duplicates for the consumer.
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        duplicate_window: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    publish(&[
        "--nats",
        &nats,
        "--subject",
        &subject,
        "--count",
        &messages.to_string(),
        "--dup-every",
        "5",
    ]);
    let stored = || async {
        js.get_stream(&name)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    };
    let published = stored().await;
    assert!(
        published as usize > messages,
        "duplicates reached the stream: {published}"
    );
    // A terminated message, or one past its max deliveries, is announced by an advisory: the
    // consumer's ways of dropping or dead-lettering one.
    let mut dropped = Vec::new();
    for event in ["MSG_TERMINATED", "MAX_DELIVERIES"] {
        dropped.push(
            client
                .subscribe(format!(
                    "$JS.EVENT.ADVISORY.CONSUMER.{event}.{name}.{durable}"
                ))
                .await
                .unwrap(),
        );
    }
    client.flush().await.unwrap();

    let effects = Effects::new(&pg, &format!("nats_{tag}")).await;
    let mut args: Vec<String> = [
        "consume",
        "--nats",
        &nats,
        "--stream",
        &name,
        "--subject",
        &subject,
        "--durable",
        &durable,
        "--ack-wait-secs",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(effects.args(&pg));
    let started = std::time::Instant::now();
    let mut consumer = run_with_kills(args, &effects, messages, kills).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let mut durable_consumer: jetstream::consumer::PullConsumer = js
        .get_stream(&name)
        .await
        .unwrap()
        .get_consumer(&durable)
        .await
        .unwrap();
    loop {
        let info = durable_consumer.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages left unacked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.kill9();
    // Every advisory the server sent before this round trip has arrived.
    client.flush().await.unwrap();
    let mut advisories = Vec::new();
    for sub in &mut dropped {
        while let Some(Some(m)) = sub.next().now_or_never() {
            advisories.push(m.subject.to_string());
        }
    }
    let tally = effects.tally().await;
    let duplicates = consumer.duplicates();
    let redelivered = redelivered_after_commit(duplicates, published as usize, messages);
    eprintln!(
        "PROOF inbox broker=nats messages={messages} published={published} kills={kills} \
         effects={} distinct={} inbox_rows={} duplicates_answered={duplicates} \
         redelivered_after_commit={redelivered} dropped_or_dead={} secs={:.1}",
        tally.0,
        tally.1,
        tally.2,
        advisories.len(),
        started.elapsed().as_secs_f64()
    );
    assert_exactly_once(messages, tally);
    assert!(
        advisories.is_empty(),
        "{} dropped or dead-lettered, the first: {:?}",
        advisories.len(),
        advisories.first()
    );
    assert_eq!(stored().await, published, "the stream lost nothing");
}

/// The RabbitMQ side of the test: a connection and channel, and the queues it declared.
async fn amqp(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

/// Messages ready in `queue`, and its consumers (a passive declare: it changes nothing).
async fn queue_state(ch: &Channel, queue: &str) -> (u32, u32) {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (q.message_count(), q.consumer_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    any(no_amqp, no_postgres),
    ignore = "IDEMGATE_TEST_AMQP_URL or IDEMGATE_TEST_POSTGRES_URL is not set"
)]
async fn inbox_over_rabbitmq_effects_equal_distinct_messages_across_sigkills() {
    let (url, pg) = (
        var("IDEMGATE_TEST_AMQP_URL"),
        var("IDEMGATE_TEST_POSTGRES_URL"),
    );
    let messages = size("IDEMGATE_PROOF_MESSAGES", 1_000);
    let kills = size("IDEMGATE_PROOF_KILLS", 3);
    let tag = tag();
    let (queue, dlx, dead) = (
        format!("inbox_{tag}"),
        format!("inbox_{tag}.dlx"),
        format!("inbox_{tag}.dead"),
    );
    let (_conn, ch) = amqp(&url).await;
    // Where anything rejected without requeue (or otherwise dead-lettered) would go.
    ch.exchange_declare(
        dlx.as_str().into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(dead.as_str().into(), durable, FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        dead.as_str().into(),
        dlx.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dlx.as_str().into()),
    );
    ch.queue_declare(queue.as_str().into(), durable, arguments)
        .await
        .unwrap();
    let published = publish(&[
        "--amqp",
        &url,
        "--queue",
        &queue,
        "--count",
        &messages.to_string(),
        "--dup-every",
        "5",
    ]);
    assert!(published > messages, "duplicates published: {published}");
    assert_eq!(
        queue_state(&ch, &queue).await,
        (published as u32, 0),
        "every publish is in the queue"
    );

    let effects = Effects::new(&pg, &format!("amqp_{tag}")).await;
    let mut args: Vec<String> = ["consume", "--amqp", &url, "--queue", &queue]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(effects.args(&pg));
    let started = std::time::Instant::now();
    let mut consumer = run_with_kills(args, &effects, messages, kills).await;
    effects.until(messages, "before the end").await;
    // Every message took effect; redeliveries of already-processed ones may still be queued or
    // held. Stop the consumer gracefully once the queue is empty: it acks what it holds. A
    // message it could not ack (none is expected) would be back in the queue: run it again.
    let mut stops = 0;
    loop {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while queue_state(&ch, &queue).await.0 != 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "messages left in the queue"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(consumer.sigterm_and_wait(), "the consumer's SIGTERM exit");
        stops += 1;
        // Its channel's unacked messages are requeued when the queue lets go of its consumer.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let (ready, consumers) = loop {
            let state = queue_state(&ch, &queue).await;
            if state.1 == 0 {
                break state;
            }
            assert!(tokio::time::Instant::now() < deadline, "consumer not gone");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if ready == 0 {
            assert_eq!(consumers, 0);
            break;
        }
        assert!(
            stops < 5,
            "{ready} messages left after {stops} graceful stops"
        );
        consumer.restart();
    }
    let tally = effects.tally().await;
    let (dead_letters, _) = queue_state(&ch, &dead).await;
    let duplicates = consumer.duplicates();
    let redelivered = redelivered_after_commit(duplicates, published, messages);
    eprintln!(
        "PROOF inbox broker=rabbitmq messages={messages} published={published} kills={kills} \
         effects={} distinct={} inbox_rows={} duplicates_answered={duplicates} \
         redelivered_after_commit={redelivered} dead_lettered={dead_letters} \
         graceful_stops={stops} secs={:.1}",
        tally.0,
        tally.1,
        tally.2,
        started.elapsed().as_secs_f64()
    );
    assert_exactly_once(messages, tally);
    assert_eq!(dead_letters, 0, "nothing dead-lettered");
    for q in [&queue, &dead] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
    ch.exchange_delete(dlx.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}
