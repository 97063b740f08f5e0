//! Criterion benches of the core: memory-store claim+complete pairs at 1, 16 and 64 concurrent
//! tasks, and fingerprint throughput at 1 KiB and 64 KiB bodies.
//!
//! `cargo bench -p idemgate-core --features testkit`

#![allow(missing_docs, clippy::unwrap_used)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemgate_core::fingerprint::{Algorithm, JsonMode};
use idemgate_core::testkit::bench::claim_complete_pairs;
use idemgate_core::{FingerprintOptions, MemoryStore};

fn memory_pairs(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let mut g = c.benchmark_group("memory_claim_complete");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(4));
    for tasks in [1usize, 16, 64] {
        g.bench_with_input(BenchmarkId::from_parameter(tasks), &tasks, |b, &tasks| {
            b.iter_custom(|pairs| {
                // A fresh store per sample keeps it far from its capacity bound.
                let store = MemoryStore::builder()
                    .max_records(20_000_000)
                    .max_bytes(usize::MAX)
                    .build();
                rt.block_on(claim_complete_pairs(&store, tasks, pairs))
            });
        });
    }
    g.finish();
}

fn fingerprints(c: &mut Criterion) {
    let mut g = c.benchmark_group("fingerprint");
    let json_body = |len: usize| {
        let mut s = String::from("{\"items\":[");
        while s.len() < len - 40 {
            s.push_str("{\"sku\":\"abc-123\",\"qty\":2,\"price\":9.99},");
        }
        s.push_str("{\"sku\":\"z\",\"qty\":1}],\"ts\":1}");
        s.into_bytes()
    };
    for size in [1024usize, 64 * 1024] {
        let body = json_body(size);
        g.throughput(Throughput::Bytes(body.len() as u64));
        for (name, opts) in [
            ("blake3_raw", FingerprintOptions::default()),
            (
                "sha256_raw",
                FingerprintOptions::default().algorithm(Algorithm::Sha256),
            ),
            (
                "blake3_canonical_json",
                FingerprintOptions::default().json(JsonMode::Canonical {
                    ignore: vec!["/ts".into()],
                }),
            ),
        ] {
            g.bench_with_input(BenchmarkId::new(name, size), &body, |b, body| {
                b.iter(|| {
                    opts.builder()
                        .method("POST")
                        .path("/v1/orders")
                        .header("content-type", b"application/json")
                        .body(body)
                        .finish()
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, memory_pairs, fingerprints);
criterion_main!(benches);
