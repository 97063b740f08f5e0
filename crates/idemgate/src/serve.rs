//! `idemgate serve`: the proxy listener, the admin listener, and graceful shutdown.

use std::time::Duration;

use anyhow::{Context, Result};
use idemgate_core::Engine;
use idemgate_core::sweeper::spawn_sweeper;
use idemgate_tower::IdempotencyLayer;
use idemgate_tower::body::BodyBudget;
use tokio::net::TcpListener;

use crate::admin::{self, AdminState};
use crate::config::Settings;
use crate::edge::Connections;
use crate::telemetry;

use crate::upstream::UpstreamConfig;
use crate::workers::{WorkerPlan, Workers};

/// Resolves on SIGTERM or Ctrl-C.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Runs until SIGTERM/Ctrl-C, then drains.
pub async fn run(settings: Settings) -> Result<()> {
    // TLS files are read first: a missing or broken one stops start-up before anything else.
    let upstream_tls = crate::tls::upstream(
        &settings.upstream,
        settings.upstream_ca_file.as_deref(),
        settings.upstream_client_cert.as_ref(),
    )
    .context("setting up TLS to the upstream")?;
    let listener_tls = match &settings.tls {
        Some(files) => Some(std::sync::Arc::new(
            crate::tls::ListenerTls::load(files).context("setting up TLS on the proxy listener")?,
        )),
        None => None,
    };
    // SIGHUP reloads the listener's certificate; without TLS it keeps its default action.
    #[cfg(unix)]
    let reloader = match &listener_tls {
        Some(tls) => {
            let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .context("listening for SIGHUP")?;
            Some(tokio::spawn(crate::tls::reload_on_sighup(
                tls.clone(),
                hangups,
            )))
        }
        None => None,
    };

    let prometheus = telemetry::install()?;
    telemetry::describe_and_register();
    crate::tls::describe_metrics(listener_tls.is_some());
    let upkeep = telemetry::spawn_upkeep(prometheus.clone());
    let opened = idemgate_stores::open(&settings.store)
        .await
        .with_context(|| {
            format!(
                "opening the store {}",
                idemgate_stores::redact(&settings.store)
            )
        })?;
    let strict = settings
        .routes
        .iter()
        .any(|r| r.engine.recovery == idemgate_core::engine::Recovery::Strict);
    for w in &opened.warnings {
        tracing::warn!(store = %idemgate_stores::redact(&settings.store), "{w}; duplicates become possible (PRODUCT G1)");
    }
    if strict && !opened.warnings.is_empty() {
        anyhow::bail!(
            "refusing to start: recovery = strict needs a store that keeps acknowledged writes, \
             and this one may not: {}",
            opened.warnings.join("; ")
        );
    }
    // A deadline and metrics on every operation; shared stores also get a local cache of
    // completed records (replays then cost no round trip), above the metrics so that the
    // latency histograms count real store round trips only.
    let (store, feed) = opened.stack(&idemgate_stores::StackOptions {
        deadline: settings.store_timeout,
        replay_cache_entries: settings.replay_cache_entries,
    });
    let engine = Engine::builder(store.clone())
        .lease_ttl(settings.lease_ttl)
        .max_waiters(settings.max_waiters)
        .poll_interval(settings.waiter_poll_min, settings.waiter_poll_max)
        .owner(format!(
            "idemgate:{}@{}",
            std::process::id(),
            settings.listen
        ))
        .resolve_hint(telemetry::resolve_hint(settings.admin_listen))
        .build();
    let sweeper = spawn_sweeper(store.clone(), Duration::from_secs(30), 1_000);
    let (unknown_census, census) = crate::census::UnknownCensus::spawn(
        store.clone(),
        settings.namespace.clone(),
        settings.unknown_scan_rate,
    );
    let follower = tokio::spawn(idemgate_stores::follow(feed, engine.clone()));
    let activity = crate::activity::Activity::default();
    let sampler = activity.spawn_sampler();
    let layer = IdempotencyLayer::builder(engine.clone())
        .observer(std::sync::Arc::new(activity.clone()))
        .routes(settings.routes.clone())
        .namespace(settings.namespace.clone())
        .response_timeout(settings.response_timeout)
        .max_concurrent_requests(settings.max_concurrent_requests)
        .body_budget(BodyBudget::new(settings.max_buffered_body_bytes))
        .build();

    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding the proxy listener {}", settings.listen))?;
    let admin_listener = TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", settings.admin_listen))?;
    tracing::info!(
        proxy = %settings.listen, admin = %settings.admin_listen,
        upstream = %settings.upstream, store = %idemgate_stores::redact(&settings.store),
        workers = settings.workers,
        "idemgate listening"
    );
    if let Some(tls) = &listener_tls {
        tracing::info!(
            cert = %tls.files().cert.display(),
            sha256 = %tls.fingerprint(),
            "the proxy listener serves HTTPS (h2, http/1.1); SIGHUP reloads its certificate"
        );
    }
    check_fd_limit(settings.max_connections);

    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin_app = admin::router(
        AdminState {
            engine: engine.clone(),
            prometheus,
            namespace: settings.namespace.clone(),
            routes: settings.routes.clone(),
            access: std::sync::Arc::new(settings.admin_access.clone()),
            census: unknown_census.clone(),
        },
        // The dashboard's JSON API, behind the same access guard.
        crate::dash_api::router(crate::dash_api::DashState {
            activity,
            census: unknown_census,
            store_kind: crate::dash_api::store_kind(&settings.store),
            namespace: settings.namespace.clone(),
            routes: settings.routes.clone(),
        }),
    );
    let admin_task = tokio::spawn(async move {
        let stop = async {
            let _ = admin_stop_rx.await;
        };
        if let Err(e) = axum::serve(admin_listener, admin_app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "admin listener failed");
        }
    });

    let mut workers = Workers::start(
        settings.workers,
        &WorkerPlan {
            layer,
            upstream: UpstreamConfig {
                base: settings.upstream.clone(),
                tls: upstream_tls,
                connect_timeout: settings.connect_timeout,
                idle_timeout: settings.upstream_idle_timeout,
                response_timeout: settings.response_timeout,
            },
            header_read_timeout: settings.header_read_timeout,
            body_read_timeout: settings.body_read_timeout,
            engine: engine.clone(),
            drain_timeout: settings.drain_timeout,
            tls: listener_tls.as_ref().map(|tls| tls.acceptor()),
        },
    )?;
    let connections = Connections::new(settings.max_connections);
    let mut backoff = AcceptBackoff::default();
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving the connections
                        // already open, and try again after a growing pause (no busy loop, and
                        // at most about one log line a second).
                        let pause = backoff.failed(&e);
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => continue,
                            _ = &mut shutdown => break,
                        }
                    }
                };
                backoff.succeeded();
                match connections.try_open() {
                    Some(slot) => workers.hand_over(stream, slot).await,
                    None => connections.reject(stream),
                }
            }
            _ = &mut shutdown => break,
        }
    }

    // Drain: stop accepting; each worker lets its open requests finish, then waits for operations
    // whose clients went away (their outcomes are still being recorded).
    drop(listener);
    tracing::info!(timeout = ?settings.drain_timeout, "shutting down: draining in-flight requests");
    workers.stop().await;
    // Operations the drain could not wait for were cancelled with their workers: they may have
    // reached the upstream, so they become outcome-unknown (never left in flight for a takeover
    // to run again).
    let abandoned = engine.abandon_running().await;
    if abandoned > 0 {
        tracing::warn!(
            operations = abandoned,
            "drain timeout: operations still running were marked outcome-unknown"
        );
    }
    let _ = admin_stop_tx.send(());
    let _ = admin_task.await;
    sweeper.abort();
    sampler.abort();
    follower.abort();
    if let Some(census) = census {
        census.abort();
    }
    upkeep.abort();
    #[cfg(unix)]
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

