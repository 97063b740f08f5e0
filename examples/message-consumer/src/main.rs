//! A NATS JetStream or RabbitMQ consumer whose handler's effect is exactly-once (PostgreSQL
//! inbox), at most once per epoch (store-based dedup), or not deduplicated at all (for
//! comparison), and a publisher for tests and benchmarks.
//!
//! ```text
//! message-consumer consume --nats URL --stream S --subject SUBJ --durable D --mode inbox --postgres URL --inbox TABLE --effects TABLE
//! message-consumer consume --amqp URL --queue Q --mode inbox --postgres URL --inbox TABLE --effects TABLE
//! message-consumer consume ... --mode library --store URL        # the effect: a row in memory, counted
//! message-consumer consume ... --mode plain                      # no dedup
//! message-consumer publish --nats URL --subject SUBJ --count N [--dup-every K] [--create-stream S]
//! message-consumer publish --amqp URL --queue Q --count N [--dup-every K]
//! ```
//!
//! The message id is the `Nats-Msg-Id` header or the AMQP `message_id` property (a message
//! without one is keyed by a hash of its payload). The dedup consumer name is the durable
//! (NATS) or the queue (RabbitMQ). `publish` sends ids `m-0` … `m-(N-1)`, and with
//! `--dup-every K` re-publishes `m-(i-2)` after every K-th message: ~1/K duplicates.
//!
//! `consume` prints `consuming` once bound, and with `--exit-after N` exits after N acks,
//! printing `acked=N secs=T`. With `--print-duplicates 1` the inbox prints `duplicate ID` for
//! every delivery it answers as a duplicate, before that delivery is acked. On SIGTERM a RabbitMQ consumer stops taking deliveries, handles
//! and acks the ones it already holds, and exits (status 0) with the same line. Arguments are
//! `--name value` pairs; errors exit with status 2.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, consumer::pull};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use idemgate_dedup::inbox::{InboxOutcome, PgInbox};
use idemgate_dedup::{Action, Deduplicator, Handled, MessageId};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tokio::signal::unix::{SignalKind, signal};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Most unconfirmed publishes, and most unacked deliveries a consumer is given.
const IN_FLIGHT: usize = 256;
/// How long a message that could not be decided now waits before it is handed back.
const RETRY_DELAY: Duration = Duration::from_millis(500);

fn args() -> (String, HashMap<String, String>) {
    let mut it = std::env::args().skip(1);
    let command = it.next().unwrap_or_default();
    let mut map = HashMap::new();
    while let Some(name) = it.next() {
        let value = it.next().unwrap_or_default();
        map.insert(name.trim_start_matches("--").to_owned(), value);
    }
    (command, map)
}

fn get<'a>(map: &'a HashMap<String, String>, name: &str) -> Result<&'a str, Error> {
    map.get(name)
        .map(String::as_str)
        .ok_or_else(|| format!("--{name} is required").into())
}

#[tokio::main]
async fn main() {
    let (command, map) = args();
    let result = match (command.as_str(), map.contains_key("amqp")) {
        ("consume", false) => consume_nats(&map).await,
        ("consume", true) => consume_amqp(&map).await,
        ("publish", false) => publish_nats(&map).await,
        ("publish", true) => publish_amqp(&map).await,
        _ => Err(
            "usage: message-consumer consume|publish --nats URL|--amqp URL --name value …".into(),
        ),
    };
    if let Err(e) = result {
        eprintln!("message-consumer: {e}");
        std::process::exit(2);
    }
}

/// The ids to publish at step `i` of `count` (see the module docs): `i` itself, and after every
/// `dup_every`-th one the id two before it again.
fn ids_at(i: u64, dup_every: u64) -> impl Iterator<Item = u64> {
    let dup = (dup_every > 0 && i % dup_every == dup_every - 1 && i >= 2).then(|| i - 2);
    std::iter::once(i).chain(dup)
}

