//! One run: start the store, the recording upstream, the relays and the instances; run the
//! clients while the injector applies the fault schedule; heal; probe the keys left without an
//! answer; stop everything; check the logs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use idemgate_relay::Relay;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::checker::{CheckParams, Report, check};
use crate::client::{Attempt, ClientLog, Clients, Http, Mix, Op, RetryPolicy, Targets};
use crate::faults::{FaultPlan, FaultRecord, World, inject};
use crate::netns::Net;
use crate::procs::{
    Instance, InstanceSpec, PrivatePostgres, PrivateRedis, PrivateStore, authority, idemgate_bin,
};
use crate::resources::{StoreBytes, sample};
use crate::rng::Rng;
use crate::upstream::{Execution, RecordingUpstream};

/// The store the instances share.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// The embedded store (`file:DIR`): one instance (it locks its file), restarted.
    File,
    /// A private `redis-server` (AOF `always`) started for the run.
    Redis,
    /// A PostgreSQL server at this URL; the run uses a namespace of its own.
    Postgres(String),
    /// A private PostgreSQL cluster started for the run (`initdb`, fsync on), which the
    /// schedule may SIGKILL (postmaster and backends) and restart.
    PostgresPrivate,
}

impl StoreKind {
    /// `file`, `redis` or `postgres`.
    pub fn name(&self) -> &'static str {
        match self {
            StoreKind::File => "file",
            StoreKind::Redis => "redis",
            StoreKind::Postgres(_) => "postgres",
            StoreKind::PostgresPrivate => "postgres-private",
        }
    }

    /// Whether the run owns the store's process and may kill it.
    pub fn is_private(&self) -> bool {
        matches!(self, StoreKind::Redis | StoreKind::PostgresPrivate)
    }
}

/// `--recovery`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovery {
    /// A dead holder's key is re-dispatched at epoch + 1.
    Takeover,
    /// A dead holder's key becomes outcome-unknown.
    Strict,
}

impl Recovery {
    /// The flag's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Recovery::Takeover => "takeover",
            Recovery::Strict => "strict",
        }
    }
}

