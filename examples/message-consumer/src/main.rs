//! A NATS JetStream consumer whose handler's effect is exactly-once (PostgreSQL inbox), at most
//! once per epoch (store-based dedup), or not deduplicated at all (for comparison), and a
//! publisher for tests and benchmarks.
//!
//! ```text
//! message-consumer consume --nats URL --stream S --subject SUBJ --durable D --mode inbox --postgres URL --effects TABLE
//! message-consumer consume ... --mode library --store URL        # the effect: a row in memory, counted
//! message-consumer consume ... --mode plain                      # no dedup
//! message-consumer publish --nats URL --subject SUBJ --count N [--dup-every K] [--create-stream S]
//! ```
//!
//! `consume` prints `consuming` once bound, and with `--exit-after N` exits after N acks,
//! printing `acked=N secs=T`. Arguments are `--name value` pairs; errors exit with status 2.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer, consumer::pull};
use futures_util::StreamExt;
use idemgate_dedup::inbox::{InboxOutcome, PgInbox};
use idemgate_dedup::{Action, Deduplicator, Handled, MessageId};

type Error = Box<dyn std::error::Error + Send + Sync>;

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
    let result = match command.as_str() {
        "consume" => consume(&map).await,
        "publish" => publish(&map).await,
        _ => Err("usage: message-consumer consume|publish --name value …".into()),
    };
    if let Err(e) = result {
        eprintln!("message-consumer: {e}");
        std::process::exit(2);
    }
}

async fn publish(map: &HashMap<String, String>) -> Result<(), Error> {
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
    let mut acks = futures_util::stream::FuturesUnordered::new();
    let mut published = 0u64;
    // Re-published ids wait until JetStream's duplicate window (at least 100 ms) has passed
    // for their original, so that they reach the stream as real duplicates.
    let mut due: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let window = Duration::from_millis(map.get("dup-delay-ms").map_or(Ok(300), |v| v.parse())?);
    for i in 0..count + 1 {
        let mut ids = Vec::new();
        if i < count {
            ids.push(i);
            if dup_every > 0 && i % dup_every == dup_every - 1 && i >= 2 {
                due.push_back((Instant::now() + window, i - 2));
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
            // At most 256 unconfirmed publishes in flight.
            while acks.len() >= 256 {
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

enum Mode {
    Inbox {
        client: Box<tokio::sync::Mutex<tokio_postgres::Client>>,
        inbox: PgInbox,
        insert: String,
    },
    Library(Deduplicator<idemgate_core::SharedStore>),
    Plain,
}

async fn consume(map: &HashMap<String, String>) -> Result<(), Error> {
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
                max_ack_pending: 256,
                ..Default::default()
            },
        )
        .await?;
    let mode = match get(map, "mode")? {
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
            }
        }
        "library" => {
            let (store, _) = idemgate_stores::open(get(map, "store")?).await?.stack(
                &idemgate_stores::StackOptions {
                    deadline: Duration::from_secs(5),
                    replay_cache_entries: 0,
                },
            );
            Mode::Library(Deduplicator::builder(store).lease_ttl(ack_wait).build())
        }
        "plain" => Mode::Plain,
        other => return Err(format!("--mode inbox|library|plain, not {other:?}").into()),
    };
    let exit_after: u64 = map.get("exit-after").map_or(Ok(u64::MAX), |v| v.parse())?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await?;
    println!("consuming");
    let acked = Arc::new(AtomicU64::new(0));
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
        let ack = match &mode {
            Mode::Inbox {
                client,
                inbox,
                insert,
            } => {
                let mut client = client.lock().await;
                match inbox
                    .process_once(&mut client, &durable, &id, async |tx| {
                        tx.execute(insert.as_str(), &[&id.as_str()])
                            .await
                            .map(|_| ())
                    })
                    .await
                {
                    // Committed now or before: ack.
                    Ok(InboxOutcome::Processed(()) | InboxOutcome::Duplicate) => AckKind::Ack,
                    Ok(InboxOutcome::InProgress) => AckKind::Nak(Some(Duration::from_millis(500))),
                    // Nothing committed: the redelivery runs it.
                    Err(e) => {
                        eprintln!("inbox: {e}; message handed back");
                        AckKind::Nak(Some(Duration::from_millis(500)))
                    }
                }
            }
            Mode::Library(dedup) => {
                let p = dedup
                    .process_once(&durable, &id, |_| async { Handled::done("") })
                    .await?;
                match p.action() {
                    Action::Ack => AckKind::Ack,
                    Action::Nack { delay } => AckKind::Nak(delay),
                    Action::DeadLetter => AckKind::Term,
                }
            }
            Mode::Plain => AckKind::Ack,
        };
        msg.ack_with(ack).await?;
        let n = acked.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= exit_after {
            break;
        }
    }
    println!(
        "acked={} secs={:.3}",
        acked.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
