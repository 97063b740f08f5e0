//! `loadgen`: a closed-loop HTTP/1.1 load generator for idemgate's benchmarks.
//!
//! Opens `--connections` keep-alive connections; each sends `POST` requests back to back (one
//! outstanding request per connection), for `--warmup-ms` unmeasured then `--duration-ms`
//! measured. `--mode unique` gives every request a fresh `Idempotency-Key`, `--mode replay` cycles
//! over `--hot-keys` keys that are each sent once before the warm-up, `--mode none` sends no key.
//! Prints one [`idemgate_bench::RunResult`] as a JSON line (and appends it to `--out`); with
//! `--check` it exits with status 1 when any answer was wrong (see `RunResult::problems`).
//!
//! Latencies are recorded per request from just before it is written until its whole body has
//! been read, into an HDR histogram (3 significant digits). It runs on one thread so
//! that it takes as little as possible of the CPU it shares with the targets.

use std::cell::Cell;
use std::io::Write;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use idemgate_bench::{Mode, REQUEST_BODY, RunResult};

#[derive(Parser, Clone)]
#[command(about = "Closed-loop HTTP/1.1 load generator for idemgate's benchmarks")]
struct Args {
    /// Target address (host:port); requests go to `--path` on it.
    #[arg(long)]
    addr: SocketAddr,
    /// Request path.
    #[arg(long, default_value = "/payments")]
    path: String,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Measured duration in milliseconds.
    #[arg(long, default_value_t = 5000)]
    duration_ms: u64,
    /// Unmeasured warm-up before the measurement, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// `unique`, `replay` or `none`.
    #[arg(long, value_parser = parse_mode, default_value = "unique")]
    mode: Mode,
    /// Number of distinct keys on the replay path.
    #[arg(long, default_value_t = 100)]
    hot_keys: usize,
    /// Labels copied into the result: target, store, upstream delay and repetition.
    #[arg(long, default_value = "idemgate")]
    target: String,
    /// idemgate's store, for the result's label.
    #[arg(long, default_value = "")]
    store: String,
    /// The upstream's service time, for the result's label.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Repetition number, for the result's label.
    #[arg(long, default_value_t = 1)]
    rep: u32,
    /// Append the JSON line to this file as well.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Exit with status 1 if any answer was wrong.
    #[arg(long)]
    check: bool,
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::parse(s).ok_or_else(|| format!("unknown mode {s:?} (unique, replay or none)"))
}

/// What one connection saw.
struct Tally {
    histogram: Histogram<u64>,
    requests: u64,
    non_2xx: u64,
    errors: u64,
    replayed: u64,
    empty_bodies: u64,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            histogram: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            requests: 0,
            non_2xx: 0,
            errors: 0,
            replayed: 0,
            empty_bodies: 0,
        })
    }

    fn merge(&mut self, other: &Self) -> anyhow::Result<()> {
        self.histogram.add(&other.histogram)?;
        self.requests += other.requests;
        self.non_2xx += other.non_2xx;
        self.errors += other.errors;
        self.replayed += other.replayed;
        self.empty_bodies += other.empty_bodies;
        Ok(())
    }
}

/// Where the run is: requests before `measure_from` are warm-up, the run ends at `until`.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    until: Instant,
}

/// The keys a connection sends: a fresh one per request, a hot one, or none.
struct Keys {
    mode: Mode,
    prefix: String,
    hot_keys: usize,
    next: Cell<u64>,
}

impl Keys {
    /// The `i`th key of the replay path.
    fn hot(&self, i: usize) -> String {
        format!("{}-hot-{}", self.prefix, i % self.hot_keys)
    }

