//! RabbitMQ (AMQP 0-9-1): a consumer on an existing (or, when told, created) durable queue.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::bridge::{Bridge, Decision, Incoming};
use crate::{Config, ConsumeError, Shared};

/// The settings of the RabbitMQ source.
#[derive(Clone, Debug)]
pub struct AmqpSource {
    /// `amqp://USER:PASS@HOST:PORT/VHOST`.
    pub url: String,
    /// The queue (must exist unless `create`; never redeclared with arguments).
    pub queue: String,
}

/// Most message ids whose delivery counts are tracked in this process (for queues that do not
/// count deliveries themselves, i.e. classic queues). At the bound the table is cleared: counts
/// start again from the broker's `redelivered` flag, so max-deliver is reached later, never
/// sooner.
const MAX_TRACKED: usize = 100_000;

pub(crate) async fn run(
    src: &AmqpSource,
    config: Arc<Config>,
    bridge: Bridge,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ConsumeError> {
    let conn = Connection::connect(&src.url, ConnectionProperties::default())
        .await
        .map_err(|e| ConsumeError::source("connecting to RabbitMQ", e))?;
    ensure_queue(&conn, &src.queue, config.create).await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| ConsumeError::source("opening a channel", e))?;
    let prefetch = u16::try_from(config.concurrency).unwrap_or(u16::MAX);
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| ConsumeError::source("setting the prefetch", e))?;
    if let Some(exchange) = &config.dead_letter {
        // It must exist (a publish to a missing exchange closes the channel for good, and every
        // later dead letter would fail): checked on a channel of its own, which a refusal closes.
        let probe = conn
            .create_channel()
            .await
            .map_err(|e| ConsumeError::source("opening a channel", e))?;
        probe
            .exchange_declare(
                ShortString::from(exchange.as_str()),
                lapin::ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    passive: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|_| {
                ConsumeError::Config(format!(
                    "the dead-letter exchange {exchange:?} does not exist on this virtual host \
                     (declare it, bound to a queue, before starting)"
                ))
            })?;
        let _ = probe.close(200, "checked".into()).await;
    }
    let publisher = conn
        .create_channel()
        .await
        .map_err(|e| ConsumeError::source("opening a channel", e))?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| ConsumeError::source("enabling publisher confirms", e))?;
    let tag = format!("idemgate-consume-{}", std::process::id());
    let mut consumer = channel
        .basic_consume(
            ShortString::from(src.queue.as_str()),
            ShortString::from(tag.as_str()),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| ConsumeError::source("consuming from the queue", e))?;
    shared.set_ready(true);
    tracing::info!(queue = %src.queue, "consuming from RabbitMQ");

    let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let permits = Arc::new(Semaphore::new(config.concurrency));
    let mut tasks = JoinSet::new();
    let stop = shutdown.clone();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let next = tokio::select! {
            d = consumer.next() => d,
            _ = shutdown.changed() => break,
        };
        while tasks.try_join_next().is_some() {}
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                shared.set_ready(false);
                return Err(ConsumeError::source("the RabbitMQ consumer failed", e));
            }
            None => {
                shared.set_ready(false);
                return Err(ConsumeError::Source {
                    what: "the RabbitMQ consumer was cancelled",
                    source: "closed".into(),
                });
            }
        };
        let (bridge, config, publisher, counts) = (
            bridge.clone(),
            config.clone(),
            publisher.clone(),
            counts.clone(),
        );
        let queue = src.queue.clone();
        let stop_rx = stop.clone();
        let held = shared.hold();
        let shared = shared.clone();
        tasks.spawn(async move {
            if handle(
                delivery, &bridge, &config, &publisher, &counts, &queue, stop_rx,
            )
            .await
            {
                shared.acked();
            }
            drop((permit, held));
        });
    }
    shared.set_ready(false);
    // Stop deliveries; messages not acked by the end of the drain go back to the queue when
    // the connection closes.
    let _ = channel
        .basic_cancel(
            ShortString::from(tag.as_str()),
            BasicCancelOptions::default(),
        )
        .await;
    crate::drain(&mut tasks, config.drain_timeout).await;
    let _ = conn.close(200, "shutting down".into()).await;
    Ok(())
}

/// Checks that the queue exists (a passive declare: it never changes a queue's arguments); when
/// it does not and `create` is set, declares it durable, without arguments.
async fn ensure_queue(conn: &Connection, queue: &str, create: bool) -> Result<(), ConsumeError> {
    // A failed passive declare closes its channel: use a throwaway one.
    let probe = conn
        .create_channel()
        .await
        .map_err(|e| ConsumeError::source("opening a channel", e))?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match probe
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if !create => Err(ConsumeError::source(
            "the queue does not exist or cannot be used (--create declares it)",
            e,
        )),
        Err(_) => {
            let channel = conn
                .create_channel()
                .await
                .map_err(|e| ConsumeError::source("opening a channel", e))?;
            channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| ConsumeError::source("declaring the queue", e))?;
            tracing::info!(queue, "declared the queue (durable, no arguments)");
            Ok(())
        }
    }
}