/// The acceptor's pause after failures (out of file descriptors, out of memory, ...): 10 ms,
/// doubling up to 1 s, back to nothing after a success. Logs at most one warning a second, with
/// the number of failures since the last one.
struct AcceptBackoff {
    pause: Duration,
    failures: u64,
    last_log: Option<std::time::Instant>,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self {
            pause: Duration::ZERO,
            failures: 0,
            last_log: None,
        }
    }
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);

    /// Records a failure; returns how long to pause before accepting again.
    fn failed(&mut self, e: &std::io::Error) -> Duration {
        let reason = match e.raw_os_error() {
            Some(23 | 24) => "fd_exhausted", // ENFILE, EMFILE
            Some(12 | 105) => "memory",      // ENOMEM, ENOBUFS
            _ => "other",
        };
        metrics::counter!("idemgate_accept_errors_total", "reason" => reason).increment(1);
        self.failures += 1;
        self.pause = (self.pause * 2).clamp(Self::FIRST, Self::MAX);
        let now = std::time::Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_log = Some(now);
            tracing::warn!(
                error = %e,
                failures = self.failures,
                pause = ?self.pause,
                "accept failed; serving the open connections and accepting again after a pause"
            );
            self.failures = 0;
        }
        self.pause
    }

    fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }
}

/// Warns when the file descriptor limit cannot hold `max_connections` client connections plus
/// room for upstream connections and files.
fn check_fd_limit(max_connections: usize) {
    if let Ok((soft, _)) = rlimit::Resource::NOFILE.get() {
        let needed = (max_connections as u64).saturating_add(1024);
        if soft < needed {
            tracing::warn!(
                fd_limit = soft,
                max_connections,
                "the file descriptor limit is below max_connections + 1024 (upstream connections \
                 and files need some too); past it, accepting pauses until descriptors are free"
            );
        }
    }
}
