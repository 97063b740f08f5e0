//! `idemgate-chaos`: runs chaos schedules against the `idemgate` binary and checks them.
//!
//! ```text
//! idemgate-chaos                                  # the short schedule, every store, both modes
//! idemgate-chaos --store redis --recovery strict  # one of them
//! idemgate-chaos --long                           # the soak: >= 1,000,000 requests per run
//! idemgate-chaos --long --requests 200000         # a shorter soak
//! idemgate-chaos --store redis --netns             # real partitions (root, iproute2)
//! ```
//!
//! Exits 1 if any run broke an invariant, 2 if a run could not be set up.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use idemgate_chaos::run::{Recovery, Scenario, StoreKind, run};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum StoreArg {
    File,
    Redis,
    Postgres,
    /// A private PostgreSQL cluster the schedule also SIGKILLs and restarts.
    PostgresPrivate,
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RecoveryArg {
    Takeover,
    Strict,
    Both,
}

/// Chaos schedules against idemgate: real processes, faults, a history checker.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Which store(s).
    #[arg(long, value_enum, default_value = "all")]
    store: StoreArg,
    /// Which recovery mode(s).
    #[arg(long, value_enum, default_value = "both")]
    recovery: RecoveryArg,
    /// The soak: at least --requests (default 1,000,000) keyed requests per run, every fault
    /// kind repeating, at most --hours per run.
    #[arg(long)]
    long: bool,
    /// Stop starting operations once this many requests were sent.
    #[arg(long)]
    requests: Option<u64>,
    /// Stop starting operations after this many seconds.
    #[arg(long)]
    seconds: Option<f64>,
    /// Longest soak run, in hours (with --long).
    #[arg(long, default_value_t = 2.0)]
    hours: f64,
    /// Concurrent clients.
    #[arg(long)]
    clients: Option<u32>,
    /// Instances on Redis and PostgreSQL.
    #[arg(long)]
    instances: Option<u32>,
    /// Seed of the workload and the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Workers per instance.
    #[arg(long)]
    workers: Option<u32>,
    /// Folder for reports and logs (one sub-folder per run).
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// PostgreSQL URL (default: $IDEMGATE_TEST_POSTGRES_URL, else the local server).
    #[arg(long)]
    postgres_url: Option<String>,
    /// No faults at all.
    #[arg(long)]
    no_faults: bool,
    /// A pure race: every operation sent by this many senders at once, normal behaviour only.
    #[arg(long)]
    race: Option<u32>,
    /// Real partitions (Redis only, root and iproute2): instances and the store in network
    /// namespaces, store blackholes as blackhole routes; the short partition schedule.
    #[arg(long)]
    netns: bool,
    /// Write every attempt and execution as JSON lines (default: on for short runs).
    #[arg(long)]
    logs: Option<bool>,
}

fn main() {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idemgate-chaos: no runtime: {e}");
            std::process::exit(2);
        }
    };
    std::process::exit(rt.block_on(main_async(args)));
}

async fn main_async(args: Args) -> i32 {
    let pg = args
        .postgres_url
        .clone()
        .or_else(|| {
            std::env::var("IDEMGATE_TEST_POSTGRES_URL")
                .ok()
                .filter(|v| !v.trim().is_empty())
        })
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    if args.netns && !matches!(args.store, StoreArg::Redis) {
        eprintln!("idemgate-chaos: --netns needs --store redis");
        return 2;
    }
    let stores = match args.store {
        StoreArg::File => vec![StoreKind::File],
        StoreArg::Redis => vec![StoreKind::Redis],
        StoreArg::Postgres => vec![StoreKind::Postgres(pg)],
        StoreArg::PostgresPrivate => vec![StoreKind::PostgresPrivate],
        StoreArg::All => vec![StoreKind::File, StoreKind::Redis, StoreKind::Postgres(pg)],
    };
    let modes = match args.recovery {
        RecoveryArg::Takeover => vec![Recovery::Takeover],
        RecoveryArg::Strict => vec![Recovery::Strict],
        RecoveryArg::Both => vec![Recovery::Takeover, Recovery::Strict],
    };
    let mut reports = Vec::new();
    let mut code = 0;
    for store in &stores {
        for mode in &modes {
            let mut s = if args.long {
                Scenario::long(
                    store.clone(),
                    *mode,
                    args.requests.unwrap_or(1_000_000),
                    args.hours,
                )
            } else {
                let mut s = if args.netns {
                    Scenario::partitions(*mode)
                } else {
                    Scenario::short(store.clone(), *mode)
                };
                if let Some(r) = args.requests {
                    s.max_requests = r;
                }
                s
            };
            if let Some(secs) = args.seconds {
                s.window = Duration::from_secs_f64(secs);
            }
            if let Some(c) = args.clients {
                s.clients = c;
            }
            if let Some(n) = args.instances {
                s.instances = n;
            }
            if let Some(w) = args.workers {
                s.workers = w;
            }
            if args.no_faults {
                s.faults = idemgate_chaos::faults::FaultPlan::none();
                s.name.push_str("-nofaults");
            }
            if let Some(n) = args.race {
                s.mix.race = n;
                s.name.push_str(&format!("-race{n}"));
            }
            if let Some(l) = args.logs {
                s.write_logs = l;
            }
            s.seed = args.seed;
            s.out_dir = Some(args.out.join(&s.name));
            eprintln!(
                "idemgate-chaos: running {} (up to {} requests, {:.0} s window) ...",
                s.name,
                s.max_requests,
                s.window.as_secs_f64()
            );
            match run(&s).await {
                Ok(outcome) => {
                    println!("{}", outcome.report);
                    println!("   files: {}", outcome.out_dir.display());
                    if !outcome.report.passed() {
                        code = 1;
                    }
                    reports.push(outcome.report);
                }
                Err(e) => {
                    eprintln!("idemgate-chaos: {} could not run: {e:#}", s.name);
                    return 2;
                }
            }
        }
    }
    let _ = std::fs::create_dir_all(&args.out);
    if let Ok(json) = serde_json::to_vec_pretty(&reports) {
        let _ = std::fs::write(args.out.join("summary.json"), json);
    }
    code
}