/// Everything that defines a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scenario {
    /// A name for the report.
    pub name: String,
    /// The store.
    pub store: StoreKind,
    /// Recovery mode.
    pub recovery: Recovery,
    /// Instances (forced to 1 on the embedded store).
    pub instances: u32,
    /// Concurrent clients (principals).
    pub clients: u32,
    /// Clients start no operation after this ...
    pub window: Duration,
    /// ... nor once this many requests were sent.
    pub max_requests: u64,
    /// The workload.
    pub mix: Mix,
    /// How clients retry.
    pub retry: RetryPolicy,
    /// The faults.
    pub faults: FaultPlan,
    /// `--lease-ttl`.
    pub lease: Duration,
    /// `--wait-timeout`.
    pub wait_timeout: Duration,
    /// `--store-timeout`.
    pub store_timeout: Duration,
    /// `--response-timeout`.
    pub response_timeout: Duration,
    /// `--drain-timeout`.
    pub drain_timeout: Duration,
    /// `--workers` per instance.
    pub workers: u32,
    /// More `serve` arguments.
    pub extra_args: Vec<String>,
    /// The seed of the workload and the schedule.
    pub seed: u64,
    /// Where logs and the report go (a temporary folder if `None`).
    pub out_dir: Option<PathBuf>,
    /// Write every attempt and execution as JSON lines (large for long runs).
    pub write_logs: bool,
    /// Real partitions (Redis only): every instance and the store in network namespaces of
    /// their own, store link blackholes as blackhole routes ([`crate::netns`]) instead of relay
    /// faults; no store relays, so no store delays.
    #[serde(default)]
    pub netns: bool,
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Scenario {
    /// The short schedule: ~20 s of load by 32 clients (at most 4,000 requests) on 3 instances
    /// (1 on the embedded store), a SIGKILL of a random instance every ~2 s (restarted after
    /// 0.5 s); on Redis and PostgreSQL also every store link blackholed for 3 s (about twice),
    /// one instance's store link blackholed for 3 s, an instance paused for 6 s (3 leases);
    /// on Redis a SIGKILL and restart of redis-server; upstream link faults; lease 2 s.
    pub fn short(store: StoreKind, recovery: Recovery) -> Self {
        let shared = !matches!(store, StoreKind::File);
        let window = Duration::from_secs(20);
        Self {
            name: format!("short-{}-{}", store.name(), recovery.as_str()),
            instances: if shared { 3 } else { 1 },
            clients: 32,
            window,
            max_requests: 4_000,
            mix: Mix::default(),
            retry: RetryPolicy::default(),
            faults: FaultPlan {
                kill_every: Some(Duration::from_secs(2)),
                restart_after: Duration::from_millis(500),
                pause_every: shared.then_some(Duration::from_secs(12)),
                pause_for: Duration::from_secs(6),
                store_blackhole_every: shared.then_some(Duration::from_secs(12)),
                store_blackhole_one_every: shared.then_some(Duration::from_secs(16)),
                store_blackhole_for: Duration::from_secs(3),
                store_kill_every: store.is_private().then_some(Duration::from_secs(16)),
                upstream_fault_every: Some(Duration::from_secs(7)),
                link_fault_for: Duration::from_secs(2),
                ..FaultPlan::default()
            },
            lease: Duration::from_secs(2),
            wait_timeout: Duration::from_secs(5),
            store_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(2),
            workers: 1,
            extra_args: Vec::new(),
            seed: 1,
            out_dir: None,
            write_logs: true,
            netns: false,
            store,
            recovery,
        }
    }

    /// The soak: like [`Scenario::short`] but 64 clients, until `requests` requests were sent
    /// (at most `hours`), with every fault kind repeating (SIGKILL every ~2 s, SIGTERM every
    /// ~30 s, a pause every ~45 s, a store blackhole every ~60 s and a single-instance one every
    /// ~50 s, store delays, upstream link faults, Redis SIGKILL every ~90 s), and the logs kept
    /// in memory only.
    pub fn long(store: StoreKind, recovery: Recovery, requests: u64, hours: f64) -> Self {
        let mut s = Self::short(store, recovery);
        let shared = !matches!(s.store, StoreKind::File);
        s.name = format!("long-{}-{}", s.store.name(), s.recovery.as_str());
        s.clients = 64;
        s.window = Duration::from_secs_f64(hours * 3600.0);
        s.max_requests = requests;
        s.write_logs = false;
        s.faults = FaultPlan {
            kill_every: Some(Duration::from_secs(2)),
            restart_after: Duration::from_millis(500),
            terminate_every: Some(Duration::from_secs(30)),
            pause_every: shared.then_some(Duration::from_secs(45)),
            pause_for: Duration::from_secs(6),
            store_blackhole_every: shared.then_some(Duration::from_secs(60)),
            store_blackhole_one_every: shared.then_some(Duration::from_secs(50)),
            store_blackhole_for: Duration::from_secs(3),
            store_delay_every: shared.then_some(Duration::from_secs(40)),
            upstream_fault_every: Some(Duration::from_secs(20)),
            link_fault_for: Duration::from_secs(2),
            store_kill_every: s.store.is_private().then_some(Duration::from_secs(90)),
            start_after: Duration::from_secs(1),
        };
        s
    }

    /// Scenario 22, with real partitions: the short Redis schedule with every instance and the
    /// store in network namespaces, one instance cut from the store for 3 s about every 5 s and
    /// every instance about every 12 s (blackhole routes both ways), kills, pauses and Redis
    /// kills as in [`Scenario::short`]. Needs root and iproute2.
    pub fn partitions(recovery: Recovery) -> Self {
        let mut s = Self::short(StoreKind::Redis, recovery);
        s.name = format!("partitions-redis-{}", recovery.as_str());
        s.netns = true;
        s.faults.store_blackhole_one_every = Some(Duration::from_secs(5));
        s.faults.store_delay_every = None;
        s
    }
}

/// Everything a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// The checked figures.
    pub report: Report,
    /// The operations.
    pub ops: Vec<Op>,
    /// Every attempt.
    pub attempts: Vec<Attempt>,
    /// Every execution.
    pub executions: Vec<Execution>,
    /// What the injector did.
    pub faults: Vec<FaultRecord>,
    /// Where the files are.
    pub out_dir: PathBuf,
}

