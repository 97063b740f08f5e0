//! The dashboard in a real browser (headless Chromium): it renders live data from a running
//! instance. CI installs Debian's `chromium`; without it (and without `CI` set) the test says so and
//! skips; with `CI` set, a missing browser is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Http, Proxy, Upstream};

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("IDEMGATE_TEST_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn headless(browser: &PathBuf, profile: &std::path::Path, extra: &[&str], url: &str) -> String {
    let out = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_renders_live_counters_and_recent_keys() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "chromium is missing in CI (.ci/run installs Debian's chromium)"
        );
        eprintln!(
            "SKIPPED: no chromium on this machine (set IDEMGATE_TEST_CHROMIUM or install it)"
        );
        return;
    };
    let up = Upstream::start().await;
    let proxy = Proxy::start(&up.url(), "memory://", &[]);
    let http = Http::default();
    http.post(&proxy.url("/pay"), Some("dash-key-1"), b"{}")
        .await;
    http.post(&proxy.url("/pay"), Some("dash-key-1"), b"{}")
        .await;
    http.post(&proxy.url("/pay"), Some("dash-key-2"), b"{}")
        .await;
    http.post(&proxy.url("/pay"), Some("dash-key-2"), b"[1]")
        .await;

    let profile = tempfile::tempdir().unwrap();
    let url = proxy.admin_url("/");
    let browser2 = browser.clone();
    let profile_path = profile.path().to_path_buf();
    let dom = tokio::task::spawn_blocking(move || {
        headless(&browser2, &profile_path, &["--dump-dom"], &url)
    })
    .await
    .unwrap();
    // Rendered by the page's script from /metrics and /api/keys, not present in the static HTML.
    assert!(
        dom.contains("dash-key-1") && dom.contains("dash-key-2"),
        "keys missing:\n{dom}"
    );
    for (value, label) in [(2, "executed"), (1, "replayed"), (1, "mismatch")] {
        let card = format!("<div class=\"n\">{value}</div><div class=\"l\">{label}</div>");
        assert!(dom.contains(&card), "no {card} in:\n{dom}");
    }
    assert!(dom.contains("class=\"completed\">completed</td>"));
    assert!(
        dom.contains("updated "),
        "the status line never updated:\n{dom}"
    );

    // A screenshot for people to look at (target/dashboard.png).
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let url = proxy.admin_url("/");
    let arg = format!("--screenshot={}", shot.display());
    let profile_path = profile.path().to_path_buf();
    tokio::task::spawn_blocking(move || {
        headless(
            &browser,
            &profile_path,
            &[&arg, "--window-size=1100,800"],
            &url,
        )
    })
    .await
    .unwrap();
    assert!(shot.exists(), "no screenshot at {}", shot.display());
}
