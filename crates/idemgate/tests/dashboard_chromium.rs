//! The dashboard in a real browser (headless Chromium): it renders live data from a running
//! instance. CI installs Debian's `chromium`; without it (and without `CI` set) the test says so and
//! skips; with `CI` set, a missing browser is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Http, Proxy, Upstream};
use http::{HeaderValue, Method};

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

/// The store key of `key` on the default route (no scope headers), from the admin API.
async fn store_key(http: &Http, proxy: &Proxy, key: &str) -> String {
    let found = http
        .send(
            Method::POST,
            &proxy.admin_url("/api/keys/lookup"),
            &[("content-type", HeaderValue::from_static("application/json"))],
            format!("{{\"key\":\"{key}\"}}"),
        )
        .await
        .json();
    found["store_key"].as_str().unwrap().to_owned()
}

/// `(data-key, data-outcome)` of the activity rows, in page order.
fn activity_rows(dom: &str) -> Vec<(String, String)> {
    dom.split("<tr class=\"activity")
        .skip(1)
        .map(|row| {
            let attr = |name: &str| {
                let start = row.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                row[start..].split('"').next().unwrap().to_owned()
            };
            (attr("data-key"), attr("data-outcome"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_routes_recent_activity_unknown_records_and_search() {
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
    let pay = proxy.url("/pay");
    for (key, body) in [
        ("dash-key-1", &b"{}"[..]),
        ("dash-key-1", b"{}"),
        ("dash-key-2", b"{}"),
        ("dash-key-2", b"[1]"),
    ] {
        http.post(&pay, Some(key), body).await;
    }
    // The upstream cuts its answer short: the outcome is unknown.
    let cut = http
        .post(&proxy.url("/pay?truncate=1"), Some("dash-cut"), b"{}")
        .await;
    assert_eq!(cut.status.as_u16(), 502);
    let cut_key = store_key(&http, &proxy, "dash-cut").await;
    let key1 = store_key(&http, &proxy, "dash-key-1").await;

    // The JSON behind the page.
    let activity = http
        .get(&proxy.admin_url("/api/activity?limit=2"))
        .await
        .json();
    let entries = activity["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["key"], "dash-cut");
    assert_eq!(entries[0]["outcome"], "unknown");
    assert_eq!(entries[0]["store_key"], cut_key.as_str());
    let series = http.get(&proxy.admin_url("/api/series")).await.json();
    let executed: u64 = series["routes"]["default"]["counts"]["executed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(executed, 2, "{series}");
    // From the census: `fresh=1` waits for a pass that started after the record was marked.
    let unknown = http
        .get(&proxy.admin_url("/api/unknown?fresh=1"))
        .await
        .json();
    assert_eq!(unknown["fresh"], true, "{unknown}");
    assert_eq!(unknown["records"][0]["store_key"], cut_key.as_str());
    assert_eq!(unknown["records"][0]["route"], "default");
    assert_eq!(unknown["complete"], true);
    // The page's resolve button sends back the marking it listed (a compare-and-set on it).
    let page = http.get(&proxy.admin_url("/")).await;
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    assert!(
        html.contains(
            "JSON.stringify({ action: \"retry\", epoch: u.epoch, unknown_since_ms: u.unknown_since_ms })"
        ),
        "the resolve button does not send the marking"
    );
    // The page runs under its Content-Security-Policy (its script allowed by hash): the
    // rendered DOM below proves the script ran.
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'sha256-")
    );

    let profile = tempfile::tempdir().unwrap();
    // The hash runs a key search once the page has loaded.
    let url = proxy.admin_url("/#search=dash-key-1");
    let browser2 = browser.clone();
    let profile_path = profile.path().to_path_buf();
    let dom = tokio::task::spawn_blocking(move || {
        headless(&browser2, &profile_path, &["--dump-dom"], &url)
    })
    .await
    .unwrap();
    // Rendered by the page's script, not present in the static HTML.
    assert!(
        dom.contains("updated "),
        "the status line never updated:\n{dom}"
    );
    // The per-route chart, with a line per outcome seen.
    assert!(
        dom.contains("class=\"chart\" data-route=\"default\""),
        "no chart for the route:\n{dom}"
    );
    for outcome in ["executed", "replayed", "mismatch", "unknown"] {
        let attr = format!("data-outcome=\"{outcome}\"");
        assert!(
            dom.split("<rect")
                .skip(1)
                .any(|tag| tag.split('>').next().unwrap().contains(&attr)),
            "no {outcome} column:\n{dom}"
        );
    }
    // Recent activity, newest first.
    assert_eq!(
        activity_rows(&dom),
        [
            ("dash-cut", "unknown"),
            ("dash-key-2", "mismatch"),
            ("dash-key-2", "executed"),
            ("dash-key-1", "replayed"),
            ("dash-key-1", "executed"),
        ]
        .map(|(k, o)| (k.to_owned(), o.to_owned())),
        "{dom}"
    );
    // The outcome-unknown record with its resolve command.
    assert!(
        dom.contains(&format!(
            "class=\"unknown-record\" data-store-key=\"{cut_key}\""
        )),
        "no unknown record:\n{dom}"
    );
    let command = format!(
        "idemgate keys --admin {} resolve {cut_key}",
        proxy.admin_url("").trim_end_matches('/')
    );
    assert!(dom.contains(&command), "no `{command}` in:\n{dom}");
    // The search result.
    assert!(
        dom.contains("id=\"search-record\" data-state=\"completed\"") && dom.contains(&key1),
        "no search result for dash-key-1:\n{dom}"
    );
    // The scope hash is not a column of the activity table (only in the search's details).
    let table = dom.split("<tbody id=\"activity\">").nth(1).unwrap();
    let table = table.split("</tbody>").next().unwrap();
    assert!(
        !table.contains("default#"),
        "a scope hash is shown:\n{table}"
    );

    // Screenshots for people to look at (in the target's tmp dir).
    for (name, size) in [
        ("dashboard.png", "1280,800"),
        ("dashboard-full.png", "1280,1400"),
    ] {
        let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
        let _ = std::fs::remove_file(&shot);
        let url = proxy.admin_url("/#search=dash-cut");
        let args = [
            format!("--screenshot={}", shot.display()),
            format!("--window-size={size}"),
        ];
        let profile_path = profile.path().to_path_buf();
        let browser = browser.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            headless(&browser, &profile_path, &args, &url)
        })
        .await
        .unwrap();
        assert!(shot.exists(), "no screenshot at {}", shot.display());
    }
}
