//! `record-footprint`: resident memory per completed record in the memory store.
//!
//! Fills a fresh [`MemoryStore`] with `--records` completed records shaped like the proxy's (a
//! scoped key of a principal, a 36-character client key, a BLAKE3 fingerprint, a `201` answer
//! with the headers the proxy stores from the bench upstream, `content-type` and `date`, and the
//! ~200-byte benchmark body, each body its own allocation)
//! and prints, as one JSON line, the growth of the process's resident set size (`VmRSS`) per
//! record, with and without the body bytes, and how long one purge sweep of the full store takes
//! when nothing has expired. Linux only (reads `/proc/self/status`).

use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use idemgate_core::fingerprint::{Algorithm, Fingerprint};
use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::store::{ClaimOutcome, ClaimRequest, Store};
use idemgate_core::{IdempotencyKey, MemoryStore, Scope, ScopedKey};

#[derive(Parser)]
#[command(about = "Resident memory per stored record in idemgate's memory store")]
struct Args {
    /// How many completed records to store.
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
}

/// The process's resident set size in bytes.
fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS line in /proc/self/status"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

async fn fill(store: &MemoryStore, records: usize) -> anyhow::Result<()> {
    let scope = Scope::for_principal("POST /payments", &[b"Bearer sk_test_0123456789"]);
    let ttl = Duration::from_secs(86_400);
    for i in 0..records {
        // 36 characters, like a UUID.
        let raw = format!("{i:08x}-0000-4000-8000-{:012x}", i.wrapping_mul(7919));
        let key = ScopedKey::new("default", scope.clone(), IdempotencyKey::parse(&raw)?);
        let fingerprint =
            Fingerprint::from_parts(Algorithm::Blake3, *blake3::hash(raw.as_bytes()).as_bytes());
        let request = ClaimRequest::new(
            &key,
            fingerprint,
            i as u128,
            "idemgate:1",
            Duration::from_secs(30),
            ttl,
        );
        let store_key = key.store_key();
        let ClaimOutcome::Acquired { fencing } = store.claim(&store_key, &request).await? else {
            anyhow::bail!("key {raw} was already stored");
        };
        let outcome = Outcome::Response(StoredResponse::new(
            201,
            vec![(
                "content-type".to_owned(),
                Bytes::from_static(b"application/json"),
            )],
            Bytes::copy_from_slice(idemgate_bench::RESPONSE_BODY),
        ));
        store.complete(&store_key, fencing, &outcome, ttl).await?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let store = MemoryStore::builder()
        .max_records(args.records + 1)
        .max_bytes(usize::MAX)
        .build();
    let before = rss_bytes()?;
    runtime.block_on(fill(&store, args.records))?;
    let after = rss_bytes()?;
    // A sweep of the full store finding nothing expired: the memory store keeps no expiry
    // index, so this is the cost of each periodic purge.
    let started = std::time::Instant::now();
    let purged = runtime.block_on(store.purge_expired(usize::MAX))?;
    let sweep_ms = started.elapsed().as_secs_f64() * 1000.0;
    let n = args.records.max(1) as f64;
    let per_record = after.saturating_sub(before) as f64 / n;
    let body = idemgate_bench::RESPONSE_BODY.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "records": args.records,
            "rss_growth_bytes": after.saturating_sub(before),
            "bytes_per_record": per_record,
            "body_bytes": body,
            "bytes_per_record_beyond_body": per_record - body,
            "store_accounted_bytes_per_record": store.bytes() as f64 / n,
            "full_sweep_ms": sweep_ms,
            "full_sweep_purged": purged,
        })
    );
    Ok(())
}
