//! The broker-independent part of `consume`: one message in, one decision out (ack, nack with a
//! delay, dead-letter), with the HTTP call run through the [`Deduplicator`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idemgate_core::SharedStore;
use idemgate_dedup::{Action, Deduplicator, Dispatch, Handled, MessageId, StoredResponse};

use crate::Config;

/// A message as every source hands it over.
#[derive(Clone, Debug)]
pub(crate) struct Incoming {
    /// `Nats-Msg-Id` or AMQP `message_id`.
    pub id: Option<String>,
    /// The broker's own identity of this message, the same on every redelivery (JetStream:
    /// the message's publication time and its stream sequence): the key of a message
    /// without `id` when payload hashing is off.
    pub broker_id: Option<String>,
    pub payload: Bytes,
    pub content_type: Option<String>,
    /// NATS subject or AMQP routing key.
    pub subject: String,
    /// Which delivery this is (1 for the first), when the broker counts deliveries (JetStream,
    /// RabbitMQ quorum queues).
    pub delivered: Option<u32>,
}

/// What the source must do with the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Ack,
    /// An attempt that did not succeed (counted against max-deliver): redeliver after the
    /// delay.
    Nack(Duration),
    /// Not an attempt (another consumer runs it; the store failed or lost the outcome):
    /// redeliver after the delay, never counted against max-deliver.
    Busy(Duration),
    DeadLetter(&'static str),
}

/// The decision for what the deduplicator made of a delivery (`name` is
/// [`idemgate_dedup::Processed::name`]). Only an attempt that ran and was released (a transient
/// status, an unreachable target) counts towards `max-deliver`: an outcome the store failed to
/// record is nacked whatever the count (dead-lettering it would hand an operator a message
/// that may have succeeded, under a record still held); it is handed back after `hand_back`.
pub(crate) fn decide(
    action: Action,
    name: &'static str,
    at_limit: bool,
    backoff: Duration,
    hand_back: Duration,
    max: Duration,
) -> Decision {
    match action {
        Action::Ack => Decision::Ack,
        // Running elsewhere: never counted against max-deliver.
        Action::Nack { delay: Some(d) } => Decision::Busy(d.min(max)),
        Action::Nack { delay: None } if name == "unrecorded" => Decision::Busy(hand_back),
        Action::Nack { delay: None } if at_limit => Decision::DeadLetter("max-deliver"),
        Action::Nack { delay: None } => Decision::Nack(backoff),
        Action::DeadLetter => Decision::DeadLetter(name),
    }
}

/// The deduplicator and the HTTP target.
#[derive(Clone)]
pub(crate) struct Bridge {
    pub dedup: Deduplicator<SharedStore>,
    consumer: Arc<str>,
    attempts: Arc<Attempts>,
    target: Arc<Target>,
    config: Arc<Config>,
}

struct Target {
    uri: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    response_timeout: Duration,
    max_response_body: usize,
    transient: Vec<u16>,
}

/// How long an idle connection to the target is kept for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_millis(500);

/// The header that carries the NATS subject or the AMQP routing key.
pub const SUBJECT_HEADER: &str = "x-idemgate-subject";
/// The header that carries the delivery count the broker reported.
pub const DELIVERY_HEADER: &str = "x-idemgate-delivery";

