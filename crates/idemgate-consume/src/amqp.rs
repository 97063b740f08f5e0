//! RabbitMQ (AMQP 0-9-1): a consumer on an existing (or, when told, created) durable queue.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::Confirmation;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::bridge::{Bridge, Decision, Incoming};
use crate::{Config, ConsumeError, Shared};

/// The settings of the RabbitMQ source.
#[derive(Clone)]
pub struct AmqpSource {
    /// `amqp://USER:PASS@HOST:PORT/VHOST`.
    pub url: String,
    /// The queue (must exist unless `create`; never redeclared with arguments).
    pub queue: String,
}

impl std::fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSource")
            .field("url", &idemgate_stores::redact(&self.url))
            .field("queue", &self.queue)
            .finish()
    }
}

/// The virtual host a URL names, percent-decoded (`/` when it names none): the scope of
/// [`Config::consumer`](crate::Config::consumer).
pub(crate) fn vhost(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let path = rest.split_once('/').map_or("", |(_, p)| p);
    let path = path.split(['?', '#']).next().unwrap_or_default();
    if path.is_empty() {
        return "/".into();
    }
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

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
    // Dead letters go out on a connection of their own: RabbitMQ blocks a publishing
    // connection under a memory or disk alarm, and the acks of every other message must still
    // get through.
    let publishing = Connection::connect(&src.url, ConnectionProperties::default())
        .await
        .map_err(|e| ConsumeError::source("connecting to RabbitMQ (dead letters)", e))?;
    let publisher = publishing
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

    let permits = Arc::new(Semaphore::new(config.concurrency));
    let mut tasks = JoinSet::new();
    let stop = shutdown.clone();
    let mut ended = None;
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
            // The in-flight messages still finish (their acks may yet get through, or the
            // broker hands them out again) before the error is returned.
            Some(Err(e)) => {
                ended = Some(ConsumeError::source("the RabbitMQ consumer failed", e));
                break;
            }
            None => {
                ended = Some(ConsumeError::Source {
                    what: "the RabbitMQ consumer was cancelled",
                    source: "closed".into(),
                });
                break;
            }
        };
        let (bridge, config, publisher) = (bridge.clone(), config.clone(), publisher.clone());
        let queue = src.queue.clone();
        let stop_rx = stop.clone();
        let held = shared.hold();
        let shared = shared.clone();
        tasks.spawn(async move {
            if handle(delivery, &bridge, &config, &publisher, &queue, stop_rx).await {
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
    for c in [&conn, &publishing] {
        if tokio::time::timeout(CLOSE_TIMEOUT, c.close(200, "shutting down".into()))
            .await
            .is_err()
        {
            tracing::warn!("RabbitMQ did not confirm closing the connection in time");
        }
    }
    match ended {
        Some(e) => Err(e),
        None => Ok(()),
    }
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

/// The broker's delivery count: quorum queues count deliveries themselves
/// (`x-delivery-count`, 0 for the first); classic queues do not (`None`).
fn delivery_count(delivery: &lapin::message::Delivery) -> Option<u32> {
    let headers = delivery.properties.headers().as_ref()?;
    let n = match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).ok(),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).ok(),
        Some(AMQPValue::LongUInt(n)) => Some(*n),
        _ => None,
    }?;
    Some(n.saturating_add(1))
}

