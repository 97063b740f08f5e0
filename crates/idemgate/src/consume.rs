//! `idemgate consume`: flags in, [`idemgate_consume::run`] out (the logic lives in the
//! `idemgate-consume` crate).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use idemgate_consume::{AmqpSource, Config, NatsSource, Source};
use idemgate_core::engine::Recovery;

/// Consume from NATS JetStream or RabbitMQ and POST each message, once, to an HTTP handler.
#[derive(clap::Args, Debug)]
pub struct ConsumeArgs {
    /// The broker: nats://HOST:PORT (JetStream) or amqp://USER:PASS@HOST:PORT/VHOST (RabbitMQ).
    #[arg(long, env = "IDEMGATE_SOURCE")]
    source: String,
    /// JetStream stream name (NATS).
    #[arg(long)]
    stream: Option<String>,
    /// Subject filter of the durable consumer (NATS).
    #[arg(long)]
    subject: Option<String>,
    /// Durable consumer name (NATS; created when missing, used as it is when it exists).
    #[arg(long)]
    durable: Option<String>,
    /// Queue name (RabbitMQ; must exist unless --create; never redeclared).
    #[arg(long)]
    queue: Option<String>,
    /// The HTTP handler each message is POSTed to.
    #[arg(long, env = "IDEMGATE_TARGET")]
    target: String,
    /// Store URL (file:DIR, redis://…, redis+cluster://…, postgres://…, dynamodb://…; not
    /// memory://, which forgets processed messages when the process stops).
    #[arg(
        long,
        env = "IDEMGATE_STORE",
        default_value = "file:./idemgate-consume-data"
    )]
    store: String,
    /// Messages handled at once (at most 10000).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Failed attempts (a transient status, an unreachable target) after which a message is
    /// dead-lettered; hand-backs while another consumer runs it or the store fails do not count.
    #[arg(long, default_value_t = 5)]
    max_deliver: u32,
    /// Dead-letter subject (NATS; a stream other than the consumed one must capture it) or
    /// exchange (RabbitMQ; it must exist and route to a queue). Required unless
    /// --no-dead-letter.
    #[arg(long, env = "IDEMGATE_DEAD_LETTER")]
    dead_letter: Option<String>,
    /// No dead-letter destination: messages that cannot be processed (max-deliver reached,
    /// outcome unknown, no id) are terminated (NATS TERM) or rejected without requeue
    /// (RabbitMQ: the queue's own dead-letter exchange gets them if it has one, otherwise
    /// RabbitMQ drops them).
    #[arg(long, conflicts_with = "dead_letter")]
    no_dead_letter: bool,
    /// Admin listener: /metrics, /healthz, /readyz.
    #[arg(long, env = "IDEMGATE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Create the stream (NATS) or the durable queue without arguments (RabbitMQ) when missing.
    #[arg(long)]
    create: bool,
    /// Deduplicate messages without an id by a BLAKE3 hash of their payload (default: by their
    /// JetStream publication time and stream sequence, which cover redeliveries but not re-publishes; RabbitMQ
    /// messages without an id are dead-lettered).
    #[arg(long)]
    hash_missing_ids: bool,
    /// JetStream AckWait of the durable consumer when it is created, in seconds.
    #[arg(long, default_value_t = 30)]
    ack_wait_secs: u64,
    /// Lease of a running message, in seconds (renewed every third).
    #[arg(long, default_value_t = 10)]
    lease_secs: u64,
    /// How long a processed message is remembered, in seconds.
    #[arg(long, default_value_t = 86_400)]
    ttl_secs: u64,
    /// `takeover` (a dead consumer's message runs again at epoch + 1) or `strict` (it is
    /// dead-lettered as outcome-unknown).
    #[arg(long, default_value = "takeover")]
    recovery: String,
    /// Waiting for the target's answer, in seconds (past it: outcome unknown, dead-lettered).
    #[arg(long, default_value_t = 30)]
    response_timeout_secs: u64,
    /// Longest wait for in-flight messages at shutdown, in seconds.
    #[arg(long, default_value_t = 30)]
    drain_timeout_secs: u64,
    /// Largest message payload, in bytes; a larger message is dead-lettered (reason
    /// `too-large`) without a POST.
    #[arg(long, default_value_t = 16 << 20)]
    max_payload: usize,
    /// Namespace of the records.
    #[arg(long, default_value = "messages")]
    namespace: String,
    /// Benchmarking only: no dedup at all (every delivery is POSTed; at-least-once).
    #[arg(long, hide = true)]
    no_dedup: bool,
    /// Logs as JSON lines.
    #[arg(long)]
    pub json_logs: bool,
}

fn required(value: Option<String>, flag: &str, broker: &str) -> Result<String> {
    match value {
        Some(v) if !v.is_empty() => Ok(v),
        _ => bail!("{broker} needs {flag}"),
    }
}

/// The library's configuration from the flags.
pub fn config(args: ConsumeArgs) -> Result<Config> {
    let source = if args.source.starts_with("nats://") {
        Source::Nats(NatsSource {
            url: args.source.clone(),
            stream: required(args.stream, "--stream", "a nats:// source")?,
            subject: required(args.subject, "--subject", "a nats:// source")?,
            durable: required(args.durable, "--durable", "a nats:// source")?,
            ack_wait: Duration::from_secs(args.ack_wait_secs.max(1)),
        })
    } else if args.source.starts_with("amqp://") {
        Source::Amqp(AmqpSource {
            url: args.source.clone(),
            queue: required(args.queue, "--queue", "an amqp:// source")?,
        })
    } else {
        bail!("--source must be nats://… or amqp://…");
    };
    let target = args
        .target
        .parse()
        // Not echoed: a URL may carry credentials.
        .context("--target is not a URL (expected http://HOST:PORT/PATH)")?;
    let mut config = Config::new(source, target);
    config.store = args.store;
    config.concurrency = args.concurrency;
    config.max_deliver = args.max_deliver;
    config.dead_letter = args.dead_letter;
    config.discard_dead_letters = args.no_dead_letter;
    config.admin_listen = args.admin_listen;
    config.create = args.create;
    config.hash_when_missing = args.hash_missing_ids;
    config.lease_ttl = Duration::from_secs(args.lease_secs.max(1));
    config.ttl = Duration::from_secs(args.ttl_secs.max(1));
    config.recovery = match args.recovery.as_str() {
        "takeover" => Recovery::Takeover,
        "strict" => Recovery::Strict,
        other => bail!("--recovery must be takeover or strict, not {other:?}"),
    };
    config.response_timeout = Duration::from_secs(args.response_timeout_secs.max(1));
    config.drain_timeout = Duration::from_secs(args.drain_timeout_secs);
    config.namespace = args.namespace;
    config.max_payload = args.max_payload;
    config.no_dedup = args.no_dedup;
    Ok(config)
}

/// Runs until SIGTERM or Ctrl-C, then drains.
pub async fn run(config: Config) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::serve::shutdown_signal().await;
        tracing::info!("shutting down: no more messages pulled");
        let _ = stop_tx.send(true);
        std::future::pending::<()>().await
    });
    idemgate_consume::run(config, stop_rx)
        .await
        .context("idemgate consume")?;
    Ok(())
}
