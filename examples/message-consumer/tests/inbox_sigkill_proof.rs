//! The inbox proof: messages from NATS JetStream (with re-published duplicates outside the
//! stream's duplicate window) consumed by `message-consumer --mode inbox`, SIGKILLed at moments
//! spread over the run and restarted: at the end, effects == distinct messages, each exactly
//! once, nothing pending. Small by default; `IDEMGATE_PROOF_MESSAGES=10000
//! IDEMGATE_PROOF_KILLS=10` for the full run. Needs `IDEMGATE_TEST_NATS_URL` and
//! `IDEMGATE_TEST_POSTGRES_URL` (ignored without them; under CI they must be set).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, stream};

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} must be set"))
}

fn size(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn start(args: &[String]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_message-consumer"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert_eq!(first, "consuming");
    std::thread::spawn(move || for _ in lines {});
    child
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
    let tag = format!(
        "{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let (name, durable) = (format!("INBOX_{tag}"), format!("inbox_{tag}"));
    let subject = format!("{name}.in");
    let js = jetstream::new(async_nats::connect(&nats).await.unwrap());
    // The publisher's stream, with the shortest duplicate window JetStream takes (100 ms); the
    // publisher re-publishes ids 150 ms later: real duplicates for the consumer.
    js.create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        duplicate_window: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_message-consumer"))
        .args(["publish", "--nats", &nats, "--subject", &subject])
        .args(["--count", &messages.to_string(), "--dup-every", "5"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let published = js
        .get_stream(&name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert!(
        published as usize > messages,
        "duplicates reached the stream: {published}"
    );

    let (inbox, effects) = (format!("inbox_{tag}"), format!("effects_{tag}"));
    let args: Vec<String> = [
        "consume",
        "--nats",
        &nats,
        "--stream",
        &name,
        "--subject",
        &subject,
        "--durable",
        &durable,
        "--mode",
        "inbox",
        "--postgres",
        &pg,
        "--inbox",
        &inbox,
        "--effects",
        &effects,
        "--ack-wait-secs",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (client, conn) = tokio_postgres::connect(&pg, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let started = std::time::Instant::now();
    let mut child = start(&args);
    let count = |sql: String| {
        let client = &client;
        async move {
            match client.query_one(&sql, &[]).await {
                Ok(row) => row.get::<_, i64>(0) as usize,
                Err(_) => 0, // the table is not there yet
            }
        }
    };
    for k in 0..kills {
        let at = messages * (k + 1) / (kills + 1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while count(format!("SELECT count(*) FROM {effects}")).await < at {
            assert!(
                tokio::time::Instant::now() < deadline,
                "stalled before kill {k}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap(); // SIGKILL, mid-stream
        child.wait().unwrap();
        child = start(&args);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let mut consumer: jetstream::consumer::PullConsumer = js
            .get_stream(&name)
            .await
            .unwrap()
            .get_consumer(&durable)
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages left unacked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let effects_n = count(format!("SELECT count(*) FROM {effects}")).await;
    let distinct = count(format!("SELECT count(DISTINCT message_id) FROM {effects}")).await;
    let rows = count(format!("SELECT count(*) FROM {inbox}")).await;
    eprintln!(
        "PROOF inbox messages={messages} published={published} kills={kills} effects={effects_n} \
         distinct={distinct} inbox_rows={rows} secs={:.1}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(distinct, messages, "every message took effect");
    assert_eq!(
        effects_n, messages,
        "effects == distinct messages: none twice"
    );
    assert_eq!(rows, messages);
}
