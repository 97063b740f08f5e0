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
#[derive(Clone)]
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

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("url", &idemgate_stores::redact(&self.url))
            .field("stream", &self.stream)
            .field("subject", &self.subject)
            .field("durable", &self.durable)
            .field("ack_wait", &self.ack_wait)
            .finish()
    }
}

/// Longest wait for the last acks to reach NATS at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

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
        // A stream must keep the dead letters: without one, every publish fails and the
        // message comes back, again and again.
        js.stream_by_subject(dead.clone()).await.map_err(|_| {
            ConsumeError::Config(format!(
                "no JetStream stream captures --dead-letter {dead:?}: create one (a stream of \
                 its own) before starting"
            ))
        })?;
    }
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
    check_durable(&info.config, src, config.concurrency)?;
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
    // The client reconnects by itself: /readyz follows its connection state meanwhile.
    let readiness = {
        let (client, shared) = (client.clone(), shared.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let connected =
                    client.connection_state() == async_nats::connection::State::Connected;
                if connected != shared.ready() {
                    tracing::warn!(connected, "NATS connection state changed");
                }
                shared.set_ready(connected);
            }
        })
    };

    // Messages are taken off the client's buffer at once (up to twice `concurrency`, as many as
    // the durable we create lets be unacknowledged), each into a task that sends "in progress"
    // acks from the start: a message waiting for a turn never runs out its AckWait (it would be
    // redelivered, and JetStream would count a delivery that was no attempt). At most
    // `concurrency` of them run at once.
    let holding = Arc::new(Semaphore::new(config.concurrency.saturating_mul(2)));
    let running = Arc::new(Semaphore::new(config.concurrency));
    let mut tasks = JoinSet::new();
    let mut ended = None;
    loop {
        let permit = tokio::select! {
            p = holding.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
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
        let (running, stop) = (running.clone(), shutdown.clone());
        tasks.spawn(async move {
            if handle(msg, &bridge, &js, &config, ack_wait, running, stop).await {
                shared.acked();
            }
            drop((permit, held));
        });
    }
    readiness.abort();
    shared.set_ready(false);
    drop(messages);
    crate::drain(&mut tasks, config.drain_timeout).await;
    // Acks are buffered by the client: send them before the process exits.
    // Bounded: while NATS is unreachable the client would wait for a reconnection forever.
    match tokio::time::timeout(FLUSH_TIMEOUT, client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not flush the last acks; those messages come back")
        }
        Err(_) => tracing::warn!(
            timeout = ?FLUSH_TIMEOUT,
            "NATS unreachable: the last acks were not flushed; those messages come back"
        ),
    }
    match ended {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Refuses an existing durable whose settings would break `consume`'s guarantees: acks that
/// are not explicit (JetStream would drop messages `consume` has not recorded), another filter
/// (other messages, or none), a finite `max_deliver` (JetStream counts every delivery,
/// hand-backs during a store outage included, and would stop redelivering a message that was
/// neither processed nor dead-lettered), headers only (the payload would never be POSTed), or
/// a `max_batch` below `--concurrency` (the server would refuse the pull requests).
fn check_durable(
    existing: &jetstream::consumer::Config,
    src: &NatsSource,
    concurrency: usize,
) -> Result<(), ConsumeError> {
    let durable = &src.durable;
    let refuse = |what: String| {
        Err(ConsumeError::Config(format!(
            "the durable consumer {durable:?} exists with {what} (delete it, or pick another \
             --durable: consume creates its own)"
        )))
    };
    if existing.ack_policy != jetstream::consumer::AckPolicy::Explicit {
        return refuse(format!(
            "ack policy {:?}: consume needs explicit acks",
            existing.ack_policy
        ));
    }
    // (A consumer with several filters shows an empty `filter_subject` here: refused too.)
    if existing.filter_subject != src.subject {
        return refuse(format!(
            "filter {:?}, not --subject {:?}",
            existing.filter_subject, src.subject
        ));
    }
    if existing.max_deliver > 0 {
        return refuse(format!(
            "max_deliver {}: JetStream would stop redelivering messages that were neither \
             processed nor dead-lettered; consume needs -1 (it dead-letters after \
             --max-deliver attempts itself)",
            existing.max_deliver
        ));
    }
    if existing.max_bytes > 0 {
        return refuse(format!(
            "max_bytes {}: the server would refuse pull requests for more",
            existing.max_bytes
        ));
    }
    if !existing.max_expires.is_zero() && existing.max_expires < Duration::from_secs(30) {
        return refuse(format!(
            "max_expires {:?}, below the 30 s pull requests consume makes",
            existing.max_expires
        ));
    }
    if existing.headers_only {
        return refuse("headers_only: the payloads would never reach the target".into());
    }
    if existing.max_batch > 0 && usize::try_from(existing.max_batch).unwrap_or(0) < concurrency {
        return refuse(format!(
            "max_batch {}, below --concurrency {concurrency}",
            existing.max_batch
        ));
    }
    Ok(())
}

async fn handle(
    msg: jetstream::Message,
    bridge: &Bridge,
    js: &jetstream::Context,
    config: &Config,
    ack_wait: Duration,
    running: Arc<Semaphore>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> bool {
    let info = msg.info().ok();
    let delivered = info
        .as_ref()
        .map(|i| u32::try_from(i.delivered).unwrap_or(u32::MAX));
    // The message's own publication time (stored with it, the same on every redelivery and on
    // every replica) tells two streams of the same name apart (a deleted and re-created stream
    // numbers its messages from 1 again).
    let broker_id = info.as_ref().map(|i| {
        format!(
            "jetstream:{}:{}",
            i.published.unix_timestamp_nanos(),
            i.stream_sequence
        )
    });
    let sequence = info.as_ref().map(|i| i.stream_sequence);
    let published = info.as_ref().map(|i| i.published.unix_timestamp_nanos());
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
    // While the message waits for its turn and while the handler runs, tell JetStream every
    // third of AckWait that work goes on.
    let decision = {
        let work = async {
            let turn = tokio::select! {
                p = running.acquire_owned() => p.ok(),
                _ = stop.wait_for(|stop| *stop) => None,
            };
            match turn {
                Some(_turn) => bridge.handle(&incoming).await,
                // Stopping before its turn: handed back at once (not an attempt).
                None => Decision::Busy(Duration::ZERO),
            }
        };
        tokio::pin!(work);
        let mut tick = tokio::time::interval((ack_wait / 3).max(Duration::from_millis(10)));
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
        Decision::DeadLetter(reason) => {
            match dead_letter(js, config, &msg, &incoming, reason, sequence, published).await {
                Ok(()) => {
                    bridge.dedup.dead_lettered();
                    msg.ack_with(AckKind::Term).await
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not publish the dead letter; message handed back");
                    msg.ack_with(AckKind::Nak(Some(bridge.backoff(delivered.unwrap_or(1)))))
                        .await
                }
            }
        }
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
///
/// The dead letter keeps the original's headers (but JetStream's own `Nats-*` ones) and says
/// where it came from (`Idemgate-Stream`, `-Durable`, `-Sequence`, `-Subject`) and why
/// (`Idemgate-Reason`, `-Delivered`). Its `Nats-Msg-Id` is `dead:<stream>:<durable>:<
/// published>:<sequence>` (names escaped as in the dedup scope): one per message and consumer,
/// so that JetStream's duplicate window drops only a second dead letter of the same message
/// (whose original was then never terminated).
async fn dead_letter(
    js: &jetstream::Context,
    config: &Config,
    original: &jetstream::Message,
    msg: &Incoming,
    reason: &str,
    sequence: Option<u64>,
    published: Option<i128>,
) -> Result<(), String> {
    let Some(subject) = &config.dead_letter else {
        return Ok(());
    };
    let (stream, durable) = match &config.source {
        crate::Source::Nats(n) => (n.stream.as_str(), n.durable.as_str()),
        crate::Source::Amqp(_) => ("", ""),
    };
    let mut headers = HeaderMap::new();
    if let Some(original) = &original.headers {
        for (name, values) in original.iter() {
            let name: &str = name.as_ref();
            if name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-") {
                continue;
            }
            for v in values {
                headers.append(name, v.as_str());
            }
        }
    }
    let seq = sequence.map(|n| n.to_string()).unwrap_or_default();
    // One per message and consumer: the message's publication time tells a re-created stream's
    // sequence numbers apart; names escaped as in the dedup scope. Without the message's
    // identity (no metadata), no `Nats-Msg-Id`: JetStream must not take it for another's.
    if let (Some(seq), Some(published)) = (sequence, published) {
        headers.insert(
            "Nats-Msg-Id",
            format!(
                "dead:{}:{}:{published}:{seq}",
                crate::escape(stream),
                crate::escape(durable)
            )
            .as_str(),
        );
    }
    if let Some(id) = &msg.id {
        headers.insert("Idemgate-Message-Id", id.as_str());
    }
    headers.insert("Idemgate-Stream", stream);
    headers.insert("Idemgate-Durable", durable);
    headers.insert("Idemgate-Sequence", seq.as_str());
    headers.insert("Idemgate-Subject", msg.subject.as_str());
    headers.insert("Idemgate-Reason", reason);
    if let Some(n) = msg.delivered {
        headers.insert("Idemgate-Delivered", n.to_string().as_str());
    }
    let ack = js
        .publish_with_headers(subject.clone(), headers, msg.payload.clone())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    if ack.duplicate {
        tracing::info!(stream, durable, sequence = %seq,
            "this message was dead-lettered before (its original was not terminated then)");
    }
    Ok(())
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
        assert!(check_durable(&good, &src, 16).is_ok());
        let finite = jetstream::consumer::Config {
            max_deliver: 100,
            ..good.clone()
        };
        assert!(check_durable(&finite, &src, 16).is_err());
        let headers_only = jetstream::consumer::Config {
            headers_only: true,
            ..good.clone()
        };
        assert!(check_durable(&headers_only, &src, 16).is_err());
        let small_batch = jetstream::consumer::Config {
            max_batch: 8,
            ..good.clone()
        };
        assert!(check_durable(&small_batch, &src, 16).is_err());
        assert!(check_durable(&small_batch, &src, 8).is_ok());
        let none = jetstream::consumer::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..good.clone()
        };
        assert!(check_durable(&none, &src, 16).is_err());
        let other = jetstream::consumer::Config {
            filter_subject: "orders.new".into(),
            ..good.clone()
        };
        assert!(check_durable(&other, &src, 16).is_err());
        let several = jetstream::consumer::Config {
            filter_subject: String::new(),
            ..good
        };
        assert!(check_durable(&several, &src, 16).is_err());
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
