//! Proxy workers, after nginx's worker processes: each worker thread runs a single-threaded tokio
//! runtime and serves the connections the acceptor hands it, round robin. Everything a request
//! starts (its connection task, the spawned execution, heartbeats, the upstream connection it
//! borrows from its worker's own pool) stays on one thread, so there are no cross-thread wake-ups
//! on the hot path. The engine, store and caches are shared by all workers.
//!
//! Bounds: each worker's hand-over queue holds [`QUEUE`] accepted connections; when it is full,
//! the acceptor waits, and new connections wait in the kernel's listen backlog. Every connection
//! holds a [`Slot`] of `--max-connections` until it closes; a connection must send its request
//! head within `--header-read-timeout` (also the keep-alive idle timeout: hyper starts that timer
//! as soon as a connection waits for its next request), and its request body within
//! `--body-read-timeout`. With `--tls-cert`, the TLS handshake runs in the connection's own task
//! and must finish within `--header-read-timeout` too (the request head then has its own
//! `--header-read-timeout`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use idemgate_core::{Engine, SharedStore};
use idemgate_tower::IdempotencyLayer;
use tokio::sync::{mpsc, watch};

use crate::edge::{Edge, FirstBytes, Slot, is_header_timeout, limit_rejection};
use crate::traces;
use crate::upstream::{Upstream, UpstreamConfig};

/// Accepted connections a worker's queue holds before the acceptor waits.
pub const QUEUE: usize = 1024;

/// What every worker builds its service from.
#[derive(Clone)]
pub struct WorkerPlan {
    /// The idempotency layer (shared engine and store).
    pub layer: IdempotencyLayer<SharedStore>,
    /// The upstream; each worker keeps its own connection pool to it.
    pub upstream: UpstreamConfig,
    /// Longest time for a client's request head (and a keep-alive connection's idle time).
    pub header_read_timeout: Duration,
    /// Longest time for a client's whole request body, from its head.
    pub body_read_timeout: Duration,
    /// The engine, to wait for operations still being recorded when draining.
    pub engine: Engine<SharedStore>,
    /// How long a drain may take.
    pub drain_timeout: Duration,
    /// HTTPS on the proxy listener: the acceptor (its certificate can change while serving).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The running workers.
pub struct Workers {
    queues: Vec<mpsc::Sender<(std::net::TcpStream, Slot)>>,
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
    pub async fn hand_over(&mut self, stream: tokio::net::TcpStream, slot: Slot) {
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
        if queue.send((stream, slot)).await.is_err() {
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

/// Runs a client connection to its end, holding its slot meanwhile.
async fn finish(
    conn: impl std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>,
    slot: Slot,
) {
    let _slot = slot;
    if let Err(e) = conn.await {
        // FirstBytes counts its own timeouts; hyper's show as `hyper::Error`.
        if is_header_timeout(e.as_ref()) {
            limit_rejection("header_read_timeout");
        }
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// One worker: serves connections until told to stop, then drains.
async fn serve_connections(
    plan: WorkerPlan,
    mut queue: mpsc::Receiver<(std::net::TcpStream, Slot)>,
    mut stop: watch::Receiver<bool>,
) {
    let service = Edge::new(
        tower::ServiceBuilder::new()
            .layer(traces::adopt_traceparent())
            .layer(plan.layer.clone())
            .layer(traces::propagate())
            .service(Upstream::new(plan.upstream.clone())),
        plan.body_read_timeout,
    );
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(plan.header_read_timeout);
    loop {
        tokio::select! {
            stream = queue.recv() => {
                let Some((stream, slot)) = stream else { break };
                let stream = match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not register a connection");
                        continue;
                    }
                };
                let svc = TowerToHyperService::new(service.clone());
                let timeout = plan.header_read_timeout;
                let Some(acceptor) = &plan.tls else {
                    let io = TokioIo::new(FirstBytes::new(stream, timeout));
                    let conn = builder.serve_connection_with_upgrades(io, svc);
                    tokio::spawn(finish(graceful.watch(conn.into_owned()), slot));
                    continue;
                };
                let (acceptor, builder, watcher) = (acceptor.clone(), builder.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            metrics::counter!(crate::tls::TLS_HANDSHAKE_FAILURES, "reason" => "handshake").increment(1);
                            tracing::debug!(error = %e, "TLS handshake with a client failed");
                            return;
                        }
                        Err(_) => {
                            metrics::counter!(crate::tls::TLS_HANDSHAKE_FAILURES, "reason" => "timeout").increment(1);
                            limit_rejection("header_read_timeout");
                            return;
                        }
                    };
                    let io = TokioIo::new(FirstBytes::new(stream, timeout));
                    let conn = builder.serve_connection_with_upgrades(io, svc);
                    finish(watcher.watch(conn.into_owned()), slot).await;
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
