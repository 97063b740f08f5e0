//! Deterministic reproductions of what the chaos schedules found in the product. Each asserts
//! the guarantee as written; one that fails on the product of today is `#[ignore]`d with the
//! finding as its reason (run it with `cargo test -p idemgate-chaos --test findings --
//! --ignored`), and loses its `ignore` with the fix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idemgate_chaos::client::{Class, ClientLog, Clients, Http, Op, RetryPolicy, Targets};
use idemgate_chaos::procs::{Instance, InstanceSpec, idemgate_bin};
use idemgate_chaos::upstream::{Behaviour, RecordingUpstream};

/// G1: "at most one upstream dispatch per epoch". A takeover at epoch 2 whose dispatch is
/// released (here: the upstream answers it with a transient `503`, proof that it did nothing)
/// used to delete the record, so the next dispatch was at epoch 1 again, although epoch 1 did run
/// (its holder was killed mid-request): two effects at epoch 1, and a downstream that fences on
/// `Idempotency-Epoch` saw the epoch go back from 2 to 1. Fixed: a release keeps the key's epoch
/// as a floor, and the next claim runs at epoch 3.
#[test]
fn a_release_after_a_takeover_never_reuses_an_epoch() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t0 = Instant::now();
        let upstream = RecordingUpstream::start(t0, None).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spec = InstanceSpec {
            bin: idemgate_bin().unwrap(),
            args: vec![
                "--upstream".into(),
                format!("http://{}", upstream.addr()),
                "--store".into(),
                format!("file:{}", dir.path().display()),
                "--lease-ttl".into(),
                "1s".into(),
                "--recovery".into(),
                "takeover".into(),
            ],
            env: Vec::new(),
            netns: None,
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
            log: dir.path().join("instance.log"),
        };
        let mut instance = Instance::start(0, spec).await.unwrap();
        let clients = Clients {
            http: Http::default(),
            targets: Arc::new(Targets::new(vec![instance.addr()])),
            log: Arc::new(ClientLog::new(t0)),
            retry: RetryPolicy::default(),
        };
        let behaviour = Behaviour {
            delay_ms: 1500,
            transient_epoch: 2,
            ..Behaviour::default()
        };
        let op = Op {
            id: 1,
            client: 0,
            scope: "Bearer finding-epoch".into(),
            key: "finding-epoch-1".into(),
            target: format!("/pay?{}", behaviour.to_query()),
            body: Bytes::from_static(b"{\"amount\":1}"),
            senders: 1,
            behaviour,
        };
        // Epoch 1 reaches the upstream; its holder is killed mid-request.
        let first = {
            let clients = clients.clone();
            let op = op.clone();
            tokio::spawn(async move { clients.attempt(&op, 0, 0, 0, false).await })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while upstream.in_flight() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never dispatched");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        instance.kill9().await;
        assert_eq!(first.await.unwrap(), Class::Transport);
        instance.restart().await.unwrap();
        clients.targets.set(0, instance.addr());
        // A retry takes the key over at epoch 2 once the lease ran out; the upstream answers that
        // dispatch 503 (transient, no effect): the key is released.
        assert_eq!(clients.attempt(&op, 0, 1, 0, false).await, Class::Transient);
        // The next retry runs again.
        assert_eq!(clients.attempt(&op, 0, 2, 0, false).await, Class::Executed);
        assert!(upstream.wait_idle(Duration::from_secs(10)).await);
        let effects: Vec<(u64, u64)> = upstream
            .executions()
            .iter()
            .map(|e| (e.epoch, u64::from(e.effect)))
            .collect();
        let mut effect_epochs: Vec<u64> = effects
            .iter()
            .filter(|(_, effect)| *effect == 1)
            .map(|(epoch, _)| *epoch)
            .collect();
        effect_epochs.sort_unstable();
        let before = effect_epochs.len();
        effect_epochs.dedup();
        assert_eq!(
            before,
            effect_epochs.len(),
            "two effects at one epoch; executions (epoch, effect): {effects:?}"
        );
    });
}
