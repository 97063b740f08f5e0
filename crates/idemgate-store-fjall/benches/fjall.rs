//! Criterion bench of the fjall store: durable claim+complete pairs at 1, 16 and 64 concurrent
//! tasks (every acknowledged operation is fsynced; group commit batches them).
//!
//! `cargo bench -p idemgate-store-fjall`

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemgate_core::testkit::bench::claim_complete_pairs;
use idemgate_store_fjall::FjallStore;

fn fjall_pairs(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("fjall_claim_complete");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(8));
    for tasks in [1usize, 16, 64] {
        let store = FjallStore::open(dir.path().join(format!("bench-{tasks}"))).unwrap();
        g.bench_with_input(BenchmarkId::from_parameter(tasks), &tasks, |b, &tasks| {
            b.iter_custom(|pairs| rt.block_on(claim_complete_pairs(&store, tasks, pairs)));
        });
    }
    g.finish();
}

criterion_group!(benches, fjall_pairs);
criterion_main!(benches);