async fn handle(
    delivery: lapin::message::Delivery,
    bridge: &Bridge,
    config: &Config,
    publisher: &Channel,
    queue: &str,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> bool {
    let props = &delivery.properties;
    let id = props.message_id().as_ref().map(|s| s.as_str().to_owned());
    let delivered = delivery_count(&delivery);
    let incoming = Incoming {
        id: id.clone(),
        broker_id: None,
        payload: bytes::Bytes::from(delivery.data.clone()),
        content_type: props.content_type().as_ref().map(|s| s.as_str().to_owned()),
        subject: delivery.routing_key.as_str().to_owned(),
        delivered,
    };
    let decision = bridge.handle(&incoming).await;
    let acked = decision == Decision::Ack;
    let result = match decision {
        Decision::Ack => delivery.ack(BasicAckOptions::default()).await,
        Decision::Nack(delay) => {
            // RabbitMQ has no delayed requeue: hold the message (it keeps a prefetch slot)
            // for the delay, or until shutdown, then requeue it.
            hold(delay, &mut stop).await;
            delivery.reject(BasicRejectOptions { requeue: true }).await
        }
        Decision::Busy(delay) => {
            // Not an attempt: handed back with `basic.nack`, which RabbitMQ 4.3+ quorum queues
            // do not count toward their delivery-limit (a reject does).
            hold(delay, &mut stop).await;
            delivery
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
        Decision::DeadLetter(reason) => {
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
                        hold(bridge.backoff(delivered.unwrap_or(1)), &mut stop).await;
                        // Not the message's fault: a nack, which RabbitMQ 4.3+ quorum queues do
                        // not count toward their delivery-limit.
                        delivery
                            .nack(BasicNackOptions {
                                multiple: false,
                                requeue: true,
                            })
                            .await
                    }
                },
                // --no-dead-letter: the queue's own dead-letter exchange (x-dead-letter-exchange,
                // by argument or policy), if it has one; else RabbitMQ drops the message.
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

/// Holds a message for `delay`, or until shutdown.
async fn hold(delay: std::time::Duration, stop: &mut tokio::sync::watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = stop.changed() => {}
    }
}

/// Longest wait for a dead letter's publisher confirm (past it: not confirmed, the original is
/// requeued).
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Longest wait for RabbitMQ to confirm closing a connection at shutdown.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The properties of a dead letter: the original's, but its per-message TTL (`expiration`: the
/// dead letter would expire in the dead-letter queue, as RabbitMQ's own dead-lettering avoids),
/// `user-id` (RabbitMQ refuses a message whose user-id is not the publishing connection's) and
/// `reply-to`; with `headers`.
fn dead_letter_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let mut p = BasicProperties::default().with_headers(headers);
    if let Some(v) = original.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = original.delivery_mode() {
        p = p.with_delivery_mode(*v);
    }
    if let Some(v) = original.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = original.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        p = p.with_app_id(v.clone());
    }
    p
}

async fn publish_dead_letter(
    publisher: &Channel,
    exchange: &str,
    delivery: &lapin::message::Delivery,
    reason: &str,
    delivered: Option<u32>,
    queue: &str,
) -> Result<(), String> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        "x-idemgate-reason".into(),
        AMQPValue::LongString(reason.into()),
    );
    if let Some(n) = delivered {
        headers.insert(
            "x-idemgate-delivered".into(),
            AMQPValue::LongLongInt(i64::from(n)),
        );
    }
    headers.insert(
        "x-idemgate-queue".into(),
        AMQPValue::LongString(queue.into()),
    );
    let props = dead_letter_properties(&delivery.properties, headers);
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
        .map_err(|e| e.to_string())?;
    let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .map_err(|_| format!("no publisher confirm within {CONFIRM_TIMEOUT:?}"))?
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

#[cfg(test)]
mod tests {
    use super::vhost;

    #[test]
    fn vhosts_are_decoded_and_default_to_slash() {
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
        assert_eq!(vhost("amqp://guest:guest@127.0.0.1:5672/%2F"), "/");
        assert_eq!(vhost("amqp://127.0.0.1:5672"), "/");
        assert_eq!(vhost("amqp://127.0.0.1:5672/"), "/");
        assert_eq!(vhost("amqp://h/billing?heartbeat=10"), "billing");
        assert_eq!(vhost("amqp://h/a%3Ab"), "a:b");
        assert_eq!(vhost("amqp://h/bad%zz"), "bad%zz");
    }
}
