//! NATS JetStream: a durable pull consumer on an existing (or, when told, created) stream.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::bridge::{Bridge, Decision, Incoming};
use crate::{Config, ConsumeError, Shared};

/// The settings of the NATS source.
#[derive(Clone, Debug)]
pub struct NatsSource {
    /// `nats://HOST:PORT`.
    pub url: String,
    /// The stream (must exist unless `create`).
    pub stream: String,
    /// The subject filter of the consumer.
    pub subject: String,
    /// The durable consumer's name (created when missing; an existing one is used as it is).
    pub durable: String,
    /// How long JetStream waits for an ack before redelivering (default 30 s); progress acks
    /// are sent every third of it while the handler runs.
    pub ack_wait: Duration,
}

pub(crate) async fn run(
    src: &NatsSource,
    config: Arc<Config>,
    bridge: Bridge,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), ConsumeError> {
    let client = async_nats::connect(&src.url)
        .await
        .map_err(|e| ConsumeError::source("connecting to NATS", e))?;
    let js = jetstream::new(client.clone());
    let stream = if config.create {
        js.get_or_create_stream(jetstream::stream::Config {
            name: src.stream.clone(),
            subjects: vec![src.subject.clone()],
            ..Default::default()
        })
        .await
        .map_err(|e| ConsumeError::source("creating the stream", e))?
    } else {
        js.get_stream(&src.stream).await.map_err(|e| {
            ConsumeError::source("opening the stream (it must exist; --create makes it)", e)
        })?
    };
    if let Some(dead) = &config.dead_letter {
        check_dead_letter_subject(dead, &src.subject, &stream.cached_info().config.subjects)?;
    }
    // The stream's creation time tells two streams of the same name apart (a deleted and
    // re-created stream numbers its messages from 1 again): part of the key of id-less messages.
    let created = stream.cached_info().created.unix_timestamp_nanos();
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &src.durable,
            pull::Config {
                durable_name: Some(src.durable.clone()),
                filter_subject: src.subject.clone(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: src.ack_wait,
                // Dead-lettering is ours (JetStream only stops redelivering at its own limit).
                max_deliver: -1,
                max_ack_pending: i64::try_from(config.concurrency.saturating_mul(2))
                    .unwrap_or(i64::MAX),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ConsumeError::source("creating or binding the durable consumer", e))?;
    let info = consumer
        .info()
        .await
        .map_err(|e| ConsumeError::source("reading the durable consumer's settings", e))?;
    check_durable(&info.config, src, config.max_deliver)?;
    // An existing durable keeps its own AckWait: progress acks follow it.
    let ack_wait = if info.config.ack_wait.is_zero() {
        src.ack_wait
    } else {
        info.config.ack_wait
    };
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(config.concurrency)
        .messages()
        .await
        .map_err(|e| ConsumeError::source("pulling messages", e))?;
    shared.set_ready(true);
    tracing::info!(stream = %src.stream, subject = %src.subject, durable = %src.durable,
        "consuming from NATS JetStream");

    let permits = Arc::new(Semaphore::new(config.concurrency));
    let mut tasks = JoinSet::new();
    let mut ended = None;
    loop {
        // A permit first: at most `concurrency` messages are being handled at once.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let next = tokio::select! {
            m = messages.next() => m,
            _ = shutdown.changed() => break,
        };
        while tasks.try_join_next().is_some() {}
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "pulling from JetStream failed; retrying");
                continue;
            }
            None => {
                // The in-flight messages still finish (their acks may yet get through, or the
                // broker hands them out again) before the error is returned.
                ended = Some(ConsumeError::Source {
                    what: "the JetStream message stream ended",
                    source: "closed".into(),
                });
                break;
            }
        };
        let (bridge, js, config) = (bridge.clone(), js.clone(), config.clone());
        let held = shared.hold();
        let shared = shared.clone();
        tasks.spawn(async move {
            if handle(msg, &bridge, &js, &config, ack_wait, created).await {
                shared.acked();
            }
            drop((permit, held));
        });
    }
    shared.set_ready(false);
    drop(messages);
    crate::drain(&mut tasks, config.drain_timeout).await;
    // Acks are buffered by the client: send them before the process exits.
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "could not flush the last acks; those messages come back");
    }
    match ended {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Refuses an existing durable whose settings would break `consume`'s guarantees: acks that
/// are not explicit (JetStream would drop messages `consume` has not recorded), another filter
/// (other messages, or none), or a `max_deliver` that stops redelivery before `consume`
/// dead-letters (a message would stay unprocessed and never reach the dead-letter destination).
fn check_durable(
    existing: &jetstream::consumer::Config,
    src: &NatsSource,
    max_deliver: u32,
) -> Result<(), ConsumeError> {
    let durable = &src.durable;
    if existing.ack_policy != jetstream::consumer::AckPolicy::Explicit {
        return Err(ConsumeError::Config(format!(
            "the durable consumer {durable:?} exists with ack policy {:?}: consume needs \
             explicit acks (delete it, or pick another --durable)",
            existing.ack_policy
        )));
    }
    // (A consumer with several filters shows an empty `filter_subject` here: refused too.)
    if existing.filter_subject != src.subject {
        return Err(ConsumeError::Config(format!(
            "the durable consumer {durable:?} exists with filter {:?}, not --subject {:?} \
             (delete it, or pick another --durable)",
            existing.filter_subject, src.subject
        )));
    }
    if existing.max_deliver > 0 && existing.max_deliver <= i64::from(max_deliver) {
        return Err(ConsumeError::Config(format!(
            "the durable consumer {durable:?} exists with max_deliver {}: JetStream would stop \
             redelivering before --max-deliver {max_deliver} dead-letters (set it to -1 or \
             above --max-deliver, or lower --max-deliver)",
            existing.max_deliver
        )));
    }
    Ok(())
}

async fn handle(
    msg: jetstream::Message,
    bridge: &Bridge,
    js: &jetstream::Context,
    config: &Config,
    ack_wait: Duration,
    created: i128,
) -> bool {
    let info = msg.info().ok();
    let delivered = info
        .as_ref()
        .map(|i| u32::try_from(i.delivered).unwrap_or(u32::MAX));
    let broker_id = info
        .as_ref()
        .map(|i| format!("jetstream:{created}:{}", i.stream_sequence));
    // By name, case-insensitively: the client keeps well-known names (`Nats-Msg-Id`) as
    // constants that a lookup by string does not find.
    let header = |name: &str| {
        msg.headers.as_ref().and_then(|h| {
            h.iter()
                .find(|(n, _)| AsRef::<str>::as_ref(n).eq_ignore_ascii_case(name))
                .and_then(|(_, values)| values.first())
                .map(|v| v.as_str().to_owned())
        })
    };
    let incoming = Incoming {
        id: header("Nats-Msg-Id"),
        broker_id,
        payload: msg.payload.clone(),
        content_type: header("Content-Type"),
        subject: msg.subject.to_string(),
        delivered,
    };
    // While the handler runs, tell JetStream every third of AckWait that work goes on.
    let decision = {
        let work = bridge.handle(&incoming);
        tokio::pin!(work);
        let mut tick = tokio::time::interval(ack_wait / 3);
        tick.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                d = &mut work => break d,
                _ = tick.tick() => {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "progress ack failed");
                    }
                }
            }
        }
    };
    let acked = decision == Decision::Ack;
    let result = match decision {
        Decision::Ack => msg.ack().await,
        Decision::Nack(delay) | Decision::Busy(delay) => {
            msg.ack_with(AckKind::Nak(Some(delay))).await
        }
        Decision::DeadLetter(reason) => match dead_letter(js, config, &incoming, reason).await {
            Ok(()) => {
                bridge.dedup.dead_lettered();
                msg.ack_with(AckKind::Term).await
            }
            Err(e) => {
                tracing::error!(error = %e, "could not publish the dead letter; message handed back");
                msg.ack_with(AckKind::Nak(Some(bridge.backoff(delivered.unwrap_or(1)))))
                    .await
            }
        },
    };
    if let Err(e) = result {
        // A lost ack means a redelivery, which gets the recorded outcome.
        tracing::warn!(error = %e, "acknowledgement to JetStream failed");
        return false;
    }
    acked
}

