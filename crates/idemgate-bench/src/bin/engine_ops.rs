//! `engine-ops`: runs the engine's two hot paths on a memory store — N first executions (claim,
//! run, complete) and N replays — on a single-threaded runtime, for instruction counts under
//! `valgrind --tool=callgrind` (repeatable, unlike timings on a shared machine).
//!
//! ```text
//! engine-ops [N]        # default 20000; prints nothing but a summary line
//! valgrind --tool=callgrind target/release/engine-ops 20000
//! ```

use idemgate_core::engine::{Disposition, Execution, Policy};
use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::{Engine, FingerprintOptions, IdempotencyKey, MemoryStore, Scope, ScopedKey};

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let engine = Engine::builder(MemoryStore::default()).build();
    let fp = FingerprintOptions::default()
        .builder()
        .method("POST")
        .path("/pay")
        .body(b"{}")
        .finish();
    let keep = |body: &&'static str| {
        Disposition::Store(Outcome::Response(StoredResponse::new(201, vec![], *body)))
    };
    let keys: Vec<ScopedKey> = (0..n)
        .map(|i| {
            IdempotencyKey::parse(&format!("key-{i}"))
                .map(|k| ScopedKey::new("bench", Scope::new("tenant"), k))
        })
        .collect::<Result<_, _>>()?;
    let (mut executed, mut replayed) = (0, 0);
    runtime.block_on(async {
        for pass in 0..2 {
            for key in &keys {
                match engine
                    .run(key, fp, &Policy::default(), keep, |_| async { "ok" })
                    .await?
                {
                    Execution::Executed { .. } if pass == 0 => executed += 1,
                    Execution::Replayed { .. } if pass == 1 => replayed += 1,
                    other => anyhow::bail!("unexpected {other:?}"),
                }
            }
        }
        Ok(())
    })?;
    println!("engine-ops: {executed} first executions, {replayed} replays");
    Ok(())
}