impl Bridge {
    pub(crate) fn new(
        dedup: Deduplicator<SharedStore>,
        consumer: &str,
        config: Arc<Config>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.concurrency)
            // Short, as `idemgate serve`'s upstream pool: a handler's server that closes an idle
            // connection just as a message is written to it would make that message
            // outcome-unknown (sent, no answer), and so a dead letter the handler never saw.
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Self {
            dedup,
            consumer: Arc::from(consumer),
            attempts: Arc::default(),
            target: Arc::new(Target {
                uri: config.target.clone(),
                client,
                response_timeout: config.response_timeout,
                max_response_body: config.max_response_body,
                transient: config.transient_statuses.clone(),
            }),
            config,
        }
    }

    /// The delay of a hand-back that was no attempt: the backoff after as many hand-backs of
    /// `key` as this process made, plus this one.
    fn hand_back_delay(&self, key: &str) -> Duration {
        self.backoff(self.attempts.busy_count(key) + 1)
    }

    /// The backoff before redelivery number `delivered + 1`: `retry_base` doubled per
    /// delivery, at most `retry_max`.
    pub(crate) fn backoff(&self, delivered: u32) -> Duration {
        let shift = delivered.saturating_sub(1).min(20);
        (self.config.retry_base * (1u32 << shift)).min(self.config.retry_max)
    }

    /// Processes one delivery and says what to do with it. The outcome is recorded before this
    /// returns `Ack`.
    pub(crate) async fn handle(&self, msg: &Incoming) -> Decision {
        if msg.payload.len() > self.config.max_payload {
            tracing::warn!(subject = %msg.subject, bytes = msg.payload.len(),
                max = self.config.max_payload, "message over --max-payload: dead-lettered");
            return Decision::DeadLetter("too-large");
        }
        let Some(id) = self.key_of(msg) else {
            tracing::warn!(subject = %msg.subject, "message without an id (and --hash-missing-ids is off): dead-lettered");
            return Decision::DeadLetter("no-message-id");
        };
        let attempt = self.attempts.number(id.as_str(), msg.delivered);
        let target = self.target.clone();
        let call = Call {
            key: id.as_str().to_owned(),
            payload: msg.payload.clone(),
            content_type: msg.content_type.clone(),
            subject: msg.subject.clone(),
            delivered: msg.delivered.unwrap_or(attempt),
        };
        let decision = if self.config.no_dedup {
            self.without_dedup(target, call, attempt).await
        } else {
            let processed = self
                .dedup
                .process_once(&self.consumer, &id, move |dispatch| async move {
                    target.post(call, dispatch).await
                })
                .await;
            let at_limit = attempt >= self.config.max_deliver;
            match processed {
                Err(e) => {
                    // The store said nothing usable: not the message's fault, never
                    // dead-lettered. The delay grows with the hand-backs, so that an outage
                    // costs few redeliveries (brokers count them: JetStream's max_deliver, a
                    // quorum queue's delivery-limit).
                    tracing::warn!(key = %id, error = %e, "store failed; message handed back");
                    Decision::Busy(self.hand_back_delay(id.as_str()))
                }
                Ok(p) => {
                    tracing::debug!(key = %id, outcome = p.name(), attempt, "message");
                    if p.name() == "unrecorded" {
                        tracing::warn!(key = %id, attempt,
                            "the outcome could not be recorded; message handed back (not counted as an attempt)");
                    }
                    // Not an attempt: the delay grows with the hand-backs (see above). Looked
                    // up only for such an outcome (it takes the attempts' lock).
                    let hand_back = if p.name() == "unrecorded" {
                        self.backoff(attempt).max(self.hand_back_delay(id.as_str()))
                    } else {
                        Duration::ZERO
                    };
                    decide(
                        p.action(),
                        p.name(),
                        at_limit,
                        self.backoff(attempt),
                        hand_back,
                        self.config.retry_max,
                    )
                }
            }
        };
        match &decision {
            Decision::Nack(_) => self.attempts.failed(id.as_str(), attempt),
            Decision::Busy(_) => self.attempts.busy(id.as_str()),
            Decision::Ack | Decision::DeadLetter(_) => self.attempts.forget(id.as_str()),
        }
        if let Decision::DeadLetter(reason) = &decision {
            tracing::warn!(key = %id, reason, attempt, "dead-lettering a message");
        }
        decision
    }
}

/// Most message keys whose attempts are tracked in this process. At the bound the table is
/// cleared: counting starts again, so max-deliver is reached later, never sooner (for a broker
/// that counts deliveries, the nacks that were not attempts are then counted, so sooner).
const MAX_TRACKED: usize = 100_000;

/// What this process saw of each message that came back: the attempts that did not succeed,
/// and the deliveries nacked without an attempt (in progress elsewhere, store failures).
#[derive(Debug, Default)]
pub(crate) struct Attempts(parking_lot::Mutex<HashMap<String, Seen>>);