/// Refuses a dead-letter subject that would bring dead letters back: one with wildcards, one
/// the consumer's filter matches, or one the consumed stream captures (a dead letter is a new
/// message there, POSTed again — and again, `dead:dead:…`).
fn check_dead_letter_subject(
    dead: &str,
    filter: &str,
    stream_subjects: &[String],
) -> Result<(), ConsumeError> {
    if dead
        .split('.')
        .any(|t| t == "*" || t == ">" || t.is_empty())
    {
        return Err(ConsumeError::Config(format!(
            "--dead-letter {dead:?} must be a plain subject (no wildcards, no empty tokens)"
        )));
    }
    if subject_matches(filter, dead) {
        return Err(ConsumeError::Config(format!(
            "--dead-letter {dead:?} is matched by --subject {filter:?}: dead letters would be \
             consumed again; use a subject outside it (and a stream of its own)"
        )));
    }
    if let Some(captured) = stream_subjects.iter().find(|p| subject_matches(p, dead)) {
        return Err(ConsumeError::Config(format!(
            "--dead-letter {dead:?} is captured by the consumed stream (its subject {captured:?}): \
             use a subject that a stream of its own captures"
        )));
    }
    Ok(())
}

/// Whether NATS subject `subject` matches `pattern` (`*` one token, `>` one or more at the end).
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for p in pattern.split('.') {
        match (p, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(s)) if p == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

/// Publishes the message to `--dead-letter` and waits for JetStream's ack (a stream must
/// capture the subject); without one (`--no-dead-letter`), nothing: the message is terminated.
async fn dead_letter(
    js: &jetstream::Context,
    config: &Config,
    msg: &Incoming,
    reason: &str,
) -> Result<(), String> {
    let Some(subject) = &config.dead_letter else {
        return Ok(());
    };
    let mut headers = HeaderMap::new();
    if let Some(id) = &msg.id {
        headers.insert("Nats-Msg-Id", format!("dead:{id}").as_str());
        headers.insert("Idemgate-Message-Id", id.as_str());
    }
    if let Some(ct) = &msg.content_type {
        headers.insert("Content-Type", ct.as_str());
    }
    headers.insert("Idemgate-Subject", msg.subject.as_str());
    headers.insert("Idemgate-Reason", reason);
    if let Some(n) = msg.delivered {
        headers.insert("Idemgate-Delivered", n.to_string().as_str());
    }
    let ack = js
        .publish_with_headers(subject.clone(), headers, msg.payload.clone())
        .await
        .map_err(|e| e.to_string())?;
    ack.await.map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("orders.>", "orders.dead"));
        assert!(subject_matches("orders.*", "orders.dead"));
        assert!(subject_matches("orders.dead", "orders.dead"));
        assert!(!subject_matches("orders.*", "orders.dead.letters"));
        assert!(subject_matches("orders.>", "orders.dead.letters"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(!subject_matches("orders.new", "dead.orders"));
        assert!(!subject_matches("orders", "orders.dead"));
    }

    #[test]
    fn durables_that_break_the_guarantees_are_refused() {
        let src = NatsSource {
            url: String::new(),
            stream: "S".into(),
            subject: "orders.>".into(),
            durable: "d".into(),
            ack_wait: Duration::from_secs(30),
        };
        let good = jetstream::consumer::Config {
            durable_name: Some("d".into()),
            filter_subject: "orders.>".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_deliver: -1,
            ..Default::default()
        };
        assert!(check_durable(&good, &src, 5).is_ok());
        let above = jetstream::consumer::Config {
            max_deliver: 6,
            ..good.clone()
        };
        assert!(check_durable(&above, &src, 5).is_ok());
        let at = jetstream::consumer::Config {
            max_deliver: 5,
            ..good.clone()
        };
        assert!(check_durable(&at, &src, 5).is_err());
        let none = jetstream::consumer::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..good.clone()
        };
        assert!(check_durable(&none, &src, 5).is_err());
        let other = jetstream::consumer::Config {
            filter_subject: "orders.new".into(),
            ..good.clone()
        };
        assert!(check_durable(&other, &src, 5).is_err());
        let several = jetstream::consumer::Config {
            filter_subject: String::new(),
            ..good
        };
        assert!(check_durable(&several, &src, 5).is_err());
    }

    #[test]
    fn dead_letter_subjects_that_come_back_are_refused() {
        let stream = vec!["orders.>".to_owned()];
        assert!(check_dead_letter_subject("orders.dead", "orders.>", &stream).is_err());
        assert!(check_dead_letter_subject("orders.dead", "orders.new", &stream).is_err());
        assert!(check_dead_letter_subject("dead.*", "orders.new", &stream).is_err());
        assert!(check_dead_letter_subject("dead.orders", "orders.new", &stream).is_ok());
    }
}
