//! Proxy workers, after nginx's worker processes: each worker thread runs a single-threaded tokio
//! runtime and serves the connections the acceptor hands it, round robin. Everything a request
//! starts (its connection task, the spawned execution, heartbeats, the upstream connection it
//! borrows from its worker's own pool) stays on one thread, so there are no cross-thread wake-ups
//! on the hot path. The engine, store and caches are shared by all workers.
//!
//! Bounds: each worker's hand-over queue holds [`QUEUE`] accepted connections; when it is full,
//! the acceptor waits, and new connections wait in the kernel's listen backlog.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use idemgate_core::{Engine, SharedStore};
use idemgate_tower::IdempotencyLayer;
use tokio::sync::{mpsc, watch};

use crate::upstream::Upstream;

/// Accepted connections a worker's queue holds before the acceptor waits.
pub const QUEUE: usize = 1024;

/// What every worker builds its service from.
#[derive(Clone)]
pub struct WorkerPlan {
    /// The idempotency layer (shared engine and store).
    pub layer: IdempotencyLayer<SharedStore>,
    /// The upstream base URL; each worker keeps its own connection pool to it.
    pub upstream: http::Uri,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// The engine, to wait for operations still being recorded when draining.
    pub engine: Engine<SharedStore>,
    /// How long a drain may take.
    pub drain_timeout: Duration,
}

/// The running workers.
pub struct Workers {
    queues: Vec<mpsc::Sender<std::net::TcpStream>>,
    next: usize,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl Workers {
    /// Starts `count` worker threads.
    pub fn start(count: usize, plan: &WorkerPlan) -> Result<Self> {
        let (stop, _) = watch::channel(false);
        let mut queues = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building a worker runtime")?;
            let (tx, rx) = mpsc::channel(QUEUE);
            let stop_rx = stop.subscribe();
            let plan = plan.clone();
            let thread = std::thread::Builder::new()
                .name(format!("idemgate-worker-{i}"))
                .spawn(move || runtime.block_on(serve_connections(plan, rx, stop_rx)))
                .context("starting a worker thread")?;
            queues.push(tx);
            threads.push(thread);
        }
        Ok(Self {
            queues,
            next: 0,
            threads,
            stop,
        })
    }

    /// Hands an accepted connection to the next worker (waiting while its queue is full).
    pub async fn hand_over(&mut self, stream: tokio::net::TcpStream) {
        let _ = stream.set_nodelay(true);
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "could not hand a connection to a worker");
                return;
            }
        };
        let queue = &self.queues[self.next % self.queues.len()];
        self.next = self.next.wrapping_add(1);
        if queue.send(stream).await.is_err() {
            tracing::error!("a proxy worker has stopped; connection closed");
        }
    }

    /// Tells every worker to drain and waits until all have finished.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        drop(self.queues);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a proxy worker panicked");
                }
            }
        })
        .await;
    }
}

/// One worker: serves connections until told to stop, then drains.
async fn serve_connections(
    plan: WorkerPlan,
    mut queue: mpsc::Receiver<std::net::TcpStream>,
    mut stop: watch::Receiver<bool>,
) {
    let service = tower::ServiceBuilder::new()
        .layer(plan.layer.clone())
        .service(Upstream::new(plan.upstream.clone(), plan.connect_timeout));
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            stream = queue.recv() => {
                let Some(stream) = stream else { break };
                let stream = match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not register a connection");
                        continue;
                    }
                };
                let svc = TowerToHyperService::new(service.clone());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            _ = stop.changed() => break,
        }
    }
    // Let open requests finish, then keep this runtime turning while operations whose clients
    // went away are still being recorded (on any worker: they may use this worker's connections).
    let deadline = Instant::now() + plan.drain_timeout;
    if tokio::time::timeout(plan.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout: closing connections that are still open");
    }
    while plan.engine.stats().in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
