//! The broker-independent part of `consume`: one message in, one decision out (ack, nack with a
//! delay, dead-letter), with the HTTP call run through the [`Deduplicator`].

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
    pub payload: Bytes,
    pub content_type: Option<String>,
    /// NATS subject or AMQP routing key.
    pub subject: String,
    /// Which delivery this is (1 for the first), as far as the broker tells.
    pub delivered: u32,
}

/// What the source must do with the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    Ack,
    Nack(Duration),
    DeadLetter(&'static str),
}

/// The deduplicator and the HTTP target.
#[derive(Clone)]
pub(crate) struct Bridge {
    pub dedup: Deduplicator<SharedStore>,
    consumer: Arc<str>,
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
            .build(connector);
        Self {
            dedup,
            consumer: Arc::from(consumer),
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

    /// The backoff before redelivery number `delivered + 1`: `retry_base` doubled per
    /// delivery, at most `retry_max`.
    pub(crate) fn backoff(&self, delivered: u32) -> Duration {
        let shift = delivered.saturating_sub(1).min(20);
        (self.config.retry_base * (1u32 << shift)).min(self.config.retry_max)
    }

    /// Processes one delivery and says what to do with it. The outcome is recorded before this
    /// returns `Ack`.
    pub(crate) async fn handle(&self, msg: &Incoming) -> Decision {
        let Some(id) = MessageId::from_message(
            msg.id.as_deref(),
            &msg.payload,
            self.config.hash_when_missing,
        ) else {
            tracing::warn!(subject = %msg.subject, "message without an id (and --hash-missing-ids is off): dead-lettered");
            return Decision::DeadLetter("no-message-id");
        };
        let target = self.target.clone();
        let call = Call {
            key: id.as_str().to_owned(),
            payload: msg.payload.clone(),
            content_type: msg.content_type.clone(),
            subject: msg.subject.clone(),
            delivered: msg.delivered,
        };
        if self.config.no_dedup {
            return self.without_dedup(target, call, msg.delivered).await;
        }
        let processed = self
            .dedup
            .process_once(&self.consumer, &id, move |dispatch| async move {
                target.post(call, dispatch).await
            })
            .await;
        let at_limit = msg.delivered >= self.config.max_deliver;
        let decision = match processed {
            Err(e) => {
                // The store said nothing usable: not the message's fault, never dead-lettered.
                tracing::warn!(key = %id, error = %e, "store failed; message handed back");
                Decision::Nack(self.backoff(msg.delivered))
            }
            Ok(p) => {
                tracing::debug!(key = %id, outcome = p.name(), delivered = msg.delivered, "message");
                match p.action() {
                    Action::Ack => Decision::Ack,
                    // Running elsewhere: never counted against max-deliver.
                    Action::Nack { delay: Some(d) } => Decision::Nack(d.min(self.config.retry_max)),
                    Action::Nack { delay: None } if at_limit => Decision::DeadLetter("max-deliver"),
                    Action::Nack { delay: None } => Decision::Nack(self.backoff(msg.delivered)),
                    Action::DeadLetter => Decision::DeadLetter(p.name()),
                }
            }
        };
        if let Decision::DeadLetter(reason) = &decision {
            tracing::warn!(key = %id, reason, delivered = msg.delivered, "dead-lettering a message");
        }
        decision
    }
}

impl Bridge {
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
