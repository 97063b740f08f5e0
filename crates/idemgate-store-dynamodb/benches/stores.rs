//! Criterion bench of a first execution's store cost — `claim` of a fresh key, then `complete`
//! with a ~200-byte body (`testkit::bench::claim_complete_pairs`) — on DynamoDB, Redis and
//! PostgreSQL in one run, at 1, 16 and 64 concurrent tasks, so that their ratios share the
//! machine's conditions. Each store is benched when its variable is set
//! (`IDEMGATE_TEST_DYNAMODB_URL`, `IDEMGATE_TEST_REDIS_URL`, `IDEMGATE_TEST_POSTGRES_URL`).
//!
//! Against moto the DynamoDB figure measures moto (a Python server answering one request at a
//! time on the same cores), not DynamoDB; see `docs/performance.md`.
//!
//! `cargo bench -p idemgate-store-dynamodb --bench stores`

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idemgate_core::SharedStore;
use idemgate_core::testkit::bench::claim_complete_pairs;
use idemgate_store_dynamodb::DynamoStore;

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

async fn stores() -> Vec<(&'static str, SharedStore)> {
    let mut out = Vec::new();
    if let Some(endpoint) = var("IDEMGATE_TEST_DYNAMODB_URL") {
        let table = format!("idemgate-bench-{}", std::process::id());
        let builder = DynamoStore::builder(&table)
            .region("us-east-1")
            .endpoint(endpoint)
            .credentials("testing", "testing");
        builder
            .create_table()
            .await
            .expect("create the bench table");
        let store = builder.connect().await.expect("connect to DynamoDB");
        out.push(("dynamodb", SharedStore::new(store)));
    }
    if let Some(url) = var("IDEMGATE_TEST_REDIS_URL") {
        let prefix = format!("idemgate-bench-{}:", std::process::id());
        let store = idemgate_store_redis::RedisStore::connect_with_prefix(&url, &prefix)
            .await
            .expect("connect to Redis");
        out.push(("redis", SharedStore::new(store)));
    }
    if let Some(url) = var("IDEMGATE_TEST_POSTGRES_URL") {
        let store = idemgate_store_postgres::PostgresStore::connect(&url)
            .await
            .expect("connect to PostgreSQL");
        out.push(("postgres", SharedStore::new(store)));
    }
    out
}

fn pairs(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stores = rt.block_on(stores());
    let mut g = c.benchmark_group("claim_complete");
    g.throughput(Throughput::Elements(1));
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(2));
    g.measurement_time(Duration::from_secs(10));
    for (name, store) in &stores {
        for tasks in [1usize, 16, 64] {
            g.bench_with_input(BenchmarkId::new(*name, tasks), &tasks, |b, &tasks| {
                b.iter_custom(|pairs| rt.block_on(claim_complete_pairs(store, tasks, pairs)));
            });
        }
    }
    g.finish();
}

criterion_group!(benches, pairs);
criterion_main!(benches);