fn delivery_count(
    delivery: &lapin::message::Delivery,
    id: Option<&str>,
    counts: &Mutex<HashMap<String, u32>>,
) -> u32 {
    // Quorum queues count deliveries themselves (`x-delivery-count`, 0 for the first).
    if let Some(headers) = delivery.properties.headers() {
        let n = match headers.inner().get("x-delivery-count") {
            Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).ok(),
            Some(AMQPValue::LongInt(n)) => u32::try_from(*n).ok(),
            Some(AMQPValue::LongUInt(n)) => Some(*n),
            _ => None,
        };
        if let Some(n) = n {
            return n.saturating_add(1);
        }
    }
    let Some(id) = id else {
        return if delivery.redelivered { 2 } else { 1 };
    };
    let mut counts = counts.lock();
    if counts.len() >= MAX_TRACKED {
        counts.clear();
    }
    let seen = counts.entry(id.to_owned()).or_insert(0);
    *seen = (*seen).max(u32::from(delivery.redelivered)) + 1;
    *seen
}

async fn handle(
    delivery: lapin::message::Delivery,
    bridge: &Bridge,
    config: &Config,
    publisher: &Channel,
    counts: &Mutex<HashMap<String, u32>>,
    queue: &str,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> bool {
    let props = &delivery.properties;
    let id = props.message_id().as_ref().map(|s| s.as_str().to_owned());
    let delivered = delivery_count(&delivery, id.as_deref(), counts);
    let incoming = Incoming {
        id: id.clone(),
        payload: bytes::Bytes::from(delivery.data.clone()),
        content_type: props.content_type().as_ref().map(|s| s.as_str().to_owned()),
        subject: delivery.routing_key.as_str().to_owned(),
        delivered,
    };
    let decision = bridge.handle(&incoming).await;
    let acked = decision == Decision::Ack;
    let result = match decision {
        Decision::Ack => {
            if let Some(id) = &id {
                counts.lock().remove(id);
            }
            delivery.ack(BasicAckOptions::default()).await
        }
        Decision::Nack(delay) => {
            // RabbitMQ has no delayed requeue: hold the message (it keeps a prefetch slot)
            // for the delay, or until shutdown, then requeue it.
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => {}
            }
            delivery.reject(BasicRejectOptions { requeue: true }).await
        }
        Decision::DeadLetter(reason) => {
            if let Some(id) = &id {
                counts.lock().remove(id);
            }
            match &config.dead_letter {
                // Our own dead-letter exchange: publish (confirmed), then ack.
                Some(exchange) => match publish_dead_letter(
                    publisher, exchange, &delivery, reason, delivered, queue,
                )
                .await
                {
                    Ok(()) => {
                        bridge.dedup.dead_lettered();
                        delivery.ack(BasicAckOptions::default()).await
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "could not publish the dead letter; message requeued");
                        tokio::select! {
                            _ = tokio::time::sleep(bridge.backoff(delivered)) => {}
                            _ = stop.changed() => {}
                        }
                        delivery.reject(BasicRejectOptions { requeue: true }).await
                    }
                },
                // The queue's own dead-letter exchange (x-dead-letter-exchange, by argument or
                // policy), if it has one; else RabbitMQ drops the message.
                None => {
                    bridge.dedup.dead_lettered();
                    delivery.reject(BasicRejectOptions { requeue: false }).await
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "acknowledgement to RabbitMQ failed; the message will come back");
        return false;
    }
    acked
}

async fn publish_dead_letter(
    publisher: &Channel,
    exchange: &str,
    delivery: &lapin::message::Delivery,
    reason: &str,
    delivered: u32,
    queue: &str,
) -> Result<(), String> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        "x-idemgate-reason".into(),
        AMQPValue::LongString(reason.into()),
    );
    headers.insert(
        "x-idemgate-delivered".into(),
        AMQPValue::LongLongInt(i64::from(delivered)),
    );
    headers.insert(
        "x-idemgate-queue".into(),
        AMQPValue::LongString(queue.into()),
    );
    let props: BasicProperties = delivery.properties.clone().with_headers(headers);
    // Mandatory: a dead letter the exchange routes nowhere comes back (RabbitMQ still confirms
    // an unroutable message with an ack), and the original is then not acked.
    let confirm = publisher
        .basic_publish(
            exchange.into(),
            delivery.routing_key.clone(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &delivery.data,
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    match confirm {
        Confirmation::Ack(None) => {}
        Confirmation::Ack(Some(_)) => {
            return Err(
                "the dead-letter exchange routed the dead letter to no queue (bind a queue)".into(),
            );
        }
        Confirmation::Nack(_) => {
            return Err("the broker refused the dead letter (nack)".into());
        }
        Confirmation::NotRequested => {
            return Err("the broker did not confirm the dead letter".into());
        }
    }
    Ok(())
}