#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    failed: u32,
    busy: u32,
}

impl Attempts {
    /// The number of this attempt. With the broker's delivery count (JetStream, RabbitMQ
    /// quorum queues): that count less the deliveries this process nacked without an attempt.
    /// Without it (RabbitMQ classic queues): one more than the attempts that failed here.
    pub(crate) fn number(&self, key: &str, broker_delivered: Option<u32>) -> u32 {
        let seen = self.0.lock().get(key).copied().unwrap_or_default();
        match broker_delivered {
            Some(n) => n.saturating_sub(seen.busy).max(1),
            None => seen.failed.saturating_add(1),
        }
    }

    fn entry(&self, key: &str, f: impl FnOnce(&mut Seen)) {
        let mut map = self.0.lock();
        if map.len() >= MAX_TRACKED && !map.contains_key(key) {
            map.clear();
        }
        f(map.entry(key.to_owned()).or_default());
    }

    /// Attempt number `attempt` failed.
    pub(crate) fn failed(&self, key: &str, attempt: u32) {
        self.entry(key, |s| s.failed = s.failed.max(attempt));
    }

    /// The deliveries of `key` nacked here without an attempt.
    pub(crate) fn busy_count(&self, key: &str) -> u32 {
        self.0.lock().get(key).map_or(0, |s| s.busy)
    }

    /// A delivery was nacked without an attempt.
    pub(crate) fn busy(&self, key: &str) {
        self.entry(key, |s| s.busy = s.busy.saturating_add(1));
    }

    /// The message is done with (acked or dead-lettered).
    pub(crate) fn forget(&self, key: &str) {
        self.0.lock().remove(key);
    }
}

impl Bridge {
    /// The dedup key of a message: its id; else the payload hash when asked for; else the
    /// broker's own identity of it; else none.
    pub(crate) fn key_of(&self, msg: &Incoming) -> Option<MessageId> {
        MessageId::from_message(
            msg.id.as_deref(),
            &msg.payload,
            self.config.hash_when_missing,
        )
        .or_else(|| msg.broker_id.as_deref().and_then(MessageId::from_broker))
    }

    /// The same POST and classification, without the engine (`Config::no_dedup`): for
    /// measuring what dedup costs.
    async fn without_dedup(&self, target: Arc<Target>, call: Call, delivered: u32) -> Decision {
        let dispatch = Dispatch {
            epoch: 1,
            start_by: tokio::time::Instant::now() + self.config.response_timeout,
        };
        match target.post(call, dispatch).await {
            Handled::Done(_) => Decision::Ack,
            Handled::Retry if delivered >= self.config.max_deliver => {
                Decision::DeadLetter("max-deliver")
            }
            Handled::Retry => Decision::Nack(self.backoff(delivered)),
            Handled::Unknown => Decision::DeadLetter("unknown"),
        }
    }
}

/// What the handler task needs (owned: it runs in a spawned task).
struct Call {
    key: String,
    payload: Bytes,
    content_type: Option<String>,
    subject: String,
    delivered: u32,
}