    fn next(&self, conn: usize) -> Option<HeaderValue> {
        let n = self.next.get();
        self.next.set(n + 1);
        let key = match self.mode {
            Mode::None => return None,
            Mode::Unique => format!("{}-{conn}-{n}", self.prefix),
            Mode::Replay => self.hot(n as usize + conn),
        };
        HeaderValue::from_str(&key).ok()
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// What one answer was.
struct Answer {
    success: bool,
    replayed: bool,
    empty_body: bool,
    started: Instant,
    finished: Instant,
}

impl Tally {
    /// Counts `answer`; only answers wholly inside the measured window enter the figures.
    fn record(&mut self, answer: &Answer, window: &Window) {
        self.non_2xx += u64::from(!answer.success);
        if answer.started < window.measure_from || answer.finished > window.until {
            return;
        }
        self.requests += 1;
        self.replayed += u64::from(answer.replayed);
        self.empty_bodies += u64::from(answer.empty_body);
        let micros = (answer.finished - answer.started).as_micros();
        self.histogram
            .saturating_record(u64::try_from(micros).unwrap_or(u64::MAX).max(1));
    }
}

/// Sends one request and reads the whole answer.
async fn send(sender: &mut Sender, path: &str, key: Option<HeaderValue>) -> anyhow::Result<Answer> {
    let mut builder = Request::post(path)
        .header(http::header::HOST, "bench")
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    let request = builder.body(Full::new(Bytes::from_static(REQUEST_BODY)))?;
    sender.ready().await?;
    let started = Instant::now();
    let response = sender.send_request(request).await?;
    let success = response.status().is_success();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Answer {
        success,
        replayed,
        empty_body: body.is_empty(),
        started,
        finished: Instant::now(),
    })
}

async fn connection_loop(
    conn: usize,
    args: Rc<Args>,
    keys: Rc<Keys>,
    window: Window,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    let mut sender: Option<Sender> = None;
    while Instant::now() < window.until {
        let s = match sender.as_mut() {
            Some(s) => s,
            None => match connect(args.addr).await {
                Ok(s) => sender.insert(s),
                Err(_) => {
                    tally.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match send(s, &args.path, keys.next(conn)).await {
            Ok(answer) => tally.record(&answer, &window),
            Err(_) => {
                tally.errors += 1;
                sender = None;
            }
        }
    }
    Ok(tally)
}

async fn run(args: Args) -> anyhow::Result<RunResult> {
    let prefix = format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let keys = Rc::new(Keys {
        mode: args.mode,
        prefix,
        hot_keys: args.hot_keys.max(1),
        next: Cell::new(0),
    });
    let args = Rc::new(args);
    let mut before = Tally::new()?;
    if args.mode == Mode::Replay {
        // Execute every hot key once, so that the measured requests are all replays.
        let mut sender = connect(args.addr).await?;
        for i in 0..keys.hot_keys {
            let key = HeaderValue::from_str(&keys.hot(i))?;
            let answer = send(&mut sender, &args.path, Some(key)).await?;
            before.non_2xx += u64::from(!answer.success);
        }
    }
    let start = Instant::now();
    let window = Window {
        measure_from: start + Duration::from_millis(args.warmup_ms),
        until: start + Duration::from_millis(args.warmup_ms + args.duration_ms),
    };
    let tasks: Vec<_> = (0..args.connections.max(1))
        .map(|conn| {
            tokio::task::spawn_local(connection_loop(conn, args.clone(), keys.clone(), window))
        })
        .collect();
    let mut total = before;
    for task in tasks {
        total.merge(&task.await??)?;
    }
    let seconds = args.duration_ms as f64 / 1000.0;
    let h = &total.histogram;
    Ok(RunResult {
        target: args.target.clone(),
        store: args.store.clone(),
        mode: args.mode,
        connections: args.connections,
        delay_ms: args.delay_ms,
        rep: args.rep,
        requests: total.requests,
        seconds,
        rps: total.requests as f64 / seconds,
        p50_us: h.value_at_quantile(0.50),
        p99_us: h.value_at_quantile(0.99),
        p999_us: h.value_at_quantile(0.999),
        max_us: h.max(),
        non_2xx: total.non_2xx,
        errors: total.errors,
        replayed: total.replayed,
        empty_bodies: total.empty_bodies,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = args.out.clone();
    let check = args.check;
    let result = runtime.block_on(tokio::task::LocalSet::new().run_until(run(args)))?;
    let line = serde_json::to_string(&result)?;
    println!("{line}");
    if let Some(path) = out {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(file, "{line}")?;
    }
    let problems = result.problems();
    if check && !problems.is_empty() {
        eprintln!("{}: {}", result.label(), problems.join("; "));
        std::process::exit(1);
    }
    Ok(())
}
