//! Crash consistency: a child process under concurrent load is killed with SIGKILL; on reopen every
//! acknowledged operation is present and every stored record decodes. Also: the file is exclusive
//! to one process.
//!
//! The child is this very test binary, re-executed with an environment variable naming its role.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::ptr_arg)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use idemgate_core::StoreKey;
use idemgate_core::error::ErrorKind;
use idemgate_core::record::{Outcome, RecordState, StoredResponse};
use idemgate_core::store::{ClaimOutcome, ListRequest, Store};
use idemgate_core::testkit::{claim_request, fresh_key};
use idemgate_store_redb::RedbStore;

const LOAD_CHILD: &str = "IDEMGATE_TEST_CRASH_CHILD";
const LOCK_CHILD: &str = "IDEMGATE_TEST_LOCK_CHILD";

fn child(test_name: &str, role: &str, path: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
        .env(role, path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// The child's load: 32 tasks claim and complete fresh keys and report each acknowledgement.
fn run_load(path: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = RedbStore::open(path).unwrap();
        let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let store = store.clone();
                let out = out.clone();
                tokio::spawn(async move {
                    for i in 0u64.. {
                        let key = fresh_key("crash");
                        let req =
                            claim_request(Duration::from_secs(30), Duration::from_secs(3600), 1);
                        let ClaimOutcome::Acquired { fencing } =
                            store.claim(&key, &req).await.unwrap()
                        else {
                            panic!("fresh key existed")
                        };
                        writeln!(out.lock().unwrap(), "claim {}", key.to_hex()).unwrap();
                        let body = format!("task {t} op {i} ").repeat(1 + (i % 50) as usize);
                        let outcome =
                            Outcome::Response(StoredResponse::new(201, vec![], body.clone()));
                        store
                            .complete(&key, fencing, &outcome, Duration::from_secs(3600))
                            .await
                            .unwrap();
                        let mut o = out.lock().unwrap();
                        writeln!(o, "done {} {}", key.to_hex(), body.len()).unwrap();
                        o.flush().unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    });
}

#[test]
fn acknowledged_operations_survive_sigkill() {
    if let Ok(path) = std::env::var(LOAD_CHILD) {
        run_load(&path);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let mut claimed: Vec<StoreKey> = Vec::new();
    let mut done: HashMap<StoreKey, usize> = HashMap::new();
    for round in 0..3 {
        let mut proc = child("acknowledged_operations_survive_sigkill", LOAD_CHILD, &path);
        let stdout = proc.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut acks_this_round = 0;
        // Kill after a varying number of completions, mid-stream.
        let target = 800 + round * 700;
        while acks_this_round < target {
            let line = lines.next().expect("child ended early").unwrap();
            if line.starts_with("done ") {
                acks_this_round += 1;
            }
            record_line(&line, &mut claimed, &mut done);
        }
        proc.kill().unwrap(); // SIGKILL
        // Whatever the child printed before dying was acknowledged too.
        for line in lines {
            record_line(&line.unwrap(), &mut claimed, &mut done);
        }
        proc.wait().unwrap();
        verify(&path, &claimed, &done);
    }
    assert!(
        done.len() >= 3_600,
        "only {} completions acknowledged",
        done.len()
    );
}

fn record_line(line: &str, claimed: &mut Vec<StoreKey>, done: &mut HashMap<StoreKey, usize>) {
    // The first line carries the harness's "test <name> ... " prefix.
    let line = line.rsplit(" ... ").next().unwrap_or(line);
    let mut parts = line.split(' ');
    match (parts.next(), parts.next().and_then(StoreKey::from_hex)) {
        (Some("claim"), Some(k)) => claimed.push(k),
        (Some("done"), Some(k)) => {
            let len = parts.next().and_then(|l| l.parse().ok()).unwrap();
            done.insert(k, len);
        }
        _ => {} // test-harness chatter
    }
}

fn verify(path: &Path, claimed: &[StoreKey], done: &HashMap<StoreKey, usize>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = RedbStore::open(path).expect("reopen after SIGKILL");
        for (key, len) in done {
            let r = store
                .get(key)
                .await
                .unwrap()
                .expect("acknowledged completion lost");
            match r.state {
                RecordState::Completed {
                    outcome: Outcome::Response(resp),
                    ..
                } => {
                    assert_eq!(resp.body.len(), *len);
                    assert_eq!(resp.status, 201);
                }
                s => panic!("acknowledged completion is {s:?}"),
            }
        }
        for key in claimed {
            assert!(
                store.get(key).await.unwrap().is_some(),
                "acknowledged claim lost"
            );
        }
        // Every stored record decodes: nothing is half-written.
        let mut cursor = None;
        let mut total = 0;
        loop {
            let page = store
                .list(&ListRequest {
                    cursor,
                    limit: 1000,
                    only_unknown: false,
                })
                .await
                .unwrap();
            total += page.records.len();
            match page.next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert!(total >= done.len());
        assert_eq!(store.purge_expired(10_000).await.unwrap(), 0);
    });
}

#[test]
fn a_second_process_gets_a_clear_error() {
    if let Ok(path) = std::env::var(LOCK_CHILD) {
        let _store = RedbStore::open(&path).unwrap();
        // Straight to the process's stdout: the test harness captures `println!`.
        let mut out = std::io::stdout();
        writeln!(out, "ready").unwrap();
        out.flush().unwrap();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line); // hold the file until told
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.redb");
    let mut proc = child("a_second_process_gets_a_clear_error", LOCK_CHILD, &path);
    let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
    // The harness prints "test <name> ... " before the child's own output, on the same line.
    while !lines
        .next()
        .expect("child ended")
        .unwrap()
        .ends_with("ready")
    {}
    let err = RedbStore::open(&path).expect_err("the file is held by the child");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("in use"), "{err}");
    drop(proc.stdin.take()); // let the child exit
    proc.wait().unwrap();
    RedbStore::open(&path).expect("free again once the child exited");
}