impl Target {
    /// POSTs the message; classifies the result like `idemgate serve` does (PRODUCT §3):
    /// not sent → retry; transient status → retry; sent without a complete answer → unknown;
    /// any other status → recorded.
    async fn post(&self, call: Call, dispatch: Dispatch) -> Handled {
        if tokio::time::Instant::now() >= dispatch.start_by {
            return Handled::Retry; // the lease may have lapsed: nothing sent
        }
        let mut req = Request::post(self.uri.clone());
        let headers = req.headers_mut();
        if let Some(h) = headers {
            let ct = call
                .content_type
                .as_deref()
                .and_then(|c| HeaderValue::from_str(c).ok())
                .unwrap_or(HeaderValue::from_static("application/octet-stream"));
            h.insert(http::header::CONTENT_TYPE, ct);
            if let Ok(v) = HeaderValue::from_str(&call.key) {
                h.insert("idempotency-key", v);
            }
            h.insert("idempotency-epoch", HeaderValue::from(dispatch.epoch));
            if let Ok(v) = HeaderValue::from_str(&call.subject) {
                h.insert(SUBJECT_HEADER, v);
            }
            h.insert(DELIVERY_HEADER, HeaderValue::from(call.delivered));
        }
        let req = match req.body(Full::new(call.payload)) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the request; nothing sent");
                return Handled::Retry;
            }
        };
        let response = match tokio::time::timeout(self.response_timeout, self.client.request(req))
            .await
        {
            Err(_) => {
                tracing::warn!(key = %call.key, timeout = ?self.response_timeout,
                        "target did not answer in time: outcome unknown");
                return Handled::Unknown;
            }
            Ok(Err(e)) if e.is_connect() => {
                tracing::warn!(key = %call.key, error = %e, "target unreachable; nothing sent");
                return Handled::Retry;
            }
            Ok(Err(e)) => {
                tracing::warn!(key = %call.key, error = %e, "request failed after sending: outcome unknown");
                return Handled::Unknown;
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status().as_u16();
        if self.transient.contains(&status) {
            return Handled::Retry;
        }
        let content_type = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .map(|v| Bytes::copy_from_slice(v.as_bytes()));
        // The handler answered: its status is the outcome. A body over the cap (or cut short)
        // is not kept; the status is.
        let body = match tokio::time::timeout(
            self.response_timeout,
            Limited::new(response.into_body(), self.max_response_body).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            _ => Bytes::new(),
        };
        let headers = content_type
            .map(|v| vec![("content-type".to_owned(), v)])
            .unwrap_or_default();
        Handled::Done(StoredResponse::new(status, headers, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn only_released_attempts_reach_max_deliver() {
        let retry = Action::Nack { delay: None };
        assert_eq!(
            decide(retry, "retry", true, B, Duration::ZERO, MAX),
            Decision::DeadLetter("max-deliver")
        );
        assert_eq!(
            decide(retry, "retry", false, B, Duration::ZERO, MAX),
            Decision::Nack(B)
        );
        // An outcome the store did not record: handed back, even at the limit.
        assert_eq!(
            decide(retry, "unrecorded", true, B, B, MAX),
            Decision::Busy(B)
        );
        // Running elsewhere: handed back after the holder's lease, at most `MAX`, never
        // dead-lettered.
        let busy = Action::Nack {
            delay: Some(Duration::from_secs(99)),
        };
        assert_eq!(
            decide(busy, "in_progress", true, B, Duration::ZERO, MAX),
            Decision::Busy(MAX)
        );
        assert_eq!(
            decide(Action::DeadLetter, "unknown", false, B, Duration::ZERO, MAX),
            Decision::DeadLetter("unknown")
        );
        assert_eq!(
            decide(Action::Ack, "duplicate", true, B, Duration::ZERO, MAX),
            Decision::Ack
        );
    }

    #[test]
    fn attempts_leave_out_deliveries_that_were_not_attempts() {
        let a = Attempts::default();
        // A broker that counts: its count less this process's busy nacks.
        assert_eq!(a.number("k", Some(1)), 1);
        a.busy("k");
        a.busy("k");
        assert_eq!(a.number("k", Some(4)), 2);
        // Never below 1, whatever the counts.
        assert_eq!(a.number("k", Some(1)), 1);
        // A broker that does not count: one more than the failed attempts here.
        assert_eq!(a.number("c", None), 1);
        a.failed("c", 1);
        a.busy("c");
        assert_eq!(a.number("c", None), 2);
        a.failed("c", 2);
        assert_eq!(a.number("c", None), 3);
        a.forget("c");
        assert_eq!(a.number("c", None), 1);
    }

    #[test]
    fn attempts_are_bounded() {
        let a = Attempts::default();
        for i in 0..MAX_TRACKED + 10 {
            a.failed(&format!("k{i}"), 1);
        }
        assert!(a.0.lock().len() <= MAX_TRACKED);
        // Cleared at the bound: counting starts again (later, never sooner).
        assert_eq!(a.number("k0", None), 1);
    }
}