async fn publish_nats(map: &HashMap<String, String>) -> Result<(), Error> {
    let js = jetstream::new(async_nats::connect(get(map, "nats")?).await?);
    let subject = get(map, "subject")?.to_owned();
    if let Some(stream) = map.get("create-stream") {
        js.get_or_create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await?;
    }
    let count: u64 = get(map, "count")?.parse()?;
    let dup_every: u64 = map.get("dup-every").map_or(Ok(0), |v| v.parse())?;
    let started = Instant::now();
    let mut acks = FuturesUnordered::new();
    let mut published = 0u64;
    // Re-published ids wait until JetStream's duplicate window (at least 100 ms) has passed
    // for their original, so that they reach the stream as real duplicates.
    let mut due: VecDeque<(Instant, u64)> = VecDeque::new();
    let window = Duration::from_millis(map.get("dup-delay-ms").map_or(Ok(300), |v| v.parse())?);
    for i in 0..count + 1 {
        let mut ids = Vec::new();
        if i < count {
            let mut at_i = ids_at(i, dup_every);
            ids.extend(at_i.next());
            for dup in at_i {
                due.push_back((Instant::now() + window, dup));
            }
        }
        if i == count {
            // The end: every pending duplicate, once its time has come.
            if let Some((at, _)) = due.back() {
                tokio::time::sleep_until((*at).into()).await;
            }
        }
        while due.front().is_some_and(|(at, _)| *at <= Instant::now()) {
            if let Some((_, id)) = due.pop_front() {
                ids.push(id);
            }
        }
        for id in ids {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("m-{id}").as_str());
            acks.push(std::future::IntoFuture::into_future(
                js.publish_with_headers(subject.clone(), headers, format!("{id}").into())
                    .await?,
            ));
            published += 1;
            while acks.len() >= IN_FLIGHT {
                if let Some(ack) = acks.next().await {
                    ack?;
                }
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    println!(
        "published={published} secs={:.3}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Publishes to the default exchange with routing key `--queue` (which must exist: publishes
/// are mandatory and confirmed, and an unroutable one is an error), persistent, each with its
/// `message_id`. RabbitMQ has no duplicate window: every re-publish is a duplicate.
async fn publish_amqp(map: &HashMap<String, String>) -> Result<(), Error> {
    let conn = Connection::connect(get(map, "amqp")?, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let queue = get(map, "queue")?;
    let count: u64 = get(map, "count")?.parse()?;
    let dup_every: u64 = map.get("dup-every").map_or(Ok(0), |v| v.parse())?;
    let started = Instant::now();
    let mut confirms = FuturesUnordered::new();
    let mut published = 0u64;
    let confirmed = |c: Result<Confirmation, lapin::Error>| -> Result<(), Error> {
        match c? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(format!("no queue {queue:?}: unroutable").into()),
            Confirmation::Nack(_) => Err("the broker refused a message (nack)".into()),
            Confirmation::NotRequested => Err("the broker did not confirm".into()),
        }
    };
    for i in 0..count {
        for id in ids_at(i, dup_every) {
            let props = BasicProperties::default()
                .with_message_id(format!("m-{id}").into())
                .with_content_type("text/plain".into())
                .with_delivery_mode(2);
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    id.to_string().as_bytes(),
                    props,
                )
                .await?;
            confirms.push(std::future::IntoFuture::into_future(confirm));
            published += 1;
            while confirms.len() >= IN_FLIGHT {
                if let Some(c) = confirms.next().await {
                    confirmed(c)?;
                }
            }
        }
    }
    while let Some(c) = confirms.next().await {
        confirmed(c)?;
    }
    let _ = conn.close(200, "published".into()).await;
    println!(
        "published={published} secs={:.3}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What to tell the broker about a message.
enum Verdict {
    /// Processed now or before: ack.
    Ack,
    /// Nothing was decided (in progress elsewhere, or the inbox failed): hand it back, after
    /// the delay if any.
    Retry(Option<Duration>),
    /// The store-based deduplicator gave up on it (outcome unknown, too many attempts).
    DeadLetter,
}

enum Mode {
    Inbox {
        client: Box<tokio::sync::Mutex<tokio_postgres::Client>>,
        inbox: PgInbox,
        insert: String,
        print_duplicates: bool,
    },
    Library(Deduplicator<idemgate_core::SharedStore>),
    Plain,
}

impl Mode {
    async fn open(map: &HashMap<String, String>, lease: Duration) -> Result<Self, Error> {
        Ok(match get(map, "mode")? {
            "inbox" => {
                let (client, conn) =
                    tokio_postgres::connect(get(map, "postgres")?, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                let inbox = PgInbox::new(get(map, "inbox")?).map_err(|e| e.to_string())?;
                inbox.migrate(&client).await?;
                let effects = get(map, "effects")?;
                client
                    .batch_execute(&format!(
                        "CREATE TABLE IF NOT EXISTS {effects} (message_id text NOT NULL)"
                    ))
                    .await?;
                Mode::Inbox {
                    client: Box::new(tokio::sync::Mutex::new(client)),
                    inbox,
                    insert: format!("INSERT INTO {effects} (message_id) VALUES ($1)"),
                    print_duplicates: map.get("print-duplicates").is_some_and(|v| v == "1"),
                }
            }
            "library" => {
                let (store, _) = idemgate_stores::open(get(map, "store")?).await?.stack(
                    &idemgate_stores::StackOptions {
                        deadline: Duration::from_secs(5),
                        replay_cache_entries: 0,
                    },
                );
                Mode::Library(Deduplicator::builder(store).lease_ttl(lease).build())
            }
            "plain" => Mode::Plain,
            other => return Err(format!("--mode inbox|library|plain, not {other:?}").into()),
        })
    }

    /// Processes one delivery of message `id` for `consumer`: the effect (a row in the effects
    /// table, in the inbox's transaction) at most once per message.
    async fn handle(&self, consumer: &str, id: &MessageId) -> Result<Verdict, Error> {
        Ok(match self {
            Mode::Inbox {
                client,
                inbox,
                insert,
                print_duplicates,
            } => {
                let mut client = client.lock().await;
                match inbox
                    .process_once(&mut client, consumer, id, async |tx| {
                        tx.execute(insert.as_str(), &[&id.as_str()])
                            .await
                            .map(|_| ())
                    })
                    .await
                {
                    // Committed now or before: ack.
                    Ok(InboxOutcome::Processed(())) => Verdict::Ack,
                    Ok(InboxOutcome::Duplicate) => {
                        if *print_duplicates {
                            println!("duplicate {}", id.as_str());
                        }
                        Verdict::Ack
                    }
                    Ok(InboxOutcome::InProgress) => Verdict::Retry(Some(RETRY_DELAY)),
                    // Nothing committed: the redelivery runs it.
                    Err(e) => {
                        eprintln!("inbox: {e}; message handed back");
                        Verdict::Retry(Some(RETRY_DELAY))
                    }
                }
            }
            Mode::Library(dedup) => {
                let p = dedup
                    .process_once(consumer, id, |_| async { Handled::done("") })
                    .await?;
                match p.action() {
                    Action::Ack => Verdict::Ack,
                    Action::Nack { delay } => Verdict::Retry(delay),
                    Action::DeadLetter => Verdict::DeadLetter,
                }
            }
            Mode::Plain => Verdict::Ack,
        })
    }
}

fn exit_after(map: &HashMap<String, String>) -> Result<u64, Error> {
    Ok(map.get("exit-after").map_or(Ok(u64::MAX), |v| v.parse())?)
}

async fn consume_nats(map: &HashMap<String, String>) -> Result<(), Error> {
    let js = jetstream::new(async_nats::connect(get(map, "nats")?).await?);
    let stream = js.get_stream(get(map, "stream")?).await?;
    let durable = get(map, "durable")?.to_owned();
    let ack_wait = Duration::from_secs(map.get("ack-wait-secs").map_or(Ok(2), |v| v.parse())?);
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            &durable,
            pull::Config {
                durable_name: Some(durable.clone()),
                filter_subject: get(map, "subject")?.to_owned(),
                ack_wait,
                max_ack_pending: IN_FLIGHT as i64,
                ..Default::default()
            },
        )
        .await?;
    let mode = Mode::open(map, ack_wait).await?;
    let exit_after = exit_after(map)?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(IN_FLIGHT)
        .messages()
        .await?;
    println!("consuming");
    let mut acked = 0u64;
    let started = Instant::now();
    // One message at a time: the inbox holds one connection (a pool would run several).
    while let Some(msg) = messages.next().await {
        let msg = msg?;
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .and_then(|v| MessageId::new(v.as_str()))
            .unwrap_or_else(|| MessageId::content_hash(&msg.payload));
        let ack = match mode.handle(&durable, &id).await? {
            Verdict::Ack => AckKind::Ack,
            Verdict::Retry(delay) => AckKind::Nak(delay),
            Verdict::DeadLetter => AckKind::Term,
        };
        let is_ack = matches!(ack, AckKind::Ack);
        msg.ack_with(ack).await?;
        acked += u64::from(is_ack);
        if acked >= exit_after {
            break;
        }
    }
    println!("acked={acked} secs={:.3}", started.elapsed().as_secs_f64());
    Ok(())
}

async fn consume_amqp(map: &HashMap<String, String>) -> Result<(), Error> {
    let conn = Connection::connect(get(map, "amqp")?, ConnectionProperties::default()).await?;
    let channel = conn.create_channel().await?;
    let queue = get(map, "queue")?.to_owned();
    // RabbitMQ redelivers when the consumer's connection goes, not after a time: the lease of
    // the store-based mode only covers a consumer that hangs.
    let lease = Duration::from_secs(map.get("lease-secs").map_or(Ok(2), |v| v.parse())?);
    let mode = Mode::open(map, lease).await?;
    let exit_after = exit_after(map)?;
    channel
        .basic_qos(IN_FLIGHT as u16, BasicQosOptions::default())
        .await?;
    let tag = format!("message-consumer-{}", std::process::id());
    let mut deliveries = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut sigterm = signal(SignalKind::terminate())?;
    println!("consuming");
    let mut acked = 0u64;
    let mut cancelled = false;
    // Deliveries handed back after a delay, each holding its prefetch slot meanwhile (RabbitMQ
    // has no delayed requeue).
    let mut retries = tokio::task::JoinSet::new();
    let started = Instant::now();
    // One message at a time, as for NATS.
    loop {
        let next = tokio::select! {
            next = deliveries.next() => next,
            _ = sigterm.recv(), if !cancelled => {
                // No new deliveries; the stream still yields the ones already received, then
                // ends.
                channel
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await?;
                cancelled = true;
                continue;
            }
        };
        let Some(delivery) = next else { break };
        let delivery = delivery?;
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|v| MessageId::new(v.as_str()))
            .unwrap_or_else(|| MessageId::content_hash(&delivery.data));
        match mode.handle(&queue, &id).await? {
            Verdict::Ack => {
                if delivery.ack(BasicAckOptions::default()).await? {
                    acked += 1;
                }
            }
            Verdict::Retry(delay) => {
                retries.spawn(async move {
                    tokio::time::sleep(delay.unwrap_or_default()).await;
                    delivery.reject(BasicRejectOptions { requeue: true }).await
                });
            }
            // To the queue's dead-letter exchange, if it has one; else RabbitMQ drops it.
            Verdict::DeadLetter => {
                delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await?;
            }
        }
        while let Some(done) = retries.try_join_next() {
            done??;
        }
        if acked >= exit_after {
            break;
        }
    }
    while let Some(done) = retries.join_next().await {
        done??;
    }
    // Whatever this consumer still holds unacked goes back to the queue with the channel.
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "done".into()).await;
    println!("acked={acked} secs={:.3}", started.elapsed().as_secs_f64());
    Ok(())
}
