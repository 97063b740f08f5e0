//! `idemgate serve`: the proxy listener, the admin listener, and graceful shutdown.

use std::time::Duration;

use anyhow::{Context, Result};
use idemgate_core::Engine;
use idemgate_core::sweeper::spawn_sweeper;
use idemgate_tower::IdempotencyLayer;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::net::TcpListener;

use crate::admin::{self, AdminState};
use crate::config::Settings;
use crate::store;
use crate::workers::{WorkerPlan, Workers};
use idemgate_core::SharedStore;
use idemgate_core::cache::CachedStore;

const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
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
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("idemgate_store_operation_seconds".into()),
            &LATENCY_BUCKETS,
        )
        .context("configuring metrics")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let store::Opened {
        store: shared,
        warnings,
        feed,
    } = store::open(&settings.store).await?;
    let strict = settings
        .routes
        .iter()
        .any(|r| r.engine.recovery == idemgate_core::engine::Recovery::Strict);
    for w in &warnings {
        tracing::warn!(store = %store::redact(&settings.store), "{w}; duplicates become possible (PRODUCT G1)");
    }
    if strict && !warnings.is_empty() {
        anyhow::bail!(
            "refusing to start: recovery = strict needs a store that keeps acknowledged writes, \
             and this one may not: {}",
            warnings.join("; ")
        );
    }
    // Shared stores get a local cache of completed records: replays then cost no round trip.
    // The latency histograms sit below the cache, so they count real store round trips only.
    let shared_store =
        settings.store.starts_with("redis") || settings.store.starts_with("postgres");
    let store = if shared_store && settings.replay_cache_entries > 0 {
        SharedStore::new(
            CachedStore::builder(store::instrumented(shared, settings.store_timeout))
                .capacity(settings.replay_cache_entries)
                .build(),
        )
    } else {
        SharedStore::new(store::instrumented(shared, settings.store_timeout))
    };
    let engine = Engine::builder(store.clone())
        .lease_ttl(settings.lease_ttl)
        .max_waiters(settings.max_waiters)
        .poll_interval(settings.waiter_poll_min, settings.waiter_poll_max)
        .owner(format!(
            "idemgate:{}@{}",
            std::process::id(),
            settings.listen
        ))
        .build();
    let sweeper = spawn_sweeper(store.clone(), Duration::from_secs(30), 1_000);
    let follower = tokio::spawn(store::follow(feed, engine.clone()));
    let layer = IdempotencyLayer::builder(engine.clone())
        .routes(settings.routes.clone())
        .namespace(settings.namespace.clone())
        .response_timeout(settings.response_timeout)
        .build();

    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding the proxy listener {}", settings.listen))?;
    let admin_listener = TcpListener::bind(settings.admin_listen)
        .await
        .with_context(|| format!("binding the admin listener {}", settings.admin_listen))?;
    tracing::info!(
        proxy = %settings.listen, admin = %settings.admin_listen,
        upstream = %settings.upstream, store = %store::redact(&settings.store),
        workers = settings.workers,
        "idemgate listening"
    );

    let (admin_stop_tx, admin_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let admin_app = admin::router(AdminState {
        engine: engine.clone(),
        prometheus,
        namespace: settings.namespace.clone(),
        routes: settings.routes.clone(),
    });
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
            upstream: settings.upstream.clone(),
            connect_timeout: settings.connect_timeout,
            engine: engine.clone(),
            drain_timeout: settings.drain_timeout,
        },
    )?;
    let mut shutdown = std::pin::pin!(shutdown_signal());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving the others.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                workers.hand_over(stream).await;
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
    follower.abort();
    tracing::info!("stopped");
    Ok(())
}
