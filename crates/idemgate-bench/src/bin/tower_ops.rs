//! `tower-ops`: the tower layer's two hot paths — N first executions, then R rounds of replays of
//! those N keys — through `IdempotencyLayer` on a memory store wrapped like `idemgate serve`'s
//! (deadline + metrics, [`idemgate_stores::instrumented`]), with the same log subscriber as
//! `idemgate serve` at its default level (`info`, text), on a single-threaded runtime. For
//! instruction counts under `valgrind --tool=callgrind`: the cost of one replay is the difference
//! of two runs' totals divided by the difference of their replay counts (start-up cancels out).
//!
//! ```text
//! tower-ops [N] [R] [cached]   # default 2000 keys, 1 round of replays; prints one summary line
//!                              # `cached`: the memory store behind the local replay cache
//! valgrind --tool=callgrind target/release/tower-ops 2000 1
//! valgrind --tool=callgrind target/release/tower-ops 2000 3
//! ```

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use idemgate_core::{Engine, MemoryStore, SharedStore};
use idemgate_tower::IdempotencyLayer;
use idemgate_tower::body::{IdemBody, full};
use idemgate_tower::policy::{RoutePolicy, Routes};
use tower::{Service, ServiceExt};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2_000);
    let rounds: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1);
    // The subscriber of `idemgate serve` at its default level.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // `cached` as third argument: the memory store behind the local replay cache
    // (`idemgate_core::cache::CachedStore`), for an A/B of memory-store replays.
    let cached = args.next().as_deref() == Some("cached");
    let memory = if cached {
        SharedStore::new(
            idemgate_core::cache::CachedStore::builder(MemoryStore::default())
                .capacity(10_000)
                .build(),
        )
    } else {
        SharedStore::new(MemoryStore::default())
    };
    let store = SharedStore::new(idemgate_stores::instrumented(
        memory,
        Duration::from_secs(3),
    ));
    let engine = Engine::builder(store).build();
    let routes = Routes::new(vec![
        RoutePolicy::new("payments", "/payments").required(true),
    ]);
    let app = tower::service_fn(|_req: Request<IdemBody>| async {
        Ok::<_, Infallible>(Response::new(full(Bytes::from_static(b"{\"id\":1}"))))
    });
    let mut svc = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(engine, routes))
        .service(app);
    let keys: Vec<String> = (0..n).map(|i| format!("key-{i}")).collect();
    let (mut executed, mut replayed) = (0usize, 0usize);
    runtime.block_on(async {
        for pass in 0..=rounds {
            for key in &keys {
                let req = Request::post("/payments")
                    .header("idempotency-key", key.as_str())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(b"{\"amount\":1}")))?;
                let res = ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
                    .await?
                    .call(req)
                    .await?;
                let replay = res.headers().contains_key("idempotent-replayed");
                let status = res.status();
                res.into_body()
                    .collect()
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                match (pass, replay, status.as_u16()) {
                    (0, false, 200) => executed += 1,
                    (p, true, 200) if p > 0 => replayed += 1,
                    other => anyhow::bail!("unexpected answer {other:?}"),
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    println!("tower-ops: {executed} first executions, {replayed} replays");
    Ok(())
}
