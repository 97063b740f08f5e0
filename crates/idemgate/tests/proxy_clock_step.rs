//! Leases on the embedded and memory stores are judged by a clock that never steps inside the
//! process (issue "hardening", G1): a wall-clock step (NTP, `date -s`) must not expire a live
//! lease and let a retry run the request a second time.
//!
//! The step is real: the proxy runs under libfaketime (Debian's `libfaketime`), whose offset
//! file the test rewrites while a request is in flight; the monotonic clock is left alone.
//! Without the library the test says it skipped (CI installs it and fails without it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Http, Proxy, Upstream};
use http::StatusCode;

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_does_not_expire_a_live_lease() {
    if !std::path::Path::new(LIBFAKETIME).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{LIBFAKETIME} must be installed in CI (Debian package libfaketime)"
        );
        eprintln!("SKIPPED: {LIBFAKETIME} is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let offset_path = offset.display().to_string();
    for store in [
        "memory://".to_owned(),
        format!("file:{}", dir.path().join("data").display()),
    ] {
        let up = Upstream::start().await;
        let proxy = Proxy::start_with_env(
            &up.url(),
            &store,
            &["--lease-ttl", "2s", "--concurrency", "reject"],
            &[
                ("LD_PRELOAD", LIBFAKETIME),
                ("FAKETIME_TIMESTAMP_FILE", &offset_path),
                ("FAKETIME_NO_CACHE", "1"),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
        );
        let http = Http::default();
        let first = common::hold_first(&http, &up, proxy.url("/pay?hold=1"), "stepped").await;
        // The wall clock jumps an hour ahead while the first request is in flight.
        std::fs::write(&offset, "+1h\n").unwrap();
        let retry = tokio::time::timeout(
            Duration::from_secs(20),
            http.post(&proxy.url("/pay?hold=1"), Some("stepped"), b"{}"),
        )
        .await
        .expect("the retry took the live lease over and was dispatched again");
        assert_eq!(retry.status, StatusCode::CONFLICT, "{store}: {retry:?}");
        assert_eq!(up.state.started(), 1, "{store}: dispatched twice");
        up.state.release_held();
        assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
        std::fs::write(&offset, "+0\n").unwrap();
    }
}
