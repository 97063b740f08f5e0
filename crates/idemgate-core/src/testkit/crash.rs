//! Crash consistency and start-up lock checks for embedded (single-process, on-disk) stores.
//!
//! Both re-execute the calling test binary as a child process (`std::env::current_exe()`), so a
//! store crate's test is a few lines:
//!
//! ```text
//! #[test]
//! fn acknowledged_operations_survive_sigkill() {
//!     idemgate_core::testkit::crash::acknowledged_operations_survive_sigkill(
//!         "acknowledged_operations_survive_sigkill",
//!         |p| MyStore::open(p),
//!     );
//! }
//! ```
//!
//! - [`acknowledged_operations_survive_sigkill`]: a child runs 32 tasks that claim and complete
//!   fresh keys and print each acknowledgement; the parent kills it with SIGKILL mid-stream three
//!   times, and after each reopen checks that every acknowledged claim and completion is present
//!   with its exact body length, that every stored record decodes, and that nothing is purged.
//! - [`a_second_process_gets_a_clear_error`]: while a child holds the store open, opening it here
//!   fails with [`ErrorKind::Config`] saying it is in use; once the child exits, it opens.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{ErrorKind, StoreError};
use crate::key::StoreKey;
use crate::record::{Outcome, RecordState, StoredResponse};
use crate::store::{ClaimOutcome, ListRequest, Store};
use crate::testkit::{claim_request, fresh_key};

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

/// The crash test. `test_name` is the calling `#[test]` function's name (the child runs exactly
/// it); `open` opens the store at a path (reopened after every kill).
pub fn acknowledged_operations_survive_sigkill<S, F>(test_name: &str, open: F)
where
    S: Store + Clone + Send + Sync + 'static,
    F: Fn(&Path) -> Result<S, StoreError>,
{
    if let Ok(path) = std::env::var(LOAD_CHILD) {
        run_load(Path::new(&path), &open);
        return;
    }
    let dir = tempfile_dir();
    let path = dir.join("crash-store");
    let mut claimed: Vec<StoreKey> = Vec::new();
    let mut done: HashMap<StoreKey, usize> = HashMap::new();
    for round in 0..3 {
        let mut proc = child(test_name, LOAD_CHILD, &path);
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
        verify(&open(&path).expect("reopen after SIGKILL"), &claimed, &done);
    }
    assert!(
        done.len() >= 3_600,
        "only {} completions acknowledged",
        done.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh directory under the system's temporary directory.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "idemgate-crash-{}-{}",
        std::process::id(),
        fresh_key("dir").to_hex()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The child's load: 32 tasks claim and complete fresh keys and report each acknowledgement.
fn run_load<S, F>(path: &Path, open: &F)
where
    S: Store + Clone + Send + Sync + 'static,
    F: Fn(&Path) -> Result<S, StoreError>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = open(path).unwrap();
    rt.block_on(async {
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

fn verify<S: Store>(store: &S, claimed: &[StoreKey], done: &HashMap<StoreKey, usize>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
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

/// The start-up lock test. `test_name` is the calling `#[test]` function's name.
pub fn a_second_process_gets_a_clear_error<S, F>(test_name: &str, open: F)
where
    F: Fn(&Path) -> Result<S, StoreError>,
{
    if let Ok(path) = std::env::var(LOCK_CHILD) {
        let _store = open(Path::new(&path)).unwrap();
        // Straight to the process's stdout: the test harness captures `println!`.
        let mut out = std::io::stdout();
        writeln!(out, "ready").unwrap();
        out.flush().unwrap();
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line); // hold the store until told
        return;
    }
    let dir = tempfile_dir();
    let path = dir.join("locked-store");
    let mut proc = child(test_name, LOCK_CHILD, &path);
    let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
    // The harness prints "test <name> ... " before the child's own output, on the same line.
    while !lines
        .next()
        .expect("child ended")
        .unwrap()
        .ends_with("ready")
    {}
    let err = open(&path).err().expect("the store is held by the child");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("in use"), "{err}");
    drop(proc.stdin.take()); // let the child exit
    proc.wait().unwrap();
    open(&path).expect("free again once the child exited");
    let _ = std::fs::remove_dir_all(&dir);
}