/// Runs `s` and checks it. Errors are failures to set the run up (no binary, no store), not
/// violations: those are in the report.
pub async fn run(s: &Scenario) -> anyhow::Result<Outcome> {
    let bin = idemgate_bin().map_err(anyhow::Error::msg)?;
    let (out_dir, _keep) = match &s.out_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("idemgate-chaos-")
                .tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let run_tag = format!(
        "chaos{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let t0 = Instant::now();
    let upstream = RecordingUpstream::start(
        t0,
        s.write_logs
            .then(|| out_dir.join("executions.jsonl"))
            .as_deref(),
    )
    .await
    .context("starting the recording upstream")?;

    // The store, and the address its relays forward to.
    if s.netns && !matches!(s.store, StoreKind::Redis) {
        anyhow::bail!("real partitions (netns) are built for the Redis store only");
    }
    let net = if s.netns {
        let n = if s.instances == 0 { 1 } else { s.instances };
        Some(Arc::new(Net::create(n).context(
            "creating network namespaces (root and iproute2 needed)",
        )?))
    } else {
        None
    };
    let mut private = None;
    let mut store_bytes = StoreBytes::None;
    let (store_url, store_target) = match &s.store {
        StoreKind::File => {
            let dir = out_dir.join("store");
            std::fs::create_dir_all(&dir)?;
            store_bytes = StoreBytes::Folder(dir.clone());
            (format!("file:{}", dir.display()), None)
        }
        StoreKind::Redis => {
            let r = match &net {
                Some(n) => PrivateRedis::start_in(Some(n.store_ns()), n.store_ip()).await,
                None => PrivateRedis::start().await,
            }
            .context("starting a private redis-server")?;
            let addr = r.addr();
            let r = Arc::new(Mutex::new(PrivateStore::Redis(r)));
            store_bytes = StoreBytes::Private(r.clone());
            private = Some(r);
            // Through namespaces the instances reach the store itself, without relays.
            let relayed = net.is_none().then(|| (addr.to_string(), addr));
            (format!("redis://{addr}"), relayed)
        }
        StoreKind::PostgresPrivate => {
            let p = PrivatePostgres::start()
                .await
                .context("starting a private PostgreSQL cluster")?;
            let (addr, url) = (p.addr(), p.url());
            let p = Arc::new(Mutex::new(PrivateStore::Postgres(p)));
            store_bytes = StoreBytes::Private(p.clone());
            private = Some(p);
            (url, Some((addr.to_string(), addr)))
        }
        StoreKind::Postgres(url) => {
            let (hostport, addr) = authority(url).with_context(|| format!("resolving {url}"))?;
            (url.clone(), Some((hostport, addr)))
        }
    };
    let instances_n = if matches!(s.store, StoreKind::File) {
        1
    } else {
        s.instances.max(1)
    };
    let mut store_relays = Vec::new();
    let mut upstream_relays = Vec::new();
    let mut instances = Vec::new();
    for i in 0..instances_n {
        let up = match &net {
            Some(n) => Relay::start_on((n.root_ip_for(i), 0).into(), upstream.addr()).await?,
            None => Relay::start(upstream.addr()).await?,
        };
        let url = match &store_target {
            Some((hostport, target)) => {
                let relay = Relay::start(*target).await?;
                let url = store_url.replacen(hostport.as_str(), &relay.addr().to_string(), 1);
                store_relays.push(relay);
                url
            }
            None => store_url.clone(),
        };
        let mut args = vec![
            "--upstream".to_owned(),
            format!("http://{}", up.addr()),
            "--store".to_owned(),
            url,
            "--recovery".to_owned(),
            s.recovery.as_str().to_owned(),
            "--lease-ttl".to_owned(),
            ms(s.lease),
            "--wait-timeout".to_owned(),
            ms(s.wait_timeout),
            "--store-timeout".to_owned(),
            ms(s.store_timeout),
            "--response-timeout".to_owned(),
            ms(s.response_timeout),
            "--drain-timeout".to_owned(),
            ms(s.drain_timeout),
            "--workers".to_owned(),
            s.workers.to_string(),
        ];
        if !matches!(s.store, StoreKind::File) {
            args.push("--namespace".to_owned());
            args.push(run_tag.clone());
        }
        args.extend(s.extra_args.iter().cloned());
        upstream_relays.push(up);
        let mut spec =
            InstanceSpec::local(bin.clone(), args, out_dir.join(format!("instance-{i}.log")));
        if let Some(n) = &net {
            spec.netns = Some(n.instance_ns(i));
            spec.ip = n.instance_ip(i).into();
        }
        let inst = Instance::start(i, spec)
            .await
            .with_context(|| format!("starting instance {i}"))?;
        instances.push(Arc::new(Mutex::new(inst)));
    }
    let mut addrs = Vec::new();
    for i in &instances {
        addrs.push(i.lock().await.addr());
    }
    let targets = Arc::new(Targets::new(addrs));
    let world = World {
        instances,
        targets: targets.clone(),
        store_relays: Arc::new(store_relays),
        upstream_relays: Arc::new(upstream_relays),
        store: private,
        net: net.clone(),
        t0,
    };

    // The workload and the faults.
    let root = Rng::new(s.seed);
    let schedule = s
        .faults
        .schedule(s.window, instances_n, &mut root.fork(0xFA17));
    let clients = Clients {
        http: Http::default(),
        targets: targets.clone(),
        log: Arc::new(ClientLog::new(t0)),
        retry: s.retry.clone(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let start = tokio::time::Instant::now();
    let injector = {
        let world = world.clone();
        let plan = s.faults.clone();
        tokio::spawn(async move { inject(&world, &schedule, start, &plan, stop_rx).await })
    };
    let sampler = tokio::spawn(sample(
        world.instances.clone(),
        store_bytes,
        t0,
        stop_tx.subscribe(),
    ));
    let window_end = start + s.window;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..s.clients {
        let clients = clients.clone();
        let mix = s.mix.clone();
        let tag = run_tag.clone();
        let max = s.max_requests;
        let mut rng = root.fork(u64::from(c) + 1);
        tasks.spawn(async move {
            let mut ops = Vec::new();
            for i in 0u64.. {
                if tokio::time::Instant::now() >= window_end || clients.log.count() >= max {
                    break;
                }
                let op = mix.op(&tag, c, i, (u64::from(c) << 40) | i, &mut rng);
                clients.run_op(&op, &mut rng).await;
                ops.push(op);
            }
            ops
        });
    }
    let mut ops = Vec::new();
    while let Some(done) = tasks.join_next().await {
        ops.extend(done.context("a client task panicked")?);
    }
    let _ = stop_tx.send(true);
    let mut faults = injector.await.context("the injector panicked")?;
    let resources = sampler.await.context("the sampler panicked")?;
    faults.extend(world.heal().await);

    // Quiesce: no execution in progress, then a lease (and a renew interval, and a second)
    // for every orphaned key to expire, then one probe for each key without an answer.
    upstream.wait_idle(Duration::from_secs(30)).await;
    tokio::time::sleep(s.lease + s.lease / 3 + Duration::from_secs(1)).await;
    let answered = clients.log.ops_answered(&[
        crate::client::Class::Executed,
        crate::client::Class::Replayed,
    ]);
    let unresolved: Vec<Op> = ops
        .iter()
        .filter(|o| !answered.contains(&o.id))
        .cloned()
        .collect();
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let mut probes = tokio::task::JoinSet::new();
    for (n, op) in unresolved.into_iter().enumerate() {
        let clients = clients.clone();
        let gate = gate.clone();
        let instance = (n % instances_n as usize) as u32;
        probes.spawn(async move {
            let _permit = gate.acquire_owned().await;
            clients.attempt(&op, u32::MAX, 0, instance, true).await;
        });
    }
    while probes.join_next().await.is_some() {}

    // Stop everything; wait for the upstream to log what is still running.
    for i in &world.instances {
        i.lock().await.kill9().await;
    }
    upstream.wait_idle(Duration::from_secs(30)).await;
    let executions = upstream.executions();
    let attempts = clients.log.take();
    drop(world);

    let params = CheckParams {
        strict: s.recovery == Recovery::Strict,
        lease: s.lease,
        client_backoff_cap: s.retry.cap,
    };
    let mut report = check(&params, &ops, &attempts, &executions, &faults);
    report.name = s.name.clone();
    report.store = s.store.name().to_owned();
    report.recovery = s.recovery.as_str().to_owned();
    report.instances = instances_n;
    report.seed = s.seed;
    report.binary = bin.display().to_string();
    report.resources = resources;

    std::fs::write(
        out_dir.join("report.json"),
        serde_json::to_vec_pretty(&report)?,
    )?;
    std::fs::write(out_dir.join("report.txt"), report.to_string())?;
    std::fs::write(
        out_dir.join("faults.json"),
        serde_json::to_vec_pretty(&faults)?,
    )?;
    if !report.histories.is_empty() {
        std::fs::write(out_dir.join("histories.txt"), report.histories.join("\n"))?;
    }
    if !report.anomaly_histories.is_empty() {
        std::fs::write(
            out_dir.join("anomalies.txt"),
            report.anomaly_histories.join("\n"),
        )?;
    }
    if s.write_logs {
        let mut lines = Vec::new();
        for a in &attempts {
            serde_json::to_writer(&mut lines, a)?;
            lines.push(b'\n');
        }
        std::fs::write(out_dir.join("attempts.jsonl"), lines)?;
        std::fs::write(out_dir.join("ops.json"), serde_json::to_vec(&ops)?)?;
    }
    if let Some(t) = _keep {
        // Keep the files of a failed run for a look; drop those of a passing one.
        if !report.passed() {
            let kept = t.keep();
            eprintln!(
                "idemgate-chaos: logs of the failed run kept in {}",
                kept.display()
            );
        }
    }
    Ok(Outcome {
        report,
        ops,
        attempts,
        executions,
        faults,
        out_dir,
    })
}
