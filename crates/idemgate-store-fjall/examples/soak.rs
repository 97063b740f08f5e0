//! A soak of the fjall store: claim + complete pairs on fresh keys from `TASKS` tasks for
//! `SECONDS`, with a short TTL and the sweeper purging, so that memtable flushes, compactions and
//! tombstones all happen. Prints, every 5 s, the pairs per second of that window, the records
//! purged, fjall's disk space and the process's resident memory.
//!
//! `cargo run --release -p idemgate-store-fjall --example soak -- SECONDS TASKS TTL_SECONDS [DIR]`

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idemgate_core::record::{Outcome, StoredResponse};
use idemgate_core::store::{ClaimOutcome, ClaimRequest, Store};
use idemgate_core::testkit::bench::bench_key;
use idemgate_core::{Fingerprint, fingerprint::Algorithm};
use idemgate_store_fjall::FjallStore;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (seconds, tasks, ttl) = (arg(1, 60), arg(2, 64), arg(3, 20));
    let dir = args.get(4).map_or_else(
        || std::env::temp_dir().join(format!("idemgate-soak-{}", std::process::id())),
        std::path::PathBuf::from,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = FjallStore::open(&dir).unwrap();
    let pairs = Arc::new(AtomicU64::new(0));
    let purged = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    rt.block_on(async {
        for _ in 0..tasks {
            let (store, pairs) = (store.clone(), pairs.clone());
            tokio::spawn(async move {
                let req = ClaimRequest {
                    namespace: "soak".into(),
                    scope: "s".into(),
                    idempotency_key: "k".into(),
                    fingerprint: Fingerprint::from_parts(Algorithm::Blake3, [7; 32]),
                    token: 1,
                    owner: "soak".into(),
                    lease_ttl: Duration::from_secs(30),
                    ttl: Duration::from_secs(ttl),
                };
                let body = "x".repeat(200);
                while Instant::now() < deadline {
                    let key = bench_key();
                    let ClaimOutcome::Acquired { fencing } = store.claim(&key, &req).await.unwrap()
                    else {
                        panic!("fresh key existed");
                    };
                    let outcome = Outcome::Response(StoredResponse::new(201, vec![], body.clone()));
                    store
                        .complete(&key, fencing, &outcome, Duration::from_secs(ttl))
                        .await
                        .unwrap();
                    pairs.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        {
            let (store, purged) = (store.clone(), purged.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    let n = store.purge_expired(10_000).await.unwrap();
                    purged.fetch_add(n as u64, Ordering::Relaxed);
                    if n < 10_000 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            });
        }
        println!("window_end_s,pairs_per_s,purged_total,disk_mib,rss_mib");
        let start = Instant::now();
        let mut last = 0;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let now = pairs.load(Ordering::Relaxed);
            println!(
                "{:.0},{:.0},{},{:.1},{:.1}",
                start.elapsed().as_secs_f64(),
                (now - last) as f64 / 5.0,
                purged.load(Ordering::Relaxed),
                store.disk_space() as f64 / 1048576.0,
                rss_kib() as f64 / 1024.0
            );
            last = now;
        }
    });
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
